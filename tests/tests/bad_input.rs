//! Every kind of bad input gets a clear error naming the field and the
//! rule, with the right status, and leaves nothing half-applied.

use bazaar_tests::{default_jackpot, Mall, Node};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn event(overrides: Value) -> Value {
    let mut body = Mall::purchase("e-1", "c-1", "s-1", 5_000);
    for (key, value) in overrides.as_object().expect("an object") {
        if value.is_null() {
            body.as_object_mut().expect("object").remove(key);
        } else {
            body[key] = value.clone();
        }
    }
    body
}

#[test]
fn bad_events_name_the_field_and_change_nothing() {
    let node = Node::start(&["--max-body-bytes", "4096", "--max-event-age", "1d"]);
    let mall = Mall::create(&node, "mall", default_jackpot());
    let pos = &mall.pos;
    let events = mall.path("events");
    let check = |overrides: Value, field: &str| {
        pos.post(&events, event(overrides)).expect_error(400, "invalid_argument", Some(field));
    };
    check(json!({"event_id": ""}), "event_id");
    check(json!({"event_id": "x".repeat(129)}), "event_id");
    check(json!({"event_id": "till 7"}), "event_id");
    check(json!({"customer": "c/1"}), "customer");
    check(json!({"customer": null}), "customer");
    check(json!({"store": "ünïcode"}), "store");
    check(json!({"store": null}), "store");
    check(json!({"kind": "refund"}), "kind");
    check(json!({"kind": "custom:"}), "kind");
    check(json!({"amount_minor": -1}), "amount_minor");
    check(json!({"amount_minor": 10_000_000_000_000_i64}), "amount_minor");
    check(json!({"amount_minor": 12.5}), "amount_minor");
    check(json!({"amount_minor": "100"}), "amount_minor");
    check(json!({"amount_minor": null}), "amount_minor");
    check(json!({"at": "tomorrow"}), "at");
    check(json!({"at": "2099-01-01T00:00:00Z"}), "at");
    check(json!({"at": "2020-01-01T00:00:00Z"}), "at");
    check(json!({"coupon": "FREE"}), "coupon");

    // Unknown store: a reference to something that does not exist.
    pos.post(&events, event(json!({"store": "s-99"}))).expect_error(404, "not_found", Some("store"));

    // Transport-level rules.
    pos.raw("POST", &events, Some("application/json"), "{\"event_id\": ").expect_error(
        400,
        "malformed_json",
        Some("body"),
    );
    pos.raw("POST", &events, Some("text/plain"), &event(json!({})).to_string()).expect_error(
        400,
        "unsupported_media_type",
        Some("content-type"),
    );
    pos.raw("POST", &events, None, &event(json!({})).to_string()).expect_error(
        400,
        "unsupported_media_type",
        Some("content-type"),
    );
    let huge = event(json!({"event_id": "big", "padding": "x".repeat(5_000)}));
    pos.raw("POST", &events, Some("application/json"), &huge.to_string()).expect_error(
        400,
        "payload_too_large",
        Some("body"),
    );
    pos.get(&mall.path("leaderboards/lb-spend?top=many")).expect_error(400, "invalid_argument", Some("top"));
    pos.get(&mall.path("leaderboards/lb-spend?top=0")).expect_error(400, "invalid_argument", Some("top"));

    // None of it was applied: the customer does not exist, the jackpot and
    // the leaderboard never moved.
    pos.get(&mall.path("customers/c-1")).expect_error(404, "not_found", None);
    let jackpot = pos.get(&mall.path("jackpots/j-mall")).expect(200);
    assert_eq!(jackpot["books"]["contributed_minor"], 0);
    assert_eq!(pos.get(&mall.path("leaderboards/lb-spend")).expect(200)["members"], 0);

    // And a valid event with the same id is accepted afterwards.
    pos.post(&events, event(json!({}))).expect(200);
}

#[test]
fn bad_definitions_name_the_field_and_keep_the_old_version() {
    let node = Node::start(&[]);
    let mall = Mall::create(&node, "mall", default_jackpot());
    let op = &mall.operator;
    let check = |path: &str, body: Value, field: &str| {
        op.put(&mall.path(path), body).expect_error(400, "invalid_argument", Some(field));
    };
    let wheel = |segments: Value| json!({"campaign": "bf", "cost": {"entitlements": 1}, "segments": segments});
    check("wheels/w2", wheel(json!([{"label": "a", "weight": 0, "prize": {"points": 1}}])), "segments");
    check("wheels/w2", wheel(json!([])), "segments");
    check(
        "wheels/w2",
        wheel(
            json!([{"label": "a", "weight": 1, "prize": {"points": 1}}, {"label": "b", "weight": -1, "prize": {"points": 1}}]),
        ),
        "segments[1].weight",
    );
    check("wheels/w2", wheel(json!([{"label": "a", "weight": 1, "prize": {"jewels": 1}}])), "segments[0].prize");
    check(
        "wheels/w2",
        json!({"campaign": "nope", "cost": {"entitlements": 1}, "segments": [{"label": "a", "weight": 1, "prize": {"points": 1}}]}),
        "campaign",
    );
    let jackpot = |overrides: Value| {
        let mut body = default_jackpot();
        for (key, value) in overrides.as_object().expect("object") {
            body[key] = value.clone();
        }
        body
    };
    check("jackpots/j-mall", jackpot(json!({"cap_minor": 10_000})), "cap_minor");
    check("jackpots/j-mall", jackpot(json!({"cap_minor": 5_000})), "cap_minor");
    check("jackpots/j-mall", jackpot(json!({"contribution_bps": 10_001})), "contribution_bps");
    check("jackpots/j-mall", jackpot(json!({"reserve_bps": 10_000})), "reserve_bps");
    check("jackpots/j-mall", jackpot(json!({"seed_minor": -1})), "seed_minor");
    check("jackpots/j-mall", jackpot(json!({"surprise": true})), "surprise");
    let campaign = |overrides: Value| {
        let mut body = json!({"name": "X", "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2027-01-01T00:00:00Z",
                              "earning": {"points_per_unit_minor": 100}});
        for (key, value) in overrides.as_object().expect("object") {
            body[key] = value.clone();
        }
        body
    };
    check("campaigns/c2", campaign(json!({"ends_at": "2025-01-01T00:00:00Z"})), "ends_at");
    check("campaigns/c2", campaign(json!({"starts_at": "soon"})), "starts_at");
    check("campaigns/c2", campaign(json!({"stores": ["s-1", "s-404"]})), "stores[1]");
    check("campaigns/c2", campaign(json!({"earning": {"points_per_unit_minor": 0}})), "earning.points_per_unit_minor");
    check(
        "campaigns/c2",
        campaign(json!({"earning": {"points_per_unit_minor": 100, "tier_multipliers_pct": {"gold": 20000}}})),
        "earning.tier_multipliers_pct.gold",
    );
    check("campaigns/bad id", campaign(json!({})), "campaign");
    check(
        "missions/m2",
        json!({"campaign": "bf", "name": "M", "steps": [{"kind": "purchase", "count": 0}]}),
        "steps[0].count",
    );
    check(
        "missions/m2",
        json!({"campaign": "bf", "name": "M", "steps": [{"kind": "purchase"}], "reward": {"spins": {"wheel": "w-404", "count": 1}}}),
        "reward.spins.wheel",
    );
    check("leaderboards/l2", json!({"campaign": "bf", "metric": "speed"}), "metric");
    check("leaderboards/l2", json!({"campaign": "bf", "metric": "spend", "top_size": 0}), "top_size");
    check("stores/s-9", json!({"name": "", "category": "food"}), "name");
    mall.operator.raw("PUT", &mall.path("stores/s-9"), Some("application/json"), "{\"name\": \"x\"").expect_error(
        400,
        "malformed_json",
        Some("body"),
    );

    // The jackpot kept its first definition: a purchase contributes 10%.
    let answer = mall.pos.post(&mall.path("events"), Mall::purchase("e-1", "c-1", "s-1", 5_000)).expect(200);
    assert_eq!(answer["jackpots"][0]["contributed_minor"], 500);
    // Tenants: bad ids, bad currency, duplicates.
    let admin = node.admin();
    admin.post("/v1/tenants", json!({"id": "", "name": "X", "currency": "EUR"})).expect_error(
        400,
        "invalid_argument",
        Some("id"),
    );
    admin.post("/v1/tenants", json!({"id": "t2", "name": "X", "currency": "euro"})).expect_error(
        400,
        "invalid_argument",
        Some("currency"),
    );
    admin.post("/v1/tenants", json!({"id": "mall", "name": "X", "currency": "EUR"})).expect_error(
        409,
        "already_exists",
        None,
    );
    admin.post(&mall.path("keys"), json!({"role": "superuser"})).expect_error(400, "invalid_argument", Some("role"));
}

#[test]
fn unknown_entities_are_404_and_limits_are_409() {
    let node = Node::start(&[]);
    let mall = Mall::create(&node, "mall", default_jackpot());
    let admin = node.admin();
    admin.get("/v1/tenants/atlantis").expect_error(404, "not_found", None);
    admin.post("/v1/tenants/atlantis/events", Mall::purchase("e", "c", "s-1", 1)).expect_error(404, "not_found", None);
    let pos = &mall.pos;
    pos.post(&mall.path("wheels/w-404/spins"), json!({"customer": "c-1", "request_id": "r-1"})).expect_error(
        404,
        "not_found",
        None,
    );
    pos.get(&mall.path("jackpots/j-404")).expect_error(404, "not_found", None);
    pos.get(&mall.path("leaderboards/l-404")).expect_error(404, "not_found", None);
    pos.post(&mall.path("wheels/w-main/spins"), json!({"customer": "c 1", "request_id": "r-1"})).expect_error(
        400,
        "invalid_argument",
        Some("customer"),
    );

    // A wheel whose only prize has a stock of one: the second spin finds
    // it gone, answers 409 and refunds the spin.
    mall.operator
        .put(
            &mall.path("wheels/w-tv"),
            json!({"campaign": "bf", "cost": {"points": 100},
                   "segments": [{"label": "tv", "weight": 1, "prize": {"item": "TV"}, "stock": 1}]}),
        )
        .expect(200);
    pos.post(&mall.path("events"), Mall::purchase("e-1", "c-1", "s-1", 50_000)).expect(200);
    let won = pos.post(&mall.path("wheels/w-tv/spins"), json!({"customer": "c-1", "request_id": "r-1"})).expect(200);
    assert_eq!(won["prize"], json!({"item": "TV"}));
    assert_eq!(won["points_balance"], 400);
    let gone = pos.post(&mall.path("wheels/w-tv/spins"), json!({"customer": "c-1", "request_id": "r-2"})).expect_error(
        409,
        "failed_precondition",
        None,
    );
    assert_eq!(gone["error"]["reason"], "out_of_stock");
    let customer = pos.get(&mall.path("customers/c-1")).expect(200);
    assert_eq!(customer["points_balance"], 400, "the failed spin was refunded");
    assert_eq!(customer["items"].as_array().map(Vec::len), Some(1));
    // Not enough points.
    pos.post(&mall.path("events"), Mall::purchase("e-2", "c-2", "s-1", 5_000)).expect(200);
    let poor = pos.post(&mall.path("wheels/w-tv/spins"), json!({"customer": "c-2", "request_id": "r-3"})).expect_error(
        409,
        "failed_precondition",
        None,
    );
    assert_eq!(poor["error"]["reason"], "not_enough_points");
}

/// One HTTP/1.1 exchange on an open connection: the head of the request,
/// then (after a pause, as a slow till would) its body; the answer's status,
/// headers (names in lower case) and body.
fn exchange(
    stream: &mut BufReader<TcpStream>,
    head: &str,
    body: &[u8],
    pause: Duration,
) -> (u16, Vec<(String, String)>, Value) {
    stream.get_mut().write_all(head.as_bytes()).expect("the head is sent");
    std::thread::sleep(pause);
    stream.get_mut().write_all(body).expect("the body is sent");
    let mut line = String::new();
    stream.read_line(&mut line).expect("a status line");
    let status =
        line.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("status: {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).expect("a header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("header: {line:?}"));
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .expect("answers carry a length");
    let mut answer = vec![0; length];
    stream.read_exact(&mut answer).expect("the answer's body");
    (status, headers, serde_json::from_slice(&answer).unwrap_or(Value::Null))
}

#[test]
fn a_request_refused_before_its_body_is_read_leaves_the_connection_usable() {
    // The node may answer from the head alone (wrong media type, no key, a
    // declared length past the limit); it must still read the body, or the
    // connection is closed under a client about to reuse it, and a closed
    // connection with unread bytes is reset, losing the answer.
    let node = Node::start(&["--max-body-bytes", "4096"]);
    let mall = Mall::create(&node, "mall", default_jackpot());
    let key = mall.pos_key().expect("a pos key");
    let address = node.url.trim_start_matches("http://");
    let socket = TcpStream::connect(address).expect("the node accepts a connection");
    socket.set_read_timeout(Some(Duration::from_secs(30))).expect("a read timeout");
    let mut stream = BufReader::new(socket);
    let events = mall.path("events");
    let purchase = event(json!({})).to_string();
    let huge = event(json!({"event_id": "big", "padding": "x".repeat(20_000)})).to_string();
    let refused = [
        ("text/plain", Some(key), &purchase, 400, "unsupported_media_type"),
        ("application/json", None, &purchase, 401, "unauthenticated"),
        ("application/json", Some(key), &huge, 400, "payload_too_large"),
    ];
    for (content_type, key, body, status, code) in refused {
        let authorization = key.map(|key| format!("Authorization: Bearer {key}\r\n")).unwrap_or_default();
        let head = format!(
            "POST {events} HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\n{authorization}\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let (got, headers, answer) = exchange(&mut stream, &head, body.as_bytes(), Duration::from_millis(300));
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{answer}");
        assert!(!headers.iter().any(|(name, value)| name == "connection" && value == "close"), "{headers:?}");
    }
    // The same connection still carries requests, and nothing was applied.
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\r\n",
        mall.path("jackpots/j-mall")
    );
    let (got, _, jackpot) = exchange(&mut stream, &head, b"", Duration::ZERO);
    assert_eq!(got, 200, "{jackpot}");
    assert_eq!(jackpot["books"]["contributed_minor"], 0);
}

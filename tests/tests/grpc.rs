//! The gRPC API against a real node: the API.md flow over a tonic client
//! gives the same answers as over HTTP, errors map to the right codes with
//! field violations, batches and the bidirectional stream answer every event
//! in order, and grpcurl lists, describes and calls everything through
//! server reflection.

use bazaar_proto::v1 as pb;
use bazaar_tests::{assert_books_balance, await_board_total, eventually, tool, Node};
use pb::catalog_service_client::CatalogServiceClient;
use pb::customer_service_client::CustomerServiceClient;
use pb::event_service_client::EventServiceClient;
use pb::game_service_client::GameServiceClient;
use pb::tenant_service_client::TenantServiceClient;
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_types::StatusExt;

fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {key}").parse().expect("a valid header value");
    request.metadata_mut().insert("authorization", value);
    request
}

async fn channel(node: &Node) -> Channel {
    Channel::from_shared(node.grpc.clone()).expect("a valid URI").connect().await.expect("gRPC connects")
}

fn purchase(event_id: &str, customer: &str, amount_minor: i64) -> pb::RecordEventRequest {
    pb::RecordEventRequest {
        tenant: "mall".into(),
        event_id: event_id.into(),
        customer: customer.into(),
        store: Some("s-1".into()),
        kind: "purchase".into(),
        amount_minor: Some(amount_minor),
        at: None,
    }
}

/// Sets up a mall entirely over gRPC; returns (operator, pos, display) keys.
async fn mall(node: &Node, channel: &Channel) -> (String, String, String) {
    let admin = bazaar_tests::ADMIN_KEY;
    let mut tenants = TenantServiceClient::new(channel.clone());
    tenants
        .create_tenant(with_key(
            admin,
            pb::CreateTenantRequest { id: "mall".into(), name: "Mall".into(), currency: "EUR".into() },
        ))
        .await
        .expect("tenant created");
    let mut keys = Vec::new();
    for role in ["operator", "pos", "display"] {
        let key = tenants
            .create_key(with_key(admin, pb::CreateKeyRequest { tenant: "mall".into(), role: role.into() }))
            .await
            .expect("key created")
            .into_inner();
        assert_eq!(key.role, role);
        keys.push(key.key);
    }
    let operator = keys[0].clone();
    let mut catalog = CatalogServiceClient::new(channel.clone());
    catalog
        .put_store(with_key(
            &operator,
            pb::PutStoreRequest {
                tenant: "mall".into(),
                store: "s-1".into(),
                name: "Shoes".into(),
                category: "fashion".into(),
            },
        ))
        .await
        .expect("store");
    catalog
        .put_campaign(with_key(
            &operator,
            pb::PutCampaignRequest {
                tenant: "mall".into(),
                campaign: "bf".into(),
                name: "Black Friday".into(),
                starts_at: "2026-01-01T00:00:00Z".into(),
                ends_at: "2099-01-01T00:00:00Z".into(),
                stores: None,
                earning: Some(pb::Earning {
                    points_per_unit_minor: 100,
                    event_bonus: [("visit".to_owned(), 5)].into_iter().collect(),
                    ..pb::Earning::default()
                }),
                tiers: vec![pb::Tier { name: "silver".into(), min_points: 100 }],
            },
        ))
        .await
        .expect("campaign");
    let segment = |label: &str, weight: u32, prize: pb::prize::Kind| pb::Segment {
        label: label.into(),
        weight,
        prize: Some(pb::Prize { kind: Some(prize) }),
        stock: None,
    };
    let version = catalog
        .put_wheel(with_key(
            &operator,
            pb::PutWheelRequest {
                tenant: "mall".into(),
                wheel: "w".into(),
                campaign: "bf".into(),
                cost: Some(pb::put_wheel_request::Cost::CostEntitlements(1)),
                daily_limit: Some(1),
                segments: vec![
                    segment("ten", 3, pb::prize::Kind::Points(10)),
                    segment("again", 1, pb::prize::Kind::Nothing(true)),
                ],
                earn: Some(pb::SpinEarning { min_purchase_minor: 1_000, spins: 1 }),
            },
        ))
        .await
        .expect("wheel")
        .into_inner();
    assert_eq!((version.id.as_str(), version.version), ("w", 1));
    catalog
        .put_jackpot(with_key(
            &operator,
            pb::PutJackpotRequest {
                tenant: "mall".into(),
                jackpot: "j".into(),
                campaign: "bf".into(),
                seed_minor: 1_000,
                cap_minor: 5_000,
                contribution_bps: 1_000,
                reserve_bps: 1_000,
                min_purchase_minor: 100,
            },
        ))
        .await
        .expect("jackpot");
    catalog
        .put_mission(with_key(
            &operator,
            pb::PutMissionRequest {
                tenant: "mall".into(),
                mission: "m".into(),
                campaign: "bf".into(),
                name: "Two purchases".into(),
                steps: vec![pb::Step { kind: "purchase".into(), count: 2, ..pb::Step::default() }],
                reward: Some(pb::Reward { points: 100, ..pb::Reward::default() }),
                ..pb::PutMissionRequest::default()
            },
        ))
        .await
        .expect("mission");
    catalog
        .put_leaderboard(with_key(
            &operator,
            pb::PutLeaderboardRequest {
                tenant: "mall".into(),
                leaderboard: "lb".into(),
                campaign: "bf".into(),
                metric: pb::Metric::Spend.into(),
                top_size: 0,
            },
        ))
        .await
        .expect("leaderboard");
    let _ = node;
    (operator, keys[1].clone(), keys[2].clone())
}

#[tokio::test]
async fn the_api_flow_over_grpc_gives_the_same_answers_as_http() {
    let node = Node::start(&[]);
    let channel = channel(&node).await;
    let (operator, pos, display) = mall(&node, &channel).await;
    let mut events = EventServiceClient::new(channel.clone());
    let mut games = GameServiceClient::new(channel.clone());
    let mut customers = CustomerServiceClient::new(channel.clone());

    // Purchases until the jackpot hits.
    let mut won = 0;
    for n in 0..30 {
        let result = events
            .record_event(with_key(&pos, purchase(&format!("g-{n}"), "c-1", 20_000)))
            .await
            .expect("recorded")
            .into_inner();
        assert_eq!(result.points_earned, if n == 1 { 200 + 100 } else { 200 });
        won += result.jackpots[0].won_minor;
    }
    assert!(0 < won, "a jackpot capped at 50.00 fed 20.00 per purchase hits");

    // The same event over HTTP is a duplicate with the same answer.
    let first = events.record_event(with_key(&pos, purchase("g-0", "c-1", 20_000))).await.expect("retry").into_inner();
    assert!(first.duplicate);
    let http = node.client(Some(&pos));
    let over_http = http
        .post(
            "/v1/tenants/mall/events",
            json!({"event_id": "g-0", "customer": "c-1", "store": "s-1", "kind": "purchase", "amount_minor": 20_000}),
        )
        .expect(200);
    assert_eq!(over_http["duplicate"], true);
    assert_eq!(over_http["points_earned"], first.points_earned);
    assert_eq!(over_http["points_balance"], first.points_balance);
    assert_eq!(over_http["jackpots"][0]["contributed_minor"], first.jackpots[0].contributed_minor);
    assert_eq!(over_http["jackpots"][0]["won_minor"], first.jackpots[0].won_minor);
    assert_eq!(over_http["missions"][0]["step"], first.missions[0].step);

    // Reads agree between transports.
    let jackpot = games
        .get_jackpot(with_key(&display, pb::GetJackpotRequest { tenant: "mall".into(), jackpot: "j".into() }))
        .await
        .expect("jackpot")
        .into_inner();
    let jackpot_http = node.client(Some(&display)).get("/v1/tenants/mall/jackpots/j").expect(200);
    assert_books_balance(&jackpot_http);
    assert_eq!(jackpot_http["pool_minor"], jackpot.pool_minor);
    assert_eq!(jackpot_http["cycle"], jackpot.cycle);
    assert_eq!(jackpot_http["commitment"], jackpot.commitment.as_str());
    assert_eq!(jackpot_http["books"]["paid_minor"], jackpot.books.expect("books").paid_minor);
    let hit = jackpot.last_hit.expect("a hit");
    assert_eq!(bazaar_tests::commitment(hit.trigger_minor, &hit.salt), hit.commitment);

    let customer = customers
        .get_customer(with_key(&pos, pb::GetCustomerRequest { tenant: "mall".into(), customer: "c-1".into() }))
        .await
        .expect("customer")
        .into_inner();
    let customer_http = http.get("/v1/tenants/mall/customers/c-1").expect(200);
    assert_eq!(customer_http["points_balance"], customer.points_balance);
    assert_eq!(customer_http["stats"]["spend_minor"], customer.stats.as_ref().expect("stats").spend_minor);
    assert_eq!(customer.stats.expect("stats").purchases, 30);

    // The scores reach the leaderboard just after their answers.
    eventually("c-1's purchases on the leaderboard", || {
        let board = node.client(Some(&display)).get("/v1/tenants/mall/leaderboards/lb?top=5").expect(200);
        (board["entries"][0]["score"] == 600_000).then_some(()).ok_or_else(|| board.to_string())
    });
    let board = games
        .get_leaderboard(with_key(
            &display,
            pb::GetLeaderboardRequest { tenant: "mall".into(), leaderboard: "lb".into(), top: 5 },
        ))
        .await
        .expect("leaderboard")
        .into_inner();
    assert_eq!(board.entries[0].customer, "c-1");
    assert_eq!(board.entries[0].score, 600_000);
    let rank = games
        .get_rank(with_key(
            &display,
            pb::GetRankRequest { tenant: "mall".into(), leaderboard: "lb".into(), customer: "c-1".into(), around: 1 },
        ))
        .await
        .expect("rank")
        .into_inner();
    assert_eq!(rank.rank, Some(1));

    // A spin, retried.
    let spin =
        pb::SpinRequest { tenant: "mall".into(), wheel: "w".into(), customer: "c-1".into(), request_id: "r-1".into() };
    let first_spin = games.spin(with_key(&pos, spin.clone())).await.expect("spin").into_inner();
    let again = games.spin(with_key(&pos, spin)).await.expect("spin again").into_inner();
    assert!(again.duplicate);
    assert_eq!(again.draw_id, first_spin.draw_id);
    let audit = games
        .get_audit(with_key(
            &operator,
            pb::GetAuditRequest { tenant: "mall".into(), kind: "wheels".into(), id: "w".into(), after: 0, limit: 0 },
        ))
        .await
        .expect("audit")
        .into_inner();
    assert_eq!(audit.records.len(), 1);
}

#[tokio::test]
async fn errors_map_to_grpc_codes_with_field_violations() {
    let node = Node::start(&[]);
    let channel = channel(&node).await;
    let (operator, pos, display) = mall(&node, &channel).await;
    let mut events = EventServiceClient::new(channel.clone());
    let mut games = GameServiceClient::new(channel.clone());
    let mut catalog = CatalogServiceClient::new(channel.clone());

    let mut bad = purchase("e-1", "c-1", -5);
    bad.amount_minor = Some(-5);
    let error = events.record_event(with_key(&pos, bad)).await.expect_err("negative amount");
    assert_eq!(error.code(), Code::InvalidArgument);
    let violations = error.get_error_details().bad_request().expect("a BadRequest").field_violations.clone();
    assert_eq!(violations[0].field, "amount_minor");

    let error = events.record_event(Request::new(purchase("e-1", "c-1", 5))).await.expect_err("no key");
    assert_eq!(error.code(), Code::Unauthenticated);
    let error = events.record_event(with_key(&display, purchase("e-1", "c-1", 5))).await.expect_err("display key");
    assert_eq!(error.code(), Code::PermissionDenied);
    let mut other_tenant = purchase("e-1", "c-1", 5);
    other_tenant.tenant = "elsewhere".into();
    let error = events.record_event(with_key(&pos, other_tenant)).await.expect_err("other tenant");
    assert_eq!(error.code(), Code::PermissionDenied);

    events.record_event(with_key(&pos, purchase("e-1", "c-1", 5_000))).await.expect("recorded");
    let error = events.record_event(with_key(&pos, purchase("e-1", "c-1", 6_000))).await.expect_err("conflict");
    assert_eq!(error.code(), Code::Aborted);

    let spin = |id: &str| pb::SpinRequest {
        tenant: "mall".into(),
        wheel: "w".into(),
        customer: "c-1".into(),
        request_id: id.into(),
    };
    games.spin(with_key(&pos, spin("r-1"))).await.expect("one spin a day");
    let error = games.spin(with_key(&pos, spin("r-2"))).await.expect_err("daily limit");
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(error.get_error_details().error_info().map(|i| i.reason.clone()), Some("daily_limit".to_owned()));
    let mut unknown = spin("r-3");
    unknown.wheel = "w-404".into();
    assert_eq!(games.spin(with_key(&pos, unknown)).await.expect_err("unknown wheel").code(), Code::NotFound);

    let zero = pb::PutWheelRequest {
        tenant: "mall".into(),
        wheel: "w2".into(),
        campaign: "bf".into(),
        cost: Some(pb::put_wheel_request::Cost::CostPoints(10)),
        segments: vec![pb::Segment {
            label: "x".into(),
            weight: 0,
            prize: Some(pb::Prize { kind: Some(pb::prize::Kind::Points(1)) }),
            stock: None,
        }],
        ..pb::PutWheelRequest::default()
    };
    let error = catalog.put_wheel(with_key(&operator, zero)).await.expect_err("zero weights");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(error.get_error_details().bad_request().expect("a BadRequest").field_violations[0].field, "segments");
    let jackpot = pb::PutJackpotRequest {
        tenant: "mall".into(),
        jackpot: "j2".into(),
        campaign: "bf".into(),
        seed_minor: 5_000,
        cap_minor: 5_000,
        contribution_bps: 20_000,
        ..pb::PutJackpotRequest::default()
    };
    let error = catalog.put_jackpot(with_key(&operator, jackpot)).await.expect_err("cap not above seed");
    assert_eq!(error.get_error_details().bad_request().expect("a BadRequest").field_violations[0].field, "cap_minor");

    // A method the server does not have: counted, but not by its name.
    let mut raw = tonic::client::Grpc::new(channel.clone());
    raw.ready().await.expect("the channel is ready");
    let nothing = tonic::codegen::http::uri::PathAndQuery::from_static("/bazaar.v1.EventService/NoSuchMethod");
    let codec = tonic_prost::ProstCodec::<pb::GetCustomerRequest, pb::Customer>::default();
    let error = raw.unary(Request::new(pb::GetCustomerRequest::default()), nothing, codec).await.expect_err("none");
    assert_eq!(error.code(), Code::Unimplemented);

    // The server's own latency histogram saw each call with its code.
    let scrape = node.admin().get("/metrics").text;
    let count = |method: &str, code: &str| -> f64 {
        let series = format!("bazaar_grpc_request_duration_seconds_count{{code=\"{code}\",method=\"{method}\"}} ");
        scrape.lines().find_map(|l| l.strip_prefix(series.as_str())?.parse().ok()).unwrap_or(0.0)
    };
    let record = "/bazaar.v1.EventService/RecordEvent";
    assert_eq!(count(record, "0"), 1.0, "one event recorded\n{scrape}");
    assert_eq!(count(record, "3"), 1.0, "one invalid argument\n{scrape}");
    assert_eq!(count(record, "16"), 1.0, "one unauthenticated\n{scrape}");
    assert_eq!(count(record, "7"), 2.0, "two permission denied\n{scrape}");
    assert_eq!(count(record, "10"), 1.0, "one idempotency conflict\n{scrape}");
    assert_eq!(count("/bazaar.v1.GameService/Spin", "9"), 1.0, "one daily limit\n{scrape}");
    assert_eq!(count("unknown", "12"), 1.0, "the missing method\n{scrape}");
    assert!(!scrape.contains("NoSuchMethod"), "a client cannot name a label value");
}

#[tokio::test]
async fn batches_and_streams_answer_every_event_in_order() {
    let node = Node::start(&[]);
    let channel = channel(&node).await;
    let (_, pos, _) = mall(&node, &channel).await;
    let mut events = EventServiceClient::new(channel.clone());

    let mut batch: Vec<pb::RecordEventRequest> =
        (0..20).map(|n| purchase(&format!("b-{n}"), &format!("c-{}", n % 3), 1_500)).collect();
    batch[7].kind = "teleport".into();
    let results = events
        .record_events(with_key(&pos, pb::RecordEventsRequest { tenant: "mall".into(), events: batch }))
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert_eq!(results.len(), 20);
    for (n, outcome) in results.iter().enumerate() {
        match (&outcome.outcome, n) {
            (Some(pb::event_outcome::Outcome::Error(error)), 7) => {
                assert_eq!(error.field, "events[7].kind")
            }
            (Some(pb::event_outcome::Outcome::Result(result)), _) => {
                assert_eq!(result.event_id, format!("b-{n}"))
            }
            other => panic!("unexpected outcome {n}: {other:?}"),
        }
    }

    let requests: Vec<pb::RecordEventRequest> = (0..300)
        .map(|n| {
            let mut event = purchase(&format!("s-{n}"), &format!("c-{}", n % 17), 1_000 + n);
            if n == 100 {
                event.amount_minor = None;
            }
            event
        })
        .collect();
    let mut request = Request::new(tokio_stream::iter(requests));
    let value: MetadataValue<_> = format!("Bearer {pos}").parse().expect("header");
    request.metadata_mut().insert("authorization", value);
    let mut answers = events.stream_events(request).await.expect("stream opens").into_inner();
    let mut n = 0;
    while let Some(outcome) = answers.message().await.expect("stream answers") {
        match outcome.outcome.expect("an outcome") {
            pb::event_outcome::Outcome::Result(result) => {
                assert_eq!(result.event_id, format!("s-{n}"), "in order")
            }
            pb::event_outcome::Outcome::Error(error) => {
                assert_eq!(n, 100);
                assert_eq!(error.field, "amount_minor");
            }
        }
        n += 1;
    }
    assert_eq!(n, 300, "every event is answered");
    let expected: i64 = 19 * 1_500 + (0..300).filter(|n| *n != 100).map(|n| 1_000 + n).sum::<i64>();
    await_board_total(&node.client(Some(&pos)), "/v1/tenants/mall/leaderboards/lb?top=100", expected);

    let mut bad_key = Request::new(tokio_stream::iter(vec![purchase("x", "c", 1)]));
    bad_key.metadata_mut().insert("authorization", "Bearer nope".parse().expect("header"));
    assert_eq!(events.stream_events(bad_key).await.expect_err("bad key").code(), Code::Unauthenticated);
}

/// Unary events sent at once are recorded in batches (the node gathers
/// those that arrive together) and each is answered as if it had come
/// alone: its own result or error, an identical retry sent beside it
/// answered once, an id sent at once for another customer applied once,
/// every amount counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unary_events_sent_at_once_are_batched_and_each_answered_as_if_alone() {
    let node = Node::start(&[]);
    let channel = channel(&node).await;
    let (_, pos, _) = mall(&node, &channel).await;
    const EVENTS: usize = 200;
    let amount = |n: usize| 1_000 + n as i64;
    let mut requests: Vec<pb::RecordEventRequest> =
        (0..EVENTS).map(|n| purchase(&format!("u-{n}"), &format!("c-{}", n % 23), amount(n))).collect();
    requests[50].amount_minor = None;
    // An identical retry of event 60, and event 70's id for another customer.
    requests.push(requests[60].clone());
    requests.push(purchase("u-70", "c-other", 5));
    let mut calls = tokio::task::JoinSet::new();
    for (index, request) in requests.into_iter().enumerate() {
        let (mut client, pos) = (EventServiceClient::new(channel.clone()), pos.clone());
        calls.spawn(async move { (index, client.record_event(with_key(&pos, request)).await) });
    }
    let mut answers: Vec<Option<Result<pb::EventResult, tonic::Status>>> = (0..EVENTS + 2).map(|_| None).collect();
    while let Some(joined) = calls.join_next().await {
        let (index, answer) = joined.expect("the call's task");
        answers[index] = Some(answer.map(tonic::Response::into_inner));
    }
    let answers: Vec<Result<pb::EventResult, tonic::Status>> =
        answers.into_iter().map(|a| a.expect("every call answered")).collect();

    for (n, answer) in answers.iter().enumerate().take(EVENTS) {
        match (n, answer) {
            (50, Err(status)) => {
                assert_eq!(status.code(), Code::InvalidArgument);
                let violations = status.get_details_bad_request().expect("field violations").field_violations;
                assert_eq!(violations[0].field, "amount_minor");
            }
            (60 | 70, _) => {}
            (_, Ok(result)) => {
                assert_eq!(result.event_id, format!("u-{n}"));
                assert!(!result.duplicate, "event {n} is no retry");
                assert!(0 < result.points_earned, "event {n} earned points");
            }
            (_, Err(status)) => panic!("event {n}: {status:?}"),
        }
    }
    let (first, retry) = (answers[60].as_ref().expect("event 60"), answers[EVENTS].as_ref().expect("its retry"));
    assert_eq!(
        [first.duplicate, retry.duplicate].iter().filter(|d| **d).count(),
        1,
        "one of the two identical requests is answered as the retry of the other"
    );
    assert_eq!(
        (&first.event_id, first.points_earned, first.points_balance),
        (&retry.event_id, retry.points_earned, retry.points_balance)
    );
    let other = &answers[EVENTS + 1];
    let applied = match (&answers[70], other) {
        (Ok(_), Err(status)) | (Err(status), Ok(_)) => {
            assert_eq!(status.code(), Code::Aborted, "the id's other use is a conflict: {status:?}");
            if other.is_ok() {
                5
            } else {
                amount(70)
            }
        }
        both => panic!("u-70 for two customers: {both:?}"),
    };

    let expected: i64 = (0..EVENTS).filter(|n| ![50, 70].contains(n)).map(amount).sum::<i64>() + applied;
    // Every amount counted once.
    await_board_total(&node.client(Some(&pos)), "/v1/tenants/mall/leaderboards/lb?top=100", expected);
    assert_books_balance(&node.client(Some(&pos)).get("/v1/tenants/mall/jackpots/j").expect(200));

    // Every valid request went through a batch, and some batch held more
    // than one of them.
    let scrape = node.admin().get("/metrics").text;
    let value = |series: &str| -> f64 {
        bazaar_tests::metric_sample(&scrape, series).unwrap_or_else(|| panic!("{series} in\n{scrape}"))
    };
    let (batched, batches) = (value("bazaar_unary_batch_events_sum "), value("bazaar_unary_batch_events_count "));
    assert_eq!(batched, (EVENTS + 2 - 1) as f64, "each valid event in one batch");
    assert!(batches < batched, "{batches} batches for {batched} events sent at once");
}

#[test]
fn grpcurl_lists_describes_and_calls_through_reflection() {
    let node = Node::start(&[]);
    let address = node.grpc.trim_start_matches("http://").to_owned();
    let grpcurl = |args: &[&str]| -> String {
        let output = std::process::Command::new(tool("grpcurl"))
            .arg("-plaintext")
            .args(args)
            .output()
            .expect("grpcurl runs (scripts/install-test-tools.sh installs it)");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "grpcurl {args:?} failed: {text}{}", String::from_utf8_lossy(&output.stderr));
        text
    };
    let services = grpcurl(&[&address, "list"]);
    for service in [
        "bazaar.v1.TenantService",
        "bazaar.v1.CatalogService",
        "bazaar.v1.EventService",
        "bazaar.v1.GameService",
        "bazaar.v1.CustomerService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(service), "{service} missing from:\n{services}");
    }
    let described = grpcurl(&[&address, "describe", "bazaar.v1.EventService"]);
    assert!(described.contains("rpc StreamEvents"), "{described}");
    let message = grpcurl(&[&address, "describe", "bazaar.v1.RecordEventRequest"]);
    assert!(message.contains("amount_minor"), "{message}");
    let health = grpcurl(&[&address, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
    let admin = format!("authorization: Bearer {}", bazaar_tests::ADMIN_KEY);
    let created = grpcurl(&[
        "-H",
        &admin,
        "-d",
        r#"{"id": "mall", "name": "Mall", "currency": "EUR"}"#,
        &address,
        "bazaar.v1.TenantService/CreateTenant",
    ]);
    assert!(created.contains("\"createdAt\""), "{created}");
    node.admin().get("/v1/tenants/mall").expect(200);
}

//! Live streams against a real node: Server-Sent Events and gRPC server
//! streaming of jackpot pools and hits and of leaderboard changes, and a
//! reconnect with Last-Event-ID that gets the current state first and then
//! the hits it missed.

use bazaar_proto::v1 as pb;
use bazaar_tests::{commitment, Mall, Node};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// A jackpot that hits every few purchases.
fn hot() -> serde_json::Value {
    json!({"campaign": "bf", "seed_minor": 1000, "cap_minor": 4000, "contribution_bps": 1000,
           "reserve_bps": 0, "min_purchase_minor": 100})
}

#[test]
fn a_jackpot_stream_shows_the_pool_and_every_hit_and_resumes_after_a_reconnect() {
    let node = Node::start(&[]);
    let mall = Mall::create(&node, "mall", hot());
    let stream = mall.display.sse(&mall.path("jackpots/j-mall/stream"), None);
    let first = stream.next(WAIT);
    assert_eq!(first.event, "pool");
    assert_eq!(first.data, json!({"pool_minor": 1000, "cycle": 1}));
    assert_eq!(first.id, "1.0");

    // Purchases until a hit: the stream shows pools and the hit with its
    // revealed trigger and salt.
    let mut n = 0;
    let mut won = Vec::new();
    while won.is_empty() {
        let answer =
            mall.pos.post(&mall.path("events"), Mall::purchase(&format!("e-{n}"), "c-1", "s-1", 5_000)).expect(200);
        n += 1;
        if let Some(w) = answer["jackpots"][0]["won_minor"].as_i64().filter(|w| 0 < *w) {
            won.push(w);
        }
        assert!(n < 50, "a jackpot capped at 40.00 fed 5.00 a purchase hits within 7");
    }
    let events = stream.until("hit", WAIT);
    let hit = events.last().expect("the hit");
    assert_eq!(hit.id, "hit-1");
    assert_eq!(hit.data["amount_minor"], won[0]);
    assert_eq!(hit.data["customer"], "c-1");
    let trigger = hit.data["trigger_minor"].as_i64().expect("trigger");
    assert_eq!(hit.data["commitment"], commitment(trigger, hit.data["salt"].as_str().expect("salt")).as_str());
    let pools: Vec<i64> = events
        .iter()
        .filter(|e| e.event == "pool" && e.data["cycle"] == 1)
        .map(|e| e.data["pool_minor"].as_i64().expect("pool"))
        .collect();
    assert!(pools.windows(2).all(|w| w[0] < w[1]), "a pool only grows within a cycle: {pools:?}");
    // A browser resumes from the id of the last event it received.
    let last_seen = hit.id.clone();
    drop(stream);

    // While the watcher is away, the jackpot hits at least twice more.
    let mut hits_while_away = 0;
    while hits_while_away < 2 {
        let answer =
            mall.pos.post(&mall.path("events"), Mall::purchase(&format!("e-{n}"), "c-2", "s-1", 5_000)).expect(200);
        n += 1;
        if 0 < answer["jackpots"][0]["won_minor"].as_i64().unwrap_or(0) {
            hits_while_away += 1;
        }
    }
    let now = mall.display.get(&mall.path("jackpots/j-mall")).expect(200);
    let resumed = mall.display.sse(&mall.path("jackpots/j-mall/stream"), Some(&last_seen));
    let current = resumed.next(WAIT);
    assert_eq!(current.event, "pool", "the current state comes first");
    assert_eq!(current.data["cycle"], now["cycle"]);
    assert_eq!(current.data["pool_minor"], now["pool_minor"]);
    let mut missed = Vec::new();
    for _ in 0..hits_while_away {
        let event = resumed.next(WAIT);
        assert_eq!(event.event, "hit");
        missed.push(event.data["cycle"].as_u64().expect("cycle"));
    }
    let current_cycle = now["cycle"].as_u64().expect("cycle");
    assert_eq!(missed, ((current_cycle - 2)..current_cycle).collect::<Vec<_>>(), "the missed hits, in order");
}

#[test]
fn a_leaderboard_stream_shows_the_top_entries_as_they_change() {
    let node = Node::start(&[]);
    let mall = Mall::create(&node, "mall", hot());
    let stream = mall.display.sse(&mall.path("leaderboards/lb-spend/stream?top=3"), None);
    let first = stream.next(WAIT);
    assert_eq!(first.event, "top");
    assert_eq!(first.data["entries"], json!([]));
    mall.pos.post(&mall.path("events"), Mall::purchase("e-1", "c-1", "s-1", 5_000)).expect(200);
    let update = stream.next(WAIT);
    assert_eq!(update.data["entries"], json!([{"rank": 1, "customer": "c-1", "score": 5000}]));
    mall.pos.post(&mall.path("events"), Mall::purchase("e-2", "c-2", "s-1", 9_000)).expect(200);
    let update = stream.next(WAIT);
    assert_eq!(update.data["entries"][0]["customer"], "c-2");
    // Streams need a key with the right role, like every read.
    let anonymous = node.client(None).get(&mall.path("leaderboards/lb-spend/stream"));
    assert_eq!(anonymous.status, 401);
}

#[tokio::test]
async fn grpc_watchers_see_the_pool_and_the_hit() {
    let node = Node::start(&[]);
    let mall = Mall::create(&node, "mall", hot());
    let channel =
        tonic::transport::Channel::from_shared(node.grpc.clone()).expect("uri").connect().await.expect("connects");
    let mut games = pb::game_service_client::GameServiceClient::new(channel);
    let mut request = tonic::Request::new(pb::WatchJackpotRequest {
        tenant: "mall".into(),
        jackpot: "j-mall".into(),
        last_event_id: String::new(),
    });
    let key = format!("Bearer {}", mall.display_key());
    request.metadata_mut().insert("authorization", key.parse().expect("header"));
    let mut updates = games.watch_jackpot(request).await.expect("watching").into_inner();
    let first = updates.message().await.expect("an update").expect("open");
    assert!(matches!(first.update, Some(pb::jackpot_update::Update::Pool(pb::Pool { pool_minor: 1000, cycle: 1 }))));
    let pos = mall.pos.clone();
    let path = mall.path("events");
    tokio::task::spawn_blocking(move || {
        for n in 0..20 {
            pos.post(&path, Mall::purchase(&format!("g-{n}"), "c-1", "s-1", 5_000)).expect(200);
        }
    })
    .await
    .expect("purchases sent");
    let hit = loop {
        let update =
            tokio::time::timeout(WAIT, updates.message()).await.expect("in time").expect("an update").expect("open");
        if let Some(pb::jackpot_update::Update::Hit(hit)) = update.update {
            break hit;
        }
    };
    assert_eq!(hit.cycle, 1);
    assert_eq!(commitment(hit.trigger_minor, &hit.salt), hit.commitment);
    drop(updates);

    // A watcher that reconnects after the first hit gets the current pool
    // first, then the hits it missed since (all of them, in order).
    let now = mall.display.get(&mall.path("jackpots/j-mall")).expect(200);
    let current_cycle = now["cycle"].as_u64().expect("cycle");
    let mut request = tonic::Request::new(pb::WatchJackpotRequest {
        tenant: "mall".into(),
        jackpot: "j-mall".into(),
        last_event_id: "hit-1".into(),
    });
    request.metadata_mut().insert("authorization", key.parse().expect("header"));
    let mut resumed = games.watch_jackpot(request).await.expect("watching again").into_inner();
    let first = resumed.message().await.expect("an update").expect("open");
    match first.update {
        Some(pb::jackpot_update::Update::Pool(pool)) => {
            assert_eq!(pool.cycle, current_cycle);
            assert_eq!(Some(pool.pool_minor), now["pool_minor"].as_i64());
        }
        other => panic!("the current pool comes first, not {other:?}"),
    }
    for cycle in 2..current_cycle {
        let update = resumed.message().await.expect("an update").expect("open");
        assert!(
            matches!(&update.update, Some(pb::jackpot_update::Update::Hit(hit)) if hit.cycle == cycle),
            "missed hit {cycle} expected, got {update:?}"
        );
    }
}

#[tokio::test]
async fn a_stop_ends_screens_and_tills_streams_instead_of_waiting_for_them() {
    // Streams never end on their own: a stop that waited for them drained
    // for as long as a screen or a till stayed connected.
    let mut node = Node::start(&[]);
    let mall = Mall::create(&node, "mall", hot());
    let screen = mall.display.sse(&mall.path("jackpots/j-mall/stream"), None);
    assert_eq!(screen.next(WAIT).event, "pool");
    let channel =
        tonic::transport::Channel::from_shared(node.grpc.clone()).expect("uri").connect().await.expect("connects");
    let authorised = |key: &str| format!("Bearer {key}").parse::<tonic::metadata::MetadataValue<_>>().expect("header");
    let mut request = tonic::Request::new(pb::WatchLeaderboardRequest {
        tenant: "mall".into(),
        leaderboard: "lb-spend".into(),
        top: 3,
    });
    request.metadata_mut().insert("authorization", authorised(mall.display_key()));
    let mut games = pb::game_service_client::GameServiceClient::new(channel.clone());
    let mut board = games.watch_leaderboard(request).await.expect("watching").into_inner();
    board.message().await.expect("the board").expect("open");
    // A till's event stream, left open after its first event's answer.
    let (till, events) = tokio::sync::mpsc::channel(4);
    let purchase = pb::RecordEventRequest {
        tenant: "mall".into(),
        event_id: "t-1".into(),
        customer: "c-1".into(),
        store: Some("s-1".into()),
        kind: "purchase".into(),
        amount_minor: Some(2_500),
        at: None,
    };
    till.send(purchase).await.expect("queued");
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(events));
    request.metadata_mut().insert("authorization", authorised(mall.pos_key().expect("a till's key")));
    let mut tills = pb::event_service_client::EventServiceClient::new(channel);
    let mut answers = tills.stream_events(request).await.expect("streaming").into_inner();
    let answered = answers.message().await.expect("an answer").expect("open");
    assert!(matches!(answered.outcome, Some(pb::event_outcome::Outcome::Result(_))), "{answered:?}");

    let status = tokio::task::spawn_blocking(move || {
        let status = node.terminate_within(WAIT);
        (status, node.log_tail())
    })
    .await
    .expect("stopped");
    assert!(status.0.success(), "{}; the log:\n{}", status.0, status.1);
    assert!(screen.ends_within(WAIT), "the screen's stream ended");
    // The till's purchase may have moved the board first.
    while board.message().await.expect("the gRPC watch ends cleanly").is_some() {}
    let told = answers.message().await.expect_err("the till is told to go elsewhere");
    assert_eq!(told.code(), tonic::Code::Unavailable, "{told:?}");
    drop(till);
}

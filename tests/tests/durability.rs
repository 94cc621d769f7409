//! Durability: an acknowledged event survives `kill -9`, retries never
//! count twice, no jackpot is paid twice, and the books balance after
//! recovery, for single events and batches alike. Also graceful shutdown,
//! passivation and restart, and how the process runs: its first admin key,
//! its JSON logs, its memory pages.

use bazaar_tests::{assert_books_balance, await_board_total, Mall, Node};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;
const CUSTOMERS: usize = 20;

/// A jackpot that hits often: seed 10.00, cap 60.00, 10% contributions.
fn hot_jackpot() -> Value {
    json!({"campaign": "bf", "seed_minor": 1000, "cap_minor": 6000, "contribution_bps": 1000,
           "reserve_bps": 1000, "min_purchase_minor": 100})
}

fn amount(client: usize, n: usize) -> i64 {
    1_000 + ((client * 7_919 + n * 104_729) % 9_000) as i64
}

#[test]
fn acknowledged_events_survive_kill_9_and_are_applied_exactly_once() {
    let mut node = Node::start(&["--checkpoint-interval", "300ms", "--snapshot-every", "7"]);
    let mall = Mall::create(&node, "mall", hot_jackpot());
    let acked: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
    let sent: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for client in 0..CLIENTS {
        let (pos, path) = (mall.pos.clone(), mall.path("events"));
        let (acked, sent, stop) = (acked.clone(), sent.clone(), stop.clone());
        // Odd clients send batches (one actor message per customer and per
        // receiver, one wait for the batch), even ones single events.
        let batch = if client % 2 == 1 { 10 } else { 1 };
        let batch_path = mall.path("events/batch");
        threads.push(std::thread::spawn(move || {
            for first in (0..5_000).step_by(batch) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let bodies: Vec<(String, Value)> = (first..first + batch)
                    .map(|n| {
                        let event_id = format!("till-{client}-{n:05}");
                        let customer = format!("c-{}", (client * 31 + n) % CUSTOMERS);
                        let store = format!("s-{}", n % 4 + 1);
                        (event_id.clone(), Mall::purchase(&event_id, &customer, &store, amount(client, n)))
                    })
                    .collect();
                sent.lock().expect("lock").extend(bodies.iter().cloned());
                let answered = if batch == 1 {
                    pos.try_post(&path, bodies[0].1.clone()).map(|answer| (answer.status, vec![answer.body]))
                } else {
                    let events: Vec<Value> = bodies.iter().map(|(_, body)| body.clone()).collect();
                    pos.try_post(&batch_path, json!({ "events": events })).map(|answer| {
                        let results = answer.body["results"].as_array().cloned().unwrap_or_default();
                        (answer.status, results)
                    })
                };
                match answered {
                    Ok((200, answers)) => {
                        assert_eq!(answers.len(), bodies.len());
                        for ((event_id, _), answer) in bodies.into_iter().zip(answers) {
                            assert!(answer.get("error").is_none(), "{event_id} failed before the crash: {answer}");
                            acked.lock().expect("lock").insert(event_id, answer);
                        }
                    }
                    Ok((status, _)) => panic!("unexpected answer before the crash: {status}"),
                    Err(_) => break,
                }
            }
        }));
    }
    // Let the stream run through several checkpoints, then pull the plug.
    let started = Instant::now();
    while acked.lock().expect("lock").len() < 600 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    node.kill();
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        thread.join().expect("client threads end");
    }
    let acked = acked.lock().expect("lock").clone();
    let sent = sent.lock().expect("lock").clone();
    assert!(400 <= acked.len(), "only {} events were acknowledged before the kill", acked.len());

    node.restart();
    let pos = node.client(mall.pos_key());
    // Every acknowledged event is there: its retry is a duplicate with the
    // very same answer.
    for (event_id, first) in &acked {
        let retry = pos.post(&mall.path("events"), sent[event_id].clone()).expect(200);
        assert_eq!(retry["duplicate"], true, "{event_id} was acknowledged but lost");
        let mut expected = first.clone();
        expected["duplicate"] = json!(true);
        assert_eq!(retry, expected, "{event_id} answers differently after the crash");
    }
    // Events in flight at the kill may or may not have been applied; after
    // their retry, each is applied exactly once.
    let mut answers: BTreeMap<&String, Value> = acked.iter().map(|(id, a)| (id, a.clone())).collect();
    for (event_id, body) in &sent {
        if !acked.contains_key(event_id) {
            answers.insert(event_id, pos.post(&mall.path("events"), body.clone()).expect(200));
        }
    }
    // Per customer, the spend is exactly the sum of the events sent.
    let mut spend: BTreeMap<String, i64> = BTreeMap::new();
    for body in sent.values() {
        *spend.entry(body["customer"].as_str().expect("customer").to_owned()).or_default() +=
            body["amount_minor"].as_i64().expect("amount");
    }
    for (customer, total) in &spend {
        let view = pos.get(&mall.path(&format!("customers/{customer}"))).expect(200);
        assert_eq!(view["stats"]["spend_minor"], *total, "{customer}");
    }
    // The jackpot paid what the answers say it paid, once per cycle, and its
    // books balance to the unit.
    let jackpot = pos.get(&mall.path("jackpots/j-mall")).expect(200);
    assert_books_balance(&jackpot);
    let wins: Vec<i64> = answers
        .values()
        .map(|a| a["jackpots"][0]["won_minor"].as_i64().expect("won_minor"))
        .filter(|won| 0 < *won)
        .collect();
    let contributed: i64 =
        answers.values().map(|a| a["jackpots"][0]["contributed_minor"].as_i64().expect("contributed")).sum();
    assert!(2 <= wins.len(), "a hot jackpot hits many times: {jackpot}");
    assert_eq!(jackpot["books"]["paid_minor"], wins.iter().sum::<i64>(), "paid twice or lost a hit");
    assert_eq!(jackpot["books"]["contributed_minor"], contributed);
    assert_eq!(jackpot["cycle"], wins.len() as i64 + 1, "one winner per cycle");
    // The leaderboard saw every purchase exactly once too (each score just
    // after its answer).
    await_board_total(&mall.display_on(&node), &mall.path("leaderboards/lb-spend?top=1000"), spend.values().sum());
}

#[test]
fn graceful_shutdown_passivation_and_restart_keep_everything() {
    let mut node = Node::start(&["--idle-timeout", "200ms", "--checkpoint-interval", "250ms"]);
    let mall = Mall::create(&node, "mall", hot_jackpot());
    for n in 0..30 {
        mall.pos
            .post(&mall.path("events"), Mall::purchase(&format!("e-{n}"), &format!("c-{}", n % 3), "s-1", 5_000))
            .expect(200);
    }
    // Idle entities leave memory, and come back with their state.
    let admin = node.admin();
    let active = |admin: &bazaar_tests::Client| -> i64 {
        let metrics = admin.get("/metrics").text;
        metrics
            .lines()
            .filter(|l| l.starts_with("bazaar_active_actors{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
            .sum()
    };
    let started = Instant::now();
    while 0 < active(&admin) && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(active(&admin), 0, "idle actors were passivated");
    let customer = mall.pos.get(&mall.path("customers/c-0")).expect(200);
    assert_eq!(customer["stats"]["purchases"], 10);
    let jackpot_before = mall.display.get(&mall.path("jackpots/j-mall")).expect(200);
    assert_books_balance(&jackpot_before);

    // SIGTERM drains and exits cleanly; a restart finds everything.
    let status = node.terminate();
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    node.restart();
    let pos = node.client(mall.pos_key());
    assert_eq!(pos.get(&mall.path("customers/c-0")).expect(200), customer);
    let display = mall.display_on(&node);
    assert_eq!(display.get(&mall.path("jackpots/j-mall")).expect(200), jackpot_before);
    let retry = pos.post(&mall.path("events"), Mall::purchase("e-0", "c-0", "s-1", 5_000)).expect(200);
    assert_eq!(retry["duplicate"], true);
}

#[test]
fn a_node_without_an_admin_key_makes_one_once() {
    let mut node = Node::start_with(None, &[]);
    let key = node
        .banner
        .iter()
        .find_map(|line| line.trim().strip_prefix("bzk_").map(|rest| format!("bzk_{rest}")))
        .unwrap_or_else(|| panic!("the first start prints an admin key: {:?}", node.banner));
    let admin = node.client(Some(&key));
    admin.post("/v1/tenants", json!({"id": "mall", "name": "Mall", "currency": "EUR"})).expect(201);
    node.terminate();
    node.restart();
    assert!(!node.banner.iter().any(|l| l.contains("bzk_")), "the key is printed once: {:?}", node.banner);
    node.client(Some(&key)).get("/v1/tenants/mall").expect(200);
}

#[test]
fn json_logs_carry_the_request_id_the_answer_echoes() {
    let mut node = Node::start(&["--log-format", "json"]);
    let answer = node.admin().post("/v1/tenants", json!({"id": "mall", "name": "Mall", "currency": "EUR"}));
    let request_id = answer.request_id.clone().expect("the answer echoes a request id");
    assert_eq!(answer.expect(201)["id"], "mall");
    assert!(node.terminate().success());
    let log = std::fs::read_to_string(node.data.path().join("node.log")).expect("the node log");
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "tenant created")
        .unwrap_or_else(|| panic!("no JSON line for the tenant in:\n{log}"));
    assert_eq!(line["span"]["request_id"], request_id.as_str());
    assert_eq!(line["tenant"], "mall");
}

#[test]
fn a_sigterm_right_after_the_ready_line_stops_the_node_cleanly() {
    // The signal is caught from start-up on, not from when the node first
    // waits for it: before, it took the default action and killed the node.
    let mut node = Node::start(&[]);
    let status = node.terminate();
    assert!(status.success(), "{status}; the log:\n{}", node.log_tail());
    assert!(node.log_tail().contains("shutting down: the servers have stopped"), "{}", node.log_tail());
}

/// `THP_enabled` of a process's status: whether the kernel may back its
/// memory with transparent huge pages (`0` once it opted out).
fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| panic!("the kernel reports THP_enabled (Linux 5.0 on): {status}"))
        .trim()
        .to_owned()
}

#[test]
fn the_node_opts_out_of_transparent_huge_pages_unless_told_otherwise() {
    let mut by_default = Node::start(&[]);
    assert_eq!(thp_enabled(by_default.pid()), "0", "off by default");
    assert!(by_default.terminate().success());
    // Allowed, the node keeps what any process here gets: the test's own.
    let mut allowed = Node::start(&["--transparent-huge-pages", "true"]);
    assert_eq!(thp_enabled(allowed.pid()), thp_enabled(std::process::id()), "left as the system has it");
    assert!(allowed.terminate().success());
}

/// The `elapsed_ms` of every "checkpoint written" line in `log`, in order,
/// and how many checkpoints began (one at a time: the `n`th written is
/// the `n`th begun).
fn checkpoints(log: &str) -> (Vec<u64>, usize) {
    let written = log
        .lines()
        .filter(|line| line.contains("checkpoint written"))
        .map(|line| {
            let value = line.split("elapsed_ms=").nth(1).and_then(|rest| rest.split_whitespace().next());
            value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no elapsed_ms in {line:?}"))
        })
        .collect();
    (written, log.lines().filter(|line| line.contains("checkpoint begins")).count())
}

#[test]
fn a_checkpoint_spreads_its_snapshots_and_a_stop_does_not_wait_for_the_spread() {
    // Six hundred customers: three groups of asks, the last asked no
    // sooner than two thirds of the spread (3.67 s) into the checkpoint.
    const SPREAD_MS: u64 = 5_500;
    const LAST_GROUP_MS: u64 = SPREAD_MS * 2 / 3;
    let mut node = Node::start(&[
        "--checkpoint-interval",
        "6s",
        "--checkpoint-spread",
        &format!("{SPREAD_MS}ms"),
        "--log",
        "info,bazaar_node::service=debug",
    ]);
    let mall = Mall::create(&node, "spread", hot_jackpot());
    let purchases = |round: usize| {
        for first in (0..600).step_by(100) {
            let events: Vec<Value> = (first..first + 100)
                .map(|n| Mall::purchase(&format!("r{round}-{n}"), &format!("c-{n}"), "s-1", 2_000))
                .collect();
            let answer = mall.pos.post(&mall.path("events/batch"), json!({ "events": events })).expect(200);
            assert!(answer["results"].as_array().is_some_and(|r| r.len() == 100), "{answer}");
        }
    };
    // Waits for the checkpoint numbered `index` (from 0) to have begun,
    // or been written.
    let wait_for = |index: usize, written: bool| -> Vec<u64> {
        let started = Instant::now();
        loop {
            let (done, began) = checkpoints(&node.log());
            if (written && index < done.len()) || (!written && index < began) {
                return done;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint {index}:\n{}", node.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // The first checkpoint that begins once the customers exist.
    purchases(1);
    let (_, began) = checkpoints(&node.log());
    let elapsed_ms = wait_for(began, true)[began];
    assert!(LAST_GROUP_MS <= elapsed_ms, "asks spread over {SPREAD_MS} ms, yet the checkpoint took {elapsed_ms} ms");

    // The customers change again; once the next checkpoint has begun, a
    // stop ends its spread: the rest goes at the writer's pace.
    purchases(2);
    let (_, began) = checkpoints(&node.log());
    wait_for(began, false);
    let status = node.terminate();
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    let (written, _) = checkpoints(&node.log());
    assert_eq!(written.len(), began + 2, "the checkpoint under way, then the stop's own: {written:?}");
    assert!(
        written[began] < LAST_GROUP_MS,
        "a checkpoint under way when the node stopped still took {} ms, as if spread out",
        written[began]
    );
}

/// An HTTP request the node has begun to handle but never gets the whole
/// body of. `Expect: 100-continue` makes the node say when its handler
/// starts reading the body, so the request is in flight for sure before
/// this returns; the stream keeps it open.
fn stalled_upload(node: &Node, path: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let address = node.url.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&address).expect("the node's HTTP port");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        bazaar_tests::ADMIN_KEY
    )
    .expect("headers sent");
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("a read timeout");
    let mut answer = Vec::new();
    let mut byte = [0; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        let read = stream.read(&mut byte).expect("the node answers 100 Continue");
        assert_eq!(read, 1, "the node closed the connection: {}", String::from_utf8_lossy(&answer));
        answer.push(byte[0]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 100"), "{}", String::from_utf8_lossy(&answer));
    stream.write_all(b"{\"event_id\": ").expect("a part of the body sent");
    stream
}

#[test]
fn a_second_signal_stops_a_stuck_drain_at_once_and_loses_nothing_acknowledged() {
    let mut node = Node::start(&["--drain-timeout", "1h"]);
    let mall = Mall::create(&node, "mall", hot_jackpot());
    for n in 0..20 {
        mall.pos
            .post(&mall.path("events"), Mall::purchase(&format!("e-{n}"), &format!("c-{}", n % 3), "s-1", 5_000))
            .expect(200);
    }
    let customer = mall.pos.get(&mall.path("customers/c-0")).expect(200);
    let jackpot = mall.display.get(&mall.path("jackpots/j-mall")).expect(200);
    let _upload = stalled_upload(&node, &mall.path("events"));
    node.signal(libc::SIGTERM);
    // The drain waits for the upload (for an hour, as configured).
    std::thread::sleep(Duration::from_secs(1));
    assert!(node.is_running(), "the node stopped without waiting for the request in flight:\n{}", node.log_tail());
    node.signal(libc::SIGINT);
    let status = node.wait_within(Duration::from_secs(60));
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{status}; log:\n{}", node.log_tail());
    let log = node.log();
    assert!(log.contains("stopping (a second SIGTERM or Ctrl-C stops at once)"), "{log}");
    assert!(log.contains("a second signal: stopping at once"), "{log}");
    // No final checkpoint was written: the restart replays the journal.
    node.restart();
    let pos = node.client(mall.pos_key());
    assert_eq!(pos.get(&mall.path("customers/c-0")).expect(200), customer);
    let display = mall.display_on(&node);
    let recovered = display.get(&mall.path("jackpots/j-mall")).expect(200);
    assert_eq!(recovered, jackpot);
    assert_books_balance(&recovered);
    let retry = pos.post(&mall.path("events"), Mall::purchase("e-0", "c-0", "s-1", 5_000)).expect(200);
    assert_eq!(retry["duplicate"], true);
}

#[test]
fn a_stop_waits_for_requests_in_flight_no_longer_than_the_drain_timeout() {
    let mut node = Node::start(&["--drain-timeout", "1s"]);
    let mall = Mall::create(&node, "mall", hot_jackpot());
    mall.pos.post(&mall.path("events"), Mall::purchase("e-1", "c-1", "s-1", 5_000)).expect(200);
    let customer = mall.pos.get(&mall.path("customers/c-1")).expect(200);
    let _upload = stalled_upload(&node, &mall.path("events"));
    // The upload never ends; the stop goes on after a second of waiting.
    let status = node.terminate();
    assert!(status.success(), "{status}; log:\n{}", node.log_tail());
    let log = node.log();
    assert!(log.contains("requests still in flight at the drain timeout"), "{log}");
    assert!(
        log.lines().any(|line| line.trim_end().ends_with(": stopped")),
        "the journal closed after the final checkpoint: {log}"
    );
    node.restart();
    assert_eq!(node.client(mall.pos_key()).get(&mall.path("customers/c-1")).expect(200), customer);
}

//! The metrics catalogue on a real scrape: promtool accepts it, the
//! engagement ratios follow what customers did, and no customer id ever
//! becomes a label.

use bazaar_tests::{default_jackpot, metric_sample as sample, tool, Mall, Node};
use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn promtool_accepts_the_scrape_and_engagement_follows_customers() {
    let node = Node::start(&["--engagement-interval", "200ms", "--checkpoint-interval", "200ms"]);
    let mall = Mall::create(&node, "mall", default_jackpot());
    // Three customers buy (and so progress in the mission); one of them
    // also spins, winning a prize: it played and was rewarded.
    for (n, customer) in ["c-1", "c-2", "c-3"].iter().enumerate() {
        mall.pos.post(&mall.path("events"), Mall::purchase(&format!("e-{n}"), customer, "s-1", 20_000)).expect(200);
    }
    // c-1 also buys in two more shops, completing the mission's step.
    for (n, store) in ["s-2", "s-3"].iter().enumerate() {
        mall.pos.post(&mall.path("events"), Mall::purchase(&format!("f-{n}"), "c-1", store, 2_000)).expect(200);
    }
    mall.pos.post(&mall.path("wheels/w-main/spins"), json!({"customer": "c-1", "request_id": "r-1"})).expect(200);
    mall.pos.get(&mall.path("leaderboards/lb-spend")).expect(200);

    let admin = node.admin();
    let games = "bazaar_engagement_ratio{kind=\"games\",tenant=\"mall\",window=\"7d\"}";
    let active = "bazaar_engagement_customers{kind=\"active\",tenant=\"mall\",window=\"7d\"}";
    let started = Instant::now();
    let scrape = loop {
        let scrape = admin.get("/metrics").text;
        // A scrape reads the gauge families one after the other, and a
        // refresh can land between them: both must show a refresh that
        // saw the customers.
        let refreshed = [games, active].iter().all(|series| sample(&scrape, series).is_some_and(|v| 0.0 < v));
        if refreshed || Duration::from_secs(30) < started.elapsed() {
            break scrape;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let expect = |series: &str, value: f64| {
        let found = sample(&scrape, series);
        assert!(found.is_some_and(|f| (f - value).abs() < 1e-9), "{series} = {found:?}, expected {value}\n{scrape}");
    };
    expect(active, 3.0);
    expect(games, 1.0 / 3.0);
    expect("bazaar_engagement_ratio{kind=\"missions\",tenant=\"mall\",window=\"7d\"}", 1.0);
    expect("bazaar_engagement_ratio{kind=\"rewards\",tenant=\"mall\",window=\"30d\"}", 1.0 / 3.0);
    expect("bazaar_mission_steps_completed_total{mission=\"m-3shops\",tenant=\"mall\"}", 1.0);
    expect("bazaar_mission_completions_total{mission=\"m-3shops\",tenant=\"mall\"}", 1.0);
    expect("bazaar_engagement_ratio{kind=\"any\",tenant=\"mall\",window=\"30d\"}", 1.0);
    let spins: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("bazaar_spins_total{") && l.contains("wheel=\"w-main\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(spins, 1.0, "one spin, counted by prize kind");
    // Every event and spin left an idempotency record, in memory or in a
    // run file (a checkpoint may have written them).
    let seen: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("bazaar_seen_records{place="))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(4.0 <= seen, "idempotency records: {seen}");
    for family in [
        "bazaar_events_ingested_total",
        "bazaar_http_request_duration_seconds",
        "bazaar_spins_total",
        "bazaar_jackpot_pool_minor",
        "bazaar_jackpot_contributed_minor_total",
        "bazaar_mission_steps_completed_total",
        "bazaar_active_actors",
        "bazaar_actor_activations_total",
        "bazaar_outbox_backlog",
        "bazaar_scores_in_flight",
        "bazaar_seen_runs",
        "bazaar_seen_records",
        "bazaar_seen_summarized_runs",
        "bazaar_seen_run_probes_total",
        "bazaar_journal_flush_seconds",
        "bazaar_journal_batch_entries",
        "bazaar_journal_bytes_total",
        "bazaar_seen_run_bytes_total",
        "bazaar_unary_batch_events",
        "bazaar_engagement_refreshes_total",
    ] {
        assert!(scrape.contains(&format!("# TYPE {family} ")), "{family} is missing");
    }
    // The events above were journaled: their batches' bytes are counted.
    let journaled = bazaar_tests::metric_sample(&scrape, "bazaar_journal_bytes_total").unwrap_or(0.0);
    assert!(100.0 < journaled, "journal bytes: {journaled}");
    for customer in ["c-1", "c-2", "c-3"] {
        assert!(!scrape.contains(customer), "customer {customer} appears in the metrics");
    }

    let mut promtool = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/install-test-tools.sh installs it)");
    promtool.stdin.take().expect("stdin").write_all(scrape.as_bytes()).expect("the scrape is written");
    let output = promtool.wait_with_output().expect("promtool finishes");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

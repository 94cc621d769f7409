//! `bazaar loadgen` against a real node, over each transport: every event
//! and spin sent is acknowledged, the report holds the fields scripts rely
//! on, and --verify finds the jackpot's books, customers' points, spins and
//! wallets exactly as acknowledged and every draw in the wheel's audit.

use bazaar_tests::{binary, Node, ADMIN_KEY};
use std::process::Command;

fn loadgen(node: &Node, extra: &[&str]) -> serde_json::Value {
    let report = node.data.path().join(format!("report-{}.json", extra.join("-").replace(['/', ':'], "_")));
    let address = node.grpc.trim_start_matches("http://").to_owned();
    let output = Command::new(binary())
        .args(["loadgen", "--grpc", &address, "--admin-key", ADMIN_KEY, "--setup", "--verify"])
        .args(if extra.contains(&"--duration") { &[][..] } else { &["--duration", "2s"][..] })
        .args(["--customers", "300"])
        .arg("--metrics")
        .arg(format!("{}/metrics", node.url))
        .arg("--report")
        .arg(&report)
        .args(extra)
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen {extra:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("verify: ok"), "{stdout}");
    serde_json::from_str(&std::fs::read_to_string(&report).expect("a report")).expect("JSON")
}

fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    u64::try_from(since.as_millis()).expect("fits")
}

#[test]
fn loadgen_measures_and_verifies_over_every_transport() {
    let node = Node::start(&[]);
    let http = node.url.clone();
    for (extra, transport, mode) in [
        (vec!["--clients", "8"], "grpc", "closed"),
        (vec!["--clients", "2", "--batch", "50"], "grpc", "closed"),
        (vec!["--clients", "4", "--connections", "3"], "grpc", "closed"),
        (vec!["--http", &http, "--clients", "4", "--rate", "200"], "http", "open"),
        (vec!["--http", &http, "--clients", "2", "--batch", "20"], "http", "closed"),
        (vec!["--clients", "2", "--spin-share", "0"], "grpc", "closed"),
    ] {
        let before = unix_ms();
        let report = loadgen(&node, &extra);
        // When its second 0 began, to line the timeline up with a log.
        let started = report["started_unix_ms"].as_u64().expect("started_unix_ms");
        assert!(before <= started && started <= unix_ms(), "{report}");
        assert_eq!(report["transport"], transport, "{report}");
        assert_eq!(report["mode"], mode, "{report}");
        let connections = match (transport, extra.iter().position(|a| *a == "--connections")) {
            ("grpc", Some(at)) => serde_json::json!(extra[at + 1].parse::<u64>().expect("a count")),
            ("grpc", None) => serde_json::json!(1),
            _ => serde_json::Value::Null,
        };
        assert_eq!(report["connections"], connections, "{report}");
        assert!(0 < report["sent"].as_u64().expect("sent"), "{report}");
        assert_eq!(report["sent"], report["acknowledged"], "{report}");
        assert_eq!(report["errors"], serde_json::json!({}), "{report}");
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(0.0 < report["latency_ms"][key].as_f64().expect("latency"), "{report}");
        }
        assert!(0.0 < report["throughput_per_s"].as_f64().expect("throughput"));
        // Spins: a share of the events' worth, for customers they earned
        // spins, counted apart; none, and no wheel, at a share of 0.
        let spins = &report["spins"];
        if extra.contains(&"--spin-share") {
            assert_eq!(*spins, serde_json::Value::Null, "{report}");
        } else {
            assert_eq!(spins["per_event"], 0.02, "{report}");
            assert!(0 < spins["acknowledged"].as_u64().expect("spins acknowledged"), "{report}");
            assert_eq!(spins["sent"], spins["acknowledged"], "{report}");
            assert_eq!(spins["errors"], serde_json::json!({}), "{report}");
            let sent = report["sent"].as_f64().expect("sent");
            let spun = spins["acknowledged"].as_f64().expect("spins");
            assert!(spun <= 0.02 * sent + 2.0 * 8.0, "at most the share, and a spin per client: {report}");
            for key in ["p50", "p99", "max"] {
                assert!(0.0 < spins["latency_ms"][key].as_f64().expect("spin latency"), "{report}");
            }
        }
        assert!(0.0 < report["server"]["journal_flushes"].as_f64().expect("server figures"), "{report}");
        // The server's figures are this run's, not the node's since it
        // started (four runs share it).
        assert_eq!(report["server"]["events_ingested"].as_f64(), report["acknowledged"].as_f64(), "{report}");
        if transport == "grpc" {
            let method = match extra.contains(&"--batch") {
                true => "/bazaar.v1.EventService/StreamEvents",
                false => "/bazaar.v1.EventService/RecordEvent",
            };
            let mean = report["server"]["grpc_mean_ms"][method].as_f64();
            assert!(mean.is_some_and(|ms| 0.0 < ms), "the server's own {method} latency: {report}");
        }
    }
}

#[test]
fn every_draw_of_a_thousand_spins_and_more_is_found_in_the_audit() {
    // A spin for every spin earned, over 12,000 events: about 1,300
    // draws, more than one page of the audit (1,000), all re-checked.
    let node = Node::start(&[]);
    let report = loadgen(&node, &["--clients", "8", "--spin-share", "1", "--events", "12000", "--duration", "10m"]);
    assert_eq!(report["acknowledged"], 12_000, "{report}");
    let spins = &report["spins"];
    assert_eq!(spins["errors"], serde_json::json!({}), "{report}");
    assert!(1_000 < spins["acknowledged"].as_u64().expect("spins"), "more than a page of draws: {report}");
}

#[test]
fn a_spin_share_out_of_range_is_refused_naming_the_flag() {
    for share in ["1.5", "-0.1", "lots", "NaN"] {
        let output = Command::new(binary())
            .args(["loadgen", "--grpc", "127.0.0.1:9", "--admin-key", ADMIN_KEY, "--spin-share", share])
            .output()
            .expect("loadgen runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{share}: {stderr}");
        assert!(stderr.contains("--spin-share"), "{share}: {stderr}");
    }
}

#[test]
fn limits_measures_every_ceiling_with_the_load_generators_client() {
    let dir = tempfile::tempdir().expect("temp dir");
    let report = dir.path().join("limits.json");
    let output = Command::new(binary())
        .args(["limits", "--seconds", "1", "--clients", "4", "--stream-clients", "2", "--batch", "10", "--group", "8"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--report")
        .arg(&report)
        .output()
        .expect("limits runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "limits failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("a report")).expect("JSON");
    for figure in [
        &report["fsync_per_s"],
        &report["sled_group_commit"]["entries_per_s"],
        &report["sled_group_commit"]["flushes_per_s"],
        &report["noop_record_event_per_s"],
        &report["noop_stream"]["events_per_s"],
        &report["noop_in_process"]["record_event_per_s"],
        &report["noop_in_process"]["stream_events_per_s"],
        &report["noop_unary_grpc_per_s"],
        &report["noop_http_per_s"],
    ] {
        assert!(0.0 < figure.as_f64().unwrap_or(0.0), "{report}");
    }
    assert_eq!(report["noop_server"], "own process", "{report}");
    // The no-op server's process went with the measurement.
    let servers: Vec<_> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| cmdline.windows(12).any(|w| w == b"--serve-noop"))
        .collect();
    assert!(servers.is_empty(), "a no-op server outlived limits: {servers:?}");
    assert_eq!(report["noop_stream"]["clients"], 2, "{report}");
    assert_eq!(report["noop_stream"]["batch"], 10, "{report}");
    // The probes clean up after themselves.
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("list").flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("limits.json")], "{stdout}");
}

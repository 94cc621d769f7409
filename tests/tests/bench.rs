//! `bench/run`, the one command the README's Performance section gives for
//! reproducing its figures, keeps working: run end to end in a few seconds
//! per step on the debug binary (the figures mean nothing then), it
//! measures the machine's limits, every scenario with its `--verify`,
//! Redis beside (d), the rounds in turns and the restart after `kill -9`,
//! writes its JSON and markdown where it is told, and leaves no process
//! behind. `bench/ab` measures two builds in turns the same way, and every
//! bench script answers `--help`.

use bazaar_tests::{binary, repo_root};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether any process of the process group `group` is alive.
fn group_alive(group: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(-group, 0) == 0 }
}

/// Ends the process group `group`: SIGTERM (bench/run's trap stops what it
/// started), then SIGKILL for whatever is left after a grace period.
fn stop_group(group: i32) {
    // SAFETY: signals a process group this test created.
    unsafe { libc::kill(-group, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while group_alive(group) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-group, libc::SIGKILL) };
}

#[test]
fn bench_run_runs_every_step_and_writes_its_results() {
    let root = repo_root();
    let out = tempfile::tempdir().expect("a temporary directory");
    let log = out.path().join("bench-run.log");
    let mut child = Command::new(root.join("bench/run"))
        .current_dir(&root)
        .env("BAZAAR_BIN", binary())
        .env("BENCH_SECONDS", "2")
        .env("BENCH_TURNS", "2")
        .env("BENCH_TURN_SECONDS", "1")
        .env("BENCH_LIMIT_SECONDS", "1")
        .env("BENCH_REDIS_REQUESTS", "20000")
        .env("BENCH_SETTLE_SECONDS", "2")
        .env("BENCH_MIN_FREE_GB", "1")
        .env("BENCH_OUT", out.path())
        .env("CUSTOMERS", "2000")
        .env("EVENTS", "4000")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("a log file"))
        .stderr(std::fs::File::options().append(true).open(&log).expect("the log file"))
        // Its own process group: the node, the no-op server and Redis it
        // starts can all be stopped by the group's id if it hangs.
        .process_group(0)
        .spawn()
        .expect("bench/run starts");
    let group = i32::try_from(child.id()).expect("a pid fits in an i32");
    let deadline = Instant::now() + Duration::from_secs(480);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait on bench/run") {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let Some(status) = status else {
        stop_group(group);
        let _ = child.wait();
        panic!("bench/run did not end within 8 minutes:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    };
    let printed = std::fs::read_to_string(&log).unwrap_or_default();
    // What it started, it stopped (its EXIT trap), whether it passed or not.
    let lingering = group_alive(group);
    if lingering {
        stop_group(group);
    }
    assert!(status.success(), "bench/run failed ({status}):\n{printed}");
    assert!(!lingering, "bench/run left processes of its group running:\n{printed}");

    let written: Vec<_> = std::fs::read_dir(out.path())
        .expect("the results directory")
        .map(|entry| entry.expect("an entry").path())
        .collect();
    let json = written.iter().find(|p| p.extension().is_some_and(|e| e == "json")).expect("a JSON result");
    let markdown = json.with_extension("md");
    assert!(markdown.exists(), "the markdown summary beside {}: {written:?}", json.display());
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).expect("readable")).expect("valid JSON");

    for scenario in ["a_unary", "a_open_80", "b_hot_jackpot", "e_mall", "c_batched", "d_leaderboard"] {
        let report = &result["scenarios"][scenario];
        assert!(0 < report["acknowledged"].as_u64().unwrap_or(0), "{scenario} acknowledged events: {report}");
        assert!(0.0 < report["throughput_per_s"].as_f64().unwrap_or(0.0), "{scenario}: {report}");
        assert!(report["latency_ms"]["p99"].is_number(), "{scenario}: {report}");
        // The node's own figures, read from its /metrics around the run.
        let journaled = report["server"]["journal_bytes_per_event"].as_f64().unwrap_or(0.0);
        assert!(100.0 < journaled, "{scenario}: journal bytes per event {journaled}");
    }
    assert!(0 < result["scenarios"]["e_mall"]["spins"]["acknowledged"].as_u64().unwrap_or(0), "(e) spins");
    let ratios = result["ratios"].as_object().expect("ratios");
    for name in [
        "a_unary / noop_record_event",
        "b_hot_jackpot / a_unary",
        "e_mall / b_hot_jackpot (events)",
        "c_batched / noop_stream",
        "d_leaderboard / redis_zincrby",
        "d_leaderboard / redis_zincrby_appendfsync_always",
        "a_unary / noop_record_event, in turns (medians)",
        "d_leaderboard / redis_zincrby, in turns (medians)",
    ] {
        let ratio = ratios.get(name).and_then(serde_json::Value::as_f64);
        assert!(ratio.is_some_and(|r| r.is_finite() && 0.0 < r), "ratio {name:?}: {ratios:?}");
    }
    for figure in ["zincrby_per_s", "zrevrank_per_s", "zincrby_appendfsync_always_per_s"] {
        assert!(0.0 < result["redis"][figure].as_f64().unwrap_or(0.0), "Redis {figure}: {}", result["redis"]);
    }
    let restart = &result["restart"];
    assert!(0.0 < restart["ready_after_s"].as_f64().unwrap_or(0.0), "the restart after kill -9: {restart}");

    let summary = std::fs::read_to_string(&markdown).expect("readable");
    for part in ["| scenario |", "journal bytes/event", "in turns", "## Memory and restart"] {
        assert!(summary.contains(part), "the summary has {part:?}:\n{summary}");
    }
}

#[test]
fn every_bench_script_answers_help() {
    let root = repo_root();
    let mut scripts: Vec<_> = std::fs::read_dir(root.join("bench"))
        .expect("bench/")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.is_file() && path.extension().is_none())
        .collect();
    scripts.sort();
    assert!(7 <= scripts.len(), "the bench scripts: {scripts:?}");
    for script in scripts {
        let output = Command::new(&script).arg("--help").current_dir(&root).output().expect("the script runs");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{} --help: {}", script.display(), String::from_utf8_lossy(&output.stderr));
        // Its usage lines, not an empty page or a build's output.
        let name = script.strip_prefix(&root).expect("under the root").display().to_string();
        assert!(help.contains(&name), "{name} --help shows how to run it:\n{help}");
    }
}

#[test]
fn bench_ab_measures_two_builds_in_turns() {
    let root = repo_root();
    let out = tempfile::tempdir().expect("a temporary directory");
    let report = out.path().join("ab.json");
    let output = Command::new(root.join("bench/ab"))
        .args([binary(), binary()])
        .args(["--clients", "8", "--no-jackpot", "--spin-share", "0"])
        .current_dir(&root)
        .env("ROUNDS", "2")
        .env("SECONDS_PER_RUN", "1")
        .env("OUT", &report)
        .output()
        .expect("bench/ab runs");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "bench/ab failed:\n{printed}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(printed.contains("ahead of A in"), "{printed}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("its JSON")).expect("valid JSON");
    let runs = result["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4, "two rounds of A and B: {result}");
    for run in runs {
        assert!(0.0 < run["events_per_s"].as_f64().unwrap_or(0.0), "{run}");
    }
}

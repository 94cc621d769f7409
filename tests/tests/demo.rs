//! `bazaar demo` runs a sample mall for a few seconds and exits cleanly,
//! with every request acknowledged and the jackpot's books balanced; Ctrl-C
//! ends it early as cleanly, its temporary data gone with it.

use bazaar_tests::binary;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_runs_a_mall_and_exits_cleanly() {
    let output = Command::new(binary())
        .args(["demo", "--duration", "3s", "--rate", "60", "--customers", "50"])
        .output()
        .expect("the demo starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "the demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let summary =
        stdout.lines().find(|l| l.starts_with("demo: ")).unwrap_or_else(|| panic!("no summary in:\n{stdout}"));
    assert!(summary.contains(", 0 errors;"), "{summary}");
    assert!(summary.contains("books balance"), "{summary}");
    let sent: u64 = summary["demo: ".len()..].split(' ').next().and_then(|n| n.parse().ok()).expect("a count");
    assert!(100 <= sent, "three seconds at 60 a second send about 180 requests: {summary}");
    let help = Command::new(binary()).args(["demo", "--help"]).output().expect("help");
    assert!(String::from_utf8_lossy(&help.stdout).contains("--keep"));
}

#[test]
fn ctrl_c_ends_the_demo_early_and_cleanly_and_takes_its_data_with_it() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut demo = Command::new(binary())
        .args(["demo", "--duration", "120s", "--rate", "60", "--customers", "50"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the demo starts");
    let demo_dirs = || -> Vec<String> {
        std::fs::read_dir(tmp.path())
            .expect("the temporary directory lists")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with("bazaar-demo-"))
            .collect()
    };
    // Its node writes into the data directory once it runs; shopping
    // begins right after the mall is set up.
    let started = Instant::now();
    while demo_dirs().is_empty() || !tmp.path().join(&demo_dirs()[0]).join("db").exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "the demo made no data directory");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    let pid = libc::pid_t::try_from(demo.id()).expect("pids fit pid_t");
    // SAFETY: signalling a child process we own, by its PID.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = loop {
        if let Some(status) = demo.try_wait().expect("the demo's status") {
            break status;
        }
        if Duration::from_secs(60) < started.elapsed() {
            let _ = demo.kill();
            let _ = demo.wait();
            panic!("the demo did not stop within a minute of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut demo.stdout.take().expect("stdout is piped"), &mut stdout).expect("stdout");
    assert!(status.success(), "{status}:\n{stdout}");
    let summary =
        stdout.lines().find(|l| l.starts_with("demo: ")).unwrap_or_else(|| panic!("no summary in:\n{stdout}"));
    assert!(summary.contains("(interrupted after "), "{summary}");
    assert!(summary.contains(", 0 errors;") && summary.contains("books balance"), "{summary}");
    assert_eq!(demo_dirs(), Vec::<String>::new(), "the demo's data directory is gone");
}

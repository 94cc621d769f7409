//! `bazaar demo` runs a sample mall for a few seconds and exits cleanly,
//! with every request acknowledged and the jackpot's books balanced.

use bazaar_tests::binary;
use std::process::Command;

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

//! The live display page in a real browser (headless Chromium driven by
//! Playwright): after purchases the number on the page follows the pool, a
//! hit appears and verifies against its commitment, and the leaderboard
//! lists the buyers. The display key, read from the URL fragment and sent
//! as a header, never appears in the node's logs.

use bazaar_tests::{Mall, Node};
use serde_json::json;
use std::path::Path;
use std::process::Command;

#[test]
fn the_display_page_follows_the_pool_and_shows_a_verifiable_hit() {
    let node = Node::start(&["--log", "info,bazaar_node::http=debug"]);
    let hot = json!({"campaign": "bf", "seed_minor": 1000, "cap_minor": 6000, "contribution_bps": 1000,
                     "reserve_bps": 0, "min_purchase_minor": 100});
    let mall = Mall::create(&node, "mall", hot);

    let page = node.client(None).get("/display/mall");
    assert_eq!(page.status, 200);
    assert!(page.text.contains("display.js"), "{}", page.text);
    let script = node.client(None).get("/display/assets/display.js");
    assert!(script.text.contains("location.hash"), "the key comes from the fragment");

    let screenshot = node.data.path().join("display.png");
    let checker = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser").join("display_check.py");
    let output = Command::new("python3")
        .arg(&checker)
        .args(["--url", &node.url, "--tenant", "mall", "--jackpot", "j-mall", "--leaderboard", "lb-spend"])
        .args(["--display-key", mall.display_key(), "--pos-key", mall.pos_key().expect("a pos key")])
        .arg("--screenshot")
        .arg(&screenshot)
        .output()
        .expect("python3 runs (scripts/install-test-tools.sh installs playwright and chromium)");
    assert!(
        output.status.success(),
        "the browser check failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(std::fs::metadata(&screenshot).map(|m| m.len() > 10_000).unwrap_or(false), "a screenshot was taken");
    if let Ok(path) = std::env::var("BAZAAR_DISPLAY_SCREENSHOT") {
        std::fs::copy(&screenshot, path).expect("the screenshot is copied");
    }
    // The key travelled only in headers: the request log never shows it.
    let log = std::fs::read_to_string(node.data.path().join("node.log")).expect("the node log");
    assert!(log.contains("/display/mall"), "requests are logged");
    let secret = mall.display_key().rsplit('_').next().expect("the secret part");
    assert!(!log.contains(secret), "the display key leaked into the log");
}

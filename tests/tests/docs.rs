//! The docs do what they say: the README's curl walk-through runs as
//! written against a real node and drives the jackpot to a verifiable hit,
//! and every Rust file opens with a paragraph saying why it exists.

use bazaar_tests::{commitment, repo_root, Node};
use std::process::Command;

/// The README's walk-through: the shell block after its marker.
fn walk_through() -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md is readable");
    let marked = readme.split("<!-- walk-through:").nth(1).expect("the README marks its walk-through");
    let block = marked.split("```sh\n").nth(1).expect("a shell block follows the marker");
    block.split("\n```").next().expect("the block ends").to_owned()
}

#[test]
fn the_readme_walk_through_runs_and_hits_the_jackpot() {
    let node = Node::start_with(Some("my-very-secret-admin-key"), &[]);
    let script = walk_through().replace("http://127.0.0.1:8080", &node.url);
    assert!(script.contains(&node.url), "the walk-through talks to the node it starts");
    let output =
        Command::new("bash").arg("-c").arg(format!("set -euo pipefail\n{script}")).output().expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "the walk-through failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    // It printed a winning purchase, and the jackpot view after it reveals
    // a trigger and salt that match the commitment.
    assert!(stdout.contains("\"won_minor\":"), "{stdout}");
    let jackpot: serde_json::Value = node.admin().get("/v1/tenants/mall/jackpots/j-mall").expect(200);
    let hit = &jackpot["last_hit"];
    assert!(hit.is_object(), "the walk-through drove the jackpot to a hit: {jackpot}");
    let trigger = hit["trigger_minor"].as_i64().expect("trigger");
    assert_eq!(hit["commitment"], commitment(trigger, hit["salt"].as_str().expect("salt")).as_str());
}

#[test]
fn every_rust_file_says_why_it_exists() {
    let mut missing = Vec::new();
    let mut stack = vec![repo_root()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable directory") {
            let path = entry.expect("a directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") {
                let text = std::fs::read_to_string(&path).expect("readable source");
                if !text.trim_start().starts_with("//!") {
                    missing.push(path.display().to_string());
                }
            }
        }
    }
    assert!(missing.is_empty(), "these files do not open with a //! paragraph:\n{}", missing.join("\n"));
}

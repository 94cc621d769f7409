//! The OpenAPI document: generated from the code, served at
//! /v1/openapi.json, identical to the checked-in docs/openapi.json, and
//! true to the API: schemathesis fuzzes a live node with valid keys and
//! finds no server error and no answer that breaks the document.

use bazaar_tests::{binary, default_jackpot, tool, Mall, Node, ADMIN_KEY};
use std::path::Path;
use std::process::Command;

fn checked_in() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let text = std::fs::read_to_string(&path).expect("docs/openapi.json exists");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

#[test]
fn the_served_document_is_the_checked_in_copy() {
    let node = Node::start(&[]);
    let served = node.client(None).get("/v1/openapi.json").expect(200);
    assert_eq!(served["openapi"], "3.1.0");
    assert!(
        served == checked_in(),
        "docs/openapi.json is stale: refresh it with `cargo run -- openapi > docs/openapi.json`"
    );
    let printed = Command::new(binary()).arg("openapi").output().expect("bazaar openapi runs");
    let printed: serde_json::Value = serde_json::from_slice(&printed.stdout).expect("bazaar openapi prints JSON");
    assert_eq!(printed, served);
    // Every route the node serves under /v1 is in the document.
    let paths = served["paths"].as_object().expect("paths");
    for path in [
        "/v1/tenants",
        "/v1/tenants/{tenant}/events",
        "/v1/tenants/{tenant}/events/batch",
        "/v1/tenants/{tenant}/wheels/{id}/spins",
        "/v1/tenants/{tenant}/jackpots/{id}/stream",
        "/v1/tenants/{tenant}/audit/{kind}/{id}",
    ] {
        assert!(paths.contains_key(path), "{path} is not documented");
    }
    assert_eq!(served["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
}

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_breaking_the_document() {
    let node = Node::start(&[]);
    let mall = Mall::create(&node, "mall", default_jackpot());
    mall.pos.post(&mall.path("events"), Mall::purchase("seed-1", "c-1", "s-1", 20_000)).expect(200);
    // Point the fuzzer's path parameters at things that exist, so it reaches
    // the API's logic rather than 404s.
    let config = node.data.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        r#"
[parameters]
"path.tenant" = "mall"

[[operations]]
include-path-regex = "/jackpots/"
parameters = { "path.id" = "j-mall" }

[[operations]]
include-path-regex = "/leaderboards/"
parameters = { "path.id" = "lb-spend", "path.customer" = "c-1" }

[[operations]]
include-path-regex = "/customers/"
parameters = { "path.id" = "c-1" }

[[operations]]
include-path-regex = "/audit/"
parameters = { "path.kind" = "jackpots", "path.id" = "j-mall" }

[[operations]]
include-path-regex = "/wheels/"
parameters = { "path.id" = "w-main" }
"#,
    )
    .expect("the config is written");
    let output = Command::new(tool("schemathesis"))
        // Its cache goes to the working directory: keep it out of the repo.
        .current_dir(node.data.path())
        .arg("--no-color")
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/v1/openapi.json", node.url))
        .args(["-H", &format!("Authorization: Bearer {ADMIN_KEY}")])
        // No 5xx, documented status codes, content types and headers, and
        // answers that match their schemas. Streams never end, so they are
        // fuzzed elsewhere (tests/tests/streams.rs) rather than here.
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
            "--exclude-path-regex",
            "/stream$",
            "--max-examples",
            "25",
            "--generation-deterministic",
        ])
        .output()
        .expect("schemathesis runs (scripts/install-test-tools.sh installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("generated"), "schemathesis ran no test case:\n{stdout}");
    // The parameters reached real entities: no operation only ever met 404s.
    assert!(!stdout.contains("Missing test data"), "schemathesis mostly met 404s:\n{stdout}");
}

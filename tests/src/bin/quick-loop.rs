//! A quick, honest figure for durable event ingestion over HTTP: sets up a
//! tenant on a running node and has C clients send purchases back to back
//! (closed loop, keep-alive connections), each acknowledged only once
//! durable. Prints events per second and latency percentiles, and a JSON
//! line for scripts.
//!
//! This is the measuring stick of the single-node issue; the full load
//! generator (`bazaar loadgen`, open loop, gRPC, batches, HDR histograms,
//! the machine's limits measured in the same run) is the performance
//! issue's.

use clap::Parser;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Send purchases to a running Bazaar node and report durable events/s.
#[derive(Parser, Debug)]
#[command(name = "quick-loop")]
struct Args {
    /// The node's HTTP address, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// An admin key of the node.
    #[arg(long, env = "BAZAAR_ADMIN_KEY")]
    admin_key: String,
    /// Concurrent clients, each with one keep-alive connection.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Events to send in all.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Distinct customers the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    customers: usize,
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
    let admin = format!("Bearer {}", args.admin_key);
    let run =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?.as_millis();
    let tenant = format!("quick-{run}");
    let base = format!("{}/v1/tenants/{tenant}", args.url);
    let put = |path: &str, body: serde_json::Value| -> Result<(), String> {
        agent
            .put(&format!("{base}/{path}"))
            .set("Authorization", &admin)
            .send_json(body)
            .map(|_| ())
            .map_err(|e| format!("PUT {path}: {e}"))
    };
    agent
        .post(&format!("{}/v1/tenants", args.url))
        .set("Authorization", &admin)
        .send_json(json!({"id": tenant, "name": "quick loop", "currency": "EUR"}))
        .map_err(|e| format!("creating the tenant: {e}"))?;
    for store in 0..4 {
        put(&format!("stores/s-{store}"), json!({"name": format!("Shop {store}"), "category": "retail"}))?;
    }
    put(
        "campaigns/c",
        json!({"name": "Quick", "starts_at": "2020-01-01T00:00:00Z", "ends_at": "2099-01-01T00:00:00Z",
               "earning": {"points_per_unit_minor": 100}}),
    )?;
    put(
        "jackpots/j",
        json!({"campaign": "c", "seed_minor": 100000, "cap_minor": 10000000, "contribution_bps": 100,
               "reserve_bps": 1000, "min_purchase_minor": 100}),
    )?;
    put("leaderboards/l", json!({"campaign": "c", "metric": "spend"}))?;

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.clients)
        .map(|_| {
            let (agent, admin, next) = (agent.clone(), admin.clone(), next.clone());
            let url = format!("{base}/events");
            let (events, customers) = (args.events, args.customers);
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let mut latencies = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if events <= n {
                        return Ok(latencies);
                    }
                    let body = json!({"event_id": format!("q-{n}"), "customer": format!("c-{}", (n * 7_919) % customers),
                                      "store": format!("s-{}", n % 4), "kind": "purchase",
                                      "amount_minor": 1_000 + (n * 104_729) % 90_000});
                    let sent = Instant::now();
                    agent.post(&url).set("Authorization", &admin).send_json(body).map_err(|e| format!("event {n}: {e}"))?;
                    latencies.push(sent.elapsed());
                }
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.join().map_err(|_| "a client thread panicked".to_string())??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 * p) as usize).min(latencies.len() - 1);
        latencies[index].as_secs_f64() * 1_000.0
    };
    let rate = latencies.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{} durable events in {:.2} s with {} clients: {:.0} events/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        elapsed.as_secs_f64(),
        args.clients,
        rate,
        percentile(0.50),
        percentile(0.99),
        percentile(1.0)
    );
    println!(
        "{}",
        json!({"events": latencies.len(), "seconds": elapsed.as_secs_f64(), "clients": args.clients,
               "events_per_s": rate, "latency_ms": {"p50": percentile(0.5), "p99": percentile(0.99), "max": percentile(1.0)}})
    );
    Ok(())
}

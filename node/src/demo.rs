//! `bazaar demo`: a newcomer's first minute.
//!
//! Starts a node in a temporary directory, sets up a sample mall through
//! the public HTTP API — 20 stores in 4 categories, a mall-wide jackpot, a
//! wheel, a three-step mission ("buy in 3 different shops this week") and a
//! spend leaderboard — and has simulated shoppers buy, visit and spin at a
//! chosen rate, open loop, while the terminal shows the jackpot growing and
//! hitting, the top 10 and the events per second. Shoppers are drawn
//! Zipf-like: a few regulars buy often, most rarely.
//!
//! Everything goes through the public API, exactly as tills would, so the
//! demo also shows what the API costs.

use crate::config::NodeConfig;
use anyhow::{bail, Context as _};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `bazaar demo` flags.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long the shoppers shop (Ctrl-C ends it early: the summary
    /// follows and the node stops cleanly, its temporary data with it).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Events per second the shoppers send (open loop).
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Distinct shoppers.
    #[arg(long, default_value_t = 2_000)]
    pub customers: u32,
    /// Leave the node running afterwards and print its URLs and keys (stop
    /// it with Ctrl-C).
    #[arg(long)]
    pub keep: bool,
}

const CATEGORIES: [&str; 4] = ["fashion", "food", "electronics", "beauty"];
const STORES: usize = 20;
const TENANT: &str = "demo-mall";

/// What the demo set up: where and with which keys.
struct Mall {
    base: String,
    admin: String,
    pos: String,
    display: String,
}

/// Runs the demo; must run inside an actix `System` (like `serve`).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.rate == 0 || 100_000 < args.rate {
        bail!("--rate: must be between 1 and 100000 events per second");
    }
    if args.customers == 0 {
        bail!("--customers: must be at least 1");
    }
    // Ctrl-C from here on ends the shopping early and stops the node
    // cleanly, so that its temporary data directory goes with it (the
    // signal's default action killed the process and left it behind).
    let mut ctrl_c =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("catching Ctrl-C")?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let (pressed, mut presses) = tokio::sync::watch::channel(0u32);
    tokio::spawn({
        let interrupted = interrupted.clone();
        async move {
            while ctrl_c.recv().await.is_some() {
                interrupted.store(true, Ordering::SeqCst);
                pressed.send_modify(|count| *count += 1);
            }
        }
    });
    let data = tempfile::Builder::new().prefix("bazaar-demo-").tempdir().context("creating a temporary directory")?;
    let admin = format!("demo-admin-{}", hex::encode(rand::random::<[u8; 16]>()));
    let config = NodeConfig {
        http: "127.0.0.1:0".parse()?,
        grpc: "127.0.0.1:0".parse()?,
        data_dir: data.path().join("db"),
        admin_key: Some(admin.clone()),
        ..NodeConfig::defaults()
    };
    let (stop, stopping) = tokio::sync::oneshot::channel::<()>();
    let (ready, listening) = tokio::sync::oneshot::channel();
    // On the system arbiter: the node starts arbiters of its own.
    let node = actix_rt::spawn(crate::serve_with(
        config,
        async move {
            let _ = stopping.await;
        },
        Some(ready),
    ));
    let listening = listening.await.context("the demo node did not start")?;
    let base = format!("http://{}", listening.http);
    let mall = tokio::task::spawn_blocking({
        let (base, admin) = (base.clone(), admin.clone());
        move || set_up(base, admin)
    })
    .await??;

    let outcome = tokio::task::spawn_blocking({
        let (mall, args, interrupted) = (Arc::new(mall), args.clone(), interrupted.clone());
        move || shop(&mall, &args, &interrupted).map(|summary| (mall, summary))
    })
    .await?;
    let (mall, summary) = outcome?;
    println!("{summary}");

    presses.mark_unchanged();
    if args.keep && !interrupted.load(Ordering::SeqCst) {
        println!();
        println!("The demo node keeps running (Ctrl-C stops it):");
        println!("  HTTP API      {base}/v1   (docs/api.md)");
        println!("  gRPC          {}   (grpcurl -plaintext {} list)", listening.grpc, listening.grpc);
        println!("  display page  {base}/display/{TENANT}?jackpot=j-mall&leaderboard=lb-spend#key={}", mall.display);
        println!("  admin key     {}", mall.admin);
        println!("  pos key       {}", mall.pos);
        println!("  display key   {}", mall.display);
        println!("  data          {}", data.path().display());
        let _ = presses.changed().await;
    }
    let _ = stop.send(());
    node.await.context("joining the demo node")??;
    Ok(())
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build()
}

fn call(agent: &ureq::Agent, method: &str, url: &str, key: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let request = agent.request(method, url).set("Authorization", &format!("Bearer {key}"));
    let response = match body {
        Some(body) => request.send_json(body),
        None => request.call(),
    };
    match response {
        Ok(response) => Ok(response.into_json()?),
        Err(ureq::Error::Status(status, response)) => {
            bail!("{method} {url}: {status} {}", response.into_string().unwrap_or_default())
        }
        Err(error) => bail!("{method} {url}: {error}"),
    }
}

/// Creates the sample mall through the public API.
fn set_up(base: String, admin: String) -> anyhow::Result<Mall> {
    let agent = agent();
    let api = format!("{base}/v1/tenants/{TENANT}");
    call(
        &agent,
        "POST",
        &format!("{base}/v1/tenants"),
        &admin,
        Some(json!({"id": TENANT, "name": "Demo Mall", "currency": "EUR"})),
    )?;
    let key = |role: &str| -> anyhow::Result<String> {
        let answer = call(&agent, "POST", &format!("{api}/keys"), &admin, Some(json!({"role": role})))?;
        Ok(answer["key"].as_str().unwrap_or_default().to_owned())
    };
    let (pos, display) = (key("pos")?, key("display")?);
    let put = |path: &str, body: Value| call(&agent, "PUT", &format!("{api}/{path}"), &admin, Some(body)).map(|_| ());
    for store in 0..STORES {
        let category = CATEGORIES[store % CATEGORIES.len()];
        put(&format!("stores/s-{store:02}"), json!({"name": format!("Shop {store:02}"), "category": category}))?;
    }
    let now = chrono::Utc::now();
    let week_ends = now + chrono::Duration::days(7);
    put(
        "campaigns/mall-days",
        json!({"name": "Mall Days", "starts_at": (now - chrono::Duration::days(1)).to_rfc3339(),
               "ends_at": (now + chrono::Duration::days(30)).to_rfc3339(),
               "earning": {"points_per_unit_minor": 100, "tier_multipliers_pct": {"gold": 150},
                           "event_bonus": {"visit": 5}},
               "tiers": [{"name": "silver", "min_points": 500}, {"name": "gold", "min_points": 2000}]}),
    )?;
    put(
        "jackpots/j-mall",
        json!({"campaign": "mall-days", "seed_minor": 50_000, "cap_minor": 200_000, "contribution_bps": 100,
               "reserve_bps": 2_000, "min_purchase_minor": 1_000}),
    )?;
    put(
        "wheels/w-lucky",
        json!({"campaign": "mall-days", "cost": {"entitlements": 1}, "daily_limit": 5,
               "earn": {"min_purchase_minor": 5_000, "spins": 1},
               "segments": [
                   {"label": "50 points", "weight": 50, "prize": {"points": 50}},
                   {"label": "10% coupon", "weight": 30, "prize": {"coupon": "MALL10"}},
                   {"label": "5 euro back", "weight": 15, "prize": {"cashback_minor": 500}},
                   {"label": "headphones", "weight": 5, "prize": {"item": "Headphones"}, "stock": 10}]}),
    )?;
    put(
        "missions/m-3shops",
        json!({"campaign": "mall-days", "name": "Buy in 3 different shops this week",
               "starts_at": now.to_rfc3339(), "ends_at": week_ends.to_rfc3339(),
               "steps": [
                   {"kind": "purchase", "category": "fashion", "reward": {"points": 20}},
                   {"kind": "purchase", "category": "food", "reward": {"points": 20}},
                   {"kind": "purchase", "min_amount_minor": 1000, "count": 3, "distinct_stores": true}],
               "reward": {"points": 300, "spins": {"wheel": "w-lucky", "count": 2}}}),
    )?;
    put("leaderboards/lb-spend", json!({"campaign": "mall-days", "metric": "spend", "top_size": 10}))?;
    Ok(Mall { base, admin, pos, display })
}

/// Counters the shoppers and the screen share.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acknowledged: AtomicU64,
    errors: AtomicU64,
    spins: AtomicU64,
}

/// Drives shoppers for the duration (or until `interrupted`) while
/// showing the mall live; returns the closing summary.
fn shop(mall: &Mall, args: &DemoArgs, interrupted: &Arc<AtomicBool>) -> anyhow::Result<String> {
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let deadline = started + args.duration;
    // Open loop: a ticker hands out send times; workers send at those times.
    let workers = (args.rate as usize / 50).clamp(4, 64);
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let next_slot = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for worker in 0..workers {
        let (counters, next_slot, interrupted) = (counters.clone(), next_slot.clone(), interrupted.clone());
        let (base, pos) = (mall.base.clone(), mall.pos.clone());
        let customers = args.customers;
        threads.push(std::thread::spawn(move || {
            let agent = agent();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(worker as u64);
            let api = format!("{base}/v1/tenants/{TENANT}");
            loop {
                let slot = next_slot.fetch_add(1, Ordering::Relaxed);
                let due = started + interval.mul_f64(slot as f64);
                if deadline <= due || interrupted.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                // Zipf-like: the square of a uniform number favours low ids.
                let u: f64 = rng.gen();
                let customer = format!("shopper-{}", ((u * u) * f64::from(customers)) as u32);
                let store = format!("s-{:02}", rng.gen_range(0..STORES));
                let roll: f64 = rng.gen();
                counters.sent.fetch_add(1, Ordering::Relaxed);
                let result = if roll < 0.07 {
                    counters.spins.fetch_add(1, Ordering::Relaxed);
                    let body = json!({"customer": customer, "request_id": format!("spin-{worker}-{slot}")});
                    // No entitlement yet is an expected answer, not an error.
                    match call(&agent, "POST", &format!("{api}/wheels/w-lucky/spins"), &pos, Some(body)) {
                        Err(error) if error.to_string().contains("409") => Ok(Value::Null),
                        other => other,
                    }
                } else {
                    let (kind, amount) = if roll < 0.2 {
                        ("visit", 0)
                    } else {
                        ("purchase", 500 + (rng.gen::<f64>().powi(2) * 19_500.0) as i64)
                    };
                    let mut event = json!({"event_id": format!("demo-{worker}-{slot}"), "customer": customer,
                                           "store": store, "kind": kind});
                    if kind == "purchase" {
                        event["amount_minor"] = json!(amount);
                    }
                    call(&agent, "POST", &format!("{api}/events"), &pos, Some(event))
                };
                match result {
                    Ok(_) => counters.acknowledged.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    let screen = Screen::new(args.duration);
    let agent = agent();
    let api = format!("{}/v1/tenants/{TENANT}", mall.base);
    let mut hits_seen = 0u64;
    let mut last = (Instant::now(), 0u64);
    let mut hits_log: Vec<String> = Vec::new();
    while Instant::now() < deadline && !interrupted.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        let jackpot = call(&agent, "GET", &format!("{api}/jackpots/j-mall"), &mall.display, None)?;
        let board = call(&agent, "GET", &format!("{api}/leaderboards/lb-spend?top=10"), &mall.display, None)?;
        let cycle = jackpot["cycle"].as_u64().unwrap_or(1);
        if hits_seen + 1 < cycle {
            // Every hit since the last look, from the audit (several may
            // fall between two looks).
            let audit =
                call(&agent, "GET", &format!("{api}/audit/jackpots/j-mall?after={hits_seen}"), &mall.admin, None)?;
            for record in audit["records"].as_array().into_iter().flatten() {
                let hit = &record["hit"];
                hits_log.push(format!(
                    "round {} won by {} : {}",
                    hit["cycle"],
                    hit["customer"].as_str().unwrap_or("?"),
                    euros(hit["amount_minor"].as_i64().unwrap_or(0))
                ));
                hits_seen = hits_seen.max(hit["cycle"].as_u64().unwrap_or(0));
            }
        }
        let acknowledged = counters.acknowledged.load(Ordering::Relaxed);
        let rate = (acknowledged - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), acknowledged);
        screen.show(&jackpot, &board, &hits_log, rate, &counters, started.elapsed());
    }
    for thread in threads {
        let _ = thread.join();
    }
    screen.finish();
    let jackpot = call(&agent, "GET", &format!("{api}/jackpots/j-mall"), &mall.display, None)?;
    let books = &jackpot["books"];
    let balanced = books["seeded_minor"].as_i64().unwrap_or(0) + books["contributed_minor"].as_i64().unwrap_or(0)
        == jackpot["pool_minor"].as_i64().unwrap_or(0)
            + jackpot["reserve_minor"].as_i64().unwrap_or(0)
            + books["paid_minor"].as_i64().unwrap_or(0);
    let elapsed = started.elapsed().as_secs_f64();
    let acknowledged = counters.acknowledged.load(Ordering::Relaxed);
    Ok(format!(
        "demo: {} requests sent, {} acknowledged durably ({:.0} events/s), {} errors; jackpot round {}, pool {}, \
         {} paid in {} hits; books {}",
        counters.sent.load(Ordering::Relaxed),
        acknowledged,
        acknowledged as f64 / elapsed,
        counters.errors.load(Ordering::Relaxed),
        jackpot["cycle"],
        euros(jackpot["pool_minor"].as_i64().unwrap_or(0)),
        euros(books["paid_minor"].as_i64().unwrap_or(0)),
        jackpot["cycle"].as_u64().unwrap_or(1) - 1,
        if balanced { "balance" } else { "DO NOT BALANCE" },
    ) + &if interrupted.load(Ordering::SeqCst) {
        format!(" (interrupted after {elapsed:.1} s)")
    } else {
        String::new()
    })
}

fn euros(minor: i64) -> String {
    format!("€{}.{:02}", minor / 100, minor % 100)
}

/// The live terminal view: a progress bar and a few lines under it.
struct Screen {
    progress: ProgressBar,
    jackpot: ProgressBar,
    hits: ProgressBar,
    board: ProgressBar,
}

impl Screen {
    fn new(duration: Duration) -> Self {
        let multi = MultiProgress::with_draw_target(if std::io::stdout().is_terminal() {
            ProgressDrawTarget::stdout()
        } else {
            ProgressDrawTarget::hidden()
        });
        let progress = multi.add(ProgressBar::new(duration.as_secs().max(1)));
        progress.set_style(
            ProgressStyle::with_template("{spinner} shopping {bar:40.cyan/blue} {pos}/{len}s  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let line = |multi: &MultiProgress| {
            let bar = multi.add(ProgressBar::new_spinner());
            bar.set_style(ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
            bar
        };
        Self { jackpot: line(&multi), hits: line(&multi), board: line(&multi), progress }
    }

    fn show(&self, jackpot: &Value, board: &Value, hits: &[String], rate: f64, counters: &Counters, elapsed: Duration) {
        self.progress.set_position(elapsed.as_secs());
        self.progress.set_message(format!(
            "{rate:>6.0} events/s  ({} sent, {} errors)",
            counters.sent.load(Ordering::Relaxed),
            counters.errors.load(Ordering::Relaxed)
        ));
        self.jackpot.set_message(format!(
            "\n  JACKPOT  {}   (round {}, must hit by {})",
            euros(jackpot["pool_minor"].as_i64().unwrap_or(0)),
            jackpot["cycle"],
            euros(jackpot["cap_minor"].as_i64().unwrap_or(0))
        ));
        let recent: Vec<&String> = hits.iter().rev().take(3).collect();
        self.hits.set_message(if recent.is_empty() {
            "  no winner yet".to_owned()
        } else {
            recent.iter().map(|h| format!("  * {h}")).collect::<Vec<_>>().join("\n")
        });
        let entries = board["entries"].as_array().cloned().unwrap_or_default();
        let lines: Vec<String> = entries
            .iter()
            .map(|e| {
                format!(
                    "  {:>2}. {:<16} {:>12}",
                    e["rank"],
                    e["customer"].as_str().unwrap_or("?"),
                    euros(e["score"].as_i64().unwrap_or(0))
                )
            })
            .collect();
        self.board.set_message(format!("\n  TOP 10 SPENDERS\n{}", lines.join("\n")));
    }

    fn finish(&self) {
        self.progress.finish();
        self.jackpot.finish();
        self.hits.finish();
        self.board.finish();
    }
}

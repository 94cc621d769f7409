//! `bazaar loadgen`: a mall's workload against a running node, over the
//! public API, measured honestly.
//!
//! N stores, M customers drawn Zipf-like (a few regulars, a long tail),
//! purchases of realistic amounts and some visits, all feeding one shared
//! jackpot and a leaderboard, and spins of a wheel of fortune by customers
//! whose purchases earned them (`--spin-share`). Transports: unary gRPC (default), HTTP
//! (`--http`), and batches (`--batch N`: the gRPC bidirectional stream, or
//! `POST .../events/batch`). Closed loop with `--clients`, or open loop at
//! `--rate`, where latency is measured from each request's intended send
//! time so a stalled server cannot hide behind a slowed client
//! (coordinated omission). Latencies go into an HDR histogram; the end is a
//! table and a JSON report. `--verify` checks the jackpot's books,
//! customers' points, spins and wallets against exactly what was
//! acknowledged, and re-checks every draw in the wheel's audit.

use anyhow::{bail, Context as _};
use bazaar_games::wheel::{Prize, Segment, SpinCost, SpinEarning, WheelDef, WonPrize};
use bazaar_games::Id;
use bazaar_proto::v1 as pb;
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// `bazaar loadgen` flags.
#[derive(Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// A node's gRPC address (HOST:PORT); the default transport.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    pub grpc: String,
    /// Send over HTTP to this base URL (http://HOST:PORT) instead of gRPC.
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
    /// An admin key of the node (for --setup and --verify).
    #[arg(long, env = "BAZAAR_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: String,
    /// Create a fresh tenant with stores, a campaign, a jackpot, a
    /// leaderboard and (spins on) a wheel through the API first; otherwise
    /// use --tenant as it is.
    #[arg(long)]
    pub setup: bool,
    /// The tenant to send to (with --setup: its prefix).
    #[arg(long, default_value = "loadgen")]
    pub tenant: String,
    /// Concurrent clients (closed loop: each sends when it has its answer;
    /// open loop: at most this many requests in flight, so give it room).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// gRPC (HTTP/2) connections the clients take in turn, at most one
    /// per client (`--clients`: tills each with their own). One
    /// connection carries many requests per read and write: here 64
    /// connections took 10–40 % off the unary rate of Bazaar and of the
    /// no-op server alike (docs/performance.md).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub connections: usize,
    /// Open loop: this many events per second in all, whatever the answers.
    #[arg(long)]
    pub rate: Option<u32>,
    /// How long to send.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop after this many events instead.
    #[arg(long)]
    pub events: Option<u64>,
    /// Events per request: above 1, the gRPC bidirectional stream (or the
    /// HTTP batch endpoint) carries them.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Stores of the tenant to spread purchases over.
    #[arg(long, default_value_t = 20)]
    pub stores: usize,
    /// Customers, drawn Zipf-like.
    #[arg(long, default_value_t = 100_000)]
    pub customers: u64,
    /// Take customers in turn instead (event n goes to customer n mod
    /// --customers), to bring every customer into memory: the memory and
    /// restart measurements.
    #[arg(long)]
    pub customers_in_order: bool,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Afterwards, check the jackpot's books, every customer's points,
    /// spins and wallet, and the wheel's audit against what was
    /// acknowledged (needs --setup).
    #[arg(long)]
    pub verify: bool,
    /// With --setup: no jackpot, so purchases feed only the leaderboard
    /// (the leaderboard-only scenario).
    #[arg(long)]
    pub no_jackpot: bool,
    /// The node's /metrics URL, to report the server's own figures.
    #[arg(long, value_name = "URL")]
    pub metrics: Option<String>,
    /// Spins per event sent, 0-1: after each request a client spins the
    /// wheel `w` this many times per event it carried (the fraction
    /// carried over), each for a customer one of its acknowledged
    /// purchases (from 200.00 on) or a free-spin prize gave a spin. 0: no
    /// wheel, no spins. Spins go one by one (`Spin`, or `POST
    /// .../wheels/w/spins`), in every mode, and are reported apart from
    /// the events.
    #[arg(long, value_name = "SHARE", default_value_t = 0.02, allow_negative_numbers = true, value_parser = spin_share)]
    pub spin_share: f64,
}

/// `--spin-share`: a number from 0 to 1.
fn spin_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err("must be a number from 0 to 1 (spins per event sent)".to_owned()),
    }
}

/// Points per purchase and the jackpot rule of the --setup tenant: what
/// --verify recomputes.
const POINTS_PER_UNIT_MINOR: i64 = 100;
const CONTRIBUTION_BPS: i64 = 100;
const MIN_PURCHASE_MINOR: i64 = 1_000;
const VISIT_BONUS: i64 = 5;
/// The wheel of --setup's tenant when spins are on, and what --verify
/// re-checks its audit against.
const WHEEL: &str = "w";
/// A purchase from this much on earns a spin (about one purchase in eight).
const SPIN_MIN_PURCHASE_MINOR: i64 = 20_000;
/// Spins a client holds for its customers at most; grants beyond stay
/// unspent on the customers.
const MAX_OWED_SPINS: usize = 4_096;

/// The wheel --setup makes: points, a free spin, coupons, cashback, tote
/// bags while they last, and nothing; one spin entitlement a spin.
fn wheel_def() -> WheelDef {
    let segment = |label: &str, weight, prize, stock| Segment { label: label.into(), weight, prize, stock };
    WheelDef {
        campaign: Id::parse("c").expect("a valid id"),
        cost: SpinCost::Entitlements(1),
        daily_limit: None,
        segments: vec![
            segment("50 points", 400, Prize::Points(50), None),
            segment("500 points", 60, Prize::Points(500), None),
            segment("free spin", 100, Prize::Spins(1), None),
            segment("10% off", 200, Prize::Coupon("LG".into()), None),
            segment("5.00 back", 40, Prize::CashbackMinor(500), None),
            segment("tote bag", 50, Prize::Item("tote bag".into()), Some(100)),
            segment("next time", 150, Prize::Nothing, None),
        ],
        earn: Some(SpinEarning { min_purchase_minor: SPIN_MIN_PURCHASE_MINOR, spins: 1 }),
    }
}

/// One generated event.
#[derive(Clone, Debug)]
struct Generated {
    event_id: String,
    customer: String,
    store: String,
    purchase: bool,
    amount_minor: i64,
}

impl Generated {
    fn json(&self) -> Value {
        let mut event = json!({"event_id": self.event_id, "customer": self.customer, "store": self.store,
                               "kind": if self.purchase { "purchase" } else { "visit" }});
        if self.purchase {
            event["amount_minor"] = json!(self.amount_minor);
        }
        event
    }

    fn proto(&self, tenant: &str) -> pb::RecordEventRequest {
        pb::RecordEventRequest {
            tenant: tenant.to_owned(),
            event_id: self.event_id.clone(),
            customer: self.customer.clone(),
            store: Some(self.store.clone()),
            kind: if self.purchase { "purchase" } else { "visit" }.to_owned(),
            amount_minor: self.purchase.then_some(self.amount_minor),
            at: None,
        }
    }
}

/// Latencies in microseconds: of the whole run, and of each second of it
/// (by intended send time), so that a stall shows when it happened.
struct Latencies {
    all: Histogram<u64>,
    seconds: Vec<Histogram<u64>>,
}

impl Latencies {
    fn new() -> anyhow::Result<Self> {
        Ok(Self { all: Self::histogram(3)?, seconds: Vec::new() })
    }

    fn histogram(significant_figures: u8) -> anyhow::Result<Histogram<u64>> {
        Histogram::new_with_bounds(1, 60_000_000, significant_figures).context("histogram bounds")
    }

    fn record(&mut self, since_start: Duration, micros: u64) {
        self.all.saturating_record(micros);
        let second = usize::try_from(since_start.as_secs()).unwrap_or(usize::MAX);
        while self.seconds.len() <= second {
            // Two significant figures: a few kilobytes per second of run.
            match Self::histogram(2) {
                Ok(histogram) => self.seconds.push(histogram),
                Err(_) => return,
            }
        }
        self.seconds[second].saturating_record(micros);
    }

    /// Each second's count and latencies, in milliseconds.
    fn timeline(&self) -> Vec<Value> {
        let ms = |micros: u64| micros as f64 / 1_000.0;
        self.seconds
            .iter()
            .enumerate()
            .map(|(second, h)| {
                json!({"second": second, "count": h.len(), "p50_ms": ms(h.value_at_quantile(0.5)),
                       "p99_ms": ms(h.value_at_quantile(0.99)), "max_ms": ms(h.max())})
            })
            .collect()
    }
}

/// What the clients share.
struct Shared {
    sent: AtomicU64,
    acknowledged: AtomicU64,
    next: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    latencies: Mutex<Latencies>,
    /// Per customer: what the acknowledged answers gave it (foldhash: the
    /// load generator shares the node's cores, and a SipHash of the
    /// customer's id and a copy of it for every answer were a fifth of its
    /// work under batched load).
    ledger: Mutex<crate::FastMap<String, Holdings>>,
    won_minor: AtomicU64,
    spins: Spins,
    /// When the measurement began, in milliseconds since the Unix epoch:
    /// the timeline's second 0, for lining it up with a node's log.
    started_unix_ms: bazaar_games::UnixMillis,
}

/// What the acknowledged answers say a customer holds.
#[derive(Clone, Copy, Debug, Default)]
struct Holdings {
    points: i64,
    contributed_minor: i64,
    /// Spin entitlements of [`WHEEL`]: granted and won, less those spent.
    spins: i64,
    cashback_minor: i64,
}

/// One acknowledged spin, for --verify to find in the wheel's audit.
#[derive(Clone, Debug)]
struct Spun {
    request_id: String,
    customer: String,
    draw_id: String,
    segment: String,
}

/// The spins' side of a run: counted, timed and failed apart from the
/// events, which the throughput is.
struct Spins {
    sent: AtomicU64,
    acknowledged: AtomicU64,
    /// Microseconds from send to answer.
    latencies: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    spun: Mutex<Vec<Spun>>,
}

/// A client's spins to come: customers its acknowledged answers gave a
/// spin, and the spins its events have asked for so far.
struct Owed {
    customers: VecDeque<String>,
    due: f64,
    next_id: u64,
}

#[derive(Clone)]
enum Transport {
    Grpc(Channel),
    Http(ureq::Agent, String),
}

/// `count` connections to the gRPC API at `address`, made at once: client
/// `n` sends over the `n`th modulo their number, set-up and verification
/// over the first.
async fn connect(address: &str, count: usize) -> anyhow::Result<Vec<Transport>> {
    let endpoint = Channel::from_shared(format!("http://{address}"))?;
    let channels = futures_util::future::try_join_all((0..count.max(1)).map(|_| endpoint.connect()))
        .await
        .with_context(|| format!("cannot reach the node's gRPC API at {address}"))?;
    Ok(channels.into_iter().map(Transport::Grpc).collect())
}

/// The connections `args` asks for: `--connections`, at most one per
/// client.
fn connections(args: &LoadgenArgs) -> usize {
    args.connections.clamp(1, args.clients.max(1))
}

/// A run's id, in its tenant's name (`--setup`) and every event id it
/// sends: the time, and a random part, since two runs started in the same
/// second against one tenant would otherwise send the same event ids, and
/// the second's would meet the first's idempotency records.
fn new_run_id() -> String {
    format!("{}-{:08x}", chrono::Utc::now().format("%Y%m%d%H%M%S"), rand::random::<u32>())
}

/// Runs the load; prints the table and writes the report.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.batch == 0 || 1_000 < args.batch {
        bail!("--clients must be at least 1 and --batch between 1 and 1000");
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.verify && !args.setup {
        bail!("--verify needs --setup: it recomputes what a tenant it made should hold");
    }
    let run_id = new_run_id();
    let tenant = if args.setup { format!("{}-{run_id}", args.tenant) } else { args.tenant.clone() };
    let transports = match &args.http {
        // One agent, keeping a connection alive per client: by default
        // ureq keeps one per host, and every other request in flight
        // opened a connection of its own and closed it after the answer.
        Some(url) => {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .max_idle_connections(args.clients)
                .max_idle_connections_per_host(args.clients)
                .build();
            vec![Transport::Http(agent, url.clone())]
        }
        None => connect(&args.grpc, connections(&args)).await?,
    };
    let transport = &transports[0];
    let pos_key = if args.setup { set_up(transport, &args, &tenant).await? } else { args.admin_key.clone() };

    // The server's counters before the run: the report gives what this run
    // added, not what the node did since it started.
    let before = match &args.metrics {
        Some(url) => Some(Scrape::read(url).await),
        None => None,
    };
    let progress = progress_bar(&args);
    let (shared, elapsed) = drive(&args, &transports, &tenant, &pos_key, &run_id, &progress).await?;
    progress.finish_and_clear();

    let server = match (&args.metrics, before) {
        (Some(url), Some(Ok(before))) => match Scrape::read(url).await {
            Ok(after) => after.since(&before),
            Err(error) => json!({"error": error.to_string()}),
        },
        (_, Some(Err(error))) => json!({"error": error.to_string()}),
        _ => Value::Null,
    };
    let report = report(&args, &shared, elapsed, &tenant, server).await?;
    print_table(&report);
    if args.verify {
        let verdict = verify(transport, &args, &tenant, &shared).await?;
        println!("verify: {verdict}");
    }
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(())
}

/// Runs the clients until `--duration` or `--events`: the measurement
/// itself, without set-up or report. `bazaar limits` drives a no-op server
/// with it, so Bazaar and its transport ceiling are measured by the same
/// client.
async fn drive(
    args: &LoadgenArgs,
    transports: &[Transport],
    tenant: &str,
    key: &str,
    run_id: &str,
    progress: &ProgressBar,
) -> anyhow::Result<(Arc<Shared>, Duration)> {
    let shared = Arc::new(Shared {
        sent: AtomicU64::new(0),
        acknowledged: AtomicU64::new(0),
        next: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        latencies: Mutex::new(Latencies::new()?),
        ledger: Mutex::new(crate::FastMap::default()),
        won_minor: AtomicU64::new(0),
        spins: Spins {
            sent: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            latencies: Mutex::new(Latencies::histogram(3)?),
            errors: Mutex::new(BTreeMap::new()),
            spun: Mutex::new(Vec::new()),
        },
        started_unix_ms: crate::actor::now_millis(),
    });
    let started = Instant::now();
    // Dropped on the first client's failure: the others stop with it.
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..args.clients {
        let context = Client {
            id: client,
            shared: shared.clone(),
            args: args.clone(),
            tenant: tenant.to_owned(),
            key: key.to_owned(),
            run_id: run_id.to_owned(),
            started,
        };
        clients.spawn(context.run(transports[client % transports.len()].clone()));
    }
    let ticker = {
        let (shared, progress) = (shared.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let acknowledged = shared.acknowledged.load(Ordering::Relaxed);
                progress.set_position(started.elapsed().as_secs().min(progress.length().unwrap_or(u64::MAX)));
                progress.set_message(format!(
                    "{acknowledged} acknowledged, {:.0}/s",
                    acknowledged as f64 / started.elapsed().as_secs_f64()
                ));
            }
        })
    };
    let mut outcome = Ok(());
    while let Some(client) = clients.join_next().await {
        outcome = client.context("a client task failed").and_then(|run| run);
        if outcome.is_err() {
            clients.abort_all();
            break;
        }
    }
    let elapsed = started.elapsed();
    ticker.abort();
    outcome.map(|()| (shared, elapsed))
}

/// Events per second the load generator's own gRPC client gets from the
/// server at `grpc` (unary, or streamed when `batch` is above 1), with
/// `clients` closed-loop clients for `duration`: how `bazaar limits`
/// measures the transport ceiling of a no-op server.
pub async fn ceiling(grpc: &str, clients: usize, batch: usize, duration: Duration) -> anyhow::Result<f64> {
    let args = LoadgenArgs {
        grpc: grpc.to_owned(),
        http: None,
        admin_key: String::new(),
        setup: false,
        tenant: "ceiling".into(),
        clients,
        connections: 1,
        rate: None,
        duration,
        events: None,
        batch,
        stores: 20,
        customers: 100_000,
        customers_in_order: false,
        report: None,
        verify: false,
        no_jackpot: true,
        metrics: None,
        spin_share: 0.0,
    };
    let transports = connect(grpc, connections(&args)).await?;
    let (shared, elapsed) = drive(&args, &transports, "ceiling", "", "ceiling", &ProgressBar::hidden()).await?;
    let errors = shared.errors.lock().await;
    if !errors.is_empty() {
        bail!("the no-op server answered errors: {errors:?}");
    }
    Ok(shared.acknowledged.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
}

fn progress_bar(args: &LoadgenArgs) -> ProgressBar {
    bar(args.duration.as_secs().max(1), "{spinner} {bar:40.cyan/blue} {pos}/{len}s {msg}")
}

/// A progress bar of `length` steps drawn with `template` on standard
/// error when it is a terminal, hidden otherwise (scripts, reports).
fn bar(length: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(length),
        if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

/// One client's loop.
struct Client {
    id: usize,
    shared: Arc<Shared>,
    args: LoadgenArgs,
    tenant: String,
    key: String,
    run_id: String,
    started: Instant,
}

impl Client {
    async fn run(self, transport: Transport) -> anyhow::Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.id as u64 * 7_919 + 1);
        let deadline = self.started + self.args.duration;
        let interval = self.args.rate.map(|rate| Duration::from_secs_f64(self.args.batch as f64 / f64::from(rate)));
        let mut stream = match &transport {
            Transport::Grpc(channel) if 1 < self.args.batch => Some(open_stream(channel.clone(), &self.key).await?),
            _ => None,
        };
        let mut owed = Owed { customers: VecDeque::new(), due: 0.0, next_id: 0 };
        loop {
            let slot = self.shared.next.fetch_add(1, Ordering::Relaxed);
            let first = slot * self.args.batch as u64;
            if self.args.events.is_some_and(|limit| limit <= first) {
                return Ok(());
            }
            // Open loop: each batch has an intended time; latency counts
            // from it, so queueing behind a slow answer is measured.
            let intended = match interval {
                Some(interval) => self.started + interval.mul_f64(slot as f64),
                None => Instant::now(),
            };
            if deadline <= intended || (interval.is_none() && deadline <= Instant::now()) {
                return Ok(());
            }
            if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            let count = match self.args.events {
                Some(limit) => (limit - first).min(self.args.batch as u64) as usize,
                None => self.args.batch,
            };
            let events: Vec<Generated> = (0..count).map(|n| self.generate(&mut rng, first + n as u64)).collect();
            self.shared.sent.fetch_add(events.len() as u64, Ordering::Relaxed);
            let results = match (&transport, stream.as_mut()) {
                (Transport::Grpc(_), Some(stream)) => stream.send(&self.tenant, &events).await,
                (Transport::Grpc(channel), None) => {
                    unary_grpc(channel.clone(), &self.key, &self.tenant, &events[0]).await
                }
                (Transport::Http(agent, url), _) => {
                    http(agent.clone(), url, &self.key, &self.tenant, events.clone()).await
                }
            };
            let micros = u64::try_from(intended.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
            self.shared.latencies.lock().await.record(intended - self.started, micros);
            let granted = self.account(&events, results).await;
            self.spin_owed(&transport, &mut owed, granted, events.len(), deadline).await;
        }
    }

    /// Spins what `count` more events ask for (`--spin-share` each), for
    /// customers given a spin, oldest first; `granted` joins them.
    async fn spin_owed(
        &self,
        transport: &Transport,
        owed: &mut Owed,
        granted: Vec<String>,
        count: usize,
        deadline: Instant,
    ) {
        if self.args.spin_share <= 0.0 {
            return;
        }
        for customer in granted {
            if owed.customers.len() < MAX_OWED_SPINS {
                owed.customers.push_back(customer);
            }
        }
        // What is due waits for a customer with a spin, but does not pile
        // up while there is none.
        let asked = self.args.spin_share * count as f64;
        owed.due = (owed.due + asked).min(asked + 1.0);
        while 1.0 <= owed.due && Instant::now() < deadline {
            let Some(customer) = owed.customers.pop_front() else { return };
            owed.due -= 1.0;
            let request_id = format!("lg-{}-s{}-{}", self.run_id, self.id, owed.next_id);
            owed.next_id += 1;
            let won_spins = self.spin(transport, customer.clone(), request_id).await;
            for _ in 0..won_spins {
                if owed.customers.len() < MAX_OWED_SPINS {
                    owed.customers.push_back(customer.clone());
                }
            }
        }
    }

    /// One spin of [`WHEEL`] for `customer`, counted, timed and booked;
    /// the free spins it won.
    async fn spin(&self, transport: &Transport, customer: String, request_id: String) -> u32 {
        let spins = &self.shared.spins;
        spins.sent.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let answer = match transport {
            Transport::Grpc(channel) => {
                spin_grpc(channel.clone(), &self.key, &self.tenant, &customer, &request_id).await
            }
            Transport::Http(agent, url) => {
                spin_http(agent.clone(), url, &self.key, &self.tenant, &customer, &request_id).await
            }
        };
        let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
        spins.latencies.lock().await.saturating_record(micros);
        let (draw_id, segment, prize) = match answer {
            Ok(answer) => answer,
            Err(code) => {
                *spins.errors.lock().await.entry(code).or_insert(0) += 1;
                return 0;
            }
        };
        spins.acknowledged.fetch_add(1, Ordering::Relaxed);
        let won_spins = {
            let mut ledger = self.shared.ledger.lock().await;
            let holdings = ledger.entry(customer.clone()).or_default();
            holdings.spins -= 1;
            match prize {
                WonPrize::Points(points) => holdings.points += points,
                WonPrize::CashbackMinor(minor) => holdings.cashback_minor += minor,
                WonPrize::Spins(won) => holdings.spins += i64::from(won),
                WonPrize::Coupon(_) | WonPrize::Item(_) | WonPrize::Nothing => {}
            }
            match prize {
                WonPrize::Spins(won) => won,
                _ => 0,
            }
        };
        spins.spun.lock().await.push(Spun { request_id, customer, draw_id, segment });
        won_spins
    }

    fn generate(&self, rng: &mut impl Rng, n: u64) -> Generated {
        let u: f64 = rng.gen();
        let purchase = rng.gen::<f64>() < 0.9;
        Generated {
            event_id: format!("lg-{}-{n}", self.run_id),
            customer: if self.args.customers_in_order {
                format!("c-{}", n % self.args.customers.max(1))
            } else {
                format!("c-{}", ((u * u) * self.args.customers as f64) as u64)
            },
            store: format!("s-{}", rng.gen_range(0..self.args.stores.max(1))),
            purchase,
            amount_minor: if purchase { 500 + (rng.gen::<f64>().powi(3) * 29_500.0) as i64 } else { 0 },
        }
    }

    /// Counts what was acknowledged, and what it means for --verify; the
    /// customers the answers gave a spin of [`WHEEL`], once per spin.
    async fn account(&self, events: &[Generated], results: Result<Vec<Outcome>, String>) -> Vec<String> {
        let outcomes = match results {
            Ok(outcomes) => outcomes,
            Err(code) => {
                *self.shared.errors.lock().await.entry(code).or_insert(0) += events.len() as u64;
                return Vec::new();
            }
        };
        let mut granted = Vec::new();
        let (mut acknowledged, mut won) = (0, 0);
        let mut ledger = self.shared.ledger.lock().await;
        for (event, outcome) in events.iter().zip(outcomes) {
            match outcome {
                Outcome::Acknowledged { won_minor, spins_granted } => {
                    acknowledged += 1;
                    won += u64::try_from(won_minor).unwrap_or(0);
                    // The id is copied only for a customer met first.
                    let entry = match ledger.get_mut(&event.customer) {
                        Some(entry) => entry,
                        None => ledger.entry(event.customer.clone()).or_default(),
                    };
                    if event.purchase {
                        entry.points += event.amount_minor / POINTS_PER_UNIT_MINOR;
                        if MIN_PURCHASE_MINOR <= event.amount_minor {
                            entry.contributed_minor += event.amount_minor * CONTRIBUTION_BPS / 10_000;
                        }
                    } else {
                        entry.points += VISIT_BONUS;
                    }
                    entry.spins += i64::from(spins_granted);
                    granted.extend(std::iter::repeat_n(&event.customer, spins_granted as usize).cloned());
                }
                Outcome::Error(code) => *self.shared.errors.lock().await.entry(code).or_insert(0) += 1,
            }
        }
        self.shared.acknowledged.fetch_add(acknowledged, Ordering::Relaxed);
        self.shared.won_minor.fetch_add(won, Ordering::Relaxed);
        granted
    }
}

/// What the node answered for one event.
enum Outcome {
    /// With what a jackpot paid the customer and the spins of [`WHEEL`]
    /// the event granted.
    Acknowledged {
        won_minor: i64,
        spins_granted: u32,
    },
    Error(String),
}

fn with_key<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {key}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn acknowledged(result: &pb::EventResult) -> Outcome {
    Outcome::Acknowledged {
        won_minor: result.jackpots.iter().map(|j| j.won_minor).sum(),
        spins_granted: result.spins_granted.get(WHEEL).copied().unwrap_or(0),
    }
}

/// A spin's draw id, segment and prize, or the error's code.
type SpinAnswer = Result<(String, String, WonPrize), String>;

async fn spin_grpc(channel: Channel, key: &str, tenant: &str, customer: &str, request_id: &str) -> SpinAnswer {
    use pb::won_prize::Kind;
    let mut client = pb::game_service_client::GameServiceClient::new(channel);
    let request = pb::SpinRequest {
        tenant: tenant.to_owned(),
        wheel: WHEEL.to_owned(),
        customer: customer.to_owned(),
        request_id: request_id.to_owned(),
    };
    let answer = client.spin(with_key(key, request)).await.map_err(|status| format!("grpc:{:?}", status.code()))?;
    let answer = answer.into_inner();
    let prize = match answer.prize.and_then(|prize| prize.kind) {
        Some(Kind::Points(n)) => WonPrize::Points(n),
        Some(Kind::Spins(n)) => WonPrize::Spins(n),
        Some(Kind::Coupon(code)) => WonPrize::Coupon(code),
        Some(Kind::CashbackMinor(n)) => WonPrize::CashbackMinor(n),
        Some(Kind::Item(name)) => WonPrize::Item(name),
        Some(Kind::Nothing(_)) => WonPrize::Nothing,
        None => return Err("grpc:no_prize".to_owned()),
    };
    Ok((answer.draw_id, answer.segment, prize))
}

async fn spin_http(
    agent: ureq::Agent,
    url: &str,
    key: &str,
    tenant: &str,
    customer: &str,
    request_id: &str,
) -> SpinAnswer {
    let url = format!("{url}/v1/tenants/{tenant}/wheels/{WHEEL}/spins");
    let (key, body) = (key.to_owned(), json!({"customer": customer, "request_id": request_id}));
    tokio::task::spawn_blocking(move || {
        let answer: crate::api::SpinAnswer =
            match agent.post(&url).set("Authorization", &format!("Bearer {key}")).send_json(body) {
                Ok(response) => response.into_json().map_err(|e| format!("http:{}", e.kind()))?,
                Err(ureq::Error::Status(status, _)) => return Err(format!("http:{status}")),
                Err(error) => return Err(format!("http:{}", error.kind())),
            };
        Ok((answer.draw_id, answer.segment, answer.prize))
    })
    .await
    .map_err(|_| "client:panicked".to_owned())?
}

async fn unary_grpc(channel: Channel, key: &str, tenant: &str, event: &Generated) -> Result<Vec<Outcome>, String> {
    let mut client = pb::event_service_client::EventServiceClient::new(channel);
    match client.record_event(with_key(key, event.proto(tenant))).await {
        Ok(answer) => Ok(vec![acknowledged(answer.get_ref())]),
        Err(status) => Ok(vec![Outcome::Error(format!("grpc:{:?}", status.code()))]),
    }
}

/// One client's bidirectional event stream.
struct EventStream {
    requests: tokio::sync::mpsc::Sender<pb::RecordEventRequest>,
    answers: tonic::Streaming<pb::EventOutcome>,
}

async fn open_stream(channel: Channel, key: &str) -> anyhow::Result<EventStream> {
    let (requests, receiver) = tokio::sync::mpsc::channel(1_024);
    let mut client = pb::event_service_client::EventServiceClient::new(channel);
    let answers = client
        .stream_events(with_key(key, tokio_stream::wrappers::ReceiverStream::new(receiver)))
        .await
        .context("opening the event stream")?
        .into_inner();
    Ok(EventStream { requests, answers })
}

impl EventStream {
    async fn send(&mut self, tenant: &str, events: &[Generated]) -> Result<Vec<Outcome>, String> {
        for event in events {
            self.requests.send(event.proto(tenant)).await.map_err(|_| "stream:closed".to_owned())?;
        }
        let mut outcomes = Vec::with_capacity(events.len());
        for _ in events {
            match self.answers.message().await {
                Ok(Some(pb::EventOutcome { outcome: Some(pb::event_outcome::Outcome::Result(result)) })) => {
                    outcomes.push(acknowledged(&result))
                }
                Ok(Some(pb::EventOutcome { outcome: Some(pb::event_outcome::Outcome::Error(error)) })) => {
                    outcomes.push(Outcome::Error(error.code))
                }
                Ok(_) => return Err("stream:ended".to_owned()),
                Err(status) => return Err(format!("grpc:{:?}", status.code())),
            }
        }
        Ok(outcomes)
    }
}

async fn http(
    agent: ureq::Agent,
    url: &str,
    key: &str,
    tenant: &str,
    events: Vec<Generated>,
) -> Result<Vec<Outcome>, String> {
    let (url, key, tenant) = (url.to_owned(), key.to_owned(), tenant.to_owned());
    tokio::task::spawn_blocking(move || {
        let batch = 1 < events.len();
        let path = if batch { "events/batch" } else { "events" };
        let body = if batch {
            json!({"events": events.iter().map(Generated::json).collect::<Vec<_>>()})
        } else {
            events[0].json()
        };
        let response = agent
            .post(&format!("{url}/v1/tenants/{tenant}/{path}"))
            .set("Authorization", &format!("Bearer {key}"))
            .send_json(body);
        let answer: Value = match response {
            Ok(response) => response.into_json().map_err(|e| format!("http:{}", e.kind()))?,
            Err(ureq::Error::Status(status, _)) => return Err(format!("http:{status}")),
            Err(error) => return Err(format!("http:{}", error.kind())),
        };
        let outcome = |answer: &Value| match answer.get("error") {
            Some(error) => Outcome::Error(error["code"].as_str().unwrap_or("unknown").to_owned()),
            None => Outcome::Acknowledged {
                won_minor: answer["jackpots"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|j| j["won_minor"].as_i64())
                    .sum(),
                spins_granted: answer["spins_granted"][WHEEL].as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
            },
        };
        Ok(if batch {
            answer["results"].as_array().into_iter().flatten().map(outcome).collect()
        } else {
            vec![outcome(&answer)]
        })
    })
    .await
    .map_err(|_| "client:panicked".to_owned())?
}

/// Creates the tenant the load goes to; returns a pos key.
async fn set_up(transport: &Transport, args: &LoadgenArgs, tenant: &str) -> anyhow::Result<String> {
    let admin = args.admin_key.as_str();
    let campaign = json!({"name": "Load", "starts_at": "2020-01-01T00:00:00Z", "ends_at": "2099-01-01T00:00:00Z",
                          "earning": {"points_per_unit_minor": POINTS_PER_UNIT_MINOR, "event_bonus": {"visit": VISIT_BONUS}}});
    let jackpot = (!args.no_jackpot).then(|| {
        json!({"campaign": "c", "seed_minor": 100_000, "cap_minor": 5_000_000, "contribution_bps": CONTRIBUTION_BPS,
               "reserve_bps": 2_000, "min_purchase_minor": MIN_PURCHASE_MINOR})
    });
    let wheel = (0.0 < args.spin_share).then(wheel_def);
    match transport {
        Transport::Http(agent, url) => {
            let agent = agent.clone();
            let wheel = wheel.map(serde_json::to_value).transpose()?;
            let (url, tenant, admin, stores) = (url.clone(), tenant.to_owned(), admin.to_owned(), args.stores);
            tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
                let call = |method: &str, path: &str, body: Value| -> anyhow::Result<Value> {
                    agent
                        .request(method, &format!("{url}{path}"))
                        .set("Authorization", &format!("Bearer {admin}"))
                        .send_json(body)
                        .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))?
                        .into_json()
                        .map_err(Into::into)
                };
                call("POST", "/v1/tenants", json!({"id": tenant, "name": "Load test", "currency": "EUR"}))?;
                let base = format!("/v1/tenants/{tenant}");
                for store in 0..stores {
                    call(
                        "PUT",
                        &format!("{base}/stores/s-{store}"),
                        json!({"name": format!("Shop {store}"), "category": "retail"}),
                    )?;
                }
                call("PUT", &format!("{base}/campaigns/c"), campaign)?;
                if let Some(jackpot) = jackpot {
                    call("PUT", &format!("{base}/jackpots/j"), jackpot)?;
                }
                if let Some(wheel) = wheel {
                    call("PUT", &format!("{base}/wheels/{WHEEL}"), wheel)?;
                }
                call("PUT", &format!("{base}/leaderboards/l"), json!({"campaign": "c", "metric": "spend"}))?;
                let key = call("POST", &format!("{base}/keys"), json!({"role": "pos"}))?;
                Ok(key["key"].as_str().unwrap_or_default().to_owned())
            })
            .await?
        }
        Transport::Grpc(channel) => {
            let mut tenants = pb::tenant_service_client::TenantServiceClient::new(channel.clone());
            let mut catalog = pb::catalog_service_client::CatalogServiceClient::new(channel.clone());
            let t = tenant.to_owned();
            tenants
                .create_tenant(with_key(
                    admin,
                    pb::CreateTenantRequest { id: t.clone(), name: "Load test".into(), currency: "EUR".into() },
                ))
                .await?;
            for store in 0..args.stores {
                catalog
                    .put_store(with_key(
                        admin,
                        pb::PutStoreRequest {
                            tenant: t.clone(),
                            store: format!("s-{store}"),
                            name: format!("Shop {store}"),
                            category: "retail".into(),
                        },
                    ))
                    .await?;
            }
            catalog
                .put_campaign(with_key(
                    admin,
                    pb::PutCampaignRequest {
                        tenant: t.clone(),
                        campaign: "c".into(),
                        name: "Load".into(),
                        starts_at: campaign["starts_at"].as_str().unwrap_or_default().into(),
                        ends_at: campaign["ends_at"].as_str().unwrap_or_default().into(),
                        stores: None,
                        earning: Some(pb::Earning {
                            points_per_unit_minor: POINTS_PER_UNIT_MINOR,
                            event_bonus: [("visit".to_owned(), VISIT_BONUS)].into_iter().collect(),
                            ..pb::Earning::default()
                        }),
                        tiers: Vec::new(),
                    },
                ))
                .await?;
            if !args.no_jackpot {
                catalog
                    .put_jackpot(with_key(
                        admin,
                        pb::PutJackpotRequest {
                            tenant: t.clone(),
                            jackpot: "j".into(),
                            campaign: "c".into(),
                            seed_minor: 100_000,
                            cap_minor: 5_000_000,
                            contribution_bps: CONTRIBUTION_BPS as u32,
                            reserve_bps: 2_000,
                            min_purchase_minor: MIN_PURCHASE_MINOR,
                        },
                    ))
                    .await?;
            }
            if let Some(wheel) = wheel {
                catalog.put_wheel(with_key(admin, wheel_request(&t, wheel))).await?;
            }
            catalog
                .put_leaderboard(with_key(
                    admin,
                    pb::PutLeaderboardRequest {
                        tenant: t.clone(),
                        leaderboard: "l".into(),
                        campaign: "c".into(),
                        metric: pb::Metric::Spend.into(),
                        top_size: 10,
                    },
                ))
                .await?;
            let key =
                tenants.create_key(with_key(admin, pb::CreateKeyRequest { tenant: t, role: "pos".into() })).await?;
            Ok(key.into_inner().key)
        }
    }
}

/// `wheel` as the gRPC API takes it.
fn wheel_request(tenant: &str, wheel: WheelDef) -> pb::PutWheelRequest {
    use pb::prize::Kind;
    pb::PutWheelRequest {
        tenant: tenant.to_owned(),
        wheel: WHEEL.to_owned(),
        campaign: wheel.campaign.to_string(),
        cost: Some(match wheel.cost {
            SpinCost::Entitlements(n) => pb::put_wheel_request::Cost::CostEntitlements(n),
            SpinCost::Points(n) => pb::put_wheel_request::Cost::CostPoints(n),
        }),
        daily_limit: wheel.daily_limit,
        segments: wheel
            .segments
            .into_iter()
            .map(|segment| pb::Segment {
                label: segment.label,
                weight: segment.weight,
                prize: Some(pb::Prize {
                    kind: Some(match segment.prize {
                        Prize::Points(n) => Kind::Points(n),
                        Prize::Spins(n) => Kind::Spins(n),
                        Prize::Coupon(prefix) => Kind::Coupon(prefix),
                        Prize::CashbackMinor(n) => Kind::CashbackMinor(n),
                        Prize::Item(name) => Kind::Item(name),
                        Prize::Nothing => Kind::Nothing(true),
                    }),
                }),
                stock: segment.stock,
            })
            .collect(),
        earn: wheel.earn.map(|earn| pb::SpinEarning { min_purchase_minor: earn.min_purchase_minor, spins: earn.spins }),
    }
}

async fn report(
    args: &LoadgenArgs,
    shared: &Shared,
    elapsed: Duration,
    tenant: &str,
    server: Value,
) -> anyhow::Result<Value> {
    let timed = shared.latencies.lock().await;
    let latencies = &timed.all;
    let ms = |quantile: f64| latencies.value_at_quantile(quantile) as f64 / 1_000.0;
    let acknowledged = shared.acknowledged.load(Ordering::Relaxed);
    Ok(json!({
        "transport": if args.http.is_some() { "http" } else { "grpc" },
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "clients": args.clients,
        "connections": if args.http.is_some() { Value::Null } else { connections(args).into() },
        "rate": args.rate,
        "batch": args.batch,
        "tenant": tenant,
        "seconds": elapsed.as_secs_f64(),
        "sent": shared.sent.load(Ordering::Relaxed),
        "acknowledged": acknowledged,
        "throughput_per_s": acknowledged as f64 / elapsed.as_secs_f64(),
        "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": latencies.max() as f64 / 1_000.0},
        "latency_per": if 1 < args.batch { "batch" } else { "event" },
        "errors": *shared.errors.lock().await,
        "spins": spins_report(args, &shared.spins, elapsed).await,
        "server": server,
        "timeline": timed.timeline(),
        "started_unix_ms": shared.started_unix_ms,
    }))
}

/// The spins' part of the report; null when spins were off.
async fn spins_report(args: &LoadgenArgs, spins: &Spins, elapsed: Duration) -> Value {
    if args.spin_share <= 0.0 {
        return Value::Null;
    }
    let latencies = spins.latencies.lock().await;
    let ms = |micros: u64| micros as f64 / 1_000.0;
    let acknowledged = spins.acknowledged.load(Ordering::Relaxed);
    json!({
        "per_event": args.spin_share,
        "sent": spins.sent.load(Ordering::Relaxed),
        "acknowledged": acknowledged,
        "per_s": acknowledged as f64 / elapsed.as_secs_f64(),
        "latency_ms": {"p50": ms(latencies.value_at_quantile(0.5)), "p90": ms(latencies.value_at_quantile(0.9)),
                       "p99": ms(latencies.value_at_quantile(0.99)), "p999": ms(latencies.value_at_quantile(0.999)),
                       "max": ms(latencies.max())},
        "errors": *spins.errors.lock().await,
    })
}

/// The counters of the node's /metrics that the report uses.
#[derive(Default)]
struct Scrape {
    ingested: f64,
    flushes: f64,
    entries: f64,
    flush_seconds: f64,
    /// Unary batches and the events in them.
    unary_batches: f64,
    unary_batched: f64,
    outbox_backlog: f64,
    /// Bytes of journal records, and of the idempotency index's runs.
    journal_bytes: f64,
    seen_run_bytes: f64,
    /// Per gRPC method: seconds and calls.
    grpc: BTreeMap<String, (f64, f64)>,
}

impl Scrape {
    async fn read(url: &str) -> anyhow::Result<Self> {
        let url = url.to_owned();
        let text =
            tokio::task::spawn_blocking(move || ureq::get(&url).call()?.into_string().map_err(anyhow::Error::from))
                .await??;
        let mut scrape = Scrape::default();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            match name {
                "bazaar_events_ingested_total" => scrape.ingested += value,
                "bazaar_journal_batch_entries_count" => scrape.flushes += value,
                "bazaar_journal_batch_entries_sum" => scrape.entries += value,
                "bazaar_journal_flush_seconds_sum" => scrape.flush_seconds += value,
                "bazaar_unary_batch_events_count" => scrape.unary_batches += value,
                "bazaar_unary_batch_events_sum" => scrape.unary_batched += value,
                "bazaar_outbox_backlog" => scrape.outbox_backlog += value,
                "bazaar_journal_bytes_total" => scrape.journal_bytes += value,
                "bazaar_seen_run_bytes_total" => scrape.seen_run_bytes += value,
                "bazaar_grpc_request_duration_seconds_sum" | "bazaar_grpc_request_duration_seconds_count" => {
                    let method = labels.split("method=\"").nth(1).and_then(|m| m.split('"').next()).unwrap_or("?");
                    let figures = scrape.grpc.entry(method.to_owned()).or_default();
                    if name.ends_with("_sum") {
                        figures.0 += value;
                    } else {
                        figures.1 += value;
                    }
                }
                _ => {}
            }
        }
        Ok(scrape)
    }

    /// The server's own figures for what happened between `before` and
    /// this scrape.
    fn since(&self, before: &Scrape) -> Value {
        let ratio = |total: f64, count: f64| if 0.0 < count { total / count } else { 0.0 };
        let flushes = self.flushes - before.flushes;
        let unary_batches = self.unary_batches - before.unary_batches;
        let per_flush = |total: f64| ratio(total, flushes);
        let grpc_mean_ms: serde_json::Map<String, Value> = self
            .grpc
            .iter()
            .filter_map(|(method, (seconds, calls))| {
                let (seconds_before, calls_before) = before.grpc.get(method).copied().unwrap_or_default();
                let calls = calls - calls_before;
                (0.0 < calls).then(|| (method.clone(), json!(1_000.0 * (seconds - seconds_before) / calls)))
            })
            .collect();
        let ingested = self.ingested - before.ingested;
        json!({
            "events_ingested": ingested,
            // Runs are written every 131,072 records and merged four at a
            // time: over a short run this moves in steps.
            "journal_bytes_per_event": ratio(self.journal_bytes - before.journal_bytes, ingested),
            "seen_run_bytes_per_event": ratio(self.seen_run_bytes - before.seen_run_bytes, ingested),
            "journal_flushes": flushes,
            "entries_per_flush": per_flush(self.entries - before.entries),
            "mean_flush_ms": 1_000.0 * per_flush(self.flush_seconds - before.flush_seconds),
            "unary_batches": unary_batches,
            "events_per_unary_batch": ratio(self.unary_batched - before.unary_batched, unary_batches),
            "grpc_mean_ms": grpc_mean_ms,
            "outbox_backlog": self.outbox_backlog,
        })
    }
}

fn print_table(report: &Value) {
    let latency = &report["latency_ms"];
    let connections = match report["connections"].as_u64() {
        Some(1) => ", 1 connection".to_owned(),
        Some(n) => format!(", {n} connections"),
        None => String::new(),
    };
    println!(
        "{:<22} {} ({}, {} clients{connections}, batch {})",
        "transport",
        report["transport"].as_str().unwrap_or("?"),
        report["mode"].as_str().unwrap_or("?"),
        report["clients"],
        report["batch"]
    );
    println!("{:<22} {} / {}", "sent / acknowledged", report["sent"], report["acknowledged"]);
    println!("{:<22} {:.0}", "events per second", report["throughput_per_s"].as_f64().unwrap_or(0.0));
    println!(
        "{:<22} p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        format!("latency ms (per {})", report["latency_per"].as_str().unwrap_or("event")),
        latency["p50"].as_f64().unwrap_or(0.0),
        latency["p90"].as_f64().unwrap_or(0.0),
        latency["p99"].as_f64().unwrap_or(0.0),
        latency["p999"].as_f64().unwrap_or(0.0),
        latency["max"].as_f64().unwrap_or(0.0)
    );
    let worst = report["timeline"].as_array().and_then(|seconds| {
        seconds
            .iter()
            .max_by(|a, b| a["p99_ms"].as_f64().unwrap_or(0.0).total_cmp(&b["p99_ms"].as_f64().unwrap_or(0.0)))
    });
    if let Some(worst) = worst {
        println!(
            "{:<22} second {}: p99 {:.2}  max {:.2} (every second's figures: the report's timeline)",
            "worst second",
            worst["second"],
            worst["p99_ms"].as_f64().unwrap_or(0.0),
            worst["max_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!("{:<22} {}", "errors", report["errors"]);
    let spins = &report["spins"];
    if !spins.is_null() {
        let ms = |quantile: &str| spins["latency_ms"][quantile].as_f64().unwrap_or(0.0);
        println!(
            "{:<22} {} / {} ({:.0}/s), latency ms p50 {:.2}  p99 {:.2}  max {:.2}, errors {}",
            "spins sent / ack.",
            spins["sent"],
            spins["acknowledged"],
            spins["per_s"].as_f64().unwrap_or(0.0),
            ms("p50"),
            ms("p99"),
            ms("max"),
            spins["errors"]
        );
    }
    if !report["server"].is_null() {
        println!("{:<22} {}", "server", report["server"]);
    }
}

/// A customer as the node shows it, in what --verify compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shown {
    points: i64,
    spins: i64,
    cashback_minor: i64,
}

impl Shown {
    fn expected(holdings: &Holdings) -> Self {
        Self { points: holdings.points, spins: holdings.spins, cashback_minor: holdings.cashback_minor }
    }
}

/// What --verify reads back from the node: the jackpot (null without
/// one), every customer the run touched, in the order asked, and the
/// wheel's audit records (empty when nothing was spun).
struct ReadBack {
    jackpot: Value,
    customers: Vec<Shown>,
    audit: Vec<Value>,
}

/// Audit records asked for at a time.
const AUDIT_PAGE: u32 = 1_000;
/// Customers read back at once by --verify.
const VERIFY_CONCURRENCY: usize = 32;

async fn read_back(
    transport: &Transport,
    args: &LoadgenArgs,
    tenant: &str,
    customers: Vec<String>,
    spun: bool,
) -> anyhow::Result<ReadBack> {
    let admin = args.admin_key.clone();
    let progress = bar(customers.len() as u64, "verifying {bar:40.cyan/blue} {pos}/{len} customers");
    let read = match transport {
        Transport::Http(agent, url) => {
            let get = {
                let (agent, url, tenant, admin) = (agent.clone(), url.clone(), tenant.to_owned(), admin.clone());
                move |path: String| {
                    let (agent, url, tenant, admin) = (agent.clone(), url.clone(), tenant.clone(), admin.clone());
                    async move {
                        tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
                            let url = format!("{url}/v1/tenants/{tenant}/{path}");
                            let answer = agent.get(&url).set("Authorization", &format!("Bearer {admin}")).call();
                            Ok(answer.with_context(|| format!("GET {url}"))?.into_json()?)
                        })
                        .await?
                    }
                }
            };
            let jackpot = if args.no_jackpot { Value::Null } else { get("jackpots/j".to_owned()).await? };
            let shown = read_customers(customers, &progress, |customer| {
                let get = get.clone();
                async move {
                    let v = get(format!("customers/{customer}")).await?;
                    Ok(Shown {
                        points: v["points_balance"].as_i64().unwrap_or(i64::MIN),
                        spins: v["spins"][WHEEL].as_i64().unwrap_or(0),
                        cashback_minor: v["wallet_minor"].as_i64().unwrap_or(i64::MIN),
                    })
                }
            })
            .await?;
            let audit = read_audit(spun, |after| {
                let page = get(format!("audit/wheels/{WHEEL}?after={after}&limit={AUDIT_PAGE}"));
                async move { Ok(page.await?["records"].as_array().cloned().unwrap_or_default()) }
            })
            .await?;
            ReadBack { jackpot, customers: shown, audit }
        }
        Transport::Grpc(channel) => {
            let mut games = pb::game_service_client::GameServiceClient::new(channel.clone());
            let jackpot = if args.no_jackpot {
                Value::Null
            } else {
                let j = games
                    .get_jackpot(with_key(&admin, pb::GetJackpotRequest { tenant: tenant.into(), jackpot: "j".into() }))
                    .await?
                    .into_inner();
                let books = j.books.unwrap_or_default();
                json!({"pool_minor": j.pool_minor, "reserve_minor": j.reserve_minor,
                    "books": {"seeded_minor": books.seeded_minor, "contributed_minor": books.contributed_minor, "paid_minor": books.paid_minor}})
            };
            let shown = read_customers(customers, &progress, |customer| {
                let mut service = pb::customer_service_client::CustomerServiceClient::new(channel.clone());
                let request = with_key(&admin, pb::GetCustomerRequest { tenant: tenant.into(), customer });
                async move {
                    let view = service.get_customer(request).await?.into_inner();
                    Ok(Shown {
                        points: view.points_balance,
                        spins: view.spins.get(WHEEL).copied().map_or(0, i64::from),
                        cashback_minor: view.wallet_minor,
                    })
                }
            })
            .await?;
            let audit = read_audit(spun, |after| {
                let mut games = games.clone();
                let request = pb::GetAuditRequest {
                    tenant: tenant.into(),
                    kind: "wheels".into(),
                    id: WHEEL.into(),
                    after,
                    limit: AUDIT_PAGE,
                };
                let request = with_key(&admin, request);
                async move {
                    let page = games.get_audit(request).await?.into_inner();
                    page.records
                        .iter()
                        .map(|record| serde_json::from_str(record).context("an audit record is JSON"))
                        .collect()
                }
            })
            .await?;
            ReadBack { jackpot, customers: shown, audit }
        }
    };
    progress.finish_and_clear();
    Ok(read)
}

/// Every customer in `customers`, read with `read` (one call each),
/// [`VERIFY_CONCURRENCY`] at a time, in their order.
async fn read_customers<F, R>(customers: Vec<String>, progress: &ProgressBar, read: F) -> anyhow::Result<Vec<Shown>>
where
    F: Fn(String) -> R,
    R: Future<Output = anyhow::Result<Shown>>,
{
    use futures_util::{StreamExt as _, TryStreamExt as _};
    futures_util::stream::iter(customers)
        .map(|customer| {
            let shown = read(customer);
            async move {
                let shown = shown.await?;
                progress.inc(1);
                Ok(shown)
            }
        })
        .buffered(VERIFY_CONCURRENCY)
        .try_collect()
        .await
}

/// The wheel's audit records (none unless `spun`), a page at a time
/// (`read(after)`, the records after the `after`th draw) until one comes
/// back empty.
async fn read_audit<F, R>(spun: bool, read: F) -> anyhow::Result<Vec<Value>>
where
    F: Fn(u32) -> R,
    R: Future<Output = anyhow::Result<Vec<Value>>>,
{
    let mut audit = Vec::new();
    if !spun {
        return Ok(audit);
    }
    loop {
        let page = read(u32::try_from(audit.len()).context("audit records")?).await?;
        if page.is_empty() {
            return Ok(audit);
        }
        audit.extend(page);
    }
}

/// Re-checks the wheel's audit against its definition and the spins
/// acknowledged: each draw's roll lands on the segment it names, within
/// the weights the definition allowed given what the wheel had given
/// before it (the domain's own rule, `WheelState::available_weights`: a
/// segment at zero once, and only once, its stock was given); every acknowledged spin is there, once, with its
/// request, customer and segment; and, when no spin failed, nothing else
/// is. The problems found, at most a few of each kind.
fn check_audit(def: &WheelDef, records: &[Value], spun: &[Spun], spins_failed: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let mut draws: HashMap<&str, &Value> = HashMap::new();
    // What the wheel had given before each draw: the weights it may draw
    // with follow from it (a segment out of stock weighs nothing).
    let mut given = bazaar_games::wheel::WheelState::default();
    for record in records {
        let draw = &record["draw"];
        let id = draw["draw_id"].as_str().unwrap_or_default();
        let weights: Vec<u64> =
            draw["available_weights"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
        let (roll, total) = (draw["roll"].as_u64().unwrap_or(u64::MAX), draw["total_weight"].as_u64().unwrap_or(0));
        let index = draw["segment_index"].as_u64().and_then(|i| usize::try_from(i).ok()).unwrap_or(usize::MAX);
        let label = draw["label"].as_str().unwrap_or_default();
        let lands = weights == given.available_weights(def)
            && weights.iter().sum::<u64>() == total
            && roll < total
            && bazaar_games::wheel::pick(&weights, roll) == index
            && def.segments[index].label == label;
        if !lands && problems.len() < 10 {
            problems.push(format!("draw {id} does not re-check against the wheel's weights: {record}"));
        }
        *given.awarded.entry(label.to_owned()).or_insert(0) += 1;
        if draws.insert(id, record).is_some() && problems.len() < 10 {
            problems.push(format!("draw {id} is audited twice"));
        }
    }
    for segment in &def.segments {
        let won = given.awarded.get(&segment.label).copied().unwrap_or(0);
        if segment.stock.is_some_and(|stock| stock < won) {
            problems.push(format!("{} was won {won} times, over its stock of {:?}", segment.label, segment.stock));
        }
    }
    let mut missing = 0;
    for spin in spun {
        let matches = draws.get(spin.draw_id.as_str()).is_some_and(|record| {
            record["request_id"] == spin.request_id.as_str()
                && record["customer"] == spin.customer.as_str()
                && record["draw"]["label"] == spin.segment.as_str()
        });
        if !matches {
            missing += 1;
            if missing <= 5 {
                problems.push(format!("the acknowledged spin {spin:?} is not in the audit as answered"));
            }
        }
    }
    if !spins_failed && records.len() != spun.len() {
        problems.push(format!("{} draws audited for {} spins acknowledged", records.len(), spun.len()));
    }
    problems
}

/// Checks the jackpot's books, every customer the run touched (points,
/// spins, wallet, and the points in all) and the wheel's audit against
/// what was acknowledged.
async fn verify(transport: &Transport, args: &LoadgenArgs, tenant: &str, shared: &Shared) -> anyhow::Result<String> {
    let ledger = shared.ledger.lock().await.clone();
    let spun = shared.spins.spun.lock().await.clone();
    let spins_failed = !shared.spins.errors.lock().await.is_empty();
    let contributed: i64 = ledger.values().map(|h| h.contributed_minor).sum();
    let won = i64::try_from(shared.won_minor.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
    // Every customer the run touched, in a fixed order.
    let mut expected: Vec<(String, Holdings)> = ledger.into_iter().collect();
    expected.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let customers = expected.iter().map(|(c, _)| c.clone()).collect();
    let read = read_back(transport, args, tenant, customers, !spun.is_empty()).await?;
    let jackpot = &read.jackpot;
    let n = |v: &Value| v.as_i64().unwrap_or(i64::MIN);
    let books = &jackpot["books"];
    // Summed as i128: a field missing (i64::MIN), or absurd, must make the
    // books not balance, not overflow.
    let wide = |v: &Value| i128::from(n(v));
    let balanced = wide(&books["seeded_minor"]) + wide(&books["contributed_minor"])
        == wide(&jackpot["pool_minor"]) + wide(&jackpot["reserve_minor"]) + wide(&books["paid_minor"]);
    let mut problems = Vec::new();
    if args.no_jackpot {
        // No jackpot: only the customers (and the wheel) are checked.
    } else if !balanced {
        problems.push(format!("the jackpot's books do not balance: {jackpot}"));
    }
    if !args.no_jackpot && n(&books["contributed_minor"]) != contributed {
        problems.push(format!(
            "contributed {} but acknowledged contributions sum to {contributed}",
            books["contributed_minor"]
        ));
    }
    if !args.no_jackpot && n(&books["paid_minor"]) != won {
        problems.push(format!("paid {} but acknowledged wins sum to {won}", books["paid_minor"]));
    }
    let mut wrong = 0;
    for ((customer, holdings), shown) in expected.iter().zip(&read.customers) {
        let expected = Shown::expected(holdings);
        if expected != *shown {
            wrong += 1;
            if wrong <= 10 {
                problems
                    .push(format!("{customer} holds {shown:?}, its acknowledged events and spins gave {expected:?}"));
            }
        }
    }
    if 10 < wrong {
        problems.push(format!("... {wrong} customers in all hold other than their acknowledged answers gave"));
    }
    // i128: a customer whose answer lacked its points reads as i64::MIN.
    let points: i128 = read.customers.iter().map(|shown| i128::from(shown.points)).sum();
    let expected_points: i128 = expected.iter().map(|(_, holdings)| i128::from(holdings.points)).sum();
    if points != expected_points {
        problems.push(format!(
            "the customers hold {points} points in all, their acknowledged answers gave {expected_points}"
        ));
    }
    if !spun.is_empty() {
        problems.extend(check_audit(&wheel_def(), &read.audit, &spun, spins_failed));
    }
    if problems.is_empty() {
        let spins = match spun.len() {
            0 => String::new(),
            spins => format!(", {spins} spins' draws re-checked in the audit"),
        };
        let books = match args.no_jackpot {
            true => "no jackpot".to_owned(),
            false => format!(
                "the jackpot's books balance, contributions {contributed} and wins {won} match what was acknowledged"
            ),
        };
        Ok(format!(
            "ok: {books}; all {} customers' points ({points} in all), spins and wallets match{spins}",
            expected.len()
        ))
    } else {
        bail!("verification failed:\n  {}", problems.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws of [`wheel_def`] as the node audits them, each with the spin
    /// acknowledged for it.
    fn audited(count: u64) -> (Vec<Value>, Vec<Spun>) {
        let def = wheel_def();
        let wheel = Id::parse(WHEEL).expect("an id");
        let mut state = bazaar_games::wheel::WheelState::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (mut records, mut spun) = (Vec::new(), Vec::new());
        for n in 0..count {
            let draw = state.draw(&wheel, &def, &mut rng).expect("a prize left");
            let (request_id, customer) = (format!("r-{n}"), format!("c-{}", n % 7));
            spun.push(Spun {
                request_id: request_id.clone(),
                customer: customer.clone(),
                draw_id: draw.draw_id.clone(),
                segment: draw.label.clone(),
            });
            records.push(json!({"kind": "wheel_draw", "wheel": WHEEL, "customer": customer,
                                "request_id": request_id, "at": 0, "draw": draw}));
        }
        (records, spun)
    }

    #[test]
    fn the_wheel_setup_makes_is_valid_and_earned_by_about_one_purchase_in_eight() {
        let def = wheel_def();
        def.validate().expect("a valid wheel");
        // Amounts are 500 + u^3 x 29,500 for a uniform u.
        let u = ((SPIN_MIN_PURCHASE_MINOR - 500) as f64 / 29_500.0).cbrt();
        assert!((0.10..0.15).contains(&(1.0 - u)), "{}", 1.0 - u);
    }

    #[test]
    fn an_honest_audit_re_checks_even_once_the_tote_bags_are_gone() {
        let (records, spun) = audited(3_000);
        let bags = spun.iter().filter(|s| s.segment == "tote bag").count();
        assert_eq!(bags, 100, "the stock ran out during the draws");
        assert_eq!(check_audit(&wheel_def(), &records, &spun, false), Vec::<String>::new());
    }

    #[test]
    fn a_tampered_missing_or_extra_draw_fails_the_audit() {
        let def = wheel_def();
        let (records, spun) = audited(200);
        // A roll that lands elsewhere than the segment recorded.
        let mut tampered = records.clone();
        let draw = &mut tampered[17]["draw"];
        let index = draw["segment_index"].as_u64().expect("an index");
        draw["segment_index"] = json!((index + 1) % def.segments.len() as u64);
        let problems = check_audit(&def, &tampered, &spun, false);
        assert!(problems.iter().any(|p| p.contains("does not re-check")), "{problems:?}");
        // A weight the definition does not give.
        let mut tampered = records.clone();
        tampered[3]["draw"]["available_weights"][0] = json!(1);
        assert!(!check_audit(&def, &tampered, &spun, false).is_empty());
        // A segment out of stock before its stock was given (the roll still
        // landing where it did, the total adjusted).
        let mut tampered = records.clone();
        let early = tampered.iter().position(|r| r["draw"]["segment_index"].as_u64() < Some(5)).expect("a draw");
        let draw = &mut tampered[early]["draw"];
        draw["available_weights"][5] = json!(0);
        draw["total_weight"] = json!(draw["total_weight"].as_u64().expect("a total") - 50);
        let problems = check_audit(&def, &tampered, &spun, false);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("does not re-check"), "{problems:?}");
        // An acknowledged spin missing from the audit.
        let problems = check_audit(&def, &records[..199], &spun, false);
        assert!(problems.iter().any(|p| p.contains("not in the audit")), "{problems:?}");
        // A spin answered with another segment than the one audited.
        let mut answered = spun.clone();
        answered[9].segment = "something else".into();
        let problems = check_audit(&def, &records, &answered, false);
        assert!(problems.iter().any(|p| p.contains("not in the audit")), "{problems:?}");
        // A draw no acknowledged spin accounts for, unless a spin failed.
        let problems = check_audit(&def, &records, &spun[..199], false);
        assert!(problems.iter().any(|p| p.contains("200 draws audited for 199")), "{problems:?}");
        assert_eq!(check_audit(&def, &records, &spun[..199], true), Vec::<String>::new());
    }

    #[test]
    fn runs_started_in_the_same_second_send_different_event_ids() {
        let ids: std::collections::HashSet<String> = (0..100).map(|_| new_run_id()).collect();
        assert_eq!(ids.len(), 100, "{ids:?}");
        let tenant = format!("loadgen-{}", ids.iter().next().expect("an id"));
        assert!(bazaar_games::Id::parse(&tenant).is_ok(), "a tenant id: {tenant}");
    }
}

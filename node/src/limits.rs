//! `bazaar limits`: this machine's ceilings, measured now, so every Bazaar
//! figure can be reported as a ratio to them (absolute numbers on a shared
//! machine move from run to run).
//!
//! - the disk's fsync rate (4 KiB write + fdatasync, back to back);
//! - journal group commit: `group` entries of ~300 bytes per commit,
//!   appended to a segment file and synced as the journal writer does
//!   ([`crate::wal::Appender`]);
//! - sled group commit for the same pattern, as the journal was written
//!   before the segment files: values of at most 7 KiB, flushed as the node
//!   flushes sled ([`crate::storage::Store::flush`]);
//! - the transport ceilings, on loopback, each against a server that does
//!   nothing else:
//!   - the load generator's own client (`bazaar loadgen`: the same events,
//!     the same closed loop) against a no-op `EventService` that answers
//!     each event at once: unary `RecordEvent` with `--clients` clients,
//!     and the bidirectional `StreamEvents` with `--stream-clients` clients
//!     sending `--batch` events at a time, as `loadgen --batch` does. Twice:
//!     with the server in a process of its own (this binary, started with
//!     the hidden `--serve-noop`), as a node serves the load generator, and
//!     in this process, where client and server share one runtime's
//!     threads, which no node serving a load generator can. Bazaar's
//!     figures are compared with the first;
//!   - the standard gRPC health check (the smallest unary call tonic
//!     serves) and a no-op HTTP request (axum), same concurrency, in this
//!     process.

use anyhow::Context as _;
use bazaar_proto::v1 as pb;
use clap::Args;
use serde_json::{json, Value};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct LimitsArgs {
    /// Directory on the disk to measure (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent clients for the transport ceilings.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Concurrent streams for the no-op stream ceiling.
    #[arg(long, default_value_t = 8)]
    pub stream_clients: usize,
    /// Events each stream sends before it reads their answers (2-1000).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Journal entries per group commit, for the journal and sled
    /// measurements.
    #[arg(long, default_value_t = 64)]
    pub group: usize,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Only serve the no-op `EventService` on a loopback port, print
    /// `noop-server ADDRESS`, and stop once standard input closes (how
    /// `bazaar limits` runs it in a process of its own).
    #[arg(long, hide = true)]
    pub serve_noop: bool,
}

pub async fn run(args: LimitsArgs) -> anyhow::Result<()> {
    if args.serve_noop {
        return serve_noop().await;
    }
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let window = Duration::from_secs(args.seconds.max(1));
    let (group, seconds) = (args.group.max(1), window);
    let fsync = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || fsync_rate(&dir, seconds)
    })
    .await??;
    println!("fsync: {fsync:.0}/s");
    let journal = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || journal_group_commit(&dir, group, seconds)
    })
    .await??;
    println!(
        "journal group commit ({group} entries per commit): {:.0} entries/s, {:.0} commits/s",
        journal.0, journal.1
    );
    let sled = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || sled_group_commit(&dir, group, seconds)
    })
    .await??;
    println!("sled group commit ({group} entries per flush): {:.0} entries/s, {:.0} flushes/s", sled.0, sled.1);
    let args = LimitsArgs { batch: args.batch.clamp(2, 1_000), ..args };
    let (record_event, stream) = noop_events_own_process(&args, window).await?;
    println!(
        "no-op RecordEvent, load generator's client, {} clients, server in its own process: {record_event:.0} events/s",
        args.clients
    );
    println!(
        "no-op StreamEvents, load generator's client, {} streams x {} events, server in its own process: {stream:.0} events/s",
        args.stream_clients, args.batch
    );
    let (record_event_shared, stream_shared) = noop_events(&args, window).await?;
    println!(
        "no-op RecordEvent, the same, server in this process: {record_event_shared:.0} events/s; \
         StreamEvents: {stream_shared:.0} events/s"
    );
    let grpc = grpc_noop(args.clients, window).await?;
    println!("no-op unary gRPC (health check), {} clients: {grpc:.0} calls/s", args.clients);
    let http = http_noop(args.clients, window).await?;
    println!("no-op HTTP, {} clients: {http:.0} requests/s", args.clients);
    let report = json!({
        "seconds_per_measurement": args.seconds,
        "clients": args.clients,
        "fsync_per_s": fsync,
        "journal_group_commit": {"entries_per_commit": group, "entries_per_s": journal.0, "commits_per_s": journal.1},
        "sled_group_commit": {"entries_per_flush": group, "entries_per_s": sled.0, "flushes_per_s": sled.1},
        "noop_record_event_per_s": record_event,
        "noop_stream": {"clients": args.stream_clients, "batch": args.batch, "events_per_s": stream},
        "noop_server": "own process",
        "noop_in_process": {"record_event_per_s": record_event_shared, "stream_events_per_s": stream_shared},
        "noop_unary_grpc_per_s": grpc,
        "noop_http_per_s": http,
    });
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn fsync_rate(dir: &std::path::Path, window: Duration) -> anyhow::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = vec![7u8; 4096];
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < window {
        file.write_all(&block)?;
        file.sync_data()?;
        count += 1;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(path)?;
    Ok(rate)
}

/// Group commits of `group` entries of about 300 bytes through the
/// journal's own segment writer: entries per second and commits per
/// second.
fn journal_group_commit(dir: &std::path::Path, group: usize, window: Duration) -> anyhow::Result<(f64, f64)> {
    let probe = dir.join("journal-probe");
    let mut appender = crate::wal::Appender::open(&probe, 0)?;
    let mut record = Vec::new();
    let started = Instant::now();
    let mut commits = 0u64;
    while started.elapsed() < window {
        crate::wal::begin_record(&mut record);
        record.resize(crate::wal::RECORD_HEADER_BYTES + 300 * group, 42);
        crate::wal::seal_record(&mut record, commits)?;
        appender.append(commits, &record)?;
        appender.sync()?;
        commits += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(appender);
    let _ = std::fs::remove_dir_all(probe);
    Ok((commits as f64 * group as f64 / elapsed, commits as f64 / elapsed))
}

/// The values the journal was stored in as a sled tree: 7 KiB at most, so
/// that sled kept them out of blob files.
const SLED_PART_BYTES: usize = 7 * 1024;

fn sled_group_commit(dir: &std::path::Path, group: usize, window: Duration) -> anyhow::Result<(f64, f64)> {
    // The node's own store and flush: sled's, made durable the same way.
    let store = crate::storage::Store::open(&dir.join("sled-probe"))?;
    let value = vec![42u8; 300 * group];
    let started = Instant::now();
    let mut flushes = 0u64;
    while started.elapsed() < window {
        // In parts, as the journal stored a batch in sled.
        for (part, bytes) in value.chunks(SLED_PART_BYTES).enumerate() {
            store.journal.insert(crate::journal::part_key(flushes, part)?, bytes)?;
        }
        store.flush()?;
        flushes += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(store);
    let _ = std::fs::remove_dir_all(dir.join("sled-probe"));
    Ok((flushes as f64 * group as f64 / elapsed, flushes as f64 / elapsed))
}

/// An `EventService` that answers every event at once and does nothing
/// else: Bazaar's transport without Bazaar.
struct NoopEvents;

fn noop_answer(event: pb::RecordEventRequest) -> pb::EventResult {
    pb::EventResult { event_id: event.event_id, ..pb::EventResult::default() }
}

#[tonic::async_trait]
impl pb::event_service_server::EventService for NoopEvents {
    async fn record_event(
        &self,
        request: tonic::Request<pb::RecordEventRequest>,
    ) -> Result<tonic::Response<pb::EventResult>, tonic::Status> {
        Ok(tonic::Response::new(noop_answer(request.into_inner())))
    }

    async fn record_events(
        &self,
        request: tonic::Request<pb::RecordEventsRequest>,
    ) -> Result<tonic::Response<pb::RecordEventsResponse>, tonic::Status> {
        let results = request.into_inner().events.into_iter().map(noop_outcome).collect();
        Ok(tonic::Response::new(pb::RecordEventsResponse { results }))
    }

    type StreamEventsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::EventOutcome, tonic::Status>>;

    async fn stream_events(
        &self,
        request: tonic::Request<tonic::Streaming<pb::RecordEventRequest>>,
    ) -> Result<tonic::Response<Self::StreamEventsStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (answers, receiver) = tokio::sync::mpsc::channel(1_024);
        tokio::spawn(async move {
            while let Ok(Some(event)) = inbound.message().await {
                if answers.send(Ok(noop_outcome(event))).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(receiver)))
    }
}

fn noop_outcome(event: pb::RecordEventRequest) -> pb::EventOutcome {
    pb::EventOutcome { outcome: Some(pb::event_outcome::Outcome::Result(noop_answer(event))) }
}

/// The load generator against [`NoopEvents`] served in this process:
/// unary, then streamed.
async fn noop_events(args: &LimitsArgs, window: Duration) -> anyhow::Result<(f64, f64)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let server = tokio::spawn(noop_server().serve_with_incoming(crate::nodelay_incoming(listener)));
    let measured = noop_ceilings(&address, args, window).await;
    server.abort();
    measured
}

/// A tonic server of [`NoopEvents`] only.
fn noop_server() -> tonic::transport::server::Router {
    tonic::transport::Server::builder().add_service(pb::event_service_server::EventServiceServer::new(NoopEvents))
}

/// The load generator against the no-op server at `address`: unary
/// events per second, then streamed.
async fn noop_ceilings(address: &str, args: &LimitsArgs, window: Duration) -> anyhow::Result<(f64, f64)> {
    let unary = crate::loadgen::ceiling(address, args.clients.max(1), 1, window).await?;
    let stream =
        crate::loadgen::ceiling(address, args.stream_clients.max(1), args.batch.clamp(2, 1_000), window).await?;
    Ok((unary, stream))
}

/// Serves [`NoopEvents`] on a loopback port until standard input closes:
/// the parent, `bazaar limits`, holds the other end, so the server goes
/// with it however it ends.
async fn serve_noop() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("noop-server {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut buffer = [0u8; 64];
            while std::io::Read::read(&mut std::io::stdin(), &mut buffer).is_ok_and(|n| 0 < n) {}
        })
        .await;
    };
    noop_server().serve_with_incoming_shutdown(crate::nodelay_incoming(listener), stdin_closed).await?;
    Ok(())
}

/// A no-op server in a process of its own, stopped by its PID when
/// dropped.
struct NoopProcess(std::process::Child);

impl Drop for NoopProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The load generator against [`NoopEvents`] served by another process
/// (this binary with `--serve-noop`): unary, then streamed.
async fn noop_events_own_process(args: &LimitsArgs, window: Duration) -> anyhow::Result<(f64, f64)> {
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};
    let child = Command::new(std::env::current_exe().context("finding this binary")?)
        .args(["limits", "--serve-noop"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the no-op server")?;
    let mut server = NoopProcess(child);
    let stdout = server.0.stdout.take().context("the no-op server's output")?;
    let address = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await??;
    let address = address
        .strip_prefix("noop-server ")
        .map(str::trim)
        .with_context(|| format!("the no-op server said {address:?}, not its address"))?
        .to_owned();
    let measured = noop_ceilings(&address, args, window).await;
    drop(server);
    measured
}

/// Calls per second of the standard health check, on a tonic server that
/// does nothing else.
async fn grpc_noop(clients: usize, window: Duration) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(health).serve_with_incoming(crate::nodelay_incoming(listener)),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))?.connect().await?;
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (channel, count) = (channel.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            while Instant::now() < deadline {
                if client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await?;
    }
    server.abort();
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Requests per second of a no-op axum handler, with the HTTP client the
/// load generator uses (ureq, keep-alive, one connection per client).
async fn http_noop(clients: usize, window: Duration) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let app = axum::Router::new().route("/noop", axum::routing::post(|| async { axum::Json(Value::Null) }));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + window;
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let count = count.clone();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                while Instant::now() < deadline {
                    if agent.post(&format!("http://{address}/noop")).send_json(json!({"event_id": "x"})).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await?;
    server.abort();
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

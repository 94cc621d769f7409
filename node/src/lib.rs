//! The Bazaar node: actors on sled behind an HTTP/JSON API.
//!
//! A map of the modules, in the order an event meets them:
//!
//! - [`http`] parses the request and calls the [`service`] layer, which
//!   authenticates ([`tenancy`]), validates ([`api`]) and calls entities
//!   (unary events that arrive together as one batch: [`coalesce`]);
//! - [`actor`] holds the virtual actors: one per customer, wheel, jackpot
//!   and leaderboard ([`entities`]), each a thin shell around its
//!   `bazaar-games` state machine;
//! - [`journal`] group-commits what actors changed to its segment files
//!   ([`wal`]) and derives the indexes in sled ([`storage`]);
//!   [`outbox`] carries what one entity's change causes in another;
//! - [`recovery`] brings storage up to the journal's end at start-up;
//! - [`config`] is the one place configuration is read and checked.
//!
//! [`serve`] wires them together; the `bazaar` binary only parses the
//! command line and calls it.

pub mod actor;
pub mod api;
pub mod coalesce;
pub mod config;
pub mod demo;
pub mod entities;
pub mod error;
pub mod grpc;
pub mod http;
pub mod journal;
pub mod limits;
pub mod live;
pub mod loadgen;
pub mod openapi;
pub mod outbox;
pub mod recovery;
pub mod seen;
pub mod service;
pub mod storage;
pub mod tenancy;
pub mod wal;

use crate::actor::{NodeShared, Registry};
use crate::config::NodeConfig;
use crate::journal::Journal;
use crate::service::{Service, ServiceConfig};
use crate::storage::Store;
use crate::tenancy::Tenancy;
use actix::Arbiter;
use anyhow::Context as _;
use bazaar_observability::Metrics;
use std::future::{Future, IntoFuture as _};
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The hash maps on the per-event path (actors, the idempotency index's
/// memtable and pending records, the journal's indexer, per-event-id
/// locks): foldhash instead
/// of the standard SipHash, which took 3-4 % of a batched run's samples.
/// Seeded per process; the keys come from authenticated callers.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The set of [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Lowers the calling thread's scheduling priority (nice 10), for
/// background work that must not take the cores from answers when they
/// need them: merging the idempotency index's runs took a whole core for
/// seconds, on a machine of two. Best effort: a failure is logged.
pub(crate) fn background_thread() {
    if let Err(error) = set_priority(Priority::Background) {
        tracing::warn!(%error, "could not lower a background thread's priority");
    }
}

/// How a background thread competes for the cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Priority {
    /// Nice 10 among the normal threads: a tenth of a core's share
    /// against one busy normal thread.
    Background,
    /// `SCHED_IDLE`: only the time no normal thread wants, preempted the
    /// moment one wakes. The index's compactor at nice 10 still made the
    /// seconds it wrote a run in (every five at 26,000 events/s) the
    /// slowest of an open loop; with it (and the engagement refresh) idle,
    /// the loop's p99 was 6.8-7.5 ms against 11.7-23 ms, 3-5 seconds of 45
    /// above 10 ms against 6-21 (three interleaved rounds,
    /// docs/performance.md). A thread that must keep up goes back to
    /// [`Priority::Background`] when it falls behind, which an
    /// unprivileged process may do only within its `RLIMIT_NICE` (root, or
    /// `CAP_SYS_NICE`, always may). Such a thread holds a lock that a
    /// normal one may wait for only for moments (the compactor: to swap a
    /// run or a memtable in or out): preempted while holding it, it would
    /// keep the other waiting for a core that nothing else wants.
    Idle,
}

/// Sets the calling thread's [`Priority`].
pub(crate) fn set_priority(priority: Priority) -> std::io::Result<()> {
    let policy = match priority {
        Priority::Background => libc::SCHED_OTHER,
        Priority::Idle => libc::SCHED_IDLE,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a system call on the calling thread (0), with a parameter
    // that lives across it.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if priority == Priority::Background {
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE)?;
    }
    Ok(())
}

/// The niceness of background threads (0 is the default, 19 the lowest).
const BACKGROUND_NICE: i32 = 10;

/// How often undelivered outbox messages are retried.
const REDELIVERY_INTERVAL: Duration = Duration::from_secs(2);

/// Runs a node until `shutdown` resolves, then drains it: the listener stops
/// accepting, in-flight requests finish (for `drain_timeout` at most:
/// after it the node stops waiting for them), every active entity writes its
/// snapshot, and the journal flushes and closes. If `shutdown` has
/// resolved by the time recovery ends, the node stops without listening.
///
/// Must run inside an actix `System` (the binary's `main` makes one).
pub async fn serve(config: NodeConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    serve_with(config, shutdown, None).await
}

/// Where a node listens, once it does.
#[derive(Clone, Copy, Debug)]
pub struct Listening {
    pub http: std::net::SocketAddr,
    pub grpc: std::net::SocketAddr,
}

/// Whether the kernel may back this process's memory with transparent huge
/// pages (`--transparent-huge-pages`; the process-wide
/// `PR_SET_THP_DISABLE` flag, which overrides the allocator's
/// `MADV_HUGEPAGE` and the system's `always`). Off by default: the node's
/// memory grows with every customer it activates, and each first touch of
/// a fresh huge page zeroes 2 MiB (and may compact memory to find one) on
/// the thread that touched it, a request's thread. On this machine that
/// put an open loop of 12,000 unary events a second at a p99 of 25–47 ms
/// where 4 KiB pages gave 7.5–9.2 ms (docs/performance.md).
fn huge_pages(allowed: bool) {
    match rustix::thread::disable_transparent_huge_pages(!allowed) {
        Ok(()) => tracing::debug!(allowed, "transparent huge pages set for this process"),
        Err(error) => {
            tracing::warn!(%error, allowed, "cannot set transparent huge pages for this process; the system's setting applies")
        }
    }
}

/// [`serve`], telling `ready` where the node listens once it accepts
/// requests (`bazaar demo` runs a node in-process this way).
pub async fn serve_with(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: Option<tokio::sync::oneshot::Sender<Listening>>,
) -> anyhow::Result<()> {
    huge_pages(config.transparent_huge_pages);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
    let store = Store::open_with_cache(&config.data_dir, config.cache_bytes).with_context(|| {
        format!("cannot open the data directory {} (is another bazaar using it?)", config.data_dir.display())
    })?;
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let (report, recovered) = recovery::recover(&store, &metrics).context("recovering the journal")?;
    let (journal, writer) =
        Journal::start(store.clone(), metrics.clone(), report.next_seq, 2 * config.checkpoint_interval)
            .context("starting the journal writer")?;

    let arbiters: Vec<Arbiter> = (0..config.actor_threads).map(|_| Arbiter::new()).collect();
    let handles: Vec<_> = arbiters.iter().map(Arbiter::handle).collect();
    let node = Arc::new(NodeShared {
        store: store.clone(),
        journal: journal.clone(),
        metrics: metrics.clone(),
        idle_timeout: config.idle_timeout,
        snapshot_every: config.snapshot_every,
        recovered,
    });
    let tenancy = Tenancy::load(store.clone(), config.admin_key.as_deref()).context("loading tenants and keys")?;
    let service = Arc::new(Service {
        customers: Registry::new(node.clone(), handles.clone()),
        wheels: Registry::new(node.clone(), handles.clone()),
        jackpots: Registry::new(node.clone(), handles.clone()),
        leaderboards: Registry::new(node, handles),
        store,
        journal: journal.clone(),
        metrics,
        tenancy,
        live: live::Live::default(),
        in_flight: service::KeyedLock::default(),
        config: ServiceConfig {
            max_event_age: config.max_event_age,
            unary_batching: config.unary_batching,
            checkpoint_spread: config.checkpoint_spread,
        },
        ready: false.into(),
        scores_in_flight: Arc::new(tokio::sync::Semaphore::new(service::SCORES_IN_FLIGHT)),
    });

    if service.tenancy.needs_generated_admin()? {
        let key = service.tenancy.generate_admin().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("bazaar: created the first admin key (shown once, keep it safe):\n  {key}");
    }
    let redelivered = service.redeliver(Duration::ZERO).await;
    if 0 < redelivered {
        tracing::info!(redelivered, "delivered outbox messages left by the last run");
    }
    // Told to stop while it recovered (a rolling update's SIGTERM to a
    // node reading a long journal tail): it stops without listening, and
    // without ever reporting ready. The journal is as recovery found it;
    // the next start recovers the same tail.
    let mut shutdown = Box::pin(shutdown);
    // A signal caught meanwhile reaches its receiver once the runtime's
    // driver has run, which a yield lets it do (recovery held the thread).
    tokio::task::yield_now().await;
    if futures_util::FutureExt::now_or_never(shutdown.as_mut()).is_some() {
        tracing::info!("told to stop before listening: stopping");
        return stop_journal(&journal, writer, arbiters).await;
    }

    let grpc_listener = tokio::net::TcpListener::bind(config.grpc)
        .await
        .with_context(|| format!("cannot listen on {} for gRPC", config.grpc))?;
    let grpc_address = grpc_listener.local_addr()?;
    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("cannot listen on {}", config.http))?;
    let address = listener.local_addr()?;
    // The gRPC line comes first: scripts wait for the HTTP line as "ready".
    println!("bazaar gRPC listening on {grpc_address}");
    println!("bazaar listening on http://{address} (data in {})", config.data_dir.display());
    std::io::stdout().flush()?;
    tracing::info!(%address, %grpc_address, data_dir = %config.data_dir.display(), "node ready");
    service.ready.store(true, Ordering::SeqCst);
    if let Some(ready) = ready {
        let _ = ready.send(Listening { http: address, grpc: grpc_address });
    }

    // One shutdown signal for both servers and the housekeeping task.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let live = service.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
        // Watches (screens' streams) never end on their own: the servers'
        // drain would wait for them for ever.
        live.live.stop();
    });
    // Write the snapshots recovery left in memory, a slice at a time.
    let writing = service.clone();
    tokio::spawn(async move {
        if let Err(error) = writing.write_recovered().await {
            tracing::warn!(%error, "writing recovered snapshots failed; the next checkpoint retries");
        }
    });
    let housekeeping = tokio::spawn(housekeeping(
        service.clone(),
        config.checkpoint_interval,
        config.engagement_interval,
        stopping.clone(),
    ));

    let routes = grpc::router(service.clone()).await.map_err(|e| anyhow::anyhow!("setting up gRPC: {e}"))?;
    let mut grpc_server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(grpc::GrpcMetricsLayer::new(service.metrics.clone()))
            .add_routes(routes)
            .serve_with_incoming_shutdown(nodelay_incoming(grpc_listener), stopped(stopping.clone())),
    );
    let app = http::router(http::AppState { service: service.clone(), max_body_bytes: config.max_body_bytes });
    // Small answers, sent at once (see `nodelay_incoming`).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let mut http_server =
        tokio::spawn(axum::serve(listener, app).with_graceful_shutdown(stopped(stopping.clone())).into_future());
    // Told to stop, the servers finish what is in flight, for the drain
    // timeout at most: a client that never sends the rest of its body
    // would hold the stop (and the final checkpoint) for ever.
    let (http_abort, grpc_abort) = (http_server.abort_handle(), grpc_server.abort_handle());
    let servers = async {
        // The first to fail fails the node, without waiting for the other.
        let http = async { (&mut http_server).await.context("joining the HTTP server")?.context("serving HTTP") };
        let grpc = async { (&mut grpc_server).await.context("joining the gRPC server")?.context("serving gRPC") };
        tokio::try_join!(http, grpc).map(|((), ())| ())
    };
    let deadline = async {
        stopped(stopping).await;
        tokio::time::sleep(config.drain_timeout).await;
    };
    tokio::select! {
        served = servers => served?,
        () = deadline => {
            tracing::warn!(
                drain_timeout = ?config.drain_timeout,
                "requests still in flight at the drain timeout: no longer waiting for them (their connections close \
                 when the node exits)"
            );
            http_abort.abort();
            grpc_abort.abort();
        }
    }

    tracing::info!("shutting down: the servers have stopped, writing snapshots");
    service.ready.store(false, Ordering::SeqCst);
    let _ = housekeeping.await;
    // Nothing is served any more: the journal's space goes back at once.
    if let Err(error) = service.checkpoint(storage::Pace::AtOnce).await {
        tracing::warn!(%error, "final checkpoint failed; the next start recovers from the journal");
    }
    stop_journal(&journal, writer, arbiters).await
}

/// Closes the journal, waits until its writer has written what was queued
/// and flushed, and stops the actors' threads.
async fn stop_journal(
    journal: &Journal,
    writer: std::thread::JoinHandle<()>,
    arbiters: Vec<Arbiter>,
) -> anyhow::Result<()> {
    journal.close();
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .context("joining the journal writer")?
        .map_err(|_| anyhow::anyhow!("the journal writer panicked"))?;
    for arbiter in arbiters {
        arbiter.stop();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves once the node is told to stop.
async fn stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// Checkpoints, outbox redelivery and engagement refreshes, until told to
/// stop. Checkpoints go in a loop of their own: one spreads its snapshots
/// over half its interval, and redelivery (every two seconds) does not
/// wait for it.
async fn housekeeping(
    service: Arc<Service>,
    checkpoint_interval: Duration,
    engagement_interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::join!(
        checkpoints(service.clone(), checkpoint_interval, stop.clone()),
        redelivery_and_engagement(service, engagement_interval, stop),
    );
}

/// A checkpoint every `interval`, until told to stop; one that took
/// longer is followed by the next at once, and by one only (not by one
/// per interval missed).
async fn checkpoints(service: Arc<Service>, interval: Duration, stop: tokio::sync::watch::Receiver<bool>) {
    let mut checkpoint = tokio::time::interval(interval);
    checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    checkpoint.tick().await;
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = checkpoint.tick() => {
                if let Err(error) = service.checkpoint(storage::Pace::Spread).await {
                    tracing::warn!(%error, "checkpoint failed; will retry");
                }
            }
        }
    }
}

/// Outbox redelivery and engagement refreshes, until told to stop.
async fn redelivery_and_engagement(
    service: Arc<Service>,
    engagement_interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut redeliver = tokio::time::interval(REDELIVERY_INTERVAL);
    let mut engagement = tokio::time::interval(engagement_interval);
    // A refresh paces itself over seconds: it runs beside the loop, one at
    // a time, so that redelivery does not wait for it, on a thread of its
    // own at background priority (it reads every customer's snapshot; at
    // the default priority it took its share of the cores from the
    // answers).
    let mut refreshing: Option<std::thread::JoinHandle<()>> = None;
    redeliver.tick().await;
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = redeliver.tick() => {
                service.redeliver(REDELIVERY_INTERVAL).await;
            }
            _ = engagement.tick() => {
                if refreshing.as_ref().is_none_or(std::thread::JoinHandle::is_finished) {
                    let service = service.clone();
                    let spawned = std::thread::Builder::new().name("engagement".into()).spawn(move || {
                        // Once a minute, nothing waits for it: whatever
                        // time the answers leave.
                        if let Err(error) = set_priority(Priority::Idle) {
                            tracing::debug!(%error, "engagement refresh at background priority instead of idle");
                            background_thread();
                        }
                        if let Err(error) = service.refresh_engagement() {
                            tracing::warn!(%error, "engagement refresh failed; will retry");
                        }
                    });
                    match spawned {
                        Ok(thread) => refreshing = Some(thread),
                        Err(error) => tracing::warn!(%error, "could not start the engagement refresh; will retry"),
                    }
                }
            }
        }
    }
}

/// The connections `listener` accepts, with TCP_NODELAY: answers are small
/// writes, and without it Nagle's algorithm holds one back until the
/// client's delayed ACK (40 ms) arrives. The node's gRPC listener and the
/// no-op servers of `bazaar limits` both serve through it.
pub(crate) fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |stream| {
        stream.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_goes_to_idle_priority_and_back_where_allowed() {
        std::thread::spawn(|| {
            // SAFETY (both): plain system calls about the calling thread.
            let policy = || unsafe { libc::sched_getscheduler(0) };
            set_priority(Priority::Idle).expect("lowering a thread's priority is always allowed");
            assert_eq!(policy(), libc::SCHED_IDLE);
            match set_priority(Priority::Background) {
                Ok(()) => {
                    assert_eq!(policy(), libc::SCHED_OTHER);
                    let nice = rustix::process::getpriority_process(Some(rustix::thread::gettid()));
                    assert_eq!(nice.expect("its niceness"), BACKGROUND_NICE);
                }
                // Leaving idle priority takes CAP_SYS_NICE or RLIMIT_NICE.
                Err(error) => assert_eq!(error.raw_os_error(), Some(libc::EPERM), "{error}"),
            }
        })
        .join()
        .expect("the thread's checks");
    }

    fn config(dir: &std::path::Path) -> NodeConfig {
        let mut config = NodeConfig::defaults();
        config.data_dir = dir.join("db");
        config.http = "127.0.0.1:0".parse().expect("an address");
        config.grpc = "127.0.0.1:0".parse().expect("an address");
        config.admin_key = Some("an-admin-key-for-the-test".into());
        config
    }

    #[test]
    fn a_node_told_to_stop_before_it_listens_stops_without_listening() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ready, mut listening) = tokio::sync::oneshot::channel();
        actix_rt::System::new()
            .block_on(serve_with(config(dir.path()), std::future::ready(()), Some(ready)))
            .expect("stops cleanly");
        assert!(listening.try_recv().is_err(), "it never said where it listens");
        // It let go of its data directory (sled's lock) and left it whole:
        // the next node opens it, listens, and stops when told.
        let (ready, listening) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        actix_rt::System::new()
            .block_on(async move {
                let told = async move {
                    let _ = listening.await;
                    let _ = stop.send(());
                };
                let node = serve_with(
                    config(dir.path()),
                    async move {
                        let _ = stopped.await;
                    },
                    Some(ready),
                );
                tokio::join!(node, told).0
            })
            .expect("the next node runs and stops");
    }
}

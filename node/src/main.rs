//! The `bazaar` command: parses the command line, sets up logging and runs.

use anyhow::Context;
use bazaar_node::config::{NodeConfig, ServeArgs};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// The node allocates and frees many small objects per event across
/// threads; glibc's allocator spent a fifth of the node's CPU on it
/// (consolidating fast bins whenever a large buffer was freed).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Bazaar: loyalty and gamification for retailers and malls. Points, tiers,
/// wheels, progressive jackpots, missions and live leaderboards, driven by
/// what shoppers do.
#[derive(Parser, Debug)]
#[command(name = "bazaar", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: boxing the larger variant would gain nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node: the HTTP/JSON API on an embedded sled database.
    ///
    /// Settings come from --config FILE, BAZAAR_* environment variables and
    /// flags, in rising precedence. SIGTERM or Ctrl-C drains the node: it
    /// stops accepting, finishes in-flight requests, writes snapshots and
    /// flushes.
    Serve(ServeArgs),
    /// Start a node with a sample mall and simulated shoppers, and watch it
    /// live: the jackpot growing and hitting, the top 10, events per second.
    ///
    /// The node runs in a temporary directory that is deleted afterwards
    /// (unless --keep, which leaves it running and prints its URLs and keys).
    Demo(bazaar_node::demo::DemoArgs),
    /// Send a mall's workload (purchases, visits, spins) to a running node
    /// and measure it: events per second, latency percentiles (HDR),
    /// errors; a JSON report with --report; --verify checks the books, every
    /// customer and every draw against what was acknowledged.
    Loadgen(bazaar_node::loadgen::LoadgenArgs),
    /// Measure this machine's limits (fsync, sled group commit, no-op gRPC
    /// and HTTP), to report Bazaar's figures as ratios to them.
    Limits(bazaar_node::limits::LimitsArgs),
    /// Print the OpenAPI 3.1 document of the HTTP API (the same as
    /// GET /v1/openapi.json), e.g. to refresh docs/openapi.json.
    Openapi,
}

/// The actix system every node runs in: actors on their arbiters, servers
/// on a multi-threaded tokio runtime.
fn system() -> actix_rt::SystemRunner {
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("the OS provides threads and timers for the runtime")
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Loadgen(args) => {
            bazaar_observability::init_tracing(bazaar_observability::LogFormat::Text, "warn");
            finish("bazaar loadgen", block_on(bazaar_node::loadgen::run(args)))
        }
        Command::Limits(args) => finish("bazaar limits", block_on(bazaar_node::limits::run(args))),
        Command::Openapi => {
            println!("{}", bazaar_node::openapi::json());
            ExitCode::SUCCESS
        }
        Command::Demo(args) => {
            bazaar_observability::init_tracing(bazaar_observability::LogFormat::Text, "warn");
            finish("bazaar demo", system().block_on(bazaar_node::demo::run(args)))
        }
        Command::Serve(args) => {
            let config = match NodeConfig::build(args) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("bazaar: {error}");
                    return ExitCode::from(2);
                }
            };
            bazaar_observability::init_tracing(config.log_format, &config.log);
            finish("bazaar", system().block_on(async { bazaar_node::serve(config, shutdown_signal()?).await }))
        }
    }
}

/// Runs a client command (no actors) on a multi-threaded tokio runtime.
fn block_on(command: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(command)
}

/// The exit code of a command, printing its error with `prefix`.
fn finish(prefix: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{prefix}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (Kubernetes, systemd) or Ctrl-C (SIGINT). Both are
/// caught from this call on, not from the future's first poll: the node
/// waits for them only once it listens, and a signal before that (during
/// recovery, or right after the ready line) would otherwise take the
/// default action and kill it instead of stopping it cleanly. Call it
/// within the runtime.
///
/// A second signal, while the node drains, stops the process at once
/// (exit code 128 + the signal's number), as `kill -9` would: every
/// acknowledged event is in the journal, and the next start replays what
/// the final checkpoint would have covered.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    Ok(async move {
        let first = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = first, "stopping (a second SIGTERM or Ctrl-C stops at once)");
        tokio::spawn(async move {
            let (second, code) = tokio::select! {
                _ = terminate.recv() => ("SIGTERM", 128 + libc::SIGTERM),
                _ = interrupt.recv() => ("SIGINT", 128 + libc::SIGINT),
            };
            tracing::warn!(
                signal = second,
                "a second signal: stopping at once, without draining or a final checkpoint; every acknowledged \
                 event is in the journal and the next start replays it"
            );
            std::process::exit(code);
        });
    })
}

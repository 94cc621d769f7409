//! Every metric Bazaar exports, declared in one place, and the tracing
//! set-up.
//!
//! Names follow `bazaar_<thing>_<unit>`; label sets are bounded: tenants and
//! game ids may appear as labels, customers and events never. The node
//! updates these along an event's way; `/metrics` renders [`Metrics::render`].

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The metrics of one node, registered in their own registry (so tests can
/// run several nodes in one process without clashes).
pub struct Metrics {
    registry: Registry,
    /// Events applied (not duplicates), by tenant and kind.
    pub events_ingested: IntCounterVec,
    /// Events answered as duplicates of an earlier event id.
    pub events_duplicate: IntCounterVec,
    /// HTTP requests by matched route, method and status code.
    pub http_request_duration: HistogramVec,
    /// gRPC calls by method and status code, until the response's head:
    /// a unary call's whole latency, a stream's time to open.
    pub grpc_request_duration: HistogramVec,
    /// Spins by tenant, wheel and prize kind.
    pub spins: IntCounterVec,
    /// Current pool of each jackpot, in minor units.
    pub jackpot_pool: IntGaugeVec,
    /// Contributions to each jackpot, in minor units.
    pub jackpot_contributed: IntCounterVec,
    /// Jackpot hits.
    pub jackpot_hits: IntCounterVec,
    /// Mission steps and completions, by tenant and mission.
    pub mission_steps: IntCounterVec,
    pub mission_completions: IntCounterVec,
    /// Actors in memory, by entity kind.
    pub active_actors: IntGaugeVec,
    pub activations: IntCounterVec,
    pub passivations: IntCounterVec,
    /// Cross-entity messages journaled but not yet acknowledged.
    pub outbox_backlog: IntGauge,
    /// Leaderboard scores sent and not yet applied (set at each scrape).
    pub scores_in_flight: IntGauge,
    /// The idempotency index: its runs, and its records by where they are
    /// (`place="runs"`: in run files; `"memory"`: not yet written as a run).
    pub seen_runs: IntGauge,
    pub seen_records: IntGaugeVec,
    /// Runs whose keys the index's summary holds, and the runs' own
    /// filters that lookups probed (those the summary did not rule out).
    pub seen_summarized_runs: IntGauge,
    pub seen_run_probes: IntCounter,
    /// Share of customers active in a window who played a game, progressed
    /// in a mission, won a reward, or any of these; refreshed on a schedule.
    pub engagement_ratio: GaugeVec,
    /// The counts behind the ratios: customers active in the window
    /// (`kind="active"`) and those who did each kind of engaged thing.
    pub engagement_customers: IntGaugeVec,
    /// Engagement refreshes done.
    pub engagement_refreshes: IntCounter,
    /// Time of one journal group commit (write and flush).
    pub journal_flush_seconds: Histogram,
    /// Entries per group commit.
    pub journal_batch_entries: Histogram,
    /// Bytes of journal records (batches) written.
    pub journal_bytes: IntCounter,
    /// Bytes of idempotency-index run files written (new runs and merges).
    pub seen_run_bytes: IntCounter,
    /// Unary events recorded together in one batch.
    pub unary_batch_events: Histogram,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let latency_buckets =
            vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
        let metrics = Self {
            events_ingested: IntCounterVec::new(
                Opts::new("bazaar_events_ingested_total", "Events applied, by tenant and kind"),
                &["tenant", "kind"],
            )?,
            events_duplicate: IntCounterVec::new(
                Opts::new("bazaar_events_duplicate_total", "Events answered as retries of an earlier event id"),
                &["tenant"],
            )?,
            http_request_duration: HistogramVec::new(
                HistogramOpts::new("bazaar_http_request_duration_seconds", "HTTP request latency")
                    .buckets(latency_buckets.clone()),
                &["route", "method", "code"],
            )?,
            grpc_request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "bazaar_grpc_request_duration_seconds",
                    "gRPC latency until the response head (a unary call's answer, a stream's opening)",
                )
                .buckets(latency_buckets.clone()),
                &["method", "code"],
            )?,
            spins: IntCounterVec::new(
                Opts::new("bazaar_spins_total", "Wheel spins, by tenant, wheel and prize kind"),
                &["tenant", "wheel", "prize_kind"],
            )?,
            jackpot_pool: IntGaugeVec::new(
                Opts::new("bazaar_jackpot_pool_minor", "Current jackpot pool in minor units"),
                &["tenant", "jackpot"],
            )?,
            jackpot_contributed: IntCounterVec::new(
                Opts::new("bazaar_jackpot_contributed_minor_total", "Contributions to jackpots in minor units"),
                &["tenant", "jackpot"],
            )?,
            jackpot_hits: IntCounterVec::new(
                Opts::new("bazaar_jackpot_hits_total", "Jackpot hits"),
                &["tenant", "jackpot"],
            )?,
            mission_steps: IntCounterVec::new(
                Opts::new("bazaar_mission_steps_completed_total", "Mission steps completed"),
                &["tenant", "mission"],
            )?,
            mission_completions: IntCounterVec::new(
                Opts::new("bazaar_mission_completions_total", "Missions completed"),
                &["tenant", "mission"],
            )?,
            active_actors: IntGaugeVec::new(
                Opts::new("bazaar_active_actors", "Actors in memory, by entity kind"),
                &["kind"],
            )?,
            activations: IntCounterVec::new(
                Opts::new("bazaar_actor_activations_total", "Actor activations, by entity kind"),
                &["kind"],
            )?,
            passivations: IntCounterVec::new(
                Opts::new("bazaar_actor_passivations_total", "Actor passivations, by entity kind"),
                &["kind"],
            )?,
            engagement_ratio: GaugeVec::new(
                Opts::new(
                    "bazaar_engagement_ratio",
                    "Share of customers active in the window who played, progressed in a mission, won a reward, or any",
                ),
                &["tenant", "window", "kind"],
            )?,
            engagement_customers: IntGaugeVec::new(
                Opts::new(
                    "bazaar_engagement_customers",
                    "Customers active in the window (kind=active) and those engaged in each way",
                ),
                &["tenant", "window", "kind"],
            )?,
            engagement_refreshes: IntCounter::new(
                "bazaar_engagement_refreshes_total",
                "Engagement ratio refreshes done",
            )?,
            outbox_backlog: IntGauge::new(
                "bazaar_outbox_backlog",
                "Cross-entity messages journaled and not yet acknowledged",
            )?,
            scores_in_flight: IntGauge::new(
                "bazaar_scores_in_flight",
                "Leaderboard scores sent and not yet applied (at the node's bound, answers wait for their boards)",
            )?,
            seen_runs: IntGauge::new("bazaar_seen_runs", "Run files of the idempotency index")?,
            seen_records: IntGaugeVec::new(
                Opts::new("bazaar_seen_records", "Records of the idempotency index, in run files or not yet"),
                &["place"],
            )?,
            seen_summarized_runs: IntGauge::new(
                "bazaar_seen_summarized_runs",
                "Runs of the idempotency index whose keys its summary filter holds",
            )?,
            seen_run_probes: IntCounter::new(
                "bazaar_seen_run_probes_total",
                "Run filters of the idempotency index probed by lookups the summary did not rule out",
            )?,
            journal_flush_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "bazaar_journal_flush_seconds",
                    "Duration of one journal group commit, until its batch is synced",
                )
                .buckets(latency_buckets),
            )?,
            journal_batch_entries: Histogram::with_opts(
                HistogramOpts::new("bazaar_journal_batch_entries", "Journal entries per group commit")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0]),
            )?,
            journal_bytes: IntCounter::new(
                "bazaar_journal_bytes_total",
                "Bytes of journal records written (each group commit's batch, framing included)",
            )?,
            seen_run_bytes: IntCounter::new(
                "bazaar_seen_run_bytes_total",
                "Bytes of the idempotency index's run files written, new runs and merges",
            )?,
            unary_batch_events: Histogram::with_opts(
                HistogramOpts::new(
                    "bazaar_unary_batch_events",
                    "Unary events recorded together in one batch (those that arrived within one pass of the scheduler)",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0]),
            )?,
            registry,
        };
        metrics.register()?;
        Ok(metrics)
    }

    fn register(&self) -> Result<(), prometheus::Error> {
        let r = &self.registry;
        r.register(Box::new(self.events_ingested.clone()))?;
        r.register(Box::new(self.events_duplicate.clone()))?;
        r.register(Box::new(self.http_request_duration.clone()))?;
        r.register(Box::new(self.grpc_request_duration.clone()))?;
        r.register(Box::new(self.spins.clone()))?;
        r.register(Box::new(self.jackpot_pool.clone()))?;
        r.register(Box::new(self.jackpot_contributed.clone()))?;
        r.register(Box::new(self.jackpot_hits.clone()))?;
        r.register(Box::new(self.mission_steps.clone()))?;
        r.register(Box::new(self.mission_completions.clone()))?;
        r.register(Box::new(self.active_actors.clone()))?;
        r.register(Box::new(self.activations.clone()))?;
        r.register(Box::new(self.passivations.clone()))?;
        r.register(Box::new(self.outbox_backlog.clone()))?;
        r.register(Box::new(self.scores_in_flight.clone()))?;
        r.register(Box::new(self.seen_runs.clone()))?;
        r.register(Box::new(self.seen_records.clone()))?;
        r.register(Box::new(self.seen_summarized_runs.clone()))?;
        r.register(Box::new(self.seen_run_probes.clone()))?;
        r.register(Box::new(self.engagement_ratio.clone()))?;
        r.register(Box::new(self.engagement_customers.clone()))?;
        r.register(Box::new(self.engagement_refreshes.clone()))?;
        r.register(Box::new(self.journal_flush_seconds.clone()))?;
        r.register(Box::new(self.journal_batch_entries.clone()))?;
        r.register(Box::new(self.journal_bytes.clone()))?;
        r.register(Box::new(self.seen_run_bytes.clone()))?;
        r.register(Box::new(self.unary_batch_events.clone()))?;
        Ok(())
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding gathered metrics into a Vec cannot fail");
        String::from_utf8(buffer).expect("the Prometheus text format is UTF-8")
    }
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Installs the global tracing subscriber. `filter` is an `EnvFilter`
/// directive such as `info` or `bazaar_node=debug`; `RUST_LOG` overrides it.
/// Logs go to standard error, so standard output stays for what a command
/// prints for its user.
pub fn init_tracing(format: LogFormat, filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    // A second initialisation (tests starting several nodes) keeps the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_our_names() {
        let metrics = Metrics::new().expect("metrics register once");
        metrics.events_ingested.with_label_values(&["mall", "purchase"]).inc_by(3);
        metrics.jackpot_pool.with_label_values(&["mall", "j"]).set(1_250);
        let text = metrics.render();
        assert!(text.contains("bazaar_events_ingested_total{kind=\"purchase\",tenant=\"mall\"} 3"), "{text}");
        assert!(text.contains("# TYPE bazaar_jackpot_pool_minor gauge"), "{text}");
        assert!(text.contains("bazaar_jackpot_pool_minor{jackpot=\"j\",tenant=\"mall\"} 1250"), "{text}");
    }
}

//! The node's configuration: one [`NodeConfig`], built in one place from a
//! TOML file, `BAZAAR_*` environment variables and command-line flags (in
//! rising precedence), validated once at start-up with errors that name the
//! key.

use bazaar_observability::LogFormat;
use clap::{Args, ValueEnum};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `bazaar serve` flags; each also reads a `BAZAAR_*` variable.
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys as the flags, with
    /// underscores: `data_dir = "/var/lib/bazaar"`). Flags and environment
    /// variables override it.
    #[arg(long, env = "BAZAAR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP/JSON API [default: 127.0.0.1:8080]. Port 0 picks
    /// a free port; the chosen address is printed.
    #[arg(long, env = "BAZAAR_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Address of the gRPC API (bazaar.v1, with reflection and health)
    /// [default: 127.0.0.1:50051]. Port 0 picks a free port.
    #[arg(long, env = "BAZAAR_GRPC", value_name = "ADDR")]
    pub grpc: Option<SocketAddr>,
    /// Where the node keeps its data (created if missing) [default:
    /// ./bazaar-data].
    #[arg(long, env = "BAZAAR_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The bootstrap admin key (at least 16 characters). Without one, the
    /// first start makes a random admin key and prints it once.
    #[arg(long, env = "BAZAAR_ADMIN_KEY", value_name = "KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// How long an entity stays in memory without messages [default: 5m].
    #[arg(long, env = "BAZAAR_IDLE_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// How old an event may be when it arrives, for tills that were offline
    /// [default: 7d].
    #[arg(long, env = "BAZAAR_MAX_EVENT_AGE", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_event_age: Option<Duration>,
    /// How often active entities are snapshotted and the journal they cover
    /// dropped; bounds recovery time [default: 30s].
    #[arg(long, env = "BAZAAR_CHECKPOINT_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub checkpoint_interval: Option<Duration>,
    /// How long a checkpoint spreads its customers' snapshots over while
    /// the node serves (0s: as fast as the journal writer takes them);
    /// shorter than the interval [default: half the interval].
    #[arg(long, env = "BAZAAR_CHECKPOINT_SPREAD", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub checkpoint_spread: Option<Duration>,
    /// How long a stop waits for requests in flight before it gives up on
    /// them and goes on to its final checkpoint (0s: not at all); at most
    /// 1h. A second SIGTERM or Ctrl-C stops at once [default: 20s].
    #[arg(long, env = "BAZAAR_DRAIN_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// How often the engagement ratios are recomputed [default: 60s].
    #[arg(long, env = "BAZAAR_ENGAGEMENT_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub engagement_interval: Option<Duration>,
    /// An active entity writes a snapshot after this many changes
    /// [default: 1000].
    #[arg(long, env = "BAZAAR_SNAPSHOT_EVERY", value_name = "N")]
    pub snapshot_every: Option<u32>,
    /// Threads that run entity actors [default: the number of CPUs].
    #[arg(long, env = "BAZAAR_ACTOR_THREADS", value_name = "N")]
    pub actor_threads: Option<usize>,
    /// Record a tenant's unary events that arrive together (within one
    /// pass of the scheduler) as one batch; `false` records each on its
    /// own [default: true].
    #[arg(long, env = "BAZAAR_UNARY_BATCHING", value_name = "BOOL")]
    pub unary_batching: Option<bool>,
    /// Let the kernel back this process's memory with transparent huge
    /// pages where the system allows them. Off by default: a fault on a
    /// fresh 2 MiB page (zeroing it, compacting memory to find one) holds
    /// a request up for milliseconds [default: false].
    #[arg(long, env = "BAZAAR_TRANSPARENT_HUGE_PAGES", value_name = "BOOL")]
    pub transparent_huge_pages: Option<bool>,
    /// Largest request body accepted, in bytes [default: 1048576].
    #[arg(long, env = "BAZAAR_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Memory for sled's page cache, in bytes [default: 268435456]. Active
    /// entities live in the actors; the cache holds what is read back.
    #[arg(long, env = "BAZAAR_CACHE_BYTES", value_name = "BYTES")]
    pub cache_bytes: Option<u64>,
    /// Log format [default: text].
    #[arg(long, env = "BAZAAR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormatArg>,
    /// Log filter, e.g. `info` or `bazaar_node=debug` [default: info].
    #[arg(long, env = "BAZAAR_LOG", value_name = "FILTER")]
    pub log: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatArg {
    Text,
    Json,
}

/// The configuration file's shape: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    http: Option<SocketAddr>,
    grpc: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    admin_key: Option<String>,
    #[serde(default, with = "humantime_serde_opt")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    max_event_age: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    checkpoint_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    checkpoint_spread: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    drain_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    engagement_interval: Option<Duration>,
    snapshot_every: Option<u32>,
    actor_threads: Option<usize>,
    unary_batching: Option<bool>,
    transparent_huge_pages: Option<bool>,
    max_body_bytes: Option<usize>,
    cache_bytes: Option<u64>,
    log_format: Option<LogFormatArg>,
    log: Option<String>,
}

/// Durations in the file are written like the flags: "30s", "7d".
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom)).transpose()
    }
}

/// The validated configuration of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub data_dir: PathBuf,
    pub admin_key: Option<String>,
    pub idle_timeout: Duration,
    pub max_event_age: Duration,
    pub checkpoint_interval: Duration,
    pub checkpoint_spread: Duration,
    pub drain_timeout: Duration,
    pub engagement_interval: Duration,
    pub snapshot_every: u32,
    pub actor_threads: usize,
    pub unary_batching: bool,
    pub transparent_huge_pages: bool,
    pub max_body_bytes: usize,
    pub cache_bytes: u64,
    pub log_format: LogFormat,
    pub log: String,
}

/// A configuration key broke a rule.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl NodeConfig {
    /// Merges file, environment and flags (clap has already merged the
    /// last two) over the defaults, and validates the result.
    pub fn build(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.message().to_owned() })?
            }
            None => FileConfig::default(),
        };
        let checkpoint_interval =
            args.checkpoint_interval.or(file.checkpoint_interval).unwrap_or(Duration::from_secs(30));
        let config = Self {
            http: args.http.or(file.http).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            grpc: args.grpc.or(file.grpc).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051))),
            data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("./bazaar-data")),
            admin_key: args.admin_key.or(file.admin_key),
            idle_timeout: args.idle_timeout.or(file.idle_timeout).unwrap_or(Duration::from_secs(300)),
            max_event_age: args.max_event_age.or(file.max_event_age).unwrap_or(Duration::from_secs(7 * 24 * 3600)),
            checkpoint_interval,
            checkpoint_spread: args.checkpoint_spread.or(file.checkpoint_spread).unwrap_or(checkpoint_interval / 2),
            drain_timeout: args.drain_timeout.or(file.drain_timeout).unwrap_or(Duration::from_secs(20)),
            engagement_interval: args
                .engagement_interval
                .or(file.engagement_interval)
                .unwrap_or(Duration::from_secs(60)),
            snapshot_every: args.snapshot_every.or(file.snapshot_every).unwrap_or(1_000),
            actor_threads: args
                .actor_threads
                .or(file.actor_threads)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            unary_batching: args.unary_batching.or(file.unary_batching).unwrap_or(true),
            transparent_huge_pages: args.transparent_huge_pages.or(file.transparent_huge_pages).unwrap_or(false),
            max_body_bytes: args.max_body_bytes.or(file.max_body_bytes).unwrap_or(1 << 20),
            cache_bytes: args.cache_bytes.or(file.cache_bytes).unwrap_or(crate::storage::DEFAULT_CACHE_BYTES),
            log_format: match args.log_format.or(file.log_format) {
                Some(LogFormatArg::Json) => LogFormat::Json,
                _ => LogFormat::Text,
            },
            log: args.log.or(file.log).unwrap_or_else(|| "info".into()),
        };
        config.validate()?;
        Ok(config)
    }

    /// Every setting at its default (data in `./bazaar-data`).
    pub fn defaults() -> Self {
        Self::build(ServeArgs::default()).expect("the defaults are valid")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if let Some(key) = &self.admin_key {
            if key.len() < 16 {
                return invalid("admin_key", "must be at least 16 characters");
            }
        }
        if self.idle_timeout < Duration::from_millis(10) {
            return invalid("idle_timeout", "must be at least 10ms");
        }
        if self.max_event_age < Duration::from_secs(60) {
            return invalid("max_event_age", "must be at least 1m");
        }
        if self.checkpoint_interval < Duration::from_millis(100) {
            return invalid("checkpoint_interval", "must be at least 100ms");
        }
        if self.checkpoint_interval <= self.checkpoint_spread {
            return invalid("checkpoint_spread", "must be shorter than checkpoint_interval");
        }
        if Duration::from_secs(3600) < self.drain_timeout {
            return invalid("drain_timeout", "must be at most 1h");
        }
        if self.engagement_interval < Duration::from_millis(100) {
            return invalid("engagement_interval", "must be at least 100ms");
        }
        if self.snapshot_every == 0 {
            return invalid("snapshot_every", "must be at least 1");
        }
        if !(1..=64).contains(&self.actor_threads) {
            return invalid("actor_threads", "must be between 1 and 64");
        }
        if !(1024..=64 << 20).contains(&self.max_body_bytes) {
            return invalid("max_body_bytes", "must be between 1024 and 67108864");
        }
        if self.cache_bytes < 1 << 20 {
            return invalid("cache_bytes", "must be at least 1048576 (1 MiB)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bazaar.toml");
        std::fs::write(
            &path,
            "http = \"127.0.0.1:9000\"\nidle_timeout = \"2m\"\nsnapshot_every = 10\nunary_batching = false\n\
             transparent_huge_pages = true\n",
        )
        .expect("write");
        let args = ServeArgs { config: Some(path), snapshot_every: Some(20), ..ServeArgs::default() };
        let config = NodeConfig::build(args).expect("valid");
        assert_eq!(config.http, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(config.idle_timeout, Duration::from_secs(120));
        assert_eq!(config.snapshot_every, 20);
        assert!(!config.unary_batching, "the file turns batching off");
        assert!(NodeConfig::defaults().unary_batching, "on by default");
        assert!(config.transparent_huge_pages, "the file turns huge pages on");
        assert!(!NodeConfig::defaults().transparent_huge_pages, "off by default");
        assert_eq!(config.max_event_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(config.checkpoint_spread, Duration::from_secs(15), "half the default interval");
        assert_eq!(config.drain_timeout, Duration::from_secs(20));
        let config =
            NodeConfig::build(ServeArgs { checkpoint_interval: Some(Duration::from_secs(10)), ..ServeArgs::default() })
                .expect("valid");
        assert_eq!(config.checkpoint_spread, Duration::from_secs(5), "half the interval set");
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bazaar.toml");
        std::fs::write(&path, "htp = \"127.0.0.1:9000\"\n").expect("write");
        let error =
            NodeConfig::build(ServeArgs { config: Some(path), ..ServeArgs::default() }).expect_err("unknown key");
        assert!(error.to_string().contains("htp"), "{error}");
        let error = NodeConfig::build(ServeArgs { admin_key: Some("short".into()), ..ServeArgs::default() })
            .expect_err("short key");
        assert_eq!(error.to_string(), "admin_key: must be at least 16 characters");
        let error =
            NodeConfig::build(ServeArgs { actor_threads: Some(0), ..ServeArgs::default() }).expect_err("no threads");
        assert!(error.to_string().starts_with("actor_threads:"), "{error}");
        let error = NodeConfig::build(ServeArgs {
            checkpoint_interval: Some(Duration::from_secs(10)),
            checkpoint_spread: Some(Duration::from_secs(10)),
            ..ServeArgs::default()
        })
        .expect_err("a spread as long as the interval");
        assert_eq!(error.to_string(), "checkpoint_spread: must be shorter than checkpoint_interval");
        let error =
            NodeConfig::build(ServeArgs { drain_timeout: Some(Duration::from_secs(7200)), ..ServeArgs::default() })
                .expect_err("a drain of two hours");
        assert_eq!(error.to_string(), "drain_timeout: must be at most 1h");
    }
}

//! `rangekv node` and `rangekv pd`: run one process of a cluster until SIGTERM or
//! Ctrl-C, then stop gracefully.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rangekv_log::LogIo;
use rangekv_node::NodeConfig;
use serde::Deserialize;

/// `rangekv node` flags. A flag given on the command line wins over the config file.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// Directory of the store's raft log and state machine (created if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address the gRPC server (Kv and Raft services) listens on.
    #[arg(long, default_value = "127.0.0.1:20160")]
    pub listen: SocketAddr,
    /// Address other stores and clients use to reach this one (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Placement driver endpoint.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub pd: String,
    /// TOML config file (see deploy/node.toml for every key and its default).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Worker threads driving the ranges.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Raft log I/O: auto, uring or sync.
    #[arg(long)]
    pub log_io: Option<String>,
    /// Seconds to keep retrying PD at start before giving up.
    #[arg(long, default_value_t = 30)]
    pub pd_wait_secs: u64,
}

/// The config file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    workers: Option<usize>,
    tick_interval_ms: Option<u64>,
    election_timeout_ticks: Option<usize>,
    heartbeat_interval_ticks: Option<usize>,
    request_bytes_max: Option<usize>,
    quiesce: Option<bool>,
    quiesce_after_ticks: Option<u32>,
    session_ttl_secs: Option<u64>,
    log_gc_entries: Option<u64>,
    log_gc_lag_entries: Option<u64>,
    #[serde(default)]
    log: LogFileConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogFileConfig {
    io: Option<String>,
    segment_bytes: Option<u64>,
    cache_bytes_max: Option<usize>,
    fill_segments: Option<bool>,
    recycle_segments: Option<usize>,
}

fn parse_io(value: &str) -> anyhow::Result<LogIo> {
    match value {
        "auto" => Ok(LogIo::Auto),
        "uring" => Ok(LogIo::Uring),
        "sync" => Ok(LogIo::Sync),
        other => anyhow::bail!("log io is {other:?}; it must be auto, uring or sync"),
    }
}

fn read_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

impl NodeArgs {
    pub fn into_config(self) -> anyhow::Result<NodeConfig> {
        let file = match &self.config {
            Some(path) => read_config(path)?,
            None => FileConfig::default(),
        };
        let mut config = NodeConfig::new(self.data_dir, self.listen, self.pd);
        config.advertise = self.advertise;
        config.pd_connect_timeout = Duration::from_secs(self.pd_wait_secs);
        if let Some(workers) = self.workers.or(file.workers) {
            anyhow::ensure!(
                (1..=64).contains(&workers),
                "workers is {workers}; it must be in 1..=64"
            );
            config.store.workers = workers;
        }
        if let Some(ms) = file.tick_interval_ms {
            anyhow::ensure!(
                (10..=10_000).contains(&ms),
                "tick_interval_ms is {ms}; it must be in 10..=10000"
            );
            config.store.tick_interval = Duration::from_millis(ms);
        }
        if let Some(ticks) = file.election_timeout_ticks {
            config.store.replica.election_timeout_ticks = ticks;
        }
        if let Some(ticks) = file.heartbeat_interval_ticks {
            config.store.replica.heartbeat_interval_ticks = ticks;
        }
        config
            .store
            .replica
            .raft_config(rangekv_types::PeerId(1), 0)
            .context(
                "invalid raft timing (election_timeout_ticks must exceed heartbeat_interval_ticks)",
            )?;
        if let Some(quiesce) = file.quiesce {
            config.store.quiesce = quiesce;
        }
        if let Some(ticks) = file.quiesce_after_ticks {
            anyhow::ensure!(
                ticks >= 1,
                "quiesce_after_ticks is 0; it must be at least 1"
            );
            config.store.quiesce_after_ticks = ticks;
        }
        if let Some(secs) = file.session_ttl_secs {
            anyhow::ensure!(
                (10..=30 * 24 * 3600).contains(&secs),
                "session_ttl_secs is {secs}; it must be in 10..=2592000 (30 days)"
            );
            config.store.session_ttl = Duration::from_secs(secs);
        }
        if let Some(entries) = file.log_gc_entries {
            anyhow::ensure!(
                entries >= 2,
                "log_gc_entries is {entries}; it must be at least 2"
            );
            config.store.log_gc_entries = entries;
        }
        if let Some(entries) = file.log_gc_lag_entries {
            anyhow::ensure!(
                entries >= 1,
                "log_gc_lag_entries is {entries}; it must be at least 1"
            );
            config.store.log_gc_lag_entries = entries;
        }
        if let Some(bytes) = file.request_bytes_max {
            anyhow::ensure!(
                bytes >= 1 << 20,
                "request_bytes_max is {bytes}; it must be at least 1 MiB"
            );
            config.request_bytes_max = bytes;
        }
        if let Some(io) = self.log_io.as_deref().or(file.log.io.as_deref()) {
            config.log.io = parse_io(io)?;
        }
        if let Some(bytes) = file.log.segment_bytes {
            anyhow::ensure!(
                bytes >= 1 << 20,
                "log.segment_bytes is {bytes}; it must be at least 1 MiB"
            );
            config.log.segment_bytes = bytes;
        }
        if let Some(bytes) = file.log.cache_bytes_max {
            config.log.cache_bytes_max = bytes;
        }
        if let Some(fill) = file.log.fill_segments {
            config.log.fill_segments = fill;
        }
        if let Some(count) = file.log.recycle_segments {
            config.log.recycle_segments = count;
        }
        Ok(config)
    }
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts from now on)
/// until [`terminated`] has installed their handlers: one arriving while a node or
/// PD starts is held, then handled as a request to stop, never the default action
/// (death by the signal, with nothing shut down).
pub fn hold_stop_signals() {
    let set = stop_signals();
    // SAFETY: pthread_sigmask on the calling thread with a valid set.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C). Both handlers are installed when this is
/// called (not when first polled), then the signals held since start-up
/// ([`hold_stop_signals`]) are released to them: none is lost.
pub fn terminated() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).ok();
    let interrupt = signal(SignalKind::interrupt()).ok();
    let set = stop_signals();
    // SAFETY: pthread_sigmask on the calling thread with a valid set.
    unsafe {
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    async move {
        match (term, interrupt) {
            (Some(mut term), Some(mut interrupt)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            // No handler could be installed: Ctrl-C through tokio's own.
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

pub async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    if let Ok(spec) = std::env::var("RANGEKV_FAILPOINTS") {
        rangekv_log::configure_failpoints(&spec)
            .map_err(|error| anyhow::anyhow!("RANGEKV_FAILPOINTS: {error}"))?;
        tracing::warn!(%spec, "failpoints armed (fault injection for tests)");
    }
    let stop = terminated();
    let node = rangekv_node::start(config).await?;
    tracing::info!(addr = %node.addr(), store = %node.store().store_id(), "node serving");
    let failed = tokio::select! {
        _ = stop => false,
        _ = node.failed() => true,
    };
    tracing::info!("stopping");
    node.shutdown().await;
    if failed {
        anyhow::bail!("the store stopped on a fatal error (see the log above)");
    }
    Ok(())
}

pub async fn run_pd(args: rangekv_placement::server::PdArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    tracing::info!(listen = %config.listen, "placement driver serving");
    rangekv_placement::server::serve(config, terminated()).await
}

//! PD's entry points: configuration, command-line flags, and the gRPC server, run to a
//! shutdown signal ([`serve`]) or in the background of a test ([`spawn`]).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use rangekv_rpc::proto::placement_server::PlacementServer;
use rangekv_types::limits;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::bootstrap::{self, SplitKeys, INITIAL_RANGES_MAX};
use crate::cluster::{Cluster, ClusterConfig};
use crate::service::{lock, now_unix_ms, PlacementService};

/// Default replicas per range.
pub const REPLICAS_DEFAULT: usize = 3;
/// Default time without a heartbeat after which a store is `DOWN`.
pub const STORE_DOWN_AFTER_DEFAULT: Duration = Duration::from_secs(30);
/// Default listen address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:2379";

/// How to run a placement driver.
#[derive(Debug, Clone)]
pub struct PdConfig {
    /// Directory of PD's metadata (RocksDB); created if missing.
    pub data_dir: PathBuf,
    /// gRPC listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where the bootstrap ranges are cut: sorted, distinct, non-empty keys.
    pub split_keys: Vec<Vec<u8>>,
    /// Replicas per bootstrap range; bootstrap waits for this many stores.
    pub replicas: usize,
    /// A store not heard from for this long is `DOWN`.
    pub store_down_after: Duration,
}

impl PdConfig {
    /// Defaults: listen on 127.0.0.1:2379, one range, 3 replicas, stores down after 30 s.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PdConfig {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 2379)),
            split_keys: Vec::new(),
            replicas: REPLICAS_DEFAULT,
            store_down_after: STORE_DOWN_AFTER_DEFAULT,
        }
    }

    fn cluster_config(&self) -> anyhow::Result<ClusterConfig> {
        let split_keys = SplitKeys::new(self.split_keys.clone()).context("--split-keys")?;
        bootstrap::check_replicas(self.replicas).context("--replicas")?;
        if self.store_down_after.is_zero() {
            bail!("--store-down-after-secs: the store-down timeout must be above zero");
        }
        Ok(ClusterConfig {
            split_keys,
            replicas: self.replicas,
            store_down_after: self.store_down_after,
        })
    }
}

/// `rangekv pd` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PdArgs {
    /// Directory of PD's metadata (created if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address the gRPC server listens on.
    #[arg(long, default_value = LISTEN_DEFAULT)]
    pub listen: SocketAddr,
    /// Keys where the bootstrap ranges are cut, comma-separated, in increasing order.
    #[arg(long, value_delimiter = ',', conflicts_with = "initial_ranges")]
    pub split_keys: Vec<String>,
    /// Bootstrap this many ranges, cut evenly over YCSB's key space ("user" + hash).
    #[arg(long)]
    pub initial_ranges: Option<usize>,
    /// Replicas per range; bootstrap waits for this many stores.
    #[arg(long, default_value_t = REPLICAS_DEFAULT)]
    pub replicas: usize,
    /// Seconds without a heartbeat after which a store is reported DOWN.
    #[arg(long, default_value_t = STORE_DOWN_AFTER_DEFAULT.as_secs())]
    pub store_down_after_secs: u64,
}

impl PdArgs {
    /// Checks the flags and turns them into a [`PdConfig`].
    pub fn into_config(self) -> anyhow::Result<PdConfig> {
        let split_keys = match self.initial_ranges {
            Some(ranges) if ranges == 0 || ranges > INITIAL_RANGES_MAX => {
                bail!("--initial-ranges is {ranges}; it must be in 1..={INITIAL_RANGES_MAX}")
            }
            Some(ranges) => bootstrap::ycsb_split_keys(ranges),
            None => self
                .split_keys
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        };
        let config = PdConfig {
            data_dir: self.data_dir,
            listen: self.listen,
            split_keys,
            replicas: self.replicas,
            store_down_after: Duration::from_secs(self.store_down_after_secs),
        };
        config.cluster_config().context("invalid pd flags")?;
        Ok(config)
    }
}

/// Runs PD until `shutdown` completes (then drains connections and returns) or a
/// fatal metadata error stops it (then returns that error).
pub async fn serve(
    config: PdConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (cluster, listener) = open(&config).await?;
    run(cluster, listener, shutdown).await
}

/// A PD running in the background of this process.
#[derive(Debug)]
pub struct PdHandle {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl PdHandle {
    /// The address the server is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL clients connect to: `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server gracefully and waits until it has stopped and closed its
    /// metadata. Dropping the handle instead stops it without waiting.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            // An error means the server already stopped; the task says why.
            let _ = shutdown.send(());
        }
        (&mut self.task)
            .await
            .context("placement server task panicked")?
    }
}

/// Opens the metadata and binds the listener (port 0 works), then serves on a tokio
/// task; for tests and in-process clusters.
pub async fn spawn(config: PdConfig) -> anyhow::Result<PdHandle> {
    let (cluster, listener) = open(&config).await?;
    let addr = listener.local_addr().context("listener address")?;
    let (shutdown, shutdown_requested) = oneshot::channel::<()>();
    let signal = async move {
        // A dropped handle stops the server too.
        let _ = shutdown_requested.await;
    };
    let task = tokio::spawn(run(cluster, listener, signal));
    Ok(PdHandle {
        addr,
        shutdown: Some(shutdown),
        task,
    })
}

async fn open(config: &PdConfig) -> anyhow::Result<(Arc<Mutex<Cluster>>, TcpListener)> {
    let cluster_config = config.cluster_config()?;
    let dir = config.data_dir.clone();
    let cluster = tokio::task::spawn_blocking(move || -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("create data directory {}", dir.display()))?;
        let cluster = Cluster::open(&dir, cluster_config, now_unix_ms())
            .with_context(|| format!("open placement metadata in {}", dir.display()))?;
        Ok(cluster)
    })
    .await
    .context("opening placement metadata panicked")??;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    Ok((Arc::new(Mutex::new(cluster)), listener))
}

async fn run(
    cluster: Arc<Mutex<Cluster>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener address")?;
    let stopped = Arc::new(Notify::new());
    let service = PlacementService::new(Arc::clone(&cluster), Arc::clone(&stopped));
    let signal = async move {
        tokio::select! {
            () = shutdown => {}
            () = stopped.notified() => {}
        }
    };
    tracing::info!(%addr, "placement driver serving");
    Server::builder()
        .add_service(
            PlacementServer::new(service).max_decoding_message_size(limits::REQUEST_BYTES_MAX),
        )
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), signal)
        .await
        .with_context(|| format!("placement gRPC server on {addr}"))?;
    let stopped = lock(&cluster)
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .stopped()
        .map(str::to_owned);
    match stopped {
        Some(reason) => bail!("placement driver stopped after a fatal error: {reason}"),
        None => {
            tracing::info!(%addr, "placement driver stopped");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        pd: PdArgs,
    }

    fn parse(args: &[&str]) -> Result<PdArgs, clap::Error> {
        let argv = ["pd", "--data-dir", "/tmp/pd"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| cli.pd)
    }

    #[test]
    fn flags_become_a_config() {
        let config = parse(&["--split-keys", "b,m"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(config.split_keys, [b"b".to_vec(), b"m".to_vec()]);
        assert_eq!(config.listen, LISTEN_DEFAULT.parse().unwrap());
        assert_eq!(config.replicas, 3);
        assert_eq!(config.store_down_after, STORE_DOWN_AFTER_DEFAULT);

        let config = parse(&[
            "--initial-ranges",
            "4",
            "--replicas",
            "1",
            "--listen",
            "0.0.0.0:0",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(config.split_keys, bootstrap::ycsb_split_keys(4));
        assert_eq!((config.split_keys.len(), config.replicas), (3, 1));
        assert_eq!(
            parse(&[]).unwrap().into_config().unwrap().split_keys.len(),
            0
        );
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        let both = parse(&["--split-keys", "m", "--initial-ranges", "4"]).unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        let error =
            |args: &[&str]| format!("{:#}", parse(args).unwrap().into_config().unwrap_err());
        let unsorted = error(&["--split-keys", "m,b"]);
        assert!(unsorted.contains("--split-keys") && unsorted.contains("strictly increasing"));
        assert!(error(&["--split-keys", "a,,b"]).contains("split key 1 is empty"));
        assert!(error(&["--initial-ranges", "0"]).contains("--initial-ranges is 0"));
        assert!(error(&["--replicas", "0"]).contains("--replicas"));
        assert!(error(&["--store-down-after-secs", "0"]).contains("--store-down-after-secs"));
    }
}

//! A node's lifecycle: open the log and state machine under the data directory,
//! register with PD, start the store and the gRPC server, report to PD, stop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rangekv_log::file::DiskFileSystem;
use rangekv_log::{LogConfig, LogEngine, LogIo};
use rangekv_rpc::proto::{
    self, kv_server::KvServer, placement_client::PlacementClient, raft_server::RaftServer,
};
use rangekv_state::StateMachine;
use rangekv_types::{limits, RangeId, StoreId};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::error::NodeError;
use crate::service::{KvService, RaftService};
use crate::store::{Store, StoreConfig};
use crate::transport::GrpcTransport;

/// How long a stopping node lets requests in flight finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// The node's raft log I/O: `pwrite` + `fdatasync` on the log's writer thread.
///
/// A store's log has one producer, its raft worker, which hands each loop's appends
/// over with a callback. On io_uring (`auto`), groups that overlap go through the ring,
/// each one a hop to a kernel io-wq worker and back; on a node whose cores are busy
/// those hops cost more than the overlap gains. Measured on the YCSB bench (embedded
/// 3-node cluster, 2 cores, bench/README.md "Throughput levers"): the 256-thread load
/// made 8–12 % more inserts/s with ~35 % fewer context switches, one client thread
/// ~30 % more (p50 ~330 µs against ~420 µs), 16 threads the same. `log.io = auto` or
/// `uring` still select the ring.
pub const NODE_LOG_IO: LogIo = LogIo::Sync;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address other stores and clients use; defaults to the bound address.
    pub advertise: Option<String>,
    /// PD endpoint, e.g. `http://127.0.0.1:2379`.
    pub pd: String,
    pub store: StoreConfig,
    pub log: LogConfig,
    /// gRPC messages larger than this are refused (tonic's decode limit).
    pub request_bytes_max: usize,
    pub store_heartbeat_interval: Duration,
    pub range_heartbeat_interval: Duration,
    /// How long to keep retrying PD at start.
    pub pd_connect_timeout: Duration,
}

impl NodeConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr, pd: String) -> Self {
        NodeConfig {
            data_dir,
            listen,
            advertise: None,
            pd,
            store: StoreConfig::default(),
            log: LogConfig {
                io: NODE_LOG_IO,
                ..LogConfig::default()
            },
            request_bytes_max: limits::REQUEST_BYTES_MAX,
            store_heartbeat_interval: Duration::from_secs(1),
            range_heartbeat_interval: Duration::from_secs(1),
            pd_connect_timeout: Duration::from_secs(30),
        }
    }
}

pub struct Node {
    store: Arc<Store>,
    transport: Arc<GrpcTransport>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    failed: Arc<Notify>,
}

impl Node {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn transport(&self) -> &Arc<GrpcTransport> {
        &self.transport
    }

    /// Resolves when the store stopped on a fatal error (a failed log write or sync).
    pub async fn failed(&self) {
        self.failed.notified().await
    }

    /// Stops serving, stops the workers and waits for both. Requests in flight get
    /// up to [`SHUTDOWN_GRACE`] to finish; raft streams from other stores, which never
    /// finish on their own, are cut after it.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            task.abort();
        }
        // Silence first: no more raft traffic or ticks leave this store, and the
        // workers stop; then the server gets its grace period.
        self.transport.stop();
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        if let Some(mut server) = self.server.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
                .await
                .is_err()
            {
                server.abort();
                let _ = server.await;
            }
        }
        // Requests in flight hold the store for a moment (their answers fail now that
        // the workers are gone); the state machine and log close with the last one.
        let give_up = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while Arc::strong_count(&self.store) > 1 && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if Arc::strong_count(&self.store) > 1 {
            tracing::warn!("store still referenced after shutdown; its files close when released");
        }
    }
}

async fn connect_pd(
    endpoint: &str,
    patience: Duration,
) -> Result<PlacementClient<Channel>, NodeError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Duration::from_millis(50);
    loop {
        match PlacementClient::connect(endpoint.to_string()).await {
            Ok(client) => return Ok(client),
            Err(error) if tokio::time::Instant::now() + backoff < deadline => {
                tracing::info!(%endpoint, %error, "waiting for PD");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(error) => {
                return Err(NodeError::PlacementUnreachable {
                    endpoint: endpoint.to_string(),
                    error,
                })
            }
        }
    }
}

/// Starts a node. Returns once it is registered with PD and serving.
pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
    std::fs::create_dir_all(&config.data_dir)?;
    let state_dir = config.data_dir.join("state");
    let log_dir = config.data_dir.join("raft-log");
    std::fs::create_dir_all(&log_dir)?;
    let log_config = config.log.clone();
    let (state, log) = tokio::task::spawn_blocking(move || -> Result<_, NodeError> {
        let state = StateMachine::open(&state_dir)?;
        let log = LogEngine::open(Arc::new(DiskFileSystem::open(&log_dir)?), log_config)?;
        Ok((Arc::new(state), log))
    })
    .await??;
    tracing::info!(io = log.io_backend(), "raft log open");
    tracing::info!(
        direct_io = state.direct_io(),
        "state machine open (memtable flushes and compactions with O_DIRECT where the file system allows it)"
    );

    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());

    let mut pd = connect_pd(&config.pd, config.pd_connect_timeout).await?;
    let known = state.store_id()?;
    let registered = pd
        .register_store(proto::RegisterStoreRequest {
            store_id: known.unwrap_or(0),
            address: advertise.clone(),
        })
        .await?
        .into_inner();
    let store_id = StoreId(registered.store_id);
    if known.is_none() {
        state.set_store_id(store_id.get())?;
    }
    tracing::info!(%store_id, %advertise, "registered with PD");

    let transport = GrpcTransport::new(
        store_id,
        config.pd.clone(),
        tokio::runtime::Handle::current(),
        raft_bytes_max(&config),
    );
    let failed = Arc::new(Notify::new());
    let on_fatal = failed.clone();
    let mut store_config = config.store.clone();
    // A snapshot travels inside one raft message, which the transport bounds.
    store_config.snapshot_bytes_max = store_config
        .snapshot_bytes_max
        .min(config.request_bytes_max);
    let store_transport: Arc<dyn crate::transport::Transport> = Arc::new(transport.clone());
    let store = tokio::task::spawn_blocking(move || {
        Store::start(
            store_id,
            store_config,
            log,
            state,
            store_transport,
            Box::new(move |why| {
                tracing::error!(%why, "store stopped");
                on_fatal.notify_waiters();
                on_fatal.notify_one();
            }),
        )
    })
    .await??;
    let weak = Arc::downgrade(&store);
    transport.on_unreachable(Box::new(move |to| {
        if let Some(store) = weak.upgrade() {
            store.report_unreachable(to);
        }
    }));
    for (_, info) in store.ranges() {
        for replica in info.descriptor().replicas {
            transport.add_store(StoreId(replica.store_id));
        }
    }
    transport.start_ticker(config.store.tick_interval);

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut server_shutdown = shutdown_rx.clone();
    let kv = KvServer::new(KvService::new(&store, config.request_bytes_max))
        .max_decoding_message_size(config.request_bytes_max + (1 << 20))
        .max_encoding_message_size(config.request_bytes_max + (1 << 20));
    let raft = RaftServer::new(RaftService::new(&store))
        .max_decoding_message_size(raft_bytes_max(&config))
        .max_encoding_message_size(raft_bytes_max(&config));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(kv)
            .add_service(raft)
            // The builder's `tcp_nodelay` is ignored with an incoming stream: set it on
            // the stream, or Nagle holds small answers until the client's delayed ACK
            // (~40 ms stalls, the p999 of every YCSB read before this).
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    let _ = server_shutdown.wait_for(|stop| *stop).await;
                },
            ),
    );

    let tasks = vec![
        tokio::spawn(store_heartbeats(
            pd.clone(),
            Arc::downgrade(&store),
            transport.clone(),
            advertise,
            config.store_heartbeat_interval,
        )),
        tokio::spawn(range_heartbeats(
            pd,
            Arc::downgrade(&store),
            config.range_heartbeat_interval,
        )),
    ];
    Ok(Node {
        store,
        transport,
        addr,
        shutdown,
        tasks,
        server: Some(server),
        failed,
    })
}

/// The largest raft batch: at most one entry above `BATCH_BYTES_TARGET`, itself
/// bounded by the request limit, plus framing.
fn raft_bytes_max(config: &NodeConfig) -> usize {
    config.request_bytes_max + crate::transport::BATCH_BYTES_TARGET + (1 << 20)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reports the store to PD and creates the replicas PD placed here at bootstrap.
async fn store_heartbeats(
    mut pd: PlacementClient<Channel>,
    store: Weak<Store>,
    transport: Arc<GrpcTransport>,
    address: String,
    interval: Duration,
) {
    let mut timer = tokio::time::interval(interval);
    loop {
        timer.tick().await;
        let Some(store) = store.upgrade() else {
            return;
        };
        let ranges = store.ranges();
        let leaders = ranges.iter().filter(|(_, info)| info.is_leader()).count();
        let request = proto::StoreHeartbeatRequest {
            store: Some(proto::StoreInfo {
                store_id: store.store_id().get(),
                address: address.clone(),
                state: proto::StoreState::Up as i32,
                range_count: ranges.len() as u64,
                leader_count: leaders as u64,
                capacity_bytes: 0,
                used_bytes: 0,
                last_heartbeat_unix_ms: unix_ms(),
            }),
            range_ids: ranges.iter().map(|(id, _)| id.get()).collect(),
        };
        match pd.store_heartbeat(request).await {
            Ok(response) => {
                let create = response.into_inner().create_ranges;
                for descriptor in &create {
                    for replica in &descriptor.replicas {
                        transport.add_store(StoreId(replica.store_id));
                    }
                }
                if !create.is_empty() {
                    store.create_ranges(create);
                }
            }
            Err(status) => tracing::warn!(%status, "store heartbeat to PD failed"),
        }
    }
}

/// Every this many range-heartbeat intervals, every led range is reported, changed
/// or not (PD may have restarted and lost its in-memory leaders).
const FULL_REPORT_EVERY: u32 = 60;

/// Reports the ranges this store leads to PD, in one request per interval: those whose
/// leadership, term or descriptor changed since the last report, and all of them
/// every [`FULL_REPORT_EVERY`] intervals.
async fn range_heartbeats(
    mut pd: PlacementClient<Channel>,
    store: Weak<Store>,
    interval: Duration,
) {
    let mut timer = tokio::time::interval(interval);
    let mut reported: HashMap<RangeId, (u64, proto::RangeDescriptor)> = HashMap::new();
    let mut round: u32 = 0;
    loop {
        timer.tick().await;
        let Some(store) = store.upgrade() else {
            return;
        };
        let full = round % FULL_REPORT_EVERY == 0;
        round = round.wrapping_add(1);
        let mut current = Vec::new();
        let ranges: Vec<proto::RangeReport> = store
            .ranges()
            .into_iter()
            .filter(|(_, info)| info.is_leader())
            .filter_map(|(id, info)| {
                let term = info.term.load(Ordering::Relaxed);
                let descriptor = info.descriptor();
                let changed = reported
                    .get(&id)
                    .is_none_or(|(t, d)| *t != term || *d != descriptor);
                current.push((id, (term, descriptor.clone())));
                (full || changed).then(|| proto::RangeReport {
                    range: Some(descriptor),
                    leader: info.leader(),
                    term,
                    applied_index: info.applied.load(Ordering::Relaxed),
                })
            })
            .collect();
        let store_id = store.store_id().get();
        drop(store);
        if ranges.is_empty() {
            continue;
        }
        let request = proto::RangeHeartbeatRequest { store_id, ranges };
        match pd.range_heartbeat(request).await {
            Ok(_) => reported = current.into_iter().collect(),
            Err(status) => tracing::warn!(%status, "range heartbeat to PD failed"),
        }
    }
}

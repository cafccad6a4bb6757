//! What a store's threads share: its configuration, the per-range state services
//! read without a trip through a worker (`RangeInfo`), counters, and `StoreShared`.
//! Its own module, so that `store` (which starts workers) and `worker` (which reads
//! this) do not import each other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rangekv_log::LogEngine;
use rangekv_raftstore::ReplicaConfig;
use rangekv_rpc::proto;
use rangekv_rpc::RangeDescriptor;
use rangekv_state::StateMachine;
use rangekv_types::{RangeId, StoreId};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::transport::Transport;

/// Settings of the store driver. Units last.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub workers: usize,
    pub tick_interval: Duration,
    pub replica: ReplicaConfig,
    /// Requests and raft messages queued per worker before `ServerBusy`.
    pub inbox_messages_max: usize,
    /// Idle ranges stop ticking (see `rangekv_raftstore::operation::quiesce`).
    pub quiesce: bool,
    /// Ticks without a proposal or read before a leader quiesces its range.
    pub quiesce_after_ticks: u32,
    /// A leader proposes log compaction once at least this many applied entries, held
    /// by every follower, can be dropped.
    pub log_gc_entries: u64,
    /// A follower more than this many entries behind its leader's applied index no
    /// longer holds the log back; it catches up by snapshot. Off (`u64::MAX`) by
    /// default: snapshots travel in one message, so only ranges below
    /// `snapshot_bytes_max` can be caught up that way.
    pub log_gc_lag_entries: u64,
    /// The largest snapshot (encoded range state) a leader sends; a larger range's
    /// followers wait (snapshots travel inside one raft message).
    pub snapshot_bytes_max: usize,
    /// A log compaction waiting for the state machine's flush (applies skip RocksDB's
    /// WAL, so the log keeps what is not flushed) asks RocksDB for a flush after this
    /// long. A busy store flushes by itself far sooner; an idle one would never.
    pub log_gc_flush_after: Duration,
    /// Seeds every replica's randomized election timeouts (mixed with its peer id).
    pub election_seed: u64,
    /// Client sessions idle this long at a range are dropped there (the leader stamps
    /// it on each entry: see `rangekv_raftstore::session`).
    pub session_ttl: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            workers: 2,
            tick_interval: Duration::from_millis(100),
            replica: ReplicaConfig::default(),
            inbox_messages_max: 65_536,
            quiesce: true,
            quiesce_after_ticks: 20,
            log_gc_entries: 4096,
            // Off: a snapshot is one message, so a range larger than
            // `snapshot_bytes_max` could leave a follower stranded below the log.
            log_gc_lag_entries: u64::MAX,
            snapshot_bytes_max: rangekv_types::limits::REQUEST_BYTES_MAX,
            log_gc_flush_after: Duration::from_secs(10),
            session_ttl: Duration::from_secs(600),
            election_seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5EED),
        }
    }
}

/// What the store shares about one range with the services and PD reporting.
pub struct RangeInfo {
    pub worker: usize,
    pub descriptor: RwLock<RangeDescriptor>,
    /// raft-rs id of the leader this replica knows (0 = unknown).
    pub leader_peer: AtomicU64,
    pub term: AtomicU64,
    pub applied: AtomicU64,
    pub local_peer: u64,
    /// Whether the replica was quiesced at its worker's last tick.
    pub quiesced: AtomicBool,
    /// Until when the replica's lease lets a read be served on the caller's thread,
    /// without a trip through the worker (TiKV's local reader): nanoseconds after
    /// `clock_base()`, 0 = no lease. The worker publishes it after every loop that
    /// touched the range (`Replica::lease_valid_until`); it only ever lags the
    /// replica's own view by part of a loop, within a lease that is valid by time —
    /// and a valid lease means no other replica can have been elected. A leadership
    /// transfer voids the lease: whoever adds transfers must publish before sending
    /// `MsgTimeoutNow`.
    pub lease_until: AtomicU64,
    /// Reads served from the published lease, for tests and metrics.
    pub local_reads: AtomicU64,
}

/// The origin of the nanosecond instants `RangeInfo::lease_until` holds.
pub fn clock_base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl RangeInfo {
    pub fn descriptor(&self) -> RangeDescriptor {
        self.descriptor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_leader(&self) -> bool {
        self.leader_peer.load(Ordering::Relaxed) == self.local_peer
    }

    /// Publishes the replica's lease (see `lease_until`).
    pub(crate) fn publish_lease(&self, until: Option<Instant>) {
        // A lease that ends at or before the base is no lease (0).
        let nanos = until.map_or(0, |until| {
            until
                .saturating_duration_since(clock_base())
                .as_nanos()
                .min(u128::from(u64::MAX)) as u64
        });
        self.lease_until.store(nanos, Ordering::SeqCst);
    }

    /// Whether a linearizable read may be served here and now from the published lease.
    pub fn lease_holds(&self, now: Instant) -> bool {
        let until = self.lease_until.load(Ordering::SeqCst);
        until != 0
            && self.is_leader()
            && now.saturating_duration_since(clock_base()).as_nanos() < u128::from(until)
    }

    /// The leader as a `Peer` of the descriptor, when known.
    pub fn leader(&self) -> Option<proto::Peer> {
        let leader = self.leader_peer.load(Ordering::Relaxed);
        self.descriptor()
            .replicas
            .into_iter()
            .find(|p| p.peer_id == leader && leader != 0)
    }

    pub fn not_leader(&self) -> proto::Error {
        proto::Error {
            kind: Some(proto::error::Kind::NotLeader(proto::NotLeader {
                range_id: self.descriptor().range_id,
                leader: self.leader(),
            })),
        }
    }
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Batch-commands messages received, and the requests they carried.
    pub batch_messages_in: AtomicU64,
    pub batch_requests_in: AtomicU64,
    pub raft_messages_in: AtomicU64,
    pub heartbeats_in: AtomicU64,
    pub inbox_full: AtomicU64,
    /// Snapshots this store built as a leader, and installed as a follower.
    pub snapshots_built: AtomicU64,
    pub snapshots_installed: AtomicU64,
}

pub(crate) struct StoreShared {
    pub store_id: StoreId,
    pub config: StoreConfig,
    pub log: LogEngine,
    pub state: Arc<StateMachine>,
    pub ranges: RwLock<FxHashMap<RangeId, Arc<RangeInfo>>>,
    pub transport: Arc<dyn Transport>,
    pub counters: StoreCounters,
    /// Set when the store stops: at shutdown, or when the log engine failed. It serves nothing after.
    pub stopped: AtomicBool,
    pub fatal: Box<dyn Fn(String) + Send + Sync>,
    /// When each other store's last tick batch arrived: the store-level liveness
    /// that wakes quiesced followers of a silent leader's store.
    pub last_heard: Mutex<FxHashMap<StoreId, Instant>>,
}

impl StoreShared {
    /// Other stores that sent no tick batch within `within` (stores never heard from
    /// count as heard when this one `started`).
    pub fn silent_stores(&self, within: Duration, started: Instant) -> FxHashSet<StoreId> {
        if started.elapsed() < within {
            return FxHashSet::default();
        }
        let heard = self.last_heard.lock().unwrap_or_else(|p| p.into_inner());
        let mut silent: FxHashSet<StoreId> = self
            .transport
            .known_stores()
            .into_iter()
            .filter(|store| *store != self.store_id)
            .filter(|store| heard.get(store).is_none_or(|at| at.elapsed() >= within))
            .collect();
        silent.extend(
            heard
                .iter()
                .filter(|(_, at)| at.elapsed() >= within)
                .map(|(store, _)| *store),
        );
        silent
    }
}

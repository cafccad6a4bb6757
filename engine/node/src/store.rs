//! The store: every range replica on this node, sharded over a fixed pool of worker
//! threads, and the routing of requests and raft messages to them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use prost::Message as _;
use rangekv_log::LogEngine;
use rangekv_raftstore::HeartbeatKind;
use rangekv_rpc::proto;
use rangekv_rpc::RangeDescriptor;
use rangekv_state::StateMachine;
use rangekv_types::{RangeId, StoreId};
use rustc_hash::FxHashMap;

use crate::command::Responder;
use crate::message::{Control, Inbound};
use crate::transport::Transport;
use crate::worker::Worker;

pub(crate) use crate::shared::StoreShared;
pub use crate::shared::{clock_base, RangeInfo, StoreConfig, StoreCounters};

/// Raft message types a node makes for itself and never sends. From a peer they are
/// refused: a `MsgTransferLeader` stepped into a leader would start a leadership
/// transfer that bypasses `Replica::transfer_leader`, which voids the lease.
fn is_local_only(kind: raft::eraftpb::MessageType) -> bool {
    use raft::eraftpb::MessageType::*;
    matches!(
        kind,
        MsgHup | MsgBeat | MsgUnreachable | MsgSnapStatus | MsgCheckQuorum | MsgTransferLeader
    )
}

pub struct Store {
    shared: Arc<StoreShared>,
    inboxes: Vec<Sender<Inbound>>,
    /// The workers' ends of `inboxes`, kept to empty them at shutdown: a request left in
    /// an inbox holds its caller's answer channel open, and the caller would wait forever.
    drains: Vec<Receiver<Inbound>>,
    controls: Vec<Sender<Control>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Why a request could not be handed to its range.
#[derive(Debug)]
pub enum RouteError {
    RangeNotFound,
    Busy,
    Stopped,
}

impl Store {
    /// Opens every range recorded in `state` and starts the workers. `fatal` is called
    /// once when the store must stop (a failed log write or sync).
    pub fn start(
        store_id: StoreId,
        config: StoreConfig,
        log: LogEngine,
        state: Arc<StateMachine>,
        transport: Arc<dyn Transport>,
        fatal: Box<dyn Fn(String) + Send + Sync>,
    ) -> Result<Arc<Store>, crate::NodeError> {
        let workers = config.workers.max(1);
        // Fix the origin of published leases before any worker publishes one.
        let _ = clock_base();
        let shared = Arc::new(StoreShared {
            store_id,
            config: config.clone(),
            log,
            state,
            ranges: RwLock::new(FxHashMap::default()),
            transport,
            counters: StoreCounters::default(),
            stopped: AtomicBool::new(false),
            fatal,
            last_heard: Mutex::new(FxHashMap::default()),
        });
        let mut inboxes = Vec::new();
        let mut drains = Vec::new();
        let mut controls = Vec::new();
        let mut receivers: Vec<(Receiver<Inbound>, Receiver<Control>)> = Vec::new();
        for _ in 0..workers {
            let (inbox, inbox_rx) = crossbeam_channel::bounded(config.inbox_messages_max);
            let (control, control_rx) = crossbeam_channel::unbounded();
            inboxes.push(inbox);
            drains.push(inbox_rx.clone());
            controls.push(control);
            receivers.push((inbox_rx, control_rx));
        }
        let mut descriptors = Vec::new();
        for (range, raw) in shared.state.descriptors()? {
            let descriptor = RangeDescriptor::decode(&raw[..])
                .map_err(|error| crate::NodeError::Descriptor { range, error })?;
            descriptors.push(descriptor);
        }
        let mut threads = Vec::new();
        for (index, (inbox_rx, control_rx)) in receivers.into_iter().enumerate() {
            let mut worker = Worker::new(
                index,
                shared.clone(),
                inbox_rx,
                control_rx,
                controls[index].clone(),
            );
            for descriptor in descriptors
                .iter()
                .filter(|d| worker_of(RangeId(d.range_id), workers) == index)
            {
                worker.open_range(descriptor.clone(), true)?;
            }
            let guard = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("rangekv-worker-{index}"))
                    .spawn(move || {
                        // A panic (raft-rs calls `fatal!` on impossible input) must stop the
                        // store, not leave its ranges silently dead.
                        let run =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
                        if run.is_err() {
                            guard.stopped.store(true, Ordering::SeqCst);
                            (guard.fatal)(format!("worker {index} panicked"));
                        }
                    })?,
            );
        }
        Ok(Arc::new(Store {
            shared,
            inboxes,
            drains,
            controls,
            threads: Mutex::new(threads),
        }))
    }

    pub fn store_id(&self) -> StoreId {
        self.shared.store_id
    }

    pub fn config(&self) -> &StoreConfig {
        &self.shared.config
    }

    pub fn log(&self) -> &LogEngine {
        &self.shared.log
    }

    pub fn state(&self) -> &Arc<StateMachine> {
        &self.shared.state
    }

    pub fn counters(&self) -> &StoreCounters {
        &self.shared.counters
    }

    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    pub fn range(&self, range: RangeId) -> Option<Arc<RangeInfo>> {
        self.shared
            .ranges
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&range)
            .cloned()
    }

    pub fn ranges(&self) -> Vec<(RangeId, Arc<RangeInfo>)> {
        let mut out: Vec<_> = self
            .shared
            .ranges
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, info)| (*id, info.clone()))
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// Creates the replicas of ranges placed on this store at bootstrap (empty log,
    /// membership from the descriptor). Ranges that exist here are skipped.
    pub fn create_ranges(&self, descriptors: Vec<RangeDescriptor>) {
        let mut per_worker: Vec<Vec<RangeDescriptor>> = vec![Vec::new(); self.inboxes.len()];
        for descriptor in descriptors {
            let range = RangeId(descriptor.range_id);
            if self.range(range).is_none() {
                per_worker[worker_of(range, self.inboxes.len())].push(descriptor);
            }
        }
        for (worker, descriptors) in per_worker.into_iter().enumerate() {
            if !descriptors.is_empty() {
                let _ = self.controls[worker].send(Control::CreateRanges(descriptors));
            }
        }
    }

    fn inbox_for(&self, range: RangeId) -> Result<&Sender<Inbound>, RouteError> {
        if self.is_stopped() {
            return Err(RouteError::Stopped);
        }
        let info = self.range(range).ok_or(RouteError::RangeNotFound)?;
        Ok(&self.inboxes[info.worker])
    }

    fn send_inbound(&self, sender: &Sender<Inbound>, message: Inbound) -> Result<(), RouteError> {
        self.try_send_inbound(sender, message)
            .map_err(|(error, _)| error)
    }

    /// `send_inbound`, handing back a message that was not queued.
    fn try_send_inbound(
        &self,
        sender: &Sender<Inbound>,
        message: Inbound,
    ) -> Result<(), (RouteError, Option<Box<Inbound>>)> {
        match sender.try_send(message) {
            // Sent after shutdown emptied the inboxes: empty them again, so that nothing
            // waits on a worker that is gone (the flag is set before shutdown empties).
            Ok(()) if self.is_stopped() => {
                self.drop_queued();
                Err((RouteError::Stopped, None))
            }
            Ok(()) => Ok(()),
            Err(TrySendError::Full(message)) => {
                self.shared
                    .counters
                    .inbox_full
                    .fetch_add(1, Ordering::Relaxed);
                Err((RouteError::Busy, Some(Box::new(message))))
            }
            Err(TrySendError::Disconnected(message)) => {
                Err((RouteError::Stopped, Some(Box::new(message))))
            }
        }
    }

    /// Hands a client write to its range's worker. Refused, the responder comes back
    /// unanswered when it never reached the worker (no such range, inbox full, store
    /// stopped), so that the caller can answer the refusal itself; a write queued
    /// after the store stopped is dropped (its client learns the outcome is unknown).
    pub fn propose(
        &self,
        range: RangeId,
        command: proto::Command,
        respond: Responder,
    ) -> Result<(), (RouteError, Option<Responder>)> {
        let inbox = match self.inbox_for(range) {
            Ok(inbox) => inbox,
            Err(error) => return Err((error, Some(respond))),
        };
        let write = Inbound::Write {
            range,
            command,
            respond,
        };
        self.try_send_inbound(inbox, write)
            .map_err(|(error, returned)| match returned.map(|message| *message) {
                Some(Inbound::Write { respond, .. }) => (error, Some(respond)),
                _ => (error, None),
            })
    }

    /// Asks `range`'s replica here, if it leads, to hand leadership to `to_peer`.
    pub fn transfer_leader(
        &self,
        range: RangeId,
        to_peer: u64,
        respond: tokio::sync::oneshot::Sender<Result<(), proto::Error>>,
    ) -> Result<(), RouteError> {
        let inbox = self.inbox_for(range)?;
        self.send_inbound(
            inbox,
            Inbound::TransferLeader {
                range,
                to_peer,
                respond,
            },
        )
    }

    /// Asks for a linearizable read point on `range`: answered once the local state
    /// machine may serve the read (lease or ReadIndex, then apply).
    pub fn read(
        &self,
        range: RangeId,
        respond: tokio::sync::oneshot::Sender<Result<(), proto::Error>>,
    ) -> Result<(), RouteError> {
        let inbox = self.inbox_for(range)?;
        self.send_inbound(inbox, Inbound::Read { range, respond })
    }

    /// Delivers a batch received from another store.
    pub fn deliver(&self, batch: proto::RaftBatch) {
        if self.is_stopped() {
            return;
        }
        let workers = self.inboxes.len();
        let from = StoreId(batch.from_store);
        // Any batch shows the sender alive (tick batches are only the guaranteed ones).
        self.shared
            .last_heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(from, Instant::now());
        for envelope in batch.messages {
            let range = RangeId(envelope.range_id);
            // Parsed from the envelope's `Bytes`: the entries' data are slices of the
            // received buffer, not copies.
            let message =
                match <raft::eraftpb::Message as protobuf::Message>::parse_from_carllerche_bytes(
                    &envelope.message,
                ) {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::warn!(%from, %range, %error, "dropping a raft message that does not decode");
                        continue;
                    }
                };
            if is_local_only(message.get_msg_type()) {
                tracing::warn!(%from, %range, kind = ?message.get_msg_type(), "dropping a raft message that never crosses the network");
                continue;
            }
            self.shared
                .counters
                .raft_messages_in
                .fetch_add(1, Ordering::Relaxed);
            let worker = worker_of(range, workers);
            // A full inbox drops raft messages: raft retransmits.
            let _ = self.send_inbound(&self.inboxes[worker], Inbound::Raft { range, message });
        }
        for (list, kind) in [
            (batch.heartbeats, HeartbeatKind::Heartbeat),
            (batch.heartbeat_responses, HeartbeatKind::Response),
            (batch.quiesce, HeartbeatKind::Quiesce),
        ] {
            if list.is_empty() {
                continue;
            }
            self.shared
                .counters
                .heartbeats_in
                .fetch_add(list.len() as u64, Ordering::Relaxed);
            let mut per_worker: Vec<Vec<proto::CoalescedHeartbeat>> = vec![Vec::new(); workers];
            for heartbeat in list {
                per_worker[worker_of(RangeId(heartbeat.range_id), workers)].push(heartbeat);
            }
            for (worker, heartbeats) in per_worker.into_iter().enumerate() {
                if !heartbeats.is_empty() {
                    let _ = self.send_inbound(
                        &self.inboxes[worker],
                        Inbound::Heartbeats { heartbeats, kind },
                    );
                }
            }
        }
    }

    /// The transport could not reach `store`: raft-rs pauses replication to its peers.
    pub fn report_unreachable(&self, store: StoreId) {
        for control in &self.controls {
            let _ = control.send(Control::Unreachable(store));
        }
    }

    /// Stops the workers (pending requests are answered with an error) and waits.
    pub fn shutdown(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        for control in &self.controls {
            let _ = control.send(Control::Shutdown);
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
        self.drop_queued();
    }

    /// Drops every queued message: the callers of requests among them are answered
    /// that the store stopped (their answer channels close).
    fn drop_queued(&self) {
        for drain in &self.drains {
            while drain.try_recv().is_ok() {}
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Workers per store when `stores` stores share this machine (a local cluster, the
/// benchmark's embedded one): the cores divided among them, at least one. More
/// workers than cores only add context switches: YCSB load with three stores on two
/// cores served ~30 % less with two workers each than with one (bench/README.md).
pub fn co_located_workers(stores: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / stores.max(1)).max(1)
}

/// The worker that owns `range`: a hash of its id, because ids are not spread evenly
/// (PD allocates a range's id and then its peers' from one counter, so with three
/// replicas every range id is 1 mod 4 and `id % 2` put every range on one worker).
pub fn worker_of(range: RangeId, workers: usize) -> usize {
    // splitmix64's finalizer: every input bit moves every output bit.
    let mut x = range.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x % workers.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leadership transfer request from the network would bypass
    /// `Replica::transfer_leader` (which voids the lease); messages raft makes only
    /// for itself are refused, the ones peers exchange pass.
    #[test]
    fn raft_messages_a_node_only_makes_for_itself_are_refused_from_peers() {
        use raft::eraftpb::MessageType::*;
        for kind in [
            MsgTransferLeader,
            MsgHup,
            MsgBeat,
            MsgCheckQuorum,
            MsgUnreachable,
        ] {
            assert!(is_local_only(kind), "{kind:?}");
        }
        for kind in [
            MsgAppend,
            MsgAppendResponse,
            MsgRequestVote,
            MsgRequestPreVote,
            MsgHeartbeat,
            MsgReadIndex,
            MsgTimeoutNow,
        ] {
            assert!(!is_local_only(kind), "{kind:?}");
        }
    }

    /// PD numbers a range and then its three peers from one counter: range ids step
    /// by 4. Before the hash, all of them landed on one of two workers.
    #[test]
    fn ranges_numbered_as_pd_numbers_them_spread_over_the_workers() {
        for workers in [2usize, 3, 4] {
            let mut per_worker = vec![0usize; workers];
            for range in (1..).step_by(4).take(64) {
                per_worker[worker_of(RangeId(range), workers)] += 1;
            }
            let fair = 64 / workers;
            assert!(
                per_worker
                    .iter()
                    .all(|&n| n >= fair / 2 && n <= fair * 3 / 2),
                "{workers} workers: {per_worker:?}"
            );
        }
        assert_eq!(worker_of(RangeId(7), 1), 0);
        assert_eq!(worker_of(RangeId(7), 0), 0, "no workers is treated as one");
    }
}

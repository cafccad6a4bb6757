//! One worker thread of the store driver. Each loop iteration:
//! drain the inbox → tick due ranges → propose each range's gathered writes as one
//! entry and its gathered reads as one ReadIndex → `ready()` of every range with work
//! → **one** log write for all of them (persisted asynchronously) → send → apply
//! committed entries in one RocksDB batch → answer clients.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{select, Receiver, Sender};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, EntryType, Message, MessageType};
use raft::{RawNode, StateRole};
use rangekv_log::{LogBatch, LogError};
use rangekv_raftstore::replica::Replica;
use rangekv_rpc::proto;
use rangekv_rpc::RangeDescriptor;
use rangekv_state::ApplyState;
use rangekv_types::{RangeId, StoreId};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::oneshot;

use crate::command::{self, CommandResult, Responder};
use crate::storage::PeerStorage;
use crate::store::{RangeInfo, StoreShared};

pub(crate) type ReadResponder = oneshot::Sender<Result<(), proto::Error>>;

/// Requests and raft traffic; bounded (a full inbox answers `ServerBusy`).
pub(crate) enum Inbound {
    Raft {
        range: RangeId,
        message: Message,
    },
    Heartbeats {
        heartbeats: Vec<proto::CoalescedHeartbeat>,
        kind: HeartbeatKind,
    },
    Write {
        range: RangeId,
        command: proto::Command,
        respond: Responder,
    },
    Read {
        range: RangeId,
        respond: ReadResponder,
    },
}

/// What a coalesced heartbeat stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeartbeatKind {
    Heartbeat,
    Response,
    /// A heartbeat from a leader telling the follower its range is idle.
    Quiesce,
}

/// The worker's own events; unbounded, never dropped.
pub(crate) enum Control {
    Persisted {
        seq: u64,
        result: Result<(), LogError>,
    },
    CreateRanges(Vec<RangeDescriptor>),
    Unreachable(StoreId),
    /// A log write outside the Ready flow (compaction) failed.
    LogFailed(LogError),
    Shutdown,
}

type Proposal = Vec<Responder>;

struct Peer {
    replica: Replica<PeerStorage, Proposal, ReadResponder>,
    info: Arc<RangeInfo>,
    descriptor: RangeDescriptor,
    store_of: FxHashMap<u64, StoreId>,
    writes: Vec<(proto::Command, Responder)>,
    /// Log writes holding a `Ready` of this range that are not durable yet.
    persisting: usize,
    applied_term: u64,
    /// Votes are refused until then: a reopened replica may have acknowledged a
    /// leader whose lease is still running (see ARCHITECTURE.md "Reads").
    votes_refused_until: Option<Instant>,
    /// Not ticked and sending nothing until woken (see "Quiescence").
    quiesced: bool,
    /// Ticks since the last proposal or read (leader only).
    idle_ticks: u32,
    /// The term in which this follower last hastened an election because its
    /// leader's store went silent.
    hastened_in_term: u64,
    /// The highest index this leader proposed to compact the log to.
    compact_proposed: u64,
}

impl Peer {
    fn set_quiesced(&mut self, quiesced: bool) {
        if self.quiesced != quiesced {
            self.quiesced = quiesced;
            self.info.quiesced.store(quiesced, Ordering::Relaxed);
        }
    }
}

/// A log write in flight: the `Ready`s it persists, in order.
struct Persisting {
    seq: u64,
    readies: Vec<(RangeId, u64, Vec<Message>)>,
}

pub(crate) struct Worker {
    index: usize,
    shared: Arc<StoreShared>,
    inbox: Receiver<Inbound>,
    control: Receiver<Control>,
    control_sender: Sender<Control>,
    peers: FxHashMap<RangeId, Peer>,
    /// Ranges with something to do this iteration.
    touched: FxHashSet<RangeId>,
    /// Ranges not quiesced: the ones ticked.
    awake: FxHashSet<RangeId>,
    persisting: VecDeque<Persisting>,
    /// Applied log compactions waiting for the state machine's flush, per range:
    /// (index, term, deferred since, flush asked).
    deferred_compactions: FxHashMap<RangeId, (u64, u64, Instant, bool)>,
    next_seq: u64,
    next_tick: Instant,
    shutdown: bool,
    started: Instant,
}

const DRAIN_MAX: usize = 4096;
/// Payload bytes one loop iteration drains, proposes per range, and writes to the log
/// in one batch (more goes in another batch of the same iteration, or the next one);
/// at most a quarter of the log's largest batch, so that one range's Ready plus one
/// more of the largest entry still fits in it.
const LOOP_BYTES_TARGET: usize = 32 * 1024 * 1024;

fn loop_bytes_target(shared: &StoreShared) -> usize {
    LOOP_BYTES_TARGET.min(shared.log.batch_bytes_max() / 4)
}

impl Inbound {
    /// Bytes of user data (entries, commands) the message carries.
    fn payload_bytes(&self) -> usize {
        match self {
            Inbound::Raft { message, .. } => message.entries.iter().map(|e| e.data.len()).sum(),
            Inbound::Write { command, .. } => command.encoded_len(),
            Inbound::Heartbeats { .. } | Inbound::Read { .. } => 0,
        }
    }
}

impl Worker {
    pub fn new(
        index: usize,
        shared: Arc<StoreShared>,
        inbox: Receiver<Inbound>,
        control: Receiver<Control>,
        control_sender: Sender<Control>,
    ) -> Self {
        let next_tick = Instant::now() + shared.config.tick_interval;
        Worker {
            index,
            shared,
            inbox,
            control,
            control_sender,
            peers: FxHashMap::default(),
            touched: FxHashSet::default(),
            awake: FxHashSet::default(),
            persisting: VecDeque::new(),
            deferred_compactions: FxHashMap::default(),
            next_seq: 1,
            next_tick,
            shutdown: false,
            started: Instant::now(),
        }
    }

    /// Opens the replica of `descriptor` on this store. `reopened`: it existed before
    /// this process started (its log and applied state are on disk).
    pub fn open_range(
        &mut self,
        descriptor: RangeDescriptor,
        reopened: bool,
    ) -> anyhow::Result<()> {
        let range = RangeId(descriptor.range_id);
        let store = self.shared.store_id;
        let local = descriptor
            .replicas
            .iter()
            .find(|p| p.store_id == store.get())
            .ok_or_else(|| anyhow::anyhow!("{range} has no replica on {store}"))?
            .peer_id;
        let voters: Vec<u64> = descriptor
            .replicas
            .iter()
            .filter(|p| p.role == proto::PeerRole::Voter as i32)
            .map(|p| p.peer_id)
            .collect();
        let learners: Vec<u64> = descriptor
            .replicas
            .iter()
            .filter(|p| p.role == proto::PeerRole::Learner as i32)
            .map(|p| p.peer_id)
            .collect();
        let conf_state = ConfState {
            voters,
            learners,
            ..Default::default()
        };
        let apply_state = self.shared.state.apply_state(range)?;
        let storage = PeerStorage::new(
            self.shared.log.clone(),
            range,
            conf_state,
            apply_state.applied_index,
        );
        let config = self
            .shared
            .config
            .replica
            .raft_config(rangekv_types::PeerId(local), apply_state.applied_index)?;
        let logger = crate::logger::raft_logger(range);
        let raw = RawNode::new(&config, storage, &logger)?;
        let had_term = raw.raft.term > 0;
        let info = Arc::new(RangeInfo {
            worker: self.index,
            descriptor: std::sync::RwLock::new(descriptor.clone()),
            leader_peer: Default::default(),
            term: Default::default(),
            applied: apply_state.applied_index.into(),
            local_peer: local,
            quiesced: Default::default(),
            lease_until: Default::default(),
            local_reads: Default::default(),
        });
        let store_of = descriptor
            .replicas
            .iter()
            .map(|p| (p.peer_id, StoreId(p.store_id)))
            .collect();
        let votes_refused_until =
            (reopened && had_term).then(|| Instant::now() + self.shared.config.election_timeout());
        self.peers.insert(
            range,
            Peer {
                replica: Replica::new(
                    raw,
                    apply_state.applied_index,
                    self.shared.config.lease_duration(),
                    self.shared.config.election_seed ^ local.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ),
                info: info.clone(),
                descriptor,
                store_of,
                writes: Vec::new(),
                persisting: 0,
                applied_term: apply_state.applied_term,
                votes_refused_until,
                quiesced: false,
                idle_ticks: 0,
                hastened_in_term: 0,
                compact_proposed: 0,
            },
        );
        self.shared
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(range, info);
        self.touched.insert(range);
        self.awake.insert(range);
        Ok(())
    }

    pub fn run(mut self) {
        while !self.shutdown {
            self.wait_and_drain();
            if self.shutdown {
                break;
            }
            let now = Instant::now();
            if now >= self.next_tick {
                self.tick_all();
                self.next_tick += self.shared.config.tick_interval;
                if self.next_tick < now {
                    self.next_tick = now + self.shared.config.tick_interval;
                }
            }
            self.process(now);
        }
        self.fail_everything("the store is shutting down");
    }

    fn wait_and_drain(&mut self) {
        // Work left from the last iteration (a range touched again) must not wait.
        let timeout = if self.touched.is_empty() {
            self.next_tick.saturating_duration_since(Instant::now())
        } else {
            std::time::Duration::ZERO
        };
        select! {
            recv(self.control) -> message => match message {
                Ok(message) => self.on_control(message),
                Err(_) => self.shutdown = true,
            },
            recv(self.inbox) -> message => {
                if let Ok(message) = message {
                    self.on_inbound(message);
                }
            },
            default(timeout) => {},
        }
        // Bounded by count and by payload bytes, so one loop's log write stays far
        // below the log engine's largest batch.
        let mut bytes = 0;
        for _ in 0..DRAIN_MAX {
            let mut progressed = false;
            if let Ok(message) = self.control.try_recv() {
                self.on_control(message);
                progressed = true;
            }
            if let Ok(message) = self.inbox.try_recv() {
                bytes += message.payload_bytes();
                self.on_inbound(message);
                progressed = true;
            }
            if !progressed || self.shutdown || bytes >= loop_bytes_target(&self.shared) {
                break;
            }
        }
    }

    fn on_control(&mut self, message: Control) {
        match message {
            Control::Persisted { seq, result } => self.on_persisted(seq, result),
            Control::CreateRanges(descriptors) => {
                let new: Vec<RangeDescriptor> = descriptors
                    .into_iter()
                    .filter(|d| !self.peers.contains_key(&RangeId(d.range_id)))
                    .collect();
                let encoded: Vec<(RangeId, Vec<u8>)> = new
                    .iter()
                    .map(|d| (RangeId(d.range_id), d.encode_to_vec()))
                    .collect();
                // One synced write for all of them, before any replica exists.
                if let Err(error) = self.shared.state.put_descriptors(&encoded) {
                    tracing::error!(%error, "cannot record new replicas");
                    return;
                }
                for descriptor in new {
                    let range = RangeId(descriptor.range_id);
                    if let Err(error) = self.open_range(descriptor, false) {
                        tracing::error!(%range, %error, "cannot create the replica");
                    }
                }
            }
            Control::Unreachable(store) => {
                for (range, peer) in &mut self.peers {
                    for (peer_id, peer_store) in &peer.store_of {
                        if *peer_store == store {
                            peer.replica.raw.report_unreachable(*peer_id);
                            self.touched.insert(*range);
                        }
                    }
                }
            }
            Control::LogFailed(error) => self.on_persisted(0, Err(error)),
            Control::Shutdown => self.shutdown = true,
        }
    }

    fn on_inbound(&mut self, message: Inbound) {
        match message {
            Inbound::Raft { range, message } => self.step(range, message, false),
            Inbound::Heartbeats { heartbeats, kind } => {
                let msg_type = if kind == HeartbeatKind::Response {
                    MessageType::MsgHeartbeatResponse
                } else {
                    MessageType::MsgHeartbeat
                };
                for heartbeat in heartbeats {
                    let sender = (heartbeat.from_peer, heartbeat.term);
                    let message = Message {
                        msg_type,
                        from: heartbeat.from_peer,
                        to: heartbeat.to_peer,
                        term: heartbeat.term,
                        commit: heartbeat.commit,
                        context: heartbeat.context,
                        ..Default::default()
                    };
                    let range = RangeId(heartbeat.range_id);
                    let quiesce = kind == HeartbeatKind::Quiesce;
                    self.step(range, message, quiesce);
                    if quiesce {
                        self.quiesce_follower(range, sender);
                    }
                }
            }
            Inbound::Write {
                range,
                command,
                respond,
            } => match self.peers.get_mut(&range) {
                Some(peer) => {
                    peer.writes.push((command, respond));
                    peer.set_quiesced(false);
                    self.awake.insert(range);
                    peer.idle_ticks = 0;
                    self.touched.insert(range);
                }
                None => respond.send(Err(range_not_found(range))),
            },
            Inbound::Read { range, respond } => {
                let Some(peer) = self.peers.get_mut(&range) else {
                    let _ = respond.send(Err(range_not_found(range)));
                    return;
                };
                peer.set_quiesced(false);
                self.awake.insert(range);
                peer.idle_ticks = 0;
                match peer.replica.read(Instant::now(), respond) {
                    Ok(Some(respond)) => {
                        let _ = respond.send(Ok(()));
                    }
                    Ok(None) => {
                        self.touched.insert(range);
                    }
                    Err(refused) => {
                        let _ = refused.returned.send(Err(peer.info.not_leader()));
                    }
                }
            }
        }
    }

    /// Steps a raft message. A message wakes a quiesced range, except a heartbeat
    /// response at a leader and the quiesce heartbeat itself (`quiesce`).
    fn step(&mut self, range: RangeId, message: Message, quiesce: bool) {
        let Some(peer) = self.peers.get_mut(&range) else {
            // A replica this store does not host (yet, or any more): creating replicas
            // from messages comes with membership changes.
            return;
        };
        if matches!(
            message.msg_type,
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        ) {
            if let Some(until) = peer.votes_refused_until {
                if Instant::now() < until {
                    return;
                }
                peer.votes_refused_until = None;
            }
        }
        if !quiesce && message.msg_type != MessageType::MsgHeartbeatResponse {
            peer.set_quiesced(false);
            self.awake.insert(range);
        }
        if let Err(error) = peer.replica.step(message) {
            tracing::debug!(%range, %error, "raft message refused");
        }
        self.touched.insert(range);
    }

    /// A follower told by its current leader that the range is idle stops ticking.
    fn quiesce_follower(&mut self, range: RangeId, (from_peer, term): (u64, u64)) {
        let Some(peer) = self.peers.get_mut(&range) else {
            return;
        };
        let raft = &peer.replica.raw.raft;
        if raft.state == StateRole::Follower && raft.term == term && raft.leader_id == from_peer {
            // Heard from the leader: a later silence of its store may hasten again.
            peer.hastened_in_term = 0;
            peer.set_quiesced(true);
            self.awake.remove(&range);
        }
    }

    /// Whether `peer` (a leader) may quiesce its range: nothing pending, every
    /// follower has every entry, everything committed is applied.
    fn can_quiesce(peer: &Peer) -> bool {
        let raft = &peer.replica.raw.raft;
        let last = raft.raft_log.last_index();
        raft.state == StateRole::Leader
            && peer.writes.is_empty()
            && peer.persisting == 0
            && !peer.replica.has_pending_requests()
            && raft.pending_read_count() == 0
            && raft.raft_log.committed == last
            && peer.replica.applied() == last
            && !peer.replica.raw.has_ready()
            && raft
                .prs()
                .iter()
                .all(|(_, progress)| progress.matched == last)
    }

    /// Ticks every awake range. Quiesced ranges cost nothing here unless a store
    /// went silent, when its followers are found and woken.
    fn tick_all(&mut self) {
        self.retry_compactions(Instant::now());
        let election_timeout = self.shared.config.election_timeout();
        let quiesce_after = self.shared.config.quiesce_after_ticks;
        let silent = self.shared.silent_stores(election_timeout, self.started);
        if !silent.is_empty() {
            for (range, peer) in &mut self.peers {
                // A quiesced follower whose leader's store sent nothing for an
                // election timeout stops waiting: it wakes and campaigns in a few ticks.
                let raft = &mut peer.replica.raw.raft;
                // Only quiesced followers: awake ones count raft's own election timer
                // from the last message they got, which is what lease safety rests on.
                if !peer.quiesced
                    || raft.state != StateRole::Follower
                    || raft.leader_id == raft::INVALID_ID
                    || peer.hastened_in_term == raft.term
                {
                    continue;
                }
                let leader_store = peer.store_of.get(&raft.leader_id);
                if leader_store.is_some_and(|store| silent.contains(store)) {
                    peer.hastened_in_term = raft.term;
                    // Campaign after 1 to 3 more ticks, spread by peer id so the
                    // followers of one range rarely split the vote.
                    // At least a full election timeout, or the other followers would
                    // still count the silent leader's lease and refuse their votes.
                    let jitter = 1 + (raft.id % 3) as usize;
                    raft.election_elapsed = raft
                        .randomized_election_timeout()
                        .saturating_sub(jitter)
                        .max(raft.election_timeout());
                    peer.set_quiesced(false);
                    self.awake.insert(*range);
                }
            }
        }
        let mut quiescing = Vec::new();
        for range in &self.awake {
            let Some(peer) = self.peers.get_mut(range) else {
                continue;
            };
            let ticked = peer.replica.tick();
            if ticked || peer.replica.raw.has_ready() {
                self.touched.insert(*range);
            }
            if peer.replica.is_leader() {
                peer.idle_ticks = peer.idle_ticks.saturating_add(1);
                // Going idle: drop the whole applied log, not just big prefixes.
                // (Two: the compaction's own entry stays, or each would beget another.)
                let gc_entries = if peer.idle_ticks >= quiesce_after {
                    2
                } else {
                    self.shared.config.log_gc_entries
                };
                if propose_compaction(peer, gc_entries) {
                    self.touched.insert(*range);
                }
                if self.shared.config.quiesce
                    && peer.idle_ticks >= quiesce_after
                    && Self::can_quiesce(peer)
                {
                    quiescing.push(*range);
                }
            }
        }
        for range in quiescing {
            self.quiesce_leader(range);
        }
    }

    /// Tells every follower, with the next tick batch, that the range is idle, and
    /// stops ticking it.
    fn quiesce_leader(&mut self, range: RangeId) {
        let Some(peer) = self.peers.get_mut(&range) else {
            return;
        };
        let raft = &peer.replica.raw.raft;
        for (peer_id, store) in &peer.store_of {
            if *peer_id == raft.id {
                continue;
            }
            self.shared.transport.quiesce(
                *store,
                proto::CoalescedHeartbeat {
                    range_id: range.get(),
                    from_peer: raft.id,
                    to_peer: *peer_id,
                    term: raft.term,
                    commit: raft.raft_log.committed,
                    context: Default::default(),
                },
            );
        }
        peer.set_quiesced(true);
        self.awake.remove(&range);
    }

    fn process(&mut self, now: Instant) {
        if self.touched.is_empty() {
            return;
        }
        let touched: Vec<RangeId> = self.touched.drain().collect();
        // Proposals and reads first: they join this iteration's Ready.
        for range in &touched {
            if let Some(peer) = self.peers.get_mut(range) {
                propose_writes(peer, now, loop_bytes_target(&self.shared));
                peer.replica.flush_reads(now);
                if !peer.writes.is_empty() {
                    self.touched.insert(*range);
                }
            }
        }
        let mut seq = self.next_seq;
        let mut batch = LogBatch::new();
        let mut record = Persisting {
            seq,
            readies: Vec::new(),
        };
        let mut committed = Vec::new();
        let mut not_served = Vec::new();
        // Proposals of leaders that lost their quorum: dropping their answer channels
        // tells each client "outcome unknown" now (see `Replica::on_role`).
        let mut abandoned: Vec<Proposal> = Vec::new();
        for range in &touched {
            if batch.bytes() >= loop_bytes_target(&self.shared) {
                self.submit(std::mem::take(&mut batch), record);
                seq = self.next_seq;
                record = Persisting {
                    seq,
                    readies: Vec::new(),
                };
            }
            let Some(peer) = self.peers.get_mut(range) else {
                continue;
            };
            if !peer.replica.raw.has_ready() {
                continue;
            }
            let mut ready = peer.replica.raw.ready();
            if let Some(soft) = ready.ss() {
                peer.replica
                    .on_role(soft.raft_state, &mut not_served, &mut abandoned);
                let leader = if soft.leader_id == raft::INVALID_ID {
                    0
                } else {
                    soft.leader_id
                };
                peer.info.leader_peer.store(leader, Ordering::Relaxed);
                if soft.raft_state == StateRole::Leader {
                    tracing::debug!(%range, term = peer.replica.term(), "became leader");
                }
            }
            peer.info.term.store(peer.replica.term(), Ordering::Relaxed);
            let immediate = ready.take_messages();
            send(&self.shared, peer, *range, immediate);
            if !ready.snapshot().is_empty() {
                tracing::error!(%range, "received a raft snapshot; snapshots are not supported yet");
            }
            if !ready.read_states().is_empty() {
                let mut reads = Vec::new();
                peer.replica
                    .on_read_states(ready.take_read_states(), &mut reads);
                for respond in reads {
                    let _ = respond.send(Ok(()));
                }
            }
            let entries = ready.take_committed_entries();
            if !entries.is_empty() {
                committed.push((*range, entries));
            }
            let appended = ready.take_entries();
            let hard_state = ready.hs().cloned();
            let after_persist = ready.take_persisted_messages();
            let number = ready.number();
            let needs_persist = !appended.is_empty() || hard_state.is_some();
            if !appended.is_empty() {
                peer.replica.raw.mut_store().append_unstable(&appended, seq);
                batch.append(*range, appended);
            }
            if let Some(hard_state) = hard_state {
                batch.set_hard_state(*range, hard_state);
            }
            peer.replica.raw.advance_append_async(ready);
            if needs_persist || peer.persisting > 0 {
                peer.persisting += 1;
                record.readies.push((*range, number, after_persist));
            } else {
                peer.replica.raw.on_persist_ready(number);
                send(&self.shared, peer, *range, after_persist);
                self.touched.insert(*range);
            }
        }
        for respond in not_served {
            let _ = respond.send(Err(proto::Error {
                kind: Some(proto::error::Kind::NotLeader(proto::NotLeader::default())),
            }));
        }
        drop(abandoned);
        self.submit(batch, record);
        self.shared.transport.flush();
        if !committed.is_empty() {
            self.apply(committed);
        }
        // Role changes, applies and lease renewals of this loop, for local reads.
        for range in &touched {
            if let Some(peer) = self.peers.get(range) {
                peer.info.publish_lease(peer.replica.lease_valid_until());
            }
        }
    }

    /// Hands one log write (the `Ready`s in `record`) to the log engine; its
    /// completion comes back as `Control::Persisted`.
    fn submit(&mut self, batch: LogBatch, record: Persisting) {
        if record.readies.is_empty() {
            return;
        }
        let seq = record.seq;
        debug_assert_eq!(seq, self.next_seq);
        self.next_seq += 1;
        self.persisting.push_back(record);
        let control = self.control_sender.clone();
        self.shared.log.write(batch, move |result| {
            let _ = control.send(Control::Persisted { seq, result });
        });
    }

    fn on_persisted(&mut self, seq: u64, result: Result<(), LogError>) {
        if let Err(error) = result {
            // Never retried, never acknowledged: the store stops.
            self.shared.stopped.store(true, Ordering::SeqCst);
            (self.shared.fatal)(format!("raft log write failed: {error}"));
            self.shutdown = true;
            return;
        }
        let Some(record) = self.persisting.pop_front() else {
            return;
        };
        debug_assert_eq!(record.seq, seq, "log writes complete in order");
        for (range, number, messages) in record.readies {
            let Some(peer) = self.peers.get_mut(&range) else {
                continue;
            };
            peer.persisting = peer.persisting.saturating_sub(1);
            peer.replica.raw.mut_store().on_durable(seq);
            peer.replica.raw.on_persist_ready(number);
            send(&self.shared, peer, range, messages);
            self.touched.insert(range);
        }
    }

    fn apply(&mut self, committed: Vec<(RangeId, Vec<raft::eraftpb::Entry>)>) {
        let state = self.shared.state.clone();
        let mut batch = state.batch();
        let mut answers: Vec<(Responder, CommandResult)> = Vec::new();
        let mut dropped = Vec::new();
        let mut applied_to = Vec::new();
        let mut compactions = Vec::new();
        for (range, entries) in committed {
            let Some(peer) = self.peers.get_mut(&range) else {
                continue;
            };
            let mut last = (0, 0);
            for entry in entries {
                last = (entry.index, entry.term);
                let proposal = peer
                    .replica
                    .take_outcome(entry.index, entry.term, &mut dropped);
                if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
                    if let Some(proposal) = proposal {
                        dropped.push(proposal);
                    }
                    continue;
                }
                let decoded = command::decode_entry(&entry);
                let commands = match decoded {
                    Ok(decoded) => decoded.commands,
                    Err(error) => {
                        tracing::error!(%range, index = entry.index, %error, "committed entry does not decode; applied as nothing");
                        Vec::new()
                    }
                };
                let mut results = Vec::with_capacity(commands.len());
                for command in &commands {
                    if let Some(proto::command::Op::CompactLog(compact)) = &command.op {
                        compactions.push((range, compact.index, compact.term));
                    }
                    match command::apply_command(&mut batch, command, &peer.descriptor) {
                        Ok(result) => results.push(result),
                        Err(error) => {
                            self.shared.stopped.store(true, Ordering::SeqCst);
                            (self.shared.fatal)(format!("state machine read failed: {error}"));
                            self.shutdown = true;
                            return;
                        }
                    }
                }
                if let Some(responders) = proposal {
                    let mut results = results.into_iter();
                    for respond in responders {
                        let result = results
                            .next()
                            .unwrap_or(Err(internal("entry lost a command")));
                        answers.push((respond, result));
                    }
                }
            }
            if last.0 > 0 {
                peer.applied_term = last.1;
                batch.set_apply_state(
                    range,
                    ApplyState {
                        applied_index: last.0,
                        applied_term: last.1,
                    },
                );
                applied_to.push((range, last.0));
            }
        }
        if let Err(error) = batch.commit() {
            self.shared.stopped.store(true, Ordering::SeqCst);
            (self.shared.fatal)(format!("state machine write failed: {error}"));
            self.shutdown = true;
            return;
        }
        if !compactions.is_empty() {
            self.compact_logs(compactions);
        }
        for (respond, result) in answers {
            respond.send(result);
        }
        for responders in dropped {
            for respond in responders {
                respond.send(Err(proto::Error {
                    kind: Some(proto::error::Kind::NotLeader(proto::NotLeader::default())),
                }));
            }
        }
        let mut reads = Vec::new();
        for (range, applied) in applied_to {
            if let Some(peer) = self.peers.get_mut(&range) {
                peer.replica.on_applied(applied, &mut reads);
                peer.info.applied.store(applied, Ordering::Relaxed);
                self.touched.insert(range);
                // Entries applied here (and, on a leader, held by every follower) are
                // read no more: the log's cache keeps only what is in flight.
                let mut through = applied;
                if peer.replica.is_leader() {
                    for (_, progress) in peer.replica.raw.raft.prs().iter() {
                        through = through.min(progress.matched);
                    }
                }
                self.shared.log.release_cache(range, through);
            }
        }
        for respond in reads {
            let _ = respond.send(Ok(()));
        }
    }

    /// Drops raft log entries up to each applied compaction point once the state
    /// machine has *flushed* that far: applies skip RocksDB's WAL, so what a crash would
    /// lose of the state machine must stay in the log to be replayed. A point beyond
    /// the flushed applied index waits in `deferred_compactions` (see
    /// `retry_compactions`).
    fn compact_logs(&mut self, compactions: Vec<(RangeId, u64, u64)>) {
        let now = Instant::now();
        for (range, index, term) in compactions {
            // A newer point replaces a waiting one but keeps its age and whether a
            // flush was asked for it.
            let (since, flush_asked) = match self.deferred_compactions.get(&range) {
                Some(&(deferred, ..)) if deferred >= index => continue,
                Some(&(_, _, since, flush_asked)) => (since, flush_asked),
                None => (now, false),
            };
            self.deferred_compactions
                .insert(range, (index, term, since, flush_asked));
        }
        self.retry_compactions(now);
    }

    /// Writes every deferred compaction whose point the state machine has flushed, and
    /// the flushed part of one it has not; for one that has waited
    /// `log_gc_flush_after`, asks RocksDB to flush (once).
    fn retry_compactions(&mut self, now: Instant) {
        if self.deferred_compactions.is_empty() {
            return;
        }
        let mut batch = LogBatch::new();
        let mut flush = false;
        let mut failed = None;
        self.deferred_compactions
            .retain(|range, (index, term, since, flush_asked)| {
                match self.shared.state.durable_apply_state(*range) {
                    Ok(durable) if durable.applied_index >= *index => {
                        batch.compact_to(*range, *index, *term);
                        false
                    }
                    Ok(durable) => {
                        // What is flushed may go now (its term is still in the log).
                        let flushed = durable.applied_index;
                        if flushed >= self.shared.log.first_index(*range) {
                            let term = self
                                .peers
                                .get(range)
                                .and_then(|peer| peer.replica.raw.raft.raft_log.term(flushed).ok());
                            if let Some(term) = term {
                                batch.compact_to(*range, flushed, term);
                            }
                        }
                        if !*flush_asked
                            && now.duration_since(*since) >= self.shared.config.log_gc_flush_after
                        {
                            *flush_asked = true;
                            flush = true;
                        }
                        true
                    }
                    Err(error) => {
                        failed = Some(error);
                        true
                    }
                }
            });
        let failed = match failed {
            None if flush => self.shared.state.flush(false).err(),
            other => other,
        };
        if let Some(error) = failed {
            self.shared.stopped.store(true, Ordering::SeqCst);
            (self.shared.fatal)(format!("state machine failed: {error}"));
            self.shutdown = true;
            return;
        }
        if batch.is_empty() {
            return;
        }
        let control = self.control_sender.clone();
        self.shared.log.write(batch, move |result| {
            if let Err(error) = result {
                let _ = control.send(Control::LogFailed(error));
            }
        });
    }

    fn fail_everything(&mut self, why: &str) {
        for peer in self.peers.values_mut() {
            for (_, respond) in peer.writes.drain(..) {
                respond.send(Err(internal(why)));
            }
            // Proposed entries may still commit under another leader: dropping their
            // responders tells clients the outcome is unknown (never "not applied").
            drop(peer.replica.drain_proposals());
        }
    }
}

/// Hands `messages` of `range` to the transport, heartbeats coalesced. A quiesced
/// follower sends nothing: not even the answer to the quiesce heartbeat.
fn send(shared: &StoreShared, peer: &Peer, range: RangeId, messages: Vec<Message>) {
    for message in messages {
        if peer.quiesced
            && message.msg_type == MessageType::MsgHeartbeatResponse
            && message.context.is_empty()
        {
            continue;
        }
        let Some(store) = peer.store_of.get(&message.to).copied() else {
            tracing::warn!(%range, to = message.to, "message to a peer not in the descriptor");
            continue;
        };
        match message.msg_type {
            MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse => {
                let response = message.msg_type == MessageType::MsgHeartbeatResponse;
                // A heartbeat carrying a ReadIndex context goes out with this flush;
                // the rest ride on the next tick's store-level batch.
                let urgent = !message.context.is_empty();
                let heartbeat = proto::CoalescedHeartbeat {
                    range_id: range.get(),
                    from_peer: message.from,
                    to_peer: message.to,
                    term: message.term,
                    commit: message.commit,
                    context: message.context.to_vec().into(),
                };
                shared
                    .transport
                    .heartbeat(store, heartbeat, response, urgent);
            }
            _ => match message.write_to_bytes() {
                Ok(bytes) => shared.transport.send(
                    store,
                    proto::RaftEnvelope {
                        range_id: range.get(),
                        message: bytes.into(),
                    },
                ),
                Err(error) => tracing::error!(%range, %error, "cannot encode a raft message"),
            },
        }
    }
}

/// Proposes compacting the log of `peer` (a leader) when at least `gc_entries`
/// entries are applied here and held by every follower. Returns whether it proposed.
fn propose_compaction(peer: &mut Peer, gc_entries: u64) -> bool {
    let raft = &peer.replica.raw.raft;
    let held_by_all = raft.prs().iter().map(|(_, p)| p.matched).min().unwrap_or(0);
    let target = peer.replica.applied().min(held_by_all);
    let first = raft::Storage::first_index(peer.replica.raw.store()).unwrap_or(1);
    // Also `gc_entries` past the last proposal: a compaction may wait for the state
    // machine's flush (`Worker::compact_logs`), and meanwhile `first` does not move.
    if target <= peer.compact_proposed
        || target + 1 < first + gc_entries.max(1)
        || target < peer.compact_proposed + gc_entries.max(1)
    {
        return false;
    }
    let Ok(term) = raft.raft_log.term(target) else {
        return false;
    };
    let data = command::encode_entry(vec![proto::Command {
        epoch: None,
        op: Some(proto::command::Op::CompactLog(proto::CompactLog {
            index: target,
            term,
        })),
    }]);
    if peer
        .replica
        .propose(Instant::now(), data, Vec::new())
        .is_ok()
    {
        peer.compact_proposed = target;
        return true;
    }
    false
}

/// Proposes the writes gathered for `peer` this iteration as one entry (or a few,
/// when they exceed the entry size target).
fn propose_writes(peer: &mut Peer, now: Instant, bytes_target: usize) {
    if peer.writes.is_empty() {
        return;
    }
    let writes = std::mem::take(&mut peer.writes);
    if !peer.replica.is_leader() {
        for (_, respond) in writes {
            respond.send(Err(peer.info.not_leader()));
        }
        return;
    }
    let mut commands = Vec::new();
    let mut responders = Vec::new();
    let mut bytes = 0;
    let mut chunks = Vec::new();
    let mut proposed = 0;
    let mut writes = writes.into_iter();
    for (command, respond) in writes.by_ref() {
        let size = command.encoded_len();
        // An entry never grows past the target with a second command; a single
        // command is bounded by the request limit.
        if !commands.is_empty() && bytes + size > command::ENTRY_BYTES_TARGET {
            chunks.push((
                std::mem::take(&mut commands),
                std::mem::take(&mut responders),
            ));
            bytes = 0;
        }
        bytes += size;
        proposed += size;
        commands.push(command);
        responders.push(respond);
        if proposed >= bytes_target {
            break;
        }
    }
    // The rest waits for the next iteration (the caller keeps the range touched).
    peer.writes.extend(writes);
    if !commands.is_empty() {
        chunks.push((commands, responders));
    }
    for (commands, responders) in chunks {
        let data = command::encode_entry(commands);
        if let Err(refused) = peer.replica.propose(now, data, responders) {
            for respond in refused.returned {
                respond.send(Err(peer.info.not_leader()));
            }
        }
    }
}

fn range_not_found(range: RangeId) -> proto::Error {
    proto::Error {
        kind: Some(proto::error::Kind::RangeNotFound(proto::RangeNotFound {
            range_id: range.get(),
        })),
    }
}

fn internal(why: &str) -> proto::Error {
    proto::Error {
        kind: Some(proto::error::Kind::ServerBusy(proto::ServerBusy {
            reason: why.to_string(),
            backoff_ms: 100,
        })),
    }
}

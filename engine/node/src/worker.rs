//! One worker thread of the store: the runtime around the replication core's
//! [`Driver`]. It owns the thread, the channels, the clock (`Instant::now()`), and
//! the I/O the core asks for through [`Host`]: `LogEngine::write`, the transport,
//! the RocksDB apply batch and the clients' responders. Each loop iteration: drain
//! the inbox → tick when due → `Driver::process` (one entry per range, one log write
//! for every range, send, one apply batch).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{Entry, Message};
use rangekv_log::LogBatch;
use rangekv_raftstore::operation::snapshot::log_needs_reset;
use rangekv_raftstore::{
    Applying, CoreConfig, Driver, Fatal, Heartbeat, HeartbeatKind, Host, LogRead, LogWrite, Member,
    Membership, Peer, RangeView, Refusal, Role, Stamp, Types,
};
use rangekv_rpc::proto;
use rangekv_rpc::RangeDescriptor;
use rangekv_state::ApplyBatch;
use rangekv_types::{PeerId, RangeId, StoreId};

use crate::command::{self, CommandResult, Responder};
use crate::message::{Control, Inbound, ReadResponder};
use crate::shared::{RangeInfo, StoreShared};
use crate::storage::NodeLog;
use crate::NodeError;

/// The node's types for the core.
pub(crate) struct NodeTypes;

/// What the node keeps of a range beside the core.
pub(crate) struct RangeHandle {
    info: Arc<RangeInfo>,
    descriptor: RangeDescriptor,
    /// The range's client sessions (applied state, persisted with each apply batch).
    sessions: command::Sessions,
}

impl Types for NodeTypes {
    type Command = proto::Command;
    type WriteReply = Responder;
    type ReadReply = ReadResponder;
    type Answer = CommandResult;
    type Range = RangeHandle;
    type Log = NodeLog;

    fn command_bytes(command: &proto::Command) -> usize {
        command.encoded_len()
    }

    fn encode_entry(commands: Vec<proto::Command>, stamp: Stamp) -> Vec<u8> {
        command::encode_entry(commands, stamp)
    }

    fn encode_compact_log(index: u64, term: u64) -> Vec<u8> {
        command::encode_entry(
            vec![proto::Command {
                epoch: None,
                op: Some(proto::command::Op::CompactLog(proto::CompactLog {
                    index,
                    term,
                })),
                session: None,
            }],
            Stamp::default(),
        )
    }
}

/// The I/O of one worker loop, lent to the core.
struct NodeHost<'a> {
    shared: &'a StoreShared,
    control: &'a Sender<Control>,
    batch: Option<ApplyBatch<'a>>,
}

impl<'a> NodeHost<'a> {
    fn new(shared: &'a StoreShared, control: &'a Sender<Control>) -> Self {
        NodeHost {
            shared,
            control,
            batch: None,
        }
    }
}

fn state_failed(error: rangekv_state::StateError) -> Fatal {
    command::state_failed(error)
}

impl Host<NodeTypes> for NodeHost<'_> {
    fn send(&mut self, to: StoreId, range: RangeId, message: Message) {
        if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
            // Handed to the transport, which sends it or drops it like any raft
            // message: raft-rs probes the follower again either way.
            let _ = self.control.send(Control::SnapshotSent {
                range,
                to: message.to,
            });
        }
        match message.write_to_bytes() {
            Ok(bytes) => self.shared.transport.send(
                to,
                proto::RaftEnvelope {
                    range_id: range.get(),
                    message: bytes.into(),
                },
            ),
            Err(error) => tracing::error!(%range, %error, "cannot encode a raft message"),
        }
    }

    fn send_heartbeat(&mut self, to: StoreId, beat: Heartbeat, kind: HeartbeatKind, urgent: bool) {
        let heartbeat = proto::CoalescedHeartbeat {
            range_id: beat.range.get(),
            from_peer: beat.from_peer,
            to_peer: beat.to_peer,
            term: beat.term,
            commit: beat.commit,
            context: beat.context.into(),
        };
        match kind {
            HeartbeatKind::Quiesce => self.shared.transport.quiesce(to, heartbeat),
            HeartbeatKind::Heartbeat | HeartbeatKind::Response => self.shared.transport.heartbeat(
                to,
                heartbeat,
                kind == HeartbeatKind::Response,
                urgent,
            ),
        }
    }

    fn flush(&mut self) {
        self.shared.transport.flush();
    }

    fn wall_clock_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            })
    }

    fn submit_log(&mut self, write: LogWrite) {
        let mut batch = LogBatch::new();
        for (range, index, term, hard_state) in write.resets {
            // The log restarts after the snapshot: every entry gone, divergent ones
            // above its index too; one record with the hard state.
            batch.reset(range, index, term, hard_state);
        }
        for (range, entries) in write.appends {
            batch.append(range, entries);
        }
        for (range, hard_state) in write.hard_states {
            batch.set_hard_state(range, hard_state);
        }
        for (range, index, term) in write.compactions {
            batch.compact_to(range, index, term);
        }
        let control = self.control.clone();
        match write.seq {
            Some(seq) => self.shared.log.write(batch, move |result| {
                let _ = control.send(Control::Persisted { seq, result });
            }),
            None => self.shared.log.write(batch, move |result| {
                if let Err(error) = result {
                    let _ = control.send(Control::LogFailed(error));
                }
            }),
        }
    }

    fn begin_apply(&mut self) {
        self.batch = Some(self.shared.state.batch());
    }

    fn apply_entry(&mut self, entry: &Entry, to: Applying<'_, NodeTypes>) -> Result<(), Fatal> {
        let Some(batch) = self.batch.as_mut() else {
            panic!("apply_entry outside an apply batch");
        };
        let handle = to.handle;
        command::apply_entry(
            batch,
            &handle.descriptor,
            &mut handle.sessions,
            to.range,
            entry,
            to.answers,
            to.effects,
        )
    }

    fn apply_membership(
        &mut self,
        handle: &mut RangeHandle,
        range: RangeId,
        _index: u64,
        membership: &Membership,
    ) {
        let descriptor = &mut handle.descriptor;
        descriptor
            .epoch
            .get_or_insert_with(Default::default)
            .conf_ver = membership.conf_ver;
        descriptor.replicas = membership
            .members
            .iter()
            .map(|m| proto::Peer {
                peer_id: m.peer.get(),
                store_id: m.store.get(),
                role: match m.role {
                    Role::Voter => proto::PeerRole::Voter,
                    Role::Learner => proto::PeerRole::Learner,
                    Role::IncomingVoter => proto::PeerRole::IncomingVoter,
                    Role::DemotingVoter => proto::PeerRole::DemotingVoter,
                } as i32,
            })
            .collect();
        if let Ok(mut shared) = handle.info.descriptor.write() {
            *shared = descriptor.clone();
        }
        if let Some(batch) = self.batch.as_mut() {
            batch.set_descriptor(range, descriptor.encode_to_vec());
        }
    }

    fn set_applied(&mut self, handle: &mut RangeHandle, range: RangeId, index: u64, term: u64) {
        if let Some(batch) = self.batch.as_mut() {
            command::persist_sessions(batch, &mut handle.sessions, range);
            batch.set_apply_state(
                range,
                rangekv_state::ApplyState {
                    applied_index: index,
                    applied_term: term,
                },
            );
        }
    }

    /// The range's state as RocksDB holds it now (between apply batches: exactly as
    /// applied through `index`), encoded whole as a `RangeSnapshot`.
    fn generate_snapshot(
        &mut self,
        handle: &RangeHandle,
        range: RangeId,
        index: u64,
        term: u64,
    ) -> Result<Option<Vec<u8>>, Fatal> {
        let descriptor = &handle.descriptor;
        let limit = self.shared.config.snapshot_bytes_max;
        // Stop before reading a range too large to send whole (the encoding adds
        // a few bytes per key: checked again below).
        if self
            .shared
            .state
            .span_exceeds(&descriptor.start_key, &descriptor.end_key, limit)
            .map_err(state_failed)?
        {
            tracing::warn!(%range, limit, "range too large for a snapshot: its lagging followers cannot catch up");
            return Ok(None);
        }
        let image = self
            .shared
            .state
            .range_image(range, &descriptor.start_key, &descriptor.end_key)
            .map_err(state_failed)?;
        let state = image.apply_state;
        if (state.applied_index, state.applied_term) != (index, term) {
            return Err(Fatal::StateMachine(format!(
                "{range}: a snapshot at {index}/t{term} found the state machine at {}/t{}",
                state.applied_index, state.applied_term
            )));
        }
        let snapshot = proto::RangeSnapshot {
            descriptor: Some(descriptor.clone()),
            applied_index: index,
            applied_term: term,
            data: image
                .data
                .into_iter()
                .map(|(key, value)| proto::KeyValue {
                    key: key.into(),
                    value: value.into(),
                })
                .collect(),
            sessions: image
                .sessions
                .into_iter()
                .map(|(id, record)| proto::SessionRecord {
                    id: id.to_be_bytes().to_vec().into(),
                    record: record.into(),
                })
                .collect(),
        };
        let encoded = snapshot.encode_to_vec();
        if encoded.len() > limit {
            tracing::warn!(
                %range,
                bytes = encoded.len(),
                limit,
                "range too large for a snapshot: its lagging followers cannot catch up"
            );
            return Ok(None);
        }
        self.shared
            .counters
            .snapshots_built
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%range, index, term, bytes = encoded.len(), "snapshot built");
        Ok(Some(encoded))
    }

    /// Replaces the range's state with the snapshot's in one RocksDB write and a
    /// flush (`StateMachine::install_image`), then its descriptor and sessions here.
    fn install_snapshot(
        &mut self,
        handle: &mut RangeHandle,
        range: RangeId,
        index: u64,
        term: u64,
        membership: &Membership,
        payload: &[u8],
    ) -> Result<(), Fatal> {
        let refused = |reason: String| Fatal::Snapshot {
            range,
            index,
            reason,
        };
        let snapshot = proto::RangeSnapshot::decode(payload)
            .map_err(|error| refused(format!("its payload does not decode: {error}")))?;
        let descriptor = snapshot
            .descriptor
            .ok_or_else(|| refused("it has no descriptor".into()))?;
        if descriptor.range_id != range.get()
            || (snapshot.applied_index, snapshot.applied_term) != (index, term)
        {
            return Err(refused(format!(
                "it holds range {} at {}/t{}",
                descriptor.range_id, snapshot.applied_index, snapshot.applied_term
            )));
        }
        let members = membership_of(&descriptor).map_err(|error| refused(error.to_string()))?;
        if members != *membership {
            return Err(refused(
                "its descriptor's members are not its raft configuration".into(),
            ));
        }
        let mut sessions = Vec::with_capacity(snapshot.sessions.len());
        for session in snapshot.sessions {
            let id = <[u8; 16]>::try_from(&session.id[..])
                .map_err(|_| refused("a session id is not 16 bytes".into()))?;
            sessions.push((u128::from_be_bytes(id), session.record.to_vec()));
        }
        let table = command::Sessions::load(sessions.iter().cloned())
            .map_err(|error| refused(error.to_string()))?;
        let image = rangekv_state::RangeImage {
            data: snapshot
                .data
                .into_iter()
                .map(|pair| (pair.key.to_vec(), pair.value.to_vec()))
                .collect(),
            sessions,
            apply_state: rangekv_state::ApplyState {
                applied_index: index,
                applied_term: term,
            },
        };
        self.shared
            .state
            .install_image(
                range,
                &descriptor.start_key,
                &descriptor.end_key,
                &image,
                &descriptor.encode_to_vec(),
            )
            .map_err(state_failed)?;
        handle.sessions = table;
        if let Ok(mut shared) = handle.info.descriptor.write() {
            *shared = descriptor.clone();
        }
        handle.descriptor = descriptor;
        handle.info.applied.store(index, Ordering::Relaxed);
        self.shared
            .counters
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%range, index, term, keys = image.data.len(), "snapshot installed");
        Ok(())
    }

    fn commit_apply(&mut self) -> Result<(), Fatal> {
        match self.batch.take() {
            Some(batch) => batch.commit().map_err(state_failed),
            None => Ok(()),
        }
    }

    fn durable_applied(&self, range: RangeId) -> Result<u64, Fatal> {
        self.shared
            .state
            .durable_apply_state(range)
            .map(|state| state.applied_index)
            .map_err(state_failed)
    }

    fn request_flush(&mut self) -> Result<(), Fatal> {
        self.shared.state.flush(false).map_err(state_failed)
    }

    fn answer_write(&mut self, reply: Responder, answer: CommandResult) {
        reply.send(answer);
    }

    fn refuse_write(&mut self, handle: &RangeHandle, reply: Responder, refusal: Refusal) {
        reply.send(Err(refusal_error(handle, refusal)));
    }

    fn abandon_write(&mut self, reply: Responder) {
        // Dropped unanswered: the client learns the outcome is unknown.
        drop(reply);
    }

    fn answer_read(&mut self, reply: ReadResponder) {
        let _ = reply.send(Ok(()));
    }

    fn refuse_read(&mut self, handle: &RangeHandle, reply: ReadResponder, refusal: Refusal) {
        let _ = reply.send(Err(refusal_error(handle, refusal)));
    }

    fn publish(&mut self, handle: &RangeHandle, view: RangeView) {
        let info = &handle.info;
        info.leader_peer
            .store(view.leader.unwrap_or(0), Ordering::Relaxed);
        info.term.store(view.term, Ordering::Relaxed);
        info.applied.store(view.applied, Ordering::Relaxed);
        info.quiesced.store(view.quiesced, Ordering::Relaxed);
        info.publish_lease(view.lease_until);
    }
}

fn refusal_error(handle: &RangeHandle, refusal: Refusal) -> proto::Error {
    match refusal {
        Refusal::NotLeader { .. } => handle.info.not_leader(),
        Refusal::Dropped => proto::Error {
            kind: Some(proto::error::Kind::NotLeader(proto::NotLeader::default())),
        },
        Refusal::Stopping => internal("the store is shutting down"),
    }
}

pub(crate) struct Worker {
    index: usize,
    shared: Arc<StoreShared>,
    inbox: Receiver<Inbound>,
    control: Receiver<Control>,
    control_sender: Sender<Control>,
    driver: Driver<NodeTypes>,
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

impl Worker {
    pub fn new(
        index: usize,
        shared: Arc<StoreShared>,
        inbox: Receiver<Inbound>,
        control: Receiver<Control>,
        control_sender: Sender<Control>,
    ) -> Self {
        let config = &shared.config;
        let core = CoreConfig {
            replica: config.replica.clone(),
            tick_interval: config.tick_interval,
            quiesce: config.quiesce,
            quiesce_after_ticks: config.quiesce_after_ticks,
            log_gc_entries: config.log_gc_entries,
            log_gc_lag_entries: config.log_gc_lag_entries,
            log_gc_flush_after: config.log_gc_flush_after,
            loop_bytes_target: LOOP_BYTES_TARGET.min(shared.log.batch_bytes_max() / 4),
            entry_bytes_target: command::ENTRY_BYTES_TARGET,
            election_seed: config.election_seed,
            session_ttl: config.session_ttl,
        };
        let next_tick = Instant::now() + config.tick_interval;
        Worker {
            index,
            shared,
            inbox,
            control,
            control_sender,
            driver: Driver::new(core),
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
    ) -> Result<(), NodeError> {
        let range = RangeId(descriptor.range_id);
        let store = self.shared.store_id;
        let local = descriptor
            .replicas
            .iter()
            .find(|p| p.store_id == store.get())
            .ok_or(NodeError::NoLocalReplica { range, store })?
            .peer_id;
        let members = membership_of(&descriptor)?;
        let apply_state = self.shared.state.apply_state(range)?;
        self.reset_log_behind_snapshot(range, apply_state)?;
        let sessions = command::Sessions::load(self.shared.state.sessions(range)?)
            .map_err(|error| NodeError::CorruptSession { range, error })?;
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
        let logger = crate::logger::raft_logger(range);
        let peer = Peer::open(
            self.driver.config(),
            range,
            PeerId(local),
            &members,
            NodeLog(self.shared.log.clone()),
            apply_state.applied_index,
            reopened,
            Instant::now(),
            RangeHandle {
                info: info.clone(),
                descriptor,
                sessions,
            },
            &logger,
        )?;
        self.driver.insert(peer);
        self.shared
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(range, info);
        Ok(())
    }

    /// A snapshot installed just before a crash whose log reset was lost: the log
    /// restarts after the applied entry (its hard state kept) before the replica
    /// opens. See `rangekv_raftstore::operation::snapshot`.
    fn reset_log_behind_snapshot(
        &self,
        range: RangeId,
        applied: rangekv_state::ApplyState,
    ) -> Result<(), NodeError> {
        let log = NodeLog(self.shared.log.clone());
        let (index, term) = (applied.applied_index, applied.applied_term);
        if !log_needs_reset(&log, range, index, term) {
            return Ok(());
        }
        tracing::warn!(%range, index, term, "the log is behind the installed snapshot: restarting it there");
        let mut batch = LogBatch::new();
        batch.reset(range, index, term, log.hard_state(range));
        self.shared.log.write_sync(batch)?;
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
                self.tick(now);
                self.next_tick += self.shared.config.tick_interval;
                if self.next_tick < now {
                    self.next_tick = now + self.shared.config.tick_interval;
                }
            }
            self.process(now);
        }
        let mut host = NodeHost::new(&self.shared, &self.control_sender);
        self.driver.stop(&mut host);
    }

    fn wait_and_drain(&mut self) {
        // Work left from the last iteration (a range touched again) must not wait.
        let timeout = if self.driver.has_work() {
            Duration::ZERO
        } else {
            self.next_tick.saturating_duration_since(Instant::now())
        };
        select! {
            recv(self.control) -> message => match message {
                Ok(message) => self.on_control(message),
                Err(_) => self.shutdown = true,
            },
            recv(self.inbox) -> message => {
                if let Ok(message) = message {
                    self.on_inbound(message, Instant::now());
                }
            },
            default(timeout) => {},
        }
        // Bounded by count and by payload bytes, so one loop's log write stays far
        // below the log engine's largest batch.
        let loop_bytes = self.driver.config().loop_bytes_target;
        let received = Instant::now();
        let mut bytes = 0;
        for _ in 0..DRAIN_MAX {
            let mut progressed = false;
            if let Ok(message) = self.control.try_recv() {
                self.on_control(message);
                progressed = true;
            }
            if let Ok(message) = self.inbox.try_recv() {
                bytes += message.payload_bytes();
                self.on_inbound(message, received);
                progressed = true;
            }
            if !progressed || self.shutdown || bytes >= loop_bytes {
                break;
            }
        }
    }

    fn on_control(&mut self, message: Control) {
        match message {
            Control::Persisted { seq, result } => match result {
                Ok(()) => {
                    let mut host = NodeHost::new(&self.shared, &self.control_sender);
                    self.driver.on_persisted(seq, &mut host);
                }
                Err(error) => self.stop_store(format!("raft log write failed: {error}")),
            },
            Control::CreateRanges(descriptors) => self.create_ranges(descriptors),
            Control::Unreachable(store) => self.driver.on_unreachable(store),
            Control::SnapshotSent { range, to } => self.driver.on_snapshot_sent(range, to, true),
            Control::LogFailed(error) => self.stop_store(format!("raft log write failed: {error}")),
            Control::Shutdown => self.shutdown = true,
        }
    }

    fn create_ranges(&mut self, descriptors: Vec<RangeDescriptor>) {
        let mut seen = rustc_hash::FxHashSet::default();
        let new: Vec<RangeDescriptor> = descriptors
            .into_iter()
            .filter(|d| !self.driver.contains(RangeId(d.range_id)) && seen.insert(d.range_id))
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

    /// `received`: a time at or before the message's arrival, which only decides
    /// when a reopened replica may grant votes again (an earlier time only refuses
    /// longer). A read takes the time afresh: a lease must never be judged by a past
    /// time.
    fn on_inbound(&mut self, message: Inbound, received: Instant) {
        let mut host = NodeHost::new(&self.shared, &self.control_sender);
        match message {
            Inbound::Raft { range, message } => {
                // Once raft-rs takes a snapshot, one that cannot be installed stops
                // the store: a malformed one is dropped here, as the network might.
                if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                    if let Err(why) = check_snapshot(range, message.get_snapshot()) {
                        tracing::warn!(%range, from = message.from, why, "dropping a malformed snapshot");
                        return;
                    }
                }
                self.driver.on_raft(range, message, received, &mut host)
            }
            Inbound::Heartbeats { heartbeats, kind } => {
                let heartbeats = heartbeats
                    .into_iter()
                    .map(|h| Heartbeat {
                        range: RangeId(h.range_id),
                        from_peer: h.from_peer,
                        to_peer: h.to_peer,
                        term: h.term,
                        commit: h.commit,
                        context: h.context.into(),
                    })
                    .collect();
                self.driver
                    .on_heartbeats(heartbeats, kind, received, &mut host);
            }
            Inbound::Write {
                range,
                command,
                respond,
            } => {
                if let Err(respond) = self.driver.on_write(range, command, respond, &mut host) {
                    respond.send(Err(range_not_found(range)));
                }
            }
            Inbound::Read { range, respond } => {
                let now = Instant::now();
                if let Err(respond) = self.driver.on_read(range, respond, now, &mut host) {
                    let _ = respond.send(Err(range_not_found(range)));
                }
            }
            Inbound::TransferLeader {
                range,
                to_peer,
                respond,
            } => {
                let answer = match self.driver.peer(range) {
                    None => Err(range_not_found(range)),
                    Some(peer) if !peer.is_leader() => Err(peer.handle().info.not_leader()),
                    Some(_) => {
                        self.driver.transfer_leader(range, to_peer, &mut host);
                        Ok(())
                    }
                };
                let _ = respond.send(answer);
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        let election_timeout = self.driver.config().election_timeout();
        let silent = self.shared.silent_stores(election_timeout, self.started);
        let mut host = NodeHost::new(&self.shared, &self.control_sender);
        if let Err(fatal) = self.driver.tick(now, &silent, &mut host) {
            self.stop_store(fatal.to_string());
        }
    }

    fn process(&mut self, now: Instant) {
        let mut host = NodeHost::new(&self.shared, &self.control_sender);
        if let Err(fatal) = self.driver.process(now, &mut host) {
            self.stop_store(fatal.to_string());
        }
    }

    /// A failed log write or sync, a state machine failure or an entry that cannot be
    /// applied: never retried, never acknowledged; the store stops.
    fn stop_store(&mut self, why: String) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        (self.shared.fatal)(why);
        self.shutdown = true;
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

/// The core's view of a descriptor's members (`conf_ver` from its epoch).
/// Whether `snapshot` of `range` can be installed here: the core's framing, a
/// `RangeSnapshot` of this range at the snapshot's index and term, whose descriptor
/// names the members of its raft configuration. What `install_snapshot` relies on.
fn check_snapshot(range: RangeId, snapshot: &raft::eraftpb::Snapshot) -> Result<(), String> {
    let meta = snapshot.get_metadata();
    let (membership, payload) = rangekv_raftstore::operation::snapshot::decode(snapshot.get_data())
        .ok_or("its framing does not decode")?;
    if !membership.matches(meta.get_conf_state()) {
        return Err("its membership is not its raft configuration".into());
    }
    let decoded = proto::RangeSnapshot::decode(payload).map_err(|error| error.to_string())?;
    let descriptor = decoded.descriptor.ok_or("it has no descriptor")?;
    if descriptor.range_id != range.get()
        || (decoded.applied_index, decoded.applied_term) != (meta.index, meta.term)
    {
        return Err(format!(
            "it holds range {} at {}/t{}",
            descriptor.range_id, decoded.applied_index, decoded.applied_term
        ));
    }
    let members = membership_of(&descriptor).map_err(|error| error.to_string())?;
    if members != membership {
        return Err("its descriptor's members are not its membership".into());
    }
    let mut sessions = Vec::with_capacity(decoded.sessions.len());
    for session in decoded.sessions {
        let id =
            <[u8; 16]>::try_from(&session.id[..]).map_err(|_| "a session id is not 16 bytes")?;
        sessions.push((u128::from_be_bytes(id), session.record.to_vec()));
    }
    command::Sessions::load(sessions).map_err(|error| error.to_string())?;
    Ok(())
}

fn membership_of(descriptor: &RangeDescriptor) -> Result<Membership, NodeError> {
    let mut members = Vec::with_capacity(descriptor.replicas.len());
    for p in &descriptor.replicas {
        let role = match proto::PeerRole::try_from(p.role) {
            Ok(proto::PeerRole::Voter) => Role::Voter,
            Ok(proto::PeerRole::Learner) => Role::Learner,
            Ok(proto::PeerRole::IncomingVoter) => Role::IncomingVoter,
            Ok(proto::PeerRole::DemotingVoter) => Role::DemotingVoter,
            Err(_) => {
                return Err(NodeError::UnknownRole {
                    range: RangeId(descriptor.range_id),
                    peer: p.peer_id,
                    role: p.role,
                })
            }
        };
        members.push(Member {
            peer: PeerId(p.peer_id),
            store: StoreId(p.store_id),
            role,
        });
    }
    Ok(Membership::new(
        descriptor.epoch.unwrap_or_default().conf_ver,
        members,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(range: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: range,
            epoch: Some(proto::RangeEpoch {
                version: 1,
                conf_ver: 2,
            }),
            replicas: (1..=3)
                .map(|id| proto::Peer {
                    peer_id: id,
                    store_id: id,
                    role: proto::PeerRole::Voter as i32,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// A snapshot as a leader frames it: `payload` after the members of `framed`.
    fn snapshot(
        framed: &RangeDescriptor,
        payload: &proto::RangeSnapshot,
    ) -> raft::eraftpb::Snapshot {
        let membership = membership_of(framed).unwrap();
        let data =
            rangekv_raftstore::operation::snapshot::encode(&membership, &payload.encode_to_vec());
        let mut snapshot = raft::eraftpb::Snapshot::default();
        snapshot.set_data(data.into());
        let meta = snapshot.mut_metadata();
        (meta.index, meta.term) = (40, 3);
        meta.set_conf_state(membership.conf_state());
        snapshot
    }

    /// A malformed snapshot is refused before raft-rs takes it (after, it would stop
    /// the store): each way a peer could get it wrong.
    #[test]
    fn only_a_snapshot_this_store_can_install_is_taken() {
        let range = RangeId(5);
        let good = proto::RangeSnapshot {
            descriptor: Some(descriptor(5)),
            applied_index: 40,
            applied_term: 3,
            data: vec![proto::KeyValue {
                key: b"k".to_vec().into(),
                value: b"v".to_vec().into(),
            }],
            sessions: Vec::new(),
        };
        assert_eq!(
            check_snapshot(range, &snapshot(&descriptor(5), &good)),
            Ok(())
        );

        let mut garbage = snapshot(&descriptor(5), &good);
        garbage.set_data(b"garbage".to_vec().into());
        let refused = |snapshot: raft::eraftpb::Snapshot, why: &str| {
            let error = check_snapshot(range, &snapshot).unwrap_err();
            assert!(error.contains(why), "{error}");
        };
        refused(garbage, "framing");
        let other_range = proto::RangeSnapshot {
            descriptor: Some(descriptor(6)),
            ..good.clone()
        };
        refused(snapshot(&descriptor(5), &other_range), "holds range 6");
        let stale = proto::RangeSnapshot {
            applied_index: 39,
            ..good.clone()
        };
        refused(snapshot(&descriptor(5), &stale), "at 39/t3");
        let mut two_members = descriptor(5);
        two_members.replicas.pop();
        let mismatched = proto::RangeSnapshot {
            descriptor: Some(two_members),
            ..good.clone()
        };
        refused(snapshot(&descriptor(5), &mismatched), "members");
        let bad_session = proto::RangeSnapshot {
            sessions: vec![proto::SessionRecord {
                id: vec![1; 15].into(),
                record: Vec::new().into(),
            }],
            ..good.clone()
        };
        refused(snapshot(&descriptor(5), &bad_session), "16 bytes");
        let corrupt_session = proto::RangeSnapshot {
            sessions: vec![proto::SessionRecord {
                id: vec![1; 16].into(),
                record: b"x".to_vec().into(),
            }],
            ..good
        };
        let error = check_snapshot(range, &snapshot(&descriptor(5), &corrupt_session)).unwrap_err();
        assert!(!error.is_empty());
    }
}

//! What the core needs from its caller: the one trait [`Host`] (transport, log
//! writes, the state machine's apply batch, client answers) and the plain data that
//! crosses it. The storage node implements it over gRPC, the log engine and RocksDB;
//! the simulation over its seeded network, disk and in-memory state machine.

use std::time::Instant;

use raft::eraftpb::{Entry, HardState, Message};
use rangekv_types::{RangeId, StoreId};

use crate::membership::Membership;
use crate::session::Stamp;
use crate::storage::LogRead;

/// A raft heartbeat or heartbeat response of one range, as it travels inside a
/// store-to-store batch (see ARCHITECTURE.md "Heartbeats, liveness and quiescence").
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub range: RangeId,
    pub from_peer: u64,
    pub to_peer: u64,
    pub term: u64,
    pub commit: u64,
    /// A ReadIndex context (raft-rs confirms leadership on heartbeats); empty if none.
    pub context: Vec<u8>,
}

/// What a coalesced heartbeat stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatKind {
    Heartbeat,
    Response,
    /// A heartbeat from a leader telling the follower its range is idle.
    Quiesce,
}

/// One log write: the appends and hard states of every range of one loop (or a
/// compaction). Writes with a `seq` persist `Ready`s: the host reports each one's
/// durability back with [`crate::Driver::on_persisted`], in `seq` order.
#[derive(Debug, Default)]
pub struct LogWrite {
    pub seq: Option<u64>,
    pub appends: Vec<(RangeId, Vec<Entry>)>,
    pub hard_states: Vec<(RangeId, HardState)>,
    /// (range, index, term, hard state): a snapshot was installed, the range's log
    /// restarts after it — every entry dropped, the compaction point set there, this
    /// hard state — as one atomic step (a torn write must not keep the drop and lose
    /// the vote). Before the appends of the same write.
    pub resets: Vec<(RangeId, u64, u64, HardState)>,
    /// (range, truncated index, truncated term).
    pub compactions: Vec<(RangeId, u64, u64)>,
    /// Payload bytes (entry data), to bound one write.
    pub bytes: usize,
}

impl LogWrite {
    pub fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.hard_states.is_empty()
            && self.compactions.is_empty()
            && self.resets.is_empty()
    }
}

/// Why a write or read was not carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This replica does not lead; `leader` is the peer it believes does. Nothing
    /// was proposed: safe to retry.
    NotLeader { leader: Option<u64> },
    /// The proposal's index was taken by another leader's entry (or a read's leader
    /// stepped down): it never applies. Safe to retry.
    Dropped,
    /// The store is stopping.
    Stopping,
}

/// An effect of an applied admin command that the core carries out itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminEffect {
    /// Drop the log up to `index` (of `term`), once the state machine has flushed it.
    CompactLog { index: u64, term: u64 },
}

/// What the core publishes about a range after a loop touched it (for services
/// that answer without a trip through the worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeView {
    pub leader: Option<u64>,
    pub term: u64,
    pub applied: u64,
    pub quiesced: bool,
    /// Until when a read may be served from this replica's lease (`None`: not at all).
    pub lease_until: Option<Instant>,
}

/// Errors that stop the store: replicas must never diverge silently.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error("state machine failed: {0}")]
    StateMachine(String),
    #[error("range {range}: committed entry {index} cannot be applied: {reason}")]
    Unappliable {
        range: RangeId,
        index: u64,
        reason: String,
    },
    #[error("range {range}: the snapshot at {index} cannot be installed: {reason}")]
    Snapshot {
        range: RangeId,
        index: u64,
        reason: String,
    },
}

/// The types a store's core works with, and the encoding of the commands it
/// proposes itself.
pub trait Types {
    /// A client write, as proposals carry it.
    type Command;
    /// Where one write's answer goes. A reply dropped unanswered must tell its client
    /// that the outcome is unknown, never "not applied".
    type WriteReply;
    /// Where one read's go-ahead goes (the host reads its state machine then).
    type ReadReply;
    /// What an applied command answers.
    type Answer;
    /// What the host keeps of each range beside the core (the node: its descriptor
    /// and the `RangeInfo` services read).
    type Range;
    /// The durable raft log.
    type Log: LogRead;

    /// Encoded size of a command, to bound entries and loops.
    fn command_bytes(command: &Self::Command) -> usize;
    /// One raft entry's data holding `commands`, in order, and `stamp` (the
    /// proposing leader's time and session lifetime: see [`crate::session`]).
    fn encode_entry(commands: Vec<Self::Command>, stamp: Stamp) -> Vec<u8>;
    /// The data of a log compaction command.
    fn encode_compact_log(index: u64, term: u64) -> Vec<u8>;
}

/// Where [`Host::apply_entry`] applies an entry and puts what it does.
pub struct Applying<'a, T: Types> {
    /// Mutable: the host keeps the range's applied state there (its sessions).
    pub handle: &'a mut T::Range,
    pub range: RangeId,
    /// One per command of the entry, in order.
    pub answers: &'a mut Vec<T::Answer>,
    pub effects: &'a mut Vec<AdminEffect>,
}

/// The caller's side of the core: every I/O the raft protocol needs.
pub trait Host<T: Types> {
    /// Queues a raft message for the store holding `to`'s peer.
    fn send(&mut self, to: StoreId, range: RangeId, message: Message);
    /// Queues a heartbeat for the store-to-store batch; `urgent` ones (a ReadIndex
    /// context) leave with the next flush, the rest with the next tick batch.
    fn send_heartbeat(
        &mut self,
        to: StoreId,
        heartbeat: Heartbeat,
        kind: HeartbeatKind,
        urgent: bool,
    );
    /// Sends what was queued in this loop.
    fn flush(&mut self);
    /// The wall clock in milliseconds since the Unix epoch: the time a leader stamps
    /// on the entries it proposes (session expiry; never read at apply).
    fn wall_clock_ms(&self) -> u64;
    /// Submits a log write; see [`LogWrite::seq`].
    fn submit_log(&mut self, write: LogWrite);

    /// Starts this loop's apply batch.
    fn begin_apply(&mut self);
    /// Applies one committed normal entry of `to.range` to the apply batch: one answer
    /// per command, in order, and the admin effects. An entry that cannot be applied
    /// (it does not decode) is an error: the store must stop rather than diverge.
    fn apply_entry(&mut self, entry: &Entry, to: Applying<'_, T>) -> Result<(), Fatal>;
    /// Records `range`'s new membership, applied by the entry at `index`, in the apply
    /// batch (with the applied index that `set_applied` records after it).
    fn apply_membership(
        &mut self,
        handle: &mut T::Range,
        range: RangeId,
        index: u64,
        membership: &Membership,
    );
    /// Records `range`'s applied index and term in the apply batch, once per range
    /// per batch after its entries: state the entries changed in `handle` (the
    /// range's client sessions) goes into the batch here, once, not per entry.
    fn set_applied(&mut self, handle: &mut T::Range, range: RangeId, index: u64, term: u64);
    /// A snapshot of `range` for followers behind this leader's log: its state
    /// machine as applied through `index` (of `term`) — data, sessions, apply state;
    /// the core adds the membership. Called between apply batches, so the state is
    /// exactly that. `None`: none can be had now (raft-rs asks again).
    fn generate_snapshot(
        &mut self,
        handle: &T::Range,
        range: RangeId,
        index: u64,
        term: u64,
    ) -> Result<Option<Vec<u8>>, Fatal>;
    /// Replaces `range`'s state machine with a snapshot's (`payload`, as
    /// `generate_snapshot` made it on the leader), applied through `index` of `term`
    /// with `membership`: durable and atomic before this returns (a crash leaves the
    /// old state or the new one), the session table in `handle` reloaded. A payload
    /// that does not decode is an error.
    fn install_snapshot(
        &mut self,
        handle: &mut T::Range,
        range: RangeId,
        index: u64,
        term: u64,
        membership: &Membership,
        payload: &[u8],
    ) -> Result<(), Fatal>;
    /// Writes the apply batch (data and applied indexes together).
    fn commit_apply(&mut self) -> Result<(), Fatal>;
    /// The applied index of `range` that survives a crash (what the state machine
    /// has flushed).
    fn durable_applied(&self, range: RangeId) -> Result<u64, Fatal>;
    /// Asks the state machine to flush (without waiting).
    fn request_flush(&mut self) -> Result<(), Fatal>;

    fn answer_write(&mut self, reply: T::WriteReply, answer: T::Answer);
    fn refuse_write(&mut self, handle: &T::Range, reply: T::WriteReply, refusal: Refusal);
    /// A leader that lost its quorum gives up waiting: the outcome is unknown.
    fn abandon_write(&mut self, reply: T::WriteReply);
    fn answer_read(&mut self, reply: T::ReadReply);
    fn refuse_read(&mut self, handle: &T::Range, reply: T::ReadReply, refusal: Refusal);

    /// The range's state after a loop touched it.
    fn publish(&mut self, handle: &T::Range, view: RangeView);
}

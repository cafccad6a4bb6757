//! The simulation's side of the core: [`SimTypes`] (commands, replies, the entry
//! encoding) and [`SimHost`], the I/O of one store's loop over the world — the
//! store-level outbox and its batches, log writes completing after a seeded delay,
//! the in-memory state machine's apply batch (written without sync, flushed in the
//! background), client answers. Where a Host call is a moment an invariant speaks
//! of (a vote leaving, an entry applied), it is checked here.
//!
//! Client sessions are applied as `engine/node/src/command.rs` applies them: each
//! entry first drops the sessions idle past its [`Stamp`], an `OpenSession` command
//! registers one, and a write of a session applies only on [`Verdict::Apply`] (its
//! answer then recorded); a duplicate answers what was recorded, an expired session
//! is refused. The live table sits in the range's handle ([`SimRange`]); every change
//! goes into the state machine ([`Sm::sessions`]) with the data of the same entry, so
//! a crash keeps or loses them together, and a reopened replica loads the table back
//! from it before replaying the log.

use raft::eraftpb::{Entry, Message, MessageType};
use rangekv_raftstore::session::{Recorded, SessionChanges};
use rangekv_raftstore::{
    AdminEffect, Applying, Fatal, Heartbeat, HeartbeatKind, Host, LogWrite, Membership, RangeView,
    Refusal, SessionId, SessionRef, SessionTable, Stamp, Types, Verdict,
};
use rangekv_types::{RangeId, StoreId};

use super::clients::Reply;
use super::log::SimLog;
use super::store::Inbound;
use super::world::{range_index, Event, Phase, Sm, World, MS};

/// A client command inside a raft entry: an operation and, for a write of a client
/// session, its place in the session (the node's `Command.session`). Encoded by hand
/// ([`encode_entry`]): the real `Command` proto lives in rangekv-rpc, which this
/// crate does not depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub cmd: Cmd,
    pub session: Option<SessionRef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cmd {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    Cas {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    },
    /// Registers a client session at the range, every sequence below `floor`
    /// refused (the node's `OpenSession`).
    OpenSession {
        id: SessionId,
        floor: u64,
    },
}

/// What an applied write answers, as a range's session table records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Written,
    Cas(bool),
}

impl From<Applied> for Reply {
    fn from(applied: Applied) -> Reply {
        match applied {
            Applied::Written => Reply::Written,
            Applied::Cas(succeeded) => Reply::Cas(succeeded),
        }
    }
}

/// A recorded answer as persisted: 0 written; 1 then 0 or 1, a CAS and whether it
/// succeeded.
impl Recorded for Applied {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Applied::Written => out.push(0),
            Applied::Cas(succeeded) => out.extend_from_slice(&[1, u8::from(*succeeded)]),
        }
    }

    fn decode(input: &mut &[u8]) -> Option<Self> {
        let (&kind, rest) = input.split_first()?;
        let (applied, rest) = match (kind, rest) {
            (0, rest) => (Applied::Written, rest),
            (1, [succeeded @ (0 | 1), rest @ ..]) => (Applied::Cas(*succeeded == 1), rest),
            _ => return None,
        };
        *input = rest;
        Some(applied)
    }
}

/// A range's client sessions.
pub type Sessions = SessionTable<Applied>;

/// What a store keeps of a range beside the core (the node's `RangeHandle`): its id
/// and its client sessions, applied state loaded from the state machine when the
/// replica opens and changed by every entry applied.
#[derive(Debug)]
pub struct SimRange {
    pub id: RangeId,
    pub sessions: Sessions,
}

pub struct SimTypes;

impl Types for SimTypes {
    type Command = Command;
    /// The request id.
    type WriteReply = u64;
    type ReadReply = u64;
    type Answer = Reply;
    type Range = SimRange;
    type Log = SimLog;

    fn command_bytes(command: &Command) -> usize {
        let option = |o: &Option<Vec<u8>>| o.as_ref().map_or(1, |v| 5 + v.len());
        let session = if command.session.is_some() { 33 } else { 1 };
        session
            + match &command.cmd {
                Cmd::Put { key, value } => 9 + key.len() + value.len(),
                Cmd::Delete { key } => 5 + key.len(),
                Cmd::Cas { key, expected, new } => 5 + key.len() + option(expected) + option(new),
                Cmd::OpenSession { .. } => 25,
            }
    }

    fn encode_entry(commands: Vec<Command>, stamp: Stamp) -> Vec<u8> {
        encode_entry(&commands, stamp)
    }

    fn encode_compact_log(index: u64, term: u64) -> Vec<u8> {
        let mut out = vec![TAG_COMPACT_LOG];
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&term.to_le_bytes());
        out
    }
}

const TAG_COMMANDS: u8 = 1;
const TAG_COMPACT_LOG: u8 = 2;

/// The I/O of one store's loop, lent to its `Driver`.
pub struct SimHost<'a> {
    pub world: &'a mut World,
    pub node: usize,
}

impl SimHost<'_> {
    fn store_node(&self, to: StoreId) -> usize {
        to.get() as usize - 1
    }
}

fn not_leader(refusal: Refusal) -> Reply {
    match refusal {
        Refusal::NotLeader { leader } => Reply::NotLeader(leader),
        // Certainly not applied: the client may retry.
        Refusal::Dropped => Reply::NotLeader(None),
        Refusal::Stopping => Reply::Refused,
    }
}

impl Host<SimTypes> for SimHost<'_> {
    fn send(&mut self, to: StoreId, range: RangeId, message: Message) {
        self.world.check_outgoing(self.node, range, &message);
        if message.msg_type == MessageType::MsgSnapshot {
            // The node's transport reports each snapshot stream's end; here the
            // report comes at once, one in eight a failure.
            let delivered = !self.world.net_rng.chance(125);
            let report = Inbound::SnapshotSent {
                range,
                to: message.to,
                delivered,
            };
            self.world.live_mut(self.node).inbox.push_back(report);
            self.world.wake_soon(self.node);
        }
        let to = self.store_node(to);
        let live = self.world.live_mut(self.node);
        live.outbox[to].messages.push((range, message));
    }

    fn send_heartbeat(&mut self, to: StoreId, beat: Heartbeat, kind: HeartbeatKind, urgent: bool) {
        let to = self.store_node(to);
        let outbox = &mut self.world.live_mut(self.node).outbox[to];
        match (kind, urgent) {
            (HeartbeatKind::Heartbeat, true) => outbox.heartbeats.push(beat),
            (HeartbeatKind::Response, true) => outbox.responses.push(beat),
            (HeartbeatKind::Heartbeat, false) => outbox.tick_heartbeats.push(beat),
            (HeartbeatKind::Response, false) => outbox.tick_responses.push(beat),
            (HeartbeatKind::Quiesce, _) => outbox.quiesce.push(beat),
        }
    }

    fn flush(&mut self) {
        self.world.flush_outbox(self.node);
    }

    fn wall_clock_ms(&self) -> u64 {
        self.world.wall_clock_ms(self.node)
    }

    fn submit_log(&mut self, write: LogWrite) {
        self.world.submit_log(self.node, write);
    }

    fn begin_apply(&mut self) {
        let node = &self.world.nodes[self.node];
        let applied: Vec<u64> = node.sm.iter().map(|sm| sm.applied).collect();
        self.world.live_mut(self.node).batch_applied = applied;
    }

    fn apply_entry(&mut self, entry: &Entry, to: Applying<'_, SimTypes>) -> Result<(), Fatal> {
        let range = to.range;
        let r = range_index(range);
        self.world.check_applying(self.node, r, entry);
        let decoded = decode_entry(&entry.data).map_err(|reason| Fatal::Unappliable {
            range,
            index: entry.index,
            reason,
        })?;
        match decoded {
            Decoded::Commands { stamp, commands } => {
                let sessions = &mut to.handle.sessions;
                let before = sessions.len();
                sessions.expire(stamp);
                if sessions.len() < before {
                    self.world.inv.ranges[r].expiries.insert(entry.index);
                }
                for (position, command) in commands.iter().enumerate() {
                    let at = (entry.index, position);
                    let answer = self.apply_in_session(r, at, sessions, command, stamp);
                    to.answers.push(answer);
                }
            }
            Decoded::CompactLog { index, term } => {
                to.effects.push(AdminEffect::CompactLog { index, term });
            }
        }
        self.world.live_mut(self.node).batch_applied[r] = entry.index;
        self.world
            .check_entry_state(self.node, r, entry.index, &to.handle.sessions);
        Ok(())
    }

    fn apply_membership(
        &mut self,
        handle: &mut SimRange,
        range: RangeId,
        index: u64,
        membership: &Membership,
    ) {
        let r = range_index(range);
        self.world.check_membership(self.node, r, index, membership);
        self.world.nodes[self.node].sm[r].membership = Some(membership.clone());
        self.world.live_mut(self.node).batch_applied[r] = index;
        self.world
            .check_entry_state(self.node, r, index, &handle.sessions);
    }

    fn set_applied(&mut self, handle: &mut SimRange, range: RangeId, index: u64, term: u64) {
        let r = range_index(range);
        // The sessions the batch's entries changed, into the same apply batch as the
        // data, once per range (the node's `persist_sessions`).
        let SessionChanges { write, delete } = handle.sessions.take_changes();
        let sm = &mut self.world.nodes[self.node].sm[r];
        for (id, record) in write {
            sm.write_session(id, record);
        }
        for id in delete {
            sm.delete_session(id);
        }
        self.world
            .check_all_sessions_persisted(self.node, r, &handle.sessions);
        let batch_applied = self.world.live_mut(self.node).batch_applied[r];
        let before = self.world.nodes[self.node].sm[r].applied;
        if index < batch_applied || index <= before {
            let id = self.node + 1;
            self.world.fail(format!(
                "n{id} {range}: applied index set to {index} after applying {batch_applied} (was {before})"
            ));
        }
        self.world.nodes[self.node].sm[r].applied = index;
        self.world.nodes[self.node].sm[r].applied_term = term;
        // Sessions are persisted per batch, so the state is compared at the batch's
        // last entry (every node's state after applying `index` is the same).
        self.world.check_applied_state(self.node, r, index);
    }

    /// A copy of the state machine as applied (sessions as persisted: the batch that
    /// applied `index` wrote them), kept in the world; the payload is its number.
    fn generate_snapshot(
        &mut self,
        _handle: &SimRange,
        range: RangeId,
        index: u64,
        term: u64,
    ) -> Result<Option<Vec<u8>>, Fatal> {
        if self.world.core.log_gc_lag_entries == u64::MAX {
            return Ok(None);
        }
        let sm = &self.world.nodes[self.node].sm[range_index(range)];
        if (sm.applied, sm.applied_term) != (index, term) {
            let what = format!(
                "n{} {range}: snapshot asked at {index}/t{term}, the state machine is at {}/t{}",
                self.node + 1,
                sm.applied,
                sm.applied_term
            );
            self.world.fail(what);
            return Ok(None);
        }
        let number = self.world.snapshots.len() as u64;
        let copy = sm.clone();
        self.world.snapshots.push(copy);
        self.world.summary.snapshots_built += 1;
        self.world.log(|| {
            format!(
                "n{} {range}: snapshot #{number} built at {index}/t{term}",
                self.node + 1
            )
        });
        Ok(Some(number.to_le_bytes().to_vec()))
    }

    /// Replaces the range's state machine with the snapshot's and makes it durable
    /// at once: the node writes it with a sync after flushing what was applied before
    /// it, so a crash keeps it and every apply batch before it.
    fn install_snapshot(
        &mut self,
        handle: &mut SimRange,
        range: RangeId,
        index: u64,
        term: u64,
        membership: &Membership,
        payload: &[u8],
    ) -> Result<(), Fatal> {
        let r = range_index(range);
        let refused = |reason: String| Fatal::Snapshot {
            range,
            index,
            reason,
        };
        let number = <[u8; 8]>::try_from(payload)
            .map(u64::from_le_bytes)
            .map_err(|_| refused("the payload is not a snapshot number".into()))?;
        let mut sm = self
            .world
            .snapshots
            .get(number as usize)
            .cloned()
            .ok_or_else(|| refused(format!("no snapshot #{number}")))?;
        if (sm.applied, sm.applied_term) != (index, term) {
            return Err(refused(format!(
                "snapshot #{number} is at {}/t{}",
                sm.applied, sm.applied_term
            )));
        }
        let kept = sm
            .membership
            .clone()
            .unwrap_or_else(|| self.world.bootstrap_membership());
        if kept != *membership {
            return Err(refused("its membership is not the state machine's".into()));
        }
        let records = sm.sessions.iter().map(|(id, s)| (*id, s.record.clone()));
        handle.sessions = Sessions::load(records).map_err(|error| refused(error.to_string()))?;
        sm.snapshot_index = index;
        let durable = !self.world.opts.buggy_snapshot_not_durable;
        let node = &mut self.world.nodes[self.node];
        node.sm[r] = sm;
        if durable {
            node.sm_synced = node.sm.clone();
            node.sm_unsynced.clear();
        } else {
            let state = node.sm.clone();
            node.sm_unsynced.push(state);
        }
        self.world.summary.snapshots_installed += 1;
        self.world.log(|| {
            format!(
                "n{} {range}: snapshot #{number} installed at {index}/t{term}",
                self.node + 1
            )
        });
        self.world.reset_chain(self.node, r, index, term);
        self.world.check_applied_state(self.node, r, index);
        // A targeted fault: the store crashes before the log's reset is durable (it
        // must reset the log at open), one install in four.
        if self.world.phase == Phase::Chaos && self.world.fault_rng.chance(250) {
            self.world.count("crash right after a snapshot install");
            let downtime = self.world.fault_rng.range(50 * MS, 500 * MS);
            let until = self.world.now;
            let bounce = Event::Bounce {
                node: self.node,
                downtime,
                cut_from: None,
                until,
            };
            self.world.after(0, bounce);
        }
        Ok(())
    }

    fn commit_apply(&mut self) -> Result<(), Fatal> {
        // Written without sync (RocksDB with the WAL off): a crash keeps a prefix of
        // the batches since the last flush.
        let node = &mut self.world.nodes[self.node];
        let state = node.sm.clone();
        node.sm_unsynced.push(state);
        Ok(())
    }

    fn durable_applied(&self, range: RangeId) -> Result<u64, Fatal> {
        let node = &self.world.nodes[self.node];
        if self.world.opts.buggy_durable_applied {
            return Ok(node.sm[range_index(range)].applied);
        }
        Ok(node.sm_synced[range_index(range)].applied)
    }

    fn request_flush(&mut self) -> Result<(), Fatal> {
        self.world.summary.flush_requests += 1;
        let delay = self.world.disk_rng.range(MS, 50 * MS);
        let inc = self.world.nodes[self.node].inc;
        self.world.after(
            delay,
            Event::SmSync {
                node: self.node,
                inc,
                periodic: false,
            },
        );
        Ok(())
    }

    fn answer_write(&mut self, reply: u64, answer: Reply) {
        self.world.answer(self.node, reply, answer);
    }

    fn refuse_write(&mut self, _handle: &SimRange, reply: u64, refusal: Refusal) {
        let node = self.node + 1;
        self.world
            .log(|| format!("n{node} refuses write r{reply}: {refusal:?}"));
        self.world.answer(self.node, reply, not_leader(refusal));
    }

    fn abandon_write(&mut self, reply: u64) {
        let node = self.node + 1;
        self.world
            .log(|| format!("n{node} abandons write r{reply}: outcome unknown"));
        self.world.answer(self.node, reply, Reply::Lost);
    }

    fn answer_read(&mut self, reply: u64) {
        self.world.answer_read(self.node, reply);
    }

    fn refuse_read(&mut self, _handle: &SimRange, reply: u64, refusal: Refusal) {
        self.world.answer(self.node, reply, not_leader(refusal));
    }

    fn publish(&mut self, handle: &SimRange, view: RangeView) {
        self.world.on_publish(self.node, handle.id, view);
    }
}

impl SimHost<'_> {
    /// Applies one command of the entry at `at` (index, position) under its session,
    /// as the node's `apply_in_session`: at most once per (session, sequence); a
    /// repeat answers what the first application answered.
    fn apply_in_session(
        &mut self,
        r: usize,
        at: (u64, usize),
        sessions: &mut Sessions,
        command: &Command,
        stamp: Stamp,
    ) -> Reply {
        let now_ms = stamp.proposed_at_ms;
        if let Cmd::OpenSession { id, floor } = command.cmd {
            return match sessions.open(id, floor, now_ms, at.0) {
                Some(opened_at) => Reply::Opened(opened_at),
                None => Reply::Busy,
            };
        }
        let sm = &mut self.world.nodes[self.node].sm[r];
        let Some(session) = command.session else {
            return apply_command(sm, &command.cmd).into();
        };
        match sessions.check(session, now_ms) {
            Verdict::Apply => {}
            Verdict::Duplicate(answer) => {
                let answer = answer.clone();
                self.world.inv.ranges[r].duplicates.insert(at);
                if !self.world.opts.buggy_reapply {
                    return answer.into();
                }
            }
            Verdict::Expired => {
                self.world.inv.ranges[r].refused_expired.insert(at);
                return Reply::SessionExpired;
            }
            Verdict::TooManyInFlight => return Reply::Busy,
        }
        self.world.check_applied_once(self.node, r, session, at.0);
        let sm = &mut self.world.nodes[self.node].sm[r];
        let applied = apply_command(sm, &command.cmd);
        sessions.record(session, applied.clone());
        applied.into()
    }
}

/// Applies one command to a range's state machine deterministically.
pub fn apply_command(sm: &mut Sm, command: &Cmd) -> Applied {
    match command {
        Cmd::Put { key, value } => {
            sm.kv.insert(key.clone(), value.clone());
            Applied::Written
        }
        Cmd::Delete { key } => {
            sm.kv.remove(key);
            Applied::Written
        }
        Cmd::Cas { key, expected, new } => {
            if sm.kv.get(key) != expected.as_ref() {
                return Applied::Cas(false);
            }
            match new {
                Some(new) => sm.kv.insert(key.clone(), new.clone()),
                None => sm.kv.remove(key),
            };
            Applied::Cas(true)
        }
        // Sessions are `apply_in_session`'s.
        Cmd::OpenSession { .. } => Applied::Written,
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_option(out: &mut Vec<u8>, bytes: &Option<Vec<u8>>) {
    match bytes {
        None => out.push(0),
        Some(bytes) => {
            out.push(1);
            put_bytes(out, bytes);
        }
    }
}

/// `[TAG_COMMANDS] [proposed at, ms] [session lifetime, ms] [count] ([tag] fields
/// [session])*`, little-endian, lengths as u32, a session as `0` (none) or `1` id
/// sequence acked-below; a log compaction is `[TAG_COMPACT_LOG] [index] [term]`.
pub fn encode_entry(commands: &[Command], stamp: Stamp) -> Vec<u8> {
    let mut out = vec![TAG_COMMANDS];
    out.extend_from_slice(&stamp.proposed_at_ms.to_le_bytes());
    out.extend_from_slice(&stamp.session_ttl_ms.to_le_bytes());
    out.extend_from_slice(&(commands.len() as u32).to_le_bytes());
    for command in commands {
        match &command.cmd {
            Cmd::Put { key, value } => {
                out.push(1);
                put_bytes(&mut out, key);
                put_bytes(&mut out, value);
            }
            Cmd::Delete { key } => {
                out.push(2);
                put_bytes(&mut out, key);
            }
            Cmd::Cas { key, expected, new } => {
                out.push(3);
                put_bytes(&mut out, key);
                put_option(&mut out, expected);
                put_option(&mut out, new);
            }
            Cmd::OpenSession { id, floor } => {
                out.push(4);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&floor.to_le_bytes());
            }
        }
        match command.session {
            None => out.push(0),
            Some(session) => {
                out.push(1);
                out.extend_from_slice(&session.id.to_le_bytes());
                out.extend_from_slice(&session.sequence.to_le_bytes());
                out.extend_from_slice(&session.acked_below.to_le_bytes());
                out.extend_from_slice(&session.opened_at.to_le_bytes());
            }
        }
    }
    out
}

pub enum Decoded {
    Commands {
        stamp: Stamp,
        commands: Vec<Command>,
    },
    CompactLog {
        index: u64,
        term: u64,
    },
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err(format!("{} bytes short", n - self.0.len()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        let mut word = [0; 4];
        word.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(word))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut word = [0; 8];
        word.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(word))
    }
    fn u128(&mut self) -> Result<u128, String> {
        let mut word = [0; 16];
        word.copy_from_slice(self.take(16)?);
        Ok(u128::from_le_bytes(word))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn option(&mut self) -> Result<Option<Vec<u8>>, String> {
        match self.byte()? {
            0 => Ok(None),
            _ => Ok(Some(self.bytes()?)),
        }
    }
}

pub fn decode_entry(data: &[u8]) -> Result<Decoded, String> {
    let mut reader = Reader(data);
    let decoded = match reader.byte()? {
        TAG_COMMANDS => {
            let stamp = Stamp {
                proposed_at_ms: reader.u64()?,
                session_ttl_ms: reader.u64()?,
            };
            let count = reader.u32()?;
            let mut commands = Vec::new();
            for _ in 0..count {
                let cmd = match reader.byte()? {
                    1 => Cmd::Put {
                        key: reader.bytes()?,
                        value: reader.bytes()?,
                    },
                    2 => Cmd::Delete {
                        key: reader.bytes()?,
                    },
                    3 => Cmd::Cas {
                        key: reader.bytes()?,
                        expected: reader.option()?,
                        new: reader.option()?,
                    },
                    4 => Cmd::OpenSession {
                        id: reader.u128()?,
                        floor: reader.u64()?,
                    },
                    tag => return Err(format!("bad command tag {tag}")),
                };
                let session = match reader.byte()? {
                    0 => None,
                    1 => Some(SessionRef {
                        id: reader.u128()?,
                        sequence: reader.u64()?,
                        acked_below: reader.u64()?,
                        opened_at: reader.u64()?,
                    }),
                    tag => return Err(format!("bad session tag {tag}")),
                };
                commands.push(Command { cmd, session });
            }
            Decoded::Commands { stamp, commands }
        }
        TAG_COMPACT_LOG => Decoded::CompactLog {
            index: reader.u64()?,
            term: reader.u64()?,
        },
        tag => return Err(format!("bad entry tag {tag}")),
    };
    if !reader.0.is_empty() {
        return Err(format!("{} bytes left over", reader.0.len()));
    }
    Ok(decoded)
}

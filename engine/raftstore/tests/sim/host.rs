//! The simulation's side of the core: [`SimTypes`] (commands, replies, the entry
//! encoding) and [`SimHost`], the I/O of one store's loop over the world — the
//! store-level outbox and its batches, log writes completing after a seeded delay,
//! the in-memory state machine's apply batch (written without sync, flushed in the
//! background), client answers. Where a Host call is a moment an invariant speaks
//! of (a vote leaving, an entry applied), it is checked here.

use raft::eraftpb::{Entry, Message};
use rangekv_raftstore::{
    AdminEffect, Applying, Fatal, Heartbeat, HeartbeatKind, Host, LogWrite, RangeView, Refusal,
    Types,
};
use rangekv_types::{RangeId, StoreId};

use super::clients::Reply;
use super::log::SimLog;
use super::world::{range_index, Event, Sm, World, MS};

/// A client write inside a raft entry. Encoded by hand ([`encode_entry`]): the real
/// `Command` proto lives in rangekv-rpc, which this crate does not depend on.
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
}

impl Cmd {
    pub fn key(&self) -> &[u8] {
        match self {
            Cmd::Put { key, .. } | Cmd::Delete { key } | Cmd::Cas { key, .. } => key,
        }
    }
}

pub struct SimTypes;

impl Types for SimTypes {
    type Command = Cmd;
    /// The request id.
    type WriteReply = u64;
    type ReadReply = u64;
    type Answer = Reply;
    type Range = RangeId;
    type Log = SimLog;

    fn command_bytes(command: &Cmd) -> usize {
        let option = |o: &Option<Vec<u8>>| o.as_ref().map_or(1, |v| 5 + v.len());
        match command {
            Cmd::Put { key, value } => 9 + key.len() + value.len(),
            Cmd::Delete { key } => 5 + key.len(),
            Cmd::Cas { key, expected, new } => 5 + key.len() + option(expected) + option(new),
        }
    }

    fn encode_entry(commands: Vec<Cmd>) -> Vec<u8> {
        encode_entry(&commands)
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
        let sm = &mut self.world.nodes[self.node].sm[r];
        match decoded {
            Decoded::Commands(commands) => {
                to.answers
                    .extend(commands.iter().map(|command| apply_command(sm, command)));
            }
            Decoded::CompactLog { index, term } => {
                to.effects.push(AdminEffect::CompactLog { index, term });
            }
        }
        self.world.live_mut(self.node).batch_applied[r] = entry.index;
        self.world.check_applied_state(self.node, r, entry.index);
        Ok(())
    }

    fn set_applied(&mut self, range: RangeId, index: u64, _term: u64) {
        let r = range_index(range);
        let batch_applied = self.world.live_mut(self.node).batch_applied[r];
        let before = self.world.nodes[self.node].sm[r].applied;
        if index < batch_applied || index <= before {
            let id = self.node + 1;
            self.world.fail(format!(
                "n{id} {range}: applied index set to {index} after applying {batch_applied} (was {before})"
            ));
        }
        self.world.nodes[self.node].sm[r].applied = index;
        // Entries skipped by apply (a new leader's empty one) change nothing.
        self.world.check_applied_state(self.node, r, index);
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

    fn refuse_write(&mut self, _handle: &RangeId, reply: u64, refusal: Refusal) {
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

    fn refuse_read(&mut self, _handle: &RangeId, reply: u64, refusal: Refusal) {
        self.world.answer(self.node, reply, not_leader(refusal));
    }

    fn publish(&mut self, handle: &RangeId, view: RangeView) {
        self.world.on_publish(self.node, *handle, view);
    }
}

/// Applies one command to a range's state machine deterministically.
pub fn apply_command(sm: &mut Sm, command: &Cmd) -> Reply {
    match command {
        Cmd::Put { key, value } => {
            sm.kv.insert(key.clone(), value.clone());
            Reply::Written
        }
        Cmd::Delete { key } => {
            sm.kv.remove(key);
            Reply::Written
        }
        Cmd::Cas { key, expected, new } => {
            if sm.kv.get(key) != expected.as_ref() {
                return Reply::Cas(false);
            }
            match new {
                Some(new) => sm.kv.insert(key.clone(), new.clone()),
                None => sm.kv.remove(key),
            };
            Reply::Cas(true)
        }
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

/// `[TAG_COMMANDS] [count] ([tag] fields)*`, little-endian, lengths as u32; a log
/// compaction is `[TAG_COMPACT_LOG] [index] [term]`.
pub fn encode_entry(commands: &[Cmd]) -> Vec<u8> {
    let mut out = vec![TAG_COMMANDS];
    out.extend_from_slice(&(commands.len() as u32).to_le_bytes());
    for command in commands {
        match command {
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
        }
    }
    out
}

pub enum Decoded {
    Commands(Vec<Cmd>),
    CompactLog { index: u64, term: u64 },
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
            let count = reader.u32()?;
            let mut commands = Vec::new();
            for _ in 0..count {
                let command = match reader.byte()? {
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
                    tag => return Err(format!("bad command tag {tag}")),
                };
                commands.push(command);
            }
            Decoded::Commands(commands)
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

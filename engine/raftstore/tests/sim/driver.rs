//! The store driver around each `Replica`: a step-by-step mirror of
//! `engine/node/src/worker.rs` for one range per store (the steps are named after
//! the worker's functions). Left out: quiescence (never quiesces: every range ticks),
//! heartbeat coalescing and `report_unreachable` (transport details), log
//! compaction (no snapshots yet), chunking of big write batches.

use std::collections::{BTreeSet, VecDeque};

use raft::eraftpb::{ConfState, Entry, EntryType, Message, MessageType};
use raft::RawNode;
use rangekv_raftstore::replica::Replica;
use rangekv_types::PeerId;

use super::clients::Reply;
use super::rng::Hash;
use super::storage::{LogWrite, SimStorage};
use super::world::{
    election_timeout, fmt_msg, lease_duration, replica_config, Cmd, Event, Inbound, Live, Record,
    World, MS, TICK,
};

impl World {
    /// `Worker::open_range`: a replica over the node's durable log, with the durable
    /// applied index of its state machine. `reopened`: its log existed before.
    pub fn open(&mut self, node: usize, reopened: bool) {
        let n = self.nodes.len() as u64;
        let id = self.nodes[node].id;
        let disk = self.nodes[node]
            .disk
            .take()
            .expect("a down node has its disk");
        let applied = self.nodes[node].sm.applied;
        let conf_state = ConfState {
            voters: (1..=n).collect(),
            ..Default::default()
        };
        let storage = SimStorage::new(disk, conf_state, applied);
        let config = replica_config()
            .raft_config(PeerId(id), applied)
            .expect("valid raft config");
        let raw = RawNode::new(&config, storage, &self.logger).expect("raw node opens");
        let had_term = raw.raft.term > 0;
        let votes_refused_until = (reopened && had_term).then(|| self.now + election_timeout());
        // `StoreConfig::election_seed` comes from the wall clock at each store start.
        let election_seed = self.fault_rng.next_u64();
        let replica = Replica::new(
            raw,
            applied,
            lease_duration(),
            election_seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let inc = self.nodes[node].inc;
        let live = Live {
            replica,
            writes: Vec::new(),
            persisting: 0,
            records: VecDeque::new(),
            next_seq: 1,
            touched: true,
            votes_refused_until,
            control: VecDeque::new(),
            inbox: VecDeque::new(),
            wake: None,
            wake_gen: 0,
            tick_due: false,
            next_tick_at: 0,
            write_done_at: self.now,
            open: BTreeSet::new(),
            checked_commit: 0,
            chain: Vec::new(),
        };
        // Log matching over the durable log it reopens with.
        let last = live.replica.raw.store().log.disk.last_index();
        let entries = live.replica.raw.store().view_entries(1, last + 1);
        self.nodes[node].live = Some(live);
        self.extend_chain(node, &entries);
        let phase = self.net_rng.below(TICK);
        self.after(phase, Event::Tick { node, inc });
        let first_tick = self.now + phase;
        if let Some(live) = self.nodes[node].live.as_mut() {
            live.next_tick_at = first_tick;
        }
        let sync = self.disk_rng.range(300 * MS, 2_000 * MS);
        self.after(sync, Event::SmSync { node, inc });
        self.wake_at(node, self.now);
    }

    /// One iteration of `Worker::run`: `wait_and_drain`, `tick_all` when a tick is
    /// due, `process`.
    pub fn run_loop(&mut self, node: usize) {
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        live.wake = None;
        // wait_and_drain: control and inbox, alternating, until both are empty.
        loop {
            let mut progressed = false;
            let live = self.nodes[node].live.as_mut().expect("live");
            if let Some(seq) = live.control.pop_front() {
                self.on_persisted(node, seq);
                progressed = true;
            }
            let live = self.nodes[node].live.as_mut().expect("live");
            if let Some(message) = live.inbox.pop_front() {
                self.on_inbound(node, message);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        let live = self.nodes[node].live.as_mut().expect("live");
        if std::mem::take(&mut live.tick_due) {
            // tick_all (no quiescence: every range is awake).
            let ticked = live.replica.tick();
            if ticked || live.replica.raw.has_ready() {
                live.touched = true;
            }
        }
        self.process(node);
        let live = self.nodes[node].live.as_mut().expect("live");
        if live.touched {
            // wait_and_drain does not wait while a range is touched.
            self.wake_at(node, self.now);
        }
    }

    /// `Worker::on_inbound`.
    fn on_inbound(&mut self, node: usize, message: Inbound) {
        match message {
            Inbound::Raft(message) => self.step(node, message),
            Inbound::Write(command, req) => {
                let live = self.nodes[node].live.as_mut().expect("live");
                live.writes.push((command, req));
                live.touched = true;
            }
            Inbound::Read(req) => {
                if self.opts.buggy_reads {
                    // The deliberately broken mode: no lease, no ReadIndex, any node.
                    self.answer_read(node, req);
                    return;
                }
                let now = self.instant();
                let live = self.nodes[node].live.as_mut().expect("live");
                match live.replica.read(now, req) {
                    Ok(Some(req)) => {
                        self.log(|| format!("n{} lease read r{req}", node + 1));
                        self.answer_read(node, req);
                    }
                    Ok(None) => live.touched = true,
                    Err(refused) => {
                        let hint = refused.leader;
                        self.answer(node, refused.returned, Reply::NotLeader(hint));
                    }
                }
            }
        }
    }

    /// `Worker::step`: votes refused for an election timeout after a reopen.
    fn step(&mut self, node: usize, message: Message) {
        let now = self.now;
        let live = self.nodes[node].live.as_mut().expect("live");
        if matches!(
            message.msg_type,
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        ) {
            if let Some(until) = live.votes_refused_until {
                if now < until {
                    self.log(|| format!("n{} refuses (reopened) {}", node + 1, fmt_msg(&message)));
                    return;
                }
                live.votes_refused_until = None;
            }
        }
        let _ = live.replica.step(message);
        live.touched = true;
    }

    /// `propose_writes`: the writes gathered this iteration as one entry.
    fn propose_writes(&mut self, node: usize) {
        let now = self.instant();
        let live = self.nodes[node].live.as_mut().expect("live");
        if live.writes.is_empty() {
            return;
        }
        let writes = std::mem::take(&mut live.writes);
        if !live.replica.is_leader() {
            let hint = live.replica.leader_id();
            for (_, req) in writes {
                self.answer(node, req, Reply::NotLeader(hint));
            }
            return;
        }
        let (commands, reqs): (Vec<Cmd>, Vec<u64>) = writes.into_iter().unzip();
        let data = encode_entry(&commands, &reqs);
        let live = self.nodes[node].live.as_mut().expect("live");
        match live.replica.propose(now, data, reqs) {
            Ok(()) => {
                let index = live.replica.raw.raft.raft_log.last_index();
                let term = live.replica.term();
                let count = commands.len();
                self.log(|| format!("n{} proposes {count} writes at {index}/t{term}", node + 1));
            }
            Err(refused) => {
                let hint = refused.leader;
                for req in refused.returned {
                    self.answer(node, req, Reply::NotLeader(hint));
                }
            }
        }
    }

    /// `Worker::process` for the one range of this store.
    fn process(&mut self, node: usize) {
        let now = self.instant();
        let live = self.nodes[node].live.as_mut().expect("live");
        if !std::mem::take(&mut live.touched) {
            return;
        }
        // Proposals and reads first: they join this iteration's Ready.
        self.propose_writes(node);
        let live = self.nodes[node].live.as_mut().expect("live");
        live.replica.flush_reads(now);
        let seq = live.next_seq;
        let mut write = LogWrite {
            seq,
            entries: Vec::new(),
            hard_state: None,
        };
        let mut record = Record {
            seq,
            readies: Vec::new(),
        };
        let mut committed = Vec::new();
        let mut not_served = Vec::new();
        let mut abandoned = Vec::new();
        if live.replica.raw.has_ready() {
            let mut ready = live.replica.raw.ready();
            if let Some(soft) = ready.ss() {
                let role = soft.raft_state;
                live.replica.on_role(role, &mut not_served, &mut abandoned);
                let term = live.replica.term();
                if self.logging() {
                    let nodes = self.describe_nodes();
                    self.log(|| format!("n{} is now {role:?} in term {term};{nodes}", node + 1));
                }
            }
            // Leader messages go out at once (raft thesis §10.2.1).
            let immediate = ready.take_messages();
            self.send_all(node, immediate);
            let live = self.nodes[node].live.as_mut().expect("live");
            assert!(
                ready.snapshot().is_empty(),
                "raft asked for a snapshot: not supported"
            );
            if !ready.read_states().is_empty() {
                let mut reads = Vec::new();
                live.replica
                    .on_read_states(ready.take_read_states(), &mut reads);
                for req in reads {
                    self.answer_read(node, req);
                }
            }
            let live = self.nodes[node].live.as_mut().expect("live");
            committed = ready.take_committed_entries();
            let appended = ready.take_entries();
            let hard_state = ready.hs().cloned();
            let after_persist = ready.take_persisted_messages();
            let number = ready.number();
            let needs_persist = !appended.is_empty() || hard_state.is_some();
            if !appended.is_empty() {
                live.replica.raw.mut_store().append_unstable(&appended, seq);
                self.extend_chain(node, &appended);
                write.entries = appended;
            }
            write.hard_state = hard_state;
            let live = self.nodes[node].live.as_mut().expect("live");
            live.replica.raw.advance_append_async(ready);
            if needs_persist || live.persisting > 0 {
                live.persisting += 1;
                record.readies.push((number, after_persist));
            } else {
                live.replica.raw.on_persist_ready(number);
                live.touched = true;
                self.send_all(node, after_persist);
            }
        }
        for req in not_served {
            self.answer(node, req, Reply::NotLeader(None));
        }
        // A leader that lost its quorum: its proposals' outcome is unknown.
        for reqs in abandoned {
            for req in reqs {
                self.log(|| format!("n{} proposal r{req} abandoned: lost its quorum", node + 1));
                self.answer(node, req, Reply::Lost);
            }
        }
        self.submit(node, write, record);
        if !committed.is_empty() {
            self.apply(node, committed);
        }
    }

    /// `Worker::submit`: one log write, completing after a seeded delay, in order.
    fn submit(&mut self, node: usize, write: LogWrite, record: Record) {
        if record.readies.is_empty() {
            return;
        }
        let inc = self.nodes[node].inc;
        let latency = if self.disk_rng.chance(20) {
            self.disk_rng.range(10 * MS, 200 * MS)
        } else {
            self.disk_rng.range(MS / 5, 3 * MS)
        };
        let live = self.nodes[node].live.as_mut().expect("live");
        let seq = record.seq;
        live.next_seq += 1;
        live.records.push_back(record);
        let entries = write.entries.len();
        live.replica.raw.mut_store().log.submit(write);
        // Writes complete in order: never before the previous one.
        let done = (self.now + latency).max(live.write_done_at);
        live.write_done_at = done;
        self.log(|| {
            format!(
                "n{} log write {seq} submitted ({entries} entries), durable at {:.3}ms",
                node + 1,
                done as f64 / 1e6
            )
        });
        self.schedule(done, Event::Persisted { node, inc, seq });
    }

    /// `Worker::on_persisted`: the write is durable; its `Ready`s are persisted and
    /// their held messages (votes, append responses) go out only now.
    fn on_persisted(&mut self, node: usize, seq: u64) {
        let live = self.nodes[node].live.as_mut().expect("live");
        let Some(record) = live.records.pop_front() else {
            return;
        };
        assert_eq!(record.seq, seq, "log writes complete in order");
        for (number, messages) in record.readies {
            let live = self.nodes[node].live.as_mut().expect("live");
            live.persisting = live.persisting.saturating_sub(1);
            live.replica.raw.mut_store().on_durable(seq);
            live.replica.raw.on_persist_ready(number);
            live.touched = true;
            self.send_all(node, messages);
        }
    }

    /// `Worker::apply`: committed entries applied in one batch (state machine and
    /// applied index together), then clients answered, then `on_applied`.
    fn apply(&mut self, node: usize, entries: Vec<Entry>) {
        let mut answers: Vec<(u64, Reply)> = Vec::new();
        let mut dropped: Vec<Vec<u64>> = Vec::new();
        let mut last = 0;
        for entry in entries {
            last = entry.index;
            self.check_applying(node, &entry);
            let live = self.nodes[node].live.as_mut().expect("live");
            let proposal = live
                .replica
                .take_outcome(entry.index, entry.term, &mut dropped);
            let sm = &mut self.nodes[node].sm;
            if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
                if let Some(proposal) = proposal {
                    dropped.push(proposal);
                }
                sm.applied = entry.index;
                self.check_applied_state(node, entry.index);
                continue;
            }
            let (commands, _) = decode_entry(&entry.data);
            let results: Vec<Reply> = commands.iter().map(|c| apply_command(sm, c)).collect();
            sm.applied = entry.index;
            self.check_applied_state(node, entry.index);
            if let Some(reqs) = proposal {
                assert_eq!(reqs.len(), results.len(), "one result per command");
                answers.extend(reqs.into_iter().zip(results));
            }
        }
        if last == 0 {
            return;
        }
        // The apply batch is written (not synced: see `Node::sm_unsynced`).
        let node_ref = &mut self.nodes[node];
        node_ref.sm_unsynced.push(node_ref.sm.clone());
        for (req, reply) in answers {
            self.answer(node, req, reply);
        }
        for reqs in dropped {
            for req in reqs {
                self.log(|| {
                    format!(
                        "n{} proposal r{req} dropped: another entry took its index",
                        node + 1
                    )
                });
                self.answer(node, req, Reply::NotLeader(None));
            }
        }
        let mut reads = Vec::new();
        let live = self.nodes[node].live.as_mut().expect("live");
        live.replica.on_applied(last, &mut reads);
        live.touched = true;
        for req in reads {
            self.answer_read(node, req);
        }
    }

    /// The transport: every message to the network (`send` in worker.rs).
    pub fn send_all(&mut self, node: usize, messages: Vec<Message>) {
        for message in messages {
            self.check_outgoing(node, &message);
            self.send(node, message);
        }
    }

    /// Log-matching bookkeeping for entries entering `node`'s view.
    fn extend_chain(&mut self, node: usize, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        let live = self.nodes[node].live.as_mut().expect("live");
        let start = first.index as usize - 1;
        if start > live.chain.len() {
            let have = live.chain.len();
            self.fail(format!(
                "n{}: entries from {} appended to a log ending at {have}",
                node + 1,
                first.index
            ));
            return;
        }
        live.chain.truncate(start);
        let mut prev = live.chain.last().copied().unwrap_or(0);
        let mut added = Vec::with_capacity(entries.len());
        for entry in entries {
            let mut hash = Hash(prev);
            hash.u64(entry.index)
                .u64(entry.term)
                .u64(entry.entry_type as u64)
                .bytes(&entry.data);
            prev = hash.0;
            added.push((entry.index, entry.term, prev));
        }
        live.chain.extend(added.iter().map(|a| a.2));
        for (index, term, hash) in added {
            self.check_chain(node, index, term, hash);
        }
    }
}

/// Applies one command to the state machine deterministically.
pub fn apply_command(sm: &mut super::world::Sm, command: &Cmd) -> Reply {
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

/// `[count] ([request id] [tag] fields)*`, little-endian, lengths as u32.
pub fn encode_entry(commands: &[Cmd], reqs: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(commands.len() as u32).to_le_bytes());
    for (command, req) in commands.iter().zip(reqs) {
        out.extend_from_slice(&req.to_le_bytes());
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

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().expect("4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().expect("8 bytes"))
    }
    fn bytes(&mut self) -> Vec<u8> {
        let n = self.u32() as usize;
        self.take(n).to_vec()
    }
    fn option(&mut self) -> Option<Vec<u8>> {
        match self.take(1)[0] {
            0 => None,
            _ => Some(self.bytes()),
        }
    }
}

pub fn decode_entry(data: &[u8]) -> (Vec<Cmd>, Vec<u64>) {
    let mut reader = Reader(data);
    let count = reader.u32();
    let mut commands = Vec::new();
    let mut reqs = Vec::new();
    for _ in 0..count {
        reqs.push(reader.u64());
        let command = match reader.take(1)[0] {
            1 => Cmd::Put {
                key: reader.bytes(),
                value: reader.bytes(),
            },
            2 => Cmd::Delete {
                key: reader.bytes(),
            },
            3 => Cmd::Cas {
                key: reader.bytes(),
                expected: reader.option(),
                new: reader.option(),
            },
            tag => panic!("bad command tag {tag}"),
        };
        commands.push(command);
    }
    (commands, reqs)
}

//! One simulated store: the runtime around the core's `Driver` (as
//! `engine/node/src/worker.rs` is in the node) and its transport (as
//! `engine/node/src/transport.rs` and `Store::deliver`). Nothing here repeats the
//! raft protocol: the loop drains the inbox into the `Driver`'s `on_*` methods, ticks
//! it when a tick is due with the stores silent for an election timeout, and calls
//! `process`; the I/O it asks for is `host.rs`.
//!
//! Transport: raft messages and urgent heartbeats (ReadIndex) queued in a loop leave
//! at its `flush`, one batch per destination store; the other heartbeats, their
//! responses and quiesce notices wait for the store's tick batch, which goes to every
//! other store once per tick, empty or not. A store counts another as heard from
//! when any batch of it arrives. Each batch is one network packet: delayed, dropped
//! or duplicated whole. A packet to a store that is down is reported unreachable to
//! its sender (a refused connection), at most every 500 ms per store.

use std::collections::BTreeSet;

use raft::eraftpb::{Message, MessageType};
use rangekv_raftstore::{
    CoreConfig, Driver, Heartbeat, HeartbeatKind, LogWrite, Member, Membership, Peer, Role,
};
use rangekv_types::{PeerId, RangeId, StoreId};
use rustc_hash::FxHashSet;

use super::host::{Command, Sessions, SimHost, SimRange, SimTypes};
use super::world::{fmt_msg, range_id, range_index, Event, World, MS, TICK};

/// A request or raft traffic queued at a store's worker (its inbox).
pub enum Inbound {
    Raft(RangeId, Message),
    Heartbeats(Vec<Heartbeat>, HeartbeatKind),
    Write(RangeId, Command, u64),
    Read(RangeId, u64),
    /// The transport delivered (or not) a snapshot this store's leader sent.
    SnapshotSent {
        range: RangeId,
        to: u64,
        delivered: bool,
    },
}

/// What a store has queued for one other store.
#[derive(Default)]
pub struct Outbox {
    pub messages: Vec<(RangeId, Message)>,
    /// Urgent: leave with the next flush.
    pub heartbeats: Vec<Heartbeat>,
    pub responses: Vec<Heartbeat>,
    /// Leave with the next tick batch.
    pub tick_heartbeats: Vec<Heartbeat>,
    pub tick_responses: Vec<Heartbeat>,
    pub quiesce: Vec<Heartbeat>,
}

impl Outbox {
    fn has_flush(&self) -> bool {
        !self.messages.is_empty() || !self.heartbeats.is_empty() || !self.responses.is_empty()
    }
}

/// One store-to-store batch on the network (`RaftBatch`).
#[derive(Clone)]
pub struct Packet {
    pub from: usize,
    pub to: usize,
    pub tick: bool,
    pub messages: Vec<(RangeId, Message)>,
    pub heartbeats: Vec<Heartbeat>,
    pub responses: Vec<Heartbeat>,
    pub quiesce: Vec<Heartbeat>,
}

impl Packet {
    fn heartbeat_count(&self) -> usize {
        self.heartbeats.len() + self.responses.len() + self.quiesce.len()
    }

    fn describe(&self) -> String {
        let mut out = format!(
            "n{}→n{}{}",
            self.from + 1,
            self.to + 1,
            if self.tick { " tick" } else { "" }
        );
        for (range, message) in &self.messages {
            out.push_str(&format!(" [{range} {}]", fmt_msg(message)));
        }
        for (list, what) in [
            (&self.heartbeats, "hb"),
            (&self.responses, "hbresp"),
            (&self.quiesce, "quiesce"),
        ] {
            for h in list.iter() {
                out.push_str(&format!(
                    " [{} {what} {}→{} t{} c{}{}]",
                    h.range,
                    h.from_peer,
                    h.to_peer,
                    h.term,
                    h.commit,
                    if h.context.is_empty() { "" } else { " +ctx" }
                ));
            }
        }
        out
    }
}

/// Raft message types a node makes for itself and never sends; from a peer they are
/// refused at the edge (`is_local_only` in the node's store.rs).
fn is_local_only(kind: MessageType) -> bool {
    use MessageType::*;
    matches!(
        kind,
        MsgHup | MsgBeat | MsgUnreachable | MsgSnapStatus | MsgCheckQuorum | MsgTransferLeader
    )
}

impl World {
    /// The members every range starts with: one voter per store, peer id = store
    /// id, `conf_ver` 1.
    pub fn bootstrap_membership(&self) -> Membership {
        Membership::new(
            1,
            (1..=self.nodes.len() as u64)
                .map(|id| Member {
                    peer: PeerId(id),
                    store: StoreId(id),
                    role: Role::Voter,
                })
                .collect(),
        )
    }

    /// Starts `node`'s store: a `Driver` with every range's replica over the store's
    /// log, each at the applied index its state machine kept, with the client sessions
    /// it kept. `reopened`: the store ran before (its log and state machine are on
    /// disk).
    pub fn open(&mut self, node: usize, reopened: bool) {
        let id = self.nodes[node].id;
        // `StoreConfig::election_seed` comes from the wall clock at each store start.
        let config = CoreConfig {
            election_seed: self.fault_rng.next_u64(),
            ..self.core.clone()
        };
        self.dirty[node] = true;
        let mut driver = Box::new(Driver::new(config));
        let bootstrap = self.bootstrap_membership();
        let now = self.instant();
        for r in 0..self.ranges {
            let range = range_id(r);
            let applied = self.nodes[node].sm[r].applied;
            if !self.recover_log(node, r) {
                return;
            }
            let persisted = self.nodes[node].sm[r].sessions.iter();
            let records = persisted.map(|(id, session)| (*id, session.record.clone()));
            let sessions = match Sessions::load(records) {
                Ok(sessions) => sessions,
                Err(error) => {
                    self.fail(format!("n{id} {range}: {error}"));
                    return;
                }
            };
            // The members as of the applied index the state machine kept.
            let members = match &self.nodes[node].sm[r].membership {
                Some(kept) if !self.opts.buggy_forget_membership => kept.clone(),
                _ => bootstrap.clone(),
            };
            let opened = Peer::open(
                driver.config(),
                range,
                PeerId(id),
                &members,
                self.nodes[node].log.clone(),
                applied,
                reopened,
                now,
                SimRange {
                    id: range,
                    sessions,
                },
                &self.logger,
            );
            match opened {
                Ok(peer) => driver.insert(peer),
                Err(error) => {
                    self.fail(format!("n{id} {range}: the replica does not open: {error}"));
                    return;
                }
            }
        }
        let n = self.nodes.len();
        let inc = self.nodes[node].inc;
        self.nodes[node].live = Some(super::world::Live::new(driver, n, self.ranges, self.now));
        for r in 0..self.ranges {
            self.rebuild_chain(node, r);
        }
        let phase = self.net_rng.below(TICK);
        self.after(phase, Event::Tick { node, inc });
        let transport_phase = self.net_rng.below(TICK);
        self.after(transport_phase, Event::TransportTick { node, inc });
        let first_tick = self.now + phase;
        self.live_mut(node).next_tick_at = first_tick;
        let sync = self.disk_rng.range(self.flush_every.0, self.flush_every.1);
        self.after(
            sync,
            Event::SmSync {
                node,
                inc,
                periodic: true,
            },
        );
        self.wake_at(node, self.now);
    }

    /// The node's recovery at open: a snapshot installed before a crash that came
    /// before its log reset was durable leaves the log behind the state machine; the
    /// log restarts after the snapshot. Anything else missing from the log is lost
    /// data. Returns false on a failure.
    fn recover_log(&mut self, node: usize, r: usize) -> bool {
        let range = range_id(r);
        let sm = &self.nodes[node].sm[r];
        let (applied, term, snapshot) = (sm.applied, sm.applied_term, sm.snapshot_index);
        let log = self.nodes[node].log.clone();
        if !rangekv_raftstore::operation::snapshot::log_needs_reset(&log, range, applied, term) {
            return true;
        }
        if applied != snapshot {
            self.fail(format!(
                "n{} {range}: applied {applied}/t{term} but the log does not hold that entry (no snapshot there)",
                node + 1
            ));
            return false;
        }
        let mut state = log.0.borrow_mut();
        let disk_log = state.disk.range_mut(range);
        let hard_state = disk_log.hard_state.clone();
        disk_log.reset(applied, term);
        disk_log.hard_state = hard_state;
        drop(state);
        self.summary.logs_reset_at_open += 1;
        self.log(|| {
            format!(
                "n{} {range}: log reset to the snapshot at {applied}/t{term}",
                node + 1
            )
        });
        true
    }

    /// Lends `node`'s driver and the world (as its host) to `f`.
    pub fn drive<R>(
        &mut self,
        node: usize,
        f: impl FnOnce(&mut Driver<SimTypes>, &mut SimHost<'_>) -> R,
    ) -> Option<R> {
        let mut driver = self.nodes[node].live.as_mut()?.driver.take()?;
        self.dirty[node] = true;
        let result = f(&mut driver, &mut SimHost { world: self, node });
        let live = self.nodes[node]
            .live
            .as_mut()
            .expect("a store does not crash inside its own loop");
        live.driver = Some(driver);
        Some(result)
    }

    /// One iteration of `Worker::run`: drain control and inbox, tick when due,
    /// `process`.
    pub fn run_loop(&mut self, node: usize) {
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        live.wake = None;
        let now = self.instant();
        loop {
            let live = self.live_mut(node);
            let control = live.control.pop_front();
            let inbound = live.inbox.pop_front();
            if control.is_none() && inbound.is_none() {
                break;
            }
            if let Some(seq) = control {
                self.drive(node, |driver, host| driver.on_persisted(seq, host));
            }
            if let Some(inbound) = inbound {
                self.on_inbound(node, inbound);
            }
        }
        if std::mem::take(&mut self.live_mut(node).tick_due) {
            self.tick(node);
        }
        let processed = self.drive(node, |driver, host| {
            let result = driver.process(now, host);
            (result, driver.has_work())
        });
        match processed {
            Some((Err(fatal), _)) => {
                self.fail(format!(
                    "n{}: the core stopped the store: {fatal}",
                    node + 1
                ));
            }
            Some((Ok(()), true)) => self.wake_at(node, self.now),
            _ => {}
        }
    }

    /// `Worker::tick`: the driver's tick with the stores silent for an election
    /// timeout (`StoreShared::silent_stores`: none in the first election timeout after
    /// this store started, then those not heard from for that long). Counts the
    /// quiesced followers that the silence woke (hastened elections).
    fn tick(&mut self, node: usize) {
        let now = self.instant();
        let timeout = self.core.election_timeout().as_nanos() as u64;
        let live = self.live(node);
        let mut silent = FxHashSet::default();
        if self.now.saturating_sub(live.started_at) >= timeout && !self.opts.buggy_deaf_to_silence {
            for (other, &heard) in live.last_heard.iter().enumerate() {
                if other != node && self.now.saturating_sub(heard) >= timeout {
                    silent.insert(StoreId(other as u64 + 1));
                }
            }
        }
        let mut asleep = Vec::new();
        if !silent.is_empty() {
            let driver = live.driver.as_ref().expect("driver in place");
            for peer in driver.peers() {
                let status = peer.status();
                let leader_silent = status
                    .leader
                    .is_some_and(|leader| silent.contains(&StoreId(leader)));
                if status.quiesced && status.leader != Some(status.id) && leader_silent {
                    asleep.push(peer.range());
                }
            }
        }
        let ticked = self.drive(node, |driver, host| driver.tick(now, &silent, host));
        if let Some(Err(fatal)) = ticked {
            self.fail(format!(
                "n{}: the core stopped the store: {fatal}",
                node + 1
            ));
            return;
        }
        for range in asleep {
            let woke = self
                .live(node)
                .driver
                .as_ref()
                .and_then(|driver| driver.peer(range))
                .is_some_and(|peer| !peer.status().quiesced);
            if woke {
                self.summary.hastened += 1;
                self.log(|| {
                    format!(
                        "n{} {range}: leader's store silent, election hastened",
                        node + 1
                    )
                });
            }
        }
    }

    /// `Worker::on_inbound`; in the deliberately broken mode a read is answered from
    /// the local state machine at once, before the driver sees it.
    fn on_inbound(&mut self, node: usize, inbound: Inbound) {
        let now = self.instant();
        match inbound {
            Inbound::Raft(range, message) => {
                self.drive(node, |driver, host| {
                    driver.on_raft(range, message, now, host)
                });
            }
            Inbound::SnapshotSent {
                range,
                to,
                delivered,
            } => {
                self.drive(node, |driver, _| {
                    driver.on_snapshot_sent(range, to, delivered)
                });
            }
            Inbound::Heartbeats(heartbeats, kind) => {
                self.drive(node, |driver, host| {
                    driver.on_heartbeats(heartbeats, kind, now, host)
                });
            }
            Inbound::Write(range, command, req) => {
                let handed_back = self.drive(node, |driver, host| {
                    driver.on_write(range, command, req, host).err()
                });
                if let Some(Some(req)) = handed_back {
                    self.fail(format!(
                        "n{}: {range} is not here for write r{req}",
                        node + 1
                    ));
                }
            }
            Inbound::Read(range, req) => {
                if self.opts.buggy_reads {
                    self.answer_read(node, req);
                    return;
                }
                let handed_back = self.drive(node, |driver, host| {
                    driver.on_read(range, req, now, host).err()
                });
                if let Some(Some(req)) = handed_back {
                    self.fail(format!(
                        "n{}: {range} is not here for read r{req}",
                        node + 1
                    ));
                }
            }
        }
    }

    /// A log write handed to the store's log engine: it reaches the disk after a
    /// seeded delay, never before the previous one.
    pub fn submit_log(&mut self, node: usize, write: LogWrite) {
        let ranges: BTreeSet<RangeId> = write.appends.iter().map(|(range, _)| *range).collect();
        if ranges.len() >= 2 {
            self.summary.multi_range_writes += 1;
        }
        for (range, entries) in &write.appends {
            self.extend_chain(node, range_index(*range), entries);
        }
        self.trace
            .u64(12)
            .u64(node as u64)
            .u64(write.seq.unwrap_or(0))
            .u64(write.appends.len() as u64)
            .u64(write.compactions.len() as u64);
        let stall = self.core.election_timeout().as_nanos() as u64;
        let stalls = self.phase == super::world::Phase::Chaos;
        let latency = if self.disk_rng.chance(1) && stalls {
            // A disk stall longer than an election timeout: the store's followers
            // campaign with log writes (a snapshot's reset among them) in flight.
            self.disk_rng.range(stall, 3 * stall)
        } else if self.disk_rng.chance(20) {
            self.disk_rng.range(10 * MS, 200 * MS)
        } else {
            self.disk_rng.range(MS / 5, 3 * MS)
        };
        self.next_write += 1;
        let id = self.next_write;
        let inc = self.nodes[node].inc;
        let now = self.now;
        let live = self.live_mut(node);
        let done = (now + latency).max(live.write_done_at);
        live.write_done_at = done;
        let summary = if self.logging() {
            format!(
                "seq {:?}: appends {:?}, hard states {:?}, compactions {:?}",
                write.seq,
                write
                    .appends
                    .iter()
                    .map(|(r, e)| (r.get(), e.first().map_or(0, |e| e.index), e.len()))
                    .collect::<Vec<_>>(),
                write
                    .hard_states
                    .iter()
                    .map(|(r, hs)| (r.get(), hs.term, hs.vote, hs.commit))
                    .collect::<Vec<_>>(),
                write.compactions
            )
        } else {
            String::new()
        };
        self.nodes[node].log.0.borrow_mut().submit(id, write);
        self.log(|| {
            format!(
                "n{} log write #{id} ({summary}), durable at {:.3}ms",
                node + 1,
                done as f64 / 1e6
            )
        });
        self.schedule(done, Event::LogDone { node, inc, id });
    }

    /// A log write reached the disk; a `Ready`'s completion is queued for the worker.
    pub fn log_done(&mut self, node: usize, id: u64) {
        self.dirty[node] = true;
        let completed = self.nodes[node].log.0.borrow_mut().complete(id);
        match completed {
            Ok(Some(seq)) => {
                self.log(|| format!("n{} log write #{id} (seq {seq}) durable", node + 1));
                self.live_mut(node).control.push_back(seq);
                self.wake_soon(node);
            }
            Ok(None) => self.log(|| format!("n{} log write #{id} durable", node + 1)),
            Err(what) => self.fail(format!("n{}: {what}", node + 1)),
        }
    }

    /// `flush`: what this loop queued leaves, one batch per destination store.
    pub fn flush_outbox(&mut self, node: usize) {
        for to in 0..self.nodes.len() {
            let outbox = &mut self.live_mut(node).outbox[to];
            if !outbox.has_flush() {
                continue;
            }
            let packet = Packet {
                from: node,
                to,
                tick: false,
                messages: std::mem::take(&mut outbox.messages),
                heartbeats: std::mem::take(&mut outbox.heartbeats),
                responses: std::mem::take(&mut outbox.responses),
                quiesce: Vec::new(),
            };
            self.send(packet);
        }
    }

    /// The transport's ticker: every other store gets a tick batch with the held
    /// heartbeats, responses and quiesce notices, empty or not.
    pub fn transport_tick(&mut self, node: usize) {
        for to in 0..self.nodes.len() {
            if to == node {
                continue;
            }
            let outbox = &mut self.live_mut(node).outbox[to];
            let packet = Packet {
                from: node,
                to,
                tick: true,
                messages: Vec::new(),
                heartbeats: std::mem::take(&mut outbox.tick_heartbeats),
                responses: std::mem::take(&mut outbox.tick_responses),
                quiesce: std::mem::take(&mut outbox.quiesce),
            };
            self.send(packet);
        }
    }

    /// A delay for one packet on the network.
    fn packet_delay(&mut self) -> u64 {
        let rng = &mut self.net_rng;
        if self.net.slow {
            return rng.range(MS, 300 * MS);
        }
        let roll = rng.below(1000);
        if roll < 5 {
            rng.range(100 * MS, 800 * MS)
        } else if roll < 35 {
            rng.range(5 * MS, 100 * MS)
        } else {
            rng.range(MS / 10, 5 * MS)
        }
    }

    /// Hands a batch to the network: dropped, delayed, duplicated.
    fn send(&mut self, packet: Packet) {
        let (from, to) = (packet.from, packet.to);
        self.trace
            .u64(10)
            .u64(from as u64)
            .u64(to as u64)
            .u64(packet.messages.len() as u64)
            .u64(packet.heartbeat_count() as u64);
        for (range, message) in &packet.messages {
            self.trace
                .u64(range.get())
                .u64(message.msg_type as u64)
                .u64(message.term)
                .u64(message.index)
                .u64(message.commit)
                .u64(message.entries.len() as u64);
        }
        if self.nodes[to].live.is_none() {
            self.report_unreachable(from, to);
        }
        if !self.net.link_up(from, to) {
            if !packet.tick || packet.heartbeat_count() > 0 {
                self.log(|| format!("cut  {}", packet.describe()));
            }
            return;
        }
        if self.net_rng.chance(self.net.drop_per_mille) {
            self.log(|| format!("drop {}", packet.describe()));
            return;
        }
        if self.net_rng.chance(self.net.dup_per_mille) {
            let delay = self.packet_delay();
            self.after(delay, Event::Packet(Box::new(packet.clone())));
        }
        let delay = self.packet_delay();
        if !packet.tick || packet.heartbeat_count() > 0 {
            self.log(|| format!("send {} (+{:.1}ms)", packet.describe(), delay as f64 / 1e6));
        }
        self.after(delay, Event::Packet(Box::new(packet)));
    }

    /// A refused connection: the sender's transport reports the store unreachable
    /// (with a backoff, as `run_link` retries).
    fn report_unreachable(&mut self, from: usize, to: usize) {
        let Some(live) = self.nodes[from].live.as_mut() else {
            return;
        };
        let last = live.unreachable_reported[to];
        if last.is_some_and(|at| self.now < at + 500 * MS) {
            return;
        }
        live.unreachable_reported[to] = Some(self.now);
        let inc = self.nodes[from].inc;
        let delay = self.net_rng.range(MS / 10, 2 * MS);
        self.after(
            delay,
            Event::Unreachable {
                node: from,
                inc,
                store: to,
            },
        );
    }

    /// `Store::deliver`: the sender is heard from; its messages and heartbeats go to
    /// the worker's inbox.
    pub fn deliver(&mut self, packet: Packet) {
        let (from, to) = (packet.from, packet.to);
        self.trace.u64(11).u64(from as u64).u64(to as u64);
        if !self.net.link_up(from, to) || self.nodes[to].live.is_none() {
            if !packet.tick || packet.heartbeat_count() > 0 {
                self.log(|| format!("lost {}", packet.describe()));
            }
            return;
        }
        let now = self.now;
        let live = self.live_mut(to);
        live.last_heard[from] = now;
        let quiet = packet.tick && packet.heartbeat_count() == 0;
        if packet.tick {
            self.summary.tick_batches += 1;
        }
        let ranges: BTreeSet<RangeId> = packet
            .heartbeats
            .iter()
            .chain(&packet.responses)
            .chain(&packet.quiesce)
            .map(|h| h.range)
            .collect();
        if ranges.len() >= 2 {
            self.summary.coalesced_batches += 1;
        }
        self.summary.heartbeats += packet.heartbeat_count() as u64;
        let live = self.live_mut(to);
        for (range, message) in packet.messages {
            if is_local_only(message.msg_type) {
                continue;
            }
            live.inbox.push_back(Inbound::Raft(range, message));
        }
        for (list, kind) in [
            (packet.heartbeats, HeartbeatKind::Heartbeat),
            (packet.responses, HeartbeatKind::Response),
            (packet.quiesce, HeartbeatKind::Quiesce),
        ] {
            if !list.is_empty() {
                live.inbox.push_back(Inbound::Heartbeats(list, kind));
            }
        }
        if !quiet {
            self.wake_soon(to);
        }
    }

    /// The transport gave up on `store` for now.
    pub fn unreachable(&mut self, node: usize, store: usize) {
        self.log(|| format!("n{} reports n{} unreachable", node + 1, store + 1));
        self.summary.unreachable += 1;
        self.drive(node, |driver, _| {
            driver.on_unreachable(StoreId(store as u64 + 1))
        });
        self.wake_soon(node);
    }

    /// Schedules a loop iteration of `node`'s worker shortly (it drains everything
    /// that arrived by then in one go, as the worker does).
    pub fn wake_soon(&mut self, node: usize) {
        let delay = self.net_rng.below(self.loop_delay_max);
        self.wake_at(node, self.now + delay);
    }

    pub fn wake_at(&mut self, node: usize, at: u64) {
        let inc = self.nodes[node].inc;
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        if live.wake.is_some() {
            return;
        }
        live.wake_gen += 1;
        let gen = live.wake_gen;
        live.wake = Some(gen);
        self.schedule(at, Event::Wake { node, inc, gen });
    }
}

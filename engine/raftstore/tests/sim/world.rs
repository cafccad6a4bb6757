//! The simulated world: nodes, network, clients, faults and a virtual clock, all
//! on one thread and driven by one seed. `driver.rs` is the store driver around each
//! `Replica` (a mirror of `engine/node/src/worker.rs`), `clients.rs` the client
//! processes and their history, `invariants.rs` what is checked after every step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use raft::eraftpb::{Message, MessageType};
use raft::StateRole;
use rangekv_check::{History, OpId};
use rangekv_raftstore::replica::Replica;
use rangekv_raftstore::ReplicaConfig;

use super::clients::{Client, Reply, Request};
use super::invariants::Invariants;
use super::rng::{Hash, Rng};
use super::storage::{Disk, SimStorage};

/// Virtual time is counted in nanoseconds from the start of the run.
pub const MS: u64 = 1_000_000;
/// `StoreConfig::default().tick_interval`.
pub const TICK: u64 = 100 * MS;

/// `ReplicaConfig::default()`: the settings every store runs with.
pub fn replica_config() -> ReplicaConfig {
    ReplicaConfig::default()
}

/// `StoreConfig::election_timeout`: `tick × election_timeout_ticks`.
pub fn election_timeout() -> u64 {
    TICK * replica_config().election_timeout_ticks as u64
}

/// `StoreConfig::lease_duration`: `tick × (election_timeout_ticks − 2)`.
pub fn lease_duration() -> Duration {
    Duration::from_nanos(TICK * replica_config().election_timeout_ticks.saturating_sub(2) as u64)
}

#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// Length of the faulty phase, in ticks of 100 ms of virtual time (`SIM_STEPS`).
    pub chaos_ticks: u64,
    /// Print every step (`SEED=n`).
    pub verbose: bool,
    /// Keep the last lines of the trace for a failure report.
    pub keep_tail: bool,
    /// Deliberately broken: any node answers a read from its own state machine at
    /// once, without lease or ReadIndex. Only for the test proving the checks bite.
    pub buggy_reads: bool,
}

impl Options {
    pub fn new(seed: u64) -> Self {
        Options {
            seed,
            chaos_ticks: 300,
            verbose: false,
            keep_tail: false,
            buggy_reads: false,
        }
    }
}

/// What a run did, for reporting and the determinism test.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub trace_hash: u64,
    pub steps: u64,
    pub virtual_ms: u64,
    pub nodes: usize,
    pub ops: usize,
    pub ok: usize,
    pub unknown: usize,
    pub failed: usize,
    pub faults: BTreeMap<&'static str, u64>,
    pub terms: u64,
    pub commit: u64,
    pub check_ms: u64,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub step: u64,
    pub at_ms: f64,
    pub what: String,
    pub tail: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} failed at step {} (t={:.3} ms): {}",
            self.seed, self.step, self.at_ms, self.what
        )?;
        if !self.tail.is_empty() {
            writeln!(f, "--- last {} trace lines ---", self.tail.len())?;
            for line in &self.tail {
                writeln!(f, "{line}")?;
            }
        }
        write!(
            f,
            "replay: SEED={} make sim   (or: SEED={} cargo test -p rangekv-raftstore --test sim -- --exact simulation --nocapture)",
            self.seed, self.seed
        )
    }
}

/// A command inside a raft entry. Encoded by hand (`encode_entry`): the real
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

/// The state machine of one node (RocksDB's `data` column family plus the applied
/// index, written together in one `ApplyBatch`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sm {
    pub kv: BTreeMap<Vec<u8>, Vec<u8>>,
    pub applied: u64,
}

impl Sm {
    pub fn hash(&self) -> u64 {
        let mut hash = Hash::default();
        for (k, v) in &self.kv {
            hash.bytes(k).bytes(v);
        }
        hash.0
    }
}

/// A request or raft message queued at a node's worker (its inbox).
pub enum Inbound {
    Raft(Message),
    Write(Cmd, u64),
    Read(u64),
}

/// A log write in flight: the `Ready`s it persists (`worker.rs` `Persisting`).
pub struct Record {
    pub seq: u64,
    pub readies: Vec<(u64, Vec<Message>)>,
}

pub type SimReplica = Replica<SimStorage, Vec<u64>, u64>;

/// A node's process while it runs: the replica plus the worker's state around it.
pub struct Live {
    pub replica: SimReplica,
    /// `Peer::writes`: writes gathered this loop, proposed as one entry.
    pub writes: Vec<(Cmd, u64)>,
    /// `Peer::persisting`.
    pub persisting: usize,
    /// `Worker::persisting`.
    pub records: VecDeque<Record>,
    /// `Worker::next_seq`.
    pub next_seq: u64,
    /// Whether the range is in `Worker::touched`.
    pub touched: bool,
    /// `Peer::votes_refused_until`.
    pub votes_refused_until: Option<u64>,
    /// The control channel: log writes completed (their seq).
    pub control: VecDeque<u64>,
    pub inbox: VecDeque<Inbound>,
    /// A loop iteration is scheduled (its generation; older wake-ups are void).
    pub wake: Option<u64>,
    pub wake_gen: u64,
    pub tick_due: bool,
    /// When the next tick comes.
    pub next_tick_at: u64,
    /// When the last submitted log write completes (writes complete in order).
    pub write_done_at: u64,
    /// Client requests this process holds (answered `Lost` if it crashes).
    pub open: BTreeSet<u64>,
    /// Commit index up to which the committed-entries invariant has been checked.
    pub checked_commit: u64,
    /// Log-matching chain hash of every entry of the view (`chain[i]` for index i+1).
    pub chain: Vec<u64>,
}

pub struct Node {
    pub id: u64,
    /// Bumped at each crash: events of an earlier incarnation are void.
    pub inc: u64,
    pub live: Option<Live>,
    /// The disk while the node is down.
    pub disk: Option<Disk>,
    /// The state machine as the running process sees it.
    pub sm: Sm,
    /// Last durable state machine (RocksDB flushed/synced) and the states after each
    /// apply batch since then (unsynced WAL): a crash keeps a prefix of them.
    pub sm_synced: Sm,
    pub sm_unsynced: Vec<Sm>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Heal {
    Partition,
    OneWay(usize, usize),
    Cut(usize, usize),
    Lossy,
    Slow,
}

pub enum Event {
    Tick {
        node: usize,
        inc: u64,
    },
    Wake {
        node: usize,
        inc: u64,
        gen: u64,
    },
    Persisted {
        node: usize,
        inc: u64,
        seq: u64,
    },
    Raft(Message),
    Request(u64),
    Reply {
        req: u64,
        reply: Reply,
    },
    ClientGo(usize),
    ClientTimeout {
        client: usize,
        req: u64,
    },
    Fault,
    Isolate {
        node: usize,
        duration: u64,
    },
    LeaseSteal {
        duration: u64,
    },
    Bounce {
        node: usize,
        downtime: u64,
        cut_from: Option<usize>,
        until: u64,
    },
    Heal(Heal),
    Restart(usize),
    SmSync {
        node: usize,
        inc: u64,
    },
    EndChaos,
    EndRun,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Faults and client load.
    Chaos,
    /// Healed; waiting for the clients' last operations to end.
    Drain,
    /// The final write and read.
    Final,
    /// Letting every node catch up before the convergence check.
    Settle,
    Done,
}

pub struct Net {
    /// Partition: nodes talk only within their group.
    pub group: Vec<u8>,
    /// One-way cuts `(from, to)`.
    pub oneway: BTreeSet<(usize, usize)>,
    pub drop_per_mille: u64,
    pub dup_per_mille: u64,
    pub slow: bool,
}

impl Net {
    pub fn link_up(&self, from: usize, to: usize) -> bool {
        self.group[from] == self.group[to] && !self.oneway.contains(&(from, to))
    }
}

pub struct World {
    pub opts: Options,
    pub base: Instant,
    pub now: u64,
    pub queue: BTreeMap<(u64, u64), Event>,
    pub event_seq: u64,
    pub net_rng: Rng,
    pub client_rng: Rng,
    pub fault_rng: Rng,
    pub disk_rng: Rng,
    pub nodes: Vec<Node>,
    pub net: Net,
    pub clients: Vec<Client>,
    pub requests: BTreeMap<u64, Request>,
    pub next_req: u64,
    pub history: History,
    pub keys: Vec<Vec<u8>>,
    pub inv: Invariants,
    pub phase: Phase,
    pub chaos_end: u64,
    pub steps: u64,
    pub trace: Hash,
    pub failure: Option<String>,
    pub summary: Summary,
    pub logger: slog::Logger,
    pub active_faults: BTreeSet<&'static str>,
    pub final_ops: Vec<OpId>,
    /// Clients only read before this (a pause in the writes).
    pub writes_paused_until: u64,
}

const TAIL_LINES: usize = 150;

thread_local! {
    /// The last trace lines of the run on this thread (kept outside the world so
    /// that they survive a panic inside raft-rs or the replica).
    static TAIL: std::cell::RefCell<VecDeque<String>> = const { std::cell::RefCell::new(VecDeque::new()) };
}

pub fn take_tail() -> Vec<String> {
    TAIL.with(|tail| tail.borrow_mut().drain(..).collect())
}

impl World {
    pub fn new(opts: Options) -> Self {
        let mut rng = Rng::new(opts.seed ^ 0x005E_ED0F_5EED);
        let net_rng = rng.fork(1);
        let mut client_rng = rng.fork(2);
        let mut fault_rng = rng.fork(3);
        let disk_rng = rng.fork(4);
        let n = if fault_rng.chance(250) { 5 } else { 3 };
        let key_count = client_rng.range(3, 6);
        let keys = (0..key_count)
            .map(|k| format!("k{k}").into_bytes())
            .collect();
        let nodes = (0..n)
            .map(|i| Node {
                id: i as u64 + 1,
                inc: 0,
                live: None,
                disk: Some(Disk::default()),
                sm: Sm::default(),
                sm_synced: Sm::default(),
                sm_unsynced: Vec::new(),
            })
            .collect();
        let client_count = client_rng.range(3, 6) as usize;
        let clients = (0..client_count)
            .map(|c| Client::new(c as u64 + 1, c % n))
            .collect();
        let chaos_end = opts.chaos_ticks * TICK;
        World {
            base: Instant::now(),
            now: 0,
            queue: BTreeMap::new(),
            event_seq: 0,
            net_rng,
            client_rng,
            fault_rng,
            disk_rng,
            nodes,
            net: Net {
                group: vec![0; n],
                oneway: BTreeSet::new(),
                drop_per_mille: 10,
                dup_per_mille: 10,
                slow: false,
            },
            clients,
            requests: BTreeMap::new(),
            next_req: 1,
            history: History::new(),
            keys,
            inv: Invariants::new(n),
            phase: Phase::Chaos,
            chaos_end,
            steps: 0,
            trace: Hash::default(),
            failure: None,
            summary: Summary {
                nodes: n,
                ..Default::default()
            },
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            active_faults: BTreeSet::new(),
            final_ops: Vec::new(),
            writes_paused_until: 0,
            opts,
        }
    }

    pub fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    pub fn schedule(&mut self, at: u64, event: Event) {
        debug_assert!(at >= self.now);
        self.event_seq += 1;
        self.queue.insert((at, self.event_seq), event);
    }

    pub fn after(&mut self, delay: u64, event: Event) {
        self.schedule(self.now + delay, event);
    }

    pub fn logging(&self) -> bool {
        self.opts.verbose || self.opts.keep_tail
    }

    /// A trace line (only formatted when someone will read it).
    pub fn log(&mut self, line: impl FnOnce() -> String) {
        if !self.logging() {
            return;
        }
        let line = format!(
            "[{:>10.3}ms #{:>6}] {}",
            self.now as f64 / 1e6,
            self.steps,
            line()
        );
        if self.opts.verbose {
            println!("{line}");
        }
        if self.opts.keep_tail {
            TAIL.with(|tail| {
                let mut tail = tail.borrow_mut();
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            });
        }
    }

    pub fn fail(&mut self, what: String) {
        if self.failure.is_none() {
            self.log(|| format!("FAILURE: {what}"));
            self.failure = Some(what);
        }
    }

    pub fn run(mut self) -> Result<Summary, Failure> {
        let n = self.nodes.len();
        for node in 0..n {
            self.open(node, false);
        }
        for client in 0..self.clients.len() {
            let start = self.client_rng.range(50 * MS, 500 * MS);
            self.schedule(start, Event::ClientGo(client));
        }
        let first_fault = self.fault_rng.range(TICK * 10, TICK * 30);
        self.schedule(first_fault, Event::Fault);
        self.schedule(self.chaos_end, Event::EndChaos);
        // Liveness bound: after healing, the final write and read must succeed well
        // within this.
        let deadline = self.chaos_end + 60_000 * MS;
        while self.phase != Phase::Done {
            let Some(((at, _), event)) = self.queue.pop_first() else {
                self.fail("event queue ran dry".into());
                break;
            };
            self.now = at;
            if at > deadline {
                self.fail(format!(
                    "liveness: still in phase {:?} 60 s after healing",
                    self.phase
                ));
                break;
            }
            self.steps += 1;
            self.trace.u64(at);
            self.handle(event);
            if self.failure.is_none() {
                self.check_invariants();
            }
            self.hash_state();
            if self.failure.is_some() {
                break;
            }
        }
        if self.failure.is_none() {
            self.finish();
        }
        match self.failure.take() {
            Some(what) => Err(Failure {
                seed: self.opts.seed,
                step: self.steps,
                at_ms: self.now as f64 / 1e6,
                what,
                tail: take_tail(),
            }),
            None => {
                self.summary.trace_hash = self.trace.0;
                self.summary.steps = self.steps;
                self.summary.virtual_ms = self.now / MS;
                Ok(self.summary)
            }
        }
    }

    fn hash_state(&mut self) {
        for node in &self.nodes {
            match &node.live {
                Some(live) => {
                    let raft = &live.replica.raw.raft;
                    self.trace
                        .u64(raft.term)
                        .u64(raft.state as u64)
                        .u64(raft.raft_log.committed)
                        .u64(live.replica.applied())
                        .u64(raft.raft_log.last_index());
                }
                None => {
                    self.trace.u64(u64::MAX);
                }
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick { node, inc } => {
                self.trace.u64(1).u64(node as u64);
                if self.nodes[node].inc != inc {
                    return;
                }
                self.after(TICK, Event::Tick { node, inc });
                let next = self.now + TICK;
                if let Some(live) = self.nodes[node].live.as_mut() {
                    live.tick_due = true;
                    live.next_tick_at = next;
                }
                self.run_loop(node);
            }
            Event::Wake { node, inc, gen } => {
                self.trace.u64(2).u64(node as u64);
                let valid = self.nodes[node].inc == inc
                    && self.nodes[node]
                        .live
                        .as_ref()
                        .is_some_and(|l| l.wake == Some(gen));
                if valid {
                    self.run_loop(node);
                }
            }
            Event::Persisted { node, inc, seq } => {
                self.trace.u64(3).u64(node as u64).u64(seq);
                if self.nodes[node].inc != inc {
                    return;
                }
                if let Some(live) = self.nodes[node].live.as_mut() {
                    // The write reached the disk; its completion is queued for the worker.
                    live.replica.raw.mut_store().log.complete(seq);
                    live.control.push_back(seq);
                }
                self.log(|| format!("n{} log write {seq} durable", node + 1));
                self.wake_soon(node);
            }
            Event::Raft(message) => self.deliver(message),
            Event::Request(req) => self.on_request(req),
            Event::Reply { req, reply } => self.on_reply(req, reply),
            Event::ClientGo(client) => self.client_go(client),
            Event::ClientTimeout { client, req } => self.client_timeout(client, req),
            Event::Fault => self.fault(),
            Event::Isolate { node, duration } => self.isolate(node, duration),
            Event::LeaseSteal { duration } => self.lease_steal(duration),
            Event::Bounce {
                node,
                downtime,
                cut_from,
                until,
            } => self.bounce(node, downtime, cut_from, until),
            Event::Heal(what) => self.heal(what),
            Event::Restart(node) => {
                self.trace.u64(9).u64(node as u64);
                if self.nodes[node].live.is_none() {
                    self.log(|| format!("n{} RESTART", node + 1));
                    self.open(node, true);
                }
            }
            Event::SmSync { node, inc } => {
                if self.nodes[node].inc != inc {
                    return;
                }
                let node_ref = &mut self.nodes[node];
                node_ref.sm_synced = node_ref.sm.clone();
                node_ref.sm_unsynced.clear();
                let next = self.disk_rng.range(300 * MS, 2_000 * MS);
                self.after(next, Event::SmSync { node, inc });
            }
            Event::EndChaos => self.end_chaos(),
            Event::EndRun => {
                self.phase = Phase::Done;
            }
        }
    }

    /// A delay for one message on the network.
    fn message_delay(&mut self) -> u64 {
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

    /// Hands a raft message to the network: dropped, delayed, duplicated.
    pub fn send(&mut self, from: usize, message: Message) {
        let to = message.to as usize - 1;
        self.trace
            .u64(10)
            .u64(message.msg_type as u64)
            .u64(message.from)
            .u64(message.to)
            .u64(message.term)
            .u64(message.index)
            .u64(message.commit)
            .u64(message.entries.len() as u64);
        if !self.net.link_up(from, to) {
            self.log(|| format!("cut  {}", fmt_msg(&message)));
            return;
        }
        if self.net_rng.chance(self.net.drop_per_mille) {
            self.log(|| format!("drop {}", fmt_msg(&message)));
            return;
        }
        if self.net_rng.chance(self.net.dup_per_mille) {
            let delay = self.message_delay();
            self.after(delay, Event::Raft(message.clone()));
        }
        let delay = self.message_delay();
        self.log(|| format!("send {} (+{:.1}ms)", fmt_msg(&message), delay as f64 / 1e6));
        self.after(delay, Event::Raft(message));
    }

    fn deliver(&mut self, message: Message) {
        let from = message.from as usize - 1;
        let to = message.to as usize - 1;
        self.trace
            .u64(11)
            .u64(message.msg_type as u64)
            .u64(message.to);
        if !self.net.link_up(from, to) || self.nodes[to].live.is_none() {
            self.log(|| format!("lost {}", fmt_msg(&message)));
            return;
        }
        self.log(|| format!("recv {}", fmt_msg(&message)));
        if let Some(live) = self.nodes[to].live.as_mut() {
            live.inbox.push_back(Inbound::Raft(message));
        }
        self.wake_soon(to);
    }

    /// Schedules a loop iteration of `node`'s worker shortly (it drains everything
    /// that arrived by then in one go, as the worker does).
    pub fn wake_soon(&mut self, node: usize) {
        let delay = self.net_rng.below(MS);
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

    /// Crashes `node`: its process state and unsynced bytes are gone.
    pub fn crash(&mut self, node: usize) {
        let Some(mut live) = self.nodes[node].live.take() else {
            return;
        };
        self.nodes[node].inc += 1;
        self.summary.terms = self.summary.terms.max(live.replica.term());
        // Clients whose requests it held see the connection drop: outcome unknown.
        for req in std::mem::take(&mut live.open) {
            let delay = self.client_rng.range(MS / 10, 2 * MS);
            self.after(
                delay,
                Event::Reply {
                    req,
                    reply: Reply::Lost,
                },
            );
        }
        // The log: writes in flight are lost, except a prefix that had reached the
        // disk without its completion being seen.
        let log = std::mem::take(&mut live.replica.raw.mut_store().log);
        let in_flight = log.in_flight.len();
        let keep = self.disk_rng.below(in_flight as u64 + 1) as usize;
        let disk = log.crash(keep);
        // The state machine: RocksDB's WAL is written but not synced per apply batch,
        // so a machine crash keeps a prefix of the batches since the last sync/flush.
        let node_ref = &mut self.nodes[node];
        let unsynced = node_ref.sm_unsynced.len();
        let kept = self.disk_rng.below(unsynced as u64 + 1) as usize;
        node_ref.sm = if kept == 0 {
            node_ref.sm_synced.clone()
        } else {
            node_ref.sm_unsynced[kept - 1].clone()
        };
        node_ref.sm_synced = node_ref.sm.clone();
        node_ref.sm_unsynced.clear();
        let applied = node_ref.sm.applied;
        let disk_last = disk.last_index();
        let hs = disk.hard_state.clone();
        node_ref.disk = Some(disk);
        self.log(|| {
            format!(
                "n{} CRASH: kept {keep}/{in_flight} log writes in flight, {kept}/{unsynced} apply batches; durable last {disk_last} hs(t{} v{} c{}) applied {applied}",
                node + 1,
                hs.term,
                hs.vote,
                hs.commit
            )
        });
        if applied > disk_last {
            self.fail(format!(
                "n{}: applied index {applied} survives a crash but the durable log ends at {disk_last}",
                node + 1
            ));
        }
    }

    fn end_chaos(&mut self) {
        self.log(|| "END OF CHAOS: healing everything".into());
        self.phase = Phase::Drain;
        self.net.group.iter_mut().for_each(|g| *g = 0);
        self.net.oneway.clear();
        self.net.drop_per_mille = 0;
        self.net.dup_per_mille = 10;
        self.net.slow = false;
        self.active_faults.clear();
        for node in 0..self.nodes.len() {
            if self.nodes[node].live.is_none() {
                self.open(node, true);
            }
        }
        for client in &mut self.clients {
            client.active = false;
        }
        self.maybe_start_final();
    }

    fn finish(&mut self) {
        // Every node converged on the same applied state.
        let mut states = Vec::new();
        for node in &self.nodes {
            let Some(live) = &node.live else {
                self.fail(format!("n{} is down at the end", node.id));
                return;
            };
            states.push((
                node.id,
                live.replica.commit_index(),
                node.sm.applied,
                node.sm.hash(),
            ));
        }
        let first = states[0];
        if states
            .iter()
            .any(|s| (s.1, s.2, s.3) != (first.1, first.2, first.3))
        {
            self.fail(format!(
                "no convergence after healing: (node, commit, applied, state hash) {states:?}"
            ));
            return;
        }
        // The final read, after the final write was acknowledged and with no other
        // writer left, sees it.
        if let [put, get] = self.final_ops[..] {
            let ops = self.history.ops();
            let (rangekv_check::Op::Put(written), rangekv_check::Outcome::Ok { result, .. }) =
                (&ops[put.0].op, &ops[get.0].outcome)
            else {
                self.fail("the final write and read are not recorded".into());
                return;
            };
            if *result != rangekv_check::OpResult::Read(Some(written.clone())) {
                let (written, result) = (written.clone(), result.clone());
                self.fail(format!(
                    "the final read returned {result:?} after the final write of {:?}",
                    String::from_utf8_lossy(&written)
                ));
                return;
            }
        } else {
            self.fail(format!("final operations: {:?}", self.final_ops));
            return;
        }
        self.summary.commit = first.1;
        let terms = self
            .nodes
            .iter()
            .filter_map(|n| n.live.as_ref().map(|l| l.replica.term()))
            .max()
            .unwrap_or(0);
        self.summary.terms = self.summary.terms.max(terms);
        self.summary.ops = self.history.len();
        for op in self.history.ops() {
            match op.outcome {
                rangekv_check::Outcome::Ok { .. } => self.summary.ok += 1,
                rangekv_check::Outcome::Unknown => self.summary.unknown += 1,
                rangekv_check::Outcome::Failed => self.summary.failed += 1,
            }
        }
        let regular_ok = self
            .history
            .ops()
            .iter()
            .filter(|op| {
                op.process < 100 && matches!(op.outcome, rangekv_check::Outcome::Ok { .. })
            })
            .count();
        if regular_ok == 0 {
            self.fail("liveness: no client operation succeeded during the run".into());
            return;
        }
        let started = Instant::now();
        let verdict = rangekv_check::check(
            &self.history,
            rangekv_check::Budget::time(Duration::from_secs(20)),
        );
        self.summary.check_ms = started.elapsed().as_millis() as u64;
        match verdict {
            rangekv_check::Verdict::Linearizable => {}
            rangekv_check::Verdict::NotLinearizable { key, explanation } => {
                self.fail(format!(
                    "history not linearizable on key {}:\n{explanation}",
                    String::from_utf8_lossy(&key)
                ));
            }
            rangekv_check::Verdict::Unknown { key, reason } => {
                self.fail(format!(
                    "linearizability undecided on key {}: {reason}",
                    String::from_utf8_lossy(&key)
                ));
            }
        }
    }

    /// One line per node: role, term, commit, applied, last index.
    pub fn describe_nodes(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            match &node.live {
                Some(live) => {
                    let raft = &live.replica.raw.raft;
                    let role = match raft.state {
                        StateRole::Leader => "L",
                        StateRole::Follower => "F",
                        StateRole::Candidate => "C",
                        StateRole::PreCandidate => "P",
                    };
                    let _ = write!(
                        out,
                        " n{}:{role}t{}c{}a{}l{}",
                        node.id,
                        raft.term,
                        raft.raft_log.committed,
                        live.replica.applied(),
                        raft.raft_log.last_index()
                    );
                }
                None => {
                    let _ = write!(out, " n{}:down", node.id);
                }
            }
        }
        out
    }
}

pub fn fmt_msg(m: &Message) -> String {
    let kind = match m.msg_type {
        MessageType::MsgAppend => "App",
        MessageType::MsgAppendResponse => "AppResp",
        MessageType::MsgRequestVote => "Vote",
        MessageType::MsgRequestVoteResponse => "VoteResp",
        MessageType::MsgRequestPreVote => "PreVote",
        MessageType::MsgRequestPreVoteResponse => "PreVoteResp",
        MessageType::MsgHeartbeat => "Hb",
        MessageType::MsgHeartbeatResponse => "HbResp",
        MessageType::MsgTimeoutNow => "TimeoutNow",
        MessageType::MsgReadIndex => "ReadIndex",
        MessageType::MsgReadIndexResp => "ReadIndexResp",
        other => return format!("{other:?} {}→{} t{}", m.from, m.to, m.term),
    };
    let mut s = format!("{kind} {}→{} t{}", m.from, m.to, m.term);
    match m.msg_type {
        MessageType::MsgAppend => {
            let _ = write!(
                s,
                " i{}/t{} n={} c{}",
                m.index,
                m.log_term,
                m.entries.len(),
                m.commit
            );
        }
        MessageType::MsgAppendResponse => {
            let _ = write!(s, " i{}", m.index);
            if m.reject {
                let _ = write!(s, " REJECT hint {}", m.reject_hint);
            }
        }
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => {
            let _ = write!(s, " last i{}/t{}", m.index, m.log_term);
            if !m.context.is_empty() {
                s.push_str(" (transfer)");
            }
        }
        MessageType::MsgRequestVoteResponse | MessageType::MsgRequestPreVoteResponse => {
            s.push_str(if m.reject { " rejected" } else { " granted" });
        }
        MessageType::MsgHeartbeat => {
            let _ = write!(s, " c{}", m.commit);
            if !m.context.is_empty() {
                s.push_str(" +ctx");
            }
        }
        MessageType::MsgHeartbeatResponse if !m.context.is_empty() => {
            s.push_str(" +ctx");
        }
        _ => {}
    }
    s
}

//! The simulated world: stores, network, clients, faults and a virtual clock, all on
//! one thread and driven by one seed. `store.rs` is each store's runtime around the
//! core's `Driver` and its transport, `host.rs` the I/O the core asks for, `log.rs`
//! the log engine, `clients.rs` the client processes and their history,
//! `invariants.rs` what is checked after every step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use raft::eraftpb::{Message, MessageType};
use raft::StateRole;
use rangekv_check::{History, OpId};
use rangekv_raftstore::{
    CoreConfig, Driver, Membership, PeerStatus, RangeView, ReplicaConfig, SessionId,
};
use rangekv_types::RangeId;

use super::clients::{Client, Reply, Request};
use super::host::SimTypes;
use super::invariants::{Chain, Invariants};
use super::log::SimLog;
use super::rng::{hash_bytes, Hash, Rng};
use super::store::{Inbound, Outbox, Packet};

/// Virtual time is counted in nanoseconds from the start of the run.
pub const MS: u64 = 1_000_000;
/// `StoreConfig::default().tick_interval`.
pub const TICK: u64 = 100 * MS;
/// What the stores' wall clocks read at the start of a run (ms since the Unix epoch,
/// 2023-11-14): the leaders' entry stamps are never zero.
const WALL_CLOCK_START_MS: u64 = 1_700_000_000_000;

/// The range at `index` of a world's ranges (ids from 1).
pub fn range_id(index: usize) -> RangeId {
    RangeId(index as u64 + 1)
}

pub fn range_index(range: RangeId) -> usize {
    range.get() as usize - 1
}

#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// Length of the faulty phase, in ticks of 100 ms of virtual time (`SIM_STEPS`).
    pub chaos_ticks: u64,
    /// Print every step (`SIM_SEED=n`).
    pub verbose: bool,
    /// Keep the last lines of the trace for a failure report.
    pub keep_tail: bool,
    /// Deliberately broken: any node answers a read from its own state machine at
    /// once, without lease or ReadIndex. Only for the test proving the checks bite.
    pub buggy_reads: bool,
    /// Deliberately broken: the host reports the state machine's applied index as
    /// durable before it is flushed, so log compaction outruns the flush. Only for the
    /// test proving the checks bite.
    pub buggy_durable_applied: bool,
    /// Deliberately broken: stores never tell their driver which stores went silent,
    /// so nothing wakes the quiesced followers of a crashed leader. Only for the test
    /// proving the checks bite.
    pub buggy_deaf_to_silence: bool,
    /// Deliberately broken: a write its session table knows as applied (a
    /// `Verdict::Duplicate`) is applied again. Only for the test proving the checks
    /// bite.
    pub buggy_reapply: bool,
    /// Deliberately broken: a reopened store starts its replicas with the members
    /// they began with, not those its state machine kept. Only for the test proving
    /// the checks bite.
    pub buggy_forget_membership: bool,
    /// Deliberately broken: a snapshot install is written like an apply batch,
    /// without sync, so a crash may lose it after its log reset is durable. Only for
    /// the test proving the checks bite.
    pub buggy_snapshot_not_durable: bool,
    /// No snapshots (as a node without them): the log waits for every follower.
    pub no_snapshots: bool,
}

impl Options {
    pub fn new(seed: u64) -> Self {
        Options {
            seed,
            chaos_ticks: 300,
            verbose: false,
            keep_tail: false,
            buggy_reads: false,
            buggy_durable_applied: false,
            buggy_deaf_to_silence: false,
            buggy_reapply: false,
            buggy_forget_membership: false,
            buggy_snapshot_not_durable: false,
            no_snapshots: false,
        }
    }
}

/// What a run did, for reporting, the determinism test and the coverage test.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub trace_hash: u64,
    pub steps: u64,
    pub virtual_ms: u64,
    pub nodes: usize,
    pub ranges: usize,
    pub ops: usize,
    pub ok: usize,
    pub unknown: usize,
    pub failed: usize,
    pub faults: BTreeMap<&'static str, u64>,
    pub terms: u64,
    pub commit: u64,
    pub check_ms: u64,
    /// Log writes carrying appends of two ranges or more.
    pub multi_range_writes: u64,
    /// Replicas that quiesced, and quiesced replicas that woke.
    pub quiesced: u64,
    pub woken: u64,
    /// Quiesced followers woken because their leader's store went silent.
    pub hastened: u64,
    /// Compaction points written to a disk (a range's first index moved past 1).
    pub compactions: u64,
    /// The highest first index of a range's durable log at the end.
    pub first_index_max: u64,
    /// State machine flushes the core asked for.
    pub flush_requests: u64,
    /// Tick batches delivered; batches delivered with heartbeats of two ranges or
    /// more; heartbeats (and responses, quiesce notices) delivered.
    pub tick_batches: u64,
    pub coalesced_batches: u64,
    pub heartbeats: u64,
    /// Stores reported unreachable to a driver.
    pub unreachable: u64,
    /// Whether stores dropped idle sessions within the run (a short session lifetime).
    pub short_session_ttl: bool,
    /// Sessions opened at a range (client requests answered).
    pub sessions_opened: u64,
    /// Writes sent again after an attempt's unknown outcome (each such outcome once).
    pub retried_unknown: u64,
    /// Commands answered from a session table (distinct entry positions).
    pub duplicates: u64,
    /// Entries that dropped idle sessions (distinct per range).
    pub expiries: u64,
    /// Commands refused because their session expired or their sequence is below
    /// the session's floor (distinct entry positions).
    pub refused_expired: u64,
    /// Writes refused `SessionExpired` that the client knew unapplied: renumbered and
    /// sent again after reopening the session.
    pub expired_renumbered: u64,
    /// Writes refused `SessionExpired` after an unknown outcome: given up as
    /// unknown (applied once or not at all).
    pub expired_given_up: u64,
    /// Operations given up after the client's patience ran out.
    pub given_up: u64,
    /// Membership changes proposed, and refused by the leader (nothing proposed).
    pub membership_proposed: u64,
    pub membership_refused: u64,
    /// Membership changes applied (distinct range and `conf_ver`), of which joint
    /// configurations entered and left.
    pub membership_applied: u64,
    pub joint_entered: u64,
    pub joint_left: u64,
    /// Snapshots built by leaders, installed by followers; logs reset at open
    /// (a crash between a snapshot's install and its log reset).
    pub snapshots_built: u64,
    pub snapshots_installed: u64,
    pub logs_reset_at_open: u64,
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
            "replay: SEED={} make sim   (or: SIM_SEED={} cargo test -p rangekv-raftstore --test sim -- --exact simulation --nocapture)",
            self.seed, self.seed
        )
    }
}

/// One range's state machine on one store (RocksDB's `data` for the range's keys,
/// its client sessions and its applied index, written together in one apply batch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sm {
    pub kv: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The range's client sessions, by id (shared with the copies of the apply
    /// batches since the last flush until changed).
    pub sessions: Rc<BTreeMap<SessionId, PersistedSession>>,
    pub applied: u64,
    /// The term of the entry at `applied`.
    pub applied_term: u64,
    /// The range's members (its descriptor), written with the entry that changed
    /// them; `None` until the first change: the bootstrap membership.
    pub membership: Option<Membership>,
    /// The index of the last snapshot installed (0: none): a crash may leave the
    /// log behind it until the store resets the log at open.
    pub snapshot_index: u64,
}

/// A client session as a state machine holds it: its record (`encode_session`), and
/// the record's hash, taken once when it is written (the state is hashed after every
/// entry applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistedSession {
    pub record: Vec<u8>,
    pub hash: u64,
}

impl Sm {
    /// The state as written: data, persisted sessions, members.
    pub fn hash(&self) -> u64 {
        self.hash_with(self.sessions.iter().map(|(id, s)| (*id, s.hash)))
    }

    /// The state with `sessions` (id order; each its record's hash) in place of the
    /// persisted ones: what the state is after an entry, before its apply batch
    /// writes the sessions it changed.
    pub fn hash_with(&self, sessions: impl Iterator<Item = (SessionId, u64)>) -> u64 {
        let mut hash = Hash::default();
        for (k, v) in &self.kv {
            hash.bytes(k).bytes(v);
        }
        for (id, record_hash) in sessions {
            hash.u64((id >> 64) as u64).u64(id as u64).u64(record_hash);
        }
        if let Some(membership) = &self.membership {
            let mut raw = Vec::new();
            membership.encode(&mut raw);
            hash.bytes(&raw);
        }
        hash.0
    }

    pub fn write_session(&mut self, id: SessionId, record: Vec<u8>) {
        let hash = hash_bytes(&record);
        Rc::make_mut(&mut self.sessions).insert(id, PersistedSession { record, hash });
    }

    pub fn delete_session(&mut self, id: SessionId) {
        Rc::make_mut(&mut self.sessions).remove(&id);
    }
}

/// A store's process while it runs: the core's driver plus the runtime around it.
pub struct Live {
    /// Out only while lent to a call into the core (`World::drive`).
    pub driver: Option<Box<Driver<SimTypes>>>,
    /// The control channel: log writes durable (their seq).
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
    /// Per destination store.
    pub outbox: Vec<Outbox>,
    /// Per store: when a batch of it last arrived (this store's start if never).
    pub last_heard: Vec<u64>,
    pub started_at: u64,
    /// Per store: when it was last reported unreachable.
    pub unreachable_reported: Vec<Option<u64>>,
    /// Per range: the last entry applied in the current apply batch.
    pub batch_applied: Vec<u64>,
    /// Per range: commit index up to which the committed-entries invariant ran.
    pub checked_commit: Vec<u64>,
    /// Per range: log-matching chain hashes of the log as raft sees it.
    pub chains: Vec<Chain>,
    /// Per range: whether the replica last published itself quiesced.
    pub quiesced: Vec<bool>,
}

impl Live {
    pub fn new(driver: Box<Driver<SimTypes>>, nodes: usize, ranges: usize, now: u64) -> Self {
        Live {
            driver: Some(driver),
            control: VecDeque::new(),
            inbox: VecDeque::new(),
            wake: None,
            wake_gen: 0,
            tick_due: false,
            next_tick_at: 0,
            write_done_at: now,
            open: BTreeSet::new(),
            outbox: (0..nodes).map(|_| Outbox::default()).collect(),
            last_heard: vec![now; nodes],
            started_at: now,
            unreachable_reported: vec![None; nodes],
            batch_applied: vec![0; ranges],
            checked_commit: vec![0; ranges],
            chains: (0..ranges).map(|_| Chain::default()).collect(),
            quiesced: vec![false; ranges],
        }
    }

    pub fn driver(&self) -> &Driver<SimTypes> {
        self.driver
            .as_ref()
            .expect("the driver is in place between calls")
    }

    /// The status of `range`'s replica here.
    pub fn status(&self, range: usize) -> PeerStatus {
        self.driver()
            .peer(range_id(range))
            .expect("every store hosts every range")
            .status()
    }
}

pub struct Node {
    pub id: u64,
    /// Bumped at each crash: events of an earlier incarnation are void.
    pub inc: u64,
    pub live: Option<Live>,
    /// The store's log engine (its disk survives crashes).
    pub log: SimLog,
    /// Per range: the state machine as the running process sees it.
    pub sm: Vec<Sm>,
    /// Last flushed state machine, and the states after each apply batch since then
    /// (written without sync): a crash keeps a prefix of them.
    pub sm_synced: Vec<Sm>,
    pub sm_unsynced: Vec<Vec<Sm>>,
    /// How far ahead the store's wall clock runs (ms): leaders stamp their entries
    /// with it, and expiry must not depend on whose clock it was.
    pub clock_ahead_ms: u64,
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
    /// The store worker's tick.
    Tick {
        node: usize,
        inc: u64,
    },
    /// The transport's ticker: tick batches to every other store.
    TransportTick {
        node: usize,
        inc: u64,
    },
    Wake {
        node: usize,
        inc: u64,
        gen: u64,
    },
    LogDone {
        node: usize,
        inc: u64,
        id: u64,
    },
    Packet(Box<Packet>),
    Unreachable {
        node: usize,
        inc: u64,
        store: usize,
    },
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
    /// The membership operator's next step (see `faults.rs`).
    Membership,
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
    CrashQuiescedLeader {
        downtime: u64,
    },
    Heal(Heal),
    Restart(usize),
    /// The state machine's flush: the background one (`periodic`) or one the core
    /// asked for.
    SmSync {
        node: usize,
        inc: u64,
        periodic: bool,
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
    /// The final writes and reads.
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
    /// Drives the membership operator (its own stream: the other faults' draws
    /// stay where they were).
    pub member_rng: Rng,
    /// Every store's core settings (each store start draws its own election seed).
    pub core: CoreConfig,
    pub ranges: usize,
    pub nodes: Vec<Node>,
    pub net: Net,
    /// The background flush of the state machine comes every `flush_every.0..1` ns.
    pub flush_every: (u64, u64),
    /// A store's loop runs within this long of being woken (ns): what arrives
    /// meanwhile is handled in one iteration.
    pub loop_delay_max: u64,
    /// Log writes submitted, over every store (their numbers).
    pub next_write: u64,
    pub clients: Vec<Client>,
    pub requests: BTreeMap<u64, Request>,
    pub next_req: u64,
    pub history: History,
    pub keys: Vec<Vec<u8>>,
    /// The range (index) of each key.
    pub key_range: Vec<usize>,
    pub inv: Invariants,
    /// Every snapshot a leader built, by number (its payload).
    pub snapshots: Vec<Sm>,
    /// Stores whose state a step may have changed: their invariants are checked and
    /// their state hashed into the trace after it.
    pub dirty: Vec<bool>,
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
    /// Clients issue nothing before this (an idle window: ranges quiesce).
    pub idle_until: u64,
}

const TAIL_LINES: usize = 150;

thread_local! {
    /// The last trace lines of the run on this thread (kept outside the world so
    /// that they survive a panic inside raft-rs or the core).
    static TAIL: std::cell::RefCell<VecDeque<String>> = const { std::cell::RefCell::new(VecDeque::new()) };
}

pub fn take_tail() -> Vec<String> {
    TAIL.with(|tail| tail.borrow_mut().drain(..).collect())
}

/// The core's settings for a world: the node's defaults, with quiescence and log
/// compaction made to happen within a run, and sometimes small byte targets so that
/// a loop proposes several entries per range and writes several log batches.
fn core_config(rng: &mut Rng) -> CoreConfig {
    let mut config = CoreConfig {
        replica: ReplicaConfig::default(),
        tick_interval: Duration::from_nanos(TICK),
        quiesce: true,
        quiesce_after_ticks: rng.range(3, 9) as u32,
        log_gc_entries: rng.range(8, 33),
        log_gc_flush_after: Duration::from_millis(rng.range(200, 1_500)),
        ..CoreConfig::default()
    };
    if rng.chance(300) {
        config.entry_bytes_target = rng.range(30, 120) as usize;
    }
    if rng.chance(300) {
        config.loop_bytes_target = rng.range(60, 400) as usize;
    }
    // Followers a little behind are left to catch up by snapshot; in a quarter of
    // the worlds, as in a node without snapshots, none is ever built and the log
    // waits for every follower.
    config.log_gc_lag_entries = if rng.chance(250) {
        u64::MAX
    } else {
        rng.range(2, 30)
    };
    config
}

impl World {
    pub fn new(opts: Options) -> Self {
        let mut rng = Rng::new(opts.seed ^ 0x005E_ED0F_5EED);
        let net_rng = rng.fork(1);
        let mut client_rng = rng.fork(2);
        let mut fault_rng = rng.fork(3);
        let mut disk_rng = rng.fork(4);
        let mut clock_rng = rng.fork(5);
        let member_rng = rng.fork(6);
        let n = if fault_rng.chance(250) { 5 } else { 3 };
        let ranges = match fault_rng.below(100) {
            0..15 => 1,
            15..60 => 2,
            _ => 3,
        };
        let mut core = core_config(&mut fault_rng);
        if opts.no_snapshots {
            core.log_gc_lag_entries = u64::MAX;
        }
        // Sometimes sessions idle for a few seconds are dropped (the default, 10
        // minutes, is longer than a run): expiry and `SessionExpired` happen.
        let short_session_ttl = clock_rng.chance(250);
        if short_session_ttl {
            core.session_ttl = Duration::from_millis(clock_rng.range(1_500, 5_000));
        }
        // Sometimes the stores' wall clocks disagree by up to 300 ms.
        let skewed = clock_rng.chance(500);
        // Keys are split into contiguous spans, one per range, of one or two keys.
        let mut keys = Vec::new();
        let mut key_range = Vec::new();
        for r in 0..ranges {
            for _ in 0..client_rng.range(1, 3) {
                keys.push(format!("k{}", keys.len()).into_bytes());
                key_range.push(r);
            }
        }
        let loop_delay_max = if fault_rng.chance(400) { 4 * MS } else { MS };
        let flush_every = if disk_rng.chance(500) {
            (300 * MS, 2_000 * MS)
        } else {
            (1_000 * MS, 5_000 * MS)
        };
        let nodes = (0..n)
            .map(|i| Node {
                id: i as u64 + 1,
                inc: 0,
                live: None,
                log: SimLog::default(),
                sm: vec![Sm::default(); ranges],
                sm_synced: vec![Sm::default(); ranges],
                sm_unsynced: Vec::new(),
                clock_ahead_ms: if skewed { clock_rng.below(300) } else { 0 },
            })
            .collect();
        let client_count = client_rng.range(3, 6) as usize;
        let clients = (0..client_count)
            .map(|c| Client::new(c as u64 + 1, &mut client_rng, c % n, ranges))
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
            member_rng,
            core,
            ranges,
            nodes,
            net: Net {
                group: vec![0; n],
                oneway: BTreeSet::new(),
                drop_per_mille: 10,
                dup_per_mille: 10,
                slow: false,
            },
            flush_every,
            loop_delay_max,
            next_write: 0,
            clients,
            requests: BTreeMap::new(),
            next_req: 1,
            history: History::new(),
            keys,
            key_range,
            inv: Invariants::new(n, ranges),
            snapshots: Vec::new(),
            dirty: vec![true; n],
            phase: Phase::Chaos,
            chaos_end,
            steps: 0,
            trace: Hash::default(),
            failure: None,
            summary: Summary {
                nodes: n,
                ranges,
                short_session_ttl,
                ..Default::default()
            },
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            active_faults: BTreeSet::new(),
            final_ops: Vec::new(),
            writes_paused_until: 0,
            idle_until: 0,
            opts,
        }
    }

    pub fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    /// `node`'s wall clock (ms since the Unix epoch): the virtual time, from a fixed
    /// start, plus how far ahead the store's clock runs.
    pub fn wall_clock_ms(&self, node: usize) -> u64 {
        WALL_CLOCK_START_MS + self.nodes[node].clock_ahead_ms + self.now / MS
    }

    pub fn schedule(&mut self, at: u64, event: Event) {
        debug_assert!(at >= self.now);
        self.event_seq += 1;
        self.queue.insert((at, self.event_seq), event);
    }

    pub fn after(&mut self, delay: u64, event: Event) {
        self.schedule(self.now + delay, event);
    }

    pub fn live(&self, node: usize) -> &Live {
        self.nodes[node].live.as_ref().expect("the store runs")
    }

    pub fn live_mut(&mut self, node: usize) -> &mut Live {
        self.nodes[node].live.as_mut().expect("the store runs")
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
        // Three worlds in four change their ranges' members as they run.
        if self.member_rng.chance(750) {
            let first = self.member_rng.range(TICK * 5, TICK * 40);
            self.schedule(first, Event::Membership);
        }
        self.schedule(self.chaos_end, Event::EndChaos);
        // Liveness bound: after healing, the final writes and reads must succeed well
        // within this.
        let deadline = self.chaos_end + 60_000 * MS;
        while self.phase != Phase::Done && self.failure.is_none() {
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
        for (node, dirty) in self.nodes.iter().zip(&mut self.dirty) {
            if !std::mem::take(dirty) {
                continue;
            }
            self.trace.u64(node.id);
            let Some(live) = &node.live else {
                self.trace.u64(u64::MAX);
                continue;
            };
            let Some(driver) = &live.driver else {
                continue;
            };
            for peer in driver.peers() {
                let status = peer.status();
                self.trace
                    .u64(peer.range().get())
                    .u64(status.term)
                    .u64(status.role as u64)
                    .u64(status.committed)
                    .u64(status.applied)
                    .u64(status.last_index)
                    .u64(u64::from(status.quiesced));
            }
        }
    }

    /// Whether `node` runs incarnation `inc`.
    fn current(&self, node: usize, inc: u64) -> bool {
        self.nodes[node].inc == inc && self.nodes[node].live.is_some()
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick { node, inc } => {
                self.trace.u64(1).u64(node as u64);
                if !self.current(node, inc) {
                    return;
                }
                self.after(TICK, Event::Tick { node, inc });
                let next = self.now + TICK;
                let live = self.live_mut(node);
                live.tick_due = true;
                live.next_tick_at = next;
                self.run_loop(node);
            }
            Event::TransportTick { node, inc } => {
                self.trace.u64(4).u64(node as u64);
                if !self.current(node, inc) {
                    return;
                }
                self.after(TICK, Event::TransportTick { node, inc });
                self.transport_tick(node);
            }
            Event::Wake { node, inc, gen } => {
                self.trace.u64(2).u64(node as u64);
                let valid = self.current(node, inc) && self.live(node).wake == Some(gen);
                if valid {
                    self.run_loop(node);
                }
            }
            Event::LogDone { node, inc, id } => {
                self.trace.u64(3).u64(node as u64).u64(id);
                if self.current(node, inc) {
                    self.log_done(node, id);
                }
            }
            Event::Packet(packet) => self.deliver(*packet),
            Event::Unreachable { node, inc, store } => {
                if self.current(node, inc) {
                    self.unreachable(node, store);
                }
            }
            Event::Request(req) => self.on_request(req),
            Event::Reply { req, reply } => self.on_reply(req, reply),
            Event::ClientGo(client) => self.client_go(client),
            Event::ClientTimeout { client, req } => self.client_timeout(client, req),
            Event::Fault => self.fault(),
            Event::Membership => self.membership_change(),
            Event::Isolate { node, duration } => self.isolate(node, duration),
            Event::LeaseSteal { duration } => self.lease_steal(duration),
            Event::Bounce {
                node,
                downtime,
                cut_from,
                until,
            } => self.bounce(node, downtime, cut_from, until),
            Event::CrashQuiescedLeader { downtime } => self.crash_quiesced_leader(downtime),
            Event::Heal(what) => self.heal(what),
            Event::Restart(node) => {
                self.trace.u64(9).u64(node as u64);
                if self.nodes[node].live.is_none() {
                    self.log(|| format!("n{} RESTART", node + 1));
                    self.open(node, true);
                }
            }
            Event::SmSync {
                node,
                inc,
                periodic,
            } => {
                self.trace.u64(5).u64(node as u64);
                if !self.current(node, inc) {
                    return;
                }
                self.dirty[node] = true;
                let node_ref = &mut self.nodes[node];
                node_ref.sm_synced = node_ref.sm.clone();
                node_ref.sm_unsynced.clear();
                if periodic {
                    let next = self.disk_rng.range(self.flush_every.0, self.flush_every.1);
                    self.after(
                        next,
                        Event::SmSync {
                            node,
                            inc,
                            periodic,
                        },
                    );
                }
            }
            Event::EndChaos => self.end_chaos(),
            Event::EndRun => {
                self.phase = Phase::Done;
            }
        }
    }

    /// The core published a range's state: quiescence transitions are counted, and a
    /// lease is only ever published by the range's leader.
    pub fn on_publish(&mut self, node: usize, range: RangeId, view: RangeView) {
        let id = node as u64 + 1;
        if view.lease_until.is_some() && view.leader != Some(id) {
            self.fail(format!(
                "n{id} {range} publishes a lease while {:?} leads",
                view.leader
            ));
        }
        let r = range_index(range);
        let live = self.live_mut(node);
        if live.quiesced[r] == view.quiesced {
            return;
        }
        live.quiesced[r] = view.quiesced;
        if view.quiesced {
            self.summary.quiesced += 1;
        } else {
            self.summary.woken += 1;
        }
        let quiesced = view.quiesced;
        self.log(|| {
            format!(
                "n{id} {range} {} (leader {:?}, term {}, applied {})",
                if quiesced { "QUIESCES" } else { "wakes" },
                view.leader,
                view.term,
                view.applied
            )
        });
    }

    /// Crashes `node`: its process state and unsynced bytes are gone.
    pub fn crash(&mut self, node: usize) {
        let Some(mut live) = self.nodes[node].live.take() else {
            return;
        };
        self.dirty[node] = true;
        self.nodes[node].inc += 1;
        for peer in live.driver().peers() {
            self.summary.terms = self.summary.terms.max(peer.status().term);
            let r = range_index(peer.range());
            self.check_all_sessions_persisted(node, r, &peer.handle().sessions);
        }
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
        drop(live);
        // The log: writes in flight are lost, except a prefix that had reached the
        // disk without its completion being seen.
        let in_flight = self.nodes[node].log.0.borrow().in_flight.len();
        let keep = self.disk_rng.below(in_flight as u64 + 1) as usize;
        let crashed = self.nodes[node].log.0.borrow_mut().crash(keep);
        if let Err(what) = crashed {
            self.fail(format!("n{}: {what}", node + 1));
            return;
        }
        // The state machine: apply batches are written without sync, so a crash keeps
        // a prefix of the batches since the last flush.
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
        let mut state = String::new();
        for r in 0..self.ranges {
            let range = range_id(r);
            let applied = self.nodes[node].sm[r].applied;
            let log = self.nodes[node].log.0.borrow();
            let (first, last, hs) = log.range(range).map_or((1, 0, Default::default()), |l| {
                (l.first_index(), l.last_index(), l.hard_state.clone())
            });
            drop(log);
            let _ = write!(
                state,
                " {range}: log {first}..={last} hs(t{} v{} c{}) applied {applied};",
                hs.term, hs.vote, hs.commit
            );
            // The restarted replica replays from the applied index that survived: the
            // log must hold everything after it — or the store resets it at open, if
            // a snapshot was installed there.
            let snapshot = self.nodes[node].sm[r].snapshot_index;
            if (applied > last && applied != snapshot) || first > applied + 1 {
                self.fail(format!(
                    "n{} {range}: applied index {applied} survives a crash but the durable log holds {first}..={last}",
                    node + 1
                ));
            }
        }
        self.log(|| {
            format!(
                "n{} CRASH: kept {keep}/{in_flight} log writes in flight, {kept}/{unsynced} apply batches;{state}",
                node + 1
            )
        });
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
        if self.nodes.iter().any(|node| node.live.is_none()) {
            self.fail("a store is down at the end".into());
            return;
        }
        // Every store converged on the same applied state, range by range.
        for r in 0..self.ranges {
            let states: Vec<(u64, u64, u64, u64)> = (0..self.nodes.len())
                .map(|node| {
                    let status = self.live(node).status(r);
                    let sm = &self.nodes[node].sm[r];
                    (node as u64 + 1, status.committed, sm.applied, sm.hash())
                })
                .collect();
            let first = states[0];
            if states
                .iter()
                .any(|s| (s.1, s.2, s.3) != (first.1, first.2, first.3))
            {
                let nodes = self.describe_nodes();
                self.fail(format!(
                    "{}: no convergence after healing: (node, commit, applied, state hash) {states:?}; \
                     [role term commit applied first-last] per range:{nodes}",
                    range_id(r)
                ));
                return;
            }
            self.summary.commit += first.1;
            for node in &self.nodes {
                let first_index = node
                    .log
                    .0
                    .borrow()
                    .range(range_id(r))
                    .map_or(1, |l| l.first_index());
                self.summary.first_index_max = self.summary.first_index_max.max(first_index);
            }
        }
        // Each final read, after its final write was acknowledged and with no other
        // writer left, sees it.
        if self.final_ops.len() != 2 * self.ranges {
            self.fail(format!("final operations: {:?}", self.final_ops));
            return;
        }
        let ops = self.history.ops();
        for pair in self.final_ops.chunks(2) {
            let (rangekv_check::Op::Put(written), rangekv_check::Outcome::Ok { result, .. }) =
                (&ops[pair[0].0].op, &ops[pair[1].0].outcome)
            else {
                self.fail("the final writes and reads are not recorded".into());
                return;
            };
            if *result != rangekv_check::OpResult::Read(Some(written.clone())) {
                let what = format!(
                    "the final read returned {result:?} after the final write of {:?}",
                    String::from_utf8_lossy(written)
                );
                self.fail(what);
                return;
            }
        }
        for node in &self.nodes {
            if let Some(live) = &node.live {
                for peer in live.driver().peers() {
                    self.summary.terms = self.summary.terms.max(peer.status().term);
                }
            }
        }
        for node in &self.nodes {
            self.summary.compactions += node.log.0.borrow().compactions_written;
        }
        for facts in &self.inv.ranges {
            self.summary.duplicates += facts.duplicates.len() as u64;
            self.summary.expiries += facts.expiries.len() as u64;
            self.summary.refused_expired += facts.refused_expired.len() as u64;
        }
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
                op.process < super::clients::FINAL_PROCESS
                    && matches!(op.outcome, rangekv_check::Outcome::Ok { .. })
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

    /// One line per store: per range, role, term, commit, applied, first and last
    /// index, quiesced.
    pub fn describe_nodes(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let Some(live) = node.live.as_ref().filter(|l| l.driver.is_some()) else {
                let _ = write!(out, " n{}:down", node.id);
                continue;
            };
            let _ = write!(out, " n{}:", node.id);
            for r in 0..self.ranges {
                let s = live.status(r);
                let role = match s.role {
                    StateRole::Leader => "L",
                    StateRole::Follower => "F",
                    StateRole::Candidate => "C",
                    StateRole::PreCandidate => "P",
                };
                let _ = write!(
                    out,
                    "[{role}t{}c{}a{}i{}-{}{}]",
                    s.term,
                    s.committed,
                    s.applied,
                    s.first_index,
                    s.last_index,
                    if s.quiesced { "q" } else { "" }
                );
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

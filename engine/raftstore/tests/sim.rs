//! Deterministic seeded simulation of stores running the replication core.
//!
//! The code under test is the core's own: each simulated store runs a
//! `rangekv_raftstore::Driver` with a `Peer` (raft-rs under `Replica`, over
//! `PeerStorage`) per range, as `engine/node/src/worker.rs` does; the simulation
//! supplies only the I/O, through `Host` and `LogRead`, all on one thread, on a
//! virtual clock, from one seed. Each world has 3 or 5 stores and 1–3 ranges (mostly
//! 2 or 3), every range replicated on every store (peer id = store id).
//!
//! - `sim/store.rs`: the store's runtime, as worker.rs: `Peer::open` per range
//!   (applied index and client sessions from the state machine; `reopened` after a
//!   crash), the loop (drain log completions and the inbox into `on_persisted` /
//!   `on_raft` / `on_heartbeats` / `on_write` / `on_read`, `tick` when due with the
//!   stores silent for an election timeout — `StoreShared::silent_stores` —,
//!   `process`); its transport: raft messages and urgent (ReadIndex) heartbeats leave
//!   at `flush`, one batch per destination store; the other heartbeats, responses and
//!   quiesce notices with the store's tick batch, sent to every other store each
//!   tick, empty or not; any batch received marks its sender heard from. A packet to
//!   a store that is down reports it unreachable (`on_unreachable`). Local-only raft
//!   message types are refused at the edge; leader transfers go through
//!   `Driver::transfer_leader`.
//! - `sim/host.rs`: `Types` (commands and compaction in a hand encoding, each entry
//!   stamped with its leader's wall clock and session lifetime, decoded without
//!   panics: an entry that does not decode is `Fatal`) and `Host`: log writes, the
//!   apply batch into an in-memory state machine (per range: keys, client sessions
//!   and applied index together), written without sync — a crash keeps a seeded
//!   prefix of the batches since the last flush, which runs in the background every
//!   0.3–2 s or 1–5 s, or 1–50 ms after the core asks (`request_flush`);
//!   `durable_applied` is the flushed applied index. Writes apply through the
//!   range's `SessionTable` as the node applies them (`engine/node/src/command.rs`):
//!   expiry by the entry's stamp first, `OpenSession`, then each write at most once
//!   per (session, sequence), a duplicate answered from the table, an expired
//!   session refused. The live table sits in the range's handle and is loaded back
//!   from the state machine when a store reopens. Client answers and refusals.
//! - `sim/log.rs`: the store's log engine, shared by its ranges: per range, entries
//!   after a compaction point and the hard state, durable; writes complete in order
//!   after a seeded delay (compaction-only writes too; during the faults, one write
//!   in a thousand stalls for 1–3 election timeouts); a crash keeps a seeded
//!   prefix of the writes in flight — those that reached the disk unacknowledged —
//!   and loses the rest. A snapshot's log reset is one step of a write.
//! - Core settings per world: quiescence on after 3–8 idle ticks, log compaction
//!   every 8–32 entries, a flush asked for after 0.2–1.5 s; sometimes small entry
//!   and loop byte targets (several entries per range per loop, several log writes
//!   per loop), sometimes slower loops (what arrives within 4 ms is handled in one
//!   iteration, so one log write carries several ranges more often); in a quarter of
//!   the worlds a session lifetime of 1.5–5 s (else the default 10 minutes, longer
//!   than a run), and in half of them stores whose wall clocks run up to 300 ms
//!   apart.
//! - `sim/world.rs`: the event queue (virtual time, seeded packet delays: most
//!   0.1–5 ms, some up to 100 or 800 ms, so reordering), drops and duplicates of whole
//!   batches, crash and restart, end of run (heal, a final write and read in every
//!   range, convergence of every range, linearizability).
//! - `sim/faults.rs`: partitions (isolated store, minority/majority split, one link
//!   cut both ways, one way), crash and restart, leader transfer (sometimes the old
//!   leader is isolated just after), lossy and slow windows, a targeted "lease steal"
//!   (the vote refusal after a reopen), idle windows (no client traffic: ranges
//!   quiesce) and crashes of a quiesced range's leader (its followers must hasten
//!   their election). In three worlds of four, a membership operator (its own
//!   random stream) every 0.5–3 s reads a range's members at its leader and proposes,
//!   against that `conf_ver`, a demotion (at least 2 voters of 3, 3 of 5 stay), a
//!   promotion, or both as one joint change; never the leader's demotion. The state
//!   machine keeps the members with the applied index; a store reopens a range with
//!   them.
//! - `sim/clients.rs`: 3–5 processes, get / put / delete / CAS with unique values,
//!   each key routed to its range with a leader guess per range. Each process has a
//!   session, as the real client (`client/src/lib.rs`): opened at a range before its
//!   first write there, a sequence per write kept through its retries; a write whose
//!   outcome is unknown (crash, abandoned, timeout) is sent again, one refused for an
//!   expired session is renumbered if it certainly never applied and ends `unknown`
//!   if it may have; an operation given up after 8 s is `unknown` if it may have
//!   applied, else `failed`. One operation in the history however many attempts.
//! - `sim/invariants.rs`, per range, after every step (on the stores the step
//!   touched): one leader per term, no double votes (and votes durable before they
//!   leave), MsgAppend entries follow their index, log matching, committed entries
//!   never change, applied ≤ committed ≤ last (and applied ≤ persisted), equal state
//!   machines at the end of every apply batch (compared by applied index), durable terms never go back, the durable log
//!   starts at most one past the flushed applied index (and after a crash at most one
//!   past the applied index that survived, which is at most its last index), a quiesced
//!   follower does not sleep through its leader's store's silence, a lease is only
//!   published by a leader, and no follower needs a snapshot (there are none): a
//!   leader's next index for each follower stays past its log's compaction point;
//!   every replica applies each `conf_ver` at the same entry as the same members,
//!   one `conf_ver` at a time, and raft's configuration is the applied membership;
//!   a write of a session applies in one entry only, however often it is retried
//!   (`check_applied_once`), and what a range's state machine holds of its sessions
//!   is its live table after every apply batch (and at each crash). A `Fatal` from
//!   the core (e.g. `Snapshot`) fails the seed.
//!
//! Environment:
//! - `SIM_SEED=n` (`SEED=n make sim`): run only seed n, printing every step (replay
//!   of a failure). Not `SEED`: an unrelated `SEED` in the environment (the nemesis
//!   reads one) must not change or break the default run.
//! - `SIM_SEEDS=k`: run seeds 0..k (default 200); `SIM_SEED_BASE=b` starts at b.
//! - `SIM_STEPS=t`: length of the faulty phase in 100 ms ticks (default 300 = 30 s
//!   of virtual time); raise it for a longer local run.
//! - `SIM_THREADS=j`: seeds run on j threads (default: up to 2).
//!
//! Not modeled: snapshots, membership changes and splits (so no epochs), reads
//! served off the worker from a published lease (`RangeInfo`), wall clocks drifting
//! (they are only offset), client requests delayed for longer than a few
//! milliseconds (so never past a session's lifetime), clients with several writes in
//! flight, torn log writes (the log engine's own tests cover them), several workers
//! per store, a full inbox (`ServerBusy`), message loss inside a batch.

#[path = "sim/clients.rs"]
mod clients;
#[path = "sim/faults.rs"]
mod faults;
#[path = "sim/host.rs"]
mod host;
#[path = "sim/invariants.rs"]
mod invariants;
#[path = "sim/log.rs"]
mod log;
#[path = "sim/rng.rs"]
mod rng;
#[path = "sim/store.rs"]
mod store;
#[path = "sim/world.rs"]
mod world;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use world::{Failure, Options, Summary, World};

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

fn options(seed: u64) -> Options {
    let mut opts = Options::new(seed);
    if let Some(steps) = env_u64("SIM_STEPS") {
        opts.chaos_ticks = steps;
    }
    opts
}

/// What the core did over a set of seeds, from the runs' counters.
#[derive(Debug, Default)]
struct Coverage {
    /// Seeds showing each: a log write with appends of two ranges or more; a replica
    /// quiescing, and one waking; a hastened election; a compaction point written
    /// (a first index past 1); a batch with heartbeats of two ranges or more.
    multi_range_writes: u64,
    quiesced: u64,
    woken: u64,
    hastened: u64,
    compacted: u64,
    coalesced: u64,
    /// Totals.
    writes_multi_range: u64,
    quiesces: u64,
    wakes: u64,
    hastened_elections: u64,
    compactions: u64,
    first_index_max: u64,
    flush_requests: u64,
    tick_batches: u64,
    coalesced_batches: u64,
    heartbeats: u64,
    unreachable: u64,
    /// Client sessions: seeds with a short session lifetime; sessions opened; writes
    /// sent again after an unknown outcome; commands answered from a session table;
    /// entries dropping idle sessions; commands refused for an expired session;
    /// writes renumbered after one, and given up after one (following an unknown
    /// outcome); operations given up after the client's patience.
    short_ttl_seeds: u64,
    sessions_opened: u64,
    retried_unknown: u64,
    duplicates: u64,
    expiries: u64,
    refused_expired: u64,
    expired_renumbered: u64,
    expired_given_up: u64,
    given_up: u64,
    /// Membership changes proposed, refused, applied; joint configurations entered
    /// and left.
    membership_proposed: u64,
    membership_refused: u64,
    membership_applied: u64,
    joint_entered: u64,
    joint_left: u64,
    /// Snapshots built and installed; logs reset at open after a crash between a
    /// snapshot's install and its log reset.
    snapshots_built: u64,
    snapshots_installed: u64,
    logs_reset_at_open: u64,
}

impl Coverage {
    fn add(&mut self, summary: &Summary) {
        self.multi_range_writes += u64::from(summary.multi_range_writes > 0);
        self.quiesced += u64::from(summary.quiesced > 0);
        self.woken += u64::from(summary.woken > 0);
        self.hastened += u64::from(summary.hastened > 0);
        self.compacted += u64::from(summary.compactions > 0 && summary.first_index_max > 1);
        self.coalesced += u64::from(summary.coalesced_batches > 0);
        self.writes_multi_range += summary.multi_range_writes;
        self.quiesces += summary.quiesced;
        self.wakes += summary.woken;
        self.hastened_elections += summary.hastened;
        self.compactions += summary.compactions;
        self.first_index_max = self.first_index_max.max(summary.first_index_max);
        self.flush_requests += summary.flush_requests;
        self.tick_batches += summary.tick_batches;
        self.coalesced_batches += summary.coalesced_batches;
        self.heartbeats += summary.heartbeats;
        self.unreachable += summary.unreachable;
        self.short_ttl_seeds += u64::from(summary.short_session_ttl);
        self.sessions_opened += summary.sessions_opened;
        self.retried_unknown += summary.retried_unknown;
        self.duplicates += summary.duplicates;
        self.expiries += summary.expiries;
        self.refused_expired += summary.refused_expired;
        self.expired_renumbered += summary.expired_renumbered;
        self.expired_given_up += summary.expired_given_up;
        self.given_up += summary.given_up;
        self.membership_proposed += summary.membership_proposed;
        self.membership_refused += summary.membership_refused;
        self.membership_applied += summary.membership_applied;
        self.joint_entered += summary.joint_entered;
        self.joint_left += summary.joint_left;
        self.snapshots_built += summary.snapshots_built;
        self.snapshots_installed += summary.snapshots_installed;
        self.logs_reset_at_open += summary.logs_reset_at_open;
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} multi-range log writes, {} quiesced and {} woken replicas, {} hastened elections, \
             {} compaction points written (first index up to {}), {} flushes asked, {} tick batches, \
             {} batches coalescing heartbeats of several ranges ({} heartbeats), {} unreachable reports; \
             sessions: {} opened, {} writes sent again after an unknown outcome, {} duplicates answered \
             from a session table, {} entries expiring sessions (short lifetime in {} seeds), {} commands \
             refused for an expired session ({} writes renumbered, {} given up after an unknown outcome), \
             {} operations given up; membership: {} changes proposed, {} refused, {} applied, {} joint \
             configurations entered and {} left; snapshots: {} built, {} installed, {} logs reset at open",
            self.writes_multi_range,
            self.quiesces,
            self.wakes,
            self.hastened_elections,
            self.compactions,
            self.first_index_max,
            self.flush_requests,
            self.tick_batches,
            self.coalesced_batches,
            self.heartbeats,
            self.unreachable,
            self.sessions_opened,
            self.retried_unknown,
            self.duplicates,
            self.expiries,
            self.short_ttl_seeds,
            self.refused_expired,
            self.expired_renumbered,
            self.expired_given_up,
            self.given_up,
            self.membership_proposed,
            self.membership_refused,
            self.membership_applied,
            self.joint_entered,
            self.joint_left,
            self.snapshots_built,
            self.snapshots_installed,
            self.logs_reset_at_open
        )
    }
}

/// One seed; a panic (in raft-rs, the replica or the harness) is a failure too.
fn run(opts: Options) -> Result<Summary, Failure> {
    let seed = opts.seed;
    world::take_tail();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| World::new(opts).run())) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Failure {
                seed,
                step: 0,
                at_ms: 0.0,
                what: format!("panic: {message}"),
                tail: world::take_tail(),
            })
        }
    }
}

/// Runs `seed` again keeping the trace's tail, for the failure report.
fn with_tail(failure: Failure) -> Failure {
    let mut opts = options(failure.seed);
    opts.keep_tail = true;
    match run(opts) {
        Err(again) => again,
        Ok(_) => Failure {
            what: format!(
                "{} (NOT reproduced on a second run: nondeterminism!)",
                failure.what
            ),
            ..failure
        },
    }
}

#[test]
fn simulation() {
    if let Some(seed) = env_u64("SIM_SEED") {
        let mut opts = options(seed);
        opts.verbose = true;
        let started = Instant::now();
        match run(opts) {
            Ok(summary) => println!(
                "seed {seed} passed in {:.2}s: {summary:?}",
                started.elapsed().as_secs_f64()
            ),
            Err(failure) => panic!("{failure}"),
        }
        return;
    }
    let count = env_u64("SIM_SEEDS").unwrap_or(200);
    let base = env_u64("SIM_SEED_BASE").unwrap_or(0);
    let threads = env_u64("SIM_THREADS").unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(2) as u64)
    });
    let next = AtomicU64::new(base);
    type SeedResult = (u64, Result<Summary, Failure>, f64);
    let results: Mutex<Vec<SeedResult>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= base + count {
                    break;
                }
                let one = Instant::now();
                let result = run(options(seed));
                let seconds = one.elapsed().as_secs_f64();
                results
                    .lock()
                    .expect("results lock")
                    .push((seed, result, seconds));
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|r| r.0);
    let mut failures = Vec::new();
    let (mut ops, mut ok, mut unknown, mut steps, mut slowest) = (0, 0, 0, 0, (0.0, 0));
    let (mut five, mut check_ms) = (0, 0);
    let mut ranges = [0; 4];
    let mut coverage = Coverage::default();
    let mut faults = std::collections::BTreeMap::new();
    for (seed, result, seconds) in results {
        if seconds > slowest.0 {
            slowest = (seconds, seed);
        }
        match result {
            Ok(summary) => {
                ops += summary.ops;
                ok += summary.ok;
                unknown += summary.unknown;
                steps += summary.steps;
                five += usize::from(summary.nodes == 5);
                ranges[summary.ranges.min(3)] += 1;
                check_ms = check_ms.max(summary.check_ms);
                coverage.add(&summary);
                for (fault, n) in summary.faults {
                    *faults.entry(fault).or_insert(0) += n;
                }
            }
            Err(failure) => failures.push(failure),
        }
    }
    println!(
        "{count} seeds from {base} in {elapsed:.1}s on {threads} threads (slowest: seed {} {:.2}s; \
         longest linearizability check {check_ms} ms); {five} worlds of 5 nodes, the rest of 3; \
         worlds of 1/2/3 ranges: {}/{}/{}; {steps} steps, {ops} client ops ({ok} ok, {unknown} unknown); \
         faults {faults:?}; core: {coverage}",
        slowest.1, slowest.0, ranges[1], ranges[2], ranges[3]
    );
    if let Some(first) = failures.first().cloned() {
        let seeds: Vec<u64> = failures.iter().map(|f| f.seed).collect();
        for failure in &failures {
            eprintln!("FAILED seed {}: {}", failure.seed, failure.what);
        }
        panic!(
            "{} of {count} seeds failed: {seeds:?}\nfirst:\n{}",
            failures.len(),
            with_tail(first)
        );
    }
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let mut opts = options(42);
    opts.chaos_ticks = 60;
    let first = run(opts.clone()).expect("seed 42 passes");
    let second = run(opts.clone()).expect("seed 42 passes");
    assert_eq!(first.trace_hash, second.trace_hash, "same seed, same trace");
    assert_eq!(first.steps, second.steps);
    assert_eq!(first.ops, second.ops);
    opts.seed = 43;
    let other = run(opts).expect("seed 43 passes");
    assert_ne!(
        first.trace_hash, other.trace_hash,
        "another seed, another trace"
    );
}

/// Runs seeds 0..8 with a deliberate bug (`break_it` sets it) and asserts that some
/// seed fails with a message containing `expected`: the check meant to catch it bites.
fn assert_caught(bug: &str, break_it: impl Fn(&mut Options), expected: &str) {
    let mut caught = Vec::new();
    for seed in 0..8 {
        let mut opts = options(seed);
        break_it(&mut opts);
        if let Err(failure) = run(opts) {
            caught.push((seed, failure.what));
        }
    }
    let seeds: Vec<u64> = caught.iter().map(|c| c.0).collect();
    println!("{bug} caught in {} of 8 seeds: {seeds:?}", caught.len());
    assert!(
        caught.iter().any(|(_, what)| what.contains(expected)),
        "no seed caught the {bug}: {caught:?}"
    );
}

/// The checks bite: with reads answered by any node from its own state machine (no
/// lease, no ReadIndex), some seed must end in a linearizability violation.
#[test]
fn reads_without_lease_or_read_index_are_caught() {
    assert_caught(
        "broken reads",
        |opts| opts.buggy_reads = true,
        "not linearizable",
    );
}

/// The checks bite: with the state machine's applied index reported durable before
/// it is flushed, log compaction outruns the flush, which the flushed-applied-index
/// check (or a crash's replay check) must catch in some seed.
#[test]
fn compaction_past_the_flushed_applied_index_is_caught() {
    assert_caught(
        "early compaction",
        |opts| opts.buggy_durable_applied = true,
        "past the flushed applied index",
    );
}

/// The checks bite: with a write its range's session table knows as applied (a
/// duplicate: its client sent it again after an unknown outcome) applied again, as
/// if there were no sessions, some seed must catch a write applied twice.
#[test]
fn a_retried_write_applied_twice_is_caught() {
    assert_caught(
        "double application",
        |opts| opts.buggy_reapply = true,
        "applied twice",
    );
}

/// The checks bite: with stores that reopen their replicas with the members they
/// began with (not those the state machine kept), the reopened replica takes the
/// next membership change as stale and applies it as nothing while the others apply
/// it: some seed must catch the state machines differing.
#[test]
fn a_store_reopened_with_stale_members_is_caught() {
    assert_caught(
        "stale members after a reopen",
        |opts| opts.buggy_forget_membership = true,
        "differs from another node's",
    );
}

/// The checks bite: a snapshot install that a crash can lose once the log was
/// reset past it leaves a state machine behind a log that no longer holds what it
/// must replay (the flushed-applied-index rule).
#[test]
fn a_snapshot_install_a_crash_can_lose_is_caught() {
    assert_caught(
        "snapshot install not durable",
        |opts| opts.buggy_snapshot_not_durable = true,
        "past the flushed applied index",
    );
}

/// The checks bite: with stores that never report silent stores to their driver,
/// the quiesced followers of a crashed leader sleep on, which the silent-leader check
/// must catch in some seed.
#[test]
fn quiesced_followers_deaf_to_a_silent_leader_are_caught() {
    assert_caught(
        "deaf followers",
        |opts| opts.buggy_deaf_to_silence = true,
        "still asleep",
    );
}

/// The simulation reaches what the store-level core adds: several ranges sharing one
/// log write, heartbeats of several ranges in one batch, ranges quiescing and waking
/// (a crashed quiesced leader's followers hastening their election), log compaction
/// under the flushed-applied-index rule, and client sessions: writes sent again after
/// an unknown outcome, duplicates answered from a session table, sessions expiring
/// and refusing a write.
#[test]
fn the_simulation_exercises_batching_quiescence_compaction_and_sessions() {
    let mut coverage = Coverage::default();
    let mut failures = Vec::new();
    for seed in 0..12 {
        match run(options(seed)) {
            Ok(summary) => coverage.add(&summary),
            Err(failure) => failures.push(failure),
        }
    }
    assert!(failures.is_empty(), "{}", failures[0]);
    println!("{coverage:?}");
    assert!(
        coverage.multi_range_writes > 0,
        "no log write of two ranges: {coverage:?}"
    );
    assert!(
        coverage.coalesced > 0,
        "no batch of heartbeats of two ranges: {coverage:?}"
    );
    assert!(
        coverage.quiesced > 0 && coverage.woken > 0,
        "no range quiesced and woke: {coverage:?}"
    );
    assert!(coverage.hastened > 0, "no hastened election: {coverage:?}");
    assert!(
        coverage.compacted > 0,
        "no log compacted on a disk: {coverage:?}"
    );
    assert!(
        coverage.flush_requests > 0,
        "no flush asked for a compaction: {coverage:?}"
    );
    assert!(
        coverage.retried_unknown > 0,
        "no write sent again after an unknown outcome: {coverage:?}"
    );
    assert!(
        coverage.duplicates > 0,
        "no duplicate answered from a session table: {coverage:?}"
    );
    assert!(
        coverage.expiries > 0 && coverage.refused_expired > 0,
        "no session expired, or none refused a write: {coverage:?}"
    );
    assert!(
        coverage.expired_given_up > 0,
        "no write sent again after an unknown outcome was refused for its expired session: {coverage:?}"
    );
    assert!(
        coverage.membership_applied > 0 && coverage.membership_refused > 0,
        "no membership change applied, or none refused: {coverage:?}"
    );
    assert!(
        coverage.joint_entered > 0 && coverage.joint_left > 0,
        "no joint configuration entered and left: {coverage:?}"
    );
    assert!(
        coverage.snapshots_installed > 0,
        "no follower caught up by snapshot: {coverage:?}"
    );
}

/// Seeds that found raft-rs 0.7 taking a stale rejection in probe state as the truth
/// (next index = matched) before `Replica::step` floored the next index: a leader
/// then compacted its log to the matched index and needed a snapshot to reach that
/// follower, which never caught up (SEED=464: "leader n3 needs a snapshot for n2").
/// Without snapshots, as then: a snapshot would rescue the follower and hide it (the
/// seeds' runs have shifted since; they stay as a regression set).
#[test]
fn a_stale_rejection_does_not_strand_a_follower_behind_a_compaction() {
    for seed in [245, 258, 464, 1039, 1306, 1508, 1601, 1647] {
        let mut opts = options(seed);
        opts.no_snapshots = true;
        if let Err(failure) = run(opts) {
            panic!("{}", with_tail(failure));
        }
    }
}

//! Deterministic seeded simulation of one range replicated over 3 or 5 nodes.
//!
//! The code under test is `rangekv_raftstore::replica::Replica` and raft-rs, driven
//! as `engine/node/src/worker.rs` drives them, over an in-memory log, state machine
//! and network, all on one thread, on a virtual clock, from one seed.
//!
//! - `sim/driver.rs` mirrors worker.rs for one range per store, step by step and in
//!   its order: `open_range` (raft config from `ReplicaConfig`, applied index from the
//!   state machine, votes refused for an election timeout after a reopen), `run`
//!   (`wait_and_drain` → `tick_all` → `process`), `on_inbound` (writes gathered; reads
//!   through `Replica::read`: lease → answered at once, else gathered), `step`,
//!   `process` (`propose_writes` as one entry, `flush_reads`; `ready()`; `on_role`;
//!   `take_messages` sent at once; `on_read_states` → reads answered; committed entries
//!   taken; entries and hard state handed to one log write, `append_unstable(seq)`;
//!   `advance_append_async`; a Ready with nothing to persist and no write in flight
//!   is persisted at once, else it rides with the write and its
//!   `persisted_messages` wait), `submit`, `on_persisted` (`on_durable`,
//!   `on_persist_ready`, held messages sent), `apply` (`take_outcome` per entry, one
//!   apply batch with the applied index, answers, dropped proposals → NotLeader,
//!   `on_applied` → reads answered from the state machine).
//! - `sim/storage.rs`: the log, durable and unsynced (writes complete in order after
//!   a seeded delay; a crash keeps a seeded prefix of the writes in flight — those
//!   that reached the disk unacknowledged — and loses the rest), under a copy of
//!   `PeerStorage`'s unstable overlay.
//! - State machine: the keys and the applied index move together in one apply batch,
//!   which (like RocksDB's `ApplyBatch`, written without sync) a crash may lose: it
//!   keeps a seeded prefix of the batches since the last background flush (every
//!   0.3–2 s). The restarted replica re-applies from the log above what survived.
//! - `sim/world.rs`: the event queue (virtual time, seeded message delays: most
//!   0.1–5 ms, some up to 100 or 800 ms, so reordering), drops and duplicates, node
//!   loops, crash and restart, end of run (heal, final write and read, convergence,
//!   linearizability).
//! - `sim/faults.rs`: partitions (isolated node, minority/majority split, one link
//!   cut both ways, one way), crash and restart, leader transfer (sometimes the old
//!   leader is isolated just after), lossy and slow windows, and a targeted "lease
//!   steal" (the reopen rule above).
//! - `sim/clients.rs`: 3–5 processes, get / put / delete / CAS with unique values,
//!   `failed` / `unknown` as a client of the real store would know them.
//! - `sim/invariants.rs`, after every step: one leader per term, no double votes (and
//!   votes durable before they leave), MsgAppend entries follow their index, log
//!   matching, committed entries never change, applied ≤ committed ≤ last (and
//!   applied ≤ persisted), equal state machines on every applied prefix, durable
//!   terms never go back.
//!
//! Environment:
//! - `SEED=n`: run only seed n, printing every step (replay of a failure).
//! - `SIM_SEEDS=k`: run seeds 0..k (default 200); `SIM_SEED_BASE=b` starts at b.
//! - `SIM_STEPS=t`: length of the faulty phase in 100 ms ticks (default 300 = 30 s
//!   of virtual time); raise it for a longer local run.
//! - `SIM_THREADS=j`: seeds run on j threads (default: up to 2).
//!
//! Not modeled: quiescence, heartbeat coalescing, `report_unreachable`, log
//! compaction and snapshots, membership changes and splits (so no epochs), clock
//! drift between nodes, torn log writes (the log engine's own tests cover them).

#[path = "sim/clients.rs"]
mod clients;
#[path = "sim/driver.rs"]
mod driver;
#[path = "sim/faults.rs"]
mod faults;
#[path = "sim/invariants.rs"]
mod invariants;
#[path = "sim/rng.rs"]
mod rng;
#[path = "sim/storage.rs"]
mod storage;
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
    if let Some(seed) = env_u64("SEED") {
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
                check_ms = check_ms.max(summary.check_ms);
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
         {steps} steps, {ops} client ops ({ok} ok, {unknown} unknown); faults {faults:?}",
        slowest.1, slowest.0
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

/// The checks bite: with reads answered by any node from its own state machine (no
/// lease, no ReadIndex), some seed must end in a linearizability violation.
#[test]
fn reads_without_lease_or_read_index_are_caught() {
    let mut caught = Vec::new();
    for seed in 0..8 {
        let mut opts = options(seed);
        opts.buggy_reads = true;
        if let Err(failure) = run(opts) {
            caught.push((seed, failure.what));
        }
    }
    println!(
        "broken reads caught in {} of 8 seeds: {:?}",
        caught.len(),
        caught.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    assert!(
        caught
            .iter()
            .any(|(_, what)| what.contains("not linearizable")),
        "no seed caught the broken reads: {caught:?}"
    );
}

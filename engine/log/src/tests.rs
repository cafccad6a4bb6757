//! The log engine's tests: one conformance suite run over every writer (io_uring,
//! pwrite + fdatasync, `auto`, and the simulated file system), the crash-point loop
//! over the fault-injecting file system, corruption handling, and a real process
//! killed with SIGKILL in the middle of appending.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use raft::eraftpb::{Entry, HardState};
use rangekv_types::RangeId;

use crate::file::{DiskFileSystem, FileSystem, SegmentFile};
use crate::sim::{SimFileSystem, SimRng};
use crate::{LogBatch, LogConfig, LogEngine, LogError, LogIo, ReadError};

/// The entry every test writes at (range, index): its content is a function of both,
/// so anything read back can be checked, and anything invented is caught.
fn entry(range: RangeId, index: u64) -> Entry {
    let len = (range.get() * 31 + index * 7) % 300;
    Entry {
        index,
        term: 1 + index / 16,
        data: (0..len)
            .map(|i| (i ^ index ^ range.get()) as u8)
            .collect::<Vec<u8>>()
            .into(),
        ..Default::default()
    }
}

fn entries(range: RangeId, from: u64, to_inclusive: u64) -> Vec<Entry> {
    (from..=to_inclusive).map(|i| entry(range, i)).collect()
}

fn small_config(io: LogIo) -> LogConfig {
    LogConfig {
        segment_bytes: 64 * 1024,
        group_bytes_max: 16 * 1024,
        io,
        // On disk: segments past the first are filled, and the writer moves early.
        fill_segments: true,
        ..LogConfig::default()
    }
}

fn append(engine: &LogEngine, range: RangeId, from: u64, to: u64) {
    let mut batch = LogBatch::new();
    batch.append(range, entries(range, from, to));
    engine.write_sync(batch).unwrap();
}

/// Appends entries 1..=appends to `range` one `write` each, without waiting in
/// between; checks that every completion reports success, in submission order.
fn append_with_callbacks(engine: &LogEngine, range: RangeId, appends: u64) {
    write_with_callbacks(engine, range, appends, false);
}

/// The same, each `write` after the last one's callback.
fn append_with_callbacks_one_by_one(engine: &LogEngine, range: RangeId, appends: u64) {
    write_with_callbacks(engine, range, appends, true);
}

fn write_with_callbacks(engine: &LogEngine, range: RangeId, appends: u64, one_by_one: bool) {
    let (sender, receiver) = mpsc::channel();
    let mut done = Vec::new();
    for index in 1..=appends {
        let mut batch = LogBatch::new();
        batch.append(range, vec![entry(range, index)]);
        let sender = sender.clone();
        engine.write(batch, move |result| {
            sender.send((index, result.is_ok())).unwrap();
        });
        if one_by_one {
            done.push(receiver.recv().unwrap());
        }
    }
    done.extend(receiver.iter().take(appends as usize - done.len()));
    assert!(done.iter().all(|(_, ok)| *ok), "every append succeeds");
    let order: Vec<u64> = done.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        order,
        (1..=appends).collect::<Vec<_>>(),
        "completions in order"
    );
}

fn assert_log(engine: &LogEngine, range: RangeId, first: u64, last: u64) {
    assert_eq!(engine.first_index(range), first, "{range} first index");
    assert_eq!(engine.last_index(range), last, "{range} last index");
    if last >= first {
        let read = engine.entries(range, first, last + 1, None).unwrap();
        assert_eq!(read, entries(range, first, last), "{range} entries");
    }
}

/// Where a conformance test keeps its files, and how it reopens them.
enum Store {
    Disk(tempfile::TempDir),
    Sim(SimFileSystem),
}

impl Store {
    fn fs(&self) -> Arc<dyn FileSystem> {
        match self {
            Store::Disk(dir) => Arc::new(DiskFileSystem::open(dir.path()).unwrap()),
            Store::Sim(fs) => Arc::new(fs.clone()),
        }
    }
}

/// Runs the conformance suite over one writer.
mod conformance {
    use super::*;

    pub fn store(kind: &str) -> Store {
        match kind {
            "sim" => Store::Sim(SimFileSystem::new()),
            _ => Store::Disk(tempfile::tempdir().unwrap()),
        }
    }

    pub fn open(store: &Store, config: LogConfig) -> LogEngine {
        let engine = LogEngine::open(store.fs(), config).unwrap();
        if let Ok(expected) = std::env::var("RANGEKV_EXPECT_LOG_IO") {
            assert_eq!(engine.io_backend(), expected, "writer chosen by log.io");
        }
        engine
    }

    pub fn appends_survive_reopen(kind: &str, io: LogIo) {
        let store = store(kind);
        let (a, b) = (RangeId(1), RangeId(2));
        let hard_state = HardState {
            term: 3,
            vote: 2,
            commit: 9,
            ..Default::default()
        };
        {
            let engine = open(&store, small_config(io));
            append(&engine, a, 1, 10);
            let mut batch = LogBatch::new();
            batch.append(b, entries(b, 1, 5));
            batch.append(a, entries(a, 11, 12));
            batch.set_hard_state(a, hard_state.clone());
            engine.write_sync(batch).unwrap();
            assert_log(&engine, a, 1, 12);
            assert_log(&engine, b, 1, 5);
            assert_eq!(engine.term(a, 12).unwrap(), entry(a, 12).term);
            assert_eq!(engine.hard_state(a), hard_state);
        }
        let engine = open(&store, small_config(io));
        assert_log(&engine, a, 1, 12);
        assert_log(&engine, b, 1, 5);
        assert_eq!(engine.hard_state(a), hard_state);
        assert_eq!(engine.hard_state(b), HardState::default());
        assert_eq!(engine.ranges(), vec![a, b]);
    }

    /// Threads blocked in `write_sync` are woken together by the durable watermark;
    /// each must still learn its own outcome: a refused batch its error, in between
    /// others' successes, and a callback writer beside them its completions in order.
    pub fn sync_waiters_learn_their_own_outcome(kind: &str, io: LogIo) {
        let store = store(kind);
        let writers = 6u64;
        let appends = 80u64;
        {
            let engine = open(&store, small_config(io));
            std::thread::scope(|scope| {
                for w in 0..writers {
                    let engine = engine.clone();
                    scope.spawn(move || {
                        let range = RangeId(200 + w);
                        for index in 1..=appends {
                            append(&engine, range, index, index);
                            if w % 2 == 0 {
                                // A gap: refused, and nothing of it lands.
                                let mut gap = LogBatch::new();
                                gap.append(range, entries(range, index + 2, index + 2));
                                let refused = engine.write_sync(gap);
                                assert!(
                                    matches!(refused, Err(LogError::Invalid { .. })),
                                    "{range} gap at {index}: {refused:?}"
                                );
                            }
                        }
                    });
                }
                let engine = engine.clone();
                scope.spawn(move || append_with_callbacks(&engine, RangeId(300), appends));
            });
        }
        let engine = open(&store, small_config(io));
        for w in 0..writers {
            assert_log(&engine, RangeId(200 + w), 1, appends);
        }
        assert_log(&engine, RangeId(300), 1, appends);
    }

    pub fn concurrent_writers_all_complete(kind: &str, io: LogIo) {
        let store = store(kind);
        let writers = 8u64;
        // Writers stop at different times: the last ones write alone.
        let appends_of = |w: u64| 60 + 40 * w;
        {
            let engine = open(&store, small_config(io));
            std::thread::scope(|scope| {
                for w in 0..writers {
                    let engine = engine.clone();
                    scope.spawn(move || {
                        append_with_callbacks(&engine, RangeId(100 + w), appends_of(w))
                    });
                }
            });
            let stats = engine.stats();
            assert_eq!(stats.requests, (0..writers).map(appends_of).sum::<u64>());
            assert!(stats.groups <= stats.requests && stats.syncs >= stats.groups);
        }
        let engine = open(&store, small_config(io));
        for w in 0..writers {
            assert_log(&engine, RangeId(100 + w), 1, appends_of(w));
        }
        assert!(engine.segment_count() > 1, "64 KiB segments rotated");
    }

    /// Regression: a writer that had batched a larger group must still wake for a lone
    /// producer once the others are gone (a raised wake-up threshold once stranded it).
    pub fn lone_writer_after_a_crowd(kind: &str, io: LogIo) {
        let store = store(kind);
        let engine = open(&store, small_config(io));
        std::thread::scope(|scope| {
            for w in 0..2u64 {
                let engine = engine.clone();
                scope.spawn(move || {
                    let range = RangeId(1 + w);
                    let appends = if w == 0 { 5 } else { 2000 };
                    for index in 1..=appends {
                        let mut batch = LogBatch::new();
                        batch.append(range, vec![entry(range, index)]);
                        engine.write_sync(batch).unwrap();
                    }
                });
            }
        });
        assert_eq!(engine.last_index(RangeId(2)), 2000);
    }

    pub fn conflicting_append_truncates(kind: &str, io: LogIo) {
        let store = store(kind);
        let range = RangeId(7);
        let mut replacement = entry(range, 5);
        replacement.term = 99;
        replacement.data = b"new leader".to_vec().into();
        {
            let engine = open(&store, small_config(io));
            append(&engine, range, 1, 10);
            let mut batch = LogBatch::new();
            batch.append(range, vec![replacement.clone()]);
            engine.write_sync(batch).unwrap();
            assert_eq!(engine.last_index(range), 5);
        }
        let engine = open(&store, small_config(io));
        assert_eq!(engine.last_index(range), 5);
        assert_eq!(engine.term(range, 5).unwrap(), 99);
        assert_eq!(
            engine.entries(range, 4, 6, None).unwrap(),
            vec![entry(range, 4), replacement]
        );
    }

    pub fn bad_batches_are_refused_whole(kind: &str, io: LogIo) {
        let store = store(kind);
        let engine = open(&store, small_config(io));
        let range = RangeId(3);
        append(&engine, range, 1, 3);
        let mut gap = LogBatch::new();
        gap.append(RangeId(9), entries(RangeId(9), 1, 1));
        gap.append(range, entries(range, 8, 9));
        assert!(matches!(
            engine.write_sync(gap),
            Err(LogError::Invalid { .. })
        ));
        assert_eq!(
            engine.last_index(RangeId(9)),
            0,
            "nothing of a refused batch lands"
        );
        let mut huge = LogBatch::new();
        huge.append(
            range,
            vec![{
                let mut e = entry(range, 4);
                e.data = vec![0u8; 128 * 1024].into();
                e
            }],
        );
        assert!(matches!(
            engine.write_sync(huge),
            Err(LogError::TooLarge { .. })
        ));
        append(&engine, range, 4, 5);
        assert_log(&engine, range, 1, 5);
    }

    pub fn compaction_and_gc_free_segments(kind: &str, io: LogIo) {
        const ROUNDS: u64 = 200;
        let store = store(kind);
        let (hot, cold) = (RangeId(1), RangeId(2));
        let config = LogConfig {
            rewrite_threshold_bytes: 4 * 64 * 1024,
            ..small_config(io)
        };
        {
            let engine = open(&store, config.clone());
            append(&engine, cold, 1, 3);
            let mut next = 1;
            for _ in 0..ROUNDS {
                append(&engine, hot, next, next + 9);
                next += 10;
                engine.compact(hot, next - 5).unwrap();
            }
            assert_eq!(engine.first_index(hot), next - 5);
            assert!(matches!(
                engine.entries(hot, 1, 2, None),
                Err(ReadError::Compacted)
            ));
            // The cold range pinned the first segment; rotations past the threshold
            // rewrote it forward, so old segments went away.
            assert!(
                engine.segment_count() <= 6,
                "{} segments",
                engine.segment_count()
            );
            assert_log(&engine, cold, 1, 3);
            assert!(engine.stats().ranges_rewritten > 0);
            engine.compact(hot, next).unwrap();
            assert_log(&engine, hot, next, next - 1);
        }
        let engine = open(&store, config);
        assert_log(&engine, cold, 1, 3);
        let next = ROUNDS * 10 + 1;
        assert_eq!(engine.first_index(hot), next);
        assert_eq!(
            engine.term(hot, next - 1).unwrap(),
            entry(hot, next - 1).term
        );
    }

    /// Deleted segments are reused: every segment but the newest then holds, past its
    /// end mark, the records of its earlier life (signed for another sequence), and
    /// the newest may end in them. Replay must take neither for records, at every
    /// reopen, and the files on disk stay the live ones plus the kept ones.
    pub fn reused_segments_replay_cleanly(kind: &str, io: LogIo) {
        let store = store(kind);
        let fs = store.fs();
        let ranges = [RangeId(1), RangeId(2), RangeId(3)];
        // Written once a pass: its hard state keeps the segment it lands in (reused,
        // once reuse has begun) from being deleted, so that segment is an older one
        // at the next open, read to its end mark.
        let pin = RangeId(9);
        let config = LogConfig {
            recycle_segments: 2,
            ..small_config(io)
        };
        let mut next: HashMap<RangeId, u64> = ranges.iter().map(|r| (*r, 1)).collect();
        let mut reused = 0;
        for pass in 0..4u64 {
            let engine = open(&store, config.clone());
            assert_eq!(engine.hard_state(pin).term, pass, "the pinned hard state");
            for round in 0..300u64 {
                if round == 150 {
                    let mut batch = LogBatch::new();
                    let hard_state = HardState {
                        term: pass + 1,
                        ..Default::default()
                    };
                    batch.set_hard_state(pin, hard_state);
                    engine.write_sync(batch).unwrap();
                }
                let range = ranges[(round % 3) as usize];
                let from = next[&range];
                append(&engine, range, from, from + 3);
                next.insert(range, from + 4);
                engine.compact(range, from).unwrap();
                let free = engine.free_segment_count();
                assert!(free <= 2, "{free} segments kept, at most 2 configured");
                // A few live segments and the kept ones (GC runs on the writer after
                // the compaction is acknowledged, so exact counts would race).
                let files = fs.list().unwrap();
                let files = files.iter().filter(|n| !n.ends_with(".tmp")).count();
                assert!(
                    files <= 8,
                    "{files} files: segments are neither reused nor deleted"
                );
            }
            // Reused files: segments whose bytes past the end mark are not zeros.
            for name in fs.list().unwrap() {
                if !name.ends_with(".rlog") {
                    continue;
                }
                let file = fs.open(&name).unwrap();
                let mut bytes = vec![0u8; file.len().unwrap() as usize];
                file.read_exact_at(&mut bytes, 0).unwrap();
                let header = crate::format::decode_segment_header(&bytes).unwrap();
                let mut at = crate::format::SEGMENT_HEADER_BYTES as usize;
                while let crate::format::Parsed::Record(_, after) =
                    crate::format::parse_record(&bytes, at, usize::MAX, header.signature())
                {
                    at = after;
                }
                let tail = at + crate::format::RECORD_HEADER_BYTES;
                if tail < bytes.len() && bytes[tail..].iter().any(|&b| b != 0) {
                    reused += 1;
                }
            }
            for range in ranges {
                let last = next[&range] - 1;
                assert_log(&engine, range, last - 3, last);
            }
        }
        assert!(reused > 0, "no segment was ever reused");
        let engine = open(&store, config.clone());
        for range in ranges {
            let last = next[&range] - 1;
            assert_log(&engine, range, last - 3, last);
        }
        // Write until a segment waits for reuse (the pin no longer holding any back).
        let mut batch = LogBatch::new();
        batch.remove_range(pin);
        engine.write_sync(batch).unwrap();
        for round in 0.. {
            if engine.free_segment_count() > 0 {
                break;
            }
            assert!(round < 10_000, "no segment is ever kept");
            let range = ranges[round % 3];
            let from = next[&range];
            append(&engine, range, from, from + 3);
            next.insert(range, from + 4);
            engine.compact(range, from).unwrap();
            engine.collect_garbage();
        }
        drop(engine);
        // Turned off, the kept segments are deleted at the next open.
        let config = LogConfig {
            recycle_segments: 0,
            ..config
        };
        let engine = open(&store, config);
        assert_eq!(engine.free_segment_count(), 0);
        assert!(fs.list().unwrap().iter().all(|n| n.ends_with(".rlog")));
    }

    /// Past the rewrite threshold, only cold ranges move forward: ranges still writing
    /// release the oldest segment with their own compaction, and copying their whole
    /// live log at every rotation would stall every writer.
    pub fn only_cold_ranges_are_rewritten(kind: &str, io: LogIo) {
        const KEEP: u64 = 600;
        let store = store(kind);
        let config = LogConfig {
            rewrite_threshold_bytes: 3 * 64 * 1024,
            ..small_config(io)
        };
        let engine = open(&store, config);
        let hot = [RangeId(1), RangeId(2)];
        let cold = RangeId(3);
        let mut next = 1;
        // The busy ranges keep KEEP entries live (~100 KiB each), over the threshold;
        // the third keeps a few.
        for _ in 0..300 {
            for range in hot.iter().chain([&cold]) {
                append(&engine, *range, next, next + 4);
                let keep = if *range == cold { 10 } else { KEEP };
                if next > keep {
                    engine.compact(*range, next - keep).unwrap();
                }
            }
            next += 5;
        }
        assert!(
            engine.segment_count() > 3,
            "{} segments",
            engine.segment_count()
        );
        assert_eq!(
            engine.stats().ranges_rewritten,
            0,
            "busy ranges were rewritten"
        );
        // The third range goes quiet; the others go on, and it moves forward.
        let cold_first = next - 5 - 10;
        let cold_last = next - 1;
        for _ in 0..300 {
            for range in hot {
                append(&engine, range, next, next + 4);
                engine.compact(range, next - KEEP).unwrap();
            }
            next += 5;
        }
        assert!(
            engine.stats().ranges_rewritten > 0,
            "the quiet range stayed"
        );
        assert_log(&engine, cold, cold_first, cold_last);
        for range in hot {
            assert_log(&engine, range, next - 5 - KEEP, next - 1);
        }
    }

    pub fn removal_and_restart_points(kind: &str, io: LogIo) {
        let store = store(kind);
        {
            let engine = open(&store, small_config(io));
            append(&engine, RangeId(1), 1, 4);
            append(&engine, RangeId(2), 1, 4);
            append(&engine, RangeId(4), 1, 8);
            let mut batch = LogBatch::new();
            batch.set_hard_state(RangeId(4), hard_state(2, 2, 8));
            engine.write_sync(batch).unwrap();
            let mut batch = LogBatch::new();
            batch.remove_range(RangeId(1));
            // A snapshot (or a bootstrap) restarts range 3's log after index 5.
            batch.compact_to(RangeId(3), 5, 5);
            // A snapshot installed at 6 over a log holding 1..=8: every entry goes
            // (7 and 8 too), the hard state is the reset's.
            batch.reset(RangeId(4), 6, 6, hard_state(7, 3, 6));
            engine.write_sync(batch).unwrap();
            let reset_holds = |engine: &LogEngine| {
                assert_eq!(engine.first_index(RangeId(4)), 7);
                assert_eq!(engine.last_index(RangeId(4)), 6);
                assert_eq!(engine.term(RangeId(4), 6).unwrap(), 6);
                assert_eq!(engine.hard_state(RangeId(4)), hard_state(7, 3, 6));
            };
            reset_holds(&engine);
            assert_eq!(engine.ranges(), vec![RangeId(2), RangeId(3), RangeId(4)]);
            append(&engine, RangeId(3), 6, 7);
        }
        let engine = open(&store, small_config(io));
        assert_eq!(engine.ranges(), vec![RangeId(2), RangeId(3), RangeId(4)]);
        assert_eq!(engine.last_index(RangeId(1)), 0);
        assert_log(&engine, RangeId(3), 6, 7);
        assert_eq!(engine.term(RangeId(3), 5).unwrap(), 5);
        assert_eq!(engine.first_index(RangeId(4)), 7);
        assert_eq!(engine.last_index(RangeId(4)), 6);
        assert_eq!(engine.term(RangeId(4), 6).unwrap(), 6);
        assert_eq!(engine.hard_state(RangeId(4)), hard_state(7, 3, 6));
        append(&engine, RangeId(4), 7, 9);
        assert_log(&engine, RangeId(4), 7, 9);
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }

    pub fn reads_from_disk_once_evicted(kind: &str, io: LogIo) {
        let store = store(kind);
        let config = LogConfig {
            cache_bytes_max: 0,
            ..small_config(io)
        };
        let engine = open(&store, config);
        let range = RangeId(5);
        append(&engine, range, 1, 50);
        assert_log(&engine, range, 1, 50);
        let limited = engine.entries(range, 1, 51, Some(1)).unwrap();
        assert_eq!(limited.len(), 1, "max_size still returns one entry");
        let some = engine.entries(range, 1, 51, Some(2000)).unwrap();
        assert!(!some.is_empty() && some.len() < 50);
        assert_eq!(some, entries(range, 1, some.len() as u64));
    }

    /// `release_cache` drops a prefix of the cached entries (reads of them go to
    /// disk and return the same entries), later appends are cached after what is
    /// left, and the bytes released are taken off the cache's budget: with a budget
    /// that holds either of two appends but not both, the second append all stays
    /// cached once the first is released.
    pub fn released_entries_are_read_from_disk_and_free_the_budget(kind: &str, io: LogIo) {
        let store = store(kind);
        let range = RangeId(6);
        let bytes = |from: u64, to: u64| -> usize {
            (from..=to)
                .map(|i| crate::index::cached_bytes(&entry(range, i)))
                .sum()
        };
        // Either append fits alone; both together do not.
        let budget = bytes(1, 20).max(bytes(21, 40));
        let engine = open(
            &store,
            LogConfig {
                cache_bytes_max: budget,
                ..small_config(io)
            },
        );
        let cached = |engine: &LogEngine| {
            engine
                .shared()
                .range(range)
                .map_or(0, |log| log.lock().unwrap().cached_entries())
        };
        append(&engine, range, 1, 20);
        assert_eq!(cached(&engine), 20);
        engine.release_cache(range, 12);
        assert_eq!(cached(&engine), 8, "13..=20 left");
        assert_log(&engine, range, 1, 20);
        engine.release_cache(range, 20);
        assert_eq!(cached(&engine), 0);
        append(&engine, range, 21, 40);
        assert_eq!(cached(&engine), 20, "the released bytes left the budget");
        assert_log(&engine, range, 1, 40);
        engine.release_cache(range, u64::MAX);
        append(&engine, range, 41, 42);
        assert_eq!(cached(&engine), 2);
        assert_log(&engine, range, 1, 42);
    }

    /// What a replica's storage reads after a compaction: the first index moves, the
    /// compaction point's term is still known, entries below it are gone.
    pub fn reads_after_compaction(kind: &str, io: LogIo) {
        let store = store(kind);
        let engine = open(&store, small_config(io));
        let range = RangeId(8);
        append(&engine, range, 1, 6);
        engine.compact(range, 3).unwrap();
        assert_eq!(engine.first_index(range), 3);
        assert_eq!(engine.last_index(range), 6);
        assert_eq!(engine.term(range, 2).unwrap(), entry(range, 2).term);
        assert!(engine.term(range, 1).is_err());
        assert_eq!(
            engine.entries(range, 3, 7, None).unwrap(),
            entries(range, 3, 6)
        );
        assert!(engine.entries(range, 1, 7, None).is_err());
    }

    macro_rules! suite {
        ($module:ident, $kind:literal, $io:expr) => {
            mod $module {
                #[test]
                fn appends_survive_reopen() {
                    super::appends_survive_reopen($kind, $io);
                }
                #[test]
                fn concurrent_writers_all_complete() {
                    super::concurrent_writers_all_complete($kind, $io);
                }
                #[test]
                fn sync_waiters_learn_their_own_outcome() {
                    super::sync_waiters_learn_their_own_outcome($kind, $io);
                }
                #[test]
                fn lone_writer_after_a_crowd() {
                    super::lone_writer_after_a_crowd($kind, $io);
                }
                #[test]
                fn conflicting_append_truncates() {
                    super::conflicting_append_truncates($kind, $io);
                }
                #[test]
                fn bad_batches_are_refused_whole() {
                    super::bad_batches_are_refused_whole($kind, $io);
                }
                #[test]
                fn compaction_and_gc_free_segments() {
                    super::compaction_and_gc_free_segments($kind, $io);
                }
                #[test]
                fn reused_segments_replay_cleanly() {
                    super::reused_segments_replay_cleanly($kind, $io);
                }
                #[test]
                fn only_cold_ranges_are_rewritten() {
                    super::only_cold_ranges_are_rewritten($kind, $io);
                }
                #[test]
                fn removal_and_restart_points() {
                    super::removal_and_restart_points($kind, $io);
                }
                #[test]
                fn reads_from_disk_once_evicted() {
                    super::reads_from_disk_once_evicted($kind, $io);
                }
                #[test]
                fn released_entries_are_read_from_disk_and_free_the_budget() {
                    super::released_entries_are_read_from_disk_and_free_the_budget($kind, $io);
                }
                #[test]
                fn reads_after_compaction() {
                    super::reads_after_compaction($kind, $io);
                }
            }
        };
    }

    suite!(uring, "disk", crate::LogIo::Uring);
    suite!(sync, "disk", crate::LogIo::Sync);
    suite!(auto, "disk", crate::LogIo::Auto);
    suite!(sim, "sim", crate::LogIo::Auto);
}

#[test]
fn auto_picks_io_uring_where_it_works() {
    if std::env::var("RANGEKV_EXPECT_LOG_IO").is_ok() {
        return; // Running inside the seccomp test: covered there.
    }
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(DiskFileSystem::open(dir.path()).unwrap());
    let engine = LogEngine::open(fs, small_config(LogIo::Auto)).unwrap();
    assert_eq!(engine.io_backend(), "io_uring");
}

/// With `auto` or `sync`, a blocking caller writes and syncs its own group on its own
/// thread (caller-runs), and with `auto` on io_uring a lone group of callbacks is
/// written on the writer thread; with `uring`, every group goes through the ring.
/// Either way every append is read back after reopen. Fails if a path never runs (it
/// then has no test but the conformance suite) or if `uring` stops meaning the ring
/// for every group.
#[test]
fn blocking_callers_write_their_own_groups_and_uring_sends_all_through_the_ring() {
    if std::env::var("RANGEKV_EXPECT_LOG_IO").is_ok() {
        return; // No io_uring inside the seccomp test.
    }
    let range = RangeId(7);
    for io in [LogIo::Auto, LogIo::Sync, LogIo::Uring] {
        let dir = tempfile::tempdir().unwrap();
        let fs = || -> Arc<dyn FileSystem> { Arc::new(DiskFileSystem::open(dir.path()).unwrap()) };
        let appends = 200;
        {
            let engine = LogEngine::open(fs(), small_config(io)).unwrap();
            // Two blocking callers at once: their groups may overlap.
            std::thread::scope(|scope| {
                let engine = &engine;
                scope.spawn(move || {
                    for index in 1..=appends {
                        append(engine, range, index, index);
                    }
                });
                scope.spawn(move || {
                    for index in 1..=appends {
                        append(engine, RangeId(9), index, index);
                    }
                });
            });
            let blocking = engine.stats();
            // Callbacks one at a time: the writer thread's groups, lone when it slept
            // before the next request came. (The first up to 64 lone ones may go
            // through the ring: `LonePolicy`, if the blocking callers overlapped an
            // inline write of the writer's.)
            append_with_callbacks_one_by_one(&engine, RangeId(10), 200);
            // A burst of callbacks: groups overlap, so the ring carries some.
            append_with_callbacks(&engine, RangeId(8), 200);
            let stats = engine.stats();
            match io {
                LogIo::Uring => {
                    assert_eq!(stats.caller_groups, 0, "uring: no caller writes");
                    assert_eq!(
                        stats.inline_groups, 0,
                        "uring: every group through the ring"
                    );
                }
                _ => {
                    // The writer thread forms a blocking caller's group only to start
                    // a new segment (at most one per rotation of these 64 KiB ones).
                    assert!(
                        blocking.caller_groups * 2 > blocking.groups,
                        "{io:?}: blocking callers write their own groups: {blocking:?}"
                    );
                    if io == LogIo::Auto {
                        assert!(stats.inline_groups > 0, "auto: a lone group inline");
                        assert!(
                            stats.inline_groups + stats.caller_groups < stats.groups,
                            "auto: overlapping groups through the ring: {stats:?}"
                        );
                    }
                }
            }
        }
        let engine = LogEngine::open(fs(), small_config(io)).unwrap();
        for range in [range, RangeId(9)] {
            let read = engine.entries(range, 1, appends + 1, None).unwrap();
            assert_eq!(
                read,
                entries(range, 1, appends),
                "{io:?}: every acknowledged append is there"
            );
        }
        assert_log(&engine, RangeId(8), 1, 200);
        assert_log(&engine, RangeId(10), 1, 200);
    }
}

/// Runs the `auto` conformance suite in a child under a seccomp filter that denies
/// the io_uring syscalls with EPERM, as Docker's default profile does: the engine must
/// fall back to pwrite + fdatasync and pass the same suite.
#[test]
fn falls_back_when_seccomp_denies_io_uring() {
    if std::env::var("RANGEKV_EXPECT_LOG_IO").is_ok() {
        return;
    }
    let script = r#"
import errno, os, sys, seccomp
f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
    f.add_rule(seccomp.ERRNO(errno.EPERM), name)
f.load()
os.execv(sys.argv[1], sys.argv[1:])
"#;
    let exe = std::env::current_exe().unwrap();
    // Debian's interpreter: python3-seccomp installs there, whatever else is on PATH.
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(&exe)
        .args(["tests::conformance::auto::", "--test-threads=2"])
        .env("RANGEKV_EXPECT_LOG_IO", "sync")
        .output()
        .expect("python3 runs (the Makefile installs python3-seccomp)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "suite under seccomp failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("test result: ok. 13 passed"),
        "the whole auto suite ran: {stdout}"
    );
    // And io_uring really is denied there.
    let denied = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(&exe)
        .args(["tests::uring_is_denied_probe", "--exact"])
        .env("RANGEKV_EXPECT_LOG_IO", "sync")
        .env("RANGEKV_PROBE_URING_DENIED", "1")
        .output()
        .unwrap();
    assert!(
        denied.status.success() && String::from_utf8_lossy(&denied.stdout).contains("1 passed"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
}

/// The `log::sync` failpoint (what the process nemesis uses to make a node's fsync
/// fail) fails a group's sync with EIO and stops the engine, on both writers. Armed
/// in a child process: failpoints are global to a process.
#[test]
fn the_sync_failpoint_stops_the_engine() {
    for io in ["uring", "sync"] {
        let exe = std::env::current_exe().unwrap();
        let out = Command::new(&exe)
            .args(["tests::sync_failpoint_probe", "--exact", "--nocapture"])
            .env("RANGEKV_FAILPOINT_PROBE", io)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{io}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Helper of `the_sync_failpoint_stops_the_engine`.
#[test]
fn sync_failpoint_probe() {
    let Ok(io) = std::env::var("RANGEKV_FAILPOINT_PROBE") else {
        return;
    };
    let io: LogIo = io.parse().unwrap();
    crate::configure_failpoints("log::sync=2").unwrap();
    assert!(crate::configure_failpoints("log::fsync=2").is_err());
    assert!(crate::configure_failpoints("log::sync=many").is_err());
    let dir = tempfile::tempdir().unwrap();
    let fs = || -> Arc<dyn FileSystem> { Arc::new(DiskFileSystem::open(dir.path()).unwrap()) };
    let config = LogConfig {
        pipeline_depth: 1,
        ..small_config(io)
    };
    {
        let engine = LogEngine::open(fs(), config.clone()).unwrap();
        let range = RangeId(1);
        append(&engine, range, 1, 1);
        append(&engine, range, 2, 2);
        let mut batch = LogBatch::new();
        batch.append(range, entries(range, 3, 3));
        let failed = engine.write_sync(batch);
        assert!(
            matches!(&failed, Err(LogError::Io { .. })),
            "the third sync fails: {failed:?}"
        );
        let mut batch = LogBatch::new();
        batch.append(range, entries(range, 3, 3));
        let after = engine.write_sync(batch);
        assert!(
            matches!(&after, Err(LogError::Stopped(_))),
            "and the engine has stopped: {after:?}"
        );
        assert!(engine.failure().is_some());
    }
    crate::configure_failpoints("log::sync=off").unwrap();
    let engine = LogEngine::open(fs(), config).unwrap();
    assert!(
        engine.last_index(RangeId(1)) >= 2,
        "acknowledged appends survive"
    );
    assert_eq!(
        engine.entries(RangeId(1), 1, 3, None).unwrap(),
        entries(RangeId(1), 1, 2)
    );
}

/// Helper of the seccomp test: inside the filter, `log.io = uring` must be refused.
#[test]
fn uring_is_denied_probe() {
    if std::env::var("RANGEKV_PROBE_URING_DENIED").is_err() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(DiskFileSystem::open(dir.path()).unwrap());
    let refused = LogEngine::open(fs, small_config(LogIo::Uring));
    assert!(matches!(refused, Err(LogError::UringUnavailable(_))));
}

// ------------------------------------------------------------------ crash points

/// Crash points in `make test`; `RANGEKV_CRASH_POINTS` raises it for long local runs.
fn crash_points() -> u64 {
    std::env::var("RANGEKV_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

#[derive(Default)]
struct Acked {
    /// Highest index acknowledged per range.
    last: HashMap<RangeId, u64>,
    /// Highest compaction point acknowledged per range.
    truncated: HashMap<RangeId, u64>,
    commit: HashMap<RangeId, u64>,
}

/// Records what an acknowledged batch promised.
fn record_acked(acked: &Mutex<Acked>, effects: Vec<(RangeId, &'static str, u64)>) {
    let mut acked = acked.lock().unwrap();
    for (range, what, value) in effects {
        let slot = match what {
            "last" => acked.last.entry(range),
            "commit" => acked.commit.entry(range),
            _ => acked.truncated.entry(range),
        };
        let slot = slot.or_default();
        *slot = (*slot).max(value);
    }
}

/// Returns how many segments the run started in a reused file.
fn run_crash_point(seed: u64) -> u64 {
    let mut rng = SimRng::new(seed);
    let fs = SimFileSystem::new();
    let config = LogConfig {
        segment_bytes: 8 * 1024 + rng.below(8 * 1024),
        group_bytes_max: 2 * 1024,
        rewrite_threshold_bytes: 4 * 16 * 1024,
        cache_bytes_max: rng.below(2) as usize * 4096,
        ..LogConfig::default()
    };
    // Earlier history, written cleanly: the crash must not damage it.
    let ranges: Vec<RangeId> = (1..=3).map(RangeId).collect();
    let mut next: HashMap<RangeId, u64> = ranges.iter().map(|r| (*r, 1)).collect();
    let mut truncated: HashMap<RangeId, u64> = HashMap::new();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut reused = 0;
    if seed % 2 == 1 {
        // Every range moves on and compacts, so segments are deleted and kept for
        // reuse: the run below then writes into files holding this history's records.
        let engine = LogEngine::open(Arc::new(fs.clone()), config.clone()).unwrap();
        let mut acked = acked.lock().unwrap();
        for _ in 0..20 + rng.below(40) {
            let mut batch = LogBatch::new();
            for range in &ranges {
                let from = next[range];
                let to = from + rng.below(3);
                batch.append(*range, entries(*range, from, to));
                next.insert(*range, to + 1);
                if to > 3 {
                    batch.compact_to(*range, to - 3, entry(*range, to - 3).term);
                    truncated.insert(*range, to - 3);
                    acked.truncated.insert(*range, to - 3);
                }
                acked.last.insert(*range, to);
            }
            engine.write_sync(batch).unwrap();
        }
    }
    fs.crash_after(1 + rng.below(60));
    // None: crashed while creating the first segment.
    let engine = LogEngine::open(Arc::new(fs.clone()), config.clone()).ok();
    if let Some(engine) = &engine {
        let batches = 30;
        // One batch of some of `mine`, and what acknowledging it promises.
        let mut next_batch = |mine: &[RangeId]| {
            let mut batch = LogBatch::new();
            let mut effects = Vec::new();
            for range in mine {
                if rng.below(2) == 0 {
                    continue;
                }
                let from = next[range];
                let to = from + rng.below(4);
                batch.append(*range, entries(*range, from, to));
                next.insert(*range, to + 1);
                effects.push((*range, "last", to));
                if rng.below(3) == 0 {
                    let hs = HardState {
                        term: entry(*range, to).term,
                        commit: to,
                        ..Default::default()
                    };
                    batch.set_hard_state(*range, hs);
                    effects.push((*range, "commit", to));
                }
                if rng.below(5) == 0 && to > 3 {
                    let point = to - 3;
                    if point > truncated.get(range).copied().unwrap_or(0) {
                        batch.compact_to(*range, point, entry(*range, point).term);
                        truncated.insert(*range, point);
                        effects.push((*range, "truncated", point));
                    }
                }
            }
            (batch, effects)
        };
        if seed % 3 == 2 {
            // Blocking callers on two threads, each writing and syncing its own
            // groups (caller-runs): their syncs overlap, and an acknowledgement must
            // still mean that every group before it is durable too.
            let owned = [vec![ranges[0], ranges[1]], vec![ranges[2]]];
            let plans: Vec<Vec<_>> = owned
                .iter()
                .map(|mine| (0..batches / 2).map(|_| next_batch(mine)).collect())
                .collect();
            std::thread::scope(|scope| {
                for plan in plans {
                    let acked = &acked;
                    scope.spawn(move || {
                        for (batch, effects) in plan {
                            if engine.write_sync(batch).is_err() {
                                break; // The crash stopped the engine.
                            }
                            record_acked(acked, effects);
                        }
                    });
                }
            });
        } else {
            let (sender, receiver) = mpsc::channel();
            for _ in 0..batches {
                let (batch, effects) = next_batch(&ranges);
                let acked = acked.clone();
                let sender = sender.clone();
                engine.write(batch, move |result| {
                    if result.is_ok() {
                        record_acked(&acked, effects);
                    }
                    sender.send(()).unwrap();
                });
            }
            for _ in 0..batches {
                // A lost completion is a bug; fail instead of hanging the suite.
                receiver
                    .recv_timeout(std::time::Duration::from_secs(60))
                    .unwrap_or_else(|_| panic!("seed {seed}: a completion never came"));
            }
        }
        reused += engine.stats().segments_reused;
    }
    fs.crash();
    drop(engine);
    let image = fs.recover(&mut rng);
    let engine = LogEngine::open(Arc::new(image.clone()), config.clone())
        .unwrap_or_else(|e| panic!("seed {seed}: recovery failed: {e}"));
    let acked = acked.lock().unwrap();
    for range in &ranges {
        let last = engine.last_index(*range);
        let first = engine.first_index(*range);
        let acked_last = acked.last.get(range).copied().unwrap_or(0);
        let acked_truncated = acked.truncated.get(range).copied().unwrap_or(0);
        assert!(
            last >= acked_last,
            "seed {seed}: {range} lost acknowledged entries: last {last} < {acked_last}"
        );
        assert!(
            first > acked_truncated || last < first,
            "seed {seed}: {range} compaction lost: first {first}"
        );
        assert!(
            last < next[range],
            "seed {seed}: {range} has entries never written"
        );
        if last >= first {
            let read = engine
                .entries(*range, first, last + 1, None)
                .unwrap_or_else(|e| panic!("seed {seed}: {range} read failed: {e}"));
            assert_eq!(
                read,
                entries(*range, first, last),
                "seed {seed}: {range} content"
            );
        }
        let commit = engine.hard_state(*range).commit;
        assert!(
            commit >= acked.commit.get(range).copied().unwrap_or(0),
            "seed {seed}: {range} hard state lost"
        );
    }
    // The recovered log takes new writes and replays again.
    let range = ranges[0];
    let from = engine.last_index(range) + 1;
    append(&engine, range, from, from + 2);
    drop(engine);
    let engine = LogEngine::open(Arc::new(image), config).unwrap();
    assert_eq!(engine.last_index(range), from + 2, "seed {seed}");
    reused
}

#[test]
fn every_crash_point_keeps_what_was_acknowledged() {
    let mut reused = 0;
    for seed in 0..crash_points() {
        reused += run_crash_point(seed);
    }
    // Crashes in and after reused segments (their earlier records behind the new
    // ones) are among the points: counted in the runs that crash only.
    assert!(reused >= crash_points() / 4, "{reused} segments reused");
}

// ------------------------------------------------------------------ corruption

#[test]
fn corruption_before_the_tail_refuses_to_open_naming_file_and_offset() {
    let fs = SimFileSystem::new();
    let config = small_config(LogIo::Auto);
    {
        let engine = LogEngine::open(Arc::new(fs.clone()), config.clone()).unwrap();
        for index in 1..=1000 {
            append(&engine, RangeId(1), index, index);
        }
        assert!(engine.segment_count() > 2);
    }
    // Flip a byte inside the first record of the first segment.
    let first = crate::engine::segment_name(1);
    fs.corrupt(&first, 40);
    let error = LogEngine::open(Arc::new(fs.clone()), config)
        .err()
        .expect("a corrupt record before the tail must stop the open");
    let message = error.to_string();
    assert!(
        message.contains(&first) && message.contains("offset 24"),
        "{message}"
    );
}

#[test]
fn torn_tail_of_the_last_segment_is_cut_not_fatal() {
    let fs = SimFileSystem::new();
    let config = small_config(LogIo::Auto);
    let first_record_bytes = {
        let engine = LogEngine::open(Arc::new(fs.clone()), config.clone()).unwrap();
        append(&engine, RangeId(1), 1, 1);
        let first = engine.stats().bytes;
        append(&engine, RangeId(1), 2, 2);
        first
    };
    // Segment 1 is the newest: tear its second (last) record.
    let torn_at = crate::format::SEGMENT_HEADER_BYTES + first_record_bytes + 12;
    fs.corrupt(&crate::engine::segment_name(1), torn_at as usize);
    {
        let engine = LogEngine::open(Arc::new(fs.clone()), config.clone()).unwrap();
        assert_log(&engine, RangeId(1), 1, 1);
        append(&engine, RangeId(1), 2, 3);
    }
    // Segment 1, cut at its tail, is no longer the newest and replays cleanly.
    let engine = LogEngine::open(Arc::new(fs), config).unwrap();
    assert_log(&engine, RangeId(1), 1, 3);
}

/// Past `prepare_after` bytes the next segment is filled in the background, and the
/// writer leaves the unfilled first segment for it as soon as it is ready, long before
/// the first one is full; everything stays readable across the move and a reopen.
#[test]
fn a_busy_log_moves_to_a_filled_segment_before_the_first_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 64 << 20,
        fill_segments: true,
        ..LogConfig::default()
    };
    let fs = || -> Arc<dyn FileSystem> { Arc::new(DiskFileSystem::open(dir.path()).unwrap()) };
    let segments = || {
        let mut names: Vec<String> = fs()
            .list()
            .unwrap()
            .into_iter()
            .filter(|n| n.ends_with(".rlog"))
            .collect();
        names.sort();
        names
    };
    let engine = LogEngine::open(fs(), config.clone()).unwrap();
    assert_eq!(segments().len(), 1);
    let range = RangeId(1);
    let (mut last, mut written) = (0, 0u64);
    while segments().len() == 1 {
        assert!(
            written < config.segment_bytes,
            "still in the first segment after {written} bytes"
        );
        let batch = entries(range, last + 1, last + 2000);
        written += batch.iter().map(|e| e.data.len() as u64 + 17).sum::<u64>();
        append(&engine, range, last + 1, last + 2000);
        last += 2000;
    }
    assert!(
        written >= 8 << 20,
        "moved before the threshold: {written} bytes"
    );
    drop(engine);
    let engine = LogEngine::open(fs(), config).unwrap();
    assert_log(&engine, range, 1, last);
}

/// A reader that took a segment file before GC found it dead still reads what it
/// took: GC deletes such a file (the reader keeps its bytes) instead of keeping it for
/// reuse, where new records would overwrite them.
#[test]
fn a_segment_a_reader_holds_is_deleted_not_reused() {
    let fs = SimFileSystem::new();
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        cache_bytes_max: 0,
        recycle_segments: 2,
        ..LogConfig::default()
    };
    let engine = LogEngine::open(Arc::new(fs), config).unwrap();
    let range = RangeId(1);
    append(&engine, range, 1, 10);
    let held = {
        let shared = engine.shared();
        let log = shared.range(range).unwrap();
        let log = log.lock().unwrap();
        shared.resolve(log.fetch(1, 11, u64::MAX))
    };
    // Move on, compacting, until segments are being reused.
    let mut next = 11;
    while engine.stats().segments_reused < 3 {
        assert!(next < 100_000, "segments are never reused");
        append(&engine, range, next, next + 9);
        engine.compact(range, next).unwrap();
        next += 10;
    }
    let read = engine.shared().read_resolved(held).unwrap();
    assert_eq!(read, entries(range, 1, 10));
}

/// A log written in format version 1 (records not signed) opens and reads, and its
/// segments are deleted once compacted, never kept for reuse: in a reused file its
/// records would read as valid.
#[test]
fn a_version_1_log_opens_and_is_never_reused() {
    let fs = SimFileSystem::new();
    let range = RangeId(1);
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        ..LogConfig::default()
    };
    let file = fs
        .create("0000000000000001.rlog", config.segment_bytes)
        .unwrap();
    let mut bytes = crate::format::encode_segment_header_version(1, 1).to_vec();
    crate::format::encode_entries(&mut bytes, range, &entries(range, 1, 20));
    file.write_all_at(&bytes, 0).unwrap();
    file.sync_data().unwrap();
    let engine = LogEngine::open(Arc::new(fs.clone()), config.clone()).unwrap();
    assert_log(&engine, range, 1, 20);
    append(&engine, range, 21, 25);
    engine.compact(range, 25).unwrap();
    engine.collect_garbage();
    assert_eq!(engine.segment_count(), 1, "the version 1 segment is gone");
    assert_eq!(engine.free_segment_count(), 0, "and not kept");
    drop(engine);
    let engine = LogEngine::open(Arc::new(fs), config).unwrap();
    assert_log(&engine, range, 25, 25);
}

#[test]
fn a_segment_left_half_prepared_is_deleted_at_open() {
    let fs = SimFileSystem::new();
    fs.create("0000000000000009.rlog.tmp", 4096).unwrap();
    let engine = LogEngine::open(Arc::new(fs.clone()), small_config(LogIo::Auto)).unwrap();
    append(&engine, RangeId(1), 1, 2);
    let names = fs.list().unwrap();
    assert!(
        !names.iter().any(|n| n.starts_with("0000000000000009")),
        "{names:?}"
    );
    assert_log(&engine, RangeId(1), 1, 2);
}

/// Found by the `log_replay` fuzz target (fuzz/regressions/log_replay/): a segment
/// numbered u64::MAX made open overflow `sequence + 1` (a panic in debug builds, a
/// wrapped segment 0 that replays before older ones in release).
#[test]
fn a_segment_number_past_the_largest_refuses_to_open() {
    use crate::format::{encode_segment_header, SEQUENCE_MAX};
    let mut valid = encode_segment_header(u64::MAX).to_vec();
    valid.extend_from_slice(&[0xff; 103]);
    for (name, bytes) in [
        // The fuzzer's input: a valid header, then garbage (a torn tail).
        ("ffffffffffffffff.rlog", valid),
        // Garbage from the start: removed as half-created, yet counted past.
        ("ffffffffffffffff.rlog", vec![0xff; 127]),
        (
            "4000000000000000.rlog",
            encode_segment_header(SEQUENCE_MAX + 1).to_vec(),
        ),
    ] {
        let fs = SimFileSystem::new();
        fs.create(name, 0).unwrap().write_all_at(&bytes, 0).unwrap();
        let error = LogEngine::open(Arc::new(fs), small_config(LogIo::Auto))
            .err()
            .expect("a segment number the writer cannot count past must stop the open");
        assert!(matches!(error, LogError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains(name), "{error}");
    }
    // The largest number accepted still opens, and the log goes on after it.
    let fs = SimFileSystem::new();
    let name = crate::engine::segment_name(SEQUENCE_MAX);
    fs.create(&name, 0)
        .unwrap()
        .write_all_at(&encode_segment_header(SEQUENCE_MAX), 0)
        .unwrap();
    let engine = LogEngine::open(Arc::new(fs), small_config(LogIo::Auto)).unwrap();
    append(&engine, RangeId(1), 1, 2);
    assert_log(&engine, RangeId(1), 1, 2);
}

#[test]
fn a_failed_sync_stops_the_engine_for_good() {
    let fs = SimFileSystem::new();
    let engine = LogEngine::open(Arc::new(fs.clone()), small_config(LogIo::Auto)).unwrap();
    let range = RangeId(1);
    append(&engine, range, 1, 1);
    fs.crash_after(2); // the group's write goes through, its sync fails
    let mut batch = LogBatch::new();
    batch.append(range, entries(range, 2, 2));
    let error = engine.write_sync(batch).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, LogError::Io { .. }), "{message}");
    assert!(
        message.contains("0000000000000001.rlog") && message.contains("offset"),
        "{message}"
    );
    assert_eq!(
        engine.last_index(range),
        1,
        "a failed group is never applied"
    );
    assert!(engine.failure().is_some());
    let mut batch = LogBatch::new();
    batch.append(range, entries(range, 2, 2));
    assert!(
        matches!(engine.write_sync(batch), Err(LogError::Stopped(_))),
        "nothing is retried after a failed sync"
    );
}

// ------------------------------------------------------------------ real process

fn kill_config() -> LogConfig {
    LogConfig {
        segment_bytes: 256 * 1024,
        ..LogConfig::default()
    }
}

/// Helper of the kill test: appends forever, printing each acknowledged index.
#[test]
fn kill_target_child() {
    let Ok(dir) = std::env::var("RANGEKV_KILL_CHILD_DIR") else {
        return;
    };
    let fs: Arc<dyn FileSystem> = Arc::new(DiskFileSystem::open(dir.as_ref()).unwrap());
    let engine = LogEngine::open(fs, kill_config()).unwrap();
    let range = RangeId(1);
    let (sender, receiver) = mpsc::sync_channel::<u64>(1024);
    let mut index = engine.last_index(range);
    std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for acked in receiver {
            // The parent is gone: stop rather than write forever.
            if writeln!(out, "ack {acked}")
                .and_then(|()| out.flush())
                .is_err()
            {
                std::process::exit(0);
            }
        }
    });
    for _ in 0..2_000_000 {
        index += 1;
        let mut batch = LogBatch::new();
        batch.append(range, vec![entry(range, index)]);
        let sender = sender.clone();
        let acked = index;
        engine.write(batch, move |result| {
            if result.is_ok() {
                let _ = sender.send(acked);
            }
        });
    }
}

#[test]
fn sigkilled_writer_loses_nothing_acknowledged() {
    if std::env::var("RANGEKV_KILL_CHILD_DIR").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = SimRng::new(std::process::id() as u64);
    let mut acked_total = 0;
    for round in 0..3 {
        let mut child = Command::new(&exe)
            .args(["tests::kill_target_child", "--exact", "--nocapture"])
            .env("RANGEKV_KILL_CHILD_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let kill_after = 50 + rng.below(2000);
        let mut acked = 0;
        let mut seen = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(index) = line.strip_prefix("ack ") {
                acked = acked.max(index.parse::<u64>().unwrap());
                seen += 1;
                if seen >= kill_after {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
                               // Acknowledgements printed before the kill still count.
        for line in lines {
            if let Some(index) = line.unwrap().strip_prefix("ack ") {
                acked = acked.max(index.parse::<u64>().unwrap());
            }
        }
        child.wait().unwrap();
        let fs: Arc<dyn FileSystem> = Arc::new(DiskFileSystem::open(dir.path()).unwrap());
        let engine = LogEngine::open(fs, kill_config()).unwrap();
        let range = RangeId(1);
        let last = engine.last_index(range);
        assert!(
            last >= acked,
            "round {round}: acknowledged {acked}, recovered {last}"
        );
        assert_log(&engine, range, 1, last);
        acked_total += acked;
    }
    assert!(acked_total > 0);
}

/// Holds one segment write at a gate until the test opens it, and counts the syncs
/// made meanwhile: orders two blocking callers' groups.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    /// The next write is held.
    armed: bool,
    /// A write is being held.
    holding: bool,
    released: bool,
    /// Syncs completed while a write was held.
    syncs_while_holding: u64,
}

impl Gate {
    fn wait_until(&self, done: impl Fn(&GateState) -> bool) {
        let mut state = self.state.lock().unwrap();
        while !done(&state) {
            state = self.changed.wait(state).unwrap();
        }
    }

    fn update(&self, change: impl FnOnce(&mut GateState)) {
        change(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }
}

struct GatedFs {
    inner: SimFileSystem,
    gate: Arc<Gate>,
}

struct GatedFile {
    inner: Arc<dyn SegmentFile>,
    gate: Arc<Gate>,
}

impl SegmentFile for GatedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
        let mut state = self.gate.state.lock().unwrap();
        if state.armed {
            state.armed = false;
            state.holding = true;
            self.gate.changed.notify_all();
            while !state.released {
                state = self.gate.changed.wait(state).unwrap();
            }
            state.holding = false;
        }
        drop(state);
        self.inner.write_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()?;
        self.gate.update(|state| {
            if state.holding {
                state.syncs_while_holding += 1;
            }
        });
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.inner.truncate(len)
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

impl FileSystem for GatedFs {
    fn create(&self, name: &str, bytes: u64) -> std::io::Result<Arc<dyn SegmentFile>> {
        let inner = self.inner.create(name, bytes)?;
        Ok(Arc::new(GatedFile {
            inner,
            gate: self.gate.clone(),
        }))
    }
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn open(&self, name: &str) -> std::io::Result<Arc<dyn SegmentFile>> {
        let inner = self.inner.open(name)?;
        Ok(Arc::new(GatedFile {
            inner,
            gate: self.gate.clone(),
        }))
    }
    fn list(&self) -> std::io::Result<Vec<String>> {
        self.inner.list()
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.inner.remove(name)
    }
    fn describe(&self, name: &str) -> String {
        self.inner.describe(name)
    }
    fn has_raw_fds(&self) -> bool {
        false
    }
}

/// Two blocking callers' groups in flight at once (caller-runs): the later one is
/// durable first, yet it is neither applied nor acknowledged until the earlier one
/// is; then both are. Fails if groups complete out of log order, which could
/// acknowledge a group that replay drops behind a torn earlier one.
#[test]
fn a_callers_group_durable_first_waits_for_the_group_before_it() {
    let gate = Arc::new(Gate::default());
    let fs = Arc::new(GatedFs {
        inner: SimFileSystem::new(),
        gate: gate.clone(),
    });
    let engine = LogEngine::open(fs, small_config(LogIo::Auto)).unwrap();
    let (first, second) = (RangeId(1), RangeId(2));
    gate.update(|state| state.armed = true);
    let (done, outcomes) = mpsc::channel();
    std::thread::scope(|scope| {
        let engine = &engine;
        let done_first = done.clone();
        scope.spawn(move || {
            done_first
                .send((first, append_result(engine, first)))
                .unwrap()
        });
        // The first caller's group is written up to the gate.
        gate.wait_until(|state| state.holding);
        scope.spawn(move || done.send((second, append_result(engine, second))).unwrap());
        // The second caller's group is written and synced past the held one...
        gate.wait_until(|state| state.syncs_while_holding >= 1);
        // ...and its completion has run (it counts the sync first, under the lock
        // this takes).
        while engine.stats().syncs == 0 {
            std::thread::yield_now();
        }
        drop(engine.lock_writer_for_test());
        let applied_early = engine.last_index(second);
        let acknowledged_early = outcomes.try_recv().ok();
        // Open the gate before asserting, so a failure fails rather than hangs.
        gate.update(|state| state.released = true);
        assert_eq!(applied_early, 0, "applied before the group ahead");
        assert_eq!(
            acknowledged_early, None,
            "acknowledged before the group ahead of it was durable"
        );
    });
    let mut outcomes: Vec<_> = outcomes.try_iter().collect();
    outcomes.sort_by_key(|(range, _)| range.0);
    assert_eq!(
        outcomes.iter().map(|(_, ok)| *ok).collect::<Vec<_>>(),
        vec![true, true]
    );
    assert_log(&engine, first, 1, 1);
    assert_log(&engine, second, 1, 1);
    assert!(engine.stats().caller_groups >= 2, "{:?}", engine.stats());
}

fn append_result(engine: &LogEngine, range: RangeId) -> bool {
    let mut batch = LogBatch::new();
    batch.append(range, entries(range, 1, 1));
    engine.write_sync(batch).is_ok()
}

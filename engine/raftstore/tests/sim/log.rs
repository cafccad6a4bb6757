//! The raft log engine of one simulated store, shared by all its ranges: each
//! range's durable log (entries after a compaction point, hard state) that survives
//! crashes, and the store's log writes in flight, which reach the disk in order after
//! a seeded delay and are lost at a crash unless they already had. [`SimLog`] is the
//! handle through which the core reads it ([`LogRead`]); the world completes and
//! crashes writes through the same handle. Its rules are `rangekv_log`'s: an append
//! replaces everything from its first index on, may not leave a gap nor start at or
//! below the compaction point; a compaction point below the current one changes
//! nothing, one past the last entry empties the log.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::Range;
use std::rc::Rc;

use raft::eraftpb::{Entry, HardState};
use raft::StorageError;
use rangekv_raftstore::storage::EntriesResult;
use rangekv_raftstore::{LogRead, LogWrite};
use rangekv_types::RangeId;

/// One range's durable log: the entries after `(truncated_index, truncated_term)`.
#[derive(Clone, Debug, Default)]
pub struct RangeLog {
    pub truncated_index: u64,
    pub truncated_term: u64,
    pub entries: VecDeque<Entry>,
    pub hard_state: HardState,
}

impl RangeLog {
    pub fn first_index(&self) -> u64 {
        self.truncated_index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.truncated_index + self.entries.len() as u64
    }

    /// The term of entry `index`, the compaction point's included.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.truncated_index {
            return Some(self.truncated_term);
        }
        if index < self.truncated_index || index > self.last_index() {
            return None;
        }
        Some(self.entries[(index - self.first_index()) as usize].term)
    }

    fn append(&mut self, range: RangeId, entries: &[Entry]) -> Result<(), String> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index > self.last_index() + 1 {
            return Err(format!(
                "{range}: a log write appends from {} onto a log ending at {}",
                first.index,
                self.last_index()
            ));
        }
        if first.index <= self.truncated_index {
            return Err(format!(
                "{range}: a log write appends from {} at or below the compaction point {}",
                first.index, self.truncated_index
            ));
        }
        self.entries
            .truncate((first.index - self.first_index()) as usize);
        self.entries.extend(entries.iter().cloned());
        Ok(())
    }

    /// Returns whether the compaction point moved.
    /// A snapshot installed at (index, term): the log restarts after it, its hard
    /// state replaced by the one the reset carries (set by the caller).
    pub fn reset(&mut self, index: u64, term: u64) {
        self.entries.clear();
        self.hard_state = HardState::default();
        self.truncated_index = index;
        self.truncated_term = term;
    }

    fn compact(&mut self, index: u64, term: u64) -> bool {
        if index <= self.truncated_index {
            return false;
        }
        if index >= self.last_index() {
            self.entries.clear();
        } else {
            self.entries
                .drain(..(index - self.truncated_index) as usize);
        }
        self.truncated_index = index;
        self.truncated_term = term;
        true
    }
}

/// What is on a store's disk: survives crashes.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    /// By range id − 1.
    pub ranges: Vec<RangeLog>,
}

impl Disk {
    /// One log write reaching the disk: appends, then hard states, then compaction
    /// points (the order `LogBatch` records them in). Returns how many compaction
    /// points moved a range's first index.
    pub fn range_mut(&mut self, range: RangeId) -> &mut RangeLog {
        let at = range.get() as usize - 1;
        if self.ranges.len() <= at {
            self.ranges.resize_with(at + 1, RangeLog::default);
        }
        &mut self.ranges[at]
    }

    fn apply(&mut self, write: &LogWrite) -> Result<u64, String> {
        for (range, index, term, hard_state) in &write.resets {
            let log = self.range_mut(*range);
            log.reset(*index, *term);
            log.hard_state = hard_state.clone();
        }
        for (range, entries) in &write.appends {
            self.range_mut(*range).append(*range, entries)?;
        }
        for (range, hard_state) in &write.hard_states {
            self.range_mut(*range).hard_state = hard_state.clone();
        }
        let mut moved = 0;
        for &(range, index, term) in &write.compactions {
            let log = self.range_mut(range);
            if let Some(known) = log.term(index) {
                if known != term {
                    return Err(format!(
                        "{range}: compaction point {index}/t{term}, but the log holds t{known} there"
                    ));
                }
            }
            moved += u64::from(log.compact(index, term));
        }
        Ok(moved)
    }
}

/// A store's log engine: the disk and the writes submitted but not yet on it.
#[derive(Debug, Default)]
pub struct LogState {
    pub disk: Disk,
    /// (the world's write number, the write), in submission order.
    pub in_flight: VecDeque<(u64, LogWrite)>,
    /// Compaction points that moved a first index, over the run (a coverage counter).
    pub compactions_written: u64,
}

impl LogState {
    pub fn submit(&mut self, id: u64, write: LogWrite) {
        assert!(
            self.in_flight.back().is_none_or(|(last, _)| *last < id),
            "log writes are numbered in submission order"
        );
        self.in_flight.push_back((id, write));
    }

    /// The oldest write in flight, number `id`, reached the disk: returns its `seq`
    /// (`None` for a compaction-only write).
    pub fn complete(&mut self, id: u64) -> Result<Option<u64>, String> {
        let Some((front, write)) = self.in_flight.pop_front() else {
            return Err(format!("log write {id} completes, but none is in flight"));
        };
        if front != id {
            return Err(format!("log write {id} completes before {front}"));
        }
        self.compactions_written += self.disk.apply(&write)?;
        Ok(write.seq)
    }

    /// A crash: the first `keep` writes in flight had reached the disk (their
    /// completion not yet reported), the rest are lost.
    pub fn crash(&mut self, keep: usize) -> Result<(), String> {
        for _ in 0..keep.min(self.in_flight.len()) {
            if let Some((_, write)) = self.in_flight.pop_front() {
                self.compactions_written += self.disk.apply(&write)?;
            }
        }
        self.in_flight.clear();
        Ok(())
    }

    pub fn range(&self, range: RangeId) -> Option<&RangeLog> {
        self.disk.ranges.get(range.get() as usize - 1)
    }
}

/// The store's log as its replicas read it (`NodeLog` in the node).
#[derive(Clone, Debug, Default)]
pub struct SimLog(pub Rc<RefCell<LogState>>);

fn store_error(error: StorageError) -> raft::Error {
    raft::Error::Store(error)
}

impl LogRead for SimLog {
    fn hard_state(&self, range: RangeId) -> HardState {
        self.0
            .borrow()
            .range(range)
            .map(|log| log.hard_state.clone())
            .unwrap_or_default()
    }

    fn entries(&self, range: RangeId, span: Range<u64>, max_size: Option<u64>) -> EntriesResult {
        let (low, high) = (span.start, span.end);
        let state = self.0.borrow();
        let empty = RangeLog::default();
        let log = state.range(range).unwrap_or(&empty);
        if low <= log.truncated_index {
            return Err(store_error(StorageError::Compacted));
        }
        if high > log.last_index() + 1 {
            return Err(store_error(StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let start = (low - log.first_index()) as usize;
        let end = (high - log.first_index()) as usize;
        let mut out: Vec<Entry> = log.entries.range(start..end).cloned().collect();
        raft::util::limit_size(&mut out, max_size);
        Ok(out)
    }

    fn term(&self, range: RangeId, index: u64) -> raft::Result<u64> {
        let state = self.0.borrow();
        let Some(log) = state.range(range) else {
            return match index {
                0 => Ok(0),
                _ => Err(store_error(StorageError::Unavailable)),
            };
        };
        match log.term(index) {
            Some(term) => Ok(term),
            None if index < log.truncated_index => Err(store_error(StorageError::Compacted)),
            None => Err(store_error(StorageError::Unavailable)),
        }
    }

    fn first_index(&self, range: RangeId) -> u64 {
        self.0
            .borrow()
            .range(range)
            .map_or(1, RangeLog::first_index)
    }

    fn last_index(&self, range: RangeId) -> u64 {
        self.0.borrow().range(range).map_or(0, RangeLog::last_index)
    }
}

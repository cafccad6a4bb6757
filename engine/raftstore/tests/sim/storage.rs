//! The raft log of one simulated node: a durable part that survives crashes, the log
//! writes in flight (lost at a crash unless they already reached the disk), and
//! `SimStorage`, a `raft::Storage` over them that mirrors `engine/node/src/storage.rs`
//! (`PeerStorage`): raft-rs 0.7 reads entries back as soon as a `Ready` is advanced,
//! before the write is durable, so those live in an `unstable` overlay until it is.

use std::collections::VecDeque;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

/// What is on the node's disk: survives crashes. No compaction (see sim.rs).
#[derive(Clone, Debug, Default)]
pub struct Disk {
    /// `entries[i].index == i + 1`.
    pub entries: Vec<Entry>,
    pub hard_state: HardState,
}

impl Disk {
    pub fn last_index(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn term(&self, index: u64) -> Option<u64> {
        if index == 0 {
            return Some(0);
        }
        self.entries.get(index as usize - 1).map(|e| e.term)
    }

    /// One log write reaching the disk: like `rangekv_log::LogBatch`, an append from
    /// `entries[0].index` replaces everything from there on.
    fn apply(&mut self, write: &LogWrite) {
        if let Some(first) = write.entries.first() {
            assert!(
                first.index >= 1 && first.index <= self.last_index() + 1,
                "log write leaves a gap: appends {} onto {}",
                first.index,
                self.last_index()
            );
            self.entries.truncate(first.index as usize - 1);
            self.entries.extend(write.entries.iter().cloned());
        }
        if let Some(hard_state) = &write.hard_state {
            self.hard_state = hard_state.clone();
        }
    }
}

/// One log write (a `LogBatch` of one range): its entries and hard state.
#[derive(Clone, Debug)]
pub struct LogWrite {
    pub seq: u64,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
}

/// The log engine of one node: durable disk plus writes submitted and not yet
/// durable, which complete in order (as `rangekv_log` completes them).
#[derive(Debug, Default)]
pub struct SimLog {
    pub disk: Disk,
    pub in_flight: VecDeque<LogWrite>,
}

impl SimLog {
    pub fn submit(&mut self, write: LogWrite) {
        if let Some(last) = self.in_flight.back() {
            assert!(write.seq > last.seq);
        }
        self.in_flight.push_back(write);
    }

    /// Writes up to `seq` reached the disk.
    pub fn complete(&mut self, seq: u64) {
        while self.in_flight.front().is_some_and(|w| w.seq <= seq) {
            let write = self.in_flight.pop_front().expect("front exists");
            self.disk.apply(&write);
        }
    }

    /// A crash: the first `keep` writes in flight had reached the disk (their
    /// completion was not reported yet), the rest are lost. Returns what survives.
    pub fn crash(mut self, keep: usize) -> Disk {
        for _ in 0..keep.min(self.in_flight.len()) {
            let write = self.in_flight.pop_front().expect("front exists");
            self.disk.apply(&write);
        }
        self.disk
    }

    fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>> {
        if low == 0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.disk.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let mut out = self.disk.entries[low as usize - 1..high as usize - 1].to_vec();
        raft::util::limit_size(&mut out, max_size);
        Ok(out)
    }
}

/// `raft::Storage` of one replica: `PeerStorage`'s logic over a `SimLog`.
pub struct SimStorage {
    pub log: SimLog,
    conf_state: ConfState,
    /// Entries written to the log but not yet durable, each with its write's seq.
    unstable: VecDeque<(Entry, u64)>,
    /// Applied index when the replica was opened (the durable commit is at least it).
    applied_at_open: u64,
}

impl SimStorage {
    pub fn new(disk: Disk, conf_state: ConfState, applied_at_open: u64) -> Self {
        SimStorage {
            log: SimLog {
                disk,
                in_flight: VecDeque::new(),
            },
            conf_state,
            unstable: VecDeque::new(),
            applied_at_open,
        }
    }

    fn unstable_first(&self) -> Option<u64> {
        self.unstable.front().map(|(e, _)| e.index)
    }

    /// `PeerStorage::append_unstable`: entries of a `Ready` handed to log write `seq`.
    pub fn append_unstable(&mut self, entries: &[Entry], seq: u64) {
        let Some(first) = entries.first() else {
            return;
        };
        while self
            .unstable
            .back()
            .is_some_and(|(e, _)| e.index >= first.index)
        {
            self.unstable.pop_back();
        }
        self.unstable
            .extend(entries.iter().map(|entry| (entry.clone(), seq)));
    }

    /// `PeerStorage::on_durable`: write `seq` is durable, the log serves its entries.
    pub fn on_durable(&mut self, seq: u64) {
        while self.unstable.front().is_some_and(|(_, s)| *s <= seq) {
            self.unstable.pop_front();
        }
    }

    /// The log as raft sees it through this storage (durable + unstable).
    pub fn view_entries(&self, low: u64, high: u64) -> Vec<Entry> {
        raft::Storage::entries(self, low, high, None, GetEntriesContext::empty(false))
            .expect("entries of the view")
    }
}

impl raft::Storage for SimStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let mut hard_state = self.log.disk.hard_state.clone();
        hard_state.commit = hard_state.commit.max(self.applied_at_open);
        Ok(RaftState::new(hard_state, self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let split = self.unstable_first().unwrap_or(u64::MAX);
        let mut out = if low < split {
            self.log.entries(low, high.min(split), max_size)?
        } else {
            Vec::new()
        };
        if high > split && out.len() as u64 == split.saturating_sub(low) {
            let from = low.max(split);
            let last = self.unstable.back().map_or(0, |(e, _)| e.index);
            if high > last + 1 {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
            let skip = (from - split) as usize;
            out.extend(
                self.unstable
                    .iter()
                    .skip(skip)
                    .take((high - from) as usize)
                    .map(|(e, _)| e.clone()),
            );
            raft::util::limit_size(&mut out, max_size);
        }
        Ok(out)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if let Some(first) = self.unstable_first() {
            if index >= first {
                return self
                    .unstable
                    .get((index - first) as usize)
                    .map(|(e, _)| e.term)
                    .ok_or(raft::Error::Store(StorageError::Unavailable));
            }
        }
        self.log
            .disk
            .term(index)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(match self.unstable.back() {
            Some((entry, _)) => entry.index,
            None => self.log.disk.last_index(),
        })
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

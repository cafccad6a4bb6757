//! `raft::Storage` of one replica: the shared log engine, plus the entries handed to
//! the log but not yet durable.
//!
//! raft-rs 0.7 drops entries from its own unstable buffer as soon as a `Ready` is
//! advanced (`advance_append_async`), before the log write completes, and reads them
//! back through `Storage` from then on. The log engine indexes entries only once they
//! are durable, so until then they live in `unstable` here.

use std::collections::VecDeque;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use rangekv_log::{LogEngine, ReadError};
use rangekv_types::RangeId;

pub struct PeerStorage {
    engine: LogEngine,
    range: RangeId,
    conf_state: ConfState,
    /// Entries written to the log but not yet durable, contiguous, each with the
    /// sequence number of the log write carrying it.
    unstable: VecDeque<(Entry, u64)>,
    /// Applied index when the replica was opened: the durable commit index is at
    /// least this (apply may run ahead of the hard state's own write).
    applied_at_open: u64,
}

fn to_raft(error: ReadError) -> raft::Error {
    match error {
        ReadError::Compacted => raft::Error::Store(StorageError::Compacted),
        ReadError::Unavailable => raft::Error::Store(StorageError::Unavailable),
        ReadError::Log(error) => raft::Error::Store(StorageError::Other(Box::new(error))),
    }
}

impl PeerStorage {
    pub fn new(
        engine: LogEngine,
        range: RangeId,
        conf_state: ConfState,
        applied_at_open: u64,
    ) -> Self {
        PeerStorage {
            engine,
            range,
            conf_state,
            unstable: VecDeque::new(),
            applied_at_open,
        }
    }

    fn unstable_first(&self) -> Option<u64> {
        self.unstable.front().map(|(e, _)| e.index)
    }

    /// Entries of a `Ready`, handed to the log in write `seq`: visible to raft now.
    pub fn append_unstable(&mut self, entries: &[Entry], seq: u64) {
        let Some(first) = entries.first() else {
            return;
        };
        // A conflicting append replaces everything from its first index on.
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

    /// Log write `seq` (and every one before it) is durable: the engine serves those
    /// entries now.
    pub fn on_durable(&mut self, seq: u64) {
        while self.unstable.front().is_some_and(|(_, s)| *s <= seq) {
            self.unstable.pop_front();
        }
    }

    pub fn engine(&self) -> &LogEngine {
        &self.engine
    }
}

impl raft::Storage for PeerStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let mut hard_state: HardState = self.engine.hard_state(self.range);
        // Entries are applied once committed and locally durable, possibly before the
        // hard state recording that commit index was written.
        hard_state.commit = hard_state.commit.max(self.applied_at_open);
        Ok(RaftState::new(hard_state, self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let split = self.unstable_first().unwrap_or(u64::MAX);
        let mut out = if low < split {
            self.engine
                .entries(self.range, low, high.min(split), max_size)
                .map_err(to_raft)?
        } else {
            Vec::new()
        };
        let _ = context;
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
        self.engine.term(self.range, index).map_err(to_raft)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.engine.first_index(self.range))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(match self.unstable.back() {
            Some((entry, _)) => entry.index,
            None => self.engine.last_index(self.range),
        })
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Snapshots (SST files of the range's span) land with the snapshot issue.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use raft::Storage;
    use rangekv_log::{sim::SimFileSystem, LogBatch, LogConfig};

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 8].into(),
            ..Default::default()
        }
    }

    #[test]
    fn unstable_entries_are_readable_until_durable_then_the_log_serves_them() {
        let engine = LogEngine::open(Arc::new(SimFileSystem::new()), LogConfig::default()).unwrap();
        let range = RangeId(1);
        let mut storage = PeerStorage::new(engine.clone(), range, ConfState::default(), 0);
        let first: Vec<Entry> = (1..=3).map(|i| entry(i, 1)).collect();
        storage.append_unstable(&first, 1);
        assert_eq!(storage.last_index().unwrap(), 3);
        assert_eq!(storage.term(2).unwrap(), 1);
        let got = storage
            .entries(1, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got, first);

        // A follower's conflicting append replaces index 3 onwards.
        let second = vec![entry(3, 2), entry(4, 2)];
        storage.append_unstable(&second, 2);
        assert_eq!(storage.term(3).unwrap(), 2);
        assert_eq!(storage.last_index().unwrap(), 4);

        // Write 1 becomes durable: 1..=2 come from the log, 3..=4 still unstable.
        let mut batch = LogBatch::new();
        batch.append(range, first.clone());
        engine.write_sync(batch).unwrap();
        storage.on_durable(1);
        assert_eq!(
            storage.term(3).unwrap(),
            2,
            "write 2's entry is still the one seen"
        );
        let got = storage
            .entries(1, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got,
            vec![entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)]
        );

        let mut batch = LogBatch::new();
        batch.append(range, second.clone());
        engine.write_sync(batch).unwrap();
        storage.on_durable(2);
        assert_eq!(storage.last_index().unwrap(), 4);
        assert_eq!(storage.term(3).unwrap(), 2);
        assert!(storage
            .entries(1, 6, None, GetEntriesContext::empty(false))
            .is_err());
    }

    #[test]
    fn commit_is_at_least_the_applied_index() {
        let engine = LogEngine::open(Arc::new(SimFileSystem::new()), LogConfig::default()).unwrap();
        let storage = PeerStorage::new(engine, RangeId(1), ConfState::default(), 7);
        assert_eq!(storage.initial_state().unwrap().hard_state.commit, 7);
    }
}

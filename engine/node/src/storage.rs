//! The store's log engine as the replication core reads it ([`LogRead`]); the core's
//! `PeerStorage` adds the entries not yet durable on top.

use std::ops::Range;

use raft::eraftpb::HardState;
use raft::StorageError;
use rangekv_log::{LogEngine, ReadError};
use rangekv_raftstore::storage::EntriesResult;
use rangekv_raftstore::LogRead;
use rangekv_types::RangeId;

/// `LogEngine` for the core (a newtype: both the trait and the engine are foreign here).
#[derive(Clone)]
pub struct NodeLog(pub LogEngine);

fn to_raft(error: ReadError) -> raft::Error {
    match error {
        ReadError::Compacted => raft::Error::Store(StorageError::Compacted),
        ReadError::Unavailable => raft::Error::Store(StorageError::Unavailable),
        ReadError::Log(error) => raft::Error::Store(StorageError::Other(Box::new(error))),
    }
}

impl LogRead for NodeLog {
    fn hard_state(&self, range: RangeId) -> HardState {
        self.0.hard_state(range)
    }

    fn entries(&self, range: RangeId, span: Range<u64>, max: Option<u64>) -> EntriesResult {
        self.0
            .entries(range, span.start, span.end, max)
            .map_err(to_raft)
    }

    fn term(&self, range: RangeId, index: u64) -> raft::Result<u64> {
        self.0.term(range, index).map_err(to_raft)
    }

    fn first_index(&self, range: RangeId) -> u64 {
        self.0.first_index(range)
    }

    fn last_index(&self, range: RangeId) -> u64 {
        self.0.last_index(range)
    }

    fn release_cache(&self, range: RangeId, through: u64) {
        self.0.release_cache(range, through);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use raft::eraftpb::{ConfState, Entry};
    use raft::{GetEntriesContext, Storage};
    use rangekv_log::{sim::SimFileSystem, LogBatch, LogConfig};
    use rangekv_raftstore::PeerStorage;

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 8].into(),
            ..Default::default()
        }
    }

    /// The core's overlay over the real engine: unstable entries until their write is
    /// durable, then the engine's (compacted ones refused, the compaction point's term
    /// still known).
    #[test]
    fn the_overlay_reads_through_to_the_engine_once_durable() {
        let engine = LogEngine::open(Arc::new(SimFileSystem::new()), LogConfig::default()).unwrap();
        let range = RangeId(1);
        let mut storage = PeerStorage::new(NodeLog(engine.clone()), range, ConfState::default(), 0);
        let first: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
        storage.append_unstable(&first, 1);
        assert_eq!(storage.last_index().unwrap(), 5);
        let mut batch = LogBatch::new();
        batch.append(range, first.clone());
        engine.write_sync(batch).unwrap();
        storage.on_durable(1);
        assert_eq!(
            storage
                .entries(1, 6, None, GetEntriesContext::empty(false))
                .unwrap(),
            first
        );
        engine.compact(range, 3).unwrap();
        assert_eq!(storage.first_index().unwrap(), 3);
        assert!(storage
            .entries(1, 6, None, GetEntriesContext::empty(false))
            .is_err());
        assert_eq!(storage.term(2).unwrap(), 1);
        assert!(storage.term(1).is_err());
        assert!(storage.snapshot(5, 2).is_err(), "no snapshots yet");
    }
}

//! `raft::Storage` over one range of the shared log.

use raft::eraftpb::{ConfState, Entry, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use rangekv_types::RangeId;

use crate::engine::{LogEngine, ReadError};

/// One range's view of the log, for its raft-rs `RawNode`. The conf state is not in
/// the log (it follows applied conf changes): the replica keeps it current with
/// [`RangeStorage::set_conf_state`].
pub struct RangeStorage {
    engine: LogEngine,
    range: RangeId,
    conf_state: ConfState,
}

impl RangeStorage {
    pub fn new(engine: LogEngine, range: RangeId, conf_state: ConfState) -> Self {
        RangeStorage {
            engine,
            range,
            conf_state,
        }
    }

    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.conf_state = conf_state;
    }

    pub fn engine(&self) -> &LogEngine {
        &self.engine
    }
}

fn to_raft(error: ReadError) -> raft::Error {
    match error {
        ReadError::Compacted => raft::Error::Store(StorageError::Compacted),
        ReadError::Unavailable => raft::Error::Store(StorageError::Unavailable),
        ReadError::Log(error) => raft::Error::Store(StorageError::Other(Box::new(error))),
    }
}

impl raft::Storage for RangeStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.engine.hard_state(self.range),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.engine
            .entries(self.range, low, high, max_size.into())
            .map_err(to_raft)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        self.engine.term(self.range, index).map_err(to_raft)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.engine.first_index(self.range))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.engine.last_index(self.range))
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Snapshots (SST files of the range's span) land with the snapshot issue.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

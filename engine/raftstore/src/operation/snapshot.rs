//! Raft snapshots: not built yet. A leader asked for one (a follower behind its
//! log's first index) answers `SnapshotTemporarilyUnavailable` and raft-rs keeps
//! probing; a `Ready` carrying a snapshot stops the store (`Fatal::Snapshot`), since
//! applying nothing would leave the replica silently behind. So that no follower
//! ever needs one, a leader compacts only what every follower holds
//! (`compact_log`). The snapshot issue builds SST snapshots here: generate from a
//! state machine snapshot, stream, ingest after clearing the span.

/// `raft::Storage::snapshot` of every replica.
pub(crate) fn generate(_request_index: u64, _to: u64) -> raft::Result<raft::eraftpb::Snapshot> {
    Err(raft::Error::Store(
        raft::StorageError::SnapshotTemporarilyUnavailable,
    ))
}

//! The state machine: RocksDB with two column families.
//!
//! - `data`: user keys, stored as they are (ranges partition them).
//! - `meta`: per range, the apply state (applied index and term); later the range
//!   descriptor and the store identity.
//!
//! Invariant: an apply batch writes user data **and** the range's new applied index in
//! one `WriteBatch`, so replaying the raft log after a crash is idempotent.
//! Boundary: knows RocksDB and range ids; knows nothing of raft's log, gRPC or tokio.

use std::path::Path;

use rangekv_types::RangeId;
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, DB};

pub const CF_DATA: &str = "data";
pub const CF_META: &str = "meta";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt meta record for {range}: {what}")]
    CorruptMeta { range: RangeId, what: &'static str },
}

/// How far a range's committed log has been applied to the state machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyState {
    pub applied_index: u64,
    pub applied_term: u64,
}

impl ApplyState {
    const ENCODED_BYTES: usize = 16;

    fn encode(self) -> [u8; Self::ENCODED_BYTES] {
        let mut out = [0; Self::ENCODED_BYTES];
        out[..8].copy_from_slice(&self.applied_index.to_be_bytes());
        out[8..].copy_from_slice(&self.applied_term.to_be_bytes());
        out
    }

    fn decode(range: RangeId, raw: &[u8]) -> Result<Self, StateError> {
        let raw: [u8; Self::ENCODED_BYTES] =
            raw.try_into().map_err(|_| StateError::CorruptMeta {
                range,
                what: "apply state is not 16 bytes",
            })?;
        let (index, term) = raw.split_at(8);
        Ok(ApplyState {
            applied_index: u64::from_be_bytes(index.try_into().unwrap_or_default()),
            applied_term: u64::from_be_bytes(term.try_into().unwrap_or_default()),
        })
    }
}

/// One write to user data, part of an applied raft entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write<'a> {
    Put { key: &'a [u8], value: &'a [u8] },
    Delete { key: &'a [u8] },
}

pub struct StateMachine {
    db: DB,
}

fn apply_state_key(range: RangeId) -> [u8; 9] {
    let mut key = [0; 9];
    key[0] = b'a';
    key[1..].copy_from_slice(&range.get().to_be_bytes());
    key
}

impl StateMachine {
    /// Opens (or creates) the state machine under `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let families = [CF_DATA, CF_META]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&options, path, families)?;
        Ok(StateMachine { db })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Both families are created by `open`; their absence is a programming error.
        self.db
            .cf_handle(name)
            .expect("column families are created when the state machine is opened")
    }

    /// Applies `writes` of `range` and records `state` as its applied position, atomically.
    pub fn apply(
        &self,
        range: RangeId,
        writes: &[Write<'_>],
        state: ApplyState,
    ) -> Result<(), StateError> {
        let previous = self.apply_state(range)?;
        assert!(
            state.applied_index >= previous.applied_index,
            "applied index of {range} only grows: {} -> {}",
            previous.applied_index,
            state.applied_index
        );
        let data = self.cf(CF_DATA);
        let mut batch = WriteBatch::default();
        for write in writes {
            match write {
                Write::Put { key, value } => batch.put_cf(data, key, value),
                Write::Delete { key } => batch.delete_cf(data, key),
            }
        }
        batch.put_cf(self.cf(CF_META), apply_state_key(range), state.encode());
        self.db.write(batch)?;
        Ok(())
    }

    pub fn apply_state(&self, range: RangeId) -> Result<ApplyState, StateError> {
        match self.db.get_cf(self.cf(CF_META), apply_state_key(range))? {
            Some(raw) => ApplyState::decode(range, &raw),
            None => Ok(ApplyState::default()),
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.db.get_cf(self.cf(CF_DATA), key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_writes_data_and_applied_index_together_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let range = RangeId(4);
        {
            let state = StateMachine::open(dir.path()).unwrap();
            assert_eq!(state.apply_state(range).unwrap(), ApplyState::default());
            let applied = ApplyState {
                applied_index: 10,
                applied_term: 2,
            };
            state
                .apply(
                    range,
                    &[
                        Write::Put {
                            key: b"k1",
                            value: b"v1",
                        },
                        Write::Put {
                            key: b"k2",
                            value: b"v2",
                        },
                        Write::Delete { key: b"k1" },
                    ],
                    applied,
                )
                .unwrap();
        }
        let state = StateMachine::open(dir.path()).unwrap();
        assert_eq!(state.get(b"k1").unwrap(), None);
        assert_eq!(state.get(b"k2").unwrap().as_deref(), Some(&b"v2"[..]));
        assert_eq!(state.apply_state(range).unwrap().applied_index, 10);
        assert_eq!(state.apply_state(RangeId(5)).unwrap().applied_index, 0);
    }

    #[test]
    #[should_panic(expected = "only grows")]
    fn applied_index_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateMachine::open(dir.path()).unwrap();
        let at = |index| ApplyState {
            applied_index: index,
            applied_term: 1,
        };
        state.apply(RangeId(1), &[], at(5)).unwrap();
        state.apply(RangeId(1), &[], at(4)).unwrap();
    }
}

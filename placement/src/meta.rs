//! PD's durable metadata on RocksDB: stores, range descriptors, the ID allocator's
//! reservation and the bootstrapped flag. Every write is synced before it returns.
//!
//! Key layout (default column family; ids big-endian so keys sort by id):
//!
//! | key | value |
//! |---|---|
//! | `bootstrapped` | `[1]` once the bootstrap batch landed |
//! | `id_ceiling` | u64 BE: no id at or above it was ever handed out |
//! | `store/<id>` | `StoreInfo` (protobuf; only `store_id` and `address` are kept) |
//! | `range/<id>` | the range's latest accepted `RangeDescriptor` (protobuf) |
//! | `bootstrap_range/<id>` | the descriptor the range was created with at bootstrap |

use std::path::{Path, PathBuf};

use prost::Message;
use rangekv_rpc::proto::StoreInfo;
use rangekv_rpc::RangeDescriptor;
use rangekv_types::{RangeId, StoreId};
use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

const KEY_BOOTSTRAPPED: &[u8] = b"bootstrapped";
const KEY_ID_CEILING: &[u8] = b"id_ceiling";
const PREFIX_STORE: &[u8] = b"store/";
const PREFIX_RANGE: &[u8] = b"range/";
const PREFIX_BOOTSTRAP_RANGE: &[u8] = b"bootstrap_range/";

/// A failure of the metadata store. Each one is fatal to PD: a write that may or may not
/// have reached the disk is never retried, and a record that does not decode is never
/// guessed at.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store {path}: {operation} failed: {source}")]
    Rocks {
        path: PathBuf,
        operation: &'static str,
        source: rocksdb::Error,
    },
    #[error("metadata store {path}: record {key} is corrupt: {reason}")]
    Corrupt {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// A registered store as persisted: its id and where it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRecord {
    pub id: StoreId,
    pub address: String,
}

/// Everything [`MetaStore::open`] found on disk.
#[derive(Debug, Default)]
pub struct Loaded {
    pub bootstrapped: bool,
    /// 0 when nothing was ever reserved.
    pub id_ceiling: u64,
    /// In store id order.
    pub stores: Vec<StoreRecord>,
    /// Latest accepted descriptors, in range id order.
    pub ranges: Vec<RangeDescriptor>,
    /// Descriptors as created at bootstrap, in range id order.
    pub bootstrap_ranges: Vec<RangeDescriptor>,
}

/// The RocksDB instance holding PD's metadata.
pub struct MetaStore {
    db: DB,
    path: PathBuf,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore")
            .field("path", &self.path)
            .finish()
    }
}

impl MetaStore {
    /// Opens (creating if needed) the store in `dir` and reads all of it.
    pub fn open(dir: &Path) -> Result<(Self, Loaded), MetaError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        // PD's metadata is small; keep RocksDB's footprint small too.
        options.set_max_open_files(64);
        options.set_keep_log_file_num(4);
        let db = DB::open(&options, dir).map_err(|source| MetaError::Rocks {
            path: dir.to_owned(),
            operation: "open",
            source,
        })?;
        let store = MetaStore {
            db,
            path: dir.to_owned(),
        };
        let loaded = store.load()?;
        Ok((store, loaded))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self) -> Result<Loaded, MetaError> {
        let bootstrapped = match self.get(KEY_BOOTSTRAPPED)? {
            None => false,
            Some(value) if value == [1] => true,
            Some(value) => return Err(self.corrupt(KEY_BOOTSTRAPPED, format!("value {value:?}"))),
        };
        let id_ceiling = match self.get(KEY_ID_CEILING)? {
            None => 0,
            Some(value) => decode_u64(&value)
                .ok_or_else(|| self.corrupt(KEY_ID_CEILING, format!("{} bytes", value.len())))?,
        };
        let mut stores = Vec::new();
        for (key, value) in self.scan_prefix(PREFIX_STORE)? {
            let info = StoreInfo::decode(&value[..])
                .map_err(|error| self.corrupt(&key, error.to_string()))?;
            if key_id(&key, PREFIX_STORE) != Some(info.store_id) {
                return Err(self.corrupt(&key, format!("holds store {}", info.store_id)));
            }
            stores.push(StoreRecord {
                id: StoreId(info.store_id),
                address: info.address,
            });
        }
        let ranges = self.load_descriptors(PREFIX_RANGE)?;
        let bootstrap_ranges = self.load_descriptors(PREFIX_BOOTSTRAP_RANGE)?;
        if bootstrapped == bootstrap_ranges.is_empty() {
            return Err(self.corrupt(
                KEY_BOOTSTRAPPED,
                format!(
                    "bootstrapped={bootstrapped} but {} bootstrap ranges",
                    bootstrap_ranges.len()
                ),
            ));
        }
        Ok(Loaded {
            bootstrapped,
            id_ceiling,
            stores,
            ranges,
            bootstrap_ranges,
        })
    }

    fn load_descriptors(&self, prefix: &[u8]) -> Result<Vec<RangeDescriptor>, MetaError> {
        let mut descriptors = Vec::new();
        for (key, value) in self.scan_prefix(prefix)? {
            let descriptor = RangeDescriptor::decode(&value[..])
                .map_err(|error| self.corrupt(&key, error.to_string()))?;
            if key_id(&key, prefix) != Some(descriptor.range_id) {
                return Err(self.corrupt(&key, format!("holds range {}", descriptor.range_id)));
            }
            descriptors.push(descriptor);
        }
        Ok(descriptors)
    }

    /// Records that no id below `ceiling` may be handed out again.
    pub fn put_id_ceiling(&self, ceiling: u64) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        batch.put(KEY_ID_CEILING, ceiling.to_be_bytes());
        self.write(batch, "write id ceiling")
    }

    pub fn put_store(&self, store: &StoreRecord) -> Result<(), MetaError> {
        let info = StoreInfo {
            store_id: store.id.get(),
            address: store.address.clone(),
            ..StoreInfo::default()
        };
        let mut batch = WriteBatch::default();
        batch.put(id_key(PREFIX_STORE, store.id.get()), info.encode_to_vec());
        self.write(batch, "write store")
    }

    /// Writes the bootstrap ranges (as current and as bootstrap descriptors) and the
    /// bootstrapped flag in one batch: after a crash either all of it is there or none.
    pub fn write_bootstrap(&self, ranges: &[RangeDescriptor]) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        for range in ranges {
            let encoded = range.encode_to_vec();
            batch.put(id_key(PREFIX_RANGE, range.range_id), &encoded);
            batch.put(id_key(PREFIX_BOOTSTRAP_RANGE, range.range_id), &encoded);
        }
        batch.put(KEY_BOOTSTRAPPED, [1]);
        self.write(batch, "write bootstrap")
    }

    /// Puts `range` and deletes the ranges it replaced, in one batch.
    pub fn update_ranges(
        &self,
        range: &RangeDescriptor,
        replaced: &[RangeId],
    ) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        for id in replaced {
            batch.delete(id_key(PREFIX_RANGE, id.get()));
        }
        batch.put(id_key(PREFIX_RANGE, range.range_id), range.encode_to_vec());
        self.write(batch, "write range")
    }

    fn write(&self, batch: WriteBatch, operation: &'static str) -> Result<(), MetaError> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(|source| MetaError::Rocks {
                path: self.path.clone(),
                operation,
                source,
            })
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        self.db.get(key).map_err(|source| MetaError::Rocks {
            path: self.path.clone(),
            operation: "read",
            source,
        })
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Record>, MetaError> {
        let mut records = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(prefix, Direction::Forward))
        {
            let (key, value) = item.map_err(|source| MetaError::Rocks {
                path: self.path.clone(),
                operation: "scan",
                source,
            })?;
            if !key.starts_with(prefix) {
                break;
            }
            records.push((key, value));
        }
        Ok(records)
    }

    fn corrupt(&self, key: &[u8], reason: String) -> MetaError {
        MetaError::Corrupt {
            path: self.path.clone(),
            key: String::from_utf8_lossy(key).into_owned(),
            reason,
        }
    }
}

/// A key and its value.
type Record = (Box<[u8]>, Box<[u8]>);

fn id_key(prefix: &[u8], id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 8);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn key_id(key: &[u8], prefix: &[u8]) -> Option<u64> {
    decode_u64(key.strip_prefix(prefix)?)
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rangekv_rpc::proto::{Peer, RangeEpoch};

    fn descriptor(id: u64, start: &str, end: &str) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: start.as_bytes().to_vec().into(),
            end_key: end.as_bytes().to_vec().into(),
            epoch: Some(RangeEpoch {
                conf_ver: 1,
                version: 1,
            }),
            replicas: vec![Peer {
                peer_id: id + 100,
                store_id: 1,
                role: 0,
            }],
        }
    }

    #[test]
    fn an_empty_directory_opens_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (_, loaded) = MetaStore::open(dir.path()).unwrap();
        assert!(!loaded.bootstrapped);
        assert_eq!(loaded.id_ceiling, 0);
        assert!(loaded.stores.is_empty() && loaded.ranges.is_empty());
    }

    #[test]
    fn every_record_kind_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ranges = vec![descriptor(4, "", "m"), descriptor(9, "m", "")];
        {
            let (meta, _) = MetaStore::open(dir.path()).unwrap();
            meta.put_id_ceiling(1000).unwrap();
            meta.put_store(&StoreRecord {
                id: StoreId(2),
                address: "10.0.0.2:20160".into(),
            })
            .unwrap();
            meta.write_bootstrap(&ranges).unwrap();
            let mut split = descriptor(4, "", "f");
            split.epoch = Some(RangeEpoch {
                conf_ver: 1,
                version: 2,
            });
            meta.update_ranges(&split, &[RangeId(9)]).unwrap();
        }
        let (_, loaded) = MetaStore::open(dir.path()).unwrap();
        assert!(loaded.bootstrapped);
        assert_eq!(loaded.id_ceiling, 1000);
        assert_eq!(
            loaded.stores,
            vec![StoreRecord {
                id: StoreId(2),
                address: "10.0.0.2:20160".into()
            }]
        );
        assert_eq!(loaded.bootstrap_ranges, ranges);
        assert_eq!(loaded.ranges.len(), 1, "range 9 was deleted");
        assert_eq!(&loaded.ranges[0].end_key[..], b"f");
    }

    #[test]
    fn a_corrupt_record_is_reported_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (meta, _) = MetaStore::open(dir.path()).unwrap();
            meta.db
                .put(id_key(PREFIX_RANGE, 3), b"\xff\xff\xff")
                .unwrap();
        }
        let error = MetaStore::open(dir.path()).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, MetaError::Corrupt { .. }) && message.contains("range/"),
            "{message}"
        );
    }
}

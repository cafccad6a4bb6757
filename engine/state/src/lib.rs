//! The state machine: RocksDB with two column families.
//!
//! - `data`: user keys, stored as they are (ranges partition them).
//! - `meta`: per range, the apply state (applied index and term); later the range
//!   descriptor and the store identity.
//!
//! Invariant: an apply batch writes user data **and** the range's new applied index in
//! one `WriteBatch`, so replaying the raft log after a crash is idempotent.
//!
//! Apply batches skip RocksDB's WAL: the raft log is the durable record. After a crash
//! the state machine is what its last memtable flush left, data and applied indexes of
//! both column families flushed together (`atomic_flush`), and the log replays the
//! rest. So the log may only drop entries below what is *flushed*:
//! [`StateMachine::durable_apply_state`] reads that from the persisted tier.
//! Boundary: knows RocksDB and range ids; knows nothing of raft's log, gRPC or tokio.

use std::path::Path;

use rangekv_types::RangeId;
use std::collections::HashMap;

use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, ReadTier, WriteBatch,
    WriteOptions, DB,
};

pub const CF_DATA: &str = "data";
pub const CF_META: &str = "meta";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt meta record for {range}: {what}")]
    CorruptMeta { range: RangeId, what: &'static str },
    #[error("state machine directory: {0}")]
    Directory(#[from] std::io::Error),
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

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A range's state machine as of its applied index: what a snapshot carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeImage {
    /// The user keys of the range's span, in order.
    pub data: Vec<KeyValue>,
    /// Its client session records, by session id.
    pub sessions: Vec<(u128, Vec<u8>)>,
    pub apply_state: ApplyState,
}

pub struct StateMachine {
    db: DB,
    direct_io: bool,
}

/// Whether files under `dir` take `O_DIRECT` writes of aligned blocks (tmpfs before
/// Linux 6.6 refuses the open; some file systems refuse the write). RocksDB's flushes
/// would otherwise fail in the background and stop every write.
fn direct_io_works(dir: &Path) -> bool {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const BLOCK: usize = 4096;
    let probe = dir.join("DIRECT_IO_PROBE");
    let works = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)?;
        let buffer = vec![0u8; 2 * BLOCK];
        let skip = buffer.as_ptr().align_offset(BLOCK);
        file.write_all(&buffer[skip..skip + BLOCK])
    })()
    .is_ok();
    let _ = std::fs::remove_file(&probe);
    works
}

fn apply_state_key(range: RangeId) -> [u8; 9] {
    range_meta_key(b'a', range)
}

fn descriptor_key(range: RangeId) -> [u8; 9] {
    range_meta_key(DESCRIPTOR_PREFIX, range)
}

const DESCRIPTOR_PREFIX: u8 = b'd';
const SESSION_PREFIX: u8 = b's';

/// A client session's record of `range`: prefix, range id, session id (big-endian, so
/// a range's sessions are one contiguous span).
fn session_key(range: RangeId, session: u128) -> [u8; 25] {
    let mut key = [0; 25];
    key[..9].copy_from_slice(&range_meta_key(SESSION_PREFIX, range));
    key[9..].copy_from_slice(&session.to_be_bytes());
    key
}
const STORE_ID_KEY: &[u8] = b"store_id";

fn range_meta_key(prefix: u8, range: RangeId) -> [u8; 9] {
    let mut key = [0; 9];
    key[0] = prefix;
    key[1..].copy_from_slice(&range.get().to_be_bytes());
    key
}

impl StateMachine {
    /// Opens (or creates) the state machine under `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // Applies skip the WAL: both families must flush together, or a crash could
        // keep an applied index whose data was never flushed.
        options.set_atomic_flush(true);
        // Flushes and compactions bypass the page cache where the file system allows it
        // (see `direct_io`).
        std::fs::create_dir_all(path)?;
        let direct_io = direct_io_works(path);
        options.set_use_direct_io_for_flush_and_compaction(direct_io);
        let families = [CF_DATA, CF_META]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&options, path, families)?;
        Ok(StateMachine { db, direct_io })
    }

    /// Whether memtable flushes and compactions write with `O_DIRECT`: a flush copied
    /// into the page cache costs CPU, and its writeback competes with the raft log's
    /// syncs. Off where the file system refuses direct I/O.
    pub fn direct_io(&self) -> bool {
        self.direct_io
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
        self.db.write_opt(batch, &without_wal())?;
        Ok(())
    }

    pub fn apply_state(&self, range: RangeId) -> Result<ApplyState, StateError> {
        match self.db.get_cf(self.cf(CF_META), apply_state_key(range))? {
            Some(raw) => ApplyState::decode(range, &raw),
            None => Ok(ApplyState::default()),
        }
    }

    /// `range`'s apply state as a crash would leave it: as of the last memtable flush
    /// (RocksDB's persisted tier skips memtables once a write has skipped the WAL).
    /// The raft log may drop entries up to this applied index, not beyond.
    pub fn durable_apply_state(&self, range: RangeId) -> Result<ApplyState, StateError> {
        let mut options = ReadOptions::default();
        options.set_read_tier(ReadTier::Persisted);
        match self
            .db
            .get_cf_opt(self.cf(CF_META), apply_state_key(range), &options)?
        {
            Some(raw) => ApplyState::decode(range, &raw),
            None => Ok(ApplyState::default()),
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.db.get_cf(self.cf(CF_DATA), key)?)
    }

    /// Keys in `[start, end)` (an empty `end` is +infinity) in order, at most `limit`
    /// of them; values are left empty when `keys_only`.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        keys_only: bool,
    ) -> Result<Vec<KeyValue>, StateError> {
        let mut options = ReadOptions::default();
        if !end.is_empty() {
            options.set_iterate_upper_bound(end.to_vec());
        }
        let mut out = Vec::new();
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_DATA),
            options,
            IteratorMode::From(start, Direction::Forward),
        );
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item?;
            out.push((
                key.into_vec(),
                if keys_only {
                    Vec::new()
                } else {
                    value.into_vec()
                },
            ));
        }
        Ok(out)
    }

    /// Starts an apply batch: writes of any number of ranges and their new applied
    /// positions, committed atomically by [`ApplyBatch::commit`].
    pub fn batch(&self) -> ApplyBatch<'_> {
        ApplyBatch {
            state: self,
            data: self.cf(CF_DATA),
            batch: WriteBatch::default(),
            applied: Vec::new(),
            sessions: Vec::new(),
            descriptors: Vec::new(),
            written: None,
            deleted_spans: Vec::new(),
        }
    }

    /// Flushes the memtables of both families: every apply so far becomes durable.
    /// With `wait`, returns once it is; otherwise only schedules the flush.
    pub fn flush(&self, wait: bool) -> Result<(), StateError> {
        let mut options = rocksdb::FlushOptions::default();
        options.set_wait(wait);
        self.db
            .flush_cfs_opt(&[self.cf(CF_DATA), self.cf(CF_META)], &options)?;
        Ok(())
    }

    /// Durably records the descriptor (encoded by the caller) of a range hosted here.
    pub fn put_descriptor(&self, range: RangeId, encoded: &[u8]) -> Result<(), StateError> {
        self.put_descriptors(&[(range, encoded.to_vec())])
    }

    /// Durably records several descriptors in one synced write.
    pub fn put_descriptors(&self, descriptors: &[(RangeId, Vec<u8>)]) -> Result<(), StateError> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        let mut batch = WriteBatch::default();
        for (range, encoded) in descriptors {
            batch.put_cf(self.cf(CF_META), descriptor_key(*range), encoded);
        }
        self.db.write_opt(batch, &options)?;
        Ok(())
    }

    /// Every range descriptor recorded here, by range id.
    pub fn descriptors(&self) -> Result<Vec<(RangeId, Vec<u8>)>, StateError> {
        let iter = self.db.iterator_cf(
            self.cf(CF_META),
            IteratorMode::From(&[DESCRIPTOR_PREFIX], Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item?;
            if key.first() != Some(&DESCRIPTOR_PREFIX) {
                break;
            }
            let id: [u8; 8] = key[1..].try_into().map_err(|_| StateError::CorruptMeta {
                range: RangeId(0),
                what: "descriptor key is not 9 bytes",
            })?;
            out.push((RangeId(u64::from_be_bytes(id)), value.into_vec()));
        }
        Ok(out)
    }

    /// The client sessions recorded for `range` (see `rangekv_raftstore::session`),
    /// by session id, as the apply batches wrote them.
    pub fn sessions(&self, range: RangeId) -> Result<Vec<(u128, Vec<u8>)>, StateError> {
        self.sessions_with(range, ReadOptions::default())
    }

    /// `sessions`, read with `options` (a snapshot's, say).
    fn sessions_with(
        &self,
        range: RangeId,
        options: ReadOptions,
    ) -> Result<Vec<(u128, Vec<u8>)>, StateError> {
        let start = range_meta_key(SESSION_PREFIX, range);
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_META),
            options,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item?;
            if !key.starts_with(&start) {
                break;
            }
            let id: [u8; 16] = key[9..].try_into().map_err(|_| StateError::CorruptMeta {
                range,
                what: "session key is not 25 bytes",
            })?;
            out.push((u128::from_be_bytes(id), value.into_vec()));
        }
        Ok(out)
    }

    /// `range`'s state for a snapshot: the user keys of `[start, end)` (an empty `end`
    /// is +infinity), its sessions and its apply state, read from one RocksDB
    /// snapshot so that they agree.
    pub fn range_image(
        &self,
        range: RangeId,
        start: &[u8],
        end: &[u8],
    ) -> Result<RangeImage, StateError> {
        let snapshot = self.db.snapshot();
        let mut options = ReadOptions::default();
        options.set_snapshot(&snapshot);
        if !end.is_empty() {
            options.set_iterate_upper_bound(end.to_vec());
        }
        let mut data = Vec::new();
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_DATA),
            options,
            IteratorMode::From(start, Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            data.push((key.into_vec(), value.into_vec()));
        }
        let mut options = ReadOptions::default();
        options.set_snapshot(&snapshot);
        let sessions = self.sessions_with(range, options)?;
        let apply_state = match snapshot.get_cf(self.cf(CF_META), apply_state_key(range))? {
            Some(raw) => ApplyState::decode(range, &raw)?,
            None => ApplyState::default(),
        };
        Ok(RangeImage {
            data,
            sessions,
            apply_state,
        })
    }

    /// Replaces `range`'s state with `image` (a snapshot's) in **one write, then a
    /// flush**: every key of `[start, end)` and every session of the range deleted,
    /// the image's keys, sessions and apply state written, with the range's
    /// descriptor (encoded by the caller). Like an apply batch it skips the WAL, and
    /// the atomic flush of both families makes it durable, with every apply batch
    /// before it, before this returns: a crash leaves the old state or the new one.
    /// (Written through the WAL instead, it could outlive an earlier WAL-less delete
    /// of a key of the span that the scan no longer saw: the key would come back.)
    pub fn install_image(
        &self,
        range: RangeId,
        start: &[u8],
        end: &[u8],
        image: &RangeImage,
        descriptor: &[u8],
    ) -> Result<(), StateError> {
        let data = self.cf(CF_DATA);
        let meta = self.cf(CF_META);
        let mut batch = WriteBatch::default();
        // Point deletes of what is there: the span may reach +infinity, which no
        // range deletion bounds.
        for (key, _) in self.scan(start, end, usize::MAX, true)? {
            batch.delete_cf(data, key);
        }
        for (session, _) in self.sessions(range)? {
            batch.delete_cf(meta, session_key(range, session));
        }
        for (key, value) in &image.data {
            batch.put_cf(data, key, value);
        }
        for (session, record) in &image.sessions {
            batch.put_cf(meta, session_key(range, *session), record);
        }
        batch.put_cf(meta, apply_state_key(range), image.apply_state.encode());
        batch.put_cf(meta, descriptor_key(range), descriptor);
        self.db.write_opt(batch, &without_wal())?;
        self.flush(true)
    }

    /// Whether `[start, end)` of the data family holds more than `bytes_max` bytes of
    /// keys and values (a scan that stops once past it).
    pub fn span_exceeds(
        &self,
        start: &[u8],
        end: &[u8],
        bytes_max: usize,
    ) -> Result<bool, StateError> {
        let mut options = ReadOptions::default();
        if !end.is_empty() {
            options.set_iterate_upper_bound(end.to_vec());
        }
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_DATA),
            options,
            IteratorMode::From(start, Direction::Forward),
        );
        let mut bytes = 0usize;
        for item in iter {
            let (key, value) = item?;
            bytes += key.len() + value.len();
            if bytes > bytes_max {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The store id this data directory belongs to, once assigned.
    pub fn store_id(&self) -> Result<Option<u64>, StateError> {
        match self.db.get_cf(self.cf(CF_META), STORE_ID_KEY)? {
            None => Ok(None),
            Some(raw) => {
                let raw: [u8; 8] = raw[..].try_into().map_err(|_| StateError::CorruptMeta {
                    range: RangeId(0),
                    what: "store id is not 8 bytes",
                })?;
                Ok(Some(u64::from_be_bytes(raw)))
            }
        }
    }

    /// Durably records the store id of this data directory.
    pub fn set_store_id(&self, id: u64) -> Result<(), StateError> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_META), STORE_ID_KEY, id.to_be_bytes(), &options)?;
        Ok(())
    }
}

/// Writes of many ranges applied together, with each range's new applied position.
/// Reads through [`ApplyBatch::get`] see the batch's own earlier writes, so a
/// compare-and-swap after a put of the same key in one batch reads the put.
///
/// A put or delete goes into the `WriteBatch` only (RocksDB copies it there once). The
/// index of what the batch's writes left (`written`) is built from the batch the first
/// time something reads through it or deletes a span, and kept up to date from then
/// on: a batch of plain puts, the common case, copies no key or value of its own.
pub struct ApplyBatch<'a> {
    state: &'a StateMachine,
    data: &'a rocksdb::ColumnFamily,
    /// Data writes only, until `commit` adds the applied positions (so `written` can
    /// be rebuilt from it).
    batch: WriteBatch,
    applied: Vec<(RangeId, ApplyState)>,
    /// Session records to write (`Some`) or delete (`None`), added at `commit`.
    sessions: Vec<([u8; 25], Option<Vec<u8>>)>,
    /// Range descriptors a membership change applied, added at `commit`.
    descriptors: Vec<(RangeId, Vec<u8>)>,
    written: Option<HashMap<Vec<u8>, Option<Vec<u8>>>>,
    deleted_spans: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Collects a data-only `WriteBatch`'s puts and deletes, the last one per key winning.
struct WrittenIndex(HashMap<Vec<u8>, Option<Vec<u8>>>);

impl rocksdb::WriteBatchIteratorCf for WrittenIndex {
    fn put_cf(&mut self, _cf_id: u32, key: &[u8], value: &[u8]) {
        self.0.insert(key.to_vec(), Some(value.to_vec()));
    }

    fn delete_cf(&mut self, _cf_id: u32, key: &[u8]) {
        self.0.insert(key.to_vec(), None);
    }

    fn merge_cf(&mut self, _cf_id: u32, _key: &[u8], _value: &[u8]) {
        unreachable!("apply batches never merge");
    }
}

impl ApplyBatch<'_> {
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.batch.put_cf(self.data, key, value);
        if let Some(written) = &mut self.written {
            written.insert(key.to_vec(), Some(value.to_vec()));
        }
    }

    pub fn delete(&mut self, key: &[u8]) {
        self.batch.delete_cf(self.data, key);
        if let Some(written) = &mut self.written {
            written.insert(key.to_vec(), None);
        }
    }

    /// Deletes `[start, end)`; `end` must be non-empty (ranges bound it).
    pub fn delete_range(&mut self, start: &[u8], end: &[u8]) {
        // Built before the span goes in: iterating a batch does not report spans.
        let written = self.written();
        written.retain(|key, _| !(key.as_slice() >= start && key.as_slice() < end));
        self.batch.delete_range_cf(self.data, start, end);
        self.deleted_spans.push((start.to_vec(), end.to_vec()));
    }

    /// The index of the batch's writes, built on first use.
    fn written(&mut self) -> &mut HashMap<Vec<u8>, Option<Vec<u8>>> {
        let batch = &self.batch;
        self.written.get_or_insert_with(|| {
            let mut index = WrittenIndex(HashMap::new());
            batch.iterate_cf(&mut index);
            index.0
        })
    }

    /// The value of `key` as this batch would leave it.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(value) = self.written().get(key) {
            return Ok(value.clone());
        }
        if self
            .deleted_spans
            .iter()
            .any(|(start, end)| key >= start.as_slice() && key < end.as_slice())
        {
            return Ok(None);
        }
        self.state.get(key)
    }

    /// Records `state` as `range`'s applied position, in this batch.
    pub fn set_apply_state(&mut self, range: RangeId, state: ApplyState) {
        self.applied.push((range, state));
    }

    /// Records (`Some`) or deletes (`None`) a client session of `range`, in this
    /// batch: with the data its writes applied and the applied index.
    pub fn set_session(&mut self, range: RangeId, session: u128, record: Option<Vec<u8>>) {
        self.sessions.push((session_key(range, session), record));
    }

    /// Records `range`'s descriptor (encoded by the caller) in this batch: a
    /// membership change, with the applied index of the entry that made it.
    pub fn set_descriptor(&mut self, range: RangeId, encoded: Vec<u8>) {
        self.descriptors.push((range, encoded));
    }

    /// Writes the batch atomically, without the WAL: the raft log is the durable
    /// record, and replaying it from the flushed applied index is idempotent.
    pub fn commit(mut self) -> Result<(), StateError> {
        let meta = self.state.cf(CF_META);
        for (key, record) in &self.sessions {
            match record {
                Some(value) => self.batch.put_cf(meta, key, value),
                None => self.batch.delete_cf(meta, key),
            }
        }
        for (range, encoded) in &self.descriptors {
            self.batch.put_cf(meta, descriptor_key(*range), encoded);
        }
        for (range, state) in &self.applied {
            self.batch
                .put_cf(meta, apply_state_key(*range), state.encode());
        }
        if !self.batch.is_empty() {
            self.state.db.write_opt(self.batch, &without_wal())?;
        }
        Ok(())
    }
}

/// Apply writes: no WAL (see the module documentation).
fn without_wal() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.disable_wal(true);
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot's image is taken whole (data of the span only, the range's
    /// sessions, its apply state) and installed in place of what another replica had:
    /// after a reopen the old keys of the span are gone, the image's are there, keys
    /// outside the span untouched.
    #[test]
    fn a_range_image_replaces_the_span_it_was_taken_from() {
        let dir = tempfile::tempdir().unwrap();
        let range = RangeId(3);
        let image = {
            let leader = StateMachine::open(&dir.path().join("leader")).unwrap();
            let mut batch = leader.batch();
            batch.put(b"b1", b"new");
            batch.put(b"b2", b"two");
            batch.put(b"z", b"outside");
            batch.set_session(range, 9, Some(b"session".to_vec()));
            batch.set_apply_state(
                range,
                ApplyState {
                    applied_index: 40,
                    applied_term: 3,
                },
            );
            batch.commit().unwrap();
            leader.range_image(range, b"b", b"c").unwrap()
        };
        assert_eq!(
            image.data,
            vec![
                (b"b1".to_vec(), b"new".to_vec()),
                (b"b2".to_vec(), b"two".to_vec())
            ]
        );
        assert_eq!(image.sessions, vec![(9, b"session".to_vec())]);
        assert_eq!(image.apply_state.applied_index, 40);

        let path = dir.path().join("follower");
        {
            let follower = StateMachine::open(&path).unwrap();
            let mut batch = follower.batch();
            batch.put(b"b0", b"stale");
            batch.put(b"b1", b"old");
            batch.put(b"a", b"left");
            batch.set_session(range, 4, Some(b"gone".to_vec()));
            batch.commit().unwrap();
            follower.flush(true).unwrap();
            follower
                .install_image(range, b"b", b"c", &image, b"descriptor")
                .unwrap();
            assert_eq!(
                follower.durable_apply_state(range).unwrap().applied_index,
                40,
                "durable (flushed) when install_image returns"
            );
            assert!(follower.span_exceeds(b"b", b"c", 5).unwrap());
            assert!(!follower.span_exceeds(b"b", b"c", 100).unwrap());
        }
        let follower = StateMachine::open(&path).unwrap();
        assert_eq!(follower.get(b"b0").unwrap(), None, "stale key of the span");
        assert_eq!(follower.get(b"b1").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(follower.get(b"a").unwrap().as_deref(), Some(&b"left"[..]));
        assert_eq!(follower.sessions(range).unwrap(), image.sessions);
        assert_eq!(follower.apply_state(range).unwrap().applied_index, 40);
        assert_eq!(
            follower.descriptors().unwrap(),
            vec![(range, b"descriptor".to_vec())]
        );
        // An image of a span reaching +infinity.
        let whole = follower.range_image(range, b"", b"").unwrap();
        assert_eq!(whole.data.len(), 3);
    }

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

    /// Session records ride the apply batch: written with it, per range, deleted with
    /// it, and never seen by the batch's own data reads (a CAS reading a user key
    /// that happens to equal a session key).
    #[test]
    fn sessions_commit_with_the_batch_per_range_and_stay_out_of_data() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateMachine::open(dir.path()).unwrap();
        let (left, right) = (RangeId(7), RangeId(8));
        let mut batch = state.batch();
        batch.set_session(left, 1, Some(b"one".to_vec()));
        batch.set_session(left, u128::MAX, Some(b"max".to_vec()));
        batch.set_session(right, 1, Some(b"other".to_vec()));
        let key = session_key(left, 1);
        assert_eq!(batch.get(&key).unwrap(), None);
        batch.set_apply_state(left, at(3));
        assert!(
            state.sessions(left).unwrap().is_empty(),
            "not before commit"
        );
        batch.commit().unwrap();
        assert_eq!(
            state.sessions(left).unwrap(),
            vec![(1, b"one".to_vec()), (u128::MAX, b"max".to_vec())]
        );
        assert_eq!(state.sessions(right).unwrap(), vec![(1, b"other".to_vec())]);
        assert_eq!(state.get(&key).unwrap(), None);

        let mut batch = state.batch();
        batch.set_session(left, 1, None);
        batch.commit().unwrap();
        assert_eq!(
            state.sessions(left).unwrap(),
            vec![(u128::MAX, b"max".to_vec())]
        );
    }

    fn at(index: u64) -> ApplyState {
        ApplyState {
            applied_index: index,
            applied_term: 1,
        }
    }

    /// Applies `puts` to `range` as of `index`, in one batch.
    fn apply_at(state: &StateMachine, range: RangeId, puts: &[(&[u8], &[u8])], index: u64) {
        let mut batch = state.batch();
        for (key, value) in puts {
            batch.put(key, value);
        }
        batch.set_apply_state(range, at(index));
        batch.commit().unwrap();
    }

    #[test]
    fn applies_become_durable_with_the_flush_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateMachine::open(dir.path()).unwrap();
        let range = RangeId(3);
        apply_at(&state, range, &[(b"k", b"v1")], 5);
        assert_eq!(state.apply_state(range).unwrap(), at(5));
        assert_eq!(
            state.durable_apply_state(range).unwrap(),
            ApplyState::default()
        );
        state.flush(true).unwrap();
        assert_eq!(state.durable_apply_state(range).unwrap(), at(5));
        // A later apply is visible at once and durable only after the next flush.
        apply_at(&state, range, &[(b"k", b"v2")], 9);
        assert_eq!(state.get(b"k").unwrap().as_deref(), Some(&b"v2"[..]));
        assert_eq!(state.durable_apply_state(range).unwrap(), at(5));
        state.flush(true).unwrap();
        assert_eq!(state.durable_apply_state(range).unwrap(), at(9));
    }

    /// What a crash leaves: the files of the open database copied as they are (a
    /// crash image) open with the flushed applies only, exactly what
    /// `durable_apply_state` reported, data and applied index together.
    #[test]
    fn a_crash_image_holds_what_durable_apply_state_reported() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateMachine::open(dir.path()).unwrap();
        let range = RangeId(2);
        apply_at(&state, range, &[(b"k", b"flushed")], 5);
        state.flush(true).unwrap();
        let unflushed: &[u8] = b"in the memtable only";
        apply_at(
            &state,
            range,
            &[(b"k", unflushed), (b"other", unflushed)],
            9,
        );
        assert_eq!(state.durable_apply_state(range).unwrap(), at(5));

        let image = tempfile::tempdir().unwrap();
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), image.path().join(file.file_name())).unwrap();
        }
        let crashed = StateMachine::open(image.path()).unwrap();
        assert_eq!(crashed.apply_state(range).unwrap(), at(5));
        assert_eq!(crashed.get(b"k").unwrap().as_deref(), Some(&b"flushed"[..]));
        assert_eq!(crashed.get(b"other").unwrap(), None);
        drop(state);
    }

    /// Flushes write with O_DIRECT where the directory takes it, and the probe
    /// refuses (rather than fails the open) where it cannot write at all.
    #[test]
    fn flushes_work_with_or_without_direct_io() {
        assert!(!direct_io_works(Path::new("/nonexistent/rangekv")));
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        // tmpfs: refuses O_DIRECT on older kernels, takes it on newer ones.
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(shm);
        }
        for dir in &dirs {
            {
                let state = StateMachine::open(dir.path()).unwrap();
                assert_eq!(state.direct_io(), direct_io_works(dir.path()));
                apply_at(&state, RangeId(1), &[(b"k", b"v")], 3);
                state.flush(true).unwrap();
                assert_eq!(
                    state.durable_apply_state(RangeId(1)).unwrap().applied_index,
                    3
                );
            }
            let state = StateMachine::open(dir.path()).unwrap();
            assert_eq!(state.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
            assert!(
                !dir.path().join("DIRECT_IO_PROBE").exists(),
                "the probe leaves no file behind"
            );
        }
    }

    /// The index of a batch's own writes is built late (at the first read or span
    /// delete): what it answers must not depend on when that happened.
    #[test]
    fn reads_through_a_batch_see_every_write_whenever_the_index_is_built() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateMachine::open(dir.path()).unwrap();
        apply_at(&state, RangeId(9), &[(b"old", b"stored")], 1);

        // Index built by a span delete: the puts before it are in it, and the span
        // hides what is stored; a put after the span is seen.
        let mut batch = state.batch();
        batch.set_apply_state(RangeId(3), at(5));
        batch.put(b"k1", b"a");
        batch.delete(b"k2");
        batch.delete_range(b"k1", b"p");
        batch.put(b"k1", b"b");
        assert_eq!(batch.get(b"k1").unwrap().as_deref(), Some(&b"b"[..]));
        assert_eq!(batch.get(b"old").unwrap(), None, "inside the deleted span");
        assert_eq!(batch.get(b"k2").unwrap(), None);

        // Index built by a read, after an applied position was recorded (which must
        // not show up as a data key), and kept up to date after.
        let mut other = state.batch();
        other.put(b"x", b"1");
        other.set_apply_state(RangeId(3), at(6));
        other.delete(b"x");
        assert_eq!(other.get(b"x").unwrap(), None);
        assert_eq!(other.get(&apply_state_key(RangeId(3))).unwrap(), None);
        other.put(b"x", b"2");
        assert_eq!(other.get(b"x").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(other.get(b"old").unwrap().as_deref(), Some(&b"stored"[..]));
        other.commit().unwrap();
        batch.commit().unwrap();
        assert_eq!(state.get(b"k1").unwrap().as_deref(), Some(&b"b"[..]));
        assert_eq!(state.get(b"x").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(state.get(b"old").unwrap(), None);
        assert_eq!(state.apply_state(RangeId(3)).unwrap().applied_index, 5);
    }

    #[test]
    fn batch_reads_its_own_writes_and_commits_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateMachine::open(dir.path()).unwrap();
        let mut batch = state.batch();
        batch.put(b"a", b"1");
        batch.put(b"b", b"2");
        batch.put(b"c", b"3");
        assert_eq!(batch.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(
            state.get(b"a").unwrap(),
            None,
            "nothing visible before commit"
        );
        batch.delete_range(b"b", b"c");
        assert_eq!(batch.get(b"b").unwrap(), None);
        assert_eq!(batch.get(b"c").unwrap().as_deref(), Some(&b"3"[..]));
        batch.set_apply_state(
            RangeId(1),
            ApplyState {
                applied_index: 7,
                applied_term: 1,
            },
        );
        batch.commit().unwrap();
        assert_eq!(state.apply_state(RangeId(1)).unwrap().applied_index, 7);
        let all = state.scan(b"", b"", 10, false).unwrap();
        assert_eq!(
            all,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"c".to_vec(), b"3".to_vec())
            ]
        );
        assert_eq!(state.scan(b"b", b"c", 10, false).unwrap(), vec![]);
        assert_eq!(
            state.scan(b"a", b"", 1, true).unwrap(),
            vec![(b"a".to_vec(), vec![])]
        );
    }

    #[test]
    fn descriptors_and_store_id_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let state = StateMachine::open(dir.path()).unwrap();
            assert_eq!(state.store_id().unwrap(), None);
            state.set_store_id(9).unwrap();
            state.put_descriptor(RangeId(2), b"two").unwrap();
            state.put_descriptor(RangeId(1), b"one").unwrap();
            state
                .apply(
                    RangeId(1),
                    &[],
                    ApplyState {
                        applied_index: 3,
                        applied_term: 1,
                    },
                )
                .unwrap();
        }
        let state = StateMachine::open(dir.path()).unwrap();
        assert_eq!(state.store_id().unwrap(), Some(9));
        assert_eq!(
            state.descriptors().unwrap(),
            vec![(RangeId(1), b"one".to_vec()), (RangeId(2), b"two".to_vec())]
        );
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

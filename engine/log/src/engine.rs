//! The engine's public face: open (with recovery), write batches, read entries, GC.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{
    Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
use std::thread::JoinHandle;

use raft::eraftpb::{Entry, HardState};
use rangekv_types::RangeId;

use crate::file::{FileSystem, SegmentFile};
use crate::format::{self, EncodedEntry, Parsed, Record};
use crate::index::{Fetch, Location, RangeLog};
use crate::writer::{self, Waker};

/// How the writer does its I/O (`log.io` in the store's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogIo {
    /// io_uring where the kernel and the sandbox allow it, else `Sync`. On io_uring, a
    /// lone group (the writer was idle, nothing in flight) is written and synced on
    /// the writer thread, as `Sync` would; groups that overlap go through the ring.
    /// A `write_sync` caller writes and syncs its own group (caller-runs mode, see
    /// `writer::lead`).
    #[default]
    Auto,
    /// io_uring for every group, or fail to open.
    Uring,
    /// `pwrite` + `fdatasync` from the writer thread, and, as in `Auto`, from each
    /// `write_sync` caller for its own group.
    Sync,
}

impl std::str::FromStr for LogIo {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        match raw {
            "auto" => Ok(LogIo::Auto),
            "uring" => Ok(LogIo::Uring),
            "sync" => Ok(LogIo::Sync),
            other => Err(format!("log.io must be auto, uring or sync, not {other:?}")),
        }
    }
}

/// Sizes and limits of the log engine. Units last.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Size of each preallocated segment file.
    pub segment_bytes: u64,
    /// A group stops taking requests past this many bytes (one request always fits).
    pub group_bytes_max: usize,
    /// Groups written and syncing at once; 1 disables pipelining.
    pub pipeline_depth: usize,
    /// Memory for cached recent entries, across all ranges.
    pub cache_bytes_max: usize,
    /// Bytes queued for the writer before `write` blocks its caller.
    pub queue_bytes_max: usize,
    /// Once the segments hold more than this, cold ranges pinning the oldest segment
    /// are rewritten into the newest so it can be deleted.
    pub rewrite_threshold_bytes: u64,
    pub io: LogIo,
    /// Write zeros over each segment prepared ahead of time (writer.rs
    /// `prepare_segment`): the log's syncs then flush data only, not the extent
    /// conversion, at the CPU cost of writing every segment twice. Pays where the disk
    /// is the bottleneck (`bench log`), costs where the CPU is (a co-located YCSB
    /// cluster: −17 % inserts/s); bench/README.md has both.
    pub fill_segments: bool,
    /// Deleted segments kept to be reused as new ones (raft-engine's log recycling):
    /// at most this many, 0 to delete them. A reused segment's blocks are already
    /// written, so its syncs flush data only, as a filled one's do, without writing
    /// anything twice. Each costs `segment_bytes` of disk while it waits.
    pub recycle_segments: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 128 * 1024 * 1024,
            group_bytes_max: 4 * 1024 * 1024,
            pipeline_depth: 2,
            cache_bytes_max: 256 * 1024 * 1024,
            queue_bytes_max: 64 * 1024 * 1024,
            rewrite_threshold_bytes: 2 * 1024 * 1024 * 1024,
            io: LogIo::Auto,
            fill_segments: false,
            recycle_segments: 4,
        }
    }
}

impl LogConfig {
    /// Whether `write_sync` callers write and sync their own groups (`writer::lead`):
    /// all but `log.io = uring`, which sends every group through the ring.
    pub fn caller_runs(&self) -> bool {
        self.io != LogIo::Uring
    }

    /// The largest batch one write accepts: what fits in a segment after its header.
    pub fn batch_bytes_max(&self) -> usize {
        (self.segment_bytes - format::SEGMENT_HEADER_BYTES) as usize
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// A write or sync failed: fatal, the engine has stopped.
    #[error("log I/O failed on {file} at offset {offset}: {source}; the log engine is stopped")]
    Io {
        file: String,
        offset: u64,
        source: Arc<io::Error>,
    },
    /// Replay found a record that fails its checksum or makes no sense, not at the tail.
    #[error("corrupt raft log: {file} at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    /// The engine stopped earlier (see the first error it reported).
    #[error("log engine stopped: {0}")]
    Stopped(String),
    /// The batch cannot be written as asked; nothing of it was written.
    #[error("invalid log write for {range}: {reason}")]
    Invalid { range: RangeId, reason: String },
    #[error("log batch of {bytes} bytes exceeds batch_bytes_max={limit}")]
    TooLarge { bytes: usize, limit: usize },
    #[error("io_uring is not available ({0}); set log.io = auto or sync")]
    UringUnavailable(String),
}

impl LogError {
    pub(crate) fn io(file: String, offset: u64, source: io::Error) -> Self {
        LogError::Io {
            file,
            offset,
            source: Arc::new(source),
        }
    }
}

/// Why a read of a range's log failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("entry compacted")]
    Compacted,
    #[error("entry not in the log yet")]
    Unavailable,
    #[error(transparent)]
    Log(#[from] LogError),
}

/// One change to a range's log, placed in the batch's buffer.
#[derive(Debug)]
pub(crate) enum Update {
    Entries {
        range: RangeId,
        first_index: u64,
        placed: Vec<EncodedEntry>,
        terms: Vec<u64>,
        /// The entries themselves, for the cache; empty when not to be cached.
        cached: Vec<Entry>,
    },
    HardState {
        range: RangeId,
        hard_state: HardState,
    },
    Compaction {
        range: RangeId,
        truncated_index: u64,
        truncated_term: u64,
    },
    Reset {
        range: RangeId,
        index: u64,
        term: u64,
        hard_state: HardState,
    },
    Removal {
        range: RangeId,
    },
}

impl Update {
    pub(crate) fn range(&self) -> RangeId {
        match self {
            Update::Entries { range, .. }
            | Update::HardState { range, .. }
            | Update::Compaction { range, .. }
            | Update::Reset { range, .. }
            | Update::Removal { range } => *range,
        }
    }
}

/// Changes to the logs of any number of ranges, written and synced together.
/// Encoding happens here, on the caller's thread; the writer only concatenates.
#[derive(Debug, Default)]
pub struct LogBatch {
    pub(crate) buf: Vec<u8>,
    pub(crate) updates: Vec<Update>,
}

impl LogBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `entries` (contiguous) to `range`, replacing its entries from
    /// `entries[0].index` on, as raft-rs asks when a follower's log conflicts.
    pub fn append(&mut self, range: RangeId, entries: Vec<Entry>) {
        self.append_inner(range, entries, true);
    }

    pub(crate) fn append_inner(&mut self, range: RangeId, entries: Vec<Entry>, cache: bool) {
        let Some(first) = entries.first() else {
            return;
        };
        let first_index = first.index;
        let placed = format::encode_entries(&mut self.buf, range, &entries);
        let terms = entries.iter().map(|e| e.term).collect();
        self.updates.push(Update::Entries {
            range,
            first_index,
            placed,
            terms,
            cached: if cache { entries } else { Vec::new() },
        });
    }

    pub fn set_hard_state(&mut self, range: RangeId, hard_state: HardState) {
        format::encode_hard_state(&mut self.buf, range, &hard_state);
        self.updates.push(Update::HardState { range, hard_state });
    }

    /// Drops `range`'s entries up to `truncated_index`, whose term is
    /// `truncated_term`. Past the last entry, the log restarts after it (snapshot,
    /// bootstrap).
    pub fn compact_to(&mut self, range: RangeId, truncated_index: u64, truncated_term: u64) {
        format::encode_compaction_point(&mut self.buf, range, truncated_index, truncated_term);
        self.updates.push(Update::Compaction {
            range,
            truncated_index,
            truncated_term,
        });
    }

    /// Restarts `range`'s log after `index` (of `term`), every entry dropped, with
    /// `hard_state`: a snapshot was installed. One record (see `format`).
    pub fn reset(&mut self, range: RangeId, index: u64, term: u64, hard_state: HardState) {
        format::encode_reset(&mut self.buf, range, index, term, &hard_state);
        self.updates.push(Update::Reset {
            range,
            index,
            term,
            hard_state,
        });
    }

    /// Forgets `range` entirely (its replica left this store).
    pub fn remove_range(&mut self, range: RangeId) {
        format::encode_range_removal(&mut self.buf, range);
        self.updates.push(Update::Removal { range });
    }

    pub fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }

    /// Encoded size.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The encoded records, not yet signed (the writer signs them for their segment):
    /// for the log bench's `device-floor-encoded`, which writes them the floor's way.
    pub fn encoded(&self) -> &[u8] {
        &self.buf
    }
}

/// Called once when a batch is durable (or failed).
pub type Completion = Box<dyn FnOnce(Result<(), LogError>) + Send>;

/// Who learns that a request is durable.
pub(crate) enum Done {
    /// A callback, run in submission order (see `LogEngine::write`).
    Call(Completion),
    /// A thread blocked in `write_sync`. It learns success from the durable watermark
    /// (`Shared::durable_seq`) and an error from its slot, so a group's waiters are all
    /// woken by one broadcast instead of one wake-up each.
    Wait(Arc<OnceLock<LogError>>),
}

pub(crate) struct Request {
    pub batch: LogBatch,
    pub done: Done,
    /// Queue order, from 1; 0 for the writer's own requests (cold-range rewrites).
    pub seq: u64,
}

#[derive(Default)]
pub(crate) struct Queue {
    pub requests: VecDeque<Request>,
    pub bytes: usize,
    pub shutdown: bool,
    /// Queued requests with a callback (`Done::Call`): in caller-runs mode, the writer
    /// thread forms a group only for them.
    pub calls: usize,
    /// The last sequence number given to a request.
    pub last_seq: u64,
}

/// Counters since open, for benchmarks and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    pub requests: u64,
    pub groups: u64,
    pub syncs: u64,
    pub bytes: u64,
    /// Segments started in a reused file (`LogConfig::recycle_segments`).
    pub segments_reused: u64,
    /// Cold ranges rewritten forward (`LogConfig::rewrite_threshold_bytes`).
    pub ranges_rewritten: u64,
    /// Groups written and synced on the writer thread rather than through io_uring
    /// (lone groups, `log.io = auto`).
    pub inline_groups: u64,
    /// Inline groups during which another request arrived; each sends the next lone
    /// groups through the ring for a while.
    pub inline_overlaps: u64,
    /// Groups written and synced by a `write_sync` caller (caller-runs mode).
    pub caller_groups: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub groups: AtomicU64,
    pub syncs: AtomicU64,
    pub bytes: AtomicU64,
    pub segments_reused: AtomicU64,
    pub ranges_rewritten: AtomicU64,
    pub inline_groups: AtomicU64,
    pub inline_overlaps: AtomicU64,
    pub caller_groups: AtomicU64,
}

/// A map keyed by range: Fx hashing (a multiply per u64 key) instead of SipHash, which
/// took ~3 % of a busy log's CPU in the index updates of every group.
pub(crate) type RangeMap<V> = HashMap<RangeId, V, rustc_hash::FxBuildHasher>;

pub(crate) struct Shared {
    pub config: LogConfig,
    pub fs: Arc<dyn FileSystem>,
    pub ranges: RwLock<RangeMap<Arc<Mutex<RangeLog>>>>,
    pub segments: RwLock<BTreeMap<u64, Arc<dyn SegmentFile>>>,
    /// Deleted segments waiting to be reused, by file name, oldest first.
    pub free_segments: Mutex<VecDeque<String>>,
    /// The segment being written; GC never touches it or anything newer.
    pub active_segment: AtomicU64,
    pub queue: Mutex<Queue>,
    pub queue_not_full: Condvar,
    pub waker: Waker,
    pub failed: AtomicBool,
    pub failure: Mutex<Option<LogError>>,
    pub counters: Counters,
    pub gc: Mutex<()>,
    /// Queue length at which a producer wakes a sleeping writer: 1, or while the
    /// writer holds a group back, the size it waits for.
    pub wake_at_queued: std::sync::atomic::AtomicUsize,
    /// Notices sent to the completion thread and not yet delivered.
    pub notices_pending: std::sync::atomic::AtomicUsize,
    /// Every request with a sequence number up to this one is durable or has failed
    /// (a failed request's waiter finds the error in its slot first).
    pub durable_seq: AtomicU64,
    /// Bumped after `durable_seq` moves or a waiter's slot is filled; `write_sync`
    /// waiters sleep on it (a futex).
    pub durable_epoch: AtomicU32,
    /// Threads inside `write_sync`'s wait: the broadcast is skipped when there are none.
    pub sync_waiters: std::sync::atomic::AtomicUsize,
    /// Every request with a sequence number up to this one has left the queue (is in
    /// a group, or was refused): its `write_sync` caller only waits.
    pub taken_seq: AtomicU64,
    /// A `write_sync` caller is forming a group (see `writer::lead`).
    pub leading: AtomicBool,
    /// A `write_sync` caller held its group back (see `Writer::hold`) and waits to
    /// be woken when the last group's waiters have all been told.
    pub caller_held: AtomicBool,
    /// The threads that run completions: the completion thread and the writer.
    pub completion_thread: std::sync::OnceLock<std::thread::ThreadId>,
    pub writer_thread: std::sync::OnceLock<std::thread::ThreadId>,
    /// Cached bytes dropped by `LogEngine::release_cache` (outside the writer's lock),
    /// not yet taken off the writer's count.
    pub cache_released: std::sync::atomic::AtomicUsize,
}

/// An entry from the cache, or one to read: its index, location and segment file
/// (None if the segment was already gone when resolved).
pub(crate) enum Resolved {
    Entry(Entry),
    Read(u64, Location, Option<Arc<dyn SegmentFile>>),
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every lock here guards plain data whose invariants hold between statements.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn segment_name(sequence: u64) -> String {
    format!("{sequence:016x}.rlog")
}

/// Where a deleted segment waits to be reused (its old sequence keeps names unique).
pub(crate) fn free_segment_name(sequence: u64) -> String {
    format!("{sequence:016x}.rlog.free")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".rlog")?;
    (hex.len() == 16).then_some(())?;
    u64::from_str_radix(hex, 16).ok()
}

impl Shared {
    pub fn range(&self, range: RangeId) -> Option<Arc<Mutex<RangeLog>>> {
        read(&self.ranges).get(&range).cloned()
    }

    pub fn range_or_insert(&self, range: RangeId) -> Arc<Mutex<RangeLog>> {
        if let Some(log) = self.range(range) {
            return log;
        }
        write(&self.ranges).entry(range).or_default().clone()
    }

    /// One notice counted in `notices_pending` was delivered. The last one ends a
    /// writer's or caller's hold (see `Writer::hold`): wake whoever held. The writer
    /// only if it raised its wake-up threshold (below it, every request wakes it):
    /// with blocking callers writing their own groups it sleeps through their groups.
    pub fn notice_delivered(&self) {
        if self.notices_pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            if self.wake_at_queued.load(Ordering::SeqCst) > 1 {
                self.waker.wake_if_sleeping();
            }
            if self.caller_held.swap(false, Ordering::SeqCst) {
                self.durable_epoch.fetch_add(1, Ordering::SeqCst);
                atomic_wait::wake_all(&self.durable_epoch);
            }
        }
    }

    pub fn on_completion_thread(&self) -> bool {
        let me = std::thread::current().id();
        self.completion_thread.get() == Some(&me) || self.writer_thread.get() == Some(&me)
    }

    pub fn failure(&self) -> LogError {
        match &*lock(&self.failure) {
            Some(error) => LogError::Stopped(error.to_string()),
            None => LogError::Stopped("the log engine shut down".into()),
        }
    }

    /// Resolves what `RangeLog::fetch` returned into entries and disk reads. Call it
    /// while holding the range's lock: the segment files are taken then, so GC or a
    /// rewrite that runs after the lock is released cannot pull them away.
    pub fn resolve(&self, fetches: Vec<Fetch>) -> Vec<Resolved> {
        let segments = read(&self.segments);
        fetches
            .into_iter()
            .map(|fetch| match fetch {
                Fetch::Cached(entry) => Resolved::Entry(entry),
                Fetch::Disk(index, at) => {
                    Resolved::Read(index, at, segments.get(&at.segment).cloned())
                }
            })
            .collect()
    }

    /// Reads what `resolve` returned, checking every entry against its checksum.
    pub fn read_resolved(&self, resolved: Vec<Resolved>) -> Result<Vec<Entry>, LogError> {
        let mut entries = Vec::with_capacity(resolved.len());
        for item in resolved {
            entries.push(match item {
                Resolved::Entry(entry) => entry,
                Resolved::Read(index, at, file) => self.read_entry(index, at, file)?,
            });
        }
        Ok(entries)
    }

    /// Reads one entry from disk, checking it against the checksum taken at write.
    fn read_entry(
        &self,
        index: u64,
        at: Location,
        file: Option<Arc<dyn SegmentFile>>,
    ) -> Result<Entry, LogError> {
        let name = segment_name(at.segment);
        let Some(file) = file else {
            return Err(LogError::Corrupt {
                file: self.fs.describe(&name),
                offset: at.offset,
                reason: format!("segment of entry {index} is gone"),
            });
        };
        let mut raw = vec![0u8; at.len as usize];
        file.read_exact_at(&mut raw, at.offset)
            .map_err(|e| LogError::io(self.fs.describe(&name), at.offset, e))?;
        let corrupt = |reason: &str| LogError::Corrupt {
            file: self.fs.describe(&name),
            offset: at.offset,
            reason: format!("entry {index}: {reason}"),
        };
        if crc32c::crc32c(&raw) != at.crc {
            return Err(corrupt("checksum mismatch on read"));
        }
        format::decode_entry(&raw, index).map_err(corrupt)
    }

    /// Deletes every segment older than the oldest one a range still needs.
    pub fn collect_garbage(&self) -> usize {
        let _one_at_a_time = lock(&self.gc);
        let active = self.active_segment.load(Ordering::SeqCst);
        let logs: Vec<_> = read(&self.ranges).values().cloned().collect();
        let oldest_needed = logs
            .iter()
            .filter_map(|log| lock(log).pinned_segment())
            .min()
            .unwrap_or(active)
            .min(active);
        let doomed: Vec<u64> = read(&self.segments)
            .range(..oldest_needed)
            .map(|(sequence, _)| *sequence)
            .collect();
        let mut deleted = 0;
        for sequence in doomed {
            let name = segment_name(sequence);
            let Some(file) = write(&self.segments).remove(&sequence) else {
                continue;
            };
            // No reader finds the file any more. One that found it earlier (its handle
            // is not the only one left) may still read it: a deleted file keeps its
            // bytes for it, a reused one would not.
            if Arc::strong_count(&file) == 1 && self.recyclable(file.as_ref()) {
                let free = free_segment_name(sequence);
                match self.fs.rename(&name, &free) {
                    Ok(()) => {
                        lock(&self.free_segments).push_back(free);
                        deleted += 1;
                        continue;
                    }
                    // The file may still be there: delete it instead.
                    Err(error) => {
                        tracing::warn!(file = %self.fs.describe(&name), %error, "could not keep log segment for reuse; deleting it");
                    }
                }
            }
            match self.fs.remove(&name) {
                Ok(()) => {}
                // Gone already: a rename or removal above went through, and only the
                // directory sync after it failed. A crash could bring the name back,
                // which replay and the next GC handle like any segment not yet deleted.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    // Stop here: deletion must stay a prefix (a later segment may hold
                    // the removal record that cancels this one's); the next GC retries.
                    tracing::warn!(file = %self.fs.describe(&name), %error, "could not delete log segment");
                    write(&self.segments).insert(sequence, file);
                    break;
                }
            }
            deleted += 1;
        }
        deleted
    }
}

impl Shared {
    /// Whether a deleted segment is worth keeping for reuse: room in the pool, and a
    /// whole segment of the signed format (records of the unsigned one would read as
    /// valid in a reused file).
    fn recyclable(&self, file: &dyn SegmentFile) -> bool {
        if lock(&self.free_segments).len() >= self.config.recycle_segments {
            return false;
        }
        let mut header = [0u8; format::SEGMENT_HEADER_BYTES as usize];
        let signed = file.read_exact_at(&mut header, 0).is_ok()
            && format::decode_segment_header(&header)
                .is_ok_and(|h| h.version == format::FORMAT_VERSION);
        signed && file.len().is_ok_and(|len| len == self.config.segment_bytes)
    }

    /// A deleted segment to reuse, if one waits.
    pub fn take_free_segment(&self) -> Option<String> {
        lock(&self.free_segments).pop_front()
    }
}

struct Handle {
    shared: Arc<Shared>,
    /// The write state, shared by the writer thread and `write_sync` callers.
    core: Arc<Mutex<writer::Writer>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    io_name: &'static str,
}

impl Drop for Handle {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.waker.wake();
        if let Some(thread) = lock(&self.writer).take() {
            let _ = thread.join();
        }
    }
}

/// The log engine of one store. Cheap to clone; the writer stops when the last clone
/// is dropped, after finishing what was queued.
#[derive(Clone)]
pub struct LogEngine {
    handle: Arc<Handle>,
}

/// What replay found, before the writer starts.
struct Recovered {
    ranges: RangeMap<Arc<Mutex<RangeLog>>>,
    segments: BTreeMap<u64, Arc<dyn SegmentFile>>,
    next_sequence: u64,
}

/// Replays every segment in order.
///
/// Pass 1 parses every record (checking every crc) and finds each range's final
/// compaction point; pass 2 rebuilds the index knowing it. GC deletes old segments, so
/// the records of a range's compacted entries may be gone while the compaction record
/// that makes them dead comes later in the log: knowing the final point up front lets
/// replay tell such a legitimate hole from a lost live entry.
fn replay(fs: &dyn FileSystem) -> Result<Recovered, LogError> {
    let list = fs.list().map_err(|e| LogError::io(fs.describe(""), 0, e))?;
    let mut sequences: Vec<(u64, String)> = list
        .into_iter()
        .filter_map(|name| parse_segment_name(&name).map(|seq| (seq, name)))
        .collect();
    sequences.sort();
    if let Some((sequence, name)) = sequences.last() {
        // The writer continues after it: refuse a number it cannot count past.
        if *sequence > format::SEQUENCE_MAX {
            return Err(LogError::Corrupt {
                file: fs.describe(name),
                offset: 0,
                reason: format!(
                    "segment number {sequence} is past the largest {}",
                    format::SEQUENCE_MAX
                ),
            });
        }
    }
    let mut records: Vec<(u64, usize, Record)> = Vec::new();
    let mut segments = BTreeMap::new();
    let count = sequences.len();
    for (position, (sequence, name)) in sequences.iter().enumerate() {
        let last = position + 1 == count;
        let described = fs.describe(name);
        let file = fs
            .open(name)
            .map_err(|e| LogError::io(described.clone(), 0, e))?;
        let len = file
            .len()
            .map_err(|e| LogError::io(described.clone(), 0, e))?;
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|e| LogError::io(described.clone(), 0, e))?;
        let corrupt = |offset: usize, reason: String| LogError::Corrupt {
            file: described.clone(),
            offset: offset as u64,
            reason,
        };
        let signature = match format::decode_segment_header(&bytes) {
            Ok(found) if found.sequence == *sequence => found.signature(),
            Ok(found) => {
                return Err(corrupt(
                    0,
                    format!("header says segment {}", found.sequence),
                ));
            }
            Err(why) if last => {
                // A crash while creating the newest segment: it holds nothing.
                tracing::warn!(file = %described, why, "removing half-created log segment");
                fs.remove(name)
                    .map_err(|e| LogError::io(described.clone(), 0, e))?;
                continue;
            }
            Err(why) => return Err(corrupt(0, why.to_string())),
        };
        let mut at = format::SEGMENT_HEADER_BYTES as usize;
        loop {
            // Bounds come from the segment's own length, not from today's configuration.
            match format::parse_record(&bytes, at, usize::MAX, signature) {
                Parsed::Record(record, next) => {
                    records.push((*sequence, at, record));
                    at = next;
                }
                Parsed::End => break,
                Parsed::Invalid(why) if last => {
                    tracing::warn!(file = %described, offset = at, why, "truncating torn tail of the log");
                    break;
                }
                Parsed::Invalid(why) | Parsed::Malformed(why) => {
                    return Err(corrupt(at, why.to_string()))
                }
            }
        }
        if last && (at as u64) < len {
            // Cut the tail (torn bytes, preallocated zeros, or the records of a reused
            // segment's earlier life) so that this segment,
            // no longer the newest once a new one starts, ends exactly at its records.
            file.truncate(at as u64)
                .map_err(|e| LogError::io(described.clone(), at as u64, e))?;
        }
        segments.insert(*sequence, file);
    }

    // Pass 1: each range's final compaction point (since its last removal).
    let mut floors: HashMap<RangeId, (u64, u64, u64)> = HashMap::new();
    for (segment, _, record) in &records {
        match record {
            Record::CompactionPoint {
                range,
                truncated_index,
                truncated_term,
            } => {
                let floor = floors.entry(*range).or_insert((0, 0, *segment));
                if *truncated_index >= floor.0 {
                    *floor = (*truncated_index, *truncated_term, *segment);
                }
            }
            Record::RangeRemoval { range } => {
                floors.remove(range);
            }
            Record::Reset {
                range, index, term, ..
            } => {
                floors.insert(*range, (*index, *term, *segment));
            }
            _ => {}
        }
    }

    // Pass 2: the index.
    let mut ranges: HashMap<RangeId, RangeLog> = HashMap::new();
    let start = |range: &RangeId| match floors.get(range) {
        Some((index, term, segment)) => RangeLog::replay_start(*index, *term, Some(*segment)),
        None => RangeLog::default(),
    };
    for (segment, _, record) in records {
        match record {
            Record::Entries {
                range,
                first_index,
                entries,
            } => {
                let locations: Vec<Location> = entries
                    .iter()
                    .map(|(term, placed)| Location {
                        segment,
                        offset: placed.offset as u64,
                        len: placed.len,
                        crc: placed.crc,
                        term: *term,
                    })
                    .collect();
                let floor = floors.get(&range).map_or(0, |f| f.0);
                ranges
                    .entry(range)
                    .or_insert_with(|| start(&range))
                    .replay_append(first_index, &locations, floor);
            }
            Record::HardState { range, hard_state } => {
                ranges
                    .entry(range)
                    .or_insert_with(|| start(&range))
                    .set_hard_state(hard_state, segment);
            }
            Record::CompactionPoint { range, .. } => {
                ranges.entry(range).or_insert_with(|| start(&range));
            }
            Record::RangeRemoval { range } => {
                ranges.remove(&range);
            }
            Record::Reset {
                range, hard_state, ..
            } => {
                let mut log = start(&range);
                log.set_hard_state(hard_state, segment);
                ranges.insert(range, log);
            }
        }
    }
    for (range, log) in ranges.iter_mut() {
        let (floor, term, _) = floors.get(range).copied().unwrap_or((0, 0, 0));
        if log.truncated_index != floor {
            return Err(LogError::Corrupt {
                file: fs.describe(""),
                offset: 0,
                reason: format!(
                    "{range}: entries {}..={} are missing from the log",
                    floor + 1,
                    log.truncated_index
                ),
            });
        }
        log.truncated_term = term;
    }
    let next_sequence = sequences.last().map_or(1, |(seq, _)| seq + 1);
    Ok(Recovered {
        ranges: ranges
            .into_iter()
            .map(|(range, log)| (range, Arc::new(Mutex::new(log))))
            .collect(),
        segments,
        next_sequence,
    })
}

/// The deleted segments kept for reuse, oldest first; deletes those past
/// `config.recycle_segments`. Moves `next_sequence` past every one of them, so that no
/// new segment shares a sequence number (and a record signature) with the earlier life
/// of the file it reuses.
fn free_segments(
    fs: &dyn FileSystem,
    config: &LogConfig,
    next_sequence: &mut u64,
) -> Result<VecDeque<String>, LogError> {
    let list = fs.list().map_err(|e| LogError::io(fs.describe(""), 0, e))?;
    let mut free: Vec<(u64, String)> = list
        .into_iter()
        .filter_map(|name| {
            let hex = name.strip_suffix(".rlog.free")?;
            (hex.len() == 16).then_some(())?;
            Some((u64::from_str_radix(hex, 16).ok()?, name))
        })
        .collect();
    free.sort();
    let keep = free
        .iter()
        .filter(|(sequence, _)| *sequence < format::SEQUENCE_MAX)
        .count()
        .min(config.recycle_segments);
    let mut kept = VecDeque::new();
    for (position, (sequence, name)) in free.into_iter().enumerate() {
        if position < keep {
            *next_sequence = (*next_sequence).max(sequence + 1);
            kept.push_back(name);
        } else {
            fs.remove(&name)
                .map_err(|e| LogError::io(fs.describe(&name), 0, e))?;
        }
    }
    Ok(kept)
}

impl LogEngine {
    /// Opens the log in `fs`, replaying it, and starts the writer.
    pub fn open(fs: Arc<dyn FileSystem>, config: LogConfig) -> Result<LogEngine, LogError> {
        assert!(
            config.pipeline_depth >= 1,
            "pipeline_depth is at least 1 (1 = no pipelining)"
        );
        assert!(
            config.segment_bytes > format::SEGMENT_HEADER_BYTES + 4096,
            "segment_bytes leaves room for records"
        );
        writer::remove_temporary_segments(fs.as_ref())?;
        let mut recovered = replay(fs.as_ref())?;
        let free_segments = free_segments(fs.as_ref(), &config, &mut recovered.next_sequence)?;
        let backend = writer::choose_backend(&config, fs.as_ref())?;
        let io_name = backend.name();
        tracing::info!(
            io = io_name,
            mode = backend.mode(),
            segments = recovered.segments.len(),
            ranges = recovered.ranges.len(),
            "raft log engine opened"
        );
        let waker = Waker::new().map_err(|e| LogError::io("eventfd".into(), 0, e))?;
        let shared = Arc::new(Shared {
            config,
            fs,
            ranges: RwLock::new(recovered.ranges),
            segments: RwLock::new(recovered.segments),
            free_segments: Mutex::new(free_segments),
            active_segment: AtomicU64::new(recovered.next_sequence),
            queue: Mutex::new(Queue::default()),
            queue_not_full: Condvar::new(),
            waker,
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            counters: Counters::default(),
            gc: Mutex::new(()),
            completion_thread: std::sync::OnceLock::new(),
            writer_thread: std::sync::OnceLock::new(),
            notices_pending: std::sync::atomic::AtomicUsize::new(0),
            durable_seq: AtomicU64::new(0),
            durable_epoch: AtomicU32::new(0),
            sync_waiters: std::sync::atomic::AtomicUsize::new(0),
            taken_seq: AtomicU64::new(0),
            caller_held: AtomicBool::new(false),
            leading: AtomicBool::new(false),
            wake_at_queued: std::sync::atomic::AtomicUsize::new(1),
            cache_released: std::sync::atomic::AtomicUsize::new(0),
        });
        let writer =
            writer::Writer::start(shared.clone(), backend.as_ref(), recovered.next_sequence)?;
        let core = Arc::new(Mutex::new(writer));
        let thread_core = core.clone();
        let thread = std::thread::Builder::new()
            .name("rangekv-log-writer".into())
            .spawn(move || writer::run(thread_core, backend))
            .map_err(|e| LogError::io("writer thread".into(), 0, e))?;
        Ok(LogEngine {
            handle: Arc::new(Handle {
                shared,
                core,
                writer: Mutex::new(Some(thread)),
                io_name,
            }),
        })
    }

    /// Waits for whatever holds the write state's lock (a group being formed or
    /// completed) and holds it: tests order events with it.
    #[cfg(test)]
    pub(crate) fn lock_writer_for_test(&self) -> MutexGuard<'_, writer::Writer> {
        lock(&self.handle.core)
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// Which writer runs: `"io_uring"` or `"sync"`.
    pub fn io_backend(&self) -> &'static str {
        self.handle.io_name
    }

    /// Queues `batch`; `done` runs on one of the engine's threads once it is durable, or with the
    /// error that stopped the engine. Blocks while `queue_bytes_max` bytes are queued.
    /// Completions run in submission order; they must be quick and must not wait for
    /// the engine (hand the result to another thread).
    pub fn write(&self, batch: LogBatch, done: impl FnOnce(Result<(), LogError>) + Send + 'static) {
        if let Err((Done::Call(done), error)) = self.enqueue(batch, Done::Call(Box::new(done))) {
            done(Err(error));
        }
    }

    /// Queues `request`, giving it the next sequence number; or hands it back with
    /// the reason it cannot be queued.
    fn enqueue(&self, batch: LogBatch, done: Done) -> Result<u64, (Done, LogError)> {
        let shared = self.shared();
        let limit = shared.config.batch_bytes_max();
        if batch.bytes() > limit {
            let bytes = batch.bytes();
            return Err((done, LogError::TooLarge { bytes, limit }));
        }
        // An empty batch is queued too: its completion must not overtake earlier ones
        // (raft-rs counts every Ready up to the one it is told is persisted).
        let mut queue = lock(&shared.queue);
        // A completion that writes again must not wait for its own thread.
        let may_block = !shared.on_completion_thread();
        while may_block
            && queue.bytes > shared.config.queue_bytes_max
            && !queue.shutdown
            && !shared.failed.load(Ordering::SeqCst)
        {
            queue = shared
                .queue_not_full
                .wait(queue)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if queue.shutdown || shared.failed.load(Ordering::SeqCst) {
            drop(queue);
            return Err((done, shared.failure()));
        }
        // In caller-runs mode a `write_sync` caller writes its own group: the writer
        // thread is not woken for it.
        let call = matches!(done, Done::Call(_));
        let wake = call || !shared.config.caller_runs();
        queue.bytes += batch.bytes();
        queue.calls += usize::from(call);
        queue.last_seq += 1;
        let seq = queue.last_seq;
        queue.requests.push_back(Request { batch, done, seq });
        let queued = queue.requests.len();
        drop(queue);
        // While the writer holds a group back it wants waking only once enough
        // requests are queued (see `Writer::hold`), not once per request.
        if wake && queued >= shared.wake_at_queued.load(Ordering::SeqCst) {
            shared.waker.wake_if_sleeping();
        }
        Ok(seq)
    }

    /// Writes `batch` and waits until it is durable.
    ///
    /// With `log.io` = `auto` or `sync`, the calling thread itself forms, writes and
    /// syncs a group of its request and whatever is queued with it, when the pipeline
    /// has room and no other caller is forming one (`writer::lead`); otherwise (or with
    /// `uring`) it waits for another thread's group to carry its request. Either way it
    /// returns only once every group before its own is durable too.
    ///
    /// The waiters of a group are woken together, by one futex broadcast when the group
    /// is durable, rather than one by one: with 64 threads each waiting on its own
    /// append, waking them one at a time cost as long as the group's fdatasync.
    /// Callbacks of earlier `write`s may still be running when this returns.
    ///
    /// # Panics
    /// When called from a completion (on the completion thread), which would wait for
    /// itself.
    pub fn write_sync(&self, batch: LogBatch) -> Result<(), LogError> {
        let shared = self.shared();
        assert!(
            !shared.on_completion_thread(),
            "write_sync is never called from a log completion: it would wait for itself"
        );
        let slot = Arc::new(OnceLock::new());
        let seq = self
            .enqueue(batch, Done::Wait(slot.clone()))
            .map_err(|(_, error)| error)?;
        shared.sync_waiters.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            let epoch = shared.durable_epoch.load(Ordering::SeqCst);
            let durable = shared.durable_seq.load(Ordering::SeqCst);
            // The watermark read before the slot: a refused request's error is set
            // before the watermark passes it, so a watermark past this request, read
            // first, means its slot is seen if it was filled. (Reading the watermark
            // again after the slot let a refused batch through as `Ok` when it was
            // refused and passed between the two reads.)
            if let Some(error) = slot.get() {
                break Err(error.clone());
            }
            // A request made durable just before a later failure still succeeded.
            let failed = shared.failed.load(Ordering::SeqCst);
            if durable >= seq {
                // The writer counted this waiter as one still being woken (see
                // `Writer::hold`).
                shared.notice_delivered();
                break Ok(());
            }
            if failed {
                break Err(shared.failure());
            }
            // While this request is queued, write a group of it and what is queued
            // with it here (unless another caller or the writer does first), or wait
            // for the next completion and look again.
            if shared.config.caller_runs()
                && seq > shared.taken_seq.load(Ordering::SeqCst)
                && writer::lead(&self.handle.core, shared)
            {
                continue;
            }
            atomic_wait::wait(&shared.durable_epoch, epoch);
        };
        shared.sync_waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Drops `range`'s cached entries up to `through` (inclusive): its user will not
    /// read them again soon (a raft worker: applied here and, on a leader, held by
    /// every follower); a read of them then goes to the segment files. The cache then
    /// holds only what is in flight, so its memory is freed and reused while hot,
    /// instead of filling `cache_bytes_max` with fresh pages that each cost a fault
    /// and a zeroing. The cache stays a suffix of the log.
    pub fn release_cache(&self, range: RangeId, through: u64) {
        let shared = self.shared();
        if let Some(log) = shared.range(range) {
            let freed = lock(&log).evict_cache_through(through);
            if freed > 0 {
                shared.cache_released.fetch_add(freed, Ordering::Relaxed);
            }
        }
    }

    /// Drops `range`'s entries before `first_index` (they are applied and no longer
    /// needed), durably.
    pub fn compact(&self, range: RangeId, first_index: u64) -> Result<(), LogError> {
        let truncated_index = first_index.saturating_sub(1);
        let term = self
            .term(range, truncated_index)
            .map_err(|e| LogError::Invalid {
                range,
                reason: format!("cannot compact to {first_index}: {e}"),
            })?;
        let mut batch = LogBatch::new();
        batch.compact_to(range, truncated_index, term);
        self.write_sync(batch)
    }

    /// The largest batch [`LogEngine::write`] accepts.
    pub fn batch_bytes_max(&self) -> usize {
        self.shared().config.batch_bytes_max()
    }

    /// The error that stopped the engine, if it has stopped on one.
    pub fn failure(&self) -> Option<LogError> {
        lock(&self.shared().failure).clone()
    }

    pub fn first_index(&self, range: RangeId) -> u64 {
        self.shared()
            .range(range)
            .map_or(1, |log| lock(&log).first_index())
    }

    pub fn last_index(&self, range: RangeId) -> u64 {
        self.shared()
            .range(range)
            .map_or(0, |log| lock(&log).last_index())
    }

    pub fn hard_state(&self, range: RangeId) -> HardState {
        self.shared()
            .range(range)
            .map(|log| lock(&log).hard_state.clone())
            .unwrap_or_default()
    }

    pub fn term(&self, range: RangeId, index: u64) -> Result<u64, ReadError> {
        let Some(log) = self.shared().range(range) else {
            return if index == 0 {
                Ok(0)
            } else {
                Err(ReadError::Unavailable)
            };
        };
        let log = lock(&log);
        log.term(index).ok_or(if index < log.truncated_index {
            ReadError::Compacted
        } else {
            ReadError::Unavailable
        })
    }

    /// Entries `low..high` of `range`, at most `max_bytes` of them (but at least one).
    pub fn entries(
        &self,
        range: RangeId,
        low: u64,
        high: u64,
        max_bytes: Option<u64>,
    ) -> Result<Vec<Entry>, ReadError> {
        let fetches = {
            let Some(log) = self.shared().range(range) else {
                return if low >= high {
                    Ok(Vec::new())
                } else {
                    Err(ReadError::Unavailable)
                };
            };
            let log = lock(&log);
            if low < log.first_index() {
                return Err(ReadError::Compacted);
            }
            if high > log.last_index() + 1 {
                return Err(ReadError::Unavailable);
            }
            if low >= high {
                return Ok(Vec::new());
            }
            self.shared()
                .resolve(log.fetch(low, high, max_bytes.unwrap_or(u64::MAX)))
        };
        let mut entries = self.shared().read_resolved(fetches)?;
        raft::util::limit_size(&mut entries, max_bytes);
        Ok(entries)
    }

    /// Ranges that have a log here.
    pub fn ranges(&self) -> Vec<RangeId> {
        let mut ranges: Vec<_> = read(&self.shared().ranges).keys().copied().collect();
        ranges.sort();
        ranges
    }

    /// Deletes segments no range needs; returns how many.
    pub fn collect_garbage(&self) -> usize {
        self.shared().collect_garbage()
    }

    /// Segment files on disk now.
    pub fn segment_count(&self) -> usize {
        read(&self.shared().segments).len()
    }

    /// Deleted segments kept for reuse now.
    pub fn free_segment_count(&self) -> usize {
        lock(&self.shared().free_segments).len()
    }

    pub fn stats(&self) -> LogStats {
        let c = &self.shared().counters;
        LogStats {
            requests: c.requests.load(Ordering::Relaxed),
            groups: c.groups.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            segments_reused: c.segments_reused.load(Ordering::Relaxed),
            ranges_rewritten: c.ranges_rewritten.load(Ordering::Relaxed),
            inline_groups: c.inline_groups.load(Ordering::Relaxed),
            inline_overlaps: c.inline_overlaps.load(Ordering::Relaxed),
            caller_groups: c.caller_groups.load(Ordering::Relaxed),
        }
    }
}

//! `rangekv bench log`: the raft log engine under a raft-like load, side by side with
//! TiKV's raft-engine and with RocksDB used as a raft log (sync WAL writes).
//!
//! Workload: `writers` threads; each owns every `writers`-th of `ranges` ranges and, in
//! turn, appends one entry of `entry_bytes` to its next range together with that
//! range's hard state — what one raft Ready asks — and waits until it is durable
//! (fsync on every group). Every 1024 entries a range is compacted to 512 behind, as
//! raft log GC would, so the log stays bounded. Each engine runs the same workload in
//! its own directory, one after another, in one invocation.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use raft::eraftpb::{Entry, HardState};
use rangekv_log::file::DiskFileSystem;
use rangekv_log::{LogBatch, LogConfig, LogEngine, LogIo};
use rangekv_types::RangeId;
use serde::Serialize;

use crate::report::{latency_histogram, Latency, COMMIT};

/// Entries a range keeps behind its newest before the benchmark compacts it.
const COMPACT_EVERY_ENTRIES: u64 = 1024;
const KEEP_ENTRIES: u64 = 512;

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct LogBenchArgs {
    /// Ranges (raft groups) whose logs share the engine.
    #[arg(long, default_value_t = 100)]
    pub ranges: u64,
    /// Concurrent writer threads, each waiting for its own appends to be durable.
    #[arg(long, default_value_t = 64)]
    pub writers: u64,
    /// Payload bytes of each entry.
    #[arg(long, default_value_t = 1024)]
    pub entry_bytes: usize,
    /// How long each engine runs.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Stop each writer after this many appends instead (for smoke tests).
    #[arg(long)]
    pub operations: Option<u64>,
    /// Engines to run beside rangekv: raft-engine, rocksdb, rangekv-sync (rangekv with
    /// its pwrite + fdatasync writer), rangekv-async (rangekv driven by callbacks from
    /// `--async-threads` threads, as the node drives it), rangekv-batched and
    /// raft-engine-batched (driven by `--async-threads` threads, each writing all its
    /// writers' appends as one batch per sync, as TiKV drives raft-engine) and
    /// device-floor (no engine: each driver's batch copied, written and fdatasynced on
    /// the driver's own thread, the most any engine driven that way can do on this
    /// disk) and device-floor-encoded (the same with the batch encoded as rangekv's
    /// LogBatch), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub compare: Vec<String>,
    /// rangekv's writer: auto, uring or sync.
    #[arg(long, default_value = "auto")]
    pub io: String,
    /// Threads driving `rangekv-async`'s and `raft-engine-batched`'s writers (as the
    /// node's raft workers drive the log: every append in flight at once, durability
    /// learnt from a callback; as TiKV's store writers drive raft-engine: one batch of
    /// every pending append per blocking write).
    #[arg(long, default_value_t = 2)]
    pub async_threads: u64,
    /// Fill rangekv's segments with zeros when preparing them (`log.fill_segments`).
    #[arg(long)]
    pub fill_segments: bool,
    /// Deleted segments rangekv keeps for reuse (`log.recycle_segments`; 0: none).
    #[arg(long, default_value_t = LogConfig::default().recycle_segments)]
    pub recycle_segments: usize,
    /// Groups in flight at once in rangekv's writer.
    #[arg(long, default_value_t = 2)]
    pub pipeline_depth: usize,
    /// Directory for the engines' files (must be a real disk: fsync on tmpfs is free).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineResult {
    pub engine: String,
    pub operations: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub mb_per_sec: f64,
    /// fsyncs per second, where the engine reports them.
    pub syncs_per_sec: Option<f64>,
    /// Appends per fsync, where the engine reports it.
    pub mean_group_size: Option<f64>,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

#[derive(Debug, Serialize)]
pub struct LogBenchReport {
    pub results: Vec<EngineResult>,
    pub config: LogBenchArgs,
    pub commit: &'static str,
}

/// One engine under test: writes one range's append + hard state durably.
trait RaftLog: Sync {
    fn append(
        &self,
        range: u64,
        entry: Entry,
        hard_state: &HardState,
        compact_to: Option<u64>,
    ) -> anyhow::Result<()>;
    /// (syncs, requests) so far, when the engine counts them.
    fn sync_counts(&self) -> Option<(u64, u64)> {
        None
    }
    /// The rangekv engine under test, for the callback-driven run.
    fn as_rangekv(&self) -> Option<&LogEngine> {
        None
    }
    /// The raft-engine under test, for the batched run.
    fn as_raft_engine(&self) -> Option<&raft_engine::Engine> {
        None
    }
    /// The device floor under test, for its batched run.
    fn as_device_floor(&self) -> Option<&DeviceFloor> {
        None
    }
    /// The encoded device floor under test, for its batched run.
    fn as_encoded_floor(&self) -> Option<&EncodedFloor> {
        None
    }
    /// Background upkeep, called every `MAINTAIN_EVERY` while the engine runs.
    fn maintain(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// How often `RaftLog::maintain` runs: raft-engine deletes (and so can reuse) only the
/// files it is asked to purge, which TiKV does every 10 s by default; the bench asks
/// every second, so that raft-engine's log recycling gets the same chance as rangekv's
/// (which deletes on every compaction).
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

struct Rangekv(LogEngine);

/// One raft Ready's worth for rangekv: the entry, the hard state, maybe a compaction.
fn rangekv_batch(
    range: u64,
    entry: Entry,
    hard_state: &HardState,
    compact_to: Option<u64>,
) -> LogBatch {
    let mut batch = LogBatch::new();
    rangekv_add(&mut batch, range, entry, hard_state, compact_to);
    batch
}

/// One raft Ready's worth for rangekv, added to `batch`.
fn rangekv_add(
    batch: &mut LogBatch,
    range: u64,
    entry: Entry,
    hard_state: &HardState,
    compact_to: Option<u64>,
) {
    let term = entry.term;
    batch.append(RangeId(range), vec![entry]);
    batch.set_hard_state(RangeId(range), hard_state.clone());
    if let Some(index) = compact_to {
        batch.compact_to(RangeId(range), index, term);
    }
}

impl RaftLog for Rangekv {
    fn append(
        &self,
        range: u64,
        entry: Entry,
        hard_state: &HardState,
        compact_to: Option<u64>,
    ) -> anyhow::Result<()> {
        Ok(self
            .0
            .write_sync(rangekv_batch(range, entry, hard_state, compact_to))?)
    }

    fn as_rangekv(&self) -> Option<&LogEngine> {
        Some(&self.0)
    }

    fn sync_counts(&self) -> Option<(u64, u64)> {
        let stats = self.0.stats();
        Some((stats.syncs, stats.requests))
    }
}

#[derive(Clone)]
struct EntryExt;

impl raft_engine::MessageExt for EntryExt {
    type Entry = Entry;
    fn index(entry: &Entry) -> u64 {
        entry.index
    }
}

struct RaftEngine(raft_engine::Engine);

const HARD_STATE_KEY: &[u8] = b"hard_state";

impl RaftLog for RaftEngine {
    fn append(
        &self,
        range: u64,
        entry: Entry,
        hard_state: &HardState,
        compact_to: Option<u64>,
    ) -> anyhow::Result<()> {
        let mut batch = raft_engine::LogBatch::default();
        raft_engine_add(&mut batch, range, entry, hard_state, compact_to)?;
        self.0.write(&mut batch, true)?;
        Ok(())
    }

    fn as_raft_engine(&self) -> Option<&raft_engine::Engine> {
        Some(&self.0)
    }
    fn maintain(&self) -> anyhow::Result<()> {
        self.0.purge_expired_files()?;
        Ok(())
    }
}

/// One raft Ready's worth for raft-engine, added to `batch`.
fn raft_engine_add(
    batch: &mut raft_engine::LogBatch,
    range: u64,
    entry: Entry,
    hard_state: &HardState,
    compact_to: Option<u64>,
) -> anyhow::Result<()> {
    batch.add_entries::<EntryExt>(range, &[entry])?;
    batch.put_message(range, HARD_STATE_KEY.to_vec(), hard_state)?;
    if let Some(index) = compact_to {
        batch.add_command(range, raft_engine::Command::Compact { index: index + 1 });
    }
    Ok(())
}

struct Rocks(rocksdb::DB);

impl RaftLog for Rocks {
    fn append(
        &self,
        range: u64,
        entry: Entry,
        hard_state: &HardState,
        compact_to: Option<u64>,
    ) -> anyhow::Result<()> {
        use protobuf::Message as _;
        let key = |index: u64| {
            let mut key = [0u8; 17];
            key[0] = b'e';
            key[1..9].copy_from_slice(&range.to_be_bytes());
            key[9..].copy_from_slice(&index.to_be_bytes());
            key
        };
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(key(entry.index), entry.write_to_bytes()?);
        let mut state_key = [0u8; 9];
        state_key[0] = b's';
        state_key[1..].copy_from_slice(&range.to_be_bytes());
        batch.put(state_key, hard_state.write_to_bytes()?);
        if let Some(index) = compact_to {
            batch.delete_range(key(0), key(index + 1));
        }
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.0.write_opt(batch, &options)?;
        Ok(())
    }
}

/// The device's floor: no log engine at all, only what any log must do for this load.
/// Each driver copies its writers' appends (a 16-byte header and the payload each)
/// into one buffer, writes it with `pwrite` at an offset of its own into a file whose
/// blocks are all written already (as a reused segment's are), and `fdatasync`s it on
/// its own thread. No index, no checksum, no writer thread, no wake-up: driven like the
/// batched engines (`--async-threads` drivers, each blocking on its own write), it is
/// an upper bound for any engine driven that way, so a target can be checked against
/// what the disk allows. Drivers overlap their syncs (each covers its own write,
/// finished before the sync began).
struct DeviceFloor {
    file: std::fs::File,
    next_offset: Mutex<u64>,
    syncs: AtomicU64,
}

impl DeviceFloor {
    /// Bytes of the file, written once before the run; writes wrap around in it.
    const FILE_BYTES: u64 = 256 << 20;

    fn open(dir: &Path) -> anyhow::Result<DeviceFloor> {
        let path = dir.join("floor.dat");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let zeros = vec![0u8; 1 << 20];
        for at in (0..Self::FILE_BYTES).step_by(zeros.len()) {
            file.write_all_at(&zeros, at)?;
        }
        file.sync_all()?;
        Ok(DeviceFloor {
            file,
            next_offset: Mutex::new(0),
            syncs: AtomicU64::new(0),
        })
    }
}

impl RaftLog for DeviceFloor {
    fn append(
        &self,
        range: u64,
        entry: Entry,
        hard_state: &HardState,
        compact_to: Option<u64>,
    ) -> anyhow::Result<()> {
        let mut batch = Vec::new();
        <Self as BatchedLog>::add(&mut batch, range, entry, hard_state, compact_to)?;
        BatchedLog::write(self, batch)
    }

    fn as_device_floor(&self) -> Option<&DeviceFloor> {
        Some(self)
    }

    /// One request (a driver's batch) per sync.
    fn sync_counts(&self) -> Option<(u64, u64)> {
        let syncs = self.syncs.load(Ordering::Relaxed);
        Some((syncs, syncs))
    }
}

impl BatchedLog for DeviceFloor {
    type Batch = Vec<u8>;
    fn add(
        batch: &mut Self::Batch,
        range: u64,
        entry: Entry,
        _hard_state: &HardState,
        _compact_to: Option<u64>,
    ) -> anyhow::Result<()> {
        batch.extend_from_slice(&range.to_le_bytes());
        batch.extend_from_slice(&entry.index.to_le_bytes());
        batch.extend_from_slice(&entry.data);
        Ok(())
    }
    fn write(&self, batch: Self::Batch) -> anyhow::Result<()> {
        self.write_bytes(&batch)
    }
}

impl DeviceFloor {
    /// Writes `batch` at an offset of its own and syncs it, on this thread.
    fn write_bytes(&self, batch: &[u8]) -> anyhow::Result<()> {
        let len = batch.len() as u64;
        anyhow::ensure!(len <= Self::FILE_BYTES, "a batch of {len} bytes");
        let offset = {
            let mut next = self
                .next_offset
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if *next + len > Self::FILE_BYTES {
                *next = 0;
            }
            let offset = *next;
            *next += len;
            offset
        };
        self.file.write_all_at(batch, offset)?;
        self.file.sync_data()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// `device-floor-encoded`: the floor's I/O (each driver writes and syncs its own batch
/// on its own thread), with the batch built as rangekv's `LogBatch` (framing, checksums,
/// hard states) and its encoded records written: what rangekv's encoding adds to the
/// floor, and so what an engine could reach that keeps the encoding but lets the thread
/// that forms a group write and sync it (an index update and completion in log order
/// would still come on top).
struct EncodedFloor(DeviceFloor);

impl RaftLog for EncodedFloor {
    fn append(
        &self,
        range: u64,
        entry: Entry,
        hard_state: &HardState,
        compact_to: Option<u64>,
    ) -> anyhow::Result<()> {
        let batch = rangekv_batch(range, entry, hard_state, compact_to);
        BatchedLog::write(self, batch)
    }

    fn as_encoded_floor(&self) -> Option<&EncodedFloor> {
        Some(self)
    }

    fn sync_counts(&self) -> Option<(u64, u64)> {
        self.0.sync_counts()
    }
}

impl BatchedLog for EncodedFloor {
    type Batch = LogBatch;
    fn add(
        batch: &mut Self::Batch,
        range: u64,
        entry: Entry,
        hard_state: &HardState,
        compact_to: Option<u64>,
    ) -> anyhow::Result<()> {
        rangekv_add(batch, range, entry, hard_state, compact_to);
        Ok(())
    }
    fn write(&self, batch: Self::Batch) -> anyhow::Result<()> {
        self.0.write_bytes(batch.encoded())
    }
}

fn open_engine(name: &str, dir: &Path, args: &LogBenchArgs) -> anyhow::Result<Box<dyn RaftLog>> {
    std::fs::create_dir_all(dir)?;
    Ok(match name {
        "rangekv" | "rangekv-sync" | "rangekv-async" | "rangekv-batched" => {
            let io: LogIo = if name == "rangekv-sync" {
                LogIo::Sync
            } else {
                args.io.parse().map_err(anyhow::Error::msg)?
            };
            let config = LogConfig {
                io,
                pipeline_depth: args.pipeline_depth,
                fill_segments: args.fill_segments,
                recycle_segments: args.recycle_segments,
                ..LogConfig::default()
            };
            let engine = LogEngine::open(Arc::new(DiskFileSystem::open(dir)?), config)?;
            eprintln!("rangekv log writer: {}", engine.io_backend());
            Box::new(Rangekv(engine))
        }
        "raft-engine" | "raft-engine-batched" => {
            let config = raft_engine::Config {
                dir: dir.to_string_lossy().into_owned(),
                // raft-engine purges files (and so reuses them: `enable_log_recycle`
                // is on by default) only once its log holds more than this; the
                // default, 10 GiB, is reached after minutes of this load. Two files'
                // worth gets it to that steady state within seconds, as rangekv's log
                // (which deletes on every compaction) gets to its own.
                purge_threshold: raft_engine::ReadableSize::mb(256),
                ..Default::default()
            };
            Box::new(RaftEngine(raft_engine::Engine::open(config)?))
        }
        "device-floor" => Box::new(DeviceFloor::open(dir)?),
        "device-floor-encoded" => Box::new(EncodedFloor(DeviceFloor::open(dir)?)),
        "rocksdb" => {
            let mut options = rocksdb::Options::default();
            options.create_if_missing(true);
            Box::new(Rocks(rocksdb::DB::open(&options, dir)?))
        }
        other => anyhow::bail!("unknown engine {other:?}"),
    })
}

/// Entry payloads: random-looking, and different for every append. raft-engine
/// LZ4-compresses batches over 8 KiB: a constant payload, or the same bytes repeated
/// within one batch of many appends, would measure its compressor, not the log.
struct Payloads {
    pool: bytes::Bytes,
    len: usize,
}

impl Payloads {
    /// Far more bytes than any batch: two appends of one batch share no bytes but by
    /// (rare) overlap of their slices.
    const POOL_BYTES: usize = 32 << 20;

    fn new(len: usize) -> Payloads {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let pool = (0..Self::POOL_BYTES.max(2 * len))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect::<Vec<u8>>();
        Payloads {
            pool: pool.into(),
            len,
        }
    }

    /// The payload of the append numbered `seed` (a slice of the pool, not a copy).
    fn get(&self, seed: u64) -> bytes::Bytes {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 31;
        let at = (x % (self.pool.len() - self.len + 1) as u64) as usize;
        self.pool.slice(at..at + self.len)
    }
}

fn entry_for(index: u64, data: bytes::Bytes) -> Entry {
    Entry {
        index,
        term: 1,
        data,
        ..Default::default()
    }
}

/// What a writer (or a driver thread) measured: its latencies and its appends.
type WriterOutcome = anyhow::Result<(Histogram<u64>, u64)>;

/// One writer's share of the workload: its ranges, in turn, each with its next index.
struct WriterLoad {
    owned: Vec<u64>,
    next_index: Vec<u64>,
    done: u64,
}

impl WriterLoad {
    fn new(writer: u64, args: &LogBenchArgs) -> WriterLoad {
        let owned: Vec<u64> = (1..=args.ranges)
            .filter(|r| r % args.writers == writer % args.writers)
            .collect();
        WriterLoad {
            next_index: vec![1; owned.len()],
            owned,
            done: 0,
        }
    }

    /// Whether this writer appends again.
    fn wants_more(&self, args: &LogBenchArgs, stop: &AtomicBool) -> bool {
        !self.owned.is_empty()
            && match args.operations {
                Some(limit) => self.done < limit,
                None => !stop.load(Ordering::Relaxed),
            }
    }

    /// The next append: (range, entry, hard state, compaction point).
    fn next(&mut self, payloads: &Payloads) -> (u64, Entry, HardState, Option<u64>) {
        let slot = (self.done as usize) % self.owned.len();
        let index = self.next_index[slot];
        let data = payloads.get(self.owned[slot] << 32 ^ index);
        self.next_index[slot] += 1;
        let hard_state = HardState {
            term: 1,
            commit: index,
            ..Default::default()
        };
        let compact = (index % COMPACT_EVERY_ENTRIES == 0).then(|| index - KEEP_ENTRIES);
        (
            self.owned[slot],
            entry_for(index, data),
            hard_state,
            compact,
        )
    }
}

/// Each writer on its own thread, blocked on each append.
fn drive_with_threads(
    engine: &dyn RaftLog,
    args: &LogBenchArgs,
    payloads: &Payloads,
    stop: &AtomicBool,
    scope_until_deadline: impl Fn(&dyn Fn() -> bool),
) -> Vec<WriterOutcome> {
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..args.writers)
            .map(|writer| {
                scope.spawn(move || -> WriterOutcome {
                    let mut load = WriterLoad::new(writer, args);
                    let mut histogram = latency_histogram();
                    while load.wants_more(args, stop) {
                        let (range, entry, hard_state, compact) = load.next(payloads);
                        let begin = Instant::now();
                        engine.append(range, entry, &hard_state, compact)?;
                        histogram.record(begin.elapsed().as_micros().max(1) as u64)?;
                        load.done += 1;
                    }
                    Ok((histogram, load.done))
                })
            })
            .collect();
        scope_until_deadline(&|| workers.iter().all(|w| w.is_finished()));
        join_all(workers)
    })
}

/// rangekv driven as the node drives it: a few threads (the raft workers) keep every
/// writer's append in flight with `LogEngine::write`, and learn of durability from a
/// callback through a channel (the worker's inbox). No thread blocks per append.
fn drive_with_callbacks(
    log: &LogEngine,
    args: &LogBenchArgs,
    payloads: &Payloads,
    stop: &AtomicBool,
    scope_until_deadline: impl Fn(&dyn Fn() -> bool),
) -> Vec<WriterOutcome> {
    on_driver_threads(args, scope_until_deadline, |mut loads| {
        type Done = (usize, Instant, Result<(), rangekv_log::LogError>);
        let (sender, receiver) = std::sync::mpsc::channel::<Done>();
        let submit = |i: usize, load: &mut WriterLoad| {
            let (range, entry, hard_state, compact) = load.next(payloads);
            let sender = sender.clone();
            let begin = Instant::now();
            log.write(
                rangekv_batch(range, entry, &hard_state, compact),
                move |result| {
                    let _ = sender.send((i, begin, result));
                },
            );
        };
        let mut histogram = latency_histogram();
        let mut in_flight = 0;
        for (i, load) in loads.iter_mut().enumerate() {
            if load.wants_more(args, stop) {
                submit(i, load);
                in_flight += 1;
            }
        }
        while in_flight > 0 {
            let (i, begin, result) = receiver.recv().context("the log dropped a completion")?;
            in_flight -= 1;
            result?;
            histogram.record(begin.elapsed().as_micros().max(1) as u64)?;
            let load = &mut loads[i];
            load.done += 1;
            if load.wants_more(args, stop) {
                submit(i, load);
                in_flight += 1;
            }
        }
        Ok((histogram, loads.iter().map(|l| l.done).sum()))
    })
}

/// Runs `drive` on `--async-threads` threads, each with the loads of the writers it
/// serves (every `threads`-th writer), until they finish or the deadline passes.
fn on_driver_threads(
    args: &LogBenchArgs,
    scope_until_deadline: impl Fn(&dyn Fn() -> bool),
    drive: impl Fn(Vec<WriterLoad>) -> WriterOutcome + Sync,
) -> Vec<WriterOutcome> {
    let threads = args.async_threads.max(1);
    let drive = &drive;
    std::thread::scope(|scope| {
        let drivers: Vec<_> = (0..threads)
            .map(|thread| {
                scope.spawn(move || {
                    let loads = (0..args.writers)
                        .filter(|w| w % threads == thread)
                        .map(|w| WriterLoad::new(w, args))
                        .collect();
                    drive(loads)
                })
            })
            .collect();
        scope_until_deadline(&|| drivers.iter().all(|d| d.is_finished()));
        join_all(drivers)
    })
}

/// An engine written one batch of many ranges' appends at a time.
trait BatchedLog: Sync {
    type Batch: Default;
    fn add(
        batch: &mut Self::Batch,
        range: u64,
        entry: Entry,
        hard_state: &HardState,
        compact_to: Option<u64>,
    ) -> anyhow::Result<()>;
    /// Writes `batch` durably, blocking until it is.
    fn write(&self, batch: Self::Batch) -> anyhow::Result<()>;
}

impl BatchedLog for raft_engine::Engine {
    type Batch = raft_engine::LogBatch;
    fn add(
        batch: &mut Self::Batch,
        range: u64,
        entry: Entry,
        hard_state: &HardState,
        compact_to: Option<u64>,
    ) -> anyhow::Result<()> {
        raft_engine_add(batch, range, entry, hard_state, compact_to)
    }
    fn write(&self, mut batch: Self::Batch) -> anyhow::Result<()> {
        raft_engine::Engine::write(self, &mut batch, true)?;
        Ok(())
    }
}

impl BatchedLog for LogEngine {
    type Batch = LogBatch;
    fn add(
        batch: &mut Self::Batch,
        range: u64,
        entry: Entry,
        hard_state: &HardState,
        compact_to: Option<u64>,
    ) -> anyhow::Result<()> {
        rangekv_add(batch, range, entry, hard_state, compact_to);
        Ok(())
    }
    fn write(&self, batch: Self::Batch) -> anyhow::Result<()> {
        Ok(self.write_sync(batch)?)
    }
}

/// An engine as a raft store's writer threads drive it (TiKV's store writers with
/// raft-engine, rangekv's raft workers with its log): each of a few threads gathers the
/// next append of every writer it serves into one batch and writes it with one
/// blocking, synced write; an append's latency runs from the start of its batch.
fn drive_batched<L: BatchedLog>(
    engine: &L,
    args: &LogBenchArgs,
    payloads: &Payloads,
    stop: &AtomicBool,
    scope_until_deadline: impl Fn(&dyn Fn() -> bool),
) -> Vec<WriterOutcome> {
    on_driver_threads(args, scope_until_deadline, |mut loads| {
        let mut histogram = latency_histogram();
        loop {
            let begin = Instant::now();
            let mut batch = L::Batch::default();
            let mut appends = 0;
            for load in loads.iter_mut().filter(|l| l.wants_more(args, stop)) {
                let (range, entry, hard_state, compact) = load.next(payloads);
                L::add(&mut batch, range, entry, &hard_state, compact)?;
                load.done += 1;
                appends += 1;
            }
            if appends == 0 {
                break;
            }
            engine.write(batch)?;
            let micros = begin.elapsed().as_micros().max(1) as u64;
            histogram.record_n(micros, appends)?;
        }
        Ok((histogram, loads.iter().map(|l| l.done).sum()))
    })
}

fn join_all(handles: Vec<std::thread::ScopedJoinHandle<'_, WriterOutcome>>) -> Vec<WriterOutcome> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("writer panicked")))
        })
        .collect()
}

fn run_engine(
    engine: &dyn RaftLog,
    name: &str,
    args: &LogBenchArgs,
) -> anyhow::Result<EngineResult> {
    let payloads = Payloads::new(args.entry_bytes);
    let stop = AtomicBool::new(false);
    let deadline = Duration::from_secs_f64(args.seconds);
    let before = engine.sync_counts();
    let started = Instant::now();
    // Runs in the scope's own thread: with a time limit, waits for it (or for every
    // writer to finish) and then tells the writers to stop.
    let until_deadline = |finished: &dyn Fn() -> bool| {
        if args.operations.is_none() {
            let mut maintained = Instant::now();
            while started.elapsed() < deadline && !finished() {
                std::thread::sleep(Duration::from_millis(20));
                if maintained.elapsed() >= MAINTAIN_EVERY {
                    maintained = Instant::now();
                    if let Err(error) = engine.maintain() {
                        eprintln!("{name}: background upkeep failed: {error:#}");
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
        }
    };
    let histograms = if let Some(floor) = engine.as_device_floor() {
        drive_batched(floor, args, &payloads, &stop, until_deadline)
    } else if let Some(floor) = engine.as_encoded_floor() {
        drive_batched(floor, args, &payloads, &stop, until_deadline)
    } else {
        match (engine.as_rangekv(), engine.as_raft_engine()) {
            (Some(log), _) if name == "rangekv-async" => {
                drive_with_callbacks(log, args, &payloads, &stop, until_deadline)
            }
            (Some(log), _) if name == "rangekv-batched" => {
                drive_batched(log, args, &payloads, &stop, until_deadline)
            }
            (_, Some(raft_engine)) if name == "raft-engine-batched" => {
                drive_batched(raft_engine, args, &payloads, &stop, until_deadline)
            }
            _ => drive_with_threads(engine, args, &payloads, &stop, until_deadline),
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut total = latency_histogram();
    let mut operations = 0;
    for result in histograms {
        let (histogram, done) = result.with_context(|| format!("{name} writer"))?;
        total.add(&histogram)?;
        operations += done;
    }
    let latency = Latency::from_histogram(&total);
    if let Some(log) = engine.as_rangekv() {
        let stats = log.stats();
        eprintln!(
            "{name}: {} groups, {} written by a blocking caller, {} on the writer thread \
             ({} overlapped by another request), {} segments reused",
            stats.groups,
            stats.caller_groups,
            stats.inline_groups,
            stats.inline_overlaps,
            stats.segments_reused
        );
    }
    let after = engine.sync_counts();
    let (syncs_per_sec, mean_group_size) = match (before, after) {
        (Some((s0, r0)), Some((s1, r1))) if s1 > s0 => (
            Some((s1 - s0) as f64 / seconds),
            Some((r1 - r0) as f64 / (s1 - s0) as f64),
        ),
        _ => (None, None),
    };
    let ops_per_sec = operations as f64 / seconds;
    Ok(EngineResult {
        engine: name.to_string(),
        operations,
        seconds,
        ops_per_sec,
        mb_per_sec: ops_per_sec * args.entry_bytes as f64 / 1e6,
        syncs_per_sec,
        mean_group_size,
        mean_us: latency.mean_us,
        p50_us: latency.p50_us,
        p99_us: latency.p99_us,
        p999_us: latency.p999_us,
        max_us: latency.max_us,
    })
}

/// What `--compare` takes.
const ENGINES: [&str; 8] = [
    "raft-engine",
    "rangekv-batched",
    "raft-engine-batched",
    "rocksdb",
    "rangekv-sync",
    "rangekv-async",
    "device-floor",
    "device-floor-encoded",
];

/// Runs the benchmark; prints the table and, if asked, writes the JSON report.
pub fn run(args: &LogBenchArgs) -> anyhow::Result<LogBenchReport> {
    anyhow::ensure!(
        args.ranges >= 1 && args.writers >= 1,
        "--ranges and --writers must be at least 1"
    );
    let scratch = match &args.dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let mut names = vec!["rangekv".to_string()];
    names.extend(args.compare.iter().filter(|n| !n.is_empty()).cloned());
    for name in &names[1..] {
        anyhow::ensure!(
            ENGINES.contains(&name.as_str()),
            "unknown engine {name:?}: --compare takes {}",
            ENGINES.join(", ")
        );
    }
    let mut results = Vec::new();
    for name in &names {
        let dir = scratch.path().join(name);
        let engine = open_engine(name, &dir, args)?;
        results.push(run_engine(engine.as_ref(), name, args)?);
        drop(engine);
        std::fs::remove_dir_all(&dir).ok();
    }
    let report = LogBenchReport {
        results,
        config: args.clone(),
        commit: COMMIT,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

fn print_table(report: &LogBenchReport) {
    let config = &report.config;
    println!(
        "log bench: {} ranges x {} writers x {} B entries, fsync every group, commit {}",
        config.ranges, config.writers, config.entry_bytes, report.commit
    );
    println!(
        "{:<19} {:>10} {:>8} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "engine", "ops/s", "MB/s", "syncs/s", "group", "p50_us", "p99_us", "p999_us", "vs_this"
    );
    let ours = report.results.first().map_or(0.0, |r| r.ops_per_sec);
    for r in &report.results {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        println!(
            "{:<19} {:>10.0} {:>8.1} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8.2}",
            r.engine,
            r.ops_per_sec,
            r.mb_per_sec,
            opt(r.syncs_per_sec),
            opt(r.mean_group_size),
            r.p50_us,
            r.p99_us,
            r.p999_us,
            if r.ops_per_sec > 0.0 {
                ours / r.ops_per_sec
            } else {
                0.0
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_run_of_every_engine_reports_the_json_shape() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("out.json");
        let args = LogBenchArgs {
            ranges: 2,
            writers: 2,
            entry_bytes: 64,
            seconds: 0.0,
            operations: Some(1100),
            compare: vec![
                "raft-engine".into(),
                "rocksdb".into(),
                "rangekv-async".into(),
                "raft-engine-batched".into(),
                "device-floor".into(),
                "device-floor-encoded".into(),
            ],
            io: "auto".into(),
            async_threads: 2,
            fill_segments: false,
            recycle_segments: 4,
            pipeline_depth: 1,
            dir: Some(dir.path().to_path_buf()),
            json: Some(json.clone()),
        };
        let report = run(&args).unwrap();
        let engines: Vec<_> = report.results.iter().map(|r| r.engine.as_str()).collect();
        assert_eq!(
            engines,
            [
                "rangekv",
                "raft-engine",
                "rocksdb",
                "rangekv-async",
                "raft-engine-batched",
                "device-floor",
                "device-floor-encoded"
            ]
        );
        for result in &report.results {
            assert_eq!(result.operations, 2200, "{}", result.engine);
            assert!(
                result.ops_per_sec > 0.0 && result.p50_us > 0 && result.p99_us >= result.p50_us
            );
        }
        let ours = &report.results[0];
        assert!(ours.mean_group_size.unwrap() >= 1.0);
        let parsed: serde_json::Value =
            serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        assert_eq!(parsed["results"][1]["engine"], "raft-engine");
        assert!(parsed["results"][0]["p999_us"].as_u64().is_some());
        assert_eq!(parsed["config"]["ranges"], 2);
        assert!(parsed["commit"].is_string());
    }
}

//! The writer thread: gathers every queued batch into one group, writes it with one
//! write and one `fdatasync`, and completes the group's requests when the sync is
//! done. With `pipeline_depth` > 1 the next group is submitted while the previous one
//! is still syncing; groups complete strictly in submission order all the same.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use rangekv_types::RangeId;

use crate::engine::{
    lock, read, segment_name, write, Completion, Done, LogBatch, LogConfig, LogError, LogIo,
    RangeMap, Request, Shared, Update,
};
use crate::file::{FileSystem, SegmentFile};
use crate::format;
use crate::index::{Location, RangeLog};

/// Wakes the writer when a request arrives while it sleeps: an eventfd, which the
/// io_uring writer also watches through the ring.
pub(crate) struct Waker {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Waker {
            fd,
            sleeping: AtomicBool::new(false),
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. An eventfd write only
        // fails when the counter would overflow, and then a wake-up is pending anyway.
        unsafe { libc::write(self.raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn wake_if_sleeping(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Blocks until woken (the portable writer's idle wait).
    pub fn wait(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our eventfd.
        unsafe { libc::read(self.raw_fd(), (&mut count as *mut u64).cast(), 8) };
    }
}

/// One group's I/O: `buf` written at `offset` of `file`, then synced.
pub(crate) struct GroupWrite {
    pub token: u64,
    pub file: Arc<dyn SegmentFile>,
    pub offset: u64,
    pub buf: Vec<u8>,
}

/// A failed write or sync of group `token`.
pub(crate) struct IoFailure {
    pub token: u64,
    pub offset: u64,
    pub error: io::Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Do not block.
    No,
    /// Block until a group completes.
    ForCompletion,
    /// Block until a group completes or a request arrives.
    ForCompletionOrRequest,
}

/// How groups reach the disk. Both implementations pass the same conformance tests.
pub(crate) trait Backend: Send {
    fn name(&self) -> &'static str;
    fn submit(&mut self, write: GroupWrite) -> Result<(), IoFailure>;
    /// Appends the tokens of groups now durable to `done`, waiting as asked.
    fn reap(&mut self, wait: Wait, waker: &Waker, done: &mut Vec<u64>) -> Result<(), IoFailure>;
    /// How this writer runs, for the open log line (empty: nothing to add).
    fn mode(&self) -> &'static str {
        ""
    }
    /// Called on the writer thread before anything else.
    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `pwrite` + `fdatasync` on the writer thread: a group is durable when `submit`
/// returns. Requests arriving meanwhile queue up and form the next group.
struct SyncBackend {
    done: Vec<u64>,
}

impl Backend for SyncBackend {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn submit(&mut self, write: GroupWrite) -> Result<(), IoFailure> {
        write_and_sync(&write)?;
        self.done.push(write.token);
        Ok(())
    }

    fn reap(&mut self, wait: Wait, waker: &Waker, done: &mut Vec<u64>) -> Result<(), IoFailure> {
        if self.done.is_empty() && wait == Wait::ForCompletionOrRequest {
            waker.wait();
        }
        done.append(&mut self.done);
        Ok(())
    }
}

/// `pwrite` + `fdatasync` of one group on the calling thread: the portable writer's
/// way, the io_uring writer's for a lone group (`run_loop`), and a blocking caller's
/// for its own group (`lead`).
fn write_and_sync(write: &GroupWrite) -> Result<(), IoFailure> {
    write
        .file
        .write_all_at(&write.buf, write.offset)
        .and_then(|()| write.file.sync_data())
        .map_err(|error| IoFailure {
            token: write.token,
            offset: write.offset,
            error,
        })
}

fn uring_unavailable(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES)
    )
}

/// Picks the writer for `config.io`. `auto` falls back to `sync` only when io_uring is
/// unavailable (no syscall, or denied by a seccomp profile), never on resource errors.
pub(crate) fn choose_backend(
    config: &LogConfig,
    fs: &dyn FileSystem,
) -> Result<Box<dyn Backend>, LogError> {
    let sync = || -> Box<dyn Backend> { Box::new(SyncBackend { done: Vec::new() }) };
    if config.io == LogIo::Sync {
        return Ok(sync());
    }
    if !fs.has_raw_fds() {
        return match config.io {
            LogIo::Uring => Err(LogError::UringUnavailable(
                "the file system has no file descriptors".into(),
            )),
            _ => Ok(sync()),
        };
    }
    match crate::uring::UringBackend::new(config.pipeline_depth) {
        Ok(backend) => Ok(Box::new(backend)),
        Err(error) if config.io == LogIo::Auto && uring_unavailable(&error) => {
            tracing::warn!(%error, "io_uring unavailable: the raft log falls back to pwrite + fdatasync");
            Ok(sync())
        }
        Err(error) if uring_unavailable(&error) => {
            Err(LogError::UringUnavailable(error.to_string()))
        }
        Err(error) => Err(LogError::io("io_uring setup".into(), 0, error)),
    }
}

/// A request of a group, with where its batch landed in the segment.
struct Placed {
    request: Request,
    base: u64,
}

struct Group {
    token: u64,
    segment: u64,
    requests: Vec<Placed>,
    durable: bool,
}

/// What the writer knows of a range including groups still in flight, to refuse a
/// batch that replay could not apply (a gap, an append below the compaction point).
#[derive(Clone, Copy)]
struct RangeView {
    truncated_index: u64,
    last_index: u64,
}

/// Record headers, compaction point and hard state a cold range's rewrite adds to
/// the bytes of its entries.
const REWRITE_OVERHEAD_BYTES: u64 = 3 * format::RECORD_HEADER_BYTES as u64 + 3 * 8 + 32 + 20;

/// Entries whose cache memory may be reclaimed, oldest first.
const CACHE_QUEUE_ITEMS_MAX: usize = 65_536;

/// Completions of a group run on the writer thread itself when there are at most this
/// many and none is pending on the completion thread.
const INLINE_COMPLETIONS_MAX: usize = 4;

/// Lone groups that go through the ring after a request arrived while a lone group was
/// written on the writer thread (another producer is at work: the inline write made it
/// wait out a whole sync that the ring would have overlapped). Then the next lone
/// group is tried inline again.
const RING_LONE_GROUPS_AFTER_OVERLAP: u32 = 64;

/// Which lone groups `log.io = auto` writes on the writer thread (see
/// `run_loop`): every one, until a request arrives while one is being
/// written; then the next `RING_LONE_GROUPS_AFTER_OVERLAP` go through the ring.
/// Two blocking callers (two drivers of the log bench, two raft workers) otherwise
/// take turns waiting out each other's inline sync: 2 drivers, 3 interleaved rounds,
/// 190–258k → 271–302k appends/s (bench/README.md).
#[derive(Debug, Default)]
struct LonePolicy {
    ring_left: u32,
}

impl LonePolicy {
    /// Whether this lone group is written inline.
    fn inline(&mut self) -> bool {
        if self.ring_left == 0 {
            return true;
        }
        self.ring_left -= 1;
        false
    }

    /// A request arrived while a lone group was written inline.
    fn overlapped(&mut self) {
        self.ring_left = RING_LONE_GROUPS_AFTER_OVERLAP;
    }
}

pub(crate) use crate::format::INDEX_MAX;

/// The log's write state: the segment being written, the groups in flight, what the
/// writer knows of each range, the cache's accounting. The writer thread and, in
/// caller-runs mode, threads in `write_sync` (see `lead`) share it behind one mutex;
/// groups are formed and completed under the lock, and written and synced outside it,
/// so the syncs of several groups overlap.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    segment: u64,
    file: Arc<dyn SegmentFile>,
    offset: u64,
    inflight: VecDeque<Group>,
    next_token: u64,
    views: RangeMap<RangeView>,
    /// `apply`'s scratch list, kept for its capacity.
    locations: Vec<Location>,
    /// `admit`'s scratch map, kept for its capacity.
    admitting: RangeMap<RangeView>,
    cache_queue: VecDeque<(RangeId, u64)>,
    cache_bytes: isize,
    /// The next segment, being prepared in the background.
    prepared: Option<Prepared>,
    /// Whether the blocks of the segment being written are all written already: it was
    /// filled with zeros or is a reused one (the first one after open is neither
    /// unless a deleted segment was waiting).
    filled: bool,
    /// Whether the segment being written is a reused one: past its records lie those
    /// of its earlier life, so it gets an end mark when the writer moves on.
    recycled: bool,
    /// A filled preparation failed: segments are no longer filled.
    fill_failed: bool,
    /// Completions go to one completion thread, in order, so the writer can submit the
    /// next group while the waiters of the last one are being woken.
    completions: Option<mpsc::Sender<Notice>>,
    completion_thread: Option<std::thread::JoinHandle<()>>,
    /// Requests in the last group formed (see `hold`).
    last_group_requests: usize,
    /// `log.io = auto` on io_uring: a lone group is written and synced by the writer
    /// thread itself (see `run_loop`).
    inline_lone_groups: bool,
    /// The writer slept for want of requests, with nothing in flight, since it last
    /// formed a group: the next group is lone (nobody is producing behind it).
    idle_since_group: bool,
    /// Which lone groups go inline.
    lone_policy: LonePolicy,
    /// Admitted requests that start a new segment, which waits until every group in
    /// flight is durable (no segment but the newest may end in a torn record). They
    /// are the next group, formed by whoever forms one once nothing is in flight.
    stalled: Option<Vec<Request>>,
}

/// Callbacks to run, in order, with their results.
type Notice = Vec<(Completion, Result<(), LogError>)>;

/// Requests that are done, in order, with their results.
type Finished = Vec<(Done, Result<(), LogError>)>;

fn spawn_completion_thread(
    shared: &Arc<Shared>,
) -> Result<(mpsc::Sender<Notice>, std::thread::JoinHandle<()>), LogError> {
    let (sender, receiver) = mpsc::channel::<Notice>();
    let shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("rangekv-log-done".into())
        .spawn(move || {
            let _ = shared.completion_thread.set(std::thread::current().id());
            for notice in receiver {
                for (done, result) in notice {
                    done(result);
                }
                shared.notice_delivered();
            }
        })
        .map_err(|e| LogError::io("completion thread".into(), 0, e))?;
    Ok((sender, thread))
}

/// The writer thread: forms groups of queued requests, sends them through `backend`
/// (or writes a lone one itself) and completes them when they are durable. Stops the
/// engine on the first failure.
pub(crate) fn run(core: Arc<Mutex<Writer>>, mut backend: Box<dyn Backend>) {
    let shared = lock(&core).shared.clone();
    let _ = shared.writer_thread.set(std::thread::current().id());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_loop(&core, &shared, backend.as_mut())
    }));
    let mut writer = lock(&core);
    // Stop the segment being prepared, so no thread outlives the engine (its
    // temporary file is deleted at the next open).
    if let Some(prepared) = writer.prepared.take() {
        prepared.cancel.store(true, Ordering::Relaxed);
        let _ = prepared.thread.join();
    }
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(error)) => writer.fail(error),
        // A broken invariant: stop cleanly rather than leave callers waiting on a
        // dead thread.
        Err(_) => writer.fail(LogError::Stopped("the log writer thread panicked".into())),
    }
    // Every completion has run once the engine's last handle is dropped.
    let completions = writer.completions.take();
    let completion_thread = writer.completion_thread.take();
    drop(writer);
    drop(completions);
    if let Some(thread) = completion_thread {
        let _ = thread.join();
    }
}

fn run_loop(
    core: &Mutex<Writer>,
    shared: &Shared,
    backend: &mut dyn Backend,
) -> Result<(), LogError> {
    backend
        .start()
        .map_err(|error| LogError::io("io_uring setup".into(), 0, error))?;
    let depth = shared.config.pipeline_depth;
    let mut done = Vec::new();
    // Groups sent through `backend` and not reaped yet.
    let mut in_backend = 0usize;
    loop {
        let mut writer = lock(core);
        if shared.failed.load(Ordering::SeqCst) {
            // A caller's write failed and stopped the engine (`Writer::fail` ran).
            return Ok(());
        }
        if writer.can_form() {
            if let Some(write) = writer.next_group()? {
                let lone = writer.inline_lone_groups
                    && writer.idle_since_group
                    && writer.inflight.len() == 1;
                writer.idle_since_group = false;
                if lone && writer.lone_policy.inline() {
                    drop(writer);
                    let written = write_and_sync(&write);
                    lock(core).written_inline(write.token, written)?;
                } else {
                    drop(writer);
                    if let Err(failure) = backend.submit(write) {
                        return Err(lock(core).io_error(failure));
                    }
                    in_backend += 1;
                    reap(core, shared, backend, Wait::No, &mut done, &mut in_backend)?;
                }
                continue;
            }
        }
        let shutdown = writer.shutdown_requested();
        if shutdown && writer.inflight.is_empty() && writer.stalled.is_none() {
            if writer.recycled {
                // Spares the next open from taking the records of this file's
                // earlier life for a torn tail (which it would cut all the same).
                writer.mark_end()?;
            }
            return Ok(());
        }
        let wait = if in_backend > 0 && (writer.inflight.len() >= depth || shutdown) {
            Wait::ForCompletion
        } else {
            // Sleep until a request, a completion, or a wake-up from a caller that
            // completed a group (see `Writer::complete`); recheck after announcing the
            // sleep so that no wake-up is lost.
            // Only a held group raises the wake-up threshold; set it before the
            // sleep flag, and drop it again if nothing is pending any more, so a
            // lone producer always wakes a writer that is not holding.
            // In caller-runs mode only requests with callbacks are the writer's: with
            // none queued there is nothing to hold back.
            let pending = shared.notices_pending.load(Ordering::SeqCst) > 0
                && (!shared.config.caller_runs() || lock(&shared.queue).calls > 0);
            let threshold = if pending {
                writer.last_group_requests.max(1)
            } else {
                1
            };
            shared.wake_at_queued.store(threshold, Ordering::SeqCst);
            shared.waker_sleeping(true);
            if shared.notices_pending.load(Ordering::SeqCst) == 0 {
                shared.wake_at_queued.store(1, Ordering::SeqCst);
            }
            if writer.can_form() || shared.failed.load(Ordering::SeqCst) {
                shared.waker_sleeping(false);
                shared.wake_at_queued.store(1, Ordering::SeqCst);
                continue;
            }
            if writer.inflight.is_empty() {
                writer.idle_since_group = true;
            }
            Wait::ForCompletionOrRequest
        };
        drop(writer);
        reap(core, shared, backend, wait, &mut done, &mut in_backend)?;
        shared.waker_sleeping(false);
        shared.wake_at_queued.store(1, Ordering::SeqCst);
    }
}

/// Collects the backend's completions, waiting as asked, and completes what they made
/// durable.
fn reap(
    core: &Mutex<Writer>,
    shared: &Shared,
    backend: &mut dyn Backend,
    wait: Wait,
    done: &mut Vec<u64>,
    in_backend: &mut usize,
) -> Result<(), LogError> {
    if let Err(failure) = backend.reap(wait, &shared.waker, done) {
        return Err(lock(core).io_error(failure));
    }
    if done.is_empty() {
        return Ok(());
    }
    *in_backend = in_backend.saturating_sub(done.len());
    let outcome = lock(core).written(done);
    done.clear();
    outcome
}

/// Caller-runs mode (`log.io` = `auto` or `sync`): a thread in `write_sync` forms a
/// group of what is queued (its own request, unless a group took it already) and writes
/// and syncs it itself, if the pipeline has room. Blocking callers then need no thread
/// hop at all (caller → writer → kernel worker → writer → caller), and two callers'
/// syncs overlap as they do in the log bench's `device-floor` row: 2 drivers,
/// 267–290k → 396–467k appends/s, 1.54–1.70× raft-engine's (bench/README.md). Returns whether it did anything
/// (else the caller waits for the next completion, which wakes it to try again).
///
/// One caller forms a group at a time (`Shared::leading`); the others go back to sleep
/// instead of queueing on the lock (64 blocking callers woken by one completion had
/// each waited for it in turn, ~2 ms per group). When the one forming leaves requests
/// queued and room in the pipeline, it wakes them to form the next group.
pub(crate) fn lead(core: &Mutex<Writer>, shared: &Shared) -> bool {
    if shared.leading.swap(true, Ordering::SeqCst) {
        return false;
    }
    let (formed, room) = {
        let mut writer = lock(core);
        let formed = if writer.shared.failed.load(Ordering::SeqCst) || !writer.can_lead() {
            None
        } else {
            Some(
                writer
                    .next_group()
                    .inspect_err(|error| writer.fail(error.clone())),
            )
        };
        // A caller held back (`can_lead`) is woken when the hold ends, and one that
        // found the pipeline full by the next completion.
        let held = shared.caller_held.load(Ordering::SeqCst);
        let room = !held
            && writer.stalled.is_none()
            && writer.inflight.len() < shared.config.pipeline_depth;
        (formed, room)
    };
    shared.leading.store(false, Ordering::SeqCst);
    // After the token is free: a caller that found it taken had queued its request
    // before, so it is seen here.
    if room
        && shared.sync_waiters.load(Ordering::SeqCst) > 0
        && !lock(&shared.queue).requests.is_empty()
    {
        shared.durable_epoch.fetch_add(1, Ordering::SeqCst);
        atomic_wait::wake_all(&shared.durable_epoch);
    }
    let write = match formed {
        None => return false,
        Some(Ok(Some(write))) => write,
        Some(Ok(None) | Err(_)) => return true,
    };
    let written = write_and_sync(&write);
    let mut writer = lock(core);
    writer
        .shared
        .counters
        .caller_groups
        .fetch_add(1, Ordering::Relaxed);
    let outcome = match written {
        Ok(()) => writer.written(&[write.token]),
        Err(failure) => Err(writer.io_error(failure)),
    };
    if let Err(error) = outcome {
        // Another thread's failure may have stopped the engine meanwhile.
        if !writer.shared.failed.load(Ordering::SeqCst) {
            writer.fail(error);
        }
    }
    true
}

impl Writer {
    pub fn start(
        shared: Arc<Shared>,
        backend: &dyn Backend,
        first_segment: u64,
    ) -> Result<Writer, LogError> {
        let views = read(&shared.ranges)
            .iter()
            .map(|(range, log)| {
                let log = lock(log);
                (
                    *range,
                    RangeView {
                        truncated_index: log.truncated_index,
                        last_index: log.last_index(),
                    },
                )
            })
            .collect();
        let (file, recycled) = prepare_in_place(&shared, first_segment)?;
        let file = install_segment(&shared, first_segment, file)?;
        if recycled {
            let reused = &shared.counters.segments_reused;
            reused.fetch_add(1, Ordering::Relaxed);
        }
        let (completions, completion_thread) = spawn_completion_thread(&shared)?;
        Ok(Writer {
            prepared: None,
            filled: recycled,
            recycled,
            fill_failed: false,
            completions: Some(completions),
            completion_thread: Some(completion_thread),
            last_group_requests: 0,
            inline_lone_groups: shared.config.io == LogIo::Auto && backend.name() == "io_uring",
            idle_since_group: false,
            lone_policy: LonePolicy::default(),
            stalled: None,
            shared,
            segment: first_segment,
            file,
            offset: format::SEGMENT_HEADER_BYTES,
            inflight: VecDeque::new(),
            next_token: 1,
            views,
            admitting: RangeMap::default(),
            locations: Vec::new(),
            cache_queue: VecDeque::new(),
            cache_bytes: 0,
        })
    }

    /// Tells requests that are done: fills the slots of failed `write_sync` waiters
    /// and wakes them (one broadcast), and runs callbacks in order (see `run_callbacks`).
    fn notify(&self, finished: Finished) {
        let mut callbacks = Vec::with_capacity(finished.len());
        let mut failed_waiters = false;
        for (done, result) in finished {
            match done {
                Done::Call(callback) => callbacks.push((callback, result)),
                Done::Wait(slot) => {
                    if let Err(error) = result {
                        let _ = slot.set(error);
                        failed_waiters = true;
                    }
                }
            }
        }
        if failed_waiters {
            self.wake_waiters();
        }
        self.run_callbacks(callbacks);
    }

    /// Wakes every thread in `write_sync` to look at its slot and the watermark again.
    fn wake_waiters(&self) {
        self.shared.durable_epoch.fetch_add(1, Ordering::SeqCst);
        if self.shared.sync_waiters.load(Ordering::SeqCst) > 0 {
            atomic_wait::wake_all(&self.shared.durable_epoch);
        }
    }

    /// Runs callbacks in order: a few inline on the writer thread when nothing is
    /// pending on the completion thread (one thread hop less for a lone waiter), else
    /// on the completion thread, so the writer goes on to the next group while many
    /// waiters are woken. Never inline on a `write_sync` caller's thread: a callback
    /// that writes again must not wait there for the lock it holds.
    fn run_callbacks(&self, notice: Notice) {
        if notice.is_empty() {
            return;
        }
        let on_writer = self.shared.writer_thread.get() == Some(&std::thread::current().id());
        if on_writer
            && notice.len() <= INLINE_COMPLETIONS_MAX
            && self.shared.notices_pending.load(Ordering::SeqCst) == 0
        {
            for (done, result) in notice {
                done(result);
            }
            return;
        }
        let unsent = match &self.completions {
            Some(sender) => {
                self.shared.notices_pending.fetch_add(1, Ordering::SeqCst);
                sender.send(notice).err().map(|e| {
                    self.shared.notices_pending.fetch_sub(1, Ordering::SeqCst);
                    e.0
                })
            }
            None => Some(notice),
        };
        for (done, result) in unsent.into_iter().flatten() {
            done(result);
        }
    }

    /// Whether to hold the next group back a moment: while the completion thread is
    /// still waking the waiters of the last group, each of them is about to queue its
    /// next request, so a group formed now would be small and cost a sync of its own.
    /// Held until as many requests are queued as the last group had, or the completion
    /// thread is done (it wakes the writer then) — an event, never a timer.
    fn hold(&self) -> bool {
        if self.shared.notices_pending.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let queue = lock(&self.shared.queue);
        !queue.shutdown && queue.requests.len() < self.last_group_requests
    }

    /// Whether the writer thread has a group to form: the stalled one once nothing is
    /// in flight, or queued requests. In caller-runs mode only requests with a
    /// callback call for it: `write_sync` callers form their own groups.
    fn can_form(&self) -> bool {
        if self.inflight.len() >= self.shared.config.pipeline_depth {
            return false;
        }
        if self.stalled.is_some() {
            return self.inflight.is_empty();
        }
        let has_work = {
            let queue = lock(&self.shared.queue);
            let wanted = if self.shared.config.caller_runs() {
                queue.calls > 0
            } else {
                !queue.requests.is_empty()
            };
            wanted || queue.shutdown
        };
        has_work && !self.hold()
    }

    /// Whether a `write_sync` caller may form a group now (see `lead`): the pipeline
    /// has room and nothing holds the group back (see `hold`). A held caller is
    /// woken when the hold ends (`Shared::notice_delivered`), unless a request queued
    /// meanwhile ends it first, its caller then forming the group.
    fn can_lead(&self) -> bool {
        if self.inflight.len() >= self.shared.config.pipeline_depth {
            return false;
        }
        if self.stalled.is_some() {
            return self.inflight.is_empty();
        }
        if lock(&self.shared.queue).requests.is_empty() {
            return false;
        }
        self.shared.caller_held.store(true, Ordering::SeqCst);
        if self.hold() {
            return false;
        }
        self.shared.caller_held.store(false, Ordering::SeqCst);
        true
    }

    /// Shutdown was asked for and nothing is queued.
    fn shutdown_requested(&self) -> bool {
        let queue = lock(&self.shared.queue);
        queue.shutdown && queue.requests.is_empty()
    }

    /// Takes queued requests up to `group_bytes_max` (at least one).
    fn take_requests(&mut self) -> Vec<Request> {
        let mut queue = lock(&self.shared.queue);
        let mut taken = Vec::new();
        let mut bytes = 0;
        let mut calls = 0;
        while let Some(next) = queue.requests.front() {
            let size = next.batch.bytes();
            if !taken.is_empty() && bytes + size > self.shared.config.group_bytes_max {
                break;
            }
            bytes += size;
            if let Some(request) = queue.requests.pop_front() {
                calls += usize::from(matches!(request.done, Done::Call(_)));
                self.shared
                    .taken_seq
                    .fetch_max(request.seq, Ordering::SeqCst);
                taken.push(request);
            }
        }
        queue.bytes -= bytes;
        queue.calls -= calls;
        drop(queue);
        if !taken.is_empty() {
            self.shared.queue_not_full.notify_all();
        }
        taken
    }

    /// Refuses a batch that would break a range's log; updates the views otherwise.
    fn admit(&mut self, batch: &LogBatch) -> Result<(), LogError> {
        let mut views = std::mem::take(&mut self.admitting);
        views.clear();
        let checked = self.check(&mut views, batch);
        if checked.is_ok() {
            self.views.extend(views.drain());
        }
        self.admitting = views;
        checked
    }

    /// The views of the ranges `batch` touches, into `views`, as they would be after
    /// it; or why it is refused.
    fn check(&self, views: &mut RangeMap<RangeView>, batch: &LogBatch) -> Result<(), LogError> {
        let view_of = |views: &mut RangeMap<RangeView>, range| {
            *views.entry(range).or_insert_with(|| {
                self.views.get(&range).copied().unwrap_or(RangeView {
                    truncated_index: 0,
                    last_index: 0,
                })
            })
        };
        for update in &batch.updates {
            let range = update.range();
            let mut view = view_of(views, range);
            match update {
                Update::Entries {
                    first_index, terms, ..
                } => {
                    if first_index.saturating_add(terms.len() as u64) > INDEX_MAX {
                        return Err(LogError::Invalid {
                            range,
                            reason: format!(
                                "index {first_index} is past the largest index {INDEX_MAX}"
                            ),
                        });
                    }
                    if *first_index > view.last_index + 1 || *first_index <= view.truncated_index {
                        return Err(LogError::Invalid {
                            range,
                            reason: format!(
                                "append at {first_index} does not continue the log ({}..={})",
                                view.truncated_index + 1,
                                view.last_index
                            ),
                        });
                    }
                    view.last_index = first_index + terms.len() as u64 - 1;
                }
                Update::HardState { .. } => {}
                Update::Compaction {
                    truncated_index, ..
                } => {
                    if *truncated_index > INDEX_MAX {
                        return Err(LogError::Invalid {
                            range,
                            reason: format!(
                                "compaction point {truncated_index} is past {INDEX_MAX}"
                            ),
                        });
                    }
                    if *truncated_index >= view.truncated_index {
                        view.truncated_index = *truncated_index;
                        view.last_index = view.last_index.max(*truncated_index);
                    }
                }
                Update::Removal { .. } => {
                    view = RangeView {
                        truncated_index: 0,
                        last_index: 0,
                    };
                }
                Update::Reset { index, .. } => {
                    if *index > format::INDEX_MAX {
                        return Err(LogError::Invalid {
                            range,
                            reason: format!("reset point {index} is past {}", format::INDEX_MAX),
                        });
                    }
                    view = RangeView {
                        truncated_index: *index,
                        last_index: *index,
                    };
                }
            }
            views.insert(range, view);
        }
        Ok(())
    }

    /// Forms the next group: the stalled one once nothing is in flight, else queued
    /// requests (refusing those that would break a range's log). Returns its write;
    /// None when there is nothing to write: nothing queued, every request refused,
    /// only empty batches (completed in order at once), or the group waits for a
    /// new segment (it is `stalled` then).
    fn next_group(&mut self) -> Result<Option<GroupWrite>, LogError> {
        let admitted = match self.stalled.take() {
            Some(stalled) if self.inflight.is_empty() => stalled,
            Some(stalled) => {
                self.stalled = Some(stalled);
                return Ok(None);
            }
            None => {
                let requests = self.take_requests();
                let mut admitted = Vec::with_capacity(requests.len());
                let mut refused = Vec::new();
                for request in requests {
                    match self.admit(&request.batch) {
                        Ok(()) => admitted.push(request),
                        Err(error) => refused.push((request.done, Err(error))),
                    }
                }
                // After every group before it, like any completion.
                self.notify(refused);
                admitted
            }
        };
        self.place(admitted)
    }

    /// Places admitted requests at the end of the log as one group in flight: signs
    /// their records, and returns the group's write (see `next_group`).
    fn place(&mut self, admitted: Vec<Request>) -> Result<Option<GroupWrite>, LogError> {
        if admitted.is_empty() {
            return Ok(None);
        }
        let bytes: usize = admitted.iter().map(|r| r.batch.bytes()).sum();
        // Leave an unfilled segment as soon as a filled or reused one is ready.
        let filled_ready = !self.filled
            && self
                .prepared
                .as_ref()
                .is_some_and(|p| p.kind != Kind::Plain && p.thread.is_finished());
        if filled_ready || self.offset + bytes as u64 > self.shared.config.segment_bytes {
            if !self.inflight.is_empty() {
                self.stalled = Some(admitted);
                return Ok(None);
            }
            if let Err(error) = self.rotate(bytes as u64) {
                let notice = admitted
                    .into_iter()
                    .map(|request| (request.done, Err(error.clone())))
                    .collect();
                self.notify(notice);
                return Err(error);
            }
        }
        // The first batch's own buffer becomes the group's (no copy: a lone batch, the
        // common case of a blocking caller, is written from where it was encoded);
        // later batches are appended to it. A batch's bytes are not needed after this.
        let mut buf = Vec::new();
        let mut placed = Vec::with_capacity(admitted.len());
        let signature = format::record_signature(self.segment);
        for mut request in admitted {
            let start = buf.len();
            let base = self.offset + start as u64;
            if start == 0 {
                buf = std::mem::take(&mut request.batch.buf);
                buf.reserve_exact(bytes - buf.len());
            } else {
                buf.extend_from_slice(&request.batch.buf);
                request.batch.buf = Vec::new();
            }
            format::sign_records(&mut buf[start..], signature);
            placed.push(Placed { request, base });
        }
        let token = self.next_token;
        self.next_token += 1;
        self.last_group_requests = placed.len();
        let counters = &self.shared.counters;
        counters
            .requests
            .fetch_add(placed.len() as u64, Ordering::Relaxed);
        counters.groups.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.inflight.push_back(Group {
            token,
            segment: self.segment,
            requests: placed,
            durable: bytes == 0,
        });
        if bytes == 0 {
            // Only empty batches: nothing to write, but they complete in order.
            self.complete(&[]);
            return Ok(None);
        }
        let offset = self.offset;
        self.offset += bytes as u64;
        if self.prepared.is_none() && self.offset >= prepare_after(&self.shared.config) {
            let fill = self.shared.config.fill_segments && !self.fill_failed;
            let free = !lock(&self.shared.free_segments).is_empty();
            // A plain segment is quick to prepare: wait for one to reuse meanwhile.
            if fill || free || self.offset >= self.shared.config.segment_bytes / 4 * 3 {
                self.prepared = prepare_in_background(&self.shared, self.segment + 1, fill);
            }
        }
        Ok(Some(GroupWrite {
            token,
            file: self.file.clone(),
            offset,
            buf,
        }))
    }

    /// A lone group written and synced by the writer thread itself (`log.io = auto` on
    /// io_uring, see `run_loop`). A group that nothing is queued behind cannot overlap
    /// another, so the ring would only add its worker's hop (writer → io-wq → writer)
    /// to the group's latency: a blocking caller got 0.67–0.73× of raft-engine's
    /// appends/s through the ring and 0.98× inline (bench/README.md). Requests arriving
    /// meanwhile leave together in the next group, through the ring, and tell
    /// `LonePolicy` that another producer is at work.
    fn written_inline(
        &mut self,
        token: u64,
        written: Result<(), IoFailure>,
    ) -> Result<(), LogError> {
        written.map_err(|failure| self.io_error(failure))?;
        let counters = &self.shared.counters;
        counters.inline_groups.fetch_add(1, Ordering::Relaxed);
        if !lock(&self.shared.queue).requests.is_empty() {
            self.lone_policy.overlapped();
            counters.inline_overlaps.fetch_add(1, Ordering::Relaxed);
        }
        self.written(&[token])
    }

    fn io_error(&self, failure: IoFailure) -> LogError {
        let segment = self
            .inflight
            .iter()
            .find(|g| g.token == failure.token)
            .map_or(self.segment, |g| g.segment);
        LogError::io(
            self.shared.fs.describe(&segment_name(segment)),
            failure.offset,
            failure.error,
        )
    }

    /// Groups `tokens` were written and synced: completes them (see `complete`), unless
    /// the `log::sync` failpoint fails the sync.
    fn written(&mut self, tokens: &[u64]) -> Result<(), LogError> {
        if let Some(&token) = tokens.first() {
            if injected_sync_failure() {
                return Err(self.io_error(IoFailure {
                    token,
                    offset: 0,
                    error: io::Error::from_raw_os_error(libc::EIO),
                }));
            }
        }
        self.shared
            .counters
            .syncs
            .fetch_add(tokens.len() as u64, Ordering::Relaxed);
        self.complete(tokens);
        Ok(())
    }

    /// Marks groups `tokens` durable and completes every durable group at the front,
    /// in order: applies them to the index, moves the durable watermark, and tells
    /// their requests.
    fn complete(&mut self, tokens: &[u64]) {
        for token in tokens {
            if let Some(group) = self.inflight.iter_mut().find(|g| g.token == *token) {
                group.durable = true;
            }
        }
        let mut completed = Vec::new();
        while self.inflight.front().is_some_and(|g| g.durable) {
            if let Some(group) = self.inflight.pop_front() {
                completed.push(group);
            }
        }
        if completed.is_empty() {
            return;
        }
        let mut wants_gc = false;
        let mut durable_seq = 0;
        let mut waiters = 0;
        for group in &completed {
            wants_gc |= self.apply(group);
        }
        self.evict_cache();
        let finished: Finished = completed
            .into_iter()
            .flat_map(|group| group.requests)
            .map(|placed| (placed.request.done, placed.request.seq))
            .map(|(done, seq)| {
                durable_seq = durable_seq.max(seq);
                waiters += usize::from(matches!(done, Done::Wait(_)));
                (done, Ok(()))
            })
            .collect();
        if durable_seq > 0 {
            // Counted before the watermark moves: each waiter counts itself off
            // once it sees the watermark, and `hold` waits for that.
            self.shared
                .notices_pending
                .fetch_add(waiters, Ordering::SeqCst);
            self.shared
                .durable_seq
                .fetch_max(durable_seq, Ordering::SeqCst);
        }
        // Also wakes callers that found the pipeline full (see `lead`).
        if self.shared.sync_waiters.load(Ordering::SeqCst) > 0 {
            self.wake_waiters();
        }
        self.notify(finished);
        if wants_gc {
            self.shared.collect_garbage();
        }
        // The writer thread, if it has work that waited for room in the pipeline.
        if self.stalled.is_some() || lock(&self.shared.queue).calls > 0 {
            self.shared.waker.wake_if_sleeping();
        }
    }

    /// Applies a durable group to the index. Returns whether it compacted or removed.
    fn apply(&mut self, group: &Group) -> bool {
        let mut wants_gc = false;
        // A batch's updates of one range come together (its entries, then its hard
        // state): look the range up once for them.
        let mut last = None;
        let mut locations = std::mem::take(&mut self.locations);
        for placed in &group.requests {
            for update in &placed.request.batch.updates {
                match update {
                    Update::Entries {
                        range,
                        first_index,
                        placed: encoded,
                        terms,
                        cached,
                    } => {
                        locations.clear();
                        locations.extend(encoded.iter().zip(terms).map(|(at, term)| Location {
                            segment: group.segment,
                            offset: placed.base + at.offset as u64,
                            len: at.len,
                            crc: at.crc,
                            term: *term,
                        }));
                        let log = self.range_log(&mut last, *range);
                        let delta = lock(&log).append(*first_index, &locations, cached);
                        match delta {
                            Ok(delta) => self.cache_bytes += delta,
                            Err(error) => unreachable!(
                                "admit() lets through only appends that continue the log: {error:?}"
                            ),
                        }
                        if !cached.is_empty() {
                            self.cache_queue
                                .push_back((*range, first_index + cached.len() as u64 - 1));
                        }
                    }
                    Update::HardState { range, hard_state } => {
                        let log = self.range_log(&mut last, *range);
                        lock(&log).set_hard_state(hard_state.clone(), group.segment);
                    }
                    Update::Compaction {
                        range,
                        truncated_index,
                        truncated_term,
                    } => {
                        let log = self.shared.range_or_insert(*range);
                        let freed =
                            lock(&log).compact(*truncated_index, *truncated_term, group.segment);
                        self.cache_bytes -= freed as isize;
                        wants_gc = true;
                    }
                    Update::Reset {
                        range,
                        index,
                        term,
                        hard_state,
                    } => {
                        last = None;
                        if let Some(log) = write(&self.shared.ranges).remove(range) {
                            let freed = lock(&log).evict_cache_through(u64::MAX);
                            self.cache_bytes -= freed as isize;
                        }
                        let log = self.shared.range_or_insert(*range);
                        let mut log = lock(&log);
                        log.compact(*index, *term, group.segment);
                        log.set_hard_state(hard_state.clone(), group.segment);
                        wants_gc = true;
                    }
                    Update::Removal { range } => {
                        last = None;
                        if let Some(log) = write(&self.shared.ranges).remove(range) {
                            let freed = lock(&log).evict_cache_through(u64::MAX);
                            self.cache_bytes -= freed as isize;
                        }
                        wants_gc = true;
                    }
                }
            }
        }
        self.locations = locations;
        wants_gc
    }

    /// Range `range`'s log, from `last` if it is the range looked up last.
    fn range_log(
        &self,
        last: &mut Option<(RangeId, Arc<Mutex<RangeLog>>)>,
        range: RangeId,
    ) -> Arc<Mutex<RangeLog>> {
        match last {
            Some((at, log)) if *at == range => log.clone(),
            _ => {
                let log = self.shared.range_or_insert(range);
                *last = Some((range, log.clone()));
                log
            }
        }
    }

    fn evict_cache(&mut self) {
        self.cache_bytes -= self.shared.cache_released.swap(0, Ordering::Relaxed) as isize;
        let budget = self.shared.config.cache_bytes_max as isize;
        while self.cache_bytes > budget || self.cache_queue.len() > CACHE_QUEUE_ITEMS_MAX {
            let Some((range, through)) = self.cache_queue.pop_front() else {
                break;
            };
            if let Some(log) = self.shared.range(range) {
                self.cache_bytes -= lock(&log).evict_cache_through(through) as isize;
            }
        }
    }

    /// Starts a new segment, rewrites cold ranges forward when the log has grown past
    /// its threshold, and deletes what no range needs. Runs only when everything in
    /// flight is durable (see `place`), so no segment but the newest can ever end in a
    /// torn record. `reserve`: bytes of the group waiting to go into the new segment.
    fn rotate(&mut self, reserve: u64) -> Result<(), LogError> {
        debug_assert!(self.inflight.is_empty(), "rotation with groups in flight");
        if self.recycled {
            self.mark_end()?;
        }
        let next = self.segment + 1;
        let prepared = self.prepared.take().map(|p| (p.kind, p.thread.join()));
        let (file, kind) = match prepared {
            Some((kind, Ok(Ok(file)))) => (file, kind),
            // Not started (no helper thread, or the segment filled up before the
            // threshold), or the helper failed: prepare it here, unfilled. A helper
            // that failed to fill (say, no space for a whole segment of zeros) fills
            // no more.
            failed => {
                if let Some((kind, outcome)) = failed {
                    let why = match outcome {
                        Ok(Err(error)) => error.to_string(),
                        _ => "the helper thread panicked".to_string(),
                    };
                    tracing::warn!(segment = next, %why, "preparing a log segment ahead failed; preparing it in place, unfilled");
                    self.fill_failed |= kind == Kind::Filled;
                    // A temporary file left behind would make the creation fail.
                    let _ = self.shared.fs.remove(&temporary_name(next));
                }
                match prepare_in_place(&self.shared, next)? {
                    (file, true) => (file, Kind::Recycled),
                    (file, false) => (file, Kind::Plain),
                }
            }
        };
        self.filled = kind != Kind::Plain;
        self.recycled = kind == Kind::Recycled;
        if self.recycled {
            let reused = &self.shared.counters.segments_reused;
            reused.fetch_add(1, Ordering::Relaxed);
        }
        self.file = install_segment(&self.shared, next, file)?;
        self.segment = next;
        self.offset = format::SEGMENT_HEADER_BYTES;
        self.shared.collect_garbage();
        self.rewrite_cold_ranges(reserve)
    }

    /// Ends the records of a reused segment the writer is leaving with a zero record
    /// header, durably, before anything goes into the next segment: replay reads
    /// every segment but the newest to its end, and past this one's records lie those
    /// of its earlier life. Nothing is in flight (see `rotate`).
    fn mark_end(&mut self) -> Result<(), LogError> {
        let room = self.shared.config.segment_bytes.saturating_sub(self.offset);
        let zeros = [0u8; format::RECORD_HEADER_BYTES];
        let mark = &zeros[..room.min(zeros.len() as u64) as usize];
        self.file
            .write_all_at(mark, self.offset)
            .and_then(|()| self.file.sync_data())
            .map_err(|error| {
                LogError::io(
                    self.shared.fs.describe(&segment_name(self.segment)),
                    self.offset,
                    error,
                )
            })
    }

    /// Rewrites ranges pinning the oldest segment into the new one, written and synced
    /// here, under the lock (once per segment at most). Runs only right after a
    /// rotation, when nothing is in flight, so the durable index is the whole truth;
    /// the rewrite goes ahead of the waiting group, so replay order holds. It changes
    /// no range's state, so it skips admission.
    fn rewrite_cold_ranges(&mut self, reserve: u64) -> Result<(), LogError> {
        let config = &self.shared.config;
        let (oldest, held_bytes) = {
            let segments = read(&self.shared.segments);
            let Some(oldest) = segments.keys().next().copied() else {
                return Ok(());
            };
            (oldest, segments.len() as u64 * config.segment_bytes)
        };
        if held_bytes <= config.rewrite_threshold_bytes || oldest >= self.segment {
            return Ok(());
        }
        let config = config.clone();
        // Only cold ranges: those that wrote nothing into the segment just finished
        // (or this new one). A range still writing releases the old segment with its
        // next compaction; rewriting it would copy its whole live log on this thread
        // while every writer waits (~0.5 s per rotation with 100 busy ranges of
        // 16 KiB entries), for nothing.
        let cold_before = self.segment.saturating_sub(1);
        let pinning: Vec<RangeId> = read(&self.shared.ranges)
            .iter()
            .filter(|(_, log)| {
                let log = lock(log);
                log.pinned_segment() == Some(oldest)
                    && log.newest_segment().is_some_and(|s| s < cold_before)
            })
            .map(|(range, _)| *range)
            .collect();
        let mut requests = Vec::new();
        let mut room = config.segment_bytes.saturating_sub(self.offset + reserve);
        let mut too_large = 0;
        for range in pinning {
            let Some(log) = self.shared.range(range) else {
                continue;
            };
            let (truncated_index, truncated_term, hard_state, resolved) = {
                let log = lock(&log);
                // Judged before reading anything: a range that cannot fit is skipped
                // without reading its entries back on the writer thread.
                if log.live_bytes() + REWRITE_OVERHEAD_BYTES > room {
                    too_large += 1;
                    continue;
                }
                let fetches = if log.last_index() >= log.first_index() {
                    log.fetch(log.first_index(), log.last_index() + 1, u64::MAX)
                } else {
                    Vec::new()
                };
                let resolved = self.shared.resolve(fetches);
                (
                    log.truncated_index,
                    log.truncated_term,
                    log.hard_state.clone(),
                    resolved,
                )
            };
            let entries = match self.shared.read_resolved(resolved) {
                Ok(entries) => entries,
                Err(error) => {
                    // Not a write failure: keep the range where it is, and say so.
                    tracing::error!(%range, %error, "cannot rewrite range forward; its segment stays");
                    continue;
                }
            };
            let mut batch = LogBatch::new();
            batch.compact_to(range, truncated_index, truncated_term);
            batch.set_hard_state(range, hard_state);
            batch.append_inner(range, entries, false);
            if batch.bytes() as u64 > room {
                too_large += 1;
                continue;
            }
            room -= batch.bytes() as u64;
            requests.push(Request {
                batch,
                done: Done::Call(Box::new(|_| {})),
                seq: 0,
            });
        }
        if too_large > 0 {
            tracing::warn!(
                segment = oldest,
                ranges = too_large,
                "ranges pinning the oldest log segment are too large to rewrite into the new one; it stays"
            );
        }
        if requests.is_empty() {
            return Ok(());
        }
        tracing::info!(
            segment = oldest,
            ranges = requests.len(),
            "rewriting cold ranges forward"
        );
        let rewritten = &self.shared.counters.ranges_rewritten;
        rewritten.fetch_add(requests.len() as u64, Ordering::Relaxed);
        match self.place(requests)? {
            Some(write) => {
                write_and_sync(&write).map_err(|failure| self.io_error(failure))?;
                self.written(&[write.token])
            }
            None => Ok(()),
        }
    }

    /// Stops for good: every request in flight or queued fails with `error`.
    fn fail(&mut self, error: LogError) {
        tracing::error!(%error, "raft log engine stopped");
        *lock(&self.shared.failure) = Some(error.clone());
        self.shared.failed.store(true, Ordering::SeqCst);
        let mut notice: Finished = self
            .inflight
            .drain(..)
            .flat_map(|group| group.requests)
            .map(|placed| (placed.request.done, Err(error.clone())))
            .collect();
        let stalled = self.stalled.take().unwrap_or_default();
        for request in stalled {
            notice.push((request.done, Err(error.clone())));
        }
        let queued: Vec<Request> = {
            let mut queue = lock(&self.shared.queue);
            queue.bytes = 0;
            queue.calls = 0;
            queue.requests.drain(..).collect()
        };
        for request in queued {
            notice.push((request.done, Err(LogError::Stopped(error.to_string()))));
        }
        self.notify(notice);
        // Every `write_sync` waiter looks again, whether or not its request was among
        // those failed above (after a panic, some may be in neither list); after the
        // slots are filled, so each finds its own error.
        self.wake_waiters();
        self.shared.queue_not_full.notify_all();
        // The writer thread, when a caller's write failed.
        self.shared.waker.wake();
    }
}

/// Group syncs left before the `log::sync` failpoint fails one; `u64::MAX` = unarmed.
pub(crate) static SYNCS_BEFORE_FAILURE: AtomicU64 = AtomicU64::new(u64::MAX);

/// Fault injection: whether the `log::sync` failpoint fails this group's fsync.
fn injected_sync_failure() -> bool {
    let counted = SYNCS_BEFORE_FAILURE.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
        (left != u64::MAX && left > 0).then(|| left - 1)
    });
    counted.is_err_and(|left| left == 0)
}

fn temporary_name(sequence: u64) -> String {
    format!("{}.tmp", segment_name(sequence))
}

/// The next segment starts being prepared once this many bytes of the one being
/// written are used: a quarter of it, at most 8 MiB. Early enough to be ready long
/// before the current one is full; late enough that a log that writes little (an idle
/// store, most tests) never spends a segment's worth of zeros when filling.
fn prepare_after(config: &LogConfig) -> u64 {
    (config.segment_bytes / 4).min(8 << 20)
}

/// Zeros written per call while filling a segment.
const FILL_CHUNK: usize = 1 << 20;

/// Creates segment `sequence` under a temporary name, preallocated, with its header,
/// synced. Replay ignores (and open deletes) temporary files, so a prepared segment
/// never appears in the log before the writer installs it.
///
/// With `fill` the whole file is also written with zeros before the sync, unless
/// `fill` turns true meanwhile (then the preparation fails). A preallocated extent is
/// "unwritten" until data lands in it, and the first fdatasync after a write into it
/// must also commit that conversion through the filesystem's journal; a filled
/// segment's syncs flush data only. Measured on this VM: 89 against 145 µs for a lone
/// 16 KiB write + fdatasync, 186 against 285 µs with three files syncing at once
/// (bench/README.md, "Moved from ARCHITECTURE.md").
fn prepare_segment(
    fs: &dyn FileSystem,
    sequence: u64,
    bytes: u64,
    fill: Option<&AtomicBool>,
) -> Result<Arc<dyn SegmentFile>, LogError> {
    let name = temporary_name(sequence);
    let describe = || fs.describe(&name);
    let file = fs
        .create(&name, bytes)
        .map_err(|e| LogError::io(describe(), 0, e))?;
    if let Some(cancel) = fill {
        let zeros = vec![0u8; FILL_CHUNK];
        let mut at = 0;
        while at < bytes {
            if cancel.load(Ordering::Relaxed) {
                return Err(LogError::Stopped("segment preparation cancelled".into()));
            }
            let len = (bytes - at).min(FILL_CHUNK as u64) as usize;
            file.write_all_at(&zeros[..len], at)
                .map_err(|e| LogError::io(describe(), at, e))?;
            at += len as u64;
        }
    }
    let header = format::encode_segment_header(sequence);
    file.write_all_at(&header, 0)
        .and_then(|()| file.sync_data())
        .map_err(|e| LogError::io(describe(), 0, e))?;
    Ok(file)
}

/// Makes a deleted segment, `free`, segment `sequence` under its temporary name: a
/// new header, synced. Its blocks are all written, so syncs after writes into it flush
/// data only, as a filled segment's do; the records of its earlier life stay behind
/// what gets written, signed for another sequence (format.rs).
fn prepare_recycled(
    fs: &dyn FileSystem,
    free: &str,
    sequence: u64,
    bytes: u64,
) -> Result<Arc<dyn SegmentFile>, LogError> {
    let name = temporary_name(sequence);
    fs.rename(free, &name)
        .map_err(|e| LogError::io(fs.describe(free), 0, e))?;
    let file = fs
        .open(&name)
        .map_err(|e| LogError::io(fs.describe(&name), 0, e))?;
    match file.len() {
        Ok(len) if len == bytes => {}
        Ok(len) => {
            let error = io::Error::other(format!("{len} bytes, not {bytes}"));
            return Err(LogError::io(fs.describe(&name), 0, error));
        }
        Err(error) => return Err(LogError::io(fs.describe(&name), 0, error)),
    }
    let header = format::encode_segment_header(sequence);
    file.write_all_at(&header, 0)
        .and_then(|()| file.sync_data())
        .map_err(|e| LogError::io(fs.describe(&name), 0, e))?;
    Ok(file)
}

/// Prepares segment `sequence` on this thread: a deleted one reused if one waits (and
/// it works out), else a new one, unfilled. Returns the file and whether it is reused.
fn prepare_in_place(
    shared: &Shared,
    sequence: u64,
) -> Result<(Arc<dyn SegmentFile>, bool), LogError> {
    let bytes = shared.config.segment_bytes;
    if let Some(free) = shared.take_free_segment() {
        match prepare_recycled(shared.fs.as_ref(), &free, sequence, bytes) {
            Ok(file) => return Ok((file, true)),
            Err(error) => {
                tracing::warn!(segment = sequence, %error, "could not reuse a deleted log segment; creating a new one");
                let _ = shared.fs.remove(&temporary_name(sequence));
                let _ = shared.fs.remove(&free);
            }
        }
    }
    Ok((
        prepare_segment(shared.fs.as_ref(), sequence, bytes, None)?,
        false,
    ))
}

/// Gives segment `sequence` its real name and makes it the one being written.
fn install_segment(
    shared: &Shared,
    sequence: u64,
    file: Arc<dyn SegmentFile>,
) -> Result<Arc<dyn SegmentFile>, LogError> {
    let name = segment_name(sequence);
    shared
        .fs
        .rename(&temporary_name(sequence), &name)
        .map_err(|e| LogError::io(shared.fs.describe(&name), 0, e))?;
    write(&shared.segments).insert(sequence, file.clone());
    shared.active_segment.store(sequence, Ordering::SeqCst);
    Ok(file)
}

/// How a segment was prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// New and preallocated: its extents are unwritten.
    Plain,
    /// New and written with zeros (`LogConfig::fill_segments`).
    Filled,
    /// A deleted segment reused (`LogConfig::recycle_segments`).
    Recycled,
}

/// The next segment, being prepared on a helper thread.
struct Prepared {
    thread: std::thread::JoinHandle<Result<Arc<dyn SegmentFile>, LogError>>,
    cancel: Arc<AtomicBool>,
    kind: Kind,
}

/// Prepares the next segment on a helper thread while the writer fills this one: a
/// deleted one reused if one waits, else a new one, filled if `fill`.
fn prepare_in_background(shared: &Arc<Shared>, sequence: u64, fill: bool) -> Option<Prepared> {
    if !shared.fs.has_raw_fds() {
        // Preparing inline keeps a seeded crash test's order of operations
        // deterministic.
        return None;
    }
    let free = shared.take_free_segment();
    let kind = match (&free, fill) {
        (Some(_), _) => Kind::Recycled,
        (None, true) => Kind::Filled,
        (None, false) => Kind::Plain,
    };
    let taken = free.clone();
    let helper = shared.clone();
    let bytes = shared.config.segment_bytes;
    let cancel = Arc::new(AtomicBool::new(false));
    let cancelled = cancel.clone();
    let spawned = std::thread::Builder::new()
        .name("rangekv-log-prepare".into())
        .spawn(move || {
            let fs = helper.fs.as_ref();
            match &free {
                Some(free) => {
                    let prepared = prepare_recycled(fs, free, sequence, bytes);
                    if prepared.is_err() {
                        // Wherever it failed, the file is not worth another try.
                        let _ = fs.remove(free);
                    }
                    prepared
                }
                None => {
                    let fill = (kind == Kind::Filled).then_some(cancelled.as_ref());
                    prepare_segment(fs, sequence, bytes, fill)
                }
            }
        });
    match spawned {
        Ok(thread) => Some(Prepared {
            thread,
            cancel,
            kind,
        }),
        Err(error) => {
            tracing::warn!(%error, "could not start the log segment helper thread");
            if let Some(free) = taken {
                lock(&shared.free_segments).push_front(free);
            }
            None
        }
    }
}

/// Deletes temporary segments a crash left behind.
pub(crate) fn remove_temporary_segments(fs: &dyn FileSystem) -> Result<(), LogError> {
    let names = fs.list().map_err(|e| LogError::io(fs.describe(""), 0, e))?;
    for name in names.iter().filter(|n| n.ends_with(".rlog.tmp")) {
        fs.remove(name)
            .map_err(|e| LogError::io(fs.describe(name), 0, e))?;
    }
    Ok(())
}

impl Shared {
    pub(crate) fn waker_sleeping(&self, sleeping: bool) {
        self.waker.set_sleeping(sleeping);
    }
}

impl Waker {
    fn set_sleeping(&self, sleeping: bool) {
        self.sleeping.store(sleeping, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::DiskFileSystem;

    #[test]
    fn a_filled_segment_holds_its_header_then_zeros_and_a_cancelled_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let fs = DiskFileSystem::open(dir.path()).unwrap();
        let bytes = 3 * FILL_CHUNK as u64 + 512;
        let not_cancelled = AtomicBool::new(false);
        let file = prepare_segment(&fs, 7, bytes, Some(&not_cancelled)).unwrap();
        let mut content = vec![0xAAu8; bytes as usize];
        file.read_exact_at(&mut content, 0).unwrap();
        assert_eq!(
            format::decode_segment_header(&content).map(|h| h.sequence),
            Ok(7)
        );
        let body = &content[format::SEGMENT_HEADER_BYTES as usize..];
        assert!(body.iter().all(|&b| b == 0));
        assert_eq!(file.len().unwrap(), bytes);

        let cancelled = AtomicBool::new(true);
        let refused = prepare_segment(&fs, 8, bytes, Some(&cancelled));
        assert!(matches!(refused, Err(LogError::Stopped(_))));
    }

    #[test]
    fn lone_groups_go_inline_until_another_producer_overlaps_one() {
        let mut policy = LonePolicy::default();
        assert!((0..1000).all(|_| policy.inline()), "no overlap: all inline");
        policy.overlapped();
        for n in 0..RING_LONE_GROUPS_AFTER_OVERLAP {
            assert!(!policy.inline(), "lone group {n} after an overlap: ring");
        }
        assert!(policy.inline(), "then inline is tried again");
        policy.overlapped();
        assert!(!policy.inline(), "a new overlap: ring again");
    }
}

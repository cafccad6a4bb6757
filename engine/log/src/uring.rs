//! The io_uring writer: each group is one `write` linked (`IOSQE_IO_LINK`) to one
//! `fdatasync`, so the group is durable when the sync completes. Completions arrive in
//! any order; the writer completes groups in submission order regardless.
//!
//! A short write breaks the link (the sync completes with `-ECANCELED`); the rest of
//! the buffer is then submitted again, linked to a fresh sync. Any other error is
//! fatal and never retried. The writer's eventfd is read through the ring too, so one
//! wait covers both "a group is durable" and "a request arrived".

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use crate::file::SegmentFile;
use crate::writer::{Backend, GroupWrite, IoFailure, Wait, Waker};

const EVENTFD_USER_DATA: u64 = u64::MAX;
const KIND_WRITE: u64 = 0;
const KIND_SYNC: u64 = 1;

struct InFlight {
    buf: Vec<u8>,
    /// Held so the descriptor stays open while the kernel uses it.
    _file: Arc<dyn SegmentFile>,
    fd: i32,
    offset: u64,
    written: usize,
    /// Bytes written by the current attempt's write.
    attempt_written: usize,
    pending: u8,
    sync_ok: bool,
    error: Option<io::Error>,
}

pub(crate) struct UringBackend {
    ring: IoUring,
    inflight: HashMap<u64, InFlight>,
    eventfd_buf: Box<[u8; 8]>,
    eventfd_armed: Option<i32>,
    /// Created disabled, to be enabled by the writer thread (`Backend::start`).
    disabled: bool,
    /// Completions are deferred task work run in the writer's waits (Linux 6.1+).
    deferred: bool,
}

impl UringBackend {
    /// Where the kernel allows (Linux 6.1+), the ring has one issuer, the writer
    /// thread, and completions are deferred task work, run only when the writer waits
    /// in the ring (`IORING_SETUP_DEFER_TASKRUN`) instead of interrupting it whenever an
    /// fdatasync finishes on a kernel worker. Measured: p999 7–14 ms → 1.3–3 ms at
    /// 100 ranges × 64 writers × 1 KiB, throughput unchanged (bench/README.md). Such a
    /// ring is created disabled and enabled from the writer thread, its only issuer.
    /// Older kernels (EINVAL) get a plain ring.
    pub fn new(pipeline_depth: usize) -> io::Result<Self> {
        let entries = ((2 * pipeline_depth + 2) as u32).next_power_of_two().max(8);
        let deferred = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .build(entries);
        let (ring, disabled) = match deferred {
            Ok(ring) => (ring, true),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                (IoUring::new(entries)?, false)
            }
            Err(error) => return Err(error),
        };
        Ok(UringBackend {
            ring,
            inflight: HashMap::new(),
            eventfd_buf: Box::new([0; 8]),
            eventfd_armed: None,
            disabled,
            deferred: disabled,
        })
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer an entry points to (a group's `buf`, `eventfd_buf`) is
        // owned by `self` and neither moved nor freed until its completion is reaped
        // (see `Drop`).
        unsafe { self.ring.submission().push(entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Submits the unwritten rest of group `token`, linked to a data sync.
    fn submit_rest(&mut self, token: u64) -> io::Result<()> {
        let Some(flight) = self.inflight.get_mut(&token) else {
            return Ok(());
        };
        let rest = &flight.buf[flight.written..];
        let write = opcode::Write::new(types::Fd(flight.fd), rest.as_ptr(), rest.len() as u32)
            .offset(flight.offset + flight.written as u64)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(token << 2 | KIND_WRITE);
        let sync = opcode::Fsync::new(types::Fd(flight.fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(token << 2 | KIND_SYNC);
        flight.attempt_written = 0;
        flight.sync_ok = false;
        self.push(&write)?;
        self.bump_pending(token);
        self.push(&sync)?;
        self.bump_pending(token);
        Ok(())
    }

    fn submit_sync_only(&mut self, token: u64) -> io::Result<()> {
        let Some(flight) = self.inflight.get_mut(&token) else {
            return Ok(());
        };
        let sync = opcode::Fsync::new(types::Fd(flight.fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(token << 2 | KIND_SYNC);
        self.push(&sync)?;
        self.bump_pending(token);
        Ok(())
    }

    /// Counts one operation of `token` pushed and not yet reaped (what `Drop` waits for).
    fn bump_pending(&mut self, token: u64) {
        if let Some(flight) = self.inflight.get_mut(&token) {
            flight.pending += 1;
        }
    }

    fn enter(&mut self, wait_for: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(wait_for) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && wait_for == 0 => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Handles one completion; `Some(token)` when group `token` is durable.
    fn complete(&mut self, user_data: u64, result: i32) -> Result<Option<u64>, IoFailure> {
        if user_data == EVENTFD_USER_DATA {
            self.eventfd_armed = None;
            return Ok(None);
        }
        let token = user_data >> 2;
        let Some(flight) = self.inflight.get_mut(&token) else {
            return Ok(None);
        };
        flight.pending = flight.pending.saturating_sub(1);
        if user_data & 3 == KIND_WRITE {
            if result < 0 {
                flight
                    .error
                    .get_or_insert(io::Error::from_raw_os_error(-result));
            } else {
                flight.written += result as usize;
                flight.attempt_written = result as usize;
            }
        } else if result == 0 {
            flight.sync_ok = true;
        } else if result != -libc::ECANCELED {
            flight
                .error
                .get_or_insert(io::Error::from_raw_os_error(-result));
        }
        if flight.pending > 0 {
            return Ok(None);
        }
        let failure = |flight: &mut InFlight, error| IoFailure {
            token,
            offset: flight.offset + flight.written as u64,
            error,
        };
        if let Some(error) = flight.error.take() {
            return Err(failure(flight, error));
        }
        if flight.written < flight.buf.len() {
            if flight.attempt_written == 0 {
                return Err(failure(flight, io::ErrorKind::WriteZero.into()));
            }
            return match self.submit_rest(token) {
                Ok(()) => Ok(None),
                Err(error) => Err(IoFailure {
                    token,
                    offset: 0,
                    error,
                }),
            };
        }
        if !flight.sync_ok {
            // The whole buffer is written but its sync was cancelled: sync again.
            return match self.submit_sync_only(token) {
                Ok(()) => Ok(None),
                Err(error) => Err(IoFailure {
                    token,
                    offset: 0,
                    error,
                }),
            };
        }
        self.inflight.remove(&token);
        Ok(Some(token))
    }
}

impl Backend for UringBackend {
    fn start(&mut self) -> io::Result<()> {
        if self.disabled {
            self.ring.submitter().register_enable_rings()?;
            self.disabled = false;
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn mode(&self) -> &'static str {
        if self.deferred {
            "single issuer, completions deferred to the writer's waits"
        } else {
            "plain ring (the kernel refused DEFER_TASKRUN: before Linux 6.1)"
        }
    }

    fn submit(&mut self, write: GroupWrite) -> Result<(), IoFailure> {
        let token = write.token;
        let fail = |error| IoFailure {
            token,
            offset: write.offset,
            error,
        };
        let fd = write
            .file
            .raw_fd()
            .ok_or_else(|| fail(io::Error::other("segment file has no descriptor")))?;
        if u32::try_from(write.buf.len()).is_err() {
            return Err(fail(io::Error::other("group larger than 4 GiB")));
        }
        self.inflight.insert(
            token,
            InFlight {
                buf: write.buf,
                _file: write.file,
                fd,
                offset: write.offset,
                written: 0,
                attempt_written: 0,
                pending: 0,
                sync_ok: false,
                error: None,
            },
        );
        self.submit_rest(token)
            .and_then(|()| self.enter(0))
            .map_err(|error| IoFailure {
                token,
                offset: 0,
                error,
            })
    }

    fn reap(&mut self, wait: Wait, waker: &Waker, done: &mut Vec<u64>) -> Result<(), IoFailure> {
        let as_failure = |error| IoFailure {
            token: 0,
            offset: 0,
            error,
        };
        if wait == Wait::ForCompletionOrRequest && self.eventfd_armed.is_none() {
            let read =
                opcode::Read::new(types::Fd(waker.raw_fd()), self.eventfd_buf.as_mut_ptr(), 8)
                    .build()
                    .user_data(EVENTFD_USER_DATA);
            self.push(&read).map_err(as_failure)?;
            self.eventfd_armed = Some(waker.raw_fd());
        }
        let wait_for = usize::from(wait != Wait::No);
        self.enter(wait_for).map_err(as_failure)?;
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        // Handle every completion before reporting the first failure, so the pending
        // counts stay exact (Drop waits on them).
        let mut first_failure = None;
        for (user_data, result) in completions {
            match self.complete(user_data, result) {
                Ok(Some(token)) => done.push(token),
                Ok(None) => {}
                Err(failure) => {
                    first_failure.get_or_insert(failure);
                }
            }
        }
        match first_failure {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // The kernel may still read group buffers or write `eventfd_buf`: wait for every
        // outstanding operation before freeing them. If waiting fails, leak them.
        if let Some(fd) = self.eventfd_armed {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to the writer's eventfd.
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
        let mut rounds = 0;
        while (self.eventfd_armed.is_some() || self.inflight.values().any(|f| f.pending > 0))
            && rounds < 1000
        {
            rounds += 1;
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let completions: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result()))
                .collect();
            for (user_data, _) in completions {
                if user_data == EVENTFD_USER_DATA {
                    self.eventfd_armed = None;
                } else if let Some(flight) = self.inflight.get_mut(&(user_data >> 2)) {
                    flight.pending = flight.pending.saturating_sub(1);
                }
            }
        }
        if self.eventfd_armed.is_some() || self.inflight.values().any(|f| f.pending > 0) {
            std::mem::forget(std::mem::take(&mut self.inflight));
            std::mem::forget(std::mem::replace(&mut self.eventfd_buf, Box::new([0; 8])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::{DiskFileSystem, FileSystem};

    fn flight(file: Arc<dyn SegmentFile>, buf: Vec<u8>) -> InFlight {
        InFlight {
            fd: file.raw_fd().unwrap(),
            _file: file,
            buf,
            offset: 100,
            written: 0,
            attempt_written: 0,
            pending: 2,
            sync_ok: false,
            error: None,
        }
    }

    fn setup() -> (tempfile::TempDir, Arc<dyn SegmentFile>, UringBackend, Waker) {
        let dir = tempfile::tempdir().unwrap();
        let fs = DiskFileSystem::open(dir.path()).unwrap();
        let file = fs.create("f", 8192).unwrap();
        let mut backend = UringBackend::new(2).unwrap();
        // This thread is the writer here.
        backend.start().unwrap();
        (dir, file, backend, Waker::new().unwrap())
    }

    /// Linux 6.1 brought `IORING_SETUP_DEFER_TASKRUN`; from there on the ring must use
    /// it (the p999 of the log bench depends on it), before it must fall back.
    #[test]
    fn the_ring_defers_completions_from_linux_6_1_on() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut numbers = release.trim().split(['.', '-']).map(|n| n.parse::<u32>());
        let version = match (numbers.next(), numbers.next()) {
            (Some(Ok(major)), Some(Ok(minor))) => (major, minor),
            _ => panic!("unexpected kernel release {release:?}"),
        };
        let backend = UringBackend::new(2).unwrap();
        assert_eq!(backend.deferred, version >= (6, 1), "kernel {release}");
        assert!(backend.mode().contains(if backend.deferred {
            "deferred"
        } else {
            "plain"
        }));
    }

    #[test]
    fn a_short_write_resubmits_the_rest_with_a_new_sync() {
        let (_dir, file, mut backend, waker) = setup();
        let buf: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let token = 7;
        backend
            .inflight
            .insert(token, flight(file.clone(), buf.clone()));
        // As if the kernel wrote 1000 bytes and cancelled the linked sync.
        assert!(matches!(
            backend.complete(token << 2 | KIND_WRITE, 1000),
            Ok(None)
        ));
        assert!(matches!(
            backend.complete(token << 2 | KIND_SYNC, -libc::ECANCELED),
            Ok(None)
        ));
        assert_eq!(backend.inflight[&token].written, 1000);
        assert_eq!(
            backend.inflight[&token].pending, 2,
            "rest + sync resubmitted"
        );
        // The resubmitted rest really lands; the group completes only then. Only the
        // rest was written, so the first 1000 bytes stay as they were (zeros).
        let mut done = Vec::new();
        while done.is_empty() {
            backend
                .reap(Wait::ForCompletion, &waker, &mut done)
                .ok()
                .unwrap();
        }
        assert_eq!(done, vec![token]);
        let mut on_disk = vec![0u8; 3000];
        file.read_exact_at(&mut on_disk, 100).unwrap();
        assert!(on_disk[..1000].iter().all(|&b| b == 0));
        assert_eq!(on_disk[1000..], buf[1000..]);
    }

    #[test]
    fn a_failed_write_fails_the_group_and_is_not_retried() {
        let (_dir, file, mut backend, _waker) = setup();
        let token = 3;
        backend.inflight.insert(token, flight(file, vec![1; 512]));
        assert!(matches!(
            backend.complete(token << 2 | KIND_WRITE, -libc::EIO),
            Ok(None)
        ));
        let failure = backend
            .complete(token << 2 | KIND_SYNC, -libc::ECANCELED)
            .expect_err("EIO on the write fails the group");
        assert_eq!(failure.token, token);
        assert_eq!(failure.error.raw_os_error(), Some(libc::EIO));
        assert_eq!(backend.inflight[&token].pending, 0, "nothing resubmitted");
    }

    #[test]
    fn a_failed_sync_fails_the_group() {
        let (_dir, file, mut backend, _waker) = setup();
        let token = 4;
        backend.inflight.insert(token, flight(file, vec![1; 512]));
        assert!(matches!(
            backend.complete(token << 2 | KIND_WRITE, 512),
            Ok(None)
        ));
        let failure = backend
            .complete(token << 2 | KIND_SYNC, -libc::EIO)
            .expect_err("a failed fdatasync fails the group");
        assert_eq!(failure.error.raw_os_error(), Some(libc::EIO));
    }
}

//! An in-memory [`FileSystem`] that models what a crash does to unsynced data.
//!
//! Every write since a file's last `sync_data` is remembered. [`SimFileSystem::crash`]
//! freezes the file system (every later operation fails, as if the machine stopped)
//! and [`SimFileSystem::recover`] returns the image a reboot would find: each unsynced
//! write independently survives whole, vanishes, or is torn — a prefix cut at a 512 B
//! or 4 KiB boundary survives and the rest of it reads as zeros or garbage.
//!
//! [`SimFileSystem::crash_after`] arms a crash at the N-th write or sync, which is how
//! the crash tests place thousands of crash points. The simulation of the whole store
//! (a later issue) uses the same file system.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::file::{FileSystem, SegmentFile};

/// A tiny deterministic generator (SplitMix64), so a crash image is a function of a seed.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

#[derive(Default)]
struct FileState {
    /// What a crash keeps for sure: the content as of the last sync.
    durable: Vec<u8>,
    /// What reads see now.
    current: Vec<u8>,
    /// Writes since the last sync: (offset, length).
    unsynced: Vec<(u64, usize)>,
}

struct Shared {
    files: Mutex<BTreeMap<String, Arc<Mutex<FileState>>>>,
    crashed: AtomicBool,
    /// Operations (writes and syncs) left before an armed crash; u64::MAX when none.
    crash_countdown: AtomicU64,
}

/// See the module documentation.
#[derive(Clone)]
pub struct SimFileSystem {
    shared: Arc<Shared>,
}

impl Default for SimFileSystem {
    fn default() -> Self {
        Self::new()
    }
}

fn crashed_error() -> io::Error {
    io::Error::other("simulated crash: the file system is gone")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind: keep using it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SimFileSystem {
    pub fn new() -> Self {
        SimFileSystem {
            shared: Arc::new(Shared {
                files: Mutex::new(BTreeMap::new()),
                crashed: AtomicBool::new(false),
                crash_countdown: AtomicU64::new(u64::MAX),
            }),
        }
    }

    /// Crash at the `operations`-th write or sync from now.
    pub fn crash_after(&self, operations: u64) {
        self.shared
            .crash_countdown
            .store(operations.max(1), Ordering::SeqCst);
    }

    /// Stops the file system now: every later operation fails.
    pub fn crash(&self) {
        self.shared.crashed.store(true, Ordering::SeqCst);
    }

    pub fn has_crashed(&self) -> bool {
        self.shared.crashed.load(Ordering::SeqCst)
    }

    /// Counts one operation; crashes when the armed countdown reaches zero.
    fn operation(&self) -> io::Result<()> {
        if self.has_crashed() {
            return Err(crashed_error());
        }
        let left =
            self.shared
                .crash_countdown
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n != u64::MAX && n > 0).then(|| n - 1)
                });
        if left == Ok(1) {
            self.crash();
            return Err(crashed_error());
        }
        Ok(())
    }

    /// The file system a reboot finds after a crash: a new, working instance.
    pub fn recover(&self, rng: &mut SimRng) -> SimFileSystem {
        let files = lock(&self.shared.files);
        let mut recovered = BTreeMap::new();
        for (name, file) in files.iter() {
            let file = lock(file);
            let mut image = file.durable.clone();
            for &(offset, len) in &file.unsynced {
                let offset = offset as usize;
                let end = offset + len;
                if image.len() < end {
                    image.resize(end, 0);
                }
                let kept = match rng.below(4) {
                    0 => 0,
                    1 => len,
                    _ => {
                        let block = if rng.below(2) == 0 { 512 } else { 4096 };
                        let blocks = len / block;
                        block * rng.below(blocks as u64 + 1) as usize
                    }
                };
                image[offset..offset + kept].copy_from_slice(&file.current[offset..offset + kept]);
                // The lost part reads as what was durable there, zeros, or garbage.
                match rng.below(3) {
                    0 => {}
                    1 => image[offset + kept..end].fill(0),
                    _ => {
                        for byte in &mut image[offset + kept..end] {
                            *byte = rng.next_u64() as u8;
                        }
                    }
                }
            }
            let state = FileState {
                durable: image.clone(),
                current: image,
                unsynced: Vec::new(),
            };
            recovered.insert(name.clone(), Arc::new(Mutex::new(state)));
        }
        SimFileSystem {
            shared: Arc::new(Shared {
                files: Mutex::new(recovered),
                crashed: AtomicBool::new(false),
                crash_countdown: AtomicU64::new(u64::MAX),
            }),
        }
    }

    /// Flips one byte of a file, durably (for corruption tests).
    pub fn corrupt(&self, name: &str, offset: usize) {
        let files = lock(&self.shared.files);
        if let Some(file) = files.get(name) {
            let mut file = lock(file);
            file.current[offset] ^= 0xff;
            file.durable[offset] ^= 0xff;
        }
    }
}

struct SimFile {
    fs: SimFileSystem,
    state: Arc<Mutex<FileState>>,
}

impl SegmentFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if self.fs.has_crashed() {
            return Err(crashed_error());
        }
        let state = lock(&self.state);
        let offset = offset as usize;
        if offset >= state.current.len() {
            return Ok(0);
        }
        let n = buf.len().min(state.current.len() - offset);
        buf[..n].copy_from_slice(&state.current[offset..offset + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.fs.operation()?;
        let mut state = lock(&self.state);
        let start = offset as usize;
        let end = start + buf.len();
        if state.current.len() < end {
            state.current.resize(end, 0);
        }
        state.current[start..end].copy_from_slice(buf);
        state.unsynced.push((offset, buf.len()));
        Ok(buf.len())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fs.operation()?;
        let mut state = lock(&self.state);
        state.durable = state.current.clone();
        state.unsynced.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.state).current.len() as u64)
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.fs.operation()?;
        let mut state = lock(&self.state);
        state.current.truncate(len as usize);
        state.durable = state.current.clone();
        state.unsynced.clear();
        Ok(())
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

impl FileSystem for SimFileSystem {
    fn create(&self, name: &str, bytes: u64) -> io::Result<Arc<dyn SegmentFile>> {
        self.operation()?;
        let mut files = lock(&self.shared.files);
        if files.contains_key(name) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let state = Arc::new(Mutex::new(FileState {
            durable: vec![0; bytes as usize],
            current: vec![0; bytes as usize],
            unsynced: Vec::new(),
        }));
        files.insert(name.to_string(), state.clone());
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            state,
        }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn SegmentFile>> {
        if self.has_crashed() {
            return Err(crashed_error());
        }
        let files = lock(&self.shared.files);
        let state = files.get(name).ok_or(io::ErrorKind::NotFound)?.clone();
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            state,
        }))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        if self.has_crashed() {
            return Err(crashed_error());
        }
        Ok(lock(&self.shared.files).keys().cloned().collect())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.operation()?;
        lock(&self.shared.files)
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.operation()?;
        let mut files = lock(&self.shared.files);
        let file = files.remove(from).ok_or(io::ErrorKind::NotFound)?;
        files.insert(to.to_string(), file);
        Ok(())
    }

    fn describe(&self, name: &str) -> String {
        format!("sim:{name}")
    }

    fn has_raw_fds(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_bytes_survive_and_unsynced_may_not() {
        let fs = SimFileSystem::new();
        let file = fs.create("a", 8192).unwrap();
        file.write_all_at(&[1u8; 4096], 0).unwrap();
        file.sync_data().unwrap();
        file.write_all_at(&[2u8; 4096], 4096).unwrap();
        fs.crash();
        assert!(
            file.write_at(&[3], 0).is_err(),
            "a crashed fs takes no writes"
        );
        let mut seen_lost = false;
        let mut seen_kept = false;
        for seed in 0..64 {
            let after = fs.recover(&mut SimRng::new(seed));
            let file = after.open("a").unwrap();
            let mut buf = vec![0u8; 8192];
            file.read_exact_at(&mut buf, 0).unwrap();
            assert!(buf[..4096].iter().all(|&b| b == 1), "synced data survives");
            seen_lost |= buf[4096] != 2;
            seen_kept |= buf[4096..].iter().all(|&b| b == 2);
        }
        assert!(
            seen_lost && seen_kept,
            "crashes both keep and lose unsynced writes"
        );
    }

    #[test]
    fn armed_crash_fires_at_the_counted_operation() {
        let fs = SimFileSystem::new();
        let file = fs.create("a", 0).unwrap();
        fs.crash_after(2);
        assert!(file.write_at(b"x", 0).is_ok());
        assert!(file.sync_data().is_err());
        assert!(fs.has_crashed());
    }
}

//! The file layer under the log: a directory of segment files.
//!
//! Everything the engine does to storage goes through [`FileSystem`] and
//! [`SegmentFile`], so the crash tests can run the same engine over
//! [`crate::sim::SimFileSystem`], which loses or tears unsynced bytes on a simulated
//! crash. The io_uring writer additionally needs a raw descriptor
//! ([`SegmentFile::raw_fd`]); files without one are written by the portable writer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One segment file. Writes are positional; `sync_data` makes them durable.
#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait SegmentFile: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes some prefix of `buf` at `offset`; may be short.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Cuts the file to `len` bytes and makes that durable.
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// The descriptor for io_uring, if this is a real file.
    fn raw_fd(&self) -> Option<RawFd>;

    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A directory of segment files.
pub trait FileSystem: Send + Sync {
    /// Creates `name` with `bytes` preallocated (reading as zeros), durably: the file's
    /// allocation and its directory entry are synced before this returns. The writer
    /// fills the segments it prepares ahead of time (`writer::prepare_segment`).
    fn create(&self, name: &str, bytes: u64) -> io::Result<Arc<dyn SegmentFile>>;
    /// Renames `from` to `to` durably (the directory is synced).
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn open(&self, name: &str) -> io::Result<Arc<dyn SegmentFile>>;
    /// Every file name in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Removes `name` durably (the directory is synced).
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Where the files live, for error messages.
    fn describe(&self, name: &str) -> String;
    /// Whether files have real descriptors (io_uring needs them).
    fn has_raw_fds(&self) -> bool;
}

/// Segment files in a real directory.
pub struct DiskFileSystem {
    dir: PathBuf,
}

impl DiskFileSystem {
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(DiskFileSystem {
            dir: dir.to_path_buf(),
        })
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

struct DiskFile(File);

impl SegmentFile for DiskFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)?;
        self.0.sync_all()
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

impl FileSystem for DiskFileSystem {
    fn create(&self, name: &str, bytes: u64) -> io::Result<Arc<dyn SegmentFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(name))?;
        let len = libc::off_t::try_from(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment size"))?;
        // SAFETY: fallocate on a descriptor we own, with in-range arguments.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            // Filesystems without fallocate (tmpfs on old kernels) still get the size.
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(err);
            }
            file.set_len(bytes)?;
        }
        file.sync_all()?;
        self.sync_dir()?;
        Ok(Arc::new(DiskFile(file)))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))?;
        self.sync_dir()
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn SegmentFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(name))?;
        Ok(Arc::new(DiskFile(file)))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(name))?;
        self.sync_dir()
    }

    fn describe(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn has_raw_fds(&self) -> bool {
        true
    }
}

//! rangekv's raft log engine: the raft log of every range on a store in one
//! append-only log, written by one writer thread that gathers every pending append
//! into one group: one write and one `fdatasync` for all of them.
//!
//! - [`format`]: segment and record layout (`len | crc32c | kind | payload`).
//! - [`file`]: the file layer ([`file::FileSystem`]) — real files or the crash
//!   simulator in [`sim`].
//! - `writer`: the group-commit loop, pipelined; io_uring (`uring`) links each group's
//!   write to its `fdatasync`; the portable writer uses `pwrite` + `fdatasync`.
//! - `index`: per range, where each entry lives, its hard state, and a cache.
//!
//! Boundary: knows raft-rs's `Entry`/`HardState` and files; knows nothing of RocksDB,
//! gRPC or tokio. Invariants: a completion reports success only after the group's
//! bytes are written **and** synced; groups complete strictly in submission order; a
//! failed write or sync stops the engine for good (it is never retried); replay checks
//! every checksum, truncates a torn tail of the last segment only, and refuses to open
//! on corruption anywhere else, naming the file and offset.

mod engine;
pub mod file;
pub mod format;
mod index;
pub mod sim;
mod uring;
mod writer;

pub use engine::{LogBatch, LogConfig, LogEngine, LogError, LogIo, LogStats, ReadError};

use std::sync::atomic::Ordering::Relaxed;

/// Arms failpoints, fault injection for tests run against a real process, from a
/// spec `name=value;…`. The log has one: `log::sync=N` lets N group syncs through,
/// then makes every later one report EIO (`log::sync=off` disarms it). A failpoint
/// with an unknown name or value is refused, so a typo cannot pass silently.
pub fn configure_failpoints(spec: &str) -> Result<(), String> {
    for item in spec.split(';').filter(|item| !item.trim().is_empty()) {
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| format!("failpoint {item:?} is not name=value"))?;
        match (name.trim(), value.trim()) {
            ("log::sync", "off") => writer::SYNCS_BEFORE_FAILURE.store(u64::MAX, Relaxed),
            ("log::sync", count) => {
                let count: u64 = count.parse().map_err(|_| {
                    format!("failpoint log::sync={count}: the value is a count of syncs or off")
                })?;
                writer::SYNCS_BEFORE_FAILURE.store(count.min(u64::MAX - 1), Relaxed);
            }
            (other, _) => return Err(format!("no failpoint {other:?} (there is log::sync)")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

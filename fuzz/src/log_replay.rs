//! Opening the raft log engine over segments it did not write: `LogEngine::open`
//! (replay, engine/log/src/engine.rs) over `rangekv_log::sim::SimFileSystem`. Opening
//! must return `Ok` or `Err`, never panic or hang; what an open engine reports must
//! read back without panicking; and a log that opened must take a write and open
//! again (a store that started once must be able to restart) — except at the end of
//! the segment numbers: every open starts a new segment, so a log whose newest
//! segment is `SEQUENCE_MAX` opens once and then refuses, by design (2^62 restarts
//! away from any real log; `regressions/log_replay/crash-734c…` is that input).
//!
//! Input: one flags byte, then the segment files separated by [`SEPARATOR`] (at most
//! [`SEGMENTS_MAX`]); the i-th is named for sequence `base + i`.
//! - bit 0: recompute every record's crc32c (see `log_record::fix_record_checksums`);
//! - bit 1: rewrite each segment's header to be valid for its sequence;
//! - bit 2: the 8 bytes after the flags are `base` (little-endian), else `base` is 1.

use std::sync::Arc;

use raft::eraftpb::Entry;
use rangekv_log::file::FileSystem;
use rangekv_log::sim::SimFileSystem;
use rangekv_log::{LogBatch, LogConfig, LogEngine, LogError, LogIo};
use rangekv_types::RangeId;

use crate::log_record::{fix_record_checksums, fix_segment_header};

pub const FIX_CHECKSUMS: u8 = 1;
pub const FIX_HEADERS: u8 = 2;
pub const BASE_SEQUENCE: u8 = 4;
pub const SEPARATOR: &[u8] = b"NSEG";
pub const SEGMENTS_MAX: usize = 8;
/// Entries read back per range, at most.
const READ_MAX: u64 = 64;

/// The engine's segment file name (engine.rs `segment_name`).
pub fn segment_name(sequence: u64) -> String {
    format!("{sequence:016x}.rlog")
}

pub fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 * 1024,
        group_bytes_max: 16 * 1024,
        io: LogIo::Sync,
        ..LogConfig::default()
    }
}

/// Splits an input into (base sequence, segments), applying the fix-ups its flags ask for.
pub fn segments(data: &[u8]) -> Option<(u64, Vec<Vec<u8>>)> {
    let (&flags, mut rest) = data.split_first()?;
    let mut base = 1;
    if flags & BASE_SEQUENCE != 0 {
        let (raw, after) = rest.split_first_chunk::<8>()?;
        base = u64::from_le_bytes(*raw);
        rest = after;
    }
    let mut segments = Vec::new();
    while segments.len() < SEGMENTS_MAX {
        let end = find(rest, SEPARATOR).unwrap_or(rest.len());
        segments.push(rest[..end].to_vec());
        if end == rest.len() {
            break;
        }
        rest = &rest[end + SEPARATOR.len()..];
    }
    for (i, segment) in segments.iter_mut().enumerate() {
        if flags & FIX_HEADERS != 0 {
            fix_segment_header(segment, base.wrapping_add(i as u64));
        }
        if flags & FIX_CHECKSUMS != 0 {
            let signature =
                rangekv_log::format::decode_segment_header(segment).map_or(0, |h| h.signature());
            let start = rangekv_log::format::SEGMENT_HEADER_BYTES as usize;
            fix_record_checksums(segment, start, signature);
        }
    }
    Some((base, segments))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn run(data: &[u8]) {
    let Some((base, segments)) = segments(data) else {
        return;
    };
    let fs = SimFileSystem::new();
    for (i, bytes) in segments.iter().enumerate() {
        let file = fs
            .create(&segment_name(base.wrapping_add(i as u64)), 0)
            .expect("sim create");
        file.write_all_at(bytes, 0).expect("sim write");
        file.sync_data().expect("sim sync");
    }
    let Ok(engine) = LogEngine::open(Arc::new(fs.clone()), config()) else {
        return;
    };
    let ranges = engine.ranges();
    for &range in &ranges {
        read_back(&engine, range);
    }
    // The opened log takes a write and opens again.
    if let Some(&range) = ranges.first() {
        let next = engine.last_index(range) + 1;
        let mut batch = LogBatch::new();
        batch.append(
            range,
            vec![Entry {
                index: next,
                term: engine.term(range, next - 1).unwrap_or(0).max(1),
                data: b"after replay".to_vec().into(),
                ..Default::default()
            }],
        );
        match engine.write_sync(batch) {
            Ok(()) | Err(LogError::Invalid { .. }) => {}
            Err(error) => panic!("write after a successful open failed: {error}"),
        }
    }
    drop(engine);
    let newest = fs
        .list()
        .unwrap_or_default()
        .iter()
        .filter_map(|name| name.strip_suffix(".rlog"))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .max();
    let engine = match LogEngine::open(Arc::new(fs), config()) {
        Ok(engine) => engine,
        Err(LogError::Corrupt { .. })
            if newest.is_some_and(|n| n > rangekv_log::format::SEQUENCE_MAX) =>
        {
            return;
        }
        Err(error) => panic!("a log that opened once does not open again: {error}"),
    };
    for range in engine.ranges() {
        read_back(&engine, range);
    }
}

/// Reads what the engine says `range` holds; errors are fine (an entry of an unknown
/// type is refused on read), panics are not.
fn read_back(engine: &LogEngine, range: RangeId) {
    let first = engine.first_index(range);
    let last = engine.last_index(range);
    assert!(last + 1 >= first, "{range}: log spans {first}..={last}");
    let _ = engine.hard_state(range);
    let _ = engine.term(range, first - 1);
    if last < first {
        return;
    }
    let _ = engine.term(range, last);
    let high = (last + 1).min(first + READ_MAX);
    if let Ok(entries) = engine.entries(range, first, high, None) {
        for (i, entry) in entries.iter().enumerate() {
            assert_eq!(entry.index, first + i as u64, "{range}: entries in order");
        }
    }
    let _ = engine.entries(range, last, last + 1, Some(0));
}

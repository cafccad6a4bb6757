//! The raft log's on-disk decoders (engine/log/src/format.rs), called directly:
//! `decode_segment_header`, `parse_record` (record framing and every payload kind:
//! entries, hard state, compaction point, range removal) and `decode_entry`, the
//! decode of an entry read back from a segment.
//!
//! Input: one flags byte, then the bytes of a segment.
//! - bit 0: recompute each record's crc32c before parsing (see
//!   [`fix_record_checksums`]), so mutations reach the payload decoders instead of
//!   dying at the checksum;
//! - bit 1: start parsing at offset 0 instead of after the segment header;
//! - bit 2: parse with a small `record_bytes_max` (4 KiB) instead of none.
//!
//! Beyond "no panic", every record parsed must re-encode to exactly its bytes, and
//! every entry it locates must lie inside the segment and match its checksum.

use rangekv_log::format::{self, Parsed, Record, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};

pub const FIX_CHECKSUMS: u8 = 1;
pub const FROM_ZERO: u8 = 2;
pub const SMALL_RECORDS: u8 = 4;

pub fn run(data: &[u8]) {
    let Some((&flags, segment)) = data.split_first() else {
        return;
    };
    let mut segment = segment.to_vec();

    let header = format::decode_segment_header(&segment);
    if let Ok(header) = header {
        assert_eq!(
            format::encode_segment_header_version(header.sequence, header.version)[..],
            segment[..SEGMENT_HEADER_BYTES as usize],
            "a valid segment header re-encodes to its bytes"
        );
    }
    // Records are signed for the segment their header names (unsigned without one).
    let signature = header.map_or(0, |h| h.signature());
    // The whole input as one entry, as `read_entry` decodes it once its crc matched.
    if let Ok(entry) = format::decode_entry(&segment, 7) {
        let mut out = Vec::new();
        let placed = format::encode_entries(&mut out, rangekv_types::RangeId(1), &[entry]);
        let at = placed[0];
        assert_eq!(&out[at.offset..at.offset + at.len as usize], &segment[..]);
    }

    let start = if flags & FROM_ZERO != 0 {
        0
    } else {
        SEGMENT_HEADER_BYTES as usize
    };
    if flags & FIX_CHECKSUMS != 0 {
        fix_record_checksums(&mut segment, start, signature);
    }
    let record_bytes_max = if flags & SMALL_RECORDS != 0 {
        4096
    } else {
        usize::MAX
    };
    let mut at = start;
    // Until `End`, `Invalid` or `Malformed`: each just ends the walk here.
    while let Parsed::Record(record, next) =
        format::parse_record(&segment, at, record_bytes_max, signature)
    {
        assert!(next > at && next <= segment.len(), "parse makes progress");
        check_record(&segment, &segment[at..next], &record, signature);
        at = next;
    }
}

/// Re-encodes `record` and compares it with `raw`, the bytes it was parsed from.
fn check_record(segment: &[u8], raw: &[u8], record: &Record, signature: u32) {
    let mut out = Vec::new();
    match record {
        Record::Entries {
            range,
            first_index,
            entries,
        } => {
            let mut decoded = Vec::with_capacity(entries.len());
            for (position, (term, at)) in entries.iter().enumerate() {
                let bytes = segment
                    .get(at.offset..at.offset + at.len as usize)
                    .expect("an entry's location lies inside its segment");
                assert_eq!(crc32c::crc32c(bytes), at.crc, "entry checksum");
                // Replay accepts what a read then refuses (an unknown entry type):
                // that read fails with `LogError::Corrupt`, which is fine here.
                if let Ok(entry) = format::decode_entry(bytes, first_index + position as u64) {
                    assert_eq!(entry.term, *term);
                    decoded.push(entry);
                }
            }
            if decoded.len() == entries.len() && !decoded.is_empty() {
                format::encode_entries(&mut out, *range, &decoded);
            } else {
                return;
            }
        }
        Record::HardState { range, hard_state } => {
            format::encode_hard_state(&mut out, *range, hard_state);
        }
        Record::CompactionPoint {
            range,
            truncated_index,
            truncated_term,
        } => {
            format::encode_compaction_point(&mut out, *range, *truncated_index, *truncated_term);
        }
        Record::RangeRemoval { range } => format::encode_range_removal(&mut out, *range),
        Record::Reset {
            range,
            index,
            term,
            hard_state,
        } => format::encode_reset(&mut out, *range, *index, *term, hard_state),
    }
    format::sign_records(&mut out, signature);
    assert_eq!(out, raw, "record re-encodes to its bytes: {record:?}");
}

/// Rewrites the checksum of every record from `start` on (signed with `signature`),
/// following the length fields, until the records end (a zero header) or run past the
/// buffer. Lets a fuzzer's mutation of a payload reach the payload decoders.
pub fn fix_record_checksums(segment: &mut [u8], start: usize, signature: u32) {
    let mut at = start;
    while segment.len().saturating_sub(at) >= RECORD_HEADER_BYTES {
        let len = u32::from_le_bytes([
            segment[at],
            segment[at + 1],
            segment[at + 2],
            segment[at + 3],
        ]) as usize;
        if segment[at..at + RECORD_HEADER_BYTES]
            .iter()
            .all(|&b| b == 0)
        {
            return;
        }
        let end = at + RECORD_HEADER_BYTES + len;
        if end > segment.len() {
            return;
        }
        let crc = crc32c::crc32c(&segment[at + 8..end]) ^ signature;
        segment[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// Rewrites a segment's header (if the segment is long enough to hold one) so it is
/// valid for `sequence`.
pub fn fix_segment_header(segment: &mut [u8], sequence: u64) {
    if let Some(header) = segment.get_mut(..SEGMENT_HEADER_BYTES as usize) {
        header.copy_from_slice(&format::encode_segment_header(sequence));
    }
}

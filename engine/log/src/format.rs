//! On-disk format of the log.
//!
//! A segment file starts with a [`SegmentHeader`] and holds records back to back:
//!
//! ```text
//! record  = len: u32 LE | crc32c: u32 LE | kind: u8 | payload (len bytes)
//! crc32c  covers kind and payload
//! ```
//!
//! Segments are preallocated, so unwritten space reads as zeros: an all-zero record
//! header marks the end of a segment's records.
//!
//! Payloads (all integers little-endian):
//!
//! ```text
//! Entries         range u64 | first_index u64 | count u32 | count × entry
//!   entry         term u64 | entry_type u8 | data_len u32 | context_len u32 | data | context
//! HardState       range u64 | term u64 | vote u64 | commit u64
//! CompactionPoint range u64 | truncated_index u64 | truncated_term u64
//! RangeRemoval    range u64
//! ```
//!
//! An entry's index is implicit (`first_index` + position), which also makes every
//! record's entries contiguous.

use raft::eraftpb::{Entry, EntryType, HardState};
use rangekv_types::RangeId;

pub const SEGMENT_MAGIC: [u8; 8] = *b"RKVRLOG\0";
pub const FORMAT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_BYTES: u64 = 24;
pub const RECORD_HEADER_BYTES: usize = 9;
pub const ENTRY_HEADER_BYTES: usize = 17;
/// The largest raft index the log accepts: far beyond any real log, and it keeps
/// index arithmetic (`index + 1`, `first + count`) from overflowing.
pub const INDEX_MAX: u64 = u64::MAX / 4;
/// The largest segment sequence number the log opens: far beyond any real log, and it
/// keeps the next segments' numbers (`sequence + 1`, ...) from overflowing.
pub const SEQUENCE_MAX: u64 = u64::MAX / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Entries = 1,
    HardState = 2,
    CompactionPoint = 3,
    RangeRemoval = 4,
}

impl RecordKind {
    fn from_u8(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(RecordKind::Entries),
            2 => Some(RecordKind::HardState),
            3 => Some(RecordKind::CompactionPoint),
            4 => Some(RecordKind::RangeRemoval),
            _ => None,
        }
    }
}

/// `magic | version u32 | sequence u64 | crc32c u32` over the first 20 bytes.
pub fn encode_segment_header(sequence: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut out = [0u8; SEGMENT_HEADER_BYTES as usize];
    out[..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&sequence.to_le_bytes());
    let crc = crc32c::crc32c(&out[..20]);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a segment header; returns its sequence number or why it is not valid.
pub fn decode_segment_header(raw: &[u8]) -> Result<u64, &'static str> {
    if raw.len() < SEGMENT_HEADER_BYTES as usize {
        return Err("segment shorter than its header");
    }
    if raw[..8] != SEGMENT_MAGIC {
        return Err("bad segment magic");
    }
    if crc32c::crc32c(&raw[..20]) != read_u32(raw, 20) {
        return Err("segment header checksum mismatch");
    }
    let version = read_u32(raw, 8);
    if version != FORMAT_VERSION {
        return Err("unsupported log format version");
    }
    Ok(read_u64(raw, 12))
}

fn read_u32(raw: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&raw[at..at + 4]);
    u32::from_le_bytes(bytes)
}

fn read_u64(raw: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&raw[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Appends one record to `out`, returning the offset of its payload within `out`.
fn begin_record(out: &mut Vec<u8>, kind: RecordKind) -> usize {
    out.extend_from_slice(&[0u8; 8]);
    out.push(kind as u8);
    out.len()
}

fn finish_record(out: &mut [u8], payload_at: usize) {
    let header_at = payload_at - RECORD_HEADER_BYTES;
    let len = (out.len() - payload_at) as u32;
    let crc = crc32c::crc32c(&out[header_at + 8..]);
    out[header_at..header_at + 4].copy_from_slice(&len.to_le_bytes());
    out[header_at + 4..header_at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Where one entry's bytes sit within an encoded buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodedEntry {
    pub offset: usize,
    pub len: u32,
    pub crc: u32,
}

pub fn encoded_entry_bytes(entry: &Entry) -> usize {
    ENTRY_HEADER_BYTES + entry.data.len() + entry.context.len()
}

/// Encodes an Entries record for `entries` (contiguous, starting at `entries[0].index`).
/// Returns where each entry's bytes sit in `out`.
pub fn encode_entries(out: &mut Vec<u8>, range: RangeId, entries: &[Entry]) -> Vec<EncodedEntry> {
    let payload_at = begin_record(out, RecordKind::Entries);
    let first_index = entries.first().map_or(0, |e| e.index);
    out.extend_from_slice(&range.get().to_le_bytes());
    out.extend_from_slice(&first_index.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    let mut placed = Vec::with_capacity(entries.len());
    for (position, entry) in entries.iter().enumerate() {
        assert_eq!(
            entry.index,
            first_index + position as u64,
            "entries of one append are contiguous"
        );
        let offset = out.len();
        out.extend_from_slice(&entry.term.to_le_bytes());
        out.push(entry.get_entry_type() as u8);
        out.extend_from_slice(&(entry.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(entry.context.len() as u32).to_le_bytes());
        out.extend_from_slice(&entry.data);
        out.extend_from_slice(&entry.context);
        let len = (out.len() - offset) as u32;
        placed.push(EncodedEntry {
            offset,
            len,
            crc: crc32c::crc32c(&out[offset..]),
        });
    }
    finish_record(out, payload_at);
    placed
}

pub fn encode_hard_state(out: &mut Vec<u8>, range: RangeId, hard_state: &HardState) {
    let payload_at = begin_record(out, RecordKind::HardState);
    out.extend_from_slice(&range.get().to_le_bytes());
    out.extend_from_slice(&hard_state.term.to_le_bytes());
    out.extend_from_slice(&hard_state.vote.to_le_bytes());
    out.extend_from_slice(&hard_state.commit.to_le_bytes());
    finish_record(out, payload_at);
}

pub fn encode_compaction_point(
    out: &mut Vec<u8>,
    range: RangeId,
    truncated_index: u64,
    truncated_term: u64,
) {
    let payload_at = begin_record(out, RecordKind::CompactionPoint);
    out.extend_from_slice(&range.get().to_le_bytes());
    out.extend_from_slice(&truncated_index.to_le_bytes());
    out.extend_from_slice(&truncated_term.to_le_bytes());
    finish_record(out, payload_at);
}

pub fn encode_range_removal(out: &mut Vec<u8>, range: RangeId) {
    let payload_at = begin_record(out, RecordKind::RangeRemoval);
    out.extend_from_slice(&range.get().to_le_bytes());
    finish_record(out, payload_at);
}

/// Decodes one entry's bytes (as located by an [`EncodedEntry`]) into an `Entry`.
pub fn decode_entry(raw: &[u8], index: u64) -> Result<Entry, &'static str> {
    if raw.len() < ENTRY_HEADER_BYTES {
        return Err("entry shorter than its header");
    }
    let term = read_u64(raw, 0);
    let entry_type = match raw[8] {
        0 => EntryType::EntryNormal,
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => return Err("unknown entry type"),
    };
    let data_len = read_u32(raw, 9) as usize;
    let context_len = read_u32(raw, 13) as usize;
    if raw.len() != ENTRY_HEADER_BYTES + data_len + context_len {
        return Err("entry length does not match its header");
    }
    let data_end = ENTRY_HEADER_BYTES + data_len;
    let mut entry = Entry {
        index,
        term,
        data: raw[ENTRY_HEADER_BYTES..data_end].to_vec().into(),
        context: raw[data_end..].to_vec().into(),
        ..Default::default()
    };
    entry.set_entry_type(entry_type);
    Ok(entry)
}

/// One record decoded during replay.
#[derive(Debug, PartialEq)]
pub enum Record {
    /// Entries of a range: for each, its term and where its bytes are in the segment.
    Entries {
        range: RangeId,
        first_index: u64,
        entries: Vec<(u64, EncodedEntry)>,
    },
    HardState {
        range: RangeId,
        hard_state: HardState,
    },
    CompactionPoint {
        range: RangeId,
        truncated_index: u64,
        truncated_term: u64,
    },
    RangeRemoval {
        range: RangeId,
    },
}

/// What the parser found at an offset.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// A valid record and the offset just past it.
    Record(Record, usize),
    /// Zeros: the end of the segment's records.
    End,
    /// Not a valid record: a torn write at the tail, or corruption elsewhere.
    Invalid(&'static str),
    /// The checksum matches but the content makes no sense: never a torn write.
    Malformed(&'static str),
}

/// Parses the record at `at` in `segment` (a whole segment's bytes).
pub fn parse_record(segment: &[u8], at: usize, record_bytes_max: usize) -> Parsed {
    let rest = &segment[at.min(segment.len())..];
    if rest.len() < RECORD_HEADER_BYTES {
        return if rest.iter().all(|&b| b == 0) {
            Parsed::End
        } else {
            Parsed::Invalid("record header cut short")
        };
    }
    let len = read_u32(rest, 0) as usize;
    let crc = read_u32(rest, 4);
    if len == 0 && crc == 0 && rest[8] == 0 {
        return Parsed::End;
    }
    if len > record_bytes_max || RECORD_HEADER_BYTES + len > rest.len() {
        return Parsed::Invalid("record length out of bounds");
    }
    let body = &rest[8..RECORD_HEADER_BYTES + len];
    if crc32c::crc32c(body) != crc {
        return Parsed::Invalid("record checksum mismatch");
    }
    let payload = &body[1..];
    let payload_at = at + RECORD_HEADER_BYTES;
    let record = match RecordKind::from_u8(body[0]) {
        Some(kind) => decode_payload(kind, payload, payload_at),
        None => Err("unknown record kind"),
    };
    match record {
        Ok(record) => Parsed::Record(record, at + RECORD_HEADER_BYTES + len),
        Err(why) => Parsed::Malformed(why),
    }
}

fn decode_payload(
    kind: RecordKind,
    payload: &[u8],
    payload_at: usize,
) -> Result<Record, &'static str> {
    let need = |bytes: usize| {
        if payload.len() < bytes {
            Err("record payload cut short")
        } else {
            Ok(())
        }
    };
    need(8)?;
    let range = RangeId(read_u64(payload, 0));
    match kind {
        RecordKind::Entries => {
            need(20)?;
            let first_index = read_u64(payload, 8);
            let count = read_u32(payload, 16) as usize;
            if first_index == 0 || first_index.saturating_add(count as u64) > INDEX_MAX {
                return Err("entry index out of bounds");
            }
            let mut entries = Vec::with_capacity(count.min(payload.len() / ENTRY_HEADER_BYTES));
            let mut at = 20;
            for _ in 0..count {
                if payload.len() < at + ENTRY_HEADER_BYTES {
                    return Err("entry header cut short");
                }
                let data_len = read_u32(payload, at + 9) as usize;
                let context_len = read_u32(payload, at + 13) as usize;
                let len = ENTRY_HEADER_BYTES
                    .checked_add(data_len)
                    .and_then(|l| l.checked_add(context_len))
                    .ok_or("entry length overflows")?;
                if payload.len() < at + len {
                    return Err("entry body cut short");
                }
                entries.push((
                    read_u64(payload, at),
                    EncodedEntry {
                        offset: payload_at + at,
                        len: len as u32,
                        crc: crc32c::crc32c(&payload[at..at + len]),
                    },
                ));
                at += len;
            }
            if at != payload.len() {
                return Err("entries record has trailing bytes");
            }
            Ok(Record::Entries {
                range,
                first_index,
                entries,
            })
        }
        RecordKind::HardState => {
            if payload.len() != 32 {
                return Err("hard state record has the wrong length");
            }
            let hard_state = HardState {
                term: read_u64(payload, 8),
                vote: read_u64(payload, 16),
                commit: read_u64(payload, 24),
                ..Default::default()
            };
            Ok(Record::HardState { range, hard_state })
        }
        RecordKind::CompactionPoint => {
            if payload.len() != 24 {
                return Err("compaction record has the wrong length");
            }
            let truncated_index = read_u64(payload, 8);
            if truncated_index > INDEX_MAX {
                return Err("compaction point out of bounds");
            }
            Ok(Record::CompactionPoint {
                range,
                truncated_index,
                truncated_term: read_u64(payload, 16),
            })
        }
        RecordKind::RangeRemoval => {
            if payload.len() != 8 {
                return Err("removal record has the wrong length");
            }
            Ok(Record::RangeRemoval { range })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn records_round_trip() {
        let mut out = vec![0u8; 5];
        let entries = vec![entry(7, 2, b"hello"), entry(8, 3, b"")];
        let placed = encode_entries(&mut out, RangeId(9), &entries);
        let hs = HardState {
            term: 3,
            vote: 1,
            commit: 8,
            ..Default::default()
        };
        encode_hard_state(&mut out, RangeId(9), &hs);
        encode_compaction_point(&mut out, RangeId(9), 6, 2);
        encode_range_removal(&mut out, RangeId(4));
        out.extend_from_slice(&[0u8; 32]);

        let Parsed::Record(
            Record::Entries {
                range,
                first_index,
                entries: found,
            },
            next,
        ) = parse_record(&out, 5, 1 << 20)
        else {
            panic!("entries record expected");
        };
        assert_eq!((range, first_index), (RangeId(9), 7));
        assert_eq!(found.len(), 2);
        for ((term, at), (original, placed)) in found.iter().zip(entries.iter().zip(&placed)) {
            assert_eq!(at, placed);
            assert_eq!(*term, original.term);
            let raw = &out[at.offset..at.offset + at.len as usize];
            assert_eq!(&decode_entry(raw, original.index).unwrap(), original);
        }
        let Parsed::Record(Record::HardState { hard_state, .. }, next) =
            parse_record(&out, next, 1 << 20)
        else {
            panic!("hard state expected");
        };
        assert_eq!(hard_state, hs);
        let Parsed::Record(
            Record::CompactionPoint {
                truncated_index: 6,
                truncated_term: 2,
                ..
            },
            next,
        ) = parse_record(&out, next, 1 << 20)
        else {
            panic!("compaction point expected");
        };
        let Parsed::Record(Record::RangeRemoval { range: RangeId(4) }, next) =
            parse_record(&out, next, 1 << 20)
        else {
            panic!("removal expected");
        };
        assert_eq!(parse_record(&out, next, 1 << 20), Parsed::End);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let mut clean = Vec::new();
        encode_entries(&mut clean, RangeId(1), &[entry(1, 1, b"payload bytes")]);
        for at in 0..clean.len() {
            let mut dirty = clean.clone();
            dirty[at] ^= 0x40;
            dirty.extend_from_slice(&[0u8; 16]);
            match parse_record(&dirty, 0, 1 << 20) {
                Parsed::Invalid(_) | Parsed::Malformed(_) => {}
                other => panic!("flip at {at} went unnoticed: {other:?}"),
            }
        }
    }

    #[test]
    fn segment_header_checks_magic_version_and_crc() {
        let header = encode_segment_header(42);
        assert_eq!(decode_segment_header(&header), Ok(42));
        let mut bad = header;
        bad[13] ^= 1;
        assert!(decode_segment_header(&bad).is_err());
        assert!(decode_segment_header(&[0u8; 24]).is_err());
        assert!(decode_segment_header(&header[..10]).is_err());
    }
}

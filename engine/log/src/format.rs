//! On-disk format of the log.
//!
//! A segment file starts with a [`SegmentHeader`] and holds records back to back:
//!
//! ```text
//! record  = len: u32 LE | crc: u32 LE | kind: u8 | payload (len bytes)
//! crc     = crc32c(kind | payload) XOR the segment's signature
//! ```
//!
//! A fresh segment is preallocated, so unwritten space reads as zeros, and an all-zero
//! record header marks the end of a segment's records. A recycled segment (a deleted
//! one reused under a new sequence number, see writer.rs) still holds the records of
//! its earlier life past what has been written since; the signature, derived from the
//! sequence number in the header ([`record_signature`]), makes every one of them fail
//! its checksum, so they read as the end of the log (the newest segment) and are never
//! taken for records of this one. The writer ends every other segment with a zero
//! record header when it moves on. Format version 1 had no signature (0); it is still
//! read, never recycled.
//!
//! Payloads (all integers little-endian):
//!
//! ```text
//! Entries         range u64 | first_index u64 | count u32 | count × entry
//!   entry         term u64 | entry_type u8 | data_len u32 | context_len u32 | data | context
//! HardState       range u64 | term u64 | vote u64 | commit u64
//! CompactionPoint range u64 | truncated_index u64 | truncated_term u64
//! RangeRemoval    range u64
//! Reset           range u64 | index u64 | term u64 | hs_term u64 | hs_vote u64 | hs_commit u64
//! ```
//!
//! A reset (a snapshot was installed) drops every entry of the range, restarts its log
//! after (index, term) and sets its hard state, in one record: a torn write keeps all
//! of it or none (a removal and a hard state in two records could lose the vote).
//!
//! An entry's index is implicit (`first_index` + position), which also makes every
//! record's entries contiguous.

use raft::eraftpb::{Entry, EntryType, HardState};
use rangekv_types::RangeId;

pub const SEGMENT_MAGIC: [u8; 8] = *b"RKVRLOG\0";
/// The version written: records signed with their segment's sequence.
pub const FORMAT_VERSION: u32 = 2;
/// The first version, read but never recycled: records are not signed.
pub const FORMAT_VERSION_UNSIGNED: u32 = 1;
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
    Reset = 5,
}

impl RecordKind {
    fn from_u8(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(RecordKind::Entries),
            2 => Some(RecordKind::HardState),
            3 => Some(RecordKind::CompactionPoint),
            4 => Some(RecordKind::RangeRemoval),
            5 => Some(RecordKind::Reset),
            _ => None,
        }
    }
}

/// What a segment's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub sequence: u64,
    pub version: u32,
}

impl SegmentHeader {
    /// XORed into the checksum of every record of this segment.
    pub fn signature(&self) -> u32 {
        if self.version == FORMAT_VERSION_UNSIGNED {
            0
        } else {
            record_signature(self.sequence)
        }
    }
}

/// The signature of the records of segment `sequence`: different for any two
/// sequence numbers below 2^32 (a log starts at 1 and takes one per 128 MiB written or
/// per restart), and 0, like the unsigned format's, only for sequence 0x5253_4947.
pub fn record_signature(sequence: u64) -> u32 {
    (sequence as u32) ^ ((sequence >> 32) as u32) ^ 0x5253_4947
}

/// Signs the records of `records` (whole records, back to back, as a `LogBatch`
/// encodes them) for a segment with `signature`.
pub fn sign_records(records: &mut [u8], signature: u32) {
    let mut at = 0;
    while at + RECORD_HEADER_BYTES <= records.len() {
        let len = read_u32(records, at) as usize;
        let crc = read_u32(records, at + 4) ^ signature;
        records[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at += RECORD_HEADER_BYTES + len;
    }
}

/// `magic | version u32 | sequence u64 | crc32c u32` over the first 20 bytes.
pub fn encode_segment_header(sequence: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    encode_segment_header_version(sequence, FORMAT_VERSION)
}

/// A header of an older format version, for tests and fuzz seeds of the upgrade path.
pub fn encode_segment_header_version(
    sequence: u64,
    version: u32,
) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut out = [0u8; SEGMENT_HEADER_BYTES as usize];
    out[..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..12].copy_from_slice(&version.to_le_bytes());
    out[12..20].copy_from_slice(&sequence.to_le_bytes());
    let crc = crc32c::crc32c(&out[..20]);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a segment header; returns what it says or why it is not valid.
pub fn decode_segment_header(raw: &[u8]) -> Result<SegmentHeader, &'static str> {
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
    if version != FORMAT_VERSION && version != FORMAT_VERSION_UNSIGNED {
        return Err("unsupported log format version");
    }
    Ok(SegmentHeader {
        sequence: read_u64(raw, 12),
        version,
    })
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
    // One allocation for the record, not a doubling per few entries (each one a copy
    // of everything encoded so far).
    out.reserve(RECORD_HEADER_BYTES + 20 + entries.iter().map(encoded_entry_bytes).sum::<usize>());
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

pub fn encode_reset(
    out: &mut Vec<u8>,
    range: RangeId,
    index: u64,
    term: u64,
    hard_state: &HardState,
) {
    let payload_at = begin_record(out, RecordKind::Reset);
    out.extend_from_slice(&range.get().to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
    out.extend_from_slice(&hard_state.term.to_le_bytes());
    out.extend_from_slice(&hard_state.vote.to_le_bytes());
    out.extend_from_slice(&hard_state.commit.to_le_bytes());
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
    Reset {
        range: RangeId,
        index: u64,
        term: u64,
        hard_state: HardState,
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

/// Parses the record at `at` in `segment` (a whole segment's bytes), whose records
/// are signed with `signature` ([`SegmentHeader::signature`]).
pub fn parse_record(segment: &[u8], at: usize, record_bytes_max: usize, signature: u32) -> Parsed {
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
    if crc32c::crc32c(body) ^ signature != crc {
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
        RecordKind::Reset => {
            if payload.len() != 48 {
                return Err("reset record has the wrong length");
            }
            let index = read_u64(payload, 8);
            if index > INDEX_MAX {
                return Err("reset point out of bounds");
            }
            let hard_state = HardState {
                term: read_u64(payload, 24),
                vote: read_u64(payload, 32),
                commit: read_u64(payload, 40),
                ..Default::default()
            };
            Ok(Record::Reset {
                range,
                index,
                term: read_u64(payload, 16),
                hard_state,
            })
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
        let signature = record_signature(3);
        sign_records(&mut out[5..], signature);
        out.extend_from_slice(&[0u8; 32]);

        let Parsed::Record(
            Record::Entries {
                range,
                first_index,
                entries: found,
            },
            next,
        ) = parse_record(&out, 5, 1 << 20, signature)
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
            parse_record(&out, next, 1 << 20, signature)
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
        ) = parse_record(&out, next, 1 << 20, signature)
        else {
            panic!("compaction point expected");
        };
        let Parsed::Record(Record::RangeRemoval { range: RangeId(4) }, next) =
            parse_record(&out, next, 1 << 20, signature)
        else {
            panic!("removal expected");
        };
        assert_eq!(parse_record(&out, next, 1 << 20, signature), Parsed::End);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let mut clean = Vec::new();
        encode_entries(&mut clean, RangeId(1), &[entry(1, 1, b"payload bytes")]);
        for at in 0..clean.len() {
            let mut dirty = clean.clone();
            dirty[at] ^= 0x40;
            dirty.extend_from_slice(&[0u8; 16]);
            match parse_record(&dirty, 0, 1 << 20, 0) {
                Parsed::Invalid(_) | Parsed::Malformed(_) => {}
                other => panic!("flip at {at} went unnoticed: {other:?}"),
            }
        }
    }

    #[test]
    fn segment_header_checks_magic_version_and_crc() {
        let header = encode_segment_header(42);
        assert_eq!(
            decode_segment_header(&header),
            Ok(SegmentHeader {
                sequence: 42,
                version: FORMAT_VERSION
            })
        );
        let old = decode_segment_header(&encode_segment_header_version(42, 1));
        assert_eq!(old.map(|h| h.signature()), Ok(0), "version 1 is unsigned");
        assert!(decode_segment_header(&encode_segment_header_version(42, 3)).is_err());
        let mut bad = header;
        bad[13] ^= 1;
        assert!(decode_segment_header(&bad).is_err());
        assert!(decode_segment_header(&[0u8; 24]).is_err());
        assert!(decode_segment_header(&header[..10]).is_err());
    }

    /// A recycled segment still holds the records of its earlier lives: signed for
    /// another sequence number (or unsigned, version 1), none may parse in this one.
    #[test]
    fn records_of_another_segment_fail_their_checksum() {
        let mut records = Vec::new();
        encode_entries(&mut records, RangeId(1), &[entry(1, 1, b"payload bytes")]);
        encode_hard_state(&mut records, RangeId(1), &HardState::default());
        let unsigned = records.clone();
        for written in [1u64, 2, 7, 1 << 20, (1 << 32) - 1, 1 << 32, (1 << 32) + 1] {
            let mut signed = unsigned.clone();
            sign_records(&mut signed, record_signature(written));
            assert!(matches!(
                parse_record(&signed, 0, 1 << 20, record_signature(written)),
                Parsed::Record(..)
            ));
            for reader in [
                written + 1,
                written + 2,
                written + 1000,
                written.saturating_sub(1),
            ] {
                if reader == written {
                    continue;
                }
                assert_eq!(
                    parse_record(&signed, 0, 1 << 20, record_signature(reader)),
                    Parsed::Invalid("record checksum mismatch"),
                    "a record of segment {written} read in segment {reader}"
                );
            }
            assert_ne!(record_signature(written), 0, "signed differs from unsigned");
        }
        assert_eq!(
            parse_record(&unsigned, 0, 1 << 20, record_signature(5)),
            Parsed::Invalid("record checksum mismatch")
        );
    }
}

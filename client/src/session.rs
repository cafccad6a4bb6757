//! The client's session: a random 128-bit id, the sequence numbers of its writes,
//! which of them still await their answer, per range they were sent to (the lowest
//! at a range is what a write tells that range it may forget below), and the ranges
//! the session is open at.
//!
//! Why per range: with one low-water mark for the whole client, each range would keep
//! the answers of every write issued while the client's oldest write anywhere is in
//! flight (hundreds, with many callers), and rewrite them with each entry. Per range,
//! it keeps about the writes in flight to it. A write counts at every range it was
//! sent to until it is answered or given up; a write sent to a range whose mark
//! passed it (its route changed) is refused there, never applied twice.
//!
//! Why a random id rather than one from PD's id allocator: opening a session then
//! costs no round trip to PD and works while PD is unreachable (writes do not need
//! PD once routes are cached), and 128 random bits make a collision between two
//! clients negligible (~2^-64 for 2^32 sessions alive at once, by the birthday bound).

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use rangekv_rpc::proto;
use rustc_hash::FxHashMap;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Sequences {
    next: u64,
    /// Per range, numbered writes sent there whose answer has not been received and
    /// that may still be sent.
    in_flight: FxHashMap<u64, BTreeSet<u64>>,
}

struct Shared {
    id: u128,
    sequences: Mutex<Sequences>,
}

impl Shared {
    fn release(&self, sequence: u64, ranges: &[u64]) {
        let mut sequences = lock(&self.sequences);
        for range in ranges {
            if let Some(set) = sequences.in_flight.get_mut(range) {
                set.remove(&sequence);
                if set.is_empty() {
                    sequences.in_flight.remove(range);
                }
            }
        }
    }
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    /// Ranges (by id) where this session is known to be open, with the registration
    /// (`opened_at`) each gave.
    open: Mutex<FxHashMap<u64, u64>>,
    /// Writes sent again after an unknown outcome.
    pub ambiguous_retried: AtomicU64,
}

impl Session {
    pub fn new() -> Self {
        Self::with_id(rand::random())
    }

    fn with_id(id: u128) -> Self {
        Session {
            shared: Arc::new(Shared {
                id,
                sequences: Mutex::new(Sequences {
                    next: 1,
                    in_flight: FxHashMap::default(),
                }),
            }),
            open: Mutex::default(),
            ambiguous_retried: AtomicU64::new(0),
        }
    }

    /// The id as the protocol carries it: (high, low) halves.
    pub fn id_halves(&self) -> (u64, u64) {
        ((self.shared.id >> 64) as u64, self.shared.id as u64)
    }

    /// The sequence the next write will get: the floor of a session opened now.
    pub fn next_sequence(&self) -> u64 {
        lock(&self.shared.sequences).next
    }

    /// The session's registration at `range`, if it is known to be open there.
    pub fn opened_at(&self, range: u64) -> Option<u64> {
        lock(&self.open).get(&range).copied()
    }

    pub fn set_opened(&self, range: u64, opened_at: u64) {
        lock(&self.open).insert(range, opened_at);
    }

    /// The range dropped the session (it expired there): open it again before the
    /// next write.
    pub fn forget_range(&self, range: u64) {
        lock(&self.open).remove(&range);
    }

    /// A new write of this session, numbered at its first attempt.
    pub fn write(&self) -> WriteSeq {
        WriteSeq {
            shared: self.shared.clone(),
            sequence: None,
            ranges: Vec::new(),
            opened_at: 0,
            sent_before: false,
            renumbered: 0,
        }
    }
}

/// One write's place in the session. Dropped (answered or given up), its sequence no
/// longer holds back what the ranges may forget.
pub(crate) struct WriteSeq {
    shared: Arc<Shared>,
    sequence: Option<u64>,
    /// The ranges the numbered write was sent to (it counts as in flight at each).
    ranges: Vec<u64>,
    /// The registration the write was numbered under; every attempt names it.
    opened_at: u64,
    sent_before: bool,
    renumbered: u32,
}

impl WriteSeq {
    /// The session reference of the next attempt, to `range`, numbering the write
    /// under the registration `opened_at` if it is not numbered yet.
    pub fn reference(&mut self, range: u64, opened_at: u64) -> proto::SessionRef {
        let mut sequences = lock(&self.shared.sequences);
        let sequence = match self.sequence {
            Some(sequence) => sequence,
            None => {
                let sequence = sequences.next;
                sequences.next += 1;
                self.sequence = Some(sequence);
                self.opened_at = opened_at;
                sequence
            }
        };
        if !self.ranges.contains(&range) {
            self.ranges.push(range);
            sequences
                .in_flight
                .entry(range)
                .or_default()
                .insert(sequence);
        }
        let acked_below = sequences
            .in_flight
            .get(&range)
            .and_then(|set| set.first().copied())
            .unwrap_or(sequence);
        proto::SessionRef {
            session_high: (self.shared.id >> 64) as u64,
            session_low: self.shared.id as u64,
            sequence,
            acked_below,
            opened_at: self.opened_at,
        }
    }

    pub fn numbered(&self) -> bool {
        self.sequence.is_some()
    }

    /// An attempt's outcome was unknown: it may have applied.
    pub fn mark_sent_before(&mut self) {
        self.sent_before = true;
    }

    /// Whether an earlier attempt may have applied.
    pub fn sent_before(&self) -> bool {
        self.sent_before
    }

    /// The write was refused unapplied under its number and was never sent before:
    /// it is numbered afresh at its next attempt (above the floor of the session's
    /// new opening).
    pub fn renumber(&mut self) {
        if let Some(sequence) = self.sequence.take() {
            self.shared.release(sequence, &self.ranges);
        }
        self.ranges.clear();
        self.renumbered += 1;
    }

    /// How often the write was renumbered.
    pub fn renumbered(&self) -> u32 {
        self.renumbered
    }
}

impl Drop for WriteSeq {
    fn drop(&mut self) {
        if let Some(sequence) = self.sequence {
            self.shared.release(sequence, &self.ranges);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_below_is_the_lowest_write_still_in_flight_to_the_range() {
        let session = Session::with_id(7);
        let mut first = session.write();
        let mut second = session.write();
        let mut elsewhere = session.write();
        assert_eq!(session.next_sequence(), 1, "numbered at the first attempt");
        let a = first.reference(10, 1);
        let x = elsewhere.reference(20, 1);
        let b = second.reference(10, 1);
        assert_eq!((a.sequence, x.sequence, b.sequence), (1, 2, 3));
        assert_eq!((a.acked_below, x.acked_below, b.acked_below), (1, 2, 1));
        assert_eq!(
            second.reference(10, 1).sequence,
            3,
            "a retry keeps its number"
        );
        drop(first);
        assert_eq!(
            second.reference(10, 1).acked_below,
            3,
            "range 10 no longer waits for 1"
        );
        // Sent to another range too (its route changed): it holds both back.
        assert_eq!(second.reference(20, 1).acked_below, 2);
        drop(elsewhere);
        assert_eq!(second.reference(20, 1).acked_below, 3);
        drop(second);
        let mut third = session.write();
        let c = third.reference(10, 1);
        assert_eq!((c.sequence, c.acked_below), (4, 4));
        third.renumber();
        assert!(!third.numbered());
        let fourth = third.reference(10, 9);
        assert_eq!(
            (fourth.sequence, fourth.opened_at),
            (5, 9),
            "renumbered under 9"
        );
        assert_eq!(
            fourth.acked_below, 5,
            "the old number no longer holds the range back"
        );
        assert_eq!(
            third.reference(10, 10).opened_at,
            9,
            "a retry names its registration"
        );
        assert_eq!(third.renumbered(), 1);
        drop(third);
        assert!(
            lock(&session.shared.sequences).in_flight.is_empty(),
            "nothing leaks"
        );
        assert_eq!(session.id_halves(), (0, 7));
    }
}

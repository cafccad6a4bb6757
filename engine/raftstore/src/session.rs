//! Client sessions: what makes a retried write apply exactly once (the Raft thesis,
//! §6.3, extended to clients with many writes in flight).
//!
//! A client holds a session (a random 128-bit id) and numbers its writes with one
//! sequence per session. Every write carries `(session, sequence, acked_below)`:
//! `acked_below` is the client's lowest sequence, among the writes it sent to the
//! range, whose answer it has not received yet, so every answer below it can be
//! forgotten (and those sequences are refused if they come again). Each range keeps a
//! [`SessionTable`]: per session, `acked_below`, the time it was last active, and the
//! answer of every write it applied at or above `acked_below`. At apply:
//!
//! - an unknown session, or a sequence below `acked_below` (its answer was received,
//!   or it predates the session's registration here), is refused with
//!   [`Verdict::Expired`] and nothing applies;
//! - a sequence already applied answers with its recorded answer and applies nothing
//!   ([`Verdict::Duplicate`]);
//! - anything else applies ([`Verdict::Apply`]) and its answer is recorded
//!   ([`SessionTable::record`]) if it applied (a refusal such as an epoch mismatch
//!   is not recorded: the client retries it under the same sequence).
//!
//! A session exists at a range only once registered there ([`SessionTable::open`],
//! the client's first call to a range), so a write whose session expired here is
//! refused, never applied afresh: only a write the client knows was never sent
//! before may then be sent again, under a new registration and a new sequence. Each
//! write names its registration (`opened_at`, the log index of the entry that opened
//! the session): a stale open applied after an expiry registers the session anew, and
//! the writes sent under the old one stay refused.
//!
//! **Determinism.** Nothing here reads a clock. Each raft entry carries the time its
//! leader proposed it and the session lifetime ([`Stamp`]); sessions idle past it are
//! dropped when an entry applies ([`SessionTable::expire`]). Every replica applies
//! the same entries to the same table, so every replica drops the same sessions at
//! the same entry. The table is persisted by the host in the same atomic batch as the
//! data and the applied index ([`SessionTable::take_changes`], [`encode_session`]),
//! and a range's copy (a snapshot, a split's halves) copies its table.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::{FxHashMap, FxHashSet};

/// A client session's id: 128 random bits, chosen by the client.
pub type SessionId = u128;

/// The session part of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRef {
    pub id: SessionId,
    pub sequence: u64,
    /// The client's lowest sequence still awaiting its answer.
    pub acked_below: u64,
    /// The registration the write was first sent under: the log index of the entry
    /// that opened the session at the range ([`SessionTable::open`] returns it).
    pub opened_at: u64,
}

/// The time a raft entry was proposed (the leader's wall clock, milliseconds since
/// the Unix epoch) and the session lifetime its leader runs with; both replicated in
/// the entry, so expiry is the same on every replica. Zero: the entry expires nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamp {
    pub proposed_at_ms: u64,
    pub session_ttl_ms: u64,
}

/// Answers a session may hold at one range: writes applied but not yet acknowledged
/// by the client. A client that keeps more in flight at once is refused (nothing
/// applies) until it acknowledges some; the client never sends that many.
pub const ANSWERS_PER_SESSION_MAX: usize = 100_000;

/// Sessions one range holds at most (each ~300 bytes in memory, ~50 persisted); more
/// are refused until some expire. A CLI opening one session per invocation at 100
/// invocations a second stays far below it with the default 10-minute lifetime.
pub const SESSIONS_PER_RANGE_MAX: usize = 100_000;

/// What a range does with a write of a session.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a, A> {
    /// Apply it (then [`SessionTable::record`] its answer if it applied).
    Apply,
    /// Applied before: answer this, apply nothing.
    Duplicate(&'a A),
    /// The session is not registered here (it expired, or never was), or the sequence
    /// is below what the client acknowledged: nothing applies.
    Expired,
    /// The session holds [`ANSWERS_PER_SESSION_MAX`] unacknowledged answers here.
    TooManyInFlight,
}

/// An answer a session table records, and how it is persisted.
pub trait Recorded: Clone {
    fn encode(&self, out: &mut Vec<u8>);
    /// Reads one answer from the front of `input`, advancing it.
    fn decode(input: &mut &[u8]) -> Option<Self>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session<A> {
    /// The log index of the entry that opened the session here (its registration).
    pub opened_at: u64,
    pub acked_below: u64,
    pub last_active_ms: u64,
    pub answers: BTreeMap<u64, A>,
}

/// One range's sessions. See the module documentation.
#[derive(Debug)]
pub struct SessionTable<A> {
    sessions: FxHashMap<SessionId, Session<A>>,
    /// (last active, id) of every session: expiry pops the front.
    by_activity: BTreeSet<(u64, SessionId)>,
    /// Sessions changed or dropped since the last `take_changes`.
    changed: FxHashSet<SessionId>,
}

impl<A> Default for SessionTable<A> {
    fn default() -> Self {
        SessionTable {
            sessions: FxHashMap::default(),
            by_activity: BTreeSet::new(),
            changed: FxHashSet::default(),
        }
    }
}

/// What changed in a table: sessions to write (encoded) and sessions to delete.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SessionChanges {
    pub write: Vec<(SessionId, Vec<u8>)>,
    pub delete: Vec<SessionId>,
}

impl SessionChanges {
    pub fn is_empty(&self) -> bool {
        self.write.is_empty() && self.delete.is_empty()
    }
}

impl<A: Recorded> SessionTable<A> {
    /// A table loaded from its persisted sessions (as [`encode_session`] wrote them).
    pub fn load(
        persisted: impl IntoIterator<Item = (SessionId, Vec<u8>)>,
    ) -> Result<Self, CorruptSession> {
        let mut table = SessionTable::default();
        for (id, raw) in persisted {
            let session = decode_session(&raw).ok_or(CorruptSession { id })?;
            table.by_activity.insert((session.last_active_ms, id));
            table.sessions.insert(id, session);
        }
        Ok(table)
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn get(&self, id: SessionId) -> Option<&Session<A>> {
        self.sessions.get(&id)
    }

    /// Every session, for a copy of the range (snapshot, split).
    pub fn iter(&self) -> impl Iterator<Item = (SessionId, &Session<A>)> {
        self.sessions.iter().map(|(id, s)| (*id, s))
    }

    fn touch(&mut self, id: SessionId, now_ms: u64) {
        if let Some(session) = self.sessions.get_mut(&id) {
            if now_ms > session.last_active_ms {
                self.by_activity.remove(&(session.last_active_ms, id));
                session.last_active_ms = now_ms;
                self.by_activity.insert((now_ms, id));
            }
        }
        self.changed.insert(id);
    }

    /// Registers `id` here by the entry at log index `index`, every sequence below
    /// `floor` refused; an already registered session is only marked active (its
    /// answers stay). Returns the registration (`opened_at`) writes must name: a write
    /// first sent under an earlier registration (one that expired since) is refused,
    /// even if a stale open with an old floor registered the session again.
    /// Refused (`None`) when the range already holds [`SESSIONS_PER_RANGE_MAX`].
    pub fn open(&mut self, id: SessionId, floor: u64, now_ms: u64, index: u64) -> Option<u64> {
        let opened_at = match self.sessions.entry(id) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.get().opened_at,
            std::collections::hash_map::Entry::Vacant(vacant) => {
                if self.by_activity.len() >= SESSIONS_PER_RANGE_MAX {
                    return None;
                }
                vacant.insert(Session {
                    opened_at: index,
                    acked_below: floor,
                    last_active_ms: now_ms,
                    answers: BTreeMap::new(),
                });
                self.by_activity.insert((now_ms, id));
                index
            }
        };
        self.touch(id, now_ms);
        Some(opened_at)
    }

    /// What to do with a write of `session` applied at `now_ms`. Forgets the answers
    /// below the write's `acked_below` first.
    pub fn check(&mut self, session: SessionRef, now_ms: u64) -> Verdict<'_, A> {
        let Some(entry) = self.sessions.get_mut(&session.id) else {
            return Verdict::Expired;
        };
        if entry.opened_at != session.opened_at {
            return Verdict::Expired;
        }
        if session.acked_below > entry.acked_below {
            entry.acked_below = session.acked_below;
            // Usually one or two answers at the front: no new map.
            while entry
                .answers
                .first_key_value()
                .is_some_and(|(&sequence, _)| sequence < session.acked_below)
            {
                entry.answers.pop_first();
            }
        }
        self.touch(session.id, now_ms);
        let Some(entry) = self.sessions.get(&session.id) else {
            return Verdict::Expired;
        };
        if session.sequence < entry.acked_below {
            return Verdict::Expired;
        }
        if let Some(answer) = entry.answers.get(&session.sequence) {
            return Verdict::Duplicate(answer);
        }
        if entry.answers.len() >= ANSWERS_PER_SESSION_MAX {
            return Verdict::TooManyInFlight;
        }
        Verdict::Apply
    }

    /// Records the answer of a write that [`SessionTable::check`] let apply.
    pub fn record(&mut self, session: SessionRef, answer: A) {
        if let Some(entry) = self.sessions.get_mut(&session.id) {
            entry.answers.insert(session.sequence, answer);
            self.changed.insert(session.id);
        }
    }

    /// Drops every session last active more than `stamp.session_ttl_ms` before
    /// `stamp.proposed_at_ms`. A zero stamp drops nothing.
    pub fn expire(&mut self, stamp: Stamp) {
        if stamp.proposed_at_ms == 0 || stamp.session_ttl_ms == 0 {
            return;
        }
        let Some(horizon) = stamp.proposed_at_ms.checked_sub(stamp.session_ttl_ms) else {
            return;
        };
        while let Some(&(last_active, id)) = self.by_activity.first() {
            if last_active >= horizon {
                break;
            }
            self.by_activity.pop_first();
            self.sessions.remove(&id);
            self.changed.insert(id);
        }
    }

    /// The sessions changed since the last call, encoded, and those dropped.
    pub fn take_changes(&mut self) -> SessionChanges {
        let mut changes = SessionChanges::default();
        for id in self.changed.drain() {
            match self.sessions.get(&id) {
                Some(session) => changes.write.push((id, encode_session(session))),
                None => changes.delete.push(id),
            }
        }
        changes
    }

    /// Whether anything changed since the last [`SessionTable::take_changes`].
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty()
    }
}

/// A persisted session that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session {id:032x}: persisted record does not decode")]
pub struct CorruptSession {
    pub id: SessionId,
}

const SESSION_FORMAT: u8 = 1;

/// One session as persisted: format, `opened_at`, `acked_below`, last active, the
/// answer count, then each answer's sequence and the answer.
pub fn encode_session<A: Recorded>(session: &Session<A>) -> Vec<u8> {
    let mut out = Vec::with_capacity(33 + session.answers.len() * 12);
    out.push(SESSION_FORMAT);
    out.extend_from_slice(&session.opened_at.to_be_bytes());
    out.extend_from_slice(&session.acked_below.to_be_bytes());
    out.extend_from_slice(&session.last_active_ms.to_be_bytes());
    out.extend_from_slice(&(session.answers.len() as u64).to_be_bytes());
    for (sequence, answer) in &session.answers {
        out.extend_from_slice(&sequence.to_be_bytes());
        answer.encode(&mut out);
    }
    out
}

fn take_u64(input: &mut &[u8]) -> Option<u64> {
    let (head, rest) = input.split_first_chunk::<8>()?;
    *input = rest;
    Some(u64::from_be_bytes(*head))
}

pub fn decode_session<A: Recorded>(raw: &[u8]) -> Option<Session<A>> {
    let (&format, mut input) = raw.split_first()?;
    if format != SESSION_FORMAT {
        return None;
    }
    let opened_at = take_u64(&mut input)?;
    let acked_below = take_u64(&mut input)?;
    let last_active_ms = take_u64(&mut input)?;
    let count = take_u64(&mut input)?;
    let mut answers = BTreeMap::new();
    for _ in 0..count {
        let sequence = take_u64(&mut input)?;
        answers.insert(sequence, A::decode(&mut input)?);
    }
    input.is_empty().then_some(Session {
        opened_at,
        acked_below,
        last_active_ms,
        answers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write's answer as the tests record it: one byte.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Answer(u8);

    impl Recorded for Answer {
        fn encode(&self, out: &mut Vec<u8>) {
            out.push(self.0);
        }
        fn decode(input: &mut &[u8]) -> Option<Self> {
            let (&byte, rest) = input.split_first()?;
            *input = rest;
            Some(Answer(byte))
        }
    }

    const S: SessionId = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;

    fn write(sequence: u64, acked_below: u64) -> SessionRef {
        SessionRef {
            id: S,
            sequence,
            acked_below,
            opened_at: 1,
        }
    }

    /// Applies a write as a range would: the answer is the sequence's low byte.
    fn apply(table: &mut SessionTable<Answer>, w: SessionRef, now: u64) -> Result<u8, String> {
        match table.check(w, now) {
            Verdict::Apply => {
                table.record(w, Answer(w.sequence as u8));
                Ok(w.sequence as u8)
            }
            Verdict::Duplicate(answer) => Err(format!("duplicate {}", answer.0)),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn a_duplicate_answers_what_was_recorded_and_applies_nothing() {
        let mut table = SessionTable::default();
        table.open(S, 1, 10, 1).unwrap();
        assert_eq!(apply(&mut table, write(1, 1), 10), Ok(1));
        assert_eq!(
            apply(&mut table, write(1, 1), 11),
            Err("duplicate 1".into())
        );
        // A refusal (not recorded) may be retried under the same sequence.
        assert_eq!(table.check(write(2, 1), 12), Verdict::Apply);
        assert_eq!(apply(&mut table, write(2, 1), 12), Ok(2));
        assert_eq!(
            apply(&mut table, write(2, 1), 13),
            Err("duplicate 2".into())
        );
    }

    #[test]
    fn writes_in_flight_at_once_apply_out_of_order_and_across_gaps() {
        let mut table = SessionTable::default();
        table.open(S, 1, 0, 1).unwrap();
        // Sequences 2 and 5 went to other ranges: the gaps are nothing to wait for.
        for sequence in [4, 1, 6, 3] {
            assert_eq!(apply(&mut table, write(sequence, 1), 0), Ok(sequence as u8));
        }
        for sequence in [1, 3, 4, 6] {
            assert_eq!(
                apply(&mut table, write(sequence, 1), 0),
                Err(format!("duplicate {sequence}"))
            );
        }
        assert_eq!(apply(&mut table, write(5, 1), 0), Ok(5));
    }

    #[test]
    fn acknowledged_answers_are_forgotten_and_their_sequences_refused() {
        let mut table = SessionTable::default();
        table.open(S, 1, 0, 1).unwrap();
        for sequence in 1..=100 {
            apply(&mut table, write(sequence, 1), 0).unwrap();
        }
        assert_eq!(table.get(S).unwrap().answers.len(), 100);
        // The client received every answer below 90.
        assert_eq!(apply(&mut table, write(101, 90), 0), Ok(101));
        let session = table.get(S).unwrap();
        assert_eq!(session.acked_below, 90);
        assert_eq!(session.answers.len(), 12, "90..=101 kept");
        // A stale copy of an acknowledged write never applies again.
        assert_eq!(apply(&mut table, write(5, 1), 0), Err("Expired".into()));
        assert_eq!(
            apply(&mut table, write(95, 1), 0),
            Err("duplicate 95".into())
        );
    }

    #[test]
    fn answers_in_flight_are_bounded() {
        let mut table = SessionTable::default();
        table.open(S, 0, 0, 1).unwrap();
        for sequence in 0..ANSWERS_PER_SESSION_MAX as u64 {
            apply(&mut table, write(sequence, 0), 0).unwrap();
        }
        let next = ANSWERS_PER_SESSION_MAX as u64;
        assert_eq!(table.check(write(next, 0), 0), Verdict::TooManyInFlight);
        // Acknowledging answers makes room again.
        assert_eq!(apply(&mut table, write(next, 10), 0), Ok(next as u8));
    }

    #[test]
    fn an_unregistered_or_expired_session_is_refused_and_never_reapplies() {
        let mut table = SessionTable::default();
        assert_eq!(apply(&mut table, write(1, 1), 0), Err("Expired".into()));
        table.open(S, 1, 1_000, 1).unwrap();
        assert_eq!(apply(&mut table, write(1, 1), 1_000), Ok(1));
        let ttl = 600_000;
        // Idle for exactly the lifetime: kept.
        table.expire(Stamp {
            proposed_at_ms: 601_000,
            session_ttl_ms: ttl,
        });
        assert_eq!(table.len(), 1);
        table.expire(Stamp {
            proposed_at_ms: 601_001,
            session_ttl_ms: ttl,
        });
        assert!(table.is_empty());
        // The retry of the applied write: refused, not applied a second time.
        assert_eq!(
            apply(&mut table, write(1, 1), 601_001),
            Err("Expired".into())
        );
        // Registered again (by the entry at index 5), the sequences before the new
        // floor stay refused, and writes name the new registration.
        assert_eq!(table.open(S, 7, 601_002, 5), Some(5));
        let again = |sequence| SessionRef {
            opened_at: 5,
            ..write(sequence, 1)
        };
        assert_eq!(apply(&mut table, again(1), 601_002), Err("Expired".into()));
        assert_eq!(apply(&mut table, again(7), 601_002), Ok(7));
        assert_eq!(
            apply(&mut table, write(8, 1), 601_002),
            Err("Expired".into())
        );
    }

    /// A stale open (sent with an old floor, applied after the session expired)
    /// registers the session again; a write first sent under the old registration,
    /// resent now, must still be refused: it may have applied before.
    #[test]
    fn a_stale_open_after_expiry_cannot_let_an_applied_write_apply_again() {
        let mut table = SessionTable::default();
        assert_eq!(table.open(S, 5, 0, 1), Some(1));
        assert_eq!(apply(&mut table, write(5, 5), 0), Ok(5));
        table.expire(Stamp {
            proposed_at_ms: 2_000,
            session_ttl_ms: 1_000,
        });
        assert!(table.is_empty());
        assert_eq!(table.open(S, 5, 2_000, 9), Some(9), "the stale open");
        assert_eq!(apply(&mut table, write(5, 5), 2_000), Err("Expired".into()));
        // Opening again while registered keeps the registration.
        assert_eq!(table.open(S, 6, 2_001, 12), Some(9));
    }

    #[test]
    fn sessions_per_range_are_bounded_and_expiry_makes_room() {
        let mut table: SessionTable<Answer> = SessionTable::default();
        for id in 0..SESSIONS_PER_RANGE_MAX as u128 {
            assert!(table.open(id, 0, 10, 1).is_some());
        }
        assert_eq!(table.open(S, 0, 20, 2), None);
        assert_eq!(
            table.open(0, 0, 20, 2),
            Some(1),
            "an open session still opens"
        );
        table.expire(Stamp {
            proposed_at_ms: 20,
            session_ttl_ms: 5,
        });
        assert_eq!(table.open(S, 0, 20, 3), Some(3));
    }

    #[test]
    fn activity_postpones_expiry_and_a_zero_stamp_expires_nothing() {
        let mut table: SessionTable<Answer> = SessionTable::default();
        let other = S + 1;
        table.open(S, 0, 100, 1).unwrap();
        table.open(other, 0, 100, 1).unwrap();
        apply(&mut table, write(0, 0), 500).unwrap();
        // A leader with a slower clock: activity never goes back in time.
        apply(&mut table, write(1, 0), 300).unwrap();
        table.expire(Stamp::default());
        assert_eq!(table.len(), 2);
        table.expire(Stamp {
            proposed_at_ms: 450,
            session_ttl_ms: 100,
        });
        assert!(table.get(other).is_none());
        assert_eq!(table.get(S).unwrap().last_active_ms, 500);
    }

    #[test]
    fn changes_persist_and_reload_to_the_same_table() {
        let mut table = SessionTable::default();
        table.open(S, 3, 10, 1).unwrap();
        table.open(S + 1, 0, 20, 1).unwrap();
        apply(&mut table, write(3, 3), 30).unwrap();
        apply(&mut table, write(9, 3), 30).unwrap();
        let changes = table.take_changes();
        assert_eq!(changes.write.len(), 2);
        assert!(!table.has_changes());
        let reloaded: SessionTable<Answer> = SessionTable::load(changes.write.clone()).unwrap();
        assert_eq!(reloaded.get(S), table.get(S));
        assert_eq!(reloaded.get(S + 1), table.get(S + 1));

        table.expire(Stamp {
            proposed_at_ms: 35,
            session_ttl_ms: 10,
        });
        let changes = table.take_changes();
        assert_eq!(changes.delete, vec![S + 1]);
        assert!(changes.write.is_empty());

        let mut raw = encode_session(table.get(S).unwrap());
        raw.push(0);
        let error = SessionTable::<Answer>::load([(S, raw)]).unwrap_err();
        assert_eq!(error, CorruptSession { id: S });
    }
}

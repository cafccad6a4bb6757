//! Client writes as raft commands: how they are checked, batched into one entry and
//! applied to the state machine.

use prost::Message as _;
use rangekv_raftstore::session::{Recorded, SessionChanges};
use rangekv_raftstore::{AdminEffect, Fatal, SessionRef, SessionTable, Stamp, Verdict};
use rangekv_rpc::proto::{self, command::Op, mutation};
use rangekv_rpc::RangeDescriptor;
use rangekv_state::ApplyBatch;
use rangekv_types::{limits, RangeId};

/// What an applied write reports back to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteResult {
    Done,
    /// A session opened (or already open): its registration, `opened_at`.
    Opened(u64),
    Cas {
        succeeded: bool,
        previous: Option<Vec<u8>>,
    },
}

pub type CommandResult = Result<WriteResult, proto::Error>;

/// A range's client sessions, with the answers of the writes they applied.
pub type Sessions = SessionTable<WriteResult>;

/// A recorded answer as persisted: 0 done; 1 CAS, succeeded, previous found, then
/// the previous value's length and bytes.
impl Recorded for WriteResult {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            WriteResult::Done => out.push(0),
            WriteResult::Opened(at) => {
                out.push(2);
                out.extend_from_slice(&at.to_be_bytes());
            }
            WriteResult::Cas {
                succeeded,
                previous,
            } => {
                out.extend_from_slice(&[1, u8::from(*succeeded), u8::from(previous.is_some())]);
                let value = previous.as_deref().unwrap_or_default();
                out.extend_from_slice(&(value.len() as u32).to_be_bytes());
                out.extend_from_slice(value);
            }
        }
    }

    fn decode(input: &mut &[u8]) -> Option<Self> {
        let (&kind, rest) = input.split_first()?;
        *input = rest;
        match kind {
            0 => Some(WriteResult::Done),
            2 => {
                let (at, rest) = input.split_first_chunk::<8>()?;
                *input = rest;
                Some(WriteResult::Opened(u64::from_be_bytes(*at)))
            }
            1 => {
                let (&[succeeded, found], rest) = input.split_first_chunk::<2>()?;
                let (len, rest) = rest.split_first_chunk::<4>()?;
                let len = u32::from_be_bytes(*len) as usize;
                if rest.len() < len || succeeded > 1 || found > 1 {
                    return None;
                }
                let (value, rest) = rest.split_at(len);
                *input = rest;
                Some(WriteResult::Cas {
                    succeeded: succeeded == 1,
                    previous: (found == 1).then(|| value.to_vec()),
                })
            }
            _ => None,
        }
    }
}

/// A session id as the protocol carries it (two 64-bit halves).
pub fn session_id(high: u64, low: u64) -> u128 {
    (u128::from(high) << 64) | u128::from(low)
}

fn session_ref(session: &proto::SessionRef) -> SessionRef {
    SessionRef {
        id: session_id(session.session_high, session.session_low),
        sequence: session.sequence,
        acked_below: session.acked_below,
        opened_at: session.opened_at,
    }
}

pub fn session_expired(session: SessionRef) -> proto::Error {
    proto::Error {
        kind: Some(proto::error::Kind::SessionExpired(proto::SessionExpired {
            session_high: (session.id >> 64) as u64,
            session_low: session.id as u64,
            sequence: session.sequence,
        })),
    }
}

/// What a write dropped unanswered tells its client: it may still apply (its entry
/// may commit under another leader), so the outcome is unknown.
pub const OUTCOME_UNKNOWN: &str = "the store stopped, or its replica lost the leadership, \
     before the write was known to apply: outcome unknown";

/// Where a write's outcome goes. Dropped unanswered (a leader that lost its quorum
/// abandons its proposals, a stopping store drops everything), it tells its client
/// the outcome is unknown, never "not applied".
pub enum Responder {
    /// A task awaiting the outcome (unary calls, and CAS on a batch-commands stream).
    Call(tokio::sync::oneshot::Sender<CommandResult>),
    /// A put, delete or batch put of a batch-commands stream: the worker builds its
    /// answer and queues it on the stream itself, so a loop's applied writes reach
    /// each stream with one wake-up rather than one task wake-up per write.
    Stream(StreamReply),
}

impl Responder {
    /// Answers the write.
    pub fn send(self, result: CommandResult) {
        match self {
            Responder::Call(call) => {
                let _ = call.send(result);
            }
            Responder::Stream(mut reply) => reply.answer(result),
        }
    }

    /// Drops the responder without answering anything: the caller answers the
    /// refusal itself (the write never reached a worker).
    pub fn disarm(self) {
        if let Responder::Stream(mut reply) = self {
            reply.answered = true;
        }
    }
}

/// The answer queue of one batch-commands stream.
pub type StreamAnswers =
    tokio::sync::mpsc::UnboundedSender<proto::batch_commands_response::Response>;

/// Which response a streamed write gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamWrite {
    Put,
    Delete,
    BatchPut,
}

/// A streamed write's answer slot: request `id` of the stream behind `answers`.
pub struct StreamReply {
    id: u64,
    kind: StreamWrite,
    answers: StreamAnswers,
    answered: bool,
}

impl StreamReply {
    pub fn new(id: u64, kind: StreamWrite, answers: StreamAnswers) -> Self {
        StreamReply {
            id,
            kind,
            answers,
            answered: false,
        }
    }

    fn answer(&mut self, result: CommandResult) {
        use proto::batch_commands_response::response::Cmd;
        self.answered = true;
        // In-band errors as the unary calls answer them; a write has no other result.
        let error = result.err();
        let cmd = match self.kind {
            StreamWrite::Put => Cmd::Put(proto::PutResponse { error }),
            StreamWrite::Delete => Cmd::Delete(proto::DeleteResponse { error }),
            StreamWrite::BatchPut => Cmd::BatchPut(proto::BatchPutResponse { error }),
        };
        let _ = self.answers.send(proto::batch_commands_response::Response {
            id: self.id,
            cmd: Some(cmd),
            status_code: 0,
            status_message: String::new(),
        });
    }
}

impl Drop for StreamReply {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.answers.send(proto::batch_commands_response::Response {
                id: self.id,
                cmd: None,
                status_code: tonic::Code::Unavailable as i32,
                status_message: OUTCOME_UNKNOWN.to_string(),
            });
        }
    }
}

/// The largest encoded entry the driver builds from gathered writes; more writes
/// go into another entry of the same loop.
pub const ENTRY_BYTES_TARGET: usize = 4 * 1024 * 1024;

pub fn epoch_not_match(descriptor: &RangeDescriptor) -> proto::Error {
    proto::Error {
        kind: Some(proto::error::Kind::EpochNotMatch(proto::EpochNotMatch {
            current: vec![descriptor.clone()],
        })),
    }
}

pub fn key_not_in_range(key: &[u8], descriptor: &RangeDescriptor) -> proto::Error {
    proto::Error {
        kind: Some(proto::error::Kind::KeyNotInRange(proto::KeyNotInRange {
            key: key.to_vec().into(),
            range_id: descriptor.range_id,
            start_key: descriptor.start_key.clone(),
            end_key: descriptor.end_key.clone(),
        })),
    }
}

/// Whether `epoch` (as the client knows it) names the range's current span: its
/// `version` (splits and merges). A membership change (`conf_ver`) does not move a
/// key, so a write sent before one still applies after it.
pub fn epoch_matches(epoch: Option<&proto::RangeEpoch>, descriptor: &RangeDescriptor) -> bool {
    let current = descriptor.epoch.unwrap_or_default();
    epoch.is_some_and(|e| e.version == current.version)
}

/// Every key a command touches, for the key-in-range check. A delete-range's span is
/// checked separately ([`span_in_range`]).
pub fn command_keys(command: &proto::Command) -> Vec<&[u8]> {
    match &command.op {
        Some(Op::Batch(batch)) => batch.mutations.iter().map(|m| &m.key[..]).collect(),
        Some(Op::Cas(cas)) => vec![&cas.key[..]],
        Some(Op::DeleteRange(_)) | Some(Op::CompactLog(_)) | Some(Op::OpenSession(_)) | None => {
            Vec::new()
        }
    }
}

/// Whether `[start, end)` lies inside the range (an empty `end` means the range end).
pub fn span_in_range(start: &[u8], end: &[u8], descriptor: &RangeDescriptor) -> bool {
    if start < &descriptor.start_key[..] {
        return false;
    }
    if descriptor.end_key.is_empty() {
        return true;
    }
    !end.is_empty() && end <= &descriptor.end_key[..] && start <= end
}

/// A key greater than every valid user key (keys are at most `KEY_BYTES_MAX`): the
/// end of a delete-range on the range that reaches +infinity.
fn beyond_every_key() -> Vec<u8> {
    vec![0xff; limits::KEY_BYTES_MAX + 1]
}

/// The checks a command passes again when applied: the range's epoch and key span
/// may have changed since the proposal.
fn check_at_apply(
    command: &proto::Command,
    descriptor: &RangeDescriptor,
) -> Result<(), proto::Error> {
    if matches!(
        command.op,
        Some(Op::CompactLog(_)) | Some(Op::OpenSession(_))
    ) {
        return Ok(());
    }
    if !epoch_matches(command.epoch.as_ref(), descriptor) {
        return Err(epoch_not_match(descriptor));
    }
    for key in command_keys(command) {
        if !descriptor.contains_key(key) {
            return Err(key_not_in_range(key, descriptor));
        }
    }
    if let Some(Op::DeleteRange(span)) = &command.op {
        if !span_in_range(&span.start_key, &span.end_key, descriptor) {
            return Err(key_not_in_range(&span.start_key, descriptor));
        }
    }
    Ok(())
}

/// Applies one command to `batch`. Deterministic: every replica computes the same
/// result from the same state.
pub fn apply_command(
    batch: &mut ApplyBatch<'_>,
    command: &proto::Command,
    descriptor: &RangeDescriptor,
) -> Result<CommandResult, rangekv_state::StateError> {
    if let Err(error) = check_at_apply(command, descriptor) {
        return Ok(Err(error));
    }
    match &command.op {
        // Log compaction is carried out by the driver, sessions by `apply_entry`.
        None | Some(Op::CompactLog(_)) | Some(Op::OpenSession(_)) => Ok(Ok(WriteResult::Done)),
        Some(Op::Batch(request)) => {
            for m in &request.mutations {
                match mutation::Op::try_from(m.op) {
                    Ok(mutation::Op::Delete) => batch.delete(&m.key),
                    _ => batch.put(&m.key, &m.value),
                }
            }
            Ok(Ok(WriteResult::Done))
        }
        Some(Op::Cas(cas)) => {
            let previous = batch.get(&cas.key)?;
            let matches = match &previous {
                None => cas.expected_absent,
                Some(value) => !cas.expected_absent && value[..] == cas.expected_value[..],
            };
            if matches {
                if cas.delete {
                    batch.delete(&cas.key);
                } else {
                    batch.put(&cas.key, &cas.new_value);
                }
            }
            Ok(Ok(WriteResult::Cas {
                succeeded: matches,
                previous,
            }))
        }
        Some(Op::DeleteRange(span)) => {
            let end = if !span.end_key.is_empty() {
                span.end_key.to_vec()
            } else if !descriptor.end_key.is_empty() {
                descriptor.end_key.to_vec()
            } else {
                beyond_every_key()
            };
            if span.start_key[..] < end[..] {
                batch.delete_range(&span.start_key, &end);
            }
            Ok(Ok(WriteResult::Done))
        }
    }
}

/// Decodes an entry's data, from the entry's own `Bytes`, so keys and values are
/// slices of it, not copies.
pub fn decode_entry(
    data: &raft::eraftpb::Entry,
) -> Result<proto::CommandBatch, prost::DecodeError> {
    proto::CommandBatch::decode(data.data.clone())
}

/// Applies one committed entry to `batch`: one answer per command, in order; a log
/// compaction also as an [`AdminEffect`]. Sessions idle past the entry's stamp are
/// dropped first; a write of a session applies at most once (see
/// `rangekv_raftstore::session`); the sessions it changed go into `batch` at
/// [`persist_sessions`], before the batch commits. An entry that does not decode is [`Fatal`]: applying it as
/// nothing on this replica while another (a different build, a bit flip) applied it
/// would let the replicas diverge silently.
pub fn apply_entry(
    batch: &mut ApplyBatch<'_>,
    descriptor: &RangeDescriptor,
    sessions: &mut Sessions,
    range: RangeId,
    entry: &raft::eraftpb::Entry,
    answers: &mut Vec<CommandResult>,
    effects: &mut Vec<AdminEffect>,
) -> Result<(), Fatal> {
    let decoded = decode_entry(entry).map_err(|error| Fatal::Unappliable {
        range,
        index: entry.index,
        reason: format!("does not decode: {error}"),
    })?;
    let stamp = Stamp {
        proposed_at_ms: decoded.proposed_at_ms,
        session_ttl_ms: decoded.session_ttl_ms,
    };
    sessions.expire(stamp);
    for command in &decoded.commands {
        if let Some(Op::CompactLog(compact)) = &command.op {
            effects.push(AdminEffect::CompactLog {
                index: compact.index,
                term: compact.term,
            });
        }
        let answer = apply_in_session(batch, command, descriptor, sessions, stamp, entry.index)
            .map_err(state_failed)?;
        answers.push(answer);
    }
    Ok(())
}

/// Writes the sessions the entries applied since the last call changed into `batch`:
/// once per range per apply batch (a session's record holds every answer its client
/// has not acknowledged, so writing it per entry would write it many times over).
pub fn persist_sessions(batch: &mut ApplyBatch<'_>, sessions: &mut Sessions, range: RangeId) {
    if !sessions.has_changes() {
        return;
    }
    let SessionChanges { write, delete } = sessions.take_changes();
    for (id, record) in write {
        batch.set_session(range, id, Some(record));
    }
    for id in delete {
        batch.set_session(range, id, None);
    }
}

/// Applies one command under its session (if it has one): at most once per
/// (session, sequence); a repeat answers what the first application answered.
fn apply_in_session(
    batch: &mut ApplyBatch<'_>,
    command: &proto::Command,
    descriptor: &RangeDescriptor,
    sessions: &mut Sessions,
    stamp: Stamp,
    index: u64,
) -> Result<CommandResult, rangekv_state::StateError> {
    let now_ms = stamp.proposed_at_ms;
    if let Some(Op::OpenSession(open)) = &command.op {
        let id = session_id(open.session_high, open.session_low);
        return Ok(match sessions.open(id, open.floor, now_ms, index) {
            Some(opened_at) => Ok(WriteResult::Opened(opened_at)),
            None => Err(busy(format!(
                "the range holds {} client sessions; opened again when some expire",
                rangekv_raftstore::session::SESSIONS_PER_RANGE_MAX
            ))),
        });
    }
    let Some(session) = command.session.as_ref().map(session_ref) else {
        return apply_command(batch, command, descriptor);
    };
    match sessions.check(session, now_ms) {
        Verdict::Apply => {}
        Verdict::Duplicate(answer) => return Ok(Ok(answer.clone())),
        Verdict::Expired => return Ok(Err(session_expired(session))),
        Verdict::TooManyInFlight => {
            return Ok(Err(busy(format!(
                "session holds {} unacknowledged answers at this range",
                rangekv_raftstore::session::ANSWERS_PER_SESSION_MAX
            ))))
        }
    }
    let result = apply_command(batch, command, descriptor)?;
    if let Ok(applied) = &result {
        sessions.record(session, applied.clone());
    }
    Ok(result)
}

fn busy(reason: String) -> proto::Error {
    proto::Error {
        kind: Some(proto::error::Kind::ServerBusy(proto::ServerBusy {
            reason,
            backoff_ms: 100,
        })),
    }
}

pub(crate) fn state_failed(error: rangekv_state::StateError) -> Fatal {
    Fatal::StateMachine(error.to_string())
}

pub fn encode_entry(commands: Vec<proto::Command>, stamp: Stamp) -> Vec<u8> {
    proto::CommandBatch {
        commands,
        proposed_at_ms: stamp.proposed_at_ms,
        session_ttl_ms: stamp.session_ttl_ms,
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::batch_commands_response::response::Cmd;

    fn entry(index: u64, data: Vec<u8>) -> raft::eraftpb::Entry {
        raft::eraftpb::Entry {
            index,
            term: 1,
            data: data.into(),
            ..Default::default()
        }
    }

    /// Before, an entry that did not decode applied as nothing (its proposals got an
    /// error): a replica that could decode it would have diverged silently.
    #[test]
    fn a_committed_entry_that_does_not_decode_is_fatal_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = rangekv_state::StateMachine::open(dir.path()).unwrap();
        let descriptor = RangeDescriptor {
            range_id: 1,
            epoch: Some(proto::RangeEpoch::default()),
            ..Default::default()
        };
        let put = proto::Command {
            epoch: descriptor.epoch,
            op: Some(Op::Batch(proto::BatchPutRequest {
                header: None,
                mutations: vec![proto::Mutation {
                    op: mutation::Op::Put as i32,
                    key: b"k".to_vec().into(),
                    value: b"v".to_vec().into(),
                }],
            })),
            session: None,
        };
        let compact = proto::Command {
            epoch: None,
            op: Some(Op::CompactLog(proto::CompactLog { index: 4, term: 1 })),
            session: None,
        };
        let mut batch = state.batch();
        let (mut answers, mut effects) = (Vec::new(), Vec::new());
        let mut sessions = Sessions::default();
        let good = entry(5, encode_entry(vec![put, compact], Stamp::default()));
        apply_entry(
            &mut batch,
            &descriptor,
            &mut sessions,
            RangeId(1),
            &good,
            &mut answers,
            &mut effects,
        )
        .unwrap();
        assert_eq!(answers, vec![Ok(WriteResult::Done), Ok(WriteResult::Done)]);
        assert_eq!(effects, vec![AdminEffect::CompactLog { index: 4, term: 1 }]);

        // Field 1 (commands), length-delimited, claiming more bytes than there are.
        let garbage = entry(6, vec![0x0a, 0xff, 0x01, 0x02]);
        let error = apply_entry(
            &mut batch,
            &descriptor,
            &mut sessions,
            RangeId(1),
            &garbage,
            &mut answers,
            &mut effects,
        )
        .unwrap_err();
        assert!(
            matches!(error, Fatal::Unappliable { index: 6, .. }),
            "{error}"
        );
        assert_eq!(answers.len(), 2, "nothing answered for the bad entry");
    }

    /// A retried CAS (same session and sequence) in a later entry answers what the
    /// first application answered and changes nothing, even after another write;
    /// the session is persisted in the same batch and reloads; an expired session's
    /// retry is refused, never applied again.
    #[test]
    fn a_repeated_write_of_a_session_applies_once_and_answers_as_the_first_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = rangekv_state::StateMachine::open(dir.path()).unwrap();
        let range = RangeId(1);
        let descriptor = RangeDescriptor {
            range_id: 1,
            epoch: Some(proto::RangeEpoch::default()),
            ..Default::default()
        };
        let id: u128 = 0xfeed_0000_0000_0000_0000_0000_0000_beef;
        let in_session = |sequence: u64, op: Op| proto::Command {
            epoch: descriptor.epoch,
            op: Some(op),
            session: Some(proto::SessionRef {
                session_high: (id >> 64) as u64,
                session_low: id as u64,
                sequence,
                acked_below: 1,
                opened_at: 1,
            }),
        };
        let cas = |expected: Option<&[u8]>, new: &[u8]| {
            Op::Cas(proto::CompareAndSwapRequest {
                header: None,
                key: b"k".to_vec().into(),
                expected_absent: expected.is_none(),
                expected_value: expected.unwrap_or_default().to_vec().into(),
                new_value: new.to_vec().into(),
                delete: false,
            })
        };
        let open = proto::Command {
            epoch: None,
            op: Some(Op::OpenSession(proto::OpenSessionRequest {
                header: None,
                session_high: (id >> 64) as u64,
                session_low: id as u64,
                floor: 1,
            })),
            session: None,
        };
        let stamp = |at: u64| Stamp {
            proposed_at_ms: at,
            session_ttl_ms: 1_000,
        };
        let mut sessions = Sessions::default();
        let apply = |commands: Vec<proto::Command>, at: u64, sessions: &mut Sessions| {
            let mut batch = state.batch();
            let (mut answers, mut effects) = (Vec::new(), Vec::new());
            let data = entry(1, encode_entry(commands, stamp(at)));
            apply_entry(
                &mut batch,
                &descriptor,
                sessions,
                range,
                &data,
                &mut answers,
                &mut effects,
            )
            .unwrap();
            persist_sessions(&mut batch, sessions, range);
            batch.commit().unwrap();
            answers
        };
        let swapped = Ok(WriteResult::Cas {
            succeeded: true,
            previous: None,
        });
        let first = apply(
            vec![open, in_session(1, cas(None, b"a"))],
            100,
            &mut sessions,
        );
        assert_eq!(first, vec![Ok(WriteResult::Opened(1)), swapped.clone()]);
        // Another session's write (none here: a plain write) moves the value on.
        let plain = proto::Command {
            session: None,
            ..in_session(0, cas(Some(b"a"), b"b"))
        };
        apply(vec![plain], 200, &mut sessions);
        let again = apply(vec![in_session(1, cas(None, b"a"))], 300, &mut sessions);
        assert_eq!(again, vec![swapped], "the recorded answer, not a new one");
        assert_eq!(state.get(b"k").unwrap().as_deref(), Some(&b"b"[..]));

        let reloaded = Sessions::load(state.sessions(range).unwrap()).unwrap();
        assert_eq!(reloaded.get(id), sessions.get(id));
        assert_eq!(reloaded.get(id).unwrap().answers.len(), 1);

        // Idle past the lifetime: dropped (and deleted) at the next entry.
        let late = apply(vec![in_session(1, cas(None, b"a"))], 1_301, &mut sessions);
        assert!(
            matches!(
                &late[0],
                Err(proto::Error {
                    kind: Some(proto::error::Kind::SessionExpired(_))
                })
            ),
            "{late:?}"
        );
        assert!(state.sessions(range).unwrap().is_empty());
        assert_eq!(state.get(b"k").unwrap().as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn recorded_answers_round_trip_and_garbage_is_refused() {
        for answer in [
            WriteResult::Done,
            WriteResult::Opened(77),
            WriteResult::Cas {
                succeeded: false,
                previous: Some(b"old".to_vec()),
            },
            WriteResult::Cas {
                succeeded: true,
                previous: None,
            },
        ] {
            let mut raw = Vec::new();
            answer.encode(&mut raw);
            raw.push(9);
            let mut input = &raw[..];
            assert_eq!(WriteResult::decode(&mut input), Some(answer));
            assert_eq!(input, &[9]);
        }
        for garbage in [
            &[2u8][..],
            &[1, 1],
            &[1, 2, 0, 0, 0, 0, 0],
            &[1, 1, 1, 0, 0, 0, 9, 1],
        ] {
            assert_eq!(WriteResult::decode(&mut &garbage[..]), None, "{garbage:?}");
        }
    }

    #[test]
    fn a_streamed_write_is_answered_once_unknown_when_dropped_and_silent_when_disarmed() {
        let (answers, mut stream) = tokio::sync::mpsc::unbounded_channel();
        let reply = |id, kind| Responder::Stream(StreamReply::new(id, kind, answers.clone()));
        reply(1, StreamWrite::Put).send(Ok(WriteResult::Done));
        reply(2, StreamWrite::BatchPut).send(Err(epoch_not_match(&RangeDescriptor::default())));
        drop(reply(3, StreamWrite::Delete));
        reply(4, StreamWrite::Put).disarm();
        drop(answers);
        let mut got = Vec::new();
        while let Ok(response) = stream.try_recv() {
            got.push(response);
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].id, 1);
        assert_eq!(
            got[0].cmd,
            Some(Cmd::Put(proto::PutResponse { error: None }))
        );
        assert_eq!(got[1].id, 2);
        assert!(
            matches!(
                &got[1].cmd,
                Some(Cmd::BatchPut(proto::BatchPutResponse { error: Some(_) }))
            ),
            "{got:?}"
        );
        assert_eq!(got[2].id, 3);
        assert_eq!(got[2].cmd, None);
        assert_eq!(got[2].status_code, tonic::Code::Unavailable as i32);
        assert_eq!(got[2].status_message, OUTCOME_UNKNOWN);
    }
}

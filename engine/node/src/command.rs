//! Client writes as raft commands: how they are checked, batched into one entry and
//! applied to the state machine.

use prost::Message as _;
use rangekv_rpc::proto::{self, command::Op, mutation};
use rangekv_rpc::RangeDescriptor;
use rangekv_state::ApplyBatch;
use rangekv_types::limits;

/// What an applied write reports back to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteResult {
    Done,
    Cas {
        succeeded: bool,
        previous: Option<Vec<u8>>,
    },
}

pub type CommandResult = Result<WriteResult, proto::Error>;
pub type Responder = tokio::sync::oneshot::Sender<CommandResult>;

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

/// Whether `epoch` (as the client knows it) is the range's current one.
pub fn epoch_matches(epoch: Option<&proto::RangeEpoch>, descriptor: &RangeDescriptor) -> bool {
    let current = descriptor.epoch.unwrap_or_default();
    epoch.is_some_and(|e| e.version == current.version && e.conf_ver == current.conf_ver)
}

/// Every key a command touches, for the key-in-range check. A delete-range's span is
/// checked separately ([`span_in_range`]).
pub fn command_keys(command: &proto::Command) -> Vec<&[u8]> {
    match &command.op {
        Some(Op::Batch(batch)) => batch.mutations.iter().map(|m| &m.key[..]).collect(),
        Some(Op::Cas(cas)) => vec![&cas.key[..]],
        Some(Op::DeleteRange(_)) | Some(Op::CompactLog(_)) | None => Vec::new(),
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
    if matches!(command.op, Some(Op::CompactLog(_))) {
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
        // Log compaction is carried out by the driver, not the state machine.
        None | Some(Op::CompactLog(_)) => Ok(Ok(WriteResult::Done)),
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

/// Decodes an entry's data. A committed entry that does not decode applies as
/// nothing on every replica alike (its proposals get an error). Decoded from the
/// entry's own `Bytes`, so keys and values are slices of it, not copies.
pub fn decode_entry(
    data: &raft::eraftpb::Entry,
) -> Result<proto::CommandBatch, prost::DecodeError> {
    proto::CommandBatch::decode(data.data.clone())
}

pub fn encode_entry(commands: Vec<proto::Command>) -> Vec<u8> {
    proto::CommandBatch { commands }.encode_to_vec()
}

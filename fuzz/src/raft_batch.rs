//! Store-to-store raft transport: what `RaftService::send` and `Store::deliver`
//! (engine/node/src/store.rs) decode from another store, and what the apply path
//! (`command::decode_entry`, engine/node/src/worker.rs) decodes from a committed entry.
//!
//! bytes → prost `RaftBatch` → each envelope's `message` parsed by rust-protobuf 2 as a
//! raft-rs `eraftpb::Message`, exactly as `deliver` does → each normal entry's data
//! decoded as a `CommandBatch`, exactly as `apply` does. The input is also decoded as
//! a bare `CommandBatch`, so the fuzzer reaches the command decoder without first
//! building the two layers around it.

use prost::Message as _;
use raft::eraftpb::{Entry, EntryType};
use rangekv_rpc::proto::{self, command::Op};

pub fn run(data: &[u8]) {
    if let Ok(batch) = proto::RaftBatch::decode(data) {
        deliver(&batch);
        crate::prost_round_trip(&batch);
    }
    if let Ok(commands) = proto::CommandBatch::decode(data) {
        apply(&commands);
        crate::prost_round_trip(&commands);
    }
}

/// What `Store::deliver` does with a batch, up to handing messages to raft-rs.
fn deliver(batch: &proto::RaftBatch) {
    for envelope in &batch.messages {
        let message = match <raft::eraftpb::Message as protobuf::Message>::parse_from_bytes(
            &envelope.message,
        ) {
            Ok(message) => message,
            // The node logs and drops it.
            Err(_) => continue,
        };
        // A follower appends these entries and, once committed, applies them.
        for entry in message.get_entries() {
            apply_entry(entry);
        }
        // What the node sends on re-encodes and parses back.
        let bytes =
            protobuf::Message::write_to_bytes(&message).expect("a parsed raft message re-encodes");
        <raft::eraftpb::Message as protobuf::Message>::parse_from_bytes(&bytes)
            .expect("a re-encoded raft message parses");
    }
    for heartbeat in batch
        .heartbeats
        .iter()
        .chain(&batch.heartbeat_responses)
        .chain(&batch.quiesce)
    {
        // The worker turns each into a raft-rs heartbeat message field by field.
        let message = raft::eraftpb::Message {
            from: heartbeat.from_peer,
            to: heartbeat.to_peer,
            term: heartbeat.term,
            commit: heartbeat.commit,
            context: heartbeat.context.clone(),
            ..Default::default()
        };
        std::hint::black_box(message);
    }
}

/// The apply path's decode of a committed entry (worker.rs `apply`).
fn apply_entry(entry: &Entry) {
    if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
        return;
    }
    // The node stops on an entry that does not decode (`Fatal::Unappliable`).
    if let Ok(commands) = proto::CommandBatch::decode(&entry.data[..]) {
        apply(&commands);
    }
}

/// Walks every command the way `command::apply_command` reads it.
fn apply(batch: &proto::CommandBatch) {
    for command in &batch.commands {
        match &command.op {
            None => {}
            Some(Op::CompactLog(compact)) => {
                std::hint::black_box((compact.index, compact.term));
            }
            Some(Op::Batch(request)) => {
                for mutation in &request.mutations {
                    let op = proto::mutation::Op::try_from(mutation.op);
                    let _ = std::hint::black_box((op, &mutation.key, &mutation.value));
                }
            }
            Some(Op::Cas(cas)) => {
                std::hint::black_box(cas);
            }
            Some(Op::DeleteRange(span)) => {
                std::hint::black_box(span.start_key[..] < span.end_key[..]);
            }
            Some(Op::OpenSession(open)) => {
                std::hint::black_box((open.session_high, open.session_low, open.floor));
            }
        }
        std::hint::black_box(&command.session);
    }
    std::hint::black_box((batch.proposed_at_ms, batch.session_ttl_ms));
}

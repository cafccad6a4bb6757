//! What reaches a store worker: requests and raft traffic on its bounded inbox
//! (`Inbound`), its own events on an unbounded control channel (`Control`). Their own
//! module, so that `store` (which sends them) and `worker` (which receives them) do
//! not import each other.

use prost::Message as _;
use rangekv_log::LogError;
use rangekv_raftstore::HeartbeatKind;
use rangekv_rpc::proto;
use rangekv_rpc::RangeDescriptor;
use rangekv_types::{RangeId, StoreId};
use tokio::sync::oneshot;

use crate::command::Responder;

pub(crate) type ReadResponder = oneshot::Sender<Result<(), proto::Error>>;

/// Requests and raft traffic; bounded (a full inbox answers `ServerBusy`).
pub(crate) enum Inbound {
    Raft {
        range: RangeId,
        message: raft::eraftpb::Message,
    },
    Heartbeats {
        heartbeats: Vec<proto::CoalescedHeartbeat>,
        kind: HeartbeatKind,
    },
    Write {
        range: RangeId,
        command: proto::Command,
        respond: Responder,
    },
    Read {
        range: RangeId,
        respond: ReadResponder,
    },
    /// Hand the leadership of `range` (led here) to peer `to_peer`.
    TransferLeader {
        range: RangeId,
        to_peer: u64,
        respond: tokio::sync::oneshot::Sender<Result<(), proto::Error>>,
    },
}

impl Inbound {
    /// Bytes of user data (entries, commands) the message carries.
    pub(crate) fn payload_bytes(&self) -> usize {
        match self {
            Inbound::Raft { message, .. } => message.entries.iter().map(|e| e.data.len()).sum(),
            Inbound::Write { command, .. } => command.encoded_len(),
            Inbound::Heartbeats { .. } | Inbound::Read { .. } | Inbound::TransferLeader { .. } => 0,
        }
    }
}

/// The worker's own events; unbounded, never dropped.
pub(crate) enum Control {
    Persisted {
        seq: u64,
        result: Result<(), LogError>,
    },
    CreateRanges(Vec<RangeDescriptor>),
    Unreachable(StoreId),
    /// A snapshot this store's leader of `range` sent to peer `to` left with the
    /// transport.
    SnapshotSent {
        range: RangeId,
        to: u64,
    },
    /// A log write outside the Ready flow (compaction) failed.
    LogFailed(LogError),
    Shutdown,
}

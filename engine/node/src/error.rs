//! The node crate's errors: what can stop a node from opening, registering or
//! connecting. (A running store's fatal errors are `rangekv_raftstore::Fatal`.)

use rangekv_types::{RangeId, StoreId};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{range} has no replica on {store}")]
    NoLocalReplica { range: RangeId, store: StoreId },
    #[error("descriptor of {range}: replica {peer} has the unknown role {role}")]
    UnknownRole {
        range: RangeId,
        peer: u64,
        role: i32,
    },
    #[error("descriptor of {range} in the state machine does not decode: {error}")]
    Descriptor {
        range: RangeId,
        error: prost::DecodeError,
    },
    #[error("client sessions of {range} in the state machine: {error}")]
    CorruptSession {
        range: RangeId,
        error: rangekv_raftstore::session::CorruptSession,
    },
    #[error("cannot reach PD at {endpoint}: {error}")]
    PlacementUnreachable {
        endpoint: String,
        error: tonic::transport::Error,
    },
    #[error("PD does not know {0}")]
    UnknownStore(StoreId),
    #[error("PD answered: {0}")]
    Placement(#[from] tonic::Status),
    #[error("connection: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("state machine: {0}")]
    State(#[from] rangekv_state::StateError),
    #[error("raft log: {0}")]
    Log(#[from] rangekv_log::LogError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("a start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

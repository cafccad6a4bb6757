//! rangekv's wire protocol: protobuf messages and tonic services generated from
//! `proto/rangekv.proto`, plus the edge checks every service applies to its input.
//!
//! Boundary: this crate knows messages and limits, not storage or raft. Raft messages
//! travel as opaque bytes (rust-protobuf 2 `eraftpb` is not a prost type).

pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("rangekv");
}

pub mod validate;

pub use proto::{Error as ErrorDetail, RangeDescriptor, RangeEpoch};

impl RangeDescriptor {
    /// Whether `key` lies in `[start_key, end_key)`; an empty `end_key` is +infinity.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        key >= &self.start_key[..] && (self.end_key.is_empty() || key < &self.end_key[..])
    }
}

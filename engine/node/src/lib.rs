//! A storage node: the multi-raft store driver, the raft transport, the gRPC services
//! and the node lifecycle.
//!
//! - [`store`]: ranges sharded over a fixed pool of worker threads (`worker`); routing
//!   of requests and raft messages to them.
//! - `worker`: the runtime of one worker thread around the replication core's
//!   `Driver` (`rangekv-raftstore`): channels, clock, and the I/O the core asks for —
//!   log writes, the transport, the RocksDB apply batch, responders.
//! - `message`: what reaches a worker (its inbox and control channel); `shared`:
//!   what a store's threads share (config, `RangeInfo`, `StoreShared`).
//! - [`storage`]: the log engine as the core reads it (`LogRead`).
//! - [`error`]: the crate's error type, [`NodeError`].
//! - [`command`]: client writes as raft commands; their checks and their apply.
//! - [`transport`]: batched store-to-store gRPC streams, coalesced heartbeats.
//! - [`service`]: the `Kv` and `Raft` gRPC services.
//! - [`node`]: open, register with PD, serve, report, stop.
//!
//! Boundary: talks to PD only through `rangekv-rpc`; the raft protocol (Ready
//! handling, proposals, apply, compaction, quiescence) is `rangekv-raftstore`'s, and
//! this crate only supplies its I/O.

pub mod command;
pub mod error;
mod logger;
mod message;
pub mod node;
pub mod service;
mod shared;
pub mod storage;
pub mod store;
pub mod transport;
mod worker;

pub use error::NodeError;
pub use node::{start, Node, NodeConfig};
pub use store::{co_located_workers, Store, StoreConfig};

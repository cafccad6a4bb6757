//! A storage node: the multi-raft store driver, the raft transport, the gRPC services
//! and the node lifecycle.
//!
//! - [`store`]: ranges sharded over a fixed pool of worker threads (`worker`); routing
//!   of requests and raft messages to them.
//! - `worker`: the driver loop — inbox, ticks, one entry per range per loop, one log
//!   write per loop for every range, send, apply in one RocksDB batch, answer.
//! - [`storage`]: `raft::Storage` over the shared log plus not-yet-durable entries.
//! - [`command`]: client writes as raft commands; their checks and their apply.
//! - [`transport`]: batched store-to-store gRPC streams, coalesced heartbeats.
//! - [`service`]: the `Kv` and `Raft` gRPC services.
//! - [`node`]: open, register with PD, serve, report, stop.
//!
//! Boundary: talks to PD only through `rangekv-rpc`; the replica logic without I/O is
//! `rangekv-raftstore`.

pub mod command;
mod logger;
pub mod node;
pub mod service;
pub mod storage;
pub mod store;
pub mod transport;
mod worker;

pub use node::{start, Node, NodeConfig};
pub use store::{co_located_workers, Store, StoreConfig};

//! The placement driver (PD): cluster metadata, ID allocation, bootstrap and routing
//! lookups, served over gRPC as the `Placement` service.
//!
//! - [`meta`]: the durable metadata on RocksDB (stores, descriptors, id ceiling).
//! - [`cluster`]: the in-memory view and its rules (epochs, leaders, liveness);
//!   time arrives as arguments.
//! - [`bootstrap`]: the initial ranges and YCSB split keys.
//! - [`service`], [`server`]: the gRPC service and its entry points.
//! - [`routing`]: the ordered span map behind key lookups.
//!
//! Boundary: PD never links the storage engine; stores talk to it through
//! `rangekv-rpc`. Not built yet: the scheduler (operators) and PD's own replication —
//! one PD process holds the metadata.

pub mod bootstrap;
pub mod cluster;
pub mod meta;
pub mod routing;
pub mod server;
pub mod service;

pub use bootstrap::{ycsb_split_keys, SplitKeys};
pub use cluster::{Cluster, ClusterConfig, PdError};
pub use server::{serve, spawn, PdArgs, PdConfig, PdHandle};
pub use service::PlacementService;

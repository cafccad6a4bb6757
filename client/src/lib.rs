//! rangekv's async Rust client: range cache, leader cache, retries with backoff,
//! cross-range scans, batching. It lands with the client issue; until then it only
//! re-exports the wire types.

pub use rangekv_rpc::proto;

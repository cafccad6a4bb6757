//! rangekv's benchmarks. Each is a program that prints throughput and hdrhistogram
//! percentiles with its configuration and the git commit, as text and JSON; a tiny
//! configuration of each runs under `cargo test` so it cannot rot.
//!
//! Benchmarks are binaries' code: `unwrap` and `anyhow` are fine here.

pub mod failover;
pub mod log;
pub mod report;
pub mod ycsb;

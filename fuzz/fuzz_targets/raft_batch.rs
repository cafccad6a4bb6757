#![no_main]
//! See `rangekv_fuzz::raft_batch` (fuzz/src/raft_batch.rs) for what this target exercises.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rangekv_fuzz::raft_batch::run(data));

#![no_main]
//! See `rangekv_fuzz::log_replay` (fuzz/src/log_replay.rs) for what this target exercises.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rangekv_fuzz::log_replay::run(data));

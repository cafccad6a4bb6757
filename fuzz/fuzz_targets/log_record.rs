#![no_main]
//! See `rangekv_fuzz::log_record` (fuzz/src/log_record.rs) for what this target exercises.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rangekv_fuzz::log_record::run(data));

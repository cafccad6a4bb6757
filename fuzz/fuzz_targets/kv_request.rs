#![no_main]
//! See `rangekv_fuzz::kv_request` (fuzz/src/kv_request.rs) for what this target exercises.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rangekv_fuzz::kv_request::run(data));

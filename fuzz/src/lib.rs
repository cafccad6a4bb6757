//! The fuzz harnesses of rangekv, one module per target.
//!
//! Each `run(data)` feeds untrusted bytes to the project's real decoders, the way the
//! node does, and panics only on a bug: a decoder that panics, or a decoded value that
//! breaks an invariant its consumers rely on. The fuzz targets in `fuzz_targets/` are
//! one-line wrappers, and `tests/replay.rs` runs every seed and every saved regression
//! through the same functions on stable (`cargo test`), so a crash stays fixed.

pub mod kv_request;
pub mod log_record;
pub mod log_replay;
pub mod raft_batch;
pub mod seeds;

/// Asserts that a prost message survives encode → decode unchanged.
pub(crate) fn prost_round_trip<M: prost::Message + Default + PartialEq + std::fmt::Debug>(
    message: &M,
) {
    let bytes = message.encode_to_vec();
    assert_eq!(bytes.len(), message.encoded_len(), "encoded_len lies");
    let again = M::decode(&bytes[..]).expect("a message prost encoded must decode");
    assert_eq!(&again, message, "prost round trip changed the message");
}

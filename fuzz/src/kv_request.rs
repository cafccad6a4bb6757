//! Client requests of the `Kv` service: the bytes tonic hands prost for each RPC,
//! decoded as every request type, then put through the edge checks `KvService`
//! (engine/node/src/service.rs) applies to that type before anything reaches raft,
//! in the same order. `BatchCommandsRequest` runs each of its requests through the
//! check of the unary call it stands for, as `KvService::run_command` does.
//!
//! Nothing here may panic, and a request the checks accept must stay within the limits
//! the rest of the node assumes (asserted below).

use prost::Message;
use rangekv_rpc::proto;
use rangekv_rpc::validate::{self, Invalid};
use rangekv_types::limits;

pub fn run(data: &[u8]) {
    decode_and_check::<proto::GetRequest>(data, get);
    decode_and_check::<proto::PutRequest>(data, put);
    decode_and_check::<proto::DeleteRequest>(data, delete);
    decode_and_check::<proto::ScanRequest>(data, scan);
    decode_and_check::<proto::BatchGetRequest>(data, batch_get);
    decode_and_check::<proto::BatchPutRequest>(data, batch_put);
    decode_and_check::<proto::CompareAndSwapRequest>(data, compare_and_swap);
    decode_and_check::<proto::DeleteRangeRequest>(data, delete_range);
    decode_and_check::<proto::BatchCommandsRequest>(data, batch_commands);
}

fn decode_and_check<M: Message + Default + PartialEq + std::fmt::Debug>(
    data: &[u8],
    check: fn(&M) -> Result<(), String>,
) {
    if let Ok(request) = M::decode(data) {
        let _ = check(&request);
        crate::prost_round_trip(&request);
    }
}

fn refused(invalid: Invalid) -> String {
    // The conversions the service makes; neither may panic.
    let detail: proto::Error = invalid.clone().into();
    std::hint::black_box(detail);
    invalid.to_string()
}

/// `KvService::check_size` with the node's default `request_bytes_max`.
fn check_size(request: &impl Message) -> Result<(), String> {
    let bytes = request.encoded_len();
    if bytes > limits::REQUEST_BYTES_MAX {
        return Err(format!("request has {bytes} bytes"));
    }
    Ok(())
}

fn key(key: &[u8]) -> Result<(), String> {
    validate::key(key).map_err(refused)?;
    assert!(!key.is_empty() && key.len() <= limits::KEY_BYTES_MAX);
    Ok(())
}

fn value(value: &[u8]) -> Result<(), String> {
    validate::value(value).map_err(refused)?;
    assert!(value.len() <= limits::VALUE_BYTES_MAX);
    Ok(())
}

fn span(start: &[u8], end: &[u8]) -> Result<(), String> {
    validate::span(start, end).map_err(refused)?;
    assert!(end.is_empty() || start < end, "accepted span is ordered");
    Ok(())
}

fn batch_len(len: usize) -> Result<(), String> {
    validate::batch_len(len).map_err(refused)?;
    assert!(len <= limits::BATCH_KEYS_MAX);
    Ok(())
}

fn get(request: &proto::GetRequest) -> Result<(), String> {
    check_size(request)?;
    key(&request.key)
}

fn put(request: &proto::PutRequest) -> Result<(), String> {
    check_size(request)?;
    key(&request.key)?;
    value(&request.value)
}

fn delete(request: &proto::DeleteRequest) -> Result<(), String> {
    check_size(request)?;
    key(&request.key)
}

fn scan(request: &proto::ScanRequest) -> Result<(), String> {
    check_size(request)?;
    span(&request.start_key, &request.end_key)?;
    // The scan limit check is inline in `KvService::scan`.
    match request.limit {
        n if n as usize > limits::BATCH_KEYS_MAX => Err(format!("scan limit {n} is too large")),
        _ => Ok(()),
    }
}

fn batch_get(request: &proto::BatchGetRequest) -> Result<(), String> {
    check_size(request)?;
    batch_len(request.keys.len())?;
    for k in &request.keys {
        key(k)?;
    }
    Ok(())
}

fn batch_put(request: &proto::BatchPutRequest) -> Result<(), String> {
    check_size(request)?;
    batch_len(request.mutations.len())?;
    for mutation in &request.mutations {
        key(&mutation.key)?;
        value(&mutation.value)?;
        if proto::mutation::Op::try_from(mutation.op).is_err() {
            return Err(format!("unknown mutation op {}", mutation.op));
        }
    }
    Ok(())
}

fn compare_and_swap(request: &proto::CompareAndSwapRequest) -> Result<(), String> {
    check_size(request)?;
    key(&request.key)?;
    value(&request.expected_value)?;
    value(&request.new_value)
}

fn delete_range(request: &proto::DeleteRangeRequest) -> Result<(), String> {
    check_size(request)?;
    span(&request.start_key, &request.end_key)
}

fn batch_commands(batch: &proto::BatchCommandsRequest) -> Result<(), String> {
    use proto::batch_commands_request::request::Cmd;
    for request in &batch.requests {
        let _ = match &request.cmd {
            None => Err("batch command without a request".to_string()),
            Some(Cmd::Get(r)) => get(r),
            Some(Cmd::Put(r)) => put(r),
            Some(Cmd::Delete(r)) => delete(r),
            Some(Cmd::Scan(r)) => scan(r),
            Some(Cmd::BatchGet(r)) => batch_get(r),
            Some(Cmd::BatchPut(r)) => batch_put(r),
            Some(Cmd::Cas(r)) => compare_and_swap(r),
            Some(Cmd::DeleteRange(r)) => delete_range(r),
            Some(Cmd::OpenSession(r)) => check_size(r),
        };
    }
    Ok(())
}

//! Valid inputs for every target, built with the project's own encoders (the log
//! seeds are written by the log engine itself). `examples/gen_seeds.rs` writes them to
//! `seeds/<target>/`; `tests/replay.rs` checks they still decode.

use std::sync::Arc;

use prost::Message as _;
use raft::eraftpb::{Entry, EntryType, HardState, MessageType};
use rangekv_log::file::FileSystem;
use rangekv_log::format::{self, Parsed, SEGMENT_HEADER_BYTES};
use rangekv_log::sim::SimFileSystem;
use rangekv_log::{LogBatch, LogConfig, LogEngine};
use rangekv_rpc::proto::{self, batch_commands_request::request::Cmd, command::Op};
use rangekv_types::RangeId;

use crate::{log_record, log_replay};

pub struct Seed {
    pub target: &'static str,
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    seeds.extend(raft_batch());
    seeds.extend(kv_request());
    seeds.extend(log_record());
    seeds.extend(log_replay());
    seeds
}

fn seed(target: &'static str, name: &'static str, bytes: Vec<u8>) -> Seed {
    Seed {
        target,
        name,
        bytes,
    }
}

fn header(range_id: u64) -> Option<proto::RequestHeader> {
    Some(proto::RequestHeader {
        range_id,
        epoch: Some(proto::RangeEpoch {
            conf_ver: 1,
            version: 2,
        }),
        stale_read: false,
        session: None,
    })
}

fn commands() -> proto::CommandBatch {
    let epoch = Some(proto::RangeEpoch {
        conf_ver: 1,
        version: 2,
    });
    let ops = vec![
        Op::Batch(proto::BatchPutRequest {
            header: None,
            mutations: vec![
                proto::Mutation {
                    op: proto::mutation::Op::Put as i32,
                    key: b"k1".to_vec().into(),
                    value: b"v1".to_vec().into(),
                },
                proto::Mutation {
                    op: proto::mutation::Op::Delete as i32,
                    key: b"k2".to_vec().into(),
                    value: Default::default(),
                },
            ],
        }),
        Op::Cas(proto::CompareAndSwapRequest {
            header: None,
            key: b"k".to_vec().into(),
            expected_absent: false,
            expected_value: b"old".to_vec().into(),
            new_value: b"new".to_vec().into(),
            delete: false,
        }),
        Op::DeleteRange(proto::DeleteRangeRequest {
            header: None,
            start_key: b"a".to_vec().into(),
            end_key: b"m".to_vec().into(),
        }),
        Op::CompactLog(proto::CompactLog { index: 10, term: 2 }),
    ];
    proto::CommandBatch {
        commands: ops
            .into_iter()
            .map(|op| proto::Command {
                epoch,
                op: Some(op),
                session: Some(proto::SessionRef {
                    session_high: 1,
                    session_low: 2,
                    sequence: 3,
                    acked_below: 1,
                    opened_at: 7,
                }),
            })
            .collect(),
        proposed_at_ms: 1_700_000_000_000,
        session_ttl_ms: 600_000,
    }
}

fn raft_message(msg_type: MessageType, entries: Vec<Entry>) -> Vec<u8> {
    let mut message = raft::eraftpb::Message {
        msg_type,
        from: 1,
        to: 2,
        term: 3,
        log_term: 3,
        index: 9,
        commit: 9,
        ..Default::default()
    };
    message.set_entries(entries.into());
    protobuf::Message::write_to_bytes(&message).expect("raft message encodes")
}

fn raft_batch() -> Vec<Seed> {
    let entries = vec![
        Entry {
            index: 10,
            term: 3,
            data: commands().encode_to_vec().into(),
            ..Default::default()
        },
        Entry {
            index: 11,
            term: 3,
            ..Default::default()
        },
        {
            let mut conf = Entry {
                index: 12,
                term: 3,
                data: b"\x08\x01".to_vec().into(),
                ..Default::default()
            };
            conf.set_entry_type(EntryType::EntryConfChange);
            conf
        },
    ];
    let heartbeat = |range_id| proto::CoalescedHeartbeat {
        range_id,
        from_peer: 1,
        to_peer: 2,
        term: 3,
        commit: 9,
        context: Default::default(),
    };
    let append = proto::RaftBatch {
        from_store: 1,
        to_store: 2,
        messages: vec![
            proto::RaftEnvelope {
                range_id: 7,
                message: raft_message(MessageType::MsgAppend, entries).into(),
            },
            proto::RaftEnvelope {
                range_id: 8,
                message: raft_message(MessageType::MsgRequestVote, Vec::new()).into(),
            },
        ],
        heartbeats: vec![heartbeat(1)],
        heartbeat_responses: vec![heartbeat(2)],
        quiesce: vec![proto::CoalescedHeartbeat {
            context: b"read-index".to_vec().into(),
            ..heartbeat(3)
        }],
        tick: true,
    };
    let tick = proto::RaftBatch {
        from_store: 1,
        to_store: 2,
        tick: true,
        ..Default::default()
    };
    vec![
        seed(
            "raft_batch",
            "append-vote-heartbeats",
            append.encode_to_vec(),
        ),
        seed("raft_batch", "tick", tick.encode_to_vec()),
        seed("raft_batch", "command-batch", commands().encode_to_vec()),
    ]
}

fn kv_request() -> Vec<Seed> {
    let get = proto::GetRequest {
        header: header(1),
        key: b"key".to_vec().into(),
    };
    let put = proto::PutRequest {
        header: header(1),
        key: b"key".to_vec().into(),
        value: b"value".to_vec().into(),
    };
    let delete = proto::DeleteRequest {
        header: header(1),
        key: b"key".to_vec().into(),
    };
    let scan = proto::ScanRequest {
        header: header(1),
        start_key: b"a".to_vec().into(),
        end_key: b"z".to_vec().into(),
        limit: 100,
        keys_only: true,
    };
    let batch_get = proto::BatchGetRequest {
        header: header(1),
        keys: vec![b"a".to_vec().into(), b"b".to_vec().into()],
    };
    let batch_put = proto::BatchPutRequest {
        header: header(1),
        mutations: vec![
            proto::Mutation {
                op: proto::mutation::Op::Put as i32,
                key: b"a".to_vec().into(),
                value: b"1".to_vec().into(),
            },
            proto::Mutation {
                op: proto::mutation::Op::Delete as i32,
                key: b"b".to_vec().into(),
                value: Default::default(),
            },
        ],
    };
    let cas = proto::CompareAndSwapRequest {
        header: header(1),
        key: b"key".to_vec().into(),
        expected_absent: true,
        expected_value: Default::default(),
        new_value: b"new".to_vec().into(),
        delete: false,
    };
    let delete_range = proto::DeleteRangeRequest {
        header: header(1),
        start_key: b"a".to_vec().into(),
        end_key: Default::default(),
    };
    let cmds = vec![
        Cmd::Get(get.clone()),
        Cmd::Put(put.clone()),
        Cmd::Delete(delete.clone()),
        Cmd::Scan(scan.clone()),
        Cmd::BatchGet(batch_get.clone()),
        Cmd::BatchPut(batch_put.clone()),
        Cmd::Cas(cas.clone()),
        Cmd::DeleteRange(delete_range.clone()),
    ];
    let batch = proto::BatchCommandsRequest {
        requests: cmds
            .into_iter()
            .enumerate()
            .map(|(id, cmd)| proto::batch_commands_request::Request {
                id: id as u64,
                cmd: Some(cmd),
            })
            .collect(),
    };
    vec![
        seed("kv_request", "get", get.encode_to_vec()),
        seed("kv_request", "put", put.encode_to_vec()),
        seed("kv_request", "delete", delete.encode_to_vec()),
        seed("kv_request", "scan", scan.encode_to_vec()),
        seed("kv_request", "batch-get", batch_get.encode_to_vec()),
        seed("kv_request", "batch-put", batch_put.encode_to_vec()),
        seed("kv_request", "cas", cas.encode_to_vec()),
        seed("kv_request", "delete-range", delete_range.encode_to_vec()),
        seed("kv_request", "batch-commands", batch.encode_to_vec()),
    ]
}

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

fn log_record() -> Vec<Seed> {
    // Every record kind, encoded by format.rs.
    let mut segment = format::encode_segment_header(1).to_vec();
    let mut conf = entry(3, 1, b"conf");
    conf.set_entry_type(EntryType::EntryConfChange);
    conf.context = b"ctx".to_vec().into();
    format::encode_entries(
        &mut segment,
        RangeId(1),
        &[entry(1, 1, b"one"), entry(2, 1, b""), conf],
    );
    format::encode_hard_state(
        &mut segment,
        RangeId(1),
        &HardState {
            term: 1,
            vote: 2,
            commit: 3,
            ..Default::default()
        },
    );
    format::encode_compaction_point(&mut segment, RangeId(1), 2, 1);
    format::encode_range_removal(&mut segment, RangeId(2));
    let header = SEGMENT_HEADER_BYTES as usize;
    format::sign_records(&mut segment[header..], format::record_signature(1));
    let with_flags = |flags: u8, segment: &[u8]| {
        let mut bytes = vec![flags];
        bytes.extend_from_slice(segment);
        bytes
    };
    let engine = engine_segments(LogConfig {
        segment_bytes: 64 * 1024,
        ..log_replay::config()
    })
    .0;
    vec![
        seed("log_record", "every-kind", with_flags(0, &segment)),
        seed(
            "log_record",
            "every-kind-fix-crc",
            with_flags(log_record::FIX_CHECKSUMS, &segment),
        ),
        seed("log_record", "engine-segment", with_flags(0, &engine[0])),
        seed(
            "log_record",
            "engine-segment-fix-crc",
            with_flags(log_record::FIX_CHECKSUMS, &engine[0]),
        ),
    ]
}

/// Runs the engine over a simulated file system: two ranges appended in several
/// groups, hard states, a compaction, a removed range; GC when the segments roll.
/// Returns the segments left (each cut where its records end) and the first's sequence.
pub fn engine_segments(config: LogConfig) -> (Vec<Vec<u8>>, u64) {
    let fs = SimFileSystem::new();
    {
        let engine = LogEngine::open(Arc::new(fs.clone()), config).expect("open a new log");
        let (a, b, gone) = (RangeId(1), RangeId(2), RangeId(3));
        let mut index = 1;
        for round in 0..8u64 {
            let mut batch = LogBatch::new();
            let data = vec![round as u8; 300];
            batch.append(
                a,
                (index..index + 4)
                    .map(|i| entry(i, 1 + round / 2, &data))
                    .collect(),
            );
            batch.append(b, vec![entry(round + 1, 1, b"b")]);
            batch.set_hard_state(
                a,
                HardState {
                    term: 1 + round / 2,
                    vote: 1,
                    commit: index,
                    ..Default::default()
                },
            );
            if round == 1 {
                batch.append(gone, vec![entry(1, 1, b"gone")]);
            }
            if round == 2 {
                batch.remove_range(gone);
            }
            engine.write_sync(batch).expect("write");
            index += 4;
        }
        engine.compact(a, 17).expect("compact");
        engine.compact(b, 9).expect("compact");
        engine.collect_garbage();
    }
    let mut names = fs.list().expect("list");
    names.sort();
    let mut segments = Vec::new();
    let mut first = None;
    for name in names {
        let Some(sequence) = name
            .strip_suffix(".rlog")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        else {
            continue;
        };
        first.get_or_insert(sequence);
        let file = fs.open(&name).expect("open segment");
        let mut bytes = vec![0u8; file.len().expect("len") as usize];
        file.read_exact_at(&mut bytes, 0).expect("read segment");
        bytes.truncate(records_end(&bytes));
        segments.push(bytes);
    }
    (segments, first.unwrap_or(1))
}

/// Where a segment's records end.
fn records_end(segment: &[u8]) -> usize {
    let signature = format::decode_segment_header(segment).map_or(0, |h| h.signature());
    let mut at = SEGMENT_HEADER_BYTES as usize;
    while let Parsed::Record(_, next) = format::parse_record(segment, at, usize::MAX, signature) {
        at = next;
    }
    at.min(segment.len())
}

fn log_replay() -> Vec<Seed> {
    let input = |flags: u8, base: Option<u64>, segments: &[Vec<u8>]| {
        let mut bytes = vec![flags];
        if let Some(base) = base {
            bytes[0] |= log_replay::BASE_SEQUENCE;
            bytes.extend_from_slice(&base.to_le_bytes());
        }
        for (i, segment) in segments.iter().enumerate() {
            if i > 0 {
                bytes.extend_from_slice(log_replay::SEPARATOR);
            }
            bytes.extend_from_slice(segment);
        }
        bytes
    };
    // One segment holding everything.
    let (one, first) = engine_segments(log_replay::config());
    assert_eq!((one.len(), first), (1, 1), "one segment expected");
    // Small segments: the log rolls, and GC drops the oldest after the compaction.
    let (several, first) = engine_segments(LogConfig {
        segment_bytes: 5 * 1024,
        ..log_replay::config()
    });
    assert!(several.len() > 1, "the log rolled");
    let fix = log_replay::FIX_CHECKSUMS | log_replay::FIX_HEADERS;
    vec![
        seed("log_replay", "engine-one-segment", input(0, None, &one)),
        seed(
            "log_replay",
            "engine-one-segment-fix",
            input(fix, None, &one),
        ),
        seed(
            "log_replay",
            "engine-after-gc",
            input(0, Some(first), &several),
        ),
        seed(
            "log_replay",
            "engine-after-gc-fix",
            input(fix, Some(first), &several),
        ),
        seed("log_replay", "empty-log", input(0, None, &[])),
    ]
}

//! A real cluster in one process: PD and three nodes on loopback.

use rangekv_rpc::proto;
use rangekv_testkit::Cluster;
use rangekv_types::RangeId;

fn key(i: usize) -> Vec<u8> {
    format!("key{i:04}").into_bytes()
}

/// A CAS of `key` from `expected` (present) to `new`.
fn cas_request(
    header: proto::RequestHeader,
    key: Vec<u8>,
    expected: &[u8],
    new: &[u8],
) -> proto::CompareAndSwapRequest {
    proto::CompareAndSwapRequest {
        header: Some(header),
        key: key.into(),
        expected_absent: false,
        expected_value: expected.to_vec().into(),
        new_value: new.to_vec().into(),
        delete: false,
    }
}

fn splits() -> Vec<Vec<u8>> {
    vec![
        b"key0250".to_vec(),
        b"key0500".to_vec(),
        b"key0750".to_vec(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_and_serve_reads() {
    let cluster = Cluster::start(3, splits()).await;
    let ranges = cluster.ranges().await;
    assert_eq!(ranges.len(), 4);
    for i in (0..1000).step_by(37) {
        cluster.put(&key(i), format!("v{i}").as_bytes()).await;
    }
    for i in (0..1000).step_by(37) {
        assert_eq!(
            cluster.get(&key(i)).await,
            Some(format!("v{i}").into_bytes())
        );
        cluster
            .wait_replicated(&key(i), format!("v{i}").as_bytes())
            .await;
    }
    assert_eq!(cluster.get(b"absent").await, None);
    cluster.shutdown().await;
}

/// Every TCP connection a node accepted (clients and peer stores) has Nagle off. The
/// server is handed its listener as a stream, where tonic ignores the builder's
/// `tcp_nodelay`; with Nagle on, a small answer waited for the client's delayed ACK
/// (~40 ms: the p999 of every YCSB read until this was found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connections_have_nagle_off() {
    let cluster = Cluster::start(3, splits()).await;
    for i in 0..20 {
        cluster.put(&key(i), b"v").await;
        assert_eq!(cluster.get(&key(i)).await, Some(b"v".to_vec()));
    }
    let ports: Vec<u16> = cluster.running().map(|(_, n)| n.addr().port()).collect();
    let mut accepted = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: getsockname/getsockopt write at most the given lengths into live
        // locals; a descriptor that is not a socket (or closed since) just fails.
        let (port, listening, nodelay) = unsafe {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len) != 0
                || i32::from(addr.sin_family) != libc::AF_INET
            {
                continue;
            }
            let option = |level, name| {
                let mut value: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                let ok = libc::getsockopt(
                    fd,
                    level,
                    name,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                );
                (ok == 0).then_some(value)
            };
            let Some(listening) = option(libc::SOL_SOCKET, libc::SO_ACCEPTCONN) else {
                continue;
            };
            (
                u16::from_be(addr.sin_port),
                listening != 0,
                option(libc::IPPROTO_TCP, libc::TCP_NODELAY),
            )
        };
        if listening || !ports.contains(&port) {
            continue;
        }
        accepted += 1;
        assert_eq!(
            nodelay,
            Some(1),
            "connection accepted on port {port} has Nagle on"
        );
    }
    // The client's connections and the stores' raft streams to one another.
    assert!(accepted >= 3, "only {accepted} accepted connections found");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_new_leader_elected_and_writes_continue() {
    let mut cluster = Cluster::start(3, splits()).await;
    cluster.put(&key(1), b"before").await;
    let range = cluster.range_of(&key(1)).await;
    let leader = cluster.leader_of(RangeId(range.range_id)).unwrap();
    cluster.kill(leader).await;
    cluster.wait_for_leaders().await;
    let new_leader = cluster.leader_of(RangeId(range.range_id)).unwrap();
    assert_ne!(new_leader, leader);
    assert_eq!(cluster.get(&key(1)).await, Some(b"before".to_vec()));
    cluster.put(&key(1), b"after").await;
    cluster.put(&key(900), b"other range").await;
    assert_eq!(cluster.get(&key(1)).await, Some(b"after".to_vec()));
    // The old leader comes back as a follower and catches up.
    cluster.restart(leader).await;
    cluster.wait_replicated(&key(1), b"after").await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_every_node_keeps_acknowledged_writes() {
    let mut cluster = Cluster::start(3, splits()).await;
    for i in (0..1000).step_by(10) {
        cluster.put(&key(i), format!("v{i}").as_bytes()).await;
    }
    for i in 0..3 {
        cluster.kill(i).await;
    }
    for i in 0..3 {
        cluster.restart(i).await;
    }
    cluster.wait_for_leaders().await;
    for i in (0..1000).step_by(10) {
        assert_eq!(
            cluster.get(&key(i)).await,
            Some(format!("v{i}").into_bytes()),
            "key {i}"
        );
    }
    cluster.put(&key(3), b"new").await;
    assert_eq!(cluster.get(&key(3)).await, Some(b"new".to_vec()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_a_leader_change_see_the_latest_write() {
    let mut cluster = Cluster::start(3, splits()).await;
    let range = cluster.range_of(&key(7)).await;
    for round in 0..3 {
        let value = format!("round{round}");
        cluster.put(&key(7), value.as_bytes()).await;
        let leader = cluster.leader_of(RangeId(range.range_id)).unwrap();
        cluster.kill(leader).await;
        cluster.wait_for_leaders().await;
        // The new leader answers with the last acknowledged write, never an older one.
        assert_eq!(cluster.get(&key(7)).await, Some(value.into_bytes()));
        cluster.restart(leader).await;
    }
    cluster.shutdown().await;
}

/// Reads within the leader's lease are served on the gRPC thread, from the lease its
/// worker published; after the leader dies, the new leader's reads (local ones too)
/// still return the last acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_within_the_lease_are_served_locally_and_never_stale() {
    let mut cluster = Cluster::start(3, splits()).await;
    let range = RangeId(cluster.range_of(&key(7)).await.range_id);
    let local_reads = |cluster: &Cluster| -> u64 {
        cluster
            .running()
            .filter_map(|(_, node)| node.store().range(range))
            .map(|info| info.local_reads.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    };
    for round in 0..3 {
        let before = local_reads(&cluster);
        let mut value = String::new();
        // A write renews the lease; the reads right after it are local. Up to 50
        // tries, in case this machine stalls for longer than a lease in between.
        for attempt in 0..50 {
            value = format!("round{round}-{attempt}");
            cluster.put(&key(7), value.as_bytes()).await;
            assert_eq!(cluster.get(&key(7)).await, Some(value.clone().into_bytes()));
            if local_reads(&cluster) > before {
                break;
            }
        }
        assert!(
            local_reads(&cluster) > before,
            "round {round}: no read was served from the lease"
        );
        let leader = cluster.leader_of(range).unwrap();
        cluster.kill(leader).await;
        cluster.wait_for_leaders().await;
        for _ in 0..10 {
            assert_eq!(cluster.get(&key(7)).await, Some(value.clone().into_bytes()));
        }
        cluster.restart(leader).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_batch_scan_and_delete_range() {
    let cluster = Cluster::start(3, splits()).await;
    let range = cluster.range_of(&key(10)).await;
    // BatchPut is atomic within the range.
    let mutations: Vec<proto::Mutation> = (10..20)
        .map(|i| proto::Mutation {
            op: proto::mutation::Op::Put as i32,
            key: key(i).into(),
            value: format!("b{i}").into_bytes().into(),
        })
        .collect();
    cluster
        .on_leader(&key(10), |mut kv, header| {
            let mutations = mutations.clone();
            async move {
                let r = kv
                    .batch_put(proto::BatchPutRequest {
                        header: Some(header),
                        mutations,
                    })
                    .await?
                    .into_inner();
                Ok(((), r.error))
            }
        })
        .await;
    // CAS: succeeds on the right expectation only, and reports the previous value.
    let cas = |expected: &'static [u8], new: &'static [u8]| {
        move |mut kv: proto::kv_client::KvClient<tonic::transport::Channel>, header| async move {
            let r = kv
                .compare_and_swap(cas_request(header, key(10), expected, new))
                .await?
                .into_inner();
            Ok(((r.succeeded, r.previous_value.to_vec()), r.error))
        }
    };
    let (_, (ok, previous)) = cluster.on_leader(&key(10), cas(b"wrong", b"x")).await;
    assert!(!ok);
    assert_eq!(previous, b"b10");
    let (_, (ok, _)) = cluster.on_leader(&key(10), cas(b"b10", b"c10")).await;
    assert!(ok);
    assert_eq!(cluster.get(&key(10)).await, Some(b"c10".to_vec()));
    // Scan with a limit and resume key.
    let scan = |start: Vec<u8>| {
        move |mut kv: proto::kv_client::KvClient<tonic::transport::Channel>, header| {
            let start = start.clone();
            async move {
                let r = kv
                    .scan(proto::ScanRequest {
                        header: Some(header),
                        start_key: start.into(),
                        end_key: key(20).into(),
                        limit: 4,
                        keys_only: false,
                    })
                    .await?
                    .into_inner();
                Ok(((r.pairs, r.resume_key.to_vec()), r.error))
            }
        }
    };
    let mut seen = Vec::new();
    let mut start = key(10);
    loop {
        let (_, (pairs, resume)) = cluster.on_leader(&key(10), scan(start.clone())).await;
        seen.extend(pairs.into_iter().map(|p| p.key.to_vec()));
        if resume.is_empty() {
            break;
        }
        start = resume;
    }
    assert_eq!(seen, (10..20).map(key).collect::<Vec<_>>());
    // DeleteRange removes exactly [key12, key15).
    cluster
        .on_leader(&key(10), |mut kv, header| async move {
            let r = kv
                .delete_range(proto::DeleteRangeRequest {
                    header: Some(header),
                    start_key: key(12).into(),
                    end_key: key(15).into(),
                })
                .await?
                .into_inner();
            Ok(((), r.error))
        })
        .await;
    for i in 10..20 {
        let present = cluster.get(&key(i)).await.is_some();
        assert_eq!(present, !(12..15).contains(&i), "key {i}");
    }
    assert!(range.contains_key(&key(19)));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_whole_with_a_clear_error() {
    let cluster = Cluster::start(3, splits()).await;
    let range = cluster.range_of(&key(1)).await;
    let leader = cluster.leader_of(RangeId(range.range_id)).unwrap();
    let mut kv = cluster.kv(leader).await;
    let header = proto::RequestHeader {
        range_id: range.range_id,
        epoch: range.epoch,
        stale_read: false,
        session: None,
    };
    let status = kv
        .put(proto::PutRequest {
            header: Some(header),
            key: vec![b'k'; 9000].into(),
            value: b"v".to_vec().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("key_bytes_max=8192"),
        "{}",
        status.message()
    );
    // A batch with one bad key applies nothing.
    let status = kv
        .batch_put(proto::BatchPutRequest {
            header: Some(header),
            mutations: vec![
                proto::Mutation {
                    op: 0,
                    key: key(2).into(),
                    value: b"v".to_vec().into(),
                },
                proto::Mutation {
                    op: 0,
                    key: Vec::new().into(),
                    value: b"v".to_vec().into(),
                },
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(cluster.get(&key(2)).await, None);
    // Wrong epoch, key outside the range, unknown range: typed errors.
    let stale = proto::RequestHeader {
        epoch: Some(proto::RangeEpoch {
            conf_ver: 1,
            version: 99,
        }),
        ..header
    };
    let response = kv
        .put(proto::PutRequest {
            header: Some(stale),
            key: key(1).into(),
            value: b"v".to_vec().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        response.error.and_then(|e| e.kind),
        Some(proto::error::Kind::EpochNotMatch(e)) if e.current.len() == 1
    ));
    let response = kv
        .put(proto::PutRequest {
            header: Some(header),
            key: key(999).into(),
            value: b"v".to_vec().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        response.error.and_then(|e| e.kind),
        Some(proto::error::Kind::KeyNotInRange(_))
    ));
    let response = kv
        .get(proto::GetRequest {
            header: Some(proto::RequestHeader {
                range_id: 987_654,
                ..header
            }),
            key: key(1).into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        response.error.and_then(|e| e.kind),
        Some(proto::error::Kind::RangeNotFound(_))
    ));
    // No header at all.
    let status = kv
        .get(proto::GetRequest {
            header: None,
            key: key(1).into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    cluster.shutdown().await;
}

/// Per ordered store pair: (batches, tick batches) sent so far.
fn link_counts(cluster: &Cluster) -> Vec<(u64, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Vec::new();
    for (_, from) in cluster.running() {
        for (_, to) in cluster.running() {
            if from.store().store_id() == to.store().store_id() {
                continue;
            }
            let counters = from
                .transport()
                .counters(to.store().store_id())
                .expect("a link to every store");
            out.push((
                counters.batches.load(Relaxed),
                counters.tick_batches.load(Relaxed),
            ));
        }
    }
    out
}

fn heartbeats_received(cluster: &Cluster) -> u64 {
    cluster
        .running()
        .map(|(_, n)| {
            n.store()
                .counters()
                .heartbeats_in
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum()
}

fn many_splits(ranges: usize) -> Vec<Vec<u8>> {
    (1..ranges)
        .map(|i| format!("r{i:05}").into_bytes())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_1000_ranges_travel_in_one_batch_per_store_pair_per_tick() {
    let ranges = 1000;
    let cluster = Cluster::start_with(3, many_splits(ranges), |config| {
        config.store.quiesce = false;
        config.store.tick_interval = std::time::Duration::from_millis(100);
    })
    .await;
    // Elections and the first entries of every range cause appends; wait for them to end.
    let mut previous = link_counts(&cluster);
    cluster
        .wait_until("raft traffic settles to heartbeats", |c| {
            let now = link_counts(c);
            if now.iter().zip(&previous).any(|(n, p)| n.1 - p.1 < 2) {
                return false; // the window has not seen 2 ticks yet
            }
            let idle = now
                .iter()
                .zip(&previous)
                .all(|(n, p)| n.0 - p.0 == n.1 - p.1);
            previous = now;
            idle
        })
        .await;
    let before = link_counts(&cluster);
    let heartbeats_before = heartbeats_received(&cluster);
    let ticks = 20;
    cluster
        .wait_until("20 ticks pass", |c| {
            link_counts(c)
                .iter()
                .zip(&before)
                .all(|(n, b)| n.1 - b.1 >= ticks)
        })
        .await;
    let after = link_counts(&cluster);
    let heartbeats = heartbeats_received(&cluster) - heartbeats_before;
    for (a, b) in after.iter().zip(&before) {
        let (batches, tick_batches) = (a.0 - b.0, a.1 - b.1);
        assert_eq!(batches, tick_batches, "only tick batches while idle");
        assert!(
            tick_batches <= ticks + 3,
            "one batch per tick: {tick_batches} in ~{ticks} ticks"
        );
    }
    // Every leader heartbeats 2 followers every 2 ticks and each answers: about
    // 2 × ranges heartbeats and responses per tick, all inside those batches.
    assert!(
        heartbeats >= ranges as u64 * ticks,
        "{heartbeats} heartbeats in {ticks} ticks"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ranges_quiesce_wake_on_requests_and_survive_their_leader_store() {
    let ranges = 50;
    let mut cluster = Cluster::start_with(3, many_splits(ranges), |config| {
        config.store.quiesce_after_ticks = 5;
    })
    .await;
    let all_quiesced = |c: &Cluster| {
        c.running().all(|(_, n)| {
            n.store()
                .ranges()
                .iter()
                .all(|(_, info)| info.quiesced.load(std::sync::atomic::Ordering::Relaxed))
        })
    };
    cluster
        .wait_until("every replica quiesces", all_quiesced)
        .await;
    let before = heartbeats_received(&cluster);
    let links = link_counts(&cluster);
    cluster
        .wait_until("10 ticks pass", |c| {
            link_counts(c)
                .iter()
                .zip(&links)
                .all(|(n, b)| n.1 - b.1 >= 10)
        })
        .await;
    assert_eq!(
        heartbeats_received(&cluster),
        before,
        "quiesced ranges send no heartbeats"
    );
    // A request wakes its range.
    cluster.put(b"r00007x", b"awake").await;
    assert_eq!(cluster.get(b"r00007x").await, Some(b"awake".to_vec()));
    cluster
        .wait_until("the range quiesces again", all_quiesced)
        .await;
    // The store leading the most ranges dies: its quiesced followers notice the silence
    // of its store and elect new leaders.
    let leaders_on = |c: &Cluster, i: usize| {
        c.node(i)
            .store()
            .ranges()
            .iter()
            .filter(|(_, info)| info.is_leader())
            .count()
    };
    let victim = (0..3).max_by_key(|i| leaders_on(&cluster, *i)).unwrap();
    cluster.kill(victim).await;
    cluster.wait_for_leaders().await;
    cluster.put(b"r00007x", b"after").await;
    assert_eq!(cluster.get(b"r00007x").await, Some(b"after".to_vec()));
    cluster.shutdown().await;
}

/// The range of key `k`, a client of its leader, and a header for it.
async fn leader_of_k(
    cluster: &Cluster,
) -> (
    rangekv_rpc::RangeDescriptor,
    proto::kv_client::KvClient<tonic::transport::Channel>,
    proto::RequestHeader,
) {
    let range = cluster.range_of(b"k").await;
    let Some(leader) = cluster.leader_of(RangeId(range.range_id)) else {
        panic!("range {} has no leader", range.range_id);
    };
    let kv = cluster.kv(leader).await;
    let header = proto::RequestHeader {
        range_id: range.range_id,
        epoch: range.epoch,
        stale_read: false,
        session: None,
    };
    (range, kv, header)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_configured_size_is_refused_naming_the_limit() {
    let limit = 2 << 20;
    let cluster = Cluster::start_with(3, Vec::new(), |config| {
        config.request_bytes_max = limit;
    })
    .await;
    let (_, mut kv, header) = leader_of_k(&cluster).await;
    let big = |i: u8| proto::Mutation {
        op: 0,
        key: vec![b'k', i].into(),
        value: vec![i; 1 << 20].into(),
    };
    let status = kv
        .batch_put(proto::BatchPutRequest {
            header: Some(header),
            // Just over the limit (2 MiB of values plus framing), under tonic's own.
            mutations: vec![big(1), big(2)],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains(&format!("request_bytes_max={limit}")),
        "{}",
        status.message()
    );
    // Far above the limit, tonic itself refuses it before decoding.
    let status = kv
        .batch_put(proto::BatchPutRequest {
            header: Some(header),
            mutations: (1..=5).map(big).collect(),
        })
        .await
        .unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);
    assert_eq!(
        cluster.get(&[b'k', 1]).await,
        None,
        "nothing of either applied"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_log_is_compacted_on_every_replica_and_restart_still_has_everything() {
    let mut cluster = Cluster::start_with(3, splits(), |config| {
        config.store.log_gc_entries = 50;
        // Keep the range awake: only the entry-count rule compacts here.
        config.store.quiesce = false;
    })
    .await;
    let range = RangeId(cluster.range_of(&key(1)).await.range_id);
    for i in 0..200 {
        cluster.put(&key(1), format!("v{i}").as_bytes()).await;
    }
    cluster
        .wait_until("every replica drops at least 100 entries", |c| {
            c.running()
                .all(|(_, n)| n.store().log().first_index(range) > 100)
        })
        .await;
    for i in 0..3 {
        cluster.kill(i).await;
    }
    for i in 0..3 {
        cluster.restart(i).await;
    }
    cluster.wait_for_leaders().await;
    assert_eq!(cluster.get(&key(1)).await, Some(b"v199".to_vec()));
    cluster.put(&key(1), b"after").await;
    cluster.wait_replicated(&key(1), b"after").await;
    cluster.shutdown().await;
}

/// A follower down while its leader compacts the log past it catches up by snapshot
/// when it comes back (the log no longer holds what it lacks), keeps the snapshot
/// across its own restart, and goes on replicating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    let mut cluster = Cluster::start_with(3, splits(), |config| {
        config.store.log_gc_entries = 20;
        config.store.log_gc_lag_entries = 30;
        config.store.quiesce = false;
    })
    .await;
    let range = RangeId(cluster.range_of(&key(1)).await.range_id);
    cluster.put(&key(1), b"before").await;
    cluster.wait_replicated(&key(1), b"before").await;
    let leader = cluster.leader_of(range).unwrap();
    let follower = (0..3).find(|i| *i != leader).unwrap();
    cluster.kill(follower).await;
    for i in 0..200 {
        cluster.put(&key(1), format!("v{i}").as_bytes()).await;
    }
    cluster
        .wait_until("the running replicas drop at least 100 entries", |c| {
            c.running()
                .all(|(_, n)| n.store().log().first_index(range) > 100)
        })
        .await;
    cluster.restart(follower).await;
    let behind = cluster.node(follower).store().log().last_index(range);
    assert!(
        behind < 100,
        "n{follower} restarted with its log at {behind}"
    );
    cluster
        .wait_until("the follower installs a snapshot", |c| {
            c.node(follower)
                .store()
                .counters()
                .snapshots_installed
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        })
        .await;
    cluster.wait_replicated(&key(1), b"v199").await;
    cluster.kill(follower).await;
    cluster.restart(follower).await;
    cluster.wait_replicated(&key(1), b"v199").await;
    cluster.put(&key(1), b"after").await;
    cluster.wait_replicated(&key(1), b"after").await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_going_idle_drops_its_applied_log() {
    // Applies skip RocksDB's WAL: the log keeps what the state machine has not flushed,
    // and an idle store asks for the flush after `log_gc_flush_after`.
    let cluster = Cluster::start_with(3, splits(), |config| {
        config.store.quiesce_after_ticks = 5;
        config.store.log_gc_flush_after = std::time::Duration::from_millis(300);
    })
    .await;
    let range = RangeId(cluster.range_of(&key(1)).await.range_id);
    for i in 0..20 {
        cluster.put(&key(1), format!("v{i}").as_bytes()).await;
    }
    cluster
        .wait_until(
            "the idle range's log is empty but for its last entries",
            |c| {
                c.running().all(|(_, n)| {
                    let log = n.store().log();
                    log.last_index(range) + 1 - log.first_index(range) <= 2
                })
            },
        )
        .await;
    // Nothing a crash would take from the state machine is gone from the log.
    for (_, node) in cluster.running() {
        let store = node.store();
        let flushed = store.state().durable_apply_state(range).unwrap();
        assert!(
            store.log().first_index(range) <= flushed.applied_index + 1,
            "log starts at {} but only {} is flushed",
            store.log().first_index(range),
            flushed.applied_index
        );
    }
    assert_eq!(cluster.get(&key(1)).await, Some(b"v19".to_vec()));
    cluster.shutdown().await;
}

/// A compaction that waits for the state machine's flush must not make the leader
/// propose another one every tick (the log's first index does not move meanwhile):
/// the range still goes quiet, and its log holds the writes and a few compactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_whose_compaction_waits_for_a_flush_still_goes_quiet() {
    let cluster = Cluster::start_with(3, splits(), |config| {
        config.store.quiesce_after_ticks = 5;
        config.store.log_gc_flush_after = std::time::Duration::from_secs(3600);
    })
    .await;
    let range = RangeId(cluster.range_of(&key(1)).await.range_id);
    let start = cluster
        .running()
        .map(|(_, n)| n.store().log().last_index(range))
        .max()
        .unwrap_or(0);
    for i in 0..20 {
        cluster.put(&key(1), format!("v{i}").as_bytes()).await;
    }
    cluster
        .wait_until("every replica of the range quiesces", |c| {
            c.running().all(|(_, n)| {
                n.store()
                    .range(range)
                    .is_some_and(|info| info.quiesced.load(std::sync::atomic::Ordering::Relaxed))
            })
        })
        .await;
    for (_, node) in cluster.running() {
        let last = node.store().log().last_index(range);
        assert!(
            last <= start + 20 + 4,
            "{} entries after 20 writes",
            last - start
        );
    }
    assert_eq!(cluster.get(&key(1)).await, Some(b"v19".to_vec()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_writes_in_one_loop_are_split_over_several_log_writes() {
    // Segments of 8 MiB: one log write takes at most that. 24 concurrent 1 MiB puts
    // arrive in one loop; written as one batch they would stop the store.
    let cluster = Cluster::start_with(3, Vec::new(), |config| {
        config.log.segment_bytes = 8 << 20;
    })
    .await;
    let puts = (0..24).map(|i| {
        let key = key(i);
        let cluster = &cluster;
        async move { cluster.put(&key, &vec![i as u8; 1 << 20]).await }
    });
    futures_util::future::join_all(puts).await;
    for i in 0..24 {
        assert_eq!(cluster.get(&key(i)).await, Some(vec![i as u8; 1 << 20]));
    }
    assert!(cluster.running().all(|(_, n)| !n.store().is_stopped()));
    cluster.shutdown().await;
}

/// Puts on a batch-commands stream are proposed on the stream's task and answered by
/// the worker straight onto the stream. Every request gets exactly one answer, under
/// its id: applied ones are readable, in-band errors and invalid requests come back as
/// the unary calls return them, and a write refused at the worker's full inbox is
/// answered `RESOURCE_EXHAUSTED` (never "outcome unknown") and is not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_writes_are_answered_once_each_and_refusals_are_not_applied() {
    use proto::batch_commands_request::{request::Cmd as Req, Request as Item};
    use proto::batch_commands_response::response::Cmd as Resp;
    let cluster = Cluster::start_with(3, Vec::new(), |config| {
        config.store.inbox_messages_max = 8;
    })
    .await;
    cluster.wait_for_leaders().await;
    let (range, mut kv, header) = leader_of_k(&cluster).await;
    let stale = proto::RequestHeader {
        epoch: Some(proto::RangeEpoch {
            version: range.epoch.unwrap_or_default().version + 1,
            ..range.epoch.unwrap_or_default()
        }),
        ..header
    };
    let put = |header: proto::RequestHeader, key: Vec<u8>| {
        Req::Put(proto::PutRequest {
            header: Some(header),
            key: key.into(),
            value: b"v".to_vec().into(),
        })
    };
    let burst = 2000u64;
    let mut requests: Vec<Item> = (0..burst)
        .map(|id| Item {
            id,
            cmd: Some(put(header, key(id as usize))),
        })
        .collect();
    requests.push(Item {
        id: burst,
        cmd: Some(put(stale, b"stale".to_vec())),
    });
    requests.push(Item {
        id: burst + 1,
        cmd: Some(Req::Delete(proto::DeleteRequest {
            header: Some(header),
            key: vec![b'k'; 9000].into(),
        })),
    });
    let (send, outgoing) = tokio::sync::mpsc::channel(1);
    send.send(proto::BatchCommandsRequest { requests })
        .await
        .unwrap();
    let mut answers = kv
        .batch_commands(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .unwrap()
        .into_inner();
    let mut got = std::collections::BTreeMap::new();
    while got.len() < burst as usize + 2 {
        let message = answers
            .message()
            .await
            .unwrap()
            .expect("the stream stays open");
        for response in message.responses {
            let id = response.id;
            assert!(
                got.insert(id, response).is_none(),
                "request {id} answered twice"
            );
        }
    }
    let (mut applied, mut busy) = (Vec::new(), Vec::new());
    for id in 0..burst {
        let response = &got[&id];
        match (&response.cmd, response.status_code) {
            (Some(Resp::Put(proto::PutResponse { error: None })), 0) => applied.push(id),
            (None, code) if code == tonic::Code::ResourceExhausted as i32 => busy.push(id),
            other => panic!(
                "request {id}: unexpected answer {other:?} {}",
                response.status_message
            ),
        }
    }
    assert!(
        !applied.is_empty() && !busy.is_empty(),
        "{} applied, {} busy",
        applied.len(),
        busy.len()
    );
    match &got[&burst].cmd {
        Some(Resp::Put(proto::PutResponse { error: Some(error) })) => assert!(
            matches!(error.kind, Some(proto::error::Kind::EpochNotMatch(_))),
            "{error:?}"
        ),
        other => panic!("stale epoch: {other:?}"),
    }
    let invalid = &got[&(burst + 1)];
    assert_eq!(invalid.status_code, tonic::Code::InvalidArgument as i32);
    assert!(
        invalid.status_message.contains("key_bytes_max=8192"),
        "{}",
        invalid.status_message
    );
    for id in applied {
        assert_eq!(
            cluster.get(&key(id as usize)).await,
            Some(b"v".to_vec()),
            "{id}"
        );
    }
    for id in busy {
        assert_eq!(
            cluster.get(&key(id as usize)).await,
            None,
            "refused {id} was applied"
        );
    }
    drop(send);
    cluster.shutdown().await;
}

/// Writes already-encoded messages on a batch-commands stream, so a test can send what
/// no generated client would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;

struct ResponseDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = proto::BatchCommandsResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ResponseDecoder {
    type Item = proto::BatchCommandsResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<proto::BatchCommandsResponse>, tonic::Status> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|error| tonic::Status::internal(error.to_string()))
    }
}

/// A batch-commands message that does not decode used to end the answer stream with
/// status OK, the requests after it silently unanswered. Now every request taken
/// before it is answered and the stream ends with an error naming the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_batch_commands_message_ends_the_stream_with_an_error() {
    use proto::batch_commands_request::{request::Cmd as Req, Request as Item};
    let cluster = Cluster::start(3, Vec::new()).await;
    cluster.wait_for_leaders().await;
    let (range, _, header) = leader_of_k(&cluster).await;
    let leader = cluster
        .leader_of(RangeId(range.range_id))
        .expect("the range has a leader");
    let put = |id: u64| {
        prost::Message::encode_to_vec(&proto::BatchCommandsRequest {
            requests: vec![Item {
                id,
                cmd: Some(Req::Put(proto::PutRequest {
                    header: Some(header),
                    key: b"k".to_vec().into(),
                    value: format!("v{id}").into_bytes().into(),
                })),
            }],
        })
    };
    // Field 1 (requests), length-delimited, claiming far more bytes than follow.
    let garbage = vec![0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01];
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.node(leader).addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/rangekv.Kv/BatchCommands");
    let outgoing = tokio_stream::iter(vec![put(1), garbage, put(2)]);
    let mut answers = grpc
        .streaming(tonic::Request::new(outgoing), path, RawCodec)
        .await
        .unwrap()
        .into_inner();
    let mut answered = Vec::new();
    let end = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match answers.message().await {
                Ok(Some(message)) => answered.extend(message.responses.iter().map(|r| r.id)),
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the stream ends, it does not hang");
    assert_eq!(
        answered,
        vec![1],
        "the request before the bad message is answered"
    );
    let status = end.expect("the stream ends with an error, not OK");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("message 2 could not be read"),
        "{status:?}"
    );
    cluster.shutdown().await;
}

/// The registration `OpenSession` returned to the one test that opens a session.
static OPENED_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A write's session reference: session `SESSION`, sequence `sequence`.
fn in_session(header: proto::RequestHeader, sequence: u64) -> proto::RequestHeader {
    const SESSION: u128 = 0x5e55_1011_0000_0000_0000_0000_0000_0001;
    proto::RequestHeader {
        session: Some(proto::SessionRef {
            session_high: (SESSION >> 64) as u64,
            session_low: SESSION as u64,
            sequence,
            acked_below: 1,
            opened_at: OPENED_AT.load(std::sync::atomic::Ordering::SeqCst),
        }),
        ..header
    }
}

async fn session_put(cluster: &Cluster, k: &[u8], value: &[u8], sequence: u64) {
    let (k, value) = (k.to_vec(), value.to_vec());
    cluster
        .on_leader(&k.clone(), |mut kv, header| {
            let (key, value) = (k.clone().into(), value.clone().into());
            async move {
                let r = kv
                    .put(proto::PutRequest {
                        header: Some(in_session(header, sequence)),
                        key,
                        value,
                    })
                    .await?
                    .into_inner();
                Ok(((), r.error))
            }
        })
        .await;
}

async fn session_cas(
    cluster: &Cluster,
    k: &[u8],
    expected: &'static [u8],
    new: &'static [u8],
    sequence: u64,
) -> (bool, Vec<u8>) {
    let k = k.to_vec();
    cluster
        .on_leader(&k.clone(), |mut kv, header| {
            let k = k.clone();
            async move {
                let r = kv
                    .compare_and_swap(cas_request(in_session(header, sequence), k, expected, new))
                    .await?
                    .into_inner();
                Ok(((r.succeeded, r.previous_value.to_vec()), r.error))
            }
        })
        .await
        .1
}

/// A write sent again after its answer was lost, and after its leader was killed
/// with the write proposed, applies once: a retried put does not overwrite a later
/// write, a retried CAS answers what its one application answered, and both hold
/// after every node restarted (the session table is persisted with the data and
/// rebuilt by replay). A write of a session never opened at the range is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_again_after_an_ambiguous_failure_applies_once() {
    let mut cluster = Cluster::start(3, splits()).await;
    let k = key(5);
    let (_, mut kv, header) = {
        let range = cluster.range_of(&k).await;
        let leader = cluster.leader_of(RangeId(range.range_id)).unwrap();
        let header = proto::RequestHeader {
            range_id: range.range_id,
            epoch: range.epoch,
            stale_read: false,
            session: None,
        };
        (range, cluster.kv(leader).await, header)
    };
    let unopened = kv
        .put(proto::PutRequest {
            header: Some(in_session(header, 1)),
            key: k.clone().into(),
            value: b"x".to_vec().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            unopened.error.and_then(|e| e.kind),
            Some(proto::error::Kind::SessionExpired(proto::SessionExpired {
                sequence: 1,
                ..
            }))
        ),
        "a session never opened here is refused"
    );
    assert_eq!(cluster.get(&k).await, None, "and nothing applied");
    let session = in_session(header, 1).session.unwrap();
    cluster
        .on_leader(&k, |mut kv, header| async move {
            let r = kv
                .open_session(proto::OpenSessionRequest {
                    header: Some(header),
                    session_high: session.session_high,
                    session_low: session.session_low,
                    floor: 1,
                })
                .await?
                .into_inner();
            OPENED_AT.store(r.opened_at, std::sync::atomic::Ordering::SeqCst);
            Ok(((), r.error))
        })
        .await;
    assert!(OPENED_AT.load(std::sync::atomic::Ordering::SeqCst) > 0);

    // The answer of sequence 1 is lost; another client writes; sequence 1 again.
    session_put(&cluster, &k, b"first", 1).await;
    cluster.put(&k, b"other").await;
    session_put(&cluster, &k, b"first", 1).await;
    assert_eq!(cluster.get(&k).await, Some(b"other".to_vec()));

    // A CAS sent twice answers as its one application did.
    let cas = |expected: &'static [u8], new: &'static [u8], sequence| {
        session_cas(&cluster, &k, expected, new, sequence)
    };
    assert_eq!(
        cas(b"other", b"swapped", 2).await,
        (true, b"other".to_vec())
    );
    cluster.put(&k, b"later").await;
    assert_eq!(
        cas(b"other", b"swapped", 2).await,
        (true, b"other".to_vec()),
        "the recorded answer, not a failed second CAS"
    );
    assert_eq!(cluster.get(&k).await, Some(b"later".to_vec()));

    // Sequence 3 goes to the leader, which is killed at once: it may or may not
    // have applied. Sent again (to the new leader), then overwritten, then sent
    // once more: the overwrite stays.
    let range = RangeId(cluster.range_of(&k).await.range_id);
    let leader = cluster.leader_of(range).unwrap();
    let mut to_leader = cluster.kv(leader).await;
    let write = proto::PutRequest {
        header: Some(in_session(header, 3)),
        key: k.clone().into(),
        value: b"third".to_vec().into(),
    };
    let in_flight = tokio::spawn(async move { to_leader.put(write).await });
    cluster.kill(leader).await;
    let _ = in_flight.await;
    cluster.wait_for_leaders().await;
    session_put(&cluster, &k, b"third", 3).await;
    assert_eq!(cluster.get(&k).await, Some(b"third".to_vec()));
    cluster.put(&k, b"last").await;
    session_put(&cluster, &k, b"third", 3).await;
    assert_eq!(cluster.get(&k).await, Some(b"last".to_vec()));

    // Every node restarted: the sessions come back with the data.
    cluster.restart(leader).await;
    for i in 0..3 {
        cluster.kill(i).await;
    }
    for i in 0..3 {
        cluster.restart(i).await;
    }
    cluster.wait_for_leaders().await;
    session_put(&cluster, &k, b"first", 1).await;
    session_put(&cluster, &k, b"third", 3).await;
    assert_eq!(
        session_cas(&cluster, &k, b"other", b"swapped", 2).await,
        (true, b"other".to_vec())
    );
    assert_eq!(cluster.get(&k).await, Some(b"last".to_vec()));
    cluster.shutdown().await;
}

//! The client against a real in-process cluster (PD + 3 nodes).

use rangekv_client::{Client, Config, Error, Mutation};
use rangekv_testkit::Cluster;
use rangekv_types::RangeId;

fn key(i: usize) -> Vec<u8> {
    format!("key{i:05}").into_bytes()
}

/// Ten ranges over the test keys.
fn splits() -> Vec<Vec<u8>> {
    (1..10).map(|i| key(i * 100)).collect()
}

async fn client(cluster: &Cluster) -> Client {
    Client::connect(&[cluster.pd_url.as_str()], Config::default())
        .await
        .expect("the client connects to PD")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_works_across_ranges() {
    let cluster = Cluster::start(3, splits()).await;
    let client = client(&cluster).await;
    client.put(&key(5), b"five").await.unwrap();
    assert_eq!(client.get(&key(5)).await.unwrap(), Some(b"five".to_vec()));
    client.delete(&key(5)).await.unwrap();
    assert_eq!(client.get(&key(5)).await.unwrap(), None);

    // A batch over several ranges, then reads of it.
    let batch: Vec<Mutation> = (0..1000)
        .step_by(7)
        .map(|i| Mutation::Put(key(i), format!("v{i}").into_bytes()))
        .collect();
    client.batch_put(batch).await.unwrap();
    let wanted: Vec<Vec<u8>> = vec![key(7), key(8), key(994), key(350)];
    let got = client.batch_get(&wanted).await.unwrap();
    assert_eq!(
        got,
        vec![
            (key(7), b"v7".to_vec()),
            (key(994), b"v994".to_vec()),
            (key(350), b"v350".to_vec())
        ]
    );

    // A scan over every range returns each key once, in order; limits hold.
    let all = client.scan(b"", b"", usize::MAX).await.unwrap();
    let expected: Vec<Vec<u8>> = (0..1000).step_by(7).map(key).collect();
    assert_eq!(
        all.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        expected
    );
    let some = client.scan(&key(95), &key(420), 10).await.unwrap();
    let expected: Vec<Vec<u8>> = (98..420).step_by(7).take(10).map(key).collect();
    assert_eq!(
        some.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        expected
    );

    // Compare-and-swap.
    let cas = client
        .compare_and_swap(&key(7), Some(b"wrong"), Some(b"x"))
        .await
        .unwrap();
    assert!(!cas.succeeded);
    assert_eq!(cas.previous, Some(b"v7".to_vec()));
    let cas = client
        .compare_and_swap(&key(7), Some(b"v7"), Some(b"x"))
        .await
        .unwrap();
    assert!(cas.succeeded);
    let cas = client
        .compare_and_swap(&key(1), None, Some(b"new"))
        .await
        .unwrap();
    assert!(cas.succeeded, "absent expected and absent");
    assert_eq!(client.get(&key(1)).await.unwrap(), Some(b"new".to_vec()));

    // Delete a span crossing two range boundaries.
    client.delete_range(&key(150), &key(350)).await.unwrap();
    let left = client.scan(&key(100), &key(400), usize::MAX).await.unwrap();
    assert!(left
        .iter()
        .all(|(k, _)| k.as_slice() < key(150).as_slice() || k.as_slice() >= key(350).as_slice()));
    assert!(left.iter().any(|(k, _)| k == &key(350)));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_change_during_a_stream_of_puts_surfaces_no_error_and_loses_nothing() {
    let mut cluster = Cluster::start(3, splits()).await;
    let client = client(&cluster).await;
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                client.put(&key(i), format!("v{i}").as_bytes()).await?;
            }
            Ok::<_, Error>(())
        })
    };
    // Once the stream is inside the range of keys 100..200, kill that range's leader:
    // the puts still to come in it must find the new leader.
    let range = RangeId(cluster.range_of(&key(150)).await.range_id);
    cluster
        .wait_until("the stream reaches key 120", |c| {
            c.running()
                .any(|(_, n)| n.store().state().get(&key(120)).unwrap().is_some())
        })
        .await;
    let leader = cluster.leader_of(range).unwrap();
    cluster.kill(leader).await;
    writer.await.unwrap().unwrap();
    for i in 0..300 {
        assert_eq!(
            client.get(&key(i)).await.unwrap(),
            Some(format!("v{i}").into_bytes()),
            "key {i}"
        );
    }
    assert_ne!(
        cluster.leader_of(range),
        Some(leader),
        "the range changed leader"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_a_clear_error() {
    let cluster = Cluster::start(3, splits()).await;
    let client = client(&cluster).await;
    match client.put(&vec![b'k'; 9000], b"v").await {
        Err(Error::InvalidArgument(message)) => {
            assert!(message.contains("key_bytes_max=8192"), "{message}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert!(matches!(
        client.get(b"").await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Client::connect(&[], Config::default()).await,
        Err(Error::InvalidArgument(_))
    ));
    cluster.shutdown().await;
}

/// One thread for everything: the 500 calls below are queued by polling `join_all`,
/// and the connection's sender task only runs when that poll yields.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_requests_share_batch_messages() {
    use std::sync::atomic::Ordering::Relaxed;
    let cluster = Cluster::start(3, Vec::new()).await;
    let client = client(&cluster).await;
    client.put(b"warm", b"up").await.unwrap();
    let counts = |c: &Cluster| {
        c.running().fold((0, 0), |(m, r), (_, n)| {
            let counters = n.store().counters();
            (
                m + counters.batch_messages_in.load(Relaxed),
                r + counters.batch_requests_in.load(Relaxed),
            )
        })
    };
    let (messages_before, requests_before) = counts(&cluster);
    let keys: Vec<Vec<u8>> = (0..500).map(key).collect();
    let puts = keys.iter().map(|k| client.put(k, b"v"));
    for result in futures_util::future::join_all(puts).await {
        result.unwrap();
    }
    let (messages, requests) = counts(&cluster);
    let (messages, requests) = (messages - messages_before, requests - requests_before);
    // Each put is sent at least once; a leadership change after the warm-up (seen in
    // a loaded `make test`: 1,000 requests) sends every call again after its
    // `NotLeader`, and the retries travel together just the same.
    assert!(
        requests >= 500,
        "only {requests} requests arrived for 500 puts"
    );
    // All 500 are queued before the sender runs; tokio's cooperative budget may cut
    // the queueing into a few rounds, but never anywhere near one message per call.
    assert!(
        messages * 10 <= requests,
        "500 concurrent puts went out in {messages} messages"
    );
    cluster.shutdown().await;
}

/// A client idle at a range past the session lifetime finds its session dropped
/// there; its next write (sent for the first time, so nothing of it can have
/// applied) opens the session again and applies, invisibly to the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_session_expired_at_its_range_opens_it_again_and_applies() {
    let cluster = Cluster::start_with(3, splits(), |config| {
        config.store.session_ttl = std::time::Duration::from_millis(300);
    })
    .await;
    let idle = client(&cluster).await;
    let busy = client(&cluster).await;
    idle.put(&key(1), b"before").await.unwrap();
    let range = RangeId(cluster.range_of(&key(1)).await.range_id);
    let sessions_at = |cluster: &Cluster| {
        let leader = cluster.leader_of(range).unwrap();
        cluster
            .node(leader)
            .store()
            .state()
            .sessions(range)
            .unwrap()
            .len()
    };
    assert_eq!(sessions_at(&cluster), 1);
    // Entries of another session carry the time on; the idle one is dropped once an
    // entry is stamped past its lifetime.
    let mut writes = 0;
    loop {
        busy.put(&key(2), format!("{writes}").as_bytes())
            .await
            .unwrap();
        writes += 1;
        if sessions_at(&cluster) == 1 && writes > 1 {
            break;
        }
        assert!(writes < 100_000, "the idle session was never dropped");
    }
    idle.put(&key(1), b"after").await.unwrap();
    assert_eq!(idle.get(&key(1)).await.unwrap(), Some(b"after".to_vec()));
    assert_eq!(sessions_at(&cluster), 2, "opened again");
    cluster.shutdown().await;
}

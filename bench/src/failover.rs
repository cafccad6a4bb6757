//! `rangekv bench failover`: an in-process 3-node cluster with many ranges; the store
//! leading the most ranges is stopped, and the bench measures the time until every
//! range has a leader again and until every range accepts a write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rangekv_rpc::proto;
use rangekv_testkit::Cluster;
use rangekv_types::RangeId;

#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// Ranges in the cluster (3 replicas each).
    #[arg(long, default_value_t = 1000)]
    pub ranges: usize,
    /// Times to stop the busiest leader store (it is restarted in between).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Raft tick in milliseconds (the election timeout is 10 ticks).
    #[arg(long, default_value_t = 100)]
    pub tick_ms: u64,
}

fn split_keys(ranges: usize) -> Vec<Vec<u8>> {
    (1..ranges)
        .map(|i| format!("r{i:06}").into_bytes())
        .collect()
}

/// Puts one key into every range until each succeeds; returns when all have.
async fn write_everywhere(cluster: &Cluster, ranges: &[proto::RangeDescriptor], round: usize) {
    let mut clients = Vec::new();
    for (i, _) in cluster.running() {
        clients.push((i, cluster.kv(i).await));
    }
    let clients = Arc::new(clients);
    let mut pending: Vec<&proto::RangeDescriptor> = ranges.iter().collect();
    while !pending.is_empty() {
        let mut calls = Vec::new();
        for range in &pending {
            let target = cluster
                .leader_of(RangeId(range.range_id))
                .unwrap_or_else(|| clients[0].0);
            let Some((_, client)) = clients.iter().find(|(i, _)| *i == target) else {
                continue;
            };
            let mut client = client.clone();
            let request = proto::PutRequest {
                header: Some(proto::RequestHeader {
                    range_id: range.range_id,
                    epoch: range.epoch,
                    stale_read: false,
                    session: None,
                }),
                key: [&range.start_key[..], b"failover"].concat().into(),
                value: format!("round {round}").into_bytes().into(),
            };
            calls.push(tokio::spawn(async move {
                matches!(client.put(request).await, Ok(r) if r.get_ref().error.is_none())
            }));
        }
        let mut still = Vec::new();
        for (range, call) in pending.iter().zip(calls) {
            if !call.await.unwrap_or(false) {
                still.push(*range);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn run(args: &FailoverArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.ranges >= 1, "--ranges must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tick = Duration::from_millis(args.tick_ms);
        let mut cluster = Cluster::start_with(3, split_keys(args.ranges), |config| {
            config.store.tick_interval = tick;
        })
        .await;
        let election_timeout = tick * 10;
        let ranges = cluster.ranges().await;
        println!(
            "failover: {} ranges, 3 nodes, tick {tick:?}, election timeout {election_timeout:?}, commit {}",
            ranges.len(),
            crate::report::COMMIT
        );
        write_everywhere(&cluster, &ranges, 0).await;
        for round in 1..=args.rounds {
            // Let the cluster go idle (quiesced) first: the common state of many ranges.
            cluster
                .wait_until("ranges quiesce", |c| {
                    c.running().all(|(_, n)| {
                        n.store().ranges().iter().all(|(_, info)| {
                            info.quiesced.load(std::sync::atomic::Ordering::Relaxed)
                        })
                    })
                })
                .await;
            let leaders = |c: &Cluster, i: usize| {
                c.node(i).store().ranges().iter().filter(|(_, r)| r.is_leader()).count()
            };
            let victim = (0..3).max_by_key(|i| leaders(&cluster, *i)).unwrap_or(0);
            let led = leaders(&cluster, victim);
            let start = Instant::now();
            cluster.kill(victim).await;
            cluster.wait_for_leaders().await;
            let elected = start.elapsed();
            write_everywhere(&cluster, &ranges, round).await;
            let writable = start.elapsed();
            println!(
                "round {round}: stopped node{victim} leading {led} ranges; every range led again after {:.0} ms ({:.2}x election timeout), writable after {:.0} ms ({:.2}x)",
                elected.as_secs_f64() * 1e3,
                elected.as_secs_f64() / election_timeout.as_secs_f64(),
                writable.as_secs_f64() * 1e3,
                writable.as_secs_f64() / election_timeout.as_secs_f64(),
            );
            cluster.restart(victim).await;
            cluster.wait_for_leaders().await;
        }
        cluster.shutdown().await;
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_failover_runs() {
        run(&FailoverArgs {
            ranges: 4,
            rounds: 1,
            tick_ms: 50,
        })
        .unwrap();
    }
}

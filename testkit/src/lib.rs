//! An in-process cluster for integration tests and benchmarks: PD plus N nodes on
//! loopback, each with its own data directory, and a small router that follows the
//! cluster's leaders. Test code: it panics on anything unexpected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rangekv_node::{Node, NodeConfig};
use rangekv_placement::server::{PdConfig, PdHandle};
use rangekv_rpc::proto::{self, kv_client::KvClient, placement_client::PlacementClient};
use rangekv_rpc::RangeDescriptor;
use rangekv_types::RangeId;
use tonic::transport::Channel;

pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub pd: Option<PdHandle>,
    pub pd_url: String,
    pub nodes: Vec<Option<Node>>,
    pub configs: Vec<NodeConfig>,
}

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

impl Cluster {
    /// Starts PD (bootstrap at `split_keys`) and `nodes` nodes, and waits until every
    /// range has a leader.
    pub async fn start(nodes: usize, split_keys: Vec<Vec<u8>>) -> Cluster {
        Self::start_with(nodes, split_keys, |_| {}).await
    }

    /// Like [`Cluster::start`], with `tune` applied to every node's config.
    pub async fn start_with(
        nodes: usize,
        split_keys: Vec<Vec<u8>>,
        tune: impl Fn(&mut NodeConfig),
    ) -> Cluster {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let mut pd_config = PdConfig::new(dir.path().join("pd"));
        pd_config.listen = local();
        pd_config.split_keys = split_keys;
        let pd = rangekv_placement::server::spawn(pd_config).await.unwrap();
        let pd_url = pd.url();
        let mut cluster = Cluster {
            dir,
            pd: Some(pd),
            pd_url,
            nodes: Vec::new(),
            configs: Vec::new(),
        };
        for i in 0..nodes {
            let mut config = cluster.node_config(i);
            tune(&mut config);
            cluster.configs.push(config.clone());
            cluster
                .nodes
                .push(Some(rangekv_node::start(config).await.unwrap()));
        }
        cluster.wait_for_leaders().await;
        cluster
    }

    fn node_config(&self, i: usize) -> NodeConfig {
        let mut config = NodeConfig::new(self.data_dir(i), local(), self.pd_url.clone());
        config.store.tick_interval = Duration::from_millis(50);
        config.store_heartbeat_interval = Duration::from_millis(100);
        config.range_heartbeat_interval = Duration::from_millis(200);
        config
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}"))
    }

    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn running(&self) -> impl Iterator<Item = (usize, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    pub async fn pd(&self) -> PlacementClient<Channel> {
        PlacementClient::connect(self.pd_url.clone()).await.unwrap()
    }

    /// Every bootstrap range, from PD.
    pub async fn ranges(&self) -> Vec<RangeDescriptor> {
        let mut pd = self.pd().await;
        loop {
            match pd.scan_ranges(proto::ScanRangesRequest::default()).await {
                Ok(response) => {
                    return response
                        .into_inner()
                        .routes
                        .into_iter()
                        .filter_map(|r| r.range)
                        .collect()
                }
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(status) => panic!("scan ranges: {status}"),
            }
        }
    }

    /// The node index hosting the leader of `range`, among running nodes.
    pub fn leader_of(&self, range: RangeId) -> Option<usize> {
        self.running().find_map(|(i, node)| {
            let info = node.store().range(range)?;
            info.is_leader().then_some(i)
        })
    }

    /// Waits until `condition` holds, polling; panics with `what` after [`DEADLINE`].
    pub async fn wait_until(&self, what: &str, mut condition: impl FnMut(&Cluster) -> bool) {
        let give_up = tokio::time::Instant::now() + DEADLINE;
        while !condition(self) {
            assert!(
                tokio::time::Instant::now() < give_up,
                "{what}: not within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every range has exactly one running leader that every running
    /// replica agrees on.
    pub async fn wait_for_leaders(&self) {
        let ranges = self.ranges().await;
        let give_up = tokio::time::Instant::now() + DEADLINE;
        loop {
            let settled = ranges.iter().all(|range| {
                let id = RangeId(range.range_id);
                let leaders: Vec<_> = self
                    .running()
                    .filter(|(_, n)| n.store().range(id).is_some_and(|i| i.is_leader()))
                    .collect();
                leaders.len() == 1
            });
            if settled {
                return;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "ranges did not all elect a leader in {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.shutdown().await;
        }
    }

    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none());
        let config = self.configs[i].clone();
        self.nodes[i] = Some(rangekv_node::start(config).await.unwrap());
    }

    pub async fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::connect(format!("http://{}", self.node(i).addr()))
            .await
            .unwrap()
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i).await;
        }
        if let Some(pd) = self.pd.take() {
            pd.shutdown().await.unwrap();
        }
    }

    /// The range containing `key` (bootstrap ranges do not change yet).
    pub async fn range_of(&self, key: &[u8]) -> RangeDescriptor {
        self.ranges()
            .await
            .into_iter()
            .find(|r| r.contains_key(key))
            .expect("ranges cover the keyspace")
    }

    /// Runs `call` against the leader of `key`'s range, following NotLeader and
    /// retrying routing errors until the deadline. Returns the node that answered.
    pub async fn on_leader<T, F, Fut>(&self, key: &[u8], mut call: F) -> (usize, T)
    where
        F: FnMut(KvClient<Channel>, proto::RequestHeader) -> Fut,
        Fut: std::future::Future<Output = Result<(T, Option<proto::Error>), tonic::Status>>,
    {
        let range = self.range_of(key).await;
        let header = proto::RequestHeader {
            range_id: range.range_id,
            epoch: range.epoch,
            stale_read: false,
            session: None,
        };
        let give_up = tokio::time::Instant::now() + DEADLINE;
        loop {
            let target = self
                .leader_of(RangeId(range.range_id))
                .or_else(|| self.running().map(|(i, _)| i).next())
                .expect("a node is running");
            let client = self.kv(target).await;
            match call(client, header).await {
                Ok((value, None)) => return (target, value),
                Ok((_, Some(error))) => {
                    assert!(
                        matches!(
                            error.kind,
                            Some(proto::error::Kind::NotLeader(_))
                                | Some(proto::error::Kind::ServerBusy(_))
                        ),
                        "unexpected error {error:?}"
                    );
                }
                Err(status) => assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ),
                    "unexpected status {status}"
                ),
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "no leader answered in {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) {
        let (key, value) = (key.to_vec(), value.to_vec());
        self.on_leader(&key.clone(), |mut kv, header| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                let response = kv
                    .put(proto::PutRequest {
                        header: Some(header),
                        key: key.into(),
                        value: value.into(),
                    })
                    .await?
                    .into_inner();
                Ok(((), response.error))
            }
        })
        .await;
    }

    pub async fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let key = key.to_vec();
        self.on_leader(&key.clone(), |mut kv, header| {
            let key = key.clone();
            async move {
                let response = kv
                    .get(proto::GetRequest {
                        header: Some(header),
                        key: key.into(),
                    })
                    .await?
                    .into_inner();
                let value = response.found.then(|| response.value.to_vec());
                Ok((value, response.error))
            }
        })
        .await
        .1
    }

    /// Waits until every running replica of `key`'s range has applied it with `value`.
    pub async fn wait_replicated(&self, key: &[u8], value: &[u8]) {
        let give_up = tokio::time::Instant::now() + DEADLINE;
        loop {
            let everywhere = self
                .running()
                .all(|(_, n)| n.store().state().get(key).unwrap().as_deref() == Some(value));
            if everywhere {
                return;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "{key:?} not replicated in {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

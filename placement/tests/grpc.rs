//! PD end to end over gRPC: spawn on 127.0.0.1:0, bootstrap through `RegisterStore`,
//! route, restart on the same data directory.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed call fails the test"
)]

use rangekv_placement::{spawn, PdConfig};
use rangekv_rpc::proto::placement_client::PlacementClient;
use rangekv_rpc::proto::{
    AllocIdRequest, ClusterStatusRequest, GetRangeByIdRequest, GetRangeRequest, GetStoreRequest,
    ListStoresRequest, RangeHeartbeatRequest, RangeReport, RangeRoute, RegisterStoreRequest,
    ScanRangesRequest, StoreHeartbeatRequest, StoreInfo, StoreState,
};
use tonic::transport::Channel;
use tonic::Code;

fn config(dir: &std::path::Path) -> PdConfig {
    PdConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        split_keys: vec![b"g".to_vec(), b"p".to_vec()],
        ..PdConfig::new(dir)
    }
}

async fn scan_all(client: &mut PlacementClient<Channel>) -> Vec<RangeRoute> {
    let request = ScanRangesRequest {
        start_key: Default::default(),
        end_key: Default::default(),
        limit: 0,
    };
    client
        .scan_ranges(request)
        .await
        .unwrap()
        .into_inner()
        .routes
}

async fn register(client: &mut PlacementClient<Channel>, store_id: u64, address: &str) -> u64 {
    let request = RegisterStoreRequest {
        store_id,
        address: address.into(),
    };
    client
        .register_store(request)
        .await
        .unwrap()
        .into_inner()
        .store_id
}

#[tokio::test]
async fn a_cluster_bootstraps_routes_and_restarts_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let pd = spawn(config(dir.path())).await.unwrap();
    assert_ne!(pd.addr().port(), 0, "port 0 was resolved to the bound port");
    let mut client = PlacementClient::connect(pd.url()).await.unwrap();

    let early = client
        .get_range(GetRangeRequest { key: "a".into() })
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::Unavailable);
    assert!(
        early.message().contains("3 more store(s)"),
        "{}",
        early.message()
    );

    let mut stores = Vec::new();
    for n in 1..=3 {
        stores.push(register(&mut client, 0, &format!("127.0.0.1:{}", 20_000 + n)).await);
    }
    let status = client
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.bootstrapped);
    assert_eq!((status.stores_needed, status.ranges), (0, 3));

    // The first store learns which replicas to create, then its leader reports.
    let heartbeat = StoreHeartbeatRequest {
        store: Some(StoreInfo {
            store_id: stores[0],
            ..StoreInfo::default()
        }),
        range_ids: Vec::new(),
    };
    let create = client
        .store_heartbeat(heartbeat)
        .await
        .unwrap()
        .into_inner()
        .create_ranges;
    assert_eq!(create.len(), 3);
    let first = create[0].clone();
    let leader = first.replicas[0];
    let report = RangeHeartbeatRequest {
        store_id: stores[0],
        ranges: vec![RangeReport {
            range: Some(first.clone()),
            leader: Some(leader),
            term: 2,
            applied_index: 1,
        }],
    };
    client.range_heartbeat(report).await.unwrap();
    let route = client
        .get_range(GetRangeRequest { key: "f".into() })
        .await
        .unwrap()
        .into_inner()
        .route
        .unwrap();
    assert_eq!(
        (route.range.as_ref(), route.leader),
        (Some(&first), Some(leader))
    );
    let by_id = client
        .get_range_by_id(GetRangeByIdRequest {
            range_id: first.range_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.route.unwrap().range, Some(first.clone()));
    let at_split = client
        .get_range(GetRangeRequest { key: "g".into() })
        .await
        .unwrap()
        .into_inner()
        .route
        .unwrap();
    assert_eq!(&at_split.range.unwrap().start_key[..], b"g");

    let store = client
        .get_store(GetStoreRequest {
            store_id: stores[0],
        })
        .await
        .unwrap()
        .into_inner()
        .store
        .unwrap();
    assert_eq!(store.state, StoreState::Up as i32);
    assert!(store.last_heartbeat_unix_ms > 0);
    let listed = client.list_stores(ListStoresRequest {}).await.unwrap();
    assert_eq!(listed.into_inner().stores.len(), 3);

    // Bad input maps to the status codes clients act on.
    let empty = client
        .register_store(RegisterStoreRequest {
            store_id: 0,
            address: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("address"), "{}", empty.message());
    let unknown = client
        .register_store(RegisterStoreRequest {
            store_id: 999_999,
            address: "127.0.0.1:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let too_many = client
        .alloc_id(AllocIdRequest { count: 10_001 })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(
        too_many.message().contains("10000"),
        "{}",
        too_many.message()
    );
    let ids = client
        .alloc_id(AllocIdRequest { count: 5 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids.count, 5);

    let routes = scan_all(&mut client).await;
    assert_eq!(routes.len(), 3);
    pd.shutdown().await.unwrap();

    // Same directory, new process-equivalent: same ranges, ids keep growing, stores
    // keep their ids.
    let pd = spawn(config(dir.path())).await.unwrap();
    let mut client = PlacementClient::connect(pd.url()).await.unwrap();
    let reopened = scan_all(&mut client).await;
    let descriptors = |routes: &[RangeRoute]| -> Vec<_> {
        routes.iter().map(|route| route.range.clone()).collect()
    };
    assert_eq!(descriptors(&reopened), descriptors(&routes));
    assert!(
        reopened.iter().all(|route| route.leader.is_none()),
        "leaders report anew"
    );
    let after = client
        .alloc_id(AllocIdRequest { count: 1 })
        .await
        .unwrap()
        .into_inner();
    assert!(
        after.first_id >= ids.first_id + 5,
        "no id is reissued after a restart"
    );
    assert_eq!(
        register(&mut client, stores[1], "127.0.0.1:30002").await,
        stores[1]
    );
    pd.shutdown().await.unwrap();
}

//! The `Placement` gRPC service: decodes requests, runs them against the [`Cluster`]
//! and maps [`PdError`] to gRPC status codes.
//!
//! Calls that may write metadata (a synced RocksDB write) run on tokio's blocking pool;
//! the others run under the lock on the calling task, as they touch no disk.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rangekv_rpc::proto::placement_server::Placement;
use rangekv_rpc::proto::{
    AllocIdRequest, AllocIdResponse, ClusterStatusRequest, ClusterStatusResponse,
    GetRangeByIdRequest, GetRangeByIdResponse, GetRangeRequest, GetRangeResponse, GetStoreRequest,
    GetStoreResponse, ListStoresRequest, ListStoresResponse, RangeHeartbeatRequest,
    RangeHeartbeatResponse, RegisterStoreRequest, RegisterStoreResponse, ScanRangesRequest,
    ScanRangesResponse, StoreHeartbeatRequest, StoreHeartbeatResponse,
};
use rangekv_types::{RangeId, StoreId};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, PdError};

impl From<PdError> for Status {
    fn from(error: PdError) -> Self {
        let message = error.to_string();
        match error {
            PdError::InvalidArgument(_) => Status::invalid_argument(message),
            PdError::NotFound(_) => Status::not_found(message),
            PdError::NotBootstrapped { .. } | PdError::Unavailable(_) => {
                Status::unavailable(message)
            }
            PdError::IdsExhausted => Status::resource_exhausted(message),
            PdError::Stopped(_) | PdError::Fatal(_) => Status::internal(message),
        }
    }
}

/// The `Placement` service over a shared [`Cluster`].
#[derive(Debug, Clone)]
pub struct PlacementService {
    cluster: Arc<Mutex<Cluster>>,
    /// Notified once the cluster has stopped after a fatal error, so the server exits.
    stopped: Arc<Notify>,
}

impl PlacementService {
    pub fn new(cluster: Arc<Mutex<Cluster>>, stopped: Arc<Notify>) -> Self {
        PlacementService { cluster, stopped }
    }

    /// Runs `operation` under the lock on the calling task: for calls that never write
    /// to disk.
    fn inline<T>(
        &self,
        operation: impl FnOnce(&mut Cluster) -> Result<T, PdError>,
    ) -> Result<T, Status> {
        let mut cluster = lock(&self.cluster)?;
        Ok(operation(&mut cluster)?)
    }

    /// Runs `operation` on the blocking pool: for calls that may do a synced write.
    async fn blocking<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&mut Cluster) -> Result<T, PdError> + Send + 'static,
    ) -> Result<T, Status> {
        let cluster = Arc::clone(&self.cluster);
        let stopped = Arc::clone(&self.stopped);
        tokio::task::spawn_blocking(move || {
            let mut cluster = lock(&cluster)?;
            let result = operation(&mut cluster);
            if cluster.stopped().is_some() {
                stopped.notify_one();
            }
            Ok(result?)
        })
        .await
        .map_err(|error| Status::internal(format!("placement task failed: {error}")))?
    }
}

/// Locks the cluster. A poisoned lock means an invariant assertion fired mid-update:
/// the view can no longer be trusted, so every call fails.
pub(crate) fn lock(cluster: &Mutex<Cluster>) -> Result<MutexGuard<'_, Cluster>, Status> {
    cluster
        .lock()
        .map_err(|_| Status::internal("placement state poisoned by an earlier panic"))
}

/// PD's clock, for store liveness and heartbeat times.
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

#[tonic::async_trait]
impl Placement for PlacementService {
    async fn register_store(
        &self,
        request: Request<RegisterStoreRequest>,
    ) -> Result<Response<RegisterStoreResponse>, Status> {
        let request = request.into_inner();
        let now = now_unix_ms();
        let store_id = self
            .blocking(move |cluster| {
                cluster.register_store(request.store_id, &request.address, now)
            })
            .await?;
        Ok(Response::new(RegisterStoreResponse {
            store_id: store_id.get(),
        }))
    }

    async fn store_heartbeat(
        &self,
        request: Request<StoreHeartbeatRequest>,
    ) -> Result<Response<StoreHeartbeatResponse>, Status> {
        let request = request.into_inner();
        let create_ranges =
            self.inline(|cluster| cluster.store_heartbeat(&request, now_unix_ms()))?;
        Ok(Response::new(StoreHeartbeatResponse { create_ranges }))
    }

    async fn range_heartbeat(
        &self,
        request: Request<RangeHeartbeatRequest>,
    ) -> Result<Response<RangeHeartbeatResponse>, Status> {
        let request = request.into_inner();
        self.blocking(move |cluster| cluster.range_heartbeat(&request))
            .await?;
        Ok(Response::new(RangeHeartbeatResponse {}))
    }

    async fn get_range(
        &self,
        request: Request<GetRangeRequest>,
    ) -> Result<Response<GetRangeResponse>, Status> {
        let key = request.into_inner().key;
        let route = self.inline(|cluster| cluster.get_range(&key))?;
        Ok(Response::new(GetRangeResponse { route: Some(route) }))
    }

    async fn get_range_by_id(
        &self,
        request: Request<GetRangeByIdRequest>,
    ) -> Result<Response<GetRangeByIdResponse>, Status> {
        let id = RangeId(request.into_inner().range_id);
        let route = self.inline(|cluster| cluster.get_range_by_id(id))?;
        Ok(Response::new(GetRangeByIdResponse { route: Some(route) }))
    }

    async fn scan_ranges(
        &self,
        request: Request<ScanRangesRequest>,
    ) -> Result<Response<ScanRangesResponse>, Status> {
        let request = request.into_inner();
        let routes = self.inline(|cluster| {
            cluster.scan_ranges(&request.start_key, &request.end_key, request.limit)
        })?;
        Ok(Response::new(ScanRangesResponse { routes }))
    }

    async fn get_store(
        &self,
        request: Request<GetStoreRequest>,
    ) -> Result<Response<GetStoreResponse>, Status> {
        let id = StoreId(request.into_inner().store_id);
        let store = self.inline(|cluster| cluster.get_store(id, now_unix_ms()))?;
        Ok(Response::new(GetStoreResponse { store: Some(store) }))
    }

    async fn list_stores(
        &self,
        _request: Request<ListStoresRequest>,
    ) -> Result<Response<ListStoresResponse>, Status> {
        let stores = self.inline(|cluster| Ok(cluster.list_stores(now_unix_ms())))?;
        Ok(Response::new(ListStoresResponse { stores }))
    }

    async fn alloc_id(
        &self,
        request: Request<AllocIdRequest>,
    ) -> Result<Response<AllocIdResponse>, Status> {
        let count = request.into_inner().count;
        let first_id = self
            .blocking(move |cluster| cluster.alloc_ids(count))
            .await?;
        Ok(Response::new(AllocIdResponse { first_id, count }))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let status = self.inline(|cluster| Ok(cluster.status()))?;
        Ok(Response::new(status))
    }
}

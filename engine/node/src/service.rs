//! The gRPC services of a node: `Kv` for clients, `Raft` for other stores.
//!
//! Every Kv request is checked at the edge (limits, then range, epoch and key span)
//! before anything reaches raft; a request that fails a check is refused whole.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rangekv_rpc::proto::{self, command::Op, kv_server::Kv, raft_server::Raft};
use rangekv_rpc::validate::{self, Invalid};
use rangekv_rpc::RangeDescriptor;
use rangekv_types::{limits, RangeId};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

use crate::command::{self, Responder, StreamAnswers, StreamReply, StreamWrite, WriteResult};
use crate::store::{RangeInfo, RouteError, Store};

/// How long a request waits for raft before answering `DEADLINE_EXCEEDED` (the
/// client's own deadline, when shorter, wins: tonic cancels the handler).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys a scan returns when the request sets no limit.
pub const SCAN_LIMIT_DEFAULT: usize = 1000;

/// Services hold the store weakly: a stopping node drops it, and requests that
/// arrive afterwards get `UNAVAILABLE`.
#[derive(Clone)]
pub struct KvService {
    store: Weak<Store>,
    request_bytes_max: usize,
}

impl KvService {
    /// tonic's own decode limit must sit above `request_bytes_max` (the node sets it
    /// 1 MiB higher) so that most oversized requests get this service's
    /// `INVALID_ARGUMENT` naming the limit rather than tonic's `OUT_OF_RANGE`.
    pub fn new(store: &Arc<Store>, request_bytes_max: usize) -> Self {
        KvService {
            store: Arc::downgrade(store),
            request_bytes_max,
        }
    }

    fn check_size(&self, request: &impl prost::Message) -> Result<(), Status> {
        let bytes = request.encoded_len();
        if bytes > self.request_bytes_max {
            return Err(Invalid {
                limit: format!("request_bytes_max={}", self.request_bytes_max),
                message: format!("request has {bytes} bytes"),
            }
            .into());
        }
        Ok(())
    }

    fn store(&self) -> Result<Arc<Store>, Status> {
        self.store
            .upgrade()
            .ok_or_else(|| Status::unavailable("the store is stopping"))
    }
}

/// A request refused before reaching raft: either an in-band error detail or a
/// gRPC status.
enum Refusal {
    Detail(proto::Error),
    Status(Status),
}

impl From<Invalid> for Refusal {
    fn from(invalid: Invalid) -> Self {
        Refusal::Status(invalid.into())
    }
}

fn route_refusal(error: RouteError, range: RangeId) -> Refusal {
    match error {
        RouteError::RangeNotFound => Refusal::Detail(proto::Error {
            kind: Some(proto::error::Kind::RangeNotFound(proto::RangeNotFound {
                range_id: range.get(),
            })),
        }),
        RouteError::Busy => Refusal::Status(Status::resource_exhausted(
            "server busy: the range's worker queue is full (limit inbox_messages_max); retry with backoff",
        )),
        RouteError::Stopped => Refusal::Status(Status::unavailable("the store has stopped")),
    }
}

/// Finds the range of `header` and checks the client's epoch.
fn locate(
    store: &Store,
    header: Option<&proto::RequestHeader>,
) -> Result<(RangeId, Arc<RangeInfo>, RangeDescriptor), Refusal> {
    let header = header.ok_or_else(|| {
        Refusal::Status(Status::invalid_argument(
            "request has no header (range id and epoch are required)",
        ))
    })?;
    let range = RangeId(header.range_id);
    let info = store
        .range(range)
        .ok_or_else(|| route_refusal(RouteError::RangeNotFound, range))?;
    let descriptor = info.descriptor();
    if !command::epoch_matches(header.epoch.as_ref(), &descriptor) {
        return Err(Refusal::Detail(command::epoch_not_match(&descriptor)));
    }
    Ok((range, info, descriptor))
}

fn check_keys<'a>(
    descriptor: &RangeDescriptor,
    keys: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(), Refusal> {
    for key in keys {
        if !descriptor.contains_key(key) {
            return Err(Refusal::Detail(command::key_not_in_range(key, descriptor)));
        }
    }
    Ok(())
}

impl KvService {
    /// Checks a write against its range (store, epoch, key span): the command to
    /// propose, and where.
    fn prepare_write(
        &self,
        header: Option<&proto::RequestHeader>,
        op: Op,
    ) -> Result<(Arc<Store>, RangeId, proto::Command), Refusal> {
        let store = self.store().map_err(Refusal::Status)?;
        let (range, _info, descriptor) = locate(&store, header)?;
        let command = proto::Command {
            epoch: descriptor.epoch,
            op: Some(op),
            session: header.and_then(|h| h.session),
        };
        check_keys(&descriptor, command::command_keys(&command))?;
        if let Some(Op::DeleteRange(span)) = &command.op {
            if !command::span_in_range(&span.start_key, &span.end_key, &descriptor) {
                return Err(Refusal::Detail(command::key_not_in_range(
                    &span.start_key,
                    &descriptor,
                )));
            }
        }
        Ok((store, range, command))
    }

    /// Proposes `op` through raft and waits for it to apply.
    async fn write(
        &self,
        header: Option<&proto::RequestHeader>,
        op: Op,
    ) -> Result<Result<WriteResult, proto::Error>, Refusal> {
        let (store, range, command) = self.prepare_write(header, op)?;
        let (respond, answer) = oneshot::channel();
        store
            .propose(range, command, Responder::Call(respond))
            .map_err(|(e, _)| route_refusal(e, range))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => Err(Refusal::Status(Status::unavailable(
                command::OUTCOME_UNKNOWN,
            ))),
            Err(_) => Err(Refusal::Status(Status::deadline_exceeded(
                "the write was not applied in time: outcome unknown",
            ))),
        }
    }

    /// A put, delete or batch put of a batch-commands stream, on the stream's own
    /// task: checked and proposed here, answered by the worker straight onto the
    /// stream (`Responder::Stream`), or refused here. No task, timer or wake-up per
    /// write; the client's deadline bounds the wait.
    fn stream_write(&self, id: u64, kind: StreamWrite, op: WriteOp, answers: &StreamAnswers) {
        let refusal = match op {
            Err(status) => Refusal::Status(status),
            Ok((header, op)) => match self.prepare_write(header.as_ref(), op) {
                Err(refusal) => refusal,
                Ok((store, range, command)) => {
                    let reply = StreamReply::new(id, kind, answers.clone());
                    match store.propose(range, command, Responder::Stream(reply)) {
                        Ok(()) => return,
                        // Answered "outcome unknown" already (the store stopped).
                        Err((_, None)) => return,
                        Err((error, Some(respond))) => {
                            respond.disarm();
                            route_refusal(error, range)
                        }
                    }
                }
            },
        };
        let response = match refusal {
            Refusal::Detail(error) => {
                let error = Some(error);
                proto::batch_commands_response::Response {
                    id,
                    cmd: Some(match kind {
                        StreamWrite::Put => Resp::Put(proto::PutResponse { error }),
                        StreamWrite::Delete => Resp::Delete(proto::DeleteResponse { error }),
                        StreamWrite::BatchPut => Resp::BatchPut(proto::BatchPutResponse { error }),
                    }),
                    status_code: 0,
                    status_message: String::new(),
                }
            }
            Refusal::Status(status) => status_response(id, status),
        };
        let _ = answers.send(response);
    }

    /// A put's checks; the batch to propose.
    fn put_op(&self, request: proto::PutRequest) -> WriteOp {
        self.check_size(&request)?;
        validate::key(&request.key)?;
        validate::value(&request.value)?;
        let op = one_mutation(proto::mutation::Op::Put, request.key, request.value);
        Ok((request.header, op))
    }

    /// A delete's checks; the batch to propose.
    fn delete_op(&self, request: proto::DeleteRequest) -> WriteOp {
        self.check_size(&request)?;
        validate::key(&request.key)?;
        let op = one_mutation(proto::mutation::Op::Delete, request.key, Default::default());
        Ok((request.header, op))
    }

    /// A batch put's checks; the batch to propose.
    fn batch_put_op(&self, mut request: proto::BatchPutRequest) -> WriteOp {
        self.check_size(&request)?;
        validate::batch_len(request.mutations.len())?;
        for mutation in &request.mutations {
            validate::key(&mutation.key)?;
            validate::value(&mutation.value)?;
            if proto::mutation::Op::try_from(mutation.op).is_err() {
                return Err(Status::invalid_argument(format!(
                    "unknown mutation op {} (allowed: OP_PUT, OP_DELETE)",
                    mutation.op
                )));
            }
        }
        let header = request.header.take();
        Ok((header, Op::Batch(request)))
    }

    /// Waits until the local state machine may serve a linearizable read of the
    /// range (or, for a stale read, checks only that the range is here).
    async fn read_point(
        &self,
        header: Option<&proto::RequestHeader>,
    ) -> Result<RangeDescriptor, Refusal> {
        let store = self.store().map_err(Refusal::Status)?;
        let (range, info, descriptor) = locate(&store, header)?;
        if header.is_some_and(|h| h.stale_read) {
            return Ok(descriptor);
        }
        // Within the lease the worker published, serve here: no trip through the
        // worker's loop (which may be busy applying a large batch).
        if !store.is_stopped() && info.lease_holds(Instant::now()) {
            info.local_reads.fetch_add(1, Ordering::Relaxed);
            return Ok(descriptor);
        }
        let (respond, answer) = oneshot::channel();
        store
            .read(range, respond)
            .map_err(|e| route_refusal(e, range))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
            Ok(Ok(Ok(()))) => Ok(descriptor),
            Ok(Ok(Err(detail))) => Err(Refusal::Detail(detail)),
            Ok(Err(_)) => Err(Refusal::Status(Status::unavailable("the store stopped"))),
            Err(_) => Err(Refusal::Status(Status::deadline_exceeded(
                "no read index in time (no quorum?)",
            ))),
        }
    }

    fn get_value(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        self.store()?
            .state()
            .get(key)
            .map_err(|e| Status::internal(format!("state machine read failed: {e}")))
    }
}

/// Answers a response type `$resp` from a refusal: details in-band, statuses as is.
macro_rules! refuse {
    ($refusal:expr, $resp:ty) => {
        match $refusal {
            Refusal::Detail(error) => Ok(Response::new(<$resp>::default_with_error(error))),
            Refusal::Status(status) => Err(status),
        }
    };
}

trait WithError {
    fn default_with_error(error: proto::Error) -> Self;
}

macro_rules! with_error {
    ($($t:ty),*) => {$(
        impl WithError for $t {
            #[allow(clippy::needless_update)]
            fn default_with_error(error: proto::Error) -> Self {
                Self { error: Some(error), ..Default::default() }
            }
        }
    )*};
}

with_error!(
    proto::GetResponse,
    proto::PutResponse,
    proto::DeleteResponse,
    proto::ScanResponse,
    proto::BatchGetResponse,
    proto::BatchPutResponse,
    proto::CompareAndSwapResponse,
    proto::DeleteRangeResponse,
    proto::OpenSessionResponse,
    proto::TransferLeaderResponse
);

/// A batch of one mutation (what a put or a delete proposes).
fn one_mutation(
    op: proto::mutation::Op,
    key: prost::bytes::Bytes,
    value: prost::bytes::Bytes,
) -> Op {
    Op::Batch(proto::BatchPutRequest {
        header: None,
        mutations: vec![proto::Mutation {
            op: op as i32,
            key,
            value,
        }],
    })
}

/// A write's header and the batch to propose, or why it is refused.
type WriteOp = Result<(Option<proto::RequestHeader>, Op), Status>;

type Req = proto::batch_commands_request::request::Cmd;
type Resp = proto::batch_commands_response::response::Cmd;

/// The answer to request `id` of a batch-commands stream that failed with `status`.
fn status_response(id: u64, status: Status) -> proto::batch_commands_response::Response {
    proto::batch_commands_response::Response {
        id,
        cmd: None,
        status_code: status.code() as i32,
        status_message: status.message().to_string(),
    }
}

/// Requests of one batch-commands stream answered together in one response message.
const BATCH_RESPONSES_MAX: usize = 1024;

impl KvService {
    /// Runs one request of a batch-commands stream exactly as its unary call.
    async fn run_command(
        self,
        cmd: proto::batch_commands_request::request::Cmd,
    ) -> Result<proto::batch_commands_response::response::Cmd, Status> {
        use proto::batch_commands_request::request::Cmd as Req;
        use proto::batch_commands_response::response::Cmd as Resp;
        Ok(match cmd {
            Req::Get(r) => Resp::Get(self.get(Request::new(r)).await?.into_inner()),
            Req::Put(r) => Resp::Put(self.put(Request::new(r)).await?.into_inner()),
            Req::Delete(r) => Resp::Delete(self.delete(Request::new(r)).await?.into_inner()),
            Req::Scan(r) => Resp::Scan(self.scan(Request::new(r)).await?.into_inner()),
            Req::BatchGet(r) => Resp::BatchGet(self.batch_get(Request::new(r)).await?.into_inner()),
            Req::BatchPut(r) => Resp::BatchPut(self.batch_put(Request::new(r)).await?.into_inner()),
            Req::Cas(r) => Resp::Cas(self.compare_and_swap(Request::new(r)).await?.into_inner()),
            Req::DeleteRange(r) => {
                Resp::DeleteRange(self.delete_range(Request::new(r)).await?.into_inner())
            }
            Req::OpenSession(r) => {
                Resp::OpenSession(self.open_session(Request::new(r)).await?.into_inner())
            }
        })
    }
}

type ResponseStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<proto::BatchCommandsResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl Kv for KvService {
    type BatchCommandsStream = ResponseStream;

    /// Every request of the stream runs concurrently; answers are sent as they are
    /// ready, as many per message as are ready together. Puts, deletes and batch puts
    /// are checked and proposed on the stream's task and answered by the worker
    /// straight onto the stream (`stream_write`); reads and CAS run as a task each.
    async fn batch_commands(
        &self,
        request: Request<Streaming<proto::BatchCommandsRequest>>,
    ) -> Result<Response<Self::BatchCommandsStream>, Status> {
        let mut incoming = request.into_inner();
        let (answers, ready) = tokio::sync::mpsc::unbounded_channel();
        // Why the request stream ended early, if it did: the answer stream ends with
        // this status once every request accepted before it is answered.
        let failed: Arc<std::sync::Mutex<Option<Status>>> = Arc::default();
        let reader_failed = failed.clone();
        let service = self.clone();
        tokio::spawn(async move {
            let mut received = 0u64;
            loop {
                let batch = match incoming.message().await {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(status) => {
                        let status = Status::invalid_argument(format!(
                            "batch-commands message {} could not be read ({}); the {received} \
                             messages before it were taken and are answered, nothing after it is",
                            received + 1,
                            status.message()
                        ));
                        *reader_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                        break;
                    }
                };
                received += 1;
                if let Some(store) = service.store.upgrade() {
                    let counters = store.counters();
                    counters.batch_messages_in.fetch_add(1, Ordering::Relaxed);
                    counters
                        .batch_requests_in
                        .fetch_add(batch.requests.len() as u64, Ordering::Relaxed);
                }
                for request in batch.requests {
                    let id = request.id;
                    let (kind, op) = match request.cmd {
                        Some(Req::Put(r)) => (StreamWrite::Put, service.put_op(r)),
                        Some(Req::Delete(r)) => (StreamWrite::Delete, service.delete_op(r)),
                        Some(Req::BatchPut(r)) => (StreamWrite::BatchPut, service.batch_put_op(r)),
                        other => {
                            // Reads (served in parallel on the runtime's threads) and CAS.
                            let (service, answers) = (service.clone(), answers.clone());
                            tokio::spawn(async move {
                                let response = match other {
                                    None => Err(Status::invalid_argument(
                                        "batch command without a request",
                                    )),
                                    Some(cmd) => service.run_command(cmd).await,
                                };
                                let _ = answers.send(match response {
                                    Ok(cmd) => proto::batch_commands_response::Response {
                                        id,
                                        cmd: Some(cmd),
                                        status_code: 0,
                                        status_message: String::new(),
                                    },
                                    Err(status) => status_response(id, status),
                                });
                            });
                            continue;
                        }
                    };
                    service.stream_write(id, kind, op, &answers);
                }
            }
        });
        // The answer channel closes once the reader and every request it accepted have
        // dropped their senders: then every accepted request has its answer queued.
        let stream =
            futures_util::stream::unfold((ready, failed), |(mut ready, failed)| async move {
                let Some(first) = ready.recv().await else {
                    let status = failed.lock().unwrap_or_else(|p| p.into_inner()).take()?;
                    return Some((Err(status), (ready, failed)));
                };
                let mut responses = vec![first];
                while responses.len() < BATCH_RESPONSES_MAX {
                    match ready.try_recv() {
                        Ok(response) => responses.push(response),
                        Err(_) => break,
                    }
                }
                Some((
                    Ok(proto::BatchCommandsResponse { responses }),
                    (ready, failed),
                ))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        let request = request.into_inner();
        self.check_size(&request)?;
        validate::key(&request.key)?;
        let descriptor = match self.read_point(request.header.as_ref()).await {
            Ok(d) => d,
            Err(refusal) => return refuse!(refusal, proto::GetResponse),
        };
        if let Err(refusal) = check_keys(&descriptor, [&request.key[..]]) {
            return refuse!(refusal, proto::GetResponse);
        }
        let value = self.get_value(&request.key)?;
        Ok(Response::new(proto::GetResponse {
            error: None,
            found: value.is_some(),
            value: value.unwrap_or_default().into(),
        }))
    }

    async fn put(
        &self,
        request: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        let (header, op) = self.put_op(request.into_inner())?;
        match self.write(header.as_ref(), op).await {
            Ok(Ok(_)) => Ok(Response::new(proto::PutResponse::default())),
            Ok(Err(error)) => Ok(Response::new(proto::PutResponse::default_with_error(error))),
            Err(refusal) => refuse!(refusal, proto::PutResponse),
        }
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let (header, op) = self.delete_op(request.into_inner())?;
        match self.write(header.as_ref(), op).await {
            Ok(Ok(_)) => Ok(Response::new(proto::DeleteResponse::default())),
            Ok(Err(error)) => Ok(Response::new(proto::DeleteResponse::default_with_error(
                error,
            ))),
            Err(refusal) => refuse!(refusal, proto::DeleteResponse),
        }
    }

    async fn scan(
        &self,
        request: Request<proto::ScanRequest>,
    ) -> Result<Response<proto::ScanResponse>, Status> {
        let request = request.into_inner();
        self.check_size(&request)?;
        validate::span(&request.start_key, &request.end_key)?;
        let limit = match request.limit {
            0 => SCAN_LIMIT_DEFAULT,
            n if n as usize > limits::BATCH_KEYS_MAX => {
                return Err(Invalid {
                    limit: format!("batch_keys_max={}", limits::BATCH_KEYS_MAX),
                    message: format!("scan limit {n} is too large"),
                }
                .into())
            }
            n => n as usize,
        };
        let descriptor = match self.read_point(request.header.as_ref()).await {
            Ok(d) => d,
            Err(refusal) => return refuse!(refusal, proto::ScanResponse),
        };
        // Clamp to the range: a scan never reads keys of another range.
        let start = request
            .start_key
            .as_ref()
            .max(descriptor.start_key.as_ref())
            .to_vec();
        let end = match (request.end_key.is_empty(), descriptor.end_key.is_empty()) {
            (true, _) => descriptor.end_key.to_vec(),
            (false, true) => request.end_key.to_vec(),
            (false, false) => request
                .end_key
                .as_ref()
                .min(descriptor.end_key.as_ref())
                .to_vec(),
        };
        if !descriptor.end_key.is_empty() && start >= descriptor.end_key[..].to_vec() {
            return Ok(Response::new(proto::ScanResponse::default()));
        }
        let mut found = self
            .store()?
            .state()
            .scan(&start, &end, limit + 1, request.keys_only)
            .map_err(|e| Status::internal(format!("state machine read failed: {e}")))?;
        let resume_key = if found.len() > limit {
            found.pop().map(|(key, _)| key).unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(Response::new(proto::ScanResponse {
            error: None,
            pairs: found
                .into_iter()
                .map(|(key, value)| proto::KeyValue {
                    key: key.into(),
                    value: value.into(),
                })
                .collect(),
            resume_key: resume_key.into(),
        }))
    }

    async fn batch_get(
        &self,
        request: Request<proto::BatchGetRequest>,
    ) -> Result<Response<proto::BatchGetResponse>, Status> {
        let request = request.into_inner();
        self.check_size(&request)?;
        validate::batch_len(request.keys.len())?;
        for key in &request.keys {
            validate::key(key)?;
        }
        let descriptor = match self.read_point(request.header.as_ref()).await {
            Ok(d) => d,
            Err(refusal) => return refuse!(refusal, proto::BatchGetResponse),
        };
        if let Err(refusal) = check_keys(&descriptor, request.keys.iter().map(|k| &k[..])) {
            return refuse!(refusal, proto::BatchGetResponse);
        }
        let mut pairs = Vec::new();
        for key in request.keys {
            if let Some(value) = self.get_value(&key)? {
                pairs.push(proto::KeyValue {
                    key,
                    value: value.into(),
                });
            }
        }
        Ok(Response::new(proto::BatchGetResponse {
            error: None,
            pairs,
        }))
    }

    async fn batch_put(
        &self,
        request: Request<proto::BatchPutRequest>,
    ) -> Result<Response<proto::BatchPutResponse>, Status> {
        let (header, op) = self.batch_put_op(request.into_inner())?;
        match self.write(header.as_ref(), op).await {
            Ok(Ok(_)) => Ok(Response::new(proto::BatchPutResponse::default())),
            Ok(Err(error)) => Ok(Response::new(proto::BatchPutResponse::default_with_error(
                error,
            ))),
            Err(refusal) => refuse!(refusal, proto::BatchPutResponse),
        }
    }

    async fn compare_and_swap(
        &self,
        request: Request<proto::CompareAndSwapRequest>,
    ) -> Result<Response<proto::CompareAndSwapResponse>, Status> {
        let mut request = request.into_inner();
        self.check_size(&request)?;
        validate::key(&request.key)?;
        validate::value(&request.expected_value)?;
        validate::value(&request.new_value)?;
        let header = request.header.take();
        match self.write(header.as_ref(), Op::Cas(request)).await {
            Ok(Ok(WriteResult::Cas {
                succeeded,
                previous,
            })) => Ok(Response::new(proto::CompareAndSwapResponse {
                error: None,
                succeeded,
                previous_found: previous.is_some(),
                previous_value: previous.unwrap_or_default().into(),
            })),
            Ok(Ok(WriteResult::Done | WriteResult::Opened(_))) => Err(Status::internal(
                "compare-and-swap applied without a result",
            )),
            Ok(Err(error)) => Ok(Response::new(
                proto::CompareAndSwapResponse::default_with_error(error),
            )),
            Err(refusal) => refuse!(refusal, proto::CompareAndSwapResponse),
        }
    }

    async fn open_session(
        &self,
        request: Request<proto::OpenSessionRequest>,
    ) -> Result<Response<proto::OpenSessionResponse>, Status> {
        let mut request = request.into_inner();
        self.check_size(&request)?;
        let mut header = request.header.take();
        // The session is named by the request itself, not as a write's session.
        if let Some(header) = header.as_mut() {
            header.session = None;
        }
        match self.write(header.as_ref(), Op::OpenSession(request)).await {
            Ok(Ok(WriteResult::Opened(opened_at))) => {
                Ok(Response::new(proto::OpenSessionResponse {
                    error: None,
                    opened_at,
                }))
            }
            Ok(Ok(_)) => Err(Status::internal("a session open applied without a result")),
            Ok(Err(error)) => Ok(Response::new(
                proto::OpenSessionResponse::default_with_error(error),
            )),
            Err(refusal) => refuse!(refusal, proto::OpenSessionResponse),
        }
    }

    async fn transfer_leader(
        &self,
        request: Request<proto::TransferLeaderRequest>,
    ) -> Result<Response<proto::TransferLeaderResponse>, Status> {
        let request = request.into_inner();
        let store = self.store()?;
        let (range, _info, descriptor) = match locate(&store, request.header.as_ref()) {
            Ok(located) => located,
            Err(refusal) => return refuse!(refusal, proto::TransferLeaderResponse),
        };
        let to = request.to_store_id;
        let Some(target) = descriptor.replicas.iter().find(|p| p.store_id == to) else {
            return Err(Status::invalid_argument(format!(
                "store {to} holds no replica of range {}",
                range.get()
            )));
        };
        if target.role != proto::PeerRole::Voter as i32 {
            return Err(Status::invalid_argument(format!(
                "the replica of range {} on store {to} is not a voter: only a voter can lead",
                range.get()
            )));
        }
        let (respond, answer) = oneshot::channel();
        if let Err(error) = store.transfer_leader(range, target.peer_id, respond) {
            return refuse!(route_refusal(error, range), proto::TransferLeaderResponse);
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
            Ok(Ok(Ok(()))) => Ok(Response::new(proto::TransferLeaderResponse::default())),
            Ok(Ok(Err(error))) => Ok(Response::new(
                proto::TransferLeaderResponse::default_with_error(error),
            )),
            Ok(Err(_)) => Err(Status::unavailable("the store stopped")),
            Err(_) => Err(Status::deadline_exceeded(
                "the range's worker did not take the transfer in time",
            )),
        }
    }

    async fn delete_range(
        &self,
        request: Request<proto::DeleteRangeRequest>,
    ) -> Result<Response<proto::DeleteRangeResponse>, Status> {
        let mut request = request.into_inner();
        self.check_size(&request)?;
        validate::span(&request.start_key, &request.end_key)?;
        let header = request.header.take();
        match self.write(header.as_ref(), Op::DeleteRange(request)).await {
            Ok(Ok(_)) => Ok(Response::new(proto::DeleteRangeResponse::default())),
            Ok(Err(error)) => Ok(Response::new(
                proto::DeleteRangeResponse::default_with_error(error),
            )),
            Err(refusal) => refuse!(refusal, proto::DeleteRangeResponse),
        }
    }
}

/// Receives raft batches from other stores.
pub struct RaftService {
    store: Weak<Store>,
}

impl RaftService {
    pub fn new(store: &Arc<Store>) -> Self {
        RaftService {
            store: Arc::downgrade(store),
        }
    }
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn send(
        &self,
        request: Request<Streaming<proto::RaftBatch>>,
    ) -> Result<Response<proto::RaftDone>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            let Some(store) = self.store.upgrade() else {
                return Err(Status::unavailable("the store is stopping"));
            };
            let local = store.store_id().get();
            if batch.to_store != local {
                return Err(Status::invalid_argument(format!(
                    "batch for store {} reached store {local}",
                    batch.to_store
                )));
            }
            store.deliver(batch);
        }
        Ok(Response::new(proto::RaftDone {}))
    }
}

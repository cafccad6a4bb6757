//! One batch-commands stream per store: concurrent calls to the same store leave in
//! one message (as many as are queued when the sender gets to them), and answers come
//! back matched by id. A per-request RPC would otherwise cap throughput.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rangekv_rpc::proto::{self, kv_client::KvClient};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub(crate) type Cmd = proto::batch_commands_request::request::Cmd;
pub(crate) type Reply = proto::batch_commands_response::response::Cmd;

/// Calls queued per store before callers wait.
const QUEUE_CALLS: usize = 65_536;
/// Calls per message at most.
const BATCH_CALLS_MAX: usize = 1024;
/// Calls awaiting their answer on the stream from which the sender, woken by one new
/// call, first yields once to the runtime so that the calls other tasks are about to
/// queue leave in the same message. Below it (light load) a call leaves at once.
const GATHER_AFTER_WAITING_CALLS: usize = 8;

type Waiters = Arc<Mutex<FxHashMap<u64, oneshot::Sender<Result<Reply, Status>>>>>;

struct Call {
    cmd: Cmd,
    done: oneshot::Sender<Result<Reply, Status>>,
}

/// A store's batch-commands stream. Once broken (the stream ended), calls fail and
/// the client opens a new one.
#[derive(Clone)]
pub(crate) struct Conn {
    calls: mpsc::Sender<Call>,
    broken: Arc<AtomicBool>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conn {
    pub fn open(client: KvClient<Channel>) -> Conn {
        let (calls, queued) = mpsc::channel(QUEUE_CALLS);
        let broken = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(client, queued, broken.clone()));
        Conn { calls, broken }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst) || self.calls.is_closed()
    }

    /// Sends `cmd` with whatever else is queued for the store and waits for its answer.
    pub async fn call(&self, cmd: Cmd) -> Result<Reply, Status> {
        let (done, answer) = oneshot::channel();
        self.calls.send(Call { cmd, done }).await.map_err(|_| {
            Status::unavailable("the store connection is closed (request not sent)")
        })?;
        answer.await.map_err(|_| {
            Status::unavailable("the store connection broke before the answer: outcome unknown")
        })?
    }
}

fn answer(response: proto::batch_commands_response::Response) -> Result<Reply, Status> {
    if response.status_code != 0 {
        return Err(Status::new(
            Code::from(response.status_code),
            response.status_message,
        ));
    }
    response
        .cmd
        .ok_or_else(|| Status::internal("batch-commands response without a result"))
}

async fn run(
    mut client: KvClient<Channel>,
    mut queued: mpsc::Receiver<Call>,
    broken: Arc<AtomicBool>,
) {
    let (requests, outgoing) = mpsc::channel::<proto::BatchCommandsRequest>(64);
    let mut responses = match client.batch_commands(ReceiverStream::new(outgoing)).await {
        Ok(response) => response.into_inner(),
        Err(_) => {
            broken.store(true, Ordering::SeqCst);
            return; // queued calls see a closed channel: not sent
        }
    };
    let waiters: Waiters = Arc::new(Mutex::new(FxHashMap::default()));
    let reader = {
        let (waiters, broken) = (waiters.clone(), broken.clone());
        tokio::spawn(async move {
            while let Ok(Some(batch)) = responses.message().await {
                for response in batch.responses {
                    if let Some(done) = lock(&waiters).remove(&response.id) {
                        let _ = done.send(answer(response));
                    }
                }
            }
            broken.store(true, Ordering::SeqCst);
            // Dropping the waiters tells their callers the outcome is unknown.
            lock(&waiters).clear();
        })
    };
    let next_id = AtomicU64::new(1);
    while let Some(first) = queued.recv().await {
        if broken.load(Ordering::SeqCst) {
            break;
        }
        let mut calls = vec![first];
        // Under load the sender would otherwise run as soon as one call is queued and
        // send ~1 call per message: a syscall and an h2 frame on both ends per call.
        if lock(&waiters).len() >= GATHER_AFTER_WAITING_CALLS {
            tokio::task::yield_now().await;
        }
        while calls.len() < BATCH_CALLS_MAX {
            match queued.try_recv() {
                Ok(call) => calls.push(call),
                Err(_) => break,
            }
        }
        let mut batch = Vec::with_capacity(calls.len());
        {
            let mut waiting = lock(&waiters);
            for call in calls {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                waiting.insert(id, call.done);
                batch.push(proto::batch_commands_request::Request {
                    id,
                    cmd: Some(call.cmd),
                });
            }
        }
        if requests
            .send(proto::BatchCommandsRequest { requests: batch })
            .await
            .is_err()
        {
            break;
        }
    }
    broken.store(true, Ordering::SeqCst);
    drop(requests);
    let _ = reader.await;
}

//! Store-to-store raft transport: one long-lived gRPC stream per ordered store pair.
//!
//! Workers queue raft messages and heartbeats per destination store; `flush` (once
//! per worker loop) turns what is queued into one `RaftBatch` per store. Heartbeats
//! without a ReadIndex context are held for the tick batch, which goes to every
//! known store once per tick, empty or not: the store-level liveness signal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rangekv_rpc::proto::{self, placement_client::PlacementClient, raft_client::RaftClient};
use rangekv_types::StoreId;
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Where workers hand outgoing raft traffic.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, to: StoreId, envelope: proto::RaftEnvelope);
    /// `response`: a heartbeat response; `urgent`: carries a ReadIndex context and
    /// goes out with the next flush instead of the next tick.
    fn heartbeat(
        &self,
        to: StoreId,
        heartbeat: proto::CoalescedHeartbeat,
        response: bool,
        urgent: bool,
    );
    fn flush(&self);
    /// Tells a follower on `to` that its range is idle (sent with the tick batch).
    fn quiesce(&self, to: StoreId, heartbeat: proto::CoalescedHeartbeat);
    /// Every store this one sends tick batches to.
    fn known_stores(&self) -> Vec<StoreId>;
}

#[derive(Default)]
struct Outbox {
    messages: Vec<proto::RaftEnvelope>,
    heartbeats: Vec<proto::CoalescedHeartbeat>,
    responses: Vec<proto::CoalescedHeartbeat>,
    tick_heartbeats: Vec<proto::CoalescedHeartbeat>,
    tick_responses: Vec<proto::CoalescedHeartbeat>,
    quiesce: Vec<proto::CoalescedHeartbeat>,
}

/// Per destination: batches sent (tick batches included) and tick batches.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub batches: AtomicU64,
    pub tick_batches: AtomicU64,
    pub dropped: AtomicU64,
}

struct Link {
    sender: mpsc::Sender<proto::RaftBatch>,
    counters: Arc<LinkCounters>,
}

/// Batches queued per link while its stream is down before new ones are dropped
/// (raft retransmits what is lost).
const LINK_QUEUE_BATCHES: usize = 4096;
/// Raft messages are split into batches of about this many bytes.
pub const BATCH_BYTES_TARGET: usize = 4 * 1024 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub struct GrpcTransport {
    store_id: StoreId,
    pd: String,
    runtime: tokio::runtime::Handle,
    outboxes: Mutex<FxHashMap<StoreId, Outbox>>,
    links: Mutex<FxHashMap<StoreId, Link>>,
    unreachable: OnceLock<Box<dyn Fn(StoreId) + Send + Sync>>,
    message_bytes_max: usize,
    stopped: std::sync::atomic::AtomicBool,
}

impl GrpcTransport {
    /// `pd`: the placement driver endpoint, used to resolve store addresses.
    pub fn new(
        store_id: StoreId,
        pd: String,
        runtime: tokio::runtime::Handle,
        message_bytes_max: usize,
    ) -> Arc<Self> {
        Arc::new(GrpcTransport {
            store_id,
            pd,
            runtime,
            outboxes: Mutex::new(FxHashMap::default()),
            links: Mutex::new(FxHashMap::default()),
            unreachable: OnceLock::new(),
            message_bytes_max,
            stopped: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Called with a store whose stream failed (raft-rs `report_unreachable`).
    pub fn on_unreachable(&self, report: Box<dyn Fn(StoreId) + Send + Sync>) {
        let _ = self.unreachable.set(report);
    }

    pub fn counters(&self, to: StoreId) -> Option<Arc<LinkCounters>> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&to)
            .map(|link| link.counters.clone())
    }

    /// Makes `to` a known store: it gets a tick batch every tick from now on.
    pub fn add_store(self: &Arc<Self>, to: StoreId) {
        if to == self.store_id {
            return;
        }
        self.outboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(to)
            .or_default();
    }

    fn outbox<T>(&self, to: StoreId, f: impl FnOnce(&mut Outbox) -> T) -> T {
        let mut outboxes = self.outboxes.lock().unwrap_or_else(|p| p.into_inner());
        f(outboxes.entry(to).or_default())
    }

    /// Sends nothing more, ever; streams close.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.links.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn push(self: &Arc<Self>, to: StoreId, batch: proto::RaftBatch, tick: bool) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let link = links.entry(to).or_insert_with(|| self.connect(to));
        match link.sender.try_send(batch) {
            Ok(()) => {
                link.counters.batches.fetch_add(1, Ordering::Relaxed);
                if tick {
                    link.counters.tick_batches.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                link.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn connect(self: &Arc<Self>, to: StoreId) -> Link {
        let (sender, receiver) = mpsc::channel(LINK_QUEUE_BATCHES);
        let counters = Arc::new(LinkCounters::default());
        let transport = Arc::downgrade(self);
        self.runtime.spawn(run_link(transport, to, receiver));
        Link { sender, counters }
    }

    fn flush_inner(self: &Arc<Self>) {
        let mut ready: Vec<(StoreId, proto::RaftBatch)> = Vec::new();
        {
            let mut outboxes = self.outboxes.lock().unwrap_or_else(|p| p.into_inner());
            for (to, outbox) in outboxes.iter_mut() {
                if outbox.messages.is_empty()
                    && outbox.heartbeats.is_empty()
                    && outbox.responses.is_empty()
                {
                    continue;
                }
                let mut batch = self.empty_batch(*to, false);
                batch.heartbeats = std::mem::take(&mut outbox.heartbeats);
                batch.heartbeat_responses = std::mem::take(&mut outbox.responses);
                let mut bytes = 0;
                for envelope in outbox.messages.drain(..) {
                    let size = envelope.message.len() + 16;
                    // Batches stay under BATCH_BYTES_TARGET unless one message alone
                    // is larger (bounded by the request limit).
                    if bytes > 0 && bytes + size > BATCH_BYTES_TARGET {
                        let next = self.empty_batch(*to, false);
                        ready.push((*to, std::mem::replace(&mut batch, next)));
                        bytes = 0;
                    }
                    bytes += size;
                    batch.messages.push(envelope);
                }
                ready.push((*to, batch));
            }
        }
        for (to, batch) in ready {
            self.push(to, batch, false);
        }
    }

    fn empty_batch(&self, to: StoreId, tick: bool) -> proto::RaftBatch {
        proto::RaftBatch {
            from_store: self.store_id.get(),
            to_store: to.get(),
            messages: Vec::new(),
            heartbeats: Vec::new(),
            heartbeat_responses: Vec::new(),
            quiesce: Vec::new(),
            tick,
        }
    }

    /// Sends every known store its tick batch (held heartbeats and responses).
    pub fn tick(self: &Arc<Self>) {
        let batches: Vec<(StoreId, proto::RaftBatch)> = {
            let mut outboxes = self.outboxes.lock().unwrap_or_else(|p| p.into_inner());
            outboxes
                .iter_mut()
                .map(|(to, outbox)| {
                    let mut batch = self.empty_batch(*to, true);
                    batch.heartbeats = std::mem::take(&mut outbox.tick_heartbeats);
                    batch.heartbeat_responses = std::mem::take(&mut outbox.tick_responses);
                    batch.quiesce = std::mem::take(&mut outbox.quiesce);
                    (*to, batch)
                })
                .collect()
        };
        for (to, batch) in batches {
            self.push(to, batch, true);
        }
    }

    /// Runs [`GrpcTransport::tick`] every `interval` until the transport is dropped.
    pub fn start_ticker(self: &Arc<Self>, interval: Duration) {
        let transport = Arc::downgrade(self);
        self.runtime.spawn(async move {
            let mut timer = tokio::time::interval(interval);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                timer.tick().await;
                let Some(transport) = transport.upgrade() else {
                    return;
                };
                transport.tick();
            }
        });
    }

    async fn resolve(&self, to: StoreId) -> Result<String, crate::NodeError> {
        let mut client = PlacementClient::connect(self.pd.clone()).await?;
        let store = client
            .get_store(proto::GetStoreRequest { store_id: to.get() })
            .await?
            .into_inner()
            .store
            .ok_or(crate::NodeError::UnknownStore(to))?;
        Ok(store.address)
    }
}

/// Keeps one stream to `to` up, forwarding queued batches, reconnecting with backoff.
async fn run_link(
    transport: std::sync::Weak<GrpcTransport>,
    to: StoreId,
    mut queued: mpsc::Receiver<proto::RaftBatch>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(strong) = transport.upgrade() else {
            return;
        };
        let bytes_max = strong.message_bytes_max;
        let connected = async {
            let address = strong.resolve(to).await?;
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true);
            Ok::<_, crate::NodeError>(endpoint.connect().await?)
        }
        .await;
        drop(strong);
        let channel = match connected {
            Ok(channel) => channel,
            Err(error) => {
                tracing::debug!(%to, %error, "cannot reach store");
                report(&transport, to);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let mut client = RaftClient::new(channel)
            .max_encoding_message_size(bytes_max)
            .max_decoding_message_size(bytes_max);
        let (stream_in, stream_out) = mpsc::channel(64);
        let call = client.send(ReceiverStream::new(stream_out));
        tokio::pin!(call);
        let mut forwarded = 0u64;
        loop {
            tokio::select! {
                result = &mut call => {
                    if let Err(status) = result {
                        tracing::debug!(%to, %status, "raft stream ended");
                    }
                    break;
                }
                batch = queued.recv() => {
                    let Some(batch) = batch else {
                        return;
                    };
                    if stream_in.send(batch).await.is_err() {
                        break;
                    }
                    forwarded += 1;
                    if forwarded == 1 {
                        backoff = BACKOFF_MIN;
                    }
                }
            }
        }
        report(&transport, to);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn report(transport: &std::sync::Weak<GrpcTransport>, to: StoreId) {
    if let Some(transport) = transport.upgrade() {
        if let Some(report) = transport.unreachable.get() {
            report(to);
        }
    }
}

impl Transport for Arc<GrpcTransport> {
    fn send(&self, to: StoreId, envelope: proto::RaftEnvelope) {
        self.outbox(to, |o| o.messages.push(envelope));
    }

    fn heartbeat(
        &self,
        to: StoreId,
        heartbeat: proto::CoalescedHeartbeat,
        response: bool,
        urgent: bool,
    ) {
        self.outbox(to, |o| match (response, urgent) {
            (false, false) => o.tick_heartbeats.push(heartbeat),
            (true, false) => o.tick_responses.push(heartbeat),
            (false, true) => o.heartbeats.push(heartbeat),
            (true, true) => o.responses.push(heartbeat),
        });
    }

    fn flush(&self) {
        self.flush_inner();
    }

    fn quiesce(&self, to: StoreId, heartbeat: proto::CoalescedHeartbeat) {
        self.outbox(to, |o| o.quiesce.push(heartbeat));
    }

    fn known_stores(&self) -> Vec<StoreId> {
        self.outboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }
}

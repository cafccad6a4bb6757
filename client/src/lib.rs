//! rangekv's async Rust client.
//!
//! A [`Client`] routes each request to the store leading the key's range, from a
//! cache of range descriptors (ordered by start key) and leaders filled from the
//! placement driver (PD). It follows `NotLeader` hints, refreshes the cache on
//! `EpochNotMatch` (from the returned descriptors) and on `RangeNotFound` /
//! `KeyNotInRange` (from PD), backs off with jitter on `ServerBusy` and unreachable
//! stores, and gives up at the call's deadline.
//!
//! **Exactly-once writes.** Every client holds a session (128 random bits) and
//! numbers its writes; each write carries (session, sequence) and the range applies
//! it at most once, answering a repeat with the first application's answer
//! (ARCHITECTURE.md "Client sessions"). So a write whose outcome is unknown (the
//! store stopped, the connection broke, no answer in time) is simply sent again:
//! `put`, `delete`, `batch_put`, `delete_range` and `compare_and_swap` each take
//! effect exactly once when they return `Ok`, however many attempts it took, and a
//! CAS returns the result of its one application. A call that gives up returns
//! [`Error::DeadlineExceeded`] and may or may not have applied (once, at most).
//! A session idle at a range for longer than the store's session lifetime (10
//! minutes by default) is dropped there; a write sent again after that returns
//! [`Error::SessionExpired`] (it may have applied once before; it is never applied
//! twice). `Config::retry_ambiguous_writes = false` makes writes fail fast with
//! [`Error::OutcomeUnknown`] instead of retrying. Errors that prove nothing was
//! applied (`NotLeader`, `EpochNotMatch`, `ServerBusy`, ...) are always retried.
//!
//! See [`Client`] for an example.

mod batch;
mod session;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use rangekv_rpc::proto;
use rangekv_rpc::proto::{kv_client::KvClient, placement_client::PlacementClient};
use rangekv_rpc::RangeDescriptor;
use rustc_hash::FxHashMap;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::batch::{Cmd, Conn, Reply};
use crate::session::{Session, WriteSeq};

/// Sends `$request` as batch command `$variant` on `$conn`; evaluates to the reply of
/// the same kind (inside an async block returning `Result<_, Status>`).
macro_rules! reply {
    ($conn:expr, $variant:ident, $request:expr) => {
        match $conn.call(Cmd::$variant($request)).await? {
            Reply::$variant(reply) => reply,
            _ => return Err(Status::internal("a batch-commands reply of the wrong kind")),
        }
    };
}

/// Client settings. Units last.
#[derive(Debug, Clone)]
pub struct Config {
    /// Deadline of one client call, retries included.
    pub timeout: Duration,
    /// Deadline of one attempt of a call that may be repeated (all but CAS): a store
    /// that stops answering (a paused process, a half-open connection) costs this
    /// much, then the next replica is tried. A CAS waits for its whole `timeout`.
    pub attempt_timeout: Duration,
    /// Deadline of connecting to PD or a store.
    pub connect_timeout: Duration,
    /// First and largest backoff between retries (with jitter).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Keys per scan page (one RPC).
    pub scan_page_keys: u32,
    /// Whether writes (CAS included) are sent again after a failure that leaves their
    /// outcome unknown (default yes: a leader's death stays invisible to the caller,
    /// and the session makes the repeat apply at most once). With `false` such a
    /// write fails fast with [`Error::OutcomeUnknown`].
    pub retry_ambiguous_writes: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
            scan_page_keys: 1000,
            retry_ambiguous_writes: true,
        }
    }
}

/// What can go wrong. Every variant says whether the request may have applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request breaks a limit or is malformed; nothing was applied.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No replica answered in time; for writes, the outcome is unknown.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// A write whose outcome is unknown (it may or may not have applied), returned
    /// only with `Config::retry_ambiguous_writes = false`.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A write sent again after its session expired at the range (idle past the
    /// store's session lifetime): it applied once or not at all, never twice.
    #[error("session expired: {0}")]
    SessionExpired(String),
    /// PD could not be reached or answered with an error.
    #[error("placement driver: {0}")]
    Pd(String),
    /// An error the client does not retry.
    #[error("rpc: {0}")]
    Rpc(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The result of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome {
    pub succeeded: bool,
    /// The value before the call (`None`: absent).
    pub previous: Option<Vec<u8>>,
}

/// One write of a [`Client::batch_put`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

impl Mutation {
    fn key(&self) -> &[u8] {
        match self {
            Mutation::Put(key, _) | Mutation::Delete(key) => key,
        }
    }
}

#[derive(Debug, Clone)]
struct Route {
    descriptor: RangeDescriptor,
    leader: Option<proto::Peer>,
}

/// Range descriptors by start key, and the leaders last seen.
#[derive(Default)]
struct RangeCache {
    by_start: BTreeMap<Vec<u8>, Route>,
}

impl RangeCache {
    fn lookup(&self, key: &[u8]) -> Option<Route> {
        let (_, route) = self.by_start.range(..=key.to_vec()).next_back()?;
        route.descriptor.contains_key(key).then(|| route.clone())
    }

    /// Inserts `route`, dropping every cached range it overlaps.
    fn insert(&mut self, route: Route) {
        let start = route.descriptor.start_key.to_vec();
        let end = route.descriptor.end_key.to_vec();
        let overlapping: Vec<Vec<u8>> = self
            .by_start
            .iter()
            .filter(|(s, r)| {
                let r_end = &r.descriptor.end_key;
                (end.is_empty() || s.as_slice() < end.as_slice())
                    && (r_end.is_empty() || r_end.as_ref() > start.as_slice())
            })
            .map(|(s, _)| s.clone())
            .collect();
        for key in overlapping {
            self.by_start.remove(&key);
        }
        self.by_start.insert(start, route);
    }

    fn remove(&mut self, range_id: u64) {
        self.by_start
            .retain(|_, r| r.descriptor.range_id != range_id);
    }

    fn set_leader(&mut self, range_id: u64, leader: proto::Peer) {
        for route in self.by_start.values_mut() {
            if route.descriptor.range_id == range_id {
                route.leader = Some(leader);
                return;
            }
        }
    }
}

struct Inner {
    pd_endpoints: Vec<String>,
    config: Config,
    cache: Mutex<RangeCache>,
    /// Store id → (address, batch-commands stream), one per store.
    stores: Mutex<FxHashMap<u64, (String, Conn)>>,
    /// The PD connection, shared by every call (HTTP/2 multiplexes them); dropped
    /// when a call finds it unavailable, so the next one tries every endpoint again.
    pd: Mutex<Option<Channel>>,
    /// Held while opening a connection (to PD or a store), so that many tasks
    /// missing it at once open one, not one each: hundreds of simultaneous connects
    /// overflow the listener's backlog and cost a 1 s SYN retransmission.
    connecting: tokio::sync::Mutex<()>,
    /// This client's session: its id, sequence numbers and the ranges it is open at.
    session: Session,
}

/// A handle to a rangekv cluster; cheap to clone, safe to share between tasks.
///
/// ```no_run
/// # async fn demo() -> Result<(), rangekv_client::Error> {
/// use rangekv_client::{Client, Config};
///
/// let client = Client::connect(&["http://127.0.0.1:2379"], Config::default()).await?;
/// client.put(b"user42", b"hello").await?;
/// assert_eq!(client.get(b"user42").await?, Some(b"hello".to_vec()));
/// let swapped = client.compare_and_swap(b"user42", Some(b"hello"), Some(b"bye")).await?;
/// assert!(swapped.succeeded);
/// for (key, value) in client.scan(b"user", b"userz", 100).await? {
///     println!("{key:?} = {value:?}");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// How a failed attempt ends or continues.
enum Next {
    /// Try again at once (the cache was corrected).
    Retry,
    /// Try again after a backoff.
    Backoff,
    /// Stop with this error.
    Fail(Error),
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pseudo-random jitter in [0, 1) without a global RNG.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut x = u64::from(nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    (x % 1_000_000) as f64 / 1_000_000.0
}

fn pd_error(status: Status) -> Error {
    match status.code() {
        Code::InvalidArgument => Error::InvalidArgument(status.message().to_string()),
        _ => Error::Pd(status.message().to_string()),
    }
}

fn invalid(error: rangekv_rpc::validate::Invalid) -> Error {
    Error::InvalidArgument(error.to_string())
}

/// Checks keys (and values) at the client's edge, as the server would.
fn check(keys: &[&[u8]], values: &[&[u8]]) -> Result<()> {
    rangekv_rpc::validate::batch_len(keys.len()).map_err(invalid)?;
    for key in keys {
        rangekv_rpc::validate::key(key).map_err(invalid)?;
    }
    for value in values {
        rangekv_rpc::validate::value(value).map_err(invalid)?;
    }
    Ok(())
}

/// The end of a request's part within a range: the nearer of `end` and `range_end`
/// (either empty means +infinity).
fn span_end(end: &[u8], range_end: &[u8]) -> Vec<u8> {
    match (end.is_empty(), range_end.is_empty()) {
        (true, _) => range_end.to_vec(),
        (false, true) => end.to_vec(),
        (false, false) => end.min(range_end).to_vec(),
    }
}

/// Whether a write refused with `status` certainly did not apply.
fn certainly_not_applied(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted || status.code() == Code::InvalidArgument
}

impl Client {
    /// Connects to PD (any of `pd_endpoints`, e.g. `http://127.0.0.1:2379`) and checks
    /// that the cluster is bootstrapped.
    pub async fn connect(pd_endpoints: &[&str], config: Config) -> Result<Client> {
        if pd_endpoints.is_empty() {
            return Err(Error::InvalidArgument("no PD endpoint given".into()));
        }
        let client = Client {
            inner: Arc::new(Inner {
                pd_endpoints: pd_endpoints.iter().map(|e| e.to_string()).collect(),
                config,
                cache: Mutex::new(RangeCache::default()),
                stores: Mutex::new(FxHashMap::default()),
                pd: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                session: Session::new(),
            }),
        };
        let mut pd = client.pd().await?;
        let status = pd
            .cluster_status(proto::ClusterStatusRequest {})
            .await
            .map_err(|e| client.pd_failed(e))?
            .into_inner();
        if !status.bootstrapped {
            return Err(Error::Pd(format!(
                "the cluster is not bootstrapped yet ({} more stores needed)",
                status.stores_needed
            )));
        }
        Ok(client)
    }

    async fn pd(&self) -> Result<PlacementClient<Channel>> {
        if let Some(channel) = lock(&self.inner.pd).clone() {
            return Ok(PlacementClient::new(channel));
        }
        let _one = self.inner.connecting.lock().await;
        if let Some(channel) = lock(&self.inner.pd).clone() {
            return Ok(PlacementClient::new(channel));
        }
        let mut last = String::new();
        for endpoint in &self.inner.pd_endpoints {
            let connecting = tonic::transport::Endpoint::from_shared(endpoint.clone())
                .map_err(|e| Error::InvalidArgument(format!("PD endpoint {endpoint}: {e}")))?
                .connect_timeout(self.inner.config.connect_timeout);
            match connecting.connect().await {
                Ok(channel) => {
                    *lock(&self.inner.pd) = Some(channel.clone());
                    return Ok(PlacementClient::new(channel));
                }
                Err(error) => last = format!("{endpoint}: {error}"),
            }
        }
        Err(Error::Pd(format!("no PD endpoint reachable ({last})")))
    }

    /// The error of a failed PD call; an unreachable PD's connection is dropped.
    fn pd_failed(&self, status: Status) -> Error {
        if status.code() == Code::Unavailable {
            *lock(&self.inner.pd) = None;
        }
        pd_error(status)
    }

    /// The cached route of `key`, or PD's.
    async fn route(&self, key: &[u8]) -> Result<Route> {
        if let Some(route) = lock(&self.inner.cache).lookup(key) {
            return Ok(route);
        }
        let mut pd = self.pd().await?;
        let found = pd
            .get_range(proto::GetRangeRequest {
                key: key.to_vec().into(),
            })
            .await
            .map_err(|e| self.pd_failed(e))?
            .into_inner()
            .route
            .and_then(|r| {
                Some(Route {
                    descriptor: r.range?,
                    leader: r.leader,
                })
            })
            .ok_or_else(|| Error::Pd(format!("no range holds key {key:?}")))?;
        lock(&self.inner.cache).insert(found.clone());
        Ok(found)
    }

    /// The batch-commands stream to `store`, opened on first use (and again after
    /// it broke).
    async fn store(&self, store: u64) -> Result<Conn> {
        let open = || match lock(&self.inner.stores).get(&store) {
            Some((_, conn)) if !conn.is_broken() => Some(conn.clone()),
            _ => None,
        };
        if let Some(conn) = open() {
            return Ok(conn);
        }
        let mut pd = self.pd().await?;
        let _one = self.inner.connecting.lock().await;
        if let Some(conn) = open() {
            return Ok(conn);
        }
        let address = pd
            .get_store(proto::GetStoreRequest { store_id: store })
            .await
            .map_err(|e| self.pd_failed(e))?
            .into_inner()
            .store
            .ok_or_else(|| Error::Pd(format!("PD does not know store {store}")))?
            .address;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Error::Pd(format!("store {store} address {address}: {e}")))?
            .connect_timeout(self.inner.config.connect_timeout)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| Error::Rpc(format!("store {store} at {address}: {e}")))?;
        let client = KvClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let conn = Conn::open(client);
        lock(&self.inner.stores).insert(store, (address, conn.clone()));
        Ok(conn)
    }

    fn forget_store(&self, store: u64) {
        lock(&self.inner.stores).remove(&store);
    }

    /// What to do after the in-band error `error` from range `route`.
    fn on_detail(&self, route: &Route, error: proto::Error, tried: &mut usize) -> Next {
        use proto::error::Kind;
        match error.kind {
            Some(Kind::NotLeader(not_leader)) => match not_leader.leader {
                Some(leader) if Some(&leader) != route.leader.as_ref() => {
                    lock(&self.inner.cache).set_leader(route.descriptor.range_id, leader);
                    Next::Retry
                }
                _ => {
                    // No leader known (an election is running): try another replica.
                    *tried += 1;
                    Next::Backoff
                }
            },
            Some(Kind::EpochNotMatch(current)) => {
                let mut cache = lock(&self.inner.cache);
                cache.remove(route.descriptor.range_id);
                for descriptor in current.current {
                    cache.insert(Route {
                        descriptor,
                        leader: None,
                    });
                }
                Next::Retry
            }
            Some(Kind::RangeNotFound(_)) | Some(Kind::KeyNotInRange(_)) => {
                lock(&self.inner.cache).remove(route.descriptor.range_id);
                *tried += 1;
                Next::Backoff
            }
            Some(Kind::ServerBusy(_)) => Next::Backoff,
            // A read carries no session; a write's is handled by `on_range`.
            Some(Kind::SessionExpired(expired)) => Next::Fail(Error::SessionExpired(format!(
                "range {} refused sequence {}",
                route.descriptor.range_id, expired.sequence
            ))),
            Some(Kind::InvalidArgument(invalid)) => Next::Fail(Error::InvalidArgument(format!(
                "{} (limit {})",
                invalid.message, invalid.limit
            ))),
            None => Next::Fail(Error::Rpc("empty error detail".into())),
        }
    }

    /// Runs `call` against the replica of `key`'s range most likely to lead it, until
    /// it succeeds or the deadline passes. A write (`write`: `Some`) runs in the
    /// client's session: the session is opened at the range first, the write gets a
    /// sequence number at its first attempt and keeps it through every retry, so a
    /// repeat after an unknown outcome applies at most once.
    async fn on_range<T, F, Fut>(
        &self,
        key: &[u8],
        write: Option<WriteSeq>,
        mut call: F,
    ) -> Result<T>
    where
        F: FnMut(Conn, proto::RequestHeader) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(T, Option<proto::Error>), Status>>,
    {
        let mut write = write;
        let retry_unknown = write.is_none() || self.inner.config.retry_ambiguous_writes;
        let deadline = Instant::now() + self.inner.config.timeout;
        let mut backoff = self.inner.config.backoff_min;
        let mut tried = 0usize;
        let mut last = String::from("no attempt");
        loop {
            let route = self.route(key).await?;
            let replicas = &route.descriptor.replicas;
            let store = match (&route.leader, replicas.is_empty()) {
                (Some(leader), _) if tried == 0 => leader.store_id,
                (_, false) => replicas[tried % replicas.len()].store_id,
                (None, true) => return Err(Error::Pd("range has no replicas".into())),
                (Some(leader), true) => leader.store_id,
            };
            let header = proto::RequestHeader {
                range_id: route.descriptor.range_id,
                epoch: route.descriptor.epoch,
                stale_read: false,
                session: None,
            };
            let mut remaining = deadline.saturating_duration_since(Instant::now());
            if retry_unknown {
                remaining = remaining.min(self.inner.config.attempt_timeout);
            }
            let next = match self.store(store).await {
                // Not connected: nothing was sent.
                Err(error) => {
                    last = error.to_string();
                    self.forget_store(store);
                    tried += 1;
                    Next::Backoff
                }
                Ok(client) => {
                    let attempt = self.attempt(&client, header, write.as_mut(), &mut call);
                    match tokio::time::timeout(remaining, attempt).await {
                        Ok(Ok((Some(value), None))) => return Ok(value),
                        Ok(Ok((_, Some(detail)))) => {
                            last = format!("{detail:?}");
                            match (&detail.kind, write.as_mut()) {
                                (Some(proto::error::Kind::SessionExpired(_)), Some(write)) => {
                                    self.inner.session.forget_range(route.descriptor.range_id);
                                    if write.sent_before() {
                                        Next::Fail(Error::SessionExpired(format!(
                                            "the write was sent before, its session expired at \
                                             range {} since: it applied once or not at all",
                                            route.descriptor.range_id
                                        )))
                                    } else {
                                        // Never sent before: nothing of it can have applied.
                                        write.renumber();
                                        if write.renumbered() > 1 {
                                            Next::Backoff
                                        } else {
                                            Next::Retry
                                        }
                                    }
                                }
                                _ => self.on_detail(&route, detail, &mut tried),
                            }
                        }
                        Ok(Ok((None, None))) => Next::Fail(Error::Rpc("an empty answer".into())),
                        Ok(Err(status)) if status.code() == Code::InvalidArgument => {
                            Next::Fail(Error::InvalidArgument(status.message().to_string()))
                        }
                        Ok(Err(status)) if certainly_not_applied(&status) || retry_unknown => {
                            last = status.to_string();
                            if status.code() == Code::Unavailable {
                                self.forget_store(store);
                                tried += 1;
                            }
                            if !certainly_not_applied(&status) {
                                self.unknown_outcome(write.as_mut());
                            }
                            Next::Backoff
                        }
                        Ok(Err(status)) => Next::Fail(Error::OutcomeUnknown(status.to_string())),
                        Err(_) if retry_unknown => {
                            last = format!("store {store} did not answer in {remaining:?}");
                            tried += 1;
                            self.unknown_outcome(write.as_mut());
                            Next::Backoff
                        }
                        Err(_) => Next::Fail(Error::OutcomeUnknown(
                            "no answer before the deadline".into(),
                        )),
                    }
                }
            };
            match next {
                Next::Fail(error) => return Err(error),
                Next::Retry => {}
                Next::Backoff => {
                    let pause = backoff.mul_f64(0.5 + jitter());
                    if Instant::now() + pause >= deadline {
                        return Err(Error::DeadlineExceeded(format!(
                            "no replica of the range of {key:?} answered in {:?}; last: {last}",
                            self.inner.config.timeout
                        )));
                    }
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(self.inner.config.backoff_max);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::DeadlineExceeded(format!(
                    "the range of {key:?}: {last}"
                )));
            }
        }
    }

    /// A write's outcome is unknown and it will be sent again.
    fn unknown_outcome(&self, write: Option<&mut WriteSeq>) {
        if let Some(write) = write {
            if write.numbered() {
                write.mark_sent_before();
                self.inner
                    .session
                    .ambiguous_retried
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// One attempt of `call` on `conn`; a write first opens the session at the range
    /// (once per range) and takes its sequence number.
    async fn attempt<T, F, Fut>(
        &self,
        conn: &Conn,
        mut header: proto::RequestHeader,
        write: Option<&mut WriteSeq>,
        call: &mut F,
    ) -> std::result::Result<(Option<T>, Option<proto::Error>), Status>
    where
        F: FnMut(Conn, proto::RequestHeader) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(T, Option<proto::Error>), Status>>,
    {
        if let Some(write) = write {
            let session = &self.inner.session;
            let opened_at = match session.opened_at(header.range_id) {
                Some(opened_at) => opened_at,
                None => {
                    let floor = session.next_sequence();
                    let (high, low) = session.id_halves();
                    let r = reply!(
                        conn,
                        OpenSession,
                        proto::OpenSessionRequest {
                            header: Some(header),
                            session_high: high,
                            session_low: low,
                            floor,
                        }
                    );
                    if r.error.is_some() {
                        return Ok((None, r.error));
                    }
                    session.set_opened(header.range_id, r.opened_at);
                    r.opened_at
                }
            };
            header.session = Some(write.reference(header.range_id, opened_at));
        }
        let (value, error) = call(conn.clone(), header).await?;
        Ok((Some(value), error))
    }

    /// Writes retried after an unknown outcome since this client was created (each
    /// repeat counts once).
    pub fn ambiguous_writes_retried(&self) -> u64 {
        self.inner
            .session
            .ambiguous_retried
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        check(&[key], &[])?;
        let key = bytes::Bytes::copy_from_slice(key);
        self.on_range(&key.clone(), None, |conn, header| {
            let key = key.clone();
            async move {
                let r = reply!(
                    conn,
                    Get,
                    proto::GetRequest {
                        header: Some(header),
                        key,
                    }
                );
                Ok((r.found.then(|| r.value.to_vec()), r.error))
            }
        })
        .await
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.batch_put(vec![Mutation::Put(key.to_vec(), value.to_vec())])
            .await
    }

    pub async fn delete(&self, key: &[u8]) -> Result<()> {
        self.batch_put(vec![Mutation::Delete(key.to_vec())]).await
    }

    /// Applies `mutations`: atomically for those within one range; a batch spanning
    /// ranges is split into one atomic batch per range (not atomic as a whole).
    pub async fn batch_put(&self, mutations: Vec<Mutation>) -> Result<()> {
        let keys: Vec<&[u8]> = mutations.iter().map(Mutation::key).collect();
        let values: Vec<&[u8]> = mutations
            .iter()
            .filter_map(|m| match m {
                Mutation::Put(_, value) => Some(&value[..]),
                Mutation::Delete(_) => None,
            })
            .collect();
        check(&keys, &values)?;
        // One mutation is one range's: `on_range` finds it (no grouping pass).
        let groups = match &mutations[..] {
            [only] => vec![(only.key().to_vec(), mutations)],
            _ => self.group_by_range(mutations, |m| m.key().to_vec()).await?,
        };
        for (key, group) in groups {
            let group: Vec<proto::Mutation> = group
                .into_iter()
                .map(|m| match m {
                    Mutation::Put(key, value) => proto::Mutation {
                        op: proto::mutation::Op::Put as i32,
                        key: key.into(),
                        value: value.into(),
                    },
                    Mutation::Delete(key) => proto::Mutation {
                        op: proto::mutation::Op::Delete as i32,
                        key: key.into(),
                        value: Default::default(),
                    },
                })
                .collect();
            self.on_range(&key, Some(self.inner.session.write()), |conn, header| {
                let mutations = group.clone();
                async move {
                    let r = reply!(
                        conn,
                        BatchPut,
                        proto::BatchPutRequest {
                            header: Some(header),
                            mutations,
                        }
                    );
                    Ok(((), r.error))
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Groups items by the range of their key (as the cache knows it now); returns
    /// (a key of the range, items) in key order.
    async fn group_by_range<T>(
        &self,
        items: Vec<T>,
        key_of: impl Fn(&T) -> Vec<u8>,
    ) -> Result<Vec<(Vec<u8>, Vec<T>)>> {
        let mut groups: BTreeMap<Vec<u8>, (Vec<u8>, Vec<T>)> = BTreeMap::new();
        for item in items {
            let key = key_of(&item);
            let route = self.route(&key).await?;
            groups
                .entry(route.descriptor.start_key.to_vec())
                .or_insert_with(|| (key.clone(), Vec::new()))
                .1
                .push(item);
        }
        Ok(groups.into_values().collect())
    }

    /// The values of `keys` that exist, in request order.
    pub async fn batch_get(&self, keys: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        check(&keys.iter().map(|k| &k[..]).collect::<Vec<_>>(), &[])?;
        // Keyed by the caller's keys: SipHash, not Fx, so chosen keys cannot collide.
        let mut found = HashMap::new();
        for (key, group) in self.group_by_range(keys.to_vec(), |k| k.clone()).await? {
            let group: Vec<bytes::Bytes> = group.into_iter().map(Into::into).collect();
            let pairs = self
                .on_range(&key, None, |conn, header| {
                    let keys = group.clone();
                    async move {
                        let r = reply!(
                            conn,
                            BatchGet,
                            proto::BatchGetRequest {
                                header: Some(header),
                                keys,
                            }
                        );
                        Ok((r.pairs, r.error))
                    }
                })
                .await?;
            for pair in pairs {
                found.insert(pair.key.to_vec(), pair.value.to_vec());
            }
        }
        Ok(keys
            .iter()
            .filter_map(|k| found.get(k).map(|v| (k.clone(), v.clone())))
            .collect())
    }

    /// Sets `key` to `new` (`None`: deletes it) if its value is `expected` (`None`:
    /// absent). Applied exactly once however often it is retried; the result is that
    /// of its one application.
    pub async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome> {
        check(
            &[key],
            &[expected.unwrap_or_default(), new.unwrap_or_default()],
        )?;
        let request = proto::CompareAndSwapRequest {
            header: None,
            key: key.to_vec().into(),
            expected_absent: expected.is_none(),
            expected_value: expected.unwrap_or_default().to_vec().into(),
            new_value: new.unwrap_or_default().to_vec().into(),
            delete: new.is_none(),
        };
        self.on_range(key, Some(self.inner.session.write()), |conn, header| {
            let mut request = request.clone();
            request.header = Some(header);
            async move {
                let r = reply!(conn, Cas, request);
                let outcome = CasOutcome {
                    succeeded: r.succeeded,
                    previous: r.previous_found.then(|| r.previous_value.to_vec()),
                };
                Ok((outcome, r.error))
            }
        })
        .await
    }

    /// Up to `limit` keys of `[start, end)` (empty `end`: to the end of the keyspace)
    /// in key order, across ranges, one page per RPC.
    pub async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        self.scan_each(start, end, limit, |key, value| out.push((key, value)))
            .await?;
        Ok(out)
    }

    /// Like [`Client::scan`], handing each pair to `each` as pages arrive.
    pub async fn scan_each(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        mut each: impl FnMut(Vec<u8>, Vec<u8>),
    ) -> Result<usize> {
        let mut from = start.to_vec();
        let mut seen = 0usize;
        while seen < limit && (end.is_empty() || from.as_slice() < end) {
            let page = (limit - seen).min(self.inner.config.scan_page_keys as usize) as u32;
            let range = self.route(&from).await?;
            let range_end = range.descriptor.end_key.to_vec();
            let stop = span_end(end, &range_end);
            let (pairs, resume) = self
                .on_range(&from.clone(), None, |conn, header| {
                    let (from, stop) = (from.clone(), stop.clone());
                    async move {
                        let r = reply!(
                            conn,
                            Scan,
                            proto::ScanRequest {
                                header: Some(header),
                                start_key: from.into(),
                                end_key: stop.into(),
                                limit: page,
                                keys_only: false,
                            }
                        );
                        Ok(((r.pairs, r.resume_key.to_vec()), r.error))
                    }
                })
                .await?;
            for pair in pairs {
                each(pair.key.to_vec(), pair.value.to_vec());
                seen += 1;
            }
            if !resume.is_empty() {
                from = resume;
            } else if range_end.is_empty() {
                break;
            } else {
                from = range_end;
            }
        }
        Ok(seen)
    }

    /// Deletes every key in `[start, end)` (empty `end`: to the end of the keyspace),
    /// one atomic delete per range.
    pub async fn delete_range(&self, start: &[u8], end: &[u8]) -> Result<()> {
        let mut from = start.to_vec();
        while end.is_empty() || from.as_slice() < end {
            let range = self.route(&from).await?;
            let range_end = range.descriptor.end_key.to_vec();
            let stop = span_end(end, &range_end);
            self.on_range(
                &from.clone(),
                Some(self.inner.session.write()),
                |conn, header| {
                    let (from, stop) = (from.clone(), stop.clone());
                    async move {
                        let r = reply!(
                            conn,
                            DeleteRange,
                            proto::DeleteRangeRequest {
                                header: Some(header),
                                start_key: from.into(),
                                end_key: stop.into(),
                            }
                        );
                        Ok(((), r.error))
                    }
                },
            )
            .await?;
            if range_end.is_empty() {
                break;
            }
            from = range_end;
        }
        Ok(())
    }
}

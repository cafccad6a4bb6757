//! The cluster view PD serves from: stores, ranges with their leaders, the ID allocator
//! and bootstrap. Time arrives as `now_unix_ms` arguments, so the logic is deterministic.
//!
//! Invariants: every change reaches the metadata store (synced) before memory; `ranges`
//! and `routing` hold the same ranges, pairwise disjoint; a range's epoch only grows; no
//! id at or above the persisted ceiling is ever handed out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use rangekv_rpc::proto::{
    ClusterStatusResponse, Peer, RangeHeartbeatRequest, RangeReport, RangeRoute,
    StoreHeartbeatRequest, StoreInfo, StoreState,
};
use rangekv_rpc::validate::Invalid;
use rangekv_rpc::RangeDescriptor;
use rangekv_types::{limits, RangeId, StoreId};

use crate::bootstrap::{self, printable, SplitKeys};
use crate::meta::{MetaError, MetaStore, StoreRecord};
use crate::routing::{RoutingTable, Span};

/// Most ids one `AllocId` call hands out.
pub const ALLOC_ID_COUNT_MAX: u32 = 10_000;
/// Ids reserved on disk per write: a restart skips what was reserved but not handed out.
pub const ID_RESERVATION_COUNT: u64 = 1_000;
/// Longest store address accepted.
pub const ADDRESS_BYTES_MAX: usize = 255;

/// What PD needs to know to run a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Where the bootstrap ranges are cut.
    pub split_keys: SplitKeys,
    /// Replicas per bootstrap range; bootstrap waits for this many stores.
    pub replicas: usize,
    /// A store that has not been heard from for this long is `DOWN`.
    pub store_down_after: Duration,
}

/// Why a PD operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PdError {
    #[error(transparent)]
    InvalidArgument(#[from] Invalid),
    #[error("{0}")]
    NotFound(String),
    #[error(
        "cluster not bootstrapped: {stores_needed} more store(s) must register \
         ({stores_registered} of {replicas} registered)"
    )]
    NotBootstrapped {
        stores_registered: usize,
        replicas: usize,
        stores_needed: usize,
    },
    /// Retry later: e.g. a split's new range has not reported yet.
    #[error("{0}")]
    Unavailable(String),
    #[error("the id space is exhausted")]
    IdsExhausted,
    /// An earlier metadata write failed; PD refuses all writes until restarted.
    #[error("placement driver stopped after a fatal error: {0}")]
    Stopped(String),
    #[error(transparent)]
    Fatal(#[from] MetaError),
}

#[derive(Debug, Clone, Default)]
struct StoreEntry {
    address: String,
    range_count: u64,
    leader_count: u64,
    capacity_bytes: u64,
    used_bytes: u64,
    /// 0 until the first heartbeat since PD started.
    last_heartbeat_unix_ms: u64,
    /// Last heartbeat, registration or PD start, whichever is latest: the base of the
    /// `DOWN` timeout, so a PD restart does not declare every store down at once.
    last_seen_unix_ms: u64,
}

#[derive(Debug, Clone)]
struct Leader {
    peer: Peer,
    term: u64,
}

#[derive(Debug, Clone)]
struct RangeEntry {
    descriptor: RangeDescriptor,
    /// Not persisted: leaders report again within a heartbeat interval.
    leader: Option<Leader>,
}

#[derive(Debug)]
struct IdAllocator {
    next: u64,
    /// Every id below it is reserved on disk.
    ceiling: u64,
}

/// PD's state: the durable metadata and the in-memory view built from it.
#[derive(Debug)]
pub struct Cluster {
    config: ClusterConfig,
    meta: MetaStore,
    ids: IdAllocator,
    stores: BTreeMap<StoreId, StoreEntry>,
    ranges: HashMap<RangeId, RangeEntry>,
    routing: RoutingTable,
    /// The descriptors as created at bootstrap: the state a store creates a missing
    /// bootstrap replica from, whatever the range became since.
    bootstrap_ranges: BTreeMap<RangeId, RangeDescriptor>,
    bootstrapped: bool,
    /// Set by the first failed metadata write.
    stopped: Option<String>,
}

impl Cluster {
    /// Opens the metadata in `dir`, restores the view and bootstraps if enough stores
    /// registered before a crash cut bootstrap short.
    pub fn open(dir: &Path, config: ClusterConfig, now_unix_ms: u64) -> Result<Self, PdError> {
        bootstrap::check_replicas(config.replicas)?;
        let (meta, loaded) = MetaStore::open(dir)?;
        let mut cluster = Cluster {
            config,
            ids: IdAllocator {
                next: loaded.id_ceiling.max(1),
                ceiling: loaded.id_ceiling,
            },
            stores: loaded
                .stores
                .into_iter()
                .map(|store| {
                    let entry = StoreEntry {
                        address: store.address,
                        last_seen_unix_ms: now_unix_ms,
                        ..StoreEntry::default()
                    };
                    (store.id, entry)
                })
                .collect(),
            ranges: HashMap::new(),
            routing: RoutingTable::default(),
            bootstrap_ranges: loaded
                .bootstrap_ranges
                .into_iter()
                .map(|range| (RangeId(range.range_id), range))
                .collect(),
            bootstrapped: loaded.bootstrapped,
            stopped: None,
            meta,
        };
        for descriptor in loaded.ranges {
            if !cluster.install(descriptor, None) {
                return Err(cluster.corrupt("range/", "ranges overlap or repeat".into()));
            }
        }
        cluster.check_ids_below_ceiling()?;
        cluster.maybe_bootstrap()?;
        Ok(cluster)
    }

    /// Set once a metadata write failed: PD must stop; it refuses writes meanwhile.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    pub fn is_bootstrapped(&self) -> bool {
        self.bootstrapped
    }

    /// Registers a store: `store_id` 0 gets a new id, a known id may change address.
    pub fn register_store(
        &mut self,
        store_id: u64,
        address: &str,
        now_unix_ms: u64,
    ) -> Result<StoreId, PdError> {
        check_address(address)?;
        let id = if store_id == 0 {
            let id = StoreId(self.alloc(1)?);
            let record = StoreRecord {
                id,
                address: address.to_owned(),
            };
            self.persist(|meta| meta.put_store(&record))?;
            tracing::info!(store = %id, address, "store registered");
            id
        } else {
            let id = StoreId(store_id);
            let current = match self.stores.get(&id) {
                Some(entry) => entry.address.clone(),
                None => return Err(store_not_registered(id)),
            };
            if current != address {
                let record = StoreRecord {
                    id,
                    address: address.to_owned(),
                };
                self.persist(|meta| meta.put_store(&record))?;
                tracing::info!(store = %id, from = current, to = address, "store moved");
            }
            id
        };
        if let Some((other, _)) = self
            .stores
            .iter()
            .find(|(other, entry)| **other != id && entry.address == address)
        {
            // A store that lost its data registers anew; the old id stays, DOWN.
            tracing::warn!(store = %id, %other, address, "two stores share an address");
        }
        let entry = self.stores.entry(id).or_default();
        entry.address = address.to_owned();
        entry.last_seen_unix_ms = now_unix_ms;
        // The store is registered whatever happens to bootstrap; a fatal failure there
        // has already stopped PD, and bootstrap resumes when PD reopens.
        if let Err(error) = self.maybe_bootstrap() {
            tracing::error!(%error, "bootstrap failed");
        }
        Ok(id)
    }

    /// Records a store's heartbeat; returns the bootstrap ranges the store should host a
    /// replica of but did not report.
    pub fn store_heartbeat(
        &mut self,
        request: &StoreHeartbeatRequest,
        now_unix_ms: u64,
    ) -> Result<Vec<RangeDescriptor>, PdError> {
        let Some(info) = &request.store else {
            return Err(Invalid {
                limit: "store required".into(),
                message: "store heartbeat without store".into(),
            }
            .into());
        };
        let id = StoreId(info.store_id);
        let entry = self
            .stores
            .get_mut(&id)
            .ok_or_else(|| store_not_registered(id))?;
        entry.range_count = info.range_count;
        entry.leader_count = info.leader_count;
        entry.capacity_bytes = info.capacity_bytes;
        entry.used_bytes = info.used_bytes;
        entry.last_heartbeat_unix_ms = now_unix_ms;
        entry.last_seen_unix_ms = now_unix_ms;
        let reported: HashSet<u64> = request.range_ids.iter().copied().collect();
        Ok(self
            .bootstrap_ranges
            .values()
            .filter(|range| !reported.contains(&range.range_id))
            .filter(|range| self.still_hosts(range, id))
            .cloned()
            .collect())
    }

    /// Whether `store` holds a replica of the bootstrap range `range` and, by PD's
    /// current view, still does.
    fn still_hosts(&self, range: &RangeDescriptor, store: StoreId) -> bool {
        let Some(peer) = range.replicas.iter().find(|p| p.store_id == store.get()) else {
            return false;
        };
        self.ranges
            .get(&RangeId(range.range_id))
            .is_some_and(|current| current.descriptor.replicas.contains(peer))
    }

    /// Applies range leaders' reports: per range the descriptor with the larger epoch
    /// (version, then conf_ver) and the leader with the highest term win. The request is
    /// checked whole before any report applies.
    pub fn range_heartbeat(&mut self, request: &RangeHeartbeatRequest) -> Result<(), PdError> {
        self.require_bootstrapped()?;
        let store = StoreId(request.store_id);
        if !self.stores.contains_key(&store) {
            return Err(store_not_registered(store));
        }
        let reports = request
            .ranges
            .iter()
            .enumerate()
            .map(|(index, report)| check_report(index, report, store))
            .collect::<Result<Vec<_>, _>>()?;
        for (descriptor, leader, term) in reports {
            self.apply_report(descriptor, leader, term)?;
        }
        Ok(())
    }

    fn apply_report(
        &mut self,
        descriptor: &RangeDescriptor,
        leader: &Peer,
        term: u64,
    ) -> Result<(), PdError> {
        let id = RangeId(descriptor.range_id);
        let newer = self
            .ranges
            .get(&id)
            .is_none_or(|known| epoch_order(descriptor) > epoch_order(&known.descriptor));
        if newer {
            self.accept_descriptor(descriptor)?;
        }
        if let Some(entry) = self.ranges.get_mut(&id) {
            let higher_term = entry.leader.as_ref().is_none_or(|known| term >= known.term);
            if higher_term && entry.descriptor.replicas.contains(leader) {
                entry.leader = Some(Leader {
                    peer: *leader,
                    term,
                });
            }
        }
        Ok(())
    }

    /// Takes `descriptor` as its range's latest, replacing every other range it overlaps
    /// — unless one of them has a larger version, which makes `descriptor` the stale one.
    fn accept_descriptor(&mut self, descriptor: &RangeDescriptor) -> Result<(), PdError> {
        let id = RangeId(descriptor.range_id);
        let mut replaced = Vec::new();
        for span in self
            .routing
            .overlapping(&descriptor.start_key, &descriptor.end_key)
        {
            if span.range == id {
                continue;
            }
            let other = &self.range_entry(span.range).descriptor;
            if epoch_order(other).0 > epoch_order(descriptor).0 {
                tracing::debug!(range = %id, newer = %span.range, "stale range report ignored");
                return Ok(());
            }
            replaced.push(span.range);
        }
        self.persist(|meta| meta.update_ranges(descriptor, &replaced))?;
        for other in &replaced {
            let entry = self.remove_range(*other);
            tracing::info!(range = %other, by = %id, start = printable(&entry.descriptor.start_key),
                "range replaced by an overlapping newer one");
        }
        let leader = self
            .ranges
            .contains_key(&id)
            .then(|| self.remove_range(id).leader)
            .flatten()
            .filter(|leader| descriptor.replicas.contains(&leader.peer));
        let installed = self.install(descriptor.clone(), leader);
        assert!(installed, "every range overlapping {id} was removed first");
        Ok(())
    }

    /// Adds a range to the view; false (and nothing changed) if it overlaps another.
    fn install(&mut self, descriptor: RangeDescriptor, leader: Option<Leader>) -> bool {
        let id = RangeId(descriptor.range_id);
        let overlaps = self
            .routing
            .overlapping(&descriptor.start_key, &descriptor.end_key)
            .next()
            .is_some();
        if overlaps || self.ranges.contains_key(&id) {
            return false;
        }
        let dropped = self.routing.insert(Span {
            range: id,
            start_key: descriptor.start_key.to_vec(),
            end_key: descriptor.end_key.to_vec(),
        });
        assert!(dropped.is_empty(), "{id} overlaps no range");
        self.ranges.insert(id, RangeEntry { descriptor, leader });
        true
    }

    fn remove_range(&mut self, id: RangeId) -> RangeEntry {
        let Some(entry) = self.ranges.remove(&id) else {
            panic!("invariant: {id} is in the view before it is removed");
        };
        let span = self.routing.remove(&entry.descriptor.start_key);
        assert!(
            span.is_some_and(|span| span.range == id),
            "{id}'s span is in the routing table"
        );
        entry
    }

    fn range_entry(&self, id: RangeId) -> &RangeEntry {
        let Some(entry) = self.ranges.get(&id) else {
            panic!("invariant: every span in the routing table has a range; {id} has none");
        };
        entry
    }

    /// The range holding `key`, and its leader if known.
    pub fn get_range(&self, key: &[u8]) -> Result<RangeRoute, PdError> {
        self.require_bootstrapped()?;
        check_key_length("key", key)?;
        match self.routing.lookup(key) {
            Some(span) => Ok(self.route(span.range)),
            None => Err(PdError::Unavailable(format!(
                "no range known for key {} yet: a split's new range has not reported",
                printable(key)
            ))),
        }
    }

    pub fn get_range_by_id(&self, id: RangeId) -> Result<RangeRoute, PdError> {
        self.require_bootstrapped()?;
        if !self.ranges.contains_key(&id) {
            return Err(PdError::NotFound(format!("range {id} is not known")));
        }
        Ok(self.route(id))
    }

    /// The ranges overlapping `[start_key, end_key)` in key order (an empty `end_key` is
    /// +infinity), at most `limit` of them (0: all). A span whose range has not reported
    /// since a split is a gap in the answer.
    pub fn scan_ranges(
        &self,
        start_key: &[u8],
        end_key: &[u8],
        limit: u32,
    ) -> Result<Vec<RangeRoute>, PdError> {
        self.require_bootstrapped()?;
        check_key_length("start_key", start_key)?;
        check_key_length("end_key", end_key)?;
        if !end_key.is_empty() && start_key >= end_key {
            return Err(Invalid {
                limit: "start_key < end_key".into(),
                message: format!(
                    "start_key {} is not below end_key {}",
                    printable(start_key),
                    printable(end_key)
                ),
            }
            .into());
        }
        let limit = if limit == 0 {
            usize::MAX
        } else {
            limit as usize
        };
        Ok(self
            .routing
            .overlapping(start_key, end_key)
            .take(limit)
            .map(|span| self.route(span.range))
            .collect())
    }

    fn route(&self, id: RangeId) -> RangeRoute {
        let entry = self.range_entry(id);
        RangeRoute {
            range: Some(entry.descriptor.clone()),
            leader: entry.leader.as_ref().map(|leader| leader.peer),
        }
    }

    pub fn get_store(&self, id: StoreId, now_unix_ms: u64) -> Result<StoreInfo, PdError> {
        match self.stores.get(&id) {
            Some(entry) => Ok(self.store_info(id, entry, now_unix_ms)),
            None => Err(store_not_registered(id)),
        }
    }

    /// Every store, in id order.
    pub fn list_stores(&self, now_unix_ms: u64) -> Vec<StoreInfo> {
        self.stores
            .iter()
            .map(|(id, entry)| self.store_info(*id, entry, now_unix_ms))
            .collect()
    }

    fn store_info(&self, id: StoreId, entry: &StoreEntry, now_unix_ms: u64) -> StoreInfo {
        let silent_ms = now_unix_ms.saturating_sub(entry.last_seen_unix_ms);
        let down = u128::from(silent_ms) > self.config.store_down_after.as_millis();
        StoreInfo {
            store_id: id.get(),
            address: entry.address.clone(),
            state: if down {
                StoreState::Down
            } else {
                StoreState::Up
            } as i32,
            range_count: entry.range_count,
            leader_count: entry.leader_count,
            capacity_bytes: entry.capacity_bytes,
            used_bytes: entry.used_bytes,
            last_heartbeat_unix_ms: entry.last_heartbeat_unix_ms,
        }
    }

    /// `count` (1..=[`ALLOC_ID_COUNT_MAX`]) cluster-unique ids; returns the first.
    pub fn alloc_ids(&mut self, count: u32) -> Result<u64, PdError> {
        if count == 0 || count > ALLOC_ID_COUNT_MAX {
            return Err(Invalid {
                limit: format!("alloc_id_count in 1..={ALLOC_ID_COUNT_MAX}"),
                message: format!("count is {count}"),
            }
            .into());
        }
        self.alloc(u64::from(count))
    }

    pub fn status(&self) -> ClusterStatusResponse {
        ClusterStatusResponse {
            bootstrapped: self.bootstrapped,
            stores_needed: self.stores_needed() as u32,
            ranges: self.ranges.len() as u32,
        }
    }

    /// Every range in key order.
    pub fn ranges(&self) -> impl Iterator<Item = &RangeDescriptor> {
        self.routing
            .iter()
            .map(|span| &self.range_entry(span.range).descriptor)
    }

    fn stores_needed(&self) -> usize {
        if self.bootstrapped {
            0
        } else {
            self.config.replicas.saturating_sub(self.stores.len())
        }
    }

    fn require_bootstrapped(&self) -> Result<(), PdError> {
        if self.bootstrapped {
            return Ok(());
        }
        Err(PdError::NotBootstrapped {
            stores_registered: self.stores.len(),
            replicas: self.config.replicas,
            stores_needed: self.stores_needed(),
        })
    }

    /// Creates the bootstrap ranges once enough stores registered: one batch, synced.
    fn maybe_bootstrap(&mut self) -> Result<(), PdError> {
        if self.bootstrapped || self.stores.len() < self.config.replicas {
            return Ok(());
        }
        let stores: Vec<StoreId> = self
            .stores
            .keys()
            .take(self.config.replicas)
            .copied()
            .collect();
        let split_keys = &self.config.split_keys;
        let first_id = self.alloc(bootstrap::ids_needed(split_keys, stores.len()))?;
        let ranges = bootstrap::plan(&self.config.split_keys, &stores, first_id);
        self.persist(|meta| meta.write_bootstrap(&ranges))?;
        for range in ranges {
            self.bootstrap_ranges
                .insert(RangeId(range.range_id), range.clone());
            let installed = self.install(range, None);
            assert!(
                installed,
                "bootstrap ranges are disjoint and the view was empty"
            );
        }
        self.bootstrapped = true;
        tracing::info!(ranges = self.ranges.len(), ?stores, "cluster bootstrapped");
        Ok(())
    }

    fn alloc(&mut self, count: u64) -> Result<u64, PdError> {
        let first = self.ids.next;
        let end = first.checked_add(count).ok_or(PdError::IdsExhausted)?;
        if end > self.ids.ceiling {
            let ceiling = end.saturating_add(ID_RESERVATION_COUNT);
            self.persist(|meta| meta.put_id_ceiling(ceiling))?;
            self.ids.ceiling = ceiling;
        }
        self.ids.next = end;
        Ok(first)
    }

    /// Runs one metadata write. The first failure stops PD: a write that may or may not
    /// have reached the disk is not retried.
    fn persist(
        &mut self,
        write: impl FnOnce(&MetaStore) -> Result<(), MetaError>,
    ) -> Result<(), PdError> {
        if let Some(reason) = &self.stopped {
            return Err(PdError::Stopped(reason.clone()));
        }
        write(&self.meta).map_err(|error| {
            tracing::error!(%error, "metadata write failed; the placement driver stops");
            self.stopped = Some(error.to_string());
            PdError::Fatal(error)
        })
    }

    fn check_ids_below_ceiling(&self) -> Result<(), PdError> {
        let ids = self.stores.keys().map(|id| id.get()).chain(
            self.ranges
                .values()
                .map(|entry| &entry.descriptor)
                .chain(self.bootstrap_ranges.values())
                .flat_map(|range| {
                    std::iter::once(range.range_id)
                        .chain(range.replicas.iter().map(|peer| peer.peer_id))
                }),
        );
        match ids.max() {
            Some(max) if max >= self.ids.ceiling => Err(self.corrupt(
                "id_ceiling",
                format!("id {max} is in use but the ceiling is {}", self.ids.ceiling),
            )),
            _ => Ok(()),
        }
    }

    fn corrupt(&self, key: &str, reason: String) -> PdError {
        PdError::Fatal(MetaError::Corrupt {
            path: self.meta.path().to_owned(),
            key: key.into(),
            reason,
        })
    }
}

#[cfg(test)]
impl Cluster {
    /// Asserts the view's invariants: ranges and routing agree, spans are disjoint.
    fn check_view(&self) {
        assert_eq!(self.ranges.len(), self.routing.len());
        let mut previous_end: Option<&[u8]> = None;
        for span in self.routing.iter() {
            let descriptor = &self.range_entry(span.range).descriptor;
            assert_eq!(descriptor.start_key[..], span.start_key[..]);
            assert_eq!(descriptor.end_key[..], span.end_key[..]);
            if let Some(end) = previous_end {
                assert!(
                    !end.is_empty() && end <= &span.start_key[..],
                    "spans overlap"
                );
            }
            previous_end = Some(&span.end_key);
        }
    }
}

fn store_not_registered(id: StoreId) -> PdError {
    PdError::NotFound(format!(
        "store {} is not registered with this placement driver \
         (a new store registers with store_id 0)",
        id.get()
    ))
}

/// (version, conf_ver): the order in which a range's descriptors supersede each other.
fn epoch_order(range: &RangeDescriptor) -> (u64, u64) {
    range
        .epoch
        .as_ref()
        .map_or((0, 0), |epoch| (epoch.version, epoch.conf_ver))
}

fn check_address(address: &str) -> Result<(), Invalid> {
    if address.is_empty() {
        return Err(Invalid {
            limit: "address_bytes_min=1".into(),
            message: "address is empty".into(),
        });
    }
    if address.len() > ADDRESS_BYTES_MAX {
        return Err(Invalid {
            limit: format!("address_bytes_max={ADDRESS_BYTES_MAX}"),
            message: format!("address has {} bytes", address.len()),
        });
    }
    Ok(())
}

fn check_key_length(field: &str, key: &[u8]) -> Result<(), Invalid> {
    if key.len() > limits::KEY_BYTES_MAX {
        return Err(Invalid {
            limit: format!("key_bytes_max={}", limits::KEY_BYTES_MAX),
            message: format!("{field} has {} bytes", key.len()),
        });
    }
    Ok(())
}

/// Checks one report of a range heartbeat from `store`; returns its descriptor, leader
/// and term.
fn check_report(
    index: usize,
    report: &RangeReport,
    store: StoreId,
) -> Result<(&RangeDescriptor, &Peer, u64), Invalid> {
    let invalid = |limit: &str, message: String| Invalid {
        limit: limit.into(),
        message: format!("range report {index}: {message}"),
    };
    let Some(range) = &report.range else {
        return Err(invalid("range required", "range is missing".into()));
    };
    check_descriptor(range).map_err(|mut error| {
        error.message = format!("range report {index}: {}", error.message);
        error
    })?;
    let Some(leader) = &report.leader else {
        return Err(invalid("leader required", "leader is missing".into()));
    };
    if !range.replicas.contains(leader) {
        return Err(invalid(
            "leader is a replica",
            format!(
                "leader {leader:?} is not a replica of range {}",
                range.range_id
            ),
        ));
    }
    if leader.store_id != store.get() {
        return Err(invalid(
            "leader on the reporting store",
            format!(
                "leader is on store {} but store {} reported it",
                leader.store_id,
                store.get()
            ),
        ));
    }
    Ok((range, leader, report.term))
}

/// Checks a descriptor: ids set, epoch present, `start_key < end_key` (or `end_key`
/// empty), keys within limits, replicas on distinct stores with distinct peer ids.
fn check_descriptor(range: &RangeDescriptor) -> Result<(), Invalid> {
    let rule = |limit: &str, message: String| Invalid {
        limit: limit.into(),
        message: format!("range {}: {message}", range.range_id),
    };
    if range.range_id == 0 {
        return Err(rule("range_id != 0", "range_id is 0".into()));
    }
    if range.epoch.is_none() {
        return Err(rule("epoch required", "epoch is missing".into()));
    }
    check_key_length("start_key", &range.start_key)?;
    check_key_length("end_key", &range.end_key)?;
    if !range.end_key.is_empty() && range.start_key >= range.end_key {
        return Err(rule(
            "start_key < end_key",
            format!(
                "start_key {} is not below end_key {}",
                printable(&range.start_key),
                printable(&range.end_key)
            ),
        ));
    }
    if range.replicas.is_empty() {
        return Err(rule("replicas required", "no replicas".into()));
    }
    let mut peers = HashSet::new();
    let mut stores = HashSet::new();
    for peer in &range.replicas {
        if peer.peer_id == 0 || peer.store_id == 0 {
            return Err(rule("peer_id, store_id != 0", format!("replica {peer:?}")));
        }
        if !peers.insert(peer.peer_id) || !stores.insert(peer.store_id) {
            return Err(rule(
                "distinct peers on distinct stores",
                format!("replica {peer:?} repeats a peer or a store"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rangekv_rpc::proto::{PeerRole, RangeEpoch};

    const SECOND_MS: u64 = 1_000;

    fn config(split_keys: &[&str], replicas: usize) -> ClusterConfig {
        ClusterConfig {
            split_keys: SplitKeys::new(split_keys.iter().map(|k| k.as_bytes().to_vec()).collect())
                .unwrap(),
            replicas,
            store_down_after: Duration::from_secs(30),
        }
    }

    fn open(dir: &Path, split_keys: &[&str]) -> Cluster {
        Cluster::open(dir, config(split_keys, 3), 0).unwrap()
    }

    fn register(cluster: &mut Cluster, stores: usize) -> Vec<StoreId> {
        (0..stores)
            .map(|n| {
                let address = format!("10.0.0.{}:20160", cluster.stores.len() + n);
                cluster.register_store(0, &address, 0).unwrap()
            })
            .collect()
    }

    fn bootstrapped(dir: &Path, split_keys: &[&str]) -> Cluster {
        let mut cluster = open(dir, split_keys);
        register(&mut cluster, 3);
        assert!(cluster.is_bootstrapped());
        cluster
    }

    fn ranges(cluster: &Cluster) -> Vec<RangeDescriptor> {
        cluster.ranges().cloned().collect()
    }

    fn range_at(cluster: &Cluster, key: &str) -> RangeDescriptor {
        cluster.get_range(key.as_bytes()).unwrap().range.unwrap()
    }

    fn with_epoch(range: &RangeDescriptor, version: u64, conf_ver: u64) -> RangeDescriptor {
        RangeDescriptor {
            epoch: Some(RangeEpoch { conf_ver, version }),
            ..range.clone()
        }
    }

    fn report(range: &RangeDescriptor, leader: usize, term: u64) -> RangeHeartbeatRequest {
        let leader = range.replicas[leader];
        RangeHeartbeatRequest {
            store_id: leader.store_id,
            ranges: vec![RangeReport {
                range: Some(range.clone()),
                leader: Some(leader),
                term,
                applied_index: 10,
            }],
        }
    }

    fn store_heartbeat(store: StoreId, range_ids: &[u64]) -> StoreHeartbeatRequest {
        StoreHeartbeatRequest {
            store: Some(StoreInfo {
                store_id: store.get(),
                range_count: range_ids.len() as u64,
                ..StoreInfo::default()
            }),
            range_ids: range_ids.to_vec(),
        }
    }

    fn invalid_message(error: PdError) -> String {
        match error {
            PdError::InvalidArgument(invalid) => invalid.to_string(),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn bootstrap_waits_for_enough_stores_then_covers_the_keyspace() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = open(dir.path(), &["c", "g", "p", "user5"]);
        let first_two = register(&mut cluster, 2);
        assert!(!cluster.is_bootstrapped());
        assert_eq!(cluster.status().stores_needed, 1);
        let error = cluster.get_range(b"a").unwrap_err();
        assert!(
            matches!(
                error,
                PdError::NotBootstrapped {
                    stores_needed: 1,
                    ..
                }
            ) && error.to_string().contains("1 more store(s)"),
            "{error}"
        );
        let third = register(&mut cluster, 1);
        let later = register(&mut cluster, 1)[0];
        assert!(cluster.is_bootstrapped());
        let status = cluster.status();
        assert_eq!((status.stores_needed, status.ranges), (0, 5));

        let ranges = ranges(&cluster);
        assert_eq!(
            &ranges[0].start_key[..],
            b"",
            "the first range starts at the bottom"
        );
        assert_eq!(&ranges[4].end_key[..], b"", "the last range is unbounded");
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].end_key, pair[1].start_key, "no gap, no overlap");
        }
        let expected_stores: Vec<u64> = first_two.iter().chain(&third).map(|s| s.get()).collect();
        let mut ids: Vec<u64> = cluster.stores.keys().map(|s| s.get()).collect();
        for range in &ranges {
            assert_eq!(range.epoch, Some(bootstrap::BOOTSTRAP_EPOCH));
            let stores: Vec<u64> = range.replicas.iter().map(|p| p.store_id).collect();
            assert_eq!(
                stores, expected_stores,
                "three distinct stores, the first by id"
            );
            assert!(range
                .replicas
                .iter()
                .all(|p| p.role == PeerRole::Voter as i32));
            assert!(!stores.contains(&later.get()));
            ids.push(range.range_id);
            ids.extend(range.replicas.iter().map(|p| p.peer_id));
        }
        let count = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            ids.len(),
            count,
            "store, range and peer ids are all distinct"
        );
        assert!(!ids.contains(&0));
    }

    #[test]
    fn ids_are_never_reissued_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = HashSet::new();
        for restart in 0..4 {
            let mut cluster = open(dir.path(), &["m"]);
            let stores = register(&mut cluster, if restart == 0 { 3 } else { 1 });
            let mut issued: Vec<u64> = stores.iter().map(|s| s.get()).collect();
            for count in [1, 7, ALLOC_ID_COUNT_MAX, 1] {
                let first = cluster.alloc_ids(count).unwrap();
                issued.extend(first..first + u64::from(count));
            }
            if restart == 0 {
                issued.extend(cluster.ranges().flat_map(|r| {
                    std::iter::once(r.range_id).chain(r.replicas.iter().map(|p| p.peer_id))
                }));
            }
            for id in issued {
                assert!(id != 0, "0 means no id");
                assert!(seen.insert(id), "id {id} issued twice (restart {restart})");
            }
        }
        assert_eq!(
            seen.len(),
            3 + 8 + 4 * (ALLOC_ID_COUNT_MAX as usize + 9) + 3
        );
    }

    #[test]
    fn metadata_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (before, stores) = {
            let mut cluster = bootstrapped(dir.path(), &["g", "p"]);
            let split = RangeDescriptor {
                end_key: b"k".to_vec().into(),
                ..with_epoch(&range_at(&cluster, "h"), 2, 1)
            };
            cluster.range_heartbeat(&report(&split, 0, 3)).unwrap();
            (ranges(&cluster), cluster.list_stores(0))
        };
        let cluster = open(dir.path(), &["other", "split", "then"]);
        assert!(cluster.is_bootstrapped());
        assert_eq!(
            ranges(&cluster),
            before,
            "descriptors, epochs and ids identical"
        );
        assert_eq!(
            &before[1].end_key[..],
            b"k",
            "the accepted report persisted"
        );
        let addresses = |stores: &[StoreInfo]| -> Vec<(u64, String)> {
            stores
                .iter()
                .map(|s| (s.store_id, s.address.clone()))
                .collect()
        };
        assert_eq!(addresses(&cluster.list_stores(0)), addresses(&stores));
        assert_eq!(
            cluster
                .bootstrap_ranges
                .values()
                .map(|r| r.range_id)
                .collect::<Vec<_>>(),
            before.iter().map(|r| r.range_id).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bootstrap_cut_short_resumes_when_pd_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Five replicas wanted: three stores are not enough.
            let mut cluster = Cluster::open(dir.path(), config(&["m"], 5), 0).unwrap();
            register(&mut cluster, 3);
            assert!(!cluster.is_bootstrapped());
        }
        let cluster = open(dir.path(), &["m"]);
        assert!(cluster.is_bootstrapped());
        assert_eq!(cluster.status().ranges, 2);
    }

    #[test]
    fn store_heartbeat_lists_the_bootstrap_ranges_a_store_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = open(dir.path(), &["g", "p"]);
        let stores = register(&mut cluster, 2);
        let early = cluster.store_heartbeat(&store_heartbeat(stores[0], &[]), 0);
        assert!(
            early.unwrap().is_empty(),
            "nothing to create before bootstrap"
        );
        let stores = [stores, register(&mut cluster, 2)].concat();
        let ids: Vec<u64> = ranges(&cluster).iter().map(|r| r.range_id).collect();

        let missing = |cluster: &mut Cluster, store: StoreId, reported: &[u64]| -> Vec<u64> {
            let request = store_heartbeat(store, reported);
            let create = cluster.store_heartbeat(&request, SECOND_MS).unwrap();
            create.iter().map(|r| r.range_id).collect()
        };
        assert_eq!(missing(&mut cluster, stores[0], &[]), ids);
        assert_eq!(
            missing(&mut cluster, stores[0], &[ids[1]]),
            [ids[0], ids[2]]
        );
        assert_eq!(missing(&mut cluster, stores[1], &ids), [0u64; 0]);
        assert!(
            missing(&mut cluster, stores[3], &[]).is_empty(),
            "no replicas there"
        );

        // Range 2 moves its replica from store 1 to store 4: store 1 must not create it.
        let range = range_at(&cluster, "h");
        let mut moved = with_epoch(&range, 1, 3);
        moved.replicas[0] = Peer {
            peer_id: cluster.alloc_ids(1).unwrap(),
            store_id: stores[3].get(),
            role: PeerRole::Voter as i32,
        };
        cluster.range_heartbeat(&report(&moved, 1, 2)).unwrap();
        assert_eq!(missing(&mut cluster, stores[0], &[]), [ids[0], ids[2]]);
        let created = cluster
            .store_heartbeat(&store_heartbeat(stores[1], &[ids[0]]), SECOND_MS)
            .unwrap();
        assert_eq!(created[0], range, "the descriptor as created at bootstrap");
        assert!(matches!(
            cluster.store_heartbeat(&store_heartbeat(StoreId(999), &[]), 0),
            Err(PdError::NotFound(_))
        ));
        assert_eq!(
            cluster.get_store(stores[0], SECOND_MS).unwrap().range_count,
            0
        );
        assert_eq!(
            cluster
                .get_store(stores[0], SECOND_MS)
                .unwrap()
                .last_heartbeat_unix_ms,
            SECOND_MS
        );
    }

    #[test]
    fn range_heartbeat_keeps_the_larger_epoch_and_the_highest_term_leader() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = bootstrapped(dir.path(), &["m"]);
        let range = range_at(&cluster, "a");
        let leader_at = |cluster: &Cluster| cluster.get_range(b"a").unwrap().leader;
        assert_eq!(
            leader_at(&cluster),
            None,
            "no leader before the first report"
        );

        cluster.range_heartbeat(&report(&range, 0, 5)).unwrap();
        assert_eq!(leader_at(&cluster).as_ref(), Some(&range.replicas[0]));
        cluster.range_heartbeat(&report(&range, 1, 4)).unwrap();
        assert_eq!(
            leader_at(&cluster).as_ref(),
            Some(&range.replicas[0]),
            "term 4 < 5"
        );
        cluster.range_heartbeat(&report(&range, 2, 6)).unwrap();
        assert_eq!(
            leader_at(&cluster).as_ref(),
            Some(&range.replicas[2]),
            "term 6 wins"
        );

        // Version outranks conf_ver; a smaller epoch never replaces a larger one.
        let split = RangeDescriptor {
            end_key: b"f".to_vec().into(),
            ..with_epoch(&range, 2, 1)
        };
        cluster.range_heartbeat(&report(&split, 2, 6)).unwrap();
        assert_eq!(range_at(&cluster, "a"), split);
        let old_version = with_epoch(&range, 1, 9);
        cluster
            .range_heartbeat(&report(&old_version, 2, 7))
            .unwrap();
        assert_eq!(
            range_at(&cluster, "a"),
            split,
            "version 1 < 2 despite conf_ver 9"
        );
        assert_eq!(leader_at(&cluster).as_ref(), Some(&range.replicas[2]));
        let conf_change = with_epoch(&split, 2, 2);
        cluster
            .range_heartbeat(&report(&conf_change, 1, 7))
            .unwrap();
        assert_eq!(
            range_at(&cluster, "a"),
            conf_change,
            "same version, larger conf_ver"
        );
        assert_eq!(leader_at(&cluster).as_ref(), Some(&range.replicas[1]));
        cluster.check_view();
    }

    #[test]
    fn a_split_replaces_its_parent_once_both_halves_report() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = bootstrapped(dir.path(), &["g"]);
        let parent = range_at(&cluster, "h");
        let right_id = cluster.alloc_ids(1).unwrap();
        let right = RangeDescriptor {
            range_id: right_id,
            start_key: b"m".to_vec().into(),
            ..with_epoch(&parent, 2, 1)
        };
        let left = RangeDescriptor {
            end_key: b"m".to_vec().into(),
            ..with_epoch(&parent, 2, 1)
        };
        // The right half reports first: it replaces the parent, leaving [g, m) unknown.
        cluster.range_heartbeat(&report(&right, 0, 1)).unwrap();
        assert_eq!(range_at(&cluster, "m").range_id, right_id);
        assert!(matches!(
            cluster.get_range(b"h"),
            Err(PdError::Unavailable(message)) if message.contains("\"h\"")
        ));
        // A late report of the unsplit parent is stale against its own right half.
        cluster.range_heartbeat(&report(&parent, 0, 9)).unwrap();
        assert!(
            cluster.get_range(b"h").is_err(),
            "the stale parent is not restored"
        );
        cluster.range_heartbeat(&report(&left, 0, 1)).unwrap();
        assert_eq!(range_at(&cluster, "h"), left);
        assert_eq!(range_at(&cluster, "zzz"), right);
        assert_eq!(cluster.status().ranges, 3);
        cluster.check_view();
    }

    #[test]
    fn get_range_and_scan_respect_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = bootstrapped(dir.path(), &["g", "p"]);
        let ids: Vec<u64> = ranges(&cluster).iter().map(|r| r.range_id).collect();
        let id_at = |key: &[u8]| cluster.get_range(key).unwrap().range.unwrap().range_id;
        assert_eq!(id_at(b""), ids[0]);
        assert_eq!(id_at(b"f\xff\xff"), ids[0]);
        assert_eq!(id_at(b"g"), ids[1], "a split key starts its range");
        assert_eq!(id_at(b"o\xff"), ids[1]);
        assert_eq!(id_at(b"p"), ids[2]);
        assert_eq!(id_at(&[0xff; 100]), ids[2], "the last range has no end");

        let scan = |start: &str, end: &str, limit: u32| -> Vec<u64> {
            let routes = cluster
                .scan_ranges(start.as_bytes(), end.as_bytes(), limit)
                .unwrap();
            routes
                .iter()
                .map(|r| r.range.as_ref().unwrap().range_id)
                .collect()
        };
        assert_eq!(scan("", "", 0), ids);
        assert_eq!(scan("", "", 2), ids[..2]);
        assert_eq!(scan("g", "p", 0), [ids[1]], "[g, p) is exactly one range");
        assert_eq!(scan("f", "g", 0), [ids[0]], "end is exclusive");
        assert_eq!(scan("g", "p\0", 0), ids[1..]);
        assert_eq!(scan("q", "", 0), [ids[2]]);
        assert_eq!(
            cluster
                .get_range_by_id(RangeId(ids[2]))
                .unwrap()
                .range
                .unwrap()
                .start_key,
            b"p"[..]
        );
        assert!(matches!(
            cluster.get_range_by_id(RangeId(12345)),
            Err(PdError::NotFound(_))
        ));
        let reversed = invalid_message(cluster.scan_ranges(b"p", b"g", 0).unwrap_err());
        assert!(reversed.contains("start_key < end_key"), "{reversed}");
        let empty = invalid_message(cluster.scan_ranges(b"g", b"g", 0).unwrap_err());
        assert!(empty.contains("not below"), "{empty}");
    }

    #[test]
    fn bad_input_is_refused_naming_the_rule_and_nothing_applies() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = bootstrapped(dir.path(), &["m"]);
        let empty = invalid_message(cluster.register_store(0, "", 0).unwrap_err());
        assert!(empty.contains("address is empty"), "{empty}");
        let long = invalid_message(cluster.register_store(0, &"a".repeat(300), 0).unwrap_err());
        assert!(long.contains("address_bytes_max=255"), "{long}");
        let unknown = cluster.register_store(77_777, "10.0.0.9:1", 0).unwrap_err();
        assert!(
            matches!(&unknown, PdError::NotFound(m) if m.contains("store_id 0")),
            "{unknown}"
        );
        for count in [0, ALLOC_ID_COUNT_MAX + 1] {
            let message = invalid_message(cluster.alloc_ids(count).unwrap_err());
            assert!(message.contains("alloc_id_count in 1..=10000"), "{message}");
        }
        let long_key = vec![b'k'; limits::KEY_BYTES_MAX + 1];
        let message = invalid_message(cluster.get_range(&long_key).unwrap_err());
        assert!(message.contains("key_bytes_max=8192"), "{message}");

        let range = range_at(&cluster, "a");
        let newer = with_epoch(&range, 1, 2);
        let mut request = report(&newer, 0, 3);
        let mut broken_reports = Vec::new();
        let mut no_epoch = newer.clone();
        no_epoch.epoch = None;
        broken_reports.push((no_epoch, "epoch is missing"));
        let mut backwards = newer.clone();
        backwards.start_key = b"z".to_vec().into();
        backwards.end_key = b"b".to_vec().into();
        broken_reports.push((backwards, "start_key < end_key"));
        let mut twice = newer.clone();
        twice.replicas[1].store_id = twice.replicas[0].store_id;
        broken_reports.push((twice, "distinct peers on distinct stores"));
        for (broken, rule) in broken_reports {
            request.ranges.truncate(1);
            request.ranges.push(RangeReport {
                range: Some(broken),
                ..request.ranges[0].clone()
            });
            let message = invalid_message(cluster.range_heartbeat(&request).unwrap_err());
            assert!(
                message.contains(rule) && message.contains("report 1"),
                "{message}"
            );
        }
        let mut foreign_leader = report(&newer, 0, 3);
        foreign_leader.store_id = newer.replicas[1].store_id;
        let message = invalid_message(cluster.range_heartbeat(&foreign_leader).unwrap_err());
        assert!(
            message.contains("leader on the reporting store"),
            "{message}"
        );
        assert_eq!(
            range_at(&cluster, "a"),
            range,
            "no report of a refused request applied"
        );
        assert_eq!(cluster.get_range(b"a").unwrap().leader, None);
    }

    #[test]
    fn stores_not_heard_from_are_down() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = open(dir.path(), &[]);
        let stores = register(&mut cluster, 2);
        let mut heartbeat = store_heartbeat(stores[0], &[]);
        if let Some(store) = heartbeat.store.as_mut() {
            store.capacity_bytes = 1 << 40;
        }
        cluster.store_heartbeat(&heartbeat, 20 * SECOND_MS).unwrap();
        let listed = cluster.list_stores(40 * SECOND_MS);
        assert_eq!(
            listed[0].state,
            StoreState::Up as i32,
            "heard from 20 s ago"
        );
        assert_eq!(listed[0].capacity_bytes, 1 << 40);
        assert_eq!(listed[0].last_heartbeat_unix_ms, 20 * SECOND_MS);
        assert_eq!(listed[1].state, StoreState::Down as i32, "silent for 40 s");
        assert_eq!(listed[1].last_heartbeat_unix_ms, 0);
        // Registering again (a restart) counts as a sign of life.
        cluster
            .register_store(stores[1].get(), "10.0.0.1:20161", 45 * SECOND_MS)
            .unwrap();
        let store = cluster.get_store(stores[1], 46 * SECOND_MS).unwrap();
        assert_eq!(
            (store.state, store.address.as_str()),
            (StoreState::Up as i32, "10.0.0.1:20161")
        );
    }
}

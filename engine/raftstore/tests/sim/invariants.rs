//! Invariants, range by range, checked after every step (and where noted, at the
//! moment something happens), remembered across the whole run and across crashes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use raft::eraftpb::{Entry, Message, MessageType};
use raft::StateRole;
use rangekv_raftstore::session::encode_session;
use rangekv_raftstore::{Membership, PeerStatus, SessionId, SessionRef};
use rangekv_types::RangeId;
use rustc_hash::FxHashMap;

use super::host::Sessions;
use super::rng::{hash_bytes, Hash};
use super::world::{range_id, World, MS, TICK};

/// Log-matching hashes of one replica's log as raft sees it: `hashes[i]` covers the
/// entry `base_index + 1 + i` and everything before it; `base_hash` the compaction
/// point the log was reopened at.
#[derive(Debug, Default)]
pub struct Chain {
    pub base_index: u64,
    pub base_hash: u64,
    pub hashes: Vec<u64>,
}

/// What one range's invariants remember.
#[derive(Default)]
pub struct RangeFacts {
    /// term → the one node that led it.
    pub leaders: BTreeMap<u64, u64>,
    /// (voter, term) → the candidate it granted its (durable) vote to.
    pub votes: BTreeMap<(u64, u64), u64>,
    /// index → (term, data hash) of the entry committed there, once seen committed
    /// anywhere.
    pub committed: BTreeMap<u64, (u64, u64)>,
    /// index → hash of the range's state machine after applying up to it.
    pub states: BTreeMap<u64, u64>,
    /// (index, term) → chain hash of the log up to that entry (log matching).
    pub chains: HashMap<(u64, u64), u64>,
    /// (index, position in the entry) of the commands answered from a session table
    /// as duplicates, and of those refused for an expired session (coverage).
    pub duplicates: BTreeSet<(u64, usize)>,
    pub refused_expired: BTreeSet<(u64, usize)>,
    /// Indexes of the entries that dropped idle sessions (coverage).
    pub expiries: BTreeSet<u64>,
    /// conf_ver → (index of the entry that applied it, the membership): the same on
    /// every replica.
    pub confs: BTreeMap<u64, (u64, Membership)>,
}

pub struct Invariants {
    pub ranges: Vec<RangeFacts>,
    /// Per node and range, the highest durable term seen (it never goes back, crash
    /// or not).
    pub durable_term: Vec<Vec<u64>>,
    /// Per node and range, (term, role) last seen, for the trace.
    pub roles: Vec<Vec<(u64, StateRole)>>,
    /// (session, sequence) → (range, index) of the entry whose application of that
    /// write is the one (exactly once: no other entry may apply it).
    pub applied_once: FxHashMap<(SessionId, u64), (usize, u64)>,
}

impl Invariants {
    pub fn new(nodes: usize, ranges: usize) -> Self {
        Invariants {
            ranges: (0..ranges).map(|_| RangeFacts::default()).collect(),
            durable_term: vec![vec![0; ranges]; nodes],
            roles: vec![vec![(0, StateRole::Follower); ranges]; nodes],
            applied_once: FxHashMap::default(),
        }
    }
}

impl World {
    /// After every step, on every store and range the step may have changed.
    pub fn check_invariants(&mut self) {
        for node in 0..self.nodes.len() {
            if !self.dirty[node] {
                continue;
            }
            for r in 0..self.ranges {
                if self.failure.is_some() {
                    return;
                }
                self.check_flushed_applied_rule(node, r);
                if self.nodes[node].live.is_some() {
                    self.check_replica(node, r);
                }
            }
        }
    }

    /// The flushed-applied-index rule: the durable log never starts past the entry
    /// after the state machine's flushed applied index (else a crash would leave
    /// applied entries that nothing can replay).
    fn check_flushed_applied_rule(&mut self, node: usize, r: usize) {
        let range = range_id(r);
        let first = self.nodes[node]
            .log
            .0
            .borrow()
            .range(range)
            .map_or(1, |log| log.first_index());
        let flushed = self.nodes[node].sm_synced[r].applied;
        if first > flushed + 1 {
            self.fail(format!(
                "n{} {range}: the durable log starts at {first}, past the flushed applied index {flushed} + 1",
                node + 1
            ));
        }
    }

    fn check_replica(&mut self, node: usize, r: usize) {
        let id = self.nodes[node].id;
        let range = range_id(r);
        let sm_applied = self.nodes[node].sm[r].applied;
        let status = self.live(node).status(r);
        if self.logging() && self.inv.roles[node][r] != (status.term, status.role) {
            self.inv.roles[node][r] = (status.term, status.role);
            let nodes = self.describe_nodes();
            self.log(|| {
                format!(
                    "n{id} {range} is now {:?} in term {};{nodes}",
                    status.role, status.term
                )
            });
        }
        self.check_silent_leader(node, r, &status);
        // raft-rs's configuration is the core's membership, at every step.
        let agrees = self
            .live(node)
            .driver()
            .peer(range)
            .is_none_or(|peer| peer.membership().matches(&peer.conf_state()));
        if !agrees {
            self.fail(format!(
                "n{id} {range}: raft's configuration is not the applied membership"
            ));
        }
        let facts = &mut self.inv.ranges[r];
        // At most one leader per term, over the whole run.
        if status.role == StateRole::Leader {
            let leader = *facts.leaders.entry(status.term).or_insert(id);
            if leader != id {
                let term = status.term;
                self.fail(format!(
                    "{range}: two leaders in term {term}: n{leader} and n{id}"
                ));
                return;
            }
        }
        // Without snapshots, no follower may need one: a leader sends every follower
        // from past its log's compaction point. Raft would otherwise ask for a
        // snapshot, be told none is available, and never replicate to it again.
        if status.role == StateRole::Leader && self.core.log_gc_lag_entries == u64::MAX {
            let peer = self.live(node).driver().peer(range).expect("hosted");
            let stranded = peer
                .progress()
                .into_iter()
                .find(|&(peer, _, next)| peer != id && next < status.first_index);
            if let Some((follower, matched, next)) = stranded {
                let first = status.first_index;
                self.fail(format!(
                    "{range}: leader n{id} needs a snapshot for n{follower}: its next index {next} \
                     (matched {matched}) is below the log's first index {first}"
                ));
                return;
            }
        }
        // applied ≤ committed ≤ last, and applied ≤ persisted (raft hands out only
        // entries that are committed and durable here; a snapshot's index is applied
        // once installed, persisted once its log reset is durable).
        let (applied, committed, last, persisted) = (
            status.applied,
            status.committed,
            status.last_index,
            status.persisted,
        );
        if applied != sm_applied {
            self.fail(format!(
                "n{id} {range}: replica applied {applied} but state machine applied {sm_applied}"
            ));
            return;
        }
        let persisted = persisted.max(status.snapshot_pending);
        if !(applied <= committed && committed <= last && applied <= persisted) {
            self.fail(format!(
                "n{id} {range}: applied {applied}, committed {committed}, last {last}, persisted {persisted}"
            ));
            return;
        }
        // Durable terms never go back.
        let durable_term = self.nodes[node]
            .log
            .0
            .borrow()
            .range(range)
            .map_or(0, |log| log.hard_state.term);
        let before = self.inv.durable_term[node][r];
        if durable_term < before {
            self.fail(format!(
                "n{id} {range}: durable term went back from {before} to {durable_term}"
            ));
            return;
        }
        self.inv.durable_term[node][r] = durable_term;
        if status.term < durable_term {
            self.fail(format!(
                "n{id} {range}: term {} below its durable term {durable_term}",
                status.term
            ));
            return;
        }
        // Committed entries never change: everything up to this replica's commit
        // index (in its log as raft sees it, unstable part included) is what was
        // committed at that index anywhere, ever. What is compacted here was checked
        // before it was (or on another replica).
        let from = (self.live(node).checked_commit[r] + 1).max(status.first_index);
        if committed >= from {
            let peer = self.live(node).driver().peer(range).expect("hosted");
            let entries = match peer.entries(from, committed + 1) {
                Ok(entries) => entries,
                Err(error) => {
                    self.fail(format!(
                        "n{id} {range}: committed entries {from}..={committed} unreadable: {error}"
                    ));
                    return;
                }
            };
            self.live_mut(node).checked_commit[r] = committed;
            for entry in &entries {
                self.check_committed(node, r, entry, "commits");
            }
        }
    }

    /// A quiesced follower ticks no election timer: once its leader's store has sent
    /// nothing for an election timeout (counted from this store's start at most), its
    /// next tick must wake it to campaign (allowing two ticks for the tick phase).
    fn check_silent_leader(&mut self, node: usize, r: usize, status: &PeerStatus) {
        let Some(leader) = status.leader.filter(|l| *l != status.id) else {
            return;
        };
        if !status.quiesced || status.role != StateRole::Follower {
            return;
        }
        let live = self.live(node);
        let heard = live.last_heard[leader as usize - 1].max(live.started_at);
        let silent = self.now.saturating_sub(heard);
        let bound = self.core.election_timeout().as_nanos() as u64 + 2 * TICK;
        if silent > bound {
            self.fail(format!(
                "n{} {}: a quiesced follower still asleep though its leader n{leader}'s store has been silent for {} ms",
                node + 1,
                range_id(r),
                silent / MS
            ));
        }
    }

    fn check_committed(&mut self, node: usize, r: usize, entry: &Entry, doing: &str) {
        let id = self.nodes[node].id;
        let seen = (entry.term, hash_bytes(&entry.data));
        let first = *self.inv.ranges[r]
            .committed
            .entry(entry.index)
            .or_insert(seen);
        if first != seen {
            self.fail(format!(
                "n{id} {} {doing} index {} term {} but term {} was committed there before (data {})",
                range_id(r),
                entry.index,
                entry.term,
                first.0,
                if first.1 == seen.1 {
                    "equal"
                } else {
                    "differs"
                }
            ));
        }
    }

    /// An entry about to be applied: past the last one applied, and the committed
    /// one. (Entries the core skips, a new leader's empty one, leave gaps.)
    pub fn check_applying(&mut self, node: usize, r: usize, entry: &Entry) {
        let applied = self.live(node).batch_applied[r];
        if entry.index <= applied {
            let id = self.nodes[node].id;
            self.fail(format!(
                "n{id} {} applies index {} after {applied}",
                range_id(r),
                entry.index
            ));
        }
        self.check_committed(node, r, entry, "applies");
    }

    /// A write of a session applies in one entry only, whatever the retries: other
    /// replicas (and this one replaying its log after a crash) apply that same entry,
    /// no other entry of any range applies it again.
    pub fn check_applied_once(&mut self, node: usize, r: usize, session: SessionRef, index: u64) {
        let key = (session.id, session.sequence);
        let first = *self.inv.applied_once.entry(key).or_insert((r, index));
        if first != (r, index) {
            self.fail(format!(
                "n{} {}: write {} of session {:032x} applied twice: at index {index}, and at {} index {}",
                node + 1,
                range_id(r),
                session.sequence,
                session.id,
                range_id(first.0),
                first.1
            ));
        }
    }

    /// The sessions a range's state machine holds (what survives a crash) are its
    /// live table, at the end of every apply batch and at a crash: each change went
    /// into the batch with the data it applied.
    pub fn check_all_sessions_persisted(&mut self, node: usize, r: usize, sessions: &Sessions) {
        let persisted = &self.nodes[node].sm[r].sessions;
        let same = persisted.len() == sessions.len()
            && sessions.iter().all(|(id, session)| {
                persisted.get(&id).map(|s| &s.record) == Some(&encode_session(session))
            });
        if !same {
            self.fail(format!(
                "n{} {}: the persisted sessions ({} of them) are not the live table ({})",
                node + 1,
                range_id(r),
                persisted.len(),
                sessions.len()
            ));
        }
    }

    /// A membership change applied by `node` at `index`: every replica applies
    /// `conf_ver` v at the same entry as the same members, and a replica's `conf_ver`
    /// only grows (one at a time).
    pub fn check_membership(&mut self, node: usize, r: usize, index: u64, membership: &Membership) {
        let id = node + 1;
        let range = range_id(r);
        let before = self.nodes[node].sm[r].membership.clone();
        let previous = before.as_ref().map_or(1, |m| m.conf_ver);
        if membership.conf_ver != previous + 1 {
            self.fail(format!(
                "n{id} {range}: conf_ver {} applied at {index} over conf_ver {previous}",
                membership.conf_ver
            ));
            return;
        }
        let facts = &mut self.inv.ranges[r];
        match facts.confs.get(&membership.conf_ver) {
            Some((first_index, first)) => {
                if (*first_index, first) != (index, membership) {
                    let first_index = *first_index;
                    self.fail(format!(
                        "n{id} {range}: conf_ver {} applied at {index} as {membership:?}, elsewhere at {first_index} as another membership",
                        membership.conf_ver
                    ));
                }
            }
            None => {
                facts
                    .confs
                    .insert(membership.conf_ver, (index, membership.clone()));
                self.summary.membership_applied += 1;
                if membership.is_joint() {
                    self.summary.joint_entered += 1;
                } else if before.is_some_and(|m| m.is_joint()) {
                    self.summary.joint_left += 1;
                }
                self.log(|| {
                    format!("n{id} {range}: membership applied at {index}: {membership:?}")
                });
            }
        }
    }

    /// State machines agree on every applied prefix: after each entry, the data,
    /// the members and the live session table (`sessions`).
    pub fn check_entry_state(&mut self, node: usize, r: usize, index: u64, sessions: &Sessions) {
        let mut live: Vec<(SessionId, u64)> = sessions
            .iter()
            .map(|(id, session)| (id, hash_bytes(&encode_session(session))))
            .collect();
        live.sort_unstable();
        let hash = self.nodes[node].sm[r].hash_with(live.into_iter());
        self.check_state_hash(node, r, index, hash);
    }

    /// State machines agree on every applied prefix: at the end of an apply batch,
    /// as written (the persisted sessions are the live table then).
    pub fn check_applied_state(&mut self, node: usize, r: usize, index: u64) {
        let hash = self.nodes[node].sm[r].hash();
        self.check_state_hash(node, r, index, hash);
    }

    fn check_state_hash(&mut self, node: usize, r: usize, index: u64, hash: u64) {
        let first = *self.inv.ranges[r].states.entry(index).or_insert(hash);
        if first != hash {
            let id = self.nodes[node].id;
            self.fail(format!(
                "n{id} {}: state machine after applying {index} differs from another node's",
                range_id(r)
            ));
        }
    }

    /// Log matching: the entry (index, term) has the same contents and the same log
    /// before it on every node, at any time.
    fn check_chain(&mut self, node: usize, r: usize, index: u64, term: u64, hash: u64) {
        let first = *self.inv.ranges[r]
            .chains
            .entry((index, term))
            .or_insert(hash);
        if first != hash {
            let id = self.nodes[node].id;
            self.fail(format!(
                "log matching: n{id} {} holds an entry {index}/t{term} whose data or prefix differs from another node's",
                range_id(r)
            ));
        }
    }

    /// Log-matching bookkeeping for entries entering `node`'s view of range `r`
    /// (handed to a log write).
    pub fn extend_chain(&mut self, node: usize, r: usize, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        let chain = &mut self.live_mut(node).chains[r];
        let have = chain.base_index + chain.hashes.len() as u64;
        if first.index <= chain.base_index || first.index > have + 1 {
            let base = chain.base_index;
            self.fail(format!(
                "n{} {}: entries from {} appended to a log {}..={have}",
                node + 1,
                range_id(r),
                first.index,
                base + 1
            ));
            return;
        }
        chain
            .hashes
            .truncate((first.index - chain.base_index - 1) as usize);
        let mut prev = chain.hashes.last().copied().unwrap_or(chain.base_hash);
        let mut added = Vec::with_capacity(entries.len());
        for entry in entries {
            let mut hash = Hash(prev);
            hash.u64(entry.index)
                .u64(entry.term)
                .u64(entry.entry_type as u64)
                .bytes(&entry.data);
            prev = hash.0;
            added.push((entry.index, entry.term, prev));
        }
        chain.hashes.extend(added.iter().map(|a| a.2));
        for (index, term, hash) in added {
            self.check_chain(node, r, index, term, hash);
        }
    }

    /// The chain of a replica that installed a snapshot at (index, term): its log
    /// restarts after that entry, which some replica held.
    pub fn reset_chain(&mut self, node: usize, r: usize, index: u64, term: u64) {
        let Some(&base_hash) = self.inv.ranges[r].chains.get(&(index, term)) else {
            self.fail(format!(
                "n{} {}: a snapshot at {index}/t{term}, an entry no log ever held",
                node + 1,
                range_id(r)
            ));
            return;
        };
        self.live_mut(node).chains[r] = Chain {
            base_index: index,
            base_hash,
            hashes: Vec::new(),
        };
    }

    /// The chain of a reopened replica: its durable log, from its compaction point,
    /// whose own chain hash some replica recorded when the entry was in its log.
    pub fn rebuild_chain(&mut self, node: usize, r: usize) {
        let range = range_id(r);
        let (base_index, base_term, entries) = match self.nodes[node].log.0.borrow().range(range) {
            Some(log) => (
                log.truncated_index,
                log.truncated_term,
                log.entries.iter().cloned().collect::<Vec<_>>(),
            ),
            None => (0, 0, Vec::new()),
        };
        let base_hash = if base_index == 0 {
            0
        } else if let Some(hash) = self.inv.ranges[r].chains.get(&(base_index, base_term)) {
            *hash
        } else {
            self.fail(format!(
                "n{} {range}: the log is compacted to {base_index}/t{base_term}, an entry no log ever held",
                node + 1
            ));
            return;
        };
        self.live_mut(node).chains[r] = Chain {
            base_index,
            base_hash,
            hashes: Vec::new(),
        };
        self.extend_chain(node, r, &entries);
    }

    /// What leaves a node: a MsgAppend's entries follow its index (raft-rs 0.7's
    /// `batch_append` broke this, see `ReplicaConfig::raft_config`); a vote granted is
    /// durable before the message leaves (the async-ready contract), and no node
    /// grants two votes in one term, crashes or not.
    pub fn check_outgoing(&mut self, node: usize, range: RangeId, message: &Message) {
        let id = self.nodes[node].id;
        if message.msg_type == MessageType::MsgAppend {
            if let Some(first) = message.entries.first() {
                if first.index != message.index + 1 {
                    let (to, index, from) = (message.to, message.index, first.index);
                    self.fail(format!(
                        "n{id} sends n{to} a {range} MsgAppend after index {index} whose entries start at {from}"
                    ));
                }
            }
            return;
        }
        if message.msg_type != MessageType::MsgRequestVoteResponse || message.reject {
            return;
        }
        // (A later write may have moved the durable term on since.)
        let hs = self.nodes[node]
            .log
            .0
            .borrow()
            .range(range)
            .map(|log| log.hard_state.clone())
            .unwrap_or_default();
        if hs.term < message.term || (hs.term == message.term && hs.vote != message.to) {
            let (term, to) = (message.term, message.to);
            let (hs_term, hs_vote) = (hs.term, hs.vote);
            self.fail(format!(
                "n{id} grants its {range} vote to n{to} in term {term} before it is durable (durable t{hs_term} v{hs_vote})"
            ));
            return;
        }
        let r = super::world::range_index(range);
        let granted = *self.inv.ranges[r]
            .votes
            .entry((id, message.term))
            .or_insert(message.to);
        if granted != message.to {
            let (term, to) = (message.term, message.to);
            self.fail(format!(
                "n{id} votes twice in {range} term {term}: n{granted} and n{to}"
            ));
        }
    }
}

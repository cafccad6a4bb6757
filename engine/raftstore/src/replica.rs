//! One range replica: a raft-rs `RawNode` plus what the store needs around it —
//! proposals waiting for their entry to apply, reads waiting for a read index or for
//! apply, and the leader lease. No I/O: the caller passes the time in and does the
//! persisting, sending and applying.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use raft::eraftpb::{Message, MessageType};
use raft::{RawNode, ReadState, StateRole, Storage};

/// A proposal whose entry has not been applied yet.
struct Pending<P> {
    index: u64,
    term: u64,
    proposed_at: Instant,
    callback: P,
}

/// Reads sent to raft's ReadIndex together, waiting for their read index.
struct ReadBatch<R> {
    id: u64,
    sent_at: Instant,
    reads: Vec<R>,
}

/// What became of a proposal when the entry at its index was applied.
pub enum Outcome<P> {
    /// The entry at its index is the proposal's: its results are the entry's.
    Applied(P),
    /// Another entry took its index (a new leader overwrote it): it never applies.
    Dropped(P),
}

/// A replica refused a proposal or read because it does not lead the range.
#[derive(Debug)]
pub struct NotLeader<T> {
    pub returned: T,
    /// The peer this replica believes leads, if any.
    pub leader: Option<u64>,
}

pub struct Replica<S: Storage, P, R> {
    pub(crate) raw: RawNode<S>,
    proposals: VecDeque<Pending<P>>,
    /// Reads gathered in this loop iteration; sent as one ReadIndex by `flush_reads`.
    reads_gathering: Vec<R>,
    reads_waiting_index: VecDeque<ReadBatch<R>>,
    reads_waiting_apply: VecDeque<(u64, Vec<R>)>,
    next_read_id: u64,
    /// Lease reads are served while `now < lease_until` in `lease_term`.
    lease_until: Option<Instant>,
    lease_term: u64,
    lease_duration: Duration,
    /// A term in which this replica, leading, began a leadership transfer: no lease
    /// reads in it. The transferee campaigns with a forced vote that followers grant
    /// even within the lease they gave this leader, and its MsgTimeoutNow may arrive
    /// late — after the transfer seemed aborted — as long as the term has not moved on.
    lease_void_term: u64,
    /// Evidence of leadership gathered before this instant (a proposal or ReadIndex
    /// sent earlier) extends no lease: a membership change applied then, and the
    /// quorum that granted it may not be the quorum now.
    lease_floor: Option<Instant>,
    /// Index of the first entry of this leader's term: lease reads wait until it is
    /// applied (then every write acknowledged by an earlier leader is applied here).
    term_start_index: u64,
    /// The term this replica last led in.
    led_term: u64,
    applied: u64,
    role: StateRole,
    /// Seeded source of randomized election timeouts (raft-rs would use its thread
    /// RNG): a seeded simulation replays elections exactly.
    rng: u64,
    /// (term, role, leader) when the election timeout was last drawn.
    drawn_for: (u64, StateRole, u64),
}

impl<S: Storage, P, R> Replica<S, P, R> {
    /// `lease_duration` must be shorter than the minimum time a follower that heard
    /// from this leader waits before voting for another (election timeout).
    ///
    /// `seed` drives the randomized election timeouts.
    pub fn new(raw: RawNode<S>, applied: u64, lease_duration: Duration, seed: u64) -> Self {
        let role = raw.raft.state;
        let mut replica = Replica {
            raw,
            proposals: VecDeque::new(),
            reads_gathering: Vec::new(),
            reads_waiting_index: VecDeque::new(),
            reads_waiting_apply: VecDeque::new(),
            next_read_id: 1,
            lease_until: None,
            lease_term: 0,
            lease_duration,
            lease_void_term: 0,
            lease_floor: None,
            term_start_index: u64::MAX,
            led_term: 0,
            applied,
            role,
            rng: seed,
            drawn_for: (u64::MAX, role, u64::MAX),
        };
        replica.redraw_election_timeout();
        replica
    }

    /// splitmix64: small, seedable, good enough to spread election timeouts.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// raft-rs draws a new randomized election timeout from its thread RNG whenever
    /// the term, role or leader changes; this replaces it with one from the seed.
    fn redraw_election_timeout(&mut self) {
        let raft = &self.raw.raft;
        let now = (raft.term, raft.state, raft.leader_id);
        if now == self.drawn_for {
            return;
        }
        self.drawn_for = now;
        let base = self.raw.raft.election_timeout().max(1);
        let timeout = base + (self.next_random() % base as u64) as usize;
        self.raw.raft.set_randomized_election_timeout(timeout);
    }

    /// Advances raft's logical clock by one tick.
    pub fn tick(&mut self) -> bool {
        let ready = self.raw.tick();
        self.redraw_election_timeout();
        ready
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader_id(&self) -> Option<u64> {
        match self.raw.raft.leader_id {
            raft::INVALID_ID => None,
            id => Some(id),
        }
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn has_pending_requests(&self) -> bool {
        !self.proposals.is_empty()
            || !self.reads_gathering.is_empty()
            || !self.reads_waiting_index.is_empty()
            || !self.reads_waiting_apply.is_empty()
    }

    pub fn step(&mut self, message: Message) -> raft::Result<()> {
        let rejection = (message.msg_type == MessageType::MsgAppendResponse && message.reject)
            .then_some(message.from);
        let result = self.raw.step(message);
        if let Some(from) = rejection {
            self.floor_next_index(from);
        }
        self.redraw_election_timeout();
        result
    }

    /// Never sends a follower entries from below what it acknowledged holding: raft-rs
    /// 0.7's probe state takes a stale rejection (one overtaken by a later
    /// acknowledgement, reordered on the network or redelivered after a reconnect)
    /// as the truth and moves the next index down to the matched one (`maybe_decr_to`
    /// has no floor at `matched + 1`, which etcd's has). Harmless alone, but a log
    /// compacted up to the matched index then lacks the term of `next - 1`: raft-rs
    /// asks for a snapshot and the follower never catches up (seeded simulation,
    /// SEED=464 before this; test
    /// `a_stale_rejection_never_moves_the_next_index_below_what_the_follower_holds`).
    fn floor_next_index(&mut self, peer: u64) {
        if !self.is_leader() {
            return;
        }
        if let Some(progress) = self.raw.raft.mut_prs().get_mut(peer) {
            if progress.next_idx <= progress.matched {
                progress.next_idx = progress.matched + 1;
            }
        }
    }

    /// Proposes `data` as one entry; `callback` comes back through [`Self::take_outcome`]
    /// when the entry at its index applies.
    pub fn propose(
        &mut self,
        now: Instant,
        data: Vec<u8>,
        callback: P,
    ) -> Result<(), NotLeader<P>> {
        self.propose_with(now, callback, |raw| raw.propose(Vec::new(), data))
            .map(|_| ())
    }

    /// Appends one entry through `append` (on a leader) and queues `callback` for its
    /// outcome; returns the entry's index.
    fn propose_with(
        &mut self,
        now: Instant,
        callback: P,
        append: impl FnOnce(&mut RawNode<S>) -> raft::Result<()>,
    ) -> Result<u64, NotLeader<P>> {
        if !self.is_leader() {
            return Err(NotLeader {
                returned: callback,
                leader: self.leader_id(),
            });
        }
        let before = self.raw.raft.raft_log.last_index();
        if append(&mut self.raw).is_err() {
            return Err(NotLeader {
                returned: callback,
                leader: self.leader_id(),
            });
        }
        let index = self.raw.raft.raft_log.last_index();
        assert_eq!(index, before + 1, "a proposal appends exactly one entry");
        // A leader deposed and re-elected may still hold proposals of its older term
        // at higher indexes (they settle when an entry of a newer term applies), so
        // the queue is ordered by (term, index), never holding one position twice.
        let term = self.raw.raft.term;
        assert!(
            self.proposals
                .back()
                .is_none_or(|p| (p.term, p.index) < (term, index)),
            "proposals are matched by (term, index): each awaits one position"
        );
        self.proposals.push_back(Pending {
            index,
            term,
            proposed_at: now,
            callback,
        });
        Ok(index)
    }

    /// The proposal (if any) made at `index`, now that the entry `(index, term)`
    /// applies. Proposals at earlier indexes that were never matched are dropped.
    pub fn take_outcome(&mut self, index: u64, term: u64, dropped: &mut Vec<P>) -> Option<P>
    where
        P: Sized,
    {
        while let Some(front) = self.proposals.front() {
            // Terms never decrease along a log: once an entry of `term` applies, no
            // later index can hold a proposal of an older term.
            if front.index > index && front.term >= term {
                return None;
            }
            let pending = self.proposals.pop_front()?;
            if pending.index != index || pending.term != term {
                dropped.push(pending.callback);
                continue;
            }
            if self.is_leader() && term == self.raw.raft.term {
                // A quorum accepted this leader after `proposed_at`.
                self.extend_lease(pending.proposed_at);
            }
            return Some(pending.callback);
        }
        None
    }

    /// The term of the entry at `index`, if the log still holds it.
    pub fn term_of(&self, index: u64) -> Option<u64> {
        self.raw.raft.raft_log.term(index).ok()
    }

    /// On a leader, the highest index every member of the group holds.
    pub fn matched_by_all(&self) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        self.raw.raft.prs().iter().map(|(_, p)| p.matched).min()
    }

    /// Takes proposals the caller knows can never apply here (replica removed).
    pub fn drain_proposals(&mut self) -> Vec<P> {
        self.proposals.drain(..).map(|p| p.callback).collect()
    }

    /// A quorum acknowledged this leader after `since`: the lease runs to
    /// `since + lease_duration` (unless a membership change applied after `since`).
    fn extend_lease(&mut self, since: Instant) {
        if self.lease_floor.is_some_and(|floor| since < floor) {
            return;
        }
        let until = since + self.lease_duration;
        let term = self.raw.raft.term;
        if self.lease_term != term {
            self.lease_term = term;
            self.lease_until = None;
        }
        if self.lease_until.is_none_or(|current| until > current) {
            self.lease_until = Some(until);
        }
    }

    /// A membership change applied at `now`: the lease is void until a quorum of the
    /// new configuration acknowledges something sent after it.
    pub fn on_conf_change(&mut self, now: Instant) {
        self.lease_until = None;
        self.lease_floor = Some(now);
    }

    /// Proposes a membership change (`ConfChangeV2`) as one entry; `callback` comes
    /// back like a proposal's. The caller has checked that raft-rs takes it (no
    /// change pending, joint state matching): raft-rs would otherwise append an
    /// empty entry in its place without an error.
    pub fn propose_conf_change(
        &mut self,
        now: Instant,
        context: Vec<u8>,
        change: raft::eraftpb::ConfChangeV2,
        callback: P,
    ) -> Result<(), NotLeader<P>> {
        let index = self.propose_with(now, callback, |raw| {
            raw.propose_conf_change(context, change)
        })?;
        assert_eq!(
            self.raw.raft.pending_conf_index, index,
            "raft-rs took the membership change (not an empty entry in its place)"
        );
        Ok(())
    }

    /// Hands leadership to `to` (raft-rs's `transfer_leader`). Use this, not
    /// `raw.transfer_leader`: the lease is void for the rest of this term.
    pub fn transfer_leader(&mut self, to: u64) {
        if self.is_leader() {
            self.lease_void_term = self.raw.raft.term;
            self.lease_until = None;
        }
        self.raw.transfer_leader(to);
    }

    /// Whether a read may be served from the local state machine now, without a
    /// round trip: this replica leads, its lease holds, it has applied an entry of
    /// its own term, and it has not begun a leadership transfer in this term.
    pub fn lease_valid(&self, now: Instant) -> bool {
        self.lease_valid_until().is_some_and(|until| now < until)
    }

    /// Until when this replica may serve reads from its lease, as things stand; None
    /// when it may not at all. A caller that publishes this for other threads (the
    /// node's local reads) must publish again after anything that can shorten it:
    /// a role change, `transfer_leader`, an apply.
    pub fn lease_valid_until(&self) -> Option<Instant> {
        let usable = self.is_leader()
            && self.led_term == self.raw.raft.term
            && self.lease_term == self.raw.raft.term
            && self.applied >= self.term_start_index
            && self.lease_void_term != self.raw.raft.term
            && self.raw.raft.lead_transferee.is_none();
        self.lease_until.filter(|_| usable)
    }

    /// A linearizable read: served at once when the lease holds (returned as
    /// `Ok(Some(read))`), otherwise gathered for this loop's ReadIndex (`Ok(None)`).
    pub fn read(&mut self, now: Instant, read: R) -> Result<Option<R>, NotLeader<R>> {
        if !self.is_leader() {
            return Err(NotLeader {
                returned: read,
                leader: self.leader_id(),
            });
        }
        if self.lease_valid(now) {
            return Ok(Some(read));
        }
        self.reads_gathering.push(read);
        Ok(None)
    }

    /// Sends this loop's gathered reads to raft as one ReadIndex request (once this
    /// leader has committed an entry of its term).
    pub fn flush_reads(&mut self, now: Instant) {
        // raft-rs drops a ReadIndex on a leader that has not committed an entry of its
        // term yet; keep gathering until it has (its first commit touches the range).
        if self.reads_gathering.is_empty() || !self.raw.raft.commit_to_current_term() {
            return;
        }
        let id = self.next_read_id;
        self.next_read_id += 1;
        self.raw.read_index(id.to_be_bytes().to_vec());
        self.reads_waiting_index.push_back(ReadBatch {
            id,
            sent_at: now,
            reads: std::mem::take(&mut self.reads_gathering),
        });
    }

    /// Read states from a `Ready`: reads that got their read index wait for apply
    /// (those already applied go to `ready_reads`); a quorum confirmed this leader at
    /// `sent_at`, which extends the lease.
    pub fn on_read_states(&mut self, states: Vec<ReadState>, ready_reads: &mut Vec<R>) {
        for state in states {
            let Ok(id) = <[u8; 8]>::try_from(&state.request_ctx[..]) else {
                continue;
            };
            let id = u64::from_be_bytes(id);
            while let Some(front) = self.reads_waiting_index.front() {
                if front.id > id {
                    break;
                }
                let Some(batch) = self.reads_waiting_index.pop_front() else {
                    break;
                };
                if batch.id == id {
                    if self.is_leader() {
                        self.extend_lease(batch.sent_at);
                    }
                    self.reads_waiting_apply
                        .push_back((state.index, batch.reads));
                } else {
                    // raft-rs answers ReadIndex requests in order; an older one
                    // without an answer was lost, so it rides on this one's index.
                    self.reads_waiting_apply
                        .push_back((state.index, batch.reads));
                }
            }
        }
        self.release_reads(ready_reads);
    }

    fn release_reads(&mut self, ready_reads: &mut Vec<R>) {
        while self
            .reads_waiting_apply
            .front()
            .is_some_and(|(index, _)| *index <= self.applied)
        {
            if let Some((_, reads)) = self.reads_waiting_apply.pop_front() {
                ready_reads.extend(reads);
            }
        }
    }

    /// Records that entries up to `applied` are applied; returns the reads that can
    /// now be served.
    pub fn on_applied(&mut self, applied: u64, ready_reads: &mut Vec<R>) {
        let log = &self.raw.raft.raft_log;
        assert!(
            self.applied <= applied && applied <= log.committed && log.committed <= log.last_index(),
            "applied only grows and applied <= committed <= last: {} -> {applied}, committed {}, last {}",
            self.applied,
            log.committed,
            log.last_index()
        );
        self.applied = applied;
        self.raw.advance_apply_to(applied);
        self.release_reads(ready_reads);
    }

    /// A snapshot through `index` replaced the state machine: it is applied there.
    /// Returns the proposals still awaited (this replica led before): whether the
    /// snapshot holds them is unknown.
    pub fn on_snapshot(&mut self, index: u64) -> Vec<P> {
        assert!(
            index >= self.applied,
            "a snapshot never goes back: {} -> {index}",
            self.applied
        );
        self.applied = index;
        // raft-rs reads the entries past its applied index (an election scans them
        // for membership changes): there are none up to the snapshot, and the log
        // below it is gone. Set directly: `advance_apply_to` would refuse an index
        // above what is persisted, and the snapshot's log reset is not durable yet.
        self.raw.raft.raft_log.applied = index;
        self.drain_proposals()
    }

    /// Notes a role change seen in a `Ready`'s soft state. `not_served` gets the reads
    /// that can no longer be answered here (this replica stopped leading).
    ///
    /// `abandoned` gets the proposals of a leader that stepped down in its own term:
    /// it lost touch with a quorum (check_quorum), so nothing settles their entries
    /// until it hears from a leader again, however long the partition lasts. Their
    /// outcome is unknown (the next leader may still commit them), and the caller says
    /// so at once instead of leaving the clients waiting. A leader deposed by a higher
    /// term keeps its proposals: the new leader's log settles them shortly.
    pub fn on_role(&mut self, role: StateRole, not_served: &mut Vec<R>, abandoned: &mut Vec<P>) {
        if role == self.role {
            return;
        }
        let was_leader = self.role == StateRole::Leader;
        self.role = role;
        if role == StateRole::Leader {
            // raft-rs appended this term's empty entry on becoming leader.
            self.term_start_index = self.raw.raft.raft_log.last_index();
            self.led_term = self.raw.raft.term;
        } else if was_leader {
            self.lease_until = None;
            self.term_start_index = u64::MAX;
            not_served.append(&mut self.reads_gathering);
            for batch in self.reads_waiting_index.drain(..) {
                not_served.extend(batch.reads);
            }
            if self.raw.raft.term == self.led_term {
                // Entries already committed apply here whatever the role, and their
                // proposals get a definite answer then; only the rest are abandoned.
                let committed = self.raw.raft.raft_log.committed;
                let keep = self.proposals.partition_point(|p| p.index <= committed);
                abandoned.extend(self.proposals.drain(keep..).map(|p| p.callback));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::ConfState;
    use raft::storage::MemStorage;
    use rangekv_types::PeerId;

    use super::*;
    use crate::ReplicaConfig;

    fn replica(seed: u64) -> Replica<MemStorage, (), ()> {
        let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        let config = ReplicaConfig::default().raft_config(PeerId(1), 0).unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&config, storage, &logger).unwrap();
        Replica::new(raw, 0, Duration::from_millis(800), seed)
    }

    /// Ticks until the replica campaigns (becomes pre-candidate); returns the count.
    fn ticks_to_campaign(replica: &mut Replica<MemStorage, (), ()>) -> usize {
        for ticks in 1..1000 {
            replica.tick();
            if replica.raw.raft.state != StateRole::Follower {
                return ticks;
            }
        }
        panic!("never campaigned");
    }

    #[test]
    fn election_timeouts_come_from_the_seed() {
        let base = ReplicaConfig::default().election_timeout_ticks;
        let runs: Vec<usize> = (0..20)
            .map(|seed| ticks_to_campaign(&mut replica(seed)))
            .collect();
        let again: Vec<usize> = (0..20)
            .map(|seed| ticks_to_campaign(&mut replica(seed)))
            .collect();
        assert_eq!(runs, again, "same seeds, same elections");
        assert!(
            runs.iter().all(|t| (base..2 * base + 1).contains(t)),
            "{runs:?}"
        );
        let distinct: std::collections::HashSet<_> = runs.iter().collect();
        assert!(distinct.len() > 3, "timeouts spread: {runs:?}");
    }

    type Node = Replica<MemStorage, u32, u32>;

    fn node(id: u64) -> Node {
        let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        let config = ReplicaConfig::default().raft_config(PeerId(id), 0).unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        Replica::new(
            RawNode::new(&config, storage, &logger).unwrap(),
            0,
            Duration::from_millis(800),
            id,
        )
    }

    /// Handles every node's Ready synchronously (persist, apply, deliver) until quiet;
    /// returns the reads released by apply or read states.
    fn pump(nodes: &mut [Node], deliver: bool) -> Vec<u32> {
        let mut released = Vec::new();
        loop {
            let mut messages = Vec::new();
            for node in nodes.iter_mut() {
                if !node.raw.has_ready() {
                    continue;
                }
                let mut ready = node.raw.ready();
                if let Some(soft) = ready.ss() {
                    node.on_role(soft.raft_state, &mut Vec::new(), &mut Vec::new());
                }
                messages.extend(ready.take_messages());
                node.raw.mut_store().wl().append(ready.entries()).unwrap();
                if let Some(hs) = ready.hs() {
                    node.raw.mut_store().wl().set_hardstate(hs.clone());
                }
                node.on_read_states(ready.take_read_states(), &mut released);
                let committed = ready.take_committed_entries();
                messages.extend(ready.take_persisted_messages());
                let mut light = node.raw.advance(ready);
                messages.extend(light.take_messages());
                let last = committed
                    .iter()
                    .chain(light.committed_entries().iter())
                    .map(|e| e.index)
                    .max();
                if let Some(last) = last {
                    node.on_applied(last, &mut released);
                }
            }
            if messages.is_empty() || !deliver {
                return released;
            }
            for message in messages {
                let to = message.to as usize - 1;
                let _ = nodes[to].step(message);
            }
        }
    }

    #[test]
    fn reads_wait_for_the_new_leaders_first_commit_then_are_answered() {
        let mut nodes = vec![node(1), node(2), node(3)];
        nodes[0].raw.campaign().unwrap();
        // Elect node 1 but hold back the appends of its first (empty) entry.
        let mut elected = false;
        let mut held = Vec::new();
        for _ in 0..10 {
            let mut messages = Vec::new();
            for node in nodes.iter_mut() {
                if !node.raw.has_ready() {
                    continue;
                }
                let mut ready = node.raw.ready();
                if let Some(soft) = ready.ss() {
                    node.on_role(soft.raft_state, &mut Vec::new(), &mut Vec::new());
                }
                node.raw.mut_store().wl().append(ready.entries()).unwrap();
                if let Some(hs) = ready.hs() {
                    node.raw.mut_store().wl().set_hardstate(hs.clone());
                }
                messages.extend(ready.take_messages());
                messages.extend(ready.take_persisted_messages());
                let mut light = node.raw.advance(ready);
                messages.extend(light.take_messages());
            }
            if nodes[0].is_leader() {
                elected = true;
                held = messages;
                break;
            }
            for message in messages {
                let to = message.to as usize - 1;
                let _ = nodes[to].step(message);
            }
        }
        assert!(elected);
        assert!(!nodes[0].raw.raft.commit_to_current_term());
        let now = Instant::now();
        assert!(
            matches!(nodes[0].read(now, 7), Ok(None)),
            "no lease yet: gathered"
        );
        nodes[0].flush_reads(now);
        assert_eq!(
            nodes[0].raw.raft.pending_read_count(),
            0,
            "not sent before the first commit"
        );
        // Let the first entry commit; the read is then sent and answered.
        for message in held {
            let to = message.to as usize - 1;
            let _ = nodes[to].step(message);
        }
        let mut answered = pump(&mut nodes, true);
        assert!(nodes[0].raw.raft.commit_to_current_term());
        nodes[0].flush_reads(now);
        answered.extend(pump(&mut nodes, true));
        assert_eq!(answered, vec![7]);
        assert!(!nodes[0].has_pending_requests());
    }

    #[test]
    fn proposals_of_an_older_term_are_dropped_once_a_newer_entry_applies() {
        let mut nodes = cluster_led_by_node_1();
        let term = nodes[0].term();
        let last = nodes[0].raw.raft.raft_log.last_index();
        for callback in 0..3 {
            nodes[0]
                .propose(Instant::now(), b"x".to_vec(), callback)
                .unwrap();
        }
        // Another leader's entry of a newer term took index last + 1: every proposal
        // above it is of an older term and can never apply.
        let mut dropped = Vec::new();
        assert_eq!(
            nodes[0].take_outcome(last + 1, term + 1, &mut dropped),
            None
        );
        assert_eq!(dropped, vec![0, 1, 2]);
        assert!(!nodes[0].has_pending_requests());
    }

    /// Handles `node`'s Ready like `pump` (persisted at once), returning its messages.
    /// Three replicas, node 1 elected and its first entry committed everywhere.
    fn cluster_led_by_node_1() -> Vec<Node> {
        let mut nodes = vec![node(1), node(2), node(3)];
        nodes[0].raw.campaign().unwrap();
        pump(&mut nodes, true);
        assert!(nodes[0].is_leader());
        nodes
    }

    fn ready_messages(node: &mut Node) -> Vec<Message> {
        ready_messages_and_abandoned(node, &mut Vec::new())
    }

    /// Like `ready_messages`, noting a role change (its abandoned proposals).
    fn ready_messages_and_abandoned(node: &mut Node, abandoned: &mut Vec<u32>) -> Vec<Message> {
        let mut ready = node.raw.ready();
        if let Some(soft) = ready.ss() {
            node.on_role(soft.raft_state, &mut Vec::new(), abandoned);
        }
        let mut messages = ready.take_messages();
        node.raw.mut_store().wl().append(ready.entries()).unwrap();
        if let Some(hs) = ready.hs() {
            node.raw.mut_store().wl().set_hardstate(hs.clone());
        }
        messages.extend(ready.take_persisted_messages());
        let mut light = node.raw.advance(ready);
        messages.extend(light.take_messages());
        messages
    }

    /// A leader cut off from its quorum steps down in its own term (check_quorum) and
    /// hands back its pending uncommitted proposals as abandoned (outcome unknown) at
    /// once; committed ones wait for their apply, and a leader deposed by a higher term
    /// keeps them all for the new leader's log to settle.
    #[test]
    fn a_leader_that_loses_its_quorum_abandons_its_proposals_a_deposed_one_keeps_them() {
        let mut nodes = cluster_led_by_node_1();
        let term = nodes[0].term();
        // Proposal 6 commits (its answer is still pending); proposal 7 does not.
        nodes[0].propose(Instant::now(), b"w".to_vec(), 6).unwrap();
        pump(&mut nodes, true);
        nodes[0].propose(Instant::now(), b"x".to_vec(), 7).unwrap();
        let mut abandoned = Vec::new();
        // Node 1 is isolated: nothing it sends arrives, nothing comes back.
        for _ in 0..2 * ReplicaConfig::default().election_timeout_ticks {
            nodes[0].tick();
            ready_messages_and_abandoned(&mut nodes[0], &mut abandoned);
        }
        assert!(!nodes[0].is_leader(), "check_quorum stepped it down");
        assert_eq!(nodes[0].term(), term, "in its own term");
        assert_eq!(abandoned, vec![7], "only the uncommitted proposal");
        let committed = nodes[0].raw.raft.raft_log.committed;
        let mut dropped = Vec::new();
        assert_eq!(
            nodes[0].take_outcome(committed, term, &mut dropped),
            Some(6),
            "the committed one is answered when it applies"
        );

        // In a fresh cluster, leader 1 has a proposal pending when a message of a
        // higher term deposes it.
        let mut nodes = cluster_led_by_node_1();
        nodes[0].propose(Instant::now(), b"y".to_vec(), 8).unwrap();
        let mut deposed = Vec::new();
        ready_messages_and_abandoned(&mut nodes[0], &mut deposed);
        let higher = Message {
            msg_type: raft::eraftpb::MessageType::MsgHeartbeat,
            from: 3,
            to: 1,
            term: nodes[0].term() + 1,
            ..Default::default()
        };
        nodes[0].step(higher).unwrap();
        ready_messages_and_abandoned(&mut nodes[0], &mut deposed);
        assert!(!nodes[0].is_leader());
        assert!(deposed.is_empty(), "a deposed leader keeps its proposals");
        assert!(nodes[0].has_pending_requests());
    }

    /// Node 2 rejecting leader 1's append after `index` in `term`.
    fn rejection_from_2(term: u64, index: u64) -> Message {
        Message {
            msg_type: MessageType::MsgAppendResponse,
            from: 2,
            to: 1,
            term,
            index,
            reject: true,
            reject_hint: index - 1,
            log_term: term,
            ..Default::default()
        }
    }

    /// Found by the seeded simulation (tests/sim.rs: with batching on, 141 of the 200
    /// default seeds fail, e.g. SEED=4): with raft-rs 0.7's `batch_append`, the entries a leader sends after a rejection are appended
    /// to an empty MsgAppend already queued for that follower, whose index is not
    /// lowered to match: "after index L come entries R..=L". A follower that holds L
    /// acknowledges entries it does not have (or panics committing them), so the
    /// leader may count it towards a commit. `ReplicaConfig` turns batching off.
    #[test]
    fn append_messages_stay_well_formed_when_a_rejection_meets_a_queued_empty_append() {
        let mut nodes = cluster_led_by_node_1();
        let term = nodes[0].term();
        nodes[0].propose(Instant::now(), b"x".to_vec(), 0).unwrap();
        let last = nodes[0].raw.raft.raft_log.last_index();
        // The new entry reaches node 3 only; its acknowledgement commits it, and the
        // leader queues an empty MsgAppend (new commit index) for node 2, which it
        // optimistically thinks has the entry.
        let appends = ready_messages(&mut nodes[0]);
        let to_3 = appends.into_iter().find(|m| m.to == 3).unwrap();
        nodes[2].step(to_3).unwrap();
        for ack in ready_messages(&mut nodes[2]) {
            nodes[0].step(ack).unwrap();
        }
        assert_eq!(nodes[0].commit_index(), last);
        // A late rejection from node 2 (a duplicate, or an answer to an older append)
        // makes the leader probe node 2 from `last` again, in the same Ready.
        nodes[0].step(rejection_from_2(term, last)).unwrap();
        for message in ready_messages(&mut nodes[0]) {
            if message.msg_type == raft::eraftpb::MessageType::MsgAppend {
                if let Some(first) = message.entries.first() {
                    assert_eq!(
                        first.index,
                        message.index + 1,
                        "a MsgAppend to {} after index {} carries entries from {}",
                        message.to,
                        message.index,
                        first.index
                    );
                }
            }
        }
    }

    /// Found by the seeded simulation (tests/sim.rs, SEED=111 without this fix):
    /// leader n2 with a lease transferred leadership to n3 and was cut off right
    /// after; n3's forced vote (MsgTimeoutNow) was granted by n1 inside n2's lease, n3
    /// committed a delete, and n2 kept serving the deleted value from its lease.
    #[test]
    fn a_leadership_transfer_voids_the_lease_for_the_rest_of_the_term() {
        let mut nodes = cluster_led_by_node_1();
        let now = Instant::now();
        nodes[0].propose(now, b"x".to_vec(), 0).unwrap();
        pump(&mut nodes, true);
        let mut dropped = Vec::new();
        let last = nodes[0].raw.raft.raft_log.last_index();
        let term = nodes[0].term();
        assert_eq!(nodes[0].take_outcome(last, term, &mut dropped), Some(0));
        assert!(
            nodes[0].lease_valid(now),
            "a committed proposal grants the lease"
        );

        nodes[0].transfer_leader(2);
        assert!(nodes[0].is_leader(), "still leading until node 2 wins");
        assert!(!nodes[0].lease_valid(now));
        assert!(
            matches!(nodes[0].read(now, 7), Ok(None)),
            "reads go through ReadIndex"
        );
        // The MsgTimeoutNow is lost: the transfer is aborted after an election timeout,
        // but it could still arrive; the lease stays void in this term, even when a
        // later commit would extend it.
        let lost = ready_messages(&mut nodes[0]);
        assert!(lost
            .iter()
            .any(|m| m.msg_type == raft::eraftpb::MessageType::MsgTimeoutNow));
        for _ in 0..ReplicaConfig::default().election_timeout_ticks {
            nodes[0].tick();
        }
        assert!(
            nodes[0].raw.raft.lead_transferee.is_none(),
            "transfer aborted"
        );
        assert!(nodes[0].is_leader());
        assert_eq!(nodes[0].term(), term);
        nodes[0].propose(now, b"y".to_vec(), 1).unwrap();
        let index = nodes[0].raw.raft.raft_log.last_index();
        assert_eq!(nodes[0].take_outcome(index, term, &mut dropped), Some(1));
        assert!(!nodes[0].lease_valid(now));
    }

    #[test]
    fn a_stale_rejection_never_moves_the_next_index_below_what_the_follower_holds() {
        let mut nodes = cluster_led_by_node_1();
        nodes[0].propose(Instant::now(), b"x".to_vec(), 0).unwrap();
        pump(&mut nodes, true);
        let last = nodes[0].raw.raft.raft_log.last_index();
        let term = nodes[0].term();
        assert_eq!(nodes[0].raw.raft.prs().get(2).unwrap().matched, last);
        // The transport lost node 2 for a moment: raft probes it from matched + 1.
        nodes[0].raw.report_unreachable(2);
        // A rejection node 2 sent before acknowledging `last` arrives only now.
        nodes[0].step(rejection_from_2(term, last)).unwrap();
        let progress = nodes[0].raw.raft.prs().get(2).unwrap();
        assert!(
            progress.next_idx > progress.matched,
            "next {} must stay above matched {}",
            progress.next_idx,
            progress.matched
        );
    }

    /// A leader deposed by a higher term keeps its proposals (`on_role`); re-elected
    /// later with a shorter log, it proposes at indexes below theirs. The queue must
    /// take that (it is ordered by term, then index), and the new entry's apply
    /// settles the old ones as never applied.
    #[test]
    fn a_reelected_leader_proposes_below_its_older_terms_proposals() {
        let mut nodes = cluster_led_by_node_1();
        let term = nodes[0].term();
        let last = nodes[0].raw.raft.raft_log.last_index();
        let now = Instant::now();
        // What a term-earlier leadership left queued, above this term's next index.
        for (offset, callback) in [(3, 10), (4, 11)] {
            nodes[0].proposals.push_back(Pending {
                index: last + offset,
                term: term - 1,
                proposed_at: now,
                callback,
            });
        }
        nodes[0].propose(now, b"x".to_vec(), 12).unwrap();
        let mut dropped = Vec::new();
        assert_eq!(
            nodes[0].take_outcome(last + 1, term, &mut dropped),
            Some(12)
        );
        assert_eq!(
            dropped,
            vec![10, 11],
            "the older term's proposals never apply"
        );
        assert!(!nodes[0].has_pending_requests());
    }

    #[test]
    fn a_follower_refuses_proposals_and_reads_naming_no_leader() {
        let mut replica = replica(1);
        let refused = replica
            .propose(Instant::now(), b"x".to_vec(), ())
            .unwrap_err();
        assert_eq!(refused.leader, None);
        assert!(replica.read(Instant::now(), ()).is_err());
        assert!(!replica.lease_valid(Instant::now()));
    }
}

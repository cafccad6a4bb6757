//! Ticks, quiescence and the election-timing rules around them.
//!
//! - **Quiescence**: a leader whose range is idle (no proposal or read for
//!   `quiesce_after_ticks`, every follower matched, everything committed applied,
//!   nothing in flight) sends its followers a quiesce heartbeat and stops ticking; a
//!   follower quiesces when that heartbeat comes from its current leader in its term.
//!   Quiesced replicas are not ticked and send nothing. A request or any raft message
//!   wakes a range (a heartbeat response does not wake a leader).
//! - **Hastened elections**: a *quiesced* follower whose leader's store has sent
//!   nothing for an election timeout (the host tells which stores are silent) wakes
//!   and campaigns within 1–3 ticks, its `election_elapsed` moved to at least a full
//!   election timeout so its peers grant votes and lease safety holds. Awake
//!   followers rely on raft's own election timer.
//! - **Vote refusal after reopen**: a reopened replica refuses votes for one election
//!   timeout, since it may have acknowledged a leader whose lease still runs.

use std::time::Instant;

use raft::eraftpb::{Message, MessageType};
use raft::StateRole;
use rangekv_types::{RangeId, StoreId};
use rustc_hash::FxHashSet;

use crate::driver::Driver;
use crate::host::{Fatal, Heartbeat, HeartbeatKind, Host, Types};
use crate::peer::Peer;

impl<T: Types> Peer<T> {
    /// Whether `message` is a vote request this replica must refuse (see above).
    pub(crate) fn refuses_vote(&mut self, message: &Message, now: Instant) -> bool {
        if !matches!(
            message.msg_type,
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        ) {
            return false;
        }
        match self.votes_refused_until {
            Some(until) if now < until => true,
            Some(_) => {
                self.votes_refused_until = None;
                false
            }
            None => false,
        }
    }

    /// Whether this leader may quiesce its range: nothing pending, every follower has
    /// every entry, everything committed is applied, no membership change or
    /// leadership transfer under way (a demoted leader hands over first).
    fn can_quiesce(&self) -> bool {
        let raft = &self.replica.raw.raft;
        let last = raft.raft_log.last_index();
        raft.state == StateRole::Leader
            && self.writes.is_empty()
            && self.persisting == 0
            && !self.replica.has_pending_requests()
            && raft.pending_read_count() == 0
            && raft.raft_log.committed == last
            && self.replica.applied() == last
            && !self.replica.raw.has_ready()
            && !self.membership.is_joint()
            && raft.lead_transferee.is_none()
            && self
                .membership
                .get(rangekv_types::PeerId(raft.id))
                .is_some_and(|m| m.role == crate::membership::Role::Voter)
            && raft
                .prs()
                .iter()
                .all(|(_, progress)| progress.matched == last)
    }

    /// A quiesced follower whose leader's store went silent: campaign after 1 to 3
    /// more ticks, spread by peer id so the followers of one range rarely split the
    /// vote, and after at least a full election timeout, or the other followers would
    /// still count the silent leader's lease and refuse their votes. Returns whether
    /// it woke.
    fn hasten_election(&mut self, silent: &FxHashSet<StoreId>) -> bool {
        let raft = &self.replica.raw.raft;
        if !self.quiesced
            || raft.state != StateRole::Follower
            || raft.leader_id == raft::INVALID_ID
            || self.hastened_in_term == raft.term
        {
            return false;
        }
        let leader_silent = self
            .store_of(raft.leader_id)
            .is_some_and(|store| silent.contains(&store));
        if !leader_silent {
            return false;
        }
        self.hastened_in_term = raft.term;
        let raft = &mut self.replica.raw.raft;
        let jitter = 1 + (raft.id % 3) as usize;
        raft.election_elapsed = raft
            .randomized_election_timeout()
            .saturating_sub(jitter)
            .max(raft.election_timeout());
        true
    }
}

impl<T: Types> Driver<T> {
    /// One tick: retries deferred compactions, wakes quiesced followers of silent
    /// stores' leaders, ticks every awake range, proposes compactions and quiesces
    /// idle leaders. `silent`: other stores that sent nothing for an election timeout.
    pub fn tick(
        &mut self,
        now: Instant,
        silent: &FxHashSet<StoreId>,
        host: &mut impl Host<T>,
    ) -> Result<(), Fatal> {
        self.retry_compactions(now, host)?;
        if !silent.is_empty() {
            for (range, peer) in &mut self.peers {
                if peer.hasten_election(silent) {
                    peer.set_quiesced(false, host);
                    self.awake.insert(*range);
                }
            }
        }
        let quiesce_after = self.config.quiesce_after_ticks;
        let mut quiescing = Vec::new();
        for range in &self.awake {
            let Some(peer) = self.peers.get_mut(range) else {
                continue;
            };
            let ticked = peer.replica.tick();
            if ticked || peer.replica.raw.has_ready() {
                self.touched.insert(*range);
            }
            if peer.replica.is_leader() {
                if peer.finish_joint(now) {
                    self.touched.insert(*range);
                }
                peer.idle_ticks = peer.idle_ticks.saturating_add(1);
                // Going idle: drop the whole applied log, not just big prefixes.
                // (Two: the compaction's own entry stays, or each would beget another.)
                let gc_entries = if peer.idle_ticks >= quiesce_after {
                    2
                } else {
                    self.config.log_gc_entries
                };
                let lag_entries = self.config.log_gc_lag_entries;
                if peer.propose_compaction(gc_entries, lag_entries, now) {
                    self.touched.insert(*range);
                }
                if self.config.quiesce && peer.idle_ticks >= quiesce_after && peer.can_quiesce() {
                    quiescing.push(*range);
                }
            }
        }
        for range in quiescing {
            self.quiesce_leader(range, host);
        }
        Ok(())
    }

    /// Tells every follower, with the next tick batch, that the range is idle, and
    /// stops ticking it.
    fn quiesce_leader(&mut self, range: RangeId, host: &mut impl Host<T>) {
        let Some(peer) = self.peers.get_mut(&range) else {
            return;
        };
        let status = peer.status();
        for member in &peer.membership.members {
            let (peer_id, store) = (member.peer.get(), member.store);
            if peer_id == status.id {
                continue;
            }
            let heartbeat = Heartbeat {
                range,
                from_peer: status.id,
                to_peer: peer_id,
                term: status.term,
                commit: status.committed,
                context: Vec::new(),
            };
            host.send_heartbeat(store, heartbeat, HeartbeatKind::Quiesce, false);
        }
        peer.set_quiesced(true, host);
        self.awake.remove(&range);
    }

    /// A follower told by its current leader that the range is idle stops ticking.
    pub(crate) fn quiesce_follower(
        &mut self,
        range: RangeId,
        (from_peer, term): (u64, u64),
        host: &mut impl Host<T>,
    ) {
        let Some(peer) = self.peers.get_mut(&range) else {
            return;
        };
        let raft = &peer.replica.raw.raft;
        if raft.state == StateRole::Follower && raft.term == term && raft.leader_id == from_peer {
            // Heard from the leader: a later silence of its store may hasten again.
            peer.hastened_in_term = 0;
            peer.set_quiesced(true, host);
            self.awake.remove(&range);
        }
    }
}

//! One range's replica on a store, as the core drives it: the raft-rs replica
//! ([`Replica`]: `RawNode`, proposals, reads, lease) plus the store-level state around
//! it — writes gathered this loop, log writes in flight, quiescence, compaction, the
//! vote refusal after a reopen — and the host's own data of the range.

use std::time::Instant;

use raft::eraftpb::{Entry, Message, MessageType};
use raft::{GetEntriesContext, RawNode, StateRole};
use rangekv_types::{PeerId, RangeId, StoreId};

use crate::host::{Heartbeat, HeartbeatKind, Host, RangeView, Types};
use crate::membership::Membership;
use crate::replica::Replica;
use crate::storage::PeerStorage;
use crate::CoreConfig;

/// A read-only view of a replica's raft state, for tests and the simulation's
/// invariants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: u64,
    pub role: StateRole,
    pub term: u64,
    pub vote: u64,
    pub leader: Option<u64>,
    pub committed: u64,
    pub persisted: u64,
    pub last_index: u64,
    pub first_index: u64,
    pub applied: u64,
    pub quiesced: bool,
    /// Snapshots this replica built (leading) and installed (following).
    pub snapshots_built: u64,
    pub snapshots_installed: u64,
    /// The index of a snapshot installed whose log reset is not durable yet (0: none).
    pub snapshot_pending: u64,
}

pub(crate) type CoreReplica<T> =
    Replica<PeerStorage<<T as Types>::Log>, Vec<<T as Types>::WriteReply>, <T as Types>::ReadReply>;

pub struct Peer<T: Types> {
    pub(crate) range: RangeId,
    pub(crate) replica: CoreReplica<T>,
    pub(crate) handle: T::Range,
    /// The members as of the applied index (see [`Membership`]).
    pub(crate) membership: Membership,
    /// Writes gathered in this loop, proposed as one entry.
    pub(crate) writes: Vec<(T::Command, T::WriteReply)>,
    /// Log writes holding a `Ready` of this range that are not durable yet.
    pub(crate) persisting: usize,
    /// Votes are refused until then: a reopened replica may have acknowledged a
    /// leader whose lease is still running (see `operation::quiesce`).
    pub(crate) votes_refused_until: Option<Instant>,
    /// Not ticked and sending nothing until woken (see `operation::quiesce`).
    pub(crate) quiesced: bool,
    /// Ticks since the last proposal or read (leader only).
    pub(crate) idle_ticks: u32,
    /// The term in which this follower last hastened an election because its
    /// leader's store went silent.
    pub(crate) hastened_in_term: u64,
    /// The highest index this leader proposed to compact the log to.
    pub(crate) compact_proposed: u64,
    pub(crate) snapshots_built: u64,
    pub(crate) snapshots_installed: u64,
    /// The index of a snapshot installed whose log reset is not durable yet (0: none).
    pub(crate) snapshot_unpersisted: u64,
}

impl<T: Types> Peer<T> {
    /// Opens the replica `local` of `range` over `log`, its state machine applied to
    /// `applied`. `reopened`: it existed before this process started (its log and
    /// applied state are on disk), so it refuses votes for an election timeout.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        config: &CoreConfig,
        range: RangeId,
        local: PeerId,
        membership: &Membership,
        log: T::Log,
        applied: u64,
        reopened: bool,
        now: Instant,
        handle: T::Range,
        logger: &slog::Logger,
    ) -> Result<Self, raft::Error> {
        let conf_state = membership.conf_state();
        let storage = PeerStorage::new(log, range, conf_state, applied);
        let raft_config = config.replica.raft_config(local, applied)?;
        let raw = RawNode::new(&raft_config, storage, logger)?;
        let had_term = raw.raft.term > 0;
        let votes_refused_until = (reopened && had_term).then(|| now + config.election_timeout());
        let seed = config.election_seed ^ local.get().wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Ok(Peer {
            range,
            replica: Replica::new(raw, applied, config.lease_duration(), seed),
            handle,
            membership: membership.clone(),
            writes: Vec::new(),
            persisting: 0,
            votes_refused_until,
            quiesced: false,
            idle_ticks: 0,
            hastened_in_term: 0,
            compact_proposed: 0,
            snapshots_built: 0,
            snapshots_installed: 0,
            snapshot_unpersisted: 0,
        })
    }

    pub fn range(&self) -> RangeId {
        self.range
    }

    pub fn handle(&self) -> &T::Range {
        &self.handle
    }

    pub fn handle_mut(&mut self) -> &mut T::Range {
        &mut self.handle
    }

    pub fn is_leader(&self) -> bool {
        self.replica.is_leader()
    }

    pub fn status(&self) -> PeerStatus {
        let raft = &self.replica.raw.raft;
        PeerStatus {
            id: raft.id,
            role: raft.state,
            term: raft.term,
            vote: raft.vote,
            leader: self.replica.leader_id(),
            committed: raft.raft_log.committed,
            persisted: raft.raft_log.persisted,
            last_index: raft.raft_log.last_index(),
            first_index: raft.raft_log.first_index(),
            applied: self.replica.applied(),
            quiesced: self.quiesced,
            snapshots_built: self.snapshots_built,
            snapshots_installed: self.snapshots_installed,
            snapshot_pending: self.snapshot_unpersisted,
        }
    }

    /// The log as raft sees it (durable entries and those in flight), `low..high`.
    pub fn entries(&self, low: u64, high: u64) -> raft::Result<Vec<Entry>> {
        self.replica
            .raw
            .raft
            .raft_log
            .slice(low, high, None, GetEntriesContext::empty(false))
    }

    /// Raft's election timer: (ticks elapsed, this term's randomized timeout). Read
    /// only, for the simulation's targeted faults.
    pub fn election_timer(&self) -> (usize, usize) {
        let raft = &self.replica.raw.raft;
        (raft.election_elapsed, raft.randomized_election_timeout())
    }

    /// On a leader, every member's replication progress as raft-rs tracks it: (peer,
    /// matched index, next index to send); empty elsewhere. Read only, for the
    /// simulation's invariants.
    pub fn progress(&self) -> Vec<(u64, u64, u64)> {
        if !self.replica.is_leader() {
            return Vec::new();
        }
        self.replica
            .raw
            .raft
            .prs()
            .iter()
            .map(|(id, progress)| (*id, progress.matched, progress.next_idx))
            .collect()
    }

    pub fn log(&self) -> &T::Log {
        self.replica.raw.store().log()
    }

    pub(crate) fn store_of(&self, peer: u64) -> Option<StoreId> {
        self.membership.store_of(peer)
    }

    /// The members as of the applied index.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The configuration raft-rs holds (for checks that it is the membership's).
    pub fn conf_state(&self) -> raft::eraftpb::ConfState {
        self.replica.raw.raft.prs().conf().to_conf_state()
    }

    pub(crate) fn view(&self) -> RangeView {
        RangeView {
            leader: self.replica.leader_id(),
            term: self.replica.term(),
            applied: self.replica.applied(),
            quiesced: self.quiesced,
            lease_until: self.replica.lease_valid_until(),
        }
    }

    pub(crate) fn set_quiesced(&mut self, quiesced: bool, host: &mut impl Host<T>) {
        if self.quiesced != quiesced {
            self.quiesced = quiesced;
            host.publish(&self.handle, self.view());
        }
    }

    /// Hands `messages` to the host, heartbeats coalesced per store. A quiesced
    /// follower sends nothing: not even the answer to the quiesce heartbeat.
    pub(crate) fn send(&self, messages: Vec<Message>, host: &mut impl Host<T>) {
        for message in messages {
            let heartbeat = matches!(
                message.msg_type,
                MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse
            );
            if self.quiesced
                && message.msg_type == MessageType::MsgHeartbeatResponse
                && message.context.is_empty()
            {
                continue;
            }
            let Some(store) = self.store_of(message.to) else {
                // Programmer error upstream, but a message is only lost, never wrong.
                continue;
            };
            if heartbeat {
                let kind = if message.msg_type == MessageType::MsgHeartbeatResponse {
                    HeartbeatKind::Response
                } else {
                    HeartbeatKind::Heartbeat
                };
                // A heartbeat carrying a ReadIndex context goes out with this flush;
                // the rest ride on the next tick's store-level batch.
                let urgent = !message.context.is_empty();
                let heartbeat = Heartbeat {
                    range: self.range,
                    from_peer: message.from,
                    to_peer: message.to,
                    term: message.term,
                    commit: message.commit,
                    context: message.context.to_vec(),
                };
                host.send_heartbeat(store, heartbeat, kind, urgent);
            } else {
                host.send(store, self.range, message);
            }
        }
    }
}

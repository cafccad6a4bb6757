//! The loop body of one store worker, without the loop: the host drains its inbox
//! into the `on_*` methods, calls [`Driver::tick`] when a tick is due and
//! [`Driver::process`] once per iteration, and reports log durability with
//! [`Driver::on_persisted`]. Each turn batches the work of every range: one log write
//! for all of them, then the sends, then one apply batch.

use std::collections::VecDeque;
use std::time::Instant;

use raft::eraftpb::{Message, MessageType};
use rangekv_types::{RangeId, StoreId};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::host::{Heartbeat, HeartbeatKind, Host, Refusal, Types};
use crate::operation::compact_log::Deferred;
use crate::peer::Peer;
use crate::CoreConfig;

/// A log write in flight: the `Ready`s it persists, in order, with the messages
/// each holds until it is durable.
pub(crate) struct Persisting {
    pub seq: u64,
    pub readies: Vec<(RangeId, u64, Vec<Message>)>,
}

pub struct Driver<T: Types> {
    pub(crate) config: CoreConfig,
    pub(crate) peers: FxHashMap<RangeId, Peer<T>>,
    /// Ranges with something to do this iteration.
    pub(crate) touched: FxHashSet<RangeId>,
    /// Ranges not quiesced: the ones ticked.
    pub(crate) awake: FxHashSet<RangeId>,
    pub(crate) persisting: VecDeque<Persisting>,
    /// Applied log compactions waiting for the state machine's flush.
    pub(crate) deferred_compactions: FxHashMap<RangeId, Deferred>,
    pub(crate) next_seq: u64,
}

impl<T: Types> Driver<T> {
    pub fn new(config: CoreConfig) -> Self {
        Driver {
            config,
            peers: FxHashMap::default(),
            touched: FxHashSet::default(),
            awake: FxHashSet::default(),
            persisting: VecDeque::new(),
            deferred_compactions: FxHashMap::default(),
            next_seq: 1,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Adds a replica opened with [`Peer::open`]; it is awake and processed next.
    pub fn insert(&mut self, peer: Peer<T>) {
        let range = peer.range;
        assert!(
            !self.peers.contains_key(&range),
            "{range} opened twice on one store"
        );
        self.peers.insert(range, peer);
        self.touched.insert(range);
        self.awake.insert(range);
    }

    pub fn contains(&self, range: RangeId) -> bool {
        self.peers.contains_key(&range)
    }

    pub fn peer(&self, range: RangeId) -> Option<&Peer<T>> {
        self.peers.get(&range)
    }

    pub fn peer_mut(&mut self, range: RangeId) -> Option<&mut Peer<T>> {
        self.peers.get_mut(&range)
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer<T>> {
        self.peers.values()
    }

    /// Whether a range has work left for the next iteration (the host must not wait).
    pub fn has_work(&self) -> bool {
        !self.touched.is_empty()
    }

    /// Log writes submitted and not yet reported durable.
    pub fn writes_in_flight(&self) -> usize {
        self.persisting.len()
    }

    /// Steps a raft message of `range`. A message wakes a quiesced range, except a
    /// heartbeat response at a leader.
    pub fn on_raft(
        &mut self,
        range: RangeId,
        message: Message,
        now: Instant,
        host: &mut impl Host<T>,
    ) {
        self.step(range, message, false, now, host);
    }

    /// Steps coalesced heartbeats received from one store.
    pub fn on_heartbeats(
        &mut self,
        heartbeats: Vec<Heartbeat>,
        kind: HeartbeatKind,
        now: Instant,
        host: &mut impl Host<T>,
    ) {
        let msg_type = if kind == HeartbeatKind::Response {
            MessageType::MsgHeartbeatResponse
        } else {
            MessageType::MsgHeartbeat
        };
        for heartbeat in heartbeats {
            let sender = (heartbeat.from_peer, heartbeat.term);
            let message = Message {
                msg_type,
                from: heartbeat.from_peer,
                to: heartbeat.to_peer,
                term: heartbeat.term,
                commit: heartbeat.commit,
                context: heartbeat.context.into(),
                ..Default::default()
            };
            let quiesce = kind == HeartbeatKind::Quiesce;
            self.step(heartbeat.range, message, quiesce, now, host);
            if quiesce {
                self.quiesce_follower(heartbeat.range, sender, host);
            }
        }
    }

    fn step(
        &mut self,
        range: RangeId,
        message: Message,
        quiesce: bool,
        now: Instant,
        host: &mut impl Host<T>,
    ) {
        let Some(peer) = self.peers.get_mut(&range) else {
            // A replica this store does not host (yet, or any more): creating replicas
            // from messages comes with membership changes.
            return;
        };
        if peer.refuses_vote(&message, now) {
            return;
        }
        if !quiesce && message.msg_type != MessageType::MsgHeartbeatResponse {
            peer.set_quiesced(false, host);
            self.awake.insert(range);
        }
        // raft-rs refuses messages it cannot use (a stale term, an unknown peer);
        // dropping them is what the network might have done.
        let _ = peer.replica.step(message);
        self.touched.insert(range);
    }

    /// A client write for `range`: gathered, proposed with the others of this loop.
    /// Handed back if the range is not here.
    pub fn on_write(
        &mut self,
        range: RangeId,
        command: T::Command,
        reply: T::WriteReply,
        host: &mut impl Host<T>,
    ) -> Result<(), T::WriteReply> {
        let Some(peer) = self.peers.get_mut(&range) else {
            return Err(reply);
        };
        peer.writes.push((command, reply));
        peer.set_quiesced(false, host);
        peer.idle_ticks = 0;
        self.awake.insert(range);
        self.touched.insert(range);
        Ok(())
    }

    /// A linearizable read of `range`: answered at once from the lease, or gathered
    /// for this loop's ReadIndex. Handed back if the range is not here.
    pub fn on_read(
        &mut self,
        range: RangeId,
        reply: T::ReadReply,
        now: Instant,
        host: &mut impl Host<T>,
    ) -> Result<(), T::ReadReply> {
        let Some(peer) = self.peers.get_mut(&range) else {
            return Err(reply);
        };
        peer.set_quiesced(false, host);
        peer.idle_ticks = 0;
        self.awake.insert(range);
        match peer.replica.read(now, reply) {
            Ok(Some(reply)) => host.answer_read(reply),
            Ok(None) => {
                self.touched.insert(range);
            }
            Err(refused) => host.refuse_read(
                &peer.handle,
                refused.returned,
                Refusal::NotLeader {
                    leader: refused.leader,
                },
            ),
        }
        Ok(())
    }

    /// The transport gave up on `store`: raft probes its peers there again later.
    pub fn on_unreachable(&mut self, store: StoreId) {
        for (range, peer) in &mut self.peers {
            let peers: Vec<u64> = peer
                .membership
                .members
                .iter()
                .filter(|m| m.store == store)
                .map(|m| m.peer.get())
                .collect();
            for id in peers {
                peer.replica.raw.report_unreachable(id);
                self.touched.insert(*range);
            }
        }
    }

    /// The store stops: writes not proposed are refused; proposed ones may still
    /// commit under another leader, so their replies are abandoned (outcome unknown).
    pub fn stop(&mut self, host: &mut impl Host<T>) {
        for peer in self.peers.values_mut() {
            for (_, reply) in peer.writes.drain(..) {
                host.refuse_write(&peer.handle, reply, Refusal::Stopping);
            }
            for replies in peer.replica.drain_proposals() {
                for reply in replies {
                    host.abandon_write(reply);
                }
            }
        }
    }
}

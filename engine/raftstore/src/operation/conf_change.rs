//! Membership changes through raft-rs `ConfChangeV2`, joint consensus for any change
//! of more than one member.
//!
//! - **Propose** ([`Driver::propose_conf_change`], on the leader): the request names
//!   the `conf_ver` it was made against and its steps ([`MemberChange`]). Refused
//!   with a [`ConfChangeRefusal`] — and nothing proposed — when it is stale, when a
//!   change is already under way (a joint configuration open, or a change proposed
//!   and not applied: raft-rs would silently append an empty entry instead), when a
//!   step makes no sense for the current members, when it would demote the leader
//!   (transfer leadership first) or leave no voter. One step is a simple change;
//!   several enter a joint configuration that is left explicitly. The entry's context
//!   carries the proposer's `conf_ver` and the stores of added peers.
//! - **Apply** (every replica, in log order): a change whose `conf_ver` is not the
//!   applied one (another change applied first), or that raft-rs refuses, applies as
//!   nothing on every replica alike; otherwise raft-rs applies it, the membership
//!   takes its new roles and `conf_ver + 1`, and the host writes it in the same apply
//!   batch as the applied index ([`crate::Host::apply_membership`]). A leader's lease
//!   is void from then until the new configuration acknowledges it.
//! - **After apply**: a leader of a joint configuration proposes leaving it (an
//!   empty change) as soon as nothing is pending, on every tick until it applies — a
//!   leader elected mid-joint does the same. A leader being demoted hands leadership
//!   to a voter first.

use std::time::Instant;

use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, Entry};
use raft::StateRole;
use rangekv_types::{PeerId, RangeId, StoreId};

use crate::driver::Driver;
use crate::host::{Fatal, Host, Types};
use crate::membership::{MemberChange, Membership, Role};
use crate::peer::Peer;

/// Why a membership change was not proposed. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfChangeRefusal {
    #[error("the range is not here")]
    NoRange,
    #[error("this replica does not lead the range (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("stale membership: asked against conf_ver {asked}, the range is at {current}")]
    StaleEpoch { asked: u64, current: u64 },
    #[error("a membership change is already under way; retry once it is applied")]
    Busy,
    #[error("invalid membership change: {0}")]
    Invalid(String),
}

/// The entry context of a change: the proposer's `conf_ver`, then the stores of the
/// peers it adds. A leave-joint entry has none.
fn encode_context(conf_ver: u64, added: &[(PeerId, StoreId)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 16 * added.len());
    out.extend_from_slice(&conf_ver.to_le_bytes());
    for (peer, store) in added {
        out.extend_from_slice(&peer.get().to_le_bytes());
        out.extend_from_slice(&store.get().to_le_bytes());
    }
    out
}

fn decode_context(raw: &[u8]) -> Option<(u64, Vec<(PeerId, StoreId)>)> {
    let (conf_ver, mut rest) = raw.split_first_chunk::<8>()?;
    let mut added = Vec::new();
    while !rest.is_empty() {
        let (peer, tail) = rest.split_first_chunk::<8>()?;
        let (store, tail) = tail.split_first_chunk::<8>()?;
        added.push((
            PeerId(u64::from_le_bytes(*peer)),
            StoreId(u64::from_le_bytes(*store)),
        ));
        rest = tail;
    }
    Some((u64::from_le_bytes(*conf_ver), added))
}

/// Checks `changes` against `membership`, led by `leader`: the steps make sense,
/// the leader keeps its vote, a voter remains.
fn validate(
    membership: &Membership,
    leader: PeerId,
    changes: &[MemberChange],
) -> Result<(), ConfChangeRefusal> {
    let invalid = |why: String| Err(ConfChangeRefusal::Invalid(why));
    if changes.is_empty() {
        return invalid("no change asked for".into());
    }
    let mut voters_after = membership
        .members
        .iter()
        .filter(|m| m.role == Role::Voter)
        .count();
    for (i, change) in changes.iter().enumerate() {
        let peer = change.peer();
        if changes[..i].iter().any(|c| c.peer() == peer) {
            return invalid(format!("peer {peer} named twice"));
        }
        let role = membership.get(peer).map(|m| m.role);
        match *change {
            MemberChange::AddLearner { store, .. } => {
                if role.is_some() {
                    return invalid(format!("peer {peer} is already a member"));
                }
                if membership.members.iter().any(|m| m.store == store) {
                    return invalid(format!("store {store} already holds a replica"));
                }
                if changes[..i]
                    .iter()
                    .any(|c| matches!(c, MemberChange::AddLearner { store: s, .. } if *s == store))
                {
                    return invalid(format!("store {store} named twice"));
                }
            }
            MemberChange::Promote(_) => {
                if role != Some(Role::Learner) {
                    return invalid(format!("peer {peer} is not a learner"));
                }
                voters_after += 1;
            }
            MemberChange::Demote(_) => {
                if role != Some(Role::Voter) {
                    return invalid(format!("peer {peer} is not a voter"));
                }
                if peer == leader {
                    return invalid(format!(
                        "peer {peer} leads the range: transfer leadership first"
                    ));
                }
                voters_after -= 1;
            }
            MemberChange::RemoveLearner(_) => {
                if role != Some(Role::Learner) {
                    return invalid(format!(
                        "peer {peer} is not a learner (a voter is demoted first)"
                    ));
                }
            }
        }
    }
    if voters_after == 0 {
        return invalid("the range would have no voter".into());
    }
    Ok(())
}

fn single(change: &MemberChange) -> ConfChangeSingle {
    let (change_type, peer) = match *change {
        MemberChange::AddLearner { peer, .. } | MemberChange::Demote(peer) => {
            (ConfChangeType::AddLearnerNode, peer)
        }
        MemberChange::Promote(peer) => (ConfChangeType::AddNode, peer),
        MemberChange::RemoveLearner(peer) => (ConfChangeType::RemoveNode, peer),
    };
    ConfChangeSingle {
        change_type,
        node_id: peer.get(),
        ..Default::default()
    }
}

impl<T: Types> Driver<T> {
    /// Proposes the membership change `changes` of `range`, asked against
    /// `conf_ver`. `Ok` once proposed: the outcome shows in the range's membership
    /// once applied (a change overtaken by another applies as nothing).
    pub fn propose_conf_change(
        &mut self,
        range: RangeId,
        conf_ver: u64,
        changes: &[MemberChange],
        now: Instant,
        host: &mut impl Host<T>,
    ) -> Result<(), ConfChangeRefusal> {
        let Some(peer) = self.peers.get_mut(&range) else {
            return Err(ConfChangeRefusal::NoRange);
        };
        peer.propose_conf_change(conf_ver, changes, now)?;
        peer.set_quiesced(false, host);
        peer.idle_ticks = 0;
        self.awake.insert(range);
        self.touched.insert(range);
        Ok(())
    }
}

impl<T: Types> Peer<T> {
    /// Applies the committed membership change `entry` of `range` (see the module
    /// documentation). An entry that does not decode stops the store.
    pub(crate) fn apply_conf_change(
        &mut self,
        entry: &Entry,
        now: Instant,
        host: &mut impl Host<T>,
    ) -> Result<(), Fatal> {
        let range = self.range;
        let peer = self;
        let unappliable = |reason: String| Fatal::Unappliable {
            range,
            index: entry.index,
            reason,
        };
        let change: ConfChangeV2 = protobuf::Message::parse_from_bytes(&entry.data)
            .map_err(|error| unappliable(format!("membership change does not decode: {error}")))?;
        let leave = change.changes.is_empty();
        let added = if leave {
            Vec::new()
        } else {
            let (asked, added) = decode_context(&entry.context)
                .ok_or_else(|| unappliable("membership change context does not decode".into()))?;
            if asked != peer.membership.conf_ver {
                // Another change applied since it was proposed: void on every replica.
                return Ok(());
            }
            added
        };
        let Ok(state) = peer.replica.raw.apply_conf_change(&change) else {
            // raft-rs refuses it the same way on every replica (same applied config).
            return Ok(());
        };
        let membership = peer.membership.after(&state, &added);
        host.apply_membership(&mut peer.handle, range, entry.index, &membership);
        peer.membership = membership;
        if peer.replica.is_leader() {
            peer.replica.on_conf_change(now);
            host.publish(&peer.handle, peer.view());
        }
        Ok(())
    }

    fn propose_conf_change(
        &mut self,
        conf_ver: u64,
        changes: &[MemberChange],
        now: Instant,
    ) -> Result<(), ConfChangeRefusal> {
        let raft = &self.replica.raw.raft;
        if raft.state != StateRole::Leader {
            return Err(ConfChangeRefusal::NotLeader {
                leader: self.replica.leader_id(),
            });
        }
        if conf_ver != self.membership.conf_ver {
            return Err(ConfChangeRefusal::StaleEpoch {
                asked: conf_ver,
                current: self.membership.conf_ver,
            });
        }
        if self.membership.is_joint() || raft.has_pending_conf() || raft.lead_transferee.is_some() {
            return Err(ConfChangeRefusal::Busy);
        }
        validate(&self.membership, PeerId(raft.id), changes)?;
        let added: Vec<(PeerId, StoreId)> = changes
            .iter()
            .filter_map(|c| match *c {
                MemberChange::AddLearner { peer, store } => Some((peer, store)),
                _ => None,
            })
            .collect();
        let change = ConfChangeV2 {
            changes: changes.iter().map(single).collect(),
            // One step: a simple change. Several: joint, left by the core.
            transition: if changes.len() == 1 {
                ConfChangeTransition::Auto
            } else {
                ConfChangeTransition::Explicit
            },
            ..Default::default()
        };
        let context = encode_context(conf_ver, &added);
        self.replica
            .propose_conf_change(now, context, change, Vec::new())
            .map_err(|refused| ConfChangeRefusal::NotLeader {
                leader: refused.leader,
            })
    }

    /// On a leader with no change pending: if it is being (or was) demoted, hands
    /// leadership to the most caught-up voter; else, in a joint configuration,
    /// proposes leaving it. Returns whether it did anything.
    pub(crate) fn finish_joint(&mut self, now: Instant) -> bool {
        let raft = &self.replica.raw.raft;
        if raft.state != StateRole::Leader
            || raft.has_pending_conf()
            || raft.lead_transferee.is_some()
        {
            return false;
        }
        let local = PeerId(raft.id);
        let role = self.membership.get(local).map(|m| m.role);
        // Demoted while leading (leadership moved to it after the change was
        // proposed): raft-rs would keep a non-voter leading.
        if matches!(role, Some(Role::DemotingVoter | Role::Learner) | None) {
            let to = self
                .membership
                .members
                .iter()
                .filter(|m| matches!(m.role, Role::Voter | Role::IncomingVoter))
                .filter_map(|m| {
                    let matched = raft.prs().get(m.peer.get())?.matched;
                    Some((matched, m.peer))
                })
                .max();
            if let Some((_, to)) = to {
                self.replica.transfer_leader(to.get());
                return true;
            }
            return false;
        }
        if !self.membership.is_joint() {
            return false;
        }
        self.replica
            .propose_conf_change(now, Vec::new(), ConfChangeV2::default(), Vec::new())
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Member;

    fn members(roles: &[(u64, Role)]) -> Membership {
        Membership::new(
            3,
            roles
                .iter()
                .map(|&(peer, role)| Member {
                    peer: PeerId(peer),
                    store: StoreId(peer),
                    role,
                })
                .collect(),
        )
    }

    #[test]
    fn changes_that_make_no_sense_are_refused() {
        let m = members(&[(1, Role::Voter), (2, Role::Voter), (3, Role::Learner)]);
        let leader = PeerId(1);
        let refused = |changes: &[MemberChange]| validate(&m, leader, changes).unwrap_err();
        let add = |peer, store| MemberChange::AddLearner {
            peer: PeerId(peer),
            store: StoreId(store),
        };
        for (changes, why) in [
            (vec![], "no change"),
            (
                vec![MemberChange::Demote(PeerId(1))],
                "transfer leadership first",
            ),
            (vec![MemberChange::Demote(PeerId(3))], "not a voter"),
            (vec![MemberChange::Promote(PeerId(2))], "not a learner"),
            (
                vec![MemberChange::RemoveLearner(PeerId(2))],
                "demoted first",
            ),
            (vec![add(2, 9)], "already a member"),
            (vec![add(9, 3)], "already holds a replica"),
            (vec![add(8, 7), add(9, 7)], "named twice"),
            (
                vec![
                    MemberChange::Promote(PeerId(3)),
                    MemberChange::Demote(PeerId(3)),
                ],
                "named twice",
            ),
        ] {
            let refusal = refused(&changes);
            assert!(refusal.to_string().contains(why), "{changes:?}: {refusal}");
        }
        let lone = members(&[(1, Role::Voter), (2, Role::Voter)]);
        assert!(validate(&lone, PeerId(2), &[MemberChange::Demote(PeerId(1))]).is_ok());
        let refusal = validate(
            &members(&[(1, Role::Voter), (2, Role::Learner)]),
            PeerId(2),
            &[MemberChange::Demote(PeerId(1))],
        )
        .unwrap_err();
        assert!(refusal.to_string().contains("no voter"), "{refusal}");
        assert!(validate(
            &m,
            leader,
            &[
                MemberChange::Promote(PeerId(3)),
                MemberChange::Demote(PeerId(2))
            ]
        )
        .is_ok());
    }

    #[test]
    fn the_context_round_trips_and_refuses_garbage() {
        let added = vec![(PeerId(7), StoreId(4)), (PeerId(8), StoreId(5))];
        let raw = encode_context(12, &added);
        assert_eq!(decode_context(&raw), Some((12, added)));
        assert_eq!(decode_context(&raw[..raw.len() - 1]), None);
        assert_eq!(decode_context(&raw[..7]), None);
    }
}

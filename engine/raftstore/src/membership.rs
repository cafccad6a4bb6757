//! A range's members as the core tracks them: each replica's peer id, store and
//! role, and the configuration version (`conf_ver`) that every applied membership
//! change bumps. Raft-rs knows only peer ids ([`ConfState`]); this adds the stores
//! (where to send) and names each role of a joint configuration, as TiKV does:
//!
//! - `Voter`: votes in the configuration (both halves of a joint one).
//! - `Learner`: receives the log, never votes, never leads.
//! - `IncomingVoter`: a learner being promoted (joint: votes in the incoming half).
//! - `DemotingVoter`: a voter being demoted (joint: votes in the outgoing half, a
//!   learner once the joint configuration is left).
//!
//! A voter leaves the group by demotion first, then removal of the learner: a voter
//! is never removed directly.

use raft::eraftpb::ConfState;
use rangekv_types::{PeerId, StoreId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Voter,
    Learner,
    IncomingVoter,
    DemotingVoter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Member {
    pub peer: PeerId,
    pub store: StoreId,
    pub role: Role,
}

/// The members of a range and the version of that membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Membership {
    pub conf_ver: u64,
    /// Sorted by peer id, one per peer.
    pub members: Vec<Member>,
}

/// One step of a membership change, as a caller asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    /// A new replica on `store`, as a learner.
    AddLearner { peer: PeerId, store: StoreId },
    /// A learner becomes a voter.
    Promote(PeerId),
    /// A voter becomes a learner.
    Demote(PeerId),
    /// A learner leaves the group.
    RemoveLearner(PeerId),
}

impl MemberChange {
    pub fn peer(&self) -> PeerId {
        match *self {
            MemberChange::AddLearner { peer, .. }
            | MemberChange::Promote(peer)
            | MemberChange::Demote(peer)
            | MemberChange::RemoveLearner(peer) => peer,
        }
    }
}

impl Membership {
    /// `members` in any order (sorted here).
    pub fn new(conf_ver: u64, mut members: Vec<Member>) -> Self {
        members.sort_by_key(|m| m.peer);
        Membership { conf_ver, members }
    }

    pub fn get(&self, peer: PeerId) -> Option<&Member> {
        self.members.iter().find(|m| m.peer == peer)
    }

    pub fn store_of(&self, peer: u64) -> Option<StoreId> {
        self.get(PeerId(peer)).map(|m| m.store)
    }

    /// Whether a joint configuration is open (a promotion or demotion under way).
    pub fn is_joint(&self) -> bool {
        self.members
            .iter()
            .any(|m| matches!(m.role, Role::IncomingVoter | Role::DemotingVoter))
    }

    fn peers_where(&self, keep: impl Fn(Role) -> bool) -> Vec<u64> {
        self.members
            .iter()
            .filter(|m| keep(m.role))
            .map(|m| m.peer.get())
            .collect()
    }

    /// The configuration in raft-rs's terms. A joint one is left explicitly (never
    /// `auto_leave`: the leader that entered it may be gone before it could leave).
    pub fn conf_state(&self) -> ConfState {
        let mut state = ConfState {
            voters: self.peers_where(|r| matches!(r, Role::Voter | Role::IncomingVoter)),
            learners: self.peers_where(|r| r == Role::Learner),
            ..Default::default()
        };
        if self.is_joint() {
            state.voters_outgoing =
                self.peers_where(|r| matches!(r, Role::Voter | Role::DemotingVoter));
            state.learners_next = self.peers_where(|r| r == Role::DemotingVoter);
        }
        state
    }

    /// The membership raft-rs reports after applying a change (`applied`), the
    /// stores of new peers taken from `added`; `conf_ver` one higher. A peer raft-rs
    /// no longer lists is gone.
    pub fn after(&self, applied: &ConfState, added: &[(PeerId, StoreId)]) -> Membership {
        let has = |list: &[u64], peer: PeerId| list.contains(&peer.get());
        let joint = !applied.voters_outgoing.is_empty();
        let mut members = Vec::new();
        let known = self
            .members
            .iter()
            .map(|m| (m.peer, m.store))
            .chain(added.iter().copied());
        for (peer, store) in known {
            if members.iter().any(|m: &Member| m.peer == peer) {
                continue;
            }
            let incoming = has(&applied.voters, peer);
            let outgoing = has(&applied.voters_outgoing, peer);
            let role = if incoming && (outgoing || !joint) {
                Role::Voter
            } else if incoming {
                Role::IncomingVoter
            } else if outgoing {
                Role::DemotingVoter
            } else if has(&applied.learners, peer) {
                Role::Learner
            } else {
                continue;
            };
            members.push(Member { peer, store, role });
        }
        Membership::new(self.conf_ver + 1, members)
    }

    /// Whether this membership is what raft-rs holds (`state`), compared as sets.
    pub fn matches(&self, state: &ConfState) -> bool {
        let ours = self.conf_state();
        let same = |a: &[u64], b: &[u64]| {
            let (mut a, mut b) = (a.to_vec(), b.to_vec());
            a.sort_unstable();
            b.sort_unstable();
            a == b
        };
        same(&ours.voters, &state.voters)
            && same(&ours.learners, &state.learners)
            && same(&ours.voters_outgoing, &state.voters_outgoing)
            && same(&ours.learners_next, &state.learners_next)
    }

    /// Hand encoding (the core has no protobuf of its own): conf_ver, count, then
    /// per member peer, store and role, little-endian.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.conf_ver.to_le_bytes());
        out.extend_from_slice(&(self.members.len() as u32).to_le_bytes());
        for m in &self.members {
            out.extend_from_slice(&m.peer.get().to_le_bytes());
            out.extend_from_slice(&m.store.get().to_le_bytes());
            out.push(match m.role {
                Role::Voter => 0,
                Role::Learner => 1,
                Role::IncomingVoter => 2,
                Role::DemotingVoter => 3,
            });
        }
    }

    /// Reads what [`Membership::encode`] wrote from the front of `input`.
    pub fn decode(input: &mut &[u8]) -> Option<Membership> {
        let conf_ver = take_u64(input)?;
        let (count, rest) = input.split_first_chunk::<4>()?;
        *input = rest;
        let count = u32::from_le_bytes(*count);
        let mut members = Vec::new();
        for _ in 0..count {
            let peer = PeerId(take_u64(input)?);
            let store = StoreId(take_u64(input)?);
            let (&role, rest) = input.split_first()?;
            *input = rest;
            let role = match role {
                0 => Role::Voter,
                1 => Role::Learner,
                2 => Role::IncomingVoter,
                3 => Role::DemotingVoter,
                _ => return None,
            };
            members.push(Member { peer, store, role });
        }
        Some(Membership::new(conf_ver, members))
    }
}

fn take_u64(input: &mut &[u8]) -> Option<u64> {
    let (head, rest) = input.split_first_chunk::<8>()?;
    *input = rest;
    Some(u64::from_le_bytes(*head))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(peer: u64, role: Role) -> Member {
        Member {
            peer: PeerId(peer),
            store: StoreId(peer + 10),
            role,
        }
    }

    #[test]
    fn a_joint_membership_maps_to_raft_and_back() {
        let joint = Membership::new(
            7,
            vec![
                member(3, Role::DemotingVoter),
                member(1, Role::Voter),
                member(2, Role::IncomingVoter),
                member(4, Role::Learner),
            ],
        );
        let state = joint.conf_state();
        assert_eq!(state.voters, vec![1, 2]);
        assert_eq!(state.voters_outgoing, vec![1, 3]);
        assert_eq!(state.learners, vec![4]);
        assert_eq!(state.learners_next, vec![3]);
        assert!(!state.auto_leave);
        let before = Membership {
            conf_ver: 6,
            ..joint.clone()
        };
        assert_eq!(before.after(&state, &[]), joint);
        assert!(joint.matches(&state));

        let mut raw = Vec::new();
        joint.encode(&mut raw);
        let mut input = &raw[..];
        assert_eq!(Membership::decode(&mut input), Some(joint.clone()));
        assert!(input.is_empty());
        for cut in 0..raw.len() {
            assert_eq!(Membership::decode(&mut &raw[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn leaving_a_joint_membership_settles_every_role() {
        let joint = Membership::new(
            2,
            vec![
                member(1, Role::Voter),
                member(2, Role::IncomingVoter),
                member(3, Role::DemotingVoter),
            ],
        );
        let left = ConfState {
            voters: vec![1, 2],
            learners: vec![3],
            ..Default::default()
        };
        let after = joint.after(&left, &[]);
        assert_eq!(after.conf_ver, 3);
        assert!(!after.is_joint());
        assert_eq!(
            after.members.iter().map(|m| m.role).collect::<Vec<_>>(),
            vec![Role::Voter, Role::Voter, Role::Learner]
        );
        let added = ConfState {
            voters: vec![1, 2],
            learners: vec![9],
            ..Default::default()
        };
        let grown = after.after(&added, &[(PeerId(9), StoreId(19))]);
        assert_eq!(grown.get(PeerId(3)), None, "not listed by raft: gone");
        assert_eq!(grown.store_of(9), Some(StoreId(19)));
    }
}

//! Invariants, checked after every step (and where noted, at the moment something
//! happens), remembered across the whole run and across crashes.

use std::collections::{BTreeMap, HashMap};

use raft::eraftpb::{Entry, Message, MessageType};
use raft::{GetEntriesContext, StateRole};

use super::rng::hash_bytes;
use super::world::World;

pub struct Invariants {
    /// term → the one node that led it.
    pub leaders: BTreeMap<u64, u64>,
    /// (voter, term) → the candidate it granted its (durable) vote to.
    pub votes: BTreeMap<(u64, u64), u64>,
    /// index → (term, data hash) of the entry committed there, once seen committed
    /// anywhere.
    pub committed: BTreeMap<u64, (u64, u64)>,
    /// index → hash of the state machine after applying up to it.
    pub states: BTreeMap<u64, u64>,
    /// (index, term) → chain hash of the log up to that entry (log matching).
    pub chains: HashMap<(u64, u64), u64>,
    /// Per node, the highest durable term seen (it never goes back, crash or not).
    pub durable_term: Vec<u64>,
}

impl Invariants {
    pub fn new(nodes: usize) -> Self {
        Invariants {
            leaders: BTreeMap::new(),
            votes: BTreeMap::new(),
            committed: BTreeMap::new(),
            states: BTreeMap::new(),
            chains: HashMap::new(),
            durable_term: vec![0; nodes],
        }
    }
}

impl World {
    /// After every step, on every running node.
    pub fn check_invariants(&mut self) {
        for node in 0..self.nodes.len() {
            if self.failure.is_some() {
                return;
            }
            let id = self.nodes[node].id;
            let sm_applied = self.nodes[node].sm.applied;
            let Some(live) = self.nodes[node].live.as_ref() else {
                continue;
            };
            let raft = &live.replica.raw.raft;
            let term = raft.term;
            // At most one leader per term, over the whole run.
            if raft.state == StateRole::Leader {
                let leader = *self.inv.leaders.entry(term).or_insert(id);
                if leader != id {
                    self.fail(format!("two leaders in term {term}: n{leader} and n{id}"));
                    return;
                }
            }
            // applied ≤ committed ≤ last, and applied ≤ persisted (raft hands out only
            // entries that are committed and durable here).
            let applied = live.replica.applied();
            let committed = raft.raft_log.committed;
            let last = raft.raft_log.last_index();
            let persisted = raft.raft_log.persisted;
            if applied != sm_applied {
                self.fail(format!(
                    "n{id}: replica applied {applied} but state machine applied {sm_applied}"
                ));
                return;
            }
            if !(applied <= committed && committed <= last && applied <= persisted) {
                self.fail(format!(
                    "n{id}: applied {applied}, committed {committed}, last {last}, persisted {persisted}"
                ));
                return;
            }
            // Durable terms never go back.
            let durable_term = live.replica.raw.store().log.disk.hard_state.term;
            if durable_term < self.inv.durable_term[node] {
                let before = self.inv.durable_term[node];
                self.fail(format!(
                    "n{id}: durable term went back from {before} to {durable_term}"
                ));
                return;
            }
            self.inv.durable_term[node] = durable_term;
            if term < durable_term {
                self.fail(format!(
                    "n{id}: term {term} below its durable term {durable_term}"
                ));
                return;
            }
            // Committed entries never change: everything up to this node's commit index
            // (in its log as raft sees it, unstable part included) is what was committed
            // at that index anywhere, ever.
            let checked = live.checked_commit;
            if committed > checked {
                let entries = raft
                    .raft_log
                    .slice(
                        checked + 1,
                        committed + 1,
                        None,
                        GetEntriesContext::empty(false),
                    )
                    .expect("committed entries readable");
                if let Some(live) = self.nodes[node].live.as_mut() {
                    live.checked_commit = committed;
                }
                for entry in &entries {
                    self.check_committed(node, entry, "commits");
                }
            }
        }
    }

    fn check_committed(&mut self, node: usize, entry: &Entry, doing: &str) {
        let id = self.nodes[node].id;
        let seen = (entry.term, hash_bytes(&entry.data));
        let first = *self.inv.committed.entry(entry.index).or_insert(seen);
        if first != seen {
            self.fail(format!(
                "n{id} {doing} index {} term {} but term {} was committed there before (data {})",
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

    /// An entry about to be applied: the next index, and the committed one.
    pub fn check_applying(&mut self, node: usize, entry: &Entry) {
        let applied = self.nodes[node].sm.applied;
        if entry.index != applied + 1 {
            let id = self.nodes[node].id;
            self.fail(format!(
                "n{id} applies index {} after {applied}",
                entry.index
            ));
        }
        self.check_committed(node, entry, "applies");
    }

    /// State machines agree on every applied prefix.
    pub fn check_applied_state(&mut self, node: usize, index: u64) {
        let hash = self.nodes[node].sm.hash();
        let first = *self.inv.states.entry(index).or_insert(hash);
        if first != hash {
            let id = self.nodes[node].id;
            self.fail(format!(
                "n{id}: state machine after applying {index} differs from another node's"
            ));
        }
    }

    /// Log matching: the entry (index, term) has the same contents and the same log
    /// before it on every node, at any time.
    pub fn check_chain(&mut self, node: usize, index: u64, term: u64, hash: u64) {
        let first = *self.inv.chains.entry((index, term)).or_insert(hash);
        if first != hash {
            let id = self.nodes[node].id;
            self.fail(format!(
                "log matching: n{id} holds an entry {index}/t{term} whose data or prefix differs from another node's"
            ));
        }
    }

    /// What leaves a node: a MsgAppend's entries follow its index (raft-rs 0.7's
    /// `batch_append` broke this, see `ReplicaConfig::raft_config`); a vote granted is
    /// durable before the message leaves (the async-ready contract), and no node
    /// grants two votes in one term, crashes or not.
    pub fn check_outgoing(&mut self, node: usize, message: &Message) {
        let id = self.nodes[node].id;
        if message.msg_type == MessageType::MsgAppend {
            if let Some(first) = message.entries.first() {
                if first.index != message.index + 1 {
                    let (to, index, from) = (message.to, message.index, first.index);
                    self.fail(format!(
                        "n{id} sends n{to} a MsgAppend after index {index} whose entries start at {from}"
                    ));
                }
            }
            return;
        }
        if message.msg_type != MessageType::MsgRequestVoteResponse || message.reject {
            return;
        }
        let Some(live) = self.nodes[node].live.as_ref() else {
            return;
        };
        // (A later write may have moved the durable term on since.)
        let hs = &live.replica.raw.store().log.disk.hard_state;
        if hs.term < message.term || (hs.term == message.term && hs.vote != message.to) {
            let (term, to) = (message.term, message.to);
            let (hs_term, hs_vote) = (hs.term, hs.vote);
            self.fail(format!(
                "n{id} grants its vote to n{to} in term {term} before it is durable (durable t{hs_term} v{hs_vote})"
            ));
            return;
        }
        let granted = *self
            .inv
            .votes
            .entry((id, message.term))
            .or_insert(message.to);
        if granted != message.to {
            let (term, to) = (message.term, message.to);
            self.fail(format!(
                "n{id} votes twice in term {term}: n{granted} and n{to}"
            ));
        }
    }
}

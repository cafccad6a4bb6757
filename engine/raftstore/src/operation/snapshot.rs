//! Raft snapshots: how a follower behind its leader's log (the log was compacted
//! past it, see `compact_log`) catches up.
//!
//! - **Build** (leader): raft-rs asks its storage for a snapshot when it finds a
//!   follower below the log's first index. The storage offers the last one built
//!   while the log still continues it ([`offer`]); otherwise it notes the follower
//!   and answers "temporarily unavailable". The same loop the core builds one
//!   ([`Driver::build_snapshots`]): the state machine as applied here, from the host
//!   ([`Host::generate_snapshot`]: data, sessions, apply state — the node a RocksDB
//!   snapshot, the simulation a copy), framed with the range's [`Membership`] at that
//!   index, and raft-rs is asked to send to each follower that wanted one. The host
//!   carries the `MsgSnapshot` (the node streams the state beside it) and reports
//!   whether it arrived ([`Driver::on_snapshot_sent`]); until then raft-rs sends the
//!   follower nothing else.
//! - **Install** (follower, a `Ready` carrying the snapshot): the host replaces the
//!   range's state machine with the snapshot's, **durably and atomically**, before
//!   the core goes on ([`Host::install_snapshot`]); then the log restarts after the
//!   snapshot's index (a reset in this loop's log write, answered by the
//!   `PeerStorage` overlay until durable). A crash in between leaves a state machine
//!   ahead of its log: the host resets the log at open ([`log_needs_reset`]).
//!   Proposals this replica made while it led are abandoned (their outcome is
//!   unknown: the snapshot may or may not hold them).

use std::cell::RefCell;

use raft::eraftpb::{HardState, Snapshot, SnapshotMetadata};
use rangekv_types::RangeId;

use crate::driver::Driver;
use crate::host::{Fatal, Host, LogWrite, Types};
use crate::membership::Membership;
use crate::peer::Peer;
use crate::storage::{LogRead, Snapshots};

/// The first byte of a snapshot's data: its framing version.
const FORMAT: u8 = 1;

/// `raft::Storage::snapshot` of every replica: the snapshot built last if it is at
/// or past `request_index` and the log (from `first_index`) continues it; else
/// `to` is noted for the core to build one.
pub(crate) fn offer(
    snapshots: &RefCell<Snapshots>,
    first_index: u64,
    request_index: u64,
    to: u64,
) -> raft::Result<Snapshot> {
    let mut snapshots = snapshots.borrow_mut();
    if let Some(built) = &snapshots.built {
        let meta = built.get_metadata();
        let conf = meta.get_conf_state();
        // raft-rs refuses a snapshot whose configuration lacks its recipient.
        let names_to = conf
            .get_voters()
            .iter()
            .chain(conf.get_learners())
            .chain(conf.get_voters_outgoing())
            .any(|id| *id == to);
        if names_to && meta.index >= request_index && meta.index + 1 >= first_index {
            return Ok(built.clone());
        }
    }
    if !snapshots.wanted_by.contains(&to) {
        snapshots.wanted_by.push(to);
    }
    Err(raft::Error::Store(
        raft::StorageError::SnapshotTemporarilyUnavailable,
    ))
}

/// A snapshot's data: the format byte, the membership, then the host's payload.
pub fn encode(membership: &Membership, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + payload.len());
    out.push(FORMAT);
    membership.encode(&mut out);
    out.extend_from_slice(payload);
    out
}

/// What [`encode`] wrote: the membership and the host's payload.
pub fn decode(data: &[u8]) -> Option<(Membership, &[u8])> {
    let (&format, mut rest) = data.split_first()?;
    if format != FORMAT {
        return None;
    }
    let membership = Membership::decode(&mut rest)?;
    Some((membership, rest))
}

/// Whether a replica's durable log must restart after `applied` (of
/// `applied_term`) before it opens: a snapshot was installed and the crash came
/// before the log's reset was durable, so the log does not hold the applied entry
/// (or holds another there). The host resets it (`LogWrite::resets`) and waits.
pub fn log_needs_reset(
    log: &impl LogRead,
    range: RangeId,
    applied: u64,
    applied_term: u64,
) -> bool {
    if applied == 0 {
        return false;
    }
    match log.term(range, applied) {
        Ok(term) => term != applied_term,
        Err(_) => true,
    }
}

impl<T: Types> Driver<T> {
    /// Builds a snapshot of each touched range whose followers raft-rs found behind
    /// the log, and has raft-rs send it to them.
    pub(crate) fn build_snapshots(
        &mut self,
        ranges: &[RangeId],
        host: &mut impl Host<T>,
    ) -> Result<(), Fatal> {
        for range in ranges {
            let Some(peer) = self.peers.get_mut(range) else {
                continue;
            };
            let wanted =
                std::mem::take(&mut peer.replica.raw.store().snapshots.borrow_mut().wanted_by);
            if wanted.is_empty() || !peer.is_leader() {
                continue;
            }
            let index = peer.replica.applied();
            let Some(term) = peer.replica.term_of(index) else {
                continue;
            };
            let Some(payload) = host.generate_snapshot(&peer.handle, *range, index, term)? else {
                continue;
            };
            let mut snapshot = Snapshot::default();
            snapshot.set_data(encode(&peer.membership, &payload).into());
            snapshot.metadata = Some(SnapshotMetadata {
                conf_state: Some(peer.membership.conf_state()).into(),
                index,
                term,
                ..Default::default()
            })
            .into();
            peer.replica.raw.store().snapshots.borrow_mut().built = Some(snapshot);
            peer.snapshots_built += 1;
            for to in wanted {
                if peer.replica.raw.raft.prs().get(to).is_some() {
                    peer.replica.raw.raft.send_append(to);
                }
            }
            self.touched.insert(*range);
        }
        Ok(())
    }

    /// The host delivered (or failed to deliver) the snapshot `range`'s leader sent
    /// to `to`: raft-rs resumes replicating to it (a failure makes it probe again).
    pub fn on_snapshot_sent(&mut self, range: RangeId, to: u64, delivered: bool) {
        let Some(peer) = self.peers.get_mut(&range) else {
            return;
        };
        let status = if delivered {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        peer.replica.raw.report_snapshot(to, status);
        // Kept while a follower may still need it (its payload may pin state in the
        // host); the next follower behind gets a fresh one.
        let sending = peer
            .replica
            .raw
            .raft
            .prs()
            .iter()
            .any(|(_, p)| p.state == raft::ProgressState::Snapshot);
        if !sending {
            peer.replica.raw.store().snapshots.borrow_mut().built = None;
        }
        self.touched.insert(range);
    }
}

impl<T: Types> Peer<T> {
    /// Installs the snapshot a `Ready` carries (see the module documentation); the
    /// log's reset, with `hard_state`, joins `write` (log write `seq`). The proposals
    /// this replica still awaited go to `abandoned`.
    pub(crate) fn install_snapshot(
        &mut self,
        snapshot: &Snapshot,
        hard_state: HardState,
        seq: u64,
        write: &mut LogWrite,
        abandoned: &mut Vec<Vec<T::WriteReply>>,
        host: &mut impl Host<T>,
    ) -> Result<(), Fatal> {
        let range = self.range;
        let meta = snapshot.get_metadata();
        let (index, term) = (meta.index, meta.term);
        let refused = |reason: &str| Fatal::Snapshot {
            range,
            index,
            reason: reason.into(),
        };
        let (membership, payload) =
            decode(snapshot.get_data()).ok_or_else(|| refused("its data does not decode"))?;
        if !membership.matches(meta.get_conf_state()) {
            return Err(refused("its membership is not its raft configuration"));
        }
        host.install_snapshot(&mut self.handle, range, index, term, &membership, payload)?;
        self.membership = membership;
        abandoned.extend(self.replica.on_snapshot(index));
        self.replica.raw.mut_store().reset(index, term, seq);
        write.resets.push((range, index, term, hard_state));
        self.snapshots_installed += 1;
        self.snapshot_unpersisted = index;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Member, Role};
    use rangekv_types::{PeerId, StoreId};

    #[test]
    fn snapshot_data_round_trips_and_refuses_garbage() {
        let membership = Membership::new(
            4,
            vec![Member {
                peer: PeerId(7),
                store: StoreId(2),
                role: Role::Voter,
            }],
        );
        let data = encode(&membership, b"payload");
        let (back, payload) = decode(&data).unwrap();
        assert_eq!(back, membership);
        assert_eq!(payload, b"payload");
        assert!(decode(&data[..5]).is_none());
        let mut other = data.clone();
        other[0] = 9;
        assert!(decode(&other).is_none(), "an unknown format is refused");
    }

    #[test]
    fn a_built_snapshot_is_offered_while_the_log_continues_it() {
        let snapshots = RefCell::new(Snapshots::default());
        let unavailable = |r: raft::Result<Snapshot>| {
            matches!(
                r,
                Err(raft::Error::Store(
                    raft::StorageError::SnapshotTemporarilyUnavailable
                ))
            )
        };
        assert!(unavailable(offer(&snapshots, 10, 0, 2)));
        assert!(unavailable(offer(&snapshots, 10, 0, 2)));
        assert_eq!(snapshots.borrow().wanted_by, vec![2], "noted once");
        let mut built = Snapshot::default();
        built.mut_metadata().index = 20;
        built.mut_metadata().mut_conf_state().voters = vec![2, 3];
        snapshots.borrow_mut().built = Some(built);
        snapshots.borrow_mut().wanted_by.clear();
        assert_eq!(
            offer(&snapshots, 21, 0, 3).unwrap().get_metadata().index,
            20
        );
        assert!(
            unavailable(offer(&snapshots, 22, 0, 3)),
            "the log no longer continues it"
        );
        assert!(
            unavailable(offer(&snapshots, 21, 25, 3)),
            "the follower asked for a newer one"
        );
        assert!(
            unavailable(offer(&snapshots, 21, 0, 4)),
            "its configuration lacks the follower (raft-rs would refuse it)"
        );
        assert_eq!(snapshots.borrow().wanted_by, vec![3, 4]);
    }
}

//! Apply: the committed entries of every range of a loop go into **one** apply batch
//! of the host's state machine, which records each range's applied index with them;
//! clients are answered only once the batch is written. raft-rs hands over only
//! entries that are committed *and* locally durable, so an acknowledged write is on a
//! quorum's disks and applied on the leader.
//!
//! Membership changes apply here too, in log order (`conf_change`).
//!
//! A proposal's answer is matched by (index, term): when the entry at its index
//! applies with another term, it was overwritten and never applies (`Dropped`, safe
//! to retry). An entry the host cannot apply stops the store ([`Fatal`]): replicas
//! must never diverge silently.

use std::time::Instant;

use raft::eraftpb::{Entry, EntryType};
use rangekv_types::RangeId;

use crate::driver::Driver;
use crate::host::{AdminEffect, Applying, Fatal, Host, Refusal, Types};
use crate::storage::LogRead;

impl<T: Types> Driver<T> {
    pub(crate) fn apply(
        &mut self,
        committed: Vec<(RangeId, Vec<Entry>)>,
        now: Instant,
        host: &mut impl Host<T>,
    ) -> Result<(), Fatal> {
        host.begin_apply();
        let mut answers: Vec<(T::WriteReply, T::Answer)> = Vec::new();
        let mut dropped: Vec<(RangeId, Vec<Vec<T::WriteReply>>)> = Vec::new();
        let mut applied_to = Vec::new();
        let mut compactions = Vec::new();
        let mut results = Vec::new();
        let mut effects = Vec::new();
        for (range, entries) in committed {
            let Some(peer) = self.peers.get_mut(&range) else {
                continue;
            };
            let mut last = (0, 0);
            let mut overwritten = Vec::new();
            for entry in entries {
                let expected = last.0.max(peer.replica.applied()) + 1;
                assert_eq!(
                    entry.index,
                    expected,
                    "{range}: entries apply in order, each once (applied {})",
                    peer.replica.applied()
                );
                assert!(
                    entry.index <= peer.replica.commit_index(),
                    "{range}: entry {} applies above the commit index {}",
                    entry.index,
                    peer.replica.commit_index()
                );
                last = (entry.index, entry.term);
                let proposal = peer
                    .replica
                    .take_outcome(entry.index, entry.term, &mut overwritten);
                match entry.get_entry_type() {
                    EntryType::EntryConfChangeV2 => {
                        // Proposed by the core with no reply.
                        if let Some(proposal) = proposal {
                            overwritten.push(proposal);
                        }
                        peer.apply_conf_change(&entry, now, host)?;
                        continue;
                    }
                    EntryType::EntryConfChange => {
                        return Err(Fatal::Unappliable {
                            range,
                            index: entry.index,
                            reason: "a version 1 membership change (never proposed here)".into(),
                        });
                    }
                    EntryType::EntryNormal if entry.data.is_empty() => {
                        // A new leader's empty entry.
                        if let Some(proposal) = proposal {
                            overwritten.push(proposal);
                        }
                        continue;
                    }
                    EntryType::EntryNormal => {}
                }
                results.clear();
                effects.clear();
                let to = Applying {
                    handle: &mut peer.handle,
                    range,
                    answers: &mut results,
                    effects: &mut effects,
                };
                host.apply_entry(&entry, to)?;
                for effect in &effects {
                    match *effect {
                        AdminEffect::CompactLog { index, term } => {
                            compactions.push((range, index, term))
                        }
                    }
                }
                if let Some(replies) = proposal {
                    // A compaction is proposed with no reply; client entries with one
                    // per command.
                    assert!(
                        replies.is_empty() || replies.len() == results.len(),
                        "{range}: entry {} proposed with {} replies applies as {} commands",
                        entry.index,
                        replies.len(),
                        results.len()
                    );
                    answers.extend(replies.into_iter().zip(results.drain(..)));
                }
            }
            dropped.push((range, overwritten));
            if last.0 > 0 {
                host.set_applied(&mut peer.handle, range, last.0, last.1);
                applied_to.push((range, last.0));
            }
        }
        host.commit_apply()?;
        for (reply, answer) in answers {
            host.answer_write(reply, answer);
        }
        for (range, proposals) in dropped {
            let Some(peer) = self.peers.get(&range) else {
                continue;
            };
            for reply in proposals.into_iter().flatten() {
                host.refuse_write(&peer.handle, reply, Refusal::Dropped);
            }
        }
        let mut reads = Vec::new();
        for (range, applied) in applied_to {
            let Some(peer) = self.peers.get_mut(&range) else {
                continue;
            };
            peer.replica.on_applied(applied, &mut reads);
            // A joint configuration just entered is left as soon as it applied.
            peer.finish_joint(now);
            self.touched.insert(range);
            // Entries applied here (and, on a leader, held by every follower) are read
            // no more: the log's cache keeps only what is in flight.
            let through = match peer.replica.matched_by_all() {
                Some(matched) => applied.min(matched),
                None => applied,
            };
            peer.log().release_cache(range, through);
        }
        for reply in reads {
            host.answer_read(reply);
        }
        // After the answers: what the batch applied is answered even if this fails.
        if !compactions.is_empty() {
            self.compact_logs(compactions, now, host)?;
        }
        Ok(())
    }
}

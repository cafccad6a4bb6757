//! Log compaction under the **flushed-applied-index rule**: the raft log never drops
//! an entry above a range's applied index *as the state machine has flushed it*
//! (applies skip the state machine's WAL, so what a crash would lose of the state
//! machine must stay in the log to be replayed).
//!
//! Phases:
//! - propose ([`Peer::propose_compaction`], on a leader's tick): once at least
//!   `log_gc_entries` entries are applied here and held by every follower (but a
//!   follower more than `log_gc_lag_entries` behind is left to catch up by
//!   snapshot, see `snapshot`) — two when
//!   the range goes idle, so a quiet range drops its whole applied log — and as many
//!   past the last proposal (a compaction may wait for a flush, and meanwhile the
//!   log's first index stands still).
//! - apply (on every replica): the command applies as nothing to the data; the host
//!   reports it as [`AdminEffect::CompactLog`](crate::host::AdminEffect).
//! - after apply ([`Driver::compact_logs`]): the compaction point is written to the
//!   log once [`Host::durable_applied`] has reached it; until then it waits in
//!   `deferred_compactions` (one per range; a newer one replaces it, keeping its age)
//!   and is retried every tick, its flushed part written at once. One that waited
//!   `log_gc_flush_after` asks the state machine for a flush (once). Deferred points
//!   are in memory only: after a restart the log is compacted with the next proposal.

use std::time::Instant;

use rangekv_types::RangeId;

use crate::driver::Driver;
use crate::host::{Fatal, Host, LogWrite, Types};
use crate::peer::Peer;
use crate::storage::LogRead;

/// An applied compaction waiting for the state machine's flush.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deferred {
    index: u64,
    term: u64,
    since: Instant,
    flush_asked: bool,
}

impl<T: Types> Peer<T> {
    /// Proposes compacting this leader's log when at least `gc_entries` entries are
    /// applied here and held by every follower. Returns whether it proposed.
    pub(crate) fn propose_compaction(
        &mut self,
        gc_entries: u64,
        lag_entries: u64,
        now: Instant,
    ) -> bool {
        let Some(held_by_all) = self.replica.matched_by_all() else {
            return false;
        };
        // A follower further behind than `lag_entries` catches up by snapshot.
        let applied = self.replica.applied();
        let target = applied.min(held_by_all.max(applied.saturating_sub(lag_entries)));
        let first = self.log().first_index(self.range);
        let gc_entries = gc_entries.max(1);
        if target <= self.compact_proposed
            || target + 1 < first + gc_entries
            || target < self.compact_proposed + gc_entries
        {
            return false;
        }
        let Some(term) = self.replica.term_of(target) else {
            return false;
        };
        let data = T::encode_compact_log(target, term);
        if self.replica.propose(now, data, Vec::new()).is_ok() {
            self.compact_proposed = target;
            return true;
        }
        false
    }
}

impl<T: Types> Driver<T> {
    /// Records applied compaction points and writes those the state machine has
    /// flushed.
    pub(crate) fn compact_logs(
        &mut self,
        compactions: Vec<(RangeId, u64, u64)>,
        now: Instant,
        host: &mut impl Host<T>,
    ) -> Result<(), Fatal> {
        for (range, index, term) in compactions {
            // A newer point replaces a waiting one but keeps its age and whether a
            // flush was asked for it.
            let (since, flush_asked) = match self.deferred_compactions.get(&range) {
                Some(deferred) if deferred.index >= index => continue,
                Some(deferred) => (deferred.since, deferred.flush_asked),
                None => (now, false),
            };
            self.deferred_compactions.insert(
                range,
                Deferred {
                    index,
                    term,
                    since,
                    flush_asked,
                },
            );
        }
        self.retry_compactions(now, host)
    }

    /// Writes every deferred compaction whose point the state machine has flushed,
    /// and the flushed part of one it has not; asks for a flush for one that has
    /// waited `log_gc_flush_after`.
    pub(crate) fn retry_compactions(
        &mut self,
        now: Instant,
        host: &mut impl Host<T>,
    ) -> Result<(), Fatal> {
        if self.deferred_compactions.is_empty() {
            return Ok(());
        }
        let mut write = LogWrite::default();
        let mut flush = false;
        let mut ranges: Vec<RangeId> = self.deferred_compactions.keys().copied().collect();
        ranges.sort_unstable();
        for range in ranges {
            let Some(deferred) = self.deferred_compactions.get_mut(&range) else {
                continue;
            };
            let durable = host.durable_applied(range)?;
            if durable >= deferred.index {
                write
                    .compactions
                    .push((range, deferred.index, deferred.term));
                self.deferred_compactions.remove(&range);
                continue;
            }
            // What is flushed may go now (its term is still in the log).
            if let Some(peer) = self.peers.get(&range) {
                if durable >= peer.log().first_index(range) {
                    if let Some(term) = peer.replica.term_of(durable) {
                        write.compactions.push((range, durable, term));
                    }
                }
            }
            if !deferred.flush_asked
                && now.saturating_duration_since(deferred.since) >= self.config.log_gc_flush_after
            {
                deferred.flush_asked = true;
                flush = true;
            }
        }
        if flush {
            host.request_flush()?;
        }
        if !write.is_empty() {
            host.submit_log(write);
        }
        Ok(())
    }
}

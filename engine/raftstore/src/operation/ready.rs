//! One loop's raft work for every touched range of a worker, batched at store level.
//!
//! Per loop: propose each range's gathered writes (`write`) and reads (one
//! ReadIndex), then take the `Ready` of every range with work and fold them into
//! **one** [`LogWrite`] (a few when past `loop_bytes_target`). Leader messages go out
//! at once, in parallel with its own fsync (raft thesis §10.2.1); messages that need
//! persistence (votes, append responses) are held with the `Ready` and sent when the
//! write is durable ([`Driver::on_persisted`]), which is also when raft-rs hears of
//! it (`on_persist_ready`). A `Ready` with nothing to persist and no earlier write in
//! flight is persisted at once; otherwise it rides with the last write. Committed
//! entries of every range are then applied in one batch (`apply`).
//!
//! raft-rs 0.7 reads advanced entries back before they are durable: they stay in the
//! range's `PeerStorage` overlay until their write completes.

use std::time::Instant;

use rangekv_types::RangeId;

use crate::driver::{Driver, Persisting};
use crate::host::{Fatal, Host, LogWrite, Refusal, Types};
use crate::session::Stamp;

/// Bytes a log write counts for an entry beyond its data (header, index, term).
const ENTRY_OVERHEAD_BYTES: usize = 32;

impl<T: Types> Driver<T> {
    /// Runs one iteration's raft work for every range touched since the last one.
    pub fn process(&mut self, now: Instant, host: &mut impl Host<T>) -> Result<(), Fatal> {
        if self.touched.is_empty() {
            return Ok(());
        }
        let touched: Vec<RangeId> = self.touched.drain().collect();
        let loop_bytes = self.config.loop_bytes_target;
        let entry_bytes = self.config.entry_bytes_target;
        let stamp = Stamp {
            proposed_at_ms: host.wall_clock_ms(),
            session_ttl_ms: u64::try_from(self.config.session_ttl.as_millis()).unwrap_or(u64::MAX),
        };
        // Proposals and reads first: they join this iteration's Ready.
        for range in &touched {
            if let Some(peer) = self.peers.get_mut(range) {
                peer.propose_writes(now, stamp, entry_bytes, loop_bytes, host);
                peer.replica.flush_reads(now);
                if !peer.writes.is_empty() {
                    self.touched.insert(*range);
                }
            }
        }
        // Followers raft-rs found behind the log while stepping: their snapshots go
        // out in this loop's Ready.
        self.build_snapshots(&touched, host)?;
        let mut write = LogWrite {
            seq: Some(self.next_seq),
            ..Default::default()
        };
        let mut record = Persisting {
            seq: self.next_seq,
            readies: Vec::new(),
        };
        let mut committed = Vec::new();
        let mut not_served = Vec::new();
        // Proposals of leaders that lost their quorum (see `Replica::on_role`).
        let mut abandoned = Vec::new();
        for range in &touched {
            if write.bytes >= loop_bytes {
                self.submit(std::mem::take(&mut write), record, host);
                write.seq = Some(self.next_seq);
                record = Persisting {
                    seq: self.next_seq,
                    readies: Vec::new(),
                };
            }
            let Some(peer) = self.peers.get_mut(range) else {
                continue;
            };
            if !peer.replica.raw.has_ready() {
                continue;
            }
            let mut ready = peer.replica.raw.ready();
            if let Some(soft) = ready.ss() {
                let role = soft.raft_state;
                let mut reads = Vec::new();
                peer.replica.on_role(role, &mut reads, &mut abandoned);
                not_served.extend(reads.into_iter().map(|read| (*range, read)));
            }
            peer.send(ready.take_messages(), host);
            let snapshot = !ready.snapshot().is_empty();
            if snapshot {
                // The reset carries the hard state (the Ready's, else the current one):
                // one atomic step in the log.
                let hard_state = ready
                    .hs()
                    .cloned()
                    .unwrap_or_else(|| peer.replica.raw.raft.hard_state());
                peer.install_snapshot(
                    ready.snapshot(),
                    hard_state,
                    record.seq,
                    &mut write,
                    &mut abandoned,
                    host,
                )?;
                self.deferred_compactions.remove(range);
            }
            if !ready.read_states().is_empty() {
                let mut reads = Vec::new();
                peer.replica
                    .on_read_states(ready.take_read_states(), &mut reads);
                for reply in reads {
                    host.answer_read(reply);
                }
            }
            let entries = ready.take_committed_entries();
            if !entries.is_empty() {
                committed.push((*range, entries));
            }
            let appended = ready.take_entries();
            // With a snapshot, the reset carries the hard state.
            let hard_state = ready.hs().cloned().filter(|_| !snapshot);
            let after_persist = ready.take_persisted_messages();
            let number = ready.number();
            let needs_persist = !appended.is_empty() || hard_state.is_some() || snapshot;
            let seq = record.seq;
            if !appended.is_empty() {
                peer.replica.raw.mut_store().append_unstable(&appended, seq);
                write.bytes += appended
                    .iter()
                    .map(|e| e.data.len() + e.context.len() + ENTRY_OVERHEAD_BYTES)
                    .sum::<usize>();
                write.appends.push((*range, appended));
            }
            if let Some(hard_state) = hard_state {
                write.hard_states.push((*range, hard_state));
            }
            peer.replica.raw.advance_append_async(ready);
            if needs_persist || peer.persisting > 0 {
                peer.persisting += 1;
                record.readies.push((*range, number, after_persist));
            } else {
                peer.replica.raw.on_persist_ready(number);
                peer.send(after_persist, host);
                self.touched.insert(*range);
            }
        }
        for (range, reply) in not_served {
            if let Some(peer) = self.peers.get(&range) {
                host.refuse_read(&peer.handle, reply, Refusal::Dropped);
            }
        }
        for replies in abandoned {
            for reply in replies {
                host.abandon_write(reply);
            }
        }
        self.submit(write, record, host);
        host.flush();
        if !committed.is_empty() {
            self.apply(committed, now, host)?;
        }
        // Role changes, applies and lease renewals of this loop, for local reads.
        for range in &touched {
            if let Some(peer) = self.peers.get(range) {
                host.publish(&peer.handle, peer.view());
            }
        }
        Ok(())
    }

    /// Hands one log write (the `Ready`s in `record`) to the host.
    fn submit(&mut self, write: LogWrite, record: Persisting, host: &mut impl Host<T>) {
        if record.readies.is_empty() {
            assert!(write.is_empty(), "a log write persists at least one Ready");
            return;
        }
        assert_eq!(
            record.seq, self.next_seq,
            "log writes are numbered in order"
        );
        self.next_seq += 1;
        self.persisting.push_back(record);
        host.submit_log(write);
    }

    /// Log write `seq` is durable (writes complete in order): its `Ready`s are
    /// persisted and their held messages go out.
    pub fn on_persisted(&mut self, seq: u64, host: &mut impl Host<T>) {
        let Some(record) = self.persisting.pop_front() else {
            panic!("log write {seq} reported durable, but none is in flight");
        };
        assert_eq!(record.seq, seq, "log writes complete in order");
        for (range, number, messages) in record.readies {
            let Some(peer) = self.peers.get_mut(&range) else {
                continue;
            };
            peer.persisting = peer.persisting.saturating_sub(1);
            peer.replica.raw.mut_store().on_durable(seq);
            peer.replica.raw.on_persist_ready(number);
            if peer.replica.raw.raft.raft_log.persisted >= peer.snapshot_unpersisted {
                peer.snapshot_unpersisted = 0;
            }
            peer.send(messages, host);
            self.touched.insert(range);
        }
    }
}

//! Proposal batching: every client write a range received in one loop becomes one
//! raft entry (a few when they pass `entry_bytes_target`), proposed before the
//! loop's `Ready`s are collected so it joins this loop's log write.
//!
//! Phases: gathered by [`crate::Driver::on_write`] → proposed here → matched to its
//! entry's outcome at apply (`apply`).

use std::time::Instant;

use crate::host::{Host, Refusal, Types};
use crate::peer::Peer;
use crate::session::Stamp;

impl<T: Types> Peer<T> {
    /// Proposes the writes gathered this iteration, at most `bytes_target` bytes of
    /// them; the rest waits for the next iteration (the caller keeps the range
    /// touched). Each entry carries `stamp`, the leader's time (session expiry).
    pub(crate) fn propose_writes(
        &mut self,
        now: Instant,
        stamp: Stamp,
        entry_bytes_target: usize,
        bytes_target: usize,
        host: &mut impl Host<T>,
    ) {
        if self.writes.is_empty() {
            return;
        }
        let writes = std::mem::take(&mut self.writes);
        if !self.replica.is_leader() {
            let leader = self.replica.leader_id();
            for (_, reply) in writes {
                host.refuse_write(&self.handle, reply, Refusal::NotLeader { leader });
            }
            return;
        }
        let mut commands = Vec::new();
        let mut replies = Vec::new();
        let mut bytes = 0;
        let mut chunks = Vec::new();
        let mut proposed = 0;
        let mut writes = writes.into_iter();
        for (command, reply) in writes.by_ref() {
            let size = T::command_bytes(&command);
            // An entry never grows past the target with a second command; a single
            // command is bounded by the request limit.
            if !commands.is_empty() && bytes + size > entry_bytes_target {
                chunks.push((std::mem::take(&mut commands), std::mem::take(&mut replies)));
                bytes = 0;
            }
            bytes += size;
            proposed += size;
            commands.push(command);
            replies.push(reply);
            if proposed >= bytes_target {
                break;
            }
        }
        self.writes.extend(writes);
        if !commands.is_empty() {
            chunks.push((commands, replies));
        }
        for (commands, replies) in chunks {
            let data = T::encode_entry(commands, stamp);
            if let Err(refused) = self.replica.propose(now, data, replies) {
                let leader = refused.leader;
                for reply in refused.returned {
                    host.refuse_write(&self.handle, reply, Refusal::NotLeader { leader });
                }
            }
        }
    }
}

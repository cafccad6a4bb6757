//! The replication core: everything a store does with its raft groups that is not
//! I/O. A [`driver::Driver`] is the loop body of one store worker: it holds the
//! [`peer::Peer`]s of the worker's ranges and runs the raft protocol over them — each
//! concern in its own module under [`operation`], in the manner of TiKV
//! raftstore-v2: propose batching (`write`), Ready handling into one store-level log
//! write (`ready`), apply and outcome matching (`apply`), log compaction
//! (`compact_log`), quiescence (`quiesce`), leadership transfer
//! (`transfer_leader`), membership changes (`conf_change`, over the [`Membership`]
//! of each range), snapshots (`snapshot`). Split lands as `split` beside them.
//!
//! The caller names its types with [`Types`] and supplies I/O through [`Host`]: sending raft messages and
//! coalesced heartbeats, submitting log writes, the state machine's apply batch,
//! answering clients. The durable log is read through [`storage::LogRead`], under
//! the unstable-entries overlay [`storage::PeerStorage`]. The storage node
//! (`rangekv-node`) and the seeded simulation (`tests/sim.rs`) implement them; the
//! protocol itself exists once, here.
//!
//! Boundary: this crate performs no I/O, reads no clock and knows nothing of tokio,
//! gRPC, RocksDB or io_uring (its `Cargo.toml` has none of them). Time arrives from
//! the caller (`Instant`s, ticks), randomness from a seed.

#[cfg(test)]
mod core_tests;
pub mod driver;
pub mod host;
pub mod membership;
pub mod operation;
pub mod peer;
pub mod replica;
pub mod session;
pub mod storage;

use std::time::Duration;

use rangekv_types::PeerId;

pub use driver::Driver;
pub use host::{
    AdminEffect, Applying, Fatal, Heartbeat, HeartbeatKind, Host, LogWrite, RangeView, Refusal,
    Types,
};
pub use membership::{Member, MemberChange, Membership, Role};
pub use peer::{Peer, PeerStatus};
pub use session::{SessionId, SessionRef, SessionTable, Stamp, Verdict};
pub use storage::{LogRead, PeerStorage};

/// Timing and flow-control settings of every range replica on a store. Units last.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub election_timeout_ticks: usize,
    pub heartbeat_interval_ticks: usize,
    pub inflight_messages_max: usize,
    pub append_bytes_max: u64,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 2,
            inflight_messages_max: 256,
            append_bytes_max: 1024 * 1024,
        }
    }
}

impl ReplicaConfig {
    /// The raft-rs configuration of the replica `peer`: pre-vote and check-quorum on
    /// (check-quorum is what makes leader leases safe), bounded inflight appends, no
    /// append batching (unsafe in raft-rs 0.7, see below).
    pub fn raft_config(
        &self,
        peer: PeerId,
        applied_index: u64,
    ) -> Result<raft::Config, raft::Error> {
        let config = raft::Config {
            id: peer.get(),
            election_tick: self.election_timeout_ticks,
            heartbeat_tick: self.heartbeat_interval_ticks,
            applied: applied_index,
            max_size_per_msg: self.append_bytes_max,
            max_inflight_msgs: self.inflight_messages_max,
            pre_vote: true,
            check_quorum: true,
            // Off: raft-rs 0.7 batches the entries it sends after a rejection into an
            // empty MsgAppend already queued for that follower without lowering the
            // message's index, and a follower holding that index then acknowledges
            // entries it does not have (replica.rs test
            // `append_messages_stay_well_formed_when_a_rejection_meets_a_queued_empty_append`).
            batch_append: false,
            // Bounds one apply batch (and its memory) after a restart with a backlog.
            max_committed_size_per_ready: 16 * 1024 * 1024,
            ..Default::default()
        };
        config.validate()?;
        Ok(config)
    }
}

/// Settings of one store's replication core (every worker's [`Driver`]). Units last.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub replica: ReplicaConfig,
    /// The time one raft tick stands for (the caller ticks; the core reads no clock).
    pub tick_interval: Duration,
    /// Idle ranges stop ticking (see `operation::quiesce`).
    pub quiesce: bool,
    /// Ticks without a proposal or read before a leader quiesces its range.
    pub quiesce_after_ticks: u32,
    /// A leader proposes log compaction once at least this many applied entries, held
    /// by every follower, can be dropped.
    pub log_gc_entries: u64,
    /// A follower more than this many entries behind the leader's applied index no
    /// longer holds the log back: it is compacted past it, and the follower catches
    /// up by snapshot (a dead replica would otherwise pin the log forever).
    pub log_gc_lag_entries: u64,
    /// A log compaction waiting for the state machine's flush asks for one after this
    /// long (a busy store flushes by itself far sooner; an idle one would never).
    pub log_gc_flush_after: Duration,
    /// Payload bytes one loop proposes per range and hands to one log write.
    pub loop_bytes_target: usize,
    /// One raft entry holds client commands up to about this many bytes.
    pub entry_bytes_target: usize,
    /// Seeds every replica's randomized election timeouts (mixed with its peer id).
    pub election_seed: u64,
    /// Client sessions idle this long are dropped (see [`session`]); the leader
    /// stamps it on every entry, so every replica expires with the leader's setting.
    pub session_ttl: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            replica: ReplicaConfig::default(),
            tick_interval: Duration::from_millis(100),
            quiesce: true,
            quiesce_after_ticks: 20,
            log_gc_entries: 4096,
            // TiKV compacts past laggards at ~74k entries (`raft-log-gc-count-limit`
            // for its 96 MiB regions); ranges here are smaller and a snapshot of a
            // small range is cheaper than replaying 50k entries.
            log_gc_lag_entries: 50_000,
            log_gc_flush_after: Duration::from_secs(10),
            loop_bytes_target: 32 * 1024 * 1024,
            entry_bytes_target: 4 * 1024 * 1024,
            election_seed: 0x5EED,
            session_ttl: Duration::from_secs(600),
        }
    }
}

impl CoreConfig {
    pub fn election_timeout(&self) -> Duration {
        self.tick_interval * self.replica.election_timeout_ticks as u32
    }

    /// How long a leader serves reads from its lease after a quorum confirmed it.
    /// A follower that heard from the leader waits at least `election_timeout_ticks - 1`
    /// ticks before voting for another (check-quorum); one more tick is the margin for
    /// clock-rate differences and tick jitter.
    pub fn lease_duration(&self) -> Duration {
        self.tick_interval * self.replica.election_timeout_ticks.saturating_sub(2) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_safe_for_leases() {
        let config = ReplicaConfig::default().raft_config(PeerId(3), 0).unwrap();
        assert_eq!(config.id, 3);
        assert!(config.pre_vote && config.check_quorum);
        assert!(config.heartbeat_tick < config.election_tick);
        let core = CoreConfig::default();
        assert!(core.lease_duration() < core.election_timeout());
    }

    #[test]
    fn heartbeat_slower_than_election_is_refused() {
        let config = ReplicaConfig {
            election_timeout_ticks: 2,
            heartbeat_interval_ticks: 5,
            ..Default::default()
        };
        assert!(config.raft_config(PeerId(1), 0).is_err());
        assert!(ReplicaConfig::default().raft_config(PeerId(0), 0).is_err());
    }
}

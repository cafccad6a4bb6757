//! The replication core: one range replica ([`replica::Replica`]) is a raft-rs
//! `RawNode` plus its pending proposals, reads and leader lease; the store driver
//! (`rangekv-node`) runs many of them.
//!
//! Boundary: this crate performs no I/O and knows nothing of tokio, gRPC, RocksDB or
//! io_uring. Time arrives from the caller (ticks and `Instant`s), so the same code
//! runs in production and in a seeded in-memory simulation.

pub mod replica;

use rangekv_types::PeerId;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_safe_for_leases() {
        let config = ReplicaConfig::default().raft_config(PeerId(3), 0).unwrap();
        assert_eq!(config.id, 3);
        assert!(config.pre_vote && config.check_quorum);
        assert!(config.heartbeat_tick < config.election_tick);
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

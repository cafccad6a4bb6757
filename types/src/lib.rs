//! The vocabulary every rangekv crate shares: identifier newtypes and the size limits
//! checked at the edge.
//!
//! This crate has no dependencies on purpose: the pure crates (`rangekv-log`,
//! `rangekv-raftstore`) use it without pulling in gRPC, tokio or RocksDB.
//!
//! Glossary (see ARCHITECTURE.md): a *Store* is one node's storage; a *Range* is a
//! contiguous key span `[start_key, end_key)` replicated by one raft group; a *Replica*
//! is a range's copy on one store, identified in raft by its *Peer* id.

use std::fmt;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }

        impl From<u64> for $name {
            fn from(raw: u64) -> Self {
                Self(raw)
            }
        }
    };
}

id_newtype!(
    /// Cluster-unique id of a range (one raft group), allocated by the placement driver.
    RangeId,
    "r"
);
id_newtype!(
    /// Cluster-unique id of a store (one node process hosts one store).
    StoreId,
    "s"
);
id_newtype!(
    /// Cluster-unique id of one replica of a range; it is the replica's raft-rs node id.
    PeerId,
    "p"
);

/// Size limits checked at the edge; a request over any of them is refused whole with
/// `INVALID_ARGUMENT` naming the limit.
pub mod limits {
    /// Largest user key accepted.
    pub const KEY_BYTES_MAX: usize = 8 * 1024;
    /// Largest user value accepted.
    pub const VALUE_BYTES_MAX: usize = 8 * 1024 * 1024;
    /// Most keys in one batch request.
    pub const BATCH_KEYS_MAX: usize = 10_000;
    /// Largest encoded gRPC request the server decodes (tonic's decode limit).
    pub const REQUEST_BYTES_MAX: usize = 64 * 1024 * 1024;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_with_their_kind() {
        assert_eq!(RangeId(7).to_string(), "r7");
        assert_eq!(format!("{:?}", StoreId(3)), "s3");
        assert_eq!(PeerId::from(12).get(), 12);
    }

    #[test]
    fn limits_are_ordered() {
        const { assert!(limits::KEY_BYTES_MAX < limits::VALUE_BYTES_MAX) };
        const { assert!(limits::VALUE_BYTES_MAX < limits::REQUEST_BYTES_MAX) };
    }
}

//! The raft protocol of a store, one concern per module. Each documents its phases
//! (propose → apply → after apply) where it has them.
//!
//! - [`write`]: client writes gathered in a loop become one proposal per range.
//! - [`ready`]: every touched range's `Ready` into one store-level log write, the
//!   messages sent now and those held until the write is durable, reads answered.
//! - [`apply`]: committed entries into one apply batch; proposals matched to their
//!   outcome; reads released once applied.
//! - [`compact_log`]: proposing and carrying out log compaction under the
//!   flushed-applied-index rule.
//! - [`quiesce`]: idle ranges stop ticking; silent leaders' followers wake early;
//!   votes refused after a reopen.
//! - [`transfer_leader`]: leadership transfer, which voids the lease.
//! - [`conf_change`]: membership changes (learners, promotion, demotion, joint
//!   consensus), proposed, applied and left.
//! - [`snapshot`], [`split`]: where those admin operations land.

pub mod apply;
pub mod compact_log;
pub mod conf_change;
pub mod quiesce;
pub mod ready;
pub mod snapshot;
pub mod split;
pub mod transfer_leader;
pub mod write;

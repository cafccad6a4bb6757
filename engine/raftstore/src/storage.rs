//! `raft::Storage` of one replica: the store's durable log, read through
//! [`LogRead`], plus the entries handed to a log write that is not durable yet.
//!
//! raft-rs 0.7 drops entries from its own unstable buffer as soon as a `Ready` is
//! advanced (`advance_append_async`), before the log write completes, and reads them
//! back through `Storage` from then on. A log indexes entries only once they are
//! durable, so until then they live in `unstable` here.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::Range;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use rangekv_types::RangeId;

/// What [`LogRead::entries`] answers.
pub type EntriesResult = raft::Result<Vec<Entry>>;

/// The durable raft log of a store, as one range's replica reads it: every entry,
/// hard state and compaction point here is on disk.
pub trait LogRead {
    fn hard_state(&self, range: RangeId) -> HardState;
    /// Entries of `span`, at most `max_size` bytes (at least one entry).
    /// `Compacted` below the first index, `Unavailable` past the last.
    fn entries(&self, range: RangeId, span: Range<u64>, max: Option<u64>) -> EntriesResult;
    /// The term of entry `index` (also of the compaction point itself).
    fn term(&self, range: RangeId, index: u64) -> raft::Result<u64>;
    fn first_index(&self, range: RangeId) -> u64;
    fn last_index(&self, range: RangeId) -> u64;
    /// Entries up to `through` will not be read again soon: a cache may let them go.
    fn release_cache(&self, _range: RangeId, _through: u64) {}
}

pub struct PeerStorage<L> {
    log: L,
    range: RangeId,
    conf_state: ConfState,
    /// Entries written to the log but not yet durable, contiguous, each with the
    /// sequence number of the log write carrying it.
    unstable: VecDeque<(Entry, u64)>,
    /// Applied index when the replica was opened: the durable commit index is at
    /// least this (apply may run ahead of the hard state's own write).
    applied_at_open: u64,
    /// A snapshot installed here restarts the log after (index, term); the log write
    /// `seq` carries that reset and is not durable yet.
    reset: Option<(u64, u64, u64)>,
    /// raft-rs asks for snapshots through `&self`: see [`Snapshots`].
    pub(crate) snapshots: RefCell<Snapshots>,
}

/// A leader's snapshots: the last one built (raft-rs sends it to every follower
/// that needs one while the log still continues it), and the followers raft-rs
/// asked one for since the core last looked.
#[derive(Default)]
pub(crate) struct Snapshots {
    pub built: Option<Snapshot>,
    pub wanted_by: Vec<u64>,
}

impl<L: LogRead> PeerStorage<L> {
    pub fn new(log: L, range: RangeId, conf_state: ConfState, applied_at_open: u64) -> Self {
        PeerStorage {
            log,
            range,
            conf_state,
            unstable: VecDeque::new(),
            applied_at_open,
            reset: None,
            snapshots: RefCell::new(Snapshots::default()),
        }
    }

    /// A snapshot at (index, term) was installed; log write `seq` restarts the log
    /// after it. Until that write is durable, this overlay is the log.
    pub fn reset(&mut self, index: u64, term: u64, seq: u64) {
        self.unstable.clear();
        self.reset = Some((index, term, seq));
    }

    fn unstable_first(&self) -> Option<u64> {
        self.unstable.front().map(|(e, _)| e.index)
    }

    /// Entries of a `Ready`, handed to the log in write `seq`: visible to raft now.
    pub fn append_unstable(&mut self, entries: &[Entry], seq: u64) {
        let Some(first) = entries.first() else {
            return;
        };
        // A conflicting append replaces everything from its first index on.
        while self
            .unstable
            .back()
            .is_some_and(|(e, _)| e.index >= first.index)
        {
            self.unstable.pop_back();
        }
        assert!(
            self.unstable
                .back()
                .is_none_or(|(e, s)| e.index + 1 == first.index && *s <= seq),
            "unstable entries stay contiguous and in write order"
        );
        assert!(
            !self.unstable.is_empty()
                || self
                    .reset
                    .is_none_or(|(index, _, _)| index + 1 == first.index),
            "entries after a snapshot start right after its index"
        );
        self.unstable
            .extend(entries.iter().map(|entry| (entry.clone(), seq)));
    }

    /// Log write `seq` (and every one before it) is durable: the log serves those
    /// entries now.
    pub fn on_durable(&mut self, seq: u64) {
        if self.reset.is_some_and(|(_, _, s)| s <= seq) {
            self.reset = None;
        }
        while self.unstable.front().is_some_and(|(_, s)| *s <= seq) {
            self.unstable.pop_front();
        }
    }

    pub fn log(&self) -> &L {
        &self.log
    }

    pub fn range(&self) -> RangeId {
        self.range
    }
}

impl<L: LogRead> raft::Storage for PeerStorage<L> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let mut hard_state = self.log.hard_state(self.range);
        // Entries are applied once committed and locally durable, possibly before the
        // hard state recording that commit index was written.
        hard_state.commit = hard_state.commit.max(self.applied_at_open);
        Ok(RaftState::new(hard_state, self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        if let Some((index, _, _)) = self.reset {
            if low <= index {
                return Err(raft::Error::Store(StorageError::Compacted));
            }
            if self.unstable.is_empty() {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
        }
        let split = self.unstable_first().unwrap_or(u64::MAX);
        let mut out = if low < split {
            self.log
                .entries(self.range, low..high.min(split), max_size)?
        } else {
            Vec::new()
        };
        if high > split && out.len() as u64 == split.saturating_sub(low) {
            let from = low.max(split);
            let last = self.unstable.back().map_or(0, |(e, _)| e.index);
            if high > last + 1 {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
            let skip = (from - split) as usize;
            out.extend(
                self.unstable
                    .iter()
                    .skip(skip)
                    .take((high - from) as usize)
                    .map(|(e, _)| e.clone()),
            );
            raft::util::limit_size(&mut out, max_size);
        }
        Ok(out)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if let Some(first) = self.unstable_first() {
            if index >= first {
                return self
                    .unstable
                    .get((index - first) as usize)
                    .map(|(e, _)| e.term)
                    .ok_or(raft::Error::Store(StorageError::Unavailable));
            }
        }
        if let Some((reset, term, _)) = self.reset {
            return match index.cmp(&reset) {
                std::cmp::Ordering::Equal => Ok(term),
                std::cmp::Ordering::Less => Err(raft::Error::Store(StorageError::Compacted)),
                std::cmp::Ordering::Greater => Err(raft::Error::Store(StorageError::Unavailable)),
            };
        }
        self.log.term(self.range, index)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(match self.reset {
            Some((index, _, _)) => index + 1,
            None => self.log.first_index(self.range),
        })
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(match (self.unstable.back(), self.reset) {
            (Some((entry, _)), _) => entry.index,
            (None, Some((index, _, _))) => index,
            (None, None) => self.log.last_index(self.range),
        })
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let first = self.first_index()?;
        crate::operation::snapshot::offer(&self.snapshots, first, request_index, to)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use raft::Storage;

    use super::*;

    /// A durable log of one range in memory: `entries[i].index == first + i`.
    #[derive(Default)]
    struct MemLog {
        entries: Vec<Entry>,
    }

    impl LogRead for Rc<RefCell<MemLog>> {
        fn hard_state(&self, _range: RangeId) -> HardState {
            HardState::default()
        }
        fn entries(&self, _: RangeId, span: Range<u64>, max: Option<u64>) -> EntriesResult {
            let (low, high) = (span.start, span.end);
            let log = self.borrow();
            if high > log.entries.len() as u64 + 1 {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
            let mut out = log.entries[low as usize - 1..high as usize - 1].to_vec();
            raft::util::limit_size(&mut out, max);
            Ok(out)
        }
        fn term(&self, _: RangeId, index: u64) -> raft::Result<u64> {
            let log = self.borrow();
            match index {
                0 => Ok(0),
                i => log
                    .entries
                    .get(i as usize - 1)
                    .map(|e| e.term)
                    .ok_or(raft::Error::Store(StorageError::Unavailable)),
            }
        }
        fn first_index(&self, _: RangeId) -> u64 {
            1
        }
        fn last_index(&self, _: RangeId) -> u64 {
            self.borrow().entries.len() as u64
        }
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 8].into(),
            ..Default::default()
        }
    }

    fn write(log: &Rc<RefCell<MemLog>>, entries: &[Entry]) {
        let mut log = log.borrow_mut();
        let first = entries[0].index as usize;
        log.entries.truncate(first - 1);
        log.entries.extend(entries.iter().cloned());
    }

    #[test]
    fn unstable_entries_are_readable_until_durable_then_the_log_serves_them() {
        let log = Rc::new(RefCell::new(MemLog::default()));
        let mut storage = PeerStorage::new(log.clone(), RangeId(1), ConfState::default(), 0);
        let first: Vec<Entry> = (1..=3).map(|i| entry(i, 1)).collect();
        storage.append_unstable(&first, 1);
        assert_eq!(storage.last_index().unwrap(), 3);
        assert_eq!(storage.term(2).unwrap(), 1);
        let context = || GetEntriesContext::empty(false);
        assert_eq!(storage.entries(1, 4, None, context()).unwrap(), first);

        // A follower's conflicting append replaces index 3 onwards.
        let second = vec![entry(3, 2), entry(4, 2)];
        storage.append_unstable(&second, 2);
        assert_eq!(storage.term(3).unwrap(), 2);
        assert_eq!(storage.last_index().unwrap(), 4);

        // Write 1 becomes durable: 1..=2 come from the log, 3..=4 still unstable.
        write(&log, &first);
        storage.on_durable(1);
        assert_eq!(
            storage.term(3).unwrap(),
            2,
            "write 2's entry is still the one seen"
        );
        assert_eq!(
            storage.entries(1, 5, None, context()).unwrap(),
            vec![entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)]
        );

        write(&log, &second);
        storage.on_durable(2);
        assert_eq!(storage.last_index().unwrap(), 4);
        assert_eq!(storage.term(3).unwrap(), 2);
        assert!(storage.entries(1, 6, None, context()).is_err());
    }

    /// Found in review: a follower that installed a snapshot and whose log reset was
    /// not durable yet, left by its leader, campaigned, and raft-rs read the entries
    /// past its applied index — below the reset, gone — and panicked.
    #[test]
    fn a_follower_can_campaign_before_its_snapshot_reset_is_durable() {
        use raft::eraftpb::{Message, MessageType};
        use std::time::Duration;

        let log = Rc::new(RefCell::new(MemLog::default()));
        let conf = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        let storage = PeerStorage::new(log, RangeId(1), conf.clone(), 0);
        let settings = crate::ReplicaConfig::default();
        let config = settings.raft_config(rangekv_types::PeerId(2), 0).unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = raft::RawNode::new(&config, storage, &logger).unwrap();
        let mut replica: crate::replica::Replica<_, (), ()> =
            crate::replica::Replica::new(raw, 0, Duration::from_secs(1), 7);
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgSnapshot);
        (message.from, message.to, message.term) = (1, 2, 2);
        let snapshot = message.mut_snapshot().mut_metadata();
        (snapshot.index, snapshot.term) = (10, 2);
        snapshot.set_conf_state(conf);
        replica.step(message).unwrap();
        let ready = replica.raw.ready();
        assert_eq!(ready.snapshot().get_metadata().index, 10);
        replica.raw.mut_store().reset(10, 2, 1);
        replica.on_snapshot(10);
        replica.raw.advance_append_async(ready);
        // The leader goes silent before log write 1 is durable.
        for _ in 0..4 * settings.election_timeout_ticks {
            replica.tick();
        }
        assert_ne!(replica.raw.raft.state, raft::StateRole::Follower);
        let ready = replica.raw.ready();
        let number = ready.number();
        replica.raw.advance_append_async(ready);
        replica.raw.mut_store().on_durable(1);
        replica.raw.on_persist_ready(number);
        assert_eq!(replica.raw.raft.raft_log.persisted, 10);
    }

    #[test]
    fn commit_is_at_least_the_applied_index() {
        let log = Rc::new(RefCell::new(MemLog::default()));
        let storage = PeerStorage::new(log, RangeId(1), ConfState::default(), 7);
        assert_eq!(storage.initial_state().unwrap().hard_state.commit, 7);
    }
}

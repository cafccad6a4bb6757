//! The in-memory index of one range's log: where each entry lives, the hard state, the
//! compaction point, and a cache of the newest entries.
//!
//! Invariants: `locations` covers `truncated_index + 1 ..= last_index()` without gaps;
//! the cache is a suffix of that span; every change here mirrors a record that is
//! already durable, applied in log order, so replay rebuilds exactly this state.

use std::collections::VecDeque;

use raft::eraftpb::{Entry, HardState};

/// Where one entry's bytes are on disk, with their checksum and the entry's term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
    pub term: u64,
}

/// An entry to return: from the cache, or to be read from disk.
pub enum Fetch {
    Cached(Entry),
    Disk(u64, Location),
}

/// Memory an entry takes in the cache, counted against `cache_bytes_max`.
pub fn cached_bytes(entry: &Entry) -> usize {
    entry.data.len() + entry.context.len() + 64
}

#[derive(Debug, Default)]
pub struct RangeLog {
    pub truncated_index: u64,
    pub truncated_term: u64,
    locations: VecDeque<Location>,
    pub hard_state: HardState,
    hard_state_segment: Option<u64>,
    compaction_segment: Option<u64>,
    cache: VecDeque<Entry>,
}

/// Why an append or compaction cannot be applied.
#[derive(Debug, PartialEq, Eq)]
pub enum IndexError {
    Gap {
        last_index: u64,
        first_index: u64,
    },
    BelowCompaction {
        truncated_index: u64,
        first_index: u64,
    },
}

impl RangeLog {
    pub fn first_index(&self) -> u64 {
        self.truncated_index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.truncated_index + self.locations.len() as u64
    }

    /// The lowest segment this range still needs (its live entries, hard state and
    /// compaction point), or `None` when it holds nothing.
    pub fn pinned_segment(&self) -> Option<u64> {
        [
            self.locations.front().map(|l| l.segment),
            self.hard_state_segment,
            self.compaction_segment,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The newest segment holding anything of this range: where it last wrote.
    pub fn newest_segment(&self) -> Option<u64> {
        [
            self.locations.back().map(|l| l.segment),
            self.hard_state_segment,
            self.compaction_segment,
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// Records entries `first_index..` (durable at `locations`), replacing any entries
    /// from `first_index` on. `entries` are the same entries for the cache (may be
    /// empty during replay). Returns the change in cached bytes.
    pub fn append(
        &mut self,
        first_index: u64,
        locations: &[Location],
        entries: &[Entry],
    ) -> Result<isize, IndexError> {
        if first_index > self.last_index() + 1 {
            return Err(IndexError::Gap {
                last_index: self.last_index(),
                first_index,
            });
        }
        if first_index <= self.truncated_index {
            return Err(IndexError::BelowCompaction {
                truncated_index: self.truncated_index,
                first_index,
            });
        }
        let mut delta = 0isize;
        let replaced = self.last_index() + 1 - first_index;
        for _ in 0..replaced.min(self.cache.len() as u64) {
            if let Some(entry) = self.cache.pop_back() {
                delta -= cached_bytes(&entry) as isize;
            }
        }
        self.locations
            .truncate((first_index - self.first_index()) as usize);
        self.locations.extend(locations.iter().copied());
        if entries.is_empty() {
            // Replayed entries are not cached; the cache must stay a suffix.
            if !locations.is_empty() {
                delta -= self.clear_cache() as isize;
            }
        } else {
            debug_assert_eq!(entries.len(), locations.len());
            if self
                .cache
                .back()
                .is_some_and(|e| e.index + 1 != first_index)
            {
                delta -= self.clear_cache() as isize;
            }
            for entry in entries {
                delta += cached_bytes(entry) as isize;
                self.cache.push_back(entry.clone());
            }
        }
        Ok(delta)
    }

    fn clear_cache(&mut self) -> usize {
        let freed = self.cache.iter().map(cached_bytes).sum();
        self.cache.clear();
        freed
    }

    /// Drops cached entries with index ≤ `index`; returns the bytes freed.
    pub fn evict_cache_through(&mut self, index: u64) -> usize {
        let mut freed = 0;
        while self.cache.front().is_some_and(|e| e.index <= index) {
            if let Some(entry) = self.cache.pop_front() {
                freed += cached_bytes(&entry);
            }
        }
        freed
    }

    /// Starts a range in replay at its final compaction point (see `engine::replay`).
    pub fn replay_start(truncated_index: u64, truncated_term: u64, segment: Option<u64>) -> Self {
        RangeLog {
            truncated_index,
            truncated_term,
            compaction_segment: segment,
            ..RangeLog::default()
        }
    }

    /// Replay of an entries record, knowing the range's final compaction point `floor`.
    ///
    /// Segments before a range's oldest live record may be gone, so replay can meet an
    /// append that starts past the log's end, or entries at or below `floor`: whatever
    /// is at or below `floor` is dead, and a jump past the end drops entries that a
    /// later record in the log replaces (live entries sit in segments in index order,
    /// so none is lost). `engine::replay` checks at the end that the log starts right
    /// after `floor`.
    pub fn replay_append(&mut self, first_index: u64, locations: &[Location], floor: u64) {
        let start = first_index.max(floor + 1);
        let skipped = (start - first_index) as usize;
        let kept = &locations[skipped.min(locations.len())..];
        if start > self.last_index() + 1 || start <= self.truncated_index {
            self.locations.clear();
            self.truncated_index = start - 1;
            self.truncated_term = 0;
        } else {
            self.locations
                .truncate((start - self.first_index()) as usize);
        }
        self.locations.extend(kept.iter().copied());
    }

    pub fn set_hard_state(&mut self, hard_state: HardState, segment: u64) {
        self.hard_state = hard_state;
        self.hard_state_segment = Some(segment);
    }

    /// Drops entries ≤ `truncated_index`. Past the last entry, the log becomes empty and
    /// continues at `truncated_index + 1` (a snapshot or a bootstrap). A point below the
    /// current one changes nothing. Returns the cached bytes freed.
    pub fn compact(&mut self, truncated_index: u64, truncated_term: u64, segment: u64) -> usize {
        if truncated_index < self.truncated_index {
            return 0;
        }
        let freed = if truncated_index >= self.last_index() {
            self.locations.clear();
            self.clear_cache()
        } else {
            let dropped = (truncated_index - self.truncated_index) as usize;
            self.locations.drain(..dropped);
            self.evict_cache_through(truncated_index)
        };
        self.truncated_index = truncated_index;
        self.truncated_term = truncated_term;
        self.compaction_segment = Some(segment);
        freed
    }

    /// The term of entry `index`, if the log knows it (including the compaction point).
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.truncated_index {
            return Some(self.truncated_term);
        }
        if index < self.truncated_index || index > self.last_index() {
            return None;
        }
        Some(self.locations[(index - self.first_index()) as usize].term)
    }

    /// What to return for `low..high`, stopping once `max_bytes` is passed (at least
    /// one entry). The caller checks the bounds first.
    /// Bytes the live entries take in the log (their encodings, without record headers).
    pub fn live_bytes(&self) -> u64 {
        self.locations.iter().map(|l| u64::from(l.len)).sum()
    }

    pub fn fetch(&self, low: u64, high: u64, max_bytes: u64) -> Vec<Fetch> {
        let cache_first = self.cache.front().map_or(u64::MAX, |entry| entry.index);
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut total = 0u64;
        for index in low..high {
            let location = self.locations[(index - self.first_index()) as usize];
            total += u64::from(location.len);
            if !out.is_empty() && total > max_bytes {
                break;
            }
            if index >= cache_first {
                out.push(Fetch::Cached(
                    self.cache[(index - cache_first) as usize].clone(),
                ));
            } else {
                out.push(Fetch::Disk(index, location));
            }
        }
        out
    }

    #[cfg(test)]
    pub fn cached_entries(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(segment: u64, term: u64) -> Location {
        Location {
            segment,
            offset: 0,
            len: 10,
            crc: 0,
            term,
        }
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn conflicting_append_replaces_the_tail() {
        let mut log = RangeLog::default();
        let entries: Vec<_> = (1..=5).map(|i| entry(i, 1)).collect();
        log.append(1, &[at(1, 1); 5], &entries).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (1, 5));
        log.append(4, &[at(2, 2)], &[entry(4, 2)]).unwrap();
        assert_eq!(log.last_index(), 4);
        assert_eq!(log.term(3), Some(1));
        assert_eq!(log.term(4), Some(2));
        assert_eq!(log.cached_entries(), 4);
        assert_eq!(
            log.append(9, &[at(2, 2)], &[entry(9, 2)]),
            Err(IndexError::Gap {
                last_index: 4,
                first_index: 9
            })
        );
    }

    #[test]
    fn compaction_moves_the_first_index_and_pins() {
        let mut log = RangeLog::default();
        log.append(1, &[at(1, 1), at(1, 1), at(2, 1)], &[]).unwrap();
        log.set_hard_state(HardState::default(), 2);
        assert_eq!(log.pinned_segment(), Some(1));
        log.compact(2, 1, 3);
        assert_eq!((log.first_index(), log.last_index()), (3, 3));
        assert_eq!(log.term(2), Some(1));
        assert_eq!(log.term(1), None);
        assert_eq!(log.pinned_segment(), Some(2));
        // Past the end: the log restarts after the point (a snapshot).
        log.compact(10, 4, 3);
        assert_eq!((log.first_index(), log.last_index()), (11, 10));
        assert_eq!(log.term(10), Some(4));
        // Going back is ignored.
        log.compact(5, 1, 3);
        assert_eq!(log.first_index(), 11);
    }
}

//! Routing: which range holds a key. Ranges are disjoint and cover `["", +inf)`.

use std::collections::BTreeMap;
use std::ops::Bound;

use rangekv_types::RangeId;

/// A range's span `[start_key, end_key)`; an empty `end_key` is +infinity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub range: RangeId,
    pub start_key: Vec<u8>,
    pub end_key: Vec<u8>,
}

impl Span {
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= &self.start_key[..] && (self.end_key.is_empty() || key < &self.end_key[..])
    }
}

/// Spans ordered by start key.
#[derive(Debug, Default)]
pub struct RoutingTable {
    by_start: BTreeMap<Vec<u8>, Span>,
}

impl RoutingTable {
    /// Inserts `span`, dropping every span it overlaps (they are older views).
    pub fn insert(&mut self, span: Span) {
        let overlapping: Vec<Vec<u8>> = self
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(span.end_bound())))
            .rev()
            .take_while(|(_, old)| old.end_key.is_empty() || old.end_key[..] > span.start_key[..])
            .map(|(start, _)| start.clone())
            .collect();
        for start in overlapping {
            self.by_start.remove(&start);
        }
        self.by_start.insert(span.start_key.clone(), span);
    }

    /// The span holding `key`, if the table knows it.
    pub fn lookup(&self, key: &[u8]) -> Option<&Span> {
        self.by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(_, span)| span)
            .filter(|span| span.contains(key))
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }
}

impl Span {
    fn end_bound(&self) -> &[u8] {
        if self.end_key.is_empty() {
            // Nothing sorts above every key; use the longest possible key as the bound.
            &[0xff; rangekv_types::limits::KEY_BYTES_MAX + 1]
        } else {
            &self.end_key
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(range: u64, start: &str, end: &str) -> Span {
        Span {
            range: RangeId(range),
            start_key: start.into(),
            end_key: end.into(),
        }
    }

    #[test]
    fn lookup_finds_the_covering_range() {
        let mut table = RoutingTable::default();
        table.insert(span(1, "", "g"));
        table.insert(span(2, "g", "p"));
        table.insert(span(3, "p", ""));
        assert_eq!(table.lookup(b"").unwrap().range, RangeId(1));
        assert_eq!(table.lookup(b"f\xff").unwrap().range, RangeId(1));
        assert_eq!(table.lookup(b"g").unwrap().range, RangeId(2));
        assert_eq!(table.lookup(b"zzz").unwrap().range, RangeId(3));
    }

    #[test]
    fn a_newer_span_replaces_the_ones_it_overlaps() {
        let mut table = RoutingTable::default();
        table.insert(span(1, "", "g"));
        table.insert(span(2, "g", ""));
        // Range 2 split at "m": the right half is range 4.
        table.insert(span(4, "m", ""));
        assert_eq!(table.len(), 2, "old [g, +inf) is dropped");
        assert!(
            table.lookup(b"h").is_none(),
            "the shrunk left half is unknown"
        );
        table.insert(span(2, "g", "m"));
        assert_eq!(table.lookup(b"h").unwrap().range, RangeId(2));
        assert_eq!(table.lookup(b"q").unwrap().range, RangeId(4));
        assert_eq!(table.len(), 3);
    }
}

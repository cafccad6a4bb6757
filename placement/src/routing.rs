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
    /// Inserts `span`, dropping every span it overlaps (they are older views); returns
    /// the dropped spans.
    pub fn insert(&mut self, span: Span) -> Vec<Span> {
        let overlapping: Vec<Vec<u8>> = self
            .overlapping(&span.start_key, &span.end_key)
            .map(|old| old.start_key.clone())
            .collect();
        let dropped = overlapping
            .iter()
            .filter_map(|start| self.by_start.remove(start))
            .collect();
        self.by_start.insert(span.start_key.clone(), span);
        dropped
    }

    /// Removes the span starting at `start_key`.
    pub fn remove(&mut self, start_key: &[u8]) -> Option<Span> {
        self.by_start.remove(start_key)
    }

    /// The span holding `key`, if the table knows it.
    pub fn lookup(&self, key: &[u8]) -> Option<&Span> {
        self.by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(_, span)| span)
            .filter(|span| span.contains(key))
    }

    /// The spans overlapping `[start_key, end_key)` in key order; an empty `end_key` is
    /// +infinity.
    pub fn overlapping<'a>(
        &'a self,
        start_key: &'a [u8],
        end_key: &'a [u8],
    ) -> impl Iterator<Item = &'a Span> + 'a {
        let holding_start = self
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(start_key)))
            .next_back()
            .map(|(_, span)| span)
            .filter(|span| span.end_key.is_empty() || span.end_key[..] > *start_key);
        let after_start = self
            .by_start
            .range::<[u8], _>((Bound::Excluded(start_key), Bound::Unbounded))
            .map(|(_, span)| span)
            .take_while(move |span| end_key.is_empty() || span.start_key[..] < *end_key);
        holding_start.into_iter().chain(after_start)
    }

    /// Every span in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Span> {
        self.by_start.values()
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
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
        let dropped = table.insert(span(4, "m", ""));
        assert_eq!(dropped, [span(2, "g", "")]);
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

    #[test]
    fn overlapping_respects_half_open_bounds() {
        let mut table = RoutingTable::default();
        table.insert(span(1, "", "g"));
        table.insert(span(2, "g", "p"));
        table.insert(span(3, "p", ""));
        fn ids(table: &RoutingTable, start: &str, end: &str) -> Vec<u64> {
            table
                .overlapping(start.as_bytes(), end.as_bytes())
                .map(|s| s.range.get())
                .collect()
        }
        assert_eq!(ids(&table, "", ""), [1, 2, 3]);
        assert_eq!(ids(&table, "g", "p"), [2], "end exclusive, start inclusive");
        assert_eq!(ids(&table, "f", "g\0"), [1, 2]);
        assert_eq!(ids(&table, "q", ""), [3]);
        assert_eq!(ids(&table, "", "a"), [1]);
        assert_eq!(table.remove(b"g"), Some(span(2, "g", "p")));
        assert_eq!(ids(&table, "a", "z"), [1, 3]);
        assert_eq!(table.iter().count(), 2);
    }
}

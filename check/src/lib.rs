//! A linearizability checker for histories of a key-value store.
//!
//! Each key is an independent register that starts *absent*; the operations are
//! [`Op::Get`], [`Op::Put`], [`Op::Delete`] and a compare-and-set [`Op::Cas`]. A test
//! harness records every call with [`History`] (wrap it in a `Mutex` to share it
//! between tasks) and then asks [`check`] whether some order of the operations is
//! consistent both with what every client observed and with real time.
//!
//! The search is Wing & Gong's, with Lowe's memoization of already explored
//! (linearized set, register value) pairs ("Testing for Linearizability", Lowe 2017).
//! Since a history is linearizable if and only if every key's sub-history is
//! (P-compositionality, Horn & Kroening), each key is searched on its own, which is
//! what keeps the search tractable.
//!
//! Calls with an unknown outcome (timeouts, crashes) may have taken effect at any
//! time after their call, or never. A [`Budget`] bounds the search; running out of it
//! yields [`Verdict::Unknown`], never [`Verdict::Linearizable`].
//!
//! ```
//! use rangekv_check::{check, Budget, History, Op, OpResult, Verdict};
//!
//! let mut history = History::new();
//! let put = history.invoke(1, b"k", Op::Put(b"v1".to_vec()), 0);
//! let get = history.invoke(2, b"k", Op::Get, 5); // overlaps the put
//! history.complete(put, 10, OpResult::Written);
//! history.complete(get, 12, OpResult::Read(None)); // may precede the put
//! assert_eq!(check(&history, Budget::unlimited()), Verdict::Linearizable);
//!
//! // A read that starts after the put returned must see it.
//! let late = history.invoke(2, b"k", Op::Get, 20);
//! history.complete(late, 30, OpResult::Read(None));
//! assert!(matches!(
//!     check(&history, Budget::unlimited()),
//!     Verdict::NotLinearizable { key, .. } if key == b"k"
//! ));
//! ```

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// An operation on one key's register.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Reads the value; completes with [`OpResult::Read`].
    Get,
    /// Sets the value; completes with [`OpResult::Written`].
    Put(Vec<u8>),
    /// Makes the key absent; completes with [`OpResult::Written`].
    Delete,
    /// Sets the value to `new` (`None` deletes) if it currently equals `expected`
    /// (`None` = absent); completes with [`OpResult::Cas`].
    Cas {
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    },
}

/// What a completed operation observed. The variant must fit the [`Op`]; one that does
/// not makes its key's verdict [`Verdict::Unknown`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpResult {
    /// A [`Op::Get`]'s value (`None` = absent).
    Read(Option<Vec<u8>>),
    /// A [`Op::Put`] or [`Op::Delete`] was applied.
    Written,
    /// Whether a [`Op::Cas`] succeeded.
    Cas { succeeded: bool },
}

/// How a call ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// It completed at `returned_at` (same clock as the call) with `result`.
    Ok { returned_at: u64, result: OpResult },
    /// It may or may not have taken effect (timeout, crash, lost connection): its
    /// return is taken to be at infinity and its result to be anything.
    Unknown,
    /// It certainly had no effect; the checker ignores it.
    Failed,
}

/// One call in a history.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Operation {
    /// The client (process) that made the call; only shown in explanations.
    pub process: u64,
    pub key: Vec<u8>,
    pub op: Op,
    /// When the call was made, in nanoseconds from any origin (monotonic).
    pub call: u64,
    pub outcome: Outcome,
}

/// Names an operation recorded by [`History::invoke`]; its index in [`History::ops`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId(pub usize);

/// A history of calls, recorded one at a time or built from a list of [`Operation`]s.
///
/// There is no internal locking: a harness with many tasks wraps it in a `Mutex`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    ops: Vec<Operation>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a fully described operation.
    pub fn push(&mut self, op: Operation) -> OpId {
        self.ops.push(op);
        OpId(self.ops.len() - 1)
    }

    /// Records a call made at `at`. Until [`complete`](Self::complete) or
    /// [`failed`](Self::failed) is called its outcome is [`Outcome::Unknown`], which is
    /// also what a call still pending when the history is checked must count as.
    pub fn invoke(&mut self, process: u64, key: impl Into<Vec<u8>>, op: Op, at: u64) -> OpId {
        self.push(Operation {
            process,
            key: key.into(),
            op,
            call: at,
            outcome: Outcome::Unknown,
        })
    }

    /// Records that call `id` returned at `at` having observed `result`.
    ///
    /// # Panics
    /// If `id` was not returned by this history.
    pub fn complete(&mut self, id: OpId, at: u64, result: OpResult) {
        self.ops[id.0].outcome = Outcome::Ok {
            returned_at: at,
            result,
        };
    }

    /// Records that call `id` may or may not have taken effect.
    ///
    /// # Panics
    /// If `id` was not returned by this history.
    pub fn unknown(&mut self, id: OpId) {
        self.ops[id.0].outcome = Outcome::Unknown;
    }

    /// Records that call `id` certainly had no effect.
    ///
    /// # Panics
    /// If `id` was not returned by this history.
    pub fn failed(&mut self, id: OpId) {
        self.ops[id.0].outcome = Outcome::Failed;
    }

    pub fn ops(&self) -> &[Operation] {
        &self.ops
    }

    /// Mutable access, e.g. to patch a recorded result.
    pub fn ops_mut(&mut self) -> &mut [Operation] {
        &mut self.ops
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl From<Vec<Operation>> for History {
    fn from(ops: Vec<Operation>) -> Self {
        Self { ops }
    }
}

/// Bounds on the search, shared by all keys of one [`check`]. `None` = no bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Wall-clock time, measured every [`TIME_CHECK_INTERVAL`] steps from the first.
    pub max_time: Option<Duration>,
    /// Search steps (one step = one candidate tried or one backtrack).
    pub max_steps: Option<u64>,
}

/// How many search steps pass between two reads of the clock.
pub const TIME_CHECK_INTERVAL: u64 = 256;

impl Budget {
    pub fn unlimited() -> Self {
        Self::default()
    }

    pub fn time(max: Duration) -> Self {
        Self {
            max_time: Some(max),
            max_steps: None,
        }
    }

    pub fn steps(max: u64) -> Self {
        Self {
            max_time: None,
            max_steps: Some(max),
        }
    }
}

/// The answer of [`check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Every key's sub-history has a linearization.
    Linearizable,
    /// `key`'s sub-history has none; `explanation` lists its operations and the longest
    /// linearizable prefix the search found.
    NotLinearizable { key: Vec<u8>, explanation: String },
    /// The search could not decide for `key`: the budget ran out, or the history is
    /// malformed (a result that does not fit its operation, a return before its call).
    Unknown { key: Vec<u8>, reason: String },
}

/// A [`Verdict`] with counts, for a JSON report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub verdict: Verdict,
    /// Keys with at least one operation that is not [`Outcome::Failed`].
    pub keys: usize,
    /// Operations that are not [`Outcome::Failed`].
    pub ops: usize,
    /// Keys whose search finished before the verdict was reached.
    pub keys_checked: usize,
    /// Operations of those keys.
    pub ops_checked: usize,
    /// Search steps taken, over all keys.
    pub steps: u64,
}

/// Checks `history` for linearizability within `budget`.
pub fn check(history: &History, budget: Budget) -> Verdict {
    check_report(history, budget).verdict
}

/// Like [`check`], with counts of what was checked.
///
/// Keys are searched smallest first (so a tight budget decides as many as it can) and
/// the first violation found is reported. A malformed key does not stop the others: a
/// violation elsewhere is still reported, otherwise the malformed key makes the verdict
/// [`Verdict::Unknown`].
pub fn check_report(history: &History, budget: Budget) -> Report {
    let partitions = group_by_key(history);
    let mut meter = Meter::new(budget);
    let mut report = Report {
        verdict: Verdict::Linearizable,
        keys: partitions.len(),
        ops: partitions.iter().map(|(_, ops)| ops.len()).sum(),
        keys_checked: 0,
        ops_checked: 0,
        steps: 0,
    };
    let mut malformed = None;
    for (key, indices) in &partitions {
        let partition = match Partition::build(history, indices) {
            Ok(partition) => partition,
            Err(reason) => {
                malformed.get_or_insert_with(|| Verdict::Unknown {
                    key: key.to_vec(),
                    reason: format!("malformed history: {reason}"),
                });
                continue;
            }
        };
        // First without the unknown-outcome writes nobody observed: each of them may
        // simply never have taken effect, so if the rest is linearizable, so is all of
        // it. Each one left in keeps the search's choices open to the end of the
        // history; a key with 22 of them among 1,041 operations exhausted 60 s.
        let unobserved = unobserved_unknown_writes(history, indices);
        if !unobserved.is_empty() {
            let kept: Vec<usize> = indices
                .iter()
                .copied()
                .filter(|i| !unobserved.contains(i))
                .collect();
            if let Ok(pruned) = Partition::build(history, &kept) {
                if let Search::Linearizable = search(&pruned.entries, &mut meter) {
                    report.steps = meter.steps;
                    report.keys_checked += 1;
                    report.ops_checked += indices.len();
                    continue;
                }
            }
        }
        let outcome = search(&partition.entries, &mut meter);
        report.steps = meter.steps;
        let verdict = match outcome {
            Search::Linearizable => {
                report.keys_checked += 1;
                report.ops_checked += indices.len();
                continue;
            }
            Search::Violation { longest } => {
                report.keys_checked += 1;
                report.ops_checked += indices.len();
                Verdict::NotLinearizable {
                    key: key.to_vec(),
                    explanation: partition.explain(history, &longest),
                }
            }
            Search::Exhausted => Verdict::Unknown {
                key: key.to_vec(),
                reason: meter.exhausted_reason(key, indices.len(), &report),
            },
        };
        report.verdict = verdict;
        return report;
    }
    if let Some(verdict) = malformed {
        report.verdict = verdict;
    }
    report
}

/// Of one key's operations (`indices`), the writes whose outcome is unknown and whose
/// value no operation observed: no read returned it and no CAS expected it.
fn unobserved_unknown_writes(history: &History, indices: &[usize]) -> HashSet<usize> {
    let ops = &history.ops;
    let mut observed: HashSet<&[u8]> = HashSet::new();
    for &i in indices {
        if let Outcome::Ok {
            result: OpResult::Read(Some(value)),
            ..
        } = &ops[i].outcome
        {
            observed.insert(value);
        }
        if let Op::Cas {
            expected: Some(value),
            ..
        } = &ops[i].op
        {
            observed.insert(value);
        }
    }
    indices
        .iter()
        .copied()
        .filter(|&i| ops[i].outcome == Outcome::Unknown)
        .filter(|&i| match &ops[i].op {
            Op::Put(value)
            | Op::Cas {
                new: Some(value), ..
            } => !observed.contains(&value[..]),
            _ => false,
        })
        .collect()
}

/// Indices of the operations of each key, failed ones left out, sorted by (number of
/// operations, key).
fn group_by_key(history: &History) -> Vec<(&[u8], Vec<usize>)> {
    let mut by_key: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    for (i, op) in history.ops.iter().enumerate() {
        if op.outcome != Outcome::Failed {
            by_key.entry(&op.key).or_default().push(i);
        }
    }
    let mut partitions: Vec<_> = by_key.into_iter().collect();
    partitions.sort_by_key(|(key, ops)| (ops.len(), *key));
    partitions
}

/// The register's value: an index into the partition's interned values, `None` = absent.
/// A small integer keeps the memoization cache cheap to hash.
type State = Option<u32>;

/// An operation as the model sees it, values interned.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A completed read that observed this value.
    Read(State),
    /// A put (`Some`) or delete (`None`).
    Write(State),
    /// `succeeded` is `None` when the outcome is unknown.
    Cas {
        expected: State,
        new: State,
        succeeded: Option<bool>,
    },
}

impl Step {
    /// Whether the operation leaves the value as it found it wherever it is placed.
    fn is_read_only(self) -> bool {
        matches!(
            self,
            Step::Read(_)
                | Step::Cas {
                    succeeded: Some(false),
                    ..
                }
        )
    }

    /// The register's value after this operation applied to `state`, or `None` if the
    /// operation could not have observed what it did in `state`.
    fn apply(self, state: State) -> Option<State> {
        match self {
            Step::Read(value) => (value == state).then_some(state),
            Step::Write(value) => Some(value),
            Step::Cas {
                expected,
                new,
                succeeded,
            } => {
                let matches = expected == state;
                // An unknown CAS is deterministic once placed: it succeeds iff it matches.
                // Never taking effect is covered by placing it last (or not at all).
                if succeeded.is_some_and(|s| s != matches) {
                    None
                } else {
                    Some(if matches { new } else { state })
                }
            }
        }
    }
}

/// One operation of a partition.
struct Entry {
    /// Index in the history, for explanations.
    source: usize,
    call: u64,
    /// `None` = unknown outcome, i.e. returns at infinity.
    ret: Option<u64>,
    step: Step,
}

/// Maps each distinct value of a partition to a small integer.
#[derive(Default)]
struct Interner<'h> {
    ids: HashMap<&'h [u8], u32>,
    values: Vec<&'h [u8]>,
}

impl<'h> Interner<'h> {
    fn value(&mut self, value: &'h [u8]) -> Result<u32, String> {
        if let Some(&id) = self.ids.get(value) {
            return Ok(id);
        }
        let id = u32::try_from(self.values.len()).map_err(|_| "too many distinct values")?;
        self.ids.insert(value, id);
        self.values.push(value);
        Ok(id)
    }

    fn state(&mut self, value: &'h Option<Vec<u8>>) -> Result<State, String> {
        value.as_deref().map(|v| self.value(v)).transpose()
    }
}

/// One key's sub-history, ready to search.
struct Partition<'h> {
    entries: Vec<Entry>,
    /// Interned values, indexed by [`State`].
    values: Vec<&'h [u8]>,
}

impl<'h> Partition<'h> {
    fn build(history: &'h History, indices: &[usize]) -> Result<Self, String> {
        let mut interner = Interner::default();
        let mut entries = Vec::with_capacity(indices.len());
        for &source in indices {
            let op = &history.ops[source];
            let (ret, result) = match &op.outcome {
                Outcome::Ok {
                    returned_at,
                    result,
                } => (Some(*returned_at), Some(result)),
                Outcome::Unknown => (None, None),
                Outcome::Failed => continue,
            };
            if ret.is_some_and(|ret| ret < op.call) {
                return Err(format!("{} returned before its call", describe(source, op)));
            }
            let step = match (&op.op, result) {
                // An unknown read constrains nothing.
                (Op::Get, None) => continue,
                (Op::Get, Some(OpResult::Read(value))) => Step::Read(interner.state(value)?),
                (Op::Put(value), None | Some(OpResult::Written)) => {
                    Step::Write(Some(interner.value(value)?))
                }
                (Op::Delete, None | Some(OpResult::Written)) => Step::Write(None),
                (Op::Cas { expected, new }, None) => Step::Cas {
                    expected: interner.state(expected)?,
                    new: interner.state(new)?,
                    succeeded: None,
                },
                (Op::Cas { expected, new }, Some(OpResult::Cas { succeeded })) => Step::Cas {
                    expected: interner.state(expected)?,
                    new: interner.state(new)?,
                    succeeded: Some(*succeeded),
                },
                (_, Some(result)) => {
                    return Err(format!(
                        "{}: result {result:?} does not fit the operation",
                        describe(source, op)
                    ))
                }
            };
            entries.push(Entry {
                source,
                call: op.call,
                ret,
                step,
            });
        }
        Ok(Self {
            entries,
            values: interner.values,
        })
    }

    fn show_state(&self, state: State) -> String {
        show_value(state.and_then(|id| self.values.get(id as usize).copied()))
    }

    /// A human-readable account of why the search failed: the longest linearizable
    /// prefix it found (entry indices, in order) and the operations it could not place.
    fn explain(&self, history: &History, longest: &[usize]) -> String {
        const SHOWN: usize = 64;
        let unknown = self.entries.iter().filter(|e| e.ret.is_none()).count();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} operations ({unknown} with unknown outcome) have no linearization.",
            self.entries.len()
        );
        let end = longest
            .iter()
            .try_fold(None, |state, &e| self.entries[e].step.apply(state));
        let end = end.map_or_else(|| "?".to_owned(), |state| self.show_state(state));
        let _ = writeln!(
            out,
            "Longest linearizable prefix found: {} operations, leaving {end}{}",
            longest.len(),
            if longest.is_empty() { "." } else { ":" },
        );
        let skipped = longest.len().saturating_sub(SHOWN / 4);
        if skipped > 0 {
            let _ = writeln!(out, "  ... {skipped} earlier");
        }
        for &e in &longest[skipped..] {
            let source = self.entries[e].source;
            let _ = writeln!(out, "  {}", describe(source, &history.ops[source]));
        }
        // In call order; once there are many, only those the prefix could not place,
        // which is where the contradiction lies.
        let in_prefix: HashSet<usize> = longest.iter().copied().collect();
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        order.sort_by_key(|&e| (self.entries[e].call, self.entries[e].source));
        if order.len() > SHOWN {
            order.retain(|e| !in_prefix.contains(e));
            let _ = writeln!(out, "Operations not in that prefix, in call order:");
        } else {
            let _ = writeln!(out, "All operations in call order (* = in that prefix):");
        }
        for &e in order.iter().take(SHOWN) {
            let source = self.entries[e].source;
            let mark = if in_prefix.contains(&e) { '*' } else { ' ' };
            let _ = writeln!(out, "{mark} {}", describe(source, &history.ops[source]));
        }
        if order.len() > SHOWN {
            let _ = writeln!(out, "  ... {} more", order.len() - SHOWN);
        }
        out
    }
}

/// `#index p<process> [call, return] op => result`, e.g. `#3 p1 [10, 20] get => "v1"`.
fn describe(index: usize, op: &Operation) -> String {
    let ret = match &op.outcome {
        Outcome::Ok { returned_at, .. } => returned_at.to_string(),
        Outcome::Unknown | Outcome::Failed => "?".to_owned(),
    };
    let what = match &op.op {
        Op::Get => "get".to_owned(),
        Op::Put(value) => format!("put {}", show_value(Some(value))),
        Op::Delete => "delete".to_owned(),
        Op::Cas { expected, new } => format!(
            "cas {} -> {}",
            show_value(expected.as_deref()),
            show_value(new.as_deref())
        ),
    };
    let result = match &op.outcome {
        Outcome::Ok { result, .. } => match result {
            OpResult::Read(value) => show_value(value.as_deref()),
            OpResult::Written => "ok".to_owned(),
            OpResult::Cas { succeeded: true } => "succeeded".to_owned(),
            OpResult::Cas { succeeded: false } => "failed".to_owned(),
        },
        Outcome::Unknown => "unknown".to_owned(),
        Outcome::Failed => "not applied".to_owned(),
    };
    format!(
        "#{index} p{} [{}, {ret}] {what} => {result}",
        op.process, op.call
    )
}

fn show_value(value: Option<&[u8]>) -> String {
    value.map_or_else(|| "absent".to_owned(), show_key)
}

fn show_key(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// Counts search steps against the budget.
struct Meter {
    budget: Budget,
    start: Instant,
    steps: u64,
}

impl Meter {
    fn new(budget: Budget) -> Self {
        Self {
            budget,
            start: Instant::now(),
            steps: 0,
        }
    }

    /// Takes one step, or returns false if the budget is spent. The clock is read on the
    /// very first step, so a zero duration never lets a search through.
    fn step(&mut self) -> bool {
        if self.budget.max_steps.is_some_and(|max| self.steps >= max) {
            return false;
        }
        if let Some(max) = self.budget.max_time {
            if self.steps % TIME_CHECK_INTERVAL == 0 && self.start.elapsed() >= max {
                return false;
            }
        }
        self.steps += 1;
        true
    }

    fn exhausted_reason(&self, key: &[u8], ops: usize, report: &Report) -> String {
        format!(
            "search budget ({:?}) exhausted after {} steps and {:?}, while checking key {} \
             ({ops} operations); {} of {} keys were linearizable before",
            self.budget,
            self.steps,
            self.start.elapsed(),
            show_key(key),
            report.keys_checked,
            report.keys,
        )
    }
}

/// Where the search of one key ended.
enum Search {
    Linearizable,
    /// No linearization; `longest` is the longest linearizable prefix found (entries).
    Violation {
        longest: Vec<usize>,
    },
    Exhausted,
}

/// The call and return events of a partition as a doubly linked list in time order, so
/// the search can take a linearized operation out and put it back in O(1).
struct Events {
    /// Node 0 is the head sentinel.
    nodes: Vec<Node>,
}

#[derive(Clone, Copy)]
struct Node {
    prev: usize,
    next: usize,
    entry: usize,
    is_call: bool,
    /// For a call, its return's node.
    partner: usize,
}

/// The end of the list.
const NIL: usize = usize::MAX;

impl Events {
    /// At equal times calls come before returns: an operation returning at `t` and one
    /// called at `t` are taken to overlap, since the clock cannot tell their order.
    /// That only relaxes real-time constraints, so it can hide a violation but never
    /// report one that is not there. Unknown outcomes return after everything.
    fn new(entries: &[Entry]) -> Self {
        // (returns at infinity, time, is a return, entry)
        let mut events: Vec<(bool, u64, bool, usize)> = Vec::with_capacity(2 * entries.len());
        for (i, entry) in entries.iter().enumerate() {
            events.push((false, entry.call, false, i));
            events.push(match entry.ret {
                Some(ret) => (false, ret, true, i),
                None => (true, 0, true, i),
            });
        }
        events.sort_unstable();
        let mut return_node = vec![NIL; entries.len()];
        for (position, &(_, _, is_return, entry)) in events.iter().enumerate() {
            if is_return {
                return_node[entry] = position + 1;
            }
        }
        let head = Node {
            prev: NIL,
            next: if events.is_empty() { NIL } else { 1 },
            entry: NIL,
            is_call: false,
            partner: NIL,
        };
        let last = events.len();
        let nodes = std::iter::once(head)
            .chain(
                events
                    .iter()
                    .enumerate()
                    .map(|(position, &(_, _, is_return, entry))| {
                        let node = position + 1;
                        Node {
                            prev: node - 1,
                            next: if node == last { NIL } else { node + 1 },
                            entry,
                            is_call: !is_return,
                            partner: if is_return { NIL } else { return_node[entry] },
                        }
                    }),
            )
            .collect();
        Self { nodes }
    }

    fn first(&self) -> usize {
        self.nodes[0].next
    }

    fn unlink(&mut self, node: usize) {
        let Node { prev, next, .. } = self.nodes[node];
        self.nodes[prev].next = next;
        if next != NIL {
            self.nodes[next].prev = prev;
        }
    }

    /// Undoes `unlink(node)`; the node kept its own links ("dancing links").
    fn relink(&mut self, node: usize) {
        let Node { prev, next, .. } = self.nodes[node];
        self.nodes[prev].next = node;
        if next != NIL {
            self.nodes[next].prev = node;
        }
    }

    /// Takes a linearized operation's call and return out of the list.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.nodes[call].partner);
    }

    /// Undoes `lift(call)`, in reverse order.
    fn unlift(&mut self, call: usize) {
        self.relink(self.nodes[call].partner);
        self.relink(call);
    }
}

/// A linearized operation on the search stack.
struct Placed {
    call: usize,
    /// The register's value before it.
    before: State,
    read_only: bool,
}

/// What became of an attempt to linearize an operation next.
enum Attempt {
    Placed,
    /// The model rejects it here, or that configuration was explored already.
    Rejected,
    /// Neither it nor anything else can come next (see [`search`]).
    DeadEnd,
}

/// The mutable state of the search over one partition.
struct Searcher<'a> {
    entries: &'a [Entry],
    events: Events,
    /// The linearized set as a bitset, plus one trailing word for the value, so that
    /// the cache can be probed with a borrowed slice and only new keys are copied.
    key: Vec<u64>,
    /// Configurations reached: each is on the current path or has no completion.
    seen: HashSet<Vec<u64>>,
    placed: Vec<Placed>,
    state: State,
    /// Operations with a known return still to place.
    left: usize,
}

impl<'a> Searcher<'a> {
    fn new(entries: &'a [Entry]) -> Self {
        Self {
            entries,
            events: Events::new(entries),
            key: vec![0; entries.len().div_ceil(64) + 1],
            seen: HashSet::new(),
            placed: Vec::new(),
            state: None,
            left: entries.iter().filter(|e| e.ret.is_some()).count(),
        }
    }

    fn flip(&mut self, entry: usize) {
        self.key[entry / 64] ^= 1 << (entry % 64);
    }

    /// Tries to linearize next the operation whose call is `node`.
    fn try_place(&mut self, node: usize) -> Attempt {
        let entry = self.events.nodes[node].entry;
        let step = self.entries[entry].step;
        let Some(next) = step.apply(self.state) else {
            return Attempt::Rejected;
        };
        self.flip(entry);
        if let Some(last) = self.key.last_mut() {
            *last = next.map_or(0, |id| u64::from(id) + 1);
        }
        if self.seen.contains(self.key.as_slice()) {
            self.flip(entry);
            return if step.is_read_only() {
                Attempt::DeadEnd
            } else {
                Attempt::Rejected
            };
        }
        self.seen.insert(self.key.clone());
        self.placed.push(Placed {
            call: node,
            before: self.state,
            read_only: step.is_read_only(),
        });
        self.state = next;
        self.left -= usize::from(self.entries[entry].ret.is_some());
        self.events.lift(node);
        Attempt::Placed
    }

    /// Undoes placements up to and including the last free choice; returns the node
    /// after that choice's call, where the scan resumes, or `None` if there was none.
    fn backtrack(&mut self) -> Option<usize> {
        while let Some(top) = self.placed.pop() {
            let entry = self.events.nodes[top.call].entry;
            self.flip(entry);
            self.state = top.before;
            self.left += usize::from(self.entries[entry].ret.is_some());
            self.events.unlift(top.call);
            if !top.read_only {
                return Some(self.events.nodes[top.call].next);
            }
        }
        None
    }

    /// The entries placed so far, in order.
    fn prefix(&self) -> Vec<usize> {
        let entry = |p: &Placed| self.events.nodes[p.call].entry;
        self.placed.iter().map(entry).collect()
    }
}

/// Wing & Gong's search with Lowe's memoization over one partition.
///
/// Walk the event list from the head: at a call, try to linearize that operation now
/// (the model accepts it and the resulting (linearized set, value) has not been seen),
/// and if so take it out of the list and restart from the head. At a return, that
/// operation should have been linearized already: undo the last choice and try the
/// next call after it. Success once every operation with a known return is placed;
/// the unknown ones left over never took effect.
///
/// One reduction on top: a read-only operation that fits the current value is placed
/// without trying anything else first, and if that fails, so has the configuration
/// before it. That is sound because any completion that places it later can place it
/// now instead: it changes no value, and the scan reached its call before any pending
/// return. It keeps concurrent reads of one value from multiplying the search space.
fn search(entries: &[Entry], meter: &mut Meter) -> Search {
    let mut searcher = Searcher::new(entries);
    let mut longest = Vec::new();
    let mut node = searcher.events.first();
    while searcher.left > 0 {
        if !meter.step() {
            return Search::Exhausted;
        }
        // The end of the list cannot come before a known return while `left > 0`, as
        // those sort before unknown ones, but is handled like a return.
        let is_call = node != NIL && searcher.events.nodes[node].is_call;
        if is_call {
            match searcher.try_place(node) {
                Attempt::Placed => {
                    node = searcher.events.first();
                    continue;
                }
                Attempt::Rejected => {
                    node = searcher.events.nodes[node].next;
                    continue;
                }
                Attempt::DeadEnd => {}
            }
        }
        if searcher.placed.len() > longest.len() {
            longest = searcher.prefix();
        }
        match searcher.backtrack() {
            Some(next) => node = next,
            None => return Search::Violation { longest },
        }
    }
    Search::Linearizable
}

#[cfg(test)]
mod tests;

//! The driver over a minimal host: single-replica ranges on one store, a log that
//! becomes durable when the test says so, a state machine that records answers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

use raft::eraftpb::{Entry, HardState, Message};
use raft::StorageError;
use rangekv_types::{PeerId, RangeId, StoreId};
use rustc_hash::FxHashSet;

use crate::host::{
    Applying, Fatal, Heartbeat, HeartbeatKind, Host, LogWrite, RangeView, Refusal, Types,
};
use crate::membership::{Member, MemberChange, Membership, Role};
use crate::operation::conf_change::ConfChangeRefusal;
use crate::peer::Peer;
use crate::storage::{EntriesResult, LogRead};
use crate::{CoreConfig, Driver};

#[derive(Default)]
struct Disk {
    /// Per range: entries from index 1 (no compaction here) and the hard state.
    ranges: HashMap<RangeId, (Vec<Entry>, HardState)>,
}

type SharedDisk = Rc<RefCell<Disk>>;

impl LogRead for SharedDisk {
    fn hard_state(&self, range: RangeId) -> HardState {
        let disk = self.borrow();
        disk.ranges
            .get(&range)
            .map(|r| r.1.clone())
            .unwrap_or_default()
    }
    fn entries(&self, range: RangeId, span: Range<u64>, max: Option<u64>) -> EntriesResult {
        let (low, high) = (span.start, span.end);
        let disk = self.borrow();
        let entries = disk.ranges.get(&range).map(|r| &r.0[..]).unwrap_or(&[]);
        if high > entries.len() as u64 + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = entries[low as usize - 1..high as usize - 1].to_vec();
        raft::util::limit_size(&mut out, max);
        Ok(out)
    }
    fn term(&self, range: RangeId, index: u64) -> raft::Result<u64> {
        if index == 0 {
            return Ok(0);
        }
        let disk = self.borrow();
        disk.ranges
            .get(&range)
            .and_then(|r| r.0.get(index as usize - 1))
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }
    fn first_index(&self, _range: RangeId) -> u64 {
        1
    }
    fn last_index(&self, range: RangeId) -> u64 {
        self.borrow()
            .ranges
            .get(&range)
            .map_or(0, |r| r.0.len() as u64)
    }
}

struct TestTypes;

impl Types for TestTypes {
    /// A command is a value to write; its answer is the value's length.
    type Command = Vec<u8>;
    type WriteReply = u32;
    type ReadReply = u32;
    type Answer = usize;
    type Range = ();
    type Log = SharedDisk;

    fn command_bytes(command: &Vec<u8>) -> usize {
        command.len()
    }
    fn encode_entry(commands: Vec<Vec<u8>>, _stamp: crate::Stamp) -> Vec<u8> {
        let mut out = Vec::new();
        for command in commands {
            out.push(command.len() as u8);
            out.extend(command);
        }
        out
    }
    fn encode_compact_log(_index: u64, _term: u64) -> Vec<u8> {
        vec![0]
    }
}

#[derive(Default)]
struct TestHost {
    disk: SharedDisk,
    submitted: Vec<LogWrite>,
    answers: Vec<(u32, usize)>,
    refused: Vec<(u32, Refusal)>,
    sent: usize,
    /// The next entry to apply fails to decode.
    corrupt: bool,
    applied: Vec<(RangeId, u64)>,
    committed_batches: usize,
    memberships: Vec<(RangeId, u64, Membership)>,
}

impl Host<TestTypes> for TestHost {
    fn send(&mut self, _to: StoreId, _range: RangeId, _message: Message) {
        self.sent += 1;
    }
    fn send_heartbeat(&mut self, _: StoreId, _: Heartbeat, _: HeartbeatKind, _: bool) {
        self.sent += 1;
    }
    fn flush(&mut self) {}
    fn wall_clock_ms(&self) -> u64 {
        0
    }
    fn submit_log(&mut self, write: LogWrite) {
        self.submitted.push(write);
    }
    fn begin_apply(&mut self) {}
    fn apply_entry(&mut self, entry: &Entry, to: Applying<'_, TestTypes>) -> Result<(), Fatal> {
        if std::mem::take(&mut self.corrupt) {
            return Err(Fatal::Unappliable {
                range: to.range,
                index: entry.index,
                reason: "does not decode".into(),
            });
        }
        let mut data = &entry.data[..];
        while let Some((&len, rest)) = data.split_first() {
            to.answers.push(len as usize);
            data = &rest[len as usize..];
        }
        Ok(())
    }
    fn apply_membership(&mut self, _: &mut (), range: RangeId, index: u64, m: &Membership) {
        self.memberships.push((range, index, m.clone()));
    }
    fn set_applied(&mut self, _: &mut (), range: RangeId, index: u64, _term: u64) {
        self.applied.push((range, index));
    }
    fn generate_snapshot(
        &mut self,
        _: &(),
        _: RangeId,
        _: u64,
        _: u64,
    ) -> Result<Option<Vec<u8>>, Fatal> {
        Ok(None)
    }
    fn install_snapshot(
        &mut self,
        _: &mut (),
        range: RangeId,
        index: u64,
        _: u64,
        _: &Membership,
        _: &[u8],
    ) -> Result<(), Fatal> {
        Err(Fatal::Snapshot {
            range,
            index,
            reason: "these tests send none".into(),
        })
    }
    fn commit_apply(&mut self) -> Result<(), Fatal> {
        self.committed_batches += 1;
        Ok(())
    }
    fn durable_applied(&self, _range: RangeId) -> Result<u64, Fatal> {
        Ok(0)
    }
    fn request_flush(&mut self) -> Result<(), Fatal> {
        Ok(())
    }
    fn answer_write(&mut self, reply: u32, answer: usize) {
        self.answers.push((reply, answer));
    }
    fn refuse_write(&mut self, _: &(), reply: u32, refusal: Refusal) {
        self.refused.push((reply, refusal));
    }
    fn abandon_write(&mut self, reply: u32) {
        self.refused.push((reply, Refusal::Stopping));
    }
    fn answer_read(&mut self, _reply: u32) {}
    fn refuse_read(&mut self, _: &(), _reply: u32, _: Refusal) {}
    fn publish(&mut self, _: &(), _: RangeView) {}
}

impl TestHost {
    /// Every submitted write reaches the disk, in order, and is reported durable.
    fn persist_all(&mut self, driver: &mut Driver<TestTypes>) {
        for write in std::mem::take(&mut self.submitted) {
            let mut disk = self.disk.borrow_mut();
            for (range, entries) in &write.appends {
                let log = &mut disk.ranges.entry(*range).or_default().0;
                log.truncate(entries[0].index as usize - 1);
                log.extend(entries.iter().cloned());
            }
            for (range, hard_state) in &write.hard_states {
                disk.ranges.entry(*range).or_default().1 = hard_state.clone();
            }
            drop(disk);
            if let Some(seq) = write.seq {
                driver.on_persisted(seq, self);
            }
        }
    }
}

fn open(ranges: &[u64]) -> (Driver<TestTypes>, TestHost, Instant) {
    let now = Instant::now();
    let host = TestHost::default();
    let mut driver = Driver::new(CoreConfig {
        quiesce: false,
        ..CoreConfig::default()
    });
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    for &range in ranges {
        let members = Membership::new(
            1,
            vec![Member {
                peer: PeerId(1),
                store: StoreId(1),
                role: Role::Voter,
            }],
        );
        let peer = Peer::open(
            driver.config(),
            RangeId(range),
            PeerId(1),
            &members,
            host.disk.clone(),
            0,
            false,
            now,
            (),
            &logger,
        )
        .unwrap();
        driver.insert(peer);
    }
    (driver, host, now)
}

/// Ticks and persists until every range leads and has applied its first entry.
fn elect(driver: &mut Driver<TestTypes>, host: &mut TestHost, now: &mut Instant) {
    let none = FxHashSet::default();
    for _ in 0..100 {
        *now += Duration::from_millis(100);
        driver.tick(*now, &none, host).unwrap();
        driver.process(*now, host).unwrap();
        host.persist_all(driver);
        driver.process(*now, host).unwrap();
        if driver
            .peers()
            .all(|p| p.is_leader() && p.status().applied >= 1)
        {
            // Settle: nothing left in flight.
            while !host.submitted.is_empty() || driver.has_work() {
                host.persist_all(driver);
                driver.process(*now, host).unwrap();
            }
            return;
        }
    }
    panic!("not every range got a leader");
}

#[test]
fn writes_to_several_ranges_in_one_loop_share_one_log_write_and_one_apply_batch() {
    let (mut driver, mut host, mut now) = open(&[1, 2, 3]);
    elect(&mut driver, &mut host, &mut now);
    let batches = host.committed_batches;
    for (range, reply) in [(1, 10), (2, 20), (3, 30), (1, 11)] {
        driver
            .on_write(
                RangeId(range),
                vec![7; reply as usize % 8 + 1],
                reply,
                &mut host,
            )
            .unwrap();
    }
    driver.process(now, &mut host).unwrap();
    assert_eq!(host.submitted.len(), 1, "one log write for the loop");
    let write = &host.submitted[0];
    let mut ranges: Vec<u64> = write.appends.iter().map(|(r, _)| r.get()).collect();
    ranges.sort();
    assert_eq!(ranges, vec![1, 2, 3]);
    let range_1 = write.appends.iter().find(|(r, _)| r.get() == 1).unwrap();
    assert_eq!(range_1.1.len(), 1, "range 1's two writes are one entry");
    assert!(
        host.answers.is_empty(),
        "nothing answered before it is durable"
    );
    host.persist_all(&mut driver);
    driver.process(now, &mut host).unwrap();
    assert_eq!(host.committed_batches, batches + 1, "one apply batch");
    let mut answers = host.answers.clone();
    answers.sort();
    assert_eq!(answers, vec![(10, 3), (11, 4), (20, 5), (30, 7)]);
}

#[test]
fn an_entry_the_state_machine_cannot_apply_stops_the_store_unanswered() {
    let (mut driver, mut host, mut now) = open(&[1]);
    elect(&mut driver, &mut host, &mut now);
    driver
        .on_write(RangeId(1), b"abc".to_vec(), 1, &mut host)
        .unwrap();
    driver.process(now, &mut host).unwrap();
    host.persist_all(&mut driver);
    host.corrupt = true;
    let result = driver.process(now, &mut host);
    assert!(
        matches!(result, Err(Fatal::Unappliable { .. })),
        "{result:?}"
    );
    assert!(host.answers.is_empty(), "the write is not acknowledged");
    assert_eq!(
        host.committed_batches, 1,
        "the batch holding the bad entry is not committed"
    );
}

#[test]
fn a_write_for_a_range_not_here_is_handed_back_and_a_follower_refuses() {
    let (mut driver, mut host, now) = open(&[1]);
    assert_eq!(driver.on_write(RangeId(9), vec![1], 5, &mut host), Err(5));
    driver.on_write(RangeId(1), vec![1], 6, &mut host).unwrap();
    driver.process(now, &mut host).unwrap();
    assert_eq!(host.refused, vec![(6, Refusal::NotLeader { leader: None })]);
}

/// A learner added, then removed: each change applies with `conf_ver + 1` and is
/// handed to the host for the apply batch; a change asked against an old
/// `conf_ver`, or while one is pending, is refused and nothing is proposed.
#[test]
fn membership_changes_apply_in_order_and_stale_or_overlapping_ones_are_refused() {
    let (mut driver, mut host, mut now) = open(&[1]);
    elect(&mut driver, &mut host, &mut now);
    let range = RangeId(1);
    let add = [MemberChange::AddLearner {
        peer: PeerId(2),
        store: StoreId(2),
    }];
    driver
        .propose_conf_change(range, 1, &add, now, &mut host)
        .unwrap();
    assert_eq!(
        driver.propose_conf_change(range, 1, &add, now, &mut host),
        Err(ConfChangeRefusal::Busy),
        "one change at a time"
    );
    driver.process(now, &mut host).unwrap();
    host.persist_all(&mut driver);
    driver.process(now, &mut host).unwrap();
    let membership = driver.peer(range).unwrap().membership().clone();
    assert_eq!(membership.conf_ver, 2);
    assert_eq!(
        membership.get(PeerId(2)).map(|m| (m.store, m.role)),
        Some((StoreId(2), Role::Learner))
    );
    assert_eq!(host.memberships.len(), 1);
    assert_eq!(host.memberships[0].2, membership);
    assert_eq!(
        host.memberships[0].1,
        host.applied.last().unwrap().1,
        "recorded in the batch that applies it"
    );

    let remove = [MemberChange::RemoveLearner(PeerId(2))];
    assert_eq!(
        driver.propose_conf_change(range, 1, &remove, now, &mut host),
        Err(ConfChangeRefusal::StaleEpoch {
            asked: 1,
            current: 2
        })
    );
    driver
        .propose_conf_change(range, 2, &remove, now, &mut host)
        .unwrap();
    driver.process(now, &mut host).unwrap();
    host.persist_all(&mut driver);
    driver.process(now, &mut host).unwrap();
    let membership = driver.peer(range).unwrap().membership();
    assert_eq!(membership.conf_ver, 3);
    assert_eq!(membership.members.len(), 1);
    assert!(membership.matches(&driver.peer(range).unwrap().conf_state()));
}

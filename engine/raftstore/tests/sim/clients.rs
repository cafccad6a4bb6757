//! Client processes: each runs one operation at a time, routed to the range of its
//! key and sent to the store it believes leads that range (one guess per range), and
//! records it in the `History` with virtual call and return times: one operation from
//! its first attempt to its answer, however many attempts it took.
//!
//! Every process holds a session, as `client/src/lib.rs` does (`on_range`,
//! `attempt`): before its first write to a range it opens the session there (a
//! command of its own through raft, floor = the process's next sequence); a write
//! takes the next sequence at its first attempt and keeps it through every retry,
//! with `acked_below` = that sequence (one write in flight at a time, so nothing
//! below it awaits an answer). The range applies each (session, sequence) at most
//! once and answers a repeat with the first application's answer, so:
//! - `NotLeader` (the core's `Refusal::NotLeader`, refused before proposing, or
//!   `Refusal::Dropped`, the proposal's index taken by another entry), a refused
//!   connection: certainly no effect; the attempt is repeated elsewhere.
//! - The node crashed while holding the request, the core abandoned the write (its
//!   leader lost its quorum), or the client timed out: the outcome is unknown and the
//!   write is sent again under the same sequence (to another node), remembering that
//!   it may have applied. A read is simply sent again.
//! - `SessionExpired` (the range dropped the session, idle past its lifetime): the
//!   session is opened there again; a write that certainly never applied is
//!   renumbered and sent again, one that may have applied ends `unknown` (applied
//!   once or not at all).
//! - Past `PATIENCE` a load client gives up: a write that may have applied stays
//!   `unknown`, anything else is `failed`.
//!
//! Every write has its own unique value, so a write applied twice (or a `failed` one
//! that took effect) shows up as a history no order explains; the range's
//! applied-once invariant (`check_applied_once`) catches a double application at once.

use std::collections::{BTreeMap, VecDeque};

use rangekv_check::{Op, OpId, OpResult};
use rangekv_raftstore::{SessionId, SessionRef};

use super::host::{Cmd, Command};
use super::rng::Rng;
use super::store::Inbound;
use super::world::{range_id, Event, Phase, World, MS};

/// A client's patience with one attempt: then its outcome is unknown.
const CLIENT_TIMEOUT: u64 = 3_000 * MS;
/// A load client's patience with one operation: no new attempt starts later.
const PATIENCE: u64 = 8_000 * MS;
/// Processes at or above this number are the final check's, not the load's.
pub const FINAL_PROCESS: u64 = 100;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Written,
    /// A session opened at the range: its registration (`opened_at`).
    Opened(u64),
    Cas(bool),
    Read(Option<Vec<u8>>),
    /// The node does not lead (hint: the leader it knows), or the proposal was
    /// dropped: certainly not applied.
    NotLeader(Option<u64>),
    /// The node is down: the request never reached it.
    Refused,
    /// The node crashed while holding the request: outcome unknown.
    Lost,
    /// The session is not registered at the range (it expired), or the sequence is
    /// below its floor: nothing applied.
    SessionExpired,
    /// The session holds too many unacknowledged answers: nothing applied.
    Busy,
}

/// A command as the trace shows it.
fn describe(cmd: &Cmd) -> String {
    let text = |value: &Option<Vec<u8>>| match value {
        Some(value) => String::from_utf8_lossy(value).into_owned(),
        None => "absent".into(),
    };
    match cmd {
        Cmd::Put { value, .. } => format!("put {}", String::from_utf8_lossy(value)),
        Cmd::Delete { .. } => "delete".into(),
        Cmd::Cas { expected, new, .. } => format!("cas {} → {}", text(expected), text(new)),
        Cmd::OpenSession { id, floor } => format!("open session {id:032x} from {floor}"),
    }
}

/// What one attempt sends.
pub enum ReqKind {
    Read(Vec<u8>),
    /// The session's opening at the range, before the write.
    Open(Command),
    Write(Command),
}

/// One attempt in flight.
pub struct Request {
    pub client: usize,
    pub node: usize,
    /// The range (index) of the key.
    pub range: usize,
    pub kind: ReqKind,
}

/// What an operation does.
#[derive(Clone, Debug)]
pub enum Action {
    Read(Vec<u8>),
    Write(Cmd),
}

/// An operation in progress, across its attempts.
pub struct Pending {
    pub op: OpId,
    pub key: Vec<u8>,
    pub range: usize,
    pub action: Action,
    /// The write's sequence and the registration it was numbered under, from its
    /// first attempt (`None`: not yet, or renumbered).
    pub sequence: Option<(u64, u64)>,
    /// An attempt had an unknown outcome: the write may have applied.
    pub maybe_applied: bool,
    /// An attempt had an unknown outcome since the write was last sent.
    pub resend_owed: bool,
    /// When the operation started.
    pub started: u64,
}

#[derive(Clone, Debug)]
pub enum Scripted {
    Put(Vec<u8>),
    Get(Vec<u8>),
}

pub struct Client {
    pub process: u64,
    pub session: SessionId,
    /// The sequence the next write takes (the floor of a session opened now).
    pub next_sequence: u64,
    /// Per range, whether the session is open there as far as this client knows.
    /// Per range, the session's registration there, once opened.
    pub open_at: Vec<Option<u64>>,
    pub pending: Option<Pending>,
    /// The attempt in flight.
    pub current: Option<u64>,
    /// Per range, the node this client sends to (its idea of the leader).
    pub guess: Vec<usize>,
    /// Per range, whether `guess` came from a node naming the leader.
    pub guess_hinted: Vec<bool>,
    pub counter: u64,
    /// The last value this client saw per key (CAS expectations).
    pub seen: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Issues new operations (the load stops when the faults do).
    pub active: bool,
    /// The final check's operations, in order, retried until they succeed.
    pub script: VecDeque<Scripted>,
}

impl Client {
    pub fn new(process: u64, rng: &mut Rng, guess: usize, ranges: usize) -> Self {
        Client {
            process,
            session: (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()),
            next_sequence: 1,
            open_at: vec![None; ranges],
            pending: None,
            current: None,
            guess: vec![guess; ranges],
            guess_hinted: vec![false; ranges],
            counter: 0,
            seen: BTreeMap::new(),
            active: true,
            script: VecDeque::new(),
        }
    }

    fn next_value(&mut self) -> Vec<u8> {
        self.counter += 1;
        format!("p{}-{}", self.process, self.counter).into_bytes()
    }

    fn is_final(&self) -> bool {
        self.process >= FINAL_PROCESS
    }
}

impl World {
    fn client_delay(&mut self) -> u64 {
        self.client_rng.range(MS / 10, 3 * MS)
    }

    /// The client starts its next operation, or the next attempt of the one under
    /// way. Idle windows hold back the load's attempts, and write pauses its writes.
    pub fn client_go(&mut self, c: usize) {
        self.trace.u64(20).u64(c as u64);
        if self.clients[c].current.is_some() {
            return;
        }
        let client = &self.clients[c];
        let scripted = client.script.front().cloned();
        if client.pending.is_none() && scripted.is_none() && !client.active {
            return;
        }
        let writing = matches!(
            client.pending.as_ref().map(|p| &p.action),
            Some(Action::Write(_))
        );
        if scripted.is_none() && self.phase == Phase::Chaos {
            let hold = if self.now < self.idle_until {
                Some(self.idle_until)
            } else if writing && self.now < self.writes_paused_until {
                Some(self.writes_paused_until)
            } else {
                None
            };
            if let Some(until) = hold {
                // Nothing to do until the window ends.
                let at = until + self.client_rng.range(0, 150 * MS);
                self.schedule(at, Event::ClientGo(c));
                return;
            }
        }
        if self.clients[c].pending.is_none() {
            self.start_op(c, scripted);
        }
        self.attempt(c);
    }

    fn start_op(&mut self, c: usize, scripted: Option<Scripted>) {
        let (key, op, action) = match scripted {
            Some(Scripted::Put(key)) => {
                let value = self.clients[c].next_value();
                let command = Cmd::Put {
                    key: key.clone(),
                    value: value.clone(),
                };
                (key, Op::Put(value), Action::Write(command))
            }
            Some(Scripted::Get(key)) => (key.clone(), Op::Get, Action::Read(key)),
            None => self.random_op(c),
        };
        let process = self.clients[c].process;
        let op_id = self.history.invoke(process, key.clone(), op, self.now);
        self.clients[c].pending = Some(Pending {
            op: op_id,
            range: self.range_of(&key),
            key,
            action,
            sequence: None,
            maybe_applied: false,
            resend_owed: false,
            started: self.now,
        });
    }

    /// Sends the pending operation's next attempt: the session's opening at the range
    /// first if a write finds it not open there.
    fn attempt(&mut self, c: usize) {
        let range = self.clients[c].pending.as_ref().expect("pending").range;
        let mut node = self.clients[c].guess[range];
        // Now and then a client tries another node (a load balancer, a stale cache).
        if self.client_rng.chance(100) {
            node = self.client_rng.below(self.nodes.len() as u64) as usize;
        }
        let reading = matches!(
            self.clients[c].pending.as_ref().map(|p| &p.action),
            Some(Action::Read(_))
        );
        if self.opts.buggy_reads && reading {
            node = self.client_rng.below(self.nodes.len() as u64) as usize;
        }
        let client = &mut self.clients[c];
        let pending = client.pending.as_mut().expect("pending");
        let kind = match &pending.action {
            Action::Read(key) => ReqKind::Read(key.clone()),
            Action::Write(_) if client.open_at[range].is_none() => ReqKind::Open(Command {
                cmd: Cmd::OpenSession {
                    id: client.session,
                    floor: client.next_sequence,
                },
                session: None,
            }),
            Action::Write(cmd) => {
                let opened_at = client.open_at[range].unwrap_or_default();
                let (sequence, opened_at) = *pending.sequence.get_or_insert_with(|| {
                    client.next_sequence += 1;
                    (client.next_sequence - 1, opened_at)
                });
                ReqKind::Write(Command {
                    cmd: cmd.clone(),
                    session: Some(SessionRef {
                        id: client.session,
                        sequence,
                        acked_below: sequence,
                        opened_at,
                    }),
                })
            }
        };
        if matches!(kind, ReqKind::Write(_)) && std::mem::take(&mut pending.resend_owed) {
            self.summary.retried_unknown += 1;
        }
        let req = self.next_req;
        self.next_req += 1;
        if self.logging() {
            let client = &self.clients[c];
            let pending = client.pending.as_ref().expect("pending");
            let what = match &kind {
                ReqKind::Read(_) => "get".to_string(),
                ReqKind::Open(command) => describe(&command.cmd),
                ReqKind::Write(command) => format!(
                    "{} #{}{}",
                    describe(&command.cmd),
                    command.session.map_or(0, |s| s.sequence),
                    if pending.maybe_applied {
                        " (again: may have applied)"
                    } else {
                        ""
                    }
                ),
            };
            let line = format!(
                "client {} r{req} → n{} {}: {} {what}",
                client.process,
                node + 1,
                range_id(range),
                String::from_utf8_lossy(&pending.key)
            );
            self.log(|| line);
        }
        self.requests.insert(
            req,
            Request {
                client: c,
                node,
                range,
                kind,
            },
        );
        self.clients[c].current = Some(req);
        let delay = self.client_delay();
        self.after(delay, Event::Request(req));
        self.after(CLIENT_TIMEOUT, Event::ClientTimeout { client: c, req });
    }

    fn random_op(&mut self, c: usize) -> (Vec<u8>, Op, Action) {
        let key = self.client_rng.pick(&self.keys).clone();
        let roll = self.client_rng.below(100);
        if roll < 40 || self.now < self.writes_paused_until {
            return (key.clone(), Op::Get, Action::Read(key));
        }
        if roll < 75 {
            let value = self.clients[c].next_value();
            let command = Cmd::Put {
                key: key.clone(),
                value: value.clone(),
            };
            return (key, Op::Put(value), Action::Write(command));
        }
        if roll < 80 {
            let command = Cmd::Delete { key: key.clone() };
            return (key, Op::Delete, Action::Write(command));
        }
        // CAS: usually from what this client last saw (may be stale), sometimes from
        // absent; usually to a new value, sometimes to absent.
        let expected = if self.client_rng.chance(200) {
            None
        } else {
            self.clients[c].seen.get(&key).cloned().flatten()
        };
        let new = if self.client_rng.chance(100) {
            None
        } else {
            Some(self.clients[c].next_value())
        };
        let command = Cmd::Cas {
            key: key.clone(),
            expected: expected.clone(),
            new: new.clone(),
        };
        (key, Op::Cas { expected, new }, Action::Write(command))
    }

    /// A client request reaches its node.
    pub fn on_request(&mut self, req: u64) {
        self.trace.u64(21).u64(req);
        let Some(request) = self.requests.get(&req) else {
            return;
        };
        let node = request.node;
        let range = range_id(request.range);
        let inbound = match &request.kind {
            ReqKind::Read(_) => Inbound::Read(range, req),
            ReqKind::Open(command) | ReqKind::Write(command) => {
                Inbound::Write(range, command.clone(), req)
            }
        };
        let Some(live) = self.nodes[node].live.as_mut() else {
            let delay = self.client_delay();
            self.after(
                delay,
                Event::Reply {
                    req,
                    reply: Reply::Refused,
                },
            );
            return;
        };
        live.open.insert(req);
        live.inbox.push_back(inbound);
        self.wake_soon(node);
    }

    /// `node` answers request `req`.
    pub fn answer(&mut self, node: usize, req: u64, reply: Reply) {
        if let Some(live) = self.nodes[node].live.as_mut() {
            live.open.remove(&req);
        }
        let delay = self.client_delay();
        self.after(delay, Event::Reply { req, reply });
    }

    /// A read may be served: the value comes from `node`'s state machine now (as
    /// the service reads RocksDB once the worker says the read may go ahead).
    pub fn answer_read(&mut self, node: usize, req: u64) {
        let Some(request) = self.requests.get(&req) else {
            // The client gave up already; nobody reads the answer.
            if let Some(live) = self.nodes[node].live.as_mut() {
                live.open.remove(&req);
            }
            return;
        };
        let ReqKind::Read(key) = &request.kind else {
            panic!("r{req} is not a read");
        };
        let range = request.range;
        let value = self.nodes[node].sm[range].kv.get(key).cloned();
        let applied = self.nodes[node].sm[range].applied;
        self.log(|| {
            format!(
                "n{} serves read r{req} at {} applied {applied}: {:?}",
                node + 1,
                range_id(range),
                value.as_deref().map(String::from_utf8_lossy)
            )
        });
        self.answer(node, req, Reply::Read(value));
    }

    pub fn on_reply(&mut self, req: u64, reply: Reply) {
        self.trace.u64(22).u64(req);
        let Some(request) = self.requests.get(&req) else {
            return;
        };
        let c = request.client;
        if self.clients[c].current != Some(req) {
            return;
        }
        let request = self.requests.remove(&req).expect("present");
        self.clients[c].current = None;
        let process = self.clients[c].process;
        self.log(|| format!("client {process} r{req} ← {reply:?}"));
        let range = request.range;
        let opening = matches!(request.kind, ReqKind::Open(_));
        match reply {
            Reply::Opened(opened_at) if opening => {
                self.clients[c].open_at[range] = Some(opened_at);
                self.summary.sessions_opened += 1;
                let delay = self.client_rng.range(0, MS);
                self.retry(c, delay);
            }
            Reply::Written | Reply::Cas(_) | Reply::Read(_) if !opening => self.complete(c, reply),
            Reply::Opened(_) | Reply::Written | Reply::Cas(_) | Reply::Read(_) => {
                panic!("client {process}: r{req} answered {reply:?}, not what it asked")
            }
            Reply::NotLeader(hint) => {
                let (guess, hinted) = match hint {
                    Some(leader) if leader as usize != request.node + 1 => {
                        (leader as usize - 1, true)
                    }
                    _ => (self.other_node(request.node), false),
                };
                self.clients[c].guess[range] = guess;
                self.clients[c].guess_hinted[range] = hinted;
                // A refusal naming a leader is retried at once, one naming none (an
                // election under way) after a pause.
                let delay = if hinted {
                    self.client_rng.range(MS, 10 * MS)
                } else {
                    self.client_rng.range(20 * MS, 100 * MS)
                };
                self.retry(c, delay);
            }
            Reply::Refused | Reply::Busy => {
                if reply == Reply::Refused {
                    self.clients[c].guess[range] = self.other_node(request.node);
                    self.clients[c].guess_hinted[range] = false;
                }
                let delay = self.client_rng.range(20 * MS, 100 * MS);
                self.retry(c, delay);
            }
            Reply::Lost => self.outcome_unknown(c, &request),
            Reply::SessionExpired => self.session_expired(c, range),
        }
    }

    /// The attempt's outcome is unknown: a write may have applied. Sent again (to
    /// another node) under the same sequence.
    fn outcome_unknown(&mut self, c: usize, request: &Request) {
        if matches!(request.kind, ReqKind::Write(_)) {
            let pending = self.clients[c].pending.as_mut().expect("pending");
            pending.maybe_applied = true;
            pending.resend_owed = true;
        }
        self.clients[c].guess[request.range] = self.other_node(request.node);
        self.clients[c].guess_hinted[request.range] = false;
        let delay = self.client_rng.range(20 * MS, 100 * MS);
        self.retry(c, delay);
    }

    /// The range refused the write: the session is not registered there (it expired)
    /// or the sequence is below its floor. A write certainly never applied gets a new
    /// sequence above the floor of a new opening; one that may have applied ends
    /// unknown: its earlier attempt applied once or not at all.
    fn session_expired(&mut self, c: usize, range: usize) {
        self.clients[c].open_at[range] = None;
        let pending = self.clients[c].pending.as_mut().expect("pending");
        if pending.maybe_applied {
            self.summary.expired_given_up += 1;
            let process = self.clients[c].process;
            self.log(|| format!("client {process}: session expired after an unknown outcome"));
            self.end_op(c);
            return;
        }
        pending.sequence = None;
        self.summary.expired_renumbered += 1;
        let delay = self.client_rng.range(0, MS);
        self.retry(c, delay);
    }

    /// The operation took effect (once) and returned `reply`.
    fn complete(&mut self, c: usize, reply: Reply) {
        let pending = self.clients[c].pending.take().expect("pending");
        let now = self.now;
        let key = pending.key;
        let result = match reply {
            Reply::Written => {
                let value = match &pending.action {
                    Action::Write(Cmd::Put { value, .. }) => Some(value.clone()),
                    _ => None,
                };
                self.clients[c].seen.insert(key, value);
                OpResult::Written
            }
            Reply::Cas(succeeded) => {
                if let (true, Action::Write(Cmd::Cas { new, .. })) = (succeeded, &pending.action) {
                    self.clients[c].seen.insert(key, new.clone());
                }
                OpResult::Cas { succeeded }
            }
            Reply::Read(value) => {
                self.clients[c].seen.insert(key, value.clone());
                OpResult::Read(value)
            }
            other => panic!("{other:?} does not complete an operation"),
        };
        let counts = !matches!(result, OpResult::Cas { .. });
        self.history.complete(pending.op, now, result);
        if counts && self.clients[c].script.pop_front().is_some() {
            self.final_ops.push(pending.op);
        }
        self.client_next(c);
    }

    /// Ends the pending operation without an answer: `unknown` if it may have
    /// applied, else `failed`.
    fn end_op(&mut self, c: usize) {
        let pending = self.clients[c].pending.take().expect("pending");
        if pending.maybe_applied {
            self.history.unknown(pending.op);
        } else {
            self.history.failed(pending.op);
        }
        self.client_next(c);
    }

    /// The next attempt of the pending operation after `delay`, unless a load client
    /// ran out of patience with it.
    fn retry(&mut self, c: usize, delay: u64) {
        let client = &self.clients[c];
        let started = client.pending.as_ref().expect("pending").started;
        if !client.is_final() && self.now + delay > started + PATIENCE {
            self.summary.given_up += 1;
            let process = client.process;
            self.log(|| format!("client {process} gives up"));
            self.end_op(c);
            return;
        }
        self.after(delay, Event::ClientGo(c));
    }

    pub fn client_timeout(&mut self, c: usize, req: u64) {
        self.trace.u64(23).u64(req);
        if self.clients[c].current != Some(req) {
            return;
        }
        let request = self.requests.remove(&req).expect("present");
        self.clients[c].current = None;
        let process = self.clients[c].process;
        self.log(|| format!("client {process} r{req} timed out"));
        self.outcome_unknown(c, &request);
    }

    fn other_node(&mut self, not: usize) -> usize {
        let n = self.nodes.len() as u64;
        (not + 1 + self.client_rng.below(n - 1) as usize) % n as usize
    }

    /// The operation ended: the next one after a think time.
    fn client_next(&mut self, c: usize) {
        if self.clients[c].is_final() && self.clients[c].script.is_empty() {
            self.log(|| "final writes and reads done".into());
            self.phase = Phase::Settle;
            self.after(3_000 * MS, Event::EndRun);
            return;
        }
        let think = self.client_rng.range(0, 150 * MS);
        self.after(think, Event::ClientGo(c));
        self.maybe_start_final();
    }

    /// The range (index) `key` belongs to.
    pub fn range_of(&self, key: &[u8]) -> usize {
        let at = self
            .keys
            .iter()
            .position(|k| k == key)
            .expect("clients use the world's keys");
        self.key_range[at]
    }

    /// Once the load has stopped and every operation ended, one more client writes a
    /// value in every range and reads it back: the system works again after healing.
    pub fn maybe_start_final(&mut self) {
        let busy = |c: &Client| c.current.is_some() || c.pending.is_some();
        if self.phase != Phase::Drain || self.clients.iter().any(busy) {
            return;
        }
        self.phase = Phase::Final;
        let mut client = Client::new(FINAL_PROCESS, &mut self.client_rng, 0, self.ranges);
        for r in 0..self.ranges {
            let at = self
                .key_range
                .iter()
                .position(|&range| range == r)
                .expect("every range has a key");
            let key = self.keys[at].clone();
            client.script.push_back(Scripted::Put(key.clone()));
            client.script.push_back(Scripted::Get(key));
        }
        self.clients.push(client);
        let c = self.clients.len() - 1;
        self.log(|| "final client starts".into());
        self.after(MS, Event::ClientGo(c));
    }
}

//! Client processes: each runs one operation at a time, routed to the range of its
//! key and sent to the store it believes leads that range (one guess per range), and
//! records it in the `History` with virtual call and return times.
//!
//! Every attempt is its own operation with its own unique value, so an attempt
//! recorded as `failed` that did take effect shows up as a value nobody wrote.
//! - `NotLeader` (the core's `Refusal::NotLeader`, refused before proposing, or
//!   `Refusal::Dropped`, the proposal's index taken by another entry) and a refused
//!   connection: `failed`, certainly no effect; the client retries elsewhere.
//! - The node crashed while holding the request, the core abandoned the write (its
//!   leader lost its quorum), or the client timed out: a write is `unknown` (it may
//!   still commit), a read `failed` (a read has no effect).

use std::collections::{BTreeMap, VecDeque};

use rangekv_check::{Op, OpId, OpResult};

use super::host::Cmd;
use super::store::Inbound;
use super::world::{range_id, Event, Phase, World, MS};

/// A client's patience: then a write's outcome is unknown.
const CLIENT_TIMEOUT: u64 = 3_000 * MS;
/// Processes at or above this number are the final check's, not the load's.
pub const FINAL_PROCESS: u64 = 100;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Written,
    Cas(bool),
    Read(Option<Vec<u8>>),
    /// The node does not lead (hint: the leader it knows), or the proposal was
    /// dropped: certainly not applied.
    NotLeader(Option<u64>),
    /// The node is down: the request never reached it.
    Refused,
    /// The node crashed while holding the request: outcome unknown.
    Lost,
}

pub enum ReqKind {
    Read(Vec<u8>),
    Write(Cmd),
}

pub struct Request {
    pub client: usize,
    pub op: OpId,
    pub node: usize,
    /// The range (index) of the key.
    pub range: usize,
    pub kind: ReqKind,
}

#[derive(Clone, Debug)]
pub enum Scripted {
    Put(Vec<u8>),
    Get(Vec<u8>),
}

pub struct Client {
    pub process: u64,
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
    pub fn new(process: u64, guess: usize, ranges: usize) -> Self {
        Client {
            process,
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
}

impl World {
    fn client_delay(&mut self) -> u64 {
        self.client_rng.range(MS / 10, 3 * MS)
    }

    /// The client starts its next operation.
    pub fn client_go(&mut self, c: usize) {
        self.trace.u64(20).u64(c as u64);
        if self.clients[c].current.is_some() {
            return;
        }
        let scripted = self.clients[c].script.front().cloned();
        if scripted.is_none() && !self.clients[c].active {
            return;
        }
        if scripted.is_none() && self.now < self.idle_until {
            // An idle window: nothing to do until it ends.
            let at = self.idle_until + self.client_rng.range(0, 150 * MS);
            self.schedule(at, Event::ClientGo(c));
            return;
        }

        let (key, op, kind) = match scripted {
            Some(Scripted::Put(key)) => {
                let value = self.clients[c].next_value();
                let command = Cmd::Put {
                    key: key.clone(),
                    value: value.clone(),
                };
                (key, Op::Put(value), ReqKind::Write(command))
            }
            Some(Scripted::Get(key)) => (key.clone(), Op::Get, ReqKind::Read(key)),
            None => self.random_op(c),
        };
        let range = self.range_of(&key);
        let mut node = self.clients[c].guess[range];
        // Now and then a client tries another node (a load balancer, a stale cache).
        if self.client_rng.chance(100) {
            node = self.client_rng.below(self.nodes.len() as u64) as usize;
        }
        if self.opts.buggy_reads && matches!(kind, ReqKind::Read(_)) {
            node = self.client_rng.below(self.nodes.len() as u64) as usize;
        }
        let process = self.clients[c].process;
        let op_id = self
            .history
            .invoke(process, key.clone(), op.clone(), self.now);
        let req = self.next_req;
        self.next_req += 1;
        self.log(|| {
            format!(
                "client {process} r{req} → n{} {}: {} {op:?}",
                node + 1,
                range_id(range),
                String::from_utf8_lossy(&key)
            )
        });
        self.requests.insert(
            req,
            Request {
                client: c,
                op: op_id,
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

    fn random_op(&mut self, c: usize) -> (Vec<u8>, Op, ReqKind) {
        let key = self.client_rng.pick(&self.keys).clone();
        let roll = self.client_rng.below(100);
        if roll < 40 || self.now < self.writes_paused_until {
            return (key.clone(), Op::Get, ReqKind::Read(key));
        }
        if roll < 75 {
            let value = self.clients[c].next_value();
            let command = Cmd::Put {
                key: key.clone(),
                value: value.clone(),
            };
            return (key, Op::Put(value), ReqKind::Write(command));
        }
        if roll < 80 {
            let command = Cmd::Delete { key: key.clone() };
            return (key, Op::Delete, ReqKind::Write(command));
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
        (key, Op::Cas { expected, new }, ReqKind::Write(command))
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
            ReqKind::Write(command) => Inbound::Write(range, command.clone(), req),
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
        let reply_text = format!("{reply:?}");
        self.log(|| format!("client {process} r{req} ← {reply_text}"));
        let now = self.now;
        let key = match &request.kind {
            ReqKind::Read(key) => key.clone(),
            ReqKind::Write(command) => command.key().to_vec(),
        };
        let range = request.range;
        let mut retry_soon = false;
        match reply {
            Reply::Written => {
                self.history.complete(request.op, now, OpResult::Written);
                let value = match &request.kind {
                    ReqKind::Write(Cmd::Put { value, .. }) => Some(value.clone()),
                    _ => None,
                };
                if self.clients[c].script.front().is_some() {
                    self.final_ops.push(request.op);
                }
                self.clients[c].seen.insert(key, value);
                self.clients[c].script.pop_front();
            }
            Reply::Cas(succeeded) => {
                self.history
                    .complete(request.op, now, OpResult::Cas { succeeded });
                if succeeded {
                    if let ReqKind::Write(Cmd::Cas { new, .. }) = &request.kind {
                        self.clients[c].seen.insert(key, new.clone());
                    }
                }
            }
            Reply::Read(value) => {
                self.history
                    .complete(request.op, now, OpResult::Read(value.clone()));
                if self.clients[c].script.front().is_some() {
                    self.final_ops.push(request.op);
                }
                self.clients[c].seen.insert(key, value);
                self.clients[c].script.pop_front();
            }
            Reply::NotLeader(hint) => {
                self.history.failed(request.op);
                let (guess, hinted) = match hint {
                    Some(leader) if leader as usize != request.node + 1 => {
                        (leader as usize - 1, true)
                    }
                    _ => (self.other_node(request.node), false),
                };
                self.clients[c].guess[range] = guess;
                self.clients[c].guess_hinted[range] = hinted;
                retry_soon = true;
            }
            Reply::Refused => {
                self.history.failed(request.op);
                self.clients[c].guess[range] = self.other_node(request.node);
                self.clients[c].guess_hinted[range] = false;
                retry_soon = true;
            }
            Reply::Lost => {
                if matches!(request.kind, ReqKind::Read(_)) {
                    self.history.failed(request.op);
                }
                self.clients[c].guess[range] = self.other_node(request.node);
            }
        }
        self.client_next(c, retry_soon.then_some(range));
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
        if matches!(request.kind, ReqKind::Read(_)) {
            self.history.failed(request.op);
        }
        self.clients[c].guess[request.range] = self.other_node(request.node);
        self.client_next(c, None);
    }

    fn other_node(&mut self, not: usize) -> usize {
        let n = self.nodes.len() as u64;
        (not + 1 + self.client_rng.below(n - 1) as usize) % n as usize
    }

    /// `retry_soon`: the range of a refused request, retried shortly.
    fn client_next(&mut self, c: usize, retry_soon: Option<usize>) {
        if self.clients[c].process >= FINAL_PROCESS && self.clients[c].script.is_empty() {
            self.log(|| "final writes and reads done".into());
            self.phase = Phase::Settle;
            self.after(3_000 * MS, Event::EndRun);
            return;
        }
        let think = if let Some(range) = retry_soon {
            // A refusal naming a leader is retried at once, one naming none (an
            // election under way) after a pause.
            let hinted = self.clients[c].guess_hinted[range];
            if hinted {
                self.client_rng.range(MS, 10 * MS)
            } else {
                self.client_rng.range(20 * MS, 100 * MS)
            }
        } else {
            self.client_rng.range(0, 150 * MS)
        };
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
        if self.phase != Phase::Drain || self.clients.iter().any(|c| c.current.is_some()) {
            return;
        }
        self.phase = Phase::Final;
        let mut client = Client::new(FINAL_PROCESS, 0, self.ranges);
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

//! The fault schedule, drawn from the seed as the run goes: partitions (one node
//! isolated, a majority/minority split, a one-way cut), crashes and restarts, leader
//! transfers, lossy and slow network windows, idle windows (no client traffic: the
//! ranges quiesce) and crashes of a quiesced range's leader.

use raft::StateRole;
use rangekv_raftstore::{MemberChange, Role};
use rangekv_types::PeerId;

use super::world::{range_id, Event, Heal, Phase, World, MS, TICK};

impl World {
    /// The leader of range `r` in the highest term, if several think they lead.
    fn leader(&self, r: usize) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let status = n.live.as_ref()?.status(r);
                (status.role == StateRole::Leader).then_some((status.term, i))
            })
            .max()
            .map(|(_, i)| i)
    }

    /// A range to hit.
    fn pick_range(&mut self) -> usize {
        self.fault_rng.below(self.ranges as u64) as usize
    }

    /// A node to hit: some range's leader half of the time, else any.
    fn victim(&mut self) -> usize {
        let r = self.pick_range();
        match self.leader(r) {
            Some(leader) if self.fault_rng.chance(500) => leader,
            _ => self.fault_rng.below(self.nodes.len() as u64) as usize,
        }
    }

    pub fn count(&mut self, what: &'static str) {
        *self.summary.faults.entry(what).or_insert(0) += 1;
        self.trace.u64(30).u64(what.len() as u64);
    }

    pub fn fault(&mut self) {
        if self.phase != Phase::Chaos {
            return;
        }
        let next = self.fault_rng.range(300 * MS, 2_500 * MS);
        self.after(next, Event::Fault);
        let n = self.nodes.len();
        let roll = self.fault_rng.below(108);
        let duration = self.fault_rng.range(300 * MS, 4_000 * MS);
        if roll < 17 {
            if !self.active_faults.insert("partition") {
                return;
            }
            let victim = self.victim();
            self.isolate(victim, duration);
        } else if roll < 25 {
            if !self.active_faults.insert("partition") {
                return;
            }
            // A minority (with the leader half of the time) cut from a majority.
            let minority = (n - 1) / 2;
            let mut nodes: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = self.fault_rng.below(i as u64 + 1) as usize;
                nodes.swap(i, j);
            }
            let r = self.pick_range();
            if let Some(leader) = self.leader(r) {
                if self.fault_rng.chance(500) {
                    let at = nodes.iter().position(|&x| x == leader).expect("present");
                    nodes.swap(0, at);
                }
            }
            for (rank, &node) in nodes.iter().enumerate() {
                self.net.group[node] = u8::from(rank < minority);
            }
            let cut: Vec<usize> = nodes[..minority].iter().map(|x| x + 1).collect();
            self.count("split");
            self.log(|| format!("FAULT split: minority {cut:?} for {}ms", duration / MS));
            self.after(duration, Event::Heal(Heal::Partition));
        } else if roll < 43 {
            let down = self.nodes.iter().filter(|n| n.live.is_none()).count();
            if down > n / 2 {
                return;
            }
            let victim = self.victim();
            if self.nodes[victim].live.is_none() {
                return;
            }
            let downtime = if self.fault_rng.chance(300) {
                self.fault_rng.range(0, 200 * MS)
            } else {
                self.fault_rng.range(200 * MS, 3_000 * MS)
            };
            self.count("crash");
            self.log(|| format!("FAULT crash n{} for {}ms", victim + 1, downtime / MS));
            self.crash(victim);
            self.after(downtime, Event::Restart(victim));
        } else if roll < 55 {
            let r = self.pick_range();
            let Some(leader) = self.leader(r) else {
                return;
            };
            let mut to = self.fault_rng.below(n as u64 - 1) as usize;
            if to >= leader {
                to += 1;
            }
            // Sometimes the old leader is cut off right after: it must not serve
            // reads from a lease the transfer made void.
            let isolate = self.fault_rng.chance(300) && !self.active_faults.contains("partition");
            self.count("transfer");
            self.log(|| {
                format!(
                    "FAULT transfer {} leadership n{} → n{}{}",
                    range_id(r),
                    leader + 1,
                    to + 1,
                    if isolate {
                        ", then isolate the old leader"
                    } else {
                        ""
                    }
                )
            });
            self.drive(leader, |driver, host| {
                driver.transfer_leader(range_id(r), to as u64 + 1, host)
            });
            self.wake_at(leader, self.now);
            if isolate {
                // Once the TimeoutNow is on its way.
                self.active_faults.insert("partition");
                let delay = self.fault_rng.range(MS, 30 * MS);
                self.after(
                    delay,
                    Event::Isolate {
                        node: leader,
                        duration,
                    },
                );
            }
        } else if roll < 63 {
            if !self.active_faults.insert("lossy") {
                return;
            }
            self.net.drop_per_mille = self.fault_rng.range(100, 400);
            self.net.dup_per_mille = self.fault_rng.range(20, 100);
            let (drop, dup) = (self.net.drop_per_mille, self.net.dup_per_mille);
            self.count("lossy");
            self.log(|| {
                format!(
                    "FAULT lossy network: drop {drop}‰ dup {dup}‰ for {}ms",
                    duration / MS
                )
            });
            self.after(duration, Event::Heal(Heal::Lossy));
        } else if roll < 71 {
            if !self.active_faults.insert("slow") {
                return;
            }
            self.net.slow = true;
            self.count("slow");
            self.log(|| {
                format!(
                    "FAULT slow network (1–300 ms per message) for {}ms",
                    duration / MS
                )
            });
            self.after(duration, Event::Heal(Heal::Slow));
        } else if roll < 81 {
            // A link cut both ways: connectivity stops being transitive.
            let a = self.victim();
            let b = self.other(a);
            if !self.cut(a, b) {
                return;
            }
            self.count("cut");
            self.log(|| {
                format!(
                    "FAULT cut link n{} ↔ n{} for {}ms",
                    a + 1,
                    b + 1,
                    duration / MS
                )
            });
            self.after(duration, Event::Heal(Heal::Cut(a, b)));
        } else if roll < 93 {
            // Writes pause first, so that the follower cut off stays up to date (reads go
            // on, renewing the leader's lease through ReadIndex).
            if self.nodes.len() != 3 || !self.net.oneway.is_empty() {
                return;
            }
            let settle = self.fault_rng.range(100 * MS, 300 * MS);
            self.writes_paused_until = self.now + settle;
            self.log(|| format!("FAULT writes pause for {}ms", settle / MS));
            self.after(settle, Event::LeaseSteal { duration });
        } else if roll < 100 {
            let from = self.fault_rng.below(n as u64) as usize;
            let mut to = self.fault_rng.below(n as u64 - 1) as usize;
            if to >= from {
                to += 1;
            }
            if !self.net.oneway.insert((from, to)) {
                return;
            }
            self.count("one-way");
            self.log(|| {
                format!(
                    "FAULT one-way cut n{} → n{} for {}ms",
                    from + 1,
                    to + 1,
                    duration / MS
                )
            });
            self.after(duration, Event::Heal(Heal::OneWay(from, to)));
        } else {
            // An idle window: no client traffic, so the ranges quiesce; half the time
            // the leader of a quiesced range then crashes, and its followers must
            // notice the silence of its store.
            if self.now < self.idle_until {
                return;
            }
            let length = self.fault_rng.range(1_500 * MS, 5_000 * MS);
            self.idle_until = self.now + length;
            self.count("idle");
            self.log(|| format!("FAULT clients idle for {}ms", length / MS));
            if self.fault_rng.chance(500) {
                let quiet = u64::from(self.core.quiesce_after_ticks) * TICK;
                let at = self.fault_rng.range(quiet + 500 * MS, quiet + 1_500 * MS);
                let downtime = self.fault_rng.range(1_500 * MS, 3_500 * MS);
                self.after(at, Event::CrashQuiescedLeader { downtime });
            }
        }
    }

    /// Crashes the store leading a quiesced range, for `downtime`.
    pub fn crash_quiesced_leader(&mut self, downtime: u64) {
        if self.phase != Phase::Chaos {
            return;
        }
        let n = self.nodes.len();
        let down = self.nodes.iter().filter(|n| n.live.is_none()).count();
        if down + 1 > (n - 1) / 2 {
            return;
        }
        let quiesced = (0..self.ranges).find_map(|r| {
            let leader = self.leader(r)?;
            self.live(leader).status(r).quiesced.then_some((r, leader))
        });
        let Some((r, leader)) = quiesced else {
            return;
        };
        self.count("quiesced-leader-crash");
        self.log(|| {
            format!(
                "FAULT crash n{}, leader of quiesced {}, for {}ms",
                leader + 1,
                range_id(r),
                downtime / MS
            )
        });
        self.crash(leader);
        self.after(downtime, Event::Restart(leader));
    }

    /// Any node but `not`.
    fn other(&mut self, not: usize) -> usize {
        let n = self.nodes.len() as u64;
        (not + 1 + self.fault_rng.below(n - 1) as usize) % n as usize
    }

    /// Cuts the link between `a` and `b` both ways (false if either way already is).
    fn cut(&mut self, a: usize, b: usize) -> bool {
        if self.net.oneway.contains(&(a, b)) || self.net.oneway.contains(&(b, a)) {
            return false;
        }
        self.net.oneway.insert((a, b));
        self.net.oneway.insert((b, a));
        true
    }

    /// Targets the reopened-replica rule (`Peer::refuses_vote` in the core): the
    /// leader L is cut from follower A; just before A's election timer fires, the
    /// other follower B (whose acknowledgements keep L's lease) crashes and restarts
    /// at once, and L is cut from B too. B forgot it heard from L: were it to grant
    /// A's vote, A would lead while L still serves reads from its lease.
    pub fn lease_steal(&mut self, duration: u64) {
        if self.phase != Phase::Chaos {
            return;
        }
        let r = self.pick_range();
        let Some(leader) = self.leader(r) else {
            return;
        };
        if self.nodes.len() != 3 || !self.net.oneway.is_empty() {
            return;
        }
        let a = self.other(leader);
        let b = (0..3)
            .find(|&x| x != leader && x != a)
            .expect("three nodes");
        if self.nodes[a].live.is_none() || self.nodes[b].live.is_none() {
            return;
        }
        // Only when both followers hold the leader's whole log (else B would refuse A
        // for being behind, whatever it remembers), and A's range is awake (a quiesced
        // follower does not count down to an election).
        let status = |w: &World, i: usize| w.live(i).status(r);
        let leader_last = status(self, leader).last_index;
        if status(self, a).last_index != leader_last
            || status(self, b).last_index != leader_last
            || status(self, a).quiesced
        {
            return;
        }
        let live = self.live(a);
        let (elapsed, timeout) = live
            .driver()
            .peer(range_id(r))
            .expect("hosted")
            .election_timer();
        let ticks_left = timeout.saturating_sub(elapsed + 1) as u64;
        let fires_at = live.next_tick_at + ticks_left * TICK;
        let lead = self.fault_rng.range(MS, 40 * MS);
        let at = fires_at.saturating_sub(lead).max(self.now);
        let downtime = self.fault_rng.range(0, 10 * MS);
        self.cut(leader, a);
        // Writes come back just after the election.
        self.writes_paused_until = fires_at + self.fault_rng.range(5 * MS, 50 * MS);
        self.count("lease-steal");
        self.log(|| {
            format!(
                "FAULT {} lease steal: cut n{} ↔ n{}; at {:.1}ms (n{} campaigns at {:.1}ms) crash n{} for {}ms and cut it from n{}",
                range_id(r),
                leader + 1,
                a + 1,
                at as f64 / 1e6,
                a + 1,
                fires_at as f64 / 1e6,
                b + 1,
                downtime / MS,
                leader + 1
            )
        });
        let until = at.max(self.now + duration);
        self.schedule(until, Event::Heal(Heal::Cut(leader, a)));
        self.schedule(
            at,
            Event::Bounce {
                node: b,
                downtime,
                cut_from: Some(leader),
                until,
            },
        );
    }

    /// Crashes `node` now and restarts it after `downtime`.
    pub fn bounce(&mut self, node: usize, downtime: u64, cut_from: Option<usize>, until: u64) {
        if self.phase != Phase::Chaos || self.nodes[node].live.is_none() {
            return;
        }
        if let Some(other) = cut_from {
            if self.cut(node, other) {
                self.schedule(until.max(self.now), Event::Heal(Heal::Cut(node, other)));
            }
        }
        self.log(|| format!("FAULT crash n{} for {}ms", node + 1, downtime / MS));
        self.crash(node);
        self.after(downtime, Event::Restart(node));
    }

    pub fn isolate(&mut self, node: usize, duration: u64) {
        if self.phase != Phase::Chaos {
            return;
        }
        for (i, group) in self.net.group.iter_mut().enumerate() {
            *group = u8::from(i == node);
        }
        self.count("isolate");
        self.log(|| format!("FAULT isolate n{} for {}ms", node + 1, duration / MS));
        self.after(duration, Event::Heal(Heal::Partition));
    }

    pub fn heal(&mut self, what: Heal) {
        self.trace.u64(31);
        if self.phase != Phase::Chaos {
            return;
        }
        self.log(|| format!("HEAL {what:?}"));
        match what {
            Heal::Partition => {
                self.net.group.iter_mut().for_each(|g| *g = 0);
                self.active_faults.remove("partition");
            }
            Heal::OneWay(from, to) => {
                self.net.oneway.remove(&(from, to));
            }
            Heal::Cut(a, b) => {
                self.net.oneway.remove(&(a, b));
                self.net.oneway.remove(&(b, a));
            }
            Heal::Lossy => {
                self.net.drop_per_mille = 10;
                self.net.dup_per_mille = 10;
                self.active_faults.remove("lossy");
            }
            Heal::Slow => {
                self.net.slow = false;
                self.active_faults.remove("slow");
            }
        }
    }
}

impl World {
    /// The membership operator, as PD will be: every 0.5–3 s of the chaos phase, it
    /// reads a range's membership at its leader and proposes one step against that
    /// `conf_ver` — demote a voter (keeping at least 2 voters of 3, 3 of 5), promote a
    /// learner, or both in one joint change — never demoting the leader. Refusals
    /// (a change under way, a stale `conf_ver`) are counted; the next step reads
    /// again.
    pub fn membership_change(&mut self) {
        if self.phase != Phase::Chaos {
            return;
        }
        let next = self.member_rng.range(500 * MS, 3_000 * MS);
        self.after(next, Event::Membership);
        let r = self.member_rng.below(self.ranges as u64) as usize;
        let Some(leader) = self.leader(r) else {
            return;
        };
        let Some(peer) = self.live(leader).driver().peer(range_id(r)) else {
            return;
        };
        let membership = peer.membership().clone();
        let local = PeerId(self.nodes[leader].id);
        let voters: Vec<PeerId> = membership
            .members
            .iter()
            .filter(|m| m.role == Role::Voter && m.peer != local)
            .map(|m| m.peer)
            .collect();
        let learners: Vec<PeerId> = membership
            .members
            .iter()
            .filter(|m| m.role == Role::Learner)
            .map(|m| m.peer)
            .collect();
        let min_voters = if self.nodes.len() >= 5 { 3 } else { 2 };
        let all_voters = membership
            .members
            .iter()
            .filter(|m| m.role == Role::Voter)
            .count();
        let may_demote = all_voters > min_voters && !voters.is_empty();
        let mut changes = Vec::new();
        match self.member_rng.below(3) {
            0 if may_demote => {
                changes.push(MemberChange::Demote(*self.member_rng.pick(&voters)));
            }
            1 if !learners.is_empty() => {
                changes.push(MemberChange::Promote(*self.member_rng.pick(&learners)));
            }
            _ if !learners.is_empty() && !voters.is_empty() => {
                changes.push(MemberChange::Promote(*self.member_rng.pick(&learners)));
                changes.push(MemberChange::Demote(*self.member_rng.pick(&voters)));
            }
            _ if may_demote => {
                changes.push(MemberChange::Demote(*self.member_rng.pick(&voters)));
            }
            _ => return,
        }
        let range = range_id(r);
        let conf_ver = membership.conf_ver;
        let now = self.instant();
        let Some(result) = self.drive(leader, |driver, host| {
            driver.propose_conf_change(range, conf_ver, &changes, now, host)
        }) else {
            return;
        };
        self.wake_at(leader, self.now);
        match result {
            Ok(()) => {
                self.summary.membership_proposed += 1;
                self.log(|| {
                    format!(
                        "MEMBERSHIP {range} at n{}: {changes:?} against conf_ver {conf_ver}",
                        leader + 1
                    )
                });
            }
            Err(refusal) => {
                self.summary.membership_refused += 1;
                self.log(|| format!("MEMBERSHIP {range} at n{} refused: {refusal}", leader + 1));
            }
        }
        self.trace.u64(31).u64(r as u64).u64(changes.len() as u64);
    }
}

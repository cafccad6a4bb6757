//! Real processes under faults. PD and three nodes run as child processes of this
//! test, each in its own network namespace on one bridge (the clients stay in the
//! test's own namespace, on the bridge too). Two workloads run while a seeded nemesis
//! injects one fault at a time:
//!
//! - **register**: get / put / CAS on 16 keys over 4 ranges, recorded as a history and
//!   checked for linearizability;
//! - **set**: unique inserts; afterwards a scan must find every acknowledged insert
//!   and nothing that was never attempted.
//!
//! Faults: kill -9 and restart; SIGSTOP / SIGCONT of a range leader for longer than
//! the lease; a partition of one node from the other nodes and PD; the isolation of a
//! range leader; a ring where one link is cut (each node still sees a majority); and a
//! failpoint that makes a node's raft-log fsync fail, after which that node must stop
//! by itself (exit status 1) while the cluster keeps serving; and a range's leadership
//! handed to another of its stores through `rangekv ctl transfer-leader` (the outcome
//! is in the report's `exit` of that fault). The nodes keep short raft logs
//! (`log_gc_lag_entries = 200`), so a node back from a crash, a pause or a partition
//! often catches up by snapshot (the report counts `snapshots_installed`).
//!
//! Each kind of fault comes once, in a seeded order, before any repeats. The report
//! (printed and written as JSON) gives ok / failed / unknown operations, acknowledged
//! writes lost, values never written, the linearizability verdict, and for each fault
//! window the operations per second per range and the time from heal to the first
//! successful operation per range.
//!
//! `NEMESIS_SECS` (default 40; every kind of fault runs however short) lengthens the
//! run, `SEED` replays a schedule, `NEMESIS_REPORT` names the JSON file (default: in
//! the test's temporary directory).
//! Needs root: `ip netns`, veth, a bridge and iptables (`make deps` installs
//! iproute2 and iptables).

#![allow(clippy::unwrap_used)] // test code: a surprise should fail the test loudly

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rangekv_check::{Budget, History, Op, OpResult, Outcome, Verdict};
use rangekv_client::{Client, Config, Error};
use rangekv_rpc::proto::placement_client::PlacementClient;
use rangekv_rpc::proto::{ListStoresRequest, ScanRangesRequest};

const RANGES: usize = 4;
const KEYS_PER_RANGE: usize = 4;
const KEYS: usize = RANGES * KEYS_PER_RANGE;
/// Clients move to a fresh set of keys every this many seconds. Each key is its own
/// register, so the checker handles each key's (short) history alone; one key per
/// 30 minutes made a history the search could not finish in its budget.
const KEY_EPOCH_SECS: u64 = 30;
const CLIENTS: u64 = 5;
const PD_PORT: u16 = 2379;
const NODE_PORT: u16 = 20160;
/// Host 0 of the network is PD; nodes are hosts 1..=3.
const PD_HOST: usize = 0;
const NODES: usize = 3;
/// How long a stopped node may take to exit by itself once its fsync fails.
const FSYNC_FAILURE_EXIT_SECS: u64 = 30;

/// splitmix64: the nemesis schedule from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs a command to set up or change the network; panics with its output on failure.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e} (make deps installs it)"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One network namespace per host, all on one bridge in the test's namespace, which
/// has an address on it too (the clients). Partitions are iptables rules inside the
/// namespaces of the hosts they cut; healing flushes them.
struct Net {
    tag: String,
    prefix: String,
    hosts: usize,
}

impl Net {
    fn create(hosts: usize) -> Net {
        let pid = std::process::id();
        let net = Net {
            tag: format!("rkv{}", pid % 1_000_000),
            prefix: format!("10.{}.{}", 100 + pid % 100, (pid / 100) % 250),
            hosts,
        };
        let bridge = net.bridge();
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}.254/24", net.prefix),
                "dev",
                &bridge,
            ],
        );
        run("ip", &["link", "set", &bridge, "up"]);
        for host in 0..hosts {
            let ns = net.namespace(host);
            let veth = format!("{}v{host}", net.tag);
            run("ip", &["netns", "add", &ns]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            run("ip", &["link", "set", &veth, "master", &bridge]);
            run("ip", &["link", "set", &veth, "up"]);
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/24", net.ip(host)),
                    "dev",
                    "eth0",
                ],
            );
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    fn bridge(&self) -> String {
        format!("{}b", self.tag)
    }

    fn namespace(&self, host: usize) -> String {
        format!("{}n{host}", self.tag)
    }

    fn ip(&self, host: usize) -> String {
        format!("{}.{}", self.prefix, host + 1)
    }

    fn host_of_ip(&self, ip: &str) -> Option<usize> {
        (0..self.hosts).find(|&h| self.ip(h) == ip)
    }

    /// A command that runs `program` inside `host`'s namespace.
    fn command(&self, host: usize, program: &str) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(host)])
            .arg(program);
        command
    }

    fn iptables(&self, host: usize, args: &[&str]) {
        let ns = self.namespace(host);
        let mut all = vec!["netns", "exec", ns.as_str(), "iptables"];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Drops every packet between hosts `a` and `b`, both ways.
    fn cut(&self, a: usize, b: usize) {
        for (here, there) in [(a, b), (b, a)] {
            let there = self.ip(there);
            self.iptables(here, &["-A", "INPUT", "-s", &there, "-j", "DROP"]);
            self.iptables(here, &["-A", "OUTPUT", "-d", &there, "-j", "DROP"]);
        }
    }

    fn heal(&self) {
        for host in 0..self.hosts {
            self.iptables(host, &["-F", "INPUT"]);
            self.iptables(host, &["-F", "OUTPUT"]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in 0..self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.namespace(host)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .status();
    }
}

/// A child process in its namespace that we can kill and start again with the same
/// arguments (and, for one start, extra environment).
struct Proc {
    net: Arc<Net>,
    host: usize,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(net: &Arc<Net>, host: usize, name: &str, args: Vec<String>, dir: &Path) -> Proc {
        let mut proc = Proc {
            net: net.clone(),
            host,
            args,
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        proc.spawn(&[]);
        proc
    }

    fn spawn(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // `ip netns exec` execs the program, so the child's pid is the program's.
        let child = self
            .net
            .command(self.host, env!("CARGO_BIN_EXE_rangekv"))
            .args(&self.args)
            .envs(env.iter().copied())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `within` for the process to exit by itself.
    async fn exit_status(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.child.as_mut()?.try_wait().unwrap();
            if let Some(status) = status {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill9();
    }
}

/// Snapshots the nodes installed (followers left behind by log compaction while
/// they were down or cut off), counted in their logs.
fn snapshots_installed(dir: &Path) -> usize {
    (1..=NODES)
        .map(|host| {
            std::fs::read_to_string(dir.join(format!("node{host}.log")))
                .map_or(0, |log| log.matches("snapshot installed").count())
        })
        .sum()
}

/// The kinds of fault, in the order the report names them.
const KINDS: [&str; 7] = [
    "kill -9, restart",
    "SIGSTOP a range leader, SIGCONT",
    "partition one node",
    "isolate a range leader",
    "ring: one link cut",
    "fsync fails on one node",
    "transfer a range's leadership",
];

/// A range with a known leader and another of its stores, chosen by `rng`:
/// (range id, leader's host, the other store's id, its host).
async fn transfer_target(
    net: &Net,
    pd_url: &str,
    rng: &mut Rng,
) -> Option<(u64, usize, u64, usize)> {
    let (host_of_store, routes) = cluster_view(net, pd_url).await?;
    let led: Vec<_> = routes.iter().filter(|r| r.leader.is_some()).collect();
    if led.is_empty() {
        return None;
    }
    let route = led[rng.below(led.len() as u64) as usize];
    let leader = route.leader.as_ref()?.store_id;
    let range = route.range.as_ref()?;
    let others: Vec<u64> = range
        .replicas
        .iter()
        .map(|p| p.store_id)
        .filter(|&s| s != leader)
        .collect();
    if others.is_empty() {
        return None;
    }
    let to = others[rng.below(others.len() as u64) as usize];
    Some((
        range.range_id,
        *host_of_store.get(&leader)?,
        to,
        *host_of_store.get(&to)?,
    ))
}

/// What the nemesis did, for the report.
#[derive(Debug, Clone, serde::Serialize)]
struct Fault {
    kind: &'static str,
    nodes: Vec<usize>,
    /// Milliseconds since the start of the workload: the fault's start and its heal.
    from_ms: u64,
    to_ms: u64,
    /// Register operations that succeeded during the fault, per second, per range.
    ok_per_sec_by_range: Vec<f64>,
    /// From the heal to the first successful register operation on each range.
    heal_to_first_ok_ms_by_range: Vec<Option<u64>>,
    /// For the fsync failure: how the node ended.
    exit: Option<String>,
}

fn nanos(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// Key `i` of the register workload in `epoch`; it lies in range `i / KEYS_PER_RANGE`.
fn key(epoch: u64, i: usize) -> Vec<u8> {
    format!("r{}-k{i:02}-e{epoch}", i / KEYS_PER_RANGE).into_bytes()
}

/// The range (0..RANGES) a workload key lies in: its first two bytes are "r<digit>".
fn range_of(key: &[u8]) -> usize {
    usize::from(key[1] - b'0')
}

fn set_key(n: u64) -> Vec<u8> {
    format!("r{}-set-{n:08}", n % RANGES as u64).into_bytes()
}

fn epoch(start: Instant) -> u64 {
    start.elapsed().as_secs() / KEY_EPOCH_SECS
}

/// Which node (1..=NODES) leads each range, as PD last heard; ranges without a
/// reported leader are left out.
async fn leaders(net: &Net, pd_url: &str) -> Vec<usize> {
    let Some((host_of_store, routes)) = cluster_view(net, pd_url).await else {
        return Vec::new();
    };
    routes
        .iter()
        .filter_map(|r| host_of_store.get(&r.leader.as_ref()?.store_id).copied())
        .collect()
}

/// PD's view: the node (host) of each store id, and every range's route.
async fn cluster_view(
    net: &Net,
    pd_url: &str,
) -> Option<(HashMap<u64, usize>, Vec<rangekv_rpc::proto::RangeRoute>)> {
    let mut pd = PlacementClient::connect(pd_url.to_string()).await.ok()?;
    let stores = pd.list_stores(ListStoresRequest {}).await.ok()?;
    let host_of_store = stores
        .into_inner()
        .stores
        .iter()
        .filter_map(|s| {
            let ip = s.address.rsplit_once(':')?.0;
            Some((s.store_id, net.host_of_ip(ip)?))
        })
        .collect();
    let routes = pd
        .scan_ranges(ScanRangesRequest::default())
        .await
        .ok()?
        .into_inner()
        .routes;
    Some((host_of_store, routes))
}

/// A leader node to act on (any node if PD knows of none yet).
async fn some_leader(net: &Net, pd_url: &str, rng: &mut Rng) -> usize {
    let known = leaders(net, pd_url).await;
    if known.is_empty() {
        1 + rng.below(NODES as u64) as usize
    } else {
        known[rng.below(known.len() as u64) as usize]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_and_set_workloads_under_process_and_network_faults() {
    let seconds: u64 = std::env::var("NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("nemesis: seed {seed}, {seconds} s (replay: SEED={seed} cargo test --test nemesis)");
    let dir = tempfile::tempdir().unwrap();
    let net = Arc::new(Net::create(1 + NODES));
    let pd_url = format!("http://{}:{PD_PORT}", net.ip(PD_HOST));
    let split_keys: Vec<String> = (1..RANGES).map(|r| format!("r{r}")).collect();
    let _pd = Proc::start(
        &net,
        PD_HOST,
        "pd",
        [
            "pd",
            "--data-dir",
            dir.path().join("pd").to_str().unwrap(),
            "--listen",
            &format!("0.0.0.0:{PD_PORT}"),
            "--split-keys",
            &split_keys.join(","),
        ]
        .map(String::from)
        .to_vec(),
        dir.path(),
    );
    // Small log segments: the stores rotate, compact, delete and reuse segments all
    // through the run, so kill -9 lands in every phase of that too.
    let node_config = dir.path().join("node.toml");
    // Short logs: a node that was down or cut off catches up by snapshot.
    std::fs::write(
        &node_config,
        "log_gc_entries = 50\nlog_gc_lag_entries = 200\n[log]\nsegment_bytes = 1048576\n",
    )
    .unwrap();
    let mut nodes: Vec<Proc> = (1..=NODES)
        .map(|host| {
            Proc::start(
                &net,
                host,
                &format!("node{host}"),
                [
                    "node",
                    "--data-dir",
                    dir.path().join(format!("node{host}")).to_str().unwrap(),
                    "--listen",
                    &format!("{}:{NODE_PORT}", net.ip(host)),
                    "--pd",
                    &pd_url,
                    "--workers",
                    "1",
                    "--config",
                    node_config.to_str().unwrap(),
                ]
                .map(String::from)
                .to_vec(),
                dir.path(),
            )
        })
        .collect();

    // The cluster is up once every key can be written.
    let ready_by = Instant::now() + Duration::from_secs(60);
    let client_config = Config::default();
    let client = loop {
        // The default client, as users run it: a write whose outcome is unknown is
        // sent again under its session's sequence number and applies at most once.
        match Client::connect(&[pd_url.as_str()], client_config.clone()).await {
            Ok(client) => break client,
            Err(error) if Instant::now() < ready_by => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("the cluster did not come up: {error}"),
        }
    };
    for i in 0..KEYS {
        client.put(&key(0, i), b"initial").await.unwrap();
    }

    let start = Instant::now();
    let history = Arc::new(Mutex::new(History::new()));
    {
        // The initial values are part of the history (written before any client).
        let mut h = history.lock().unwrap();
        for i in 0..KEYS {
            let id = h.invoke(0, key(0, i), Op::Put(b"initial".to_vec()), 0);
            h.complete(id, 0, OpResult::Written);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ok_ops = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for process in 1..=CLIENTS {
        let (client, history, stop, ok_ops) = (
            client.clone(),
            history.clone(),
            stop.clone(),
            ok_ops.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ process.wrapping_mul(0xA24B_AED4_963E_E407));
            let mut written = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let k = key(epoch(start), rng.below(KEYS as u64) as usize);
                let choice = rng.below(10);
                let at = nanos(start);
                if choice < 4 {
                    let id = history
                        .lock()
                        .unwrap()
                        .invoke(process, k.clone(), Op::Get, at);
                    let result = client.get(&k).await;
                    let done = nanos(start);
                    let mut h = history.lock().unwrap();
                    match result {
                        Ok(value) => {
                            h.complete(id, done, OpResult::Read(value));
                            ok_ops.fetch_add(1, Ordering::Relaxed);
                        }
                        // A read changes nothing: a failed one is left out.
                        Err(_) => h.failed(id),
                    }
                } else if choice < 8 {
                    written += 1;
                    let value = format!("c{process}-{written}").into_bytes();
                    let id = history.lock().unwrap().invoke(
                        process,
                        k.clone(),
                        Op::Put(value.clone()),
                        at,
                    );
                    let result = client.put(&k, &value).await;
                    let done = nanos(start);
                    let mut h = history.lock().unwrap();
                    match result {
                        Ok(()) => {
                            h.complete(id, done, OpResult::Written);
                            ok_ops.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Error::InvalidArgument(message)) => panic!("{message}"),
                        // Anything else may have applied.
                        Err(_) => h.unknown(id),
                    }
                } else {
                    // CAS from the value this client last read or wrote is too rare
                    // to succeed often; CAS from a fresh read instead.
                    let expected = match client.get(&k).await {
                        Ok(value) => value,
                        Err(_) => continue,
                    };
                    written += 1;
                    let new = format!("c{process}-{written}").into_bytes();
                    let at = nanos(start);
                    let id = history.lock().unwrap().invoke(
                        process,
                        k.clone(),
                        Op::Cas {
                            expected: expected.clone(),
                            new: Some(new.clone()),
                        },
                        at,
                    );
                    let result = client
                        .compare_and_swap(&k, expected.as_deref(), Some(&new))
                        .await;
                    let done = nanos(start);
                    let mut h = history.lock().unwrap();
                    match result {
                        Ok(outcome) => {
                            h.complete(
                                id,
                                done,
                                OpResult::Cas {
                                    succeeded: outcome.succeeded,
                                },
                            );
                            ok_ops.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Error::InvalidArgument(message)) => panic!("{message}"),
                        Err(_) => h.unknown(id),
                    }
                }
            }
        }));
    }
    // The set workload: unique inserts, each acknowledged or of unknown outcome.
    let set_writer = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut unknown) = (BTreeSet::new(), BTreeSet::new());
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let k = set_key(n);
                match client.put(&k, &k).await {
                    Ok(()) => acked.insert(k),
                    Err(Error::InvalidArgument(message)) => panic!("{message}"),
                    Err(_) => unknown.insert(k),
                };
            }
            (acked, unknown)
        })
    };

    // The nemesis: one fault at a time, then a quiet spell. Every kind once, in a
    // seeded order, then at random.
    let mut rng = Rng(seed);
    let mut schedule: Vec<usize> = (0..KINDS.len()).collect();
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut faults = Vec::new();
    let end = start + Duration::from_secs(seconds);
    let mut round = 0;
    // Every kind runs at least once, however short the run.
    while round < KINDS.len() || Instant::now() + Duration::from_secs(4) < end {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1500))).await;
        let kind = match schedule.get(round) {
            Some(&kind) => kind,
            None => rng.below(KINDS.len() as u64) as usize,
        };
        round += 1;
        let from = start.elapsed();
        // Longer than the lease (0.8 s) and than an election timeout (1–2 s).
        let hold = Duration::from_millis(2500 + rng.below(2500));
        let mut exit = None;
        let affected: Vec<usize> = match kind {
            0 => {
                let node = 1 + rng.below(NODES as u64) as usize;
                nodes[node - 1].kill9();
                tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
                nodes[node - 1].spawn(&[]);
                vec![node]
            }
            1 => {
                let node = some_leader(&net, &pd_url, &mut rng).await;
                nodes[node - 1].signal(libc::SIGSTOP);
                tokio::time::sleep(hold).await;
                nodes[node - 1].signal(libc::SIGCONT);
                vec![node]
            }
            2 | 3 => {
                let node = if kind == 2 {
                    1 + rng.below(NODES as u64) as usize
                } else {
                    some_leader(&net, &pd_url, &mut rng).await
                };
                // Cut from the other nodes and from PD; the clients still reach it.
                for other in (0..=NODES).filter(|&h| h != node) {
                    net.cut(node, other);
                }
                tokio::time::sleep(hold).await;
                net.heal();
                vec![node]
            }
            4 => {
                let a = 1 + rng.below(NODES as u64) as usize;
                let b = 1 + (a + rng.below(NODES as u64 - 1) as usize) % NODES;
                net.cut(a, b);
                tokio::time::sleep(hold).await;
                net.heal();
                vec![a, b]
            }
            6 => {
                // Through the CLI, as an operator would: the leader hands over (its
                // lease void), the clients follow the new leader.
                match transfer_target(&net, &pd_url, &mut rng).await {
                    Some((range, from, to_store, to)) => {
                        let pd = pd_url.clone();
                        let out = tokio::task::spawn_blocking(move || {
                            Command::new(env!("CARGO_BIN_EXE_rangekv"))
                                .args(["ctl", "--pd", &pd, "transfer-leader"])
                                .args([range.to_string(), to_store.to_string()])
                                .output()
                        })
                        .await
                        .unwrap()
                        .unwrap();
                        // A refusal under other faults (no leader now, a slow
                        // follower) is no bug; it is reported, not asserted.
                        exit = Some(format!(
                            "range {range}: {}",
                            if out.status.success() {
                                String::from_utf8_lossy(&out.stdout).trim().to_string()
                            } else {
                                String::from_utf8_lossy(&out.stderr).trim().to_string()
                            }
                        ));
                        vec![from, to]
                    }
                    None => Vec::new(),
                }
            }
            _ => {
                // Restarted with a failpoint: some group syncs succeed, then one
                // fails. The node must stop by itself, and the rest keep serving.
                let node = 1 + rng.below(NODES as u64) as usize;
                let syncs = 5 + rng.below(40);
                let failpoint = format!("log::sync={syncs}");
                nodes[node - 1].kill9();
                nodes[node - 1].spawn(&[("RANGEKV_FAILPOINTS", &failpoint)]);
                let status = nodes[node - 1]
                    .exit_status(Duration::from_secs(FSYNC_FAILURE_EXIT_SECS))
                    .await;
                let Some(status) = status else {
                    panic!(
                        "node{node} still runs {FSYNC_FAILURE_EXIT_SECS} s after its fsync \
                         failpoint ({failpoint}); log in {}",
                        nodes[node - 1].log.display()
                    );
                };
                assert_eq!(
                    status.code(),
                    Some(1),
                    "node{node} must stop with status 1 when fsync fails, not {status}"
                );
                exit = Some(format!("{status} after {syncs} good group syncs"));
                nodes[node - 1].spawn(&[]);
                vec![node]
            }
        };
        let to = start.elapsed();
        println!(
            "nemesis: {} {affected:?} {from:?}..{to:?}, {} ops ok so far",
            KINDS[kind],
            ok_ops.load(Ordering::Relaxed)
        );
        faults.push(Fault {
            kind: KINDS[kind],
            nodes: affected,
            from_ms: from.as_millis() as u64,
            to_ms: to.as_millis() as u64,
            ok_per_sec_by_range: Vec::new(),
            heal_to_first_ok_ms_by_range: Vec::new(),
            exit,
        });
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;

    // Healed: every range answers again.
    let healed = Instant::now();
    let last = epoch(start);
    for i in (0..KEYS).step_by(KEYS_PER_RANGE) {
        let deadline = healed + Duration::from_secs(30);
        while client.get(&key(last, i)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "range of key {i} unreadable 30 s after healing"
            );
        }
    }
    let final_heal_ms = healed.elapsed().as_millis() as u64;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let (acked, attempted_unknown) = set_writer.await.unwrap();

    // The set: every acknowledged insert present, nothing never attempted.
    let mut found = HashSet::new();
    for r in 0..RANGES {
        let prefix = format!("r{r}-set-");
        let end = format!("r{r}-set.");
        let deadline = Instant::now() + Duration::from_secs(30);
        let pairs = loop {
            match client
                .scan(prefix.as_bytes(), end.as_bytes(), usize::MAX)
                .await
            {
                Ok(pairs) => break pairs,
                Err(error) if Instant::now() < deadline => {
                    println!("nemesis: final scan of range {r}: {error}; again");
                }
                Err(error) => panic!("final scan of range {r}: {error}"),
            }
        };
        for (k, v) in pairs {
            assert_eq!(k, v, "set element's value is its key");
            found.insert(k);
        }
    }
    let lost: Vec<String> = acked
        .iter()
        .filter(|k| !found.contains(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let invented: Vec<String> = found
        .iter()
        .filter(|k| !acked.contains(*k) && !attempted_unknown.contains(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();

    let history = Arc::try_unwrap(history).unwrap().into_inner().unwrap();
    let (mut ok, mut failed, mut unknown) = (0, 0, 0);
    let mut written: HashSet<(&[u8], &[u8])> = HashSet::new();
    for op in history.ops() {
        match op.outcome {
            Outcome::Ok { .. } => ok += 1,
            Outcome::Failed => failed += 1,
            Outcome::Unknown => unknown += 1,
        }
        match &op.op {
            Op::Put(value) => {
                written.insert((&op.key, value));
            }
            Op::Cas {
                new: Some(value), ..
            } => {
                written.insert((&op.key, value));
            }
            _ => {}
        }
    }
    // Reads of a value no client ever wrote to that key (the checker fails them too;
    // counted here for the report).
    let never_written = history
        .ops()
        .iter()
        .filter(|op| match &op.outcome {
            Outcome::Ok {
                result: OpResult::Read(Some(value)),
                ..
            } => !written.contains(&(op.key.as_slice(), value.as_slice())),
            _ => false,
        })
        .count();

    // Per fault window and range: ok operations per second, and heal to first ok.
    for fault in &mut faults {
        let (from, to) = (fault.from_ms * 1_000_000, fault.to_ms * 1_000_000);
        let mut in_window = [0u64; RANGES];
        let mut first_after = [None::<u64>; RANGES];
        for op in history.ops() {
            if let Outcome::Ok { returned_at, .. } = op.outcome {
                let range = range_of(&op.key);
                if (from..to).contains(&returned_at) {
                    in_window[range] += 1;
                }
                if returned_at >= to {
                    let first = &mut first_after[range];
                    *first = Some(first.map_or(returned_at, |f| f.min(returned_at)));
                }
            }
        }
        let window = (to - from).max(1) as f64 / 1e9;
        fault.ok_per_sec_by_range = in_window.iter().map(|&n| n as f64 / window).collect();
        fault.heal_to_first_ok_ms_by_range = first_after
            .iter()
            .map(|f| f.map(|at| (at - to) / 1_000_000))
            .collect();
    }

    let checked = Instant::now();
    let verdict = rangekv_check::check(&history, Budget::time(Duration::from_secs(60)));
    let report = serde_json::json!({
        "seed": seed,
        "seconds": seconds,
        "operations": {"ok": ok, "failed": failed, "unknown": unknown},
        "set": {
            "acknowledged": acked.len(),
            "unknown_outcome": attempted_unknown.len(),
            "found": found.len(),
        },
        "acknowledged_writes_lost": lost.len(),
        "values_never_written": never_written + invented.len(),
        "linearizability": match &verdict {
            Verdict::Linearizable => "linearizable".to_string(),
            Verdict::NotLinearizable { key, .. } =>
                format!("NOT linearizable on {}", String::from_utf8_lossy(key)),
            Verdict::Unknown { reason, .. } => format!("unknown: {reason}"),
        },
        "check_ms": checked.elapsed().as_millis() as u64,
        "client": {
            "retry_ambiguous": client_config.retry_ambiguous_writes,
            "ambiguous_writes_retried": client.ambiguous_writes_retried(),
        },
        "faults": faults,
        "final_heal_to_every_range_readable_ms": final_heal_ms,
        "snapshots_installed": snapshots_installed(dir.path()),
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    let file = std::env::var("NEMESIS_REPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| dir.path().join("nemesis.json"));
    std::fs::write(&file, &text).unwrap();
    let failure = if !lost.is_empty() || !invented.is_empty() {
        Some(format!(
            "set: {} acknowledged inserts lost (first: {:?}), {} never attempted found \
             (first: {:?})",
            lost.len(),
            lost.first(),
            invented.len(),
            invented.first()
        ))
    } else if !matches!(verdict, Verdict::Linearizable) {
        Some(format!("{verdict:?}"))
    } else {
        None
    };
    if let Some(failure) = failure {
        let history_file = dir.path().join("history.json");
        std::fs::write(&history_file, serde_json::to_vec(&history).unwrap()).unwrap();
        // Keep the logs and the history for a look.
        let kept = dir.keep();
        panic!(
            "seed {seed}: {failure}\nhistory and node logs kept in {}",
            kept.display()
        );
    }
    assert!(ok > 100, "the clients made progress ({ok} operations ok)");
    assert!(!acked.is_empty(), "the set workload made progress");
    assert!(faults.len() >= KINDS.len(), "every kind of fault ran");
    for node in &mut nodes {
        node.kill9();
    }
}

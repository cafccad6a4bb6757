//! Real processes under faults: PD and three nodes as child processes of this test,
//! clients recording a history of get / put / CAS on a few keys, and a seeded nemesis
//! that kills nodes with SIGKILL (then restarts them on the same data) and pauses them
//! with SIGSTOP for longer than the leader lease. Afterwards every fault is healed, the
//! time until each key answers again is measured, and the history must be
//! linearizable. A report is printed and written as JSON.
//!
//! `NEMESIS_SECS` (default 20) lengthens the run, `SEED` picks the nemesis schedule,
//! `NEMESIS_REPORT` names the JSON file (default: in the test's temporary directory).
//! Network partitions (namespaces) and a failing fsync are not covered yet.

#![allow(clippy::unwrap_used)] // test code: a surprise should fail the test loudly

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rangekv_check::{Budget, History, Op, OpResult, Verdict};
use rangekv_client::{Client, Config, Error};

const KEYS: usize = 8;
/// Clients move to a fresh set of keys every this many seconds. Each key is its own
/// register, so the checker handles each key's (short) history alone; one key per
/// 30 minutes made a history the search could not finish in its budget.
const KEY_EPOCH_SECS: u64 = 30;
const CLIENTS: u64 = 5;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

/// A child process we can kill and start again with the same arguments.
struct Proc {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(name: &str, args: Vec<String>, dir: &Path) -> Proc {
        let mut proc = Proc {
            args,
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        proc.spawn();
        proc
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rangekv"))
            .args(&self.args)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.pid(), signal) };
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGCONT);
        }
        self.kill9();
    }
}

/// What the nemesis did, for the report.
#[derive(Debug, Clone, serde::Serialize)]
struct Fault {
    kind: &'static str,
    node: usize,
    /// Milliseconds since the start of the workload.
    from_ms: u64,
    to_ms: u64,
    /// Operations that succeeded while the fault lasted, per second.
    ok_per_sec: f64,
}

fn nanos(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

fn key(epoch: u64, i: usize) -> Vec<u8> {
    format!("nemesis-key-{epoch}-{i}").into_bytes()
}

fn epoch(start: Instant) -> u64 {
    start.elapsed().as_secs() / KEY_EPOCH_SECS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_workload_under_kills_and_pauses_stays_linearizable() {
    let seconds: u64 = std::env::var("NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
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
    let pd_port = free_port();
    let pd_url = format!("http://127.0.0.1:{pd_port}");
    let _pd = Proc::start(
        "pd",
        [
            "pd",
            "--data-dir",
            dir.path().join("pd").to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{pd_port}"),
            "--initial-ranges",
            "4",
        ]
        .map(String::from)
        .to_vec(),
        dir.path(),
    );
    let mut nodes: Vec<Proc> = (0..3)
        .map(|i| {
            let port = free_port();
            Proc::start(
                &format!("node{i}"),
                [
                    "node",
                    "--data-dir",
                    dir.path().join(format!("node{i}")).to_str().unwrap(),
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--pd",
                    &pd_url,
                    "--workers",
                    "1",
                ]
                .map(String::from)
                .to_vec(),
                dir.path(),
            )
        })
        .collect();

    // The cluster is up once every key can be written.
    let ready_by = Instant::now() + Duration::from_secs(60);
    let client = loop {
        // An ambiguous write is recorded as unknown rather than retried: a retried
        // put may apply twice, around another client's write (documented on
        // `Config::retry_ambiguous_writes`), which no register history allows.
        let config = Config {
            retry_ambiguous_writes: false,
            ..Config::default()
        };
        match Client::connect(&[pd_url.as_str()], config).await {
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

    // The nemesis: one fault at a time, then a quiet spell.
    let mut rng = Rng(seed);
    let mut faults = Vec::new();
    let end = start + Duration::from_secs(seconds);
    while Instant::now() + Duration::from_secs(4) < end {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1500))).await;
        let node = rng.below(nodes.len() as u64) as usize;
        let before = ok_ops.load(Ordering::Relaxed);
        let from = start.elapsed();
        let kind = if rng.below(2) == 0 {
            nodes[node].kill9();
            tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
            nodes[node].spawn();
            "kill -9, restart"
        } else {
            // Longer than the lease (0.8 s) and than an election timeout (1–2 s).
            nodes[node].signal(libc::SIGSTOP);
            tokio::time::sleep(Duration::from_millis(2500 + rng.below(1000))).await;
            nodes[node].signal(libc::SIGCONT);
            "SIGSTOP, SIGCONT"
        };
        let to = start.elapsed();
        let ok = ok_ops.load(Ordering::Relaxed) - before;
        faults.push(Fault {
            kind,
            node,
            from_ms: from.as_millis() as u64,
            to_ms: to.as_millis() as u64,
            ok_per_sec: ok as f64 / (to - from).as_secs_f64(),
        });
        println!(
            "nemesis: {kind} node{node} {:?}..{:?}, {ok} ops ok",
            from, to
        );
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;

    // Healed: how long until each key answers a read again.
    let healed = Instant::now();
    let mut heal_ms = Vec::new();
    let last = epoch(start);
    for i in 0..KEYS {
        let deadline = healed + Duration::from_secs(30);
        loop {
            if client.get(&key(last, i)).await.is_ok() {
                heal_ms.push(healed.elapsed().as_millis() as u64);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "key {i} unreadable 30 s after healing"
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }

    let history = Arc::try_unwrap(history).unwrap().into_inner().unwrap();
    let (mut ok, mut failed, mut unknown) = (0, 0, 0);
    for op in history.ops() {
        match op.outcome {
            rangekv_check::Outcome::Ok { .. } => ok += 1,
            rangekv_check::Outcome::Failed => failed += 1,
            rangekv_check::Outcome::Unknown => unknown += 1,
        }
    }
    let checked = Instant::now();
    let verdict = rangekv_check::check(&history, Budget::time(Duration::from_secs(60)));
    let report = serde_json::json!({
        "seed": seed,
        "seconds": seconds,
        "operations": {"ok": ok, "failed": failed, "unknown": unknown},
        "linearizability": match &verdict {
            Verdict::Linearizable => "linearizable".to_string(),
            Verdict::NotLinearizable { key, .. } =>
                format!("NOT linearizable on {}", String::from_utf8_lossy(key)),
            Verdict::Unknown { reason, .. } => format!("unknown: {reason}"),
        },
        "check_ms": checked.elapsed().as_millis() as u64,
        "faults": faults,
        "heal_to_first_read_ms_per_key": heal_ms,
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    let file = std::env::var("NEMESIS_REPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| dir.path().join("nemesis.json"));
    std::fs::write(&file, &text).unwrap();
    match verdict {
        Verdict::Linearizable => {}
        other => {
            let history_file = dir.path().join("history.json");
            std::fs::write(&history_file, serde_json::to_vec(&history).unwrap()).unwrap();
            // Keep the logs and the history for a look.
            let kept = dir.keep();
            panic!(
                "seed {seed}: {other:?}\nhistory and node logs kept in {}",
                kept.display()
            );
        }
    }
    assert!(ok > 100, "the clients made progress ({ok} operations ok)");
    assert!(!faults.is_empty() || seconds < 8, "the nemesis acted");
    for node in &mut nodes {
        node.kill9();
    }
}

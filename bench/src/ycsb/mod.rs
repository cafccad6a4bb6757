//! `rangekv bench ycsb`: YCSB core workloads against rangekv, with hdrhistogram
//! latencies, a live progress line, a final table per operation and JSON output.
//!
//! Phases: `load` inserts `recordcount` records (10 fields × 100 B each, one value
//! per record); `run` executes the workload's operation mix for `--operations` or
//! `--duration-secs`. With `--target`, each thread runs an open-loop schedule and
//! latencies count from the intended start (no coordinated omission). Without `--pd`,
//! an embedded 3-node cluster runs in this process on a temporary directory.
//!
//! Storage binding (the same for every system): a record is one value; insert and
//! update put the fields they carry (an update of one field writes that field only),
//! read gets the value, scan reads `count` records from the start key on.

pub mod etcd;
pub mod generator;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rangekv_client::{Client, Config};

use crate::report::{latency_histogram, Latency, COMMIT};
use generator::AcknowledgedCounter;
use workload::{Op, Operations, Step, Workload};

#[derive(Debug, Clone, clap::Args)]
pub struct YcsbArgs {
    /// Workloads to run after the load, comma-separated (a–f).
    #[arg(long, value_delimiter = ',', default_value = "a")]
    pub workloads: Vec<String>,
    /// A workload property, `name=value` (recordcount, operationcount, fieldcount,
    /// fieldlength, *proportion, requestdistribution, maxscanlength, insertorder, ...).
    #[arg(short = 'p', long = "property")]
    pub properties: Vec<String>,
    /// `load`, `run`, or `both`.
    #[arg(long, default_value = "both")]
    pub phase: String,
    /// Client threads (concurrent requests).
    #[arg(long, default_value_t = 64)]
    pub threads: usize,
    /// Run each workload this long instead of `operationcount` operations.
    #[arg(long)]
    pub duration_secs: Option<f64>,
    /// Run each workload for this many operations (overrides `operationcount`).
    #[arg(long)]
    pub operations: Option<u64>,
    /// Open loop at this many operations per second in total.
    #[arg(long)]
    pub target: Option<f64>,
    /// rangekv PD endpoint(s); none: an embedded 3-node cluster.
    #[arg(long, value_delimiter = ',')]
    pub pd: Vec<String>,
    /// Ranges of the embedded cluster.
    #[arg(long, default_value_t = 16)]
    pub initial_ranges: usize,
    /// Worker threads per store of the embedded cluster (default: the cores divided
    /// among its three stores, at least one).
    #[arg(long)]
    pub store_workers: Option<usize>,
    /// Threads of the bench's async runtime, which runs the clients (of every system
    /// compared) and the embedded cluster's gRPC services. Default: three per core.
    /// Under CPU contention the OS shares the cores per thread, and the embedded
    /// cluster also runs each store's raft workers and log writer on threads of their
    /// own: with one runtime thread per core, the clients and services starve behind
    /// them (bench/README.md, "Runtime threads").
    #[arg(long)]
    pub runtime_threads: Option<usize>,
    /// Raft log I/O of the embedded cluster: auto, uring or sync (default: the node's,
    /// `rangekv_node::node::NODE_LOG_IO`).
    #[arg(long)]
    pub log_io: Option<rangekv_log::LogIo>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Also run the same workloads against this system, in this invocation, and
    /// print the ratio: `etcd`.
    #[arg(long, value_delimiter = ',')]
    pub compare: Vec<String>,
    /// etcd endpoints for `--compare etcd`, comma-separated, or `local`: the bench
    /// starts a 3-member etcd 3.4 on loopback and stops it after.
    #[arg(long, default_value = "local")]
    pub etcd: String,
}

/// The data store under test.
pub enum Driver {
    Rangekv(Client),
    Etcd(Box<etcd_client::Client>),
}

impl Driver {
    pub fn name(&self) -> &'static str {
        match self {
            Driver::Rangekv(_) => "rangekv",
            Driver::Etcd(_) => "etcd",
        }
    }

    async fn read(&self, key: &str) -> anyhow::Result<bool> {
        match self {
            Driver::Rangekv(client) => Ok(client.get(key.as_bytes()).await?.is_some()),
            // Linearizable (etcd's default), like rangekv's reads.
            Driver::Etcd(client) => Ok(!(**client).clone().get(key, None).await?.kvs().is_empty()),
        }
    }

    async fn write(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        match self {
            Driver::Rangekv(client) => Ok(client.put(key.as_bytes(), value).await?),
            Driver::Etcd(client) => {
                (**client).clone().put(key, value, None).await?;
                Ok(())
            }
        }
    }

    async fn scan(&self, start: &str, count: u64) -> anyhow::Result<usize> {
        match self {
            Driver::Rangekv(client) => Ok(client
                .scan(start.as_bytes(), b"", count as usize)
                .await?
                .len()),
            Driver::Etcd(client) => {
                let options = etcd_client::GetOptions::new()
                    .with_from_key()
                    .with_limit(count as i64);
                Ok((**client)
                    .clone()
                    .get(start, Some(options))
                    .await?
                    .kvs()
                    .len())
            }
        }
    }
}

/// Results of one phase of one workload on one system.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseResult {
    pub system: String,
    pub workload: String,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub errors: u64,
    pub operations: u64,
    pub seconds: f64,
    pub by_operation: BTreeMap<String, Latency>,
}

/// What the threads of a phase share.
struct Shared {
    done: AtomicU64,
    errors: AtomicU64,
    budget: AtomicU64,
    stop: AtomicBool,
    /// The last second's latencies, for the progress line; none with `--quiet` (one
    /// lock per operation, shared by every thread, for nothing).
    live: Option<Mutex<Histogram<u64>>>,
}

impl Shared {
    fn new(budget: u64, quiet: bool) -> Self {
        Shared {
            done: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            budget: AtomicU64::new(budget),
            stop: AtomicBool::new(false),
            live: (!quiet).then(|| Mutex::new(latency_histogram())),
        }
    }

    fn take_one(&self) -> bool {
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_ok()
    }
}

fn record(histograms: &mut BTreeMap<Op, Histogram<u64>>, shared: &Shared, op: Op, micros: u64) {
    let micros = micros.clamp(1, 100_000_000);
    let _ = histograms
        .entry(op)
        .or_insert_with(latency_histogram)
        .record(micros);
    if let Some(Ok(mut live)) = shared.live.as_ref().map(Mutex::lock) {
        let _ = live.record(micros);
    }
    shared.done.fetch_add(1, Ordering::Relaxed);
}

/// Prints ops/s and p99 of the last second until `shared.stop`.
async fn progress(shared: Arc<Shared>, label: String, quiet: bool) {
    if quiet {
        return;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    let start = Instant::now();
    let mut last_done = 0;
    let mut timer = tokio::time::interval(Duration::from_secs(1));
    timer.tick().await;
    while !shared.stop.load(Ordering::Relaxed) {
        timer.tick().await;
        let done = shared.done.load(Ordering::Relaxed);
        let p99 = shared.live.as_ref().map(Mutex::lock).map_or(0, |live| {
            let Ok(mut live) = live else { return 0 };
            let p = live.value_at_quantile(0.99);
            live.reset();
            p
        });
        bar.set_message(format!(
            "{label}: {:>5.0}s  {:>8} ops/s  p99 {:>7} µs  total {done}  errors {}",
            start.elapsed().as_secs_f64(),
            done - last_done,
            p99,
            shared.errors.load(Ordering::Relaxed)
        ));
        bar.tick();
        last_done = done;
    }
    bar.finish_and_clear();
}

/// Records a finished operation: its latency, or an error.
fn outcome(
    histograms: &mut BTreeMap<Op, Histogram<u64>>,
    shared: &Shared,
    op: Op,
    began: Instant,
    result: anyhow::Result<()>,
) {
    match result {
        Ok(()) => record(histograms, shared, op, began.elapsed().as_micros() as u64),
        Err(_) => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type Histograms = BTreeMap<Op, Histogram<u64>>;

/// Waits for a phase's threads, then stops its progress line.
async fn finish(
    tasks: Vec<tokio::task::JoinHandle<Histograms>>,
    shared: &Shared,
    bar: tokio::task::JoinHandle<()>,
    start: Instant,
) -> (Vec<Histograms>, Duration) {
    let mut histograms = Vec::new();
    for task in tasks {
        histograms.push(task.await.unwrap_or_default());
    }
    let elapsed = start.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    let _ = bar.await;
    (histograms, elapsed)
}

fn summarize(
    system: &str,
    workload: &str,
    histograms: Vec<BTreeMap<Op, Histogram<u64>>>,
    errors: u64,
    elapsed: Duration,
) -> PhaseResult {
    let mut by_op: BTreeMap<Op, Histogram<u64>> = BTreeMap::new();
    let mut all = latency_histogram();
    for per_thread in histograms {
        for (op, h) in per_thread {
            let _ = all.add(&h);
            let _ = by_op.entry(op).or_insert_with(latency_histogram).add(&h);
        }
    }
    let seconds = elapsed.as_secs_f64().max(1e-9);
    PhaseResult {
        system: system.to_string(),
        workload: workload.to_string(),
        ops_per_sec: all.len() as f64 / seconds,
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
        p999_us: all.value_at_quantile(0.999),
        errors,
        operations: all.len(),
        seconds,
        by_operation: by_op
            .into_iter()
            .map(|(op, h)| (op.name().to_string(), Latency::from_histogram(&h)))
            .collect(),
    }
}

/// Inserts the workload's records, `threads` at a time.
async fn load(driver: Arc<Driver>, w: Arc<Workload>, threads: usize, quiet: bool) -> PhaseResult {
    let total = w.records_to_load();
    let next = Arc::new(AtomicU64::new(w.insertstart));
    let end = w.insertstart + total;
    let shared = Arc::new(Shared::new(total, quiet));
    let bar = tokio::spawn(progress(
        shared.clone(),
        format!("{} load", driver.name()),
        quiet,
    ));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for thread in 0..threads {
        let (driver, w, next, shared) = (driver.clone(), w.clone(), next.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(0x10AD + thread as u64);
            let mut histograms = BTreeMap::new();
            let fields = w.all_fields();
            loop {
                let keynum = next.fetch_add(1, Ordering::Relaxed);
                if keynum >= end {
                    break;
                }
                let value = w.record(&mut rng, &fields);
                let began = Instant::now();
                let result = driver.write(&w.key(keynum), &value).await;
                outcome(&mut histograms, &shared, Op::Insert, began, result);
            }
            histograms
        }));
    }
    let (histograms, elapsed) = finish(tasks, &shared, bar, start).await;
    summarize(
        driver.name(),
        "load",
        histograms,
        shared.errors.load(Ordering::Relaxed),
        elapsed,
    )
}

/// Runs the workload's operation mix.
async fn run(
    driver: Arc<Driver>,
    w: Arc<Workload>,
    args: &YcsbArgs,
    inserts: Arc<AcknowledgedCounter>,
) -> anyhow::Result<PhaseResult> {
    let budget = match (args.duration_secs, args.operations) {
        (Some(_), None) => u64::MAX,
        (_, Some(ops)) => ops,
        (None, None) => w.operationcount,
    };
    let deadline = args
        .duration_secs
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let shared = Arc::new(Shared::new(budget, args.quiet));
    let label = format!("{} workload {}", driver.name(), w.name);
    let bar = tokio::spawn(progress(shared.clone(), label, args.quiet));
    let interval = args
        .target
        .map(|t| Duration::from_secs_f64(args.threads as f64 / t.max(1e-3)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for thread in 0..args.threads {
        let mut ops = Operations::new(w.clone(), inserts.clone())?;
        let (driver, w, shared, inserts) =
            (driver.clone(), w.clone(), shared.clone(), inserts.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(0xC0DE + thread as u64);
            let mut histograms = BTreeMap::new();
            let mut intended = start;
            while deadline.is_none_or(|d| Instant::now() < d) && shared.take_one() {
                // Open loop: each operation has an intended start; latency counts from it.
                let began = match interval {
                    Some(interval) => {
                        intended += interval;
                        tokio::time::sleep_until(intended.into()).await;
                        intended
                    }
                    None => Instant::now(),
                };
                let step = ops.next(&mut rng);
                let (op, result) = match step {
                    Step::Read { key } => (Op::Read, driver.read(&key).await.map(|_| ())),
                    Step::Update { key, fields } => {
                        let value = w.record(&mut rng, &fields);
                        (Op::Update, driver.write(&key, &value).await)
                    }
                    Step::Insert { keynum, key } => {
                        let value = w.record(&mut rng, &w.all_fields());
                        let result = driver.write(&key, &value).await;
                        if result.is_ok() {
                            inserts.acknowledge(keynum);
                        }
                        (Op::Insert, result)
                    }
                    Step::Scan { start, count } => {
                        (Op::Scan, driver.scan(&start, count).await.map(|_| ()))
                    }
                    Step::ReadModifyWrite { key, fields } => {
                        let value = w.record(&mut rng, &fields);
                        let result = match driver.read(&key).await {
                            Ok(_) => driver.write(&key, &value).await,
                            Err(e) => Err(e),
                        };
                        (Op::ReadModifyWrite, result)
                    }
                };
                outcome(&mut histograms, &shared, op, began, result);
            }
            histograms
        }));
    }
    let (histograms, elapsed) = finish(tasks, &shared, bar, start).await;
    Ok(summarize(
        driver.name(),
        &w.name,
        histograms,
        shared.errors.load(Ordering::Relaxed),
        elapsed,
    ))
}

fn print_table(result: &PhaseResult) {
    println!(
        "[{}] {}: {:.0} ops/s over {:.1} s, {} operations, {} errors",
        result.system,
        result.workload,
        result.ops_per_sec,
        result.seconds,
        result.operations,
        result.errors
    );
    println!(
        "  {:<18} {:>9} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "operation", "count", "ops/s", "mean µs", "p50", "p95", "p99", "p999", "max"
    );
    for (op, l) in &result.by_operation {
        println!(
            "  {:<18} {:>9} {:>10.0} {:>9.0} {:>8} {:>8} {:>8} {:>8} {:>9}",
            op,
            l.count,
            l.count as f64 / result.seconds,
            l.mean_us,
            l.p50_us,
            l.p95_us,
            l.p99_us,
            l.p999_us,
            l.max_us
        );
    }
}

/// rangekv beside each other system, per phase: throughput ratio and latencies.
fn print_comparison(results: &[PhaseResult]) {
    println!(
        "\n{:<10} {:<8} {:>12} {:>10} {:>10} {:>8}",
        "workload", "system", "ops/s", "p50 µs", "p99 µs", "ratio"
    );
    for ours in results.iter().filter(|r| r.system == "rangekv") {
        println!(
            "{:<10} {:<8} {:>12.0} {:>10} {:>10} {:>8}",
            ours.workload, ours.system, ours.ops_per_sec, ours.p50_us, ours.p99_us, ""
        );
        for theirs in results
            .iter()
            .filter(|r| r.system != "rangekv" && r.workload == ours.workload)
        {
            println!(
                "{:<10} {:<8} {:>12.0} {:>10} {:>10} {:>7.2}x",
                "",
                theirs.system,
                theirs.ops_per_sec,
                theirs.p50_us,
                theirs.p99_us,
                ours.ops_per_sec / theirs.ops_per_sec.max(1e-9)
            );
        }
    }
}

pub fn run_bench(args: &YcsbArgs) -> anyhow::Result<Vec<PhaseResult>> {
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    anyhow::ensure!(
        ["load", "run", "both"].contains(&args.phase.as_str()),
        "--phase is {:?}; it must be load, run or both",
        args.phase
    );
    let mut workloads = Vec::new();
    for name in &args.workloads {
        let mut w = Workload::preset(name)?;
        for property in &args.properties {
            let (key, value) = property
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("-p {property}: expected name=value"))?;
            w.set(key.trim(), value.trim())?;
        }
        workloads.push(Arc::new(w));
    }
    anyhow::ensure!(!workloads.is_empty(), "no workload given");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.runtime_threads.unwrap_or(3 * cores).max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut cluster = None;
        let endpoints = if args.pd.is_empty() {
            let (workers, io) = (args.store_workers, args.log_io);
            let started = rangekv_testkit::Cluster::start_with(
                3,
                rangekv_placement::bootstrap::ycsb_split_keys(args.initial_ranges),
                |config| {
                    config.store.workers =
                        workers.unwrap_or_else(|| rangekv_node::co_located_workers(3));
                    if let Some(io) = io {
                        config.log.io = io;
                    }
                },
            )
            .await;
            let url = started.pd_url.clone();
            cluster = Some(started);
            vec![url]
        } else {
            args.pd.clone()
        };
        let endpoints: Vec<&str> = endpoints.iter().map(String::as_str).collect();
        let client = Client::connect(&endpoints, Config::default()).await?;
        let mut drivers = vec![Arc::new(Driver::Rangekv(client))];
        let mut local_etcd = None;
        for other in &args.compare {
            anyhow::ensure!(
                other == "etcd",
                "--compare {other:?}: only etcd is supported"
            );
            let endpoints = if args.etcd == "local" {
                let started = etcd::LocalEtcd::start().await?;
                let endpoints = started.endpoints.clone();
                local_etcd = Some(started);
                endpoints
            } else {
                args.etcd.split(',').map(str::to_string).collect()
            };
            drivers.push(Arc::new(Driver::Etcd(Box::new(
                etcd_client::Client::connect(&endpoints, None).await?,
            ))));
        }
        let mut results = Vec::new();
        let first = workloads[0].clone();
        for driver in &drivers {
            if args.phase != "run" {
                let result = load(driver.clone(), first.clone(), args.threads, args.quiet).await;
                print_table(&result);
                results.push(result);
            }
            if args.phase != "load" {
                for w in &workloads {
                    let inserts = Arc::new(AcknowledgedCounter::new(
                        w.insertstart + w.records_to_load(),
                    ));
                    let result = run(driver.clone(), w.clone(), args, inserts).await?;
                    print_table(&result);
                    results.push(result);
                }
            }
        }
        if drivers.len() > 1 {
            print_comparison(&results);
        }
        drop(local_etcd);
        if let Some(path) = &args.json {
            let report = serde_json::json!({
                "results": results,
                "config": {
                    "threads": args.threads,
                    "target": args.target,
                    "duration_secs": args.duration_secs,
                    "operations": args.operations,
                    "properties": first.as_properties(),
                    "embedded_cluster": args.pd.is_empty(),
                    "compare": args.compare,
                },
                "commit": COMMIT,
            });
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        }
        if let Some(cluster) = cluster {
            cluster.shutdown().await;
        }
        anyhow::Ok(results)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_load_and_run_of_every_workload_against_an_embedded_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("ycsb.json");
        let args = YcsbArgs {
            workloads: ["a", "b", "c", "d", "e", "f"].map(String::from).to_vec(),
            properties: vec!["recordcount=200".into()],
            phase: "both".into(),
            threads: 8,
            duration_secs: None,
            operations: Some(200),
            target: None,
            pd: Vec::new(),
            initial_ranges: 4,
            // The embedded cluster's knobs reach its stores.
            store_workers: Some(1),
            runtime_threads: None,
            log_io: Some(rangekv_log::LogIo::Sync),
            json: Some(json.clone()),
            quiet: true,
            compare: Vec::new(),
            etcd: "local".into(),
        };
        let results = run_bench(&args).unwrap();
        assert_eq!(results.len(), 7, "load and six runs");
        assert_eq!(results[0].operations, 200, "every record loaded");
        for r in &results {
            assert_eq!(r.errors, 0, "{r:?}");
        }
        for r in &results[1..] {
            assert_eq!(r.operations, 200, "{}", r.workload);
        }
        assert!(results[5].by_operation.contains_key("SCAN"));
        assert!(results[6].by_operation.contains_key("READ-MODIFY-WRITE"));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        assert_eq!(report["results"][1]["system"], "rangekv");
        assert_eq!(report["results"][1]["workload"], "a");
        assert!(report["results"][1]["ops_per_sec"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn a_tiny_comparison_with_a_local_etcd_runs_both_and_reports_both() {
        let args = YcsbArgs {
            workloads: vec!["a".into(), "e".into()],
            properties: vec!["recordcount=100".into()],
            phase: "both".into(),
            threads: 4,
            duration_secs: None,
            operations: Some(100),
            target: None,
            pd: Vec::new(),
            initial_ranges: 2,
            store_workers: None,
            runtime_threads: None,
            log_io: Some(rangekv_log::LogIo::Auto),
            json: None,
            quiet: true,
            compare: vec!["etcd".into()],
            etcd: "local".into(),
        };
        let results = run_bench(&args).unwrap();
        let systems: Vec<(&str, &str)> = results
            .iter()
            .map(|r| (r.system.as_str(), r.workload.as_str()))
            .collect();
        assert_eq!(
            systems,
            vec![
                ("rangekv", "load"),
                ("rangekv", "a"),
                ("rangekv", "e"),
                ("etcd", "load"),
                ("etcd", "a"),
                ("etcd", "e")
            ]
        );
        for r in &results {
            assert_eq!(r.errors, 0, "{r:?}");
            assert_eq!(r.operations, 100, "{r:?}");
        }
        assert!(results[5].by_operation.contains_key("SCAN"));
    }
}

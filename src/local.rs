//! `rangekv local`: PD and N nodes as child processes on loopback, data and logs under
//! one directory; stops them cleanly on Ctrl-C.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use rangekv_rpc::proto::{self, placement_client::PlacementClient};

#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// Directory of the cluster's data and process logs (kept between runs: a second
    /// run restarts the same cluster).
    #[arg(long, default_value = "rangekv-local")]
    pub dir: PathBuf,
    /// Storage nodes to start (at least 3: every range has 3 replicas).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// PD's port on 127.0.0.1.
    #[arg(long, default_value_t = 2379)]
    pub pd_port: u16,
    /// First node's port on 127.0.0.1; the others follow. 0: every node takes a port
    /// the OS picks (printed once the cluster is ready).
    #[arg(long, default_value_t = 20160)]
    pub node_port: u16,
    /// Ranges the keyspace is cut into at bootstrap (YCSB key space).
    #[arg(long, default_value_t = 16)]
    pub initial_ranges: usize,
    /// Raft log I/O of every node: auto, uring or sync.
    #[arg(long)]
    pub log_io: Option<String>,
    /// Worker threads per node (default: the cores divided among the nodes, at least
    /// one; with `--node-config`, the file's).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Node config file passed to every node (see deploy/node.toml).
    #[arg(long)]
    pub node_config: Option<PathBuf>,
    /// Once ready, load this many YCSB records and run a short YCSB-A against the
    /// cluster (with a live progress line), then keep serving. 0: no demo.
    #[arg(long, default_value_t = 0)]
    pub demo_records: u64,
    /// Seconds the demo's YCSB-A runs.
    #[arg(long, default_value_t = 10)]
    pub demo_seconds: u64,
    /// Seconds to wait for every range to elect a leader.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout_secs: u64,
}

struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

fn spawn(name: &str, args: &[String], log: &Path) -> anyhow::Result<Process> {
    let exe = std::env::current_exe().context("cannot find the rangekv executable")?;
    let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Process {
        name: name.to_string(),
        child,
        log: log.to_path_buf(),
    })
}

/// SIGTERM every process, then wait; SIGKILL what is still running after `grace`.
fn stop_all(processes: &mut [Process], grace: Duration) {
    for process in processes.iter_mut().rev() {
        if let Ok(pid) = i32::try_from(process.child.id()) {
            // SAFETY: plain kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let give_up = std::time::Instant::now() + grace;
    for process in processes.iter_mut() {
        loop {
            match process.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if std::time::Instant::now() < give_up => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    eprintln!("{} did not stop in {grace:?}; killing it", process.name);
                    let _ = process.child.kill();
                    let _ = process.child.wait();
                    break;
                }
            }
        }
    }
}

fn exited(processes: &mut [Process]) -> Option<String> {
    processes.iter_mut().find_map(|p| match p.child.try_wait() {
        Ok(Some(status)) => Some(format!(
            "{} exited ({status}); see {}",
            p.name,
            p.log.display()
        )),
        _ => None,
    })
}

async fn wait_ready(
    pd: &str,
    processes: &mut [Process],
    timeout: Duration,
) -> anyhow::Result<usize> {
    let give_up = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(why) = exited(processes) {
            anyhow::bail!(why);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < give_up,
            "the cluster was not ready within {timeout:?} (logs under the data directory)"
        );
        if let Ok(mut client) = PlacementClient::connect(pd.to_string()).await {
            if let Ok(routes) = client
                .scan_ranges(proto::ScanRangesRequest::default())
                .await
            {
                let routes = routes.into_inner().routes;
                if !routes.is_empty() && routes.iter().all(|r| r.leader.is_some()) {
                    return Ok(routes.len());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run_local(args: LocalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.nodes >= 3,
        "--nodes is {}; it must be at least 3",
        args.nodes
    );
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    // One signal listener for the whole run, installed before any child starts: a
    // SIGTERM arriving between two waits must not be lost.
    let mut stop = Box::pin(crate::node_cmd::terminated());
    let pd_listen = format!("127.0.0.1:{}", args.pd_port);
    let pd_url = format!("http://{pd_listen}");
    let mut processes = vec![spawn(
        "pd",
        &[
            "pd".into(),
            "--data-dir".into(),
            dir.join("pd").display().to_string(),
            "--listen".into(),
            pd_listen.clone(),
            "--initial-ranges".into(),
            args.initial_ranges.to_string(),
        ],
        &dir.join("pd.log"),
    )?];
    let mut node_addrs = Vec::new();
    for i in 0..args.nodes {
        let port = if args.node_port == 0 {
            0
        } else {
            args.node_port
                .checked_add(i as u16)
                .context("--node-port leaves no room for every node")?
        };
        let listen = format!("127.0.0.1:{port}");
        let mut node_args = vec![
            "node".to_string(),
            "--data-dir".into(),
            dir.join(format!("node{i}")).display().to_string(),
            "--listen".into(),
            listen.clone(),
            "--pd".into(),
            pd_url.clone(),
        ];
        if let Some(config) = &args.node_config {
            node_args.extend(["--config".to_string(), config.display().to_string()]);
        }
        let workers = match (args.workers, &args.node_config) {
            (Some(workers), _) => Some(workers),
            (None, None) => Some(rangekv_node::co_located_workers(args.nodes)),
            (None, Some(_)) => None,
        };
        if let Some(workers) = workers {
            node_args.extend(["--workers".to_string(), workers.to_string()]);
        }
        if let Some(io) = &args.log_io {
            node_args.extend(["--log-io".to_string(), io.clone()]);
        }
        match spawn(
            &format!("node{i}"),
            &node_args,
            &dir.join(format!("node{i}.log")),
        ) {
            Ok(process) => processes.push(process),
            Err(error) => {
                stop_all(&mut processes, Duration::from_secs(10));
                return Err(error);
            }
        }
        node_addrs.push(listen);
    }
    let ready = tokio::select! {
        ready = wait_ready(&pd_url, &mut processes, Duration::from_secs(args.ready_timeout_secs)) => ready,
        _ = &mut stop => Err(anyhow::anyhow!("interrupted before the cluster was ready")),
    };
    let ranges = match ready {
        Ok(ranges) => ranges,
        Err(error) => {
            stop_all(&mut processes, Duration::from_secs(10));
            return Err(error);
        }
    };
    // The addresses the nodes registered (they differ from --listen with port 0).
    if let Ok(mut client) = PlacementClient::connect(pd_url.clone()).await {
        if let Ok(stores) = client.list_stores(proto::ListStoresRequest {}).await {
            node_addrs = stores
                .into_inner()
                .stores
                .into_iter()
                .map(|s| s.address)
                .collect();
        }
    }
    println!("rangekv local cluster ready");
    println!("  PD     {pd_url}");
    for (i, addr) in node_addrs.iter().enumerate() {
        println!("  node{i}  {addr}");
    }
    println!(
        "  {ranges} ranges, 3 replicas each; data and logs under {}",
        dir.display()
    );
    if args.demo_records > 0 {
        println!(
            "loading {} YCSB records, then {} s of YCSB-A (256 threads) against it",
            args.demo_records, args.demo_seconds
        );
        let demo = rangekv_bench::ycsb::YcsbArgs {
            workloads: vec!["a".into()],
            properties: vec![format!("recordcount={}", args.demo_records)],
            phase: "both".into(),
            threads: 256,
            duration_secs: Some(args.demo_seconds as f64),
            operations: None,
            target: None,
            pd: vec![pd_url.clone()],
            initial_ranges: 0,
            store_workers: None,
            runtime_threads: None,
            log_io: None,
            json: None,
            quiet: false,
            compare: Vec::new(),
            etcd: "local".into(),
        };
        // The bench drives its own runtime: run it on a blocking thread.
        match tokio::task::spawn_blocking(move || rangekv_bench::ycsb::run_bench(&demo)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => eprintln!("demo workload failed: {error:#}"),
            Err(error) => eprintln!("demo workload failed: {error}"),
        }
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "rangekv".into());
        println!("The cluster keeps serving. Try:");
        println!("  {exe} kv --pd {pd_url} put hello world");
        println!("  {exe} kv --pd {pd_url} get hello");
        println!("  {exe} kv --pd {pd_url} scan user user~ --limit 5");
        println!("  {exe} ctl --pd {pd_url} ranges");
    }
    println!("Press Ctrl-C to stop.");
    let mut watch = tokio::time::interval(Duration::from_millis(500));
    let result = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = watch.tick() => {
                if let Some(why) = exited(&mut processes) {
                    break Err(anyhow::anyhow!(why));
                }
            }
        }
    };
    println!("stopping the local cluster");
    stop_all(&mut processes, Duration::from_secs(10));
    result
}

//! `rangekv local`: PD and N nodes as child processes on loopback, data and logs under
//! one directory; stops them cleanly on Ctrl-C. A process that dies is reported and
//! the others keep serving; it is started again on SIGHUP, or at once with
//! `--restart-on-exit`.

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
    /// Start a node or PD that exits again at once (after a second), instead of
    /// waiting for SIGHUP.
    #[arg(long)]
    pub restart_on_exit: bool,
}

struct Process {
    name: String,
    args: Vec<String>,
    child: Child,
    log: PathBuf,
    /// Exited and not started again yet.
    down: bool,
}

fn start(name: &str, args: &[String], log: &Path, append: bool) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the rangekv executable")?;
    let out = File::options()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {name}"))
}

fn spawn(name: &str, args: &[String], log: &Path) -> anyhow::Result<Process> {
    let child = start(name, args, log, false)?;
    Ok(Process {
        name: name.to_string(),
        args: args.to_vec(),
        child,
        log: log.to_path_buf(),
        down: false,
    })
}

impl Process {
    /// Starts the process again with the same arguments, its log appended to.
    fn restart(&mut self) -> anyhow::Result<()> {
        self.child = start(&self.name, &self.args, &self.log, true)?;
        self.down = false;
        Ok(())
    }
}

/// A port on 127.0.0.1 the OS has free now (released for a child to take).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot pick a free port")?;
    Ok(listener.local_addr()?.port())
}

/// SIGTERM every process, then wait; SIGKILL what is still running after `grace`.
fn stop_all(processes: &mut [Process], grace: Duration) {
    for process in processes.iter_mut().rev().filter(|p| !p.down) {
        if let Ok(pid) = i32::try_from(process.child.id()) {
            // SAFETY: plain kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let give_up = std::time::Instant::now() + grace;
    for process in processes.iter_mut().filter(|p| !p.down) {
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

/// Marks the processes that exited since the last look, saying so; returns whether
/// any did.
fn report_exits(processes: &mut [Process], restart_on_exit: bool) -> bool {
    let mut any = false;
    for process in processes.iter_mut().filter(|p| !p.down) {
        if let Ok(Some(status)) = process.child.try_wait() {
            process.down = true;
            any = true;
            let then = if restart_on_exit {
                "starting it again in a second".to_string()
            } else {
                format!(
                    "the others keep serving; `kill -HUP {}` starts it again",
                    std::process::id()
                )
            };
            println!(
                "{} exited ({status}); see {}; {then}",
                process.name,
                process.log.display()
            );
        }
    }
    any
}

/// Starts every process that is down again.
fn restart_down(processes: &mut [Process]) {
    for process in processes.iter_mut().filter(|p| p.down) {
        match process.restart() {
            Ok(()) => println!(
                "{} started again (pid {})",
                process.name,
                process.child.id()
            ),
            Err(error) => println!("{} could not be started again: {error:#}", process.name),
        }
    }
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
        // A fixed port per node, also when the OS picks it: a node started again
        // comes back where its clients and peers know it.
        let port = if args.node_port == 0 {
            free_port()?
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
    println!("rangekv local cluster ready");
    println!("  PD     {pd_url}  (pid {})", processes[0].child.id());
    // Named as their data directories and logs are (nodeN/, nodeN.log).
    for (i, addr) in node_addrs.iter().enumerate() {
        println!("  node{i}  {addr}  (pid {})", processes[i + 1].child.id());
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
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    let mut watch = tokio::time::interval(Duration::from_millis(200));
    let mut restart_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hangup.recv() => {
                report_exits(&mut processes, args.restart_on_exit);
                restart_down(&mut processes);
            }
            _ = watch.tick() => {
                if report_exits(&mut processes, args.restart_on_exit) && args.restart_on_exit {
                    restart_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
                if restart_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
                    restart_at = None;
                    restart_down(&mut processes);
                }
            }
        }
    }
    println!("stopping the local cluster");
    stop_all(&mut processes, Duration::from_secs(10));
    Ok(())
}

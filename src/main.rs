//! `rangekv`: the one binary. Subcommands: `node`, `pd`, `local`, `kv`, `bench`, `ctl`.

mod kv_cmd;
mod local;
mod node_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc, as TiKV uses: glibc's malloc took ~12 % of the CPU of a YCSB load
/// (bench/README.md, "Throughput levers"), mostly in its free-list upkeep. It is
/// built unprefixed, so it is also the process's `malloc`: RocksDB's memtables and
/// buffers come from it too.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (the `MALLOC_CONF` environment variable
/// still overrides them):
/// - `thp:always`: its mappings are backed by transparent huge pages where the
///   kernel allows them (`enabled` = `always` or `madvise`). A memtable or log
///   buffer then faults once per 2 MiB instead of once per 4 KiB page: a YCSB load
///   took ~350,000 page faults per 200,000 inserts without it, ~14,000 with it.
/// - `background_thread:true`: unused dirty pages are returned to the kernel by
///   jemalloc's own thread, not by whichever request thread frees memory.
///
/// bench/README.md, "Throughput levers", has the measurements.
#[export_name = "malloc_conf"]
static MALLOC_CONF: JemallocOptions =
    JemallocOptions(c"thp:always,background_thread:true".as_ptr());

/// A pointer to a static C string, as jemalloc's `malloc_conf` symbol is declared.
#[repr(transparent)]
struct JemallocOptions(*const std::ffi::c_char);

// SAFETY: the pointer is to an immutable static string, never written.
unsafe impl Sync for JemallocOptions {}

#[derive(Parser)]
#[command(
    name = "rangekv",
    version,
    about = "Multi-Raft sharded key-value storage engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a storage node (one store).
    Node(node_cmd::NodeArgs),
    /// Run the placement driver.
    Pd(rangekv_placement::server::PdArgs),
    /// Run a local cluster: PD and 3 nodes as child processes on loopback.
    Local(local::LocalArgs),
    /// Read and write keys (get, put, del, scan, cas, batch).
    Kv(kv_cmd::KvArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Show the cluster (stores, ranges, leaders).
    Ctl(kv_cmd::CtlArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// YCSB core workloads A–F against rangekv.
    Ycsb(rangekv_bench::ycsb::YcsbArgs),
    /// The raft log engine, side by side with raft-engine and RocksDB.
    Log(rangekv_bench::log::LogBenchArgs),
    /// Stop the store leading the most ranges; time until every range is led and
    /// writable again.
    Failover(rangekv_bench::failover::FailoverArgs),
}

/// Runs a subcommand on a multi-threaded tokio runtime; success exits 0.
fn run_async(what: &str, job: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    run_with_status(what, async { job.await.map(|()| ExitCode::SUCCESS) })
}

/// Runs a subcommand that chooses its own exit status; an error exits 1.
fn run_with_status(
    what: &str,
    job: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rangekv {what}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(job) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("rangekv {what}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Node(_) | Command::Pd(_) | Command::Local(_)
    ) {
        node_cmd::hold_stop_signals();
    }
    match cli.command {
        Command::Node(args) => run_async("node", node_cmd::run_node(args)),
        Command::Pd(args) => run_async("pd", node_cmd::run_pd(args)),
        Command::Local(args) => run_async("local", local::run_local(args)),
        Command::Kv(args) => run_with_status("kv", kv_cmd::run_kv(args)),
        Command::Ctl(args) => run_with_status("ctl", kv_cmd::run_ctl(args)),
        Command::Bench(BenchCommand::Ycsb(args)) => match rangekv_bench::ycsb::run_bench(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rangekv bench ycsb: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(BenchCommand::Failover(args)) => match rangekv_bench::failover::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rangekv bench failover: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(BenchCommand::Log(args)) => match rangekv_bench::log::run(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rangekv bench log: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

//! `rangekv`: the one binary. Subcommands: `node`, `pd`, `local`, `kv`, `bench`, `ctl`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Node,
    /// Run the placement driver.
    Pd,
    /// Run an embedded local cluster (PD + 3 nodes) in one process.
    Local,
    /// Read and write keys (get, put, del, scan, cas, batch).
    Kv,
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Show and steer the cluster (stores, ranges, leaders).
    Ctl,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// YCSB core workloads A–F against rangekv or etcd.
    Ycsb,
    /// The raft log engine, side by side with raft-engine and RocksDB.
    Log(rangekv_bench::log::LogBenchArgs),
}

/// A subcommand whose issue has not landed: say so and fail.
fn not_yet(what: &str, issue: &str) -> ExitCode {
    eprintln!("rangekv {what}: not implemented yet (tracked by the {issue} issue)");
    ExitCode::from(2)
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
    match cli.command {
        Command::Node => not_yet("node", "replication core"),
        Command::Pd => not_yet("pd", "replication core"),
        Command::Local => not_yet("local", "replication core"),
        Command::Kv => not_yet("kv", "client"),
        Command::Ctl => not_yet("ctl", "client"),
        Command::Bench(BenchCommand::Ycsb) => not_yet("bench ycsb", "YCSB bench"),
        Command::Bench(BenchCommand::Log(args)) => match rangekv_bench::log::run(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rangekv bench log: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

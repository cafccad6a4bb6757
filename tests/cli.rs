//! The binary's command line: every subcommand exists; those not built yet fail loudly.

use std::process::Command;

fn rangekv(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rangekv"))
        .args(args)
        .output()
        .expect("the rangekv binary runs")
}

#[test]
fn help_lists_every_subcommand() {
    let out = rangekv(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["node", "pd", "local", "kv", "bench", "ctl"] {
        assert!(help.contains(sub), "help lacks {sub}: {help}");
    }
}

#[test]
fn unknown_subcommand_is_an_error() {
    let out = rangekv(&["frobnicate"]);
    assert!(!out.status.success());
}

#[test]
fn subcommands_not_built_yet_say_so_and_fail() {
    let out = rangekv(&["node"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not implemented yet"));
}

#[test]
fn bench_log_rejects_an_unknown_engine() {
    let dir = std::env::temp_dir();
    let out = rangekv(&[
        "bench",
        "log",
        "--ranges",
        "1",
        "--writers",
        "1",
        "--operations",
        "1",
        "--compare",
        "nosuchdb",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown engine"));
}

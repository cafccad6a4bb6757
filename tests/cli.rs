//! The binary's command line: subcommands, their flags, their errors and exit codes.

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
fn bench_ycsb_refuses_an_unknown_workload_or_property_naming_it() {
    let out = rangekv(&["bench", "ycsb", "--workloads", "z"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown workload \"z\""));
    let out = rangekv(&["bench", "ycsb", "-p", "readproportion=2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("readproportion=2"));
}

#[test]
fn node_refuses_a_bad_config_file_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    for (text, named) in [
        ("workers = 0\n", "workers is 0"),
        ("no_such_key = 1\n", "no_such_key"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = rangekv(&[
            "node",
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{stderr}");
    }
}

#[test]
fn the_documented_node_config_is_accepted() {
    // deploy/node.toml lists every key with its default; a node must accept it. The
    // PD address is unreachable, so the node fails after parsing, on connecting.
    let dir = tempfile::tempdir().unwrap();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/node.toml");
    let out = rangekv(&[
        "node",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--config",
        config,
        "--pd",
        "http://127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
        "--pd-wait-secs",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("invalid config"), "{stderr}");
    assert!(stderr.contains("cannot reach PD"), "{stderr}");
}

/// A free port on loopback (the OS picks it; it is released for the child to take).
#[allow(clippy::unwrap_used)]
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn local_cluster_starts_serves_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let pd_port = free_port().to_string();
    // Nodes take ports the OS picks.
    let node_port = "0".to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rangekv"))
        .args([
            "local",
            "--dir",
            dir.path().to_str().unwrap(),
            "--pd-port",
            &pd_port,
            "--node-port",
            &node_port,
            "--initial-ranges",
            "4",
            // What `make run` does, in small: load, a short YCSB-A, a summary.
            "--demo-records",
            "300",
            "--demo-seconds",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "rangekv local cluster ready");
    let mut banner = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("Press Ctrl-C");
        banner.push(line);
        if done {
            break;
        }
    }
    assert!(banner.iter().any(|l| l.contains("4 ranges")), "{banner:?}");
    assert!(
        banner
            .iter()
            .any(|l| l.starts_with("[rangekv] load: ") && l.contains(" 300 operations, 0 errors")),
        "{banner:?}"
    );
    assert!(
        banner.iter().any(|l| l.starts_with("[rangekv] a: ")),
        "{banner:?}"
    );
    assert!(banner.iter().any(|l| l.contains("kv --pd")), "{banner:?}");
    // "  nodeN  ADDRESS  (pid P)", named as its data directory and log are: the
    // address is the one that node's log says it serves on.
    let nodes: Vec<(String, String, i32)> = banner
        .iter()
        .filter(|l| l.trim_start().starts_with("node"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let pid = words[3].trim_end_matches(')').parse().unwrap();
            (words[0].to_string(), words[1].to_string(), pid)
        })
        .collect();
    assert_eq!(nodes.len(), 3, "{banner:?}");
    for (name, addr, _) in &nodes {
        assert!(!addr.ends_with(":0"), "real addresses: {banner:?}");
        let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap();
        assert!(
            log.contains(addr.as_str()),
            "{name}.log does not name {addr}: {log}"
        );
    }
    let pd = format!("http://127.0.0.1:{pd_port}");
    let kv = |args: &[&str]| {
        let mut all = vec!["kv", "--pd", &pd];
        all.extend_from_slice(args);
        rangekv(&all)
    };

    // A node dies: it is named, the others keep serving, SIGHUP starts it again.
    let (name, _, pid) = &nodes[1];
    // SAFETY: kill(2) on a process our child started and has not reaped.
    unsafe {
        libc::kill(*pid, libc::SIGKILL);
    }
    let line = lines.next().unwrap().unwrap();
    assert!(
        line.starts_with(&format!("{name} exited")) && line.contains("kill -HUP"),
        "{line}"
    );
    let put = kv(&["put", "survivor", "yes"]);
    assert!(put.status.success(), "{put:?}");
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGHUP);
    }
    let line = lines.next().unwrap().unwrap();
    assert!(line.starts_with(&format!("{name} started again")), "{line}");
    let get = kv(&["get", "survivor"]);
    assert!(get.status.success(), "{get:?}");
    assert!(
        String::from_utf8_lossy(&get.stdout).contains("yes"),
        "{get:?}"
    );
    // Each replica's store and role.
    let ranges = rangekv(&["ctl", "--pd", &pd, "--format", "json", "ranges"]);
    assert!(ranges.status.success(), "{ranges:?}");
    let text = String::from_utf8_lossy(&ranges.stdout);
    let voters = text.matches("\"role\":\"voter\"").count();
    assert_eq!(
        voters,
        4 * 3,
        "every replica of the 4 ranges a voter: {text}"
    );

    // Leadership moves on request; a store without a replica is refused by name.
    let ctl_json = |args: &[&str]| {
        let mut all = vec!["ctl", "--pd", &pd, "--format", "json"];
        all.extend_from_slice(args);
        let out = rangekv(&all);
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let routes = ctl_json(&["ranges"]);
    let first = &routes.as_array().unwrap()[0];
    let range = first["range_id"].as_u64().unwrap().to_string();
    let from = ctl_json(&["leader", &range])["store_id"].as_u64().unwrap();
    let to = first["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["store_id"].as_u64().unwrap())
        .find(|&store| store != from)
        .unwrap();
    let moved = ctl_json(&[
        "transfer-leader",
        &range,
        &to.to_string(),
        "--wait-secs",
        "30",
    ]);
    assert_eq!(moved["leader_store_id"], to, "{moved}");
    assert_eq!(ctl_json(&["leader", &range])["store_id"], to);
    let refused = rangekv(&["ctl", "--pd", &pd, "transfer-leader", &range, "99"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("store 99 holds no replica of range {range}")),
        "{stderr}"
    );

    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "rangekv local exited with {status}");
    for log in ["pd.log", "node0.log", "node1.log", "node2.log"] {
        assert!(dir.path().join(log).exists(), "{log} missing");
    }
}

/// A SIGTERM that arrives before a process has installed its handler (here: sent
/// while the signal is blocked, as if during start-up) is held, then handled: PD
/// stops cleanly instead of dying by the signal or never seeing it.
#[test]
fn a_stop_signal_arriving_during_start_up_stops_the_process_cleanly() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_rangekv"));
    command
        .args([
            "pd",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > give_up {
            let _ = child.kill();
            panic!("PD never acted on the SIGTERM sent while it started");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "PD exited with {status}");
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

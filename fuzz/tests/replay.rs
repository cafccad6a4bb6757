//! Runs every committed seed and every saved crash (`regressions/<target>/`) through
//! the harness of its target, on stable, as part of `cargo test`: a crash the fuzzer
//! found stays fixed even where nightly and cargo-fuzz are missing.

use std::path::Path;

type Harness = fn(&[u8]);

const TARGETS: [(&str, Harness); 4] = [
    ("raft_batch", rangekv_fuzz::raft_batch::run),
    ("kv_request", rangekv_fuzz::kv_request::run),
    ("log_record", rangekv_fuzz::log_record::run),
    ("log_replay", rangekv_fuzz::log_replay::run),
];

fn replay_dir(kind: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(kind);
    let mut count = 0;
    for (target, run) in TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = dir.map(|e| e.expect("dir entry").path()).collect();
        paths.sort();
        for path in paths {
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            let bytes = std::fs::read(&path).expect("read input");
            eprintln!("{target}: {}", path.display());
            run(&bytes);
            count += 1;
        }
    }
    count
}

#[test]
fn seeds_run_clean() {
    assert!(
        replay_dir("seeds") > 0,
        "no seeds found: run `cargo run --example gen_seeds`"
    );
}

#[test]
fn regressions_stay_fixed() {
    replay_dir("regressions");
}

#[test]
fn generated_seeds_run_clean() {
    for seed in rangekv_fuzz::seeds::all() {
        let run = TARGETS
            .iter()
            .find(|(target, _)| *target == seed.target)
            .map(|(_, run)| run)
            .expect("seed of a known target");
        run(&seed.bytes);
    }
}

/// The engine-written seeds must replay as the whole log they are, not as a torn or
/// refused one: otherwise the fuzzer starts from an input that stops at the first check.
#[test]
fn log_replay_seeds_open_with_their_ranges() {
    use std::sync::Arc;
    for seed in rangekv_fuzz::seeds::all() {
        if seed.target != "log_replay" || seed.name == "empty-log" {
            continue;
        }
        let (base, segments) = rangekv_fuzz::log_replay::segments(&seed.bytes).expect("input");
        let fs = rangekv_log::sim::SimFileSystem::new();
        for (i, bytes) in segments.iter().enumerate() {
            use rangekv_log::file::FileSystem;
            let file = fs
                .create(&rangekv_fuzz::log_replay::segment_name(base + i as u64), 0)
                .expect("create");
            file.write_all_at(bytes, 0).expect("write");
        }
        let engine = rangekv_log::LogEngine::open(Arc::new(fs), rangekv_fuzz::log_replay::config())
            .unwrap_or_else(|e| panic!("{}: {e}", seed.name));
        let ranges = engine.ranges();
        assert_eq!(ranges.len(), 2, "{}: {ranges:?}", seed.name);
        let a = rangekv_types::RangeId(1);
        assert_eq!(engine.first_index(a), 17, "{}", seed.name);
        assert_eq!(engine.last_index(a), 32, "{}", seed.name);
        engine
            .entries(a, 17, 33, None)
            .unwrap_or_else(|e| panic!("{}: {e}", seed.name));
    }
}

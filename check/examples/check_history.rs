//! Checks a history saved as JSON (the nemesis test keeps `history.json` when its
//! verdict is not "linearizable"): `cargo run --release -p rangekv-check --example
//! check_history -- FILE [SECONDS]` (default budget 600 s).

use std::time::{Duration, Instant};

use rangekv_check::{check_report, Budget, History};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: check_history FILE [SECONDS]")?;
    let seconds: u64 = match args.next() {
        Some(s) => s.parse()?,
        None => 600,
    };
    let history: History = serde_json::from_slice(&std::fs::read(&path)?)?;
    let started = Instant::now();
    let report = check_report(&history, Budget::time(Duration::from_secs(seconds)));
    println!(
        "{} operations, {} keys; checked {} keys ({} operations) in {:.1} s, {} steps",
        report.ops,
        report.keys,
        report.keys_checked,
        report.ops_checked,
        started.elapsed().as_secs_f64(),
        report.steps
    );
    println!("{:?}", report.verdict);
    Ok(())
}

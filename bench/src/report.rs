//! Latency summaries and the JSON report shape shared by every benchmark.

use hdrhistogram::Histogram;
use serde::Serialize;

/// The commit the benchmark binary was built from.
pub const COMMIT: &str = env!("RANGEKV_COMMIT");

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn from_histogram(histogram: &Histogram<u64>) -> Self {
        Latency {
            count: histogram.len(),
            mean_us: histogram.mean(),
            p50_us: histogram.value_at_quantile(0.50),
            p95_us: histogram.value_at_quantile(0.95),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        }
    }
}

/// A histogram of microsecond latencies from 1 µs to 100 s at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3)
        .expect("constant histogram bounds are valid: 1 <= low, high >= 2 * low, sigfig 3")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_recorded_values() {
        let mut histogram = latency_histogram();
        for us in 1..=1000 {
            histogram.record(us).unwrap();
        }
        let latency = Latency::from_histogram(&histogram);
        assert_eq!(latency.count, 1000);
        assert!((499..=501).contains(&latency.p50_us), "{latency:?}");
        assert!((989..=991).contains(&latency.p99_us), "{latency:?}");
        assert_eq!(latency.max_us, 1000);
        assert!(!COMMIT.is_empty());
    }
}

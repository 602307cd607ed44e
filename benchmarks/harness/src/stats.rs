//! Latency recording (HDR histograms in microseconds) and the figures a report shows.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency recorded exactly: one hour; anything longer is clamped to it.
const MAX_US: u64 = 3_600_000_000;

/// Latencies of successful requests, in microseconds, with 3 significant digits.
#[derive(Debug, Clone)]
pub struct Recorder(Histogram<u64>);

impl Default for Recorder {
    fn default() -> Self {
        // Bounds are constants within the crate's limits: construction cannot fail.
        Recorder(Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|e| panic!("histogram bounds: {e}")))
    }
}

impl Recorder {
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(MAX_US).clamp(1, MAX_US);
        self.0.saturating_record(us);
    }

    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at `quantile` (0..=1), in microseconds; 0 with nothing recorded.
    pub fn quantile_us(&self, quantile: f64) -> u64 {
        if self.0.is_empty() { 0 } else { self.0.value_at_quantile(quantile) }
    }

    pub fn max_us(&self) -> u64 {
        self.0.max()
    }

    pub fn mean_us(&self) -> f64 {
        self.0.mean()
    }

    /// (percentile, latency in µs) points from p0 to p99.99 for a latency plot.
    pub fn percentile_curve(&self) -> Vec<(f64, u64)> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let mut points = Vec::new();
        // Evenly spaced in "number of nines" so the tail gets as much room as the body.
        for i in 0..=80 {
            let nines = f64::from(i) * 4.0 / 80.0; // 0 .. 4 nines (p99.99)
            let quantile = 1.0 - 10f64.powf(-nines);
            points.push((quantile * 100.0, self.0.value_at_quantile(quantile)));
        }
        points
    }
}

/// The figures of one mode in one scenario.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub requests: u64,
    pub throughput: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Non-2xx answers and requests without an answer, by status ("none" for the latter).
    pub errors: Vec<(String, u64)>,
}

impl Summary {
    pub fn of(m: &crate::loadgen::Measurement) -> Summary {
        let r = &m.recorder;
        let mut errors: Vec<(String, u64)> =
            m.statuses.iter().filter(|(s, _)| !(200..300).contains(*s)).map(|(s, n)| (s.to_string(), *n)).collect();
        if m.failed > 0 {
            errors.push(("none".into(), m.failed));
        }
        Summary {
            requests: m.sent,
            throughput: m.throughput(),
            p50_us: r.quantile_us(0.50),
            p90_us: r.quantile_us(0.90),
            p99_us: r.quantile_us(0.99),
            p999_us: r.quantile_us(0.999),
            max_us: r.max_us(),
            errors,
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.iter().map(|(_, n)| n).sum()
    }
}

/// `a / b`, or `None` when `b` is zero (nothing to compare with).
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut r = Recorder::default();
        // 1..=1000 µs once each: p50 = 500, p99 = 990, max = 1000.
        for us in 1..=1000u64 {
            r.record(Duration::from_micros(us));
        }
        assert_eq!(r.count(), 1000);
        assert_eq!(r.quantile_us(0.5), 500);
        assert_eq!(r.quantile_us(0.99), 990);
        assert_eq!(r.max_us(), 1000);
        assert!((r.mean_us() - 500.5).abs() < 0.5, "{}", r.mean_us());
    }

    #[test]
    fn three_significant_digits_hold_at_large_values() {
        let mut r = Recorder::default();
        r.record(Duration::from_micros(1_234_567));
        let got = r.quantile_us(0.5) as f64;
        assert!((got - 1_234_567.0).abs() / 1_234_567.0 < 0.001, "{got}");
        // Zero and beyond-range latencies are clamped, never dropped.
        r.record(Duration::ZERO);
        r.record(Duration::from_secs(100_000));
        assert_eq!(r.count(), 3);
        assert_eq!(r.quantile_us(0.0), 1);
        assert!(r.max_us() >= MAX_US);
    }

    #[test]
    fn merging_adds_counts_and_keeps_the_tail() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for _ in 0..99 {
            a.record(Duration::from_micros(100));
        }
        b.record(Duration::from_millis(50));
        a.merge(&b);
        assert_eq!(a.count(), 100);
        assert_eq!(a.quantile_us(0.5), 100);
        assert!(a.quantile_us(1.0) >= 49_900, "{}", a.quantile_us(1.0));
    }

    #[test]
    fn the_percentile_curve_rises_to_the_tail() {
        let mut r = Recorder::default();
        for us in 1..=10_000u64 {
            r.record(Duration::from_micros(us));
        }
        let curve = r.percentile_curve();
        assert_eq!(curve.first().map(|p| p.0), Some(0.0));
        assert!((curve.last().map(|p| p.0).unwrap_or_default() - 99.99).abs() < 1e-9);
        assert!(curve.windows(2).all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0), "monotonic");
        assert!(Recorder::default().percentile_curve().is_empty());
    }

    #[test]
    fn ratios_refuse_a_zero_baseline() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }
}

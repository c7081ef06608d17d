//! A lock-free latency histogram.
//!
//! Values (nanoseconds, by convention) fall into log-linear buckets: 32
//! sub-buckets per power of two, so any reported percentile is within about
//! 3% of the true value. Recording is two relaxed atomic adds and no
//! allocation, so it is cheap enough for the page-fault path and safe to share
//! between threads.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// Concurrent histogram of `u64` samples.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

/// Summary of a histogram, in the unit the samples were recorded in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    let sub = (v >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// The smallest and largest value that land in bucket `b`.
fn bucket_range(b: usize) -> (u64, u64) {
    let b = b as u64;
    if b < SUB {
        return (b, b);
    }
    let exp = (b / SUB) as u32 + SUB_BITS - 1;
    let sub = b % SUB;
    let low = (1u64 << exp) | (sub << (exp - SUB_BITS));
    let width = 1u64 << (exp - SUB_BITS);
    (low, low.saturating_add(width - 1))
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }

    /// Records one sample.
    pub fn record(&self, v: u64) {
        self.buckets[bucket_of(v)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.min.fetch_min(v, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
    }

    /// Records a duration in nanoseconds.
    pub fn record_duration(&self, d: std::time::Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Adds every sample of `other` to `self`.
    pub fn merge(&self, other: &Histogram) {
        for (mine, theirs) in self.buckets.iter().zip(other.buckets.iter()) {
            let n = theirs.load(Ordering::Relaxed);
            if n != 0 {
                mine.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.count
            .fetch_add(other.count.load(Ordering::Relaxed), Ordering::Relaxed);
        self.sum
            .fetch_add(other.sum.load(Ordering::Relaxed), Ordering::Relaxed);
        self.min
            .fetch_min(other.min.load(Ordering::Relaxed), Ordering::Relaxed);
        self.max
            .fetch_max(other.max.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Number of samples recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the samples.
    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }

    /// For each of the ascending `bounds`, the number of samples at or
    /// below it, as a Prometheus histogram's buckets count them. A sample
    /// is counted under a bound when its whole bucket lies at or below it,
    /// so a count can miss samples within about 3% below the bound.
    pub fn cumulative(&self, bounds: &[u64]) -> Vec<u64> {
        let mut out = vec![0; bounds.len()];
        let mut seen = 0;
        let mut next = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            let (_, high) = bucket_range(b);
            while next < bounds.len() && high > bounds[next] {
                out[next] = seen;
                next += 1;
            }
            if next == bounds.len() {
                return out;
            }
            seen += n.load(Ordering::Relaxed);
        }
        for o in &mut out[next..] {
            *o = seen;
        }
        out
    }

    /// The value at quantile `q` (0.0 ..= 1.0), or 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        self.quantile_of(&counts, total, q)
    }

    fn quantile_of(&self, counts: &[u64], total: u64, q: f64) -> u64 {
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bucket_range(b);
                let mid = low + (high - low) / 2;
                let min = self.min.load(Ordering::Relaxed);
                let max = self.max.load(Ordering::Relaxed);
                return mid.clamp(min, max);
            }
        }
        self.max.load(Ordering::Relaxed)
    }

    /// Summary statistics.
    pub fn percentiles(&self) -> Percentiles {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Percentiles::default();
        }
        Percentiles {
            count: total,
            min: self.min.load(Ordering::Relaxed),
            mean: self.sum.load(Ordering::Relaxed) as f64 / total as f64,
            p50: self.quantile_of(&counts, total, 0.50),
            p90: self.quantile_of(&counts, total, 0.90),
            p99: self.quantile_of(&counts, total, 0.99),
            p999: self.quantile_of(&counts, total, 0.999),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

impl Percentiles {
    /// The same summary with every value divided by `div` (e.g. ns to µs).
    pub fn scaled(&self, div: f64) -> ScaledPercentiles {
        ScaledPercentiles {
            count: self.count,
            min: self.min as f64 / div,
            mean: self.mean / div,
            p50: self.p50 as f64 / div,
            p90: self.p90 as f64 / div,
            p99: self.p99 as f64 / div,
            p999: self.p999 as f64 / div,
            max: self.max as f64 / div,
        }
    }
}

/// [`Percentiles`] in a derived unit (microseconds, usually).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ScaledPercentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cumulative_counts_samples_at_or_below_each_bound() {
        let h = Histogram::new();
        for v in [1, 5, 31, 1000, 1000, 50_000, u64::MAX] {
            h.record(v);
        }
        assert_eq!(
            h.cumulative(&[0, 1, 31, 999, 1_100, 1_000_000]),
            vec![0, 1, 3, 3, 5, 6]
        );
        assert_eq!(h.cumulative(&[]), Vec::<u64>::new());
        assert_eq!(Histogram::new().cumulative(&[10]), vec![0]);
    }

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for b in 0..BUCKETS {
            let (low, high) = bucket_range(b);
            assert!(low <= high);
            if b > 0 {
                assert_eq!(low, last + 1, "bucket {b} leaves a gap");
            }
            last = high;
        }
        assert_eq!(last, u64::MAX);
    }

    #[test]
    fn percentiles_of_uniform_samples() {
        let h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let p = h.percentiles();
        assert_eq!(p.count, 10_000);
        assert_eq!(p.min, 1);
        assert_eq!(p.max, 10_000);
        for (got, want) in [(p.p50, 5_000.0), (p.p99, 9_900.0), (p.p999, 9_990.0)] {
            let err = (got as f64 - want).abs() / want;
            assert!(err < 0.04, "got {got}, want about {want}");
        }
    }

    #[test]
    fn merge_adds_samples() {
        let a = Histogram::new();
        let b = Histogram::new();
        a.record(10);
        b.record(1_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.percentiles().max, 1_000_000);
    }

    #[test]
    fn empty_histogram_reports_zeroes() {
        assert_eq!(Histogram::new().percentiles(), Percentiles::default());
    }

    proptest! {
        #[test]
        fn value_lies_in_its_bucket(v in any::<u64>()) {
            let (low, high) = bucket_range(bucket_of(v));
            prop_assert!(low <= v && v <= high);
            // Relative bucket width stays within 1/32.
            prop_assert!((high - low) as f64 <= (low as f64 / 32.0).max(0.0) + 1.0);
        }
    }
}

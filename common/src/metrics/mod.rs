//! Prometheus metrics: what a daemon's `/metrics` answers.
//!
//! Daemons keep their counters where they count them (atomics, and
//! [`Histogram`]s on the fault and request paths); a scrape reads them into
//! an [`Exposition`], which the `prometheus` crate (TiKV's, without its
//! protobuf encoder) writes in the Prometheus text format 0.0.4 that every
//! scraper and `promtool check metrics` read. Nothing is registered ahead
//! and nothing is counted twice: a scrape costs the daemon the reads of its
//! own counters, and the fault path pays nothing for being observed.
//!
//! Conventions (checked by `promtool check metrics` in the tests): every
//! name starts with `rmem_`, is in base units (`_seconds`, `_bytes`),
//! counters end in `_total`, latencies are histograms over [`LATENCY_BOUNDS`],
//! and labels take few values (an operation, an outcome, a tenant, a role;
//! never a pid, an address or a page).
//!
//! [`endpoint`] serves an exposition over HTTP, or HTTPS with mutual TLS.

pub mod endpoint;

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram as PromHistogram, LabelPair, Metric, MetricFamily, MetricType,
};

use crate::Histogram;

/// Upper bounds (seconds) of the latency histograms' buckets: 1 µs to 10 s,
/// three per decade, wide enough for a fault on a local link and for an
/// invalidation waiting on a dead member's lease.
pub const LATENCY_BOUNDS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The metrics of one scrape, in the order they were added.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<MetricFamily>,
}

/// One metric family being filled: add a sample per label set.
#[derive(Debug)]
pub struct Family<'a> {
    family: &'a mut MetricFamily,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> Family<'_> {
        debug_assert!(name.starts_with("rmem_"), "{name} lacks the rmem_ prefix");
        debug_assert_eq!(
            kind == MetricType::COUNTER,
            name.ends_with("_total"),
            "{name}: counters, and only counters, end in _total"
        );
        let mut family = MetricFamily::default();
        family.set_name(name.to_string());
        family.set_help(help.to_string());
        family.set_field_type(kind);
        self.families.push(family);
        Family {
            family: self.families.last_mut().expect("just pushed"),
        }
    }

    /// A counter family (`name` ends in `_total`).
    pub fn counter(&mut self, name: &str, help: &str) -> Family<'_> {
        self.family(name, help, MetricType::COUNTER)
    }

    /// A gauge family.
    pub fn gauge(&mut self, name: &str, help: &str) -> Family<'_> {
        self.family(name, help, MetricType::GAUGE)
    }

    /// A histogram family of latencies, in seconds.
    pub fn histogram(&mut self, name: &str, help: &str) -> Family<'_> {
        self.family(name, help, MetricType::HISTOGRAM)
    }

    /// `rmem_build_info{daemon, version} 1`, which every daemon exports.
    pub fn build_info(&mut self, daemon: &str) {
        self.gauge(
            "rmem_build_info",
            "Always 1; its labels name the daemon and its version.",
        )
        .set(
            &[("daemon", daemon), ("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
    }

    /// The exposition in the Prometheus text format (families with no
    /// sample are left out, as the format wants).
    pub fn encode(&self) -> String {
        let families: Vec<MetricFamily> = self
            .families
            .iter()
            .filter(|f| !f.get_metric().is_empty())
            .cloned()
            .collect();
        let mut out = String::new();
        // Only fails on a family with no sample or no name, left out above.
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        out
    }

    /// The value of a sample, for tests: the family `name`, the sample
    /// whose labels include every pair of `labels` (counters and gauges).
    #[cfg(test)]
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = self.families.iter().find(|f| f.name() == name)?;
        let metric = family.get_metric().iter().find(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })?;
        match family.get_field_type() {
            MetricType::COUNTER => Some(metric.get_counter().get_value()),
            MetricType::GAUGE => Some(metric.get_gauge().get_value()),
            MetricType::HISTOGRAM => Some(metric.get_histogram().get_sample_count() as f64),
            _ => None,
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_string());
            l.set_value((*v).to_string());
            l
        })
        .collect()
}

impl Family<'_> {
    /// Adds a counter's or gauge's sample.
    pub fn set(&mut self, label_pairs: &[(&str, &str)], value: impl Into<Value>) -> &mut Self {
        let value = value.into().0;
        let mut m = Metric::from_label(labels(label_pairs));
        match self.family.get_field_type() {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        self.family.mut_metric().push(m);
        self
    }

    /// Adds a histogram's sample from a [`Histogram`] of nanoseconds.
    pub fn observe(&mut self, label_pairs: &[(&str, &str)], h: &Histogram) -> &mut Self {
        debug_assert_eq!(self.family.get_field_type(), MetricType::HISTOGRAM);
        let bounds_ns: Vec<u64> = LATENCY_BOUNDS
            .iter()
            .map(|s| (s * 1e9).round() as u64)
            .collect();
        // Samples land while a scrape reads: the count is read first and
        // the buckets, read after it, are clamped to it, so no bucket
        // exceeds +Inf (the count) as the format requires.
        let count = h.count();
        let buckets = LATENCY_BOUNDS
            .iter()
            .zip(h.cumulative(&bounds_ns))
            .map(|(&bound, n)| {
                let mut b = Bucket::default();
                b.set_upper_bound(bound);
                b.set_cumulative_count(n.min(count));
                b
            })
            .collect();
        let mut p = PromHistogram::default();
        p.set_sample_count(count);
        p.set_sample_sum(h.sum() as f64 / 1e9);
        p.set_bucket(buckets);
        let mut m = Metric::from_label(labels(label_pairs));
        m.set_histogram(p);
        self.family.mut_metric().push(m);
        self
    }
}

/// A sample's value: counters from `u64`, gauges from either.
#[derive(Debug, Clone, Copy)]
pub struct Value(f64);

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value(v as f64)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value(v as f64)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value(if v { 1.0 } else { 0.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_encode_in_the_text_format() {
        let h = Histogram::new();
        h.record(30_000); // 30 µs
        h.record(2_000_000); // 2 ms
        let mut e = Exposition::new();
        e.build_info("test");
        e.counter("rmem_requests_total", "Requests.")
            .set(&[("op", "get")], 3u64)
            .set(&[("op", "put")], 4u64);
        e.gauge("rmem_pool_bytes", "Pool.").set(&[], 4096u64);
        e.histogram("rmem_request_seconds", "Latency.")
            .observe(&[("op", "get")], &h);
        e.gauge("rmem_empty", "Nothing.");
        let text = e.encode();
        assert!(
            text.contains("# TYPE rmem_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("rmem_requests_total{op=\"put\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("rmem_pool_bytes 4096\n"), "{text}");
        assert!(
            text.contains("rmem_request_seconds_bucket{op=\"get\",le=\"0.00005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("rmem_request_seconds_bucket{op=\"get\",le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("rmem_request_seconds_count{op=\"get\"} 2\n"));
        assert!(!text.contains("rmem_empty"), "{text}");
        assert_eq!(e.value("rmem_requests_total", &[("op", "get")]), Some(3.0));
        assert_eq!(e.value("rmem_request_seconds", &[]), Some(2.0));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::new();
        e.gauge("rmem_tenant_pages", "Pages.")
            .set(&[("tenant", "a\"b\\c\nd")], 1u64);
        assert!(
            e.encode()
                .contains(r#"rmem_tenant_pages{tenant="a\"b\\c\nd"} 1"#),
            "{}",
            e.encode()
        );
    }
}

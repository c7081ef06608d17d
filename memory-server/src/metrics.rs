//! Operation counters and latency histograms, read by the admin Stats call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rmem_common::Histogram;

/// A data-plane operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    Free,
    Stat,
    /// LOCATE over the RDMA data plane (the READs themselves never reach
    /// the server's CPU, so they are not counted here).
    Locate,
}

impl Op {
    /// Every operation, in a stable order.
    pub const ALL: [Op; 5] = [Op::Put, Op::Get, Op::Free, Op::Stat, Op::Locate];

    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Free => "free",
            Op::Stat => "stat",
            Op::Locate => "locate",
        }
    }
}

/// Counters of one operation.
#[derive(Debug, Default)]
pub struct OpMetrics {
    pub requests: AtomicU64,
    pub pages: AtomicU64,
    /// Pages answered with a status other than OK.
    pub errors: AtomicU64,
    /// Service time in nanoseconds.
    pub latency: Histogram,
}

/// Every counter of a server.
#[derive(Debug)]
pub struct Metrics {
    ops: [OpMetrics; 5],
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Connections refused at accept by [`crate::transport::admission`].
    pub admissions_refused: AtomicU64,
    pub started: Instant,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            ops: Default::default(),
            connections_open: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            admissions_refused: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
}

impl Metrics {
    /// The counters of `op`.
    pub fn op(&self, op: Op) -> &OpMetrics {
        &self.ops[op as usize]
    }

    /// Records one served request.
    pub fn record(&self, op: Op, pages: u64, errors: u64, started: Instant) {
        let m = self.op(op);
        m.requests.fetch_add(1, Ordering::Relaxed);
        m.pages.fetch_add(pages, Ordering::Relaxed);
        m.errors.fetch_add(errors, Ordering::Relaxed);
        m.latency.record_duration(started.elapsed());
    }
}

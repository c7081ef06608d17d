//! Operation counters and latency histograms, read by the admin Stats call
//! and by `/metrics` ([`Metrics::exposition`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rmem_common::Histogram;
use rmem_common::metrics::Exposition;

use crate::store::Store;

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
    /// Pages answered OK (kept apart, not derived, so a scrape between
    /// the two adds never sees it go down).
    pub ok: AtomicU64,
    /// Service time in nanoseconds.
    pub latency: Histogram,
}

/// How a request reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The TCP data plane (with or without TLS).
    Tcp,
    /// The RDMA data plane's requests that reach the server's CPU (staged
    /// PUTs and LOCATE; one-sided READs never do).
    Rdma,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Tcp, Transport::Rdma];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Rdma => "rdma",
        }
    }
}

/// Every counter of a server.
#[derive(Debug)]
pub struct Metrics {
    /// By operation, then transport.
    ops: [[OpMetrics; 2]; 5],
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

/// An operation's counters over both transports.
#[derive(Debug, Default)]
pub struct OpTotals {
    pub requests: u64,
    pub pages: u64,
    pub errors: u64,
    pub latency: Histogram,
}

impl Metrics {
    /// The counters of `op` on `transport`.
    pub fn op(&self, op: Op, transport: Transport) -> &OpMetrics {
        &self.ops[op as usize][transport as usize]
    }

    /// The counters of `op` summed over the transports.
    pub fn totals(&self, op: Op) -> OpTotals {
        let t = OpTotals::default();
        let (mut requests, mut pages, mut errors) = (0, 0, 0);
        for m in &self.ops[op as usize] {
            requests += m.requests.load(Ordering::Relaxed);
            pages += m.pages.load(Ordering::Relaxed);
            errors += m.errors.load(Ordering::Relaxed);
            t.latency.merge(&m.latency);
        }
        OpTotals {
            requests,
            pages,
            errors,
            latency: t.latency,
        }
    }

    /// Records one served request.
    pub fn record(&self, op: Op, transport: Transport, pages: u64, errors: u64, started: Instant) {
        let m = self.op(op, transport);
        m.requests.fetch_add(1, Ordering::Relaxed);
        m.pages.fetch_add(pages, Ordering::Relaxed);
        m.errors.fetch_add(errors, Ordering::Relaxed);
        m.ok.fetch_add(pages.saturating_sub(errors), Ordering::Relaxed);
        m.latency.record_duration(started.elapsed());
    }

    /// What the server's `/metrics` answers: these counters and the
    /// store's occupancy, read now.
    pub fn exposition(&self, store: &Store) -> Exposition {
        const PAGE: u64 = rmem_proto::wire::PAGE_SIZE as u64;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut e = Exposition::new();
        e.build_info("server");
        e.gauge("rmem_server_pool_capacity_bytes", "Size of the page pool.")
            .set(&[], store.capacity_pages() * PAGE);
        e.gauge(
            "rmem_server_pool_used_bytes",
            "Bytes of the page pool holding pages.",
        )
        .set(&[], store.used_pages() * PAGE);
        let mut tenants: Vec<_> = store.tenants().collect();
        tenants.sort_by_key(|t| t.id);
        let mut used = e.gauge(
            "rmem_server_tenant_used_bytes",
            "Bytes of the pool holding each tenant's pages.",
        );
        for t in &tenants {
            used.set(&[("tenant", &t.name)], t.used() * PAGE);
        }
        let mut quota = e.gauge(
            "rmem_server_tenant_quota_bytes",
            "Each tenant's quota (tenants with one).",
        );
        for t in tenants.iter().filter(|t| t.quota_pages != u64::MAX) {
            quota.set(&[("tenant", &t.name)], t.quota_pages.saturating_mul(PAGE));
        }
        let each = || {
            Op::ALL.into_iter().flat_map(|op| {
                Transport::ALL
                    .into_iter()
                    .map(move |tr| (op, tr))
                    .filter(move |&(op, tr)| match tr {
                        // LOCATE exists only on the RDMA plane.
                        Transport::Tcp => op != Op::Locate,
                        Transport::Rdma => matches!(op, Op::Put | Op::Locate),
                    })
            })
        };
        let mut requests = e.counter(
            "rmem_server_requests_total",
            "Data-plane requests served, by operation and transport.",
        );
        for (op, tr) in each() {
            requests.set(
                &[("op", op.as_str()), ("transport", tr.as_str())],
                load(&self.op(op, tr).requests),
            );
        }
        let mut pages = e.counter(
            "rmem_server_pages_total",
            "Pages named in data-plane requests, by operation, transport and outcome (error: any status but ok).",
        );
        for (op, tr) in each() {
            let m = self.op(op, tr);
            for (outcome, n) in [("ok", load(&m.ok)), ("error", load(&m.errors))] {
                pages.set(
                    &[
                        ("op", op.as_str()),
                        ("transport", tr.as_str()),
                        ("outcome", outcome),
                    ],
                    n,
                );
            }
        }
        let mut latency = e.histogram(
            "rmem_server_request_duration_seconds",
            "Time to serve a data-plane request, from its arrival to its answer.",
        );
        for (op, tr) in each() {
            latency.observe(
                &[("op", op.as_str()), ("transport", tr.as_str())],
                &self.op(op, tr).latency,
            );
        }
        let ok_pages = |op: Op| {
            Transport::ALL
                .iter()
                .map(|&tr| load(&self.op(op, tr).ok))
                .sum::<u64>()
        };
        e.counter(
            "rmem_server_page_bytes_total",
            "Page data stored (in) and served over TCP (out); RDMA READs bypass the server and are not counted.",
        )
        .set(&[("direction", "in")], ok_pages(Op::Put) * PAGE)
        .set(&[("direction", "out")], ok_pages(Op::Get) * PAGE);
        let (received, stored) = store.checksum_failures();
        e.counter(
            "rmem_server_checksum_failures_total",
            "Pages refused because their data did not match their CRC (received), or stored pages that failed theirs when read (stored).",
        )
        .set(&[("where", "received")], received)
        .set(&[("where", "stored")], stored);
        e.counter(
            "rmem_server_pages_adopted_total",
            "Pages moved from their tenant's extents (where a restart reloads them) into the extents of the agent that located them over RDMA.",
        )
        .set(&[], store.adopted());
        e.gauge("rmem_server_connections", "Data-plane connections open.")
            .set(&[], load(&self.connections_open));
        e.counter(
            "rmem_server_connections_total",
            "Data-plane connections accepted.",
        )
        .set(&[], load(&self.connections_total));
        e.counter(
            "rmem_server_connections_refused_total",
            "Connections refused at accept (too many, or too many unauthenticated).",
        )
        .set(&[], load(&self.admissions_refused));
        e.counter(
            "rmem_server_protocol_errors_total",
            "Connections closed for a malformed or unexpected frame.",
        )
        .set(&[], load(&self.protocol_errors));
        e.counter(
            "rmem_server_auth_failures_total",
            "Handshakes refused for a bad credential or certificate.",
        )
        .set(&[], load(&self.auth_failures));
        e.gauge(
            "rmem_server_coordinator_unknown",
            "1 while the server has a pool from a cluster whose coordinator it cannot confirm.",
        )
        .set(&[], store.coordinator_unknown());
        e
    }
}

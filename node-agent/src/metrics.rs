//! What the agent's `/metrics` answers, for each backend: the kernel
//! agent (`rmem-agent serve`, label `path="kernel"`) and userfaultfd
//! regions (the demo, `path="userfaultfd"`). Read at each scrape from the
//! counters the fault and eviction paths keep anyway.
//!
//! The kernel path's agent sees fetches, not faults: a fault on a page
//! that is local (or zero) never reaches it, so only `result="remote"` and
//! `result="failed"` (the faulting task got SIGBUS) are counted there, and
//! the latency is the agent's share of a remote fault (reading the server
//! and answering the module).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use rmem_common::Histogram;
use rmem_common::metrics::Exposition;

use crate::kmod::daemon::Supervisor;
use crate::region::RemoteRegion;

const PAGE: u64 = rmem_proto::wire::PAGE_SIZE as u64;

/// What both backends export, each family named and explained once.
struct Figures<'a> {
    path: &'static str,
    /// Faults by result.
    faults: &'a [(&'static str, u64)],
    failed: u64,
    latency: &'a Histogram,
    evicted: u64,
    fetched: u64,
    /// Of `fetched`, pages brought back ahead of a fault.
    prefetched: u64,
    attachments: usize,
    budget_bytes: u64,
    over_budget_bytes: u64,
    /// (local, remote) bytes by redundancy policy.
    by_policy: BTreeMap<String, (u64, u64)>,
    at_risk: u64,
    /// Errors met, by plane and reason.
    errors: Vec<(&'static str, String, u64)>,
}

impl Figures<'_> {
    fn write(&self, e: &mut Exposition) {
        let path = ("path", self.path);
        let mut faults = e.counter(
            "rmem_agent_faults_total",
            "Faults the agent served, by path and result (failed: the faulting task got SIGBUS).",
        );
        for (result, n) in self.faults {
            faults.set(&[path, ("result", result)], *n);
        }
        e.counter(
            "rmem_agent_sigbus_total",
            "Faults answered with SIGBUS because no copy of the page could be read.",
        )
        .set(&[path], self.failed);
        e.histogram(
            "rmem_agent_fault_duration_seconds",
            "Time to serve a fault that read a remote page (kernel path: the agent's share, per page fetched).",
        )
        .observe(&[path], self.latency);
        e.counter(
            "rmem_agent_pages_evicted_total",
            "Pages stored on memory servers and freed locally.",
        )
        .set(&[path], self.evicted);
        e.counter(
            "rmem_agent_pages_fetched_total",
            "Pages read back from memory servers.",
        )
        .set(&[path], self.fetched);
        e.counter(
            "rmem_agent_prefetch_issued_total",
            "Pages fetched ahead of a fault.",
        )
        .set(&[path], self.prefetched);
        e.gauge(
            "rmem_agent_attachments",
            "Processes attached (a region on the userfaultfd path).",
        )
        .set(&[], self.attachments);
        e.gauge(
            "rmem_agent_budget_bytes",
            "Sum of the attached processes' budgets (processes without one are not counted).",
        )
        .set(&[], self.budget_bytes);
        e.gauge(
            "rmem_agent_over_budget_bytes",
            "Bytes in RAM beyond their budget, summed over the attachments that have one, at the last round.",
        )
        .set(&[], self.over_budget_bytes);
        let mut local = e.gauge(
            "rmem_agent_local_bytes",
            "Attached memory in RAM at the last round, by redundancy policy.",
        );
        for (policy, (l, _)) in &self.by_policy {
            local.set(&[("redundancy", policy)], *l);
        }
        let mut remote = e.gauge(
            "rmem_agent_remote_bytes",
            "Attached memory on memory servers at the last round, by redundancy policy.",
        );
        for (policy, (_, r)) in &self.by_policy {
            remote.set(&[("redundancy", policy)], *r);
        }
        e.gauge(
            "rmem_agent_pages_at_risk",
            "Pages with fewer live copies or shards than their redundancy asks.",
        )
        .set(&[], self.at_risk);
        let mut errors = e.counter(
            "rmem_agent_errors_total",
            "Errors by plane and reason: data-plane requests that failed after their retries and pages a server answered with a status but ok; control calls that failed, by the coordinator's rmem-reason.",
        );
        for (plane, reason, n) in &self.errors {
            errors.set(&[("plane", plane), ("reason", reason)], *n);
        }
    }
}

/// The kernel agent's metrics.
pub fn kernel(sup: &Supervisor) -> Exposition {
    let mut e = Exposition::new();
    e.build_info("agent");
    let s = sup.agent().stats();
    let totals = sup.totals();
    let list = sup.list();
    let mut by_policy = BTreeMap::<String, (u64, u64)>::new();
    for a in &list {
        let b = by_policy.entry(a.redundancy.clone()).or_default();
        b.0 += a.local_bytes;
        b.1 += a.remote_bytes;
    }
    // SIGBUS on this path: the agent answered a fetch with an error, the
    // module gave up waiting for the agent, or a page could not move back.
    let failed = totals.failed_fetches + totals.fetch_timeouts + totals.stuck_faults;
    // The agent answers fetches page by page and cannot tell a faulting
    // page from one the module asked ahead of it (the module's counter of
    // those, read at another moment, would make a difference that goes
    // down): `remote` counts every page fetched, prefetched ones included.
    Figures {
        path: "kernel",
        faults: &[("remote", totals.fetched_pages), ("failed", failed)],
        failed,
        latency: &s.fetch_latency,
        evicted: s.evicted.load(Ordering::Relaxed),
        fetched: totals.fetched_pages,
        prefetched: totals.prefetched_pages,
        attachments: list.len(),
        budget_bytes: list.iter().map(|a| a.budget_bytes).sum(),
        over_budget_bytes: list
            .iter()
            .filter(|a| a.budget_bytes > 0)
            .map(|a| a.local_bytes.saturating_sub(a.budget_bytes))
            .sum(),
        by_policy,
        at_risk: sup.agent().homes().at_risk(),
        errors: sup.agent().homes().errors(),
    }
    .write(&mut e);
    e.counter(
        "rmem_agent_pages_fetched_degraded_total",
        "Pages read from another copy than the first asked, or rebuilt from their stripe (a server was failing).",
    )
    .set(&[("path", "kernel")], totals.fetched_degraded_pages);
    e.counter(
        "rmem_agent_kernel_skipped_pages_total",
        "Pages the module would not evict, by why (KSM-merged, mlocked, in a mapping it does not take).",
    )
    .set(&[("why", "ksm")], totals.skipped_ksm_pages)
    .set(&[("why", "locked")], totals.skipped_locked_pages)
    .set(&[("why", "mapping")], totals.skipped_mapping_pages);
    e.counter(
        "rmem_agent_eviction_rounds_total",
        "Eviction rounds over the attached processes.",
    )
    .set(&[], sup.rounds());
    e
}

/// A userfaultfd region's metrics.
pub fn region(r: &RemoteRegion) -> Exposition {
    let mut e = Exposition::new();
    e.build_info("agent");
    let st = r.stats();
    let resident = st.resident_pages as u64 * PAGE;
    let budget = st.budget_pages as u64 * PAGE;
    Figures {
        path: "userfaultfd",
        faults: &[
            ("remote", st.faults_remote),
            ("zero", st.faults_zero),
            ("minor", st.faults_minor + st.faults_write_protect),
            ("failed", st.faults_failed),
        ],
        failed: st.faults_failed,
        latency: &r.counters().fault_remote_latency,
        evicted: st.pages_evicted,
        fetched: st.faults_remote + st.prefetch_issued,
        prefetched: st.prefetch_issued,
        attachments: 1,
        budget_bytes: budget,
        over_budget_bytes: resident.saturating_sub(budget),
        by_policy: BTreeMap::from([(
            r.redundancy().to_string(),
            (resident, r.remote_pages() * PAGE),
        )]),
        at_risk: st.pages_at_risk,
        errors: r.errors(),
    }
    .write(&mut e);
    let path = ("path", "userfaultfd");
    e.counter(
        "rmem_agent_prefetch_used_total",
        "Prefetched pages the program then touched.",
    )
    .set(&[path], st.prefetch_hits);
    e.counter(
        "rmem_agent_eviction_failures_total",
        "Eviction batches a server did not take (their pages stayed local).",
    )
    .set(&[path], st.evict_failures);
    e
}

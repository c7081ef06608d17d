//! The benchmark's report: one JSON document for scripts, a Markdown table
//! for people, with rmem's figures set against the limits measured in the
//! same run.

use serde::Serialize;

use crate::Latency;
use crate::dataplane::DataPlane;
use crate::limits::Limits;
use crate::matrix::{Cell, WorkloadSetup, Workloads};
use crate::rebuild::RebuildFigures;
use crate::redundancy::RedundancyFigures;
use crate::region::RegionFigures;

/// What was run, and where.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub quick: bool,
    pub server: String,
    pub embedded_server: bool,
    pub region_bytes: u64,
    pub budget_bytes: u64,
}

/// The machine the figures came from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
}

impl Machine {
    fn this() -> Self {
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        }
    }
}

/// rmem against the limits; the goals are in `docs/ARCHITECTURE.md`.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Fault-back p50 over the raw 4 KiB round trip p50 measured between
    /// the faults (goal <= 1.2).
    pub fault_p50_over_rtt_p50: f64,
    /// Fault-back p99 over that round trip's p99 (goal <= 1.5).
    pub fault_p99_over_rtt_p99: f64,
    /// Single-page GET p50 over the raw round trip p50: the protocol's cost.
    pub get_p50_over_rtt_p50: f64,
    /// Eviction throughput over the raw stream (goal >= 0.7).
    pub evict_over_stream: f64,
    /// Prefetched sequential scan over the raw stream (goal >= 0.5).
    pub seq_scan_over_stream: f64,
    /// Zipfian at 50% local on rmem: slowdown against all-local (goal
    /// <= 1.3).
    pub zipf_50_slowdown: f64,
    /// Zipfian at 50% local: rmem's operations per second over swap on a
    /// file's (goal > 1; 0 when not measured).
    pub zipf_50_over_swap_file: f64,
    /// Zipfian at 50% local: swap on zram's operations per second over
    /// rmem's (goal <= 1.5; 0 when not measured).
    pub zipf_50_zram_over_rmem: f64,
    /// Zipfian at 50% local: rmem's remote faults per operation over swap
    /// on a file's major faults per operation, how well each chose what to
    /// keep local (goal <= 1.0; 0 when not measured).
    pub zipf_50_fetches_over_swap_file: f64,
    /// GET at depth 1 p50 over TLS over plaintext's (the latency TLS adds).
    pub tls_get_p50_over_plain: f64,
    /// 64-page PUT batches over TLS over plaintext's (the throughput TLS
    /// keeps).
    pub tls_put_batch_over_plain: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub setup: Setup,
    pub machine: Machine,
    pub limits: Limits,
    /// Sections left out by `--only` are null.
    pub dataplane: Option<DataPlane>,
    /// The same over mutual TLS (against an embedded server only).
    pub dataplane_tls: Option<DataPlane>,
    /// What checking capabilities costs a server per page.
    pub capabilities: Option<crate::capcost::CapabilityCost>,
    /// What sealing pages (`--seal`) costs the agent.
    pub seal: Option<crate::sealcost::SealCost>,
    /// What serving `/metrics` costs the fault path.
    pub metrics: Option<crate::metricscost::MetricsCost>,
    pub rmem: Option<RegionFigures>,
    /// Eviction and faults with each redundancy policy, and degraded.
    pub redundancy: Option<RedundancyFigures>,
    /// How fast a gone server's pages are rebuilt, per policy.
    pub rebuild: Option<Vec<RebuildFigures>>,
    /// Every workload cell: `{name, system, local_fraction, ops_per_s,
    /// slowdown, ...}`.
    pub workloads: Option<Vec<Cell>>,
    pub workload_setup: Option<WorkloadSetup>,
    /// Ratios of sections not measured are 0.
    pub ratios: Ratios,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

impl Report {
    /// Adds the data plane's figures over TLS, and their ratios.
    pub fn set_dataplane_tls(&mut self, tls: Option<DataPlane>) {
        if let (Some(t), Some(p)) = (&tls, &self.dataplane) {
            self.ratios.tls_get_p50_over_plain = ratio(t.get_qd1_us.p50, p.get_qd1_us.p50);
            self.ratios.tls_put_batch_over_plain = ratio(t.put_batch64_mib_s, p.put_batch64_mib_s);
        }
        self.dataplane_tls = tls;
    }

    pub fn new(
        setup: Setup,
        limits: Limits,
        dataplane: Option<DataPlane>,
        rmem: Option<RegionFigures>,
        redundancy: Option<RedundancyFigures>,
        rebuild: Option<Vec<RebuildFigures>>,
        workloads: Option<Workloads>,
    ) -> Self {
        let rtt = limits.tcp_rtt_4k_us;
        let cells: &[Cell] = workloads.as_ref().map_or(&[], |w| &w.cells);
        let zipf50_cell = |system: &str| {
            cells
                .iter()
                .find(|c| c.name == "zipf" && c.system == system && c.local_fraction == 0.5)
        };
        let zipf50 = |system: &str| zipf50_cell(system).map_or(0.0, |c| c.ops_per_s);
        let zipf50_fetches = |system: &str| zipf50_cell(system).map_or(0.0, |c| c.fetches_per_op);
        let of_rmem = |f: fn(&RegionFigures) -> f64| rmem.as_ref().map_or(0.0, f);
        let ratios = Ratios {
            fault_p50_over_rtt_p50: of_rmem(|r| ratio(r.fault_us.p50, r.rtt_between_faults_us.p50)),
            fault_p99_over_rtt_p99: of_rmem(|r| ratio(r.fault_us.p99, r.rtt_between_faults_us.p99)),
            get_p50_over_rtt_p50: dataplane
                .as_ref()
                .map_or(0.0, |d| ratio(d.get_qd1_us.p50, rtt.p50)),
            evict_over_stream: ratio(of_rmem(|r| r.evict_mib_s), limits.tcp_stream_mib_s),
            seq_scan_over_stream: ratio(of_rmem(|r| r.seq_scan_mib_s), limits.tcp_stream_mib_s),
            zipf_50_slowdown: cells
                .iter()
                .find(|c| c.name == "zipf" && c.system == "rmem" && c.local_fraction == 0.5)
                .and_then(|c| c.slowdown)
                .unwrap_or(0.0),
            zipf_50_over_swap_file: ratio(zipf50("rmem"), zipf50("swap-file")),
            zipf_50_zram_over_rmem: ratio(zipf50("swap-zram"), zipf50("rmem")),
            zipf_50_fetches_over_swap_file: ratio(
                zipf50_fetches("rmem"),
                zipf50_fetches("swap-file"),
            ),
            tls_get_p50_over_plain: 0.0,
            tls_put_batch_over_plain: 0.0,
        };
        Self {
            setup,
            machine: Machine::this(),
            limits,
            dataplane,
            dataplane_tls: None,
            capabilities: None,
            seal: None,
            metrics: None,
            rmem,
            redundancy,
            rebuild,
            workload_setup: workloads.as_ref().map(|w| w.setup.clone()),
            workloads: workloads.map(|w| w.cells),
            ratios,
        }
    }
}

fn optional(v: f64) -> String {
    if v > 0.0 {
        format!("{v:.2}")
    } else {
        "not measured".into()
    }
}

/// Operations per second and slowdown per workload, system and local
/// fraction.
fn workloads_table(cells: &[Cell], w: &WorkloadSetup) -> String {
    let mut out = format!(
        "Workloads on a {} MiB working set: operations per second (slowdown against all-local)\n\n",
        w.working_set_bytes >> 20
    );
    out.push_str("| workload | system | 25% local | 50% local | 75% local | 100% local |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    let mut systems: Vec<&str> = Vec::new();
    for c in cells {
        if !systems.contains(&c.system.as_str()) {
            systems.push(&c.system);
        }
    }
    for name in crate::workloads::ALL.map(|w| w.name()) {
        for system in &systems {
            let mut row = format!("| {name} | {system} |");
            for f in crate::matrix::FRACTIONS {
                let cell = cells.iter().find(|c| {
                    c.name == name
                        && c.system == *system
                        && (c.local_fraction == f || (*system == "local" && f == 1.0))
                });
                match cell {
                    Some(c) => match c.slowdown {
                        Some(x) => row.push_str(&format!(" {} ({x:.2}x) |", ops(c.ops_per_s))),
                        None => row.push_str(&format!(" {} |", c.outcome)),
                    },
                    None => row.push_str(" |"),
                }
            }
            out.push_str(&row);
            out.push('\n');
        }
    }
    out.push_str(&fetches_table(cells));
    for s in &w.skipped {
        out.push_str(&format!("\n{} not measured: {}\n", s.system, s.reason));
    }
    if w.oom_kills > 0 {
        out.push_str(&format!(
            "\n{} swap runs were OOM-killed by their memory cgroup (swap-out could not keep up; each cell is tried twice)\n",
            w.oom_kills
        ));
    }
    if !w.other_swaps.is_empty() {
        out.push_str(&format!(
            "\nswap already on during the run (lower priority): {}\n",
            w.other_swaps.join(", ")
        ));
    }
    out
}

/// How well each system chose what to keep local: accesses that waited
/// for the backing store per operation (rmem: remote faults; kernel swap:
/// major faults), and pages read in per operation (prefetch, read-ahead).
fn fetches_table(cells: &[Cell]) -> String {
    let mut out = String::from(
        "\nWaits for the backing store per operation (pages read in per operation)\n\n",
    );
    out.push_str("| workload | system | 25% local | 50% local | 75% local |\n");
    out.push_str("|---|---|---|---|---|\n");
    for name in crate::workloads::ALL.map(|w| w.name()) {
        for system in ["rmem", "swap-zram", "swap-file"] {
            let mut row = format!("| {name} | {system} |");
            let mut any = false;
            for f in crate::matrix::FRACTIONS.into_iter().filter(|&f| f < 1.0) {
                match cells.iter().find(|c| {
                    c.name == name && c.system == system && c.local_fraction == f && c.ops > 0
                }) {
                    Some(c) => {
                        any = true;
                        row.push_str(&format!(
                            " {:.3} ({:.3}) |",
                            c.fetches_per_op, c.pages_in_per_op
                        ));
                    }
                    None => row.push_str(" |"),
                }
            }
            if any {
                out.push_str(&row);
                out.push('\n');
            }
        }
    }
    out
}

fn ops(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn lat(l: &Latency) -> String {
    format!("{:.1} / {:.1} / {:.1} µs", l.p50, l.p99, l.p999)
}

/// The report as Markdown tables.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let mut row = |k: &str, v: String| out.push_str(&format!("| {k} | {v} |\n"));
    row("what", "figure".into());
    row("---", "---".into());
    row("**limits**", String::new());
    row(
        "raw TCP 4 KiB round trip p50/p99/p99.9",
        lat(&r.limits.tcp_rtt_4k_us),
    );
    row(
        "raw TCP stream",
        format!("{:.0} MiB/s", r.limits.tcp_stream_mib_s),
    );
    row("memcpy", format!("{:.0} MiB/s", r.limits.memcpy_mib_s));
    let planes = [("", &r.dataplane), (", mutual TLS", &r.dataplane_tls)];
    for (how, d) in planes
        .iter()
        .filter_map(|(h, d)| d.as_ref().map(|d| (h, d)))
    {
        row(&format!("**data plane{how}**"), String::new());
        row("GET 1 page, depth 1 p50/p99/p99.9", lat(&d.get_qd1_us));
        row("PUT 1 page, depth 1 p50/p99/p99.9", lat(&d.put_qd1_us));
        row(
            "GET 1 page, depth 32",
            format!("{:.0} ops/s", d.get_qd32_ops_s),
        );
        row(
            "PUT 1 page, depth 32",
            format!("{:.0} ops/s", d.put_qd32_ops_s),
        );
        row(
            "GET 64-page batches",
            format!("{:.0} MiB/s", d.get_batch64_mib_s),
        );
        row(
            "PUT 64-page batches",
            format!("{:.0} MiB/s", d.put_batch64_mib_s),
        );
    }
    if let Some(m) = &r.rmem {
        row("**userspace path**", String::new());
        row("fault-back, as the program sees it", lat(&m.fault_us));
        row("fault-back, agent service time", lat(&m.fault_service_us));
        row("eviction", format!("{:.0} MiB/s", m.evict_mib_s));
        row(
            "sequential write, 8x budget",
            format!("{:.0} MiB/s", m.seq_write_mib_s),
        );
        row(
            "sequential scan, prefetch on",
            format!("{:.0} MiB/s", m.seq_scan_mib_s),
        );
        row(
            "prefetch hit rate",
            format!("{:.1}%", 100.0 * m.prefetch_hit_rate),
        );
    }
    if let Some(red) = &r.redundancy {
        row(
            &format!("**redundancy** ({} servers)", red.servers),
            String::new(),
        );
        for p in &red.policies {
            row(
                &format!("{}: eviction, fault-back p50/p99/p99.9", p.policy),
                format!(
                    "{:.0} MiB/s, {}, {:.2} remote pages per page",
                    p.evict_mib_s,
                    lat(&p.fault_us),
                    p.remote_per_page
                ),
            );
        }
        for d in &red.degraded {
            row(
                &format!("{}, one server gone: fault-back, degraded ones", d.policy),
                format!(
                    "{}; {} ({} degraded)",
                    lat(&d.fault_us),
                    lat(&d.degraded_us),
                    d.faults_degraded
                ),
            );
        }
        let f = &red.floors;
        row(
            "servers alone: one GET; four GETs to four servers, together",
            format!(
                "{}; {} ({:.1}x at p50)",
                lat(&f.one_get_us),
                lat(&f.four_gets_us),
                f.four_gets_us.p50 / f.one_get_us.p50.max(f64::MIN_POSITIVE)
            ),
        );
    }
    if let Some(rebuild) = &r.rebuild {
        for b in rebuild {
            row(
                &format!(
                    "{}: rebuild of a gone server (one agent, no limit)",
                    b.policy
                ),
                format!(
                    "{:.0} MiB/s ({} pages in {:.2} s)",
                    b.mib_s, b.pages, b.seconds
                ),
            );
        }
    }
    row("**ratios (goal)**", String::new());
    let g = &r.ratios;
    row(
        "fault p50 / round trip p50 (<= 1.2)",
        format!("{:.2}", g.fault_p50_over_rtt_p50),
    );
    row(
        "fault p99 / round trip p99 (<= 1.5)",
        format!("{:.2}", g.fault_p99_over_rtt_p99),
    );
    row(
        "GET p50 / round trip p50",
        format!("{:.2}", g.get_p50_over_rtt_p50),
    );
    if let Some(c) = &r.capabilities {
        row(
            "capability check, per page of a 64-page GET (server time)",
            format!(
                "{:.0} ns ({:.0} ns without, {:.0} with)",
                c.check_ns_per_page, c.get_ns_per_page, c.get_checked_ns_per_page
            ),
        );
    }
    if let Some(c) = &r.seal {
        row(
            "sealing (AES-256-GCM), per page: seal / open",
            format!(
                "{:.0} ns / {:.0} ns",
                c.seal_ns_per_page, c.open_ns_per_page
            ),
        );
        row(
            "fault p50 sealed / plain",
            format!("{:.1} µs / {:.1} µs", c.fault_sealed_us.p50, c.fault_us.p50),
        );
        row(
            "eviction sealed / plain",
            format!(
                "{:.0} MiB/s / {:.0} MiB/s",
                c.evict_sealed_mib_s, c.evict_mib_s
            ),
        );
    }
    if let Some(c) = &r.metrics {
        row(
            "fault p50 / p99 scraped every 10 ms / not",
            format!(
                "{:.1} / {:.1} µs, {:.1} / {:.1} µs ({} expositions, {:.0} µs each)",
                c.fault_scraped_us.p50,
                c.fault_scraped_us.p99,
                c.fault_us.p50,
                c.fault_us.p99,
                c.scrapes,
                c.render_us
            ),
        );
    }
    if r.dataplane_tls.is_some() {
        row(
            "GET p50 over TLS / plaintext",
            format!("{:.2}", g.tls_get_p50_over_plain),
        );
        row(
            "PUT batches over TLS / plaintext",
            format!("{:.2}", g.tls_put_batch_over_plain),
        );
    }
    row(
        "eviction / stream (>= 0.7)",
        format!("{:.2}", g.evict_over_stream),
    );
    row(
        "scan / stream (>= 0.5)",
        format!("{:.2}", g.seq_scan_over_stream),
    );
    row(
        "zipf at 50% local: slowdown (<= 1.3)",
        format!("{:.2}", g.zipf_50_slowdown),
    );
    row(
        "zipf at 50% local: rmem / swap-file (> 1)",
        optional(g.zipf_50_over_swap_file),
    );
    row(
        "zipf at 50% local: swap-zram / rmem (<= 1.5)",
        optional(g.zipf_50_zram_over_rmem),
    );
    row(
        "zipf at 50% local: fetches per op, rmem / swap-file (<= 1)",
        optional(g.zipf_50_fetches_over_swap_file),
    );

    out.push_str(&format!(
        "\n{} CPUs, kernel {}, server {}{}, region {} MiB, budget {} MiB{}\n",
        r.machine.cpus,
        r.machine.kernel,
        r.setup.server,
        if r.setup.embedded_server {
            " (embedded)"
        } else {
            ""
        },
        r.setup.region_bytes >> 20,
        r.setup.budget_bytes >> 20,
        if r.setup.quick { ", --quick" } else { "" },
    ));
    out.push('\n');
    if let (Some(cells), Some(setup)) = (&r.workloads, &r.workload_setup) {
        out.push_str(&workloads_table(cells, setup));
    }
    out
}

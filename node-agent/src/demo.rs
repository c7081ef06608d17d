//! `rmem-agent demo`: the whole idea on one machine.
//!
//! Starts a memory server in the process (or uses `--server`), creates a
//! region four times larger than its local budget, and runs a workload that
//! checks every byte it reads: a sequential write of the whole region, a
//! Zipfian random read/write phase, and a full scan. Then it drops the
//! region, checks the server freed its pages, and reports.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use rmem_client::{BlockingConnection, ClientConfig, PAGE_SIZE};
use rmem_common::{ByteSize, Percentiles};
use rmem_server::embedded::{EmbeddedError, EmbeddedServer};
use serde::Serialize;

use crate::cluster::{Cluster, ClusterConfig};
use crate::region::{RegionConfig, RegionError, RemoteRegion};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub budget: ByteSize,
    pub size: ByteSize,
    pub threads: usize,
    /// Operations of the Zipfian phase.
    pub ops: u64,
    pub zipf_exponent: f64,
    /// Share of Zipfian operations that write.
    pub write_fraction: f64,
    /// A running server to use instead of the embedded one.
    pub server: Option<String>,
    /// A cluster's coordinator to get capacity from instead.
    pub coordinator: Option<String>,
    /// Cluster token.
    pub cluster_token: Option<String>,
    /// Member name in the cluster.
    pub cluster_name: Option<String>,
    /// How long joining the cluster keeps trying an unreachable
    /// coordinator.
    pub join_timeout: Duration,
    pub tenant: String,
    pub token: Option<String>,
    /// Data-plane transport to the server.
    pub transport: rmem_client::Transport,
    /// RDMA device to use.
    pub rdma_device: Option<String>,
    pub prefetch_max: usize,
    /// Threads serving the region's faults.
    pub fault_threads: usize,
    /// How long a fault waits for an unreachable server before SIGBUS.
    pub fault_timeout: Duration,
    /// Copies of each evicted page (`None`: the cluster's default).
    pub redundancy: Option<rmem_common::Redundancy>,
    /// Seal pages for servers not trusted with them.
    pub seal: bool,
    /// Most bytes a second moving or rebuilding pages (None: no limit).
    pub rebuild_bandwidth: Option<u64>,
    pub seed: u64,
    pub progress: bool,
    /// Mutual TLS to the coordinator and a running server (not to the
    /// embedded one, which listens on loopback only), and on the metrics
    /// endpoint.
    pub tls: Option<rmem_common::tls::TlsPem>,
    /// Serve Prometheus metrics here while the demo runs.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            budget: ByteSize::mib(64),
            size: ByteSize::mib(256),
            threads: 2,
            ops: 200_000,
            zipf_exponent: 0.99,
            write_fraction: 0.3,
            server: None,
            coordinator: None,
            cluster_token: None,
            cluster_name: None,
            tls: None,
            metrics_listen: None,
            join_timeout: Duration::from_secs(60),
            tenant: "default".into(),
            token: None,
            transport: rmem_client::Transport::Auto,
            rdma_device: None,
            prefetch_max: RegionConfig::default().prefetch_max,
            fault_threads: RegionConfig::default().fault_threads,
            fault_timeout: crate::remote::DEFAULT_FAULT_TIMEOUT,
            redundancy: None,
            seal: false,
            rebuild_bandwidth: None,
            seed: 1,
            progress: false,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyUs {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub count: u64,
}

impl From<Percentiles> for LatencyUs {
    fn from(p: Percentiles) -> Self {
        Self {
            p50: p.p50 as f64 / 1000.0,
            p99: p.p99 as f64 / 1000.0,
            p999: p.p999 as f64 / 1000.0,
            count: p.count,
        }
    }
}

/// One phase of the workload.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub seconds: f64,
    pub operations: u64,
    pub ops_per_s: f64,
}

/// What the demo measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub verify_ok: bool,
    pub verify_errors: u64,
    /// Page reads checked against what was written.
    pub pages_verified: u64,
    /// Faults served from another copy than the first (its server failed).
    pub faults_degraded: u64,
    /// Faults that found no copy (the program got the region's error).
    pub faults_failed: u64,
    pub server: String,
    pub embedded_server: bool,
    pub size_bytes: u64,
    pub budget_bytes: u64,
    /// Peak memory the kernel held for the region (sampled fstat of its
    /// memfd), the figure to hold against the budget.
    pub peak_rss_bytes: u64,
    /// Peak residency by the agent's own accounting, in bytes.
    pub peak_resident_bytes: u64,
    pub pages_evicted: u64,
    pub pages_fetched: u64,
    pub pages_dropped_clean: u64,
    pub pages_dropped_zero: u64,
    pub minor_faults: u64,
    pub zero_fill_faults: u64,
    pub throttled_faults: u64,
    /// Service time of faults that fetched from the server.
    pub fault_latency_us: LatencyUs,
    /// Service time of minor faults (access tracking, prefetch hits).
    pub minor_fault_latency_us: LatencyUs,
    /// Bytes stored per second of evictor work.
    pub evict_throughput_mib_s: f64,
    pub prefetch_issued: u64,
    pub prefetch_hits: u64,
    pub prefetch_hit_rate: f64,
    pub phases: Vec<Phase>,
    /// Pages the server still held for this tenant after the region was
    /// dropped (0 expected when the demo is the only user).
    pub server_pages_after_drop: u64,
    /// Servers that could not be asked (down or restarting): their pages
    /// are not in `server_pages_after_drop`.
    pub servers_unreachable_after_drop: Vec<String>,
    /// With `--seal`: pages sealed for the servers, opened back, and
    /// refused (altered, or another page's: read from another copy).
    pub pages_sealed: u64,
    pub pages_opened: u64,
    pub pages_seal_refused: u64,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Server(#[from] EmbeddedError),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("cannot query the memory server")]
    Client(#[from] rmem_client::ClientError),
    #[error("cannot join the cluster")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("cannot serve metrics")]
    Metrics(#[source] std::io::Error),
}

/// Contents of `page` at `version`: every 8-byte word differs, so a torn,
/// stale or misplaced page is caught.
fn word(page: u64, version: u32, k: u64) -> u64 {
    let mut x = page
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(version).wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(k.wrapping_mul(0x94D0_49BB_1331_11EB));
    x ^= x >> 31;
    x.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ (x >> 29)
}

const WORDS: usize = PAGE_SIZE / 8;

struct Memory {
    base: usize,
}

impl Memory {
    fn page(&self, p: usize) -> *mut u64 {
        (self.base + p * PAGE_SIZE) as *mut u64
    }

    fn write(&self, p: usize, version: u32) {
        let ptr = self.page(p);
        for k in 0..WORDS {
            // SAFETY: `ptr` is page `p` of the live region (p < pages) and
            // the caller holds the page's stripe lock, so no other demo
            // thread accesses it; faults are served by the region.
            unsafe {
                ptr.wrapping_add(k)
                    .write_volatile(word(p as u64, version, k as u64))
            };
        }
    }

    fn check(&self, p: usize, version: u32) -> bool {
        let ptr = self.page(p);
        let mut ok = true;
        for k in 0..WORDS {
            // SAFETY: as in `write`; reads of the page under its lock.
            let got = unsafe { ptr.wrapping_add(k).read_volatile() };
            ok &= got == word(p as u64, version, k as u64);
        }
        ok
    }
}

struct Shared {
    mem: Memory,
    pages: usize,
    versions: Vec<AtomicU32>,
    locks: Vec<Mutex<()>>,
    errors: AtomicU64,
    /// Pages read and checked.
    verified: AtomicU64,
    done: AtomicU64,
}

impl Shared {
    fn lock(&self, p: usize) -> std::sync::MutexGuard<'_, ()> {
        self.locks[p % self.locks.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, p: usize) {
        let _g = self.lock(p);
        let v = self.versions[p].load(Ordering::Relaxed) + 1;
        self.mem.write(p, v);
        self.versions[p].store(v, Ordering::Relaxed);
    }

    fn verify(&self, p: usize) {
        let _g = self.lock(p);
        let v = self.versions[p].load(Ordering::Relaxed);
        self.verified.fetch_add(1, Ordering::Relaxed);
        if !self.mem.check(p, v) {
            let n = self.errors.fetch_add(1, Ordering::Relaxed);
            if n < 10 {
                tracing::error!(page = p, version = v, "page has wrong contents");
            }
        }
    }
}

/// Runs `work(thread)` on `threads` threads and times it.
fn phase(
    name: &'static str,
    threads: usize,
    shared: &Arc<Shared>,
    work: impl Fn(usize, &Shared) -> u64 + Sync,
) -> Phase {
    let started = Instant::now();
    let ops: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                let shared = shared.clone();
                s.spawn(move || work(t, &shared))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker")).sum()
    });
    let seconds = started.elapsed().as_secs_f64();
    Phase {
        name,
        seconds,
        operations: ops,
        ops_per_s: ops as f64 / seconds.max(1e-9),
    }
}

/// Runs the demo.
pub fn run(cfg: &DemoConfig) -> Result<Report, DemoError> {
    let invalid = |field, reason: &str| DemoError::Invalid {
        field,
        reason: reason.into(),
    };
    if cfg.threads == 0 {
        return Err(invalid("threads", "must be at least 1"));
    }
    // A budget of at least the size is allowed: nothing is evicted, which
    // is the all-local baseline.
    if !(0.0..=1.0).contains(&cfg.write_fraction) {
        return Err(invalid("write_fraction", "must be within 0..=1"));
    }
    if let Some(addr) = cfg.metrics_listen
        && !addr.ip().is_loopback()
        && cfg.tls.is_none()
    {
        return Err(invalid(
            "metrics_listen",
            "reachable beyond this host and TLS is off: give --tls-* or listen on loopback",
        ));
    }
    if cfg.server.is_some() && cfg.coordinator.is_some() {
        return Err(invalid(
            "server",
            "give a server or a coordinator, not both",
        ));
    }
    let embedded = match (&cfg.server, &cfg.coordinator) {
        (None, None) => Some(EmbeddedServer::start(
            ByteSize(cfg.size.bytes() + cfg.size.bytes() / 4 + (16 << 20)),
            1,
        )?),
        _ => None,
    };
    let region_cfg = RegionConfig {
        size: cfg.size.bytes(),
        budget: cfg.budget.bytes(),
        prefetch_max: cfg.prefetch_max,
        fault_timeout: cfg.fault_timeout,
        fault_threads: cfg.fault_threads,
        redundancy: cfg.redundancy,
        seal: cfg.seal,
        ..RegionConfig::default()
    };
    let (region, cluster, addr) = match (&cfg.coordinator, &cfg.server, &embedded) {
        (Some(coordinator), _, _) => {
            let cluster = Cluster::connect(&ClusterConfig {
                coordinator: coordinator.clone(),
                token: cfg.cluster_token.clone(),
                name: cfg.cluster_name.clone(),
                tls: cfg.tls.clone(),
                tenant: cfg.tenant.clone(),
                join_timeout: cfg.join_timeout,
                rebuild_bandwidth: cfg.rebuild_bandwidth,
            })?;
            let region = RemoteRegion::in_cluster(region_cfg, &cluster)?;
            let addr = format!(
                "cluster at {coordinator}, {} servers",
                region.servers().len()
            );
            (region, Some(cluster), addr)
        }
        (None, server, embedded) => {
            let addr = match (server, embedded) {
                (Some(a), _) => a.clone(),
                (None, Some(e)) => e.data_addr().to_string(),
                (None, None) => unreachable!("embedded server exists when no --server is given"),
            };
            let mut client = ClientConfig::new(addr.clone()).with_tenant(
                cfg.tenant.clone(),
                cfg.token.clone().unwrap_or_default().into_bytes(),
            );
            client.transport = cfg.transport;
            client.rdma_device = cfg.rdma_device.clone();
            if let (Some(pem), Some(_)) = (&cfg.tls, server) {
                let config = pem
                    .data_client()
                    .map_err(crate::cluster::ClusterError::from)?;
                client = client.with_tls(config, None);
            }
            (RemoteRegion::new(region_cfg, client)?, None, addr)
        }
    };
    let region = Arc::new(region);
    let metrics = match cfg.metrics_listen {
        Some(addr) => {
            let r = region.clone();
            let endpoint = rmem_common::metrics::endpoint::Background::start(
                addr,
                cfg.tls.as_ref(),
                Arc::new(move || crate::metrics::region(&r)),
            )
            .map_err(DemoError::Metrics)?;
            Some(endpoint)
        }
        None => None,
    };
    let servers = region.servers();
    let pages = region.pages();
    let shared = Arc::new(Shared {
        mem: Memory {
            base: region.as_ptr() as usize,
        },
        pages,
        versions: (0..pages).map(|_| AtomicU32::new(0)).collect(),
        locks: (0..4096).map(|_| Mutex::new(())).collect(),
        errors: AtomicU64::new(0),
        verified: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });

    // Sample the kernel's view of the region's memory while it runs.
    let sampling = AtomicBool::new(true);
    let peak_rss = AtomicU64::new(0);
    let total_ops = pages as u64 * 2 + cfg.ops;
    let bar = cfg.progress.then(|| {
        let bar = indicatif::ProgressBar::new(total_ops);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:<10} [{bar:40}] {percent:>3}% {elapsed_precise}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let mut phases = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            while sampling.load(Ordering::Relaxed) {
                peak_rss.fetch_max(region.kernel_resident_bytes(), Ordering::Relaxed);
                if let Some(b) = &bar {
                    b.set_position(shared.done.load(Ordering::Relaxed));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let threads = cfg.threads;
        let set_msg = |m: &'static str| {
            if let Some(b) = &bar {
                b.set_message(m);
            }
        };

        set_msg("write");
        phases.push(phase("sequential_write", threads, &shared, |t, sh| {
            let per = sh.pages.div_ceil(threads);
            let range = (t * per)..((t + 1) * per).min(sh.pages);
            let n = range.len() as u64;
            for p in range {
                sh.write(p);
                sh.done.fetch_add(1, Ordering::Relaxed);
            }
            n
        }));

        set_msg("zipfian");
        let ops_per_thread = cfg.ops / threads as u64;
        let seed = cfg.seed;
        let exponent = cfg.zipf_exponent;
        let write_fraction = cfg.write_fraction;
        phases.push(phase("zipfian_read_write", threads, &shared, |t, sh| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((t as u64 + 1) * 0x9E37));
            let zipf = rand_distr::Zipf::new(sh.pages as f64, exponent).expect("valid zipf");
            for _ in 0..ops_per_thread {
                let rank = zipf.sample(&mut rng) as u64 - 1;
                // Scatter ranks over the region so the hot set is not one
                // contiguous run.
                let p = (rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) % sh.pages as u64) as usize;
                if rng.random_bool(write_fraction) {
                    sh.write(p);
                } else {
                    sh.verify(p);
                }
                sh.done.fetch_add(1, Ordering::Relaxed);
            }
            ops_per_thread
        }));

        set_msg("scan");
        phases.push(phase("sequential_scan", threads, &shared, |t, sh| {
            let per = sh.pages.div_ceil(threads);
            let range = (t * per)..((t + 1) * per).min(sh.pages);
            let n = range.len() as u64;
            for p in range {
                sh.verify(p);
                sh.done.fetch_add(1, Ordering::Relaxed);
            }
            n
        }));
        sampling.store(false, Ordering::Relaxed);
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }

    let st = region.stats();
    // The endpoint goes first: it holds the region.
    drop(metrics);
    let region = Arc::into_inner(region).expect("the metrics endpoint released the region");
    drop(region);
    // A report, not the workload: a server that is down (restarting, in a
    // cluster) is named instead of failing the run. With its own server
    // (--server, embedded) it is an error.
    let mut after = 0;
    let mut unreachable = Vec::new();
    for server in &servers {
        match BlockingConnection::connect(server).and_then(|mut c| c.stat()) {
            Ok(st) => after += st.tenant_used_pages,
            Err(e) if cfg.coordinator.is_some() => {
                tracing::warn!(server = %server.addr, error = %e, "cannot count the server's pages");
                unreachable.push(server.addr.clone());
            }
            Err(e) => return Err(e.into()),
        }
    }
    drop(cluster);
    let embedded_used = embedded.is_some();
    drop(embedded);

    let errors = shared.errors.load(Ordering::Relaxed);
    let evict_s = st.evict_busy_ns as f64 / 1e9;
    let evicted_mib = (st.pages_evicted * PAGE_SIZE as u64) as f64 / (1 << 20) as f64;
    Ok(Report {
        verify_ok: errors == 0,
        verify_errors: errors,
        pages_verified: shared.verified.load(Ordering::Relaxed),
        faults_degraded: st.faults_degraded,
        faults_failed: st.faults_failed,
        server: addr,
        embedded_server: embedded_used,
        size_bytes: cfg.size.bytes(),
        budget_bytes: cfg.budget.bytes(),
        peak_rss_bytes: peak_rss.load(Ordering::Relaxed),
        peak_resident_bytes: (st.peak_resident_pages * PAGE_SIZE) as u64,
        pages_evicted: st.pages_evicted,
        pages_fetched: st.faults_remote + st.prefetch_issued,
        pages_dropped_clean: st.pages_dropped_clean,
        pages_dropped_zero: st.pages_dropped_zero,
        minor_faults: st.faults_minor,
        zero_fill_faults: st.faults_zero,
        throttled_faults: st.throttled_faults,
        fault_latency_us: st.fault_remote_latency_ns.into(),
        minor_fault_latency_us: st.fault_minor_latency_ns.into(),
        evict_throughput_mib_s: if evict_s > 0.0 {
            evicted_mib / evict_s
        } else {
            0.0
        },
        prefetch_issued: st.prefetch_issued,
        prefetch_hits: st.prefetch_hits,
        prefetch_hit_rate: if st.prefetch_issued > 0 {
            st.prefetch_hits as f64 / st.prefetch_issued as f64
        } else {
            0.0
        },
        phases,
        server_pages_after_drop: after,
        servers_unreachable_after_drop: unreachable,
        pages_sealed: st.pages_sealed,
        pages_opened: st.pages_opened,
        pages_seal_refused: st.pages_seal_refused,
    })
}

/// The report for people.
pub fn render(r: &Report) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<28} {v}\n"));
    line(
        "verification",
        if r.verify_ok {
            "PASSED: every byte read was correct".into()
        } else {
            format!("FAILED: {} pages had wrong contents", r.verify_errors)
        },
    );
    line(
        "memory server",
        format!(
            "{}{}",
            r.server,
            if r.embedded_server { " (embedded)" } else { "" }
        ),
    );
    line(
        "region / local budget",
        format!(
            "{:.0} MiB / {:.0} MiB",
            mib(r.size_bytes),
            mib(r.budget_bytes)
        ),
    );
    line(
        "peak resident (kernel)",
        format!(
            "{:.1} MiB ({:.0}% of budget)",
            mib(r.peak_rss_bytes),
            100.0 * r.peak_rss_bytes as f64 / r.budget_bytes as f64
        ),
    );
    line("pages evicted", r.pages_evicted.to_string());
    line(
        "pages dropped (clean/zero)",
        format!("{} / {}", r.pages_dropped_clean, r.pages_dropped_zero),
    );
    line("pages fetched", r.pages_fetched.to_string());
    if r.pages_sealed > 0 {
        line(
            "sealed (AES-256-GCM)",
            format!(
                "{} pages sealed, {} opened, {} refused",
                r.pages_sealed, r.pages_opened, r.pages_seal_refused
            ),
        );
    }
    line(
        "fault-back latency",
        format!(
            "p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  ({} faults)",
            r.fault_latency_us.p50,
            r.fault_latency_us.p99,
            r.fault_latency_us.p999,
            r.fault_latency_us.count
        ),
    );
    line(
        "minor-fault latency",
        format!(
            "p50 {:.1} µs  p99 {:.1} µs  ({} faults)",
            r.minor_fault_latency_us.p50,
            r.minor_fault_latency_us.p99,
            r.minor_fault_latency_us.count
        ),
    );
    line(
        "eviction throughput",
        format!("{:.0} MiB/s", r.evict_throughput_mib_s),
    );
    line(
        "prefetch",
        format!(
            "{} pages, {} used, hit rate {:.1}%",
            r.prefetch_issued,
            r.prefetch_hits,
            100.0 * r.prefetch_hit_rate
        ),
    );
    for p in &r.phases {
        line(
            &format!("phase {}", p.name),
            format!("{:.2} s, {:.0} ops/s", p.seconds, p.ops_per_s),
        );
    }
    let unreachable = if r.servers_unreachable_after_drop.is_empty() {
        String::new()
    } else {
        format!(
            " (not counted, unreachable: {})",
            r.servers_unreachable_after_drop.join(", ")
        )
    };
    line(
        "server pages after drop",
        format!("{}{unreachable}", r.server_pages_after_drop),
    );
    out
}

/// Whether a progress bar makes sense.
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

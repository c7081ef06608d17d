//! Remote-backed memory regions served by userfaultfd.
//!
//! A [`RemoteRegion`] is ordinary memory to the program that uses it. Behind
//! it, the agent keeps at most `budget` bytes resident: an evictor thread
//! picks cold pages with a CLOCK policy ([`crate::policy::clock`]), stores
//! them on a memory server and frees them; fault-handler threads bring pages
//! back on the next touch, fetching ahead on sequential and strided streams
//! ([`crate::prefetch`]). See [`state`] for the page life cycle.

mod discard;
mod evict;
mod fault;
pub mod state;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmem_client::{ClientConfig, ClientError};
use rmem_common::Histogram;
use rmem_proto::wire::{MAX_BATCH_PAGES_HARD, PAGE_SIZE};
use serde::Serialize;

use self::state::{STORED, States};
use crate::mem::Backing;
use crate::prefetch::Streams;
use crate::remote::{Cluster, ClusterError, Home, Homes, RemoteConn, Remotes, thread_config};
use crate::uffd::{self, Uffd};

/// Largest region, in pages (1 TiB).
pub const MAX_REGION_PAGES: usize = 1 << 28;

/// How a region behaves.
#[derive(Debug, Clone)]
pub struct RegionConfig {
    /// Size in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Most bytes kept in local memory.
    pub budget: u64,
    /// Threads serving faults.
    pub fault_threads: usize,
    /// How long a fault waits for an unreachable server before the faulting
    /// thread gets SIGBUS.
    pub fault_timeout: Duration,
    /// Pages evicted per server request.
    pub evict_batch: usize,
    /// Evictor threads, each with a batch in flight: one reads and sends
    /// its victims while another's are on the wire or being stored.
    pub evict_threads: usize,
    /// Most pages fetched ahead of a detected stream (0 disables prefetch).
    pub prefetch_max: usize,
    /// How long an idle fault handler keeps polling before it sleeps in
    /// poll(2), and how long it polls for a server's reply before it
    /// blocks: trades CPU for fault latency.
    pub spin: Duration,
    /// Copies of each evicted page: `None` takes the cluster's default (or
    /// one copy outside a cluster).
    pub redundancy: Option<rmem_common::Redundancy>,
    /// With more than one copy: how long a fault waits for one server
    /// before it reads another copy.
    pub failover_after: Duration,
    /// Seal every page for servers not trusted with them: encrypted and
    /// authenticated here (see [`crate::remote::seal`]).
    pub seal: bool,
}

impl Default for RegionConfig {
    fn default() -> Self {
        Self {
            size: 64 << 20,
            budget: 16 << 20,
            fault_threads: 2,
            fault_timeout: crate::remote::DEFAULT_FAULT_TIMEOUT,
            evict_batch: 64,
            evict_threads: 2,
            prefetch_max: 128,
            spin: Duration::from_micros(50),
            redundancy: None,
            failover_after: crate::remote::DEFAULT_FAILOVER_AFTER,
            seal: false,
        }
    }
}

/// Why a region could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("cannot create the region's memory")]
    Memory(#[source] std::io::Error),
    #[error(
        "cannot open userfaultfd (run as root, or set vm.unprivileged_userfaultfd=1, or give the user access to /dev/userfaultfd)"
    )]
    Userfaultfd(#[source] std::io::Error),
    #[error("cannot register the region with userfaultfd")]
    Register(#[source] std::io::Error),
    #[error("cannot reach the memory server")]
    Server(#[source] ClientError),
    #[error("cannot start a region thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot get capacity from the cluster")]
    Cluster(#[source] crate::remote::ClusterError),
}

/// Counters of a region.
#[derive(Debug, Default)]
pub struct Stats {
    pub faults_zero: AtomicU64,
    pub faults_remote: AtomicU64,
    pub faults_minor: AtomicU64,
    pub faults_write_protect: AtomicU64,
    pub faults_failed: AtomicU64,
    /// Faults that found their page owned by another thread and waited for
    /// it instead of fetching it again.
    pub faults_coalesced: AtomicU64,
    /// Faults served from another copy because the first did not answer.
    pub faults_degraded: AtomicU64,
    pub pages_evicted: AtomicU64,
    pub pages_dropped_clean: AtomicU64,
    pub pages_dropped_zero: AtomicU64,
    pub evict_failures: AtomicU64,
    pub prefetch_issued: AtomicU64,
    /// Prefetched pages the program reached: touched (a minor fault), or
    /// mapped ahead in a sequential window whose last page it touched.
    pub prefetch_hits: AtomicU64,
    /// Of `prefetch_issued`, pages mapped ahead of a sequential stream (it
    /// reads them with no fault).
    pub prefetch_mapped: AtomicU64,
    /// Pages brought back ahead of a degraded fault, rebuilt from their
    /// stripes with the faulting page (erasure coded, a server failing).
    pub prefetch_rebuilt: AtomicU64,
    pub throttled_faults: AtomicU64,
    /// Nanoseconds during which at least one evictor was storing pages
    /// (read, PUT, free): wall time, however many batches overlapped.
    pub evict_busy_ns: AtomicU64,
    /// Service time of faults fetched from the server, ns.
    pub fault_remote_latency: Histogram,
    /// Service time of minor faults (access tracking, prefetch hits), ns.
    pub fault_minor_latency: Histogram,
}

/// A snapshot of [`Stats`] and residency, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub pages: usize,
    pub budget_pages: usize,
    pub resident_pages: usize,
    pub peak_resident_pages: usize,
    pub faults_zero: u64,
    pub faults_remote: u64,
    pub faults_minor: u64,
    pub faults_write_protect: u64,
    pub faults_failed: u64,
    pub faults_coalesced: u64,
    pub faults_degraded: u64,
    pub pages_evicted: u64,
    /// Pages stored with fewer copies than the policy asks for.
    pub pages_at_risk: u64,
    pub pages_dropped_clean: u64,
    pub pages_dropped_zero: u64,
    pub evict_failures: u64,
    pub prefetch_issued: u64,
    pub prefetch_hits: u64,
    pub prefetch_mapped: u64,
    pub prefetch_rebuilt: u64,
    pub throttled_faults: u64,
    pub evict_busy_ns: u64,
    pub fault_remote_latency_ns: rmem_common::Percentiles,
    pub fault_minor_latency_ns: rmem_common::Percentiles,
    /// With sealing on: pages sealed on their way to a server, opened on
    /// their way back, and refused (altered, or another page's).
    pub pages_sealed: u64,
    pub pages_opened: u64,
    pub pages_seal_refused: u64,
}

/// State shared by a region's threads.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) cfg: RegionConfig,
    /// The region's name in logs.
    pub(crate) id: u64,
    pub(crate) backing: Backing,
    pub(crate) uffd: Uffd,
    pub(crate) states: States,
    pub(crate) budget_pages: usize,
    pub(crate) resident: AtomicUsize,
    pub(crate) peak_resident: AtomicUsize,
    pub(crate) stop: AtomicBool,
    /// Set while the evictor cannot store pages (server unreachable or
    /// full): faults then stop waiting for room and the region runs over
    /// its budget rather than stalling the program.
    pub(crate) evict_stalled: AtomicBool,
    /// Pages that faults wait to bring in (they do not fit the budget yet).
    pub(crate) waiting: AtomicUsize,
    /// The evictor sleeps on this until residency crosses the high mark.
    pub(crate) evict_wanted: (Mutex<()>, Condvar),
    /// Faults over budget sleep on this until the evictor frees memory.
    pub(crate) space_freed: (Mutex<()>, Condvar),
    /// The evictors' clock, shared: each takes its victims under the lock.
    pub(crate) clock: Mutex<crate::policy::clock::Clock>,
    /// Evictor threads with a batch in flight, and since when the count
    /// last changed (their union of busy time is `evict_busy_ns`).
    pub(crate) evicting: Mutex<(usize, std::time::Instant)>,
    pub(crate) prefetch: Mutex<Streams>,
    pub(crate) stats: Stats,
    /// Where the region's pages go: its servers, handle space and book.
    pub(crate) homes: Arc<Homes>,
    /// The handle of each page's stored copy (meaningful while `STORED`
    /// is set; written before the state word that publishes it).
    pub(crate) handles: Box<[AtomicU64]>,
}

impl Inner {
    /// The handle of page `i`'s stored copy (see `handles`).
    pub(crate) fn handle(&self, i: usize) -> u64 {
        self.handles[i].load(Ordering::Acquire)
    }

    /// Every copy the servers hold for the region.
    pub(crate) fn stored_handles(&self) -> Vec<u64> {
        (0..self.states.len())
            .filter(|&i| self.states.get(i).has(STORED))
            .map(|i| self.handle(i))
            .collect()
    }

    pub(crate) fn page_addr(&self, i: usize) -> u64 {
        self.backing.page_addr(i)
    }

    /// How long one read from one server may take: the fault timeout, or
    /// with other copies to read, `failover_after`.
    pub(crate) fn read_timeout(&self) -> Duration {
        if self.homes.copies() > 1 {
            self.cfg.failover_after.min(self.cfg.fault_timeout)
        } else {
            self.cfg.fault_timeout
        }
    }

    /// Pages an evictor takes at a time: `evict_batch` per server
    /// request, so an erasure-coded batch spans K times as many (each of
    /// its K + M servers gets one request of about `evict_batch` pages).
    pub(crate) fn evict_pages(&self) -> usize {
        self.cfg.evict_batch * self.homes.policy().data()
    }

    /// Headroom the evictor keeps below the budget.
    pub(crate) fn headroom(&self) -> usize {
        (self.budget_pages / 16).clamp(4, self.evict_pages().max(4))
    }

    /// Residency above which the evictor starts. A region whose every page
    /// fits in its budget never needs it: its headroom would only make the
    /// evictor churn pages of a working set that fits.
    pub(crate) fn high_mark(&self) -> usize {
        if self.states.len() <= self.budget_pages {
            return usize::MAX;
        }
        self.budget_pages.saturating_sub(self.headroom()).max(1)
    }

    /// Residency the evictor brings memory down to.
    pub(crate) fn low_mark(&self) -> usize {
        self.budget_pages.saturating_sub(2 * self.headroom()).max(1)
    }

    /// Residency the evictor acts on: pages in memory and pages that
    /// faults wait to bring in.
    pub(crate) fn demand(&self) -> usize {
        self.resident.load(Ordering::Acquire) + self.waiting.load(Ordering::Acquire)
    }

    /// Accounts `n` pages about to become resident; wakes the evictor past
    /// the high mark and, when they would take residency past the budget,
    /// waits (up to the fault timeout) for it to make room first. The
    /// pages are counted only once they fit, so concurrent faults and
    /// prefetch runs never take the count past the budget while the
    /// evictor keeps up (an empty region admits any run).
    pub(crate) fn charge(&self, n: usize) {
        let fits = |cur: usize| cur == 0 || cur + n <= self.budget_pages;
        let mut throttled = false;
        let mut deadline = None;
        let mut cur = self.resident.load(Ordering::Acquire);
        loop {
            let must_wait = !fits(cur)
                && !self.evict_stalled.load(Ordering::Acquire)
                && !self.stop.load(Ordering::Relaxed);
            if !must_wait {
                match self.resident.compare_exchange_weak(
                    cur,
                    cur + n,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(now) => {
                        cur = now;
                        continue;
                    }
                }
            }
            if !throttled {
                throttled = true;
                self.stats.throttled_faults.fetch_add(1, Ordering::Relaxed);
                // The evictor sees the demand, even below its high mark.
                self.waiting.fetch_add(n, Ordering::AcqRel);
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.cfg.fault_timeout);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    region = format_args!("{:06x}", self.id),
                    "evictor cannot keep up; exceeding the local budget"
                );
                cur = self.resident.fetch_add(n, Ordering::AcqRel);
                self.waiting.fetch_sub(n, Ordering::AcqRel);
                throttled = false;
                break;
            }
            self.evict_wanted.1.notify_one();
            let guard = self.space_freed.0.lock().expect("space lock");
            // Re-read under the lock: `uncharge` notifies after it subtracts.
            if fits(self.resident.load(Ordering::Acquire)) {
                drop(guard);
            } else {
                drop(
                    self.space_freed
                        .1
                        .wait_timeout(guard, left.min(Duration::from_millis(20)))
                        .expect("space lock"),
                );
            }
            cur = self.resident.load(Ordering::Acquire);
        }
        if throttled {
            self.waiting.fetch_sub(n, Ordering::AcqRel);
        }
        let now = cur + n;
        self.peak_resident.fetch_max(now, Ordering::Relaxed);
        if now > self.high_mark() {
            self.evict_wanted.1.notify_one();
        }
    }

    /// Accounts `n` pages leaving memory.
    pub(crate) fn uncharge(&self, n: usize) {
        self.resident.fetch_sub(n, Ordering::AcqRel);
        if self.waiting.load(Ordering::Acquire) > 0 {
            // A fault between its check (under the lock) and its wait
            // would miss a notification sent now: pass through the lock.
            drop(self.space_freed.0.lock().expect("space lock"));
        }
        self.space_freed.1.notify_all();
    }

    /// Wakes threads waiting on page `i`.
    pub(crate) fn wake(&self, i: usize) {
        if let Err(e) = self.uffd.wake(self.page_addr(i), PAGE_SIZE as u64) {
            tracing::error!(page = i, error = %e, "UFFDIO_WAKE failed");
        }
    }
}

/// Memory whose cold pages live on a memory server.
#[derive(Debug)]
pub struct RemoteRegion {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl RemoteRegion {
    /// Creates a region backed by the memory server `client` points at.
    pub fn new(cfg: RegionConfig, client: ClientConfig) -> Result<Self, RegionError> {
        // One named server: fail now, clearly, if it cannot be reached.
        RemoteConn::new(thread_config(&client, cfg.fault_timeout))
            .max_batch(Instant::now() + cfg.fault_timeout)
            .map_err(RegionError::Server)?;
        Self::with_servers(cfg, vec![client])
    }

    /// Creates a region whose eviction batches take turns over `servers`
    /// (contacted on first use).
    pub fn with_servers(
        cfg: RegionConfig,
        servers: Vec<ClientConfig>,
    ) -> Result<Self, RegionError> {
        let cfg = validate(cfg)?;
        let redundancy = cfg.redundancy.unwrap_or_default();
        let homes = Homes::for_region(
            Home::Servers(servers),
            0,
            drain_timeout(&cfg),
            redundancy,
            cfg.seal,
        )
        .map_err(|e| match e {
            e @ ClusterError::TooFewServers { .. } => RegionError::Invalid {
                field: "redundancy",
                reason: e.to_string(),
            },
            e => RegionError::Cluster(e),
        })?;
        Self::with_homes(cfg, homes)
    }

    /// Creates a region whose capacity comes from `cluster`: the
    /// coordinator grants the region's size up front, and the region's
    /// handle space is registered as an interval those servers subscribe
    /// to (see [`crate::remote`]).
    pub fn in_cluster(cfg: RegionConfig, cluster: &Arc<Cluster>) -> Result<Self, RegionError> {
        let cfg = validate(cfg)?;
        let pages = cfg.size / PAGE_SIZE as u64;
        let redundancy = cfg.redundancy.unwrap_or_else(|| cluster.redundancy());
        let homes = Homes::for_region(
            Home::Cluster(cluster.clone()),
            pages,
            drain_timeout(&cfg),
            redundancy,
            cfg.seal,
        )
        .map_err(RegionError::Cluster)?;
        Self::with_homes(cfg, homes.clone()).inspect_err(|_| {
            homes.retire();
        })
    }

    /// Creates a region whose pages go where `homes` places them.
    fn with_homes(cfg: RegionConfig, homes: Arc<Homes>) -> Result<Self, RegionError> {
        let pages = (cfg.size / PAGE_SIZE as u64) as usize;
        let budget_pages = (cfg.budget / PAGE_SIZE as u64) as usize;
        // Servers are contacted on first use (a region over many servers
        // does not wait for all of them, nor fail for one being slow);
        // requests are split to each server's batch limit then.
        let mut cfg = cfg;
        cfg.evict_batch = cfg.evict_batch.min(MAX_BATCH_PAGES_HARD as usize);
        // A fetch charges all its pages at once and they cannot be evicted
        // while in flight: keep prefetch well inside a small budget.
        cfg.prefetch_max = cfg
            .prefetch_max
            .min(MAX_BATCH_PAGES_HARD as usize - 1)
            .min(budget_pages / 4);

        let backing = Backing::new("rmem-region", pages).map_err(RegionError::Memory)?;
        let uffd = Uffd::open(
            uffd::feature::PAGEFAULT_FLAG_WP
                | uffd::feature::MISSING_SHMEM
                | uffd::feature::MINOR_SHMEM
                | uffd::feature::WP_HUGETLBFS_SHMEM
                | uffd::feature::THREAD_ID
                | uffd::feature::POISON,
        )
        .map_err(RegionError::Userfaultfd)?;
        uffd.register(
            backing.base() as u64,
            backing.len() as u64,
            uffd::mode::MISSING | uffd::mode::MINOR | uffd::mode::WP,
        )
        .map_err(RegionError::Register)?;

        let id = homes.base() >> crate::remote::space::SPACE_BITS;
        let inner = Arc::new(Inner {
            id,
            states: States::new(pages),
            budget_pages,
            resident: AtomicUsize::new(0),
            peak_resident: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            evict_stalled: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            evict_wanted: (Mutex::new(()), Condvar::new()),
            space_freed: (Mutex::new(()), Condvar::new()),
            clock: Mutex::new(crate::policy::clock::Clock::new()),
            evicting: Mutex::new((0, std::time::Instant::now())),
            prefetch: Mutex::new(Streams::new(cfg.prefetch_max)),
            stats: Stats::default(),
            handles: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            homes,
            backing,
            uffd,
            cfg,
        });
        let mut region = Self {
            inner: inner.clone(),
            threads: Vec::new(),
        };
        for t in 0..inner.cfg.fault_threads {
            // The fault path polls for the reply: a remote fault then costs
            // one wake-up (the faulting thread's), not two.
            let conn = Remotes::new(inner.read_timeout(), inner.cfg.spin);
            let inner = inner.clone();
            let h = std::thread::Builder::new()
                .name(format!("rmem-fault-{t}"))
                .spawn(move || fault::run(&inner, conn))
                .map_err(RegionError::Thread)?;
            region.threads.push(h);
        }
        for t in 0..inner.cfg.evict_threads {
            let conn = Remotes::new(inner.cfg.fault_timeout, Duration::ZERO);
            let evictor = inner.clone();
            let h = std::thread::Builder::new()
                .name(format!("rmem-evict-{t}"))
                .spawn(move || evict::run(&evictor, conn))
                .map_err(RegionError::Thread)?;
            region.threads.push(h);
        }
        tracing::info!(
            region = format_args!("{id:06x}"),
            pages,
            budget_pages,
            home = %inner.homes.describe(),
            copies = inner.homes.copies(),
            "region created"
        );
        Ok(region)
    }

    /// Start of the region. The memory may be read and written from any
    /// thread like any other memory; the usual rules about data races
    /// between the program's own threads apply.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.backing.base()
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.inner.backing.len()
    }

    /// Whether the region is empty (never: regions have at least a page).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.inner.states.len()
    }

    /// The region as a byte slice, for a single owner.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is valid for `len` bytes for the region's
        // lifetime, and `&mut self` rules out other safe borrows. Faults on
        // it are served by this region's threads.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len()) }
    }

    /// Discards bytes `offset..offset + len` (page-aligned): their local
    /// memory and their servers' copies are freed and they read as zeroes
    /// afterwards, like `MADV_DONTNEED` on private anonymous memory. In a
    /// cluster the servers free their copies through an invalidation of
    /// the range, which returns once every subscriber dropped it. Returns
    /// the pages that held data (locally or remotely).
    pub fn discard(&self, offset: usize, len: usize) -> Result<usize, RegionError> {
        let inner = &self.inner;
        if !offset.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || offset.checked_add(len).is_none_or(|end| end > self.len())
        {
            return Err(RegionError::Invalid {
                field: "range",
                reason: "must be page-aligned and inside the region".into(),
            });
        }
        let (first, n) = (offset / PAGE_SIZE, len / PAGE_SIZE);
        if n == 0 {
            return Ok(0);
        }
        let claimed = discard::claim(inner, first, n);
        if !claimed.stored.is_empty() {
            let mut remotes = Remotes::new(inner.cfg.fault_timeout, Duration::ZERO);
            let deadline = Instant::now() + inner.cfg.fault_timeout;
            if let Err(e) = inner.homes.release(&mut remotes, &claimed.stored, deadline) {
                tracing::warn!(
                    region = format_args!("{:06x}", inner.id), error = %e,
                    "cannot free discarded pages on their servers; they stay allocated"
                );
            }
        }
        discard::release(inner, &claimed);
        Ok(claimed.pages.len())
    }

    /// Connection settings of every server the region uses.
    pub fn servers(&self) -> Vec<ClientConfig> {
        let servers = self.inner.homes.servers();
        (0..servers.len())
            .filter_map(|k| servers.get(k as u8))
            .collect()
    }

    /// The live counters (for `/metrics`, which wants the histograms).
    pub fn counters(&self) -> &Stats {
        &self.inner.stats
    }

    /// Errors met, by plane (data, control) and reason.
    pub fn errors(&self) -> Vec<(&'static str, String, u64)> {
        self.inner.homes.errors()
    }

    /// The redundancy of the region's evicted pages.
    pub fn redundancy(&self) -> rmem_common::Redundancy {
        self.inner.homes.policy()
    }

    /// Pages whose data is on the servers only (a scan of the page table).
    pub fn remote_pages(&self) -> u64 {
        let states = &self.inner.states;
        (0..states.len())
            .filter(|&i| states.get(i).kind() == state::Kind::Remote)
            .count() as u64
    }

    /// Counters and residency.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let seal = self.inner.homes.servers().seal();
        StatsSnapshot {
            pages: self.pages(),
            budget_pages: self.inner.budget_pages,
            resident_pages: self.inner.resident.load(Ordering::Relaxed),
            peak_resident_pages: self.inner.peak_resident.load(Ordering::Relaxed),
            faults_zero: l(&s.faults_zero),
            faults_remote: l(&s.faults_remote),
            faults_minor: l(&s.faults_minor),
            faults_write_protect: l(&s.faults_write_protect),
            faults_failed: l(&s.faults_failed),
            faults_coalesced: l(&s.faults_coalesced),
            faults_degraded: l(&s.faults_degraded),
            pages_evicted: l(&s.pages_evicted),
            pages_at_risk: self.inner.homes.at_risk(),
            pages_dropped_clean: l(&s.pages_dropped_clean),
            pages_dropped_zero: l(&s.pages_dropped_zero),
            evict_failures: l(&s.evict_failures),
            prefetch_issued: l(&s.prefetch_issued),
            prefetch_rebuilt: l(&s.prefetch_rebuilt),
            prefetch_hits: l(&s.prefetch_hits),
            prefetch_mapped: l(&s.prefetch_mapped),
            throttled_faults: l(&s.throttled_faults),
            evict_busy_ns: l(&s.evict_busy_ns),
            fault_remote_latency_ns: s.fault_remote_latency.percentiles(),
            fault_minor_latency_ns: s.fault_minor_latency.percentiles(),
            pages_sealed: seal.map_or(0, |s| l(&s.stats.sealed)),
            pages_opened: seal.map_or(0, |s| l(&s.stats.opened)),
            pages_seal_refused: seal.map_or(0, |s| l(&s.stats.refused)),
        }
    }

    /// Bytes the kernel holds for the region right now (independent of the
    /// agent's own accounting).
    pub fn kernel_resident_bytes(&self) -> u64 {
        self.inner.backing.allocated_bytes().unwrap_or(0)
    }

    /// Whether page `i` is in local memory right now (diagnostics, tests).
    pub fn is_resident(&self, i: usize) -> bool {
        self.inner.states.get(i).resident()
    }

    /// The region's name in logs (the epoch of its handle space).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Resets the resident high-water mark.
    pub fn reset_peak(&self) {
        self.inner.peak_resident.store(
            self.inner.resident.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }
}

/// How long a dropped region's last direct frees may take (when its space
/// could not be retired through the coordinator).
const FINAL_FREES_WITHIN: Duration = Duration::from_secs(5);

impl Drop for RemoteRegion {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.stop.store(true, Ordering::Release);
        inner.evict_wanted.1.notify_all();
        inner.space_freed.1.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Free every copy the servers hold for this region: in a cluster by
        // retiring its handle space (the servers free, then acknowledge),
        // directly otherwise or if that failed.
        let stored = inner.stored_handles();
        if !inner.homes.retire() && !stored.is_empty() {
            // Every server is asked, a failing one too (it may only have
            // answered late once), but not for longer than this: a dead
            // one must not hold the drop up for a whole fault timeout.
            let within = inner.cfg.fault_timeout.min(FINAL_FREES_WITHIN);
            let mut remotes = Remotes::new(within, Duration::ZERO);
            let deadline = Instant::now() + within;
            if let Err(e) = inner.homes.discard_final(&mut remotes, &stored, deadline) {
                tracing::warn!(
                    region = format_args!("{:06x}", inner.id), error = %e,
                    "cannot free the region's pages on their servers; they stay allocated"
                );
            }
            inner.homes.forget_capabilities();
        }
        let _ = inner
            .uffd
            .unregister(inner.backing.base() as u64, inner.backing.len() as u64);
        tracing::info!(
            region = format_args!("{:06x}", inner.id),
            freed = stored.len(),
            "region dropped"
        );
    }
}

/// Checks a configuration; the pages it asks for fit a region.
fn validate(cfg: RegionConfig) -> Result<RegionConfig, RegionError> {
    let invalid = |field, reason: &str| RegionError::Invalid {
        field,
        reason: reason.to_string(),
    };
    if cfg.size == 0 || !cfg.size.is_multiple_of(PAGE_SIZE as u64) {
        return Err(invalid("size", "must be a positive multiple of 4 KiB"));
    }
    let pages = (cfg.size / PAGE_SIZE as u64) as usize;
    if pages > MAX_REGION_PAGES {
        return Err(invalid("size", "at most 1 TiB per region"));
    }
    if cfg.budget / (PAGE_SIZE as u64) < 16 {
        return Err(invalid("budget", "must be at least 64 KiB (16 pages)"));
    }
    if cfg.fault_threads == 0 {
        return Err(invalid("fault_threads", "must be at least 1"));
    }
    if cfg.evict_batch == 0 {
        return Err(invalid("evict_batch", "must be at least 1"));
    }
    if !(1..=8).contains(&cfg.evict_threads) {
        return Err(invalid("evict_threads", "must be between 1 and 8"));
    }
    if cfg.failover_after.is_zero() {
        return Err(invalid("failover_after", "must be positive"));
    }
    Ok(cfg)
}

/// How long each request of a drain moving the region's pages may take.
fn drain_timeout(cfg: &RegionConfig) -> Duration {
    cfg.fault_timeout.min(Duration::from_secs(5))
}

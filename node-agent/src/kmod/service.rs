//! The kernel backend's agent: serves the module's fetch requests and freed
//! handles from memory servers, and moves pages out on request.
//!
//! Where pages go (one server, or a cluster's granted servers) and how
//! handles are chosen is the remote layer's business ([`crate::remote`]).

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmem_client::{ClientConfig, ClientError, Page, PageStatus};

use super::device::{Device, FetchReply};
use super::uapi::{self, Event, PAGE_SIZE};
use crate::remote::{Cluster, ClusterError, Home, Homes, Remotes, Source};

/// How the kernel agent runs.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// `/dev/rmem`.
    pub device: std::path::PathBuf,
    /// Where the pages go.
    pub home: Home,
    /// Threads answering the module's requests.
    pub fault_threads: usize,
    /// Longest one server request may take (a request that times out is
    /// tried again, within `fault_timeout` for a fetch); an eviction whose
    /// request fails is undone.
    pub request_timeout: Duration,
    /// How long a fetch keeps trying a server that does not answer before
    /// the faulting task gets SIGBUS (see
    /// [`crate::remote::DEFAULT_FAULT_TIMEOUT`]); keep it below the
    /// module's `fault_timeout_ms`, which bounds the fault in the kernel.
    pub fault_timeout: Duration,
    /// Copies of each evicted page: `None` takes the cluster's default (one
    /// copy outside a cluster).
    pub redundancy: Option<rmem_common::Redundancy>,
    /// Fault injection for tests: how long each batch of fetches waits
    /// before going to the server, to play a slow network or server.
    /// Zero (the default) in normal use.
    pub fetch_delay: Duration,
    /// The agent's directory on tmpfs (beside its admin socket; see
    /// [`DEFAULT_STATE_DIR`]) for what lives as long as the module's
    /// pages: outside a cluster, the handle epochs of the runs whose pages
    /// the module may still hold; the keys and tags of sealed runs. `None`
    /// keeps nothing (a standalone restart then has a 2^-24 chance of
    /// reusing an old run's handles) and cannot seal.
    pub state_dir: Option<std::path::PathBuf>,
    /// Seal every page for servers not trusted with them (see
    /// `remote::seal`).
    pub seal: bool,
}

/// The kernel agent's state directory by default: the default admin
/// socket's, on tmpfs like the module's pages.
pub const DEFAULT_STATE_DIR: &str = "/run/rmem";

impl KernelConfig {
    /// Defaults, pages on `server`.
    pub fn new(server: ClientConfig) -> Self {
        Self::with_home(Home::Servers(vec![server]))
    }

    /// Defaults, pages on the servers `cluster` grants.
    pub fn in_cluster(cluster: Arc<Cluster>) -> Self {
        Self::with_home(Home::Cluster(cluster))
    }

    fn with_home(home: Home) -> Self {
        Self {
            device: super::device::DEVICE_PATH.into(),
            home,
            fault_threads: 2,
            request_timeout: Duration::from_secs(5),
            fault_timeout: crate::remote::DEFAULT_FAULT_TIMEOUT,
            redundancy: None,
            fetch_delay: Duration::ZERO,
            state_dir: Some(DEFAULT_STATE_DIR.into()),
            seal: false,
        }
    }
}

/// Why a kernel-agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("/dev/rmem: {0}")]
    Device(#[from] io::Error),
    #[error("memory server: {0}")]
    Server(#[from] ClientError),
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("DAMON: {0}")]
    Monitor(io::Error),
    #[error("page {handle:#x} was not stored: {why}")]
    NotStored { handle: u64, why: String },
    #[error("no server {0} in the agent's table")]
    UnknownServer(u8),
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct KernelStats {
    pub fetched: AtomicU64,
    /// Of `fetched`, those served by another copy than the first asked.
    pub fetched_degraded: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub freed: AtomicU64,
    /// Of `freed`, those freed through the cluster's invalidations (the
    /// rest went to their servers directly).
    pub invalidated: AtomicU64,
    pub evicted: AtomicU64,
    pub kept_local: AtomicU64,
    /// Time the agent took to answer a batch of fetches, recorded once per
    /// fetch (nanoseconds): the agent's share of a remote fault.
    pub fetch_latency: rmem_common::Histogram,
}

/// A running kernel agent. Dropping it stops the threads; attachments stay
/// in the module for the next agent.
#[derive(Debug)]
pub struct KernelAgent {
    dev: Arc<Device>,
    cfg: KernelConfig,
    homes: Arc<Homes>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    evictor: Mutex<Evictor>,
    stats: Arc<KernelStats>,
    /// Attachments with a redundancy of their own (the others take the
    /// agent's).
    policies: Mutex<std::collections::HashMap<u64, rmem_common::Redundancy>>,
}

#[derive(Debug)]
struct Evictor {
    remotes: Remotes,
    data: Vec<u8>,
    addrs: Vec<u64>,
}

impl KernelAgent {
    /// Opens the device and starts the threads that serve it.
    pub fn start(cfg: KernelConfig) -> Result<Self, KernelError> {
        let dev = Arc::new(Device::open(&cfg.device)?);
        warn_if_module_gives_up_first(cfg.fault_timeout);
        let in_use = dev.info()?.pages_in_use;
        let redundancy = match (&cfg.home, cfg.redundancy) {
            (_, Some(r)) => r,
            (Home::Cluster(c), None) => c.redundancy(),
            (Home::Servers(_), None) => rmem_common::Redundancy::None,
        };
        let homes = Homes::for_agent(
            cfg.home.clone(),
            in_use,
            cfg.state_dir.as_deref(),
            cfg.seal,
            cfg.request_timeout,
            redundancy,
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(KernelStats::default());
        let mut threads = Vec::new();
        // Frees go to a thread of their own: a free may wait on a server
        // that stopped answering (or on an invalidation it has not
        // acknowledged), and faults must not wait behind it.
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u64>>();
        for i in 0..cfg.fault_threads.max(1) {
            let (dev, homes, stop, stats) =
                (dev.clone(), homes.clone(), stop.clone(), stats.clone());
            let free_tx = free_tx.clone();
            // A page with other copies gets DEFAULT_FAILOVER_AFTER from one
            // server before another is read; a lone copy is waited for.
            let reads = Reads {
                lone: Remotes::new(cfg.request_timeout, Duration::ZERO),
                failover: Remotes::new(
                    crate::remote::DEFAULT_FAILOVER_AFTER.min(cfg.request_timeout),
                    Duration::ZERO,
                ),
            };
            let fault_timeout = cfg.fault_timeout;
            let delay = cfg.fetch_delay;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("rmem-kfault-{i}"))
                    .spawn(move || {
                        serve(
                            &dev,
                            &homes,
                            reads,
                            &stop,
                            &stats,
                            &free_tx,
                            fault_timeout,
                            delay,
                        )
                    })?,
            );
        }
        drop(free_tx);
        {
            let (homes, stats) = (homes.clone(), stats.clone());
            let remotes = Remotes::new(cfg.request_timeout, Duration::ZERO);
            let timeout = cfg.request_timeout;
            // Joined after the fault threads (whose senders end it).
            threads.push(
                std::thread::Builder::new()
                    .name("rmem-kfree".into())
                    .spawn(move || free_loop(&homes, remotes, &stats, &free_rx, timeout))?,
            );
        }
        let max = uapi::MAX_BATCH as usize;
        Ok(Self {
            dev,
            stop,
            threads,
            evictor: Mutex::new(Evictor {
                remotes: Remotes::new(cfg.request_timeout, Duration::ZERO),
                data: vec![0; max * PAGE_SIZE],
                addrs: vec![0; max],
            }),
            homes,
            stats,
            cfg,
            policies: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// The device, for what this type does not wrap.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Where the pages go: the memory server's address, or the cluster's
    /// coordinator.
    pub fn server(&self) -> String {
        self.homes.describe()
    }

    /// Where the pages are.
    pub fn homes(&self) -> &Homes {
        &self.homes
    }

    /// Counters since start.
    pub fn stats(&self) -> &KernelStats {
        &self.stats
    }

    /// Attaches process `pid` (a range of it, or all of it); its pages
    /// take the agent's redundancy.
    pub fn attach(&self, pid: i32, range: Option<(u64, u64)>) -> io::Result<u64> {
        self.dev.attach(pid, range)
    }

    /// As [`Self::attach`], with a redundancy of the attachment's own
    /// (`None`: the agent's). A policy the servers cannot hold (a stripe
    /// wider than the configured servers) is refused.
    pub fn attach_with(
        &self,
        pid: i32,
        range: Option<(u64, u64)>,
        policy: Option<rmem_common::Redundancy>,
    ) -> Result<u64, KernelError> {
        if let Some(p) = policy {
            self.homes.check_policy(p)?;
        }
        let att = self.dev.attach(pid, range)?;
        if let Some(p) = policy {
            self.lock_policies().insert(att, p);
        }
        Ok(att)
    }

    /// The attachments the module holds: this agent's, and those an
    /// earlier agent made (they outlive its open file).
    pub fn attachments(&self) -> io::Result<Vec<super::uapi::AttInfo>> {
        self.dev.list()
    }

    /// Takes over attachment `att`, made by an earlier agent: its pages
    /// get `policy`'s redundancy (`None`: the agent's).
    pub fn adopt(
        &self,
        att: u64,
        policy: Option<rmem_common::Redundancy>,
    ) -> Result<(), KernelError> {
        if let Some(p) = policy {
            self.homes.check_policy(p)?;
            self.lock_policies().insert(att, p);
        }
        Ok(())
    }

    /// The redundancy of attachment `att`'s pages.
    pub fn policy_of(&self, att: u64) -> rmem_common::Redundancy {
        self.lock_policies()
            .get(&att)
            .copied()
            .unwrap_or(self.homes.policy())
    }

    fn lock_policies(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, rmem_common::Redundancy>> {
        self.policies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings every page of the attachment back and removes it.
    pub fn detach(&self, id: u64) -> io::Result<u64> {
        let restored = self.dev.detach(id)?;
        self.lock_policies().remove(&id);
        Ok(restored)
    }

    /// Moves the present pages of `[start, start + len)` to the server. A
    /// page leaves RAM only after the server acknowledged its copy, and only
    /// if it still equals that copy; the copies of pages that stay are
    /// freed. Returns the pages moved.
    pub fn evict(&self, att: u64, start: u64, len: u64) -> Result<usize, KernelError> {
        let mut ev = self.evictor.lock().unwrap_or_else(|e| e.into_inner());
        let ev = &mut *ev;
        let page = PAGE_SIZE as u64;
        let end = start + len;
        let mut moved = 0;
        let mut addr = start;
        let mut retried = false;
        while addr < end {
            let pages = ((end - addr) / page).min(uapi::MAX_BATCH as u64) as usize;
            let n = match self.dev.evict_begin(
                att,
                addr,
                &mut ev.data[..pages * PAGE_SIZE],
                &mut ev.addrs[..pages],
            ) {
                Ok(n) => n,
                // Nothing mapped at `addr`: go on with the next page.
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                    addr += page;
                    continue;
                }
                // A mapping the module never evicts (mlocked,
                // userfaultfd-registered, not private anonymous): it counts
                // the batch's pages as skipped; go on after them.
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                    addr += pages as u64 * page;
                    retried = false;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                addr += pages as u64 * page;
                retried = false;
                continue;
            }
            let policy = self.lock_policies().get(&att).copied();
            let now = self.store_and_commit(ev, att, addr, pages, n, policy)?;
            moved += now;
            if now < n && !retried {
                // A page can miss a migration for a moment (a per-CPU LRU
                // batch holds it, a split races): try the range once more;
                // what moved is device memory now and is not copied again.
                retried = true;
                continue;
            }
            retried = false;
            // The copy stops at the end of a mapping: go on after its last page.
            addr = ev.addrs[n - 1] + page;
        }
        Ok(moved)
    }

    fn store_and_commit(
        &self,
        ev: &mut Evictor,
        att: u64,
        start: u64,
        max_pages: usize,
        n: usize,
        policy: Option<rmem_common::Redundancy>,
    ) -> Result<usize, KernelError> {
        let first = self.homes.take(n);
        let handles: Vec<u64> = (first..first + n as u64).collect();
        let pieces = self.homes.place(first, n, policy)?;
        let deadline = Instant::now() + self.cfg.request_timeout;
        let data = &ev.data;
        let (ok, error) = self.homes.put(
            &mut ev.remotes,
            first,
            &pieces,
            |i| {
                data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .try_into()
                    .expect("page-sized slice")
            },
            deadline,
        );
        let stored = match ok.iter().position(|ok| !ok) {
            None => Ok(()),
            Some(i) => Err(KernelError::NotStored {
                handle: handles[i],
                why: error.unwrap_or_default(),
            }),
        };
        self.homes.stored(&pieces);
        let discard = |ev: &mut Evictor, handles: &[u64]| {
            self.homes.discard(
                &mut ev.remotes,
                handles,
                Instant::now() + self.cfg.request_timeout,
            )
        };
        if let Err(e) = stored {
            // Nothing left RAM: drop whatever was stored.
            let _ = discard(ev, &handles);
            return Err(e);
        }
        let mut status = vec![0u8; n];
        let moved = match self.dev.evict_commit(
            att,
            start,
            max_pages,
            &ev.addrs[..n],
            &handles,
            &ev.data[..n * PAGE_SIZE],
            &mut status,
        ) {
            Ok(m) => m,
            // The mapping became one the module never evicts (mlocked,
            // say) since the copy: nothing moved, and that is no error.
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                discard(ev, &handles)?;
                return Ok(0);
            }
            Err(e) => {
                // Nothing moved (the module reports errors only before moving).
                let _ = discard(ev, &handles);
                return Err(e.into());
            }
        };
        let stay: Vec<u64> = handles
            .iter()
            .zip(&status)
            .filter(|(_, s)| **s == 0)
            .map(|(h, _)| *h)
            .collect();
        if !stay.is_empty() {
            self.stats
                .kept_local
                .fetch_add(stay.len() as u64, Ordering::Relaxed);
            discard(ev, &stay)?;
        }
        self.stats
            .evicted
            .fetch_add(moved as u64, Ordering::Relaxed);
        Ok(moved)
    }
}

impl Drop for KernelAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Device pages left (of processes still attached) keep their
        // handles' intervals and grants for the next agent.
        let in_use = self.dev.info().map_or(u64::MAX, |i| i.pages_in_use);
        self.homes.close(in_use);
    }
}

/// One fault thread: wait for events, answer fetches, hand freed handles
/// to the free thread.
/// The fetches one wait returns (a fault and the neighbours it brings back
/// with it, or several faults) go to their servers as one batch each.
/// The module's own bound on a fault (`fault_timeout_ms`) ends a fault the
/// agent is still fetching for: say so when it is the shorter one.
fn warn_if_module_gives_up_first(fault_timeout: Duration) {
    let param = "/sys/module/rmem/parameters/fault_timeout_ms";
    let Some(module) = std::fs::read_to_string(param)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
    else {
        return;
    };
    if module <= fault_timeout {
        tracing::warn!(
            module = ?module,
            agent = ?fault_timeout,
            "the module's fault_timeout_ms is not longer than the agent's fault_timeout: a fault waiting on a stalled server gets SIGBUS after the module's; load rmem.ko with a longer fault_timeout_ms"
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn serve(
    dev: &Device,
    homes: &Homes,
    mut reads: Reads,
    stop: &AtomicBool,
    stats: &KernelStats,
    free: &std::sync::mpsc::Sender<Vec<u64>>,
    fault_timeout: Duration,
    delay: Duration,
) {
    let mut events = vec![Event::default(); 64];
    let mut fetch = Fetcher {
        pages: vec![[0u8; PAGE_SIZE]; events.len()],
        statuses: Vec::new(),
        handles: Vec::new(),
        delay,
    };
    let mut fetches: Vec<Event> = Vec::new();
    let mut freed = Vec::new();
    let mut free_gone = false;
    loop {
        // Once stopping, what is already queued is still answered and
        // freed (a detach just before the stop frees its device pages, and
        // their handles would otherwise leak on the servers), then it ends.
        let stopping = stop.load(Ordering::Relaxed);
        let n = match dev.wait(&mut events, if stopping { 0 } else { 100 }) {
            Ok(0) if stopping => return,
            Ok(n) => n,
            Err(_) if stopping => return,
            Err(e) => {
                tracing::error!(error = %e, "waiting on /dev/rmem failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        freed.clear();
        fetches.clear();
        for e in &events[..n] {
            match e.kind {
                uapi::EVENT_FETCH => fetches.push(*e),
                uapi::EVENT_FREED => freed.push(e.handle),
                kind => tracing::warn!(kind, "unknown event from the module"),
            }
        }
        if !fetches.is_empty() {
            let started = std::time::Instant::now();
            fetch.answer(dev, homes, &mut reads, &fetches, stats, fault_timeout);
            // Each fault of the batch waited about this long in the agent.
            let took = started.elapsed();
            for _ in &fetches {
                stats.fetch_latency.record_duration(took);
            }
        }
        if !freed.is_empty() && free.send(std::mem::take(&mut freed)).is_err() && !free_gone {
            free_gone = true;
            tracing::error!("the free thread ended: freed pages now leak on the servers");
        }
    }
}

/// How often an idle free thread pays the frees failing servers owe.
const OWED_EVERY: Duration = Duration::from_secs(1);

/// The free thread: frees the handles the fault threads saw freed, as many
/// as are queued at once in one release, until every fault thread ended.
fn free_loop(
    homes: &Homes,
    mut remotes: Remotes,
    stats: &KernelStats,
    queue: &std::sync::mpsc::Receiver<Vec<u64>>,
    timeout: Duration,
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let mut freed = match queue.recv_timeout(OWED_EVERY) {
            Ok(f) => f,
            // Idle: pay what servers that failed owe, once they answer.
            Err(RecvTimeoutError::Timeout) => {
                homes.pay_owed(&mut remotes, Instant::now() + timeout);
                homes.compact_journal();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        while let Ok(more) = queue.try_recv() {
            freed.extend(more);
        }
        // Handles are never reused, so a free that fails only leaks.
        match homes.release(&mut remotes, &freed, Instant::now() + timeout) {
            Ok(through_cluster) => {
                stats.freed.fetch_add(freed.len() as u64, Ordering::Relaxed);
                stats
                    .invalidated
                    .fetch_add(through_cluster as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, pages = freed.len(), "freeing remote pages failed; they leak on the server")
            }
        }
        homes.compact_journal();
    }
}

/// A fault thread's connections: for pages with a lone copy (waited for,
/// up to the request timeout a try), and for pages with other copies or a
/// stripe (a server gets DEFAULT_FAILOVER_AFTER, then the next is read).
struct Reads {
    lone: Remotes,
    failover: Remotes,
}

/// A fault thread's buffers for fetching.
struct Fetcher {
    pages: Vec<Page>,
    statuses: Vec<PageStatus>,
    handles: Vec<u64>,
    /// `KernelConfig::fetch_delay`.
    delay: Duration,
}

impl Fetcher {
    /// Fetches the pages of `fetches` (grouped by server, in batches the
    /// server accepts) and answers each request: its page, or EIO (the
    /// faulting task gets SIGBUS). A handle the book does not place (one of
    /// an earlier agent run) is asked of each known server in turn.
    fn answer(
        &mut self,
        dev: &Device,
        homes: &Homes,
        reads: &mut Reads,
        fetches: &[Event],
        stats: &KernelStats,
        timeout: Duration,
    ) {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let deadline = Instant::now() + timeout;
        // Per server, and whether the pages have other copies.
        let mut by_server: BTreeMap<(u8, bool), Vec<Event>> = BTreeMap::new();
        let mut unplaced = Vec::new();
        // Pages whose server is known to be failing, rebuilt from their
        // stripes.
        let mut rebuild = Vec::new();
        for e in fetches {
            match homes.reader_of(e.handle) {
                Some(Source::Rebuild(s)) => rebuild.push((s, *e)),
                Some(s) => by_server
                    .entry((s.server(), homes.copies_of(e.handle) > 1))
                    .or_default()
                    .push(*e),
                None => unplaced.push(*e),
            }
        }
        for ((server, others), events) in by_server {
            // With other copies, one server gets `failover` at a time, not
            // the whole fault timeout.
            let (remotes, until) = if others {
                (
                    &mut reads.failover,
                    (Instant::now() + crate::remote::DEFAULT_FAILOVER_AFTER).min(deadline),
                )
            } else {
                (&mut reads.lone, deadline)
            };
            let failed = self.fetch_from(dev, homes, remotes, server, &events, stats, until);
            if !failed.is_empty() {
                // Formatted only if the warning is written.
                homes.suspect(
                    server,
                    &format_args!(
                        "{} of {} pages could not be read",
                        failed.len(),
                        events.len()
                    ),
                );
            }
            // Another copy or the page's stripe, or the run moved meanwhile
            // (its server was drained): the book is asked again.
            rebuild.extend(failed.into_iter().map(|e| (server, e)));
        }
        // Per failing server: the pages of one erasure-coded run there are
        // rebuilt together (one GET to each of K other slots); the rest,
        // and copies, one by one.
        let failover = crate::remote::DEFAULT_FAILOVER_AFTER;
        let mut by_failing: BTreeMap<u8, Vec<Event>> = BTreeMap::new();
        for (server, e) in rebuild {
            by_failing.entry(server).or_default().push(e);
        }
        let mut page = [0u8; rmem_client::PAGE_SIZE];
        for (server, events) in by_failing {
            for chunk in events.chunks(self.pages.len()) {
                let handles: Vec<u64> = chunk.iter().map(|e| e.handle).collect();
                let rebuilt = homes.rebuild_ahead(
                    &mut reads.failover,
                    &handles,
                    server,
                    &mut self.pages[..chunk.len()],
                    deadline,
                    failover,
                );
                for (i, e) in chunk.iter().enumerate() {
                    let served = if rebuilt.get(i) == Some(&true) {
                        page = self.pages[i];
                        true
                    } else {
                        // A lone copy (its run moved, say) is waited for.
                        let conns = if homes.copies_of(e.handle) > 1 {
                            &mut reads.failover
                        } else {
                            &mut reads.lone
                        };
                        homes.read_other(conns, e.handle, server, &mut page, deadline, failover)
                    };
                    if served {
                        stats.fetched_degraded.fetch_add(1, Ordering::Relaxed);
                        reply(dev, e, Some(&page), stats);
                    } else {
                        give_up(dev, homes, server, e, stats);
                    }
                }
            }
        }
        for e in unplaced {
            let found = homes.candidates().find(|&server| {
                self.fetch_from(dev, homes, &mut reads.lone, server, &[e], stats, deadline)
                    .is_empty()
            });
            match found {
                Some(server) => homes.learn(e.handle, server),
                None => {
                    tracing::error!(
                        handle = e.handle,
                        pid = e.pid,
                        addr = e.addr,
                        "no server holds a remote page; the faulting task gets SIGBUS"
                    );
                    reply(dev, &e, None, stats);
                }
            }
        }
    }

    /// Fetches `events` from `server` and answers those found; returns the
    /// others (not found, or the server failed).
    #[allow(clippy::too_many_arguments)]
    fn fetch_from(
        &mut self,
        dev: &Device,
        homes: &Homes,
        remotes: &mut Remotes,
        server: u8,
        events: &[Event],
        stats: &KernelStats,
        deadline: Instant,
    ) -> Vec<Event> {
        let Some(conn) = remotes.get(homes.servers(), server) else {
            return events.to_vec();
        };
        let max = match conn.max_batch(deadline) {
            Ok(m) => (m.max(1) as usize).min(self.pages.len()),
            // Not reachable now: every page of the batch goes elsewhere (one
            // line for the batch, not one per page).
            Err(e) => {
                tracing::warn!(server = %homes.servers().addr(server), error = %e, pages = events.len(), "fetching remote pages failed");
                return events.to_vec();
            }
        };
        let mut failed = Vec::new();
        for batch in events.chunks(max) {
            self.handles.clear();
            self.handles.extend(batch.iter().map(|e| e.handle));
            let got = conn.get(
                &self.handles,
                &mut self.pages[..batch.len()],
                &mut self.statuses,
                deadline,
            );
            if let Err(e) = &got {
                tracing::warn!(server = %homes.servers().addr(server), error = %e, "fetching remote pages failed");
            }
            // A server returning damaged pages (their checksum failed
            // there, or their seal here) is read and placed around.
            if got.is_ok() && self.statuses.contains(&PageStatus::Corrupt) {
                homes.suspect(server, &"it returned damaged pages");
            }
            for (i, e) in batch.iter().enumerate() {
                if got.is_ok() && self.statuses.get(i) == Some(&PageStatus::Ok) {
                    reply(dev, e, Some(&self.pages[i]), stats);
                } else {
                    failed.push(*e);
                }
            }
        }
        failed
    }
}

/// Answers a fetch its server could not serve with EIO, and says so.
fn give_up(dev: &Device, homes: &Homes, server: u8, e: &Event, stats: &KernelStats) {
    tracing::error!(handle = e.handle, pid = e.pid, addr = e.addr, server = %homes.servers().addr(server),
        "cannot fetch a remote page; the faulting task gets SIGBUS");
    reply(dev, e, None, stats);
}

/// Answers one fetch: its page, or EIO.
fn reply(dev: &Device, e: &Event, page: Option<&Page>, stats: &KernelStats) {
    let r = match page {
        Some(p) => FetchReply::Page(p),
        None => {
            stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
            FetchReply::Error(libc::EIO)
        }
    };
    match dev.reply(e.id, r) {
        Ok(()) => {
            if page.is_some() {
                stats.fetched.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The fault gave up (signal or timeout) meanwhile.
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
        Err(err) => tracing::error!(error = %err, "replying to the module failed"),
    }
}

//! The kernel backend's agent: serves the module's fetch requests and freed
//! handles from a memory server, and moves pages out on request.
//!
//! Handles are never reused: each agent start draws a random 24-bit epoch for
//! the top bits and counts up below it, so a late FREE of an old handle can
//! never hit a page stored later under the same handle.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmem_client::{ClientConfig, ClientError, Page, PageStatus};

use super::device::{Device, FetchReply};
use super::uapi::{self, Event, PAGE_SIZE};
use crate::remote::{RemoteConn, thread_config};

/// How the kernel agent runs.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// `/dev/rmem`.
    pub device: std::path::PathBuf,
    /// The memory server holding the pages.
    pub server: ClientConfig,
    /// Threads answering the module's requests.
    pub fault_threads: usize,
    /// Longest a server request may take before a fault gets SIGBUS or an
    /// eviction is undone (keep it below the module's fault_timeout_ms).
    pub request_timeout: Duration,
}

impl KernelConfig {
    /// Defaults for `server`.
    pub fn new(server: ClientConfig) -> Self {
        Self {
            device: super::device::DEVICE_PATH.into(),
            server,
            fault_threads: 2,
            request_timeout: Duration::from_secs(5),
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
    #[error("DAMON: {0}")]
    Monitor(io::Error),
    #[error("memory server refused page {handle:#x}: {status:?}")]
    Refused { handle: u64, status: PageStatus },
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct KernelStats {
    pub fetched: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub freed: AtomicU64,
    pub evicted: AtomicU64,
    pub kept_local: AtomicU64,
}

/// A running kernel agent. Dropping it stops the threads; attachments stay
/// in the module for the next agent.
#[derive(Debug)]
pub struct KernelAgent {
    dev: Arc<Device>,
    cfg: KernelConfig,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    next_handle: AtomicU64,
    evictor: Mutex<Evictor>,
    stats: Arc<KernelStats>,
}

#[derive(Debug)]
struct Evictor {
    conn: RemoteConn,
    data: Vec<u8>,
    addrs: Vec<u64>,
}

impl KernelAgent {
    /// Opens the device and starts the threads that serve it.
    pub fn start(cfg: KernelConfig) -> Result<Self, KernelError> {
        let dev = Arc::new(Device::open(&cfg.device)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(KernelStats::default());
        let conn_cfg = thread_config(&cfg.server, cfg.request_timeout);
        let mut threads = Vec::new();
        for i in 0..cfg.fault_threads.max(1) {
            let (dev, stop, stats) = (dev.clone(), stop.clone(), stats.clone());
            let conn = RemoteConn::new(conn_cfg.clone());
            let timeout = cfg.request_timeout;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("rmem-kfault-{i}"))
                    .spawn(move || serve(&dev, conn, &stop, &stats, timeout))?,
            );
        }
        let epoch = u64::from(rand::random::<u32>() & 0xff_ffff);
        let max = uapi::MAX_BATCH as usize;
        Ok(Self {
            dev,
            stop,
            threads,
            next_handle: AtomicU64::new(epoch << 40),
            evictor: Mutex::new(Evictor {
                conn: RemoteConn::new(conn_cfg),
                data: vec![0; max * PAGE_SIZE],
                addrs: vec![0; max],
            }),
            stats,
            cfg,
        })
    }

    /// The device, for what this type does not wrap.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The memory server's address.
    pub fn server(&self) -> &str {
        &self.cfg.server.addr
    }

    /// Counters since start.
    pub fn stats(&self) -> &KernelStats {
        &self.stats
    }

    /// Attaches process `pid` (a range of it, or all of it).
    pub fn attach(&self, pid: i32, range: Option<(u64, u64)>) -> io::Result<u64> {
        self.dev.attach(pid, range)
    }

    /// Brings every page of the attachment back and removes it.
    pub fn detach(&self, id: u64) -> io::Result<u64> {
        self.dev.detach(id)
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
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                addr += pages as u64 * page;
                retried = false;
                continue;
            }
            let now = self.store_and_commit(ev, att, addr, pages, n)?;
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
    ) -> Result<usize, KernelError> {
        let first = self.next_handle.fetch_add(n as u64, Ordering::Relaxed);
        let handles: Vec<u64> = (first..first + n as u64).collect();
        let deadline = Instant::now() + self.cfg.request_timeout;
        let stored = (|| -> Result<(), KernelError> {
            let max = ev.conn.max_batch(deadline)?.max(1) as usize;
            for (k, chunk) in handles.chunks(max).enumerate() {
                let pages: Vec<(u64, &Page)> = chunk
                    .iter()
                    .enumerate()
                    .map(|(j, &h)| {
                        let i = k * max + j;
                        let page: &Page = ev.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                            .try_into()
                            .expect("page-sized slice");
                        (h, page)
                    })
                    .collect();
                let statuses = ev.conn.put(&pages, deadline)?;
                if let Some((i, s)) = statuses
                    .iter()
                    .enumerate()
                    .find(|(_, s)| **s != PageStatus::Ok)
                {
                    return Err(KernelError::Refused {
                        handle: chunk[i],
                        status: *s,
                    });
                }
            }
            Ok(())
        })();
        if let Err(e) = stored {
            // Nothing left RAM: drop whatever was stored.
            let _ = free_all(
                &mut ev.conn,
                &handles,
                Instant::now() + self.cfg.request_timeout,
            );
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
            Err(e) => {
                // Nothing moved (the module reports errors only before moving).
                let _ = free_all(
                    &mut ev.conn,
                    &handles,
                    Instant::now() + self.cfg.request_timeout,
                );
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
            free_all(
                &mut ev.conn,
                &stay,
                Instant::now() + self.cfg.request_timeout,
            )?;
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
    }
}

/// FREE in batches the server accepts.
fn free_all(conn: &mut RemoteConn, handles: &[u64], deadline: Instant) -> Result<(), ClientError> {
    let max = conn.max_batch(deadline)?.max(1) as usize;
    for chunk in handles.chunks(max) {
        conn.free(chunk, deadline)?;
    }
    Ok(())
}

/// One fault thread: wait for events, answer fetches, free freed handles.
/// The fetches one wait returns (a fault and the neighbours it brings back
/// with it, or several faults) go to the server as one batch.
fn serve(
    dev: &Device,
    mut conn: RemoteConn,
    stop: &AtomicBool,
    stats: &KernelStats,
    timeout: Duration,
) {
    let mut events = vec![Event::default(); 64];
    let mut pages: Vec<Page> = vec![[0u8; PAGE_SIZE]; events.len()];
    let mut statuses = Vec::new();
    let mut fetches: Vec<Event> = Vec::new();
    let mut handles: Vec<u64> = Vec::new();
    let mut freed = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let n = match dev.wait(&mut events, 100) {
            Ok(n) => n,
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
            answer_fetches(
                dev,
                &mut conn,
                &fetches,
                &mut handles,
                &mut pages,
                &mut statuses,
                stats,
                timeout,
            );
        }
        if !freed.is_empty() {
            // Handles are never reused, so a FREE that fails only leaks.
            match free_all(&mut conn, &freed, Instant::now() + timeout) {
                Ok(_) => {
                    stats.freed.fetch_add(freed.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, pages = freed.len(), "freeing remote pages failed; they leak on the server")
                }
            }
        }
    }
}

/// Fetches the pages of `fetches` (in batches the server accepts) and
/// answers each request: its page, or EIO (the faulting task gets SIGBUS).
#[allow(clippy::too_many_arguments)]
fn answer_fetches(
    dev: &Device,
    conn: &mut RemoteConn,
    fetches: &[Event],
    handles: &mut Vec<u64>,
    pages: &mut [Page],
    statuses: &mut Vec<PageStatus>,
    stats: &KernelStats,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let max = conn
        .max_batch(deadline)
        .map_or(1, |m| m.max(1) as usize)
        .min(pages.len());
    for batch in fetches.chunks(max) {
        handles.clear();
        handles.extend(batch.iter().map(|e| e.handle));
        let got = conn.get(handles, &mut pages[..batch.len()], statuses, deadline);
        for (i, e) in batch.iter().enumerate() {
            let status = statuses.get(i).copied();
            let reply = match (&got, status) {
                (Ok(()), Some(PageStatus::Ok)) => FetchReply::Page(&pages[i]),
                _ => {
                    tracing::error!(handle = e.handle, pid = e.pid, addr = e.addr, result = ?got, ?status,
                        "cannot fetch a remote page; the faulting task gets SIGBUS");
                    stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    FetchReply::Error(libc::EIO)
                }
            };
            match dev.reply(e.id, reply) {
                Ok(()) => {
                    stats.fetched.fetch_add(1, Ordering::Relaxed);
                }
                // The fault gave up (signal or timeout) meanwhile.
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                Err(err) => tracing::error!(error = %err, "replying to the module failed"),
            }
        }
    }
}

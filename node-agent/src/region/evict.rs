//! The evictor: keeps a region within its budget by moving cold pages to
//! the memory server.
//!
//! A victim is a page the clock found untouched for a revolution; it has no
//! PTE, so the program cannot change it without faulting into the agent,
//! and any such fault waits (the page is `Evicting`). The evictor reads the
//! page through the memfd, stores it under a new handle, and frees the
//! memory only after the server acknowledged it. Clean pages (the server's
//! copy is current) and all-zero pages are freed without being sent. A
//! page's older copy is freed only once its newer one is acknowledged.
//!
//! Several evictor threads (`evict_threads`) take victims from one clock,
//! each its own batch: while one batch is on the wire or being stored,
//! another is read and sent, so the server and the evictors' work overlap.
//! Victims are read in runs of consecutive pages, one `pread` each.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rmem_client::{PAGE_SIZE, Page};

use super::Inner;
use super::state::{CLEAN, Kind, PREFETCHED, STORED, State, WAITER};
use crate::remote::Remotes;

/// Body of an evictor thread.
pub(crate) fn run(inner: &Inner, mut conn: Remotes) {
    let batch = inner.evict_pages();
    let mut victims = Vec::with_capacity(batch);
    let mut pages: Vec<Page> = vec![[0u8; PAGE_SIZE]; batch];
    let mut backoff = Duration::from_millis(10);
    while !inner.stop.load(Ordering::Relaxed) {
        if inner.demand() <= inner.high_mark() {
            let guard = inner.evict_wanted.0.lock().expect("evict lock");
            if inner.demand() <= inner.high_mark() {
                let _ = inner
                    .evict_wanted
                    .1
                    .wait_timeout(guard, Duration::from_millis(20))
                    .expect("evict lock");
                continue;
            }
        }
        while inner.demand() > inner.low_mark() && !inner.stop.load(Ordering::Relaxed) {
            victims.clear();
            let took = inner.clock.lock().expect("clock lock").collect(
                &inner.states,
                &inner.backing,
                batch,
                &mut victims,
            );
            if took == 0 {
                // Everything resident is in flight; let it settle.
                std::thread::sleep(Duration::from_millis(1));
                break;
            }
            busy(inner, 1);
            let ok = evict(inner, &mut conn, &victims, &mut pages);
            busy(inner, -1);
            if ok {
                if inner.evict_stalled.swap(false, Ordering::AcqRel) {
                    tracing::info!(
                        region = format_args!("{:06x}", inner.id),
                        "eviction resumed"
                    );
                }
                backoff = Duration::from_millis(10);
            } else {
                if !inner.evict_stalled.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        region = format_args!("{:06x}", inner.id),
                        "eviction stalled: the region runs over its budget until the servers take pages again"
                    );
                    inner.space_freed.1.notify_all();
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                break;
            }
        }
    }
}

/// Counts an evictor starting (`+1`) or ending (`-1`) a batch, adding the
/// time since the last change to `evict_busy_ns` if one was busy.
fn busy(inner: &Inner, delta: isize) {
    let mut e = inner.evicting.lock().expect("evicting lock");
    let now = Instant::now();
    if e.0 > 0 {
        inner
            .stats
            .evict_busy_ns
            .fetch_add((now - e.1).as_nanos() as u64, Ordering::Relaxed);
    }
    e.0 = e.0.checked_add_signed(delta).expect("balanced");
    e.1 = now;
}

/// Evicts claimed victims. False when a server could not take them (they
/// stay in memory, unchanged).
fn evict(inner: &Inner, remotes: &mut Remotes, victims: &[usize], pages: &mut [Page]) -> bool {
    let states = &inner.states;
    // Victims whose memory can go, freed together at the end in runs.
    let mut done: Vec<Release> = Vec::with_capacity(victims.len());
    // (page, buffer index) of the pages to send.
    let mut send: Vec<(usize, usize)> = Vec::with_capacity(victims.len());
    // Older copies to free once the pages are settled.
    let mut stale: Vec<u64> = Vec::new();
    // Victims to read (clean ones' copies are current), in runs of
    // consecutive pages read with one call each into consecutive buffers.
    let mut read: Vec<usize> = Vec::with_capacity(victims.len());
    for &v in victims {
        let s = states.get(v);
        if s.has(CLEAN) && s.has(STORED) {
            done.push(Release::to(v, Kind::Remote));
            inner
                .stats
                .pages_dropped_clean
                .fetch_add(1, Ordering::Relaxed);
        } else {
            read.push(v);
        }
    }
    let mut at = 0;
    for run in read.chunk_by(|a, b| a + 1 == *b) {
        let first = at;
        at += run.len();
        if let Err(e) = inner.backing.read_pages(run[0], &mut pages[first..at]) {
            tracing::error!(first = run[0], pages = run.len(), error = %e, "cannot read pages for eviction; keeping them");
            for &v in run {
                abort(inner, v);
            }
            continue;
        }
        for (k, &v) in (first..at).zip(run) {
            if pages[k].iter().all(|&b| b == 0) {
                // Reads as zeroes again: no copy is needed, an older one
                // goes.
                let mut r = Release::to(v, Kind::Absent);
                if states.get(v).has(STORED) {
                    r.clear = STORED | CLEAN;
                    r.stale = Some(inner.handle(v));
                }
                done.push(r);
                inner
                    .stats
                    .pages_dropped_zero
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            send.push((v, k));
        }
    }
    let mut all_ok = true;
    if !send.is_empty() {
        let first = inner.homes.take(send.len());
        match inner.homes.place(first, send.len(), None) {
            Ok(pieces) => {
                let (stored, error) = inner.homes.put(
                    remotes,
                    first,
                    &pieces,
                    |k| &pages[send[k].1],
                    deadline(inner),
                );
                inner.homes.stored(&pieces);
                let mut failed = Vec::new();
                for (k, (&(v, _), ok)) in send.iter().zip(&stored).enumerate() {
                    let h = first + k as u64;
                    if *ok {
                        let s = states.get(v);
                        done.push(Release {
                            set: STORED | CLEAN,
                            handle: Some(h),
                            stale: s.has(STORED).then(|| inner.handle(v)),
                            ..Release::to(v, Kind::Remote)
                        });
                        inner.stats.pages_evicted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.push(h);
                        abort(inner, v);
                    }
                }
                if !failed.is_empty() {
                    all_ok = false;
                    inner
                        .stats
                        .evict_failures
                        .fetch_add(failed.len() as u64, Ordering::Relaxed);
                    tracing::warn!(
                        region = format_args!("{:06x}", inner.id),
                        pages = failed.len(),
                        error = error.as_deref().unwrap_or("refused"),
                        "eviction failed; keeping the pages in memory"
                    );
                    // Whatever the servers kept of a failed page is garbage.
                    let _ = inner.homes.discard(remotes, &failed, deadline(inner));
                }
            }
            Err(e) => {
                tracing::warn!(region = format_args!("{:06x}", inner.id), error = %e, "no room for evicted pages; keeping them in memory");
                inner
                    .stats
                    .evict_failures
                    .fetch_add(send.len() as u64, Ordering::Relaxed);
                for &(v, _) in &send {
                    abort(inner, v);
                }
                all_ok = false;
            }
        }
    }
    release_all(inner, &mut done, &mut stale);
    if !stale.is_empty()
        && let Err(e) = inner.homes.discard(remotes, &stale, deadline(inner))
    {
        tracing::warn!(region = format_args!("{:06x}", inner.id), error = %e, pages = stale.len(), "cannot free replaced copies; they stay allocated");
    }
    all_ok
}

/// How long one eviction request may take before the pages stay.
fn deadline(inner: &Inner) -> Instant {
    Instant::now() + inner.cfg.fault_timeout.min(Duration::from_secs(2))
}

/// A victim whose memory may be freed, and the state it then takes.
struct Release {
    page: usize,
    kind: Kind,
    /// Flags set and cleared.
    set: u32,
    clear: u32,
    /// The handle of its new copy.
    handle: Option<u64>,
    /// Its older copy, freed once this is published.
    stale: Option<u64>,
}

impl Release {
    fn to(page: usize, kind: Kind) -> Self {
        Self {
            page,
            kind,
            set: 0,
            clear: 0,
            handle: None,
            stale: None,
        }
    }
}

/// Frees the memory of released victims, one `fallocate` per run of
/// consecutive pages, then publishes their new states (a new copy's handle
/// first); older copies they replace go to `stale`.
fn release_all(inner: &Inner, done: &mut [Release], stale: &mut Vec<u64>) {
    done.sort_unstable_by_key(|r| r.page);
    for run in done.chunk_by(|a, b| a.page + 1 == b.page) {
        let freed = inner.backing.free_pages(run[0].page, run.len());
        for r in run {
            if let Some(h) = r.handle {
                inner.handles[r.page].store(h, Ordering::Release);
            }
            stale.extend(r.stale);
            let s = State((inner.states.get(r.page).0 | r.set) & !r.clear);
            match &freed {
                Ok(()) => {
                    finish(
                        inner,
                        r.page,
                        s.with_kind(r.kind).clear(WAITER | PREFETCHED),
                    );
                    inner.uncharge(1);
                }
                Err(e) => {
                    tracing::error!(page = r.page, error = %e, "cannot free page memory; keeping it");
                    // Still in memory, but what the server acknowledged is
                    // recorded, so its copy is known (and freed with the
                    // region).
                    finish(inner, r.page, s.with_kind(Kind::Inactive));
                }
            }
        }
    }
}

/// Puts a victim back, unchanged, as an inactive page.
fn abort(inner: &Inner, v: usize) {
    let s = inner.states.get(v);
    finish(inner, v, s.with_kind(Kind::Inactive));
}

fn finish(inner: &Inner, v: usize, new: State) {
    let old = inner.states.swap(v, new.clear(WAITER));
    if old.has(WAITER) {
        inner.wake(v);
    }
}

//! Fault handling: the threads that read the region's userfaultfd and make
//! each faulting access succeed.
//!
//! The thread that reads a fault does all the work itself: it sends the GET
//! on its own connection, waits for the answer, and installs the page, so a
//! remote fault costs one wake-up of this thread plus one network round
//! trip. After a fault it keeps polling the descriptor for `spin` before it
//! sleeps in poll(2), so bursts of faults skip the wake-up.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rmem_client::{PAGE_SIZE, Page, PageStatus};

use super::Inner;
use super::state::{CLEAN, Kind, PREFETCHED, STORED, State, WAITER};
use crate::remote::{Remotes, Source};
use crate::uffd::{Fault, Resolve};

static ZERO_PAGE: Page = [0u8; PAGE_SIZE];

/// Buffers reused across faults so the fault path does not allocate.
struct Scratch {
    pages: Vec<usize>,
    handles: Vec<u64>,
    data: Vec<Page>,
    statuses: Vec<PageStatus>,
    /// Pages of a sequential window to map ahead of the program.
    to_map: Vec<usize>,
}

/// Body of a fault-handler thread.
pub(crate) fn run(inner: &Inner, mut conn: Remotes) {
    let cap = inner.cfg.prefetch_max + 1;
    let mut scratch = Scratch {
        pages: Vec::with_capacity(cap),
        handles: Vec::with_capacity(cap),
        data: vec![[0u8; PAGE_SIZE]; cap],
        statuses: Vec::with_capacity(cap),
        to_map: Vec::with_capacity(cap),
    };
    let mut last_fault = Instant::now();
    while !inner.stop.load(Ordering::Relaxed) {
        match inner.uffd.read_fault() {
            Ok(Some(fault)) => {
                handle(inner, &mut conn, &mut scratch, fault);
                last_fault = Instant::now();
            }
            Ok(None) => {
                if last_fault.elapsed() < inner.cfg.spin {
                    std::hint::spin_loop();
                } else if let Err(e) = inner.uffd.poll(Duration::from_millis(50)) {
                    tracing::error!(error = %e, "poll on userfaultfd failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reading userfaultfd failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn handle(inner: &Inner, conn: &mut Remotes, scratch: &mut Scratch, fault: Fault) {
    let started = Instant::now();
    let base = inner.backing.base() as u64;
    let Some(i) = fault
        .address
        .checked_sub(base)
        .map(|off| (off / PAGE_SIZE as u64) as usize)
        .filter(|&i| i < inner.states.len())
    else {
        tracing::error!(address = fault.address, "fault outside the region");
        return;
    };
    let states = &inner.states;
    let stats = &inner.stats;
    loop {
        let s = states.get(i);
        match s.kind() {
            Kind::Absent => {
                if !states.cas(i, s, s.with_kind(Kind::Fetching)) {
                    continue;
                }
                inner.charge(1);
                if !install(inner, i, &ZERO_PAGE, false) {
                    poison(inner, i, s.with_kind(Kind::Absent));
                    return;
                }
                finish(inner, i, s.with_kind(Kind::Active).clear(CLEAN));
                stats.faults_zero.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Kind::Remote => {
                if !states.cas(i, s, s.with_kind(Kind::Fetching)) {
                    continue;
                }
                fetch(inner, conn, scratch, i, s, fault);
                stats
                    .fault_remote_latency
                    .record_duration(started.elapsed());
                return;
            }
            Kind::Active if !fault.wp && !fault.minor => {
                // Resolved by someone else meanwhile.
                inner.wake(i);
                return;
            }
            Kind::Active | Kind::Inactive => {
                // Every change to a page's mapping happens while this thread
                // owns the page: otherwise the clock could deactivate and
                // claim it between our decision and the ioctl, and a page
                // mapped writable behind the evictor's back loses writes.
                if !states.cas(i, s, s.with_kind(Kind::Fetching)) {
                    continue;
                }
                let next = resolve_resident(inner, i, s, fault);
                finish(inner, i, next);
                if next.kind() == Kind::Active && s.kind() == Kind::Inactive {
                    stats.faults_minor.fetch_add(1, Ordering::Relaxed);
                    stats.fault_minor_latency.record_duration(started.elapsed());
                }
                return;
            }
            Kind::Fetching | Kind::Evicting => {
                // Another thread owns the page; it wakes us when done.
                if s.has(WAITER) || states.cas(i, s, s.set(WAITER)) {
                    stats.faults_coalesced.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// Resolves a fault on a resident page `i` that this thread owns (it was
/// `s` before); returns the state to publish.
fn resolve_resident(inner: &Inner, i: usize, s: State, fault: Fault) -> State {
    let stats = &inner.stats;
    if fault.wp && (s.kind() == Kind::Active || !fault.minor) {
        // A write to a clean page (mapped write-protected, or unmapped with
        // its write-protect marker): it now differs from the server's copy.
        // Drop the protection; an unmapped page's retried access then takes
        // the minor-fault path.
        unprotect(inner, i);
        stats.faults_write_protect.fetch_add(1, Ordering::Relaxed);
        return s.clear(CLEAN);
    }
    if s.kind() == Kind::Active {
        // In memory but not mapped (an earlier mapping attempt failed): map
        // it again; idempotent, so the program cannot fault forever.
        map_cached(inner, i, s.has(CLEAN));
        return s;
    }
    let mut next = s.with_kind(Kind::Active).clear(PREFETCHED);
    if fault.write {
        next = next.clear(CLEAN);
    }
    if s.has(PREFETCHED) {
        let mut prefetch = inner.prefetch.lock().expect("prefetch lock");
        // A window's marker: the stream ran through the pages mapped ahead
        // of it.
        let through = prefetch.reached(i);
        prefetch.observe(fault.tid, i);
        drop(prefetch);
        stats
            .prefetch_hits
            .fetch_add(1 + through, Ordering::Relaxed);
    }
    map_cached(inner, i, next.has(CLEAN));
    next
}

/// Retries `op` while the kernel answers EAGAIN: the address space is
/// changing under us (userfaultfd's `mmap_changing`, e.g. a fork or an
/// unmap elsewhere in the process), which passes in microseconds.
fn retry_eagain<T>(mut op: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    const TRIES: u32 = 10_000;
    for n in 0.. {
        match op() {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && n < TRIES => {
                if n < 16 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            r => return r,
        }
    }
    unreachable!("the loop returns")
}

/// Installs `data` at page `i` (which this thread owns) and wakes waiters.
/// False when the page could not be installed (the caller poisons it, so
/// the access fails with SIGBUS instead of faulting forever).
fn install(inner: &Inner, i: usize, data: &Page, write_protect: bool) -> bool {
    match retry_eagain(|| inner.uffd.copy(inner.page_addr(i), data, write_protect)) {
        Ok(Resolve::Done) => true,
        Ok(Resolve::Exists) => {
            inner.wake(i);
            true
        }
        Err(e) => {
            tracing::error!(page = i, error = %e, "UFFDIO_COPY failed");
            false
        }
    }
}

/// Publishes the final state of a page this thread owned and wakes anyone
/// who queued behind it.
fn finish(inner: &Inner, i: usize, new: State) {
    let old = inner.states.swap(i, new.clear(WAITER));
    if old.has(WAITER) {
        inner.wake(i);
    }
}

/// Maps a page that is in the memfd (resolves a minor fault).
fn map_cached(inner: &Inner, i: usize, write_protect: bool) {
    match retry_eagain(|| {
        inner
            .uffd
            .continue_(inner.page_addr(i), PAGE_SIZE as u64, write_protect)
    }) {
        Ok(Resolve::Done) => {}
        Ok(Resolve::Exists) => inner.wake(i),
        Err(e) => {
            tracing::error!(page = i, error = %e, "UFFDIO_CONTINUE failed");
            inner.wake(i);
        }
    }
}

fn unprotect(inner: &Inner, i: usize) {
    if let Err(e) = inner
        .uffd
        .write_protect(inner.page_addr(i), PAGE_SIZE as u64, false)
    {
        tracing::error!(page = i, error = %e, "clearing write protection failed");
        inner.wake(i);
    }
}

/// Fetches page `i` (owned, previously `before`) and, on a detected stream,
/// the pages ahead of it, in one request.
fn fetch(
    inner: &Inner,
    remotes: &mut Remotes,
    scratch: &mut Scratch,
    i: usize,
    before: State,
    fault: Fault,
) {
    let write = fault.write;
    let states = &inner.states;
    scratch.pages.clear();
    scratch.handles.clear();
    scratch.pages.push(i);
    let handle = inner.handle(i);
    let deadline = Instant::now() + inner.cfg.fault_timeout;
    let Some(source) = inner.homes.reader_of(handle) else {
        tracing::error!(
            region = format_args!("{:06x}", inner.id),
            page = i,
            handle,
            "no server is known to hold the page: the faulting thread gets SIGBUS"
        );
        inner.charge(1);
        fail_all(inner, scratch, before);
        return;
    };
    // With other copies, one server gets `failover_after`, not the whole
    // fault timeout.
    let first_try = if inner.homes.copies() > 1 {
        (Instant::now() + inner.cfg.failover_after).min(deadline)
    } else {
        deadline
    };
    let (server, degraded) = (source.server(), source.degraded());
    let rebuilding = matches!(source, Source::Rebuild(_));
    // The connection first: the server's batch limit bounds the prefetch.
    // A server that cannot be reached is read around, like a failed GET;
    // one known to be failing is not asked (the page is rebuilt from its
    // stripe, and so are the pages ahead of it there).
    let (limit, unreachable) = match remotes.get(inner.homes.servers(), server) {
        _ if rebuilding => (
            inner.cfg.prefetch_max + 1,
            Some(Err(format!("server {server} is failing"))),
        ),
        None => (
            1,
            Some(Err(format!("server {server} is not in the region's table"))),
        ),
        Some(conn) => match conn.max_batch(first_try) {
            Ok(l) => (l as usize, None),
            Err(e) => (1, Some(Ok(e))),
        },
    };
    let ahead = inner
        .prefetch
        .lock()
        .expect("prefetch lock")
        .observe(fault.tid, i);
    // One request to one server: prefetch only pages held where this one
    // is (rebuilding: pages rebuilt the same way).
    for j in ahead.pages(i, states.len()).take(limit.saturating_sub(1)) {
        let s = states.get(j);
        let here = if rebuilding {
            inner.homes.reader_of(inner.handle(j)) == Some(source)
        } else {
            inner.homes.server_of(inner.handle(j)) == Some(server)
        };
        if s.kind() == Kind::Remote && here && states.cas(j, s, s.with_kind(Kind::Fetching)) {
            scratch.pages.push(j);
        }
    }
    scratch
        .handles
        .extend(scratch.pages.iter().map(|&p| inner.handle(p)));
    inner.charge(scratch.pages.len());
    let n = scratch.pages.len();
    // Read from another copy than the run's first: that one is failing.
    if degraded {
        inner.stats.faults_degraded.fetch_add(1, Ordering::Relaxed);
    }
    let addr = inner.homes.servers().addr(server);
    let result: Result<(), (String, bool)> = match unreachable {
        Some(Ok(e)) => Err((e.to_string(), e.is_retryable())),
        Some(Err(why)) => Err((why, false)),
        None => remotes
            .get(inner.homes.servers(), server)
            .expect("connected above")
            .get(
                &scratch.handles,
                &mut scratch.data[..n],
                &mut scratch.statuses,
                first_try,
            )
            .map_err(|e| (e.to_string(), e.is_retryable())),
    };
    // Rebuilding pages ahead with the faulting one: one GET to each of K
    // other slots for all of them.
    let rebuilt = if rebuilding && n > 1 {
        inner.homes.rebuild_ahead(
            remotes,
            &scratch.handles,
            server,
            &mut scratch.data[..n],
            deadline,
            inner.cfg.failover_after,
        )
    } else {
        Vec::new()
    };
    let result = match result {
        Err(_) if rebuilt.first() == Some(&true) => {
            let ahead = rebuilt[1..].iter().filter(|&&ok| ok).count();
            inner
                .stats
                .prefetch_rebuilt
                .fetch_add(ahead as u64, Ordering::Relaxed);
            scratch.statuses.clear();
            scratch.statuses.extend(rebuilt.iter().map(|&ok| {
                if ok {
                    PageStatus::Ok
                } else {
                    PageStatus::NotFound
                }
            }));
            Ok(())
        }
        r => r,
    };
    if let Err((e, retryable)) = result {
        if inner.homes.copies() > 1 && retryable {
            inner.homes.suspect(server, &e);
        }
        // The prefetched pages wait for their own faults; the faulting
        // page is read from another copy.
        for &p in &scratch.pages[1..] {
            finish(inner, p, states.get(p).with_kind(Kind::Remote));
            inner.uncharge(1);
        }
        scratch.pages.truncate(1);
        if !read_elsewhere(
            inner,
            remotes,
            handle,
            server,
            &mut scratch.data[0],
            deadline,
        ) {
            tracing::error!(
                region = format_args!("{:06x}", inner.id), page = i, server = %addr, error = %e,
                "cannot fetch page from any copy: the faulting thread gets SIGBUS"
            );
            fail_all(inner, scratch, before);
            return;
        }
        if !degraded {
            inner.stats.faults_degraded.fetch_add(1, Ordering::Relaxed);
        }
        scratch.statuses.clear();
        scratch.statuses.push(PageStatus::Ok);
    }
    // A server returning damaged pages (their checksum failed there, or
    // their seal here) is read and placed around for a while.
    if scratch.statuses.contains(&PageStatus::Corrupt) {
        inner.homes.suspect(server, &"it returned damaged pages");
    }
    // A sequential stream's window is mapped at once, but for its last
    // page (the marker, whose touch keeps the stream observed): the
    // program runs through it with no fault.
    let map_ahead = ahead.stride == 1 && n > 2;
    scratch.to_map.clear();
    for (k, (&p, status)) in scratch.pages.iter().zip(&scratch.statuses).enumerate() {
        let prior = if k == 0 { before } else { states.get(p) };
        let mut data = &scratch.data[k];
        let mut moved = [0u8; PAGE_SIZE];
        if *status != PageStatus::Ok {
            if k > 0 {
                // Fetched again when touched.
                finish(inner, p, prior.with_kind(Kind::Remote));
                inner.uncharge(1);
                continue;
            }
            // The page's run may have moved meanwhile (its server was
            // drained), or this copy is gone: ask the book again and read
            // another copy.
            if !read_elsewhere(inner, remotes, handle, server, &mut moved, deadline) {
                tracing::error!(
                    region = format_args!("{:06x}", inner.id), page = p, server = %inner.homes.servers().addr(server),
                    status = %status, "server does not have the page: the faulting thread gets SIGBUS"
                );
                poison(inner, p, prior);
                continue;
            }
            if !degraded {
                inner.stats.faults_degraded.fetch_add(1, Ordering::Relaxed);
            }
            data = &moved;
        }
        if k == 0 {
            // The faulting page: map it; a read maps it write-protected so
            // the first write is seen and the server copy stays valid.
            if !install(inner, p, data, !write) {
                poison(inner, p, prior);
                continue;
            }
            let mut next = prior.with_kind(Kind::Active).set(STORED).clear(PREFETCHED);
            next = if write {
                next.clear(CLEAN)
            } else {
                next.set(CLEAN)
            };
            finish(inner, p, next);
            inner.stats.faults_remote.fetch_add(1, Ordering::Relaxed);
        } else {
            // Ahead of the stream: into memory, then mapped with the rest
            // of the window below; the marker (and a strided stream's
            // pages) stays unmapped, so its first touch is a cheap minor
            // fault that counts as a prefetch hit.
            match inner.backing.write_page(p, data) {
                Ok(()) => {
                    inner.stats.prefetch_issued.fetch_add(1, Ordering::Relaxed);
                    if map_ahead && k + 1 < n {
                        scratch.to_map.push(p);
                        continue;
                    }
                    let next = prior
                        .with_kind(Kind::Inactive)
                        .set(STORED | CLEAN | PREFETCHED);
                    finish(inner, p, next);
                }
                Err(e) => {
                    tracing::warn!(page = p, error = %e, "prefetch write failed");
                    finish(inner, p, prior.with_kind(Kind::Remote));
                    inner.uncharge(1);
                }
            }
        }
    }
    if !scratch.to_map.is_empty() {
        map_window(inner, fault.tid, &scratch.to_map, scratch.pages[n - 1]);
    }
}

/// Maps pages of a sequential window (in the memfd, owned by this thread,
/// ascending), one `UFFDIO_CONTINUE` per contiguous run, write-protected as
/// a read fault maps a page, and publishes them; `marker` is the window's
/// last page, left unmapped. A page that cannot be mapped stays in memory
/// unmapped, as a prefetched page (its touch is a minor fault).
fn map_window(inner: &Inner, tid: u32, pages: &[usize], marker: usize) {
    let states = &inner.states;
    // Told before the first page is mapped: mapping wakes the program,
    // which may reach the marker before this returns.
    let last = *pages.last().expect("not empty");
    inner.prefetch.lock().expect("prefetch lock").mapped_ahead(
        tid,
        last,
        marker,
        pages.len() as u64,
    );
    let mut mapped = 0u64;
    let mapped_state = |p: usize| {
        states
            .get(p)
            .with_kind(Kind::Active)
            .set(STORED | CLEAN)
            .clear(PREFETCHED)
    };
    let unmapped_state = |p: usize| {
        states
            .get(p)
            .with_kind(Kind::Inactive)
            .set(STORED | CLEAN | PREFETCHED)
    };
    for run in pages.chunk_by(|a, b| b == &(a + 1)) {
        let len = (run.len() * PAGE_SIZE) as u64;
        let whole = retry_eagain(|| inner.uffd.continue_(inner.page_addr(run[0]), len, true));
        for &p in run {
            let ok = match whole {
                Ok(Resolve::Done) => true,
                // Part of the run may be mapped: page by page.
                _ => retry_eagain(|| {
                    inner
                        .uffd
                        .continue_(inner.page_addr(p), PAGE_SIZE as u64, true)
                })
                .is_ok(),
            };
            if ok {
                mapped += 1;
                finish(inner, p, mapped_state(p));
            } else {
                finish(inner, p, unmapped_state(p));
            }
        }
    }
    inner
        .stats
        .prefetch_mapped
        .fetch_add(mapped, Ordering::Relaxed);
    let unmapped = pages.len() as u64 - mapped;
    if unmapped > 0 {
        // Those count on their own touch.
        inner
            .prefetch
            .lock()
            .expect("prefetch lock")
            .not_mapped(marker, unmapped);
    }
}

/// Reads `handle` from another copy, or rebuilds it from its stripe
/// ([`crate::remote::Homes::read_other`]), until `deadline`.
fn read_elsewhere(
    inner: &Inner,
    remotes: &mut Remotes,
    handle: u64,
    tried: u8,
    out: &mut Page,
    deadline: Instant,
) -> bool {
    inner.homes.read_other(
        remotes,
        handle,
        tried,
        out,
        deadline,
        inner.cfg.failover_after,
    )
}

/// Gives up on a fetch: the faulting page is poisoned (SIGBUS for the
/// access, never wrong data), prefetched pages go back to remote.
fn fail_all(inner: &Inner, scratch: &Scratch, before: State) {
    for (k, &p) in scratch.pages.iter().enumerate() {
        if k == 0 {
            poison(inner, p, before);
        } else {
            let prior = inner.states.get(p);
            finish(inner, p, prior.with_kind(Kind::Remote));
            inner.uncharge(1);
        }
    }
}

/// Makes accesses to page `i` fail with SIGBUS and publishes `after` (the
/// page's state before this thread took it).
fn poison(inner: &Inner, i: usize, after: State) {
    inner.stats.faults_failed.fetch_add(1, Ordering::Relaxed);
    let addr = inner.page_addr(i);
    let mut poisoned = inner.uffd.poison(addr, PAGE_SIZE as u64);
    if poisoned
        .as_ref()
        .is_err_and(|e| e.raw_os_error() == Some(libc::EEXIST))
    {
        // A write-protect marker left when a clean page's PTE was removed
        // occupies the entry: clear it, then poison.
        let _ = inner.uffd.write_protect(addr, PAGE_SIZE as u64, false);
        poisoned = inner.uffd.poison(addr, PAGE_SIZE as u64);
    }
    if let Err(e) = poisoned {
        tracing::error!(page = i, error = %e, "UFFDIO_POISON failed");
    }
    finish(inner, i, after);
    inner.uncharge(1);
    inner.wake(i);
}

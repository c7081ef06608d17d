//! The evictor: keeps a region within its budget by moving cold pages to
//! the memory server.
//!
//! A victim is a page the clock found untouched for a revolution; it has no
//! PTE, so the program cannot change it without faulting into the agent,
//! and any such fault waits (the page is `Evicting`). The evictor reads the
//! page through the memfd, stores it, and frees the memory only after the
//! server acknowledged it. Clean pages (the server's copy is current) and
//! all-zero pages are freed without being sent.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rmem_client::{PAGE_SIZE, Page, PageStatus};

use super::Inner;
use super::state::{CLEAN, Kind, PREFETCHED, STORED, State, WAITER};
use crate::placement::Remotes;
use crate::policy::clock::Clock;

/// Body of the evictor thread.
pub(crate) fn run(inner: &Inner, mut conn: Remotes) {
    let mut clock = Clock::new();
    let batch = inner.cfg.evict_batch;
    let mut victims = Vec::with_capacity(batch);
    let mut pages: Vec<Page> = vec![[0u8; PAGE_SIZE]; batch];
    let mut backoff = Duration::from_millis(10);
    while !inner.stop.load(Ordering::Relaxed) {
        if inner.resident.load(Ordering::Acquire) <= inner.high_mark() {
            let guard = inner.evict_wanted.0.lock().expect("evict lock");
            if inner.resident.load(Ordering::Acquire) <= inner.high_mark() {
                let _ = inner
                    .evict_wanted
                    .1
                    .wait_timeout(guard, Duration::from_millis(20))
                    .expect("evict lock");
                continue;
            }
        }
        while inner.resident.load(Ordering::Acquire) > inner.low_mark()
            && !inner.stop.load(Ordering::Relaxed)
        {
            victims.clear();
            if clock.collect(&inner.states, &inner.backing, batch, &mut victims) == 0 {
                // Everything resident is in flight; let it settle.
                std::thread::sleep(Duration::from_millis(1));
                break;
            }
            let started = Instant::now();
            let ok = evict(inner, &mut conn, &victims, &mut pages);
            inner
                .stats
                .evict_busy_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if ok {
                if inner.evict_stalled.swap(false, Ordering::AcqRel) {
                    tracing::info!(
                        region = format_args!("{:09x}", inner.id),
                        "eviction resumed"
                    );
                }
                backoff = Duration::from_millis(10);
            } else {
                if !inner.evict_stalled.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        region = format_args!("{:09x}", inner.id),
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

/// Evicts claimed victims. False when a server could not take them (they
/// stay in memory, unchanged).
fn evict(inner: &Inner, remotes: &mut Remotes, victims: &[usize], pages: &mut [Page]) -> bool {
    let states = &inner.states;
    // Victims whose memory can go, freed together at the end in runs.
    let mut done: Vec<Release> = Vec::with_capacity(victims.len());
    // (server, page, buffer index) of the pages to send.
    let mut send: Vec<(u8, usize, usize)> = Vec::with_capacity(victims.len());
    for &v in victims {
        let s = states.get(v);
        if s.has(CLEAN) && s.has(STORED) {
            done.push(Release {
                page: v,
                kind: Kind::Remote,
                server: s.server(),
                flags: 0,
            });
            inner
                .stats
                .pages_dropped_clean
                .fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let k = send.len();
        let buf = &mut pages[k];
        if let Err(e) = inner.backing.read_page(v, buf) {
            tracing::error!(page = v, error = %e, "cannot read page for eviction; keeping it");
            abort(inner, v);
            continue;
        }
        if buf.iter().all(|&b| b == 0) {
            done.push(Release {
                page: v,
                kind: Kind::Absent,
                server: s.server(),
                flags: 0,
            });
            inner
                .stats
                .pages_dropped_zero
                .fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // A page keeps the server that holds its older copy, so no stale
        // copy is left elsewhere; a new one goes where its segment is placed.
        let server = if s.has(STORED) {
            s.server()
        } else {
            inner.placement.server_for(v)
        };
        send.push((server, v, k));
    }
    send.sort_unstable_by_key(|&(server, _, _)| server);
    let mut all_ok = true;
    for group in send.chunk_by(|a, b| a.0 == b.0) {
        all_ok &= put_group(inner, remotes, group, pages, &mut done);
    }
    release_all(inner, &mut done);
    all_ok
}

/// A victim whose memory may be freed, and the state it then takes.
struct Release {
    page: usize,
    kind: Kind,
    server: u8,
    flags: u32,
}

/// Stores pages bound for one server.
fn put_group(
    inner: &Inner,
    remotes: &mut Remotes,
    group: &[(u8, usize, usize)],
    pages: &[Page],
    done: &mut Vec<Release>,
) -> bool {
    let server = group[0].0;
    let Some(conn) = remotes.get(&inner.placement, server) else {
        tracing::error!(
            server,
            "eviction to a server the region does not know; keeping the pages"
        );
        for &(_, v, _) in group {
            abort(inner, v);
        }
        return false;
    };
    let items: Vec<(u64, &Page)> = group
        .iter()
        .map(|&(_, v, k)| (inner.handle(v), &pages[k]))
        .collect();
    let deadline = Instant::now() + inner.cfg.fault_timeout.min(Duration::from_secs(2));
    // In requests the server accepts.
    let put = conn.max_batch(deadline).and_then(|limit| {
        let mut statuses = Vec::with_capacity(items.len());
        for chunk in items.chunks(limit.max(1) as usize) {
            statuses.extend(conn.put(chunk, deadline)?);
        }
        Ok(statuses)
    });
    match put {
        Ok(statuses) => {
            let mut all_ok = true;
            for (&(_, v, _), status) in group.iter().zip(&statuses) {
                if *status == PageStatus::Ok {
                    done.push(Release {
                        page: v,
                        kind: Kind::Remote,
                        server,
                        flags: STORED | CLEAN,
                    });
                    inner.stats.pages_evicted.fetch_add(1, Ordering::Relaxed);
                } else {
                    all_ok = false;
                    inner.stats.evict_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(page = v, %status, server = %conn.addr(), "server refused a page; keeping it in memory");
                    abort(inner, v);
                }
            }
            all_ok
        }
        Err(e) => {
            tracing::warn!(server = %conn.addr(), error = %e, pages = group.len(), "eviction failed; keeping the pages in memory");
            inner
                .stats
                .evict_failures
                .fetch_add(group.len() as u64, Ordering::Relaxed);
            for &(_, v, _) in group {
                abort(inner, v);
            }
            false
        }
    }
}

/// Frees the memory of released victims, one `fallocate` per run of
/// consecutive pages, then publishes their new states (`server` holds a
/// page's copy when `STORED` is or becomes set).
fn release_all(inner: &Inner, done: &mut [Release]) {
    done.sort_unstable_by_key(|r| r.page);
    for run in done.chunk_by(|a, b| a.page + 1 == b.page) {
        let freed = inner.backing.free_pages(run[0].page, run.len());
        for r in run {
            let s = inner.states.get(r.page).with_server(r.server);
            match &freed {
                Ok(()) => {
                    let next = State(s.0 | r.flags)
                        .with_kind(r.kind)
                        .clear(WAITER | PREFETCHED);
                    finish(inner, r.page, next);
                    inner.uncharge(1);
                }
                Err(e) => {
                    tracing::error!(page = r.page, error = %e, "cannot free page memory; keeping it");
                    // Still in memory, but what the server acknowledged is
                    // recorded, so its copy is known (and freed with the
                    // region).
                    finish(
                        inner,
                        r.page,
                        State(s.0 | r.flags).with_kind(Kind::Inactive),
                    );
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

//! Moving a region's pages off a server (the server is draining).
//!
//! Each page whose copy is on the old server is taken over like a fault
//! takes a page (`Remote` -> `Fetching`), read from the old server (its
//! CRC32C checked on receipt), stored on the new one (checked again by
//! that server), recorded as held there, and only then freed on the old
//! server. A fault on a page being moved waits for it like for a fetch. A
//! resident page whose copy is on the old server simply forgets that copy
//! (it will be stored on its segment's new server when next evicted).
//! Pages busy with another thread are left for the next pass.

use std::time::{Duration, Instant};

use rmem_client::{PAGE_SIZE, Page, PageStatus};

use super::Inner;
use super::state::{CLEAN, Kind, STORED, State, WAITER};
use crate::placement::Remotes;

/// What a move achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MoveReport {
    /// Remote pages copied to the new server.
    pub moved: u64,
    /// Resident pages that dropped their copy on the old server.
    pub forgotten: u64,
    /// Pages still on the old server (busy, or a server failed).
    pub left: u64,
}

/// Moves every page held on server `from` to server `to`; passes over
/// the region until none is left or `passes` are used.
pub(crate) fn move_pages(inner: &Inner, from: u8, to: u8, passes: usize) -> MoveReport {
    let mut remotes = Remotes::new(inner.cfg.fault_timeout, Duration::ZERO);
    let mut report = MoveReport::default();
    // Batches both servers accept.
    let deadline = Instant::now() + inner.cfg.fault_timeout;
    let mut limit = |s: u8| {
        remotes
            .get(&inner.placement, s)
            .map(|c| c.max_batch(deadline))
    };
    let batch = match (limit(from), limit(to)) {
        (Some(Ok(a)), Some(Ok(b))) => inner.cfg.evict_batch.min(a as usize).min(b as usize).max(1),
        _ => {
            tracing::warn!(from, to, "cannot reach the servers to move pages between");
            report.left = inner.states.len() as u64;
            return report;
        }
    };
    let mut pages: Vec<Page> = vec![[0u8; PAGE_SIZE]; batch];
    let mut statuses = Vec::with_capacity(batch);
    for pass in 0..passes {
        let mut claimed = Vec::with_capacity(batch);
        let mut left = 0;
        for i in 0..inner.states.len() {
            let s = inner.states.get(i);
            // A page owned by another thread may be on its way to the old
            // server (an eviction that read the segment's server before it
            // was re-pointed, not yet STORED): count it until it settles.
            if matches!(s.kind(), Kind::Fetching | Kind::Evicting) {
                left += 1;
                continue;
            }
            if !s.has(STORED) || s.server() != from {
                continue;
            }
            match s.kind() {
                Kind::Remote => {
                    if inner.states.cas(i, s, s.with_kind(Kind::Fetching)) {
                        claimed.push((i, s));
                    } else {
                        left += 1;
                    }
                }
                Kind::Active | Kind::Inactive | Kind::Absent => {
                    // The local copy (or zero page) is the truth; the old
                    // server's copy is dropped. The page is held while its
                    // copy is freed, so no eviction can store a new copy
                    // there that this FREE would then delete.
                    if inner.states.cas(i, s, s.with_kind(Kind::Fetching)) {
                        free_old(inner, &mut remotes, from, &[inner.handle(i)]);
                        finish(inner, i, s.clear(STORED | CLEAN));
                        report.forgotten += 1;
                    } else {
                        left += 1;
                    }
                }
                Kind::Fetching | Kind::Evicting => left += 1,
            }
            if claimed.len() == batch {
                left += copy(
                    inner,
                    &mut remotes,
                    from,
                    to,
                    &claimed,
                    &mut pages,
                    &mut statuses,
                    &mut report,
                );
                claimed.clear();
            }
        }
        if !claimed.is_empty() {
            left += copy(
                inner,
                &mut remotes,
                from,
                to,
                &claimed,
                &mut pages,
                &mut statuses,
                &mut report,
            );
        }
        report.left = left;
        if left == 0 {
            break;
        }
        tracing::debug!(
            pass,
            left,
            "pages still on the draining server; another pass"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    report
}

/// Copies claimed pages; returns how many could not be moved (they are
/// put back unchanged).
#[allow(clippy::too_many_arguments)]
fn copy(
    inner: &Inner,
    remotes: &mut Remotes,
    from: u8,
    to: u8,
    claimed: &[(usize, State)],
    pages: &mut [Page],
    statuses: &mut Vec<PageStatus>,
    report: &mut MoveReport,
) -> u64 {
    let handles: Vec<u64> = claimed.iter().map(|&(i, _)| inner.handle(i)).collect();
    let n = claimed.len();
    let deadline = Instant::now() + inner.cfg.fault_timeout;
    let put_back = |why: &str| {
        tracing::warn!(
            pages = n,
            reason = why,
            "cannot move pages off a draining server now"
        );
        for &(i, s) in claimed {
            finish(inner, i, s);
        }
        n as u64
    };
    let got = match remotes.get(&inner.placement, from) {
        Some(c) => c.get(&handles, &mut pages[..n], statuses, deadline),
        None => return put_back("unknown old server"),
    };
    if let Err(e) = got {
        return put_back(&e.to_string());
    }
    let ok: Vec<usize> = (0..n).filter(|&k| statuses[k] == PageStatus::Ok).collect();
    let items: Vec<(u64, &Page)> = ok.iter().map(|&k| (handles[k], &pages[k])).collect();
    let put = match remotes.get(&inner.placement, to) {
        Some(c) => c.put(&items, deadline),
        None => return put_back("unknown new server"),
    };
    let put = match put {
        Ok(p) => p,
        Err(e) => return put_back(&e.to_string()),
    };
    let mut left = 0;
    let mut moved = Vec::with_capacity(n);
    let mut stored_new = vec![false; n];
    for (&k, st) in ok.iter().zip(&put) {
        stored_new[k] = *st == PageStatus::Ok;
    }
    for (k, &(i, s)) in claimed.iter().enumerate() {
        if stored_new[k] {
            finish(inner, i, s.with_server(to));
            moved.push(handles[k]);
        } else {
            // Not found on the old server (nothing to move), or refused by
            // the new one: unchanged, retried next pass.
            if statuses[k] != PageStatus::Ok {
                tracing::error!(page = i, status = %statuses[k], "draining server lost a page");
            }
            finish(inner, i, s);
            left += 1;
        }
    }
    report.moved += moved.len() as u64;
    free_old(inner, remotes, from, &moved);
    left
}

fn free_old(inner: &Inner, remotes: &mut Remotes, from: u8, handles: &[u64]) {
    if handles.is_empty() {
        return;
    }
    if let Some(c) = remotes.get(&inner.placement, from)
        && let Err(e) = c.free(handles, Instant::now() + inner.cfg.fault_timeout)
    {
        tracing::warn!(error = %e, pages = handles.len(), "cannot free moved pages on the draining server");
    }
}

fn finish(inner: &Inner, i: usize, new: State) {
    let old = inner.states.swap(i, new.clear(WAITER));
    if old.has(WAITER) {
        inner.wake(i);
    }
}

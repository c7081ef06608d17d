//! Discarding a range of a region: the program no longer needs its
//! contents (as with `MADV_DONTNEED` on private anonymous memory). Local
//! memory is freed, the servers' copies are freed (in a cluster through an
//! invalidation of their handles, so every subscriber has dropped them
//! when this returns), and the pages read as zeroes afterwards.
//!
//! Every page of the range is claimed (`Fetching`) before anything is
//! freed and released (`Absent`) only after the servers freed their
//! copies: a fault in between waits, and reads zeroes after.

use std::time::Duration;

use super::Inner;
use super::state::{Kind, STORED, State, WAITER};

/// Pages claimed for a discard, and what the servers hold of them.
pub(crate) struct Claimed {
    pub pages: Vec<usize>,
    /// Handles of every copy a server holds.
    pub stored: Vec<u64>,
    pub freed_local: usize,
}

/// Claims pages `first..first + n`, frees their local memory and notes
/// their server copies.
pub(crate) fn claim(inner: &Inner, first: usize, n: usize) -> Claimed {
    let mut c = Claimed {
        pages: Vec::with_capacity(n),
        stored: Vec::new(),
        freed_local: 0,
    };
    for i in first..first + n {
        loop {
            let s = inner.states.get(i);
            match s.kind() {
                // Owned by a fault handler, the evictor or the mover: it
                // will publish a settled state shortly.
                Kind::Fetching | Kind::Evicting => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                Kind::Absent if !s.has(STORED) => break,
                kind => {
                    if !inner.states.cas(i, s, s.with_kind(Kind::Fetching)) {
                        continue;
                    }
                    if matches!(kind, Kind::Active | Kind::Inactive) {
                        // Punching the memfd page also removes its PTEs.
                        if let Err(e) = inner.backing.free_page(i) {
                            tracing::error!(page = i, error = %e, "cannot free discarded page memory");
                        }
                        inner.uncharge(1);
                        c.freed_local += 1;
                    }
                    if s.has(STORED) {
                        c.stored.push(inner.handle(i));
                    }
                    c.pages.push(i);
                    break;
                }
            }
        }
    }
    c
}

/// Publishes the claimed pages as never written; wakes waiting faults.
pub(crate) fn release(inner: &Inner, claimed: &Claimed) {
    for &i in &claimed.pages {
        let old = inner.states.swap(i, State(Kind::Absent as u32));
        if old.has(WAITER) {
            inner.wake(i);
        }
    }
}

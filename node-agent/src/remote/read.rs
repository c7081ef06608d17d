//! Degraded reads: a page whose first server failed, read from another
//! copy or rebuilt from the other pages of its stripe. Both backends' fault
//! paths come here once their first request failed (or was not tried: the
//! server is known to be failing).
//!
//! The book is read again on every pass: a drain may have moved the run
//! meanwhile. Each server gets `failover` at a time while the page has
//! other copies or stripe pages, so a server that stopped answering costs
//! a bounded delay; a page with one copy waits for it until the deadline.

use std::time::{Duration, Instant};

use rmem_client::{Page, PageStatus};

use super::book::Slots;
use super::homes::Homes;
use super::servers::Remotes;
use super::stripe::{self, Layout};

/// Where a handle's copies are, for one pass.
enum Where {
    Copies(Slots),
    Stripe(Layout, Slots),
}

/// What one pass found.
enum Pass {
    Read,
    /// Every page asked answered that it does not have it: the page is
    /// gone (a pass over a run that moved meanwhile asks the book again).
    Gone,
    /// Some did not answer.
    Unanswered,
}

impl Homes {
    fn where_is(&self, h: u64) -> Option<Where> {
        let book = self.book();
        let (_, run) = book.run_of(h)?;
        Some(match &run.striped {
            None => Where::Copies(run.slots),
            Some(st) => Where::Stripe(st.layout, run.slots),
        })
    }

    /// Reads `handle` into `out` from a copy other than the one on
    /// `tried`, or rebuilds it from its stripe, then from `tried` again,
    /// until `deadline`. False once every copy said it does not have the
    /// page (or too many pages of its stripe are gone), or at the deadline.
    pub fn read_other(
        &self,
        remotes: &mut Remotes,
        handle: u64,
        tried: u8,
        out: &mut Page,
        deadline: Instant,
        failover: Duration,
    ) -> bool {
        let mut first_pass = true;
        let mut gone_twice = false;
        loop {
            let pass = match self.where_is(handle) {
                None => return false,
                Some(Where::Copies(slots)) => {
                    let p = self.read_copy(
                        remotes, handle, &slots, tried, first_pass, out, deadline, failover,
                    );
                    if slots.len() == 1 && !first_pass && !matches!(p, Pass::Read) {
                        // One copy, already waited for until the deadline.
                        return false;
                    }
                    p
                }
                Some(Where::Stripe(layout, slots)) => self.rebuild(
                    remotes, handle, &layout, &slots, tried, first_pass, out, deadline, failover,
                ),
            };
            match pass {
                Pass::Read => return true,
                // Asked once more: the run may have moved in between.
                Pass::Gone if gone_twice => return false,
                Pass::Gone => gone_twice = true,
                Pass::Unanswered => {}
            }
            first_pass = false;
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Each copy but `tried` (then `tried` too, after the first pass).
    #[allow(clippy::too_many_arguments)]
    fn read_copy(
        &self,
        remotes: &mut Remotes,
        handle: u64,
        copies: &Slots,
        tried: u8,
        first_pass: bool,
        out: &mut Page,
        deadline: Instant,
        failover: Duration,
    ) -> Pass {
        let order: Vec<u8> = copies
            .servers()
            .filter(|&s| s != tried)
            .chain(copies.servers().filter(|&s| s == tried && !first_pass))
            .collect();
        let mut statuses = Vec::with_capacity(1);
        let (mut missing, mut asked) = (0, 0);
        for server in order {
            let Some(until) = self.try_until(deadline, failover, copies.len()) else {
                return Pass::Unanswered;
            };
            let Some(conn) = remotes.get(&self.servers, server) else {
                continue;
            };
            asked += 1;
            match conn.get(&[handle], std::slice::from_mut(out), &mut statuses, until) {
                Ok(()) if statuses.first() == Some(&PageStatus::Ok) => {
                    self.trust(server);
                    return Pass::Read;
                }
                Ok(()) => missing += 1,
                // `suspect` ignores a lone copy.
                Err(e) => self.failed(server, &e),
            }
        }
        if asked > 0 && missing == asked {
            Pass::Gone
        } else {
            Pass::Unanswered
        }
    }

    /// Rebuilds data page `handle` from any K pages of its stripe: the
    /// others first (servers not known to be failing first), the page's
    /// own server last (not at all on the first pass if that is `tried`).
    /// The pages still needed are asked of as many servers at once (sent
    /// together, then answered), so a rebuild costs about one round trip
    /// while the servers asked answer.
    #[allow(clippy::too_many_arguments)]
    fn rebuild(
        &self,
        remotes: &mut Remotes,
        handle: u64,
        layout: &Layout,
        slots: &Slots,
        tried: u8,
        first_pass: bool,
        out: &mut Page,
        deadline: Instant,
        failover: Duration,
    ) -> Pass {
        let (j, want) = layout.locate(handle);
        let now = Instant::now();
        let mut order: Vec<(usize, u64, u8)> = layout
            .stripe(j)
            .map(|(k, h)| (k, h, slots.get(k).expect("a slot per page").server))
            .filter(|&(k, _, s)| k != want || s != tried || !first_pass)
            .collect();
        {
            let book = self.book();
            // Healthy servers first, the page's own last (asked only if
            // the others cannot make up K pages).
            order.sort_by_key(|&(k, _, s)| (k == want, book.is_suspect(s, now)));
        }
        let mut pages: Vec<(usize, Page)> = Vec::with_capacity(usize::from(layout.data));
        let mut statuses = Vec::with_capacity(1);
        let mut missing = 0;
        let mut own = None;
        let mut next = 0;
        while own.is_none() && next < order.len() {
            let needed = stripe::needed(layout, j, pages.len());
            if needed == 0 {
                break;
            }
            let Some(until) = self.try_until(deadline, failover, layout.width()) else {
                return Pass::Unanswered;
            };
            let wave = &order[next..(next + needed).min(order.len())];
            next += wave.len();
            let mut sent = Vec::with_capacity(wave.len());
            for &(k, h, server) in wave {
                let Some(conn) = remotes.get(&self.servers, server) else {
                    continue;
                };
                match conn.get_start(&[h], until) {
                    Ok(p) => sent.push((k, h, server, p)),
                    Err(e) => self.failed(server, &e),
                }
            }
            // Every request sent is answered (or its connection dropped)
            // before anything else goes on these connections.
            for (k, h, server, pending) in sent {
                let conn = remotes.get(&self.servers, server).expect("sent above");
                let mut page = [0u8; rmem_client::PAGE_SIZE];
                match conn.get_finish(
                    pending,
                    &[h],
                    std::slice::from_mut(&mut page),
                    &mut statuses,
                    until,
                ) {
                    Ok(()) if statuses.first() == Some(&PageStatus::Ok) => {
                        self.trust(server);
                        if k == want {
                            own = Some(page);
                        } else {
                            pages.push((k, page));
                        }
                    }
                    Ok(()) => missing += 1,
                    Err(e) => self.failed(server, &e),
                }
            }
        }
        if let Some(page) = own {
            *out = page;
            return Pass::Read;
        }
        if stripe::needed(layout, j, pages.len()) > 0 {
            // More pages of the stripe gone than it has parity: lost.
            return if missing > usize::from(layout.parity) {
                Pass::Gone
            } else {
                Pass::Unanswered
            };
        }
        let have: Vec<(usize, &Page)> = pages.iter().map(|(k, p)| (*k, p)).collect();
        match stripe::reconstruct(layout, j, want, &have) {
            Ok(p) => {
                *out = p;
                Pass::Read
            }
            Err(e) => {
                tracing::error!(handle, error = %e, "cannot rebuild a page from its stripe");
                Pass::Gone
            }
        }
    }

    /// Rebuilds the pages of `handles` (a faulting page and the pages
    /// ahead of it, or a batch of fetches; the first names the run) of one
    /// erasure-coded run whose slot on `tried` is failing, together: each of K other slots is asked for its pages
    /// of those stripes in one GET, the K GETs sent at once, and each page
    /// decoded. `out[i]` holds `handles[i]` where the answer is true;
    /// pages of another run or slot, or whose stripe did not get K pages,
    /// are left to the caller (the faulting page to [`Self::read_other`],
    /// the others to their own faults).
    pub fn rebuild_ahead(
        &self,
        remotes: &mut Remotes,
        handles: &[u64],
        tried: u8,
        out: &mut [Page],
        deadline: Instant,
        failover: Duration,
    ) -> Vec<bool> {
        let mut ok = vec![false; handles.len()];
        let Some(Where::Stripe(layout, slots)) = handles.first().and_then(|&h| self.where_is(h))
        else {
            return ok;
        };
        let (_, want) = layout.locate(handles[0]);
        if slots.get(want).map(|s| s.server) != Some(tried) {
            return ok;
        }
        // (index in `handles`, stripe) of the pages of this run and slot.
        let mine: Vec<(usize, u64)> = handles
            .iter()
            .enumerate()
            .filter(|&(_, &h)| h.wrapping_sub(layout.first) < layout.count)
            .map(|(i, &h)| (i, layout.locate(h)))
            .filter(|&(_, (_, slot))| slot == want)
            .map(|(i, (j, _))| (i, j))
            .collect();
        let Some(until) = self.try_until(deadline, failover, layout.width()) else {
            return ok;
        };
        let now = Instant::now();
        let mut others: Vec<(usize, u8)> = (0..layout.width())
            .filter(|&s| s != want)
            .filter_map(|s| slots.get(s).map(|slot| (s, slot.server)))
            .collect();
        {
            let book = self.book();
            others.sort_by_key(|&(_, server)| book.is_suspect(server, now));
        }
        let mut sent = Vec::with_capacity(usize::from(layout.data));
        for &(s, server) in others.iter().take(usize::from(layout.data)) {
            // This slot's page of each stripe, and the stripe's place in
            // `mine` (a short stripe has zeroes there: no page to ask).
            let (hs, at): (Vec<u64>, Vec<usize>) = mine
                .iter()
                .enumerate()
                .filter_map(|(m, &(_, j))| layout.handle(j, s).map(|h| (h, m)))
                .unzip();
            if hs.is_empty() {
                continue;
            }
            let Some(conn) = remotes.get(&self.servers, server) else {
                continue;
            };
            if !conn
                .max_batch(until)
                .is_ok_and(|max| max as usize >= hs.len())
            {
                continue;
            }
            match conn.get_start(&hs, until) {
                Ok(pending) => sent.push((s, server, hs, at, pending)),
                Err(e) => self.failed(server, &e),
            }
        }
        let mut pages: Vec<Vec<(usize, Page)>> = vec![Vec::new(); mine.len()];
        let mut buf = vec![[0u8; rmem_client::PAGE_SIZE]; mine.len()];
        let mut statuses = Vec::with_capacity(mine.len());
        // Every request sent is answered (or its connection dropped).
        for (s, server, hs, at, pending) in sent {
            let conn = remotes.get(&self.servers, server).expect("sent above");
            match conn.get_finish(pending, &hs, &mut buf[..hs.len()], &mut statuses, until) {
                Ok(()) => {
                    self.trust(server);
                    for (n, &m) in at.iter().enumerate() {
                        if statuses.get(n) == Some(&PageStatus::Ok) {
                            pages[m].push((s, buf[n]));
                        }
                    }
                }
                Err(e) => self.failed(server, &e),
            }
        }
        for (m, &(i, j)) in mine.iter().enumerate() {
            if stripe::needed(&layout, j, pages[m].len()) > 0 {
                continue;
            }
            let have: Vec<(usize, &Page)> = pages[m].iter().map(|(s, p)| (*s, p)).collect();
            match stripe::reconstruct(&layout, j, want, &have) {
                Ok(p) => {
                    out[i] = p;
                    ok[i] = true;
                }
                Err(e) => {
                    tracing::error!(handle = handles[i], error = %e, "cannot rebuild a page from its stripe");
                }
            }
        }
        ok
    }

    /// Until when one server may take, with `width` servers holding the
    /// page's copies or stripe; `None` at the deadline.
    fn try_until(&self, deadline: Instant, failover: Duration, width: usize) -> Option<Instant> {
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        Some(if width > 1 {
            (now + failover).min(deadline)
        } else {
            deadline
        })
    }
}

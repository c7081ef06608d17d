//! Moving a backend's pages off a server being drained.
//!
//! Per run of handles: read what is still there from the old server (each
//! page checked by CRC), store it on a server of another grant, point the
//! run there, then free it on the old server. Handles keep their names, so
//! nothing that holds a handle (a device page, a region's page) changes; a
//! fault that read the book before the switch and finds the page gone asks
//! the book again. Handles of earlier agent runs that no fault has looked
//! up yet stay where they are, with their grants.
//!
//! Draining a server that is gone (killed, its disk lost) rebuilds its
//! copies: a run that cannot be read there is read from another copy, and
//! an erasure-coded slot is rebuilt from the other pages of its stripes
//! (a lost parity page is encoded again).
//!
//! Races handled here:
//! - a handle freed while its run moves, or freed just before with its
//!   free still on its way to the old server (which may hand it out to the
//!   move): the book remembers it, and the copy written to the new server
//!   is freed after the switch;
//! - a run freed whole meanwhile: the new copies are freed, not recorded;
//! - the store retired (region dropped) meanwhile: the same;
//! - one run failing does not stop the others; the drained server's grants
//!   are returned only once nothing of this store is left on it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use rmem_client::{ClientError, Page, PageStatus};

use super::book::{Moving, Slots};
use super::cluster::ClusterError;
use super::homes::Homes;
use super::servers::Remotes;
use super::stripe::{self, CodecError, Layout};

/// Why a run could not move off a draining server.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MoveError {
    #[error(transparent)]
    Server(#[from] ClientError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("the server is not in the agent's table")]
    NoServer,
    #[error("no granted server has room")]
    NoRoom,
    #[error("the new server refused a page")]
    Refused,
    #[error("too few pages of a stripe are left to rebuild it")]
    Lost,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// What of a run moves: its copy or slot `k`, and the handles that holds.
struct Moved {
    k: usize,
    slots: Slots,
    handles: Vec<u64>,
    stripes: Option<Layout>,
}

/// What a drain did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Pages moved to other servers.
    pub moved: u64,
    /// Runs that could not move (they stay, and so do their grants).
    pub failed: u64,
    /// Whether the server holds nothing of this store any more.
    pub done: bool,
}

/// Most passes of one drain while batches placed on the server are still
/// in flight, and the pause between two.
const MAX_PASSES: usize = 500;
const PASS_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

impl Homes {
    /// Moves the pages this store placed on server `member` (being drained)
    /// to other granted servers, then returns that server's grants and
    /// unsubscribes it.
    pub fn drain(&self, remotes: &mut Remotes, member: u64) -> DrainReport {
        let mut report = DrainReport::default();
        let Some(link) = &self.link else {
            return report;
        };
        let from: BTreeSet<u8> = {
            let mut book = self.book();
            let mut from = BTreeSet::new();
            for g in book.grants.iter_mut().filter(|g| g.member == member) {
                g.draining = true;
                from.insert(g.server);
            }
            from
        };
        if from.is_empty() {
            report.done = true;
            return report;
        }
        // Runs that failed to move (not tried again by this drain).
        let mut failed: BTreeSet<u64> = BTreeSet::new();
        let mut reserved = false;
        // Batches placed there just before the grants were marked draining
        // may still be in flight: they are recorded (or given back) soon,
        // and then moved by another pass.
        for pass in 0..=MAX_PASSES {
            if self.closed.load(Ordering::Acquire) {
                return report;
            }
            let runs: Vec<u64> = {
                let book = self.book();
                book.runs
                    .iter()
                    .filter(|(f, r)| {
                        !failed.contains(f) && r.slots.servers().any(|s| from.contains(&s))
                    })
                    .map(|(f, _)| *f)
                    .collect()
            };
            if !reserved && !runs.is_empty() {
                reserved = true;
                // Room for one copy of everything that moves, on the
                // servers left (each run then goes to one holding no copy
                // of it).
                let moving: u64 = {
                    let book = self.book();
                    runs.iter()
                        .filter_map(|f| book.runs.get(f))
                        .map(|r| r.per_slot())
                        .sum()
                };
                if let Err(e) = self.grow_avoiding(moving, 1, &[member]) {
                    tracing::debug!(error = %e, "no capacity up front for a drain; asking run by run");
                }
            }
            for first in runs {
                if self.closed.load(Ordering::Acquire) {
                    return report;
                }
                // One copy at a time (two of a run's copies may be on
                // drained servers).
                for _ in 0..super::book::MAX_SHARDS {
                    match self.move_run(
                        remotes,
                        first,
                        &from,
                        Instant::now() + self.request_timeout,
                    ) {
                        Ok(Some(n)) => report.moved += n,
                        Ok(None) => break,
                        Err(e) => {
                            report.failed += 1;
                            failed.insert(first);
                            tracing::warn!(first, error = %e, "cannot move pages off a draining server; they stay there");
                            break;
                        }
                    }
                }
            }
            // Copies still in flight there, and runs recorded there since
            // this pass listed them (a batch in flight a moment ago).
            let (placing, left) = {
                let book = self.book();
                let placing: u64 = from.iter().filter_map(|s| book.placing.get(s)).sum();
                let left = book.runs.iter().any(|(f, r)| {
                    !failed.contains(f) && r.slots.servers().any(|s| from.contains(&s))
                });
                (placing, left)
            };
            if (placing == 0 && !left) || pass == MAX_PASSES {
                break;
            }
            if placing > 0 {
                std::thread::sleep(PASS_PAUSE);
            }
        }
        let ids = {
            let mut book = self.book();
            let placing = from
                .iter()
                .any(|s| book.placing.get(s).is_some_and(|&n| n > 0));
            // Grants held over from an earlier kernel-agent run may hold
            // pages of handles the book has not learned: they stay.
            let inherited = book
                .grants
                .iter()
                .any(|g| g.member == member && g.inherited);
            if inherited {
                tracing::warn!(
                    server = member,
                    "the draining server holds pages of this agent's earlier run not looked up yet: they stay until the module lets them go"
                );
            }
            report.done = !placing
                && !inherited
                && !book
                    .runs
                    .values()
                    .any(|r| r.slots.servers().any(|s| from.contains(&s)));
            if report.done {
                let ids: Vec<u64> = book
                    .grants
                    .iter()
                    .filter(|g| g.member == member && !g.released)
                    .map(|g| g.id)
                    .collect();
                // Grants keep their index (runs name them by it): an
                // emptied grant stays, with no room.
                for g in book.grants.iter_mut().filter(|g| g.member == member) {
                    g.pages = 0;
                    g.used = 0;
                    g.released = true;
                }
                book.subscribed.remove(&member);
                ids
            } else {
                Vec::new()
            }
        };
        if report.done && !self.closed.load(Ordering::Acquire) {
            link.cluster.release_grants(&ids);
            if let Err(e) = link.cluster.unsubscribe(link.space.interval, member) {
                tracing::warn!(error = %e, "cannot unsubscribe a drained server");
            }
        }
        tracing::info!(
            server = member,
            space = %link.space.name,
            moved = report.moved,
            failed = report.failed,
            done = report.done,
            "moved pages off a draining server"
        );
        report
    }

    /// Moves the run's first copy (or stripe slot) on a server of `from`
    /// to a grant elsewhere; the pages moved, or `None` when no copy of it
    /// is left on those servers.
    fn move_run(
        &self,
        remotes: &mut Remotes,
        first: u64,
        from: &BTreeSet<u8>,
        deadline: Instant,
    ) -> Result<Option<u64>, MoveError> {
        // What moves, and from here (under the same lock) frees of the
        // run's handles are remembered.
        let found = {
            let mut book = self.book();
            let found = book.runs.get(&first).and_then(|r| {
                let k = r.slots.servers().position(|s| from.contains(&s))?;
                Some(Moved {
                    k,
                    slots: r.slots,
                    handles: r.slot_handles(first, k),
                    stripes: r.striped.as_ref().map(|s| s.layout),
                })
            });
            found.map(|moved| {
                book.moves += 1;
                let token = book.moves;
                // Handles of the run freed earlier whose free its server
                // still owes, or that are on their way to it: it may still
                // hand them out, and their copies on the new server go too.
                let source = moved.slots.get(moved.k).expect("found above").server;
                let owed = book.owed.get(&source).into_iter().flatten();
                let on_their_way = book.freeing.iter().flat_map(|(_, hs)| hs);
                let mut earlier = owed.chain(on_their_way).peekable();
                let freed: Vec<u64> = if earlier.peek().is_some() {
                    let here: BTreeSet<u64> = moved.handles.iter().copied().collect();
                    earlier.copied().filter(|h| here.contains(h)).collect()
                } else {
                    Vec::new()
                };
                book.moving.push(Moving {
                    token,
                    first,
                    freed,
                });
                (moved, token)
            })
        };
        let Some((moved, token)) = found else {
            return Ok(None);
        };
        let source = moved.slots.get(moved.k).expect("found above").server;
        let result = self.copy_run(remotes, first, &moved, source, deadline);
        let freed = {
            let mut book = self.book();
            match book.moving.iter().position(|m| m.token == token) {
                Some(i) => book.moving.swap_remove(i).freed,
                None => Vec::new(),
            }
        };
        let (to, written) = match result? {
            Some(w) => w,
            None => return Ok(Some(0)),
        };
        // Copies of handles freed while they moved are garbage on the new
        // server (the free may have reached it before the copy did).
        if !freed.is_empty() {
            let _ = self.free_dead(remotes, &[(to, freed)], deadline);
        }
        let need = written.len() as u64;
        self.free_direct(remotes, &[(source, written)], deadline)?;
        Ok(Some(need))
    }

    /// The pages of `handles` that `server` holds, and the handles it holds
    /// damaged (`Corrupt`: its checksum failed there, or, sealed, the page
    /// failed its seal).
    fn read_run(
        &self,
        remotes: &mut Remotes,
        server: u8,
        handles: &[u64],
        deadline: Instant,
    ) -> Result<RunRead, MoveError> {
        let conn = remotes
            .get(&self.servers, server)
            .ok_or(MoveError::NoServer)?;
        let max = conn.max_batch(deadline)?.max(1) as usize;
        let mut buf = vec![[0u8; rmem_client::PAGE_SIZE]; max.min(handles.len())];
        let mut statuses = Vec::new();
        let mut found = Vec::new();
        let mut damaged = Vec::new();
        for chunk in handles.chunks(max) {
            conn.get(chunk, &mut buf[..chunk.len()], &mut statuses, deadline)?;
            for (i, &h) in chunk.iter().enumerate() {
                match statuses.get(i) {
                    Some(PageStatus::Ok) => found.push((h, buf[i])),
                    Some(PageStatus::Corrupt) => damaged.push(h),
                    _ => {}
                }
            }
        }
        Ok((found, damaged))
    }

    /// Reads the run's live pages from `from` (its copy or slot `k`),
    /// writes them to a grant on a server holding no copy of the run, and
    /// switches that copy over. `None` if there was nothing to move, or the
    /// run (or the store) went meanwhile.
    fn copy_run(
        &self,
        remotes: &mut Remotes,
        first: u64,
        moved: &Moved,
        from: u8,
        deadline: Instant,
    ) -> Result<Option<(u8, Vec<u64>)>, MoveError> {
        let (k, slots) = (moved.k, &moved.slots);
        let found = match &moved.stripes {
            None => self.read_copies(remotes, &moved.handles, slots, from, deadline)?,
            Some(layout) => self.read_slot(remotes, first, layout, moved, from, deadline)?,
        };
        fail::fail_point!("drain-read");
        let need = found.len() as u64;
        if need == 0 && moved.stripes.is_none() {
            // Nothing of it is left there (freed meanwhile).
            return Ok(None);
        }
        // Erasure coded, a slot may hold no page of a live stripe (a short
        // piece, or its stripes' pages there all dead and freed): it still
        // moves (it names a server), with nothing to write.
        // A grant elsewhere with room for them, in a failure domain none of
        // the run's other copies is in when there is one.
        let pick = |homes: &Homes| {
            let book = homes.book();
            let others: Vec<&str> = slots
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != k)
                .filter_map(|(_, s)| book.grants.iter().find(|g| g.server == s.server))
                .map(|g| g.domain.as_str())
                .filter(|d| !d.is_empty())
                .collect();
            let fits = |g: &super::book::Grant| {
                !g.draining && !slots.has_server(g.server) && g.pages.saturating_sub(g.used) >= need
            };
            let best = |apart: bool| {
                book.grants
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| fits(g) && (!apart || !others.contains(&g.domain.as_str())))
                    .max_by_key(|(_, g)| g.pages.saturating_sub(g.used))
                    .map(|(k, g)| (k, g.server))
            };
            best(true).or_else(|| best(false))
        };
        let mut target = pick(self);
        if target.is_none() {
            // One copy's worth, on a server holding none of this run.
            let mut exclude: Vec<u64> = {
                let book = self.book();
                book.grants
                    .iter()
                    .filter(|g| g.draining || slots.has_server(g.server))
                    .map(|g| g.member)
                    .collect()
            };
            exclude.sort_unstable();
            exclude.dedup();
            self.grow_avoiding(need.max(self.grow_step()), 1, &exclude)
                .or_else(|_| self.grow_avoiding(need, 1, &exclude))?;
            target = pick(self);
        }
        let (grant, to) = target.ok_or(MoveError::NoRoom)?;
        if let Some(link) = &self.link {
            link.cluster.pace(need * rmem_client::PAGE_SIZE as u64);
        }
        self.book().grants[grant].used += need;
        let moved: Vec<u64> = found.iter().map(|(h, _)| *h).collect();
        let stored = (|| -> Result<(), MoveError> {
            let conn = remotes.get(&self.servers, to).ok_or(MoveError::NoServer)?;
            let max = conn.max_batch(deadline)?.max(1) as usize;
            for chunk in found.chunks(max) {
                let batch: Vec<(u64, &Page)> = chunk.iter().map(|(h, p)| (*h, p)).collect();
                let statuses = conn.put(&batch, deadline)?;
                if statuses.iter().any(|s| *s != PageStatus::Ok) {
                    return Err(MoveError::Refused);
                }
            }
            Ok(())
        })();
        if let Err(e) = stored {
            let live_there = {
                let mut book = self.book();
                book.grants[grant].used -= need;
                copy_lives_on(&book, first, to)
            };
            if !live_there {
                let _ = self.free_direct(remotes, &[(to, moved)], deadline);
            }
            return Err(e);
        }
        // Switch the run over, unless it (or the store) went meanwhile:
        // then the new copies are garbage.
        let switched = {
            let mut book = self.book();
            let closed = self.closed.load(Ordering::Acquire);
            let old = if closed {
                None
            } else {
                book.runs
                    .get_mut(&first)
                    // Still there, and no other slot of the run moved to
                    // `to` meanwhile (a drain of another server).
                    .filter(|r| {
                        r.slots.iter().nth(k).is_some_and(|s| s.server == from)
                            && !r.slots.has_server(to)
                    })
                    .map(|r| {
                        let per = r.per_slot();
                        let slot = r.slots.slot_mut(k);
                        let old = (slot.grant, per);
                        *slot = super::book::Slot {
                            server: to,
                            grant: Some(grant),
                        };
                        old
                    })
            };
            match old {
                Some((old_grant, live)) => {
                    if let Some(g) = old_grant.and_then(|g| book.grants.get_mut(g)) {
                        g.used = g.used.saturating_sub(live);
                    }
                    // What is live now is what the run counts against.
                    let g = &mut book.grants[grant];
                    g.used = g.used - need + live;
                    self.journal(&mut book, |j, addr| j.moved(first, k, &addr(to)));
                    true
                }
                None => {
                    book.grants[grant].used -= need;
                    false
                }
            }
        };
        if !switched {
            if !copy_lives_on(&self.book(), first, to) {
                let _ = self.free_direct(remotes, &[(to, moved)], deadline);
            }
            return Ok(None);
        }
        Ok(Some((to, moved)))
    }

    /// The pages of `handles` (a run's copy on `from`): from `from`, or,
    /// when it does not answer (it is gone: the drain rebuilds its copies),
    /// from another copy. Freed handles are not found.
    fn read_copies(
        &self,
        remotes: &mut Remotes,
        handles: &[u64],
        slots: &Slots,
        from: u8,
        deadline: Instant,
    ) -> Result<Vec<(u64, Page)>, MoveError> {
        let now = Instant::now();
        let suspect = |s: u8| self.book().is_suspect(s, now);
        let mut sources: Vec<u8> = std::iter::once(from)
            .chain(slots.servers().filter(|&s| s != from))
            .collect();
        // A server known to be failing is asked last.
        sources.sort_by_key(|&s| suspect(s));
        let mut last_error = None;
        // Pages a source holds damaged are read from the next one.
        let mut found = Vec::new();
        let mut want = handles.to_vec();
        let mut answered = false;
        for source in sources {
            match self.read_run(remotes, source, &want, deadline) {
                Ok((read, damaged)) => {
                    found.extend(read);
                    answered = true;
                    if damaged.is_empty() {
                        return Ok(found);
                    }
                    tracing::warn!(
                        source,
                        pages = damaged.len(),
                        "pages to move are damaged there; reading another copy"
                    );
                    want = damaged;
                }
                Err(e) => {
                    tracing::debug!(source, error = %e, "cannot read a run to move; trying another copy");
                    if matches!(&e, MoveError::Server(c) if c.is_retryable()) {
                        self.suspect(source, &e);
                    }
                    last_error = Some(e);
                }
            }
        }
        if answered {
            // What no copy holds whole is left out, as a page freed
            // meanwhile would be: the move must not write a damaged one.
            tracing::error!(
                pages = want.len(),
                "pages to move are damaged on every copy"
            );
            return Ok(found);
        }
        Err(last_error.unwrap_or(MoveError::NoServer))
    }

    /// The pages slot `moved.k` of an erasure-coded run holds: read from
    /// `from`, and what it does not answer for (all of them when it is
    /// gone) rebuilt from the other slots of each stripe still live.
    fn read_slot(
        &self,
        remotes: &mut Remotes,
        first: u64,
        layout: &Layout,
        moved: &Moved,
        from: u8,
        deadline: Instant,
    ) -> Result<Vec<(u64, Page)>, MoveError> {
        let k = moved.k;
        // A server known to be failing (or gone) is not waited for: its
        // pages are rebuilt from the others.
        let failing = self.book().is_suspect(from, Instant::now());
        let read = if failing {
            Ok(Vec::new())
        } else {
            self.read_run(remotes, from, &moved.handles, deadline)
                .map(|(found, _damaged)| found)
        };
        let mut found = match read {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(server = from, error = %e, "cannot read a stripe slot to move; rebuilding it");
                if matches!(&e, MoveError::Server(c) if c.is_retryable()) {
                    self.suspect(from, &e);
                }
                Vec::new()
            }
        };
        let have: BTreeSet<u64> = found.iter().map(|(h, _)| *h).collect();
        // Stripes of missing pages, still live (a dead stripe was freed).
        let live = |j: u64| {
            let book = self.book();
            book.runs
                .get(&first)
                .and_then(|r| r.striped.as_ref())
                .is_some_and(|s| s.live.get(j as usize).is_some_and(|&l| l > 0))
        };
        let stripe_of = |h: u64| {
            if layout.is_parity(h) {
                (h - layout.parity_first) % layout.stripes()
            } else {
                layout.locate(h).0
            }
        };
        let missing: Vec<(u64, u64)> = moved
            .handles
            .iter()
            .filter(|h| !have.contains(h))
            .map(|&h| (stripe_of(h), h))
            .filter(|&(j, _)| live(j))
            .collect();
        if missing.is_empty() {
            return Ok(found);
        }
        // Other slots, healthy first, read a batch each until every
        // missing stripe has K pages.
        let now = Instant::now();
        let mut others: Vec<(usize, u8)> = moved
            .slots
            .iter()
            .enumerate()
            .filter(|&(s, _)| s != k)
            .map(|(s, slot)| (s, slot.server))
            .collect();
        {
            let book = self.book();
            others.sort_by_key(|&(_, server)| book.is_suspect(server, now));
        }
        let mut pages: BTreeMap<u64, Vec<(usize, Page)>> = BTreeMap::new();
        let mut last_error = None;
        for (s, server) in others {
            let want: Vec<u64> = missing
                .iter()
                .filter(|(j, _)| stripe::needed(layout, *j, pages.get(j).map_or(0, Vec::len)) > 0)
                .filter_map(|&(j, _)| layout.handle(j, s))
                .collect();
            if want.is_empty() {
                continue;
            }
            match self.read_run(remotes, server, &want, deadline) {
                Ok((read, _damaged)) => {
                    for (h, p) in read {
                        pages.entry(stripe_of(h)).or_default().push((s, p));
                    }
                }
                Err(e) => {
                    if matches!(&e, MoveError::Server(c) if c.is_retryable()) {
                        self.suspect(server, &e);
                    }
                    last_error = Some(e);
                }
            }
        }
        for (j, h) in missing {
            let got = pages.get(&j).map_or(&[][..], Vec::as_slice);
            if stripe::needed(layout, j, got.len()) > 0 {
                if !live(j) {
                    continue;
                }
                tracing::error!(
                    handle = h,
                    "too few pages of its stripe left to rebuild a page"
                );
                return Err(last_error.unwrap_or(MoveError::Lost));
            }
            let refs: Vec<(usize, &Page)> = got.iter().map(|(s, p)| (*s, p)).collect();
            let page = stripe::reconstruct(layout, j, k, &refs)?;
            found.push((h, page));
        }
        Ok(found)
    }
}

/// What a server answered for a run: its pages whole, and the handles it
/// holds damaged.
type RunRead = (Vec<(u64, Page)>, Vec<u64>);

/// Whether another copy of run `first` (copied whole: every copy holds
/// the same handles) lives on `server` now: a concurrent drain of another
/// of its servers moved one there. Copies written there by a move that
/// did not switch are then that copy's pages, not garbage.
fn copy_lives_on(book: &super::book::Book, first: u64, server: u8) -> bool {
    book.runs
        .get(&first)
        .is_some_and(|r| r.striped.is_none() && r.slots.has_server(server))
}

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
//! Races handled here:
//! - a handle freed while its run moves: the book remembers it, and the
//!   copy written to the new server is freed after the switch;
//! - a run freed whole meanwhile: the new copies are freed, not recorded;
//! - the store retired (region dropped) meanwhile: the same;
//! - one run failing does not stop the others; the drained server's grants
//!   are returned only once nothing of this store is left on it.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rmem_client::{ClientError, Page, PageStatus};

use super::book::Moving;
use super::cluster::ClusterError;
use super::homes::{GRANT_PAGES, Homes};
use super::servers::Remotes;

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

impl Homes {
    /// Moves the pages this store placed on server `member` (being drained)
    /// to other granted servers, then returns that server's grants and
    /// unsubscribes it.
    pub fn drain(&self, remotes: &mut Remotes, member: u64) -> DrainReport {
        let mut report = DrainReport::default();
        let Some(link) = &self.link else {
            return report;
        };
        let (from, runs) = {
            let mut book = self.book();
            let mut from = BTreeSet::new();
            for g in book.grants.iter_mut().filter(|g| g.member == member) {
                g.draining = true;
                from.insert(g.server);
            }
            let runs: Vec<u64> = book
                .runs
                .iter()
                .filter(|(_, r)| from.contains(&r.server))
                .map(|(f, _)| *f)
                .collect();
            (from, runs)
        };
        if from.is_empty() {
            report.done = true;
            return report;
        }
        for first in runs {
            if self.closed.load(Ordering::Acquire) {
                return report;
            }
            match self.move_run(remotes, first, Instant::now() + self.request_timeout) {
                Ok(n) => report.moved += n,
                Err(e) => {
                    report.failed += 1;
                    tracing::warn!(first, error = %e, "cannot move pages off a draining server; they stay there");
                }
            }
        }
        let ids = {
            let mut book = self.book();
            report.done = !book.runs.values().any(|r| from.contains(&r.server));
            if report.done {
                let ids: Vec<u64> = book
                    .grants
                    .iter()
                    .filter(|g| g.member == member)
                    .map(|g| g.id)
                    .collect();
                // Grants keep their index (runs name them by it): an
                // emptied grant stays, with no room.
                for g in book.grants.iter_mut().filter(|g| g.member == member) {
                    g.pages = 0;
                    g.used = 0;
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
            "moved pages off a draining server"
        );
        report
    }

    /// Moves the run starting at `first` to a grant elsewhere; returns the
    /// pages moved.
    fn move_run(
        &self,
        remotes: &mut Remotes,
        first: u64,
        deadline: Instant,
    ) -> Result<u64, MoveError> {
        let Some((pages, from)) = self.book().runs.get(&first).map(|r| (r.pages, r.server)) else {
            return Ok(0);
        };
        // From here, frees of the run's handles are remembered.
        self.book().moving = Some(Moving {
            first,
            pages,
            freed: Vec::new(),
        });
        let result = self.copy_run(remotes, first, pages, from, deadline);
        let freed = self
            .book()
            .moving
            .take()
            .map(|m| m.freed)
            .unwrap_or_default();
        let (to, written) = match result? {
            Some(w) => w,
            None => return Ok(0),
        };
        // Copies of handles freed while they moved are garbage on the new
        // server (the free may have reached it before the copy did).
        if !freed.is_empty() {
            let _ = self.free_direct(remotes, &[(to, freed)], deadline);
        }
        let need = written.len() as u64;
        self.free_direct(remotes, &[(from, written)], deadline)?;
        Ok(need)
    }

    /// Reads the run's live pages from `from`, writes them to another
    /// grant's server and switches the run over. `None` if there was
    /// nothing to move, or the run (or the store) went meanwhile.
    fn copy_run(
        &self,
        remotes: &mut Remotes,
        first: u64,
        pages: u64,
        from: u8,
        deadline: Instant,
    ) -> Result<Option<(u8, Vec<u64>)>, MoveError> {
        // Read what is still there (freed handles answer not_found).
        let handles: Vec<u64> = (first..first + pages).collect();
        let mut found: Vec<(u64, Page)> = Vec::new();
        {
            let conn = remotes
                .get(&self.servers, from)
                .ok_or(MoveError::NoServer)?;
            let max = conn.max_batch(deadline)?.max(1) as usize;
            let mut buf = vec![[0u8; rmem_client::PAGE_SIZE]; max.min(handles.len())];
            let mut statuses = Vec::new();
            for chunk in handles.chunks(max) {
                conn.get(chunk, &mut buf[..chunk.len()], &mut statuses, deadline)?;
                for (i, &h) in chunk.iter().enumerate() {
                    if statuses.get(i) == Some(&PageStatus::Ok) {
                        found.push((h, buf[i]));
                    }
                }
            }
        }
        let need = found.len() as u64;
        if need == 0 {
            // Nothing of it is left there (freed meanwhile).
            return Ok(None);
        }
        // A grant elsewhere with room for them.
        let pick = |homes: &Homes| {
            homes
                .book()
                .grants
                .iter()
                .enumerate()
                .filter(|(_, g)| !g.draining && g.pages.saturating_sub(g.used) >= need)
                .max_by_key(|(_, g)| g.pages.saturating_sub(g.used))
                .map(|(k, g)| (k, g.server))
        };
        let mut target = pick(self);
        if target.is_none() {
            self.grow(need.max(GRANT_PAGES))?;
            target = pick(self);
        }
        let (grant, to) = target.ok_or(MoveError::NoRoom)?;
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
            self.book().grants[grant].used -= need;
            let _ = self.free_direct(remotes, &[(to, moved)], deadline);
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
                book.runs.get_mut(&first).map(|r| {
                    let old = (r.grant, r.live);
                    r.server = to;
                    r.grant = Some(grant);
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
                    true
                }
                None => {
                    book.grants[grant].used -= need;
                    false
                }
            }
        };
        if !switched {
            let _ = self.free_direct(remotes, &[(to, moved)], deadline);
            return Ok(None);
        }
        Ok(Some((to, moved)))
    }
}

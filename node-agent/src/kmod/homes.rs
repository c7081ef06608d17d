//! Where the kernel agent's remote pages live: on one memory server, or on
//! the servers a cluster's coordinator grants.
//!
//! **Handles.** The module names a page's remote copy by a 64-bit handle the
//! agent chooses. Handles name copies, not addresses: a page evicted, faulted
//! back and evicted again gets a new handle, so the late free of an old copy
//! (the module reports it when the old device page goes) can never delete a
//! newer copy of the same address. Each agent start draws a random epoch and
//! counts up from `epoch << SPACE_BITS`: its *handle space*.
//!
//! **In a cluster** ([`Home::Cluster`]):
//! - *Placement.* Capacity is granted by the coordinator in pieces of
//!   [`GRANT_PAGES`] (or more), as evictions need it. Batches being evicted
//!   take turns over the grants with room (a batch larger than a grant's
//!   room is cut into pieces), so pages spread over the granted servers; a table of runs (first handle, pages,
//!   server) says where each handle went, and a fault reads it to know
//!   which server to ask.
//! - *Interval.* Because handles are not addresses, the agent registers its
//!   handle space as its interval: address space `<member>/handles/<epoch>`,
//!   byte `4096 * k` standing for handle `base + k`, subscribed by every
//!   server it placed pages on. Pages the module frees (munmap, exit,
//!   copy-on-write, a fault that brought the page back) are invalidated
//!   through it, in one invalidation per batch of frees: every subscribed
//!   server frees them and acknowledges before the call returns. If the
//!   coordinator cannot be reached, the agent frees them on their servers
//!   directly.
//! - *Restarts.* The member name is stable (`<host>/kmod` by default), so a
//!   restarted agent is the same member and finds the intervals and grants
//!   of its earlier runs. While the module still holds device pages (of
//!   processes that stayed attached) it keeps them: a fault on an old
//!   handle asks the servers of those grants. With no device page left it
//!   invalidates and unregisters them, and returns the grants.
//! - *Shutdown.* With no device page left, the agent invalidates its
//!   intervals, returns its grants and leaves; otherwise it stays a member
//!   until its lease lapses, and the coordinator reclaims what it owns only
//!   after its reap delay.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rmem_client::{ClientConfig, ClientError};

use crate::cluster::{Cluster, ClusterError, server_config};
use crate::placement::{Remotes, Servers};

/// Bits of a handle below the epoch: one agent run's handle space holds
/// 2^40 handles (4 PiB of evictions).
pub const SPACE_BITS: u32 = 40;

/// Pages asked of the coordinator when the grants are full (64 MiB).
pub const GRANT_PAGES: u64 = 16384;

/// Where the pages go.
#[derive(Debug, Clone)]
pub enum Home {
    /// One memory server.
    Server(ClientConfig),
    /// The servers the cluster's coordinator grants.
    Cluster(Arc<Cluster>),
}

/// A part of a batch being evicted: `count` handles from `first` go to
/// server `server`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub first: u64,
    pub count: usize,
    pub server: u8,
    grant: Option<usize>,
}

/// The servers and, in a cluster, the book of where each handle is.
#[derive(Debug)]
pub struct Homes {
    servers: Servers,
    base: u64,
    link: Option<Link>,
}

#[derive(Debug)]
struct Link {
    cluster: Arc<Cluster>,
    space: Space,
    /// Spaces of earlier runs of this member, kept while the module may
    /// still hold their pages.
    older: Vec<Space>,
    book: Mutex<Book>,
}

/// A handle space registered as an interval.
#[derive(Debug, Clone)]
struct Space {
    name: String,
    base: u64,
    interval: u64,
}

impl Space {
    fn contains(&self, h: u64) -> bool {
        h.wrapping_sub(self.base) < 1 << SPACE_BITS
    }
}

#[derive(Debug, Default)]
struct Book {
    grants: Vec<Grant>,
    /// First handle -> run.
    runs: BTreeMap<u64, Run>,
    /// Server members subscribed to this run's interval.
    subscribed: BTreeSet<u64>,
    /// The grant the next batch tries first.
    turn: usize,
}

#[derive(Debug)]
struct Grant {
    id: u64,
    /// The server's member id.
    member: u64,
    /// Its server is being drained: nothing new goes there.
    draining: bool,
    server: u8,
    pages: u64,
    used: u64,
}

#[derive(Debug)]
struct Run {
    pages: u64,
    server: u8,
    grant: Option<usize>,
    /// Handles of the run not freed yet.
    live: u64,
}

impl Book {
    fn run_of(&self, h: u64) -> Option<(u64, &Run)> {
        self.runs
            .range(..=h)
            .next_back()
            .filter(|(first, r)| h - **first < r.pages)
            .map(|(f, r)| (*f, r))
    }

    /// Takes handle `h` off the book; its server if it was on it.
    fn forget(&mut self, h: u64) -> Option<u8> {
        let (first, run) = self.run_of(h)?;
        let (server, grant) = (run.server, run.grant);
        let run = self.runs.get_mut(&first).expect("found above");
        run.live -= 1;
        if run.live == 0 {
            self.runs.remove(&first);
        }
        if let Some(g) = grant.and_then(|g| self.grants.get_mut(g)) {
            g.used = g.used.saturating_sub(1);
        }
        Some(server)
    }
}

/// Coalesces sorted handles into runs of consecutive ones: (first, count).
fn runs_of(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &h in sorted {
        match out.last_mut() {
            Some((first, n)) if h < *first + *n => {}
            Some((first, n)) if *first + *n == h => *n += 1,
            _ => out.push((h, 1)),
        }
    }
    out
}

impl Homes {
    /// Sets up where pages go. In a cluster: takes over or retires what
    /// earlier runs of this member left (kept when `module_pages` device
    /// pages may still name their handles) and registers a new handle
    /// space.
    pub fn new(home: Home, module_pages: u64) -> Result<Self, ClusterError> {
        let epoch = |taken: &[Space]| loop {
            let base = u64::from(rand::random::<u32>() & 0xff_ffff) << SPACE_BITS;
            if !taken.iter().any(|s| s.base == base) {
                return base;
            }
        };
        let cluster = match home {
            Home::Server(cfg) => {
                return Ok(Self {
                    servers: Servers::new(vec![cfg])?,
                    base: epoch(&[]),
                    link: None,
                });
            }
            Home::Cluster(c) => c,
        };
        let prefix = format!("{}/handles/", cluster.name());
        let older: Vec<Space> = cluster
            .own_intervals()?
            .into_iter()
            .filter(|iv| iv.address_space.starts_with(&prefix))
            .map(|iv| Space {
                name: iv.address_space,
                base: iv.handle_base,
                interval: iv.id,
            })
            .collect();
        let servers = Servers::default();
        let mut book = Book::default();
        let held = cluster.own_grants()?;
        let older = if module_pages == 0 {
            // No device page is left to name an old handle: what earlier
            // runs stored is garbage.
            for s in &older {
                retire(&cluster, s);
            }
            let ids: Vec<u64> = held.iter().map(|g| g.grant_id).collect();
            cluster.release_grants(&ids);
            Vec::new()
        } else {
            // Their servers answer faults on old handles; the grants count
            // as full (what they hold is unknown).
            for g in &held {
                let server = servers.add(server_config(g))?;
                book.grants.push(Grant {
                    id: g.grant_id,
                    member: g.server_id,
                    draining: false,
                    server,
                    pages: g.pages,
                    used: g.pages,
                });
            }
            if !older.is_empty() {
                tracing::info!(
                    spaces = older.len(),
                    grants = held.len(),
                    "kept the handle spaces of earlier runs: the module still holds pages"
                );
            }
            older
        };
        let base = epoch(&older);
        let name = format!("{prefix}{:06x}", base >> SPACE_BITS);
        let interval = cluster.register_space(&name, 1 << SPACE_BITS, base)?;
        tracing::info!(space = %name, interval, "registered the agent's handle space");
        Ok(Self {
            servers,
            base,
            link: Some(Link {
                cluster,
                space: Space {
                    name,
                    base,
                    interval,
                },
                older,
                book: Mutex::new(book),
            }),
        })
    }

    /// The cluster, when pages go to one.
    pub(crate) fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.link.as_ref().map(|l| &l.cluster)
    }

    /// The first handle of this run's space.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The servers, by index.
    pub fn servers(&self) -> &Servers {
        &self.servers
    }

    /// Where pages go, for logs: a server's address or the coordinator's.
    pub fn describe(&self) -> String {
        match &self.link {
            None => self.servers.addr(0),
            Some(l) => format!("cluster at {}", l.cluster.client().endpoint()),
        }
    }

    fn book(link: &Link) -> MutexGuard<'_, Book> {
        link.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chooses servers for `count` handles from `first`, asking the
    /// coordinator for capacity when the grants are full. The pieces count
    /// against their grants until [`Self::unplace`] or a free.
    pub fn place(&self, first: u64, count: usize) -> Result<Vec<Piece>, ClusterError> {
        let Some(link) = &self.link else {
            return Ok(vec![Piece {
                first,
                count,
                server: 0,
                grant: None,
            }]);
        };
        let mut pieces = Vec::new();
        let mut left = count as u64;
        let mut next = first;
        let mut asked = false;
        loop {
            {
                let mut book = Self::book(link);
                while left > 0 {
                    // Batches take turns over the grants with room, so
                    // pages spread over their servers whatever the sizes
                    // of the pieces the coordinator granted.
                    let n = book.grants.len();
                    let start = book.turn;
                    let Some(k) = (0..n).map(|i| (start + i) % n).find(|&k| {
                        book.grants[k].used < book.grants[k].pages && !book.grants[k].draining
                    }) else {
                        break;
                    };
                    book.turn = k + 1;
                    let g = &mut book.grants[k];
                    let take = left.min(g.pages - g.used);
                    g.used += take;
                    pieces.push(Piece {
                        first: next,
                        count: take as usize,
                        server: g.server,
                        grant: Some(k),
                    });
                    next += take;
                    left -= take;
                }
            }
            if left == 0 {
                return Ok(pieces);
            }
            if asked {
                // A grant larger than asked for is never short; be safe.
                self.unplace(&pieces);
                return Err(ClusterError::Runtime(std::io::Error::other(
                    "the coordinator granted less than asked",
                )));
            }
            asked = true;
            if let Err(e) = self.grow(link, left.max(GRANT_PAGES)) {
                self.unplace(&pieces);
                return Err(e);
            }
        }
    }

    /// New grants for `pages`; their servers subscribe to the interval.
    fn grow(&self, link: &Link, pages: u64) -> Result<(), ClusterError> {
        let grants = link.cluster.allocate(pages)?;
        let mut added = Vec::with_capacity(grants.len());
        for g in &grants {
            let server = self.servers.add(server_config(g))?;
            let subscribed = Self::book(link).subscribed.contains(&g.server_id);
            if !subscribed {
                if let Err(e) = link.cluster.subscribe(link.space.interval, g.server_id) {
                    let ids: Vec<u64> = grants.iter().map(|g| g.grant_id).collect();
                    link.cluster.release_grants(&ids);
                    return Err(e);
                }
                Self::book(link).subscribed.insert(g.server_id);
            }
            added.push(Grant {
                id: g.grant_id,
                member: g.server_id,
                draining: false,
                server,
                pages: g.pages,
                used: 0,
            });
        }
        tracing::debug!(pages, grants = added.len(), "new capacity granted");
        Self::book(link).grants.extend(added);
        Ok(())
    }

    /// Gives back what `pieces` took of their grants (nothing was stored).
    pub fn unplace(&self, pieces: &[Piece]) {
        let Some(link) = &self.link else { return };
        let mut book = Self::book(link);
        for p in pieces {
            if let Some(g) = p.grant.and_then(|g| book.grants.get_mut(g)) {
                g.used = g.used.saturating_sub(p.count as u64);
            }
        }
    }

    /// Records that `pieces` are stored on their servers.
    pub fn stored(&self, pieces: &[Piece]) {
        let Some(link) = &self.link else { return };
        let mut book = Self::book(link);
        for p in pieces {
            book.runs.insert(
                p.first,
                Run {
                    pages: p.count as u64,
                    server: p.server,
                    grant: p.grant,
                    live: p.count as u64,
                },
            );
        }
    }

    /// The server holding handle `h`, if known.
    pub fn server_of(&self, h: u64) -> Option<u8> {
        match &self.link {
            None => Some(0),
            Some(link) => Self::book(link).run_of(h).map(|(_, r)| r.server),
        }
    }

    /// Servers that may hold a handle not on the book (one of an earlier
    /// run): every server known.
    pub fn candidates(&self) -> impl Iterator<Item = u8> {
        0..self.servers.len() as u8
    }

    /// Records that server `server` holds `h` (found by asking).
    pub fn learn(&self, h: u64, server: u8) {
        let Some(link) = &self.link else { return };
        Self::book(link).runs.insert(
            h,
            Run {
                pages: 1,
                server,
                grant: None,
                live: 1,
            },
        );
    }

    /// Frees copies no device page ever named (a batch that did not move,
    /// pages that stayed local), directly on their servers.
    pub fn discard(
        &self,
        remotes: &mut Remotes,
        handles: &[u64],
        deadline: Instant,
    ) -> Result<(), ClientError> {
        let by_server = self.forget(handles);
        self.free_direct(remotes, &by_server, deadline)
    }

    /// Frees the copies the module reports freed. In a cluster, through
    /// invalidations of the handle spaces (one per space per call),
    /// falling back to freeing on the servers directly. Returns how many
    /// went through the control plane.
    pub fn release(
        &self,
        remotes: &mut Remotes,
        handles: &[u64],
        deadline: Instant,
    ) -> Result<usize, ClientError> {
        let Some(link) = &self.link else {
            self.free_direct(remotes, &[(0, handles.to_vec())], deadline)?;
            return Ok(0);
        };
        let mut sorted = handles.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut invalidated = Vec::new();
        let mut direct = Vec::new();
        for space in std::iter::once(&link.space).chain(&link.older) {
            let mine: Vec<u64> = sorted
                .iter()
                .copied()
                .filter(|&h| space.contains(h))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let spans: Vec<(u64, u64)> = runs_of(&mine)
                .into_iter()
                .map(|(h, n)| ((h - space.base) * 4096, n * 4096))
                .collect();
            let complete = spans
                .chunks(4097)
                .all(|c| link.cluster.invalidate_spans(&space.name, c));
            if complete {
                invalidated.extend_from_slice(&mine);
            } else {
                direct.extend_from_slice(&mine);
            }
        }
        // A handle of no space this member registered is not expected;
        // free it where the book says it is.
        direct.extend(
            sorted
                .iter()
                .copied()
                .filter(|&h| !link.space.contains(h) && !link.older.iter().any(|s| s.contains(h))),
        );
        {
            let mut book = Self::book(link);
            for &h in &invalidated {
                book.forget(h);
            }
        }
        let direct_by_server = self.forget(&direct);
        self.free_direct(remotes, &direct_by_server, deadline)?;
        Ok(invalidated.len())
    }

    /// Takes handles off the book, grouped by their server (unknown ones
    /// are dropped: nothing says where they are).
    fn forget(&self, handles: &[u64]) -> Vec<(u8, Vec<u64>)> {
        let Some(link) = &self.link else {
            return vec![(0, handles.to_vec())];
        };
        let mut by: BTreeMap<u8, Vec<u64>> = BTreeMap::new();
        let mut book = Self::book(link);
        for &h in handles {
            if let Some(s) = book.forget(h) {
                by.entry(s).or_default().push(h);
            }
        }
        by.into_iter().collect()
    }

    fn free_direct(
        &self,
        remotes: &mut Remotes,
        by_server: &[(u8, Vec<u64>)],
        deadline: Instant,
    ) -> Result<(), ClientError> {
        let mut first_err = None;
        for (server, handles) in by_server {
            if handles.is_empty() {
                continue;
            }
            let Some(conn) = remotes.get(&self.servers, *server) else {
                continue;
            };
            let r = conn.max_batch(deadline).and_then(|max| {
                for chunk in handles.chunks(max.max(1) as usize) {
                    conn.free(chunk, deadline)?;
                }
                Ok(())
            });
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The agent stops. With no device page left (`module_pages` is 0) the
    /// handle spaces are invalidated (whatever is left on servers is
    /// freed) and unregistered, the grants returned, and the cluster left;
    /// otherwise everything stays for the next run.
    pub fn close(&self, module_pages: u64) {
        let Some(link) = &self.link else { return };
        if module_pages > 0 {
            tracing::warn!(
                module_pages,
                "the module still holds pages: keeping this agent's intervals and grants for its next run"
            );
            link.cluster.set_leave_on_drop(false);
            return;
        }
        for s in std::iter::once(&link.space).chain(&link.older) {
            retire(&link.cluster, s);
        }
        let ids: Vec<u64> = Self::book(link).grants.iter().map(|g| g.id).collect();
        link.cluster.release_grants(&ids);
        link.cluster.set_leave_on_drop(true);
    }

    /// Moves the pages this run placed on server `member` (being drained)
    /// to other granted servers, then returns that server's grants and
    /// unsubscribes it. Per run of handles: read the pages from the old
    /// server (each checked by CRC), store them on a new one, point the run
    /// there, then free them on the old one; a fault that read the table
    /// before the switch and finds the page gone asks again. Handles of
    /// earlier agent runs that no fault has looked up yet stay where they
    /// are, with their grants.
    pub fn drain(&self, remotes: &mut Remotes, member: u64, timeout: std::time::Duration) {
        let Some(link) = &self.link else { return };
        let (from, runs) = {
            let mut book = Self::book(link);
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
            return;
        }
        let (mut moved, mut failed) = (0u64, 0u64);
        for first in runs {
            match self.move_run(link, remotes, first, Instant::now() + timeout) {
                Ok(n) => moved += n,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(first, error = %e, "cannot move pages off a draining server; they stay there");
                }
            }
        }
        let (ids, left) = {
            let mut book = Self::book(link);
            let left = book.runs.values().any(|r| from.contains(&r.server));
            let ids: Vec<u64> = if left {
                Vec::new()
            } else {
                let ids = book
                    .grants
                    .iter()
                    .filter(|g| g.member == member)
                    .map(|g| g.id)
                    .collect();
                book.grants.retain(|g| g.member != member);
                book.subscribed.remove(&member);
                ids
            };
            (ids, left)
        };
        if !left {
            link.cluster.release_grants(&ids);
            if let Err(e) = link.cluster.unsubscribe(link.space.interval, member) {
                tracing::warn!(error = %e, "cannot unsubscribe a drained server");
            }
        }
        tracing::info!(
            server = member,
            moved,
            failed,
            "moved the kernel agent's pages off a draining server"
        );
    }

    /// Moves the run starting at `first` to a grant elsewhere; returns the
    /// pages moved.
    fn move_run(
        &self,
        link: &Link,
        remotes: &mut Remotes,
        first: u64,
        deadline: Instant,
    ) -> Result<u64, KernelMoveError> {
        let Some((pages, from)) = Self::book(link)
            .runs
            .get(&first)
            .map(|r| (r.pages, r.server))
        else {
            return Ok(0);
        };
        // Read what is still there (freed handles answer not_found).
        let handles: Vec<u64> = (first..first + pages).collect();
        let mut found: Vec<(u64, rmem_client::Page)> = Vec::new();
        {
            let conn = remotes
                .get(&self.servers, from)
                .ok_or(KernelMoveError::NoServer)?;
            let max = conn.max_batch(deadline)?.max(1) as usize;
            let mut buf = vec![[0u8; rmem_client::PAGE_SIZE]; max.min(handles.len())];
            let mut statuses = Vec::new();
            for chunk in handles.chunks(max) {
                conn.get(chunk, &mut buf[..chunk.len()], &mut statuses, deadline)?;
                for (i, &h) in chunk.iter().enumerate() {
                    if statuses.get(i) == Some(&rmem_client::PageStatus::Ok) {
                        found.push((h, buf[i]));
                    }
                }
            }
        }
        let need = found.len() as u64;
        if need == 0 {
            // Nothing of it is left there (freed meanwhile).
            return Ok(0);
        }
        // A grant elsewhere with room for them.
        let pick = |book: &mut Book| {
            book.grants
                .iter()
                .enumerate()
                .filter(|(_, g)| !g.draining && g.pages.saturating_sub(g.used) >= need)
                .max_by_key(|(_, g)| g.pages.saturating_sub(g.used))
                .map(|(k, g)| (k, g.server))
        };
        let mut target = pick(&mut Self::book(link));
        if target.is_none() {
            self.grow(link, need.max(GRANT_PAGES))?;
            target = pick(&mut Self::book(link));
        }
        let (grant, to) = target.ok_or(KernelMoveError::NoRoom)?;
        Self::book(link).grants[grant].used += need;
        let stored = (|| -> Result<(), KernelMoveError> {
            let conn = remotes
                .get(&self.servers, to)
                .ok_or(KernelMoveError::NoServer)?;
            let max = conn.max_batch(deadline)?.max(1) as usize;
            for chunk in found.chunks(max) {
                let batch: Vec<(u64, &rmem_client::Page)> =
                    chunk.iter().map(|(h, p)| (*h, p)).collect();
                let statuses = conn.put(&batch, deadline)?;
                if statuses.iter().any(|s| *s != rmem_client::PageStatus::Ok) {
                    return Err(KernelMoveError::Refused);
                }
            }
            Ok(())
        })();
        let moved: Vec<u64> = found.iter().map(|(h, _)| *h).collect();
        if let Err(e) = stored {
            Self::book(link).grants[grant].used -= need;
            let _ = self.free_direct(remotes, &[(to, moved)], deadline);
            return Err(e);
        }
        // Switch the run over; if it was freed meanwhile, the new copies
        // are garbage.
        let switched = {
            let mut book = Self::book(link);
            let old = book.runs.get_mut(&first).map(|r| {
                let old = (r.grant, r.live);
                r.server = to;
                r.grant = Some(grant);
                old
            });
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
            return Ok(0);
        }
        self.free_direct(remotes, &[(from, moved)], deadline)?;
        Ok(need)
    }

    /// (grants, granted pages, used pages, server members subscribed), for
    /// status and tests.
    pub fn cluster_usage(&self) -> Option<(usize, u64, u64, usize)> {
        let link = self.link.as_ref()?;
        let book = Self::book(link);
        Some((
            book.grants.len(),
            book.grants.iter().map(|g| g.pages).sum(),
            book.grants.iter().map(|g| g.used).sum(),
            book.subscribed.len(),
        ))
    }
}

/// Why a run could not move off a draining server.
#[derive(Debug, thiserror::Error)]
enum KernelMoveError {
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

/// Invalidates a whole handle space (its servers free what is left) and
/// unregisters it.
fn retire(cluster: &Cluster, s: &Space) {
    if !cluster.invalidate_spans(&s.name, &[(0, (1u64 << SPACE_BITS) * 4096)]) {
        tracing::warn!(space = %s.name, "could not free everything of a handle space");
    }
    if let Err(e) = cluster.unregister(s.interval) {
        tracing::warn!(space = %s.name, error = %e, "cannot unregister a handle space");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_handles_coalesce() {
        assert_eq!(runs_of(&[]), vec![]);
        assert_eq!(
            runs_of(&[1, 2, 3, 3, 7, 9, 10]),
            vec![(1, 3), (7, 1), (9, 2)]
        );
    }

    #[test]
    fn the_book_finds_and_forgets_handles() {
        let mut book = Book::default();
        book.grants.push(Grant {
            id: 1,
            member: 5,
            draining: false,
            server: 0,
            pages: 100,
            used: 12,
        });
        book.runs.insert(
            10,
            Run {
                pages: 8,
                server: 3,
                grant: Some(0),
                live: 8,
            },
        );
        book.runs.insert(
            30,
            Run {
                pages: 4,
                server: 1,
                grant: Some(0),
                live: 4,
            },
        );
        assert_eq!(book.run_of(9).map(|r| r.0), None);
        assert_eq!(book.run_of(17).map(|(_, r)| r.server), Some(3));
        assert_eq!(book.run_of(18).map(|r| r.0), None);
        assert_eq!(book.run_of(33).map(|(_, r)| r.server), Some(1));
        assert_eq!(book.forget(18), None);
        for h in 30..34 {
            assert_eq!(book.forget(h), Some(1));
        }
        assert!(book.run_of(30).is_none(), "an emptied run is dropped");
        assert_eq!(book.grants[0].used, 8);
    }

    #[test]
    fn spaces_hold_their_epoch_only() {
        let s = Space {
            name: "n".into(),
            base: 5 << SPACE_BITS,
            interval: 1,
        };
        assert!(s.contains(5 << SPACE_BITS));
        assert!(s.contains((6 << SPACE_BITS) - 1));
        assert!(!s.contains(6 << SPACE_BITS));
        assert!(!s.contains((5 << SPACE_BITS) - 1));
    }
}

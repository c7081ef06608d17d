//! Where a backend's remote pages live: [`Homes`], the one remote store
//! both backends use (the kernel agent for its attached processes, each
//! userfaultfd region for its own pages).
//!
//! A backend takes handles from its space ([`Homes::take`]), asks where a
//! batch goes ([`Homes::place`]), stores the pieces on their servers and
//! records them ([`Homes::stored`]); a fault asks which server holds a
//! handle ([`Homes::server_of`]); freed copies go back through
//! [`Homes::release`] (an invalidation of the handle space in a cluster,
//! freed on the servers directly otherwise or when that fails) or
//! [`Homes::discard`] (directly: copies nothing else ever named).
//!
//! **In a cluster** ([`Home::Cluster`]):
//! - *Placement.* Capacity is granted by the coordinator, up front (a
//!   region reserves its size) and in pieces of [`GRANT_PAGES`] (or more;
//!   a region smaller than that asks for its size) as evictions need more. Batches take turns over the grants (see
//!   [`super::book`]).
//! - *Interval.* The handle space is registered as an interval, subscribed
//!   by every server a grant is on; releases are invalidations of handle
//!   ranges, one per call: every subscribed server frees them and
//!   acknowledges before the call returns.
//! - *Drain.* A server being drained gets nothing new; its runs move to
//!   other grants ([`super::drain`]).
//! - *Restarts (kernel agent).* The member name is stable (`<host>/kmod` by
//!   default), so a restarted agent is the same member and finds the
//!   spaces and grants of its earlier runs. While the module still holds
//!   device pages it keeps them: a fault on an old handle asks the servers
//!   of those grants. With no device page left it retires them and returns
//!   the grants.
//! - *Closing.* With nothing left that names a handle, the spaces are
//!   retired (invalidated whole, unregistered) and the grants returned.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rmem_client::{ClientConfig, ClientError, Page, PageStatus};
use rmem_common::Redundancy;

use super::book::{Book, Grant, Slots, UNBOUNDED};
pub use super::book::{Piece, Slot};
use super::cluster::{Cluster, ClusterError};
use super::journal::{self, Journal};
use super::seal::Seal;
use super::servers::{Remotes, Servers};
use super::space::{Claim, EpochLog, SPACE_BITS, Space, new_base, retire};
use super::stripe;

/// Most frees one failing server may owe (8 bytes each).
pub(crate) const MAX_OWED: usize = 1 << 20;

/// How long after a server failed a free its owed frees are first tried,
/// and, doubling after each failed try, at most.
pub(crate) const OWED_RETRY: Duration = Duration::from_secs(2);
pub(crate) const OWED_RETRY_MAX: Duration = Duration::from_secs(60);

/// Pages asked of the coordinator when the grants are full (64 MiB).
pub const GRANT_PAGES: u64 = 16384;

/// The run journal's file in the kernel agent's state directory.
pub const JOURNAL_FILE: &str = "runs";

/// How long a server found failing gets nothing new and is read last.
pub const SUSPECT_FOR: Duration = Duration::from_secs(10);

/// How a fault reads a handle ([`Homes::reader_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// From this server: the run's first copy, or the server of the page
    /// in its stripe.
    First(u8),
    /// From this server, another copy: the first one's is failing.
    Other(u8),
    /// Rebuilt from the other pages of its stripe ([`Homes::read_other`]):
    /// this server, holding the page, is failing.
    Rebuild(u8),
}

impl Source {
    /// The server asked first.
    pub fn server(self) -> u8 {
        match self {
            Source::First(s) | Source::Other(s) | Source::Rebuild(s) => s,
        }
    }

    /// Whether the read is degraded (a server of the page is failing).
    pub fn degraded(self) -> bool {
        !matches!(self, Source::First(_))
    }
}

/// One copy or stripe slot of a piece being stored ([`Homes::put`]).
struct Lane<'p> {
    server: u8,
    /// (handle, page, offset of the data page in the piece, if one).
    items: Vec<(u64, &'p Page, Option<usize>)>,
    /// The server's batch limit.
    max: usize,
    statuses: Vec<PageStatus>,
    failed: Option<ClientError>,
}

/// Where the pages go.
#[derive(Debug, Clone)]
pub enum Home {
    /// Memory servers named by configuration; batches take turns over them.
    Servers(Vec<ClientConfig>),
    /// The servers the cluster's coordinator grants.
    Cluster(Arc<Cluster>),
}

/// The servers, the handle space and the book of where each handle is.
#[derive(Debug)]
pub struct Homes {
    pub(crate) servers: Servers,
    /// This space's base, held from other draws of this process.
    claim: Claim,
    next: AtomicU64,
    book: Mutex<Book>,
    pub(crate) link: Option<Link>,
    /// How long a drain's requests may take.
    pub(crate) request_timeout: Duration,
    /// Set when the space is retired: a drain still running frees what it
    /// wrote instead of recording it.
    pub(crate) closed: AtomicBool,
    /// The store's policy, for batches placed without one of their own;
    /// from it, the servers each page's redundancy spans (copies, or data
    /// plus parity pages of a stripe)...
    policy: Redundancy,
    copies: usize,
    /// ...and data pages per stripe (1: pages are copied whole).
    data: usize,
    /// Whether some page here may have another copy or a stripe (the
    /// store's policy, or a batch's own): only then is a failing server
    /// read around and suspected.
    redundant: AtomicBool,
    /// Whether placing fewer copies than asked was warned about.
    warned_short: AtomicBool,
    /// Set when the run journal became due for a rewrite, so that
    /// [`Self::compact_journal`] takes the book's lock only then.
    journal_due: AtomicBool,
    /// Pages asked of the coordinator beyond a batch's need when the
    /// grants are full: [`GRANT_PAGES`], or a region's size when smaller
    /// (a small region never hoards the cluster's capacity).
    grow_step: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Link {
    pub cluster: Arc<Cluster>,
    pub space: Space,
    /// Spaces of earlier runs of this member, kept while the module may
    /// still hold their pages.
    pub older: Vec<Space>,
}

/// How a store seals its pages (see [`super::seal`]).
#[derive(Debug, Clone, Default)]
pub enum Sealing {
    #[default]
    Off,
    /// With a key of this process only (a userfaultfd region).
    InMemory,
    /// The kernel agent's: keys and tags kept in `dir`, so a restarted
    /// agent opens the pages of earlier runs the module still holds
    /// (sealed or not); this run's pages sealed when `seal`.
    Kernel { dir: std::path::PathBuf, seal: bool },
}

impl Sealing {
    /// The seal of a store at `base`, whose earlier spaces (the kernel
    /// agent's) are `older`.
    fn make(&self, base: u64, older: &[u64]) -> Result<Option<Arc<Seal>>, ClusterError> {
        match self {
            Sealing::Off => Ok(None),
            Sealing::InMemory => Ok(Some(Arc::new(Seal::generate(base)))),
            Sealing::Kernel { dir, seal } => Seal::for_kernel(dir, base, *seal, older)
                .map(|s| s.map(Arc::new))
                .map_err(|source| ClusterError::SealFiles {
                    path: dir.clone(),
                    source,
                }),
        }
    }
}

/// Handles taken off the book whose frees are on their way, named in
/// [`Book::freeing`] until dropped (a move of their run starting meanwhile
/// frees what it copies of them).
struct Freeing<'h> {
    homes: &'h Homes,
    token: u64,
}

impl Drop for Freeing<'_> {
    fn drop(&mut self) {
        let token = self.token;
        self.homes.book().freeing.retain(|(t, _)| *t != token);
    }
}

impl Homes {
    /// The kernel agent's store. In a cluster: takes over or retires what
    /// earlier runs of this member left (kept when `module_pages` device
    /// pages may still name their handles) and registers a new space
    /// `<member>/handles/<epoch>`.
    ///
    /// `state` is the agent's directory on tmpfs (beside its admin
    /// socket), for what must outlive a run as long as the module's pages
    /// do: outside a cluster, `handle-epochs` records the epochs of the
    /// runs whose pages the module may still hold, so this run draws
    /// another; `seal/` holds the keys and tags of sealed runs. Sealing
    /// (`seal`) needs it.
    pub fn for_agent(
        home: Home,
        module_pages: u64,
        state: Option<&Path>,
        seal: bool,
        request_timeout: Duration,
        redundancy: Redundancy,
    ) -> Result<Arc<Self>, ClusterError> {
        let sealing = match state {
            Some(dir) => Sealing::Kernel {
                dir: dir.join("seal"),
                seal,
            },
            None if seal => return Err(ClusterError::SealNeedsState),
            None => Sealing::Off,
        };
        let cluster = match home {
            Home::Servers(list) => {
                let Some(dir) = state else {
                    return Self::standalone(list, &[], request_timeout, redundancy, &sealing);
                };
                let log = EpochLog::new(&dir.join("handle-epochs"));
                let epoch_error = |source| ClusterError::EpochLog {
                    path: log.path().to_owned(),
                    source,
                };
                let mut taken = log.earlier(module_pages).map_err(epoch_error)?;
                let homes = Self::standalone(list, &taken, request_timeout, redundancy, &sealing)?;
                taken.push(homes.base());
                log.record(&taken).map_err(epoch_error)?;
                if taken.len() > 1 {
                    tracing::info!(
                        earlier_runs = taken.len() - 1,
                        "the module still holds pages of earlier runs: their handle epochs stay out of use"
                    );
                }
                homes.open_journal(&dir.join(JOURNAL_FILE), "standalone", module_pages > 0);
                return Ok(homes);
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
                let server = servers.add(cluster.server_config(g))?;
                let mut grant = Grant::new(g.grant_id, g.server_id, server, g.pages);
                grant.used = g.pages;
                grant.domain.clone_from(&g.domain);
                grant.inherited = true;
                book.grants.push(grant);
                // Every copy's server answers for its interval.
                book.subscribed.insert(g.server_id);
            }
            if !older.is_empty() {
                tracing::info!(
                    spaces = older.len(),
                    grants = held.len(),
                    "kept the handle spaces of earlier runs: the module still holds pages"
                );
            }
            // Their servers serve those handles to this agent only on the
            // capabilities for them.
            let ids: Vec<u64> = older.iter().map(|s| s.interval).collect();
            cluster.hold_capabilities(&ids)?;
            older
        };
        let taken: Vec<u64> = older.iter().map(|s| s.base).collect();
        let owner = cluster.name().to_owned();
        let homes = Self::registered(
            cluster,
            servers,
            book,
            &prefix,
            &taken,
            older,
            request_timeout,
            redundancy,
            &sealing,
        )?;
        if let Some(dir) = state {
            homes.open_journal(&dir.join(JOURNAL_FILE), &owner, module_pages > 0);
        }
        Ok(homes)
    }

    /// Opens the run journal at `path` for member `owner`: with `keep`
    /// (the module still holds pages), the runs of the earlier run of this
    /// agent it records go into the book first, so faults on their
    /// handles read the right servers, other copies and stripes. Without
    /// it the store works as before: a handle not on the book is looked
    /// for on every server, and learned as one copy.
    fn open_journal(&self, path: &Path, owner: &str, keep: bool) {
        let opened = Journal::open(path, owner, keep).and_then(|(mut journal, entries)| {
            let mut book = self.book();
            let book = &mut *book;
            let had = entries.len();
            let (runs, skipped) =
                journal::replay(entries, book, &|addr| self.servers.index_of(addr));
            journal.rewrite(&book.runs, &|i| self.servers.addr(i))?;
            if had > 0 {
                tracing::info!(
                    runs,
                    skipped,
                    path = %path.display(),
                    "the runs of the module's pages from the agent's earlier run are known again"
                );
            }
            book.journal = Some(journal);
            Ok(())
        });
        if let Err(e) = opened {
            tracing::warn!(path = %path.display(), error = %e, "no run journal: after a restart, pages the module keeps are looked for on every server and known as one copy");
        }
    }

    /// Writes to the book's journal, if it keeps one, and rewrites it when
    /// due. A journal that fails is dropped, loudly.
    pub(crate) fn journal(
        &self,
        book: &mut Book,
        write: impl FnOnce(&mut Journal, &dyn Fn(u8) -> String) -> std::io::Result<()>,
    ) {
        let Some(journal) = book.journal.as_mut() else {
            return;
        };
        let addr = |i: u8| self.servers.addr(i);
        let mut written = write(journal, &addr);
        // Rewrites are the free thread's ([`Self::compact_journal`]),
        // outside the lock, unless it falls far behind.
        if written.is_ok() && journal.overdue(book.runs.len()) {
            written = journal.rewrite(&book.runs, &addr);
        } else if written.is_ok() && journal.due(book.runs.len()) {
            self.journal_due.store(true, Ordering::Relaxed);
        }
        if let Err(e) = written {
            tracing::error!(path = %journal.path().display(), error = %e, "cannot write the run journal; dropped: after a restart, the pages the module keeps are looked for on every server and known as one copy");
            book.journal = None;
        }
    }

    /// Rewrites the run journal from the book when it is due, holding the
    /// book's lock only to take the runs and to swap the file in: fault
    /// threads look handles up under that lock, and formatting 10^5 runs
    /// takes tens of milliseconds. For the kernel agent's free thread.
    pub fn compact_journal(&self) {
        if !self.journal_due.swap(false, Ordering::Relaxed) {
            return;
        }
        let snapshot = {
            let mut guard = self.book();
            let book = &mut *guard;
            match book.journal.as_mut() {
                Some(j) if j.due(book.runs.len()) => j.begin_rewrite(&book.runs),
                _ => None,
            }
        };
        let Some(snapshot) = snapshot else { return };
        let body = snapshot.format(&|i| self.servers.addr(i));
        let mut book = self.book();
        if let Some(j) = book.journal.as_mut()
            && let Err(e) = j.finish_rewrite(&body, snapshot.len())
        {
            tracing::error!(path = %j.path().display(), error = %e, "cannot rewrite the run journal; dropped: after a restart, the pages the module keeps are looked for on every server and known as one copy");
            book.journal = None;
        }
    }

    /// A userfaultfd region's store: its own space `<member>/regions/<epoch>`
    /// in a cluster, with `reserve` pages granted up front (creation fails
    /// if the cluster does not have them). With `seal`, its pages are
    /// sealed for servers not trusted with them (see [`super::seal`]).
    pub fn for_region(
        home: Home,
        reserve: u64,
        request_timeout: Duration,
        redundancy: Redundancy,
        seal: bool,
    ) -> Result<Arc<Self>, ClusterError> {
        let sealing = if seal {
            Sealing::InMemory
        } else {
            Sealing::Off
        };
        let cluster = match home {
            Home::Servers(list) => {
                return Self::standalone(list, &[], request_timeout, redundancy, &sealing);
            }
            Home::Cluster(c) => c,
        };
        let prefix = format!("{}/regions/", cluster.name());
        let within = cluster.control_within();
        let homes = Self::registered(
            cluster,
            Servers::default(),
            Book::default(),
            &prefix,
            &[],
            Vec::new(),
            request_timeout,
            redundancy,
            &sealing,
        )?;
        homes
            .grow_step
            .store(reserve.clamp(1, GRANT_PAGES), Ordering::Relaxed);
        // Servers all out of service for a moment (fenced while a new
        // coordinator leader hears from them, restarting) make the cluster
        // answer no_capacity: wait for them as for the coordinator itself.
        let started = Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            match homes.grow(reserve.max(1)) {
                Ok(()) => return Ok(homes),
                Err(ClusterError::Control(e))
                    if e.reason() == "no_capacity" && started.elapsed() + pause < within =>
                {
                    tracing::warn!(
                        error = %e,
                        retry_in = ?pause,
                        gives_up_in = ?within.saturating_sub(started.elapsed()),
                        "no memory server takes placements now; trying again"
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    homes.retire();
                    return Err(e);
                }
            }
        }
    }

    fn standalone(
        list: Vec<ClientConfig>,
        taken: &[u64],
        request_timeout: Duration,
        redundancy: Redundancy,
        sealing: &Sealing,
    ) -> Result<Arc<Self>, ClusterError> {
        if list.is_empty() {
            return Err(ClusterError::NoServer);
        }
        // A stripe needs its data pages and at least one parity page on
        // distinct servers: with fewer, nothing could ever be evicted.
        if redundancy.is_erasure() && list.len() <= redundancy.data() {
            return Err(ClusterError::TooFewServers {
                policy: redundancy,
                need: redundancy.data() + 1,
                have: list.len(),
            });
        }
        let claim = new_base(taken);
        let base = claim.base();
        let servers = Servers::new(list)?.sealed(sealing.make(base, taken)?);
        let mut book = Book::default();
        for k in 0..servers.len() {
            book.grants.push(Grant::new(0, 0, k as u8, UNBOUNDED));
        }
        Ok(Arc::new(Self {
            servers,
            claim,
            next: AtomicU64::new(base),
            book: Mutex::new(book),
            link: None,
            request_timeout,
            closed: AtomicBool::new(false),
            policy: redundancy,
            copies: redundancy.copies(),
            data: redundancy.data(),
            redundant: AtomicBool::new(redundancy.copies() > 1),
            warned_short: AtomicBool::new(false),
            journal_due: AtomicBool::new(false),
            grow_step: AtomicU64::new(GRANT_PAGES),
        }))
    }

    #[allow(clippy::too_many_arguments)]
    fn registered(
        cluster: Arc<Cluster>,
        servers: Servers,
        book: Book,
        prefix: &str,
        taken: &[u64],
        older: Vec<Space>,
        request_timeout: Duration,
        redundancy: Redundancy,
        sealing: &Sealing,
    ) -> Result<Arc<Self>, ClusterError> {
        let claim = new_base(taken);
        let base = claim.base();
        let servers = servers.sealed(sealing.make(base, taken)?);
        let name = format!("{prefix}{:06x}", base >> SPACE_BITS);
        let interval = cluster.register_space(&name, 1 << SPACE_BITS, base)?;
        tracing::debug!(space = %name, interval, "registered a handle space");
        let homes = Arc::new(Self {
            servers,
            claim,
            next: AtomicU64::new(base),
            book: Mutex::new(book),
            link: Some(Link {
                cluster: cluster.clone(),
                space: Space {
                    name,
                    base,
                    interval,
                },
                older,
            }),
            request_timeout,
            closed: AtomicBool::new(false),
            policy: redundancy,
            copies: redundancy.copies(),
            data: redundancy.data(),
            redundant: AtomicBool::new(redundancy.copies() > 1),
            warned_short: AtomicBool::new(false),
            journal_due: AtomicBool::new(false),
            grow_step: AtomicU64::new(GRANT_PAGES),
        });
        // Pages on a server being drained move elsewhere.
        cluster.watch_drains(&homes);
        Ok(homes)
    }

    /// Pages asked of the coordinator beyond a need (see the field).
    pub(crate) fn grow_step(&self) -> u64 {
        self.grow_step.load(Ordering::Relaxed)
    }

    /// The first handle of this space.
    pub fn base(&self) -> u64 {
        self.claim.base()
    }

    /// `n` new consecutive handles; the first.
    pub fn take(&self, n: usize) -> u64 {
        self.next.fetch_add(n as u64, Ordering::Relaxed)
    }

    /// The servers, by index.
    pub fn servers(&self) -> &Servers {
        &self.servers
    }

    /// Where pages go, for logs: a server's address or the coordinator's.
    pub fn describe(&self) -> String {
        match &self.link {
            None if self.servers.len() == 1 => self.servers.addr(0),
            None => format!("{} servers", self.servers.len()),
            Some(l) => format!("cluster at {}", l.cluster.client().endpoint()),
        }
    }

    pub(crate) fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Servers each page's redundancy spans under the store's policy:
    /// copies, or the data and parity pages of its stripe. More than one:
    /// a failing server is read around.
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// The store's policy.
    pub fn policy(&self) -> Redundancy {
        self.policy
    }

    /// Servers handle `h`'s page spans (its run's slots; the store's
    /// policy for a handle not on the book).
    pub fn copies_of(&self, h: u64) -> usize {
        self.book()
            .run_of(h)
            .map_or(self.copies, |(_, r)| r.slots.len())
    }

    /// Whether some page here may be read around a failing server.
    pub fn redundant(&self) -> bool {
        self.redundant.load(Ordering::Relaxed)
    }

    /// Checks that batches of `policy` can be placed here: a stripe needs
    /// its data pages and a parity page on distinct servers, and a store
    /// of configured servers has no more than it was given.
    pub fn check_policy(&self, policy: Redundancy) -> Result<(), ClusterError> {
        if self.link.is_none() && policy.is_erasure() && self.servers.len() <= policy.data() {
            return Err(ClusterError::TooFewServers {
                policy,
                need: policy.data() + 1,
                have: self.servers.len(),
            });
        }
        Ok(())
    }

    /// Pages of each server for `pages` pages stored in stripes of `data`.
    fn per_server(pages: u64, data: usize) -> u64 {
        pages.div_ceil(data as u64)
    }

    /// Pages stored with fewer live copies than their policy asks for:
    /// placed short (the cluster had fewer servers), or with a copy on a
    /// server declared gone that is not rebuilt yet.
    pub fn at_risk(&self) -> u64 {
        self.book().at_risk()
    }

    /// Errors met, by plane (`data`: memory servers; `control`: the
    /// coordinator) and reason, for `/metrics`.
    pub fn errors(&self) -> Vec<(&'static str, String, u64)> {
        let data = self.servers.errors().snapshot().into_iter();
        let mut v: Vec<_> = data.map(|(r, n)| ("data", r, n)).collect();
        if let Some(link) = &self.link {
            v.extend(
                link.cluster
                    .errors()
                    .into_iter()
                    .map(|(r, n)| ("control", r, n)),
            );
        }
        v
    }

    /// Server `member` is declared gone: nothing new goes there, its copies
    /// are read last and no longer count, and nothing is freed there (what
    /// it holds is freed when it comes back). True if this store holds
    /// grants on it.
    pub(crate) fn mark_gone(&self, member: u64) -> bool {
        let mut book = self.book();
        let servers: Vec<u8> = book
            .grants
            .iter()
            .filter(|g| g.member == member)
            .map(|g| g.server)
            .collect();
        book.gone.extend(servers.iter().copied());
        for s in &servers {
            book.owed.remove(s);
            book.owed_due.remove(s);
            book.owed_backoff.remove(s);
        }
        !servers.is_empty()
    }

    /// Chooses servers for `count` handles from `first` (each on as many
    /// distinct servers as `policy`, or the store's, has copies), asking
    /// the coordinator for capacity when the grants are full or too few.
    /// The pieces count against their grants until [`Self::unplace`] or a
    /// free.
    ///
    /// Fewer copies than asked are placed only when no server is known to
    /// be failing (the cluster has too few servers: counted as at risk);
    /// when one is, the batch fails and its pages stay local until a
    /// replacement is found.
    pub fn place(
        &self,
        first: u64,
        count: usize,
        policy: Option<Redundancy>,
    ) -> Result<Vec<Piece>, ClusterError> {
        let (wanted, data) = match policy {
            Some(p) => {
                self.check_policy(p)?;
                (p.copies(), p.data())
            }
            None => (self.copies, self.data),
        };
        if wanted > 1 {
            self.redundant.store(true, Ordering::Relaxed);
        }
        let short = |pieces: &[Piece]| pieces.iter().any(|p| p.slots.len() < wanted);
        let (mut pieces, mut left) = self.book().take(first, count as u64, wanted, data);
        if (left > 0 || short(&pieces)) && self.link.is_some() {
            self.unplace(&pieces);
            // What found no room, or too few servers with room, this time.
            let need = left
                + pieces
                    .iter()
                    .filter(|p| p.slots.len() < wanted)
                    .map(|p| p.count as u64)
                    .sum::<u64>();
            let suspects = self.suspect_members();
            // A step's worth when the cluster has it, else just what this
            // batch needs (on as many distinct servers as copies: the
            // grants left may all be on one server).
            let grown = self
                .grow_spanning(
                    Self::per_server(need.max(self.grow_step()), data),
                    wanted,
                    data,
                    &suspects,
                )
                .or_else(|e| match e {
                    // Too few servers: asking for less does not help.
                    ClusterError::TooFewGranted { .. } => Err(e),
                    _ => self.grow_spanning(
                        Self::per_server(need.max(1), data),
                        wanted,
                        data,
                        &suspects,
                    ),
                });
            if let Err(e) = grown {
                if left > 0 {
                    return Err(e);
                }
                tracing::debug!(error = %e, "no more servers for further copies");
            }
            (pieces, left) = self.book().take(first, count as u64, wanted, data);
        }
        if left > 0 {
            self.unplace(&pieces);
            return Err(if self.link.is_none() {
                ClusterError::NoServer
            } else {
                ClusterError::ShortGrant
            });
        }
        if short(&pieces) {
            let now = Instant::now();
            let failing = self.book().suspects.values().any(|&t| t > now);
            if failing {
                self.unplace(&pieces);
                return Err(ClusterError::TooFewCopies { copies: wanted });
            }
            if !self.warned_short.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    copies = wanted,
                    "fewer servers with room than copies: pages stored with fewer copies are at risk until more servers (or capacity) join"
                );
            }
        }
        // Erasure coded: the parity pages' handles, from the same space.
        for p in &mut pieces {
            if let Some(l) = &mut p.stripes {
                l.parity_first = self.take(l.parity_pages() as usize);
            }
        }
        Ok(pieces)
    }

    /// Members of the servers found failing lately.
    fn suspect_members(&self) -> Vec<u64> {
        let book = self.book();
        let now = Instant::now();
        book.grants
            .iter()
            .filter(|g| book.is_suspect(g.server, now))
            .map(|g| g.member)
            .collect()
    }

    /// New grants for `pages` stored (on each copy's server, or the
    /// share of each server of a stripe); their servers subscribe to the
    /// interval.
    pub(crate) fn grow(&self, pages: u64) -> Result<(), ClusterError> {
        let suspects = self.suspect_members();
        self.grow_spanning(
            Self::per_server(pages, self.data),
            self.copies,
            self.data,
            &suspects,
        )
    }

    /// New grants for `pages`, `copies` times on distinct servers, none of
    /// `exclude` (members).
    pub(crate) fn grow_avoiding(
        &self,
        pages: u64,
        copies: usize,
        exclude: &[u64],
    ) -> Result<(), ClusterError> {
        self.grow_spanning(pages, copies, 1, exclude)
    }

    /// As [`Self::grow_avoiding`], for stripes of `data` pages: grants on
    /// `data` servers or fewer could never hold one (not a data page and a
    /// parity page apart), so they are returned at once rather than kept,
    /// and each eviction does not take more capacity it cannot use.
    fn grow_spanning(
        &self,
        pages: u64,
        copies: usize,
        data: usize,
        exclude: &[u64],
    ) -> Result<(), ClusterError> {
        let Some(link) = &self.link else {
            return Err(ClusterError::NoServer);
        };
        let grants = link.cluster.allocate(pages, copies, exclude)?;
        let spanned = grants
            .iter()
            .map(|g| g.server_id)
            .collect::<BTreeSet<_>>()
            .len();
        if data > 1 && spanned <= data {
            let ids: Vec<u64> = grants.iter().map(|g| g.grant_id).collect();
            link.cluster.release_grants(&ids);
            return Err(ClusterError::TooFewGranted {
                policy: Redundancy::Erasure {
                    data: data as u8,
                    parity: copies.saturating_sub(data) as u8,
                },
                need: data + 1,
                have: spanned,
            });
        }
        let mut added = Vec::with_capacity(grants.len());
        for g in &grants {
            let server = self.servers.add(link.cluster.server_config(g))?;
            let subscribed = self.book().subscribed.contains(&g.server_id);
            if !subscribed {
                if let Err(e) = link.cluster.subscribe(link.space.interval, g.server_id) {
                    let ids: Vec<u64> = grants.iter().map(|g| g.grant_id).collect();
                    link.cluster.release_grants(&ids);
                    return Err(e);
                }
                self.book().subscribed.insert(g.server_id);
            }
            let mut grant = Grant::new(g.grant_id, g.server_id, server, g.pages);
            grant.domain.clone_from(&g.domain);
            added.push(grant);
        }
        tracing::debug!(pages, grants = added.len(), "new capacity granted");
        let mut book = self.book();
        for g in &added {
            // The coordinator grants only on servers in service: one
            // declared gone earlier is back (an operator undrained it).
            book.gone.remove(&g.server);
        }
        book.grants.extend(added);
        Ok(())
    }

    /// Nothing new goes to `server` for a while, and faults read its copies
    /// last: a request to it failed.
    pub fn suspect(&self, server: u8, why: &dyn std::fmt::Display) {
        if !self.redundant() {
            // One copy: nowhere else to go; retries wait for it.
            return;
        }
        let until = Instant::now() + SUSPECT_FOR;
        if self.book().suspects.insert(server, until).is_none() {
            tracing::warn!(server = %self.servers.addr(server), error = %why, "a memory server is failing: placing and reading elsewhere for a while");
        }
    }

    /// A request to `server` failed with `e`: a server that does not
    /// answer (not one that refused the request) is suspected.
    pub fn failed(&self, server: u8, e: &rmem_client::ClientError) {
        if e.is_retryable() {
            self.suspect(server, e);
        }
    }

    /// A request to `server` succeeded.
    pub fn trust(&self, server: u8) {
        let mut book = self.book();
        if !book.suspects.is_empty() {
            book.suspects.remove(&server);
        }
    }

    /// Stores the pages of `pieces` (handle `h`'s page is `page(h -
    /// first)`) on every copy's server, or, erasure coded, each page of
    /// their stripes on its slot's server with the parity pages computed
    /// here. The copies (slots) of a piece are written together: each
    /// server's request is sent before any answer is read. Per handle from `first`: whether every copy (every page of its
    /// stripe) was acknowledged. A server that fails is suspect.
    pub fn put<'p>(
        &self,
        remotes: &mut Remotes,
        first: u64,
        pieces: &[Piece],
        page: impl Fn(usize) -> &'p Page,
        deadline: Instant,
    ) -> (Vec<bool>, Option<String>) {
        let total: usize = pieces.iter().map(|p| p.count).sum();
        let mut ok = vec![true; total];
        let mut error = None;
        for piece in pieces {
            let at = (piece.first - first) as usize;
            let parity = match &piece.stripes {
                None => Vec::new(),
                Some(l) => match stripe::encode(l, |off| page(at + off)) {
                    Ok(p) => p,
                    Err(e) => {
                        error.get_or_insert_with(|| e.to_string());
                        ok[at..at + piece.count].fill(false);
                        continue;
                    }
                },
            };
            // A failed page of a stripe fails the whole piece: the
            // stripe's pages are safe only together.
            let fail = |ok: &mut [bool], o: Option<usize>| match (&piece.stripes, o) {
                (None, Some(o)) => ok[at + o] = false,
                _ => ok[at..at + piece.count].fill(false),
            };
            // Each copy or slot: its server, its pages (handle, page,
            // offset of the data page in the piece, if one), its batch
            // limit, the statuses so far, and its error.
            let mut lanes: Vec<Lane<'_>> = Vec::with_capacity(piece.slots.len());
            for (k, server) in piece.slots.servers().enumerate() {
                let items: Vec<(u64, &Page, Option<usize>)> = match &piece.stripes {
                    None => (0..piece.count)
                        .map(|o| (piece.first + o as u64, page(at + o), Some(o)))
                        .collect(),
                    Some(l) => (0..l.stripes())
                        .filter_map(|j| l.handle(j, k))
                        .map(|h| {
                            if l.is_parity(h) {
                                (h, &parity[(h - l.parity_first) as usize], None)
                            } else {
                                let o = (h - l.first) as usize;
                                (h, page(at + o), Some(o))
                            }
                        })
                        .collect(),
                };
                if items.is_empty() {
                    continue;
                }
                let Some(conn) = remotes.get(&self.servers, server) else {
                    fail(&mut ok, None);
                    continue;
                };
                let (max, failed) = match conn.max_batch(deadline) {
                    Ok(max) => (max.max(1) as usize, None),
                    Err(e) => (1, Some(e)),
                };
                lanes.push(Lane {
                    server,
                    items,
                    max,
                    statuses: Vec::new(),
                    failed,
                });
            }
            // Chunk `c` of every copy or slot in flight together: sent to
            // each server, then each answer read.
            let rounds = lanes
                .iter()
                .map(|l| l.items.len().div_ceil(l.max))
                .max()
                .unwrap_or(0);
            for c in 0..rounds {
                let mut sent = Vec::with_capacity(lanes.len());
                for (i, lane) in lanes.iter_mut().enumerate() {
                    if lane.failed.is_some() {
                        continue;
                    }
                    let Some(chunk) = lane.items.chunks(lane.max).nth(c) else {
                        continue;
                    };
                    let batch: Vec<(u64, &Page)> = chunk.iter().map(|&(h, p, _)| (h, p)).collect();
                    let conn = remotes
                        .get(&self.servers, lane.server)
                        .expect("connected above");
                    match conn.put_start(&batch, deadline) {
                        Ok(pending) => sent.push((i, pending, batch)),
                        Err(e) => lane.failed = Some(e),
                    }
                }
                for (i, pending, batch) in sent {
                    let lane = &mut lanes[i];
                    let conn = remotes
                        .get(&self.servers, lane.server)
                        .expect("connected above");
                    match conn.put_finish(pending, &batch, deadline) {
                        Ok(statuses) => lane.statuses.extend(statuses),
                        Err(e) => lane.failed = Some(e),
                    }
                }
            }
            for lane in lanes {
                let addr = self.servers.addr(lane.server);
                match lane.failed {
                    None => {
                        self.trust(lane.server);
                        for (item, st) in lane.items.iter().zip(&lane.statuses) {
                            if *st != PageStatus::Ok {
                                fail(&mut ok, item.2);
                                error.get_or_insert_with(|| format!("{addr} refused a page: {st}"));
                            }
                        }
                    }
                    Some(e) => {
                        error.get_or_insert_with(|| format!("{addr}: {e}"));
                        fail(&mut ok, None);
                        if e.is_retryable() {
                            self.suspect(lane.server, &e);
                        }
                    }
                }
            }
        }
        (ok, error)
    }

    /// Gives back what `pieces` took of their grants (nothing was stored).
    pub fn unplace(&self, pieces: &[Piece]) {
        self.book().give_back(pieces);
    }

    /// Records that `pieces` are stored on their servers.
    pub fn stored(&self, pieces: &[Piece]) {
        let mut book = self.book();
        book.record(pieces);
        self.journal(&mut book, |j, addr| j.stored(pieces, addr));
    }

    /// The server to read handle `h` from first, if known: its first
    /// copy whose server is not suspect (the server of its data page,
    /// erasure coded).
    pub fn server_of(&self, h: u64) -> Option<u8> {
        self.reader_of(h).map(|r| r.server())
    }

    /// How a fault reads handle `h`, from one look at the book.
    pub fn reader_of(&self, h: u64) -> Option<Source> {
        if self.link.is_none() && self.servers.len() == 1 {
            // Every handle, of this run or an earlier one, is there.
            return Some(Source::First(0));
        }
        let book = self.book();
        let (_, run) = book.run_of(h)?;
        let now = Instant::now();
        if let Some(st) = &run.striped {
            let (_, k) = st.layout.locate(h);
            let s = run.slots.get(k).expect("a slot per stripe page").server;
            return Some(if book.is_suspect(s, now) {
                Source::Rebuild(s)
            } else {
                Source::First(s)
            });
        }
        let slots = run.slots;
        Some(match slots.servers().find(|&s| !book.is_suspect(s, now)) {
            Some(s) if s != slots.server() => Source::Other(s),
            Some(s) => Source::First(s),
            None => Source::First(slots.server()),
        })
    }

    /// Servers that may hold a handle not on the book (one of an earlier
    /// run): every server known.
    pub fn candidates(&self) -> impl Iterator<Item = u8> {
        0..self.servers.len() as u8
    }

    /// Records that server `server` holds `h` (found by asking).
    pub fn learn(&self, h: u64, server: u8) {
        self.book().record(&[Piece {
            first: h,
            count: 1,
            slots: Slots::one(server, None),
            stripes: None,
            wanted: 1,
        }]);
    }

    /// Frees copies nothing else ever named (a batch that did not move,
    /// pages that stayed local, copies replaced by newer ones), directly on
    /// their servers.
    pub fn discard(
        &self,
        remotes: &mut Remotes,
        handles: &[u64],
        deadline: Instant,
    ) -> Result<(), ClientError> {
        let (by_server, _freeing) = self.forget(handles);
        self.free_dead(remotes, &by_server, deadline)
    }

    /// The last frees of a store that goes away (a region dropped after
    /// its space could not be retired whole): `handles` and every free a
    /// server still owes, asked of each server but a gone one, failing or
    /// not, within `deadline`. Nothing is owed any more: a store that is
    /// dropped has no one left to pay later, so a server suspected for one
    /// late answer would keep these pages for good.
    pub fn discard_final(
        &self,
        remotes: &mut Remotes,
        handles: &[u64],
        deadline: Instant,
    ) -> Result<(), ClientError> {
        let (by, _freeing) = self.forget(handles);
        let mut by: BTreeMap<u8, Vec<u64>> = by.into_iter().collect();
        {
            let mut book = self.book();
            for (server, owed) in std::mem::take(&mut book.owed) {
                by.entry(server).or_default().extend(owed);
            }
            book.owed_due.clear();
            book.owed_backoff.clear();
        }
        let by: Vec<(u8, Vec<u64>)> = by.into_iter().collect();
        self.free_now(remotes, &by, deadline, false)
    }

    /// Frees copies. In a cluster, through invalidations of the handle
    /// spaces (one per space per call), falling back to freeing on the
    /// servers directly. Returns how many went through the control plane.
    pub fn release(
        &self,
        remotes: &mut Remotes,
        handles: &[u64],
        deadline: Instant,
    ) -> Result<usize, ClientError> {
        let Some(link) = &self.link else {
            self.discard(remotes, handles, deadline)?;
            return Ok(0);
        };
        let mut sorted = handles.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        // Off the book first: a drain moving one of these runs then knows
        // to free the copy it writes, whenever the invalidation lands.
        // Handles the book does not know are freed as asked.
        let (servers, _freeing) = self.forget_pages(&sorted);
        fail::fail_point!("release-forgotten");
        let sorted: Vec<u64> = servers.keys().copied().collect();
        let mut invalidated = 0;
        let mut direct: BTreeMap<u8, Vec<u64>> = BTreeMap::new();
        // The copies of `hs` on servers whose member is not in `acked`
        // (all of them if the invalidation failed) are freed directly.
        let members: BTreeMap<u8, u64> = {
            let book = self.book();
            book.grants.iter().map(|g| (g.server, g.member)).collect()
        };
        let mut fall_back = |hs: &[u64], acked: Option<&BTreeSet<u64>>| {
            let mut all = 0;
            for h in hs {
                let mut freed = true;
                for &s in servers.get(h).into_iter().flatten() {
                    let member = members.get(&s);
                    if !acked.is_some_and(|a| member.is_some_and(|m| a.contains(m))) {
                        direct.entry(s).or_default().push(*h);
                        freed = false;
                    }
                }
                all += usize::from(freed);
            }
            all
        };
        for space in std::iter::once(&link.space).chain(&link.older) {
            let mine: Vec<u64> = sorted
                .iter()
                .copied()
                .filter(|&h| space.contains(h))
                .collect();
            if mine.is_empty() {
                continue;
            }
            // Who freed every chunk: a member missing from one is asked
            // for all of them directly (a second free is harmless).
            let mut acked: Option<BTreeSet<u64>> = None;
            for c in space.spans(&mine).chunks(4097) {
                let Some(a) = link.cluster.invalidate_acked(&space.name, c) else {
                    acked = Some(BTreeSet::new());
                    break;
                };
                let a: BTreeSet<u64> = a.into_iter().collect();
                acked = Some(match acked {
                    None => a,
                    Some(before) => before.intersection(&a).copied().collect(),
                });
            }
            invalidated += fall_back(&mine, acked.as_ref());
        }
        // A handle of no space this member registered is not expected;
        // free it where the book said it was.
        let strays: Vec<u64> = sorted
            .iter()
            .copied()
            .filter(|&h| !link.space.contains(h) && !link.older.iter().any(|s| s.contains(h)))
            .collect();
        fall_back(&strays, None);
        let direct: Vec<(u8, Vec<u64>)> = direct.into_iter().collect();
        self.free_dead(remotes, &direct, deadline)?;
        Ok(invalidated)
    }

    /// Takes `handles` off the book: the pages that lets go (the handles'
    /// copies, or the pages of stripes that died whole; a data page of a
    /// live stripe stays), each with its servers (none: the book did not
    /// know it), and a guard naming them as freeing until it is dropped,
    /// once their frees are sent.
    fn forget_pages(&self, handles: &[u64]) -> (BTreeMap<u64, Vec<u8>>, Freeing<'_>) {
        let mut freed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut book = self.book();
        let mut forgotten = Vec::new();
        for &h in handles {
            match book.forget(h) {
                Some(f) => {
                    forgotten.push(h);
                    for (h, s) in f.pages(h) {
                        freed.entry(h).or_default().push(s);
                    }
                }
                None => {
                    freed.entry(h).or_default();
                }
            }
        }
        self.journal(&mut book, |j, _| j.freed(&forgotten));
        book.moves += 1;
        let token = book.moves;
        book.freeing.push((token, freed.keys().copied().collect()));
        drop(book);
        if let Some(seal) = self.servers.seal() {
            seal.forget(freed.keys().copied());
        }
        (freed, Freeing { homes: self, token })
    }

    /// Takes handles off the book, grouped by their server (unknown ones
    /// are dropped: nothing says where they are, unless one server holds
    /// everything), and the guard of their frees.
    fn forget(&self, handles: &[u64]) -> (Vec<(u8, Vec<u64>)>, Freeing<'_>) {
        let single = self.link.is_none() && self.servers.len() == 1;
        let (freed, freeing) = self.forget_pages(handles);
        let mut by: BTreeMap<u8, Vec<u64>> = BTreeMap::new();
        for (h, servers) in freed {
            if servers.is_empty() && single {
                by.entry(0).or_default().push(h);
            }
            for s in servers {
                by.entry(s).or_default().push(h);
            }
        }
        (by.into_iter().collect(), freeing)
    }

    /// Frees copies of live handles on their servers (a drain's old or
    /// unused copies): a server that fails is not asked again later, as
    /// the handle may be placed there again meanwhile.
    pub(crate) fn free_direct(
        &self,
        remotes: &mut Remotes,
        by_server: &[(u8, Vec<u64>)],
        deadline: Instant,
    ) -> Result<(), ClientError> {
        self.free_now(remotes, by_server, deadline, false)
    }

    /// Frees copies of handles off the book for good (freed, discarded,
    /// never recorded): what a failing server cannot take now it owes,
    /// paid once it answers again. Pays what is due first.
    pub(crate) fn free_dead(
        &self,
        remotes: &mut Remotes,
        by_server: &[(u8, Vec<u64>)],
        deadline: Instant,
    ) -> Result<(), ClientError> {
        self.pay_owed(remotes, deadline);
        self.free_now(remotes, by_server, deadline, true)
    }

    /// Frees on each server its handles. With `owe` (handles off the
    /// book), a server found failing is not waited for, and what it or a
    /// server that does not answer could not take is owed.
    fn free_now(
        &self,
        remotes: &mut Remotes,
        by_server: &[(u8, Vec<u64>)],
        deadline: Instant,
        owe: bool,
    ) -> Result<(), ClientError> {
        let mut first_err = None;
        let now = Instant::now();
        for (server, handles) in by_server {
            if handles.is_empty() {
                continue;
            }
            let (gone, failing) = {
                let book = self.book();
                (
                    book.gone.contains(server),
                    self.redundant() && book.is_suspect(*server, now),
                )
            };
            // A gone server frees its stale copies when it comes back.
            if gone {
                continue;
            }
            // Handles off the book: a failing server is not waited for,
            // it owes them. A live handle's copy (a drain's) is asked of
            // it anyway, within the deadline: that free cannot be owed,
            // and a slow server (suspected for one late answer) would
            // otherwise keep it for good.
            if failing && owe {
                self.owe(*server, handles);
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
                if e.is_retryable() {
                    // Dead handles only: no copy of them is ever written
                    // again, so a late free cannot hit a live one.
                    if owe {
                        self.owe(*server, handles);
                    }
                    self.failed(*server, &e);
                }
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Records frees `server` owes (at most [`MAX_OWED`] a server: past
    /// that, the oldest leak until the space retires); they are not tried
    /// before [`OWED_RETRY`] has passed.
    fn owe(&self, server: u8, handles: &[u64]) {
        let mut book = self.book();
        book.owed_due
            .entry(server)
            .or_insert_with(|| Instant::now() + OWED_RETRY);
        self.add_owed(&mut book, server, handles.to_vec(), false);
    }

    /// Adds `handles` to the frees `server` owes, after those owed already
    /// or (`older`: frees that were owed before and failed again) before
    /// them; past [`MAX_OWED`] the oldest are dropped.
    fn add_owed(&self, book: &mut Book, server: u8, mut handles: Vec<u64>, older: bool) {
        let owed = book.owed.entry(server).or_default();
        if older {
            handles.append(owed);
            *owed = handles;
        } else {
            owed.append(&mut handles);
        }
        if owed.len() > MAX_OWED {
            let over = owed.len() - MAX_OWED;
            owed.drain(..over);
            tracing::warn!(server = %self.servers.addr(server), pages = over, "too many frees owed by a failing server: some of its pages leak until this agent's space retires");
        }
    }

    /// [`Self::pay_owed`] on connections of its own, for a background
    /// task: nothing to do (no connection made) unless a free is due.
    pub fn pay_owed_idle(&self) -> usize {
        let now = Instant::now();
        if !self.book().owed_due.values().any(|&t| t <= now) {
            return 0;
        }
        let mut remotes = Remotes::new(self.request_timeout, Duration::ZERO);
        self.pay_owed(&mut remotes, Instant::now() + self.request_timeout)
    }

    /// Pays the frees owed by servers no longer failing whose retry is
    /// due; the pages freed. A server that still does not answer is tried
    /// again after twice as long (at most a minute), so neither a caller
    /// nor the background task waits on it each time. Called before every
    /// free of dead handles, every second for every store of a cluster
    /// member, and by the kernel agent's idle free thread.
    pub fn pay_owed(&self, remotes: &mut Remotes, deadline: Instant) -> usize {
        let now = Instant::now();
        let due: Vec<(u8, Vec<u64>)> = {
            let mut book = self.book();
            if book.owed.is_empty() {
                return 0;
            }
            let ready: Vec<u8> = book
                .owed
                .keys()
                .copied()
                .filter(|s| {
                    !book.is_suspect(*s, now) && book.owed_due.get(s).is_none_or(|&t| t <= now)
                })
                .collect();
            ready
                .into_iter()
                .filter_map(|s| book.owed.remove(&s).map(|hs| (s, hs)))
                .collect()
        };
        if due.is_empty() {
            return 0;
        }
        let mut paid = 0;
        for (server, handles) in due {
            match self.free_now(remotes, &[(server, handles.clone())], deadline, false) {
                Ok(()) => {
                    paid += handles.len();
                    let mut book = self.book();
                    book.owed_due.remove(&server);
                    book.owed_backoff.remove(&server);
                    drop(book);
                    tracing::info!(server = %self.servers.addr(server), pages = handles.len(), "paid the frees a server owed since it failed");
                }
                Err(e) => {
                    tracing::debug!(server = %self.servers.addr(server), error = %e, "a server still owes frees");
                    let mut book = self.book();
                    let backoff = book
                        .owed_backoff
                        .get(&server)
                        .map_or(OWED_RETRY, |b| (*b * 2).min(OWED_RETRY_MAX));
                    book.owed_backoff.insert(server, backoff);
                    book.owed_due.insert(server, Instant::now() + backoff);
                    self.add_owed(&mut book, server, handles, true);
                }
            }
        }
        paid
    }

    /// The kernel agent stops. With no device page left (`module_pages` is
    /// 0) everything is retired and the cluster left; otherwise everything
    /// stays for the next run.
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
        self.retire();
        link.cluster.set_leave_on_drop(true);
    }

    /// Nothing names a handle any more: in a cluster the spaces are
    /// invalidated whole (their servers free what is left) and
    /// unregistered, and the grants returned. True if every server
    /// acknowledged; otherwise the caller frees what it knows of directly.
    pub fn retire(&self) -> bool {
        let Some(link) = &self.link else {
            return false;
        };
        // A drain still running must not record copies after this.
        let ids: Vec<u64> = {
            let book = self.book();
            self.closed.store(true, Ordering::Release);
            book.grants
                .iter()
                .filter(|g| !g.released)
                .map(|g| g.id)
                .collect()
        };
        let mut complete = true;
        for s in std::iter::once(&link.space).chain(&link.older) {
            complete &= retire(&link.cluster, s);
        }
        link.cluster.release_grants(&ids);
        if complete {
            self.forget_capabilities();
        }
        complete
    }

    /// Drops the capabilities of this store's spaces, once nothing of them
    /// is left to free (after [`Self::retire`], and after the direct frees
    /// that follow one that did not complete).
    pub fn forget_capabilities(&self) {
        if let Some(link) = &self.link {
            for s in std::iter::once(&link.space).chain(&link.older) {
                link.cluster.forget_capability(s.interval);
            }
        }
    }

    /// (grants, granted pages, used pages, server members subscribed), for
    /// status and tests.
    pub fn cluster_usage(&self) -> Option<(usize, u64, u64, usize)> {
        self.link.as_ref()?;
        let book = self.book();
        Some((
            book.grants.len(),
            book.grants.iter().map(|g| g.pages).sum(),
            book.grants.iter().map(|g| g.used).sum(),
            book.subscribed.len(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store on two configured servers no one listens on.
    fn unreachable() -> Arc<Homes> {
        let nowhere = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            let addr = l.local_addr().expect("bound").to_string();
            drop(l);
            let mut c = ClientConfig::new(addr);
            c.connect_timeout = Duration::from_millis(100);
            c.request_timeout = Duration::from_millis(100);
            c
        };
        Homes::for_region(
            Home::Servers(vec![nowhere(), nowhere()]),
            0,
            Duration::from_millis(100),
            Redundancy::Replicas(2),
            false,
        )
        .expect("a store")
    }

    #[test]
    fn a_standalone_kernel_agent_keeps_earlier_epochs_while_the_module_holds_pages() {
        let dir = std::env::temp_dir().join(format!("rmem-epochs-{}", std::process::id()));
        let file = dir.join("handle-epochs");
        let home = || {
            let mut c = ClientConfig::new("127.0.0.1:9");
            c.connect_timeout = Duration::from_millis(100);
            Home::Servers(vec![c])
        };
        let run = |module_pages| {
            Homes::for_agent(
                home(),
                module_pages,
                Some(&dir),
                false,
                Duration::from_millis(100),
                Redundancy::None,
            )
            .expect("a store")
            .base()
        };
        let read = || EpochLog::new(&file).earlier(1).expect("readable");
        // Nothing held: the log restarts with this run.
        let first = run(0);
        assert_eq!(read(), vec![first]);
        // Held pages: every earlier run's epoch stays listed (and out of
        // the draw), and this run's is added before any page is stored.
        let second = run(5);
        assert_ne!(second, first);
        assert_eq!(read(), vec![first, second]);
        let third = run(5);
        assert_eq!(read(), vec![first, second, third]);
        // The module emptied: garbage, forgotten.
        let fourth = run(0);
        assert_eq!(read(), vec![fourth]);
        // A log that is not one fails the start instead of being ignored.
        std::fs::write(&file, "not hex\n").expect("written");
        let err = Homes::for_agent(
            home(),
            1,
            Some(&dir),
            false,
            Duration::from_millis(100),
            Redundancy::None,
        )
        .expect_err("a garbled log");
        assert!(err.to_string().contains("handle-epochs"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_frees_of_handles_off_the_book_are_owed() {
        let homes = unreachable();
        let mut remotes = Remotes::new(Duration::from_millis(100), Duration::ZERO);
        let soon = || Instant::now() + Duration::from_millis(300);
        // A drain's old copy of a live handle: never owed (a later move
        // may put the handle there again, and a late free would kill it).
        assert!(
            homes
                .free_direct(&mut remotes, &[(0, vec![1, 2])], soon())
                .is_err()
        );
        assert!(homes.book().owed.is_empty());
        // Handles off the book: owed until the server takes them.
        assert!(
            homes
                .free_dead(&mut remotes, &[(1, vec![7])], soon())
                .is_err()
        );
        assert_eq!(homes.book().owed.get(&1), Some(&vec![7]));
        // Not due yet (and the server is suspect): nothing is tried.
        assert_eq!(homes.pay_owed(&mut remotes, soon()), 0);
        assert_eq!(homes.book().owed.get(&1), Some(&vec![7]));
        // Declared gone: it frees its stale copies when it comes back.
        homes.book().gone.insert(1);
        homes.book().owed.clear();
        assert!(
            homes
                .free_dead(&mut remotes, &[(1, vec![8])], soon())
                .is_ok()
        );
        assert!(homes.book().owed.is_empty());
    }

    #[test]
    fn owed_frees_that_fail_again_stay_oldest_and_bounded() {
        let homes = unreachable();
        let mut remotes = Remotes::new(Duration::from_millis(100), Duration::ZERO);
        homes.owe(0, &[1, 2]);
        {
            let mut book = homes.book();
            // Due now, and the server not suspect: the payer tries it.
            book.owed_due.insert(0, Instant::now());
            book.suspects.clear();
        }
        homes.owe(0, &[3]);
        let soon = Instant::now() + Duration::from_millis(300);
        assert_eq!(homes.pay_owed(&mut remotes, soon), 0);
        homes.owe(0, &[4]);
        assert_eq!(homes.book().owed.get(&0), Some(&vec![1, 2, 3, 4]));
        assert!(homes.book().owed_due[&0] > Instant::now(), "backed off");
        // Past the bound, the oldest go, whichever way they came back.
        let many: Vec<u64> = (10..10 + MAX_OWED as u64).collect();
        homes.owe(0, &many);
        let mut book = homes.book();
        let owed = &book.owed[&0];
        assert_eq!((owed.len(), owed[0]), (MAX_OWED, 10));
        let again = std::mem::take(book.owed.get_mut(&0).unwrap());
        homes.add_owed(&mut book, 0, again, true);
        assert_eq!(book.owed[&0].len(), MAX_OWED);
    }
}

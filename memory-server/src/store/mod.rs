//! The page store: a [`pool::Pool`] of slots grouped into per-tenant
//! extents, an index from (tenant, handle) to slot, and per-tenant
//! quotas.
//!
//! A PUT never overwrites a published page in place: it fills a fresh slot,
//! publishes it in the index (the newest sequence number wins a race), and
//! only then frees the slot it replaced. A reader copies a page while holding
//! its index entry's shard lock, so a slot cannot be freed and reused under
//! it. The result: a GET returns either the old or the new contents of a
//! page, never a mix and never another page's bytes.
//!
//! Every slot a tenant's page lives in belongs to an extent
//! ([`EXTENT_PAGES`] slots) owned by one *holder* of that tenant alone,
//! so the RDMA transport can register one memory region per holder and
//! extent. A holder is the tenant itself (its id) or, for a client whose
//! certificate names an agent, that agent within the tenant
//! ([`Store::holder`]): an agent's PUTs fill extents of its own, so an
//! RDMA key handed to one agent never reaches another agent's pages, even
//! of its tenant. Quotas and the index stay per tenant; a page written by
//! one holder and replaced by another moves to the writer's extents (a PUT
//! always fills a fresh slot). Pages reloaded from a pool file after a
//! restart are all in their tenants' own extents; an agent's LOCATE of one
//! moves it into the agent's ([`Store::adopt`]). A
//! consequence: a tenant's partly filled extents are not usable by other
//! tenants, so a PUT gets [`PageStatus::NoSpace`] when the tenant's own
//! extents are full and no free extent is left (not even another tenant's
//! cached empty one), although other tenants' extents may still have free
//! slots. The capacity a tenant can reach is rounded to whole extents.
//!
//! # Lock order
//!
//! 1. An index shard lock (inside the `DashMap`): held by a GET while it
//!    copies a page and by a PUT or FREE while it publishes or unpublishes
//!    one. Nothing else is locked while it is held: PUT and FREE drop the
//!    index entry before they give a slot back.
//! 2. A tenant's allocation lock (one mutex per tenant, in
//!    `extent::Extents`): held for a few bitmap and set updates while
//!    taking or giving back a slot. Never two tenants' at once, and never
//!    while page data is copied.
//! 3. The shared-extent lock: taken alone.
//!
//! The global pool of free extents is a lock-free queue. The
//! [`ExtentListener`] is called with no lock held, after the extent has left
//! its tenant and before it is pushed to the global pool.

mod extent;
pub mod layout;
pub mod pool;
pub mod tenant;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use rmem_proto::wire::{Page, PageStatus, page_crc};

pub use self::extent::{EXTENT_PAGES, ExtentListener};
use self::extent::{Extents, Stray, extent_of};
pub use self::layout::ClusterView;
use self::layout::{SlotEntry, Superblock};
use self::pool::Pool;
pub use self::tenant::Tenant;

/// How the store keeps pages across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory: pages are gone when the process exits.
    Anonymous,
    /// A file: pages survive a restart.
    File(PathBuf),
}

/// What a store is opened with.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub capacity_pages: u32,
    pub backing: Backing,
    /// Flush each stored page to the file before acknowledging it.
    pub sync_writes: bool,
    /// Commit an anonymous pool's memory at start.
    pub prefault: bool,
}

/// A tenant definition handed to [`Store::open`].
#[derive(Debug, Clone)]
pub struct TenantSpec {
    pub id: u32,
    pub name: String,
    pub token: Option<Vec<u8>>,
    pub quota_pages: Option<u64>,
}

/// Why a store could not be opened, flushed or configured.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot map an anonymous pool of {pages} pages")]
    MapAnonymous {
        pages: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open pool file {path}")]
    OpenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pool file {path} holds {file_pages} pages but the configured capacity is {configured_pages} pages; set the capacity to match or use a new file"
    )]
    CapacityMismatch {
        path: PathBuf,
        file_pages: u32,
        configured_pages: u32,
    },
    #[error("cannot flush the pool file")]
    Flush(#[source] std::io::Error),
    #[error("an extent listener is already set")]
    ListenerAlreadySet,
}

/// What an open found in a pool file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    pub created: bool,
    pub clean_shutdown: bool,
    pub pages_recovered: u64,
    pub stale_duplicates: u64,
    pub corrupt_dropped: u64,
    /// Pages moved out of an extent that held several tenants' pages (a
    /// pool file written before extents existed).
    pub relocated: u64,
    /// Extents left holding several tenants' pages for want of room to move
    /// them; they are never registered for RDMA.
    pub shared_extents: u64,
}

/// Where a stored page is, for a one-sided RDMA READ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub slot: u32,
    /// The extent holding `slot`.
    pub extent: u32,
    /// CRC32C of the page's data.
    pub crc: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    tenant: u32,
    handle: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    slot: u32,
    seq: u64,
    crc: u32,
}

type Index = DashMap<Key, Slot, foldhash::fast::RandomState>;

/// First id of an agent's holder; a tenant's own holder has its id.
pub const AGENT_HOLDERS: u32 = 1 << 31;
/// Most agent holders a server keeps (each holds at least one extent
/// while it has pages here); past it, agents write to their tenant's.
pub const MAX_AGENT_HOLDERS: u32 = 1 << 16;

/// The page store shared by every connection.
#[derive(Debug)]
pub struct Store {
    pool: Pool,
    index: Index,
    extents: Extents,
    /// Agents' holders by (tenant id, agent name), and the next id.
    holders: DashMap<(u32, Box<str>), u32, foldhash::fast::RandomState>,
    next_holder: std::sync::atomic::AtomicU32,
    tenants: HashMap<u32, Arc<Tenant>>,
    /// See [`Store::checksum_failures`].
    checksum_failures: [std::sync::atomic::AtomicU64; 2],
    /// See [`Store::adopted`].
    adopted: AtomicU64,
    by_name: HashMap<String, Arc<Tenant>>,
    seq: AtomicU64,
    server_id: u64,
    sync_writes: bool,
    recovery: Recovery,
    /// Which cluster the stored pages belong to (kept in the pool file
    /// when there is one); see `crate::membership`.
    view: std::sync::Mutex<Option<ClusterView>>,
    /// Whether the coordinator of the current registration does not know
    /// the stored pages (runtime only; set by `crate::membership`).
    coordinator_unknown: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Opens a store, rebuilding the index from a pool file if there is one.
    pub fn open(opts: &StoreOptions, tenants: &[TenantSpec]) -> Result<Self, StoreError> {
        let fresh_id: u64 = rand::random();
        let (pool, server_id, recovery_base, clean) = match &opts.backing {
            Backing::Anonymous => {
                let pool =
                    Pool::anonymous(opts.capacity_pages, opts.prefault).map_err(|source| {
                        StoreError::MapAnonymous {
                            pages: opts.capacity_pages,
                            source,
                        }
                    })?;
                (pool, fresh_id, Recovery::default(), true)
            }
            Backing::File(path) => {
                let opened =
                    Pool::open_file(path, opts.capacity_pages, fresh_id).map_err(|source| {
                        StoreError::OpenFile {
                            path: path.clone(),
                            source,
                        }
                    })?;
                if opened.superblock.slots != opts.capacity_pages {
                    return Err(StoreError::CapacityMismatch {
                        path: path.clone(),
                        file_pages: opened.superblock.slots,
                        configured_pages: opts.capacity_pages,
                    });
                }
                let sb = opened.superblock;
                // Mark the file dirty while we run; an orderly close marks it
                // clean again after a full flush.
                opened
                    .pool
                    .write_superblock(&Superblock { clean: false, ..sb })
                    .map_err(StoreError::Flush)?;
                let recovery = Recovery {
                    created: opened.created,
                    clean_shutdown: sb.clean,
                    ..Recovery::default()
                };
                (opened.pool, sb.server_id, recovery, sb.clean)
            }
        };

        let mut tenant_map = HashMap::new();
        let mut by_name = HashMap::new();
        for t in tenants {
            let tenant = Arc::new(Tenant::new(
                t.id,
                t.name.clone(),
                t.token.clone(),
                t.quota_pages.unwrap_or(u64::MAX),
            ));
            tenant_map.insert(t.id, tenant.clone());
            by_name.insert(t.name.clone(), tenant);
        }

        let (extents, _) = Extents::new(pool.slots(), tenant_map.keys().copied(), Vec::new());
        let mut store = Self {
            extents,
            holders: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            next_holder: std::sync::atomic::AtomicU32::new(0),
            pool,
            index: Index::with_hasher(foldhash::fast::RandomState::default()),
            tenants: tenant_map,
            checksum_failures: Default::default(),
            adopted: AtomicU64::new(0),
            by_name,
            seq: AtomicU64::new(1),
            server_id,
            sync_writes: opts.sync_writes,
            recovery: recovery_base,
            view: std::sync::Mutex::new(None),
            coordinator_unknown: std::sync::atomic::AtomicBool::new(false),
        };
        *store.view.get_mut().unwrap_or_else(|e| e.into_inner()) = store.pool.read_view();
        if store.pool.persistent() {
            store.rebuild(!clean)?;
        }
        Ok(store)
    }

    /// Rebuilds the index from the slot table. With `verify`, every live
    /// page is checked against its checksum (after an unclean shutdown).
    /// Each extent goes to the tenant owning most of its pages; the other
    /// tenants' pages in it are moved out (see [`Store::relocate`]).
    fn rebuild(&mut self, verify: bool) -> Result<(), StoreError> {
        let mut max_seq = 0;
        let mut stale = Vec::new();
        for slot in 0..self.pool.slots() {
            // SAFETY: open is single-threaded; nothing else touches the pool.
            let raw = unsafe { self.pool.read_entry(slot) };
            let Some(e) = SlotEntry::decode(&raw) else {
                continue;
            };
            // SAFETY: as above, no concurrent access during open.
            if verify && page_crc(unsafe { self.pool.page(slot) }) != e.crc {
                self.recovery.corrupt_dropped += 1;
                stale.push(slot);
                continue;
            }
            max_seq = max_seq.max(e.seq);
            let key = Key {
                tenant: e.tenant,
                handle: e.handle,
            };
            let new = Slot {
                slot,
                seq: e.seq,
                crc: e.crc,
            };
            match self.index.entry(key) {
                Entry::Vacant(v) => {
                    v.insert(new);
                }
                Entry::Occupied(mut o) => {
                    self.recovery.stale_duplicates += 1;
                    if o.get().seq < e.seq {
                        stale.push(o.get().slot);
                        o.insert(new);
                    } else {
                        stale.push(slot);
                    }
                }
            }
        }
        for slot in stale {
            // SAFETY: the slot is not in the index; open is single-threaded.
            unsafe { self.pool.write_entry(slot, &[0; layout::ENTRY_LEN]) };
        }
        let mut live = Vec::with_capacity(self.index.len());
        for item in self.index.iter() {
            let tenant = item.key().tenant;
            live.push((item.value().slot, tenant));
            self.tenants
                .entry(tenant)
                .or_insert_with(|| {
                    // Pages of a tenant no longer configured are kept (never
                    // lost) but nobody can log in as it.
                    Arc::new(Tenant::new(
                        tenant,
                        format!("unconfigured-{tenant}"),
                        Some(rand::random::<[u8; 32]>().to_vec()),
                        u64::MAX,
                    ))
                })
                .force_reserve();
        }
        let (extents, strays) = Extents::new(self.pool.slots(), self.tenants.keys().copied(), live);
        self.extents = extents;
        self.recovery.pages_recovered = self.index.len() as u64;
        self.seq.store(max_seq + 1, Ordering::Relaxed);
        self.relocate(strays)?;
        self.recovery.shared_extents = self.extents.shared_count();
        Ok(())
    }

    /// Moves each stray page (one found in an extent given to another
    /// tenant) into a slot of its own tenant's extents, in the crash-safe
    /// order: the data and the new entry (with a newer sequence number) are
    /// written and flushed, then the old entry is cleared. A page with no
    /// room to go stays where it is and its extent is marked shared.
    fn relocate(&mut self, strays: Vec<Stray>) -> Result<(), StoreError> {
        let mut moved = Vec::new();
        for Stray { slot, tenant } in strays {
            let extent = extent_of(slot);
            if self.extents.is_shared(extent) {
                continue;
            }
            // SAFETY: open is single-threaded; nothing else touches the pool.
            let raw = unsafe { self.pool.read_entry(slot) };
            let Some(old) = SlotEntry::decode(&raw) else {
                continue;
            };
            let Some(to) = self.extents.alloc(tenant) else {
                tracing::error!(
                    extent,
                    tenant,
                    "no room to move a page out of another tenant's extent: the extent stays shared and is never registered for RDMA"
                );
                self.extents.share(extent);
                continue;
            };
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            // SAFETY: `slot` is live and nothing writes it during open.
            let page = unsafe { self.pool.page(slot) };
            // SAFETY: `to` was just allocated, is not published, and differs
            // from `slot`; open is single-threaded.
            unsafe { self.pool.write_page(to, page) };
            let entry = SlotEntry { seq, ..old };
            // SAFETY: as above, `to` is owned exclusively.
            unsafe { self.pool.write_entry(to, &entry.encode()) };
            let key = Key {
                tenant: old.tenant,
                handle: old.handle,
            };
            let new = Slot {
                slot: to,
                seq,
                crc: old.crc,
            };
            moved.push((key, slot, new));
        }
        if moved.is_empty() {
            return Ok(());
        }
        // Every copy is in the file before any original's entry is cleared.
        self.pool.flush().map_err(StoreError::Flush)?;
        for &(key, from, new) in &moved {
            self.index.insert(key, new);
            self.release_slot(from);
        }
        self.recovery.relocated = moved.len() as u64;
        Ok(())
    }

    /// The tenant with this name.
    pub fn tenant(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.by_name.get(name)
    }

    /// Handles of every page stored for `tenant`, sorted (a snapshot: pages
    /// stored or freed meanwhile may or may not appear).
    pub fn handles(&self, tenant: &Tenant) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .index
            .iter()
            .filter(|e| e.key().tenant == tenant.id)
            .map(|e| e.key().handle)
            .collect();
        out.sort_unstable();
        out
    }

    /// Frees every page of `tenant` with a handle in `first..first + n`;
    /// returns how many were stored. The work is bounded by the smaller of
    /// the range and the tenant's stored pages: a huge range (a whole
    /// region unmapped) scans the index instead of probing every handle.
    pub fn free_range(&self, tenant: &Tenant, first: u64, n: u64) -> u64 {
        let end = first.saturating_add(n);
        let handles: Vec<u64> = if n <= tenant.used() {
            (first..end).collect()
        } else {
            self.index
                .iter()
                .filter(|e| e.key().tenant == tenant.id && (first..end).contains(&e.key().handle))
                .map(|e| e.key().handle)
                .collect()
        };
        handles
            .into_iter()
            .filter(|&h| self.free(tenant, h) == PageStatus::Ok)
            .count() as u64
    }

    /// Every tenant, including unconfigured ones found in a pool file.
    pub fn tenants(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.tenants.values()
    }

    /// Random identity of this pool.
    pub fn server_id(&self) -> u64 {
        self.server_id
    }

    /// Number of page slots.
    pub fn capacity_pages(&self) -> u64 {
        u64::from(self.pool.slots())
    }

    /// Pages refused because their data did not match their CRC, and
    /// stored pages that failed theirs when read, since start.
    pub fn checksum_failures(&self) -> (u64, u64) {
        let [received, stored] = &self.checksum_failures;
        (
            received.load(std::sync::atomic::Ordering::Relaxed),
            stored.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Number of slots in use.
    pub fn used_pages(&self) -> u64 {
        self.extents.used()
    }

    /// Number of extents ([`EXTENT_PAGES`] slots each, the last one possibly
    /// shorter).
    pub fn extent_count(&self) -> u32 {
        self.extents.count()
    }

    /// The tenant id owning `extent`: every page in it is that tenant's.
    /// `None` for an unowned extent, or a shared one (several tenants' pages
    /// left by an old pool file) that must never be registered for RDMA.
    pub fn extent_owner(&self, extent: u32) -> Option<u32> {
        self.extents.owner(extent)
    }

    /// Runs `f` with `extent`'s page data (address, length) if `tenant`
    /// owns the extent, which cannot change hands until `f` returns: the
    /// RDMA transport registers a tenant's memory region inside it, so a
    /// region is never registered for an extent another tenant holds.
    /// `None` when the tenant does not own the extent.
    pub fn while_owned<R>(
        &self,
        tenant: u32,
        extent: u32,
        f: impl FnOnce(*mut u8, usize) -> R,
    ) -> Option<R> {
        if extent >= self.extents.count() {
            return None;
        }
        self.extents.while_owned(tenant, extent, || {
            let (ptr, len) = self.pool.extent_memory(extent);
            f(ptr, len)
        })
    }

    /// Number of extents `tenant`'s holders own, the one empty extent each
    /// may keep cached included.
    pub fn tenant_extents(&self, tenant: &Tenant) -> u64 {
        let agents: u64 = self
            .holders
            .iter()
            .filter(|e| e.key().0 == tenant.id)
            .map(|e| self.extents.owned_by(*e.value()))
            .sum();
        self.extents.owned_by(tenant.id) + agents
    }

    /// The holder whose extents take the pages agent `agent` of `tenant`
    /// writes (made on first use): its own, so an RDMA key it is handed
    /// reaches its pages only. Past [`MAX_AGENT_HOLDERS`] the tenant's.
    pub fn holder(&self, tenant: &Tenant, agent: &str) -> u32 {
        let key = (tenant.id, Box::<str>::from(agent));
        if let Some(id) = self.holders.get(&key) {
            return *id;
        }
        match self.holders.entry(key) {
            dashmap::mapref::entry::Entry::Occupied(e) => *e.get(),
            dashmap::mapref::entry::Entry::Vacant(e) => {
                // A tenant id found in an old pool file may lie in the
                // agents' range: skipped.
                let id = loop {
                    let n = self.next_holder.fetch_add(1, Ordering::Relaxed);
                    if n >= MAX_AGENT_HOLDERS {
                        self.next_holder.store(MAX_AGENT_HOLDERS, Ordering::Relaxed);
                        tracing::warn!(tenant = %tenant.name, agent, "too many agent holders: this agent's pages share its tenant's extents");
                        return tenant.id;
                    }
                    if !self.tenants.contains_key(&(AGENT_HOLDERS + n)) {
                        break AGENT_HOLDERS + n;
                    }
                };
                self.extents.add_holder(id);
                e.insert(id);
                id
            }
        }
    }

    /// Number of agent holders.
    pub fn agent_holders(&self) -> usize {
        self.holders.len()
    }

    /// Address and length of `extent`'s page data in the mapping, to
    /// register as an RDMA memory region. See [`Pool::extent_memory`].
    ///
    /// # Panics
    /// If `extent` is not below [`Store::extent_count`].
    pub fn extent_memory(&self, extent: u32) -> (*mut u8, usize) {
        self.pool.extent_memory(extent)
    }

    /// Address of `slot`'s data, the remote address of an RDMA READ of it.
    ///
    /// # Panics
    /// If `slot` is not below [`Store::capacity_pages`].
    pub fn slot_addr(&self, slot: u32) -> u64 {
        self.pool.slot_addr(slot)
    }

    /// Sets the listener told when an extent leaves a tenant; once, after
    /// open. Releases before it is set are not reported.
    pub fn set_extent_listener(&self, listener: Arc<dyn ExtentListener>) -> Result<(), StoreError> {
        if self.extents.set_listener(listener) {
            Ok(())
        } else {
            Err(StoreError::ListenerAlreadySet)
        }
    }

    /// Where `tenant`'s page `handle` is stored right now. A snapshot: the
    /// page may be replaced or freed (and its slot reused by the same
    /// tenant) as soon as this returns, so a one-sided reader must check the
    /// data against `crc`.
    pub fn locate(&self, tenant: &Tenant, handle: u64) -> Option<Located> {
        let key = Key {
            tenant: tenant.id,
            handle,
        };
        let entry = self.index.get(&key)?;
        Some(Located {
            slot: entry.slot,
            extent: extent_of(entry.slot),
            crc: entry.crc,
        })
    }

    /// Where `tenant`'s page `handle` is, moved first into the extents of
    /// `holder` (an agent's, see [`Store::holder`]) when it lies in an
    /// extent of the tenant's own holder or in a shared one: after a
    /// restart every reloaded page is there, and without this an agent
    /// could reach its own pages over TCP only. A page in another agent's
    /// extent stays where it is (the caller then serves it over TCP). The
    /// copy keeps the page's sequence number and is published only if the
    /// index still names the slot copied, so a PUT or FREE racing with it
    /// wins; after a crash between the copy and the old slot's release,
    /// the open keeps one of the two identical entries. `None` if the page
    /// is not stored. The caller has checked that `holder` may use
    /// `handle`.
    pub fn adopt(&self, tenant: &Tenant, holder: u32, handle: u64) -> Option<Located> {
        let found = self.locate(tenant, handle)?;
        let from = self.extents.owner(found.extent);
        let adoptable = from == Some(tenant.id) || self.extents.is_shared(found.extent);
        if holder == tenant.id || from == Some(holder) || !adoptable {
            return Some(found);
        }
        let Some(to) = self.extents.alloc(holder) else {
            return Some(found);
        };
        let key = Key {
            tenant: tenant.id,
            handle,
        };
        let copied = match self.index.get(&key) {
            Some(e) if e.slot == found.slot => {
                // SAFETY: the slot is published and `e` holds its shard's
                // read lock, which any unpublish must wait for.
                let page = unsafe { self.pool.page(e.slot) };
                // A page failing its checksum stays where it is: a GET
                // reports it corrupt there.
                (page_crc(page) == e.crc).then(|| {
                    // SAFETY: `to` was just allocated, is not published and
                    // differs from `e.slot`, so this thread owns it.
                    unsafe { self.pool.write_page(to, page) };
                    *e
                })
            }
            _ => None,
        };
        let Some(old) = copied else {
            self.release_slot(to);
            return self.locate(tenant, handle);
        };
        if self.pool.persistent() {
            let entry = SlotEntry {
                tenant: tenant.id,
                handle,
                seq: old.seq,
                crc: old.crc,
            };
            // SAFETY: `to` is still unpublished and owned by this thread.
            unsafe { self.pool.write_entry(to, &entry.encode()) };
            if self.sync_writes
                && let Err(e) = self.pool.flush_slot(to)
            {
                tracing::error!(error = %e, slot = to, "cannot flush an adopted page to the pool file: left where it was");
                self.release_slot(to);
                return Some(found);
            }
        }
        let published = match self.index.get_mut(&key) {
            Some(mut e) if e.slot == old.slot => {
                *e = Slot { slot: to, ..old };
                true
            }
            _ => false,
        };
        if published {
            self.release_slot(old.slot);
            self.adopted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.release_slot(to);
        }
        self.locate(tenant, handle)
    }

    /// Pages moved into an agent's extents by [`Store::adopt`] since start.
    pub fn adopted(&self) -> u64 {
        self.adopted.load(Ordering::Relaxed)
    }

    /// Whether pages survive a restart.
    pub fn persistent(&self) -> bool {
        self.pool.persistent()
    }

    /// Whether each PUT is flushed to the pool file before it returns.
    pub fn syncs_writes(&self) -> bool {
        self.sync_writes
    }

    /// What opening the pool found.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// Stores one page. The page is visible to GETs once this returns
    /// [`PageStatus::Ok`]; until then any earlier version stays visible.
    pub fn put(&self, tenant: &Tenant, handle: u64, crc: u32, data: &Page) -> PageStatus {
        self.put_held(tenant, tenant.id, handle, crc, data)
    }

    /// [`Store::put`] into the extents of `holder` (one of `tenant`'s,
    /// see [`Store::holder`]).
    pub fn put_held(
        &self,
        tenant: &Tenant,
        holder: u32,
        handle: u64,
        crc: u32,
        data: &Page,
    ) -> PageStatus {
        if page_crc(data) != crc {
            self.checksum_failures[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return PageStatus::BadChecksum;
        }
        let key = Key {
            tenant: tenant.id,
            handle,
        };
        // An overwrite does not grow usage, so a tenant at its quota may
        // still replace its own pages.
        let reserved = tenant.try_reserve();
        if !reserved && !self.index.contains_key(&key) {
            return PageStatus::QuotaExceeded;
        }
        let Some(slot) = self.extents.alloc(holder) else {
            if reserved {
                tenant.release();
            }
            return PageStatus::NoSpace;
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `slot` was just allocated and is not published, so this
        // thread owns it exclusively.
        unsafe { self.pool.write_page(slot, data) };
        if self.pool.persistent() {
            let entry = SlotEntry {
                tenant: tenant.id,
                handle,
                seq,
                crc,
            };
            // SAFETY: as above, the slot is owned exclusively until published.
            unsafe { self.pool.write_entry(slot, &entry.encode()) };
        }
        let new = Slot { slot, seq, crc };
        let replaced = match self.index.entry(key) {
            Entry::Vacant(v) => {
                if !reserved {
                    // The page we meant to replace was freed meanwhile and
                    // the quota is full: this PUT would exceed it.
                    drop(v);
                    self.release_slot(slot);
                    return PageStatus::QuotaExceeded;
                }
                v.insert(new);
                None
            }
            Entry::Occupied(mut o) => {
                if o.get().seq < seq {
                    Some(o.insert(new).slot)
                } else {
                    // A newer PUT of the same page won the race.
                    Some(slot)
                }
            }
        };
        if let Some(old) = replaced {
            self.release_slot(old);
            if reserved {
                tenant.release();
            }
        }
        if self.sync_writes
            && let Err(e) = self.pool.flush_slot(slot)
        {
            tracing::error!(error = %e, slot, "cannot flush page to the pool file");
        }
        PageStatus::Ok
    }

    /// Copies a page out: `out` is called with the page's checksum and bytes
    /// while the page cannot change. A page whose bytes no longer match its
    /// checksum is reported [`PageStatus::Corrupt`] and not served.
    pub fn get(&self, tenant: &Tenant, handle: u64, out: impl FnOnce(u32, &Page)) -> PageStatus {
        let key = Key {
            tenant: tenant.id,
            handle,
        };
        let Some(entry) = self.index.get(&key) else {
            return PageStatus::NotFound;
        };
        // SAFETY: the slot is published and `entry` holds its shard's read
        // lock, which any unpublish (write lock) must wait for.
        let page = unsafe { self.pool.page(entry.slot) };
        if page_crc(page) != entry.crc {
            tracing::error!(
                tenant = tenant.id,
                handle,
                slot = entry.slot,
                "stored page failed its checksum"
            );
            self.checksum_failures[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return PageStatus::Corrupt;
        }
        out(entry.crc, page);
        PageStatus::Ok
    }

    /// Frees a page.
    pub fn free(&self, tenant: &Tenant, handle: u64) -> PageStatus {
        let key = Key {
            tenant: tenant.id,
            handle,
        };
        match self.index.remove(&key) {
            Some((_, slot)) => {
                self.release_slot(slot.slot);
                tenant.release();
                PageStatus::Ok
            }
            None => PageStatus::NotFound,
        }
    }

    /// Gives an unpublished slot back to its extent, clearing its entry
    /// first so a crash cannot resurrect it.
    fn release_slot(&self, slot: u32) {
        // SAFETY: the slot has just been unpublished (or never was); no
        // reader of the store can reach it and this thread owns it.
        unsafe { self.pool.poison(slot) };
        if self.pool.persistent() {
            // SAFETY: the slot has just been unpublished (or never was); no
            // reader can reach it and this thread is its only owner.
            unsafe { self.pool.write_entry(slot, &[0; layout::ENTRY_LEN]) };
        }
        self.extents.release(slot);
    }

    /// The cluster the stored pages belong to, if one was recorded.
    pub fn cluster_view(&self) -> Option<ClusterView> {
        *self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the cluster the stored pages belong to (in the pool file
    /// first, when there is one).
    pub fn set_cluster_view(&self, view: ClusterView) -> Result<(), StoreError> {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        if *v == Some(view) {
            return Ok(());
        }
        // Held in memory even when the file cannot take it: this run keeps
        // judging coordinators against it.
        *v = Some(view);
        self.pool.write_view(&view).map_err(StoreError::Flush)
    }

    /// Whether the current coordinator does not know the stored pages.
    pub fn coordinator_unknown(&self) -> bool {
        self.coordinator_unknown.load(Ordering::Acquire)
    }

    pub fn set_coordinator_unknown(&self, unknown: bool) {
        self.coordinator_unknown.store(unknown, Ordering::Release);
    }

    /// Flushes a file-backed pool and marks it cleanly closed. Call once no
    /// more requests are served.
    pub fn close(&self) -> Result<(), StoreError> {
        if !self.pool.persistent() {
            return Ok(());
        }
        self.pool.flush().map_err(StoreError::Flush)?;
        self.pool
            .write_superblock(&Superblock {
                slots: self.pool.slots(),
                server_id: self.server_id,
                clean: true,
            })
            .map_err(StoreError::Flush)
    }
}

#[cfg(test)]
mod tests;

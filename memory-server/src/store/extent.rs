//! Extents: the pool's slots in runs of [`EXTENT_PAGES`], each run owned by
//! one tenant at a time, so every tenant's pages live in memory that holds
//! nothing else (an RDMA memory region registered for one tenant then never
//! exposes another tenant's pages).
//!
//! - Slot `s` belongs to extent `s / EXTENT_PAGES`; the last extent is
//!   shorter when the capacity is not a multiple of [`EXTENT_PAGES`].
//! - Unowned extents wait in a global pool (a lock-free queue). A tenant
//!   takes one only when none of its own extents has a free slot; it fills
//!   its partly used extents first, lowest-numbered first, so its pages stay
//!   packed.
//! - An extent whose last page is freed goes back to the global pool, except
//!   that each tenant keeps at most one empty extent (its *spare*), so a
//!   tenant alternating one PUT and one FREE does not take and return an
//!   extent every time. When the global pool is empty, a tenant that needs an
//!   extent takes another tenant's spare.
//! - Before an extent stops being owned by a tenant, the [`ExtentListener`]
//!   hears of it (the RDMA transport deregisters the tenant's memory region
//!   there); only afterwards can another tenant get it.
//! - A *shared* extent holds pages of several tenants: only a pool file
//!   written before extents existed can leave one, when opening it found no
//!   room to move the pages out (see `Store::open`). Nobody allocates from a
//!   shared extent and [`Extents::owner`] is `None` for it, so it is never
//!   registered for RDMA; once its last page is freed it returns to the
//!   global pool.
//!
//! Locks: each tenant's [`Holdings`] sit behind their own mutex, held only
//! for bit and set updates (and, in [`Extents::while_owned`], for the
//! RDMA registration of one of its extents); no two tenant locks are ever held at once (taking
//! another tenant's spare drops the caller's lock first). The shared-extent
//! map has its own mutex, taken alone. The listener is called with no lock
//! held.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};

use crossbeam_queue::ArrayQueue;

/// Slots per extent: 2 MiB of page data.
pub const EXTENT_PAGES: u32 = 512;

const WORDS: usize = (EXTENT_PAGES / 64) as usize;
const _: () = assert!(
    EXTENT_PAGES.is_multiple_of(64),
    "free-slot bitmaps use whole words"
);

/// Hears when an extent leaves a tenant.
///
/// The call is made with no store lock held (it may call back into the
/// store), by the request that freed the extent's last page or that takes
/// another tenant's spare, which waits for it: keep it short. Nothing is
/// announced when a tenant takes an extent; ask [`super::Store::extent_owner`].
pub trait ExtentListener: Send + Sync + std::fmt::Debug {
    /// `extent` stops being owned by `tenant`; called before any other tenant
    /// can get it.
    fn extent_released(&self, tenant: u32, extent: u32);
}

/// The extent that holds `slot`.
pub fn extent_of(slot: u32) -> u32 {
    slot / EXTENT_PAGES
}

/// Number of extents of a pool of `slots` slots.
pub fn extent_count(slots: u32) -> u32 {
    slots.div_ceil(EXTENT_PAGES)
}

/// Number of slots in `extent` of a pool of `slots` slots (0 past the end).
pub fn extent_len(slots: u32, extent: u32) -> u32 {
    let first = u64::from(extent) * u64::from(EXTENT_PAGES);
    (u64::from(slots).saturating_sub(first)).min(u64::from(EXTENT_PAGES)) as u32
}

/// Who holds an extent, as stored in [`Extents::owner`]'s atomic words: a
/// tenant id, or one of these two values (tenant ids are 32-bit).
const UNOWNED: u64 = u64::MAX;
const SHARED: u64 = u64::MAX - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Unowned,
    Shared,
    Tenant(u32),
}

impl Owner {
    fn decode(word: u64) -> Self {
        match word {
            UNOWNED => Self::Unowned,
            SHARED => Self::Shared,
            t => Self::Tenant(t as u32),
        }
    }
}

/// The free slots of one extent: a bitmap (bit set = free).
#[derive(Debug, Clone)]
struct FreeSlots {
    bits: [u64; WORDS],
    free: u32,
    len: u32,
}

impl FreeSlots {
    fn all_free(len: u32) -> Self {
        let mut bits = [0u64; WORDS];
        for (i, word) in bits.iter_mut().enumerate() {
            let from = i as u32 * 64;
            *word = match len.saturating_sub(from) {
                0 => 0,
                n if n >= 64 => u64::MAX,
                n => (1u64 << n) - 1,
            };
        }
        Self {
            bits,
            free: len,
            len,
        }
    }

    /// Takes the lowest free slot; its offset in the extent.
    fn take(&mut self) -> Option<u32> {
        let (i, word) = self.bits.iter_mut().enumerate().find(|(_, w)| **w != 0)?;
        let bit = word.trailing_zeros();
        *word &= !(1u64 << bit);
        self.free -= 1;
        Some(i as u32 * 64 + bit)
    }

    // `claim` and `give` branch on the bit's old value on purpose. Written
    // as `self.free += u32::from(was_used)` after an unconditional `|=`,
    // rustc 1.95 at opt-level 2 and 3 dropped the counter update once
    // `Holdings::give` was inlined around it (the `bool as u32` miscompile,
    // rust-lang/rust#158206): released slots were never counted free again
    // and a tenant's extents looked full for ever. tests/run.sh runs the
    // store's tests optimised too, to catch that kind of miscompile here.

    /// Marks the slot at `offset` used (recovery).
    fn claim(&mut self, offset: u32) {
        let (word, mask) = Self::locate(offset);
        if self.bits[word] & mask != 0 {
            self.bits[word] &= !mask;
            self.free -= 1;
        }
    }

    /// Marks the slot at `offset` free; false if it already was.
    fn give(&mut self, offset: u32) -> bool {
        let (word, mask) = Self::locate(offset);
        if self.bits[word] & mask != 0 {
            return false;
        }
        self.bits[word] |= mask;
        self.free += 1;
        true
    }

    fn locate(offset: u32) -> (usize, u64) {
        ((offset / 64) as usize, 1u64 << (offset % 64))
    }

    fn used(&self) -> u32 {
        self.len - self.free
    }
}

/// What freeing a slot did to its tenant's extents.
#[derive(Debug, PartialEq, Eq)]
enum Gave {
    /// The extent is still the tenant's.
    Kept,
    /// The extent became empty and the tenant already keeps a spare: it
    /// leaves the tenant.
    Emptied(u32),
    /// The tenant does not own the slot (a bookkeeping bug).
    NotOwned,
}

/// One tenant's extents. Every owned extent is exactly one of: full (in no
/// set), partly used (in `partial`), or empty (the `spare`; at most one).
#[derive(Debug, Default)]
struct Holdings {
    owned: HashMap<u32, FreeSlots, foldhash::fast::RandomState>,
    partial: BTreeSet<u32>,
    spare: Option<u32>,
}

impl Holdings {
    /// A free slot of an owned extent: the lowest partly used extent first,
    /// then the spare.
    fn take(&mut self) -> Option<u32> {
        let extent = self.partial.first().copied().or(self.spare)?;
        let slots = self.owned.get_mut(&extent)?;
        let offset = slots.take()?;
        let full = slots.free == 0;
        if self.spare == Some(extent) {
            self.spare = None;
            if !full {
                self.partial.insert(extent);
            }
        } else if full {
            self.partial.remove(&extent);
        }
        Some(extent * EXTENT_PAGES + offset)
    }

    /// Takes `extent` (all slots free) as the spare; hands it back when a
    /// spare is already kept.
    fn adopt(&mut self, extent: u32, len: u32) -> Result<(), u32> {
        if self.spare.is_some() {
            return Err(extent);
        }
        self.owned.insert(extent, FreeSlots::all_free(len));
        self.spare = Some(extent);
        Ok(())
    }

    /// Takes a recovered extent that has used slots.
    fn adopt_recovered(&mut self, extent: u32, slots: FreeSlots) {
        if slots.free > 0 {
            self.partial.insert(extent);
        }
        self.owned.insert(extent, slots);
    }

    /// Frees `slot`.
    fn give(&mut self, slot: u32) -> Gave {
        let extent = extent_of(slot);
        let Some(slots) = self.owned.get_mut(&extent) else {
            return Gave::NotOwned;
        };
        let was_full = slots.free == 0;
        if !slots.give(slot % EXTENT_PAGES) {
            return Gave::NotOwned;
        }
        if slots.used() > 0 {
            if was_full {
                self.partial.insert(extent);
            }
            return Gave::Kept;
        }
        self.partial.remove(&extent);
        if self.spare.is_none() {
            self.spare = Some(extent);
            return Gave::Kept;
        }
        self.owned.remove(&extent);
        Gave::Emptied(extent)
    }

    /// Gives up the spare.
    fn take_spare(&mut self) -> Option<u32> {
        let extent = self.spare.take()?;
        self.owned.remove(&extent);
        Some(extent)
    }

    /// Checks that every owned extent is in exactly the set its free count
    /// says and that each bitmap agrees with its count.
    #[cfg(test)]
    fn check(&self) -> Result<(), String> {
        for (&e, s) in &self.owned {
            let bits: u32 = s.bits.iter().map(|w| w.count_ones()).sum();
            if bits != s.free {
                return Err(format!(
                    "extent {e}: {bits} free bits, free count {}",
                    s.free
                ));
            }
            let listed = (self.partial.contains(&e), self.spare == Some(e));
            let expect = match s.free {
                0 => (false, false),
                f if f == s.len => (false, true),
                _ => (true, false),
            };
            if listed != expect {
                return Err(format!(
                    "extent {e} with {} of {} free: (partial, spare) {listed:?}",
                    s.free, s.len
                ));
            }
        }
        match self.partial.iter().find(|e| !self.owned.contains_key(e)) {
            Some(e) => Err(format!("partial extent {e} is not owned")),
            None => Ok(()),
        }
    }

    /// Gives up `extent` whatever it holds; its slot bitmap.
    fn surrender(&mut self, extent: u32) -> Option<FreeSlots> {
        self.partial.remove(&extent);
        if self.spare == Some(extent) {
            self.spare = None;
        }
        self.owned.remove(&extent)
    }
}

/// A page found in a recovered pool inside an extent given to another
/// tenant: the caller moves it to an extent of its own tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stray {
    pub slot: u32,
    pub tenant: u32,
}

/// The slot allocator: which tenant owns each extent and which slots are
/// free.
#[derive(Debug)]
pub struct Extents {
    slots: u32,
    /// Per extent: a tenant id, [`UNOWNED`] or [`SHARED`]. Changed only by
    /// the owning tenant's lock holder (or the shared lock holder), read
    /// without a lock.
    owner: Box<[AtomicU64]>,
    /// Unowned extents.
    free: ArrayQueue<u32>,
    /// Every holder's extents, by holder id: a tenant's (its id), and
    /// agents' of their own, added as they say HELLO (see
    /// `Store::holder`); never removed.
    holders: RwLock<HashMap<u32, Arc<Mutex<Holdings>>, foldhash::fast::RandomState>>,
    /// Shared extents and how many of their slots are still used.
    shared: Mutex<HashMap<u32, u32>>,
    used: AtomicU64,
    listener: OnceLock<Arc<dyn ExtentListener>>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked
/// (every critical section here is a few updates that do not panic).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Logs a broken bookkeeping invariant (and stops a debug build).
fn inconsistent(slot: u32, what: &'static str) {
    tracing::error!(slot, what, "extent bookkeeping is inconsistent");
    if cfg!(debug_assertions) {
        panic!("extent bookkeeping is inconsistent at slot {slot}: {what}");
    }
}

impl Extents {
    /// The allocator of a pool of `slots` slots for `tenants`, where `live`
    /// lists the slots already in use and their tenants (empty for a new
    /// pool). Each extent with used slots goes to the tenant with most of
    /// them (the lower id on a tie); the other tenants' slots in it are
    /// returned as strays, still counted as used.
    pub fn new(
        slots: u32,
        tenants: impl IntoIterator<Item = u32>,
        mut live: Vec<(u32, u32)>,
    ) -> (Self, Vec<Stray>) {
        let n = extent_count(slots);
        let mut tenant_map: HashMap<u32, Arc<Mutex<Holdings>>, _> = HashMap::default();
        for id in tenants.into_iter().chain(live.iter().map(|&(_, t)| t)) {
            tenant_map.entry(id).or_default();
        }
        let this = Self {
            slots,
            owner: (0..n).map(|_| AtomicU64::new(UNOWNED)).collect(),
            free: ArrayQueue::new(n.max(1) as usize),
            holders: RwLock::new(tenant_map),
            shared: Mutex::new(HashMap::new()),
            used: AtomicU64::new(live.len() as u64),
            listener: OnceLock::new(),
        };
        live.sort_unstable();
        let mut strays = Vec::new();
        let mut rest = live.as_slice();
        for extent in 0..n {
            let split = rest.partition_point(|&(s, _)| extent_of(s) == extent);
            let (here, after) = rest.split_at(split);
            rest = after;
            if here.is_empty() {
                this.push_free(extent);
                continue;
            }
            let owner = majority(here);
            let mut free = FreeSlots::all_free(this.extent_len(extent));
            for &(slot, tenant) in here {
                free.claim(slot % EXTENT_PAGES);
                if tenant != owner {
                    strays.push(Stray { slot, tenant });
                }
            }
            this.owner[extent as usize].store(u64::from(owner), Ordering::Release);
            let holdings = this
                .holdings(owner)
                .expect("every live tenant has holdings");
            lock(&holdings).adopt_recovered(extent, free);
        }
        (this, strays)
    }

    fn extent_len(&self, extent: u32) -> u32 {
        extent_len(self.slots, extent)
    }

    /// The extents of holder `id`, if it is known.
    fn holdings(&self, id: u32) -> Option<Arc<Mutex<Holdings>>> {
        self.holders
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// Adds holder `id` (nothing if it is known).
    pub fn add_holder(&self, id: u32) {
        self.holders
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id)
            .or_default();
    }

    fn set_owner(&self, extent: u32, owner: u64) {
        self.owner[extent as usize].store(owner, Ordering::Release);
    }

    fn push_free(&self, extent: u32) {
        if self.free.push(extent).is_err() {
            // The queue holds every extent, so it is never full.
            inconsistent(extent * EXTENT_PAGES, "free extent queue overflow");
        }
    }

    /// Sets the listener; false when one was already set (it stays).
    pub fn set_listener(&self, listener: Arc<dyn ExtentListener>) -> bool {
        self.listener.set(listener).is_ok()
    }

    fn released(&self, tenant: u32, extent: u32) {
        if let Some(l) = self.listener.get() {
            l.extent_released(tenant, extent);
        }
    }

    /// Takes a free slot in an extent owned by `tenant`, taking a new extent
    /// if none of its own has room. `None` when no extent is left (or the
    /// tenant is unknown).
    pub fn alloc(&self, tenant: u32) -> Option<u32> {
        let holdings = self.holdings(tenant)?;
        let holdings = &*holdings;
        let mut h = lock(holdings);
        let slot = match h.take() {
            Some(slot) => slot,
            None => {
                let extent = match self.free.pop() {
                    Some(extent) => extent,
                    None => {
                        drop(h);
                        let extent = self.reclaim_spare(tenant)?;
                        h = lock(holdings);
                        extent
                    }
                };
                self.adopt(&mut h, tenant, extent);
                h.take()?
            }
        };
        drop(h);
        self.used.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }

    /// Makes an unowned extent `tenant`'s spare (or returns it to the global
    /// pool if the tenant got a spare meanwhile).
    fn adopt(&self, h: &mut Holdings, tenant: u32, extent: u32) {
        match h.adopt(extent, self.extent_len(extent)) {
            Ok(()) => self.set_owner(extent, u64::from(tenant)),
            Err(extent) => self.push_free(extent),
        }
    }

    /// With the global pool empty: takes another tenant's spare for
    /// `thief`, telling the listener first. Called with no lock held.
    fn reclaim_spare(&self, thief: u32) -> Option<u32> {
        let all: Vec<(u32, Arc<Mutex<Holdings>>)> = self
            .holders
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(&id, h)| (id, h.clone()))
            .collect();
        for (id, holdings) in all {
            if id == thief {
                continue;
            }
            let taken = {
                let mut h = lock(&holdings);
                let extent = h.take_spare();
                if let Some(extent) = extent {
                    self.set_owner(extent, UNOWNED);
                }
                extent
            };
            if let Some(extent) = taken {
                self.released(id, extent);
                return Some(extent);
            }
        }
        // An extent may have been returned while we looked.
        self.free.pop()
    }

    /// Frees a used slot. An extent left empty goes back to the global pool
    /// unless it becomes its tenant's spare.
    pub fn release(&self, slot: u32) {
        let extent = extent_of(slot);
        let Some(word) = self.owner.get(extent as usize) else {
            inconsistent(slot, "slot out of range");
            return;
        };
        // A used slot keeps its extent from changing hands, so the owner
        // read here stays valid until the slot is given back below.
        match Owner::decode(word.load(Ordering::Acquire)) {
            Owner::Tenant(tenant) => {
                let Some(holdings) = self.holdings(tenant) else {
                    inconsistent(slot, "extent owned by an unknown tenant");
                    return;
                };
                let gave = {
                    let mut h = lock(&holdings);
                    let gave = h.give(slot);
                    if let Gave::Emptied(extent) = gave {
                        self.set_owner(extent, UNOWNED);
                    }
                    gave
                };
                match gave {
                    Gave::Kept => {}
                    Gave::Emptied(extent) => {
                        self.released(tenant, extent);
                        self.push_free(extent);
                    }
                    Gave::NotOwned => {
                        inconsistent(slot, "freed a slot that was not in use");
                        return;
                    }
                }
            }
            Owner::Shared => {
                if !self.release_shared(extent) {
                    inconsistent(slot, "freed a slot of a drained shared extent");
                    return;
                }
            }
            Owner::Unowned => {
                inconsistent(slot, "freed a slot of an unowned extent");
                return;
            }
        }
        self.used.fetch_sub(1, Ordering::Relaxed);
    }

    /// Frees a slot of a shared extent; the extent returns to the global
    /// pool once empty (no listener call: it was never one tenant's).
    fn release_shared(&self, extent: u32) -> bool {
        let drained = {
            let mut shared = lock(&self.shared);
            let Some(live) = shared.get_mut(&extent) else {
                return false;
            };
            *live -= 1;
            let drained = *live == 0;
            if drained {
                shared.remove(&extent);
                self.set_owner(extent, UNOWNED);
            }
            drained
        };
        if drained {
            self.push_free(extent);
        }
        true
    }

    /// Takes `extent` away from its owner and marks it shared: no slot of it
    /// is handed out again and it is never one tenant's. Used while opening
    /// a pool, when a stray page cannot be moved out.
    pub fn share(&self, extent: u32) {
        let Some(word) = self.owner.get(extent as usize) else {
            return;
        };
        let Owner::Tenant(tenant) = Owner::decode(word.load(Ordering::Acquire)) else {
            return;
        };
        let Some(slots) = self
            .holdings(tenant)
            .and_then(|h| lock(&h).surrender(extent))
        else {
            return;
        };
        self.set_owner(extent, SHARED);
        lock(&self.shared).insert(extent, slots.used());
    }

    /// The tenant owning `extent`; `None` for an unowned or shared extent.
    pub fn owner(&self, extent: u32) -> Option<u32> {
        match Owner::decode(self.owner.get(extent as usize)?.load(Ordering::Acquire)) {
            Owner::Tenant(t) => Some(t),
            Owner::Unowned | Owner::Shared => None,
        }
    }

    /// Runs `f` if `tenant` owns `extent`, holding the tenant's lock so
    /// the extent cannot leave it meanwhile (its release takes that lock to
    /// change the owner, and tells the listener only after). `None` when
    /// the tenant does not own it.
    pub fn while_owned<R>(&self, tenant: u32, extent: u32, f: impl FnOnce() -> R) -> Option<R> {
        let holdings = self.holdings(tenant)?;
        let _h = lock(&holdings);
        (self.owner(extent) == Some(tenant)).then(f)
    }

    /// Whether `extent` holds pages of several tenants.
    pub fn is_shared(&self, extent: u32) -> bool {
        self.owner
            .get(extent as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) == SHARED)
    }

    /// Number of shared extents.
    pub fn shared_count(&self) -> u64 {
        lock(&self.shared).len() as u64
    }

    /// Number of extents `tenant` owns, its spare included.
    pub fn owned_by(&self, tenant: u32) -> u64 {
        self.holdings(tenant)
            .map_or(0, |h| lock(&h).owned.len() as u64)
    }

    /// Number of slots in use.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Number of extents.
    pub fn count(&self) -> u32 {
        self.owner.len() as u32
    }
}

/// The tenant with most slots in `here` (sorted by slot), the lower id on a
/// tie.
fn majority(here: &[(u32, u32)]) -> u32 {
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for &(_, tenant) in here {
        *counts.entry(tenant).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(tenant, n)| (n, std::cmp::Reverse(tenant)))
        .map_or(0, |(tenant, _)| tenant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn check(x: &Extents, tenant: u32) {
        if let Err(e) = lock(&x.holdings(tenant).expect("a known tenant")).check() {
            panic!("tenant {tenant}: {e}");
        }
    }

    /// The kernel agent's first steps: one extent filled and emptied, then
    /// filled again and one page more. Slots freed out of a full extent
    /// must count as free again (a miscompile once lost that count, in
    /// release builds only).
    #[test]
    fn a_full_extent_emptied_and_refilled_keeps_its_count() {
        let (x, _) = Extents::new(EXTENT_PAGES * 4, [0], Vec::new());
        let first: Vec<u32> = (0..EXTENT_PAGES).map(|_| x.alloc(0).unwrap()).collect();
        check(&x, 0);
        for s in first {
            x.release(s);
            check(&x, 0);
        }
        for _ in 0..=EXTENT_PAGES {
            x.alloc(0).expect("a slot");
            check(&x, 0);
        }
        assert_eq!(x.used(), u64::from(EXTENT_PAGES) + 1);
        assert_eq!(x.owned_by(0), 2);
    }

    /// Random allocations and frees of one tenant, interleaved in every
    /// proportion; the holdings stay consistent after each step.
    #[test]
    fn random_allocations_and_frees_keep_the_holdings_consistent() {
        for seed in 0..64u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (x, _) = Extents::new(EXTENT_PAGES * 4 - 100, [0], Vec::new());
            let mut live = Vec::new();
            let grow = rng.random_range(1..10);
            for _ in 0..6_000 {
                if live.is_empty() || rng.random_range(0..10) < grow {
                    match x.alloc(0) {
                        Some(s) => live.push(s),
                        None => assert_eq!(live.len() as u32, EXTENT_PAGES * 4 - 100),
                    }
                } else {
                    let s = live.swap_remove(rng.random_range(0..live.len()));
                    x.release(s);
                }
                check(&x, 0);
            }
            assert_eq!(x.used(), live.len() as u64);
        }
    }
}

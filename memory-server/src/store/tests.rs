//! Store tests: semantics, quotas, races, and recovery of a pool file.

use super::*;
use rmem_proto::wire::PAGE_SIZE;
use std::sync::Barrier;

fn page_of(tag: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for (i, chunk) in p.chunks_exact_mut(8).enumerate() {
        chunk
            .copy_from_slice(&(tag ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
    }
    p
}

fn tenants() -> Vec<TenantSpec> {
    vec![
        TenantSpec {
            id: 1,
            name: "a".into(),
            token: None,
            quota_pages: None,
        },
        TenantSpec {
            id: 2,
            name: "b".into(),
            token: Some(b"tok".to_vec()),
            quota_pages: Some(3),
        },
    ]
}

fn anon(pages: u32) -> Store {
    anon_with(pages, &tenants())
}

fn anon_with(pages: u32, specs: &[TenantSpec]) -> Store {
    Store::open(
        &StoreOptions {
            capacity_pages: pages,
            backing: Backing::Anonymous,
            sync_writes: false,
            prefault: false,
        },
        specs,
    )
    .unwrap()
}

fn get(store: &Store, t: &Tenant, h: u64) -> Result<Page, PageStatus> {
    let mut out = [0u8; PAGE_SIZE];
    match store.get(t, h, |_, p| out.copy_from_slice(p)) {
        PageStatus::Ok => Ok(out),
        s => Err(s),
    }
}

fn put(store: &Store, t: &Tenant, h: u64, p: &Page) -> PageStatus {
    store.put(t, h, page_crc(p), p)
}

#[test]
fn put_get_free() {
    let s = anon(16);
    let a = s.tenant("a").unwrap().clone();
    assert_eq!(put(&s, &a, 7, &page_of(7)), PageStatus::Ok);
    assert_eq!(get(&s, &a, 7).unwrap(), page_of(7));
    assert_eq!(s.used_pages(), 1);
    assert_eq!(s.free(&a, 7), PageStatus::Ok);
    assert_eq!(get(&s, &a, 7), Err(PageStatus::NotFound));
    assert_eq!(s.free(&a, 7), PageStatus::NotFound);
    assert_eq!(s.used_pages(), 0);
    assert_eq!(a.used(), 0);
}

#[test]
fn tenants_are_isolated() {
    // One extent per tenant.
    let s = anon(2 * EXTENT_PAGES);
    let a = s.tenant("a").unwrap().clone();
    let b = s.tenant("b").unwrap().clone();
    assert_eq!(put(&s, &a, 1, &page_of(100)), PageStatus::Ok);
    assert_eq!(get(&s, &b, 1), Err(PageStatus::NotFound));
    assert_eq!(put(&s, &b, 1, &page_of(200)), PageStatus::Ok);
    assert_eq!(get(&s, &a, 1).unwrap(), page_of(100));
    assert_eq!(get(&s, &b, 1).unwrap(), page_of(200));
}

#[test]
fn overwrite_replaces_and_keeps_usage() {
    let s = anon(4);
    let a = s.tenant("a").unwrap().clone();
    for v in 0..10 {
        assert_eq!(put(&s, &a, 1, &page_of(v)), PageStatus::Ok);
    }
    assert_eq!(get(&s, &a, 1).unwrap(), page_of(9));
    assert_eq!(s.used_pages(), 1);
    assert_eq!(a.used(), 1);
}

#[test]
fn bad_checksum_stores_nothing() {
    let s = anon(4);
    let a = s.tenant("a").unwrap().clone();
    let p = page_of(1);
    assert_eq!(s.put(&a, 1, page_crc(&p) ^ 1, &p), PageStatus::BadChecksum);
    assert_eq!(get(&s, &a, 1), Err(PageStatus::NotFound));
    assert_eq!(s.used_pages(), 0);
}

#[test]
fn quota_and_capacity_never_overwrite_others() {
    // b takes extent 0; a gets extent 1, two slots long.
    let s = anon(EXTENT_PAGES + 2);
    let a = s.tenant("a").unwrap().clone();
    let b = s.tenant("b").unwrap().clone();
    for h in 0..3 {
        assert_eq!(put(&s, &b, h, &page_of(h)), PageStatus::Ok);
    }
    assert_eq!(put(&s, &b, 3, &page_of(3)), PageStatus::QuotaExceeded);
    // At quota, replacing an existing page still works.
    assert_eq!(put(&s, &b, 0, &page_of(50)), PageStatus::Ok);
    for h in 0..2 {
        assert_eq!(put(&s, &a, h, &page_of(10 + h)), PageStatus::Ok);
    }
    // b's extent has free slots, but they are b's.
    assert_eq!(put(&s, &a, 9, &page_of(9)), PageStatus::NoSpace);
    assert_eq!(a.used(), 2);
    assert_eq!(get(&s, &b, 0).unwrap(), page_of(50));
    assert_eq!(get(&s, &b, 2).unwrap(), page_of(2));
    assert_eq!(get(&s, &a, 1).unwrap(), page_of(11));
    // A full pool still lets a tenant overwrite? It needs a fresh slot, so
    // no: the overwrite is refused and the old page is intact.
    assert_eq!(put(&s, &a, 0, &page_of(77)), PageStatus::NoSpace);
    assert_eq!(get(&s, &a, 0).unwrap(), page_of(10));
}

#[test]
fn racing_writers_and_readers_never_see_mixed_pages() {
    let s = Arc::new(anon(64));
    let a = s.tenant("a").unwrap().clone();
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads * 2));
    let mut joins = Vec::new();
    for t in 0..threads {
        let (ws, wa, wbarrier) = (s.clone(), a.clone(), barrier.clone());
        joins.push(std::thread::spawn(move || {
            let (s, a) = (ws, wa);
            wbarrier.wait();
            for i in 0..5_000u64 {
                let h = i % 8;
                // Every version of page h is page_of(h << 32 | anything).
                let v = (h << 32) | (t as u64 * 1_000_000 + i);
                assert_eq!(put(&s, &a, h, &page_of(v)), PageStatus::Ok);
                if i % 97 == 0 {
                    s.free(&a, h);
                }
            }
        }));
        let (s, a, barrier) = (s.clone(), a.clone(), barrier.clone());
        joins.push(std::thread::spawn(move || {
            barrier.wait();
            for i in 0..20_000u64 {
                let h = i % 8;
                if let Ok(p) = get(&s, &a, h) {
                    let tag = u64::from_le_bytes(p[..8].try_into().unwrap());
                    assert_eq!(tag >> 32, h, "page {h} returned another page's data");
                    assert_eq!(p, page_of(tag), "page {h} is torn");
                }
            }
        }));
    }
    for j in joins {
        j.join().unwrap();
    }
    assert_eq!(s.used_pages(), a.used());
}

fn file_opts(path: &std::path::Path, pages: u32) -> StoreOptions {
    StoreOptions {
        capacity_pages: pages,
        backing: Backing::File(path.to_path_buf()),
        sync_writes: false,
        prefault: false,
    }
}

#[test]
fn file_pool_survives_clean_and_unclean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let id;
    {
        let s = Store::open(&file_opts(&path, 32), &tenants()).unwrap();
        id = s.server_id();
        let a = s.tenant("a").unwrap().clone();
        for h in 0..10 {
            put(&s, &a, h, &page_of(h));
        }
        put(&s, &a, 3, &page_of(333));
        s.free(&a, 4);
        s.close().unwrap();
    }
    {
        let s = Store::open(&file_opts(&path, 32), &tenants()).unwrap();
        let r = s.recovery();
        assert!(r.clean_shutdown && !r.created);
        assert_eq!(r.pages_recovered, 9);
        assert_eq!(s.server_id(), id);
        let a = s.tenant("a").unwrap().clone();
        assert_eq!(a.used(), 9);
        assert_eq!(get(&s, &a, 3).unwrap(), page_of(333));
        assert_eq!(get(&s, &a, 4), Err(PageStatus::NotFound));
        put(&s, &a, 20, &page_of(20));
        // No close: an unclean stop.
    }
    let s = Store::open(&file_opts(&path, 32), &tenants()).unwrap();
    assert!(!s.recovery().clean_shutdown);
    let a = s.tenant("a").unwrap().clone();
    assert_eq!(get(&s, &a, 20).unwrap(), page_of(20));
    assert_eq!(s.used_pages(), 10);
    // New pages get sequence numbers above every recovered one.
    put(&s, &a, 20, &page_of(21));
    assert_eq!(get(&s, &a, 20).unwrap(), page_of(21));
}

#[test]
fn unclean_open_drops_corrupt_pages_and_keeps_newest_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    {
        let s = Store::open(&file_opts(&path, 8), &tenants()).unwrap();
        let a = s.tenant("a").unwrap().clone();
        put(&s, &a, 1, &page_of(1));
        put(&s, &a, 2, &page_of(2));
    }
    // Simulate a crash between publishing a new copy of page 2 and clearing
    // the old one: write a second, older entry for handle 2 into a free slot.
    // And corrupt page 1's data.
    let data_off = Superblock::data_offset(8);
    let mut bytes = std::fs::read(&path).unwrap();
    let stale = SlotEntry {
        tenant: 1,
        handle: 2,
        seq: 0,
        crc: page_crc(&page_of(999)),
    };
    let free_slot = 7usize;
    bytes[PAGE_SIZE + free_slot * layout::ENTRY_LEN..][..layout::ENTRY_LEN]
        .copy_from_slice(&stale.encode());
    bytes[data_off + free_slot * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&page_of(999));
    bytes[data_off + 100] ^= 0xff; // slot 0 holds handle 1
    std::fs::write(&path, bytes).unwrap();

    let s = Store::open(&file_opts(&path, 8), &tenants()).unwrap();
    let r = s.recovery();
    assert_eq!(r.corrupt_dropped, 1);
    assert_eq!(r.stale_duplicates, 1);
    let a = s.tenant("a").unwrap().clone();
    assert_eq!(get(&s, &a, 1), Err(PageStatus::NotFound));
    assert_eq!(get(&s, &a, 2).unwrap(), page_of(2));
    assert_eq!(s.used_pages(), 1);
    assert_eq!(a.used(), 1);
}

#[test]
fn file_capacity_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    Store::open(&file_opts(&path, 8), &tenants())
        .unwrap()
        .close()
        .unwrap();
    let err = Store::open(&file_opts(&path, 16), &tenants()).unwrap_err();
    assert!(
        matches!(err, StoreError::CapacityMismatch { file_pages: 8, .. }),
        "{err}"
    );
}

#[test]
fn pages_of_unconfigured_tenants_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    {
        let s = Store::open(&file_opts(&path, 8), &tenants()).unwrap();
        let b = s.tenant("b").unwrap().clone();
        put(&s, &b, 1, &page_of(1));
        s.close().unwrap();
    }
    let s = Store::open(&file_opts(&path, 8), &tenants()[..1]).unwrap();
    assert_eq!(s.used_pages(), 1);
    assert!(s.tenant("b").is_none());
    assert!(s.tenants().any(|t| t.id == 2 && t.used() == 1));
}

#[test]
fn a_prefaulted_pool_is_committed_and_serves_pages() {
    let s = Store::open(
        &StoreOptions {
            capacity_pages: 256,
            backing: Backing::Anonymous,
            sync_writes: false,
            prefault: true,
        },
        &tenants(),
    )
    .unwrap();
    let t = s.tenant("a").unwrap().clone();
    let p = [7u8; PAGE_SIZE];
    assert_eq!(put(&s, &t, 1, &p), PageStatus::Ok);
    assert_eq!(get(&s, &t, 1).unwrap(), p);
}

#[test]
fn free_range_probes_small_ranges_and_scans_for_huge_ones() {
    let s = anon(64);
    let t = s.tenant("a").unwrap().clone();
    let p = [3u8; PAGE_SIZE];
    for h in (1..10).chain([1000]) {
        assert_eq!(put(&s, &t, h, &p), PageStatus::Ok);
    }
    // A range smaller than what is stored: probed handle by handle.
    assert_eq!(s.free_range(&t, 0, 5), 4);
    assert_eq!(get(&s, &t, 4), Err(PageStatus::NotFound));
    assert!(get(&s, &t, 5).is_ok());
    // A range far larger than what is stored: the index is scanned.
    assert_eq!(s.free_range(&t, 0, 1 << 40), 6);
    assert_eq!(t.used(), 0);
    assert_eq!(s.free_range(&t, u64::MAX - 2, 100), 0);
}

// Extents: one tenant per extent.

fn spec(id: u32, name: &str) -> TenantSpec {
    TenantSpec {
        id,
        name: name.into(),
        token: None,
        quota_pages: None,
    }
}

/// Tenants x, y, z (ids 1, 2, 3) without quotas.
fn xyz() -> Vec<TenantSpec> {
    vec![spec(1, "x"), spec(2, "y"), spec(3, "z")]
}

fn tenant(s: &Store, name: &str) -> Arc<Tenant> {
    s.tenant(name).unwrap().clone()
}

/// What a test expects the store to hold: (tenant id, handle) → page tag.
type Model = std::collections::BTreeMap<(u32, u64), u64>;

/// Checks the store against `model`: every page reads back, sits in an
/// extent owned by its tenant, usage counts match, and each tenant owns the
/// extents its pages are in plus at most one empty one.
fn check_extents(s: &Store, tenants: &[Arc<Tenant>], model: &Model) {
    assert_eq!(s.used_pages(), model.len() as u64);
    let mut in_use = vec![std::collections::BTreeSet::new(); tenants.len()];
    for (i, t) in tenants.iter().enumerate() {
        let mine: Vec<_> = model.range((t.id, 0)..=(t.id, u64::MAX)).collect();
        assert_eq!(t.used(), mine.len() as u64, "tenant {}", t.id);
        for (&(_, h), &tag) in mine {
            let loc = s.locate(t, h).unwrap();
            assert_eq!(loc.extent, loc.slot / EXTENT_PAGES);
            assert_eq!(
                s.extent_owner(loc.extent),
                Some(t.id),
                "tenant {} page {h} in extent {} owned by another",
                t.id,
                loc.extent
            );
            let p = get(s, t, h).unwrap();
            assert_eq!(u64::from_le_bytes(p[..8].try_into().unwrap()), tag);
            assert_eq!(page_crc(&p), loc.crc);
            in_use[i].insert(loc.extent);
        }
    }
    let mut owned_total = 0;
    for (i, t) in tenants.iter().enumerate() {
        let owned = (0..s.extent_count())
            .filter(|&e| s.extent_owner(e) == Some(t.id))
            .count() as u64;
        assert_eq!(s.tenant_extents(t), owned, "tenant {}", t.id);
        let with_pages = in_use[i].len() as u64;
        assert!(
            owned == with_pages || owned == with_pages + 1,
            "tenant {} owns {owned} extents, {with_pages} with pages",
            t.id
        );
        owned_total += owned;
    }
    assert!(owned_total <= u64::from(s.extent_count()));
}

/// Puts page `tag` at `h` and records it when stored.
fn model_put(s: &Store, t: &Tenant, h: u64, tag: u64, model: &mut Model) -> PageStatus {
    let status = put(s, t, h, &page_of(tag));
    if status == PageStatus::Ok {
        model.insert((t.id, h), tag);
    }
    status
}

#[test]
fn interleaved_tenants_never_share_an_extent() {
    for n in [2usize, 3] {
        let s = anon_with(6 * EXTENT_PAGES, &xyz());
        let ts: Vec<_> = ["x", "y", "z"][..n].iter().map(|t| tenant(&s, t)).collect();
        let mut model = Model::new();
        for h in 0..700u64 {
            for t in &ts {
                let tag = (u64::from(t.id) << 32) | h;
                assert_eq!(model_put(&s, t, h, tag, &mut model), PageStatus::Ok);
            }
        }
        check_extents(&s, &ts, &model);
        // Free every third page, overwrite every fifth, then refill.
        for h in (0..700u64).step_by(3) {
            for t in &ts {
                assert_eq!(s.free(t, h), PageStatus::Ok);
                model.remove(&(t.id, h));
            }
        }
        for h in (0..700u64).step_by(5) {
            for t in &ts {
                let tag = (u64::from(t.id) << 32) | (h + 1_000_000);
                assert_eq!(model_put(&s, t, h, tag, &mut model), PageStatus::Ok);
            }
        }
        check_extents(&s, &ts, &model);
        for t in &ts {
            // 700 pages or fewer span two extents; the spare may make three.
            assert!(s.tenant_extents(t) <= 3, "{}", s.tenant_extents(t));
        }
    }
}

#[test]
fn empty_extents_return_to_the_pool_keeping_one_spare() {
    #[derive(Debug, Default)]
    struct Log(std::sync::Mutex<Vec<(u32, u32)>>);
    impl ExtentListener for Log {
        fn extent_released(&self, tenant: u32, extent: u32) {
            self.0.lock().unwrap().push((tenant, extent));
        }
    }
    let s = anon_with(3 * EXTENT_PAGES, &xyz());
    let log = Arc::new(Log::default());
    s.set_extent_listener(log.clone()).unwrap();
    assert!(matches!(
        s.set_extent_listener(log.clone()),
        Err(StoreError::ListenerAlreadySet)
    ));
    let (x, y) = (tenant(&s, "x"), tenant(&s, "y"));

    // Alternating one PUT and one FREE keeps the same extent.
    for i in 0..20 {
        assert_eq!(put(&s, &x, 1, &page_of(i)), PageStatus::Ok);
        assert_eq!(s.free(&x, 1), PageStatus::Ok);
        assert_eq!(s.tenant_extents(&x), 1);
    }
    assert!(log.0.lock().unwrap().is_empty());

    // Two extents' worth, then all freed: one goes back, one stays cached.
    let n = u64::from(2 * EXTENT_PAGES);
    for h in 0..n {
        assert_eq!(put(&s, &x, h, &page_of(h)), PageStatus::Ok);
    }
    assert_eq!(s.tenant_extents(&x), 2);
    let spare = s.locate(&x, n - 1).unwrap().extent;
    let first = s.locate(&x, 0).unwrap().extent;
    // Empty the last-filled extent first: it becomes the spare.
    for h in (0..n).rev() {
        assert_eq!(s.free(&x, h), PageStatus::Ok);
    }
    assert_eq!(*log.0.lock().unwrap(), [(x.id, first)]);
    assert_eq!(s.tenant_extents(&x), 1);
    assert_eq!(s.extent_owner(spare), Some(x.id));
    assert_eq!(s.extent_owner(first), None);
    assert_eq!(s.used_pages(), 0);

    // y takes the two free extents, then x's spare, which x gives up first.
    let all = u64::from(3 * EXTENT_PAGES);
    for h in 0..all {
        assert_eq!(put(&s, &y, h, &page_of(h)), PageStatus::Ok, "page {h}");
    }
    assert_eq!(*log.0.lock().unwrap(), [(x.id, first), (x.id, spare)]);
    assert_eq!(s.tenant_extents(&x), 0);
    assert_eq!(s.tenant_extents(&y), 3);
    assert_eq!(put(&s, &y, all, &page_of(0)), PageStatus::NoSpace);
    assert_eq!(put(&s, &x, 0, &page_of(0)), PageStatus::NoSpace);
}

#[test]
fn the_listener_runs_before_another_tenant_can_get_the_extent() {
    /// In the call: the extent is unowned, and a PUT by y (which must not
    /// deadlock: no store lock is held) does not land in it.
    #[derive(Debug)]
    struct Probe {
        store: std::sync::Weak<Store>,
        calls: std::sync::Mutex<Vec<(u32, u32, Option<u32>)>>,
        landed: std::sync::Mutex<Vec<(u32, Option<u32>)>>,
        next: std::sync::atomic::AtomicU64,
    }
    impl ExtentListener for Probe {
        fn extent_released(&self, tenant: u32, extent: u32) {
            let s = self.store.upgrade().unwrap();
            let owner = s.extent_owner(extent);
            self.calls.lock().unwrap().push((tenant, extent, owner));
            let y = s.tenant("y").unwrap().clone();
            let h = 1_000_000 + self.next.fetch_add(1, Ordering::Relaxed);
            let at = (put(&s, &y, h, &page_of(h)) == PageStatus::Ok)
                .then(|| s.locate(&y, h).unwrap().extent);
            self.landed.lock().unwrap().push((extent, at));
        }
    }
    let s = Arc::new(anon_with(2 * EXTENT_PAGES, &xyz()));
    let probe = Arc::new(Probe {
        store: Arc::downgrade(&s),
        calls: Default::default(),
        landed: Default::default(),
        next: Default::default(),
    });
    s.set_extent_listener(probe.clone()).unwrap();
    let x = tenant(&s, "x");
    let n = u64::from(2 * EXTENT_PAGES);
    for h in 0..n {
        assert_eq!(put(&s, &x, h, &page_of(h)), PageStatus::Ok);
    }
    let (e0, e1) = (
        s.locate(&x, 0).unwrap().extent,
        s.locate(&x, n - 1).unwrap().extent,
    );
    // Emptying e1 makes it x's spare; emptying e0 releases it. In that call
    // the global pool is still empty, so y's probe takes x's spare e1 (a
    // nested release, whose own probe finds nothing left).
    for h in (0..n).rev() {
        assert_eq!(s.free(&x, h), PageStatus::Ok);
    }
    assert_eq!(
        *probe.calls.lock().unwrap(),
        [(x.id, e0, None), (x.id, e1, None)]
    );
    assert_eq!(*probe.landed.lock().unwrap(), [(e1, None), (e0, Some(e1))]);
    // Afterwards e0 is free for anyone.
    let y = tenant(&s, "y");
    for h in 0..u64::from(EXTENT_PAGES) {
        assert_eq!(put(&s, &y, h, &page_of(h)), PageStatus::Ok);
    }
    assert_eq!(s.extent_owner(e0), Some(y.id));
}

#[test]
fn a_tenant_that_emptied_a_full_pool_leaves_all_of_it_to_others() {
    // Four extents, the last one ten slots long.
    let cap = 3 * EXTENT_PAGES + 10;
    let s = anon_with(cap, &xyz());
    let (x, y) = (tenant(&s, "x"), tenant(&s, "y"));
    assert_eq!(s.extent_count(), 4);
    for h in 0..u64::from(cap) {
        assert_eq!(put(&s, &x, h, &page_of(h)), PageStatus::Ok);
    }
    assert_eq!(
        put(&s, &x, u64::from(cap), &page_of(0)),
        PageStatus::NoSpace
    );
    assert_eq!(s.used_pages(), u64::from(cap));
    assert_eq!(s.free_range(&x, 0, u64::from(cap)), u64::from(cap));
    assert_eq!(s.tenant_extents(&x), 1);
    let mut model = Model::new();
    for h in 0..u64::from(cap) {
        assert_eq!(model_put(&s, &y, h, h, &mut model), PageStatus::Ok);
    }
    assert_eq!(
        put(&s, &y, u64::from(cap), &page_of(0)),
        PageStatus::NoSpace
    );
    assert_eq!(s.tenant_extents(&x), 0);
    check_extents(&s, &[x, y], &model);
}

#[test]
fn extent_memory_covers_its_slots() {
    let cap = EXTENT_PAGES + 3;
    let s = anon_with(cap, &xyz());
    let (base, len) = s.extent_memory(0);
    assert_eq!(len, EXTENT_PAGES as usize * PAGE_SIZE);
    let (tail, tail_len) = s.extent_memory(1);
    assert_eq!(tail_len, 3 * PAGE_SIZE);
    assert_eq!(tail.addr(), base.addr() + len);
    for slot in [0, 1, EXTENT_PAGES - 1] {
        assert_eq!(
            s.slot_addr(slot),
            (base.addr() + slot as usize * PAGE_SIZE) as u64
        );
    }
    assert_eq!(s.slot_addr(cap - 1), (tail.addr() + 2 * PAGE_SIZE) as u64);
    let x = tenant(&s, "x");
    put(&s, &x, 9, &page_of(9));
    let loc = s.locate(&x, 9).unwrap();
    assert_eq!(loc.crc, page_crc(&page_of(9)));
    assert!(s.locate(&x, 10).is_none());
    assert!(s.locate(&tenant(&s, "y"), 9).is_none());
    assert_eq!(s.extent_owner(7), None);
}

#[test]
fn racing_tenants_stay_in_their_own_extents() {
    let s = Arc::new(anon_with(4 * EXTENT_PAGES, &xyz()));
    let ts: Vec<_> = ["x", "y", "z"].iter().map(|t| tenant(&s, t)).collect();
    let barrier = Arc::new(Barrier::new(6));
    let joins: Vec<_> = (0..6u64)
        .map(|i| {
            let (s, t, barrier) = (s.clone(), ts[i as usize % 3].clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                // Each thread owns handles i * 10^6 + 0..700 of its tenant.
                let base = i * 1_000_000;
                let mut mine = Model::new();
                for round in 0..6u64 {
                    for h in 0..700 {
                        model_put(&s, &t, base + h, base + h + round, &mut mine);
                    }
                    let keep = if round % 2 == 0 { 3 } else { 2 };
                    for h in (0..700).filter(|h| h % keep != 0) {
                        if s.free(&t, base + h) == PageStatus::Ok {
                            mine.remove(&(t.id, base + h));
                        }
                    }
                }
                mine
            })
        })
        .collect();
    let mut model = Model::new();
    for j in joins {
        model.extend(j.join().unwrap());
    }
    check_extents(&s, &ts, &model);
}

mod random_ops {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// PUT handles first..first + n (overwriting those stored).
        Put { tenant: usize, first: u64, n: u64 },
        /// FREE handles first..first + n.
        Free { tenant: usize, first: u64, n: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..3usize, 0..1500u64, 1..700u64);
        prop_oneof![
            range
                .clone()
                .prop_map(|(tenant, first, n)| Op::Put { tenant, first, n }),
            range.prop_map(|(tenant, first, n)| Op::Free { tenant, first, n }),
        ]
    }

    /// A NO_SPACE answer is right only if the tenant's extents are full and
    /// no extent is unowned or another tenant's empty spare.
    fn check_no_space(s: &Store, t: &Tenant, ts: &[Arc<Tenant>], model: &Model) {
        let mut used = vec![0u32; s.extent_count() as usize];
        for &(id, h) in model.keys() {
            let owner = ts.iter().find(|t| t.id == id).unwrap();
            used[s.locate(owner, h).unwrap().extent as usize] += 1;
        }
        for e in 0..s.extent_count() {
            let len = (s.extent_memory(e).1 / PAGE_SIZE) as u32;
            match s.extent_owner(e) {
                None => panic!("NO_SPACE with extent {e} unowned"),
                Some(o) if o == t.id => assert_eq!(used[e as usize], len, "extent {e}"),
                Some(_) => assert!(used[e as usize] > 0, "extent {e} is a spare"),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_puts_and_frees_keep_tenants_apart(ops in prop::collection::vec(op(), 1..40)) {
            // Four whole extents and a short one.
            let s = anon_with(4 * EXTENT_PAGES + 100, &xyz());
            let ts: Vec<_> = ["x", "y", "z"].iter().map(|t| tenant(&s, t)).collect();
            let mut model = Model::new();
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Put { tenant, first, n } => {
                        let t = &ts[tenant];
                        for h in first..first + n {
                            let tag = ((step as u64) << 32) | h;
                            match model_put(&s, t, h, tag, &mut model) {
                                PageStatus::Ok => {}
                                PageStatus::NoSpace => {
                                    check_no_space(&s, t, &ts, &model);
                                    break;
                                }
                                other => panic!("PUT answered {other:?}"),
                            }
                        }
                    }
                    Op::Free { tenant, first, n } => {
                        let t = &ts[tenant];
                        let stored = model.range((t.id, first)..(t.id, first + n)).count();
                        prop_assert_eq!(s.free_range(t, first, n), stored as u64);
                        model.retain(|&(id, h), _| id != t.id || !(first..first + n).contains(&h));
                    }
                }
                check_extents(&s, &ts, &model);
            }
        }
    }
}

// Recovery of file-backed pools.

fn open_file(path: &std::path::Path, pages: u32) -> Store {
    Store::open(&file_opts(path, pages), &xyz()).unwrap()
}

#[test]
fn reopened_pool_gives_each_extent_back_to_its_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let cap = 5 * EXTENT_PAGES;
    let mut model = Model::new();
    let owners: Vec<_>;
    {
        let s = open_file(&path, cap);
        let ts: Vec<_> = ["x", "y", "z"].iter().map(|t| tenant(&s, t)).collect();
        for h in 0..600u64 {
            for t in &ts[..(if h < 300 { 3 } else { 2 })] {
                model_put(&s, t, h, (u64::from(t.id) << 32) | h, &mut model);
            }
        }
        for h in 0..100 {
            assert_eq!(s.free(&ts[0], h), PageStatus::Ok);
            model.remove(&(1, h));
        }
        owners = (0..s.extent_count()).map(|e| s.extent_owner(e)).collect();
        s.close().unwrap();
    }
    let s = open_file(&path, cap);
    let r = s.recovery();
    assert_eq!((r.pages_recovered, r.relocated), (model.len() as u64, 0));
    let ts: Vec<_> = ["x", "y", "z"].iter().map(|t| tenant(&s, t)).collect();
    check_extents(&s, &ts, &model);
    // Extents with pages keep their tenant; nobody kept a spare.
    for e in 0..s.extent_count() {
        let now = s.extent_owner(e);
        assert!(now.is_none() || now == owners[e as usize], "extent {e}");
    }
}

/// Writes a live entry and its data as a pool file from before extents did:
/// any tenant in any slot.
fn write_old_slot(bytes: &mut [u8], slots: u32, slot: u32, e: SlotEntry, data: &Page) {
    let slot = slot as usize;
    bytes[PAGE_SIZE + slot * layout::ENTRY_LEN..][..layout::ENTRY_LEN].copy_from_slice(&e.encode());
    bytes[Superblock::data_offset(slots) + slot * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(data);
}

/// A clean pool file of `slots` slots holding, for each (slot, tenant id,
/// handle), page `page_of(handle ^ tenant << 40)`.
fn old_layout_pool(path: &std::path::Path, slots: u32, pages: &[(u32, u32, u64)]) -> Model {
    open_file(path, slots).close().unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    let mut model = Model::new();
    for (seq, &(slot, tenant, handle)) in pages.iter().enumerate() {
        let tag = handle ^ (u64::from(tenant) << 40);
        let data = page_of(tag);
        let e = SlotEntry {
            tenant,
            handle,
            seq: seq as u64 + 1,
            crc: page_crc(&data),
        };
        write_old_slot(&mut bytes, slots, slot, e, &data);
        model.insert((tenant, handle), tag);
    }
    std::fs::write(path, bytes).unwrap();
    model
}

#[test]
fn mixed_extents_of_an_old_pool_file_are_moved_apart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let cap = 3 * EXTENT_PAGES;
    // Extent 0: x holds 5 pages, y 4, z 1. Extent 1: y holds 2, x 1.
    let owners = [1, 2, 1, 2, 1, 1, 2, 1, 2, 3];
    let mut pages: Vec<_> = (0..10u32)
        .map(|i| (i, owners[i as usize], u64::from(i)))
        .collect();
    let e1 = EXTENT_PAGES;
    pages.extend([(e1, 2, 100), (e1 + 7, 2, 101), (e1 + 9, 1, 102)]);
    let model = old_layout_pool(&path, cap, &pages);
    let majority = |t: u32| pages.iter().filter(|p| p.0 < e1 && p.1 == t).count();
    assert_eq!((majority(1), majority(2), majority(3)), (5, 4, 1));
    {
        let s = open_file(&path, cap);
        let r = s.recovery();
        assert_eq!(r.pages_recovered, 13);
        // y's 4 and z's 1 leave extent 0; x's 1 leaves extent 1.
        assert_eq!((r.relocated, r.shared_extents), (6, 0));
        let ts: Vec<_> = ["x", "y", "z"].iter().map(|t| tenant(&s, t)).collect();
        check_extents(&s, &ts, &model);
        assert_eq!(s.extent_owner(0), Some(1));
        assert_eq!(s.extent_owner(1), Some(2));
        assert_eq!(s.extent_owner(2), Some(3));
        s.close().unwrap();
    }
    // The moves were complete: no duplicate is left behind.
    let s = open_file(&path, cap);
    let r = s.recovery();
    assert_eq!(
        (r.pages_recovered, r.relocated, r.stale_duplicates),
        (13, 0, 0)
    );
    let ts: Vec<_> = ["x", "y", "z"].iter().map(|t| tenant(&s, t)).collect();
    check_extents(&s, &ts, &model);
}

#[test]
fn a_mixed_extent_with_no_room_to_split_stays_shared_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    // One extent of 10 slots: nowhere to move y's pages.
    let model = old_layout_pool(
        &path,
        10,
        &[(0, 1, 5), (3, 1, 6), (4, 2, 7), (9, 2, 8), (5, 1, 9)],
    );
    let s = open_file(&path, 10);
    let r = s.recovery();
    assert_eq!(
        (r.pages_recovered, r.relocated, r.shared_extents),
        (5, 0, 1)
    );
    assert_eq!(s.extent_owner(0), None);
    let (x, y) = (tenant(&s, "x"), tenant(&s, "y"));
    for (&(id, h), &tag) in &model {
        let t = if id == 1 { &x } else { &y };
        assert_eq!(get(&s, t, h).unwrap(), page_of(tag));
    }
    assert_eq!(s.used_pages(), 5);
    // Nobody allocates from a shared extent, not even an overwrite.
    assert_eq!(put(&s, &x, 5, &page_of(1)), PageStatus::NoSpace);
    assert_eq!(get(&s, &x, 5).unwrap(), page_of(model[&(1, 5)]));
    // Once drained it is an ordinary free extent.
    for (id, h) in model.keys() {
        let t = if *id == 1 { &x } else { &y };
        assert_eq!(s.free(t, *h), PageStatus::Ok);
    }
    assert_eq!(s.used_pages(), 0);
    assert_eq!(put(&s, &y, 1, &page_of(1)), PageStatus::Ok);
    assert_eq!(s.extent_owner(0), Some(y.id));
}

/// Freed and replaced slots are poisoned: their old bytes can neither be
/// read by another tenant whose extent they join nor pass a stale
/// reader's checksum.
#[test]
fn freed_and_replaced_slots_are_poisoned() {
    let s = anon_with(2 * EXTENT_PAGES, &xyz());
    let x = tenant(&s, "x");
    let slot_bytes = |slot: u32| {
        let addr = s.slot_addr(slot) as *const u8;
        // SAFETY: the slot is inside the live pool mapping; the test is
        // single-threaded, so nothing writes it meanwhile.
        unsafe { std::slice::from_raw_parts(addr, PAGE_SIZE) }.to_vec()
    };
    assert_eq!(put(&s, &x, 1, &page_of(1)), PageStatus::Ok);
    let first = s.locate(&x, 1).unwrap();
    assert_eq!(slot_bytes(first.slot), page_of(1));
    // Overwritten: the new copy is elsewhere, the old slot is poison.
    assert_eq!(put(&s, &x, 1, &page_of(2)), PageStatus::Ok);
    let second = s.locate(&x, 1).unwrap();
    assert_ne!(second.slot, first.slot);
    assert!(slot_bytes(first.slot).iter().all(|&b| b == pool::POISON));
    assert_ne!(page_crc(&slot_bytes(first.slot)), first.crc);
    // Freed: poison too.
    assert_eq!(s.free(&x, 1), PageStatus::Ok);
    assert!(slot_bytes(second.slot).iter().all(|&b| b == pool::POISON));
    assert_eq!(get(&s, &x, 1), Err(PageStatus::NotFound));
}

/// Agents of one tenant fill extents of their own (an RDMA key of one then
/// never reaches another's pages); quotas and the index stay the tenant's.
#[test]
fn each_agent_of_a_tenant_fills_extents_of_its_own() {
    let s = anon_with(4 * EXTENT_PAGES, &xyz());
    let x = tenant(&s, "x");
    let (a, b) = (s.holder(&x, "node-1/kmod"), s.holder(&x, "node-2/kmod"));
    assert!(a >= AGENT_HOLDERS && b >= AGENT_HOLDERS && a != b);
    assert_eq!(s.holder(&x, "node-1/kmod"), a, "a holder is stable");
    let put_as = |holder: u32, h: u64, tag: u64| {
        let p = page_of(tag);
        s.put_held(&x, holder, h, page_crc(&p), &p)
    };
    assert_eq!(put_as(a, 1, 1), PageStatus::Ok);
    assert_eq!(put_as(b, 2, 2), PageStatus::Ok);
    assert_eq!(put(&s, &x, 3, &page_of(3)), PageStatus::Ok);
    let extent = |h| s.locate(&x, h).unwrap().extent;
    assert_eq!(s.extent_owner(extent(1)), Some(a));
    assert_eq!(s.extent_owner(extent(2)), Some(b));
    assert_eq!(s.extent_owner(extent(3)), Some(x.id));
    assert_eq!(s.tenant_extents(&x), 3);
    assert_eq!(x.used(), 3, "one tenant's pages, whoever wrote them");
    // B rewriting A's page moves it into B's extents; every reader of the
    // tenant still gets it.
    assert_eq!(put_as(b, 1, 11), PageStatus::Ok);
    assert_eq!(s.extent_owner(extent(1)), Some(b));
    assert_eq!(get(&s, &x, 1), Ok(page_of(11)));
    // A's extent, emptied, is its spare; a fourth holder takes the last
    // free extent and a fifth finds none.
    let c = s.holder(&x, "node-3/kmod");
    assert_eq!(put_as(c, 4, 4), PageStatus::Ok);
    let d = s.holder(&x, "node-4/kmod");
    assert_eq!(put_as(d, 5, 5), PageStatus::Ok, "takes A's spare");
    assert_eq!(s.agent_holders(), 4);
}

/// After a restart every page is in its tenant's extents; an agent's
/// LOCATE moves its pages into its own extents (so its RDMA key reaches
/// them), keeping contents, sequence numbers and the tenant's usage, and
/// leaves another agent's pages where they are. A reopened pool holds each
/// adopted page once.
#[test]
fn a_restart_reloads_agents_pages_into_their_tenant_and_locate_adopts_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let cap = 4 * EXTENT_PAGES;
    {
        let s = open_file(&path, cap);
        let x = tenant(&s, "x");
        let a = s.holder(&x, "node-1/kmod");
        for h in 0..10u64 {
            let p = page_of(h);
            assert_eq!(s.put_held(&x, a, h, page_crc(&p), &p), PageStatus::Ok);
        }
        s.close().unwrap();
    }
    let s = open_file(&path, cap);
    let x = tenant(&s, "x");
    assert_eq!(s.extent_owner(s.locate(&x, 0).unwrap().extent), Some(x.id));
    let (a, b) = (s.holder(&x, "node-1/kmod"), s.holder(&x, "node-2/kmod"));
    // The tenant's own connections need no move.
    let before = s.locate(&x, 0).unwrap();
    assert_eq!(s.adopt(&x, x.id, 0), Some(before));
    // A page B wrote since stays in B's extent whoever locates it.
    let p = page_of(100);
    assert_eq!(s.put_held(&x, b, 100, page_crc(&p), &p), PageStatus::Ok);
    let theirs = s.locate(&x, 100).unwrap();
    assert_eq!(s.adopt(&x, a, 100), Some(theirs));
    for h in 0..10u64 {
        let now = s.adopt(&x, a, h).unwrap();
        assert_eq!(s.extent_owner(now.extent), Some(a), "page {h}");
        assert_eq!(get(&s, &x, h), Ok(page_of(h)));
        // Adopting again moves nothing.
        assert_eq!(s.adopt(&x, a, h), Some(now));
    }
    assert_eq!(s.adopted(), 10);
    assert_eq!(x.used(), 11, "moves do not count against the quota");
    assert_eq!(s.used_pages(), 11);
    assert_eq!(s.adopt(&x, a, 55), None, "no such page");
    // The tenant's emptied extent went back (one spare at most).
    assert!(s.tenant_extents(&x) <= 3 + 1);
    // A PUT after the move still replaces the page.
    let p = page_of(7007);
    assert_eq!(s.put_held(&x, a, 7, page_crc(&p), &p), PageStatus::Ok);
    assert_eq!(get(&s, &x, 7), Ok(page_of(7007)));
    s.close().unwrap();
    drop(s);
    let s = open_file(&path, cap);
    let r = s.recovery();
    assert_eq!((r.pages_recovered, r.stale_duplicates), (11, 0));
    let x = tenant(&s, "x");
    for h in 0..10u64 {
        let want = if h == 7 { page_of(7007) } else { page_of(h) };
        assert_eq!(get(&s, &x, h), Ok(want), "page {h}");
    }
}

/// An adoption racing with PUTs and FREEs of the same pages never
/// publishes an old copy over a newer page, nor brings a freed one back.
#[test]
fn adoption_racing_with_puts_and_frees_loses_to_them() {
    let s = Arc::new(anon_with(8 * EXTENT_PAGES, &xyz()));
    let x = tenant(&s, "x");
    let a = s.holder(&x, "node-1/kmod");
    for round in 0..200u64 {
        for h in 0..16u64 {
            assert_eq!(put(&s, &x, h, &page_of(round << 8 | h)), PageStatus::Ok);
        }
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for h in 0..16u64 {
                    s.adopt(&x, a, h);
                }
            });
            for h in 0..16u64 {
                if h % 2 == 0 {
                    assert_eq!(s.free(&x, h), PageStatus::Ok);
                } else {
                    let p = page_of(round << 8 | h | 0x80);
                    assert_eq!(s.put_held(&x, a, h, page_crc(&p), &p), PageStatus::Ok);
                }
            }
        });
        for h in 0..16u64 {
            let want = if h % 2 == 0 {
                Err(PageStatus::NotFound)
            } else {
                Ok(page_of(round << 8 | h | 0x80))
            };
            assert_eq!(get(&s, &x, h), want, "round {round} page {h}");
        }
        assert_eq!(x.used(), 8);
    }
}

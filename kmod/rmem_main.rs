// SPDX-License-Identifier: GPL-2.0

//! rmem: remote memory as device-private memory.
//!
//! Cold pages of attached processes move to `MEMORY_DEVICE_PRIVATE` pages
//! whose contents live on rmem memory servers; a CPU touch faults them back
//! (`migrate_to_ram`). The memory-management half is in `rmem_shim.c`; this
//! file is the driver: `/dev/rmem`, its ioctls (`include/uapi/rmem.h`), the
//! agent's request queue and attachments.
//!
//! Lock order (outermost first): `Shared::ctl` -> the target's `mmap_lock`
//! (taken in C) -> `Shared::inner`. The fault path takes only `inner`, with
//! the `mmap_lock` held (queueing requests, and waiting on a retry) or not
//! (a first try waits with it dropped, see `rmem_shim.c`), so `inner` is
//! never held while taking `ctl` or any `mmap_lock`.

use core::ffi::{c_int, c_ulong, c_void};
use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::{
    fs::File,
    ioctl::{_IOC_SIZE, _IOR, _IOW, _IOWR},
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    new_condvar, new_mutex,
    prelude::*,
    sync::{CondVar, CondVarTimeoutResult, Mutex},
    time::msecs_to_jiffies,
    uaccess::{UserPtr, UserSlice},
};

module! {
    type: RmemModule,
    name: "rmem",
    authors: ["rmem developers"],
    description: "rmem: remote memory as device-private (HMM) memory",
    license: "GPL",
    params: {
        capacity_mib: u64 {
            default: 1024,
            description: "Device-private capacity in MiB (grown in 64 MiB chunks)",
        },
        fault_timeout_ms: u32 {
            default: 70000,
            description: "How long a fault waits for the agent before SIGBUS",
        },
        prefetch_max: u32 {
            default: 16,
            description: "Most pages a fault in a sequential scan brings back ahead of itself (0: none, at most 64)",
        },
    },
}

/// The C half (`rmem_shim.h`).
mod shim {
    use core::ffi::c_int;

    #[repr(C)]
    pub(crate) struct Att {
        _opaque: [u8; 0],
    }
    #[repr(C)]
    pub(crate) struct Fetch {
        _opaque: [u8; 0],
    }

    extern "C" {
        pub(crate) fn rmem_pool_init(capacity_pages: core::ffi::c_ulong) -> c_int;
        pub(crate) fn rmem_pool_exit();
        pub(crate) fn rmem_pool_capacity() -> u64;
        pub(crate) fn rmem_pool_in_use() -> u64;
        pub(crate) fn rmem_pool_take_freed(out: *mut u64, max: u32) -> u32;
        pub(crate) fn rmem_capable_admin() -> bool;
        pub(crate) fn rmem_current_tgid() -> u32;
        pub(crate) fn rmem_att_new(pid: i32, start: u64, len: u64, all: bool, err: *mut c_int)
            -> *mut Att;
        pub(crate) fn rmem_att_restore(a: *mut Att) -> core::ffi::c_long;
        pub(crate) fn rmem_att_free(a: *mut Att);
        pub(crate) fn rmem_att_describe(
            a: *const Att,
            pid: *mut i32,
            start: *mut u64,
            len: *mut u64,
            all: *mut bool,
            exited: *mut bool,
        );
        pub(crate) fn rmem_evict_copy(a: *mut Att, start: u64, max: u32, data: u64, addrs: u64)
            -> core::ffi::c_long;
        pub(crate) fn rmem_evict_commit(
            a: *mut Att,
            start: u64,
            max: u32,
            n: u32,
            addrs: *const u64,
            handles: *const u64,
            data: *const u8,
            status: *mut u8,
        ) -> core::ffi::c_long;
        pub(crate) fn rmem_fetch_complete(f: *mut Fetch, result: c_int);
        pub(crate) fn rmem_module_get() -> bool;
        pub(crate) fn rmem_module_put();
        pub(crate) fn rmem_set_prefetch_max(pages: u32);
        pub(crate) fn rmem_prefetched_pages() -> u64;
        pub(crate) fn rmem_retried_faults() -> u64;
        pub(crate) fn rmem_stuck_faults() -> u64;
        pub(crate) fn rmem_skipped_pages(why: u32) -> u64;
    }
    /// `rmem_skipped_pages` reasons (`rmem_shim.h`).
    pub(crate) const SKIP_KSM: u32 = 0;
    pub(crate) const SKIP_LOCKED: u32 = 1;
    pub(crate) const SKIP_MAPPING: u32 = 2;
}

// ---- the ioctl interface: include/uapi/rmem.h ------------------------------

const UAPI_VERSION: u32 = 5;
const PAGE: usize = 4096;
const MAX_BATCH: u32 = 512;
const MAX_EVENTS: u32 = 256;
const ATTACH_ALL: u32 = 1;
const ATT_EXITED: u32 = 2;
/// Most attachments one LIST describes.
const MAX_LIST: u32 = 4096;
const EVENT_FETCH: u32 = 1;
const EVENT_FREED: u32 = 2;

macro_rules! uapi_struct {
    ($name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct $name { $($field: $ty),* }
        // SAFETY: plain integers, no padding (checked by the sizes below).
        unsafe impl kernel::transmute::FromBytes for $name {}
        // SAFETY: as above.
        unsafe impl kernel::transmute::AsBytes for $name {}
    };
}

uapi_struct!(Info {
    version: u32, page_size: u32, capacity_pages: u64, pages_in_use: u64, faults: u64,
    restored: u64, evicted: u64, fetch_timeouts: u64, attachments: u32, agent_pid: u32,
    prefetched: u64, retried: u64, skipped_ksm: u64, skipped_locked: u64, skipped_mappings: u64,
    stuck_faults: u64,
});
uapi_struct!(Attach { pid: i32, flags: u32, start: u64, len: u64, id: u64 });
uapi_struct!(Detach { id: u64, restored: u64 });
uapi_struct!(AttInfo { id: u64, pid: i32, flags: u32, start: u64, len: u64 });
uapi_struct!(List { max: u32, count: u32, atts: u64 });
uapi_struct!(Evict { id: u64, start: u64, max_pages: u32, npages: u32, data: u64, addrs: u64 });
uapi_struct!(Commit {
    id: u64, start: u64, max_pages: u32, npages: u32, addrs: u64, handles: u64, data: u64,
    status: u64, moved: u32, pad: u32,
});
uapi_struct!(Event { kind: u32, pid: u32, id: u64, handle: u64, addr: u64 });
uapi_struct!(Wait { max: u32, count: u32, timeout_ms: u32, pad: u32, events: u64 });
uapi_struct!(Reply { id: u64, error: i32, pad: u32, data: u64 });

const _: () = {
    assert!(core::mem::size_of::<Info>() == 112);
    assert!(core::mem::size_of::<Attach>() == 32);
    assert!(core::mem::size_of::<Detach>() == 16);
    assert!(core::mem::size_of::<Evict>() == 40);
    assert!(core::mem::size_of::<Commit>() == 64);
    assert!(core::mem::size_of::<Event>() == 32);
    assert!(core::mem::size_of::<Wait>() == 24);
    assert!(core::mem::size_of::<Reply>() == 24);
    assert!(core::mem::size_of::<AttInfo>() == 32);
    assert!(core::mem::size_of::<List>() == 16);
};

const MAGIC: u32 = b'R' as u32;
const IOC_INFO: u32 = _IOR::<Info>(MAGIC, 0x00);
const IOC_ATTACH: u32 = _IOWR::<Attach>(MAGIC, 0x01);
const IOC_DETACH: u32 = _IOWR::<Detach>(MAGIC, 0x02);
const IOC_EVICT_BEGIN: u32 = _IOWR::<Evict>(MAGIC, 0x03);
const IOC_EVICT_COMMIT: u32 = _IOWR::<Commit>(MAGIC, 0x04);
const IOC_WAIT: u32 = _IOWR::<Wait>(MAGIC, 0x06);
const IOC_REPLY: u32 = _IOW::<Reply>(MAGIC, 0x07);
const IOC_LIST: u32 = _IOWR::<List>(MAGIC, 0x08);

// ---- shared state -----------------------------------------------------------

/// A fault waiting for the agent.
struct Request {
    id: u64,
    handle: u64,
    tgid: u32,
    addr: u64,
    /// The fresh system page the reply is copied into (owned by the fault).
    kaddr: *mut u8,
    /// What the fault waits on (C, on the fault's stack).
    done: *mut shim::Fetch,
    /// A CPU fault, or a detach bringing pages back.
    fault: bool,
    delivered: bool,
}

/// Fault requests and counters: what the fault path touches.
struct Inner {
    next_id: u64,
    requests: KVec<Request>,
    agent_tgid: u32,
    /// A fetch timed out with no agent open: later ones fail at once until
    /// an agent opens the device (a dying process's core dump, or every
    /// thread of it, would otherwise wait a full timeout per page).
    agent_lost: bool,
    faults: u64,
    restored: u64,
    evicted: u64,
    fetch_timeouts: u64,
}

// SAFETY: `kaddr` and `done` belong to the waiting fault, which withdraws its
// request under the lock (rmem_rs_fetch_cancel) before it lets them go; a
// reply completes `done` and removes the request under the same lock.
unsafe impl Send for Inner {}

/// Attachments: what the agent's control calls touch.
struct Ctl {
    next_id: u64,
    atts: KVec<(u64, *mut shim::Att)>,
}

// SAFETY: the C objects are only used under the `ctl` lock or after being
// removed from it by their single owner.
unsafe impl Send for Ctl {}

#[pin_data]
struct Shared {
    #[pin]
    ctl: Mutex<Ctl>,
    #[pin]
    inner: Mutex<Inner>,
    /// The agent waits here for requests and freed handles.
    #[pin]
    events: CondVar,
}

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(core::ptr::null_mut());

fn shared() -> &'static Shared {
    // SAFETY: set before the pool and the device exist, cleared after both
    // are gone; every caller runs in between.
    unsafe { &*SHARED.load(Ordering::Acquire) }
}

fn errno(e: c_int) -> Error {
    Error::from_errno(e)
}

/// Called by the fault path (C) with the target's mmap_lock held (a first
/// try drops it only after queueing): queues a request for the agent. Returns its id, 0 when out of memory, or
/// `u64::MAX` when the agent is known to be gone (fail without waiting).
#[no_mangle]
extern "C" fn rmem_rs_fetch_queue(
    handle: u64,
    tgid: u32,
    addr: c_ulong,
    kaddr: *mut c_void,
    fault: bool,
    done: *mut shim::Fetch,
    timeout: *mut kernel::time::Jiffies,
) -> u64 {
    let s = shared();
    // SAFETY: `timeout` points to the caller's variable.
    unsafe { *timeout = msecs_to_jiffies(*module_parameters::fault_timeout_ms.value()) };
    let mut g = s.inner.lock();
    if g.agent_lost && g.agent_tgid == 0 {
        g.fetch_timeouts += 1;
        return u64::MAX;
    }
    let id = g.next_id;
    g.next_id += 1;
    let req = Request {
        id,
        handle,
        tgid,
        addr: addr as u64,
        kaddr: kaddr.cast(),
        done,
        fault,
        delivered: false,
    };
    if g.requests.push(req, GFP_KERNEL).is_err() {
        return 0;
    }
    drop(g);
    s.events.notify_all();
    id
}

/// Called by the fault path (C): the fault timeout in jiffies.
#[no_mangle]
extern "C" fn rmem_rs_fault_timeout() -> kernel::time::Jiffies {
    msecs_to_jiffies(*module_parameters::fault_timeout_ms.value())
}

/// Called by the fault path (C) when its wait ended without an answer:
/// withdraws the request. Returns true if it was answered meanwhile.
#[no_mangle]
extern "C" fn rmem_rs_fetch_cancel(id: u64, timed_out: bool) -> bool {
    let mut g = shared().inner.lock();
    match g.requests.iter().position(|r| r.id == id) {
        Some(i) => {
            let _ = g.requests.remove(i);
            if timed_out {
                g.fetch_timeouts += 1;
                if g.agent_tgid == 0 {
                    g.agent_lost = true;
                }
            }
            false
        }
        None => true,
    }
}

/// Called by the pool (C) when a remote page was freed; may be atomic.
#[no_mangle]
extern "C" fn rmem_rs_wake() {
    shared().events.notify_all();
}

// ---- the module ---------------------------------------------------------------

struct RmemModule {
    misc: Option<Pin<KBox<MiscDeviceRegistration<Agent>>>>,
    shared: Option<Pin<KBox<Shared>>>,
}

impl kernel::Module for RmemModule {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let shared = KBox::pin_init(
            try_pin_init!(Shared {
                ctl <- new_mutex!(Ctl { next_id: 1, atts: KVec::new() }),
                inner <- new_mutex!(Inner {
                    next_id: 1,
                    requests: KVec::new(),
                    agent_tgid: 0,
                    agent_lost: false,
                    faults: 0,
                    restored: 0,
                    evicted: 0,
                    fetch_timeouts: 0,
                }),
                events <- new_condvar!(),
            }),
            GFP_KERNEL,
        )?;
        let ptr: *const Shared = &*shared;
        SHARED.store(ptr.cast_mut(), Ordering::Release);
        // SAFETY: a plain store of an integer the C half clamps.
        unsafe { shim::rmem_set_prefetch_max(*module_parameters::prefetch_max.value()) };
        let capacity_pages = *module_parameters::capacity_mib.value() * (1 << 20) / PAGE as u64;
        // SAFETY: called once, before the device exists.
        let ret = unsafe { shim::rmem_pool_init(capacity_pages as c_ulong) };
        if ret != 0 {
            SHARED.store(core::ptr::null_mut(), Ordering::Release);
            return Err(errno(ret));
        }
        let misc = match KBox::pin_init(
            MiscDeviceRegistration::register(MiscDeviceOptions { name: c"rmem" }),
            GFP_KERNEL,
        ) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: no device pages exist yet.
                unsafe { shim::rmem_pool_exit() };
                SHARED.store(core::ptr::null_mut(), Ordering::Release);
                return Err(e);
            }
        };
        pr_info!(
            "loaded, uapi {}, capacity {} MiB, prefetch up to {} pages\n",
            UAPI_VERSION,
            *module_parameters::capacity_mib.value(),
            (*module_parameters::prefetch_max.value()).min(64)
        );
        Ok(RmemModule { misc: Some(misc), shared: Some(shared) })
    }
}

impl Drop for RmemModule {
    fn drop(&mut self) {
        // No agent has the device open and no device page is in use: each
        // holds a module reference.
        self.misc.take();
        {
            let s = shared();
            let mut ctl = s.ctl.lock();
            for (_, a) in ctl.atts.drain_all() {
                // SAFETY: as above.
                unsafe { shim::rmem_att_free(a) };
            }
        }
        // SAFETY: nothing uses the pool any more.
        unsafe { shim::rmem_pool_exit() };
        SHARED.store(core::ptr::null_mut(), Ordering::Release);
        self.shared.take();
        pr_info!("unloaded\n");
    }
}

// ---- /dev/rmem ------------------------------------------------------------------

/// An open `/dev/rmem`: the agent.
struct Agent {
    tgid: u32,
}

#[vtable]
impl MiscDevice for Agent {
    type Ptr = KBox<Self>;

    fn open(_file: &File, _misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        // SAFETY: plain C calls on the current task.
        if !unsafe { shim::rmem_capable_admin() } {
            return Err(EPERM);
        }
        // SAFETY: as above.
        let tgid = unsafe { shim::rmem_current_tgid() };
        let mut g = shared().inner.lock();
        if g.agent_tgid != 0 {
            // One open file per agent: two would let one's release hand the
            // device to a second agent while the other is still open.
            return Err(EBUSY);
        }
        // SAFETY: plain C call; dropped in release.
        if !unsafe { shim::rmem_module_get() } {
            return Err(ENODEV);
        }
        let agent = match KBox::new(Agent { tgid }, GFP_KERNEL) {
            Ok(a) => a,
            Err(e) => {
                // SAFETY: taken just above.
                unsafe { shim::rmem_module_put() };
                return Err(e.into());
            }
        };
        g.agent_tgid = tgid;
        g.agent_lost = false;
        Ok(agent)
    }

    fn release(agent: KBox<Self>, _file: &File) {
        // Requests the agent took but did not answer go to the next agent.
        {
            let mut g = shared().inner.lock();
            if g.agent_tgid == agent.tgid {
                g.agent_tgid = 0;
            }
            for r in g.requests.iter_mut() {
                r.delivered = false;
            }
        }
        drop(agent);
        // SAFETY: taken in open; the last thing this module's code does here.
        unsafe { shim::rmem_module_put() };
    }

    fn ioctl(_me: &Agent, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        let user = UserSlice::new(UserPtr::from_addr(arg), _IOC_SIZE(cmd));
        match cmd {
            IOC_INFO => info(user),
            IOC_ATTACH => attach(user),
            IOC_DETACH => detach(user),
            IOC_EVICT_BEGIN => evict_begin(user),
            IOC_EVICT_COMMIT => evict_commit(user),
            IOC_WAIT => wait(user),
            IOC_REPLY => reply(user),
            IOC_LIST => list(user),
            _ => Err(ENOTTY),
        }
    }
}

fn info(user: UserSlice) -> Result<isize> {
    let s = shared();
    let attachments = s.ctl.lock().atts.len() as u32;
    let g = s.inner.lock();
    let info = Info {
        version: UAPI_VERSION,
        page_size: PAGE as u32,
        // SAFETY: plain reads of the pool's counters.
        capacity_pages: unsafe { shim::rmem_pool_capacity() },
        // SAFETY: as above.
        pages_in_use: unsafe { shim::rmem_pool_in_use() },
        faults: g.faults,
        restored: g.restored,
        evicted: g.evicted,
        fetch_timeouts: g.fetch_timeouts,
        attachments,
        agent_pid: g.agent_tgid,
        // SAFETY: a plain read of an atomic counter.
        prefetched: unsafe { shim::rmem_prefetched_pages() },
        // SAFETY: as above.
        retried: unsafe { shim::rmem_retried_faults() },
        // SAFETY: as above.
        skipped_ksm: unsafe { shim::rmem_skipped_pages(shim::SKIP_KSM) },
        // SAFETY: as above.
        skipped_locked: unsafe { shim::rmem_skipped_pages(shim::SKIP_LOCKED) },
        // SAFETY: as above.
        skipped_mappings: unsafe { shim::rmem_skipped_pages(shim::SKIP_MAPPING) },
        // SAFETY: as above.
        stuck_faults: unsafe { shim::rmem_stuck_faults() },
    };
    drop(g);
    user.writer().write(&info)?;
    Ok(0)
}

fn attach(user: UserSlice) -> Result<isize> {
    let (mut r, mut w) = user.reader_writer();
    let mut req: Attach = r.read()?;
    if req.pid <= 0 || req.flags & !ATTACH_ALL != 0 {
        return Err(EINVAL);
    }
    let mut ctl = shared().ctl.lock();
    let mut err: c_int = 0;
    // SAFETY: plain C call; the result is owned by the table below.
    let a = unsafe {
        shim::rmem_att_new(req.pid, req.start, req.len, req.flags & ATTACH_ALL != 0, &mut err)
    };
    if a.is_null() {
        return Err(errno(err));
    }
    let id = ctl.next_id;
    ctl.next_id += 1;
    if let Err(e) = ctl.atts.push((id, a), GFP_KERNEL) {
        // SAFETY: never published.
        unsafe { shim::rmem_att_free(a) };
        return Err(e.into());
    }
    req.id = id;
    w.write(&req)?;
    Ok(0)
}

fn detach(user: UserSlice) -> Result<isize> {
    let (mut r, mut w) = user.reader_writer();
    let mut req: Detach = r.read()?;
    // `ctl` stays held while pages come back, so nothing evicts meanwhile;
    // the replies come through `inner`, which this does not hold.
    let mut ctl = shared().ctl.lock();
    let i = ctl.atts.iter().position(|(id, _)| *id == req.id).ok_or(ENOENT)?;
    let a = ctl.atts[i].1;
    // SAFETY: `a` is in the table and we hold its lock.
    let restored = unsafe { shim::rmem_att_restore(a) };
    if restored < 0 {
        return Err(errno(restored as c_int));
    }
    let _ = ctl.atts.remove(i);
    drop(ctl);
    // SAFETY: removed from the table, so we own it.
    unsafe { shim::rmem_att_free(a) };
    req.restored = restored as u64;
    w.write(&req)?;
    Ok(0)
}

/// Describes the attachments held (up to `max`, at most [`MAX_LIST`]).
fn list(user: UserSlice) -> Result<isize> {
    let (mut r, mut w) = user.reader_writer();
    let mut req: List = r.read()?;
    let ctl = shared().ctl.lock();
    let room = req.max.min(MAX_LIST) as usize;
    let n = ctl.atts.len().min(room);
    let mut out = UserSlice::new(
        UserPtr::from_addr(req.atts as usize),
        n * core::mem::size_of::<AttInfo>(),
    )
    .writer();
    for &(id, a) in ctl.atts.iter().take(n) {
        let (mut pid, mut start, mut len, mut all, mut exited) = (0, 0, 0, false, false);
        // SAFETY: `a` is in the table and we hold its lock; the outputs are
        // locals.
        unsafe { shim::rmem_att_describe(a, &mut pid, &mut start, &mut len, &mut all, &mut exited) };
        let flags = if all { ATTACH_ALL } else { 0 } | if exited { ATT_EXITED } else { 0 };
        out.write(&AttInfo { id, pid, flags, start, len })?;
    }
    req.count = ctl.atts.len() as u32;
    drop(ctl);
    w.write(&req)?;
    Ok(0)
}

fn evict_begin(user: UserSlice) -> Result<isize> {
    let (mut r, mut w) = user.reader_writer();
    let mut req: Evict = r.read()?;
    if req.max_pages == 0 || req.max_pages > MAX_BATCH {
        return Err(EINVAL);
    }
    let ctl = shared().ctl.lock();
    let a = ctl.atts.iter().find(|(id, _)| *id == req.id).ok_or(ENOENT)?.1;
    // SAFETY: `a` is in the table and we hold its lock; the user pointers
    // are only used with copy_to_user for max_pages entries.
    let n = unsafe { shim::rmem_evict_copy(a, req.start, req.max_pages, req.data, req.addrs) };
    drop(ctl);
    if n < 0 {
        return Err(errno(n as c_int));
    }
    req.npages = n as u32;
    w.write(&req)?;
    Ok(0)
}

/// Reads `n` values of `T` from user address `addr` into a new vector.
fn read_vec<T: kernel::transmute::FromBytes + Copy>(addr: u64, n: usize) -> Result<KVVec<T>> {
    let mut reader =
        UserSlice::new(UserPtr::from_addr(addr as usize), n * core::mem::size_of::<T>()).reader();
    let mut v = KVVec::with_capacity(n, GFP_KERNEL)?;
    for _ in 0..n {
        v.push(reader.read::<T>()?, GFP_KERNEL)?;
    }
    Ok(v)
}

fn evict_commit(user: UserSlice) -> Result<isize> {
    let (mut r, mut w) = user.reader_writer();
    let mut req: Commit = r.read()?;
    let n = req.npages as usize;
    if req.max_pages == 0 || req.max_pages > MAX_BATCH || n == 0 || req.npages > req.max_pages {
        return Err(EINVAL);
    }
    let addrs = read_vec::<u64>(req.addrs, n)?;
    let end = req.start + u64::from(req.max_pages) * PAGE as u64;
    let ascending = addrs.windows(2).all(|w| w[0] < w[1]);
    if !ascending || addrs.iter().any(|&a| a % PAGE as u64 != 0 || a < req.start || a >= end) {
        return Err(EINVAL);
    }
    let handles = read_vec::<u64>(req.handles, n)?;
    // The acknowledged copies, compared with the pages before they move.
    let mut data = KVVec::<u8>::with_capacity(n * PAGE, GFP_KERNEL)?;
    data.resize(n * PAGE, 0, GFP_KERNEL)?;
    UserSlice::new(UserPtr::from_addr(req.data as usize), n * PAGE).reader().read_slice(&mut data)?;
    let mut status = KVVec::<u8>::with_capacity(n, GFP_KERNEL)?;
    status.resize(n, 0, GFP_KERNEL)?;
    let ctl = shared().ctl.lock();
    let a = ctl.atts.iter().find(|(id, _)| *id == req.id).ok_or(ENOENT)?.1;
    // SAFETY: `a` is in the table and we hold its lock; every array holds
    // `n` entries (`data` n pages).
    let moved = unsafe {
        shim::rmem_evict_commit(
            a,
            req.start,
            req.max_pages,
            req.npages,
            addrs.as_ptr(),
            handles.as_ptr(),
            data.as_ptr(),
            status.as_mut_ptr(),
        )
    };
    drop(ctl);
    if moved < 0 {
        return Err(errno(moved as c_int));
    }
    shared().inner.lock().evicted += moved as u64;
    // Pages have moved: from here on a bad status pointer must not turn into
    // an error the agent would take for "nothing moved".
    req.moved = moved as u32;
    let status_ok = UserSlice::new(UserPtr::from_addr(req.status as usize), n)
        .writer()
        .write_slice(&status)
        .is_ok();
    let _ = w.write(&req);
    if !status_ok {
        pr_warn!("EVICT_COMMIT: cannot write the page statuses back to the agent\n");
    }
    Ok(0)
}

fn wait(user: UserSlice) -> Result<isize> {
    let (mut r, mut w) = user.reader_writer();
    let mut req: Wait = r.read()?;
    let max = req.max.min(MAX_EVENTS) as usize;
    if max == 0 {
        return Err(EINVAL);
    }
    let s = shared();
    let mut events = KVec::<Event>::with_capacity(max, GFP_KERNEL)?;
    let mut freed = KVec::<u64>::with_capacity(max, GFP_KERNEL)?;
    freed.resize(max, 0, GFP_KERNEL)?;
    let mut left = msecs_to_jiffies(req.timeout_ms);
    // Freed pages wake us from atomic context without our lock, so a wake-up
    // can slip in between the check and the sleep: sleep in short slices.
    let slice = msecs_to_jiffies(20).max(1);
    let mut g = s.inner.lock();
    loop {
        for q in g.requests.iter_mut() {
            if events.len() == max {
                break;
            }
            if !q.delivered {
                q.delivered = true;
                events.push(
                    Event { kind: EVENT_FETCH, pid: q.tgid, id: q.id, handle: q.handle, addr: q.addr },
                    GFP_KERNEL,
                )?;
            }
        }
        let room = (max - events.len()) as u32;
        // SAFETY: `freed` has room for `max` handles.
        let n = unsafe { shim::rmem_pool_take_freed(freed.as_mut_ptr(), room) } as usize;
        for h in &freed[..n] {
            events.push(Event { kind: EVENT_FREED, handle: *h, ..Event::default() }, GFP_KERNEL)?;
        }
        if !events.is_empty() || left == 0 {
            break;
        }
        let step = slice.min(left);
        match s.events.wait_interruptible_timeout(&mut g, step) {
            CondVarTimeoutResult::Signal { .. } => return Err(EINTR),
            CondVarTimeoutResult::Timeout => left -= step,
            CondVarTimeoutResult::Woken { jiffies } => left -= step - jiffies,
        }
    }
    drop(g);
    let mut out = UserSlice::new(
        UserPtr::from_addr(req.events as usize),
        events.len() * core::mem::size_of::<Event>(),
    )
    .writer();
    for e in events.iter() {
        out.write(e)?;
    }
    req.count = events.len() as u32;
    w.write(&req)?;
    Ok(0)
}

fn reply(user: UserSlice) -> Result<isize> {
    let req: Reply = user.reader().read()?;
    let s = shared();
    let mut g = s.inner.lock();
    let i = g.requests.iter().position(|q| q.id == req.id).ok_or(ENOENT)?;
    let (kaddr, done, fault) = (g.requests[i].kaddr, g.requests[i].done, g.requests[i].fault);
    let result = if req.error == 0 {
        // SAFETY: `kaddr` is the fault's fresh page, valid while its request
        // is in the table, which cannot change while we hold the lock.
        let page = unsafe { core::slice::from_raw_parts_mut(kaddr, PAGE) };
        UserSlice::new(UserPtr::from_addr(req.data as usize), PAGE).reader().read_slice(page)?;
        0
    } else if (-4095..0).contains(&req.error) {
        req.error
    } else {
        EIO.to_errno()
    };
    let _ = g.requests.remove(i);
    if result == 0 && fault {
        g.faults += 1;
    } else if result == 0 {
        g.restored += 1;
    }
    // SAFETY: the request was in the table, so its fault is still waiting
    // (a withdrawn request is gone from it); after this nothing touches it.
    unsafe { shim::rmem_fetch_complete(done, result) };
    drop(g);
    Ok(0)
}

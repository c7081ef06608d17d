//! Protection domains and memory regions.

use std::ptr::NonNull;
use std::sync::Arc;

use memmap2::MmapMut;
use rdma_sys as sys;

use crate::{Context, VerbsError};

/// A protection domain: queue pairs reach only the memory regions of their
/// own domain. rmem's server makes one per tenant.
#[derive(Debug)]
pub struct Pd {
    pd: NonNull<sys::ibv_pd>,
    ctx: Arc<Context>,
}

// SAFETY: an ibv_pd is used only as an argument of verbs calls, which may
// come from any thread.
unsafe impl Send for Pd {}
// SAFETY: as above; Pd has no interior state of its own.
unsafe impl Sync for Pd {}

impl Pd {
    /// Allocates a protection domain on `ctx`.
    pub fn new(ctx: Arc<Context>) -> Result<Arc<Self>, VerbsError> {
        // SAFETY: the context is open (held by the Arc).
        let raw = unsafe { sys::ibv_alloc_pd(ctx.as_ptr()) };
        let pd = NonNull::new(raw).ok_or_else(|| VerbsError::call("ibv_alloc_pd", 0))?;
        Ok(Arc::new(Self { pd, ctx }))
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_pd {
        self.pd.as_ptr()
    }

    /// The device this domain lives on.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every region and queue pair of this domain holds an Arc of
        // it, so none is left.
        let ret = unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
        if ret != 0 {
            tracing::warn!(
                "ibv_dealloc_pd failed: {}",
                std::io::Error::from_raw_os_error(ret)
            );
        }
    }
}

/// What a memory region lets the local device and remote peers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Peers may RDMA READ it (a server's file-backed page pool).
    RemoteRead,
    /// Peers may RDMA READ it; registered writable so anonymous memory is
    /// pinned as its own pages, not the shared zero page (a server's
    /// anonymous page pool).
    RemoteReadPinned,
    /// Peers may RDMA WRITE it (a server's staging buffer).
    RemoteWrite,
    /// Only the local device writes it (a client's READ target and WRITE source).
    Local,
}

impl Access {
    fn flags(self) -> i32 {
        use sys::ibv_access_flags as f;
        let bits = match self {
            Access::RemoteRead => f::IBV_ACCESS_REMOTE_READ.0,
            Access::RemoteReadPinned => f::IBV_ACCESS_REMOTE_READ.0 | f::IBV_ACCESS_LOCAL_WRITE.0,
            Access::RemoteWrite => f::IBV_ACCESS_LOCAL_WRITE.0 | f::IBV_ACCESS_REMOTE_WRITE.0,
            Access::Local => f::IBV_ACCESS_LOCAL_WRITE.0,
        };
        bits as i32
    }
}

/// A registered memory region.
#[derive(Debug)]
pub struct Mr {
    mr: NonNull<sys::ibv_mr>,
    addr: u64,
    len: usize,
    _pd: Arc<Pd>,
}

// SAFETY: an ibv_mr is immutable after registration; its keys are read
// from any thread and it is deregistered once, in Drop.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

fn memlock_limit() -> String {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return "unknown".into();
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        format!("{} KiB", lim.rlim_cur / 1024)
    }
}

impl Mr {
    /// Registers `len` bytes at `addr` in `pd`.
    ///
    /// # Safety
    /// The memory must stay mapped (and not be remapped) until the region
    /// is dropped: the device reads or writes it without the CPU.
    pub unsafe fn register(
        pd: &Arc<Pd>,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Self, VerbsError> {
        // SAFETY: the caller keeps [addr, addr+len) mapped for the region's
        // life; the domain is live.
        let raw = unsafe { sys::ibv_reg_mr(pd.as_ptr(), addr.cast(), len, access.flags()) };
        let Some(mr) = NonNull::new(raw) else {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ENOMEM) | Some(libc::EPERM) | Some(libc::EAGAIN) => {
                    VerbsError::MemlockLimit {
                        bytes: len,
                        limit: memlock_limit(),
                    }
                }
                _ => VerbsError::Call {
                    op: "ibv_reg_mr",
                    source: err,
                },
            });
        };
        Ok(Self {
            mr,
            addr: addr as u64,
            len,
            _pd: pd.clone(),
        })
    }

    /// The key a peer presents to reach this region.
    pub fn rkey(&self) -> u32 {
        // SAFETY: the region is registered; its fields are immutable.
        unsafe { (*self.mr.as_ptr()).rkey }
    }

    /// The key local work requests use.
    pub fn lkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    /// First byte's address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered once, deregistered once.
        let ret = unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        if ret != 0 {
            tracing::warn!(
                "ibv_dereg_mr failed: {}",
                std::io::Error::from_raw_os_error(ret)
            );
        }
    }
}

/// Page-aligned memory of its own, registered in a domain.
#[derive(Debug)]
pub struct Buffer {
    // Field order: the region is dropped (deregistered) before the mapping.
    mr: Mr,
    map: MmapMut,
}

impl Buffer {
    /// Maps `len` bytes (zeroed, committed now) and registers them.
    pub fn new(pd: &Arc<Pd>, len: usize, access: Access) -> Result<Self, VerbsError> {
        let mut map = memmap2::MmapOptions::new()
            .len(len.max(1))
            .populate()
            .map_anon()
            .map_err(|source| VerbsError::Call { op: "mmap", source })?;
        // SAFETY: `map` is moved into the Buffer beside the region and
        // outlives it (field order); a MmapMut is never remapped.
        let mr = unsafe { Mr::register(pd, map.as_mut_ptr(), len, access)? };
        Ok(Self { mr, map })
    }

    /// The registered region.
    pub fn mr(&self) -> &Mr {
        &self.mr
    }

    /// The first byte, for reads of memory a peer may be writing.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.map[..self.mr.len()]
    }

    /// The bytes, to fill before a WRITE.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.mr.len();
        &mut self.map[..len]
    }
}

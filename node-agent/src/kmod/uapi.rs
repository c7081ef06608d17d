//! The `/dev/rmem` interface: the Rust mirror of `kmod/include/uapi/rmem.h`.
//! Layouts and ioctl numbers must match the header; the tests below check
//! the sizes and a test in `tests/` parses the header.

/// The interface version this agent speaks.
pub const UAPI_VERSION: u32 = 4;
/// Bytes per page moved through the module.
pub const PAGE_SIZE: usize = 4096;
/// Most pages one eviction may take.
pub const MAX_BATCH: u32 = 512;
/// A handle that means "keep this page local" in a commit.
pub const NO_HANDLE: u64 = u64::MAX;
/// Attach every mapping of the process.
pub const ATTACH_ALL: u32 = 1;
/// A CPU touched a remote page.
pub const EVENT_FETCH: u32 = 1;
/// The last mapping of a remote page went away.
pub const EVENT_FREED: u32 = 2;

/// `struct rmem_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Info {
    pub version: u32,
    pub page_size: u32,
    pub capacity_pages: u64,
    pub pages_in_use: u64,
    pub faults: u64,
    pub restored: u64,
    pub evicted: u64,
    pub fetch_timeouts: u64,
    pub attachments: u32,
    pub agent_pid: u32,
    /// Of `faults`, pages brought back ahead of a fault (sequential scans).
    pub prefetched: u64,
    /// Faults that dropped the target's `mmap_lock` while their pages were
    /// fetched (a first try staging them; its retry migrates them).
    pub retried: u64,
    /// Pages eviction left in RAM because they are KSM's: merged (shared
    /// through KSM's stable tree) or in a mergeable mapping.
    pub skipped_ksm: u64,
    /// Pages eviction left in RAM because their mapping is mlocked.
    pub skipped_locked: u64,
    /// Pages eviction left in RAM because their mapping is one it never
    /// takes (userfaultfd-registered, I/O or PFN maps, not private
    /// anonymous memory).
    pub skipped_mappings: u64,
    /// Faults that ended in SIGBUS because their page could not move back
    /// for `fault_timeout_ms` (the kernel kept refusing the migration).
    pub stuck_faults: u64,
}

/// `struct rmem_attach`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Attach {
    pub pid: i32,
    pub flags: u32,
    pub start: u64,
    pub len: u64,
    pub id: u64,
}

/// `struct rmem_detach`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Detach {
    pub id: u64,
    pub restored: u64,
}

/// `struct rmem_evict`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Evict {
    pub id: u64,
    pub start: u64,
    pub max_pages: u32,
    pub npages: u32,
    pub data: u64,
    pub addrs: u64,
}

/// `struct rmem_commit`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Commit {
    pub id: u64,
    pub start: u64,
    pub max_pages: u32,
    pub npages: u32,
    pub addrs: u64,
    pub handles: u64,
    pub data: u64,
    pub status: u64,
    pub moved: u32,
    pub pad: u32,
}

/// `struct rmem_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    pub pid: u32,
    pub id: u64,
    pub handle: u64,
    pub addr: u64,
}

/// `struct rmem_wait`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Wait {
    pub max: u32,
    pub count: u32,
    pub timeout_ms: u32,
    pub pad: u32,
    pub events: u64,
}

/// `struct rmem_reply`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Reply {
    pub id: u64,
    pub error: i32,
    pub pad: u32,
    pub data: u64,
}

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'R' as u64) << 8) | nr
}

pub const IOC_INFO: u64 = ioc(IOC_READ, 0x00, size_of::<Info>());
pub const IOC_ATTACH: u64 = ioc(IOC_READ | IOC_WRITE, 0x01, size_of::<Attach>());
pub const IOC_DETACH: u64 = ioc(IOC_READ | IOC_WRITE, 0x02, size_of::<Detach>());
pub const IOC_EVICT_BEGIN: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<Evict>());
pub const IOC_EVICT_COMMIT: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<Commit>());
pub const IOC_WAIT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<Wait>());
pub const IOC_REPLY: u64 = ioc(IOC_WRITE, 0x07, size_of::<Reply>());

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes the C header's layout gives (all fields naturally aligned,
    /// explicit padding): the module checks the same numbers at build time.
    #[test]
    fn layouts_match_the_header() {
        assert_eq!(size_of::<Info>(), 112);
        assert_eq!(size_of::<Attach>(), 32);
        assert_eq!(size_of::<Detach>(), 16);
        assert_eq!(size_of::<Evict>(), 40);
        assert_eq!(size_of::<Commit>(), 64);
        assert_eq!(size_of::<Event>(), 32);
        assert_eq!(size_of::<Wait>(), 24);
        assert_eq!(size_of::<Reply>(), 24);
    }

    /// `_IOR('R', 0, struct rmem_info)` as the kernel's macros compute it.
    #[test]
    fn ioctl_numbers_follow_the_kernel_encoding() {
        assert_eq!(IOC_INFO, 0x8070_5200);
        assert_eq!(IOC_REPLY, 0x4018_5207);
        assert_eq!(IOC_ATTACH, 0xc020_5201);
    }
}

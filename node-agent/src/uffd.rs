//! A safe wrapper around Linux `userfaultfd(2)`.
//!
//! This module holds every ioctl and raw structure of the userfaultfd API;
//! the rest of the agent calls typed methods. Struct layouts follow
//! `include/uapi/linux/userfaultfd.h`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xAA;

/// Features the agent asks for.
pub mod feature {
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    pub const MISSING_SHMEM: u64 = 1 << 5;
    pub const THREAD_ID: u64 = 1 << 8;
    pub const MINOR_SHMEM: u64 = 1 << 10;
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    pub const POISON: u64 = 1 << 14;
}

/// Registration modes.
pub mod mode {
    pub const MISSING: u64 = 1 << 0;
    pub const WP: u64 = 1 << 1;
    pub const MINOR: u64 = 1 << 2;
}

const COPY_MODE_DONTWAKE: u64 = 1 << 0;
const COPY_MODE_WP: u64 = 1 << 1;
const CONTINUE_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

const EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

/// `struct uffd_msg` (32 bytes), pagefault view of its union.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

const fn iowr<T>(nr: u64) -> u64 {
    (3 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (UFFD_API << 8) | nr
}
const fn ior<T>(nr: u64) -> u64 {
    (2 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (UFFD_API << 8) | nr
}

const UFFDIO_API_IOC: u64 = iowr::<UffdioApi>(0x3F);
const UFFDIO_REGISTER: u64 = iowr::<UffdioRegister>(0x00);
const UFFDIO_UNREGISTER: u64 = ior::<UffdioRange>(0x01);
const UFFDIO_WAKE: u64 = ior::<UffdioRange>(0x02);
const UFFDIO_COPY: u64 = iowr::<UffdioCopy>(0x03);
const UFFDIO_WRITEPROTECT: u64 = iowr::<UffdioWriteprotect>(0x06);
const UFFDIO_CONTINUE: u64 = iowr::<UffdioContinue>(0x07);
const UFFDIO_POISON: u64 = iowr::<UffdioPoison>(0x08);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = UFFD_API << 8;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// A page fault read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub address: u64,
    /// The access was a write.
    pub write: bool,
    /// A write to a write-protected page.
    pub wp: bool,
    /// The page is in the page cache but not mapped (minor fault).
    pub minor: bool,
    /// Thread id of the faulting thread.
    pub tid: u32,
}

/// Result of resolving a fault with a copy or continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    Done,
    /// The page was already there (another resolver won); wake instead.
    Exists,
}

/// A userfaultfd descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Uffd {
    /// Opens a non-blocking descriptor for user-mode faults, through
    /// `/dev/userfaultfd` when it is accessible and the syscall otherwise,
    /// and negotiates `features` (all of them are required).
    pub fn open(features: u64) -> io::Result<Self> {
        let fd = Self::open_dev().or_else(|_| Self::open_syscall())?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one UffdioApi, which
        // `api` is, and the descriptor is a fresh userfaultfd.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API_IOC as _, &mut api) })?;
        if api.features & features != features {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "kernel lacks userfaultfd features {:#x}",
                    features & !api.features
                ),
            ));
        }
        Ok(Self {
            fd,
            features: api.features,
        })
    }

    fn open_dev() -> io::Result<OwnedFd> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a
        // new descriptor or -1.
        let fd = cvt(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) })?;
        // SAFETY: fd is a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn open_syscall() -> io::Result<OwnedFd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
        // SAFETY: userfaultfd(2) takes its flags by value and returns a new
        // descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = cvt(fd as libc::c_int)?;
        // SAFETY: fd is a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Features the kernel granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the structure that `request` encodes
        // (the request numbers are derived from those same types), so the
        // kernel reads and writes exactly `size_of::<T>()` bytes of `arg`.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) }).map(drop)
    }

    /// Registers `[start, start + len)` with `modes`.
    pub fn register(&self, start: u64, len: u64, modes: u64) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode: modes,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut r)
    }

    /// Unregisters a range.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        self.ioctl(UFFDIO_UNREGISTER, &mut r)
    }

    /// Reads one pending fault, or `None` when there is none right now.
    /// Non-pagefault events (none are requested) are skipped.
    pub fn read_fault(&self) -> io::Result<Option<Fault>> {
        let mut msg = UffdMsg::default();
        loop {
            // SAFETY: reads at most size_of::<UffdMsg>() bytes into `msg`,
            // a plain-data structure of exactly that size.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut msg as *mut UffdMsg).cast(),
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n as usize != std::mem::size_of::<UffdMsg>() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short uffd read",
                ));
            }
            if msg.event != EVENT_PAGEFAULT {
                continue;
            }
            return Ok(Some(Fault {
                address: msg.address,
                write: msg.flags & PAGEFAULT_FLAG_WRITE != 0,
                wp: msg.flags & PAGEFAULT_FLAG_WP != 0,
                minor: msg.flags & PAGEFAULT_FLAG_MINOR != 0,
                tid: msg.ptid,
            }));
        }
    }

    /// Fills a missing page at `dst` with `src` and wakes its waiters.
    /// With `write_protect`, the page is mapped write-protected.
    pub fn copy(&self, dst: u64, src: &[u8], write_protect: bool) -> io::Result<Resolve> {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if write_protect { COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        match self.ioctl(UFFDIO_COPY, &mut c) {
            Ok(()) => Ok(Resolve::Done),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Resolve::Exists),
            Err(e) => Err(e),
        }
    }

    /// Like [`Uffd::copy`] without waking anyone (prefetch).
    pub fn copy_dontwake(&self, dst: u64, src: &[u8]) -> io::Result<Resolve> {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: COPY_MODE_DONTWAKE,
            copy: 0,
        };
        match self.ioctl(UFFDIO_COPY, &mut c) {
            Ok(()) => Ok(Resolve::Done),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Resolve::Exists),
            Err(e) => Err(e),
        }
    }

    /// Maps pages that are in the page cache (resolves minor faults) and
    /// wakes their waiters.
    pub fn continue_(&self, start: u64, len: u64, write_protect: bool) -> io::Result<Resolve> {
        let mut c = UffdioContinue {
            range: UffdioRange { start, len },
            mode: if write_protect { CONTINUE_MODE_WP } else { 0 },
            mapped: 0,
        };
        match self.ioctl(UFFDIO_CONTINUE, &mut c) {
            Ok(()) => Ok(Resolve::Done),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Resolve::Exists),
            Err(e) => Err(e),
        }
    }

    /// Sets or clears write protection (clearing wakes writers).
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut w)
    }

    /// Wakes threads waiting on faults in a range (they retry the access).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        self.ioctl(UFFDIO_WAKE, &mut r)
    }

    /// Marks a range poisoned: accesses raise SIGBUS.
    pub fn poison(&self, start: u64, len: u64) -> io::Result<()> {
        let mut p = UffdioPoison {
            range: UffdioRange { start, len },
            mode: 0,
            updated: 0,
        };
        self.ioctl(UFFDIO_POISON, &mut p)
    }

    /// Waits until a fault is readable or `timeout` passes.
    pub fn poll(&self, timeout: std::time::Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(n > 0)
    }

    /// The raw descriptor (for diagnostics).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Values from include/uapi/linux/userfaultfd.h on x86_64.
        assert_eq!(UFFDIO_API_IOC, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(UFFDIO_CONTINUE, 0xC020_AA07);
        assert_eq!(UFFDIO_POISON, 0xC020_AA08);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }
}

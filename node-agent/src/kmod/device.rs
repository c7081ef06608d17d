//! `/dev/rmem`: safe wrappers around the module's ioctls. The only module of
//! the kernel backend with `unsafe` code.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::uapi::{self, Event, Info, PAGE_SIZE};

/// The default device path.
pub const DEVICE_PATH: &str = "/dev/rmem";

/// An open `/dev/rmem`. The module allows one agent process at a time; its
/// threads share this handle.
#[derive(Debug)]
pub struct Device {
    file: File,
}

/// The answer to a fetch request.
#[derive(Debug)]
pub enum FetchReply<'a> {
    Page(&'a [u8; PAGE_SIZE]),
    /// The page cannot be had: the faulting task gets SIGBUS.
    Error(i32),
}

impl Device {
    /// Opens the device and checks that the module speaks our version.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{}: {e} (is rmem.ko loaded, and are we CAP_SYS_ADMIN?)",
                        path.display()
                    ),
                )
            })?;
        let dev = Self { file };
        let info = dev.info()?;
        if info.version != uapi::UAPI_VERSION || info.page_size as usize != PAGE_SIZE {
            return Err(io::Error::other(format!(
                "{}: module interface version {} with {}-byte pages; this agent speaks version {} with {PAGE_SIZE}-byte pages",
                path.display(),
                info.version,
                info.page_size,
                uapi::UAPI_VERSION
            )));
        }
        Ok(dev)
    }

    fn ioctl<T>(&self, cmd: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: `cmd` encodes the size of `T`, which is the repr(C) struct
        // the module reads or writes at `arg`; any user pointers inside `arg`
        // were set by the callers below to buffers of the sizes they state.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                cmd as libc::c_ulong,
                std::ptr::from_mut(arg),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Counters and capacity.
    pub fn info(&self) -> io::Result<Info> {
        let mut info = Info::default();
        self.ioctl(uapi::IOC_INFO, &mut info)?;
        Ok(info)
    }

    /// Attaches `[start, start + len)` of process `pid`, or all of it.
    pub fn attach(&self, pid: i32, range: Option<(u64, u64)>) -> io::Result<u64> {
        let (start, len) = range.unwrap_or((0, 0));
        let mut a = uapi::Attach {
            pid,
            flags: if range.is_none() { uapi::ATTACH_ALL } else { 0 },
            start,
            len,
            id: 0,
        };
        self.ioctl(uapi::IOC_ATTACH, &mut a)?;
        Ok(a.id)
    }

    /// The attachments the module holds (made by this agent or an earlier
    /// one: they outlive the open file).
    pub fn list(&self) -> io::Result<Vec<uapi::AttInfo>> {
        let mut atts = vec![uapi::AttInfo::default(); 64];
        loop {
            let mut l = uapi::List {
                max: atts.len() as u32,
                count: 0,
                atts: atts.as_mut_ptr() as u64,
            };
            self.ioctl(uapi::IOC_LIST, &mut l)?;
            if l.count as usize <= atts.len() {
                atts.truncate(l.count as usize);
                return Ok(atts);
            }
            // More than room: again with room for all (and a few more
            // attached meanwhile), up to the module's limit.
            if atts.len() >= uapi::MAX_LIST as usize {
                return Ok(atts);
            }
            atts.resize(
                (l.count as usize + 16).min(uapi::MAX_LIST as usize),
                uapi::AttInfo::default(),
            );
        }
    }

    /// Brings every remote page of the attachment back and removes it. Needs
    /// another thread serving [`Device::wait`] meanwhile. Returns the pages
    /// brought back.
    pub fn detach(&self, id: u64) -> io::Result<u64> {
        let mut d = uapi::Detach { id, restored: 0 };
        self.ioctl(uapi::IOC_DETACH, &mut d)?;
        Ok(d.restored)
    }

    /// Copies up to `addrs.len()` present pages from `start` (within one
    /// mapping) into `data` and their addresses into `addrs`; the pages stay
    /// mapped. Returns how many.
    pub fn evict_begin(
        &self,
        id: u64,
        start: u64,
        data: &mut [u8],
        addrs: &mut [u64],
    ) -> io::Result<usize> {
        let max = addrs.len().min(uapi::MAX_BATCH as usize);
        assert!(data.len() >= max * PAGE_SIZE, "room for every page");
        let mut e = uapi::Evict {
            id,
            start,
            max_pages: max as u32,
            npages: 0,
            data: data.as_mut_ptr() as u64,
            addrs: addrs.as_mut_ptr() as u64,
        };
        self.ioctl(uapi::IOC_EVICT_BEGIN, &mut e)?;
        Ok(e.npages as usize)
    }

    /// After the server acknowledged the copies from [`Device::evict_begin`]
    /// (same `start` and `max_pages`), moves each page still equal to its
    /// copy to device memory, page `k` holding `handles[k]`.
    /// `status[k]` tells whether page `k` moved; the copies of pages that did
    /// not are the caller's to free. Returns the pages moved.
    #[allow(clippy::too_many_arguments)]
    pub fn evict_commit(
        &self,
        id: u64,
        start: u64,
        max_pages: usize,
        addrs: &[u64],
        handles: &[u64],
        data: &[u8],
        status: &mut [u8],
    ) -> io::Result<usize> {
        let n = addrs.len();
        assert!(handles.len() == n && status.len() == n && data.len() >= n * PAGE_SIZE);
        let mut c = uapi::Commit {
            id,
            start,
            max_pages: max_pages as u32,
            npages: n as u32,
            addrs: addrs.as_ptr() as u64,
            handles: handles.as_ptr() as u64,
            data: data.as_ptr() as u64,
            status: status.as_mut_ptr() as u64,
            moved: 0,
            pad: 0,
        };
        self.ioctl(uapi::IOC_EVICT_COMMIT, &mut c)?;
        Ok(c.moved as usize)
    }

    /// Waits up to `timeout_ms` for events; returns how many were written.
    pub fn wait(&self, events: &mut [Event], timeout_ms: u32) -> io::Result<usize> {
        let mut w = uapi::Wait {
            max: events.len() as u32,
            count: 0,
            timeout_ms,
            pad: 0,
            events: events.as_mut_ptr() as u64,
        };
        match self.ioctl(uapi::IOC_WAIT, &mut w) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(0),
            Err(e) => Err(e),
            Ok(()) => Ok(w.count as usize),
        }
    }

    /// Answers fetch request `id`.
    pub fn reply(&self, id: u64, reply: FetchReply<'_>) -> io::Result<()> {
        let mut r = uapi::Reply {
            id,
            ..Default::default()
        };
        match reply {
            FetchReply::Page(p) => r.data = p.as_ptr() as u64,
            FetchReply::Error(errno) => r.error = -errno.abs(),
        }
        self.ioctl(uapi::IOC_REPLY, &mut r)
    }
}

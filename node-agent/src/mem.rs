//! The memory behind a region: a memfd (shmem) mapped shared.
//!
//! Backing regions with shmem rather than private anonymous memory gives the
//! agent two things anonymous memory cannot: it can unmap a page's PTE while
//! the data stays in the page cache (the next touch is a *minor* fault the
//! agent sees: that is how accesses are observed), and it can read, write
//! and free pages through the descriptor without touching the mapping.
//! This module holds all of those syscalls behind a safe type.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use rmem_proto::wire::PAGE_SIZE;

/// A shared mapping of a memfd.
#[derive(Debug)]
pub struct Backing {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
}

// SAFETY: Backing owns the mapping and the descriptor; the raw pointer is
// only an address. Access to the mapped bytes is coordinated by the region's
// page states, not by this type.
unsafe impl Send for Backing {}
// SAFETY: as above; every method takes &self and performs syscalls that the
// kernel serialises.
unsafe impl Sync for Backing {}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Backing {
    /// Creates a memfd of `pages` pages and maps it shared, excluded from
    /// fork (a child gets no mapping instead of sharing the parent's pages
    /// without the agent's fault handling).
    pub fn new(name: &str, pages: usize) -> io::Result<Self> {
        let len = pages * PAGE_SIZE;
        let cname = std::ffi::CString::new(name).expect("no NUL in region name");
        // SAFETY: memfd_create takes a NUL-terminated name and flags.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
        // SAFETY: a fresh shared mapping of our memfd at a kernel-chosen
        // address; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let backing = Self {
            fd,
            base: base.cast(),
            len,
        };
        // SAFETY: advises on our own mapping only.
        cvt(unsafe { libc::madvise(base, len, libc::MADV_DONTFORK) })?;
        Ok(backing)
    }

    /// Start of the mapping.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of page `i`.
    pub fn page_addr(&self, i: usize) -> u64 {
        assert!(i * PAGE_SIZE < self.len, "page {i} out of range");
        self.base as u64 + (i * PAGE_SIZE) as u64
    }

    /// Unmaps the PTEs of pages `[first, first + n)`; the data stays in the
    /// memfd and the next touch is a minor fault.
    pub fn unmap_ptes(&self, first: usize, n: usize) -> io::Result<()> {
        assert!((first + n) * PAGE_SIZE <= self.len);
        let start = self.base.wrapping_add(first * PAGE_SIZE);
        // SAFETY: the range lies inside our mapping; MADV_DONTNEED on a
        // shared mapping drops PTEs only, never the memfd's data.
        cvt(unsafe { libc::madvise(start.cast(), n * PAGE_SIZE, libc::MADV_DONTNEED) })
    }

    /// Reads pages `first..first + out.len()` from the memfd in one call
    /// (more if the kernel returns fewer bytes), never through the mapping.
    pub fn read_pages(&self, first: usize, out: &mut [[u8; PAGE_SIZE]]) -> io::Result<()> {
        let bytes = out.as_flattened_mut();
        let mut done = 0;
        while done < bytes.len() {
            let rest = &mut bytes[done..];
            // SAFETY: reads at most `rest.len()` bytes into `rest` from our
            // own descriptor.
            let n = unsafe {
                libc::pread(
                    self.fd.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    (first * PAGE_SIZE + done) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short read from memfd",
                    ));
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes page `i` into the memfd without mapping it (prefetch).
    pub fn write_page(&self, i: usize, data: &[u8; PAGE_SIZE]) -> io::Result<()> {
        // SAFETY: writes PAGE_SIZE bytes from `data` to our own descriptor.
        let n = unsafe {
            libc::pwrite(
                self.fd.as_raw_fd(),
                data.as_ptr().cast(),
                PAGE_SIZE,
                (i * PAGE_SIZE) as libc::off_t,
            )
        };
        if n != PAGE_SIZE as isize {
            return Err(if n < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::new(io::ErrorKind::WriteZero, "short write to memfd")
            });
        }
        Ok(())
    }

    /// Frees page `i`'s memory (and unmaps it); the next touch is a missing
    /// fault.
    pub fn free_page(&self, i: usize) -> io::Result<()> {
        self.free_pages(i, 1)
    }

    /// Frees pages `first..first + n` in one call.
    pub fn free_pages(&self, first: usize, n: usize) -> io::Result<()> {
        assert!((first + n) * PAGE_SIZE <= self.len);
        // SAFETY: punches a page-aligned range inside our own memfd.
        cvt(unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (first * PAGE_SIZE) as libc::off_t,
                (n * PAGE_SIZE) as libc::off_t,
            )
        })
    }

    /// Bytes of memory the kernel has allocated to the memfd right now.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        // SAFETY: zeroed stat is a valid out-parameter for fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one struct stat for our own descriptor.
        cvt(unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) })?;
        Ok(st.st_blocks as u64 * 512)
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created; nothing
        // else refers to it once the region is gone.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_pages_reads_back_what_was_written() {
        let b = Backing::new("rmem-test", 8).unwrap();
        for i in 0..8 {
            b.write_page(i, &[i as u8 + 1; PAGE_SIZE]).unwrap();
        }
        let mut out = vec![[0u8; PAGE_SIZE]; 5];
        b.read_pages(2, &mut out).unwrap();
        for (k, page) in out.iter().enumerate() {
            assert!(page.iter().all(|&x| x == k as u8 + 3), "page {}", k + 2);
        }
        // Past the end: an error, not a page of garbage.
        assert!(b.read_pages(6, &mut out[..3]).is_err());
    }
}

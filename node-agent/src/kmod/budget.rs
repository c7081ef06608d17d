//! A per-process memory budget: how much of an attached process's private
//! anonymous memory may stay in RAM.
//!
//! DAMON's cold regions are evicted every round whatever the budget. A
//! process with a budget that still holds more than it in RAM then gives
//! up more, coldest regions first (DAMON's `nr_accesses` and `age`, see
//! [`super::damon::coldest_first`]), until it is within its budget.
//!
//! What is in RAM is read from `/proc/PID/pagemap` (bit 63, present):
//! evicted pages are device-private entries there, shown as swap entries,
//! whereas RSS still counts them. Reading it costs 8 bytes per page of
//! anonymous memory per round (2 MiB per GiB), once: the present bits are
//! kept ([`Residency`]) to skip victims already remote. It faults nothing
//! in.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::damon::Region;
use super::uapi::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;
/// Pagemap entries read at once (512 KiB of entries: 256 MiB of memory).
const CHUNK_PAGES: u64 = 64 * 1024;
/// Pagemap bit 63: the page is present in RAM.
const PRESENT: u64 = 1 << 63;
/// Pagemap bit 62: a swap entry, which is how a device-private (remote)
/// page shows (so does a page in swap, on a node that also swaps).
const SWAPPED: u64 = 1 << 62;

/// Which pages of a process's mappings were in RAM when read: one bit per
/// page, so a budget round reads pagemap once and then asks about any
/// range of it (4 KiB of bits per 128 MiB of memory).
#[derive(Debug, Default)]
pub struct Residency {
    /// (first page, end page, index of the first page's bit), sorted.
    spans: Vec<(u64, u64, u64)>,
    bits: Vec<u64>,
    /// Pages present in all of them.
    pub present: u64,
    /// Pages of them that are remote: device-private entries (or, on a
    /// node that also swaps, in swap).
    pub remote: u64,
}

impl Residency {
    /// Reads `/proc/PID/pagemap` over `mappings` (`(start, end)`,
    /// page-aligned, sorted, not overlapping).
    pub fn read(pid: i32, mappings: &[(u64, u64)]) -> io::Result<Self> {
        let f = File::open(format!("/proc/{pid}/pagemap"))?;
        let mut buf = vec![0u8; (CHUNK_PAGES * 8) as usize];
        let total: u64 = mappings.iter().map(|(s, e)| (e - s) / PAGE).sum();
        let mut r = Self {
            spans: Vec::with_capacity(mappings.len()),
            bits: vec![0; total.div_ceil(64) as usize],
            present: 0,
            remote: 0,
        };
        let mut bit = 0u64;
        for &(start, end) in mappings {
            let (first, last) = (start / PAGE, end / PAGE);
            r.spans.push((first, last, bit));
            let mut page = first;
            while page < last {
                let n = (last - page).min(CHUNK_PAGES);
                let bytes = &mut buf[..(n * 8) as usize];
                f.read_exact_at(bytes, page * 8)?;
                for e in bytes.chunks_exact(8) {
                    let entry = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                    if entry & PRESENT != 0 {
                        r.bits[(bit / 64) as usize] |= 1 << (bit % 64);
                        r.present += 1;
                    } else if entry & SWAPPED != 0 {
                        r.remote += 1;
                    }
                    bit += 1;
                }
                page += n;
            }
        }
        Ok(r)
    }

    /// Pages of `[start, end)` that were present (pages outside the
    /// mappings read count as not present).
    pub fn present_in(&self, start: u64, end: u64) -> u64 {
        let (first, last) = (start / PAGE, end.div_ceil(PAGE));
        let mut n = 0;
        for &(s, e, at) in &self.spans {
            let (from, to) = (first.max(s), last.min(e));
            for p in from..to {
                let bit = at + (p - s);
                n += (self.bits[(bit / 64) as usize] >> (bit % 64)) & 1;
            }
        }
        n
    }
}

/// The order in which a process over its budget gives up memory:
/// `regions` (coldest first) clipped to `mappings`, then the parts of
/// `mappings` no region covers: memory mapped since DAMON last looked at
/// the process, whose temperature it does not know yet (a program attached
/// at its start maps most of its memory then). Many of them may be remote
/// already; the caller skips those ([`Residency::present_in`] of the range
/// is 0) and stops once enough moved.
pub fn victims(regions: &[Region], mappings: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for r in regions {
        for &(ms, me) in mappings {
            let (s, e) = (r.start.max(ms), r.end.min(me));
            if s < e {
                out.push((s, e));
            }
        }
    }
    let mut known: Vec<(u64, u64)> = regions.iter().map(|r| (r.start, r.end)).collect();
    known.sort_unstable();
    for &(ms, me) in mappings {
        let mut at = ms;
        for &(rs, re) in &known {
            if re <= at || rs >= me {
                continue;
            }
            if rs > at {
                out.push((at, rs));
            }
            at = at.max(re);
        }
        if at < me {
            out.push((at, me));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(start: u64, end: u64) -> Region {
        Region {
            start,
            end,
            nr_accesses: 0,
            age: 0,
        }
    }

    #[test]
    fn victims_follow_the_given_order_and_clip_to_mappings() {
        let regions = [
            region(0x10000, 0x14000),
            region(0x0, 0x4000),
            region(0x20000, 0x30000),
            region(0x50000, 0x60000),
        ];
        let mappings = [(0x0, 0x2000), (0x11000, 0x40000)];
        assert_eq!(
            victims(&regions, &mappings),
            vec![
                (0x11000, 0x14000),
                (0x0, 0x2000),
                (0x20000, 0x30000),
                // What DAMON has not seen yet comes last.
                (0x14000, 0x20000),
                (0x30000, 0x40000),
            ]
        );
        // A process DAMON has no region of yet: all of its mappings.
        assert_eq!(victims(&[], &mappings), mappings.to_vec());
    }

    #[test]
    fn our_own_heap_is_resident_and_a_fresh_mapping_is_not() {
        let pages = 16usize;
        // SAFETY: a private anonymous mapping of our own, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let start = p as u64;
        let range = [(start, start + (pages * PAGE_SIZE) as u64)];
        let pid = std::process::id() as i32;
        assert_eq!(Residency::read(pid, &range).unwrap().present, 0);
        for i in 0..5 {
            // SAFETY: `i * PAGE_SIZE` is inside the mapping above.
            let byte = unsafe { p.cast::<u8>().add(i * PAGE_SIZE) };
            // SAFETY: a writable page of our own mapping; touching it.
            unsafe { byte.write_volatile(1) };
        }
        let r = Residency::read(pid, &range).unwrap();
        assert_eq!(r.present, 5);
        let page = PAGE_SIZE as u64;
        assert_eq!(r.present_in(start, start + 5 * page), 5);
        assert_eq!(r.present_in(start + 4 * page, start + 16 * page), 1);
        assert_eq!(r.present_in(start + 5 * page, start + 16 * page), 0);
        assert_eq!(r.present_in(start - 8 * page, start + 2 * page), 2);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, pages * PAGE_SIZE) };
    }
}

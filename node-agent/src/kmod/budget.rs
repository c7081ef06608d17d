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
//! anonymous memory per round (2 MiB per GiB) and faults nothing in.

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

/// Pages of `mappings` (`(start, end)`, page-aligned) that are in RAM in
/// process `pid`.
pub fn resident_pages(pid: i32, mappings: &[(u64, u64)]) -> io::Result<u64> {
    let f = File::open(format!("/proc/{pid}/pagemap"))?;
    let mut buf = vec![0u8; (CHUNK_PAGES * 8) as usize];
    let mut present = 0;
    for &(start, end) in mappings {
        let mut page = start / PAGE;
        let last = end / PAGE;
        while page < last {
            let n = (last - page).min(CHUNK_PAGES);
            let bytes = &mut buf[..(n * 8) as usize];
            f.read_exact_at(bytes, page * 8)?;
            present += bytes
                .chunks_exact(8)
                .filter(|e| u64::from_le_bytes((*e).try_into().expect("8 bytes")) & PRESENT != 0)
                .count() as u64;
            page += n;
        }
    }
    Ok(present)
}

/// The order in which a process over its budget gives up memory:
/// `regions` (coldest first) clipped to `mappings`. Many of them may be
/// remote already; the caller skips those ([`resident_pages`] of the range
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
            vec![(0x11000, 0x14000), (0x0, 0x2000), (0x20000, 0x30000)]
        );
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
        assert_eq!(resident_pages(pid, &range).unwrap(), 0);
        for i in 0..5 {
            // SAFETY: `i * PAGE_SIZE` is inside the mapping above.
            let byte = unsafe { p.cast::<u8>().add(i * PAGE_SIZE) };
            // SAFETY: a writable page of our own mapping; touching it.
            unsafe { byte.write_volatile(1) };
        }
        assert_eq!(resident_pages(pid, &range).unwrap(), 5);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, pages * PAGE_SIZE) };
    }
}

//! Workloads at several local-memory fractions: on rmem's userspace path,
//! and on what the kernel already offers (swap on zram, swap on a file
//! through a loop device) under the same local limit, set by a memory
//! cgroup the benchmark creates.
//!
//! A workload runs over a working set of `pages` 4 KiB pages:
//! - `uniform`: a random page per operation, 80% reads of a random word
//!   (checked) and 20% writes;
//! - `zipf`: the same with Zipfian (0.99) page popularity, the hot pages
//!   scattered over the working set;
//! - `scan`: every page front to back, every word checked;
//! - `hash`: an open-addressing hash table filling the working set at load
//!   0.5, 90% gets (value checked) and 10% puts of uniform keys.
//!
//! Every read is checked, so a fast wrong answer cannot pass for a result.
//! Operations per second count the timed phase only; the working set is
//! written first (which is when the pages over the limit leave).

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use serde::{Deserialize, Serialize};

/// Bytes in a page.
pub const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

/// The workloads, in report order.
pub const ALL: [Workload; 4] = [
    Workload::Uniform,
    Workload::Zipf,
    Workload::Scan,
    Workload::Hash,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Uniform,
    Zipf,
    Scan,
    Hash,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Self::Uniform => "uniform",
            Self::Zipf => "zipf",
            Self::Scan => "scan",
            Self::Hash => "hash",
        }
    }
}

/// What one timed run did.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub ops: u64,
    pub seconds: f64,
    /// Seconds spent writing the working set before the timed phase.
    pub init_seconds: f64,
    /// Reads that found the wrong value: any is a failed run.
    pub errors: u64,
    /// Accesses of the timed phase that waited for the backing store:
    /// major faults (kernel swap: the process's own `ru_majflt`), remote
    /// faults (rmem). How good the choice of what to keep local was.
    #[serde(default)]
    pub fetches: u64,
    /// Pages read from the backing store during the timed phase, read-ahead
    /// and prefetch included: `pswpin` (kernel swap; the machine's counter,
    /// so a quiet machine), pages fetched from servers (rmem).
    #[serde(default)]
    pub pages_in: u64,
}

/// The calling process's major faults so far.
pub fn major_faults() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF and a valid out pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0;
    }
    u.ru_majflt as u64
}

/// Pages swapped in on this machine so far (`pswpin` of /proc/vmstat).
pub fn pages_swapped_in() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("pswpin ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

impl Outcome {
    pub fn ops_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ops as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// A page's tag; word `k` of page `p` holds `tag(p) ^ k`.
fn tag(p: usize) -> u64 {
    (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

/// The memory a workload runs on: `pages` pages at `base`.
pub struct Memory {
    base: *mut u64,
    pages: usize,
}

impl Memory {
    /// # Safety
    /// `base` must point at `pages * PAGE` bytes, writable, 8-byte aligned,
    /// that only this `Memory` touches while it lives.
    pub unsafe fn new(base: *mut u8, pages: usize) -> Self {
        Self {
            base: base.cast(),
            pages,
        }
    }

    fn word(&self, i: usize) -> *mut u64 {
        debug_assert!(i < self.pages * WORDS);
        self.base.wrapping_add(i)
    }

    fn read(&self, i: usize) -> u64 {
        // SAFETY: `i` is inside the memory (checked in debug builds), which
        // `new`'s caller vouched for; volatile so the access really happens.
        unsafe { self.word(i).read_volatile() }
    }

    fn write(&self, i: usize, v: u64) {
        // SAFETY: as in `read`.
        unsafe { self.word(i).write_volatile(v) }
    }
}

/// Hash-table slots: (key, value), key 0 is empty.
const SLOT_WORDS: usize = 2;

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn value_of(key: u64) -> u64 {
    mix(key ^ 0x5555_5555_5555_5555) | 1
}

/// The odd multiplier of the slot hash, and its inverse modulo 2^64.
const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;

const fn inverse(a: u64) -> u64 {
    // Newton's iteration doubles the correct low bits each step.
    let mut x = a;
    let mut i = 0;
    while i < 6 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
        i += 1;
    }
    x
}

/// `SPREAD`'s multiplicative inverse modulo 2^64, computed once at build.
const UNSPREAD: u64 = inverse(SPREAD);

/// A hash table of `slots` (a power of two) slots with linear probing.
/// The slot hash, key times an odd constant modulo `slots`, is a bijection
/// on `[0, slots)`: the initial keys never collide, so `init` writes the
/// table front to back instead of inserting at random (which on a
/// quarter-local working set would take minutes of faults).
struct Table<'m> {
    mem: &'m Memory,
    slots: usize,
}

impl<'m> Table<'m> {
    fn new(mem: &'m Memory) -> Self {
        let words = mem.pages * WORDS;
        Self {
            mem,
            slots: 1 << (words / SLOT_WORDS).ilog2(),
        }
    }

    /// Keys `1..=keys()` are in the table after `init`.
    fn keys(&self) -> u64 {
        (self.slots / 2) as u64
    }

    fn slot_of(&self, key: u64) -> usize {
        (key.wrapping_mul(SPREAD) & (self.slots as u64 - 1)) as usize
    }

    /// The key whose home is `slot`.
    fn key_at(&self, slot: usize) -> u64 {
        (slot as u64).wrapping_mul(UNSPREAD) & (self.slots as u64 - 1)
    }

    /// Inserts or overwrites `key`.
    fn put(&self, key: u64) {
        let mut s = self.slot_of(key);
        loop {
            let k = self.mem.read(s * SLOT_WORDS);
            if k == 0 || k == key {
                self.mem.write(s * SLOT_WORDS, key);
                self.mem.write(s * SLOT_WORDS + 1, value_of(key));
                return;
            }
            s = (s + 1) % self.slots;
        }
    }

    /// Whether `key` is present with its value.
    fn get(&self, key: u64) -> bool {
        let mut s = self.slot_of(key);
        loop {
            let k = self.mem.read(s * SLOT_WORDS);
            if k == key {
                return self.mem.read(s * SLOT_WORDS + 1) == value_of(key);
            }
            if k == 0 {
                return false;
            }
            s = (s + 1) % self.slots;
        }
    }
}

/// Writes the working set `w` expects (every word of every page).
pub fn init(w: Workload, mem: &Memory) {
    match w {
        Workload::Hash => {
            // Front to back: every slot holds the key whose home it is, if
            // that key is one of the initial ones, else nothing.
            let t = Table::new(mem);
            for s in 0..t.slots {
                let key = t.key_at(s);
                let (k, v) = if (1..=t.keys()).contains(&key) {
                    (key, value_of(key))
                } else {
                    (0, 0)
                };
                mem.write(s * SLOT_WORDS, k);
                mem.write(s * SLOT_WORDS + 1, v);
            }
            // The rest of the working set (when it is not a power of two
            // of slots) is written too, so every system holds all of it.
            for i in t.slots * SLOT_WORDS..mem.pages * WORDS {
                mem.write(i, 0);
            }
        }
        _ => {
            for p in 0..mem.pages {
                let t = tag(p);
                for k in 0..WORDS {
                    mem.write(p * WORDS + k, t ^ k as u64);
                }
            }
        }
    }
}

/// Runs `ops` operations of `w` on memory `init` prepared, or fewer if
/// `budget` runs out first (a slow system must not take minutes). A
/// warm-up of one operation per page (within the same budget, not
/// measured) comes first, so what stays local is the system's choice under
/// this workload, not what the initial writes left: the waits counted then
/// compare systems however many operations each gets through. `waits`
/// reads the system's counters of waits for the backing store and of
/// pages read in (see [`Outcome`]).
pub fn run(
    w: Workload,
    mem: &Memory,
    ops: u64,
    budget: Duration,
    seed: u64,
    waits: &dyn Fn() -> (u64, u64),
) -> Outcome {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (_, warm_errors) = operate(w, mem, mem.pages as u64, budget, &mut rng);
    let before = waits();
    let start = Instant::now();
    let (done, errors) = operate(w, mem, ops, budget, &mut rng);
    let seconds = start.elapsed().as_secs_f64();
    let after = waits();
    Outcome {
        ops: done,
        seconds,
        init_seconds: 0.0,
        errors: errors + warm_errors,
        fetches: after.0.saturating_sub(before.0),
        pages_in: after.1.saturating_sub(before.1),
    }
}

/// Kernel swap's waits: this process's major faults, and the machine's
/// pages swapped in.
pub fn swap_waits() -> (u64, u64) {
    (major_faults(), pages_swapped_in())
}

/// Runs up to `ops` operations of `w` for at most `budget`; returns how
/// many ran and how many reads found a wrong value.
fn operate(
    w: Workload,
    mem: &Memory,
    ops: u64,
    budget: Duration,
    rng: &mut rand::rngs::StdRng,
) -> (u64, u64) {
    let mut errors = 0;
    let start = Instant::now();
    let over = |i: u64| i % 256 == 255 && start.elapsed() > budget;
    let done = match w {
        Workload::Uniform | Workload::Zipf => {
            let zipf = rand_distr::Zipf::new(mem.pages as f64, 0.99).expect("valid Zipf");
            let mut done = 0;
            while done < ops && !over(done) {
                done += 1;
                let p = if w == Workload::Uniform {
                    rng.random_range(0..mem.pages)
                } else {
                    // Rank 1 is the hottest; scatter ranks so the hot set is
                    // not one contiguous run.
                    let rank = zipf.sample(rng) as u64 - 1;
                    (rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) % mem.pages as u64) as usize
                };
                let k = rng.random_range(0..WORDS);
                let want = tag(p) ^ k as u64;
                if rng.random_bool(0.2) {
                    mem.write(p * WORDS + k, want);
                } else if mem.read(p * WORDS + k) != want {
                    errors += 1;
                }
            }
            done
        }
        Workload::Scan => {
            // Front to back, wrapping, one page per operation.
            let mut done = 0;
            while done < ops && !over(done) {
                let p = (done % mem.pages as u64) as usize;
                let t = tag(p);
                for k in 0..WORDS {
                    if mem.read(p * WORDS + k) != t ^ k as u64 {
                        errors += 1;
                    }
                }
                done += 1;
            }
            done
        }
        Workload::Hash => {
            let t = Table::new(mem);
            let keys = t.keys();
            let mut done = 0;
            while done < ops && !over(done) {
                done += 1;
                let key = rng.random_range(1..=keys);
                if rng.random_bool(0.1) {
                    t.put(key);
                } else if !t.get(key) {
                    errors += 1;
                }
            }
            done
        }
    };
    (done, errors)
}

/// Maps `pages` of private anonymous memory, runs `init` and `run` on it.
pub fn on_anonymous(
    w: Workload,
    pages: usize,
    ops: u64,
    budget: Duration,
    seed: u64,
) -> std::io::Result<Outcome> {
    let len = pages * PAGE;
    // SAFETY: a fresh private anonymous mapping; no other memory is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // 4 KiB pages, as rmem moves them: a transparent huge page would make
    // the local baseline faster and swap move 2 MiB at a time.
    // SAFETY: advice on the mapping made above.
    unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) };
    // SAFETY: the mapping above is `len` bytes, page-aligned, ours alone.
    let mem = unsafe { Memory::new(base.cast(), pages) };
    let t0 = Instant::now();
    init(w, &mem);
    let init_seconds = t0.elapsed().as_secs_f64();
    let mut out = run(w, &mem, ops, budget, seed, &swap_waits);
    out.init_seconds = init_seconds;
    // SAFETY: unmapping exactly the mapping made above; `mem` is not used
    // afterwards.
    unsafe { libc::munmap(base, len) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_reads_back_what_it_wrote() {
        for w in ALL {
            let out = on_anonymous(w, 64, 5_000, Duration::from_secs(60), 7).unwrap();
            assert_eq!(out.errors, 0, "{w:?}");
            assert_eq!(out.ops, 5_000, "{w:?}: {out:?}");
        }
    }

    #[test]
    fn the_slot_hash_is_a_bijection_and_init_places_every_key_home() {
        assert_eq!(SPREAD.wrapping_mul(UNSPREAD), 1);
        let pages = 8;
        let mut buf = vec![0u64; pages * WORDS];
        // SAFETY: `buf` is pages * PAGE bytes, 8-byte aligned, ours alone.
        let mem = unsafe { Memory::new(buf.as_mut_ptr().cast(), pages) };
        init(Workload::Hash, &mem);
        let t = Table::new(&mem);
        for key in 1..=t.keys() {
            assert_eq!(t.key_at(t.slot_of(key)), key);
            assert!(t.get(key), "key {key}");
            assert_eq!(mem.read(t.slot_of(key) * SLOT_WORDS), key);
        }
        assert!(!t.get(t.keys() + 1));
    }

    #[test]
    fn a_corrupted_page_is_caught() {
        let pages = 16;
        let mut buf = vec![0u64; pages * WORDS];
        // SAFETY: `buf` is pages * PAGE bytes, 8-byte aligned, ours alone.
        let mem = unsafe { Memory::new(buf.as_mut_ptr().cast(), pages) };
        init(Workload::Scan, &mem);
        mem.write(3 * WORDS + 5, 0);
        let forever = Duration::from_secs(60);
        // Seen once by the warm-up's pass, once by the timed one.
        assert_eq!(
            run(Workload::Scan, &mem, pages as u64, forever, 1, &swap_waits).errors,
            2
        );
        init(Workload::Hash, &mem);
        for i in (1..pages * WORDS).step_by(SLOT_WORDS) {
            mem.write(i, 2); // every value wrong
        }
        assert!(run(Workload::Hash, &mem, 100, forever, 1, &swap_waits).errors > 0);
        // A budget stops a long run early.
        let out = run(
            Workload::Uniform,
            &mem,
            u64::MAX,
            Duration::from_millis(20),
            1,
            &swap_waits,
        );
        assert!(out.ops > 0 && out.seconds < 5.0, "{out:?}");
    }
}

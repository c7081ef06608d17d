//! The userspace (userfaultfd) path end to end: a [`RemoteRegion`] much
//! larger than its budget, written sequentially (eviction), read at random
//! with prefetch off (fault-back latency as the program sees it), and
//! scanned with prefetch on.
//!
//! Every page read is checked, so a fast wrong answer cannot pass for a
//! result.

use std::time::Instant;

use rmem_agent::region::StatsSnapshot;
use rmem_agent::{RegionConfig, RemoteRegion};
use rmem_client::{ClientConfig, PAGE_SIZE};
use rmem_common::Histogram;
use serde::Serialize;

use crate::limits::{PingPong, mib};
use crate::{BenchError, Latency};

/// What the userspace path achieved.
#[derive(Debug, Clone, Serialize)]
pub struct RegionFigures {
    /// A read of an evicted page, timed around the load instruction.
    pub fault_us: Latency,
    /// Raw 4 KiB TCP round trips interleaved with those faults: the floor
    /// under the same conditions.
    pub rtt_between_faults_us: Latency,
    /// The same faults timed inside the agent (fault message read to
    /// UFFDIO_COPY done): the difference is the kernel's share.
    pub fault_service_us: Latency,
    /// Pages stored per second of evictor work.
    pub evict_mib_s: f64,
    /// The program writing a region 8x its budget, eviction included.
    pub seq_write_mib_s: f64,
    /// The program reading a fully evicted region front to back, prefetch on.
    pub seq_scan_mib_s: f64,
    pub prefetch_hit_rate: f64,
    pub pages_evicted: u64,
    pub pages_fetched: u64,
    /// The fault latency's distribution: `[µs, fraction of faults at or
    /// below it]`, for the latency plot.
    pub fault_cdf_us: Vec<[f64; 2]>,
}

/// Points of `h`'s cumulative distribution, in microseconds.
fn cdf_us(h: &Histogram) -> Vec<[f64; 2]> {
    if h.count() == 0 {
        return Vec::new();
    }
    let mut qs: Vec<f64> = (1..100).map(|i| f64::from(i) / 100.0).collect();
    qs.extend([0.995, 0.999, 0.9995, 0.9999, 1.0]);
    qs.into_iter()
        .map(|q| [h.quantile(q) as f64 / 1000.0, q])
        .collect()
}

#[derive(Debug, Clone, Copy)]
pub struct Effort {
    pub size: u64,
    pub budget: u64,
    pub random_reads: usize,
}

/// A page's tag: its first and last word, checked on every read.
fn tag(p: usize) -> u64 {
    (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

pub(crate) struct Mem<'r> {
    pub region: &'r RemoteRegion,
}

impl Mem<'_> {
    /// Writes every page (the region evicts as it goes); MiB/s.
    pub fn fill(&self) -> f64 {
        fill(self)
    }

    /// Reads page `p` and checks it.
    pub fn verify(&self, p: usize) -> Result<(), BenchError> {
        verify(self.check(p), p)
    }

    /// Reads `reads` random evicted pages (a resident page drawn is read
    /// and checked, untimed), each timed around its faulting load into
    /// `faults`, with `between` run before each timed read (untimed);
    /// every page read is checked. `seed` picks the sequence.
    pub fn timed_random_faults(
        &self,
        reads: usize,
        seed: u64,
        faults: &Histogram,
        mut between: impl FnMut() -> Result<(), BenchError>,
    ) -> Result<(), BenchError> {
        let r = self.region;
        let mut rng = seed | 1;
        let mut measured = 0;
        while measured < reads {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let p = (rng % r.pages() as u64) as usize;
            if r.is_resident(p) {
                self.verify(p)?;
                continue;
            }
            between()?;
            let t = Instant::now();
            let ok = self.check(p);
            faults.record_duration(t.elapsed());
            verify(ok, p)?;
            measured += 1;
        }
        Ok(())
    }

    fn word(&self, p: usize, k: usize) -> *mut u64 {
        debug_assert!(p < self.region.pages() && k < PAGE_SIZE / 8);
        self.region.as_ptr().wrapping_add(p * PAGE_SIZE + k * 8) as *mut u64
    }

    /// Fills page `p`; every word is non-zero so eviction has to send it.
    fn write(&self, p: usize) {
        let t = tag(p);
        for k in 0..PAGE_SIZE / 8 {
            // SAFETY: page `p` lies inside the live region (checked in
            // debug builds), only this thread touches it, and its faults
            // are served by the region's threads.
            unsafe { self.word(p, k).write_volatile(t ^ k as u64) };
        }
    }

    /// Reads page `p`'s first word (the faulting access) and checks both
    /// tags.
    fn check(&self, p: usize) -> bool {
        // SAFETY: as in `write`.
        let first = unsafe { self.word(p, 0).read_volatile() };
        // SAFETY: as in `write`.
        let last = unsafe { self.word(p, PAGE_SIZE / 8 - 1).read_volatile() };
        first == tag(p) && last == tag(p) ^ (PAGE_SIZE / 8 - 1) as u64
    }
}

fn region(
    client: &ClientConfig,
    effort: Effort,
    prefetch: usize,
) -> Result<RemoteRegion, BenchError> {
    Ok(RemoteRegion::new(
        RegionConfig {
            size: effort.size,
            budget: effort.budget,
            prefetch_max: prefetch,
            ..RegionConfig::default()
        },
        client.clone(),
    )?)
}

fn fill(mem: &Mem<'_>) -> f64 {
    let pages = mem.region.pages();
    let t = Instant::now();
    for p in 0..pages {
        mem.write(p);
    }
    mib((pages * PAGE_SIZE) as u64) / t.elapsed().as_secs_f64()
}

fn verify(ok: bool, p: usize) -> Result<(), BenchError> {
    if ok {
        Ok(())
    } else {
        Err(BenchError::Verify { page: p })
    }
}

pub fn measure(
    client: &ClientConfig,
    effort: Effort,
    raw: &mut PingPong,
) -> Result<RegionFigures, BenchError> {
    // Eviction and fault-back, prefetch off.
    let r = region(client, effort, 0)?;
    let mem = Mem { region: &r };
    let seq_write_mib_s = fill(&mem);
    let wrote = r.stats();
    let faults = Histogram::new();
    let rtt = Histogram::new();
    mem.timed_random_faults(effort.random_reads, 0x2545_F491_4F6C_DD1D, &faults, || {
        rtt.record_duration(raw.round_trip()?);
        Ok(())
    })?;
    let after_reads = r.stats();
    drop(r);

    // Sequential scan of an evicted region, prefetch on.
    let r = region(client, effort, RegionConfig::default().prefetch_max)?;
    let mem = Mem { region: &r };
    fill(&mem);
    let before_scan = r.stats();
    let t = Instant::now();
    for p in 0..r.pages() {
        verify(mem.check(p), p)?;
    }
    let seq_scan_mib_s = mib(effort.size) / t.elapsed().as_secs_f64();
    let scanned = r.stats();
    drop(r);

    let issued = scanned.prefetch_issued - before_scan.prefetch_issued;
    let hits = scanned.prefetch_hits - before_scan.prefetch_hits;
    Ok(RegionFigures {
        fault_us: Latency::from_ns(&faults),
        rtt_between_faults_us: Latency::from_ns(&rtt),
        fault_service_us: Latency::from_percentiles_ns(after_reads.fault_remote_latency_ns),
        evict_mib_s: evict_rate(&wrote),
        seq_write_mib_s,
        seq_scan_mib_s,
        prefetch_hit_rate: if issued > 0 {
            hits as f64 / issued as f64
        } else {
            0.0
        },
        pages_evicted: after_reads.pages_evicted + scanned.pages_evicted,
        pages_fetched: after_reads.faults_remote + scanned.faults_remote + scanned.prefetch_issued,
        fault_cdf_us: cdf_us(&faults),
    })
}

pub(crate) fn evict_rate(s: &StatsSnapshot) -> f64 {
    if s.evict_busy_ns == 0 {
        return 0.0;
    }
    mib(s.pages_evicted * PAGE_SIZE as u64) / (s.evict_busy_ns as f64 / 1e9)
}

//! What sealing pages (`--seal`: AES-256-GCM in the agent, for servers not
//! trusted with them) costs: the cipher alone per 4 KiB page, in process,
//! and the userspace path end to end (eviction rate, fault-back latency),
//! sealed and not, against the same server. Sealed and plain runs
//! alternate in rounds, so drift hits both alike; every page read is
//! checked.

use std::time::Instant;

use rmem_agent::remote::seal::Seal;
use rmem_agent::{RegionConfig, RemoteRegion};
use rmem_client::{ClientConfig, PAGE_SIZE};
use rmem_common::Histogram;
use serde::Serialize;

use crate::region::{Effort, Mem, evict_rate};
use crate::{BenchError, Latency};

#[derive(Debug, Clone, Serialize)]
pub struct SealCost {
    /// Sealing one page (encrypt, tag kept), ns.
    pub seal_ns_per_page: f64,
    /// Opening one page (tag checked, decrypt), ns.
    pub open_ns_per_page: f64,
    /// A read of an evicted page, timed around the load instruction.
    pub fault_us: Latency,
    pub fault_sealed_us: Latency,
    /// Pages stored per second of evictor work.
    pub evict_mib_s: f64,
    pub evict_sealed_mib_s: f64,
}

/// The cipher alone: `pages` distinct handles sealed, then opened.
fn cipher(pages: u64) -> (f64, f64) {
    let seal = Seal::generate(0);
    let mut plain = [0u8; PAGE_SIZE];
    for (i, b) in plain.iter_mut().enumerate() {
        *b = i as u8;
    }
    let mut out = vec![[0u8; PAGE_SIZE]; 64];
    let t = Instant::now();
    for h in 0..pages {
        let o = &mut out[(h % 64) as usize];
        seal.seal(h, &plain, o).expect("a fresh handle");
    }
    let seal_ns = t.elapsed().as_nanos() as f64 / pages as f64;
    // Open the last 64 sealed, over and over (a page opened is plaintext
    // again: reseal it outside the timing).
    let first = pages.saturating_sub(64);
    let mut opened = 0u64;
    let mut spent = 0u128;
    while opened < pages {
        for h in first..pages {
            let o = &mut out[(h % 64) as usize];
            let t = Instant::now();
            seal.open(h, o).expect("its own page");
            spent += t.elapsed().as_nanos();
            seal.seal(h, &plain, o).expect("the same bytes again");
            opened += 1;
        }
    }
    (seal_ns, spent as f64 / opened as f64)
}

/// One round: a region sealed or not, filled (eviction), then random
/// reads of evicted pages.
fn round(
    client: &ClientConfig,
    effort: Effort,
    seal: bool,
    faults: &Histogram,
) -> Result<f64, BenchError> {
    let r = RemoteRegion::new(
        RegionConfig {
            size: effort.size,
            budget: effort.budget,
            prefetch_max: 0,
            seal,
            ..RegionConfig::default()
        },
        client.clone(),
    )?;
    let mem = Mem { region: &r };
    mem.fill();
    let wrote = r.stats();
    mem.timed_random_faults(
        effort.random_reads,
        0x9E37_79B9_7F4A_7C15 ^ u64::from(seal),
        faults,
        || Ok(()),
    )?;
    let st = r.stats();
    if seal && (st.pages_sealed == 0 || st.pages_opened == 0 || st.pages_seal_refused > 0) {
        return Err(BenchError::Invalid {
            field: "seal",
            reason: format!("the sealed region did not seal every page: {st:?}"),
        });
    }
    Ok(evict_rate(&wrote))
}

pub fn measure(
    client: &ClientConfig,
    effort: Effort,
    rounds: usize,
) -> Result<SealCost, BenchError> {
    let (seal_ns, open_ns) = cipher(20_000);
    let (plain, sealed) = (Histogram::new(), Histogram::new());
    let (mut evict, mut evict_sealed) = (0.0, 0.0);
    let effort = Effort {
        random_reads: effort.random_reads / rounds.max(1),
        ..effort
    };
    for _ in 0..rounds.max(1) {
        evict += round(client, effort, false, &plain)?;
        evict_sealed += round(client, effort, true, &sealed)?;
    }
    let n = rounds.max(1) as f64;
    Ok(SealCost {
        seal_ns_per_page: seal_ns,
        open_ns_per_page: open_ns,
        fault_us: Latency::from_ns(&plain),
        fault_sealed_us: Latency::from_ns(&sealed),
        evict_mib_s: evict / n,
        evict_sealed_mib_s: evict_sealed / n,
    })
}

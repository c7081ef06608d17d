//! What `/metrics` costs the fault path: the userspace path's fault-back
//! latency with a scraper rendering the region's exposition every 10 ms
//! (hundreds of times Prometheus' usual rate, so any cost shows), against
//! the same without, rounds alternating so drift hits both alike; and the
//! time one exposition takes to render. Nothing is recorded for the
//! metrics on the fault path itself (a scrape reads the counters kept
//! anyway), so the two should be within noise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rmem_agent::{RegionConfig, RemoteRegion};
use rmem_client::ClientConfig;
use rmem_common::Histogram;
use serde::Serialize;

use crate::region::{Effort, Mem};
use crate::{BenchError, Latency};

/// How often the scraper renders during the scraped rounds.
const SCRAPE_EVERY: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Serialize)]
pub struct MetricsCost {
    /// A read of an evicted page, timed around the load instruction.
    pub fault_us: Latency,
    /// The same while the region's exposition is rendered every 10 ms.
    pub fault_scraped_us: Latency,
    /// Rendering one exposition of the region (its counters read, its
    /// page states scanned for the remote count, the text written), µs.
    pub render_us: f64,
    /// Expositions rendered during the scraped rounds.
    pub scrapes: u64,
}

/// One round: a region filled (eviction), then random reads of evicted
/// pages; with `scraped`, a thread renders its exposition meanwhile.
fn round(
    client: &ClientConfig,
    effort: Effort,
    scraped: bool,
    faults: &Histogram,
    renders: &Histogram,
) -> Result<(), BenchError> {
    let r = RemoteRegion::new(
        RegionConfig {
            size: effort.size,
            budget: effort.budget,
            prefetch_max: 0,
            ..RegionConfig::default()
        },
        client.clone(),
    )?;
    let mem = Mem { region: &r };
    mem.fill();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        if scraped {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let text = rmem_agent::metrics::region(&r).encode();
                    renders.record_duration(t.elapsed());
                    std::hint::black_box(text);
                    std::thread::sleep(SCRAPE_EVERY);
                }
            });
        }
        let result = mem.timed_random_faults(
            effort.random_reads,
            0x9E37_79B9_7F4A_7C15 ^ u64::from(scraped),
            faults,
            || Ok(()),
        );
        done.store(true, Ordering::Relaxed);
        result
    })
}

pub fn measure(
    client: &ClientConfig,
    effort: Effort,
    rounds: usize,
) -> Result<MetricsCost, BenchError> {
    let (plain, scraped, renders) = (Histogram::new(), Histogram::new(), Histogram::new());
    let effort = Effort {
        random_reads: effort.random_reads / rounds.max(1),
        ..effort
    };
    for _ in 0..rounds.max(1) {
        round(client, effort, false, &plain, &renders)?;
        round(client, effort, true, &scraped, &renders)?;
    }
    Ok(MetricsCost {
        fault_us: Latency::from_ns(&plain),
        fault_scraped_us: Latency::from_ns(&scraped),
        render_us: renders.percentiles().mean / 1e3,
        scrapes: renders.count(),
    })
}

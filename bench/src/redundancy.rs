//! What redundancy costs on the userspace path: eviction throughput and
//! fault-back latency with each policy (`none`, `replicas=2`, `ec=4+2`) on
//! six embedded servers, the remote memory each keeps per evicted page,
//! and faults served while one server is gone (degraded: the dead server
//! is tried first, found failing, and another copy read or the page
//! rebuilt from four others of its stripe).
//!
//! Every page read is checked, as in [`crate::region`].

use std::time::Instant;

use rmem_agent::{RegionConfig, RemoteRegion};
use rmem_client::{BlockingConnection, ClientConfig};
use rmem_common::{ByteSize, Histogram, Redundancy};
use rmem_server::embedded::EmbeddedServer;
use serde::Serialize;

use crate::region::{Effort, Mem, evict_rate};
use crate::{BenchError, Latency};

/// Servers the policies are measured on (ec=4+2 spans six).
const SERVERS: usize = 6;

/// The policies measured.
const POLICIES: [Redundancy; 3] = [
    Redundancy::None,
    Redundancy::Replicas(2),
    Redundancy::Erasure { data: 4, parity: 2 },
];

/// Faults read before measuring: every fault thread has its connections
/// (and, once a server is gone, has found it failing).
const WARM_UP: usize = 200;

/// One policy's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyFigures {
    pub policy: String,
    /// Pages stored per second of evictor work (every copy acknowledged).
    pub evict_mib_s: f64,
    /// Fault-back of an evicted page, as the program sees it.
    pub fault_us: Latency,
    /// Pages the servers hold per page evicted (1 for `none`).
    pub remote_per_page: f64,
}

/// Faults while one of the servers is gone.
#[derive(Debug, Clone, Serialize)]
pub struct Degraded {
    pub policy: String,
    /// Every fault measured.
    pub fault_us: Latency,
    /// The degraded ones alone: those that read another copy than the
    /// first, or rebuilt the page.
    pub degraded_us: Latency,
    /// Faults that read another copy than the first, or rebuilt the page.
    pub faults_degraded: u64,
}

/// What the servers alone cost a fault, measured on the same servers
/// (interleaved): one GET, which a healthy fault waits for, and four GETs
/// to four servers sent together, which a degraded `ec=4+2` fault waits
/// for. Their ratio is the floor of the degraded fault's cost on this
/// machine: on two cores the four servers cannot all answer at once.
#[derive(Debug, Clone, Serialize)]
pub struct Floors {
    /// One GET of one page, answered.
    pub one_get_us: Latency,
    /// A GET of one page to each of four servers, sent together, all
    /// answered.
    pub four_gets_us: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedundancyFigures {
    pub servers: usize,
    pub policies: Vec<PolicyFigures>,
    pub degraded: Vec<Degraded>,
    pub floors: Floors,
}

/// Three fresh servers, and how to reach them.
fn servers(effort: Effort) -> Result<(Vec<EmbeddedServer>, Vec<ClientConfig>), BenchError> {
    let servers = (0..SERVERS)
        .map(|_| {
            Ok(EmbeddedServer::with_config(
                &rmem_server::config::ServerConfig {
                    listen: "127.0.0.1:0".parse().expect("valid address"),
                    grpc: "127.0.0.1:0".parse().expect("valid address"),
                    capacity: ByteSize(effort.size * 2 + (16 << 20)),
                    prefault: true,
                    ..Default::default()
                },
                1,
            )?)
        })
        .collect::<Result<Vec<_>, BenchError>>()?;
    let configs = servers
        .iter()
        .map(|s| ClientConfig::new(s.data_addr().to_string()))
        .collect();
    Ok((servers, configs))
}

fn region(
    configs: &[ClientConfig],
    effort: Effort,
    policy: Redundancy,
) -> Result<RemoteRegion, BenchError> {
    Ok(RemoteRegion::with_servers(
        RegionConfig {
            size: effort.size,
            budget: effort.budget,
            prefetch_max: 0,
            redundancy: Some(policy),
            ..RegionConfig::default()
        },
        configs.to_vec(),
    )?)
}

/// Reads `n` random evicted pages, timing each fault: all of them, and
/// the degraded ones alone.
fn random_faults(mem: &Mem<'_>, n: usize, seed: u64) -> Result<(Histogram, Histogram), BenchError> {
    let (faults, degraded) = (Histogram::new(), Histogram::new());
    let mut x = seed | 1;
    let pages = mem.region.pages();
    let mut measured = 0;
    while measured < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = (x % pages as u64) as usize;
        if mem.region.is_resident(p) {
            mem.verify(p)?;
            continue;
        }
        let before = mem.region.stats().faults_degraded;
        let t = Instant::now();
        let r = mem.verify(p);
        let took = t.elapsed();
        faults.record_duration(took);
        if mem.region.stats().faults_degraded > before {
            degraded.record_duration(took);
        }
        r?;
        measured += 1;
    }
    Ok((faults, degraded))
}

/// Handles of the floor's pages: far above any region's.
const FLOOR_HANDLE: u64 = 1 << 60;

/// [`Floors`], on fresh servers (`n` of each, interleaved).
fn floors(configs: &[ClientConfig], n: usize) -> Result<Floors, BenchError> {
    let mut conns = configs[..4]
        .iter()
        .map(BlockingConnection::connect)
        .collect::<Result<Vec<_>, _>>()?;
    let page = [0x5au8; rmem_client::PAGE_SIZE];
    for c in &mut conns {
        if let Some(s) = c.put(&[(FLOOR_HANDLE, &page)])?.first()
            && *s != rmem_client::PageStatus::Ok
        {
            return Err(BenchError::Page(*s));
        }
    }
    let (one, four) = (Histogram::new(), Histogram::new());
    let mut out = [[0u8; rmem_client::PAGE_SIZE]];
    let check = |status: Option<&rmem_client::PageStatus>, out: &rmem_client::Page| match status {
        Some(rmem_client::PageStatus::Ok) if *out == page => Ok(()),
        Some(s) if *s != rmem_client::PageStatus::Ok => Err(BenchError::Page(*s)),
        _ => Err(BenchError::Verify { page: 0 }),
    };
    for i in 0..n + WARM_UP {
        let t = Instant::now();
        let c = &mut conns[i % 4];
        let s = c.get(&[FLOOR_HANDLE], &mut out)?.first().copied();
        let took = t.elapsed();
        check(s.as_ref(), &out[0])?;
        let t = Instant::now();
        let mut ids = Vec::with_capacity(4);
        for c in &mut conns {
            ids.push(c.get_start(&[FLOOR_HANDLE])?);
        }
        for (c, id) in conns.iter_mut().zip(ids) {
            let s = c
                .get_finish(id, &[FLOOR_HANDLE], &mut out)?
                .first()
                .copied();
            check(s.as_ref(), &out[0])?;
        }
        if i >= WARM_UP {
            one.record_duration(took);
            four.record_duration(t.elapsed());
        }
    }
    for c in &mut conns {
        c.free(&[FLOOR_HANDLE])?;
    }
    Ok(Floors {
        one_get_us: Latency::from_ns(&one),
        four_gets_us: Latency::from_ns(&four),
    })
}

fn used(configs: &[ClientConfig]) -> Result<u64, BenchError> {
    let mut total = 0;
    for c in configs {
        total += BlockingConnection::connect(c)?.stat()?.used_pages;
    }
    Ok(total)
}

pub fn measure(effort: Effort) -> Result<RedundancyFigures, BenchError> {
    let reads = effort.random_reads;
    let floors = {
        let (_servers, configs) = servers(effort)?;
        floors(&configs, reads)?
    };
    let mut policies = Vec::new();
    for policy in POLICIES {
        let (_servers, configs) = servers(effort)?;
        let r = region(&configs, effort, policy)?;
        let mem = Mem { region: &r };
        mem.fill();
        let wrote = r.stats();
        let remote = (r.pages() - wrote.resident_pages) as f64;
        let held = used(&configs)? as f64;
        // Warm: every fault thread connected to the servers it reads.
        random_faults(&mem, WARM_UP, 0x5851_F42D_4C95_7F2D)?;
        let (faults, _) = random_faults(&mem, reads, 0x2545_F491_4F6C_DD1D)?;
        policies.push(PolicyFigures {
            policy: policy.to_string(),
            evict_mib_s: evict_rate(&wrote),
            fault_us: Latency::from_ns(&faults),
            remote_per_page: if remote > 0.0 { held / remote } else { 0.0 },
        });
    }

    // Degraded: each redundant policy, then one of the servers stops.
    let mut degraded = Vec::new();
    for policy in POLICIES.into_iter().filter(|p| p.tolerates() > 0) {
        let (mut servers, configs) = servers(effort)?;
        let r = region(&configs, effort, policy)?;
        let mem = Mem { region: &r };
        mem.fill();
        random_faults(&mem, WARM_UP, 0x5851_F42D_4C95_7F2D)?;
        drop(servers.remove(0));
        // The first faults find the server failing (each fault thread once,
        // bounded by `failover_after`); what is measured is after that.
        random_faults(&mem, WARM_UP, 0x1405_7B7E_F767_814F)?;
        let before = r.stats().faults_degraded;
        let (faults, slow) = random_faults(&mem, reads, 0x9E37_79B9_7F4A_7C15)?;
        degraded.push(Degraded {
            policy: policy.to_string(),
            fault_us: Latency::from_ns(&faults),
            degraded_us: Latency::from_ns(&slow),
            faults_degraded: r.stats().faults_degraded - before,
        });
    }
    Ok(RedundancyFigures {
        servers: SERVERS,
        policies,
        degraded,
        floors,
    })
}

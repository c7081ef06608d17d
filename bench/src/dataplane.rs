//! The memory server's data plane over TCP: single-page GET and PUT at
//! queue depth 1 (what a fault pays), at queue depth 32 (what a busy node
//! gets), and 64-page batches (what eviction and prefetch send).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmem_client::{BlockingConnection, ClientConfig, Connection, PAGE_SIZE, Page, PageStatus};
use rmem_common::Histogram;
use serde::Serialize;

use crate::limits::{PingPong, mib};
use crate::{BenchError, Latency};

/// Data-plane figures.
#[derive(Debug, Clone, Serialize)]
pub struct DataPlane {
    pub get_qd1_us: Latency,
    pub put_qd1_us: Latency,
    pub get_qd32_ops_s: f64,
    pub put_qd32_ops_s: f64,
    pub get_batch64_mib_s: f64,
    pub put_batch64_mib_s: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct Effort {
    pub ops: usize,
    pub depth_for: Duration,
    /// Distinct pages the benchmark keeps on the server.
    pub pages: usize,
}

/// The same figures over mutual TLS: an embedded server with a lab CA's
/// certificate (made in a temporary directory), a client with an admin's.
/// Only the data plane differs from the plaintext run: same sizes, same
/// machine, same moment.
pub fn measure_tls(
    plain: &ClientConfig,
    effort: Effort,
    raw: &mut PingPong,
) -> Result<DataPlane, BenchError> {
    let dir = tempfile::tempdir().map_err(BenchError::Io)?;
    let d = dir.path();
    rmem_common::pki::init(d, 1, false).map_err(|e| BenchError::Tls(e.to_string()))?;
    for (role, name) in [
        (rmem_common::identity::Role::Server, "bench-server"),
        (rmem_common::identity::Role::Admin, "bench"),
    ] {
        rmem_common::pki::issue(d, role, name, &[], 1, false)
            .map_err(|e| BenchError::Tls(e.to_string()))?;
    }
    let files = |who: &str| rmem_common::tls::TlsFiles {
        ca_file: d.join("ca.pem"),
        cert_file: d.join(format!("{who}.pem")),
        key_file: d.join(format!("{who}.key")),
        crl_file: None,
    };
    let server = rmem_server::embedded::EmbeddedServer::with_config(
        &rmem_server::config::ServerConfig {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            grpc: "127.0.0.1:0".parse().expect("valid address"),
            capacity: rmem_common::ByteSize((effort.pages as u64 + 4096) * PAGE_SIZE as u64),
            prefault: true,
            tls: Some(files("server-bench-server")),
            ..Default::default()
        },
        1,
    )?;
    let pem = files("admin-bench")
        .read()
        .map_err(|e| BenchError::Tls(e.to_string()))?;
    let mut client = plain.clone();
    client.addr = server.data_addr().to_string();
    client.locations = Default::default();
    let client = client.with_tls(
        pem.data_client()
            .map_err(|e| BenchError::Tls(e.to_string()))?,
        Some("bench-server".into()),
    );
    measure(&client, effort, raw, &Histogram::new())
}

/// Handles of the benchmark's pages: a random prefix so that runs against
/// a shared server never touch anybody's pages.
struct Handles {
    prefix: u64,
    count: usize,
}

impl Handles {
    fn get(&self, i: usize) -> u64 {
        self.prefix | (i % self.count) as u64
    }
}

fn page_for(i: usize) -> Box<Page> {
    let mut p: Box<Page> = Box::new([0u8; PAGE_SIZE]);
    for (k, w) in p.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&((i as u64) << 20 | k as u64).to_le_bytes());
    }
    p
}

/// Measures the data plane; `raw` round trips are interleaved with the
/// depth-1 GETs and recorded in `rtt`.
pub fn measure(
    client: &ClientConfig,
    effort: Effort,
    raw: &mut PingPong,
    rtt: &Histogram,
) -> Result<DataPlane, BenchError> {
    let handles = Handles {
        prefix: (rand::random::<u64>() >> 24) << 24,
        count: effort.pages,
    };
    // As the fault path does: poll for the reply before blocking.
    let mut polling = client.clone();
    polling.spin = rmem_agent::RegionConfig::default().spin;
    let mut conn = BlockingConnection::connect(&polling)?;
    let page = page_for(7);

    // PUT at depth 1 also stores the pages the GETs read.
    let put = Histogram::new();
    for i in 0..effort.ops.max(effort.pages) {
        let t = Instant::now();
        check(&conn.put(&[(handles.get(i), &page)])?)?;
        put.record_duration(t.elapsed());
    }
    let get = Histogram::new();
    let mut out: Box<[Page]> = vec![[0u8; PAGE_SIZE]; 64].into_boxed_slice();
    for i in 0..effort.ops {
        rtt.record_duration(raw.round_trip()?);
        let t = Instant::now();
        let st = conn.get(&[handles.get(i * 7919)], &mut out[..1])?;
        check(st)?;
        get.record_duration(t.elapsed());
    }

    // 64-page batches, one at a time.
    let batch: Vec<Box<Page>> = (0..64).map(page_for).collect();
    let rounds = (effort.ops / 16).max(8);
    let t = Instant::now();
    for r in 0..rounds {
        let pages: Vec<(u64, &Page)> = (0..64)
            .map(|k| (handles.get(r * 64 + k), &*batch[k]))
            .collect();
        check(&conn.put(&pages)?)?;
    }
    let put_batch = mib((rounds * 64 * PAGE_SIZE) as u64) / t.elapsed().as_secs_f64();
    let ids: Vec<u64> = (0..64).map(|k| handles.get(k)).collect();
    let t = Instant::now();
    for r in 0..rounds {
        let ids: Vec<u64> = ids
            .iter()
            .map(|h| handles.get((*h as usize) + r * 64))
            .collect();
        check(conn.get(&ids, &mut out)?)?;
    }
    let get_batch = mib((rounds * 64 * PAGE_SIZE) as u64) / t.elapsed().as_secs_f64();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Io)?;
    let (get_qd32, put_qd32) = runtime.block_on(async {
        let conn = Arc::new(Connection::connect(client).await?);
        let g = at_depth(&conn, &handles, 32, effort.depth_for, false).await?;
        let p = at_depth(&conn, &handles, 32, effort.depth_for, true).await?;
        Ok::<_, BenchError>((g, p))
    })?;

    // Leave the server as we found it.
    let all: Vec<u64> = (0..effort.pages).map(|i| handles.get(i)).collect();
    for chunk in all.chunks(conn.limits().max_batch_pages as usize) {
        conn.free(chunk)?;
    }
    Ok(DataPlane {
        get_qd1_us: Latency::from_ns(&get),
        put_qd1_us: Latency::from_ns(&put),
        get_qd32_ops_s: get_qd32,
        put_qd32_ops_s: put_qd32,
        get_batch64_mib_s: get_batch,
        put_batch64_mib_s: put_batch,
    })
}

/// Operations per second with `depth` single-page requests outstanding on
/// one pipelined connection.
async fn at_depth(
    conn: &Arc<Connection>,
    handles: &Handles,
    depth: usize,
    duration: Duration,
    write: bool,
) -> Result<f64, BenchError> {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for d in 0..depth {
        let conn = conn.clone();
        let done = done.clone();
        let base = handles.prefix;
        let count = handles.count;
        tasks.spawn(async move {
            let page = page_for(d);
            let mut out = vec![[0u8; PAGE_SIZE]; 1];
            let mut i = d;
            while Instant::now() < end {
                let h = base | (i % count) as u64;
                let st = if write {
                    conn.put(&[(h, &page)]).await?
                } else {
                    conn.get(&[h], &mut out).await?
                };
                check(&st)?;
                done.fetch_add(1, Ordering::Relaxed);
                i += depth;
            }
            Ok::<_, BenchError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("benchmark task")?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Every page of a request must have succeeded: a benchmark that measured
/// failures would measure nothing.
fn check(statuses: &[PageStatus]) -> Result<(), BenchError> {
    match statuses.iter().find(|s| **s != PageStatus::Ok) {
        None => Ok(()),
        Some(s) => Err(BenchError::Page(*s)),
    }
}

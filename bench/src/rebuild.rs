//! Rebuild throughput: how fast one agent restores the redundancy of the
//! pages a server held once that server is declared gone, with no
//! bandwidth limit. `replicas=2` copies each page from its other copy;
//! `ec=4+2` solves each from four others of its stripe (data and parity
//! pages alike).
//!
//! An embedded coordinator and seven embedded servers (so that every copy
//! or slot has a server to go to besides its run's), a region filled, then
//! the server holding most declared gone (`rmemctl mark-gone`). It stays
//! up: only rmem's decision not to read a gone server makes this a
//! rebuild rather than a move. Timed until the coordinator counts no pages
//! on it (the agent returned its grants once nothing of its region was
//! left there); every page is then read back and checked.

use std::time::{Duration, Instant};

use rmem_agent::cluster::{Cluster, ClusterConfig};
use rmem_agent::{RegionConfig, RemoteRegion};
use rmem_client::control::ControlClient;
use rmem_client::{BlockingConnection, ClientConfig};
use rmem_common::{ByteSize, Redundancy};
use rmem_proto::control::v1 as pb;
use rmem_server::embedded::EmbeddedServer;
use serde::Serialize;

use crate::BenchError;
use crate::region::{Effort, Mem};

/// Servers of the cluster.
const SERVERS: usize = 7;

/// The longest a rebuild may take before the benchmark gives up.
const REBUILD_LIMIT: Duration = Duration::from_secs(120);

/// One policy's rebuild.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildFigures {
    pub policy: String,
    /// Pages the gone server held (copies or stripe pages) for the region.
    pub pages: u64,
    pub seconds: f64,
    /// Of the gone server's pages restored elsewhere.
    pub mib_s: f64,
}

fn cluster_error(e: impl std::fmt::Display) -> BenchError {
    BenchError::Cluster(e.to_string())
}

fn used(server: &EmbeddedServer) -> Result<u64, BenchError> {
    let cfg = ClientConfig::new(server.data_addr().to_string());
    Ok(BlockingConnection::connect(&cfg)?.stat()?.used_pages)
}

pub fn measure(effort: Effort) -> Result<Vec<RebuildFigures>, BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("rmem-bench-coordinator")
        .enable_all()
        .build()?;
    let mut figures = Vec::new();
    for policy in [
        Redundancy::Replicas(2),
        Redundancy::Erasure { data: 4, parity: 2 },
    ] {
        let coord = runtime
            .block_on(rmem_coordinator::Coordinator::start(
                &rmem_coordinator::config::CoordinatorConfig {
                    listen: "127.0.0.1:0".parse().expect("valid address"),
                    ephemeral: true,
                    placement_chunk: ByteSize::mib(4),
                    redundancy: policy,
                    ..Default::default()
                },
            ))
            .map_err(cluster_error)?;
        let endpoint = coord.addr().to_string();
        let servers = (0..SERVERS)
            .map(|i| {
                Ok(EmbeddedServer::with_config(
                    &rmem_server::config::ServerConfig {
                        listen: "127.0.0.1:0".parse().expect("valid address"),
                        grpc: "127.0.0.1:0".parse().expect("valid address"),
                        capacity: ByteSize(effort.size + (16 << 20)),
                        cluster: rmem_server::config::ClusterConfig {
                            coordinator: Some(endpoint.clone()),
                            name: Some(format!("bench-{i}")),
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                    1,
                )?)
            })
            .collect::<Result<Vec<_>, BenchError>>()?;
        let agent =
            Cluster::connect(&ClusterConfig::new(endpoint.clone())).map_err(cluster_error)?;
        let r = RemoteRegion::in_cluster(
            RegionConfig {
                size: effort.size,
                budget: effort.budget,
                prefetch_max: 0,
                redundancy: Some(policy),
                ..RegionConfig::default()
            },
            &agent,
        )?;
        let mem = Mem { region: &r };
        mem.fill();
        let held = servers.iter().map(used).collect::<Result<Vec<u64>, _>>()?;
        let victim = (0..SERVERS).max_by_key(|&i| held[i]).unwrap_or(0);
        let control = runtime
            .block_on(ControlClient::connect(
                &endpoint,
                None,
                Duration::from_secs(5),
            ))
            .map_err(cluster_error)?;
        let status = || -> Result<pb::StatusResponse, BenchError> {
            runtime
                .block_on(control.admin().status(pb::StatusRequest {}))
                .map(tonic::Response::into_inner)
                .map_err(cluster_error)
        };
        runtime
            .block_on(control.admin().mark_gone(pb::DrainRequest {
                server_id: 0,
                name: format!("bench-{victim}"),
            }))
            .map_err(cluster_error)?;
        let started = Instant::now();
        loop {
            let s = status()?;
            if s.servers_gone == 1 && s.rebuild_pages_left == 0 {
                break;
            }
            if started.elapsed() > REBUILD_LIMIT {
                return Err(BenchError::Cluster(format!(
                    "{policy}: the rebuild did not finish in {REBUILD_LIMIT:?} ({} pages left)",
                    s.rebuild_pages_left
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let seconds = started.elapsed().as_secs_f64();
        for p in 0..r.pages() {
            mem.verify(p)?;
        }
        let pages = held[victim];
        figures.push(RebuildFigures {
            policy: policy.to_string(),
            pages,
            seconds,
            mib_s: (pages * rmem_client::PAGE_SIZE as u64) as f64 / (1 << 20) as f64 / seconds,
        });
        drop(r);
        drop(agent);
        drop(servers);
        runtime.block_on(coord.shutdown());
    }
    Ok(figures)
}

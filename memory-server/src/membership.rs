//! Cluster membership of a memory server: joins the coordinator, keeps its
//! lease with its usage in every heartbeat, and frees the pages of ranges
//! that an invalidation reaches (an agent unmapped them, or its region was
//! dropped), acknowledging only once they are gone.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rmem_client::control::{ControlClient, ControlError, MemberSession, Subscriber};
use rmem_proto::control::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::store::Store;

/// Frees invalidated pages.
struct FreeInvalidated {
    store: Arc<Store>,
}

impl Subscriber for FreeInvalidated {
    fn invalidate<'a>(
        &'a self,
        ev: &'a pb::InvalidationEvent,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let store = self.store.clone();
            let ranges: Vec<(String, u64, u64)> = ev
                .ranges
                .iter()
                .map(|r| (r.tenant.clone(), r.first_handle, r.length / 4096))
                .collect();
            // Freeing a large range touches many index shards: off the runtime.
            let freed = tokio::task::spawn_blocking(move || {
                let mut freed = 0u64;
                for (tenant, first, pages) in ranges {
                    // A tenant unknown here has no pages here.
                    let Some(t) = store.tenant(&tenant) else {
                        continue;
                    };
                    for h in first..first.saturating_add(pages) {
                        if store.free(t, h) == rmem_proto::wire::PageStatus::Ok {
                            freed += 1;
                        }
                    }
                }
                freed
            })
            .await
            .map_err(|e| format!("freeing task failed: {e}"))?;
            tracing::debug!(
                invalidation = ev.invalidation_id,
                freed,
                "freed invalidated pages"
            );
            Ok(())
        })
    }
}

/// A server's membership, running in the background.
#[derive(Debug)]
pub struct Membership {
    session: MemberSession,
    stop: CancellationToken,
}

/// This host's name, for the default member name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rmem-server".into())
}

/// The address others reach `bound` at: `advertise` if given, else
/// `bound` unless it is a wildcard, else this host's name and the port.
fn reachable(advertise: Option<&str>, bound: SocketAddr) -> String {
    match advertise {
        Some(a) => a.to_string(),
        None if bound.ip().is_unspecified() => format!("{}:{}", hostname(), bound.port()),
        None => bound.to_string(),
    }
}

impl Membership {
    /// Registers with the coordinator and starts heartbeats and the event
    /// stream.
    pub async fn join(
        cfg: &ClusterConfig,
        store: Arc<Store>,
        data: SocketAddr,
        grpc: SocketAddr,
    ) -> Result<Self, ControlError> {
        let endpoint = cfg.coordinator.as_deref().unwrap_or_default();
        let token = match &cfg.token_file {
            Some(path) => Some(
                rmem_common::config::read_token("the cluster token", path).map_err(|e| {
                    ControlError::Rpc {
                        code: tonic::Code::InvalidArgument,
                        reason: "token_file".into(),
                        message: e.to_string(),
                    }
                })?,
            ),
            None => cfg.token.clone(),
        };
        let client =
            ControlClient::connect(endpoint, token.as_deref(), Duration::from_secs(5)).await?;
        let req = pb::RegisterRequest {
            role: pb::Role::Server as i32,
            name: cfg.name.clone().unwrap_or_else(hostname),
            data_addr: reachable(cfg.advertise.as_deref(), data),
            grpc_addr: reachable(cfg.grpc_advertise.as_deref(), grpc),
            capacity_pages: store.capacity_pages(),
            transports: vec!["tcp".into()],
        };
        let session = MemberSession::start(
            client,
            req,
            Arc::new(FreeInvalidated {
                store: store.clone(),
            }),
        )
        .await?;
        let stop = CancellationToken::new();
        let state = session.state.clone();
        let done = stop.clone();
        tokio::spawn(async move {
            loop {
                state
                    .used_pages
                    .store(store.used_pages(), Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = done.cancelled() => return,
                }
            }
        });
        tracing::info!(
            coordinator = endpoint,
            member = session.member_id(),
            "joined the cluster"
        );
        Ok(Self { session, stop })
    }

    pub fn member_id(&self) -> u64 {
        self.session.member_id()
    }

    /// Leaves the cluster (placements stop at once).
    pub async fn leave(self) {
        self.stop.cancel();
        if let Err(e) = self.session.leave().await {
            tracing::warn!(error = %e, "could not deregister from the coordinator");
        }
    }
}

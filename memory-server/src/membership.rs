//! Cluster membership of a memory server: joins the coordinator, keeps its
//! lease with its usage in every heartbeat, and frees the pages of ranges
//! that an invalidation reaches (an agent unmapped them, or its region was
//! dropped), acknowledging only once they are gone. On every registration
//! (first, or again after a lost lease or a fence) it reconciles its store
//! with the registry (see [`reconcile`]).

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

/// Frees invalidated pages; reconciles the store with the registry on
/// every registration.
struct FreeInvalidated {
    store: Arc<Store>,
    client: ControlClient,
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
                    freed += store.free_range(t, first, pages);
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

    fn registered(&self, member_id: u64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            match reconcile(&self.store, &self.client, member_id).await {
                Ok(r) if r.freed > 0 || r.subscribed > 0 => tracing::info!(
                    freed = r.freed,
                    subscribed = r.subscribed,
                    "reconciled stored pages with the cluster's intervals"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reconcile stored pages with the cluster")
                }
            }
        })
    }
}

/// What a reconcile did.
#[derive(Debug, Default, Clone, Copy)]
struct Reconciled {
    freed: u64,
    subscribed: u64,
}

/// Brings the store in line with the registry after (re)joining: a server
/// that was away or fenced missed invalidations and lost its subscriptions.
/// Every stored page no live interval of its tenant covers is freed (it
/// belonged to a range unmapped meanwhile), and the server subscribes to
/// every interval whose pages it holds, so later invalidations reach it.
///
/// The store is scanned before the intervals are listed: a page stored
/// after the scan is not a candidate, and one stored before it belongs to
/// an interval registered before it, which the listing then shows. In a
/// cluster every page belongs to a registered interval; pages written by
/// clients outside the cluster's agents do not survive a reconcile.
async fn reconcile(
    store: &Arc<Store>,
    client: &ControlClient,
    member_id: u64,
) -> Result<Reconciled, ControlError> {
    let scan = store.clone();
    let candidates: Vec<(String, Vec<u64>)> = tokio::task::spawn_blocking(move || {
        scan.tenants()
            .map(|t| (t.name.clone(), scan.handles(t)))
            .filter(|(_, h)| !h.is_empty())
            .collect()
    })
    .await
    .unwrap_or_default();
    if candidates.is_empty() {
        return Ok(Reconciled::default());
    }
    let intervals = client
        .intervals()
        .list(pb::ListIntervalsRequest::default())
        .await?
        .into_inner()
        .intervals;
    let mut done = Reconciled::default();
    let mut to_free: Vec<(String, Vec<u64>)> = Vec::new();
    let mut to_subscribe = std::collections::BTreeSet::new();
    for (tenant, handles) in candidates {
        // (first handle, end, interval) of the tenant's intervals, sorted.
        let mut ranges: Vec<(u64, u64, &pb::Interval)> = intervals
            .iter()
            .filter(|iv| iv.tenant == tenant)
            .map(|iv| (iv.handle_base, iv.handle_base + iv.length / 4096, iv))
            .collect();
        ranges.sort_unstable_by_key(|r| r.0);
        let mut orphans = Vec::new();
        for h in handles {
            let k = ranges.partition_point(|r| r.0 <= h);
            match k.checked_sub(1).map(|k| ranges[k]) {
                Some((_, end, iv)) if h < end => {
                    if !iv.subscribers.contains(&member_id) {
                        to_subscribe.insert(iv.id);
                    }
                }
                _ => orphans.push(h),
            }
        }
        if !orphans.is_empty() {
            to_free.push((tenant, orphans));
        }
    }
    // Orphans first: once the server shows up as a subscriber again, what
    // no interval covers is already gone.
    let store = store.clone();
    done.freed = tokio::task::spawn_blocking(move || {
        let mut freed = 0;
        for (tenant, handles) in to_free {
            let Some(t) = store.tenant(&tenant) else {
                continue;
            };
            for h in handles {
                if store.free(t, h) == rmem_proto::wire::PageStatus::Ok {
                    freed += 1;
                }
            }
        }
        freed
    })
    .await
    .unwrap_or(0);
    for id in to_subscribe {
        let r = client
            .intervals()
            .subscribe(pb::SubscribeRequest {
                interval_id: id,
                member_id,
            })
            .await;
        match r {
            Ok(_) => done.subscribed += 1,
            // Unregistered since the listing: its pages stay until the next
            // reconcile (the next registration).
            Err(e) if e.code() == tonic::Code::NotFound => {
                tracing::debug!(interval = id, "interval gone while reconciling");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
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
        transports: &[&str],
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
            transports: transports.iter().map(|t| t.to_string()).collect(),
        };
        let session = MemberSession::start(
            client.clone(),
            req,
            Arc::new(FreeInvalidated {
                store: store.clone(),
                client,
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

//! A node agent's link to an rmem cluster.
//!
//! [`Cluster::connect`] registers this process as an agent member of the
//! coordinator. A region created with [`crate::RemoteRegion::in_cluster`]
//! then:
//! - asks the coordinator for capacity (placement) instead of naming a
//!   server: its pages are spread over the granted servers;
//! - registers its address range as an interval, subscribed by those
//!   servers;
//! - when dropped, invalidates the range (reason `unmap`): every server
//!   frees its pages before the invalidation returns; then the interval is
//!   unregistered and the grants released.
//!
//! When a server is drained the coordinator tells the agent; the agent
//! gets replacement capacity, points the affected segments at it, and
//! moves the pages held on the draining server (each checked by CRC on
//! both ends) before returning the old grant.
//!
//! Regions run on plain threads; the control plane runs on a small tokio
//! runtime owned by this link, which the calls here block on. So
//! [`Cluster::connect`], [`crate::RemoteRegion::in_cluster`], and dropping a
//! region in a cluster or the cluster itself, must not happen on a thread
//! that is running a tokio runtime (tokio refuses to block there).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rmem_client::ClientConfig;
use rmem_client::control::{ControlClient, ControlError, MemberSession, Registration, Subscriber};
use rmem_proto::control::v1 as pb;

use crate::placement::{Placement, PlacementError};
use crate::region::Inner;

/// How to join a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Coordinator endpoint, `host:port`.
    pub coordinator: String,
    /// Cluster token.
    pub token: Option<String>,
    /// Member name, unique in the cluster (a process of this host by
    /// default).
    pub name: Option<String>,
    /// Tenant the agent allocates for.
    pub tenant: String,
    /// How long joining keeps trying while the coordinator cannot be
    /// reached (it is restarting, or starts after this agent).
    pub join_timeout: Duration,
}

impl ClusterConfig {
    pub fn new(coordinator: impl Into<String>) -> Self {
        Self {
            coordinator: coordinator.into(),
            token: None,
            name: None,
            tenant: "default".into(),
            join_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start the control-plane runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("the coordinator's placement is unusable")]
    Placement(#[from] PlacementError),
}

/// A granted piece of capacity and where it is.
#[derive(Debug, Clone)]
pub(crate) struct GrantInfo {
    pub id: u64,
    pub server_member: u64,
    /// Index of its server in the region's placement.
    pub server: u8,
    /// Index of the segment it backs.
    pub segment: usize,
    pub pages: u64,
}

/// What the cluster knows of one live region.
#[derive(Debug)]
struct RegionLink {
    inner: Weak<Inner>,
    interval: u64,
    grants: Vec<GrantInfo>,
}

/// Called with a draining server's member id, on a thread of its own.
pub(crate) type DrainHandler = Arc<dyn Fn(u64) + Send + Sync>;

/// State shared with the member session's subscriber.
#[derive(Default)]
struct Shared {
    regions: Mutex<Vec<RegionLink>>,
    /// What else holds pages on servers (the kernel agent).
    on_drain: Mutex<Option<DrainHandler>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

/// This process's membership in a cluster.
#[derive(Debug)]
pub struct Cluster {
    runtime: tokio::runtime::Runtime,
    client: ControlClient,
    session: Option<MemberSession>,
    name: String,
    tenant: String,
    shared: Arc<Shared>,
    /// Whether dropping the link leaves the cluster (deregisters, so the
    /// coordinator reclaims this agent's intervals and grants at once).
    /// Cleared while pages elsewhere still need them (the kernel module
    /// holds pages of attached processes): the lease then lapses and the
    /// coordinator reclaims them only after its reap delay, which leaves
    /// a restarted agent time to take them over.
    leave_on_drop: std::sync::atomic::AtomicBool,
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "node".into())
}

/// Handles the agent's events: drains.
struct Events {
    shared: Arc<Shared>,
    client: ControlClient,
    tenant: String,
    member: std::sync::atomic::AtomicU64,
}

impl Subscriber for Events {
    fn invalidate<'a>(
        &'a self,
        _ev: &'a pb::InvalidationEvent,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        // The agent owns its intervals and invalidates them itself (as the
        // origin, so it gets no event); nobody else invalidates them yet.
        Box::pin(async { Ok(()) })
    }

    fn drain<'a>(
        &'a self,
        notice: &'a pb::DrainNotice,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let handler = self
                .shared
                .on_drain
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(handler) = handler {
                // It blocks on this link's runtime: not on a runtime thread.
                let server = notice.server_id;
                let spawned = std::thread::Builder::new()
                    .name("rmem-drain".into())
                    .spawn(move || handler(server));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start moving pages off a draining server");
                }
            }
            let agent = self.member.load(std::sync::atomic::Ordering::Acquire);
            if let Err(e) = drain(&self.shared, &self.client, agent, &self.tenant, notice).await {
                tracing::error!(server = notice.server_id, error = %e, "cannot move pages off a draining server");
            }
        })
    }

    fn registered<'a>(
        &'a self,
        reg: &'a Registration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.member
            .store(reg.member_id, std::sync::atomic::Ordering::Release);
        Box::pin(async {})
    }
}

/// Server connection settings for a grant.
pub(crate) fn server_config(g: &pb::Grant) -> ClientConfig {
    ClientConfig::new(g.data_addr.clone())
        .with_tenant(g.tenant.clone(), g.credential.clone().into_bytes())
}

/// Moves every region's pages off the draining server.
async fn drain(
    shared: &Arc<Shared>,
    client: &ControlClient,
    agent: u64,
    tenant: &str,
    notice: &pb::DrainNotice,
) -> Result<(), ClusterError> {
    // Which regions hold grants on the server, and how much.
    let affected: Vec<(Arc<Inner>, u64, GrantInfo)> = {
        let regions = shared.regions.lock().unwrap_or_else(|e| e.into_inner());
        regions
            .iter()
            .filter_map(|r| r.inner.upgrade().map(|i| (i, r)))
            .flat_map(|(inner, r)| {
                r.grants
                    .iter()
                    .filter(|g| g.server_member == notice.server_id)
                    .map(move |g| (inner.clone(), r.interval, g.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for (inner, interval, old) in affected {
        let grants = client
            .placement()
            .allocate(pb::AllocateRequest {
                agent_id: agent,
                tenant: tenant.to_string(),
                pages: old.pages,
            })
            .await
            .map_err(ControlError::from)?
            .into_inner()
            .grants;
        // The segment moves whole to the server of the largest piece; all
        // pieces stay granted (and are returned with the region), so the
        // coordinator's accounting stays whole.
        let Some(new) = grants.iter().max_by_key(|g| g.pages).cloned() else {
            continue;
        };
        let to = inner.placement.add_server(server_config(&new))?;
        client
            .intervals()
            .subscribe(pb::SubscribeRequest {
                interval_id: interval,
                member_id: new.server_id,
            })
            .await
            .map_err(ControlError::from)?;
        inner.placement.segments()[old.segment].set_server(to);
        let from = old.server;
        let moving = inner.clone();
        let report = tokio::task::spawn_blocking(move || {
            crate::region::migrate::move_pages(&moving, from, to, 50)
        })
        .await
        .map_err(|e| ClusterError::Runtime(std::io::Error::other(e)))?;
        tracing::info!(
            server = notice.server_id, to = %new.data_addr, moved = report.moved,
            forgotten = report.forgotten, left = report.left, "moved pages off a draining server"
        );
        {
            let mut regions = shared.regions.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = regions.iter_mut().find(|r| r.interval == interval) {
                for g in &grants {
                    r.grants.push(GrantInfo {
                        id: g.grant_id,
                        server_member: g.server_id,
                        server: to,
                        segment: old.segment,
                        pages: g.pages,
                    });
                }
                if report.left == 0 {
                    r.grants.retain(|g| g.id != old.id);
                }
            }
        }
        if report.left == 0 {
            let _ = client
                .placement()
                .release(pb::ReleaseRequest {
                    grant_id: old.id,
                    pages: 0,
                })
                .await;
            let _ = client
                .intervals()
                .unsubscribe(pb::UnsubscribeRequest {
                    interval_id: interval,
                    member_id: notice.server_id,
                })
                .await;
        }
    }
    Ok(())
}

impl Cluster {
    /// Joins the cluster as an agent member.
    pub fn connect(cfg: &ClusterConfig) -> Result<Arc<Self>, ClusterError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rmem-control")
            .enable_all()
            .build()
            .map_err(ClusterError::Runtime)?;
        let name = cfg
            .name
            .clone()
            .unwrap_or_else(|| format!("{}/{}", hostname(), std::process::id()));
        let shared = Arc::new(Shared::default());
        let (client, session) = runtime.block_on(async {
            let (client, session, _) = rmem_client::control::join(
                &cfg.coordinator,
                cfg.token.as_deref(),
                cfg.join_timeout,
                pb::RegisterRequest {
                    role: pb::Role::Agent as i32,
                    name: name.clone(),
                    ..Default::default()
                },
                |client| {
                    Arc::new(Events {
                        shared: shared.clone(),
                        client,
                        tenant: cfg.tenant.clone(),
                        member: Default::default(),
                    })
                },
            )
            .await?;
            Ok::<_, ControlError>((client, session))
        })?;
        tracing::info!(coordinator = %cfg.coordinator, member = session.member_id(), %name, "agent joined the cluster");
        Ok(Arc::new(Self {
            runtime,
            client,
            session: Some(session),
            name,
            tenant: cfg.tenant.clone(),
            shared,
            leave_on_drop: std::sync::atomic::AtomicBool::new(true),
        }))
    }

    /// Calls `handler` (on a thread of its own) when a server holding this
    /// member's pages is drained.
    pub(crate) fn on_drain(&self, handler: DrainHandler) {
        *self
            .shared
            .on_drain
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    /// Removes `member` from the subscribers of `interval`.
    pub(crate) fn unsubscribe(&self, interval: u64, member: u64) -> Result<(), ClusterError> {
        self.runtime
            .block_on(self.client.intervals().unsubscribe(pb::UnsubscribeRequest {
                interval_id: interval,
                member_id: member,
            }))
            .map_err(ControlError::from)?;
        Ok(())
    }

    /// Whether dropping this link leaves the cluster (see the field).
    pub fn set_leave_on_drop(&self, leave: bool) {
        self.leave_on_drop
            .store(leave, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// New grants for `pages` pages (one or more pieces, on one or more
    /// servers).
    pub(crate) fn allocate(&self, pages: u64) -> Result<Vec<pb::Grant>, ClusterError> {
        Ok(self
            .runtime
            .block_on(self.client.placement().allocate(pb::AllocateRequest {
                agent_id: self.member_id(),
                tenant: self.tenant.clone(),
                pages,
            }))
            .map_err(ControlError::from)?
            .into_inner()
            .grants)
    }

    /// The grants this member holds (from earlier incarnations too).
    pub(crate) fn own_grants(&self) -> Result<Vec<pb::Grant>, ClusterError> {
        Ok(self
            .runtime
            .block_on(self.client.placement().list_grants(pb::ListGrantsRequest {
                agent_id: self.member_id(),
                server_id: 0,
            }))
            .map_err(ControlError::from)?
            .into_inner()
            .grants)
    }

    /// The intervals this member registered (in earlier incarnations too).
    pub(crate) fn own_intervals(&self) -> Result<Vec<pb::Interval>, ClusterError> {
        let me = self.member_id();
        Ok(self
            .runtime
            .block_on(self.client.intervals().list(pb::ListIntervalsRequest {
                member_id: me,
                address_space: String::new(),
            }))
            .map_err(ControlError::from)?
            .into_inner()
            .intervals
            .into_iter()
            .filter(|iv| iv.owner == me)
            .collect())
    }

    /// Registers `[0, pages * 4096)` of address space `space`, page k
    /// standing for handle `handle_base + k`; returns its id.
    pub(crate) fn register_space(
        &self,
        space: &str,
        pages: u64,
        handle_base: u64,
    ) -> Result<u64, ClusterError> {
        Ok(self
            .runtime
            .block_on(
                self.client
                    .intervals()
                    .register(pb::RegisterIntervalRequest {
                        address_space: space.to_string(),
                        start: 0,
                        length: pages * 4096,
                        tenant: self.tenant.clone(),
                        handle_base,
                        owner: self.member_id(),
                        subscribers: Vec::new(),
                    }),
            )
            .map_err(ControlError::from)?
            .into_inner()
            .interval_id)
    }

    /// Adds server `member` to the subscribers of `interval`.
    pub(crate) fn subscribe(&self, interval: u64, member: u64) -> Result<(), ClusterError> {
        self.runtime
            .block_on(self.client.intervals().subscribe(pb::SubscribeRequest {
                interval_id: interval,
                member_id: member,
            }))
            .map_err(ControlError::from)?;
        Ok(())
    }

    pub(crate) fn unregister(&self, interval: u64) -> Result<(), ClusterError> {
        self.runtime
            .block_on(
                self.client
                    .intervals()
                    .unregister(pb::UnregisterIntervalRequest {
                        interval_id: interval,
                    }),
            )
            .map_err(ControlError::from)?;
        Ok(())
    }

    /// Invalidates byte ranges `(start, length)` of `space` as one
    /// invalidation (reason `unmap`, this agent as origin): the servers
    /// holding those pages free them before this returns. False if it did
    /// not complete (the caller frees what it can directly).
    pub(crate) fn invalidate_spans(&self, space: &str, spans: &[(u64, u64)]) -> bool {
        let Some((&(start, length), more)) = spans.split_first() else {
            return true;
        };
        let r = self.runtime.block_on(
            self.client
                .invalidation()
                .invalidate(pb::InvalidateRequest {
                    address_space: space.to_string(),
                    start,
                    length,
                    reason: pb::Reason::Unmap as i32,
                    deadline_ms: 0,
                    origin: self.member_id(),
                    more: more
                        .iter()
                        .map(|&(start, length)| pb::Span { start, length })
                        .collect(),
                }),
        );
        match r {
            Ok(r) => r.into_inner().complete,
            Err(e) => {
                tracing::warn!(error = %ControlError::from(e), space, "cannot invalidate freed pages");
                false
            }
        }
    }

    /// Returns grants by id.
    pub(crate) fn release_grants(&self, ids: &[u64]) {
        self.runtime.block_on(async {
            for &id in ids {
                if let Err(e) = self
                    .client
                    .placement()
                    .release(pb::ReleaseRequest { grant_id: id, pages: 0 })
                    .await
                {
                    tracing::warn!(grant = id, error = %ControlError::from(e), "cannot release a grant");
                }
            }
        });
    }

    pub fn member_id(&self) -> u64 {
        self.session.as_ref().map_or(0, MemberSession::member_id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client(&self) -> &ControlClient {
        &self.client
    }

    /// Capacity for `pages` pages, as a placement and its grants.
    pub(crate) fn place(&self, pages: usize) -> Result<(Placement, Vec<GrantInfo>), ClusterError> {
        let grants = self
            .runtime
            .block_on(self.client.placement().allocate(pb::AllocateRequest {
                agent_id: self.member_id(),
                tenant: self.tenant.clone(),
                pages: pages as u64,
            }))
            .map_err(ControlError::from)?
            .into_inner()
            .grants;
        let mut servers: Vec<ClientConfig> = Vec::new();
        let mut segments = Vec::with_capacity(grants.len());
        let mut infos = Vec::with_capacity(grants.len());
        for (k, g) in grants.iter().enumerate() {
            let index = match servers.iter().position(|s| s.addr == g.data_addr) {
                Some(i) => i,
                None => {
                    servers.push(server_config(g));
                    servers.len() - 1
                }
            };
            segments.push((g.pages as usize, index as u8));
            infos.push(GrantInfo {
                id: g.grant_id,
                server_member: g.server_id,
                server: index as u8,
                segment: k,
                pages: g.pages,
            });
        }
        let placement = match Placement::new(servers, &segments, pages) {
            Ok(p) => p,
            Err(e) => {
                self.release(&infos);
                return Err(e.into());
            }
        };
        Ok((placement, infos))
    }

    /// Registers a region's range, subscribed by the servers of its grants.
    pub(crate) fn register(
        &self,
        inner: &Arc<Inner>,
        grants: Vec<GrantInfo>,
    ) -> Result<u64, ClusterError> {
        let mut subscribers: Vec<u64> = grants.iter().map(|g| g.server_member).collect();
        subscribers.sort_unstable();
        subscribers.dedup();
        let r = self
            .runtime
            .block_on(
                self.client
                    .intervals()
                    .register(pb::RegisterIntervalRequest {
                        address_space: self.name.clone(),
                        start: inner.backing.base() as u64,
                        length: inner.backing.len() as u64,
                        tenant: self.tenant.clone(),
                        handle_base: inner.handle(0),
                        owner: self.member_id(),
                        subscribers,
                    }),
            )
            .map_err(ControlError::from)?
            .into_inner();
        self.shared
            .regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(RegionLink {
                inner: Arc::downgrade(inner),
                interval: r.interval_id,
                grants,
            });
        Ok(r.interval_id)
    }

    /// Invalidates `[start, start + len)` of this agent's address space
    /// (reason `unmap`, this agent as origin): the servers holding those
    /// pages free them before this returns. False if it did not complete.
    pub(crate) fn invalidate(&self, start: u64, len: u64) -> bool {
        let r = self.runtime.block_on(self.client.invalidation().invalidate(
            pb::InvalidateRequest {
                address_space: self.name.clone(),
                start,
                length: len,
                reason: pb::Reason::Unmap as i32,
                deadline_ms: 0,
                origin: self.member_id(),
                more: Vec::new(),
            },
        ));
        match r {
            Ok(r) => r.into_inner().complete,
            Err(e) => {
                tracing::warn!(error = %ControlError::from(e), "cannot invalidate a discarded range");
                false
            }
        }
    }

    /// The region is going away: its servers free its pages (through an
    /// invalidation), then the interval and grants are returned. False if
    /// the servers could not be reached through the coordinator (the
    /// caller frees the pages directly).
    pub(crate) fn unmap(&self, inner: &Inner, interval: u64) -> bool {
        let grants = {
            let mut regions = self
                .shared
                .regions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let k = regions.iter().position(|r| r.interval == interval);
            k.map(|k| regions.swap_remove(k).grants).unwrap_or_default()
        };
        let freed = self.runtime.block_on(async {
            let r = self
                .client
                .invalidation()
                .invalidate(pb::InvalidateRequest {
                    address_space: self.name.clone(),
                    start: inner.backing.base() as u64,
                    length: inner.backing.len() as u64,
                    reason: pb::Reason::Unmap as i32,
                    deadline_ms: 0,
                    origin: self.member_id(),
                    more: Vec::new(),
                })
                .await;
            let complete = match r {
                Ok(r) => r.into_inner().complete,
                Err(e) => {
                    tracing::warn!(error = %ControlError::from(e), "cannot invalidate the region's range");
                    false
                }
            };
            if let Err(e) = self
                .client
                .intervals()
                .unregister(pb::UnregisterIntervalRequest { interval_id: interval })
                .await
            {
                tracing::warn!(error = %ControlError::from(e), interval, "cannot unregister the region's interval");
            }
            complete
        });
        self.release(&grants);
        freed
    }

    pub(crate) fn release(&self, grants: &[GrantInfo]) {
        let ids: Vec<u64> = grants.iter().map(|g| g.id).collect();
        self.release_grants(&ids);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if !self
            .leave_on_drop
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "staying a member until the lease lapses: pages elsewhere still need this agent's intervals"
            );
            drop(session);
            return;
        }
        if let Err(e) = self.runtime.block_on(session.leave()) {
            tracing::warn!(error = %e, "cannot leave the cluster cleanly");
        }
    }
}

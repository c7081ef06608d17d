//! A node agent's link to an rmem cluster.
//!
//! [`Cluster::connect`] registers this process as an agent member of the
//! coordinator. The stores built on it ([`super::Homes`]: the kernel
//! agent's, each userfaultfd region's) then get capacity from the
//! coordinator as grants, register their handle spaces as intervals
//! subscribed by the granted servers, free through invalidations, and move
//! their pages when a server is drained (the coordinator tells this link,
//! which hands the notice to every live store).
//!
//! Backends run on plain threads; the control plane runs on a small tokio
//! runtime owned by this link, which the calls here block on. So
//! [`Cluster::connect`], creating or dropping a store, and dropping the
//! link itself, must not happen on a thread that is running a tokio
//! runtime (tokio refuses to block there).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rmem_client::ClientConfig;
use rmem_client::control::{ControlClient, ControlError, MemberSession, Registration, Subscriber};
use rmem_proto::control::v1 as pb;

use super::homes::Homes;
use super::servers::{Remotes, ServersError};

/// How to join a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Coordinator endpoint, `host:port`.
    pub coordinator: String,
    /// Cluster token.
    pub token: Option<String>,
    /// Member name, unique in the cluster (a process of this host by
    /// default; with TLS the certificate's, which a name given must match).
    pub name: Option<String>,
    /// Mutual TLS to the coordinator and the servers (an `agent`
    /// certificate).
    pub tls: Option<rmem_common::tls::TlsPem>,
    /// Tenant the agent allocates for.
    pub tenant: String,
    /// How long joining, and each later control call (allocating capacity,
    /// registering a region), keeps trying while no coordinator leads (one
    /// restarting or starting after this agent, replicas failing over, etcd
    /// away). Faults and evictions into capacity already granted go on
    /// meanwhile.
    pub join_timeout: Duration,
    /// Most bytes a second written to move pages off drained servers and to
    /// rebuild the copies of gone ones, over all of this agent's stores
    /// (None: as fast as the servers take them).
    pub rebuild_bandwidth: Option<u64>,
}

impl ClusterConfig {
    pub fn new(coordinator: impl Into<String>) -> Self {
        Self {
            coordinator: coordinator.into(),
            token: None,
            name: None,
            tls: None,
            tenant: "default".into(),
            join_timeout: Duration::from_secs(60),
            rebuild_bandwidth: None,
        }
    }
}

/// Paces moves and rebuilds to a bandwidth: each write reserves its time
/// on one timeline shared by every store of the link.
#[derive(Debug)]
struct Pacer {
    bytes_per_second: u64,
    next: Mutex<std::time::Instant>,
}

impl Pacer {
    fn pace(&self, bytes: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            let start = (*next).max(now);
            *next = start + cost;
            start - now
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
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
    Servers(#[from] ServersError),
    #[error(transparent)]
    Config(#[from] rmem_common::config::ConfigError),
    #[error("no memory server has room")]
    NoServer,
    #[error("cannot keep the seals of sealed pages in {path}")]
    SealFiles {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sealing the kernel agent's pages needs a state directory for their keys")]
    SealNeedsState,
    #[error("cannot keep the handle epochs of earlier runs in {path}")]
    EpochLog {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the coordinator granted less than asked")]
    ShortGrant,
    #[error("no servers for {copies} copies: a server is failing and no other can replace it")]
    TooFewCopies { copies: usize },
    #[error("{policy} needs at least {need} servers, and {have} are configured")]
    TooFewServers {
        policy: rmem_common::Redundancy,
        need: usize,
        have: usize,
    },
    #[error("{policy} needs room on at least {need} servers, and the cluster granted it on {have}")]
    TooFewGranted {
        policy: rmem_common::Redundancy,
        need: usize,
        have: usize,
    },
}

/// How often the pages at risk are summed for the heartbeats.
const AT_RISK_EVERY: Duration = Duration::from_secs(1);

/// Most stores moving pages at once: a drain notice, or a server declared
/// gone, reaches every store of the agent, and an agent may hold hundreds.
const DRAIN_WORKERS: usize = 4;

/// Stores waiting to move their pages off a server (store, server member),
/// and the workers doing it.
#[derive(Debug, Default)]
struct Drains {
    queue: std::collections::VecDeque<(Weak<Homes>, u64, (u64, u64))>,
    /// (store, server) queued or being drained: whether it is being
    /// drained, and whether a notice came meanwhile (it is then drained
    /// again when done: runs that failed are tried again). Stores are
    /// named by their handle space's base (unique per store).
    pending: std::collections::HashMap<(u64, u64), (bool, bool)>,
    workers: usize,
}

/// State shared with the member session's subscriber.
#[derive(Debug, Default)]
struct Shared {
    /// The stores holding pages through this link.
    stores: Mutex<Vec<Weak<Homes>>>,
    drains: Mutex<Drains>,
    /// The cluster's default redundancy, from the last registration.
    redundancy: Mutex<rmem_common::Redundancy>,
}

impl Shared {
    /// The stores still alive.
    fn stores(&self) -> Vec<Arc<Homes>> {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        stores.retain(|w| w.strong_count() > 0);
        stores.iter().filter_map(Weak::upgrade).collect()
    }

    fn drains(&self) -> std::sync::MutexGuard<'_, Drains> {
        self.drains.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `stores` to move their pages off server `member`, on at most
    /// [`DRAIN_WORKERS`] threads (moving blocks on this link's runtime: not
    /// on a runtime thread).
    fn drain(self: &Arc<Self>, stores: Vec<Arc<Homes>>, member: u64) {
        // Named after this agent's member id, so the threads of one agent
        // can be told from another's in the same process.
        let me = stores
            .first()
            .and_then(|h| h.link.as_ref())
            .map_or(0, |l| l.cluster.member_id());
        let spawn = {
            let mut d = self.drains();
            for h in stores {
                let key = (h.base(), member);
                match d.pending.get_mut(&key) {
                    None => {
                        d.pending.insert(key, (false, false));
                        d.queue.push_back((Arc::downgrade(&h), member, key));
                    }
                    // Being drained: again once done.
                    Some((true, again)) => *again = true,
                    // Queued: that drain will see what this notice says.
                    Some((false, _)) => {}
                }
            }
            let spawn = DRAIN_WORKERS.min(d.queue.len()).saturating_sub(d.workers);
            d.workers += spawn;
            spawn
        };
        for _ in 0..spawn {
            let shared = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("rmem-drain-{me}"))
                .spawn(move || shared.drain_worker());
            if let Err(e) = spawned {
                self.drains().workers -= 1;
                tracing::error!(error = %e, "cannot start moving pages off a draining server");
            }
        }
    }

    fn drain_worker(&self) {
        loop {
            let (store, member, key) = {
                let mut d = self.drains();
                match d.queue.pop_front() {
                    Some((store, member, key)) => {
                        d.pending.insert(key, (true, false));
                        (store, member, key)
                    }
                    None => {
                        d.workers -= 1;
                        return;
                    }
                }
            };
            if let Some(homes) = store.upgrade() {
                let drained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut remotes = Remotes::new(homes.request_timeout, Duration::ZERO);
                    homes.drain(&mut remotes, member);
                }));
                if drained.is_err() {
                    tracing::error!(
                        server = member,
                        "moving pages off a draining server panicked"
                    );
                }
            }
            let mut d = self.drains();
            if d.pending.get(&key) == Some(&(true, true)) && store.strong_count() > 0 {
                d.pending.insert(key, (false, false));
                d.queue.push_back((store, member, key));
            } else {
                d.pending.remove(&key);
            }
        }
    }
}

/// Drops a store a task of the cluster's runtime held, on a thread of its
/// own if it is the last reference: the store's link may hold the last
/// reference to the [`Cluster`], whose drop blocks on (and drops) that
/// runtime, which cannot happen on one of its own threads.
fn let_go(h: Arc<Homes>) {
    if Arc::strong_count(&h) == 1 {
        let _ = std::thread::Builder::new()
            .name("rmem-let-go".into())
            .spawn(move || drop(h));
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
    pacer: Option<Pacer>,
    /// Whether dropping the link leaves the cluster (deregisters, so the
    /// coordinator reclaims this agent's intervals and grants at once).
    /// Cleared while pages elsewhere still need them (the kernel module
    /// holds pages of attached processes): the lease then lapses and the
    /// coordinator reclaims them only after its reap delay, which leaves
    /// a restarted agent time to take them over.
    leave_on_drop: std::sync::atomic::AtomicBool,
    /// Failed invalidations are logged at most once per period.
    invalidate_warn: rmem_common::logging::Throttle,
    /// How long a control call waits for a coordinator to lead
    /// ([`ClusterConfig::join_timeout`]).
    control_within: Duration,
    /// The data plane's TLS, for every server granted.
    data_tls: Option<rmem_client::ClientTls>,
    /// The capabilities of this agent's handle spaces, by interval id,
    /// handed to every server it uses.
    caps: Arc<rmem_client::Capabilities>,
    /// Control calls that failed for good, by the coordinator's reason.
    errors: super::errors::ErrorCounts,
}

/// How often the agent looks for capabilities due for renewal.
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// The least time between two renewals asked for early (a server refused
/// a token or denied pages): a burst of denied requests makes one call.
const RENEW_SOON_GAP: Duration = Duration::from_millis(250);

/// As [`ClusterConfig::join_timeout`], for invalidations of freed pages (which fall back
/// to freeing on the servers directly).
const INVALIDATE_WITHIN: Duration = Duration::from_secs(5);

/// Renews the capabilities in `caps` as they come due, for as long as the
/// runtime runs.
async fn renew_capabilities(
    client: ControlClient,
    caps: Arc<rmem_client::Capabilities>,
    tenant: String,
) {
    let warn = rmem_common::logging::Throttle::new(Duration::from_secs(30));
    let mut last = tokio::time::Instant::now();
    loop {
        let early = tokio::select! {
            _ = tokio::time::sleep(RENEW_EVERY) => false,
            _ = caps.renewal_wanted() => {
                tokio::time::sleep_until(last + RENEW_SOON_GAP).await;
                true
            }
        };
        last = tokio::time::Instant::now();
        let due = caps.due(rmem_common::capability::unix_now());
        if due.is_empty() {
            continue;
        }
        let r = client
            .intervals()
            .capabilities(pb::CapabilitiesRequest {
                interval_ids: due.clone(),
            })
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                for (&id, cap) in due.iter().zip(r.capabilities) {
                    if cap.is_empty() {
                        // The interval is gone: nothing left to present.
                        caps.remove(id);
                    } else {
                        caps.set(id, &tenant, cap);
                    }
                }
                if early {
                    tracing::info!(
                        renewed = due.len(),
                        "renewed capabilities early: a server refused one or denied pages"
                    );
                } else {
                    tracing::debug!(renewed = due.len(), "renewed capabilities");
                }
            }
            Err(e) => {
                // All of them again next time, if all were asked for.
                if early {
                    caps.renew_later();
                }
                if let Some(left_out) = warn.ready() {
                    tracing::warn!(error = %e, due = due.len(), left_out, "cannot renew capabilities (trying again; servers deny the handles of any that expires)");
                }
            }
        }
    }
}

pub fn hostname() -> String {
    rmem_common::host::hostname("node")
}

/// Handles the agent's events: drains.
struct Events {
    shared: Arc<Shared>,
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
        let mut stores = self.shared.stores();
        let server = notice.server_id;
        if notice.gone {
            // Only the stores with copies there rebuild.
            stores.retain(|h| h.mark_gone(server));
            tracing::warn!(
                server,
                stores = stores.len(),
                "a memory server was declared gone: rebuilding the copies it held"
            );
        }
        // A few stores at a time, each on a worker of its own, so one slow
        // store does not hold the others back.
        self.shared.drain(stores, server);
        Box::pin(async {})
    }

    fn registered<'a>(
        &'a self,
        reg: &'a Registration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        match reg.redundancy.parse::<rmem_common::Redundancy>() {
            Ok(r) => {
                *self
                    .shared
                    .redundancy
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = r
            }
            Err(e) if !reg.redundancy.is_empty() => {
                tracing::warn!(error = %e, "the coordinator's default redundancy is unknown here; using none");
            }
            Err(_) => {}
        }
        Box::pin(async {})
    }
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
        let name = match &cfg.tls {
            Some(pem) => pem.member_name(
                rmem_common::identity::Role::Agent,
                "name",
                cfg.name.as_deref(),
            )?,
            None => cfg
                .name
                .clone()
                .unwrap_or_else(|| format!("{}/{}", hostname(), std::process::id())),
        };
        // The data plane's TLS follows the agent's files as they are
        // renewed (new connections take the current ones).
        let data_tls = match &cfg.tls {
            Some(pem) => {
                let reloading = rmem_common::tls::reload::Reloading::new(pem.clone());
                let _in_runtime = runtime.enter();
                reloading.watch();
                Some(rmem_client::ClientTls {
                    config: rmem_client::TlsSource::Reloading(
                        reloading.cached(rmem_common::tls::TlsPem::data_client)?,
                    ),
                    server: None,
                })
            }
            None => None,
        };
        let shared = Arc::new(Shared::default());
        let (client, session) = runtime.block_on(async {
            let (client, session, _) = rmem_client::control::join(
                &cfg.coordinator,
                &rmem_client::control::Credentials {
                    token: cfg.token.clone(),
                    tls: cfg.tls.clone(),
                },
                cfg.join_timeout,
                pb::RegisterRequest {
                    role: pb::Role::Agent as i32,
                    name: name.clone(),
                    ..Default::default()
                },
                |_client| {
                    Arc::new(Events {
                        shared: shared.clone(),
                    })
                },
            )
            .await?;
            Ok::<_, ControlError>((client, session))
        })?;
        tracing::info!(coordinator = %cfg.coordinator, member = session.member_id(), %name, "agent joined the cluster");
        // Heartbeats carry the pages at risk of every store.
        let (state, stores) = (session.state.clone(), shared.clone());
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(AT_RISK_EVERY).await;
                let stores = stores.clone();
                let at_risk = tokio::task::spawn_blocking(move || {
                    let stores = stores.stores();
                    let sum = stores.iter().map(|h| h.at_risk()).sum::<u64>();
                    stores.into_iter().for_each(let_go);
                    sum
                })
                .await
                .unwrap_or(0);
                state
                    .at_risk_pages
                    .store(at_risk, std::sync::atomic::Ordering::Relaxed);
            }
        });
        // Capabilities are renewed when two thirds of their life is gone;
        // one that cannot be (no coordinator) is tried again until it can,
        // and servers deny its handles once it expired.
        let caps = Arc::new(rmem_client::Capabilities::default());
        runtime.spawn(renew_capabilities(
            client.clone(),
            caps.clone(),
            cfg.tenant.clone(),
        ));
        // Frees a failing server missed (it was fenced, so invalidations
        // no longer reach it) are paid once it answers again, whatever the
        // stores are doing.
        let owed = shared.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(AT_RISK_EVERY).await;
                let owed = owed.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    for h in owed.stores() {
                        h.pay_owed_idle();
                        let_go(h);
                    }
                })
                .await;
            }
        });
        Ok(Arc::new(Self {
            runtime,
            client,
            session: Some(session),
            name,
            tenant: cfg.tenant.clone(),
            shared,
            pacer: cfg.rebuild_bandwidth.filter(|&b| b > 0).map(|b| Pacer {
                bytes_per_second: b,
                next: Mutex::new(std::time::Instant::now()),
            }),
            leave_on_drop: std::sync::atomic::AtomicBool::new(true),
            invalidate_warn: rmem_common::logging::Throttle::new(Duration::from_secs(5)),
            control_within: cfg.join_timeout,
            data_tls,
            caps,
            errors: Default::default(),
        }))
    }

    /// Waits as long as writing `bytes` of moved or rebuilt pages takes at
    /// the configured rebuild bandwidth.
    pub(crate) fn pace(&self, bytes: u64) {
        if let Some(p) = &self.pacer {
            p.pace(bytes);
        }
    }

    /// Hands drain notices to `homes` while it lives.
    pub(crate) fn watch_drains(&self, homes: &Arc<Homes>) {
        self.shared
            .stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(homes));
    }

    /// Runs control call `call` (made again for each try) until it
    /// succeeds, fails for good, or [`ClusterConfig::join_timeout`] has
    /// passed: a call that finds no coordinator leading (one restarting,
    /// replicas failing over) waits for one, saying so.
    fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T, ControlError>
    where
        F: FnMut(ControlClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(what, self.control_within, call)
    }

    /// As [`Self::call`], trying again for at most `within`.
    fn call_within<T, F, Fut>(
        &self,
        what: &str,
        within: Duration,
        mut call: F,
    ) -> Result<T, ControlError>
    where
        F: FnMut(ControlClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let r = self
            .runtime
            .block_on(rmem_client::control::retrying(what, within, || {
                let f = call(self.client.clone());
                async move {
                    f.await
                        .map(tonic::Response::into_inner)
                        .map_err(ControlError::from)
                }
            }));
        if let Err(e) = &r {
            self.errors.count(control_reason(e), 1);
        }
        r
    }

    /// Control calls that failed for good, by reason.
    pub fn errors(&self) -> Vec<(String, u64)> {
        self.errors.snapshot()
    }

    /// Removes `member` from the subscribers of `interval`.
    pub(crate) fn unsubscribe(&self, interval: u64, member: u64) -> Result<(), ClusterError> {
        self.call("unsubscribing a server", |c| async move {
            c.intervals()
                .unsubscribe(pb::UnsubscribeRequest {
                    interval_id: interval,
                    member_id: member,
                })
                .await
        })?;
        Ok(())
    }

    /// Whether dropping this link leaves the cluster (see the field).
    pub fn set_leave_on_drop(&self, leave: bool) {
        self.leave_on_drop
            .store(leave, std::sync::atomic::Ordering::Relaxed);
    }

    /// The cluster's default redundancy (what the coordinator said at the
    /// last registration).
    pub fn redundancy(&self) -> rmem_common::Redundancy {
        *self
            .shared
            .redundancy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// New grants for `pages` pages (one or more pieces, on one or more
    /// servers); with `copies` > 1, `pages` on each of up to that many
    /// distinct servers, none of `exclude`.
    pub(crate) fn allocate(
        &self,
        pages: u64,
        copies: usize,
        exclude: &[u64],
    ) -> Result<Vec<pb::Grant>, ClusterError> {
        let req = pb::AllocateRequest {
            agent_id: self.member_id(),
            tenant: self.tenant.clone(),
            pages,
            copies: copies as u32,
            exclude: exclude.to_vec(),
            // One name for every try: a retry after a lost answer gets the
            // same grants, not a second set nobody releases.
            request_id: rand::random::<u64>().max(1),
        };
        let r = self.call("allocating capacity", |c| {
            let req = req.clone();
            async move { c.placement().allocate(req).await }
        })?;
        if r.shared_domain {
            tracing::warn!(
                copies,
                "the cluster has too few failure domains with room: copies of some pages share one"
            );
        }
        Ok(r.grants)
    }

    /// The grants this member holds (from earlier incarnations too).
    pub(crate) fn own_grants(&self) -> Result<Vec<pb::Grant>, ClusterError> {
        let agent_id = self.member_id();
        Ok(self
            .call("listing grants", |c| async move {
                c.placement()
                    .list_grants(pb::ListGrantsRequest {
                        agent_id,
                        server_id: 0,
                    })
                    .await
            })?
            .grants)
    }

    /// The intervals this member registered (in earlier incarnations too).
    pub(crate) fn own_intervals(&self) -> Result<Vec<pb::Interval>, ClusterError> {
        let me = self.member_id();
        Ok(self
            .call("listing intervals", |c| async move {
                c.intervals()
                    .list(pb::ListIntervalsRequest {
                        member_id: me,
                        address_space: String::new(),
                    })
                    .await
            })?
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
        let req = pb::RegisterIntervalRequest {
            address_space: space.to_string(),
            start: 0,
            length: pages * 4096,
            tenant: self.tenant.clone(),
            handle_base,
            owner: self.member_id(),
            subscribers: Vec::new(),
        };
        let r = self.call("registering an address space", |c| {
            let req = req.clone();
            async move { c.intervals().register(req).await }
        })?;
        self.caps.set(r.interval_id, &self.tenant, r.capability);
        Ok(r.interval_id)
    }

    /// Gets the capabilities of intervals this agent took over (a
    /// restarted agent's handle spaces).
    pub(crate) fn hold_capabilities(&self, ids: &[u64]) -> Result<(), ClusterError> {
        if ids.is_empty() {
            return Ok(());
        }
        let req = pb::CapabilitiesRequest {
            interval_ids: ids.to_vec(),
        };
        let r = self.call("getting capabilities", |c| {
            let req = req.clone();
            async move { c.intervals().capabilities(req).await }
        })?;
        for (&id, cap) in ids.iter().zip(r.capabilities) {
            if !cap.is_empty() {
                self.caps.set(id, &self.tenant, cap);
            }
        }
        Ok(())
    }

    /// Adds server `member` to the subscribers of `interval`.
    pub(crate) fn subscribe(&self, interval: u64, member: u64) -> Result<(), ClusterError> {
        self.call("subscribing a server", |c| async move {
            c.intervals()
                .subscribe(pb::SubscribeRequest {
                    interval_id: interval,
                    member_id: member,
                })
                .await
        })?;
        Ok(())
    }

    pub(crate) fn unregister(&self, interval: u64) -> Result<(), ClusterError> {
        self.call("unregistering an address space", |c| async move {
            c.intervals()
                .unregister(pb::UnregisterIntervalRequest {
                    interval_id: interval,
                })
                .await
        })?;
        Ok(())
    }

    /// Drops the capability of a retired interval (after its pages were
    /// freed: a direct FREE after a failed invalidation still needs it).
    pub(crate) fn forget_capability(&self, interval: u64) {
        self.caps.remove(interval);
    }

    /// Invalidates byte ranges `(start, length)` of `space` as one
    /// invalidation (reason `unmap`, this agent as origin): the servers
    /// holding those pages free them before this returns. False if it did
    /// not complete (the caller frees what it can directly).
    pub(crate) fn invalidate_spans(&self, space: &str, spans: &[(u64, u64)]) -> bool {
        self.invalidate(space, spans)
            .is_some_and(|(complete, _)| complete)
    }

    /// As [`Self::invalidate_spans`]; the members that acknowledged it
    /// (they freed their copies of those pages), or `None` if it failed.
    /// A server missing from the list may still hold the pages: one fenced
    /// earlier is no longer subscribed, so the invalidation does not wait
    /// for it and still completes.
    pub(crate) fn invalidate_acked(&self, space: &str, spans: &[(u64, u64)]) -> Option<Vec<u64>> {
        self.invalidate(space, spans).map(|(_, acked)| acked)
    }

    fn invalidate(&self, space: &str, spans: &[(u64, u64)]) -> Option<(bool, Vec<u64>)> {
        let Some((&(start, length), more)) = spans.split_first() else {
            return Some((true, Vec::new()));
        };
        let req = pb::InvalidateRequest {
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
        };
        // Shorter: the caller frees the pages directly when this fails.
        let r = self.call_within("invalidating freed pages", INVALIDATE_WITHIN, |c| {
            let req = req.clone();
            async move { c.invalidation().invalidate(req).await }
        });
        match r {
            Ok(r) => Some((r.complete, r.acknowledged)),
            Err(e) => {
                // One per free batch while the coordinator is away: at most
                // one line every few seconds.
                if let Some(left_out) = self.invalidate_warn.ready() {
                    tracing::warn!(error = %e, space, left_out, "cannot invalidate freed pages (freeing them on their servers directly)");
                }
                None
            }
        }
    }

    /// How long control calls keep trying while no coordinator answers
    /// (`join_timeout`).
    pub(crate) fn control_within(&self) -> Duration {
        self.control_within
    }

    /// Returns grants by id.
    pub(crate) fn release_grants(&self, ids: &[u64]) {
        // One budget for them all: with no coordinator, closing does not
        // wait a whole budget per grant.
        let until = std::time::Instant::now() + self.control_within;
        for &id in ids {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let released = self.call_within("releasing a grant", left, |c| async move {
                c.placement()
                    .release(pb::ReleaseRequest {
                        grant_id: id,
                        pages: 0,
                    })
                    .await
            });
            if let Err(e) = released {
                tracing::warn!(grant = id, error = %e, "cannot release a grant");
            }
        }
    }

    pub fn member_id(&self) -> u64 {
        self.session.as_ref().map_or(0, MemberSession::member_id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection settings for a grant's server: its tenant credential,
    /// and with TLS, the server's certificate must name it.
    pub(crate) fn server_config(&self, g: &pb::Grant) -> ClientConfig {
        let mut c = ClientConfig::new(g.data_addr.clone())
            .with_tenant(g.tenant.clone(), g.credential.clone().into_bytes());
        if let Some(tls) = &self.data_tls {
            c = c.with_tls_source(tls.config.clone(), Some(g.server_name.clone()));
        }
        c.capabilities = Some(self.caps.clone());
        c
    }

    pub fn client(&self) -> &ControlClient {
        &self.client
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

/// A failed control call's reason for metrics: the coordinator's
/// `rmem-reason`, else what the failure was.
fn control_reason(e: &ControlError) -> &str {
    match e.reason() {
        "" => match e {
            ControlError::Unreachable { .. } => "unreachable",
            ControlError::Endpoint { .. } => "bad_endpoint",
            ControlError::Rpc { .. } => "unspecified",
        },
        r => r,
    }
}

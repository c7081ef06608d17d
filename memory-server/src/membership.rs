//! Cluster membership of a memory server: joins the coordinator, keeps its
//! lease with its usage in every heartbeat, and frees the pages of ranges
//! that an invalidation reaches (an agent unmapped them, or its region was
//! dropped), acknowledging only once they are gone. On every registration
//! (first, or again after a lost lease or a fence) it reconciles its store
//! with the registry (see [`reconcile`]).
//!
//! A server never mass-deletes because the control plane forgot. The
//! coordinator names its cluster (an identity drawn when its state was
//! created) and its epoch in every registration; the server records them
//! with its pages (in the pool file when there is one) and frees pages on a
//! registry's word only when that registry is the one the pages were
//! stored under, no older than the newest epoch seen (see [`judge`]). A
//! coordinator that lost its state, was restored from an older copy, or
//! belongs to another cluster frees nothing here but what it invalidates
//! itself; the pages are served to, and freed by, the agents that hold
//! them, until the store is empty or `adopt_unknown_after` passes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmem_client::control::{
    ControlClient, ControlError, MemberSession, Registration, SessionState, Subscriber,
};
use rmem_common::capability::Verifier;
use rmem_common::host::reachable;
use rmem_proto::control::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::store::{ClusterView, Store};

/// How often a server declared gone reconciles (see
/// [`FreeInvalidated::reconcile_while_gone`]).
const GONE_RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Whether the coordinator a server registered with knows its pages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Standing {
    /// It does: reconcile frees what none of its intervals covers, and
    /// the view is recorded with the pages.
    Known(ClusterView),
    /// It cannot know some pages stored here: free nothing on its word.
    /// `new` is what the server records once it accepts this coordinator.
    Unknown {
        why: String,
        new: Option<ClusterView>,
    },
}

/// Judges a registration answering `cluster_id` at `epoch`, for a store
/// holding `used` pages stored under `known`.
fn judge(known: Option<ClusterView>, cluster_id: &str, epoch: u64, used: u64) -> Standing {
    let Some(id) = ClusterView::parse_id(cluster_id) else {
        return Standing::Unknown {
            why: format!(
                "the coordinator names no cluster identity (`{cluster_id}`): it is older than this server"
            ),
            new: None,
        };
    };
    // What the server records once it accepts this coordinator: the
    // coordinator as it is (after a restore, its own older epoch, so the
    // next registration with it is not judged a restore again).
    let new = ClusterView { id, epoch };
    match known {
        // Nothing to protect, or pages from before identities existed.
        _ if used == 0 => Standing::Known(new),
        None => Standing::Known(new),
        Some(k) if k.id != id => Standing::Unknown {
            why: format!(
                "the coordinator is cluster {id:032x} but the {used} pages here were stored for cluster {k}: it lost its state, or this server joined another cluster"
            ),
            new: Some(new),
        },
        Some(k) if epoch < k.epoch => Standing::Unknown {
            why: format!(
                "the coordinator's state is at epoch {epoch}, older than epoch {} this server saw: it was restored from an older copy",
                k.epoch
            ),
            new: Some(new),
        },
        Some(_) => Standing::Known(new),
    }
}

/// Since when, and why, the current coordinator is not trusted to free.
#[derive(Debug)]
struct Distrust {
    since: Instant,
    new: Option<ClusterView>,
}

/// Frees invalidated pages; reconciles the store with the registry on
/// every registration.
struct FreeInvalidated {
    store: Arc<Store>,
    client: ControlClient,
    adopt_after: Option<Duration>,
    distrust: Mutex<Option<Distrust>>,
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

    fn registered<'a>(
        &'a self,
        reg: &'a Registration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let standing = judge(
                self.store.cluster_view(),
                &reg.cluster_id,
                reg.epoch,
                self.store.used_pages(),
            );
            let free = match standing {
                Standing::Known(view) => {
                    self.trust(view);
                    true
                }
                Standing::Unknown { why, new } => {
                    tracing::error!(
                        pages = self.store.used_pages(),
                        reason = %why,
                        adopt_after = ?self.adopt_after,
                        note = "the agents holding the pages still read and free them",
                        "the coordinator does not know the pages stored here: freeing none on its word"
                    );
                    let mut d = self.distrust.lock().unwrap_or_else(|e| e.into_inner());
                    let since = d.as_ref().map_or_else(Instant::now, |d| d.since);
                    *d = Some(Distrust { since, new });
                    self.store.set_coordinator_unknown(true);
                    false
                }
            };
            self.reconcile(reg.member_id, free, out_of_service(reg.state))
                .await;
        })
    }
}

impl FreeInvalidated {
    /// Records `view` with the pages and trusts the coordinator again.
    fn trust(&self, view: ClusterView) {
        if let Err(e) = self.store.set_cluster_view(view) {
            tracing::error!(error = %e, "cannot record the cluster's identity in the pool file");
        }
        self.distrust
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.store.set_coordinator_unknown(false);
    }

    async fn reconcile(&self, member_id: u64, free: bool, stale_rule: bool) {
        match reconcile(&self.store, &self.client, member_id, free, stale_rule).await {
            Ok(r) if r.freed > 0 || r.subscribed > 0 => tracing::info!(
                freed = r.freed,
                stale = r.stale,
                subscribed = r.subscribed,
                "reconciled stored pages with the cluster's intervals and grants"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot reconcile stored pages with the cluster")
            }
        }
    }

    /// While this server is declared gone (it came back after agents
    /// rebuilt its copies elsewhere), reconciles every few seconds, so the
    /// copies agents move away while it drains are freed as their grants
    /// are returned.
    async fn reconcile_while_gone(&self, session: &SessionState, last: &mut Instant) {
        let gone = session.member_state.load(Ordering::Acquire) == pb::MemberState::Gone as i32;
        if !gone || last.elapsed() < GONE_RECONCILE_EVERY || self.store.used_pages() == 0 {
            return;
        }
        *last = Instant::now();
        let trusted = self
            .distrust
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        self.reconcile(session.member_id.load(Ordering::Acquire), trusted, true)
            .await;
    }

    /// Runs every few hundred ms: records newer epochs the heartbeats
    /// brought, and ends a distrust once nothing is left to protect or
    /// `adopt_after` passed.
    async fn tick(&self, session: &SessionState) {
        let epoch = session.epoch.load(Ordering::Acquire);
        let ended = {
            let d = self.distrust.lock().unwrap_or_else(|e| e.into_inner());
            match &*d {
                None => {
                    // A newer epoch of the coordinator the pages belong to
                    // (heartbeats bring it), recorded under the distrust
                    // lock so a registration judging meanwhile is not
                    // undone. The session's identity is checked: right
                    // after registering with another coordinator, its epoch
                    // is not this view's.
                    let ours = self.store.cluster_view().filter(|v| {
                        epoch > v.epoch
                            && ClusterView::parse_id(&session.cluster_id()) == Some(v.id)
                    });
                    if let Some(v) = ours
                        && let Err(e) = self.store.set_cluster_view(ClusterView { epoch, ..v })
                    {
                        tracing::error!(error = %e, "cannot record the cluster's epoch in the pool file");
                    }
                    return;
                }
                Some(Distrust { new: None, .. }) => return,
                Some(Distrust {
                    since,
                    new: Some(new),
                }) => {
                    let empty = self.store.used_pages() == 0;
                    let waited = self.adopt_after.is_some_and(|a| since.elapsed() >= a);
                    (empty || waited).then_some((*new, empty))
                }
            }
        };
        if let Some((new, empty)) = ended {
            if empty {
                tracing::info!(cluster = %new, "no page is left from before: trusting this coordinator");
            } else {
                tracing::warn!(
                    cluster = %new,
                    pages = self.store.used_pages(),
                    "adopt_unknown_after passed: trusting this coordinator; pages none of its intervals covers are freed"
                );
            }
            self.trust(new);
            if !empty {
                let stale_rule = out_of_service(session.member_state.load(Ordering::Acquire));
                self.reconcile(session.member_id.load(Ordering::Acquire), true, stale_rule)
                    .await;
            }
        }
    }
}

/// What a reconcile did.
#[derive(Debug, Default, Clone, Copy)]
struct Reconciled {
    /// Pages freed (orphans and stale copies).
    freed: u64,
    /// Of those, stale copies: pages of an agent that holds no grant here.
    stale: u64,
    subscribed: u64,
}

/// Brings the store in line with the registry after (re)joining: a server
/// that was away or fenced missed invalidations and lost its subscriptions.
/// Every stored page no live interval of its tenant covers is freed (it
/// belonged to a range unmapped meanwhile), and the server subscribes to
/// every interval whose pages it holds, so later invalidations reach it.
///
/// A page of an interval whose owner holds no grant on this server is a
/// stale copy and is freed too: an agent writes only into its grants and
/// returns them only once nothing of its is left here (it moved its copies
/// away while this server was drained or declared gone). So a server that
/// comes back after its copies were rebuilt elsewhere never keeps them.
///
/// The store is scanned before the intervals are listed: a page stored
/// after the scan is not a candidate, and one stored before it belongs to
/// an interval registered before it, which the listing then shows. In a
/// cluster every page belongs to a registered interval; pages written by
/// clients outside the cluster's agents do not survive a reconcile.
///
/// Without `free`, only the subscriptions are renewed (the coordinator
/// does not know every page here, see [`judge`]). Stale copies are looked
/// for only with `stale_rule`: while the server is draining or gone, when
/// the coordinator grants nothing new on it.
async fn reconcile(
    store: &Arc<Store>,
    client: &ControlClient,
    member_id: u64,
    free: bool,
    stale_rule: bool,
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
    // Listed after the intervals: a grant returned between the two
    // listings makes its pages stale, which they are.
    let granted = if stale_rule {
        granted_agents(client, member_id).await?
    } else {
        Default::default()
    };
    let mut done = Reconciled::default();
    let mut to_free: Vec<(String, Vec<u64>)> = Vec::new();
    // (tenant, handle, owner) of stale copies.
    let mut stale: Vec<(String, u64, u64)> = Vec::new();
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
                Some((_, end, iv)) if h < end && stale_rule && !granted.contains(&iv.owner) => {
                    stale.push((tenant.clone(), h, iv.owner));
                }
                Some((_, end, iv)) if h < end => {
                    if !iv.subscribers.contains(&member_id) {
                        to_subscribe.insert(iv.id);
                    }
                }
                _ => orphans.push(h),
            }
        }
        if free && !orphans.is_empty() {
            to_free.push((tenant, orphans));
        }
    }
    // Stale copies whose owner holds no grant here still, just before they
    // are freed (the server is draining or gone: nothing new is granted
    // on it, this only narrows an undrain racing the reconcile).
    if free && !stale.is_empty() {
        let granted = granted_agents(client, member_id).await?;
        let mut by_tenant: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for (tenant, h, owner) in stale {
            if !granted.contains(&owner) {
                done.stale += 1;
                by_tenant.entry(tenant).or_default().push(h);
            }
        }
        to_free.extend(by_tenant);
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

/// The agents holding grants on server `member_id`.
async fn granted_agents(
    client: &ControlClient,
    member_id: u64,
) -> Result<std::collections::BTreeSet<u64>, ControlError> {
    Ok(client
        .placement()
        .list_grants(pb::ListGrantsRequest {
            agent_id: 0,
            server_id: member_id,
        })
        .await?
        .into_inner()
        .grants
        .iter()
        .map(|g| g.agent_id)
        .collect())
}

/// Whether the coordinator said this server is draining or gone (the
/// state of a registration or heartbeat, `pb::MemberState` as i32).
fn out_of_service(state: i32) -> bool {
    state == pb::MemberState::Draining as i32 || state == pb::MemberState::Gone as i32
}

/// Adds the capability keys the coordinator last listed to those the data
/// plane accepts. Keys are never dropped while the server runs: a
/// capability signed by a key the coordinator stopped listing still
/// expires on its own.
fn learn_keys(state: &SessionState, verifier: Option<&std::sync::RwLock<Verifier>>) {
    let Some(verifier) = verifier else {
        return;
    };
    let keys = state
        .capability_keys
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let retired = state
        .retired_capability_keys
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if keys.is_empty() {
        return;
    }
    let mut v = verifier.write().unwrap_or_else(|e| e.into_inner());
    let forgot = v.forget(retired);
    if forgot > 0 {
        tracing::info!(forgot, keys = v.len(), "forgot retired capability keys");
    }
    let before = v.len();
    let bad = v.learn(keys);
    if bad > 0 {
        tracing::warn!(
            bad,
            "the coordinator listed capability keys of the wrong length"
        );
    }
    if v.len() > before {
        tracing::info!(keys = v.len(), "learned the coordinator's capability keys");
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
    rmem_common::host::hostname("rmem-server")
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
        tls: Option<rmem_common::tls::TlsPem>,
        capabilities: Option<Arc<std::sync::RwLock<Verifier>>>,
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
        let req = pb::RegisterRequest {
            role: pb::Role::Server as i32,
            // With TLS, the certificate's name (checked at start).
            name: match &tls {
                Some(pem) => pem.identity.name.clone(),
                None => cfg.name.clone().unwrap_or_else(hostname),
            },
            data_addr: reachable(cfg.advertise.as_deref(), data),
            grpc_addr: reachable(cfg.grpc_advertise.as_deref(), grpc),
            capacity_pages: store.capacity_pages(),
            transports: transports.iter().map(|t| t.to_string()).collect(),
            domain: cfg.domain.clone().unwrap_or_default(),
        };
        let (_, session, events) = rmem_client::control::join(
            endpoint,
            &rmem_client::control::Credentials { token, tls },
            cfg.join_timeout,
            req,
            |client| {
                Arc::new(FreeInvalidated {
                    store: store.clone(),
                    client,
                    adopt_after: cfg.adopt_unknown_after,
                    distrust: Mutex::new(None),
                })
            },
        )
        .await?;
        let stop = CancellationToken::new();
        let state = session.state.clone();
        let done = stop.clone();
        // The keys of the registration, before the first agent comes.
        learn_keys(&state, capabilities.as_deref());
        tokio::spawn(async move {
            let mut reconciled = Instant::now();
            loop {
                learn_keys(&state, capabilities.as_deref());
                state
                    .used_pages
                    .store(store.used_pages(), Ordering::Relaxed);
                events.tick(&state).await;
                events.reconcile_while_gone(&state, &mut reconciled).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0000000000000000000000000000000a";
    const B: &str = "0000000000000000000000000000000b";

    fn view(id: u128, epoch: u64) -> Option<ClusterView> {
        Some(ClusterView { id, epoch })
    }

    #[test]
    fn the_coordinator_the_pages_were_stored_under_is_trusted() {
        assert_eq!(
            judge(view(0xa, 3), A, 4, 100),
            Standing::Known(ClusterView { id: 0xa, epoch: 4 })
        );
        // A re-registration within the same run.
        assert_eq!(
            judge(view(0xa, 4), A, 4, 100),
            Standing::Known(ClusterView { id: 0xa, epoch: 4 })
        );
        // The first registration, and a pool file from before identities.
        assert_eq!(
            judge(None, A, 1, 100),
            Standing::Known(ClusterView { id: 0xa, epoch: 1 })
        );
    }

    #[test]
    fn a_coordinator_that_forgot_the_pages_frees_none_of_them() {
        let Standing::Unknown { why, new } = judge(view(0xa, 7), B, 1, 100) else {
            panic!("another cluster's coordinator was trusted");
        };
        assert!(why.contains("lost its state"), "{why}");
        assert_eq!(new, view(0xb, 1));
        // Restored from an older copy: same identity, older epoch.
        let Standing::Unknown { why, new } = judge(view(0xa, 7), A, 5, 100) else {
            panic!("an older state was trusted");
        };
        assert!(why.contains("older copy"), "{why}");
        assert_eq!(new, view(0xa, 5), "accepted later, it is recorded as it is");
        // An identity that is not one.
        assert!(matches!(
            judge(view(0xa, 7), "", 9, 100),
            Standing::Unknown { new: None, .. }
        ));
    }

    #[test]
    fn with_no_page_stored_any_coordinator_is_trusted() {
        assert_eq!(
            judge(view(0xa, 7), B, 1, 0),
            Standing::Known(ClusterView { id: 0xb, epoch: 1 })
        );
        assert_eq!(
            judge(view(0xa, 7), A, 2, 0),
            Standing::Known(ClusterView { id: 0xa, epoch: 2 })
        );
    }
}

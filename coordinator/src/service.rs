//! The gRPC services over the [`Cluster`]: argument checks and status
//! codes are the cluster's; this layer adds waiting (for acknowledgements,
//! for invalidations to finish) and streaming, always outside the lock.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rmem_proto::control::v1::cluster_admin_server::ClusterAdmin;
use rmem_proto::control::v1::intervals_server::Intervals;
use rmem_proto::control::v1::invalidation_server::Invalidation;
use rmem_proto::control::v1::membership_server::Membership;
use rmem_proto::control::v1::placement_server::Placement;
use rmem_proto::control::v1::{self as pb};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, Finished};
use crate::error::CoordError;
use crate::membership::{Liveness, Member};
use crate::state::{GrantRecord, RoleRecord};
use rmem_common::identity::{Identity, Role};

/// Who made the call, with mutual TLS on (the gate put the identity of the
/// caller's certificate in the request); None without TLS.
fn caller<T>(r: &Request<T>) -> Option<&Identity> {
    r.extensions().get::<Identity>()
}

/// With mutual TLS on, refuses a caller whose role is not `role` (what:
/// the action, for the message).
fn require<T>(r: &Request<T>, role: Role, what: &str) -> Result<(), CoordError> {
    match caller(r) {
        Some(id) if id.role != role => Err(CoordError::Forbidden {
            caller: id.to_string(),
            what: format!("{what} (it takes the {role} role)"),
        }),
        _ => Ok(()),
    }
}

/// With mutual TLS on, a member registers only as what its certificate
/// says: its role, under its name (so no one takes over another's name).
fn may_register(r: &Request<pb::RegisterRequest>) -> Result<(), CoordError> {
    let Some(id) = caller(r) else {
        return Ok(());
    };
    let req = r.get_ref();
    let as_role = match pb::Role::try_from(req.role) {
        Ok(pb::Role::Server) => Some(Role::Server),
        Ok(pb::Role::Agent) => Some(Role::Agent),
        _ => None,
    };
    if as_role != Some(id.role) || req.name != id.name {
        return Err(CoordError::Forbidden {
            caller: id.to_string(),
            what: format!(
                "register as {} `{}` (its certificate lets it register as {} `{}` only)",
                as_role.map_or("an unknown role", Role::as_str),
                req.name,
                id.role,
                id.name
            ),
        });
    }
    Ok(())
}

/// With mutual TLS on, whether the caller may act for `member`: an admin
/// for anyone; any other member only for the member registered under its
/// certificate's role and name (an agent for itself, its intervals and its
/// grants; a server for itself). `what` names the action in the refusal.
fn acts_for(
    c: &Cluster,
    who: Option<&Identity>,
    member: u64,
    what: &str,
) -> Result<(), CoordError> {
    let Some(id) = who else {
        return Ok(());
    };
    if id.role == Role::Admin {
        return Ok(());
    }
    if member == 0 {
        // 0 means every member in listings: only admins act for them all.
        return Err(CoordError::Forbidden {
            caller: id.to_string(),
            what: format!("{what} of every member (give its own member id)"),
        });
    }
    let m = c.members.get(member)?;
    let role = match m.rec.role {
        RoleRecord::Server => Role::Server,
        RoleRecord::Agent => Role::Agent,
    };
    if role == id.role && m.rec.name == id.name {
        Ok(())
    } else {
        Err(CoordError::Forbidden {
            caller: id.to_string(),
            what: format!(
                "{what} of {role} `{}` (only itself or an admin may)",
                m.rec.name
            ),
        })
    }
}

/// As [`acts_for`], for the owner of interval `interval`.
fn owns_interval(
    c: &Cluster,
    who: Option<&Identity>,
    interval: u64,
    what: &str,
) -> Result<(), CoordError> {
    if who.is_none() {
        return Ok(());
    }
    let owner = c.intervals.get(interval)?.rec.owner;
    acts_for(c, who, owner, what)
}

/// State shared by every service.
#[derive(Debug)]
pub struct Shared {
    pub cluster: Mutex<Cluster>,
    /// Counts finished invalidations; ReadBegin waits on it.
    pub finished: watch::Sender<u64>,
    pub default_deadline: Duration,
    pub max_deadline: Duration,
    pub started: Instant,
    pub shutdown: CancellationToken,
    /// Where the state is ("log", "memory", "etcd").
    pub backend: &'static str,
    /// With etcd: the replicas and etcd's health, for status.
    pub etcd: Option<crate::state::etcd::Inspector>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Cluster> {
        // A panic while holding the lock is a bug; the model is still
        // consistent record by record, so keep serving.
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster's status as Status answers it, but etcd's (which takes
    /// a round trip to etcd).
    pub fn status(&self) -> pb::StatusResponse {
        let c = self.lock();
        let mut s = pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            epoch: c.epoch(),
            cluster_id: c.cluster_id().to_string(),
            redundancy: c.redundancy().to_string(),
            intervals: c.intervals.len() as u64,
            invalidations_total: c.counters.invalidations,
            invalidations_in_flight: c.fanout.pending.len() as u64,
            members_fenced_total: c.counters.fenced,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            allocated_pages: c.grants.iter().map(|g| g.pages).sum(),
            ..Default::default()
        };
        (s.rebuild_pages_left, s.rebuild_pages_total) = c.rebuild_progress();
        s.state_backend = self.backend.into();
        for m in c.members.iter() {
            let up = m.liveness == Liveness::Up;
            match m.rec.role {
                RoleRecord::Server => {
                    match (up, m.rec.draining) {
                        _ if m.rec.gone && m.liveness != Liveness::Left => s.servers_gone += 1,
                        (true, false) => s.servers_up += 1,
                        (true, true) => s.servers_draining += 1,
                        (false, _) if m.liveness != Liveness::Left => s.servers_down += 1,
                        _ => {}
                    }
                    if up {
                        s.capacity_pages += m.rec.capacity_pages;
                        s.used_pages += m.used_pages;
                    }
                }
                RoleRecord::Agent => match m.liveness {
                    Liveness::Up => {
                        s.agents_up += 1;
                        s.pages_at_risk += m.at_risk_pages;
                    }
                    Liveness::Left => {}
                    _ => s.agents_down += 1,
                },
            }
        }
        s
    }
}

/// Every control-plane service, over one [`Shared`].
#[derive(Debug, Clone)]
pub struct Service {
    /// Set once this coordinator serves (a replica: once elected and its
    /// state loaded); the gate admits no call before.
    pub slot: Arc<std::sync::OnceLock<Arc<Shared>>>,
}

type Res<T> = Result<Response<T>, Status>;

fn ok<T>(t: T) -> Res<T> {
    Ok(Response::new(t))
}

fn role_pb(r: RoleRecord) -> pb::Role {
    match r {
        RoleRecord::Server => pb::Role::Server,
        RoleRecord::Agent => pb::Role::Agent,
    }
}

fn state_pb(m: &Member) -> pb::MemberState {
    if m.rec.gone && m.liveness != Liveness::Left {
        return pb::MemberState::Gone;
    }
    match m.liveness {
        Liveness::Up if m.rec.draining => pb::MemberState::Draining,
        Liveness::Up => pb::MemberState::Up,
        Liveness::Down => pb::MemberState::Down,
        Liveness::Fenced => pb::MemberState::Fenced,
        Liveness::Left => pb::MemberState::Left,
    }
}

fn member_pb(c: &Cluster, m: &Member, allocated: u64) -> pb::Member {
    let now = Instant::now();
    let remaining = if m.lease_until >= now {
        (m.lease_until - now).as_millis() as i64
    } else {
        -((now - m.lease_until).as_millis() as i64)
    };
    pb::Member {
        id: m.rec.id,
        role: role_pb(m.rec.role) as i32,
        name: m.rec.name.clone(),
        data_addr: m.rec.data_addr.clone(),
        grpc_addr: m.rec.grpc_addr.clone(),
        state: state_pb(m) as i32,
        capacity_pages: m.rec.capacity_pages,
        used_pages: m.used_pages,
        allocated_pages: allocated,
        transports: m.rec.transports.clone(),
        lease_remaining_ms: remaining,
        incarnation: m.rec.incarnation,
        subscriptions: c.intervals.subscriptions(m.rec.id) as u64,
        domain: m.rec.domain.clone(),
        at_risk_pages: m.at_risk_pages,
    }
}

/// A member's session request names the cluster it registered with: one
/// of another identity (this coordinator lost its state) must not pass
/// for a member whose id and incarnation happen to match.
fn same_cluster(c: &Cluster, member: u64, theirs: &str) -> Result<(), CoordError> {
    if theirs.is_empty() || theirs == c.cluster_id() {
        Ok(())
    } else {
        Err(CoordError::OtherCluster {
            member,
            theirs: theirs.to_string(),
            ours: c.cluster_id().to_string(),
        })
    }
}

fn lease_ms(c: &Cluster) -> u32 {
    c.lease().as_millis().min(u128::from(u32::MAX)) as u32
}

#[tonic::async_trait]
impl Membership for Service {
    async fn register(&self, r: Request<pb::RegisterRequest>) -> Res<pb::RegisterResponse> {
        may_register(&r)?;
        let mut c = self.shared().lock();
        let rec = c.register(r.get_ref())?;
        ok(pb::RegisterResponse {
            member_id: rec.id,
            incarnation: rec.incarnation,
            lease_ttl_ms: lease_ms(&c),
            state: if rec.gone {
                pb::MemberState::Gone
            } else if rec.draining {
                pb::MemberState::Draining
            } else {
                pb::MemberState::Up
            } as i32,
            cluster_id: c.cluster_id().to_string(),
            epoch: c.epoch(),
            redundancy: c.redundancy().to_string(),
            capability_keys: c.capability_keys(),
            retired_capability_keys: c.retired_capability_keys(),
        })
    }

    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> Res<pb::HeartbeatResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let mut c = self.shared().lock();
        acts_for(&c, who.as_ref(), r.member_id, "renew the lease")?;
        same_cluster(&c, r.member_id, &r.cluster_id)?;
        let state =
            state_pb(c.heartbeat(r.member_id, r.incarnation, r.used_pages, r.at_risk_pages)?);
        ok(pb::HeartbeatResponse {
            lease_ttl_ms: lease_ms(&c),
            state: state as i32,
            epoch: c.epoch(),
            capability_keys: c.capability_keys(),
            retired_capability_keys: c.retired_capability_keys(),
        })
    }

    async fn deregister(&self, r: Request<pb::DeregisterRequest>) -> Res<pb::DeregisterResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let mut c = self.shared().lock();
        acts_for(&c, who.as_ref(), r.member_id, "deregister")?;
        same_cluster(&c, r.member_id, &r.cluster_id)?;
        c.deregister(r.member_id, r.incarnation)?;
        ok(pb::DeregisterResponse {})
    }

    async fn list_members(
        &self,
        r: Request<pb::ListMembersRequest>,
    ) -> Res<pb::ListMembersResponse> {
        let role = pb::Role::try_from(r.get_ref().role)
            .map_err(|_| CoordError::invalid("role", "unknown role"))?;
        let c = self.shared().lock();
        let granted = c.grants.per_server();
        let members = c
            .members
            .iter()
            .filter(|m| role == pb::Role::Unspecified || role_pb(m.rec.role) == role)
            .map(|m| member_pb(&c, m, granted.get(&m.rec.id).copied().unwrap_or(0)))
            .collect();
        ok(pb::ListMembersResponse { members })
    }
}

#[tonic::async_trait]
impl Placement for Service {
    async fn allocate(&self, r: Request<pb::AllocateRequest>) -> Res<pb::AllocateResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let mut c = self.shared().lock();
        acts_for(&c, who.as_ref(), r.agent_id, "allocate for the grants")?;
        let a = c.allocate_once(
            r.request_id,
            r.agent_id,
            &r.tenant,
            r.pages,
            r.copies,
            &r.exclude,
        )?;
        let grants = a
            .grants
            .iter()
            .map(|g| grant_for(&c, who.as_ref(), g))
            .collect();
        ok(pb::AllocateResponse {
            grants,
            shared_domain: a.shared_domain,
        })
    }

    async fn release(&self, r: Request<pb::ReleaseRequest>) -> Res<pb::ReleaseResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let mut c = self.shared().lock();
        if who.is_some() {
            let agent = c.grants.get(r.grant_id)?.agent;
            acts_for(&c, who.as_ref(), agent, "release a grant")?;
        }
        c.release(r.grant_id, r.pages)?;
        ok(pb::ReleaseResponse {})
    }

    async fn list_grants(&self, r: Request<pb::ListGrantsRequest>) -> Res<pb::ListGrantsResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let c = self.shared().lock();
        // Grants may carry their tenant's credential: an agent lists its
        // own, a server those on itself.
        match who.as_ref().map(|id| id.role) {
            None | Some(Role::Admin) => {}
            Some(Role::Server) if r.agent_id == 0 => {
                acts_for(&c, who.as_ref(), r.server_id, "list the grants")?
            }
            Some(_) => acts_for(&c, who.as_ref(), r.agent_id, "list the grants")?,
        }
        let grants = c
            .grants
            .iter()
            .filter(|g| r.agent_id == 0 || g.agent == r.agent_id)
            .filter(|g| r.server_id == 0 || g.server == r.server_id)
            .map(|g| grant_for(&c, who.as_ref(), g))
            .collect();
        ok(pb::ListGrantsResponse { grants })
    }
}

/// A grant as `who` sees it. Under mutual TLS only an admin is handed the
/// tenant's credential: an agent's certificate and its capabilities open
/// the servers to it (for its own handles only), so no agent holds a
/// secret that would let it act as its whole tenant.
fn grant_for(c: &Cluster, who: Option<&Identity>, g: &GrantRecord) -> pb::Grant {
    let mut pb = c.grant_pb(g);
    if who.is_some_and(|id| id.role != Role::Admin) {
        pb.credential.clear();
    }
    pb
}

#[tonic::async_trait]
impl Intervals for Service {
    async fn register(
        &self,
        r: Request<pb::RegisterIntervalRequest>,
    ) -> Res<pb::RegisterIntervalResponse> {
        let mut c = self.shared().lock();
        acts_for(&c, caller(&r), r.get_ref().owner, "register an interval")?;
        let (interval_id, seq) = c.register_interval(r.get_ref())?;
        let capability = c.capability(interval_id)?;
        ok(pb::RegisterIntervalResponse {
            interval_id,
            seq,
            capability,
        })
    }

    async fn unregister(
        &self,
        r: Request<pb::UnregisterIntervalRequest>,
    ) -> Res<pb::UnregisterIntervalResponse> {
        let id = r.get_ref().interval_id;
        let last = {
            let c = self.shared().lock();
            owns_interval(&c, caller(&r), id, "unregister an interval")?;
            c.final_invalidation(id)?
        };
        // What is left of the interval on its servers goes before the
        // interval does (they would keep it: no interval would name it).
        // A server that does not acknowledge is fenced, and frees it when
        // it reconciles. If the invalidation cannot run, the interval
        // stays, and is reaped with its owner.
        if let Some(req) = last {
            let shared = self.shared();
            let (_, _, finished) = run_invalidation(shared, &req, shared.default_deadline).await?;
            if !finished.fenced.is_empty() {
                tracing::warn!(interval = id, fenced = ?finished.fenced, "servers that did not free an unregistered interval's pages were fenced");
            }
        }
        self.shared().lock().unregister_interval(id)?;
        ok(pb::UnregisterIntervalResponse {})
    }

    async fn subscribe(&self, r: Request<pb::SubscribeRequest>) -> Res<pb::SubscribeResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let mut c = self.shared().lock();
        // The interval's owner subscribes the servers it uses; a server
        // subscribes itself (reconciling what it holds). An agent does not
        // subscribe itself to another's interval: it would hold up that
        // agent's invalidations until it is fenced.
        let is_agent = who.as_ref().is_some_and(|id| id.role == Role::Agent);
        if is_agent || acts_for(&c, who.as_ref(), r.member_id, "subscribe").is_err() {
            owns_interval(
                &c,
                who.as_ref(),
                r.interval_id,
                "subscribe a server to an interval",
            )?;
        }
        let seq = c.subscribe(r.interval_id, r.member_id)?;
        ok(pb::SubscribeResponse { seq })
    }

    async fn unsubscribe(
        &self,
        r: Request<pb::UnsubscribeRequest>,
    ) -> Res<pb::UnsubscribeResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let mut c = self.shared().lock();
        if acts_for(&c, who.as_ref(), r.member_id, "unsubscribe").is_err() {
            owns_interval(
                &c,
                who.as_ref(),
                r.interval_id,
                "unsubscribe a server from an interval",
            )?;
        }
        c.unsubscribe(r.interval_id, r.member_id)?;
        ok(pb::UnsubscribeResponse {})
    }

    async fn list(&self, r: Request<pb::ListIntervalsRequest>) -> Res<pb::ListIntervalsResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let c = self.shared().lock();
        if r.member_id != 0 {
            c.members.get(r.member_id)?;
        }
        // Servers reconcile against every interval and admins see them
        // all; an agent lists its own (others' name their processes and
        // handles).
        if who.as_ref().is_some_and(|id| id.role == Role::Agent) {
            if r.member_id == 0 {
                return Err(CoordError::Forbidden {
                    caller: who.map(|id| id.to_string()).unwrap_or_default(),
                    what: "list every interval (an agent lists its own: give its member id)".into(),
                }
                .into());
            }
            acts_for(&c, who.as_ref(), r.member_id, "list the intervals")?;
        }
        let intervals = c
            .intervals
            .iter()
            .filter(|iv| r.address_space.is_empty() || iv.rec.address_space == r.address_space)
            .filter(|iv| {
                r.member_id == 0
                    || iv.rec.owner == r.member_id
                    || iv.subscribers.contains(&r.member_id)
            })
            .map(|iv| pb::Interval {
                id: iv.rec.id,
                address_space: iv.rec.address_space.clone(),
                start: iv.rec.start,
                length: iv.rec.length,
                tenant: iv.rec.tenant.clone(),
                handle_base: iv.rec.handle_base,
                owner: iv.rec.owner,
                subscribers: iv.subscribers.iter().copied().collect(),
                seq: iv.seq,
                invalidations_in_flight: iv.in_flight,
            })
            .collect();
        ok(pb::ListIntervalsResponse { intervals })
    }

    async fn read_begin(&self, r: Request<pb::ReadBeginRequest>) -> Res<pb::ReadBeginResponse> {
        let id = r.get_ref().interval_id;
        owns_interval(
            &self.shared().lock(),
            caller(&r),
            id,
            "read an interval's sequence",
        )?;
        // An invalidation lasts at most the longest deadline; wait a little
        // longer than that before calling the interval stuck.
        let until = Instant::now() + self.shared().max_deadline + Duration::from_secs(1);
        let mut finished = self.shared().finished.subscribe();
        loop {
            finished.mark_unchanged();
            let begun = {
                let c = self.shared().lock();
                let seq = c.read_begin(id)?;
                c.still_leads()?;
                seq
            };
            if let Some(seq) = begun {
                return ok(pb::ReadBeginResponse { seq });
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero()
                || tokio::time::timeout(left, finished.changed())
                    .await
                    .is_err()
            {
                return Err(CoordError::Busy(id).into());
            }
        }
    }

    async fn read_retry(&self, r: Request<pb::ReadRetryRequest>) -> Res<pb::ReadRetryResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let (retry, seq) = {
            let c = self.shared().lock();
            owns_interval(
                &c,
                who.as_ref(),
                r.interval_id,
                "read an interval's sequence",
            )?;
            let answer = c.read_retry(r.interval_id, r.seq)?;
            // A replica no longer sure to lead may not have seen an
            // invalidation its successor made: it must not say "no retry".
            c.still_leads()?;
            answer
        };
        ok(pb::ReadRetryResponse { retry, seq })
    }

    async fn capabilities(
        &self,
        r: Request<pb::CapabilitiesRequest>,
    ) -> Res<pb::CapabilitiesResponse> {
        let c = self.shared().lock();
        let ids = &r.get_ref().interval_ids;
        if ids.len() > 4096 {
            return Err(CoordError::invalid("interval_ids", "at most 4096").into());
        }
        // One answer per id: empty for an interval that is gone or is not
        // the caller's, so one retired interval does not fail the batch.
        let capabilities = ids
            .iter()
            .map(|&id| {
                owns_interval(&c, caller(&r), id, "renew the capability of an interval")
                    .and_then(|()| c.capability(id))
                    .unwrap_or_default()
            })
            .collect();
        ok(pb::CapabilitiesResponse { capabilities })
    }
}

/// Runs one invalidation to its end: begin, wait for every
/// acknowledgement or the deadline, finish (fencing the silent). The wait
/// and the finish run in their own task: a caller that goes away must not
/// leave intervals marked in flight forever.
pub async fn run_invalidation(
    shared: &Arc<Shared>,
    req: &pb::InvalidateRequest,
    deadline: Duration,
) -> Result<(u64, Vec<(u64, u64)>, Finished), Status> {
    let begun = shared.lock().begin_invalidation(req)?;
    let shared = shared.clone();
    let task = tokio::spawn(async move {
        let mut done = begun.done;
        if tokio::time::timeout(deadline, &mut done).await.is_err() {
            // Just after this coordinator took over (a restart, a
            // failover), restored members are still finding it: one that
            // has not opened its event stream yet is waited for until the
            // leases restored with it could lapse, not fenced for being
            // late to a leader it did not know of (every server at once,
            // when the first invalidation follows a failover).
            let settled = shared.started + shared.lock().lease() + crate::cluster::RESTORE_GRACE;
            if Instant::now() < settled && shared.lock().awaits_unarrived(begun.id) {
                let _ = tokio::time::timeout_at(settled.into(), &mut done).await;
            }
        }
        let finished = shared.lock().finish_invalidation(begun.id);
        shared.finished.send_modify(|n| *n += 1);
        finished.map(|f| (begun.id, begun.intervals, f))
    });
    Ok(task
        .await
        .map_err(|e| Status::internal(format!("invalidation task failed: {e}")))??)
}

/// Cleans up after an agent that is gone (lease lapsed long ago, fenced, or
/// left without returning its resources): invalidates every interval it
/// owns with reason `exit` (servers free the pages), unregisters them and
/// releases its grants.
pub async fn reap(shared: &Arc<Shared>, member: u64) {
    let owned: Vec<(u64, pb::InvalidateRequest)> = shared
        .lock()
        .intervals
        .iter()
        .filter(|iv| iv.rec.owner == member)
        .map(|iv| {
            (
                iv.rec.id,
                pb::InvalidateRequest {
                    address_space: iv.rec.address_space.clone(),
                    start: iv.rec.start,
                    length: iv.rec.length,
                    reason: pb::Reason::Exit as i32,
                    deadline_ms: 0,
                    origin: member,
                    more: Vec::new(),
                },
            )
        })
        .collect();
    // The agent may come back while this runs: stop as soon as it holds a
    // lease again (what is reclaimed by then stays reclaimed).
    let back = |shared: &Arc<Shared>| shared.lock().members.get(member).is_ok_and(|m| m.serving());
    for (interval, req) in owned {
        if back(shared) {
            tracing::info!(member, "agent came back; reaping stopped");
            return;
        }
        match run_invalidation(shared, &req, shared.default_deadline).await {
            Ok((_, _, f)) if !f.fenced.is_empty() => {
                tracing::warn!(member, interval, fenced = ?f.fenced, "reaping: some servers did not free the pages and were fenced")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(member, interval, error = %e, "reaping: invalidation failed"),
        }
        if let Err(e) = shared.lock().unregister_interval(interval) {
            tracing::warn!(member, interval, error = %e, "reaping: cannot unregister the interval");
        }
    }
    if back(shared) {
        tracing::info!(member, "agent came back; reaping stopped");
        return;
    }
    let grants: Vec<u64> = shared
        .lock()
        .grants
        .iter()
        .filter(|g| g.agent == member)
        .map(|g| g.id)
        .collect();
    for g in &grants {
        if let Err(e) = shared.lock().release(*g, 0) {
            tracing::warn!(member, grant = g, error = %e, "reaping: cannot release a grant");
        }
    }
    tracing::info!(
        member,
        grants = grants.len(),
        "reaped the resources of a departed agent"
    );
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Invalidation for Service {
    async fn invalidate(&self, r: Request<pb::InvalidateRequest>) -> Res<pb::InvalidateResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        if who.is_some() {
            // Only the owner of every interval the ranges touch, or an admin,
            // may have their pages freed.
            let c = self.shared().lock();
            if r.origin != 0 {
                acts_for(&c, who.as_ref(), r.origin, "invalidate on behalf")?;
            }
            for (start, length) in std::iter::once((r.start, r.length))
                .chain(r.more.iter().map(|s| (s.start, s.length)))
            {
                let end = crate::intervals::check_range(start, length)?;
                for iv in c.intervals.overlapping(&r.address_space, start, end) {
                    owns_interval(&c, who.as_ref(), iv, "invalidate an interval")?;
                }
            }
        }
        let deadline = match r.deadline_ms {
            0 => self.shared().default_deadline,
            ms => Duration::from_millis(u64::from(ms)).min(self.shared().max_deadline),
        };
        let (id, intervals, f) = run_invalidation(self.shared(), &r, deadline).await?;
        // Acknowledged here, but this replica may have lost leadership while
        // it waited: its successor may not know of this invalidation, so the
        // caller must ask it.
        self.shared().lock().still_leads()?;
        ok(pb::InvalidateResponse {
            invalidation_id: id,
            intervals: intervals
                .into_iter()
                .map(|(interval_id, seq)| pb::IntervalSeq { interval_id, seq })
                .collect(),
            complete: f.fenced.is_empty(),
            acknowledged: f.acked,
            fenced: f.fenced,
        })
    }

    type WatchStream = EventStream;

    async fn watch(&self, r: Request<pb::WatchRequest>) -> Res<Self::WatchStream> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let member = r.member_id;
        let (generation, notify, mut cursor) = {
            let mut c = self.shared().lock();
            acts_for(&c, who.as_ref(), member, "watch the events")?;
            same_cluster(&c, member, &r.cluster_id)?;
            let generation = c.open_watch(member, r.incarnation)?;
            let mb = c.fanout.mailbox(member);
            (generation, mb.notify.clone(), mb.oldest())
        };
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared().clone();
        tokio::spawn(async move {
            loop {
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let (events, next, closed) = {
                    let mut c = shared.lock();
                    let mb = c.fanout.mailbox(member);
                    if mb.generation != generation {
                        return; // a newer stream took over
                    }
                    let (events, next) = mb.since(cursor);
                    (events, next, mb.closed)
                };
                for e in events {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
                cursor = next;
                if closed {
                    return;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = tx.closed() => return,
                    _ = shared.shutdown.cancelled() => return,
                }
            }
        });
        ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn ack(&self, r: Request<pb::AckRequest>) -> Res<pb::AckResponse> {
        let who = caller(&r).cloned();
        let r = r.into_inner();
        let mut c = self.shared().lock();
        acts_for(&c, who.as_ref(), r.member_id, "acknowledge an invalidation")?;
        c.ack(r.member_id, r.invalidation_id)?;
        ok(pb::AckResponse {})
    }
}

#[tonic::async_trait]
impl ClusterAdmin for Service {
    async fn status(&self, _: Request<pb::StatusRequest>) -> Res<pb::StatusResponse> {
        let etcd = match self.shared().etcd.clone() {
            Some(i) => tokio::task::spawn_blocking(move || i.inspect()).await.ok(),
            None => None,
        };
        let mut s = self.shared().status();
        if let Some(e) = etcd {
            s.leader = e.leader;
            s.replicas = e.replicas;
            s.etcd_endpoints = e.endpoints;
            s.etcd_health = e.health;
        }
        ok(s)
    }

    async fn drain(&self, r: Request<pb::DrainRequest>) -> Res<pb::DrainResponse> {
        require(&r, Role::Admin, "drain a server")?;
        self.set_draining(r.into_inner(), Some(true))
    }

    async fn undrain(&self, r: Request<pb::DrainRequest>) -> Res<pb::DrainResponse> {
        require(&r, Role::Admin, "undrain a server")?;
        self.set_draining(r.into_inner(), Some(false))
    }

    async fn mark_gone(&self, r: Request<pb::DrainRequest>) -> Res<pb::DrainResponse> {
        require(&r, Role::Admin, "declare a server gone")?;
        self.set_draining(r.into_inner(), None)
    }

    async fn capability_keys(
        &self,
        r: Request<pb::CapabilityKeysRequest>,
    ) -> Res<pb::CapabilityKeysResponse> {
        require(&r, Role::Admin, "list the capability keys")?;
        let c = self.shared().lock();
        ok(pb::CapabilityKeysResponse {
            keys: c.capability_key_status(),
        })
    }

    async fn rotate_capability_key(
        &self,
        r: Request<pb::RotateCapabilityKeyRequest>,
    ) -> Res<pb::CapabilityKeysResponse> {
        require(&r, Role::Admin, "rotate the capability key")?;
        let mut c = self.shared().lock();
        c.rotate_capability_key()?;
        ok(pb::CapabilityKeysResponse {
            keys: c.capability_key_status(),
        })
    }

    async fn retire_capability_key(
        &self,
        r: Request<pb::RetireCapabilityKeyRequest>,
    ) -> Res<pb::CapabilityKeysResponse> {
        require(&r, Role::Admin, "retire a capability key")?;
        let id = r.into_inner().id;
        let mut c = self.shared().lock();
        c.retire_capability_key_now(id)?;
        ok(pb::CapabilityKeysResponse {
            keys: c.capability_key_status(),
        })
    }
}

impl Service {
    fn shared(&self) -> &Arc<Shared> {
        self.slot
            .get()
            .expect("the gate admits calls only once the state is loaded")
    }

    /// Drains (`Some(true)`), undrains (`Some(false)`) or declares gone
    /// (`None`) a server.
    fn set_draining(&self, r: pb::DrainRequest, draining: Option<bool>) -> Res<pb::DrainResponse> {
        if r.server_id == 0 && r.name.is_empty() {
            return Err(CoordError::invalid("server_id", "give a server id or name").into());
        }
        let mut c = self.shared().lock();
        let id = match draining {
            Some(d) => c.set_draining(r.server_id, &r.name, d)?,
            None => c.mark_gone(r.server_id, &r.name, "an operator marked it gone")?,
        };
        let allocated = c.grants.per_server().get(&id).copied().unwrap_or(0);
        let m = c.members.get(id)?;
        let server = member_pb(&c, m, allocated);
        ok(pb::DrainResponse {
            server: Some(server),
        })
    }
}

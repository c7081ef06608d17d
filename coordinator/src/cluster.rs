//! The coordinator's model of the cluster: members, intervals, grants and
//! invalidations in flight, behind one lock held by [`crate::service`].
//!
//! Every change to persisted state is a [`Record`] passed to
//! [`Cluster::commit`], which makes it durable and then applies it with
//! [`Cluster::apply`], the same function that replays the log at start-up.
//! Control-plane rates (registrations, heartbeats, invalidations) are far
//! below what one lock serves; waiting (for acknowledgements, for an
//! invalidation to finish) always happens outside it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rmem_common::capability::{self, Capability};
use rmem_proto::control::v1::{self as pb, watch_event::Event};
use tokio::sync::oneshot;

use crate::config::{CoordinatorConfig, TenantConfig};
use crate::error::CoordError;
use crate::intervals::{Intervals, PAGE, check_range};
use crate::invalidation::{Fanout, Pending};
use crate::keyring::{KeyRing, Timing};
use crate::membership::{Liveness, Members};
use crate::placement::{self, Candidate, Grants};
use crate::state::{
    GrantRecord, IntervalRecord, MemberRecord, Record, RoleRecord, StateError, StateStore,
};

/// Longest member name, address space name, tenant or address accepted.
const MAX_NAME: usize = 256;
/// Most subscribers named in one registration.
const MAX_SUBSCRIBERS: usize = 1024;
/// Most extra ranges (`InvalidateRequest::more`) in one invalidation.
const MAX_SPANS: usize = 4096;

fn check_name(field: &'static str, s: &str, allow_empty: bool) -> Result<(), CoordError> {
    if s.is_empty() && !allow_empty {
        return Err(CoordError::invalid(field, "must not be empty"));
    }
    if s.len() > MAX_NAME {
        return Err(CoordError::invalid(
            field,
            format!("longer than {MAX_NAME} bytes"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(CoordError::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// Most pages one server may lend: 2^40 pages, 4 PiB. Anything more is a
/// mistake or an attack (a server claiming 2^64-1 pages would draw every
/// grant to itself).
const MAX_CAPACITY_PAGES: u64 = 1 << 40;

/// Checks that `s` is an address members can dial: `HOST:PORT`, where HOST
/// is an IPv4 address, a bracketed IPv6 address or a DNS name, and PORT is
/// 1 to 65535.
fn check_addr(field: &'static str, s: &str, allow_empty: bool) -> Result<(), CoordError> {
    check_name(field, s, allow_empty)?;
    if s.is_empty()
        || s.parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.port() != 0)
    {
        return Ok(());
    }
    let bad = |why: &str| CoordError::invalid(field, format!("`{s}` is not HOST:PORT: {why}"));
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => return Err(bad("the port must be 1 to 65535")),
    }
    let dns_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if dns_name {
        Ok(())
    } else {
        Err(bad("the host is neither an IP address nor a DNS name"))
    }
}

/// What an invalidation started with.
#[derive(Debug)]
pub struct Begun {
    pub id: u64,
    pub intervals: Vec<(u64, u64)>,
    pub done: oneshot::Receiver<()>,
}

/// How an invalidation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub acked: Vec<u64>,
    pub fenced: Vec<u64>,
}

/// Counters for Status and `/metrics`, since this coordinator started.
#[derive(Debug, Default)]
pub struct Counters {
    pub invalidations: u64,
    pub fenced: u64,
    /// Members marked down because their lease ran out.
    pub leases_expired: u64,
    /// Time from an invalidation's start to its end (every member
    /// acknowledged or was fenced), in nanoseconds.
    pub invalidation_latency: rmem_common::Histogram,
}

/// What an allocation granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    pub grants: Vec<GrantRecord>,
    /// Copies of some chunk share a failure domain.
    pub shared_domain: bool,
}

/// The cluster.
#[derive(Debug)]
pub struct Cluster {
    lease: Duration,
    /// How long after its lease lapsed a server is declared gone (None:
    /// only by an operator).
    gone_after: Option<Duration>,
    /// Pages granted on each gone server when it was declared gone (this
    /// run), for rebuild progress.
    rebuild_total: BTreeMap<u64, u64>,
    chunk_pages: u64,
    redundancy: rmem_common::Redundancy,
    compact_after: usize,
    tenants: BTreeMap<String, TenantConfig>,
    store: Box<dyn StateStore>,
    /// See [`Record::Identity`]; 32 hex digits.
    cluster_id: String,
    /// Keys that sign capabilities, and retired ones.
    keys: KeyRing,
    capability_ttl: Duration,
    epoch: u64,
    /// Next ids: member, interval, grant.
    next_member: u64,
    next_interval: u64,
    next_grant: u64,
    next_invalidation: u64,
    pub members: Members,
    pub intervals: Intervals,
    pub grants: Grants,
    pub fanout: Fanout,
    pub counters: Counters,
    rng: rand::rngs::StdRng,
}

/// The time, in Unix milliseconds (capability keys' times).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Added to restored members' leases: the longest pause between a
/// member's tries to reach the coordinator (`control::retrying`).
pub(crate) const RESTORE_GRACE: Duration = Duration::from_secs(5);

impl Cluster {
    /// Replays `store` and starts a new epoch.
    pub fn open(
        cfg: &CoordinatorConfig,
        mut store: Box<dyn StateStore>,
    ) -> Result<Self, StateError> {
        let records = store.load()?;
        let mut c = Self {
            lease: cfg.lease,
            gone_after: cfg.server_gone_after(),
            rebuild_total: BTreeMap::new(),
            chunk_pages: cfg.placement_chunk.bytes() / PAGE,
            redundancy: cfg.redundancy,
            compact_after: cfg.compact_after,
            tenants: cfg
                .tenants
                .iter()
                .map(|t| (t.name.clone(), t.clone()))
                .collect(),
            store,
            cluster_id: String::new(),
            keys: KeyRing::default(),
            capability_ttl: cfg.capability_ttl,
            epoch: 0,
            next_member: 1,
            next_interval: 1,
            next_grant: 1,
            next_invalidation: 1,
            members: Members::default(),
            intervals: Intervals::default(),
            grants: Grants::default(),
            fanout: Fanout::default(),
            counters: Counters::default(),
            rng: rand::rngs::StdRng::from_os_rng(),
        };
        // Restored members' leases run from a little ahead: members that
        // were backing off while no coordinator answered (a restart, a
        // failover) reach this one before their lease lapses.
        let now = Instant::now() + RESTORE_GRACE;
        let replayed = records.len();
        for r in &records {
            c.apply(r, now);
        }
        if c.cluster_id.is_empty() {
            let id: u128 = rand::Rng::random(&mut c.rng);
            c.commit(Record::Identity {
                cluster_id: format!("{id:032x}"),
            })?;
        }
        if c.keys.is_empty() {
            // A state from before capabilities, or a new one. The id is
            // drawn, so a coordinator that lost its state rarely reuses the
            // id of the key it signed with before.
            let rng = &mut c.rng;
            let key = c.keys.draw(|| rand::Rng::random(rng), unix_ms());
            c.commit(key)?;
        }
        let epoch = c.epoch + 1;
        c.commit(Record::Epoch { epoch })?;
        // Every interval starts the new epoch's sequence: a sequence read
        // before the restart (any epoch before) is never current again.
        c.intervals.restart_sequences(epoch);
        tracing::info!(
            cluster = %c.cluster_id,
            epoch,
            records = replayed,
            members = c.members.iter().count(),
            intervals = c.intervals.len(),
            grants = c.grants.iter().count(),
            "coordinator state restored"
        );
        if replayed > c.compact_after {
            c.compact()?;
        }
        Ok(c)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Whether this coordinator may act (a replica that may no longer lead
    /// fences no one and expires no lease: its successor decides).
    pub fn leads(&self) -> bool {
        self.store.leads()
    }

    /// [`Self::leads`] as a result: `not_leader` when it may not.
    pub fn still_leads(&self) -> Result<(), CoordError> {
        if self.leads() {
            Ok(())
        } else {
            Err(CoordError::State(StateError::Deposed))
        }
    }

    /// Makes `record` durable, then applies it.
    fn commit(&mut self, record: Record) -> Result<(), StateError> {
        self.store.append(&record)?;
        self.apply(&record, Instant::now());
        if self.store.appended() > self.compact_after {
            self.compact()?;
        }
        Ok(())
    }

    /// Applies one record to the model (live or replayed).
    fn apply(&mut self, record: &Record, now: Instant) {
        match record {
            Record::Identity { cluster_id } => self.cluster_id.clone_from(cluster_id),
            Record::CapabilityKey {
                id,
                pkcs8,
                created_ms,
            } => self.keys.apply_key(*id, pkcs8, *created_ms),
            Record::CapabilityKeyRetired { id, public } => self.keys.apply_retired(*id, public),
            Record::Epoch { epoch } => {
                self.epoch = *epoch;
                self.intervals.set_epoch(*epoch);
                self.next_invalidation = self.next_invalidation.max(epoch << 32);
            }
            Record::IdFloors {
                member,
                interval,
                grant,
            } => {
                self.next_member = self.next_member.max(*member);
                self.next_interval = self.next_interval.max(*interval);
                self.next_grant = self.next_grant.max(*grant);
            }
            Record::MemberUpsert { member } => {
                self.next_member = self.next_member.max(member.id + 1);
                self.members.upsert(member.clone(), self.lease, now);
            }
            Record::MemberLeft { id } => {
                self.next_member = self.next_member.max(id + 1);
                self.members.set_liveness(*id, Liveness::Left);
                self.intervals.unsubscribe_everywhere(*id);
            }
            Record::MemberFenced { id } => {
                self.members.set_liveness(*id, Liveness::Fenced);
                self.intervals.unsubscribe_everywhere(*id);
            }
            Record::MemberDrain { id, draining } => {
                if let Ok(m) = self.members.get_mut(*id) {
                    m.rec.draining = *draining;
                    if !*draining {
                        m.rec.gone = false;
                    }
                }
            }
            Record::MemberGone { id } => {
                if let Ok(m) = self.members.get_mut(*id) {
                    m.rec.draining = true;
                    m.rec.gone = true;
                }
            }
            Record::IntervalAdd { interval } => {
                self.next_interval = self.next_interval.max(interval.id + 1);
                self.intervals.insert(interval.clone());
            }
            Record::IntervalRemove { id } => {
                self.next_interval = self.next_interval.max(id + 1);
                self.intervals.remove(*id);
            }
            Record::Subscribe { interval, member } => {
                if let Ok(iv) = self.intervals.get_mut(*interval) {
                    iv.subscribers.insert(*member);
                    iv.cleared = false;
                }
            }
            Record::Unsubscribe { interval, member } => {
                if let Ok(iv) = self.intervals.get_mut(*interval) {
                    iv.subscribers.remove(member);
                }
            }
            Record::GrantAdd { grant } => {
                self.next_grant = self.next_grant.max(grant.id + 1);
                self.grants.insert(grant.clone());
            }
            Record::GrantRelease { id, pages } => {
                self.next_grant = self.next_grant.max(id + 1);
                self.grants.release(*id, *pages);
            }
        }
    }

    /// The same state in as few records as possible.
    fn snapshot(&self) -> Vec<Record> {
        let mut out = vec![
            Record::Identity {
                cluster_id: self.cluster_id.clone(),
            },
            Record::Epoch { epoch: self.epoch },
            Record::IdFloors {
                member: self.next_member,
                interval: self.next_interval,
                grant: self.next_grant,
            },
        ];
        out.extend(self.keys.records());
        for m in self.members.records() {
            out.push(Record::MemberUpsert { member: m.clone() });
        }
        // Members that left stay while grants name them (a server that
        // shut down cleanly with agents' pages on it, a gone server): one
        // that comes back must get its own id and standing again.
        for m in self.members.iter().filter(|m| m.liveness == Liveness::Left) {
            let id = m.rec.id;
            if self.grants.iter().any(|g| g.server == id || g.agent == id) {
                out.push(Record::MemberUpsert {
                    member: m.rec.clone(),
                });
                out.push(Record::MemberLeft { id });
            }
        }
        for m in self.members.iter() {
            if m.liveness == Liveness::Fenced {
                out.push(Record::MemberFenced { id: m.rec.id });
            }
        }
        for iv in self.intervals.iter() {
            out.push(Record::IntervalAdd {
                interval: iv.record(),
            });
        }
        for g in self.grants.iter() {
            out.push(Record::GrantAdd { grant: g.clone() });
        }
        out
    }

    fn compact(&mut self) -> Result<(), StateError> {
        let snap = self.snapshot();
        self.store.compact(&snap)?;
        tracing::info!(records = snap.len(), "compacted coordinator state");
        Ok(())
    }

    // ------------------------------------------------------------ members

    /// Registers (or re-registers) a member; returns the new record.
    pub fn register(&mut self, req: &pb::RegisterRequest) -> Result<MemberRecord, CoordError> {
        let role = match pb::Role::try_from(req.role) {
            Ok(pb::Role::Server) => RoleRecord::Server,
            Ok(pb::Role::Agent) => RoleRecord::Agent,
            _ => return Err(CoordError::invalid("role", "must be server or agent")),
        };
        check_name("name", &req.name, false)?;
        check_name("domain", &req.domain, true)?;
        check_addr("data_addr", &req.data_addr, role == RoleRecord::Agent)?;
        check_addr("grpc_addr", &req.grpc_addr, true)?;
        if role == RoleRecord::Server && req.capacity_pages == 0 {
            return Err(CoordError::invalid(
                "capacity_pages",
                "a server must lend at least one page",
            ));
        }
        if req.capacity_pages > MAX_CAPACITY_PAGES {
            return Err(CoordError::invalid(
                "capacity_pages",
                format!("at most {MAX_CAPACITY_PAGES} pages (4 PiB)"),
            ));
        }
        if req.transports.len() > 8 {
            return Err(CoordError::invalid("transports", "at most 8"));
        }
        for t in &req.transports {
            if t != "tcp" && t != "rdma" {
                return Err(CoordError::invalid(
                    "transports",
                    format!("unknown transport `{t}`"),
                ));
            }
        }
        let (id, incarnation, draining, gone) = match self.members.by_name(&req.name) {
            Some(m) if m.rec.role != role => return Err(CoordError::NameInUse(req.name.clone())),
            Some(m) => (m.rec.id, m.rec.incarnation + 1, m.rec.draining, m.rec.gone),
            None => (self.next_member, 1, false, false),
        };
        if gone {
            tracing::warn!(name = %req.name, "a server declared gone registered again: it stays draining; what it holds of agents that rebuilt elsewhere is freed");
        }
        let rec = MemberRecord {
            id,
            role,
            name: req.name.clone(),
            data_addr: req.data_addr.clone(),
            grpc_addr: req.grpc_addr.clone(),
            capacity_pages: req.capacity_pages,
            transports: if req.transports.is_empty() && role == RoleRecord::Server {
                vec!["tcp".into()]
            } else {
                req.transports.clone()
            },
            incarnation,
            draining,
            domain: req.domain.clone(),
            gone,
        };
        self.commit(Record::MemberUpsert {
            member: rec.clone(),
        })?;
        self.fanout.mailbox(id).reset();
        tracing::info!(member = id, name = %rec.name, role = ?role, incarnation, "member registered");
        Ok(rec)
    }

    /// Renews a lease; returns the member as it is now.
    pub fn heartbeat(
        &mut self,
        id: u64,
        incarnation: u64,
        used_pages: u64,
        at_risk_pages: u64,
    ) -> Result<&crate::membership::Member, CoordError> {
        self.members.check_current(id, incarnation)?;
        let lease = self.lease;
        let m = self.members.get_mut(id)?;
        m.lease_until = Instant::now() + lease;
        m.used_pages = used_pages;
        m.at_risk_pages = at_risk_pages;
        Ok(m)
    }

    pub fn deregister(&mut self, id: u64, incarnation: u64) -> Result<(), CoordError> {
        let m = self.members.get(id)?;
        if m.rec.incarnation != incarnation {
            return Err(CoordError::StaleIncarnation {
                id,
                got: incarnation,
                current: m.rec.incarnation,
            });
        }
        self.commit(Record::MemberLeft { id })?;
        self.settle_everywhere(id, false);
        tracing::info!(member = id, "member left");
        Ok(())
    }

    /// Marks members whose lease ran out as down.
    pub fn expire_leases(&mut self) {
        for id in self.members.expire(Instant::now()) {
            self.counters.leases_expired += 1;
            tracing::warn!(member = id, "lease expired: member marked down");
        }
    }

    /// Agents gone for `after` (lease lapsed, fenced, or left) that still
    /// own intervals or hold grants: their resources are to be reclaimed.
    pub fn reapable(&self, after: Duration) -> Vec<u64> {
        let now = Instant::now();
        self.members
            .iter()
            .filter(|m| m.rec.role == RoleRecord::Agent && m.liveness != Liveness::Up)
            .filter(|m| m.liveness == Liveness::Left || m.lease_until + after <= now)
            .map(|m| m.rec.id)
            .filter(|&id| {
                self.intervals.iter().any(|iv| iv.rec.owner == id)
                    || self.grants.iter().any(|g| g.agent == id)
            })
            .collect()
    }

    /// The server named by `id`, or by `name` when `id` is 0.
    fn server_id(&self, id: u64, name: &str) -> Result<u64, CoordError> {
        let id = if id != 0 {
            id
        } else {
            self.members
                .by_name(name)
                .map(|m| m.rec.id)
                .ok_or_else(|| CoordError::UnknownServer(name.to_string()))?
        };
        let m = self.members.get(id)?;
        if m.rec.role != RoleRecord::Server {
            return Err(CoordError::NotAServer(id));
        }
        Ok(id)
    }

    /// Starts or stops draining a server; returns it. Agents holding grants
    /// on it are told to move their pages. Stopping also ends a gone
    /// declaration (the operator returns the server to service).
    pub fn set_draining(&mut self, id: u64, name: &str, draining: bool) -> Result<u64, CoordError> {
        let id = self.server_id(id, name)?;
        let m = self.members.get(id)?;
        if m.rec.draining != draining || (!draining && m.rec.gone) {
            self.commit(Record::MemberDrain { id, draining })?;
            self.rebuild_total.remove(&id);
            tracing::info!(server = id, draining, "server drain state changed");
        }
        if draining {
            self.notify_drain(id);
        }
        Ok(id)
    }

    /// Declares a server gone: it drains, and agents rebuild the copies it
    /// held from the others without waiting for it. Returns it.
    pub fn mark_gone(&mut self, id: u64, name: &str, why: &str) -> Result<u64, CoordError> {
        let id = self.server_id(id, name)?;
        if !self.members.get(id)?.rec.gone {
            self.commit(Record::MemberGone { id })?;
            let granted = self.grants.per_server().get(&id).copied().unwrap_or(0);
            self.rebuild_total.insert(id, granted);
            tracing::warn!(
                server = id,
                granted_pages = granted,
                reason = why,
                "server declared gone: agents rebuild its copies elsewhere"
            );
        }
        self.notify_drain(id);
        Ok(id)
    }

    /// Servers down (or left) for `gone_after` past their lease, still
    /// holding grants, are declared gone.
    pub fn declare_lapsed_gone(&mut self) {
        let Some(after) = self.gone_after else {
            return;
        };
        let now = Instant::now();
        let held = self.grants.per_server();
        let lapsed: Vec<u64> = self
            .members
            .iter()
            .filter(|m| m.rec.role == RoleRecord::Server && !m.rec.gone)
            .filter(|m| m.liveness != Liveness::Up && m.lease_until + after <= now)
            .map(|m| m.rec.id)
            .filter(|id| held.get(id).is_some_and(|&p| p > 0))
            .collect();
        for id in lapsed {
            let why = format!("no heartbeat for {after:?} past its lease");
            if let Err(e) = self.mark_gone(id, "", &why) {
                tracing::error!(server = id, error = %e, "cannot declare a server gone");
            }
        }
    }

    /// Tells every agent holding grants on server `id` to move its pages.
    fn notify_drain(&mut self, id: u64) {
        let gone = self.members.get(id).is_ok_and(|m| m.rec.gone);
        let mut by_agent: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for g in self.grants.iter().filter(|g| g.server == id) {
            by_agent.entry(g.agent).or_default().push(g.id);
        }
        for (agent, grant_ids) in by_agent {
            self.fanout
                .mailbox(agent)
                .push(Event::Drain(pb::DrainNotice {
                    server_id: id,
                    grant_ids,
                    gone,
                }));
        }
    }

    /// Rebuild of gone servers: (pages still granted on them, pages granted
    /// when they were declared gone).
    pub fn rebuild_progress(&self) -> (u64, u64) {
        let held = self.grants.per_server();
        let mut left = 0;
        let mut total = 0;
        for m in self.members.iter().filter(|m| m.rec.gone) {
            let now = held.get(&m.rec.id).copied().unwrap_or(0);
            left += now;
            total += self
                .rebuild_total
                .get(&m.rec.id)
                .copied()
                .unwrap_or(now)
                .max(now);
        }
        (left, total)
    }

    // ---------------------------------------------------------- placement

    fn tenant(&self, name: &str) -> Result<(String, Option<u64>), CoordError> {
        if self.tenants.is_empty() {
            return if name == "default" {
                Ok((String::new(), None))
            } else {
                Err(CoordError::UnknownTenant(name.to_string()))
            };
        }
        let t = self
            .tenants
            .get(name)
            .ok_or_else(|| CoordError::UnknownTenant(name.to_string()))?;
        Ok((t.credential(), t.quota.map(|q| q.bytes() / PAGE)))
    }

    /// Grants `pages` of capacity to an agent's tenant.
    pub fn allocate(
        &mut self,
        agent: u64,
        tenant: &str,
        pages: u64,
    ) -> Result<Vec<GrantRecord>, CoordError> {
        Ok(self.allocate_copies(agent, tenant, pages, 1, &[])?.grants)
    }

    /// The redundancy agents use by default.
    pub fn redundancy(&self) -> rmem_common::Redundancy {
        self.redundancy
    }

    /// Grants `pages` for `copies` copies: with one copy, spread over the
    /// servers in chunks; with more, `pages` whole on each of up to
    /// `copies` distinct servers (fewer when fewer have room; at least one,
    /// or `NoCapacity`), in distinct failure domains while enough have room.
    /// Servers in `exclude` get nothing.
    pub fn allocate_copies(
        &mut self,
        agent: u64,
        tenant: &str,
        pages: u64,
        copies: u32,
        exclude: &[u64],
    ) -> Result<Allocated, CoordError> {
        self.allocate_once(0, agent, tenant, pages, copies, exclude)
    }

    /// As [`Self::allocate_copies`], at most once for the agent's
    /// allocation `request` (0: no name): an allocation granted before is
    /// answered with its grants again (the agent retried, its answer lost).
    /// One granted only in part (the coordinator stopped between its
    /// records) gives back that part and is granted afresh.
    pub fn allocate_once(
        &mut self,
        request: u64,
        agent: u64,
        tenant: &str,
        pages: u64,
        copies: u32,
        exclude: &[u64],
    ) -> Result<Allocated, CoordError> {
        let copies = u64::from(copies.max(1));
        if copies > rmem_common::redundancy::MAX_SHARDS as u64 {
            return Err(CoordError::invalid(
                "copies",
                format!("at most {}", rmem_common::redundancy::MAX_SHARDS),
            ));
        }
        if pages == 0 {
            return Err(CoordError::invalid("pages", "must be positive"));
        }
        let a = self.members.get(agent)?;
        if a.rec.role != RoleRecord::Agent {
            return Err(CoordError::invalid(
                "agent_id",
                format!("member {agent} is not an agent"),
            ));
        }
        if !a.serving() {
            return Err(match a.liveness {
                Liveness::Fenced => CoordError::Fenced(agent),
                Liveness::Left => CoordError::Left { id: agent },
                _ => CoordError::LeaseExpired(agent),
            });
        }
        if request != 0 {
            let before: Vec<GrantRecord> = self
                .grants
                .of_request(agent, request)
                .into_iter()
                .cloned()
                .collect();
            if let Some(first) = before.first() {
                if before.len() == first.of as usize {
                    tracing::info!(
                        agent,
                        request,
                        "allocation retried: answering its grants again"
                    );
                    return Ok(Allocated {
                        grants: before,
                        shared_domain: false,
                    });
                }
                tracing::warn!(
                    agent,
                    request,
                    granted = before.len(),
                    of = first.of,
                    "allocation retried after it was granted in part: granting it afresh"
                );
                for g in &before {
                    self.commit(Record::GrantRelease {
                        id: g.id,
                        pages: g.pages,
                    })?;
                }
            }
        }
        let (_, quota) = self.tenant(tenant)?;
        if let Some(quota) = quota {
            let wanted = self
                .grants
                .tenant_pages(tenant)
                .saturating_add(pages.saturating_mul(copies));
            if wanted > quota {
                return Err(CoordError::QuotaExceeded {
                    tenant: tenant.to_string(),
                    wanted,
                    quota,
                });
            }
        }
        let granted = self.grants.per_server();
        let placeable: Vec<&crate::membership::Member> = self
            .members
            .iter()
            .filter(|m| m.placeable() && !exclude.contains(&m.rec.id))
            .collect();
        let domains = placement::domains(placeable.iter().map(|m| m.rec.domain.as_str()));
        let mut candidates: Vec<Candidate> = placeable
            .iter()
            .zip(domains)
            .map(|(m, domain)| Candidate {
                server: m.rec.id,
                free: placement::free_pages(m, granted.get(&m.rec.id).copied().unwrap_or(0)),
                domain,
            })
            .filter(|c| c.free > 0)
            .collect();
        let (spread, shared_domain) = if copies == 1 {
            let spread = placement::spread(
                &mut candidates,
                pages,
                self.chunk_pages.max(1),
                &mut self.rng,
            )?;
            (spread, false)
        } else {
            let placed = placement::distinct(
                &mut candidates,
                pages,
                copies as usize,
                self.chunk_pages.max(1),
                &mut self.rng,
            )?;
            (placed.servers, placed.shared_domain)
        };
        if shared_domain {
            tracing::warn!(
                agent,
                copies,
                "too few failure domains with room: copies of some pages share a domain"
            );
        }
        let mut out = Vec::with_capacity(spread.len());
        let of = if request == 0 { 0 } else { spread.len() as u32 };
        for (server, n) in spread {
            let grant = GrantRecord {
                id: self.next_grant,
                agent,
                server,
                tenant: tenant.to_string(),
                pages: n,
                request,
                of,
            };
            self.commit(Record::GrantAdd {
                grant: grant.clone(),
            })?;
            out.push(grant);
        }
        Ok(Allocated {
            grants: out,
            shared_domain,
        })
    }

    /// Returns `pages` (0: all) of a grant.
    pub fn release(&mut self, id: u64, pages: u64) -> Result<(), CoordError> {
        let g = self.grants.get(id)?;
        let pages = if pages == 0 {
            g.pages
        } else {
            pages.min(g.pages)
        };
        Ok(self.commit(Record::GrantRelease { id, pages })?)
    }

    /// Wire form of a grant, with its server's endpoint and credential.
    pub fn grant_pb(&self, g: &GrantRecord) -> pb::Grant {
        let server = self.members.get(g.server).ok();
        pb::Grant {
            grant_id: g.id,
            server_id: g.server,
            server_name: server.map(|s| s.rec.name.clone()).unwrap_or_default(),
            data_addr: server.map(|s| s.rec.data_addr.clone()).unwrap_or_default(),
            transports: server.map(|s| s.rec.transports.clone()).unwrap_or_default(),
            tenant: g.tenant.clone(),
            credential: self.tenant(&g.tenant).map(|t| t.0).unwrap_or_default(),
            pages: g.pages,
            agent_id: g.agent,
            domain: server.map(|s| s.rec.domain.clone()).unwrap_or_default(),
        }
    }

    // ---------------------------------------------------------- intervals

    pub fn register_interval(
        &mut self,
        req: &pb::RegisterIntervalRequest,
    ) -> Result<(u64, u64), CoordError> {
        check_name("address_space", &req.address_space, false)?;
        check_name("tenant", &req.tenant, false)?;
        // Servers free an interval's pages in its tenant: the tenant must be
        // one of this cluster's.
        self.tenant(&req.tenant)?;
        let end = check_range(req.start, req.length)?;
        let pages = req.length / PAGE;
        if req.handle_base.checked_add(pages).is_none() {
            return Err(CoordError::invalid(
                "handle_base",
                "handles of the interval overflow",
            ));
        }
        if req.subscribers.len() > MAX_SUBSCRIBERS {
            return Err(CoordError::invalid(
                "subscribers",
                format!("at most {MAX_SUBSCRIBERS}"),
            ));
        }
        let mut subscribers = BTreeSet::new();
        for &m in std::iter::once(&req.owner).chain(&req.subscribers) {
            let member = self.members.get(m)?;
            if !member.serving() {
                return Err(CoordError::LeaseExpired(m));
            }
            subscribers.insert(m);
        }
        if let Some(&existing) = self
            .intervals
            .overlapping(&req.address_space, req.start, end)
            .first()
        {
            // The very same registration again (the owner retried, its
            // answer lost to a failover or a broken connection): answered
            // as the first time, not refused, not made twice.
            let iv = self.intervals.get(existing)?;
            if iv.rec.start == req.start
                && iv.rec.length == req.length
                && iv.rec.owner == req.owner
                && iv.rec.tenant == req.tenant
                && iv.rec.handle_base == req.handle_base
                && iv.subscribers == subscribers
            {
                tracing::info!(
                    interval = existing,
                    space = %req.address_space,
                    "interval registration retried: answering it again"
                );
                return Ok((existing, iv.seq));
            }
            return Err(CoordError::Overlap {
                existing,
                start: req.start,
                end,
            });
        }
        self.check_handles_free(req)?;
        let rec = IntervalRecord {
            id: self.next_interval,
            address_space: req.address_space.clone(),
            start: req.start,
            length: req.length,
            tenant: req.tenant.clone(),
            handle_base: req.handle_base,
            owner: req.owner,
            subscribers: subscribers.into_iter().collect(),
        };
        let id = rec.id;
        self.commit(Record::IntervalAdd { interval: rec })?;
        Ok((id, self.intervals.get(id)?.seq))
    }

    /// The public keys servers check capabilities with.
    pub fn capability_keys(&self) -> Vec<pb::CapabilityKey> {
        self.keys.published()
    }

    /// Retired keys, for servers to forget.
    pub fn retired_capability_keys(&self) -> Vec<pb::CapabilityKey> {
        self.keys.retired()
    }

    /// A new key is published for two leases (every live server
    /// heartbeats three times a lease) and a second (keys' times are whole
    /// seconds) before it signs.
    fn key_timing(&self) -> Timing {
        Timing {
            publish: self.lease * 2 + Duration::from_secs(1),
            ttl: self.capability_ttl,
        }
    }

    /// Every capability key's state.
    pub fn capability_key_status(&self) -> Vec<pb::CapabilityKeyStatus> {
        self.keys.status(unix_ms(), self.key_timing())
    }

    /// Draws a new signing key (see [`KeyRing`]).
    pub fn rotate_capability_key(&mut self) -> Result<u32, CoordError> {
        let rng = &mut self.rng;
        let key = self.keys.draw(|| rand::Rng::random(rng), unix_ms());
        let Record::CapabilityKey { id, .. } = key else {
            unreachable!("draw makes a key")
        };
        self.commit(key)?;
        tracing::info!(
            key = id,
            "capability key rotated: the new key signs once servers learned it"
        );
        Ok(id)
    }

    /// Retires key `id` now (see [`KeyRing::retire_now`]).
    pub fn retire_capability_key_now(&mut self, id: u32) -> Result<(), CoordError> {
        if let Some(r) = self.keys.retire_now(id, unix_ms(), self.key_timing())? {
            self.commit(r)?;
            tracing::warn!(
                key = id,
                "capability key retired at once: servers forget it at their next heartbeat and drop what it signed; agents renew"
            );
        }
        Ok(())
    }

    /// Retires the keys whose capabilities have all expired.
    pub fn retire_capability_keys(&mut self) -> Result<(), CoordError> {
        for r in self.keys.due(unix_ms(), self.key_timing()) {
            if let Record::CapabilityKeyRetired { id, .. } = &r {
                tracing::info!(
                    key = id,
                    "capability key retired: every capability it signed has expired"
                );
            }
            self.commit(r)?;
        }
        Ok(())
    }

    /// A fresh capability for interval `id`'s handles, for its owner,
    /// signed by the newest key.
    pub fn capability(&self, id: u64) -> Result<Vec<u8>, CoordError> {
        let iv = self.intervals.get(id)?;
        let owner = self.members.get(iv.rec.owner)?;
        let key = self
            .keys
            .signing(unix_ms(), self.key_timing())
            .expect("a key is made when the state is opened");
        key.sign(&Capability {
            key_id: key.id(),
            tenant: iv.rec.tenant.clone(),
            agent: owner.rec.name.clone(),
            first: iv.rec.handle_base,
            count: iv.rec.length / PAGE,
            not_after: capability::unix_now() + self.capability_ttl.as_secs(),
        })
        .map_err(|e| CoordError::invalid("interval", e.to_string()))
    }

    /// Refuses handles that another member's interval of the same tenant
    /// already names: a capability for them would let one agent reach
    /// another's pages.
    fn check_handles_free(&self, req: &pb::RegisterIntervalRequest) -> Result<(), CoordError> {
        let first = req.handle_base;
        let end = first + req.length / PAGE;
        let owner = &self.members.get(req.owner)?.rec.name;
        for iv in self.intervals.iter() {
            let r = &iv.rec;
            let (f, e) = (r.handle_base, r.handle_base + r.length / PAGE);
            if r.tenant == req.tenant && f < end && first < e {
                let other = self.members.get(r.owner).map(|m| &m.rec.name);
                if other.is_ok_and(|n| n != owner) {
                    return Err(CoordError::HandlesInUse {
                        existing: r.id,
                        tenant: r.tenant.clone(),
                        first,
                        end,
                    });
                }
            }
        }
        Ok(())
    }

    /// What must be invalidated before interval `id` is unregistered: the
    /// whole interval, unless no server subscribes to it or it was cleared whole
    /// since the last one subscribed. An owner retires an interval by
    /// invalidating it whole first; when that could not be done (the
    /// coordinator was away), this frees what the owner's direct frees
    /// did not reach, instead of leaving it on servers no interval names.
    pub fn final_invalidation(&self, id: u64) -> Result<Option<pb::InvalidateRequest>, CoordError> {
        let iv = self.intervals.get(id)?;
        // The owner subscribes to its own intervals; it holds no page.
        if iv.cleared || iv.subscribers.iter().all(|&m| m == iv.rec.owner) {
            return Ok(None);
        }
        Ok(Some(pb::InvalidateRequest {
            address_space: iv.rec.address_space.clone(),
            start: iv.rec.start,
            length: iv.rec.length,
            reason: pb::Reason::Exit as i32,
            deadline_ms: 0,
            origin: iv.rec.owner,
            more: Vec::new(),
        }))
    }

    pub fn unregister_interval(&mut self, id: u64) -> Result<(), CoordError> {
        self.intervals.get(id)?;
        Ok(self.commit(Record::IntervalRemove { id })?)
    }

    pub fn subscribe(&mut self, interval: u64, member: u64) -> Result<u64, CoordError> {
        let iv = self.intervals.get(interval)?;
        let m = self.members.get(member)?;
        if !m.serving() {
            return Err(CoordError::LeaseExpired(member));
        }
        let seq = iv.seq;
        if !iv.subscribers.contains(&member) {
            self.commit(Record::Subscribe { interval, member })?;
        }
        Ok(seq)
    }

    pub fn unsubscribe(&mut self, interval: u64, member: u64) -> Result<(), CoordError> {
        let iv = self.intervals.get(interval)?;
        self.members.get(member)?;
        if iv.subscribers.contains(&member) {
            self.commit(Record::Unsubscribe { interval, member })?;
        }
        Ok(())
    }

    /// `mmu_interval_read_begin`: the sequence, or None while an
    /// invalidation of the interval is in flight.
    pub fn read_begin(&self, id: u64) -> Result<Option<u64>, CoordError> {
        let iv = self.intervals.get(id)?;
        Ok((iv.in_flight == 0).then_some(iv.seq))
    }

    /// `mmu_interval_read_retry`: whether an invalidation began since `seq`.
    pub fn read_retry(&self, id: u64, seq: u64) -> Result<(bool, u64), CoordError> {
        let iv = self.intervals.get(id)?;
        Ok((iv.seq != seq || iv.in_flight > 0, iv.seq))
    }

    // ------------------------------------------------------- invalidation

    /// Starts an invalidation: bumps the sequence of every overlapping
    /// interval, queues an event for each subscriber, and fences at once
    /// subscribers that hold no lease (they could not acknowledge).
    pub fn begin_invalidation(&mut self, req: &pb::InvalidateRequest) -> Result<Begun, CoordError> {
        check_name("address_space", &req.address_space, false)?;
        if req.more.len() > MAX_SPANS {
            return Err(CoordError::invalid(
                "more",
                format!("at most {MAX_SPANS} ranges in one invalidation"),
            ));
        }
        let mut spans = Vec::with_capacity(1 + req.more.len());
        for (start, length) in std::iter::once((req.start, req.length))
            .chain(req.more.iter().map(|s| (s.start, s.length)))
        {
            spans.push((start, check_range(start, length)?));
        }
        let end = spans[0].1;
        let reason = pb::Reason::try_from(req.reason)
            .map_err(|_| CoordError::invalid("reason", format!("unknown reason {}", req.reason)))?;
        let id = self.next_invalidation;
        self.next_invalidation += 1;
        self.counters.invalidations += 1;
        // Each touched interval's sequence moves once, whatever the number
        // of its ranges the invalidation names.
        let mut touched = Vec::new();
        let mut whole = Vec::new();
        let mut per_member: BTreeMap<u64, Vec<pb::InvalidatedRange>> = BTreeMap::new();
        let mut seqs = Vec::new();
        for &(start, span_end) in &spans {
            for iv_id in self
                .intervals
                .overlapping(&req.address_space, start, span_end)
            {
                let iv = self.intervals.get_mut(iv_id)?;
                if !touched.contains(&iv_id) {
                    touched.push(iv_id);
                    iv.seq += 1;
                    iv.in_flight += 1;
                    seqs.push((iv_id, iv.seq));
                }
                let (s, e) = iv.clip(start, span_end);
                if (s, e) == (iv.rec.start, iv.end()) && !whole.contains(&iv_id) {
                    whole.push(iv_id);
                }
                let range = pb::InvalidatedRange {
                    interval_id: iv_id,
                    start: s,
                    length: e - s,
                    seq: iv.seq,
                    tenant: iv.rec.tenant.clone(),
                    first_handle: iv.rec.handle_base + (s - iv.rec.start) / PAGE,
                };
                for &m in iv.subscribers.iter().filter(|&&m| m != req.origin) {
                    per_member.entry(m).or_default().push(range.clone());
                }
            }
        }
        let mut waiting = BTreeSet::new();
        let mut lapsed = BTreeSet::new();
        for (m, ranges) in per_member {
            if self.members.get(m).is_ok_and(|m| m.serving()) {
                waiting.insert(m);
                self.fanout
                    .mailbox(m)
                    .push(Event::Invalidation(pb::InvalidationEvent {
                        invalidation_id: id,
                        address_space: req.address_space.clone(),
                        reason: reason as i32,
                        ranges,
                    }));
            } else {
                lapsed.insert(m);
            }
        }
        let (mut pending, done) = Pending::new(waiting, touched);
        pending.whole = whole;
        for m in lapsed {
            pending.fenced.push(m);
        }
        let lapsed = pending.fenced.clone();
        self.fanout.pending.insert(id, pending);
        for m in lapsed {
            self.fence(m, id);
        }
        tracing::debug!(invalidation = id, space = %req.address_space, start = req.start, end, ranges = spans.len(), intervals = seqs.len(), "invalidation begun");
        Ok(Begun {
            id,
            intervals: seqs,
            done,
        })
    }

    /// Records `member`'s acknowledgement of invalidation `id`.
    pub fn ack(&mut self, member: u64, id: u64) -> Result<(), CoordError> {
        let m = self.members.get(member)?;
        if m.liveness == Liveness::Fenced {
            return Err(CoordError::Fenced(member));
        }
        self.fanout.mailbox(member).acknowledge(id);
        if let Some(p) = self.fanout.pending.get_mut(&id) {
            p.settle(member, true);
        }
        Ok(())
    }

    /// Whether invalidation `id` still waits for a member that has opened
    /// no event stream on this coordinator yet: one restored from the state
    /// (after a restart or a failover) that is still finding the new
    /// leader, not one that stopped answering.
    pub fn awaits_unarrived(&mut self, id: u64) -> bool {
        let waiting: Vec<u64> = self
            .fanout
            .pending
            .get(&id)
            .map(|p| p.waiting.iter().copied().collect())
            .unwrap_or_default();
        waiting
            .into_iter()
            .any(|m| self.fanout.mailbox(m).generation == 0)
    }

    /// Ends an invalidation: whoever has not acknowledged is fenced.
    pub fn finish_invalidation(&mut self, id: u64) -> Result<Finished, CoordError> {
        let late: Vec<u64> = self
            .fanout
            .pending
            .get(&id)
            .map(|p| p.waiting.iter().copied().collect())
            .unwrap_or_default();
        for m in late {
            tracing::warn!(
                member = m,
                invalidation = id,
                "member did not acknowledge an invalidation in time: fenced"
            );
            self.fence(m, id);
        }
        let p = self
            .fanout
            .pending
            .remove(&id)
            .expect("a begun invalidation is pending until finished");
        self.counters
            .invalidation_latency
            .record_duration(p.began.elapsed());
        for iv in &p.intervals {
            if let Ok(iv) = self.intervals.get_mut(*iv) {
                iv.in_flight = iv.in_flight.saturating_sub(1);
            }
        }
        for iv in &p.whole {
            if let Ok(iv) = self.intervals.get_mut(*iv) {
                iv.cleared = true;
            }
        }
        Ok(Finished {
            acked: p.acked,
            fenced: p.fenced,
        })
    }

    /// Revokes `member`'s lease: its subscriptions end, its stream gets a
    /// fencing notice, and no invalidation waits for it any more.
    fn fence(&mut self, member: u64, invalidation: u64) {
        let already = self
            .members
            .get(member)
            .is_ok_and(|m| m.liveness == Liveness::Fenced);
        if !self.leads() {
            tracing::warn!(member, "not fencing: this coordinator may no longer lead");
            return;
        }
        if !already {
            let record = Record::MemberFenced { id: member };
            if let Err(e) = self.store.append(&record) {
                // The fence holds for this run (applied below); only its
                // memory across a restart is lost, and a restart makes every
                // member heartbeat again anyway.
                tracing::error!(member, error = %e, "cannot record a fence");
            }
            self.apply(&record, Instant::now());
            self.counters.fenced += 1;
        }
        self.fanout.mailbox(member).fence(invalidation);
        self.settle_everywhere(member, false);
    }

    /// No pending invalidation waits for `member` any more.
    fn settle_everywhere(&mut self, member: u64, acked: bool) {
        for p in self.fanout.pending.values_mut() {
            p.settle(member, acked);
        }
    }

    /// Validates a watch request; returns the member's stream generation.
    pub fn open_watch(&mut self, member: u64, incarnation: u64) -> Result<u64, CoordError> {
        self.members.check_current(member, incarnation)?;
        // Drains in progress are state, not events: tell every new stream
        // (after a reconnect, a re-registration or a coordinator restart)
        // about the grants it holds on draining servers.
        let mut by_server: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for g in self.grants.iter().filter(|g| g.agent == member) {
            if self.members.get(g.server).is_ok_and(|s| s.rec.draining) {
                by_server.entry(g.server).or_default().push(g.id);
            }
        }
        let gone: BTreeSet<u64> = by_server
            .keys()
            .copied()
            .filter(|&s| self.members.get(s).is_ok_and(|m| m.rec.gone))
            .collect();
        let mb = self.fanout.mailbox(member);
        mb.drop_drain_notices();
        for (server_id, grant_ids) in by_server {
            mb.push(Event::Drain(pb::DrainNotice {
                server_id,
                grant_ids,
                gone: gone.contains(&server_id),
            }));
        }
        mb.closed = false;
        mb.generation += 1;
        mb.notify.notify_waiters();
        Ok(mb.generation)
    }
}

#[cfg(test)]
mod tests;

//! What rmemctl prints: stable, documented shapes built from the gRPC
//! messages, the same for tables and `--output json`.

use rmem_proto::control::v1 as pb;
use serde::Serialize;

fn role(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Server) => "server",
        Ok(pb::Role::Agent) => "agent",
        _ => "unknown",
    }
}

pub fn state(s: i32) -> &'static str {
    match pb::MemberState::try_from(s) {
        Ok(pb::MemberState::Up) => "up",
        Ok(pb::MemberState::Draining) => "draining",
        Ok(pb::MemberState::Down) => "down",
        Ok(pb::MemberState::Fenced) => "fenced",
        Ok(pb::MemberState::Left) => "left",
        Ok(pb::MemberState::Gone) => "gone",
        _ => "unknown",
    }
}

#[derive(Debug, Serialize)]
pub struct MemberView {
    pub id: u64,
    pub role: &'static str,
    pub name: String,
    pub state: &'static str,
    pub data_addr: String,
    pub grpc_addr: String,
    pub capacity_pages: u64,
    pub used_pages: u64,
    pub allocated_pages: u64,
    pub transports: Vec<String>,
    pub lease_remaining_ms: i64,
    pub incarnation: u64,
    pub subscriptions: u64,
    /// Failure domain (servers; empty: its own).
    pub domain: String,
    /// Agents: pages with fewer live copies than asked.
    pub at_risk_pages: u64,
}

impl From<pb::Member> for MemberView {
    fn from(m: pb::Member) -> Self {
        Self {
            id: m.id,
            role: role(m.role),
            name: m.name,
            state: state(m.state),
            data_addr: m.data_addr,
            grpc_addr: m.grpc_addr,
            capacity_pages: m.capacity_pages,
            used_pages: m.used_pages,
            allocated_pages: m.allocated_pages,
            transports: m.transports,
            lease_remaining_ms: m.lease_remaining_ms,
            incarnation: m.incarnation,
            subscriptions: m.subscriptions,
            domain: m.domain,
            at_risk_pages: m.at_risk_pages,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct IntervalView {
    pub id: u64,
    pub address_space: String,
    pub start: u64,
    pub length: u64,
    pub tenant: String,
    pub handle_base: u64,
    pub owner: u64,
    pub subscribers: Vec<u64>,
    pub seq: u64,
    pub invalidations_in_flight: u32,
}

impl From<pb::Interval> for IntervalView {
    fn from(i: pb::Interval) -> Self {
        Self {
            id: i.id,
            address_space: i.address_space,
            start: i.start,
            length: i.length,
            tenant: i.tenant,
            handle_base: i.handle_base,
            owner: i.owner,
            subscribers: i.subscribers,
            seq: i.seq,
            invalidations_in_flight: i.invalidations_in_flight,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct GrantView {
    pub id: u64,
    pub agent_id: u64,
    pub server_id: u64,
    pub server_name: String,
    pub data_addr: String,
    pub tenant: String,
    pub pages: u64,
}

impl From<pb::Grant> for GrantView {
    fn from(g: pb::Grant) -> Self {
        Self {
            id: g.grant_id,
            agent_id: g.agent_id,
            server_id: g.server_id,
            server_name: g.server_name,
            data_addr: g.data_addr,
            tenant: g.tenant,
            pages: g.pages,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub endpoint: String,
    pub version: String,
    pub cluster_id: String,
    pub epoch: u64,
    /// The agents' default redundancy.
    pub redundancy: String,
    pub servers_up: u32,
    pub servers_draining: u32,
    pub servers_down: u32,
    /// Declared gone (their copies are rebuilt elsewhere).
    pub servers_gone: u32,
    pub agents_up: u32,
    pub agents_down: u32,
    pub capacity_pages: u64,
    pub used_pages: u64,
    pub allocated_pages: u64,
    pub intervals: u64,
    pub invalidations_total: u64,
    pub invalidations_in_flight: u64,
    pub members_fenced_total: u64,
    pub uptime_seconds: f64,
    /// Pages the agents hold with fewer live copies than asked.
    pub pages_at_risk: u64,
    /// Rebuild of gone servers: pages still granted on them, and what was
    /// granted when they were declared gone.
    pub rebuild_pages_left: u64,
    pub rebuild_pages_total: u64,
    /// Where the coordinator keeps its state: `log`, `memory` or `etcd`.
    pub state_backend: String,
    /// With etcd: the replica that leads, every replica (the leader
    /// first), etcd's endpoints and health.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub leader: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub etcd_endpoints: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub etcd_health: String,
}

impl StatusView {
    pub fn new(endpoint: &str, s: pb::StatusResponse) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            version: s.version,
            cluster_id: s.cluster_id,
            epoch: s.epoch,
            redundancy: s.redundancy,
            servers_up: s.servers_up,
            servers_draining: s.servers_draining,
            servers_down: s.servers_down,
            servers_gone: s.servers_gone,
            agents_up: s.agents_up,
            agents_down: s.agents_down,
            capacity_pages: s.capacity_pages,
            used_pages: s.used_pages,
            allocated_pages: s.allocated_pages,
            intervals: s.intervals,
            invalidations_total: s.invalidations_total,
            invalidations_in_flight: s.invalidations_in_flight,
            members_fenced_total: s.members_fenced_total,
            uptime_seconds: s.uptime_seconds,
            pages_at_risk: s.pages_at_risk,
            rebuild_pages_left: s.rebuild_pages_left,
            rebuild_pages_total: s.rebuild_pages_total,
            state_backend: s.state_backend,
            leader: s.leader,
            replicas: s.replicas,
            etcd_endpoints: s.etcd_endpoints,
            etcd_health: s.etcd_health,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct InvalidateView {
    pub invalidation_id: u64,
    pub complete: bool,
    pub intervals: Vec<(u64, u64)>,
    pub acknowledged: Vec<u64>,
    pub fenced: Vec<u64>,
}

impl From<pb::InvalidateResponse> for InvalidateView {
    fn from(r: pb::InvalidateResponse) -> Self {
        Self {
            invalidation_id: r.invalidation_id,
            complete: r.complete,
            intervals: r.intervals.iter().map(|i| (i.interval_id, i.seq)).collect(),
            acknowledged: r.acknowledged,
            fenced: r.fenced,
        }
    }
}

/// One server's data-plane statistics, from its own admin endpoint.
#[derive(Debug, Serialize)]
pub struct ServerStatsView {
    pub id: u64,
    pub name: String,
    pub grpc_addr: String,
    /// Why the server's stats could not be read, if they could not.
    pub error: Option<String>,
    pub capacity_pages: u64,
    pub used_pages: u64,
    /// The cluster the server's pages belong to.
    pub cluster_id: String,
    /// The coordinator does not know the server's pages: it frees none on
    /// its word.
    pub coordinator_unknown: bool,
    /// Connections refused at accept (unauthenticated caps, barred peers).
    pub admissions_refused: u64,
    pub ops: Vec<OpView>,
}

#[derive(Debug, Serialize)]
pub struct OpView {
    pub op: String,
    pub requests: u64,
    pub pages: u64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Serialize)]
pub struct StatsView {
    pub cluster: StatusView,
    pub servers: Vec<ServerStatsView>,
}

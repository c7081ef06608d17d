//! What the coordinator's `/metrics` answers: the cluster as Status sees
//! it (members, capacity, redundancy, invalidations), read at each scrape.
//! A replica that does not lead answers only `rmem_build_info` and
//! `rmem_coordinator_leader 0`: the cluster's figures are the leader's.

use std::sync::{Arc, OnceLock};

use rmem_common::metrics::Exposition;

use crate::service::Shared;

const PAGE: u64 = rmem_proto::wire::PAGE_SIZE as u64;

/// The exposition of a coordinator whose model is in `serving` once it
/// serves (leads).
pub fn exposition(serving: &OnceLock<Arc<Shared>>) -> Exposition {
    let mut e = Exposition::new();
    e.build_info("coordinator");
    let shared = serving.get().filter(|s| !s.shutdown.is_cancelled());
    e.gauge(
        "rmem_coordinator_leader",
        "1 on the coordinator that serves the cluster (the leader among replicas), 0 on a standby.",
    )
    .set(&[], shared.is_some());
    let Some(shared) = shared else {
        return e;
    };
    let s = shared.status();
    let mut members = e.gauge(
        "rmem_coordinator_members",
        "Members by role and state (down: lease lapsed; gone: declared lost for good).",
    );
    for (role, state, n) in [
        ("server", "up", s.servers_up),
        ("server", "draining", s.servers_draining),
        ("server", "down", s.servers_down),
        ("server", "gone", s.servers_gone),
        ("agent", "up", s.agents_up),
        ("agent", "down", s.agents_down),
    ] {
        members.set(&[("role", role), ("state", state)], u64::from(n));
    }
    let (grants, leases_expired) = {
        let c = shared.lock();
        e.histogram(
            "rmem_coordinator_invalidation_duration_seconds",
            "Time from an invalidation's start to every subscriber acknowledging it or being fenced.",
        )
        .observe(&[], &c.counters.invalidation_latency);
        (c.grants.iter().count(), c.counters.leases_expired)
    };
    e.counter(
        "rmem_coordinator_members_fenced_total",
        "Members fenced for not acknowledging an invalidation in time.",
    )
    .set(&[], s.members_fenced_total);
    e.counter(
        "rmem_coordinator_leases_expired_total",
        "Members marked down because their lease ran out.",
    )
    .set(&[], leases_expired);
    e.counter(
        "rmem_coordinator_invalidations_total",
        "Invalidations begun.",
    )
    .set(&[], s.invalidations_total);
    e.gauge(
        "rmem_coordinator_invalidations_in_flight",
        "Invalidations waiting for acknowledgements.",
    )
    .set(&[], s.invalidations_in_flight);
    e.gauge(
        "rmem_coordinator_grants",
        "Grants of server capacity to agents.",
    )
    .set(&[], grants);
    e.gauge("rmem_coordinator_intervals", "Registered intervals.")
        .set(&[], s.intervals);
    e.gauge(
        "rmem_coordinator_capacity_bytes",
        "Capacity of the servers that are up.",
    )
    .set(&[], s.capacity_pages * PAGE);
    e.gauge(
        "rmem_coordinator_used_bytes",
        "Bytes holding pages on the servers that are up, as they last reported.",
    )
    .set(&[], s.used_pages * PAGE);
    e.gauge(
        "rmem_coordinator_allocated_bytes",
        "Server capacity granted to agents.",
    )
    .set(&[], s.allocated_pages * PAGE);
    e.gauge(
        "rmem_coordinator_pages_at_risk",
        "Pages with fewer live copies or shards than their redundancy asks, summed over the agents that are up.",
    )
    .set(&[], s.pages_at_risk);
    e.gauge(
        "rmem_coordinator_rebuild_pages_left",
        "Pages agents still hold grants for on servers declared gone.",
    )
    .set(&[], s.rebuild_pages_left);
    e.gauge(
        "rmem_coordinator_rebuild_pages_declared",
        "Pages the gone servers held when they were declared gone.",
    )
    .set(&[], s.rebuild_pages_total);
    e
}

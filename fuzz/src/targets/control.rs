//! The coordinator's model fed what members send: a sequence of requests,
//! each one byte naming the call, two bytes of length and the protobuf
//! message, decoded by prost as the gRPC services do and applied to one
//! cluster (ephemeral state, so every input starts from nothing).
//! Invalidations begun are acknowledged by any member named and finished
//! at the end of the sequence (or when the input says so).

use prost::Message;
use rmem_coordinator::cluster::Cluster;
use rmem_coordinator::config::CoordinatorConfig;
use rmem_coordinator::state::MemoryStore;
use rmem_proto::control::v1 as pb;

fn cluster() -> Cluster {
    // Two tenants, so that known and unknown names both reach placement.
    let mut cfg: CoordinatorConfig = toml::from_str(
        "ephemeral = true\ninsecure = true\n[[tenant]]\nname = \"blue\"\ntoken = \"s\"\nquota = \"1MiB\"\n",
    )
    .expect("the fuzz target's configuration parses");
    cfg.validate()
        .expect("the fuzz target's configuration is valid");
    Cluster::open(&cfg, Box::new(MemoryStore::default())).expect("an ephemeral cluster opens")
}

/// One input.
pub fn target(data: &[u8]) {
    let mut c = cluster();
    let mut begun = Vec::new();
    let mut rest = data;
    while rest.len() >= 3 {
        let op = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]]));
        let Some(msg) = rest.get(3..3 + len) else {
            break;
        };
        rest = &rest[3 + len..];
        match op % 12 {
            0 => {
                if let Ok(r) = pb::RegisterRequest::decode(msg) {
                    let _ = c.register(&r);
                }
            }
            1 => {
                if let Ok(r) = pb::HeartbeatRequest::decode(msg) {
                    let _ = c.heartbeat(r.member_id, r.incarnation, r.used_pages, r.at_risk_pages);
                }
            }
            2 => {
                if let Ok(r) = pb::DeregisterRequest::decode(msg) {
                    let _ = c.deregister(r.member_id, r.incarnation);
                }
            }
            3 => {
                if let Ok(r) = pb::AllocateRequest::decode(msg) {
                    let _ = c.allocate_once(
                        r.request_id,
                        r.agent_id,
                        &r.tenant,
                        r.pages,
                        r.copies,
                        &r.exclude,
                    );
                }
            }
            4 => {
                if let Ok(r) = pb::ReleaseRequest::decode(msg) {
                    let _ = c.release(r.grant_id, r.pages);
                }
            }
            5 => {
                if let Ok(r) = pb::RegisterIntervalRequest::decode(msg) {
                    let _ = c.register_interval(&r);
                }
            }
            6 => {
                if let Ok(r) = pb::UnregisterIntervalRequest::decode(msg) {
                    let _ = c.unregister_interval(r.interval_id);
                }
            }
            7 => {
                if let Ok(r) = pb::SubscribeRequest::decode(msg) {
                    let _ = c.subscribe(r.interval_id, r.member_id);
                }
            }
            8 => {
                if let Ok(r) = pb::UnsubscribeRequest::decode(msg) {
                    let _ = c.unsubscribe(r.interval_id, r.member_id);
                }
            }
            9 => {
                if let Ok(r) = pb::InvalidateRequest::decode(msg)
                    && let Ok(b) = c.begin_invalidation(&r)
                {
                    begun.push(b.id);
                }
            }
            10 => {
                if let Ok(r) = pb::AckRequest::decode(msg) {
                    let _ = c.ack(r.member_id, r.invalidation_id);
                }
            }
            _ => {
                for id in begun.drain(..) {
                    let _ = c.finish_invalidation(id);
                }
            }
        }
    }
    for id in begun {
        let _ = c.finish_invalidation(id);
    }
}

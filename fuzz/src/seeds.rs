//! Seed inputs for each target, made with the real encoders, so the fuzzer
//! starts from valid conversations and mutates from there. `rmem-fuzz-seeds
//! DIR` writes them as `DIR/TARGET/seed-N`; `fuzz/corpus/` holds them (and
//! whatever a campaign found worth keeping).

use prost::Message;
use rmem_proto::control::v1 as pb;
use rmem_proto::wire::{
    self, ErrorCode, GetOkWriter, Hello, HelloOk, Limits, Opcode, PAGE_SIZE, PROTOCOL_VERSION,
    PageStatus, Stat,
};

const PAGE: u64 = PAGE_SIZE as u64;

fn hello(buf: &mut Vec<u8>, tenant: &str, credential: &[u8]) {
    wire::encode_hello(
        buf,
        &Hello {
            version: PROTOCOL_VERSION,
            node_id: 7,
            tenant,
            credential,
        },
    );
}

fn page(fill: u8) -> wire::Page {
    [fill; PAGE_SIZE]
}

/// A client's conversation: HELLO, then requests of every kind.
fn client_stream(tenant: &str, credential: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    hello(&mut b, tenant, credential);
    // The capability for handles 0..64 (the fuzzed server's key).
    let token = crate::targets::session::key()
        .sign(&rmem_common::capability::Capability {
            key_id: 1,
            tenant: tenant.into(),
            agent: "fuzz".into(),
            first: 0,
            count: 64,
            not_after: u64::MAX,
        })
        .expect("the seed's capability signs");
    wire::encode_caps(&mut b, 9, &[token]);
    let (p1, p2) = (page(1), page(2));
    wire::encode_put(&mut b, 1, [(10u64, &p1), (11u64, &p2)].into_iter());
    wire::encode_handles(&mut b, Opcode::Get, 2, &[10, 11, 12]);
    wire::encode_handles(&mut b, Opcode::Free, 3, &[11, 99]);
    wire::encode_stat(&mut b, 4);
    wire::encode_handles(&mut b, Opcode::Get, 5, &[10]);
    b
}

fn hello_ok(buf: &mut Vec<u8>) {
    wire::encode_hello_ok(
        buf,
        &HelloOk {
            version: PROTOCOL_VERSION,
            flags: 0,
            page_size: PAGE_SIZE as u32,
            limits: Limits::for_batch(16),
            server_id: 42,
        },
    );
}

/// A server's answers to `pages` pages per request.
fn server_stream(pages: usize) -> Vec<u8> {
    let mut b = vec![(pages - 1) as u8];
    hello_ok(&mut b);
    let mut get = GetOkWriter::begin(&mut b, 2, pages);
    for i in 0..pages {
        if i % 3 == 2 {
            get.push_status(PageStatus::NotFound);
        } else {
            let data = page(i as u8);
            get.push_page(wire::page_crc(&data), |p| p.copy_from_slice(&data));
        }
    }
    get.finish();
    let ok = vec![PageStatus::Ok; pages];
    wire::encode_statuses(&mut b, Opcode::PutOk, 1, &ok);
    wire::encode_statuses(&mut b, Opcode::FreeOk, 3, &ok);
    wire::encode_verdicts(
        &mut b,
        9,
        &[wire::CapVerdict::Accepted, wire::CapVerdict::Expired],
    );
    wire::encode_stat_ok(
        &mut b,
        4,
        &Stat {
            capacity_pages: 64,
            used_pages: 2,
            tenant_used_pages: 2,
            tenant_quota_pages: u64::MAX,
        },
    );
    wire::encode_error(
        &mut b,
        0,
        ErrorCode::ShuttingDown,
        "server is shutting down",
    );
    b
}

/// One control request: op, length, message.
fn call(b: &mut Vec<u8>, op: u8, msg: &impl Message) {
    let bytes = msg.encode_to_vec();
    b.push(op);
    b.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    b.extend_from_slice(&bytes);
}

/// A cluster's life: two servers and an agent join, it allocates, registers
/// an interval, subscribes the servers, invalidates, both acknowledge, it
/// releases and leaves.
fn control_stream() -> Vec<u8> {
    let mut b = Vec::new();
    for (i, name) in ["s1", "s2"].into_iter().enumerate() {
        call(
            &mut b,
            0,
            &pb::RegisterRequest {
                role: pb::Role::Server as i32,
                name: name.into(),
                data_addr: format!("10.0.0.{}:7480", i + 1),
                capacity_pages: 1024,
                transports: vec!["tcp".into()],
                ..Default::default()
            },
        );
    }
    call(
        &mut b,
        0,
        &pb::RegisterRequest {
            role: pb::Role::Agent as i32,
            name: "node-1".into(),
            ..Default::default()
        },
    );
    call(
        &mut b,
        3,
        &pb::AllocateRequest {
            agent_id: 3,
            tenant: "blue".into(),
            pages: 64,
            copies: 2,
            request_id: 9,
            ..Default::default()
        },
    );
    call(
        &mut b,
        5,
        &pb::RegisterIntervalRequest {
            address_space: "node-1/a".into(),
            start: 0x10_0000,
            length: 64 * PAGE,
            tenant: "blue".into(),
            handle_base: 1 << 24,
            owner: 3,
            subscribers: vec![1],
        },
    );
    call(
        &mut b,
        7,
        &pb::SubscribeRequest {
            interval_id: 1,
            member_id: 2,
        },
    );
    call(
        &mut b,
        9,
        &pb::InvalidateRequest {
            address_space: "node-1/a".into(),
            start: 0x10_0000,
            length: 8 * PAGE,
            reason: pb::Reason::Unmap as i32,
            origin: 3,
            ..Default::default()
        },
    );
    for m in [1, 2] {
        call(
            &mut b,
            10,
            &pb::AckRequest {
                member_id: m,
                invalidation_id: 1,
            },
        );
    }
    call(&mut b, 11, &pb::AckRequest::default());
    call(
        &mut b,
        1,
        &pb::HeartbeatRequest {
            member_id: 3,
            incarnation: 1,
            ..Default::default()
        },
    );
    call(
        &mut b,
        4,
        &pb::ReleaseRequest {
            grant_id: 1,
            pages: 0,
        },
    );
    call(&mut b, 6, &pb::UnregisterIntervalRequest { interval_id: 1 });
    call(
        &mut b,
        2,
        &pb::DeregisterRequest {
            member_id: 3,
            incarnation: 1,
            ..Default::default()
        },
    );
    b
}

/// Every target's seeds: (target, inputs).
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let clients = vec![client_stream("a", b"x"), client_stream("b", b""), {
        let mut b = Vec::new();
        hello(&mut b, "a", b"wrong");
        b
    }];
    let mut wire_seeds = clients.clone();
    wire_seeds.push(server_stream(4)[1..].to_vec());
    vec![
        ("wire", wire_seeds),
        ("session", clients),
        ("replies", vec![server_stream(1), server_stream(4)]),
        ("control", vec![control_stream()]),
    ]
}

//! What capabilities cost a memory server: one session's handling of
//! 64-page GET batches, with capabilities not required and with them
//! required (the session holding as many capabilities as an agent with
//! several spaces does, the pages under the last), in process: no network,
//! so the check is all that differs. Both runs alternate in rounds, so
//! drift hits both alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmem_common::capability::{Capability, SigningKey, Verifier, unix_now};
use rmem_proto::wire::{self, HEADER_LEN, Hello, Limits, Opcode, PAGE_SIZE, PROTOCOL_VERSION};
use rmem_server::metrics::Metrics;
use rmem_server::store::{Backing, Store, StoreOptions, TenantSpec};
use rmem_server::transport::session::{Session, Shared};
use serde::Serialize;

use crate::BenchError;

/// Pages per GET batch.
const BATCH: u64 = 64;
/// Capabilities the session holds (an agent's spaces).
const HELD: u64 = 8;

#[derive(Debug, Clone, Serialize)]
pub struct CapabilityCost {
    pub batches: u64,
    /// Server time per page of a 64-page GET batch, ns.
    pub get_ns_per_page: f64,
    /// The same with capabilities required and checked.
    pub get_checked_ns_per_page: f64,
    /// What the check adds per page, ns.
    pub check_ns_per_page: f64,
}

fn bench_error(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Invalid {
        field: "capabilities",
        reason: format!("{what}: {e}"),
    }
}

/// A session that said HELLO (and, with `key`, presented capabilities for
/// `HELD` spaces of which the last holds handles `0..BATCH`), with those
/// pages stored.
fn session(key: Option<&SigningKey>) -> Result<Session, BenchError> {
    let store = Store::open(
        &StoreOptions {
            capacity_pages: (BATCH * 2) as u32,
            backing: Backing::Anonymous,
            sync_writes: false,
            prefault: true,
        },
        &[TenantSpec {
            id: 0,
            name: "default".into(),
            token: None,
            quota_pages: None,
        }],
    )
    .map_err(|e| bench_error("store", e))?;
    let capabilities = key.map(|k| {
        let mut v = Verifier::default();
        v.learn([k.public()]);
        Arc::new(std::sync::RwLock::new(v))
    });
    let mut shared = Shared::new(
        Arc::new(store),
        Arc::new(Metrics::default()),
        Limits::for_batch(256),
    );
    shared.capabilities = capabilities;
    let mut s = Session::new(Arc::new(shared));
    let mut frame = Vec::new();
    wire::encode_hello(
        &mut frame,
        &Hello {
            version: PROTOCOL_VERSION,
            node_id: 1,
            tenant: "default",
            credential: b"",
        },
    );
    run(&mut s, &frame)?;
    if let Some(k) = key {
        let tokens = (0..HELD)
            .map(|i| {
                k.sign(&Capability {
                    key_id: k.id(),
                    tenant: "default".into(),
                    agent: "bench".into(),
                    // The pages' space last, so the check scans them all.
                    first: if i == HELD - 1 { 0 } else { (i + 1) << 32 },
                    count: BATCH,
                    not_after: unix_now() + 3600,
                })
                .map_err(|e| bench_error("signing", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        frame.clear();
        wire::encode_caps(&mut frame, 1, &tokens);
        run(&mut s, &frame)?;
    }
    let page = [7u8; PAGE_SIZE];
    frame.clear();
    let handles: Vec<u64> = (0..BATCH).collect();
    wire::encode_put(&mut frame, 2, handles.iter().map(|&h| (h, &page)));
    let out = run(&mut s, &frame)?;
    if out.len() < HEADER_LEN {
        return Err(bench_error("storing", "no answer"));
    }
    Ok(s)
}

fn run(s: &mut Session, frame: &[u8]) -> Result<Vec<u8>, BenchError> {
    let (header, payload, _) = wire::split_frame(frame, s.max_frame())
        .map_err(|e| bench_error("framing", e))?
        .ok_or_else(|| bench_error("framing", "a partial frame"))?;
    let mut out = Vec::new();
    s.handle(&header, payload, &mut out)
        .map_err(|f| bench_error("the session", f.message))?;
    Ok(out)
}

/// Times `rounds` rounds of `per_round` GET batches on each session.
pub fn measure(batches: u64) -> Result<CapabilityCost, BenchError> {
    let key = SigningKey::from_seed(1, &[3; 32]).map_err(|e| bench_error("key", e))?;
    let mut plain = session(None)?;
    let mut checked = session(Some(&key))?;
    let handles: Vec<u64> = (0..BATCH).collect();
    let mut get = Vec::new();
    wire::encode_handles(&mut get, Opcode::Get, 3, &handles);
    let (header, payload, _) = wire::split_frame(&get, plain.max_frame())
        .map_err(|e| bench_error("framing", e))?
        .ok_or_else(|| bench_error("framing", "a partial frame"))?;
    let mut out = Vec::with_capacity(HEADER_LEN + (BATCH as usize) * (PAGE_SIZE + 16));
    // Each answer must hold every page: a denied one would be cheaper.
    let mut time = |s: &mut Session, n: u64| -> Result<Duration, BenchError> {
        let start = Instant::now();
        for _ in 0..n {
            out.clear();
            s.handle(&header, payload, &mut out)
                .map_err(|f| bench_error("GET", f.message))?;
        }
        let took = start.elapsed();
        if out.len() < (BATCH as usize) * PAGE_SIZE {
            return Err(bench_error("GET", "pages were not all served"));
        }
        Ok(took)
    };
    let rounds = 10;
    let per_round = (batches / rounds).max(1);
    let (mut a, mut b) = (Duration::ZERO, Duration::ZERO);
    time(&mut plain, per_round)?;
    time(&mut checked, per_round)?;
    for _ in 0..rounds {
        a += time(&mut plain, per_round)?;
        b += time(&mut checked, per_round)?;
    }
    let pages = (rounds * per_round * BATCH) as f64;
    let per_page = |d: Duration| d.as_nanos() as f64 / pages;
    Ok(CapabilityCost {
        batches: rounds * per_round,
        get_ns_per_page: per_page(a),
        get_checked_ns_per_page: per_page(b),
        check_ns_per_page: per_page(b) - per_page(a),
    })
}

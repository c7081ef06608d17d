//! A memory server's session fed a client's byte stream, as its TCP
//! transport does: frames split off the stream and executed in order until
//! one is fatal. Each input gets a fresh store (two tenants: `a` with the
//! credential `x`, `b` with none; 64 pages, so quotas and a full pool are
//! reached). The server requires capabilities, as a cluster member does:
//! [`key`] signs the seeds' (a fixed key, so a corpus stays valid).

use std::sync::Arc;

use rmem_common::capability::{SigningKey, Verifier};
use rmem_proto::wire::{self, Limits};
use rmem_server::metrics::Metrics;
use rmem_server::store::{Backing, Store, StoreOptions, TenantSpec};
use rmem_server::transport::session::{Session, Shared};

fn store() -> Arc<Store> {
    let tenants = [
        TenantSpec {
            id: 1,
            name: "a".into(),
            token: Some(b"x".to_vec()),
            quota_pages: Some(48),
        },
        TenantSpec {
            id: 2,
            name: "b".into(),
            token: None,
            quota_pages: None,
        },
    ];
    let opts = StoreOptions {
        capacity_pages: 64,
        backing: Backing::Anonymous,
        sync_writes: false,
        prefault: false,
    };
    Arc::new(Store::open(&opts, &tenants).expect("an anonymous store opens"))
}

/// The coordinator's key the fuzzed server accepts capabilities from.
pub fn key() -> SigningKey {
    SigningKey::from_seed(1, &[7; 32]).expect("a fixed seed makes a key")
}

/// One input.
pub fn target(data: &[u8]) {
    let mut shared = Shared::new(store(), Arc::new(Metrics::default()), Limits::for_batch(16));
    let mut verifier = Verifier::default();
    verifier.learn([key().public()]);
    shared.capabilities = Some(Arc::new(std::sync::RwLock::new(verifier)));
    let shared = Arc::new(shared);
    let mut session = Session::new(shared);
    let mut out = Vec::new();
    let mut rest = data;
    while let Ok(Some((header, payload, after))) = wire::split_frame(rest, session.max_frame()) {
        if session.handle(&header, payload, &mut out).is_err() {
            break;
        }
        out.clear();
        rest = after;
    }
}

//! One client's session: handshake state and request execution, independent
//! of how the bytes arrive.

use std::sync::Arc;
use std::time::Instant;

use rmem_proto::wire::{
    self, DecodeError, ErrorCode, FrameHeader, Hello, HelloOk, Limits, Opcode, PAGE_SIZE,
    PROTOCOL_VERSION, PageStatus, Request, Stat,
};

use crate::metrics::{Metrics, Op};
use crate::store::{Store, Tenant};

/// Shared by every session of a server.
#[derive(Debug)]
pub struct Shared {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
}

impl Shared {
    /// Whether a PUT flushes to disk before it is acknowledged (and so
    /// blocks).
    pub fn store_syncs(&self) -> bool {
        self.store.syncs_writes()
    }
}

/// A condition that ends the connection after an ERROR frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    pub code: ErrorCode,
    pub message: String,
    pub request_id: u64,
}

impl Fatal {
    fn new(code: ErrorCode, request_id: u64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            request_id,
        }
    }

    fn decode(e: &DecodeError, request_id: u64) -> Self {
        Self::new(e.error_code(), request_id, e.to_string())
    }
}

/// The state of one client connection.
#[derive(Debug)]
pub struct Session {
    shared: Arc<Shared>,
    tenant: Option<Arc<Tenant>>,
    statuses: Vec<PageStatus>,
}

/// Largest HELLO payload: fixed part, tenant name and credential.
pub const MAX_HELLO_LEN: u32 = (20 + wire::MAX_TENANT_LEN + wire::MAX_CREDENTIAL_LEN) as u32;

impl Session {
    /// A session that has not shaken hands yet.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            tenant: None,
            statuses: Vec::new(),
        }
    }

    /// What every session of the server shares.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The tenant, once authenticated.
    pub fn tenant(&self) -> Option<&Arc<Tenant>> {
        self.tenant.as_ref()
    }

    /// The largest frame payload acceptable in the current state.
    pub fn max_frame(&self) -> u32 {
        if self.tenant.is_some() {
            self.shared.limits.max_frame_bytes
        } else {
            MAX_HELLO_LEN
        }
    }

    /// Executes one request and appends its response to `out`.
    pub fn handle(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Fatal> {
        let id = header.request_id;
        let request = Request::decode(header, payload, self.shared.limits.max_batch_pages)
            .map_err(|e| {
                self.shared
                    .metrics
                    .protocol_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Fatal::decode(&e, id)
            })?;
        let Some(tenant) = self.tenant.clone() else {
            return match request {
                Request::Hello(hello) => self.hello(&hello, out),
                _ => Err(Fatal::new(
                    ErrorCode::NotAuthenticated,
                    id,
                    "the first frame must be HELLO",
                )),
            };
        };
        let started = Instant::now();
        let store = &self.shared.store;
        let metrics = &self.shared.metrics;
        match request {
            Request::Hello(_) => {
                return Err(Fatal::new(
                    ErrorCode::BadFrame,
                    id,
                    "HELLO was already sent",
                ));
            }
            Request::Put(batch) => {
                self.statuses.clear();
                self.statuses.extend(
                    batch
                        .iter()
                        .map(|e| store.put(&tenant, e.handle, e.crc, e.data)),
                );
                wire::encode_statuses(out, Opcode::PutOk, id, &self.statuses);
                let errors = self
                    .statuses
                    .iter()
                    .filter(|s| **s != PageStatus::Ok)
                    .count();
                metrics.record(Op::Put, batch.len() as u64, errors as u64, started);
            }
            Request::Get(handles) => {
                let mut w = wire::GetOkWriter::begin(out, id, handles.len());
                let mut errors = 0;
                for h in handles.iter() {
                    let status = store.get(&tenant, h, |crc, page| {
                        w.push_page(crc, |dst| dst.copy_from_slice(page));
                    });
                    if status != PageStatus::Ok {
                        w.push_status(status);
                        errors += 1;
                    }
                }
                w.finish();
                metrics.record(Op::Get, handles.len() as u64, errors, started);
            }
            Request::Free(handles) => {
                self.statuses.clear();
                self.statuses
                    .extend(handles.iter().map(|h| store.free(&tenant, h)));
                wire::encode_statuses(out, Opcode::FreeOk, id, &self.statuses);
                let errors = self
                    .statuses
                    .iter()
                    .filter(|s| **s != PageStatus::Ok)
                    .count();
                metrics.record(Op::Free, handles.len() as u64, errors as u64, started);
            }
            Request::Stat => {
                let stat = Stat {
                    capacity_pages: store.capacity_pages(),
                    used_pages: store.used_pages(),
                    tenant_used_pages: tenant.used(),
                    tenant_quota_pages: tenant.quota_pages,
                };
                wire::encode_stat_ok(out, id, &stat);
                metrics.record(Op::Stat, 0, 0, started);
            }
        }
        Ok(())
    }

    fn hello(&mut self, hello: &Hello<'_>, out: &mut Vec<u8>) -> Result<(), Fatal> {
        if hello.version != PROTOCOL_VERSION {
            return Err(Fatal::new(
                ErrorCode::UnsupportedVersion,
                0,
                format!(
                    "client speaks protocol version {}, this server speaks {PROTOCOL_VERSION}",
                    hello.version
                ),
            ));
        }
        let tenant = self.shared.store.tenant(hello.tenant);
        match tenant {
            Some(t) if t.authenticate(hello.credential) => {
                tracing::debug!(tenant = %t.name, node_id = hello.node_id, "client authenticated");
                self.tenant = Some(t.clone());
                wire::encode_hello_ok(
                    out,
                    &HelloOk {
                        version: PROTOCOL_VERSION,
                        page_size: PAGE_SIZE as u32,
                        limits: self.shared.limits,
                        server_id: self.shared.store.server_id(),
                    },
                );
                Ok(())
            }
            _ => {
                self.shared
                    .metrics
                    .auth_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Do not tell a stranger which tenants exist.
                Err(Fatal::new(
                    ErrorCode::AuthFailed,
                    0,
                    "unknown tenant or wrong credential",
                ))
            }
        }
    }
}

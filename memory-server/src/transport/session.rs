//! One client's session: handshake state and request execution, independent
//! of how the bytes arrive.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use rmem_proto::wire::{
    self, DecodeError, ErrorCode, FrameHeader, Hello, HelloOk, Limits, Opcode, PAGE_SIZE,
    PROTOCOL_VERSION, PageStatus, Request, Stat,
};

use rmem_common::capability::{self, Capability, Verifier};
use rmem_common::identity::{Identity, Role};

use crate::metrics::{Metrics, Op, Transport};
use crate::store::{Store, Tenant};

/// Shared by every session of a server.
#[derive(Debug)]
pub struct Shared {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// The coordinator's capability keys, when this server requires
    /// agents to present capabilities (it is a cluster member).
    pub capabilities: Option<Arc<std::sync::RwLock<Verifier>>>,
    /// RDMA, when the server offers it.
    #[cfg(feature = "rdma")]
    pub rdma: Option<Arc<super::rdma::RdmaServer>>,
}

impl Shared {
    /// What sessions share, with no RDMA.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, limits: Limits) -> Self {
        Self {
            store,
            metrics,
            limits,
            capabilities: None,
            #[cfg(feature = "rdma")]
            rdma: None,
        }
    }

    /// Whether a PUT flushes to disk before it is acknowledged (and so
    /// blocks).
    pub fn store_syncs(&self) -> bool {
        self.store.syncs_writes()
    }

    /// The HELLO_OK flags: what this server offers beyond TCP.
    fn hello_flags(&self) -> u16 {
        #[cfg(feature = "rdma")]
        if self.rdma.is_some() {
            return wire::HELLO_RDMA;
        }
        0
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
    /// The address the client reached this server at (RDMA uses the
    /// device port that has it).
    local_ip: Option<IpAddr>,
    /// Whom the client's certificate names (with TLS).
    identity: Option<Identity>,
    /// Whose extents this connection's PUTs fill and whose RDMA domain
    /// its queue pair is in: an agent's own (its certificate names it), or
    /// its tenant's (set at HELLO).
    holder: u32,
    /// The capabilities presented, when the server requires them of this
    /// client (set at HELLO).
    held: Option<Held>,
    /// This connection's queue pair, once RDMA_CONNECT succeeded.
    #[cfg(feature = "rdma")]
    rdma: Option<super::rdma::RdmaSession>,
}

/// Most capabilities one connection holds (an agent has one per handle
/// space it uses on this server).
pub const MAX_HELD_CAPABILITIES: usize = 4096;

/// The capabilities a connection presented: the handles it may use.
#[derive(Debug, Default)]
struct Held {
    caps: Vec<Capability>,
    /// The verifier's [`Verifier::forgotten`] counter, and its value when
    /// `caps` were last checked against the keys known.
    forgotten: Arc<std::sync::atomic::AtomicU64>,
    checked: u64,
}

impl Held {
    fn allows(&self, h: u64, now: u64) -> bool {
        self.caps.iter().any(|c| c.covers(h) && c.live(now))
    }

    /// Keeps `cap`, replacing an older one of the same handles.
    fn hold(&mut self, cap: Capability) -> bool {
        if let Some(c) = self
            .caps
            .iter_mut()
            .find(|c| c.first == cap.first && c.count == cap.count)
        {
            if cap.not_after > c.not_after {
                *c = cap;
            }
            return true;
        }
        let now = capability::unix_now();
        self.caps.retain(|c| c.live(now));
        if self.caps.len() >= MAX_HELD_CAPABILITIES {
            return false;
        }
        self.caps.push(cap);
        true
    }
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
            local_ip: None,
            identity: None,
            holder: 0,
            held: None,
            #[cfg(feature = "rdma")]
            rdma: None,
        }
    }

    /// Records whom the client's certificate names.
    pub fn set_identity(&mut self, identity: Identity) {
        self.identity = Some(identity);
    }

    /// Whether this connection has a queue pair (its client may be busy
    /// over RDMA while sending nothing here).
    pub fn has_rdma(&self) -> bool {
        #[cfg(feature = "rdma")]
        return self.rdma.is_some();
        #[cfg(not(feature = "rdma"))]
        false
    }

    /// Records the address the client connected to.
    pub fn set_local_ip(&mut self, ip: IpAddr) {
        self.local_ip = Some(ip);
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
        // One span per request. Disabled (the default level is info), it
        // costs a check of a cached flag: no allocation, no formatting.
        let span = tracing::debug_span!(
            "request",
            request_id = id,
            opcode = ?header.opcode,
            pages = tracing::field::Empty,
        );
        let _entered = span.enter();
        let request = Request::decode(header, payload, self.shared.limits.max_batch_pages)
            .map_err(|e| {
                self.shared
                    .metrics
                    .protocol_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Fatal::decode(&e, id)
            })?;
        if !span.is_disabled() {
            span.record("pages", page_count(&request));
        }
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
        self.recheck_held();
        let started = Instant::now();
        let holder = self.holder;
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
                let allowed = allowed_by(&self.held);
                self.statuses.clear();
                self.statuses.extend(batch.iter().map(|e| {
                    if allowed(e.handle) {
                        store.put_held(&tenant, holder, e.handle, e.crc, e.data)
                    } else {
                        PageStatus::Denied
                    }
                }));
                wire::encode_statuses(out, Opcode::PutOk, id, &self.statuses);
                let errors = self
                    .statuses
                    .iter()
                    .filter(|s| **s != PageStatus::Ok)
                    .count();
                metrics.record(
                    Op::Put,
                    Transport::Tcp,
                    batch.len() as u64,
                    errors as u64,
                    started,
                );
            }
            Request::Get(handles) => {
                let allowed = allowed_by(&self.held);
                let mut w = wire::GetOkWriter::begin(out, id, handles.len());
                let mut errors = 0;
                for h in handles.iter() {
                    let status = if allowed(h) {
                        store.get(&tenant, h, |crc, page| {
                            w.push_page(crc, |dst| dst.copy_from_slice(page));
                        })
                    } else {
                        PageStatus::Denied
                    };
                    if status != PageStatus::Ok {
                        w.push_status(status);
                        errors += 1;
                    }
                }
                w.finish();
                metrics.record(
                    Op::Get,
                    Transport::Tcp,
                    handles.len() as u64,
                    errors,
                    started,
                );
            }
            Request::Free(handles) => {
                let allowed = allowed_by(&self.held);
                self.statuses.clear();
                self.statuses.extend(handles.iter().map(|h| {
                    if allowed(h) {
                        store.free(&tenant, h)
                    } else {
                        PageStatus::Denied
                    }
                }));
                wire::encode_statuses(out, Opcode::FreeOk, id, &self.statuses);
                let errors = self
                    .statuses
                    .iter()
                    .filter(|s| **s != PageStatus::Ok)
                    .count();
                metrics.record(
                    Op::Free,
                    Transport::Tcp,
                    handles.len() as u64,
                    errors as u64,
                    started,
                );
            }
            Request::Stat => {
                let stat = Stat {
                    capacity_pages: store.capacity_pages(),
                    used_pages: store.used_pages(),
                    tenant_used_pages: tenant.used(),
                    tenant_quota_pages: tenant.quota_pages,
                };
                wire::encode_stat_ok(out, id, &stat);
                metrics.record(Op::Stat, Transport::Tcp, 0, 0, started);
            }
            Request::RdmaConnect(peer) => self.rdma_connect(&tenant, &peer, id, out)?,
            Request::PutStaged(puts) => {
                let allowed = allowed_by(&self.held);
                let rdma = self.rdma_session(id)?;
                let errors = rdma.put_staged(store, &tenant, holder, &puts, &allowed, id, out)?;
                metrics.record(Op::Put, Transport::Rdma, puts.len() as u64, errors, started);
            }
            Request::Locate(handles) => {
                let allowed = allowed_by(&self.held);
                let rdma = self.rdma_session(id)?;
                let errors = rdma.locate(&tenant, holder, &handles, &allowed, id, out);
                metrics.record(
                    Op::Locate,
                    Transport::Rdma,
                    handles.len() as u64,
                    errors,
                    started,
                );
            }
            Request::Caps(tokens) => self.present(&tenant, &tokens, id, out),
        }
        Ok(())
    }

    /// Drops the held capabilities signed by a key the server has forgotten
    /// since they were checked (one an operator retired at once, perhaps
    /// leaked): from this request on they open nothing, and the agent,
    /// denied, renews its own. One atomic load when no key was forgotten.
    fn recheck_held(&mut self) {
        let (Some(held), Some(keys)) = (&mut self.held, &self.shared.capabilities) else {
            return;
        };
        let now = held.forgotten.load(std::sync::atomic::Ordering::Acquire);
        if now == held.checked {
            return;
        }
        held.checked = now;
        let v = keys.read().unwrap_or_else(|e| e.into_inner());
        let before = held.caps.len();
        held.caps.retain(|c| v.knows(c.key_id));
        let dropped = before - held.caps.len();
        if dropped > 0 {
            tracing::info!(
                identity = ?self.identity.as_ref().map(ToString::to_string), dropped,
                "capabilities signed by a retired key no longer hold on this connection"
            );
        }
    }

    /// Checks presented capabilities and keeps those that hold: signed by
    /// a key of the coordinator's, live, this tenant's and (with TLS) the
    /// certificate's agent's.
    fn present(&mut self, tenant: &Tenant, tokens: &wire::Tokens<'_>, id: u64, out: &mut Vec<u8>) {
        use wire::CapVerdict as V;
        let now = capability::unix_now();
        let verifier = self
            .shared
            .capabilities
            .as_ref()
            .map(|v| v.read().unwrap_or_else(|e| e.into_inner()).clone());
        let mut verdicts = Vec::with_capacity(tokens.len());
        for token in tokens.iter() {
            let verdict = match &verifier {
                // Capabilities are not required here: nothing to check.
                None => V::Accepted,
                Some(v) => match v.verify(token, now) {
                    Err(capability::CapabilityError::UnknownKey(_)) => V::UnknownKey,
                    Err(capability::CapabilityError::BadSignature) => V::BadSignature,
                    Err(capability::CapabilityError::Expired(_)) => V::Expired,
                    Err(_) => V::Malformed,
                    Ok(cap)
                        if cap.tenant != tenant.name
                            || self.identity.as_ref().is_some_and(|i| i.name != cap.agent) =>
                    {
                        V::NotYours
                    }
                    Ok(cap) => match &mut self.held {
                        Some(held) => {
                            if held.hold(cap) {
                                V::Accepted
                            } else {
                                V::Malformed
                            }
                        }
                        None => V::Accepted,
                    },
                },
            };
            if verdict != V::Accepted {
                tracing::warn!(identity = ?self.identity.as_ref().map(ToString::to_string), tenant = %tenant.name, %verdict, "capability refused");
            }
            verdicts.push(verdict);
        }
        wire::encode_verdicts(out, id, &verdicts);
    }

    #[cfg(feature = "rdma")]
    fn rdma_connect(
        &mut self,
        tenant: &Tenant,
        peer: &wire::RdmaEndpoint,
        id: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Fatal> {
        let Some(server) = self.shared.rdma.clone() else {
            return Err(Fatal::new(
                ErrorCode::RdmaUnavailable,
                id,
                "RDMA is not enabled on this server (--rdma)",
            ));
        };
        if self.rdma.is_some() {
            return Err(Fatal::new(
                ErrorCode::BadFrame,
                id,
                "RDMA is already set up on this connection",
            ));
        }
        let Some(ip) = self.local_ip else {
            return Err(Fatal::new(
                ErrorCode::RdmaUnavailable,
                id,
                "RDMA needs a TCP connection",
            ));
        };
        match server.accept(self.holder, ip, peer) {
            Ok((session, accept)) => {
                tracing::debug!(tenant = %tenant.name, peer_qpn = peer.qpn, qpn = accept.endpoint.qpn, "RDMA queue pair connected");
                self.rdma = Some(session);
                wire::encode_rdma_accept(out, id, &accept);
                Ok(())
            }
            Err(e) => {
                let message = rmem_common::error_chain(&e);
                tracing::warn!(tenant = %tenant.name, error = %message, "cannot set up RDMA for a client");
                Err(Fatal::new(ErrorCode::RdmaUnavailable, id, message))
            }
        }
    }

    #[cfg(not(feature = "rdma"))]
    fn rdma_connect(
        &mut self,
        _: &Tenant,
        _: &wire::RdmaEndpoint,
        id: u64,
        _: &mut Vec<u8>,
    ) -> Result<(), Fatal> {
        Err(Fatal::new(
            ErrorCode::RdmaUnavailable,
            id,
            "this server was built without RDMA support",
        ))
    }

    /// The connection's RDMA state, or the error for a request that needs
    /// it before RDMA_CONNECT.
    fn rdma_session(&self, id: u64) -> Result<RdmaRequests<'_>, Fatal> {
        #[cfg(feature = "rdma")]
        if let (Some(server), Some(session)) = (&self.shared.rdma, &self.rdma) {
            return Ok(RdmaRequests { server, session });
        }
        Err(Fatal::new(
            ErrorCode::BadFrame,
            id,
            "PUT_STAGED and LOCATE need RDMA_CONNECT first",
        ))
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
        // A cluster's server needs no tenant secret of an agent its
        // certificate names: every page it may touch is named by a
        // capability, which carries the tenant.
        let by_certificate = self.shared.capabilities.is_some()
            && hello.credential.is_empty()
            && self
                .identity
                .as_ref()
                .is_some_and(|i| i.role == Role::Agent);
        match tenant {
            Some(t) if by_certificate || t.authenticate(hello.credential) => {
                tracing::debug!(tenant = %t.name, node_id = hello.node_id, "client authenticated");
                self.tenant = Some(t.clone());
                self.holder = match &self.identity {
                    Some(i) if i.role == Role::Agent => self.shared.store.holder(t, &i.name),
                    _ => t.id,
                };
                // Admins may use any handle; agents only what their
                // capabilities name.
                let admin = self
                    .identity
                    .as_ref()
                    .is_some_and(|i| i.role == Role::Admin);
                if let Some(keys) = &self.shared.capabilities
                    && !admin
                {
                    let forgotten = keys.read().unwrap_or_else(|e| e.into_inner()).forgotten();
                    let checked = forgotten.load(std::sync::atomic::Ordering::Acquire);
                    self.held = Some(Held {
                        caps: Vec::new(),
                        forgotten,
                        checked,
                    });
                }
                wire::encode_hello_ok(
                    out,
                    &HelloOk {
                        version: PROTOCOL_VERSION,
                        flags: self.shared.hello_flags(),
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

/// Whether a connection holding `held` may use a handle now: always when
/// the server requires no capabilities of it, else when one it presented
/// names the handle and has not expired.
fn allowed_by(held: &Option<Held>) -> impl Fn(u64) -> bool + '_ {
    // The clock is read only where capabilities are checked.
    let now = held.as_ref().map_or(0, |_| capability::unix_now());
    move |h| held.as_ref().is_none_or(|held| held.allows(h, now))
}

/// Pages a request carries or names.
fn page_count(request: &Request<'_>) -> u64 {
    match request {
        Request::Put(batch) => batch.len() as u64,
        Request::PutStaged(puts) => puts.len() as u64,
        Request::Get(handles) | Request::Free(handles) | Request::Locate(handles) => {
            handles.len() as u64
        }
        Request::Hello(_) | Request::Stat | Request::RdmaConnect(_) | Request::Caps(_) => 0,
    }
}

/// PUT_STAGED and LOCATE on a connection with a queue pair.
struct RdmaRequests<'a> {
    #[cfg(feature = "rdma")]
    server: &'a super::rdma::RdmaServer,
    #[cfg(feature = "rdma")]
    session: &'a super::rdma::RdmaSession,
    #[cfg(not(feature = "rdma"))]
    _never: std::convert::Infallible,
    #[cfg(not(feature = "rdma"))]
    _life: std::marker::PhantomData<&'a ()>,
}

#[cfg(feature = "rdma")]
impl RdmaRequests<'_> {
    /// Stores the staged pages (each checked against its checksum, like a
    /// TCP PUT) and answers with where they now are. Returns the number of
    /// pages not stored.
    #[allow(clippy::too_many_arguments)]
    fn put_staged(
        &self,
        store: &Store,
        tenant: &Tenant,
        holder: u32,
        puts: &wire::StagedPuts<'_>,
        allowed: &dyn Fn(u64) -> bool,
        id: u64,
        out: &mut Vec<u8>,
    ) -> Result<u64, Fatal> {
        // Every index first: a bad frame stores nothing.
        if let Some(bad) = puts.iter().find(|p| self.session.staged(p.index).is_none()) {
            return Err(Fatal::new(
                ErrorCode::BadFrame,
                id,
                format!("staging index {} is out of range", bad.index),
            ));
        }
        let mut errors = 0;
        let mut locations = Vec::with_capacity(puts.len());
        let mut page = [0u8; wire::PAGE_SIZE];
        for put in puts.iter() {
            // Copied out first: the client could WRITE the staging buffer
            // again meanwhile, and the checksum must hold for the bytes
            // stored, not for bytes that change under the check.
            let status = if allowed(put.handle) {
                self.session.copy_staged(put.index, &mut page);
                store.put_held(tenant, holder, put.handle, put.crc, &page)
            } else {
                PageStatus::Denied
            };
            locations.push(if status == PageStatus::Ok {
                self.server.locate(tenant, holder, put.handle)
            } else {
                errors += 1;
                wire::Location::missing(status)
            });
        }
        wire::encode_located(out, id, locations.into_iter());
        Ok(errors)
    }

    /// Answers a LOCATE; returns the number of pages not found.
    fn locate(
        &self,
        tenant: &Tenant,
        holder: u32,
        handles: &wire::Handles<'_>,
        allowed: &dyn Fn(u64) -> bool,
        id: u64,
        out: &mut Vec<u8>,
    ) -> u64 {
        let mut errors = 0;
        let locations = handles.iter().map(|h| {
            let l = if allowed(h) {
                self.server.locate(tenant, holder, h)
            } else {
                wire::Location::missing(PageStatus::Denied)
            };
            if l.status != PageStatus::Ok {
                errors += 1;
            }
            l
        });
        wire::encode_located(out, id, locations);
        errors
    }
}

#[cfg(not(feature = "rdma"))]
impl RdmaRequests<'_> {
    #[allow(clippy::too_many_arguments)]
    fn put_staged(
        &self,
        _: &Store,
        _: &Tenant,
        _: u32,
        _: &wire::StagedPuts<'_>,
        _: &dyn Fn(u64) -> bool,
        _: u64,
        _: &mut Vec<u8>,
    ) -> Result<u64, Fatal> {
        match self._never {}
    }

    fn locate(
        &self,
        _: &Tenant,
        _: u32,
        _: &wire::Handles<'_>,
        _: &dyn Fn(u64) -> bool,
        _: u64,
        _: &mut Vec<u8>,
    ) -> u64 {
        match self._never {}
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::Mutex;

    use rmem_proto::wire::{self, Limits, Opcode};
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    use super::*;
    use crate::store::{Backing, StoreOptions, TenantSpec};

    /// Counts the allocations of each thread, so that tests running in
    /// parallel do not see each other's.
    struct CountingAlloc;

    thread_local! {
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    // SAFETY: every call is forwarded unchanged to the system allocator;
    // the counter is a const-initialized thread-local without destructor,
    // whose access never allocates.
    unsafe impl GlobalAlloc for CountingAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOC: CountingAlloc = CountingAlloc;

    fn allocations() -> u64 {
        ALLOCATIONS.with(Cell::get)
    }

    /// A span's name and fields as recorded.
    type Fields = Vec<(&'static str, String)>;
    type Spans = Arc<Mutex<Vec<(&'static str, Fields)>>>;

    /// A subscriber that records the fields of every span up to `max`.
    struct Capture {
        max: Level,
        spans: Spans,
    }

    struct Recorder<'a>(&'a mut Fields);

    impl Visit for Recorder<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push((field.name(), format!("{value:?}")));
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            *metadata.level() <= self.max
        }
        fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
            Some(self.max.into())
        }
        fn new_span(&self, attrs: &Attributes<'_>) -> Id {
            let mut fields = Vec::new();
            attrs.record(&mut Recorder(&mut fields));
            let mut spans = self.spans.lock().unwrap();
            spans.push((attrs.metadata().name(), fields));
            Id::from_u64(spans.len() as u64)
        }
        fn record(&self, span: &Id, values: &Record<'_>) {
            let mut spans = self.spans.lock().unwrap();
            let at = (span.into_u64() - 1) as usize;
            values.record(&mut Recorder(&mut spans[at].1));
        }
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    fn session() -> Session {
        session_with(None)
    }

    fn session_with(capabilities: Option<Verifier>) -> Session {
        Session::new(shared(64, capabilities))
    }

    /// What the sessions of one server share: a store of `pages` pages
    /// with the `default` tenant.
    fn shared(pages: u32, capabilities: Option<Verifier>) -> Arc<Shared> {
        let store = Store::open(
            &StoreOptions {
                capacity_pages: pages,
                backing: Backing::Anonymous,
                sync_writes: false,
                prefault: false,
            },
            &[TenantSpec {
                id: 0,
                name: "default".into(),
                token: None,
                quota_pages: None,
            }],
        )
        .unwrap();
        Arc::new(Shared {
            store: Arc::new(store),
            metrics: Arc::new(Metrics::default()),
            limits: Limits::for_batch(256),
            capabilities: capabilities.map(|v| Arc::new(std::sync::RwLock::new(v))),
            #[cfg(feature = "rdma")]
            rdma: None,
        })
    }

    /// Executes the one frame in `frame`.
    fn run(session: &mut Session, frame: &[u8], out: &mut Vec<u8>) -> Result<(), Fatal> {
        let (header, payload, _) = wire::split_frame(frame, session.max_frame())
            .unwrap()
            .expect("a whole frame");
        session.handle(&header, payload, out)
    }

    fn hello() -> Vec<u8> {
        let mut buf = Vec::new();
        wire::encode_hello(
            &mut buf,
            &Hello {
                version: PROTOCOL_VERSION,
                node_id: 1,
                tenant: "default",
                credential: b"",
            },
        );
        buf
    }

    /// Runs a request once before any test installs its subscriber. The
    /// first use of a span's callsite registers it, and a registration racing
    /// with another test's `with_default` can leave it with a stale interest
    /// (the span then goes missing); later `with_default`s recompute it.
    fn register_callsites() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            run(&mut session(), &hello(), &mut Vec::new()).unwrap();
        });
    }

    /// Sessions of two agents of one tenant (their certificates name
    /// them) and one without a certificate, on one store.
    #[test]
    fn an_agents_puts_fill_extents_of_its_own() {
        let shared = shared(3 * crate::store::EXTENT_PAGES, None);
        let store = shared.store.clone();
        let tenant = store.tenant("default").unwrap().clone();
        let connect = |agent: Option<&str>| {
            let mut s = Session::new(shared.clone());
            if let Some(name) = agent {
                s.set_identity(Identity {
                    role: Role::Agent,
                    name: name.into(),
                });
            }
            run(&mut s, &hello(), &mut Vec::new()).unwrap();
            s
        };
        for (agent, handle) in [(Some("one"), 1), (Some("two"), 2), (None, 3)] {
            let mut s = connect(agent);
            let mut out = Vec::new();
            run(&mut s, &put(9, &[handle]), &mut out).unwrap();
            let extent = store.locate(&tenant, handle).unwrap().extent;
            let holder = agent.map_or(tenant.id, |a| store.holder(&tenant, a));
            assert_eq!(store.extent_owner(extent), Some(holder), "{agent:?}");
        }
        assert_eq!(store.agent_holders(), 2);
    }

    fn put(id: u64, handles: &[u64]) -> Vec<u8> {
        let page = [7u8; PAGE_SIZE];
        let mut buf = Vec::new();
        wire::encode_put(&mut buf, id, handles.iter().map(|&h| (h, &page)));
        buf
    }

    #[test]
    fn each_request_runs_in_a_debug_span_with_its_id_opcode_and_pages() {
        register_callsites();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let capture = Capture {
            max: Level::DEBUG,
            spans: spans.clone(),
        };
        tracing::subscriber::with_default(capture, || {
            let mut s = session();
            let mut out = Vec::new();
            run(&mut s, &hello(), &mut out).unwrap();
            run(&mut s, &put(5, &[1, 2]), &mut out).unwrap();
            let mut buf = Vec::new();
            wire::encode_handles(&mut buf, Opcode::Get, 6, &[1, 2, 3]);
            wire::encode_handles(&mut buf, Opcode::Free, 7, &[1]);
            wire::encode_stat(&mut buf, 8);
            let mut rest = &buf[..];
            while let Some((header, payload, tail)) = wire::split_frame(rest, 1 << 20).unwrap() {
                s.handle(&header, payload, &mut out).unwrap();
                rest = tail;
            }
        });
        let spans = spans.lock().unwrap();
        let requests: Vec<_> = spans
            .iter()
            .filter(|(name, _)| *name == "request")
            .map(|(_, fields)| {
                fields
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        assert_eq!(
            requests,
            [
                "request_id=0 opcode=Hello pages=0",
                "request_id=5 opcode=Put pages=2",
                "request_id=6 opcode=Get pages=3",
                "request_id=7 opcode=Free pages=1",
                "request_id=8 opcode=Stat pages=0",
            ]
        );
    }

    #[test]
    fn a_request_allocates_nothing_while_debug_is_off() {
        register_callsites();
        let capture = Capture {
            max: Level::INFO,
            spans: Arc::new(Mutex::new(Vec::new())),
        };
        let mut s = session();
        let mut out = Vec::new();
        run(&mut s, &hello(), &mut out).unwrap();
        run(&mut s, &put(1, &[1, 2, 3, 4]), &mut out).unwrap();
        let mut get = Vec::new();
        wire::encode_handles(&mut get, Opcode::Get, 2, &[1, 2, 3, 4, 5]);
        let put = put(3, &[1, 2]);
        tracing::subscriber::with_default(capture, || {
            // Buffers and lazily created state reach their steady size.
            for _ in 0..3 {
                out.clear();
                run(&mut s, &get, &mut out).unwrap();
                run(&mut s, &put, &mut out).unwrap();
            }
            let before = allocations();
            for _ in 0..100 {
                out.clear();
                run(&mut s, &get, &mut out).unwrap();
                run(&mut s, &put, &mut out).unwrap();
            }
            assert_eq!(allocations() - before, 0, "allocations per 100 GET + PUT");
        });
    }

    #[test]
    fn a_cluster_server_serves_only_handles_of_live_capabilities_of_its_keys() {
        use rmem_common::capability::SigningKey;
        let key = |id| SigningKey::from_pkcs8(id, &SigningKey::generate().unwrap()).unwrap();
        let (k1, stranger) = (key(1), key(2));
        let mut v = Verifier::default();
        v.learn([k1.public()]);
        let mut s = session_with(Some(v));
        let mut out = Vec::new();
        run(&mut s, &hello(), &mut out).unwrap();
        let now = capability::unix_now();
        let cap = |first, not_after, tenant: &str| Capability {
            key_id: 0,
            tenant: tenant.into(),
            agent: "node-1".into(),
            first,
            count: 16,
            not_after,
        };
        let frames = |out: &[u8]| {
            let mut rest = out;
            let mut v = Vec::new();
            while let Some((h, p, tail)) = wire::split_frame(rest, 1 << 24).unwrap() {
                v.push((h, p.to_vec()));
                rest = tail;
            }
            v
        };
        let statuses = |out: &[u8]| -> Vec<PageStatus> {
            let (h, p) = frames(out).pop().unwrap();
            match wire::Response::decode(&h, &p, 256).unwrap() {
                wire::Response::PutOk(st) => st.iter().collect(),
                other => panic!("{other:?}"),
            }
        };
        // Before any capability: every handle is denied, nothing stored.
        out.clear();
        run(&mut s, &put(2, &[100, 200]), &mut out).unwrap();
        assert_eq!(statuses(&out), [PageStatus::Denied; 2]);
        assert_eq!(s.shared().store.used_pages(), 0);
        // One good capability; one expired; one of an unknown key; one of
        // another tenant; one that is not a token.
        let tokens = [
            k1.sign(&cap(96, now + 60, "default")).unwrap(),
            k1.sign(&cap(192, now - 1, "default")).unwrap(),
            stranger.sign(&cap(192, now + 60, "default")).unwrap(),
            k1.sign(&cap(192, now + 60, "other")).unwrap(),
            b"junk".to_vec(),
        ];
        let mut caps = Vec::new();
        wire::encode_caps(&mut caps, 3, &tokens);
        out.clear();
        run(&mut s, &caps, &mut out).unwrap();
        let (h, p) = frames(&out).pop().unwrap();
        let wire::Response::CapsOk(verdicts) = wire::Response::decode(&h, &p, 256).unwrap() else {
            panic!("not CAPS_OK");
        };
        use wire::CapVerdict as V;
        assert_eq!(
            verdicts.iter().collect::<Vec<_>>(),
            [
                V::Accepted,
                V::Expired,
                V::UnknownKey,
                V::NotYours,
                V::Malformed
            ]
        );
        // Handles 96..112 only.
        out.clear();
        run(&mut s, &put(4, &[95, 96, 111, 112, 200]), &mut out).unwrap();
        use PageStatus::{Denied, Ok as Stored};
        assert_eq!(statuses(&out), [Denied, Stored, Stored, Denied, Denied]);
        assert_eq!(s.shared().store.used_pages(), 2);

        // The operator retires k1 at once (it leaked): once the server
        // forgets it, the capability this connection holds opens nothing
        // from its next request on, and presenting it again is refused.
        s.shared()
            .capabilities
            .as_ref()
            .unwrap()
            .write()
            .unwrap()
            .forget([k1.public()]);
        out.clear();
        run(&mut s, &put(5, &[96, 97]), &mut out).unwrap();
        assert_eq!(statuses(&out), [Denied, Denied]);
        out.clear();
        caps.clear();
        wire::encode_caps(&mut caps, 6, &tokens[..1]);
        run(&mut s, &caps, &mut out).unwrap();
        let (h, p) = frames(&out).pop().unwrap();
        let wire::Response::CapsOk(verdicts) = wire::Response::decode(&h, &p, 256).unwrap() else {
            panic!("not CAPS_OK");
        };
        assert_eq!(verdicts.iter().collect::<Vec<_>>(), [V::UnknownKey]);
    }
}

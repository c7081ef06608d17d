//! The control-plane client: typed access to the coordinator's gRPC
//! services, shared by `rmemctl`, the agent, the memory servers and the
//! tests.
//!
//! - [`ControlClient`]: one channel to the coordinator, with the cluster
//!   token attached to every call.
//! - [`MemberSession`]: a registered member: keeps its lease alive, reads
//!   its event stream, hands invalidations to a [`Subscriber`] and
//!   acknowledges them once the subscriber is done; registers again after
//!   a lost lease or a fence.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rmem_proto::control::v1::cluster_admin_client::ClusterAdminClient;
use rmem_proto::control::v1::intervals_client::IntervalsClient;
use rmem_proto::control::v1::invalidation_client::InvalidationClient;
use rmem_proto::control::v1::membership_client::MembershipClient;
use rmem_proto::control::v1::placement_client::PlacementClient;
use rmem_proto::control::v1::{self as pb, watch_event::Event};
use tokio::task::JoinHandle;
use tonic::codegen::InterceptedService;
use tonic::transport::Endpoint;

pub use crate::leader::{LEADER_KEY, LeaderChannel};

/// Metadata key of the coordinator's stable error reason.
pub const REASON_KEY: &str = "rmem-reason";

/// Why a control-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("invalid coordinator endpoint `{endpoint}`")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot reach the coordinator at {endpoint}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{message} ({code:?}, {reason})")]
    Rpc {
        code: tonic::Code,
        /// Stable reason, e.g. `unknown_interval` (empty if none was sent).
        reason: String,
        message: String,
    },
}

impl ControlError {
    /// The coordinator's stable reason, if it gave one.
    pub fn reason(&self) -> &str {
        match self {
            Self::Rpc { reason, .. } => reason,
            _ => "",
        }
    }

    /// The gRPC code (Unavailable when the coordinator was not reached).
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Rpc { code, .. } => *code,
            Self::Endpoint { .. } => tonic::Code::InvalidArgument,
            Self::Unreachable { .. } => tonic::Code::Unavailable,
        }
    }
}

impl From<tonic::Status> for ControlError {
    fn from(s: tonic::Status) -> Self {
        Self::Rpc {
            code: s.code(),
            reason: s
                .metadata()
                .get(REASON_KEY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            message: s.message().to_string(),
        }
    }
}

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Debug, Clone)]
pub struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<LeaderChannel, Auth>;

/// A connection to the coordinator (to the replica that leads, among
/// several: [`LeaderChannel`]).
#[derive(Debug, Clone)]
pub struct ControlClient {
    channel: LeaderChannel,
    auth: Auth,
    endpoint: String,
}

/// `host:port` becomes `http://host:port` (`https://` with TLS).
fn url(endpoint: &str, tls: bool) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// How a member proves who it is to the coordinator: the cluster token
/// (bearer), and mutual TLS with its certificate.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub token: Option<String>,
    pub tls: Option<rmem_common::tls::TlsPem>,
}

impl Credentials {
    pub fn token(token: Option<&str>) -> Self {
        Self {
            token: token.map(str::to_string),
            tls: None,
        }
    }
}

/// tonic's client TLS for `pem`: the cluster CA verifies the coordinator,
/// the member's certificate identifies it.
pub fn client_tls(pem: &rmem_common::tls::TlsPem) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&pem.ca))
        .identity(tonic::transport::Identity::from_pem(&pem.cert, &pem.key))
}

impl ControlClient {
    /// Connects to `endpoint` (`host:port` or a URL; several replicas'
    /// comma-separated, the first that answers is used and calls then
    /// follow the one that leads), failing after `timeout` for each if
    /// none can be reached.
    pub async fn connect(
        endpoint: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        Self::connect_with(endpoint, &Credentials::token(token), timeout).await
    }

    /// As [`Self::connect`], with TLS when `creds` has it.
    pub async fn connect_with(
        endpoint: &str,
        creds: &Credentials,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        let token = creds.token.as_deref();
        // Each connection's handshake is made with the member's current
        // files: a renewed certificate or CA is used from the next one on.
        let tls = match &creds.tls {
            Some(pem) => {
                let reloading = rmem_common::tls::reload::Reloading::new(pem.clone());
                reloading.watch();
                let cached = reloading
                    .cached(rmem_common::tls::reload::grpc_client)
                    .map_err(|e| ControlError::Rpc {
                        code: tonic::Code::InvalidArgument,
                        reason: "invalid_tls".into(),
                        message: rmem_common::error_chain(&e),
                    })?;
                Some(crate::grpc_tls::Connector::new(cached))
            }
            None => None,
        };
        let names: Vec<String> = endpoint
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect();
        let mut endpoints = Vec::with_capacity(names.len());
        for name in &names {
            // With TLS the connector makes it: tonic speaks HTTP/2 over it.
            let ep = Endpoint::from_shared(url(name, false)).map_err(|source| {
                ControlError::Endpoint {
                    endpoint: name.clone(),
                    source,
                }
            })?;
            endpoints.push(
                ep.connect_timeout(timeout.min(crate::leader::CONNECT_TIMEOUT))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(10)),
            );
        }
        // Of several replicas, the one whose health says it serves the
        // control services (the leader), else the first that answers.
        let mut first = None;
        let mut failure = None;
        for (i, ep) in endpoints.iter().enumerate() {
            let connected = match &tls {
                Some(c) => ep.clone().connect_with_connector(c.within(timeout)).await,
                None => ep.clone().connect_timeout(timeout).connect().await,
            };
            match connected {
                Ok(c) => {
                    if names.len() == 1 || leads(&c, timeout).await {
                        first = Some((i, c));
                        break;
                    }
                    first.get_or_insert((i, c));
                }
                Err(e) => failure = Some(e),
            }
        }
        let Some(first) = first else {
            return Err(match failure {
                Some(source) => ControlError::Unreachable {
                    endpoint: endpoint.to_string(),
                    source,
                },
                None => ControlError::Rpc {
                    code: tonic::Code::InvalidArgument,
                    reason: "invalid_endpoint".into(),
                    message: "no coordinator endpoint given".into(),
                },
            });
        };
        let lazy = tls.map(|c| c.within(crate::leader::CONNECT_TIMEOUT.min(timeout)));
        let channel = LeaderChannel::new(names, endpoints, first, lazy);
        let auth = match token {
            Some(t) => Auth(Some(format!("Bearer {t}").parse().map_err(|_| {
                ControlError::Rpc {
                    code: tonic::Code::InvalidArgument,
                    reason: "invalid_token".into(),
                    message: "the cluster token must be printable ASCII".into(),
                }
            })?)),
            None => Auth(None),
        };
        Ok(Self {
            channel,
            auth,
            endpoint: endpoint.to_string(),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn membership(&self) -> MembershipClient<Svc> {
        MembershipClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn placement(&self) -> PlacementClient<Svc> {
        PlacementClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn intervals(&self) -> IntervalsClient<Svc> {
        IntervalsClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn invalidation(&self) -> InvalidationClient<Svc> {
        InvalidationClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn admin(&self) -> ClusterAdminClient<Svc> {
        ClusterAdminClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// The channel itself, for services other than the coordinator's (the
    /// standard gRPC health service, which every rmem daemon serves).
    pub fn channel(&self) -> LeaderChannel {
        self.channel.clone()
    }

    /// The replica calls go to now (of several, the one believed to lead).
    pub fn current(&self) -> &str {
        self.channel.current()
    }
}

/// Whether the coordinator behind `channel` serves the control services
/// (a replica that does not lead answers NOT_SERVING for them).
async fn leads(channel: &tonic::transport::Channel, timeout: Duration) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: "rmem.control.v1.Membership".into(),
    });
    req.set_timeout(timeout);
    health
        .check(req)
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

/// Whether a failed control call may succeed if tried again: the
/// coordinator was not reached or not ready (restarting, failing over).
/// Configuration errors (a bad endpoint, a wrong token, an invalid
/// registration) are not: retrying them only hides them.
pub fn retryable(e: &ControlError) -> bool {
    match e {
        ControlError::Unreachable { .. } => true,
        // An interval still under invalidation is an answer, not an
        // absent coordinator: the caller decides.
        ControlError::Rpc { reason, .. } if reason == "interval_busy" => false,
        ControlError::Rpc {
            code: tonic::Code::Unavailable | tonic::Code::DeadlineExceeded,
            ..
        } => true,
        _ => false,
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `within` has
/// passed, waiting between tries (100 ms doubling up to 5 s) and saying
/// each time why.
pub async fn retrying<T, F, Fut>(
    what: &str,
    within: Duration,
    mut attempt: F,
) -> Result<T, ControlError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ControlError>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(100);
    loop {
        match attempt().await {
            Err(e) if retryable(&e) && tokio::time::Instant::now() + pause < deadline => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                tracing::warn!(
                    error = %e,
                    retry_in = ?pause,
                    gives_up_in = ?left,
                    "{what}: the coordinator is not reachable; trying again"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            r => return r,
        }
    }
}

/// Connects to the coordinator at `endpoint` and registers `req` with the
/// subscriber `make` builds on the connection, trying again while the
/// coordinator cannot be reached, for at most `within` (a member started
/// while the control plane restarts rides it out).
pub async fn join<S: Subscriber>(
    endpoint: &str,
    creds: &Credentials,
    within: Duration,
    req: pb::RegisterRequest,
    make: impl FnOnce(ControlClient) -> Arc<S>,
) -> Result<(ControlClient, MemberSession, Arc<S>), ControlError> {
    let deadline = tokio::time::Instant::now() + within;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let per_try = |left: Duration| Duration::from_secs(5).min(left.max(Duration::from_millis(100)));
    let client = retrying("joining the cluster", left(), || {
        ControlClient::connect_with(endpoint, creds, per_try(left()))
    })
    .await?;
    let subscriber = make(client.clone());
    let session = retrying("joining the cluster", left(), || {
        MemberSession::start(client.clone(), req.clone(), subscriber.clone())
    })
    .await?;
    Ok((client, session, subscriber))
}

/// What a member does with its events.
pub trait Subscriber: Send + Sync + 'static {
    /// Drops every local copy of the invalidated range (a server frees the
    /// pages, an agent drops its mirror). The session acknowledges once it
    /// returns `Ok`; an `Err` is logged and not acknowledged, so the
    /// coordinator fences the member when the deadline passes.
    fn invalidate<'a>(
        &'a self,
        event: &'a pb::InvalidationEvent,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

    /// A server this member holds grants on is draining.
    fn drain<'a>(
        &'a self,
        _notice: &'a pb::DrainNotice,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async {})
    }

    /// The member lost its lease or was fenced: every mirror it holds may be
    /// stale and must go. Called before the session registers again.
    fn reset(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }

    /// The member registered (again).
    fn registered<'a>(
        &'a self,
        _reg: &'a Registration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async {})
    }
}

/// What a registration answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub member_id: u64,
    /// The coordinator's cluster identity (see `RegisterResponse`).
    pub cluster_id: String,
    /// The coordinator's epoch at the registration.
    pub epoch: u64,
    /// The cluster's default redundancy policy, as the coordinator wrote it
    /// (empty from a coordinator that predates it).
    pub redundancy: String,
    /// The member's state (`pb::MemberState` as i32): a server may come
    /// back draining or gone.
    pub state: i32,
}

/// Identity and counters of a running session.
#[derive(Debug, Default)]
pub struct SessionState {
    pub member_id: AtomicU64,
    pub incarnation: AtomicU64,
    /// Reported in heartbeats (servers: pages in use).
    pub used_pages: AtomicU64,
    /// Reported in heartbeats (agents: pages with fewer live copies than
    /// their redundancy asks for).
    pub at_risk_pages: AtomicU64,
    /// The member's state as the last registration or heartbeat said
    /// (`pb::MemberState` as i32).
    pub member_state: std::sync::atomic::AtomicI32,
    pub invalidations: AtomicU64,
    pub registrations: AtomicU64,
    /// Whether the lease is current (the member may serve).
    pub live: AtomicBool,
    /// Lease length the coordinator granted, ms.
    pub lease_ms: AtomicU64,
    /// Highest epoch seen from the coordinator of the current registration
    /// (registrations and heartbeats).
    pub epoch: AtomicU64,
    /// The cluster identity of the current registration, sent with every
    /// session request (see `HeartbeatRequest.cluster_id`).
    pub cluster_id: std::sync::Mutex<String>,
    /// The keys the coordinator signs capabilities with, as its last
    /// registration or heartbeat listed them (servers check capabilities
    /// with them).
    pub capability_keys: std::sync::Mutex<Vec<rmem_common::capability::PublicKey>>,
    /// Keys the coordinator retired (servers forget them).
    pub retired_capability_keys: std::sync::Mutex<Vec<rmem_common::capability::PublicKey>>,
}

/// Keeps the capability keys a coordinator answer listed, live and
/// retired.
fn keep_keys(state: &SessionState, keys: &[pb::CapabilityKey], retired: &[pb::CapabilityKey]) {
    let public = |keys: &[pb::CapabilityKey]| {
        keys.iter()
            .map(|k| rmem_common::capability::PublicKey {
                id: k.id,
                bytes: k.public_key.clone(),
            })
            .collect()
    };
    *state
        .capability_keys
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = public(keys);
    *state
        .retired_capability_keys
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = public(retired);
}

impl SessionState {
    /// The cluster identity of the current registration.
    pub fn cluster_id(&self) -> String {
        self.cluster_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A registered member, kept alive in the background.
#[derive(Debug)]
pub struct MemberSession {
    pub state: Arc<SessionState>,
    task: JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
    client: ControlClient,
}

impl MemberSession {
    /// Registers with `req` and keeps the membership alive until
    /// [`MemberSession::leave`] or drop.
    pub async fn start(
        client: ControlClient,
        req: pb::RegisterRequest,
        subscriber: Arc<dyn Subscriber>,
    ) -> Result<Self, ControlError> {
        let state = Arc::new(SessionState::default());
        register(&client, &req, &state, &*subscriber).await?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(client.clone(), req, state.clone(), subscriber, stopped));
        Ok(Self {
            state,
            task,
            stop,
            client,
        })
    }

    pub fn member_id(&self) -> u64 {
        self.state.member_id.load(Ordering::Acquire)
    }

    pub fn incarnation(&self) -> u64 {
        self.state.incarnation.load(Ordering::Acquire)
    }

    /// Stops the session and deregisters.
    pub async fn leave(mut self) -> Result<(), ControlError> {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
        self.client
            .membership()
            .deregister(pb::DeregisterRequest {
                member_id: self.state.member_id.load(Ordering::Acquire),
                incarnation: self.state.incarnation.load(Ordering::Acquire),
                cluster_id: self.state.cluster_id(),
            })
            .await?;
        Ok(())
    }
}

impl Drop for MemberSession {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

async fn register(
    client: &ControlClient,
    req: &pb::RegisterRequest,
    state: &SessionState,
    subscriber: &dyn Subscriber,
) -> Result<(), ControlError> {
    let r = client
        .membership()
        .register(req.clone())
        .await?
        .into_inner();
    state.member_id.store(r.member_id, Ordering::Release);
    state.incarnation.store(r.incarnation, Ordering::Release);
    state
        .lease_ms
        .store(u64::from(r.lease_ttl_ms), Ordering::Release);
    state.registrations.fetch_add(1, Ordering::Relaxed);
    state.member_state.store(r.state, Ordering::Release);
    state.live.store(true, Ordering::Release);
    // This coordinator's epoch, not the highest of any coordinator: one
    // that lost its state starts again from 1.
    state.epoch.store(r.epoch, Ordering::Release);
    keep_keys(state, &r.capability_keys, &r.retired_capability_keys);
    r.cluster_id
        .clone_into(&mut state.cluster_id.lock().unwrap_or_else(|e| e.into_inner()));
    subscriber
        .registered(&Registration {
            member_id: r.member_id,
            cluster_id: r.cluster_id,
            epoch: r.epoch,
            redundancy: r.redundancy,
            state: r.state,
        })
        .await;
    tracing::info!(member = r.member_id, incarnation = r.incarnation, name = %req.name, "registered with the coordinator");
    Ok(())
}

/// Heartbeats and the event stream, until stopped; registers again after a
/// lost lease or a fence.
async fn run(
    client: ControlClient,
    req: pb::RegisterRequest,
    state: Arc<SessionState>,
    subscriber: Arc<dyn Subscriber>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stopped.borrow() {
            return;
        }
        let started = std::time::Instant::now();
        let outcome = tokio::select! {
            o = serve(&client, &state, &*subscriber) => o,
            _ = stopped.changed() => return,
        };
        state.live.store(false, Ordering::Release);
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(50);
        }
        let pause = |backoff: &mut Duration| {
            let d = *backoff;
            *backoff = (*backoff * 2).min(Duration::from_secs(2));
            d
        };
        match outcome {
            Lost::Connection(why) => {
                // The registration may well still hold (a blip, or a
                // coordinator restart that kept it): keep this identity and
                // its undelivered events; a lapsed lease answers
                // `lease_expired` and takes the other branch.
                tracing::warn!(error = %why, "coordinator connection lost; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause(&mut backoff)) => {}
                    _ = stopped.changed() => return,
                }
            }
            Lost::Membership(why) => {
                tracing::warn!(reason = %why, "membership lost: dropping mirrors and registering again");
                subscriber.reset().await;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(pause(&mut backoff)) => {}
                        _ = stopped.changed() => return,
                    }
                    match register(&client, &req, &state, &*subscriber).await {
                        Ok(()) => {
                            backoff = Duration::from_millis(50);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot register with the coordinator")
                        }
                    }
                }
            }
        }
    }
}

enum Lost {
    /// The coordinator says the lease is gone (expired, fenced, stale).
    Membership(String),
    /// The coordinator could not be reached.
    Connection(String),
}

fn lost(e: ControlError) -> Lost {
    match e.code() {
        tonic::Code::FailedPrecondition | tonic::Code::NotFound => Lost::Membership(e.to_string()),
        _ => Lost::Connection(e.to_string()),
    }
}

async fn serve(client: &ControlClient, state: &SessionState, subscriber: &dyn Subscriber) -> Lost {
    let member_id = state.member_id.load(Ordering::Acquire);
    let incarnation = state.incarnation.load(Ordering::Acquire);
    let cluster_id = state.cluster_id();
    // Three heartbeats per lease.
    let every_for =
        |lease_ms: u64| Duration::from_millis(lease_ms / 3).max(Duration::from_millis(20));
    let heartbeat = async {
        let mut every = every_for(state.lease_ms.load(Ordering::Acquire));
        loop {
            tokio::time::sleep(every).await;
            let r = client
                .membership()
                .heartbeat(pb::HeartbeatRequest {
                    member_id,
                    incarnation,
                    used_pages: state.used_pages.load(Ordering::Relaxed),
                    cluster_id: cluster_id.clone(),
                    at_risk_pages: state.at_risk_pages.load(Ordering::Relaxed),
                })
                .await;
            match r {
                Ok(r) => {
                    let r = r.into_inner();
                    state.epoch.fetch_max(r.epoch, Ordering::AcqRel);
                    state.member_state.store(r.state, Ordering::Release);
                    keep_keys(state, &r.capability_keys, &r.retired_capability_keys);
                    let lease_ms = u64::from(r.lease_ttl_ms);
                    state.lease_ms.store(lease_ms, Ordering::Release);
                    every = every_for(lease_ms);
                }
                Err(e) => return lost(e.into()),
            }
        }
    };
    let events = async {
        let mut stream = match client
            .invalidation()
            .watch(pb::WatchRequest {
                member_id,
                incarnation,
                cluster_id: cluster_id.clone(),
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(e) => return lost(e.into()),
        };
        loop {
            let ev = match stream.message().await {
                Ok(Some(ev)) => ev,
                Ok(None) => return Lost::Connection("event stream ended".into()),
                Err(e) => return lost(e.into()),
            };
            match ev.event {
                Some(Event::Invalidation(inv)) => match subscriber.invalidate(&inv).await {
                    Ok(()) => {
                        state.invalidations.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = client
                            .invalidation()
                            .ack(pb::AckRequest {
                                member_id,
                                invalidation_id: inv.invalidation_id,
                            })
                            .await
                        {
                            return lost(e.into());
                        }
                    }
                    Err(e) => tracing::error!(
                        invalidation = inv.invalidation_id, error = %e,
                        "cannot apply an invalidation; not acknowledging it"
                    ),
                },
                Some(Event::Drain(d)) => subscriber.drain(&d).await,
                Some(Event::Fenced(f)) => {
                    return Lost::Membership(format!(
                        "fenced by invalidation {}",
                        f.invalidation_id
                    ));
                }
                None => {}
            }
        }
    };
    tokio::select! {
        l = heartbeat => l,
        l = events => l,
    }
}

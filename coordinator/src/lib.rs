//! rmem coordinator: the cluster's control plane over gRPC.
//!
//! - [`membership`]: members and leases.
//! - [`placement`]: grants of server capacity (power of two choices).
//! - [`intervals`]: interval registrations and sequence numbers.
//! - [`invalidation`]: per-member mailboxes and invalidations waiting for
//!   acknowledgements.
//! - [`cluster`]: the model tying them together, changed only through
//!   persisted records ([`state`]).
//! - [`service`]: the tonic services over the model.
//!
//! [`Coordinator::start`] runs it inside the caller's tokio runtime; the
//! `rmem-coordinator` binary and tests go through it.

pub mod cluster;
pub mod config;
pub mod error;
pub mod intervals;
pub mod invalidation;
pub mod keyring;
pub mod membership;
pub mod metrics;
pub mod placement;
pub mod service;
pub mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmem_common::tls::reload::{self, Cached, Reloading};
use rmem_proto::control::v1::cluster_admin_server::ClusterAdminServer;
use rmem_proto::control::v1::intervals_server::IntervalsServer;
use rmem_proto::control::v1::invalidation_server::InvalidationServer;
use rmem_proto::control::v1::membership_server::MembershipServer;
use rmem_proto::control::v1::placement_server::PlacementServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::config::{ConfigError, CoordinatorConfig};
use crate::error::CoordError;
use crate::service::{Service, Shared};
use crate::state::etcd::{EtcdOptions, EtcdStore, EtcdTls, Leadership};
use crate::state::{MemoryStore, StateError, StateStore, log::FileLog};

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    addr: SocketAddr,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    shared: Arc<Shared>,
    deposed: CancellationToken,
}

/// In front of every call: refuses it until this coordinator serves and
/// once a replica may no longer lead (`not_leader`, with the leader's
/// address in `rmem-leader` when known: ask it), and checks
/// `authorization: Bearer TOKEN` when a token is set.
#[derive(Clone, Debug)]
struct Gate {
    token: Option<Arc<str>>,
    leadership: Option<Leadership>,
    serving: Arc<std::sync::OnceLock<Arc<Shared>>>,
    /// Mutual TLS is on: every caller's certificate names its identity,
    /// which the call carries on to the service (see [`caller`]), and is
    /// checked on every call against the current CRLs and its expiry (a
    /// member revoked while connected is refused from the next reload).
    tls: Option<Arc<Reloading>>,
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        use subtle::ConstantTimeEq;
        if let Some(tls) = &self.tls {
            // The handshake verified the chain; the identity is in it.
            let identity = req
                .peer_certs()
                .and_then(|certs| certs.first().cloned())
                .ok_or(CoordError::NoIdentity("no client certificate".into()))
                .and_then(|der| {
                    tls.check_peer(&der)?;
                    rmem_common::identity::Identity::from_certificate(&der)
                        .map_err(|e| CoordError::NoIdentity(e.to_string()))
                })?;
            // A scraper's certificate opens the daemons' /metrics, nothing
            // of the control plane (not even listings: intervals name
            // processes' address spaces).
            if identity.role == rmem_common::identity::Role::Monitor {
                return Err(CoordError::Forbidden {
                    caller: identity.to_string(),
                    what: "use the control plane (a monitor certificate reads /metrics only)"
                        .into(),
                }
                .into());
            }
            req.extensions_mut().insert(identity);
        }
        if self.serving.get().is_none() || self.leadership.as_ref().is_some_and(|l| !l.holds()) {
            let leader = self.leadership.as_ref().map(Leadership::leader);
            if let Some(l) = &self.leadership
                && !l.etcd_reachable()
                && leader.as_deref().is_none_or(str::is_empty)
            {
                return Err(CoordError::Leaderless.into());
            }
            let mut status: tonic::Status = CoordError::State(StateError::Deposed).into();
            if let Some(v) = leader.and_then(|l| l.parse().ok()) {
                status.metadata_mut().insert(crate::error::LEADER_KEY, v);
            }
            return Err(status);
        }
        let Some(token) = &self.token else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            Ok(req)
        } else {
            Err(CoordError::Unauthenticated.into())
        }
    }
}

impl Coordinator {
    /// Validates `config`, binds, restores state and starts serving. A
    /// replica (etcd state) answers `not_leader` from the moment it is
    /// bound, and returns once it was elected and serves.
    pub async fn start(config: &CoordinatorConfig) -> Result<Self, StartError> {
        let mut config = config.clone();
        config.validate()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let reloading = match &config.tls {
            Some(files) => {
                let pem = files.read()?;
                tracing::info!(identity = %pem.identity, "mutual TLS on the gRPC port: callers need a certificate from the cluster CA");
                // The certificate and CA reload without a restart.
                let reloading = Reloading::new(pem);
                reloading.watch();
                Some(reloading)
            }
            None => None,
        };
        let tls = reloading
            .as_ref()
            .map(|r| r.cached(reload::grpc_server))
            .transpose()?;
        let shutdown = CancellationToken::new();
        let slot = Arc::new(std::sync::OnceLock::new());
        let mut listens = vec![("listen", addr)];
        if let Some(metrics_addr) = config.metrics_listen {
            // From the start, so a standby answers too (as a standby).
            let endpoint = rmem_common::metrics::endpoint::Endpoint::bind(metrics_addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: metrics_addr,
                    source,
                })?;
            listens.push((
                "metrics_listen",
                endpoint.local_addr().map_err(|source| StartError::Bind {
                    addr: metrics_addr,
                    source,
                })?,
            ));
            let serving = slot.clone();
            let task = endpoint.serve(
                reloading
                    .as_ref()
                    .map(|r| r.cached(rmem_common::metrics::endpoint::tls_config))
                    .transpose()?,
                Arc::new(move || metrics::exposition(&serving)),
            );
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                task.abort();
            });
        }
        rmem_common::tls::warn_if_insecure(&listens, tls.is_some());
        let leadership = config.etcd.as_ref().map(|_| Leadership::new());
        let (health, health_service) = tonic_health::server::health_reporter();
        // Until this returns, an error (or the caller giving up on a
        // standby) stops the server again.
        let stop_on_failure = shutdown.clone().drop_guard();
        let server = tokio::spawn(serve(
            listener,
            Service { slot: slot.clone() },
            (health.clone(), health_service),
            Gate {
                token: config.token.as_deref().map(Arc::from),
                leadership: leadership.clone(),
                serving: slot.clone(),
                tls: tls.as_ref().map(|t| t.source().clone()),
            },
            tls,
            shutdown.clone(),
        ));
        // Until it serves, health says so per service (health itself
        // answers SERVING: the process is up).
        set_serving(&health, false).await;
        let mut inspector = None;
        let backend = match (&config.etcd, config.ephemeral) {
            (Some(_), _) => "etcd",
            (None, true) => "memory",
            (None, false) => "log",
        };
        let store: Box<dyn StateStore> = match (&config.etcd, &leadership) {
            (Some(etcd), Some(leadership)) => {
                let options = EtcdOptions {
                    endpoints: etcd.endpoints.clone(),
                    prefix: etcd.prefix.clone(),
                    election_ttl: etcd.election_ttl,
                    advertise: rmem_common::host::reachable(etcd.advertise.as_deref(), addr),
                    tls: EtcdTls::read(etcd)?,
                };
                tracing::info!(%addr, etcd = %options.endpoints.join(","), prefix = %options.prefix, "standing by: campaigning to lead the coordinators");
                let (l, cancel) = (leadership.clone(), shutdown.clone());
                let store =
                    tokio::task::spawn_blocking(move || EtcdStore::lead(&options, l, cancel))
                        .await
                        .map_err(|e| StateError::Io {
                            path: "the etcd thread".into(),
                            source: std::io::Error::other(e.to_string()),
                        })??;
                inspector = Some(store.inspector());
                Box::new(store)
            }
            _ if config.ephemeral => Box::new(MemoryStore::default()),
            _ => Box::new(FileLog::open(&config.state_log())?),
        };
        let cluster = Cluster::open(&config, store)?;
        let deposed = leadership
            .as_ref()
            .map_or_else(CancellationToken::new, Leadership::deposed);
        {
            // A deposed leader stops serving at once: its writes already fail.
            let (deposed, shutdown) = (deposed.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = deposed.cancelled() => {
                        tracing::error!("this coordinator no longer leads: it stops serving");
                        shutdown.cancel();
                    }
                    _ = shutdown.cancelled() => {}
                }
            });
        }
        let shared = Arc::new(Shared {
            cluster: Mutex::new(cluster),
            finished: tokio::sync::watch::channel(0).0,
            default_deadline: config.invalidation_deadline,
            max_deadline: config.max_invalidation_deadline,
            started: Instant::now(),
            shutdown: shutdown.clone(),
            backend,
            etcd: inspector,
        });
        tokio::spawn(expire_leases(
            shared.clone(),
            config.lease,
            config.reap_delay(),
        ));
        slot.set(shared.clone()).expect("set once");
        stop_on_failure.disarm();
        set_serving(&health, true).await;
        tracing::info!(%addr, epoch = shared.lock().epoch(), "coordinator ready");
        Ok(Self {
            addr,
            shutdown,
            server,
            shared,
            deposed,
        })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cancelled when this replica no longer leads (etcd state only): it
    /// has stopped serving.
    pub fn deposed(&self) -> CancellationToken {
        self.deposed.clone()
    }

    /// The model, for embedding and tests.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops serving: open streams end, calls in progress finish.
    /// Calls still running after [`SHUTDOWN_GRACE`] (event streams of
    /// members that cannot be reached) are dropped.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server stopped with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
            Err(_) => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "calls still running after the grace period are dropped");
                self.server.abort();
            }
        }
        tracing::info!("coordinator stopped");
    }
}

/// How long a stopping coordinator lets calls in progress finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Marks lapsed leases down, and reclaims what departed agents left behind.
async fn expire_leases(shared: Arc<Shared>, lease: Duration, reap_after: Duration) {
    let every = (lease / 4).max(Duration::from_millis(25));
    let reaping = Arc::new(Mutex::new(std::collections::HashSet::new()));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let reap = {
            let mut c = shared.lock();
            if !c.leads() {
                // Deposed, or not sure to lead: the successor expires leases.
                continue;
            }
            c.expire_leases();
            c.declare_lapsed_gone();
            if let Err(e) = c.retire_capability_keys() {
                tracing::warn!(error = %rmem_common::error_chain(&e), "cannot retire a capability key yet");
            }
            c.reapable(reap_after)
        };
        for member in reap {
            if !reaping
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(member)
            {
                continue; // already being reaped
            }
            let (shared, reaping) = (shared.clone(), reaping.clone());
            tokio::spawn(async move {
                service::reap(&shared, member).await;
                reaping
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&member);
            });
        }
    }
}

async fn serve(
    listener: TcpListener,
    svc: Service,
    (health, health_service): (
        tonic_health::server::HealthReporter,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ),
    auth: Gate,
    tls: Option<Cached<Arc<rustls::ServerConfig>>>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let stop = async move {
        shutdown.cancelled().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        set_serving(&health, false).await;
    };
    let router = rmem_proto::with_reflection(
        tonic::transport::Server::builder().add_service(health_service),
    )
    .add_service(MembershipServer::with_interceptor(
        svc.clone(),
        auth.clone(),
    ))
    .add_service(PlacementServer::with_interceptor(svc.clone(), auth.clone()))
    .add_service(IntervalsServer::with_interceptor(svc.clone(), auth.clone()))
    .add_service(InvalidationServer::with_interceptor(
        svc.clone(),
        auth.clone(),
    ))
    .add_service(ClusterAdminServer::with_interceptor(svc, auth));
    // With TLS the handshake is made here, with the current (reloadable)
    // certificate; tonic reads the caller's certificate from the stream.
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(
                    reload::incoming(listener, tls, HANDSHAKE_TIMEOUT),
                    stop,
                )
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop,
                )
                .await
        }
    }
}

/// Longest a caller may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Health of the leader-only services: SERVING once this coordinator
/// serves them, NOT_SERVING before (a standby replica) and after it stops.
async fn set_serving(health: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for service in [
        <MembershipServer<Service> as tonic::server::NamedService>::NAME,
        <PlacementServer<Service> as tonic::server::NamedService>::NAME,
        <IntervalsServer<Service> as tonic::server::NamedService>::NAME,
        <InvalidationServer<Service> as tonic::server::NamedService>::NAME,
        <ClusterAdminServer<Service> as tonic::server::NamedService>::NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

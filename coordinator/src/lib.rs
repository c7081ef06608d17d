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
pub mod membership;
pub mod placement;
pub mod service;
pub mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::state::etcd::{EtcdOptions, EtcdStore, Leadership};
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

/// In front of every call: refuses it once this replica may no longer
/// lead (`not_leader`: ask the new leader), and checks `authorization:
/// Bearer TOKEN` when a token is set.
#[derive(Clone, Debug)]
struct Gate {
    token: Option<Arc<str>>,
    leadership: Option<Leadership>,
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        use subtle::ConstantTimeEq;
        if self.leadership.as_ref().is_some_and(|l| !l.holds()) {
            return Err(CoordError::State(StateError::Deposed).into());
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
    /// Validates `config`, restores state, binds and starts serving.
    pub async fn start(config: &CoordinatorConfig) -> Result<Self, StartError> {
        let mut config = config.clone();
        config.validate()?;
        let mut leadership = None;
        let store: Box<dyn StateStore> = if let Some(etcd) = &config.etcd {
            let options = EtcdOptions {
                endpoints: etcd.endpoints.clone(),
                prefix: etcd.prefix.clone(),
                election_ttl: etcd.election_ttl,
                advertise: etcd
                    .advertise
                    .clone()
                    .unwrap_or_else(|| config.listen.to_string()),
            };
            tracing::info!(etcd = %options.endpoints.join(","), prefix = %options.prefix, "campaigning to lead the coordinators");
            let store = tokio::task::spawn_blocking(move || EtcdStore::lead(&options))
                .await
                .map_err(|e| StateError::Io {
                    path: "the etcd thread".into(),
                    source: std::io::Error::other(e.to_string()),
                })??;
            leadership = Some(store.leadership());
            Box::new(store)
        } else if config.ephemeral {
            Box::new(MemoryStore::default())
        } else {
            Box::new(FileLog::open(&config.state_log())?)
        };
        let cluster = Cluster::open(&config, store)?;
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
        let shutdown = CancellationToken::new();
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
        });
        tokio::spawn(expire_leases(
            shared.clone(),
            config.lease,
            config.reap_delay(),
        ));
        let server = tokio::spawn(serve(
            listener,
            Service {
                shared: shared.clone(),
            },
            Gate {
                token: config.token.as_deref().map(Arc::from),
                leadership,
            },
            shutdown.clone(),
        ));
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
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "gRPC server task failed"),
        }
        tracing::info!("coordinator stopped");
    }
}

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
    auth: Gate,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<MembershipServer<Service>>().await;
    health.set_serving::<PlacementServer<Service>>().await;
    health.set_serving::<IntervalsServer<Service>>().await;
    health.set_serving::<InvalidationServer<Service>>().await;
    health.set_serving::<ClusterAdminServer<Service>>().await;
    let stop = {
        let health = health.clone();
        async move {
            shutdown.cancelled().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
    };
    rmem_proto::with_reflection(tonic::transport::Server::builder().add_service(health_service))
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
        .add_service(ClusterAdminServer::with_interceptor(svc, auth))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop,
        )
        .await
}

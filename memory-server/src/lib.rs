//! rmem memory server: stores 4 KiB pages for compute nodes in a memory pool
//! and serves them over the data-plane protocol of [`rmem_proto::wire`].
//!
//! - [`store`]: the pool, per-tenant extents, the index and quotas.
//! - [`transport`]: the TCP data plane and per-client sessions.
//! - [`admin`]: the gRPC admin endpoint (stats, health, reflection).
//! - [`config`]: typed, validated configuration.
//! - [`embedded`]: a server inside another program (demo, benchmarks).
//! - [`membership`]: joining a cluster's coordinator, freeing invalidated
//!   pages.
//!
//! [`Server::start`] runs all of it inside the caller's tokio runtime; the
//! `rmem-server` binary and embedded uses (the demo, tests, benchmarks) go
//! through it.

pub mod admin;
pub mod config;
pub mod embedded;
pub mod membership;
pub mod metrics;
pub mod store;
pub mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rmem_common::capability::Verifier;
use rmem_common::tls::TlsPem;
use rmem_common::tls::reload::{self, Cached, Reloading};
use rmem_proto::wire::Limits;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminService;
use crate::config::{ConfigError, ServerConfig};
use crate::metrics::Metrics;
use crate::store::{Recovery, Store, StoreError};
use crate::transport::admission::{self, Admission};
use crate::transport::session::Shared;
use crate::transport::tcp::{self, Timeouts};

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("admin gRPC server failed")]
    Grpc(#[source] tonic::transport::Error),
    #[error("cannot join the cluster")]
    Cluster(#[source] rmem_client::control::ControlError),
    #[cfg(feature = "rdma")]
    #[error("cannot set up RDMA")]
    Rdma(#[source] transport::rdma::RdmaError),
}

/// A running memory server.
#[derive(Debug)]
pub struct Server {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    data_addr: SocketAddr,
    grpc_addr: SocketAddr,
    shutdown: CancellationToken,
    connections: TaskTracker,
    accept: tokio::task::JoinHandle<()>,
    grpc: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    drain_timeout: Duration,
    membership: Option<membership::Membership>,
    /// `/metrics`: its address and task (aborted at shutdown).
    metrics_endpoint: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still busy when the drain timeout expired.
    pub abandoned_connections: usize,
}

impl Server {
    /// Validates `config`, opens the store, binds both listeners and starts
    /// serving. `default_token` is the credential of the implicit `default`
    /// tenant when the configuration defines no tenants.
    pub async fn start(
        config: &ServerConfig,
        default_token: Option<&str>,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let tls = match &config.tls {
            Some(files) => {
                let pem = files.read()?;
                pem.member_name(
                    rmem_common::identity::Role::Server,
                    "cluster.name",
                    config.cluster.name.as_deref(),
                )?;
                Some(Reloading::new(pem))
            }
            None => None,
        };
        let tenants = config.tenant_specs(default_token)?;
        let opts = config.store_options();
        let store = tokio::task::spawn_blocking(move || Store::open(&opts, &tenants))
            .await
            .expect("store open does not panic")?;
        let store = Arc::new(store);
        log_recovery(&store, config);

        let data = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen,
                what: "data plane",
                source,
            })?;
        let grpc = TcpListener::bind(config.grpc)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.grpc,
                what: "admin gRPC",
                source,
            })?;
        let data_addr = data.local_addr().expect("bound socket has an address");
        let grpc_addr = grpc.local_addr().expect("bound socket has an address");

        let metrics = Arc::new(Metrics::default());
        // A cluster member serves agents only the handles their
        // coordinator-signed capabilities name.
        let capabilities = (!config.cluster.is_standalone())
            .then(|| Arc::new(std::sync::RwLock::new(Verifier::default())));
        let shared = Arc::new(Shared {
            store: store.clone(),
            metrics: metrics.clone(),
            limits: Limits::for_batch(config.max_batch_pages),
            capabilities: capabilities.clone(),
            #[cfg(feature = "rdma")]
            rdma: config
                .rdma
                .then(|| {
                    transport::rdma::RdmaServer::new(store.clone(), config.rdma_device.clone())
                })
                .transpose()
                .map_err(ServerError::Rdma)?,
        });
        #[cfg(feature = "rdma")]
        if let Some(rdma) = &shared.rdma
            && !config.listen.ip().is_unspecified()
        {
            // A specific address: open its device now, so a missing device
            // or address fails the start instead of every client.
            rdma.open(config.listen.ip()).map_err(ServerError::Rdma)?;
        }
        // What the data plane offers, as the coordinator lists it.
        #[cfg_attr(not(feature = "rdma"), allow(unused_mut))]
        let mut transports = vec!["tcp"];
        #[cfg(feature = "rdma")]
        if shared.rdma.is_some() {
            transports.push("rdma");
        }
        let shutdown = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept = tokio::spawn(tcp::serve(
            data,
            shared,
            Timeouts {
                handshake: config.handshake_timeout,
                idle: config.idle_timeout,
                request: config.request_timeout,
                // Half for reading what clients already sent, the rest for
                // answering it.
                drain: config.drain_timeout / 2,
            },
            config.max_connections,
            Admission::new(admission::Limits {
                unauthenticated: config.max_unauthenticated,
                unauthenticated_per_peer: config.max_unauthenticated_per_peer,
            }),
            tls.as_ref()
                .map(|r| r.cached(TlsPem::data_server))
                .transpose()?,
            shutdown.clone(),
            connections.clone(),
        ));
        let admin = AdminService {
            store: store.clone(),
            metrics: metrics.clone(),
        };
        if let Some(r) = &tls {
            tracing::info!(identity = %r.current().identity, "mutual TLS on the data plane and the admin gRPC port: clients need a certificate from the cluster CA");
            r.watch();
        }
        let metrics_endpoint = match config.metrics_listen {
            Some(addr) => {
                let endpoint = rmem_common::metrics::endpoint::Endpoint::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind {
                        addr,
                        what: "metrics",
                        source,
                    })?;
                let addr = endpoint.local_addr().expect("bound socket has an address");
                let (store, metrics) = (store.clone(), metrics.clone());
                let collect: rmem_common::metrics::endpoint::Collect =
                    Arc::new(move || metrics.exposition(&store));
                let tls = tls
                    .as_ref()
                    .map(|r| r.cached(rmem_common::metrics::endpoint::tls_config))
                    .transpose()?;
                Some((addr, endpoint.serve(tls, collect)))
            }
            None => None,
        };
        let mut listens = vec![("listen", data_addr), ("grpc", grpc_addr)];
        listens.extend(
            metrics_endpoint
                .as_ref()
                .map(|(a, _)| ("metrics_listen", *a)),
        );
        rmem_common::tls::warn_if_insecure(&listens, tls.is_some());
        let grpc_tls = tls
            .as_ref()
            .map(|r| r.cached(reload::grpc_server))
            .transpose()?;
        let grpc = tokio::spawn(serve_grpc(
            grpc,
            admin,
            grpc_tls,
            config.handshake_timeout,
            shutdown.clone(),
        ));
        let membership = if config.cluster.is_standalone() {
            None
        } else {
            match membership::Membership::join(
                &config.cluster,
                store.clone(),
                data_addr,
                grpc_addr,
                &transports,
                tls.as_ref().map(|r| (*r.current()).clone()),
                capabilities,
            )
            .await
            {
                Ok(m) => Some(m),
                Err(e) => {
                    shutdown.cancel();
                    return Err(ServerError::Cluster(e));
                }
            }
        };
        tracing::info!(
            data = %data_addr, grpc = %grpc_addr,
            capacity_pages = store.capacity_pages(), persistent = store.persistent(),
            transports = %transports.join(","),
            server_id = format_args!("{:016x}", store.server_id()),
            "memory server ready"
        );
        Ok(Self {
            store,
            metrics,
            data_addr,
            grpc_addr,
            shutdown,
            connections,
            accept,
            grpc,
            drain_timeout: config.drain_timeout,
            membership,
            metrics_endpoint,
        })
    }

    /// The data-plane address actually bound (useful with port 0).
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The admin gRPC address actually bound.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The metrics address actually bound, when metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_endpoint.as_ref().map(|(a, _)| *a)
    }

    /// The page store (for embedded use and stats).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Member id in the cluster, when it joined one.
    pub fn member_id(&self) -> Option<u64> {
        self.membership.as_ref().map(|m| m.member_id())
    }

    /// The server's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops accepting, answers every request already received, closes the
    /// connections, and flushes a file-backed pool.
    pub async fn shutdown(mut self) -> Result<ShutdownReport, ServerError> {
        // Leave the cluster first, so no agent is sent here any more.
        if let Some(m) = self.membership.take() {
            m.leave().await;
        }
        self.shutdown.cancel();
        if let Some((_, task)) = self.metrics_endpoint.take() {
            task.abort();
        }
        let _ = self.accept.await;
        self.connections.close();
        let abandoned =
            match tokio::time::timeout(self.drain_timeout, self.connections.wait()).await {
                Ok(()) => 0,
                Err(_) => self.connections.len(),
            };
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "drain timeout expired with connections still busy"
            );
        }
        match self.grpc.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "admin gRPC server stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "admin gRPC task failed"),
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.close())
            .await
            .expect("store close does not panic")?;
        tracing::info!("memory server stopped");
        Ok(ShutdownReport {
            abandoned_connections: abandoned,
        })
    }
}

fn log_recovery(store: &Store, config: &ServerConfig) {
    if !store.persistent() {
        return;
    }
    let Recovery {
        created,
        clean_shutdown,
        pages_recovered,
        stale_duplicates,
        corrupt_dropped,
        relocated,
        shared_extents,
    } = store.recovery();
    let path = config.pool_file.as_ref().map(|p| p.display().to_string());
    if created {
        tracing::info!(?path, "created pool file");
    } else {
        tracing::info!(
            ?path,
            clean_shutdown,
            pages_recovered,
            stale_duplicates,
            corrupt_dropped,
            relocated,
            shared_extents,
            "recovered pool file"
        );
    }
    if corrupt_dropped > 0 {
        tracing::warn!(
            corrupt_dropped,
            "pages that failed their checksum after an unclean stop were dropped"
        );
    }
    if shared_extents > 0 {
        tracing::error!(
            shared_extents,
            "extents still hold several tenants' pages (no room to move them apart); they are never registered for RDMA"
        );
    }
}

async fn serve_grpc(
    listener: TcpListener,
    admin: AdminService,
    tls: Option<Cached<Arc<rustls::ServerConfig>>>,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    use rmem_proto::admin::v1::server_admin_server::ServerAdminServer;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ServerAdminServer<AdminService>>()
        .await;
    let stop = {
        let health = health.clone();
        async move {
            shutdown.cancelled().await;
            health
                .set_not_serving::<ServerAdminServer<AdminService>>()
                .await;
        }
    };
    let gate = admin::AdminGate {
        tls: tls.as_ref().map(|t| t.source().clone()),
    };
    let router = rmem_proto::with_reflection(
        tonic::transport::Server::builder().add_service(health_service),
    )
    .add_service(admin.into_server(gate));
    // With TLS the handshake is made here, with the current (reloadable)
    // certificate; tonic reads the caller's certificate from the stream.
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(
                    reload::incoming(listener, tls, handshake_timeout),
                    stop,
                )
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(tokio_stream_listener(listener), stop)
                .await
        }
    }
}

fn tokio_stream_listener(listener: TcpListener) -> tokio_stream::wrappers::TcpListenerStream {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}

//! A memory server inside another program, on its own runtime and thread.
//!
//! `rmem-agent demo` and `rmem-bench` use it so that one command shows or
//! measures rmem with no cluster. It is the same [`Server`] the daemon runs,
//! listening on loopback ports the kernel picks.

use std::net::SocketAddr;

use rmem_common::ByteSize;

use crate::config::ServerConfig;
use crate::{Server, ServerError};

/// Why an embedded server could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("cannot start the embedded server's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the embedded memory server")]
    Server(#[source] ServerError),
}

/// A running in-process server; dropping it drains and stops it.
#[derive(Debug)]
pub struct EmbeddedServer {
    data_addr: SocketAddr,
    grpc_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedServer {
    /// Starts a server with an anonymous pool of `capacity` on loopback,
    /// served by `worker_threads` runtime threads.
    pub fn start(capacity: ByteSize, worker_threads: usize) -> Result<Self, EmbeddedError> {
        let cfg = ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
            capacity,
            ..Default::default()
        };
        Self::with_config(&cfg, worker_threads)
    }

    /// Starts a server with any configuration.
    pub fn with_config(cfg: &ServerConfig, worker_threads: usize) -> Result<Self, EmbeddedError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .thread_name("rmem-embedded-server")
            .enable_all()
            .build()
            .map_err(EmbeddedError::Runtime)?;
        let server = runtime
            .block_on(Server::start(cfg, None))
            .map_err(EmbeddedError::Server)?;
        let (data_addr, grpc_addr) = (server.data_addr(), server.grpc_addr());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("rmem-embedded-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = rx.await;
                    if let Err(e) = server.shutdown().await {
                        tracing::warn!(error = %e, "embedded server did not stop cleanly");
                    }
                });
            })
            .map_err(EmbeddedError::Runtime)?;
        Ok(Self {
            data_addr,
            grpc_addr,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Data-plane address (`127.0.0.1:PORT`).
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// Admin gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

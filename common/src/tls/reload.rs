//! Certificates that reload without a restart.
//!
//! A daemon's [`Reloading`] holds the TLS files it was started with and
//! what they held last; [`Reloading::watch`] reads them again every few
//! seconds and takes what changed once it checks out: the CA, certificate
//! and key parse and fit together, and the certificate names the same
//! member (a reload renews a member's certificate or rotates the CA, it
//! never makes the daemon someone else). Anything else is logged and the
//! old files stay in use. What is built from the files (the rustls
//! configurations) is rebuilt on the next handshake after a change, so
//! new connections use the new certificate and CA while connections
//! already made go on, unless the new CRLs revoke their peer (see
//! [`super::revocation`]: they are told of each change).
//!
//! Servers of gRPC (the coordinator, a memory server's admin port) accept
//! through [`incoming`]: the handshake runs here, with the current
//! configuration, and tonic serves the TLS streams (reading the peer's
//! certificate from them as it does with its own TLS).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use rustls::pki_types::CertificateDer;

use super::revocation::{CrlPolicy as _, PeerRefused, Revoked};
use super::{TlsFiles, TlsPem};
use crate::config::ConfigError;

/// How often the files are read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// A member's TLS files and their current contents.
#[derive(Debug)]
pub struct Reloading {
    files: TlsFiles,
    current: RwLock<Arc<TlsPem>>,
    /// What `current`'s CRL file revokes.
    revoked: RwLock<Arc<Revoked>>,
    /// Bumped on every change taken.
    generation: AtomicU64,
    /// Told each new generation (connections check their peer again).
    changes: tokio::sync::watch::Sender<u64>,
}

impl Reloading {
    /// Starts from `pem` (checked by the caller), reading its files again.
    pub fn new(pem: TlsPem) -> Arc<Self> {
        // The caller built its configurations from `pem`, which read the
        // CRLs already.
        let revoked = pem.revoked().unwrap_or_default();
        Arc::new(Self {
            files: pem.files.clone(),
            current: RwLock::new(Arc::new(pem)),
            revoked: RwLock::new(Arc::new(revoked)),
            generation: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Told the generation each time a change is taken.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether a peer whose chain was verified at its handshake still
    /// opens a connection: its certificate is neither revoked by the
    /// current CRLs nor expired.
    pub fn check_peer(&self, cert: &CertificateDer<'_>) -> Result<(), PeerRefused> {
        let revoked = self
            .revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        revoked.check(cert, std::time::SystemTime::now())
    }

    /// What the files held at the last change taken.
    pub fn current(&self) -> Arc<TlsPem> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes taken so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the files; takes them if they changed and check out. `Ok(true)`
    /// when a change was taken.
    pub fn check(&self) -> Result<bool, ConfigError> {
        let new = self.files.read()?;
        let old = self.current();
        if new == *old {
            return Ok(false);
        }
        if new.identity != old.identity {
            return Err(crate::config::invalid(
                "tls.cert_file",
                format!(
                    "the new certificate names {}, this daemon runs as {}: a reload renews a certificate, it never changes who the daemon is (restart it for that)",
                    new.identity, old.identity
                ),
            ));
        }
        // Both configurations build: the key fits the certificate, the CA
        // file holds CAs.
        new.data_server()?;
        new.data_client()?;
        let revoked = new.revoked()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        *self.revoked.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(revoked);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.changes.send_replace(generation);
        Ok(true)
    }

    /// Checks the files every [`RELOAD_EVERY`] while the runtime runs and
    /// someone uses them, logging what it takes and what it refuses (once
    /// per refused state).
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut refused: Option<String> = None;
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                let Some(me) = weak.upgrade() else {
                    return;
                };
                let r = {
                    let me = me.clone();
                    tokio::task::spawn_blocking(move || me.check()).await
                };
                match r {
                    Ok(Ok(true)) => {
                        refused = None;
                        tracing::info!(identity = %me.current().identity, generation = me.generation(), "reloaded the TLS files: new connections use them");
                    }
                    Ok(Ok(false)) => refused = None,
                    Ok(Err(e)) => {
                        let why = crate::error_chain(&e);
                        if refused.as_deref() != Some(&why) {
                            tracing::error!(error = %why, "the TLS files changed but cannot be used: keeping the ones in use");
                            refused = Some(why);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "checking the TLS files failed"),
                }
            }
        })
    }

    /// A rustls configuration built from the current files by `build`,
    /// kept until they change.
    pub fn cached<T: Clone>(
        self: &Arc<Self>,
        build: impl Fn(&TlsPem) -> Result<T, ConfigError> + Send + Sync + 'static,
    ) -> Result<Cached<T>, ConfigError> {
        let value = build(&self.current())?;
        Ok(Cached {
            source: self.clone(),
            build: Arc::new(build),
            last: Arc::new(Mutex::new((self.generation(), value))),
        })
    }
}

/// Something built from a [`Reloading`]'s files, rebuilt when they change.
#[derive(Clone)]
pub struct Cached<T> {
    source: Arc<Reloading>,
    #[allow(clippy::type_complexity)]
    build: Arc<dyn Fn(&TlsPem) -> Result<T, ConfigError> + Send + Sync>,
    last: Arc<Mutex<(u64, T)>>,
}

impl<T> std::fmt::Debug for Cached<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl<T: Clone> Cached<T> {
    /// The files it is built from.
    pub fn source(&self) -> &Arc<Reloading> {
        &self.source
    }

    /// The value for the current files (rebuilt once after a change; a
    /// build that fails keeps the last value, which the check had already
    /// proved buildable).
    pub fn get(&self) -> T {
        let generation = self.source.generation();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.0 != generation {
            match (self.build)(&self.source.current()) {
                Ok(v) => *last = (generation, v),
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "cannot build TLS from the reloaded files: keeping the last");
                    last.0 = generation;
                }
            }
        }
        last.1.clone()
    }
}

/// The rustls configuration of a gRPC server: as the data plane's, with
/// HTTP/2 negotiated.
pub fn grpc_server(pem: &TlsPem) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let mut config = (*pem.data_server()?).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The rustls configuration of a member's gRPC client: the coordinator's
/// certificate checked against the cluster CA and the host name dialled
/// (as tonic's own TLS checks it), the member's certificate offered, HTTP/2
/// negotiated.
pub fn grpc_client(pem: &TlsPem) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    use super::data::{chain, key, roots, tls_error};
    let provider = super::data::provider();
    let revoked = pem.revoked()?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(pem)?, provider.clone())
            .with_policy(&revoked)
            .build()
            .map_err(|e| crate::config::invalid("tls.ca_file", e.to_string()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("tls", e))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain(pem)?, key(pem)?)
        .map_err(|e| tls_error("tls.key_file", e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TLS connections accepted on `listener`, each handshake made with the
/// current configuration in a task of its own (a slow or silent peer holds
/// up no one) within `handshake_timeout`. Failed handshakes are logged and
/// dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Cached<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // Ends, closing the listener, once the server stops taking
            // connections.
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (tx, acceptor) = (tx.clone(), tokio_rustls::TlsAcceptor::from(tls.get()));
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

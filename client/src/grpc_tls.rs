//! Mutual TLS to the coordinator with certificates that reload: tonic's
//! channels connect through [`Connector`], which makes each TCP connection
//! and its TLS handshake with the member's current configuration (the
//! cluster CA checks the coordinator's certificate against the host name
//! dialled, as tonic's own TLS does; the member's certificate identifies
//! it). A renewed certificate is used from the next connection on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rmem_common::tls::reload::Cached;
use tokio::net::TcpStream;
use tonic::transport::Uri;

/// A tower service that opens TLS connections for tonic.
#[derive(Clone)]
pub struct Connector {
    tls: Cached<Arc<rustls::ClientConfig>>,
    timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Connects with `tls`'s current configuration.
    pub fn new(tls: Cached<Arc<rustls::ClientConfig>>) -> Self {
        Self {
            tls,
            timeout: Duration::from_secs(10),
        }
    }

    /// The same, giving up on a connection and its handshake after
    /// `timeout`.
    pub fn within(&self, timeout: Duration) -> Self {
        Self {
            tls: self.tls.clone(),
            timeout,
        }
    }
}

type Io = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<Uri> for Connector {
    type Response = Io;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Io, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (config, timeout) = (self.tls.get(), self.timeout);
        Box::pin(async move {
            let bad = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: {what}"))
            };
            let host = uri.host().ok_or_else(|| bad("no host"))?.to_string();
            let port = uri.port_u16().unwrap_or(443);
            // An IPv6 literal comes bracketed in a URI, not in a name.
            let bare = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let name = rustls::pki_types::ServerName::try_from(bare.clone())
                .map_err(|_| bad("not a host name or address"))?;
            let connect = async {
                let tcp = TcpStream::connect((bare.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
            };
            tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{uri}: connecting timed out"),
                    )
                })?
                .map(TokioIo::new)
        })
    }
}

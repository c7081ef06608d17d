//! The `/metrics` endpoint: HTTP/1.1 on its own port (`--metrics-listen`),
//! plain on loopback, HTTPS with mutual TLS wherever the daemon has TLS.
//!
//! With TLS, the scraper shows a certificate of the cluster CA whose role
//! is `monitor` (or `admin`); any other member is answered 403, since the
//! metrics name tenants and their use. Certificates are checked against
//! the current CRL and their expiry on every connection, as the daemon's
//! other ports do. A daemon listening for metrics beyond loopback with no
//! TLS refuses to start unless `--insecure`, like its other ports
//! ([`crate::tls::check_exposure`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use super::Exposition;
use crate::config::ConfigError;
use crate::identity::Role;
use crate::tls::TlsPem;
use crate::tls::reload::Cached;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a scrape reads: the daemon's metrics at this moment.
pub type Collect = Arc<dyn Fn() -> Exposition + Send + Sync>;

/// The rustls configuration of the endpoint: the daemon's certificate, a
/// client certificate of the cluster CA required, HTTP/1.1 negotiated.
pub fn tls_config(pem: &TlsPem) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let mut config = (*pem.data_server()?).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why a scraper is refused, or `None` when its certificate may read.
fn refusal(
    tls: &Cached<Arc<rustls::ServerConfig>>,
    certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
) -> Option<String> {
    if let Some(cert) = certs.and_then(|c| c.first())
        && let Err(e) = tls.source().check_peer(cert)
    {
        return Some(e.to_string());
    }
    match crate::tls::data::peer_identity(certs) {
        Ok(id) if matches!(id.role, Role::Monitor | Role::Admin) => None,
        Ok(id) => Some(format!(
            "the certificate names {id}: metrics are for monitors and admins (rmemctl pki issue --role monitor --name NAME)"
        )),
        Err(e) => Some(format!("no identity: {e}")),
    }
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    collect: Collect,
    refused: Option<Arc<str>>,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if let Some(why) = refused {
        return response(StatusCode::FORBIDDEN, TEXT, format!("{why}\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = response(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n".into());
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match req.uri().path() {
        // Off the runtime's workers: reading a large region's page states
        // takes a while.
        "/metrics" => match tokio::task::spawn_blocking(move || collect().encode()).await {
            Ok(text) => response(StatusCode::OK, CONTENT_TYPE, text),
            Err(e) => {
                tracing::error!(error = %e, "collecting the metrics failed");
                response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    "collecting the metrics failed\n".into(),
                )
            }
        },
        "/" => response(StatusCode::OK, TEXT, "rmem metrics: GET /metrics\n".into()),
        _ => response(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: GET /metrics\n".into(),
        ),
    }
}

/// Most connections served at once; more are closed at accept (a scraper
/// needs one per daemon).
const MAX_CONNECTIONS: usize = 64;

/// A connection is closed after this long whatever it does (a peer that
/// sends requests and never reads the answers holds nothing for longer).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves one connection (plain or TLS) until the peer closes it, or for
/// [`CONNECTION_LIFETIME`]. A refused peer gets its 403 and the connection
/// closes.
async fn connection<S>(stream: S, collect: Collect, refused: Option<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let keep_alive = refused.is_none();
    let refused: Option<Arc<str>> = refused.map(Arc::from);
    let service = hyper::service::service_fn(move |req| {
        let (collect, refused) = (collect.clone(), refused.clone());
        async move { Ok::<_, Infallible>(answer(req, collect, refused).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(keep_alive)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended"),
        Err(_) => tracing::debug!("metrics connection closed after its lifetime"),
        Ok(Ok(())) => {}
    }
}

/// Serves `stream` in a task of its own if a connection slot is free.
fn admit<S>(
    slots: &Arc<tokio::sync::Semaphore>,
    stream: S,
    collect: &Collect,
    refused: Option<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match slots.clone().try_acquire_owned() {
        Ok(slot) => {
            let collect = collect.clone();
            tokio::spawn(async move {
                connection(stream, collect, refused).await;
                drop(slot);
            });
        }
        Err(_) => tracing::debug!("metrics connection refused: too many open"),
    }
}

/// A bound metrics endpoint.
#[derive(Debug)]
pub struct Endpoint {
    listener: TcpListener,
}

impl Endpoint {
    /// Binds `addr` (say what failed: the port is the operator's choice).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen for metrics on {addr}: {e}"),
            )
        })?;
        Ok(Self { listener })
    }

    /// The address it listens on (the port chosen when 0 was asked).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves scrapes until the task is aborted: over HTTPS with mutual
    /// TLS when `tls` is given, plain HTTP otherwise.
    pub fn serve(
        self,
        tls: Option<Cached<Arc<rustls::ServerConfig>>>,
        collect: Collect,
    ) -> tokio::task::JoinHandle<()> {
        if let Ok(addr) = self.local_addr() {
            tracing::info!(%addr, tls = tls.is_some(), "serving metrics on /metrics");
        }
        let listener = self.listener;
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            match tls {
                Some(tls) => {
                    let mut incoming = crate::tls::reload::incoming(
                        listener,
                        tls.clone(),
                        Duration::from_secs(10),
                    );
                    while let Some(stream) = incoming.next().await {
                        let Ok(stream) = stream else { continue };
                        let refused = refusal(&tls, stream.get_ref().1.peer_certificates());
                        if let Some(why) = &refused {
                            tracing::warn!(reason = %why, "metrics scrape refused");
                        }
                        admit(&slots, stream, &collect, refused);
                    }
                }
                None => loop {
                    match listener.accept().await {
                        Ok((stream, _)) => admit(&slots, stream, &collect, None),
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed on the metrics port");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                },
            }
        })
    }
}

/// A metrics endpoint served by a thread of its own, for a program with no
/// async runtime (the demo). Dropping it stops the endpoint.
#[derive(Debug)]
pub struct Background {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Binds `addr` and serves scrapes (over mutual TLS with `tls`, as
    /// [`Endpoint::serve`]).
    pub fn start(
        addr: SocketAddr,
        tls: Option<&TlsPem>,
        collect: Collect,
    ) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let endpoint = rt.block_on(Endpoint::bind(addr))?;
        let addr = endpoint.local_addr()?;
        let tls = tls
            .map(|pem| {
                let files = crate::tls::reload::Reloading::new(pem.clone());
                // Certificates and CRLs reload as on the daemons' ports.
                let _in_runtime = rt.enter();
                files.watch();
                files.cached(tls_config)
            })
            .transpose()
            .map_err(std::io::Error::other)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rmem-metrics".into())
            .spawn(move || {
                rt.block_on(async move {
                    let task = endpoint.serve(tls, collect);
                    let _ = stopped.await;
                    task.abort();
                });
            })?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

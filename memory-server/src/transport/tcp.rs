//! The TCP data plane.
//!
//! One task per connection reads whatever bytes are available, executes
//! every complete frame in the buffer, and writes all their responses with
//! one syscall. A lone request costs one read and one write; a pipelined
//! burst is answered in a batch. There is no queue between reading and
//! executing, so a client that stops reading its responses stops being read
//! (TCP flow control is the backpressure), and memory per connection is
//! bounded by one frame plus [`FLUSH_AT`] bytes of responses.
//!
//! On shutdown a connection keeps reading while its client's bytes keep
//! arriving (gaps under 100 ms, for at most [`Timeouts::drain`]), so
//! requests sent before the signal but still in socket buffers are answered
//! too; then it sends `shutting_down` and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rmem_common::identity::{Identity, Role};
use rmem_common::tls::reload::{Cached, Reloading};
use rmem_proto::wire::{self, ErrorCode, HEADER_LEN, Opcode};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::admission::{Admission, Ticket};
use super::session::{Fatal, Session, Shared};

/// Responses are written once this many bytes are pending, even if more
/// complete requests are buffered.
pub const FLUSH_AT: usize = 1 << 20;
/// How often a quiet RDMA session's loop wakes; such a session is never
/// closed for being idle (TCP keepalive finds a dead client).
const RDMA_QUIET_CHECK: Duration = Duration::from_secs(3600);

/// Bytes read per syscall when no frame is partially received.
const READ_CHUNK: usize = 64 << 10;
/// While draining for shutdown, a connection keeps reading as long as its
/// client's bytes keep coming with gaps shorter than this: requests already
/// sent (still in socket buffers or in flight) are answered.
const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// Timeouts of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// The whole HELLO / HELLO_OK exchange, from accept.
    pub handshake: Duration,
    /// No request at all.
    pub idle: Duration,
    /// The rest of a frame, from its first byte.
    pub request: Duration,
    /// On shutdown, the longest a connection keeps reading requests its
    /// client already sent; answering them is bounded by the server's
    /// drain timeout.
    pub drain: Duration,
}

/// A connection's byte stream: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The first byte of a TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Accepts connections until `shutdown` fires; each runs on `tracker`.
/// With `tls`, every connection is mutual TLS: the client's certificate
/// must come from the cluster CA and name an agent or an admin. The
/// configuration is taken afresh for each connection: reloaded
/// certificates apply to the next handshake.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    timeouts: Timeouts,
    max_connections: u32,
    admission: Arc<Admission>,
    tls: Option<Cached<Arc<rustls::ServerConfig>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = &shared.metrics;
        metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        // Counted here, not in the connection's task, so that a burst of
        // connections cannot all pass the check before any task runs.
        if metrics.connections_open.load(Ordering::Relaxed) >= u64::from(max_connections) {
            tracing::warn!(%peer, max_connections, "connection refused: too many connections");
            if tls.is_none() {
                tracker.spawn(refuse(stream, ErrorCode::Busy, "too many connections"));
            }
            continue;
        }
        let ticket = match admission.admit(peer.ip()) {
            Ok(t) => t,
            Err(why) => {
                metrics.admissions_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "connection refused: {why}");
                // Over TLS a plaintext answer would not be understood, and
                // a handshake costs what the caps are there to save.
                if tls.is_none() {
                    tracker.spawn(refuse(stream, ErrorCode::Busy, why.to_string()));
                }
                continue;
            }
        };
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = tune(&stream) {
            tracing::debug!(%peer, error = %e, "cannot set socket options");
        }
        let mut session = Session::new(shared.clone());
        if let Ok(local) = stream.local_addr() {
            session.set_local_ip(local.ip());
        }
        let span = tracing::info_span!("conn", %peer);
        let acceptor = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.get()));
        let reload = tls.as_ref().map(|t| t.source().clone());
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let (stream, identity, peer_cert) = match acceptor {
                    None => (Box::new(stream) as Box<dyn Io>, None, None),
                    Some(acceptor) => {
                        match tls_handshake(stream, &acceptor, timeouts.handshake).await {
                            Ok((stream, identity, cert)) => (stream, Some(identity), Some(cert)),
                            Err(why) => {
                                tracing::warn!(%peer, "connection refused: {why}");
                                let mut ticket = ticket;
                                ticket.failed();
                                let m = &session.shared().metrics;
                                m.connections_open.fetch_sub(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                };
                let peer_check = peer_cert.zip(reload).map(|(cert, reload)| PeerCheck {
                    // Past its end by a second, so the check sees it expired.
                    expires: rmem_common::tls::revocation::not_after(&cert).map(|t| {
                        let left = t
                            .duration_since(std::time::SystemTime::now())
                            .unwrap_or(Duration::ZERO);
                        Instant::now() + left + Duration::from_secs(1)
                    }),
                    changes: reload.changes(),
                    reload,
                    cert,
                });
                let conn = Connection {
                    stream,
                    peer,
                    identity,
                    peer_check,
                    session,
                    inbuf: BytesMut::with_capacity(READ_CHUNK),
                    outbuf: Vec::with_capacity(READ_CHUNK),
                    timeouts,
                    frame_deadline: None,
                    shutdown,
                    ticket,
                };
                conn.run().await
            }
            .instrument(span),
        );
    }
}

/// Accepts TLS on `stream` within `limit`: the client's certificate chain
/// was verified by rustls; its identity and certificate are returned. A
/// client speaking plaintext is told so in the protocol it speaks.
async fn tls_handshake(
    stream: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    limit: Duration,
) -> Result<(Box<dyn Io>, Identity, CertificateDer<'static>), String> {
    let handshake = async {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await.map_err(|e| e.to_string())? == 1
            && first[0] != TLS_HANDSHAKE_RECORD
        {
            refuse(
                stream,
                ErrorCode::AuthFailed,
                "this server requires TLS: connect with a certificate from the cluster CA (--tls-ca, --tls-cert, --tls-key)",
            )
            .await;
            return Err("plaintext on the TLS data port".to_string());
        }
        let tls = acceptor
            .accept(stream)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let certs = tls.get_ref().1.peer_certificates();
        let identity = rmem_common::tls::data::peer_identity(certs)
            .map_err(|e| format!("client certificate: {e}"))?;
        let cert = certs
            .and_then(|c| c.first())
            .expect("an identity was read from it")
            .clone()
            .into_owned();
        Ok((Box::new(tls) as Box<dyn Io>, identity, cert))
    };
    tokio::time::timeout(limit, handshake)
        .await
        .map_err(|_| "TLS handshake timeout".to_string())?
}

fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10)),
    )
}

async fn refuse(mut stream: TcpStream, code: ErrorCode, message: impl AsRef<str>) {
    let message = message.as_ref();
    let mut buf = Vec::new();
    wire::encode_error(&mut buf, 0, code, message);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
}

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// The client closed it.
    Closed,
    /// The client broke the protocol, failed to authenticate or timed out.
    Fatal(Fatal),
    /// The server is shutting down.
    Drained,
    Io(std::io::Error),
}

/// A TLS client's certificate, checked again while its connection lasts:
/// when the TLS files reload (a new CRL may revoke it) and when it expires.
struct PeerCheck {
    cert: CertificateDer<'static>,
    /// When to check its expiry (None: it cannot be read; the handshake
    /// checked it).
    expires: Option<Instant>,
    reload: Arc<Reloading>,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl PeerCheck {
    /// Until the TLS files change (a new CRL may revoke the peer).
    async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            // The files are no longer watched: nothing will change.
            std::future::pending::<()>().await
        }
    }

    /// Checks the certificate now. Called at its expiry too, which is
    /// then moved a minute on: should the clock disagree, the check comes
    /// again later, never in a spin.
    fn check(&mut self, expired: bool) -> Result<(), End> {
        if expired {
            self.expires = Some(Instant::now() + Duration::from_secs(60));
        }
        self.reload.check_peer(&self.cert).map_err(|why| {
            End::Fatal(Fatal {
                code: ErrorCode::AuthFailed,
                message: format!("{why}: this connection is closed"),
                request_id: 0,
            })
        })
    }
}

struct Connection {
    stream: Box<dyn Io>,
    peer: SocketAddr,
    /// Whom the client's certificate names (with TLS).
    identity: Option<Identity>,
    peer_check: Option<PeerCheck>,
    session: Session,
    inbuf: BytesMut,
    outbuf: Vec<u8>,
    timeouts: Timeouts,
    /// When the frame partly in `inbuf` must be complete: set when its
    /// first bytes arrive, cleared when it is executed.
    frame_deadline: Option<Instant>,
    shutdown: CancellationToken,
    /// Its place among the unauthenticated connections, until HELLO.
    ticket: Ticket,
}

impl Connection {
    /// Serves the connection; it was counted open when accepted.
    async fn run(mut self) {
        let metrics = self.session.shared().metrics.clone();
        if let Some(id) = &self.identity {
            self.session.set_identity(id.clone());
        }
        let end = match &self.identity {
            Some(id) if !matches!(id.role, Role::Agent | Role::Admin) => End::Fatal(Fatal {
                code: ErrorCode::AuthFailed,
                message: format!(
                    "the certificate names {id}: only agents and admins may use the data plane"
                ),
                request_id: 0,
            }),
            _ => self.serve().await,
        };
        if let End::Fatal(f) = &end
            && f.code == ErrorCode::AuthFailed
        {
            self.ticket.failed();
        }
        metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
        let tenant = self.session.tenant().map(|t| t.name.clone());
        match end {
            End::Closed => tracing::debug!(?tenant, "connection closed by client"),
            End::Drained => tracing::debug!(?tenant, "connection drained for shutdown"),
            End::Io(e) => tracing::debug!(?tenant, error = %e, "connection lost"),
            End::Fatal(f) => {
                tracing::warn!(
                    peer = %self.peer, identity = ?self.identity.as_ref().map(ToString::to_string),
                    ?tenant, code = %f.code, request_id = f.request_id,
                    "closing connection: {}", f.message
                );
                // After the answers to the requests executed before it.
                wire::encode_error(&mut self.outbuf, f.request_id, f.code, &f.message);
                let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }

    /// Writes the pending responses. A client that takes none of them for
    /// the request timeout is gone or stuck: the connection ends rather
    /// than hold its slot (and its buffers) forever.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.outbuf.is_empty() {
            let limit = self.timeouts.request;
            let mut written = 0;
            while written < self.outbuf.len() {
                match tokio::time::timeout(limit, self.stream.write(&self.outbuf[written..])).await
                {
                    Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(Ok(n)) => written += n,
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the client took no response for the request timeout",
                        ));
                    }
                }
            }
            self.outbuf.clear();
        }
        Ok(())
    }

    /// Executes every complete frame in the input buffer.
    async fn execute_buffered(&mut self) -> Result<(), End> {
        loop {
            let max = self.session.max_frame();
            let consumed = match wire::split_frame(&self.inbuf, max) {
                Ok(Some((header, payload, _))) => {
                    let blocking = header.opcode == Opcode::Put
                        && self.session.shared().store_syncs()
                        && can_block_in_place();
                    let result = if blocking {
                        tokio::task::block_in_place(|| {
                            self.session.handle(&header, payload, &mut self.outbuf)
                        })
                    } else {
                        self.session.handle(&header, payload, &mut self.outbuf)
                    };
                    result.map_err(End::Fatal)?;
                    HEADER_LEN + payload.len()
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.session
                        .shared()
                        .metrics
                        .protocol_errors
                        .fetch_add(1, Ordering::Relaxed);
                    let request_id = self
                        .inbuf
                        .get(8..16)
                        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .unwrap_or(0);
                    return Err(End::Fatal(Fatal {
                        code: e.error_code(),
                        message: e.to_string(),
                        request_id,
                    }));
                }
            };
            self.inbuf.advance(consumed);
            self.frame_deadline = None;
            if self.outbuf.len() >= FLUSH_AT {
                self.flush().await.map_err(End::Io)?;
            }
        }
    }

    async fn serve(&mut self) -> End {
        let handshake_deadline = Instant::now() + self.timeouts.handshake;
        // Set once shutdown is requested: until when requests are still read.
        let mut draining: Option<Instant> = None;
        loop {
            let result = self.execute_buffered().await;
            if self.session.tenant().is_some() {
                self.ticket.authenticated();
            }
            if let Err(end) = result {
                return end;
            }
            if let Err(e) = self.flush().await {
                return End::Io(e);
            }
            // Make room for the rest of a partly received frame, or a chunk.
            let want = match self.inbuf.get(..4) {
                Some(len) if self.inbuf.len() >= HEADER_LEN => {
                    HEADER_LEN + u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize
                }
                _ => READ_CHUNK,
            };
            self.inbuf
                .reserve(want.saturating_sub(self.inbuf.len()).max(4096));

            let now = Instant::now();
            let (deadline, what) = if let Some(until) = draining {
                ((now + DRAIN_QUIET).min(until), "drain")
            } else if self.session.tenant().is_none() {
                (handshake_deadline, "handshake")
            } else if self.inbuf.is_empty() && self.session.has_rdma() {
                // GETs over the queue pair send nothing here: a quiet
                // control channel is not an idle client. TCP keepalive
                // still finds a dead one.
                (now + RDMA_QUIET_CHECK, "rdma-quiet")
            } else if self.inbuf.is_empty() {
                (now + self.timeouts.idle, "idle")
            } else {
                // Armed by the frame's first bytes, not re-armed by each
                // read: a client dripping a frame cannot hold the
                // connection open.
                let request = self.timeouts.request;
                (*self.frame_deadline.get_or_insert(now + request), "request")
            };
            // The client certificate's expiry shares the one timer of the
            // pass (armed once per pass, as the deadline is).
            let (deadline, what) = match self.peer_check.as_ref().and_then(|c| c.expires) {
                Some(at) if at < deadline => (at, "certificate-expiry"),
                _ => (deadline, what),
            };
            let files_changed = async {
                match &mut self.peer_check {
                    Some(c) => c.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = files_changed => {
                    if let Some(c) = &mut self.peer_check
                        && let Err(end) = c.check(false)
                    {
                        return end;
                    }
                },
                _ = self.shutdown.cancelled(), if draining.is_none() => {
                    // Keep answering what the client already sent.
                    draining = Some(Instant::now() + self.timeouts.drain);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if what == "certificate-expiry" {
                        if let Some(c) = &mut self.peer_check
                            && let Err(end) = c.check(true)
                        {
                            return end;
                        }
                        continue;
                    }
                    if draining.is_some() {
                        // Every complete request has been answered; a
                        // partly received one is dropped and the client
                        // retries.
                        wire::encode_error(
                            &mut self.outbuf, 0, ErrorCode::ShuttingDown, "server is shutting down",
                        );
                        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
                        return End::Drained;
                    }
                    if what == "rdma-quiet" {
                        continue;
                    }
                    return End::Fatal(Fatal {
                        code: ErrorCode::Timeout,
                        message: format!("{what} timeout"),
                        request_id: 0,
                    });
                }
                r = self.stream.read_buf(&mut self.inbuf) => match r {
                    Ok(0) => {
                        return if self.inbuf.is_empty() {
                            End::Closed
                        } else {
                            End::Io(std::io::ErrorKind::UnexpectedEof.into())
                        };
                    }
                    Ok(_) => {}
                    Err(e) => return End::Io(e),
                },
            }
        }
    }
}

fn can_block_in_place() -> bool {
    tokio::runtime::Handle::try_current()
        .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        .unwrap_or(false)
}

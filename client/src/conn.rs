//! A pipelined async connection: any number of tasks send requests on it at
//! once; a reader task matches responses to requests by id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use rmem_proto::wire::{
    self, ErrorCode, FrameHeader, HEADER_LEN, HelloOk, Limits, Opcode, Page, PageStatus, Response,
    Stat,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// The halves of a connection's stream: plain TCP or TLS over it.
type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

use crate::{ClientConfig, ClientError, frame};

/// Why the connection died, kept to answer every request that was waiting.
#[derive(Debug, Clone)]
enum Death {
    Closed,
    Io(std::io::ErrorKind, String),
    Rejected(ErrorCode, String),
    Protocol(wire::DecodeError),
}

impl Death {
    fn to_error(&self, addr: &str) -> ClientError {
        let addr = addr.to_string();
        match self.clone() {
            Death::Closed => ClientError::Closed { addr },
            Death::Io(kind, msg) => ClientError::Io {
                addr,
                source: std::io::Error::new(kind, msg),
            },
            Death::Rejected(code, message) => ClientError::Rejected {
                addr,
                code,
                message,
            },
            Death::Protocol(source) => ClientError::Protocol { addr, source },
        }
    }
}

type Reply = Result<(FrameHeader, Bytes), Death>;

#[derive(Debug)]
struct Pending {
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
    death: Option<Death>,
}

struct Inner {
    addr: String,
    writer: tokio::sync::Mutex<WriteHalf>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    hello: HelloOk,
    dead: AtomicBool,
    timeout: std::time::Duration,
    /// Capabilities to present, the tenant whose they must be, and the
    /// generation last presented (read and written under `writer`).
    caps: Option<Arc<crate::Capabilities>>,
    tenant: String,
    caps_presented: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("addr", &self.addr)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn die(&self, death: Death) {
        let waiters = {
            let mut p = self.pending.lock().expect("pending lock");
            if p.death.is_none() {
                p.death = Some(death.clone());
            }
            self.dead.store(true, Ordering::Release);
            std::mem::take(&mut p.waiters)
        };
        for (_, tx) in waiters {
            let _ = tx.send(Err(death.clone()));
        }
    }

    fn forget(&self, id: u64) {
        self.pending
            .lock()
            .expect("pending lock")
            .waiters
            .remove(&id);
    }
}

/// A pipelined connection to a memory server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: Arc<Inner>,
    _reader: Arc<ReaderTask>,
}

#[derive(Debug)]
struct ReaderTask(tokio::task::JoinHandle<()>);

impl Drop for ReaderTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Marks the connection dead if a write is abandoned half-way (the caller's
/// future was dropped), because the stream then holds a partial frame.
struct WriteGuard<'a> {
    inner: &'a Inner,
    done: bool,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.inner.die(Death::Closed);
        }
    }
}

impl Connection {
    /// Connects and performs the handshake.
    pub async fn connect(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            addr: cfg.addr.clone(),
            source,
        };
        let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&cfg.addr))
            .await
            .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        let (mut rd, mut wr): (ReadHalf, WriteHalf) = match &cfg.tls {
            None => {
                let (rd, wr) = stream.into_split();
                (Box::new(rd), Box::new(wr))
            }
            Some(tls) => {
                let fail = |message: String| ClientError::Tls {
                    addr: cfg.addr.clone(),
                    message,
                };
                let connector = tokio_rustls::TlsConnector::from(tls.config.get());
                let name = rmem_common::tls::data::server_name(&cfg.addr);
                let stream =
                    tokio::time::timeout(cfg.connect_timeout, connector.connect(name, stream))
                        .await
                        .map_err(|_| fail("the handshake timed out".into()))?
                        .map_err(|e| fail(e.to_string()))?;
                tls.check(&cfg.addr, stream.get_ref().1.peer_certificates())?;
                let (rd, wr) = tokio::io::split(stream);
                (Box::new(rd), Box::new(wr))
            }
        };
        let handshake = async {
            wr.write_all(&frame::hello(cfg)).await?;
            wr.flush().await?;
            let mut head = [0u8; HEADER_LEN];
            rd.read_exact(&mut head).await?;
            Ok::<_, std::io::Error>(head)
        };
        let head = tokio::time::timeout(cfg.connect_timeout, handshake)
            .await
            .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect_err)?;
        let header = FrameHeader::decode(&head, frame::HANDSHAKE_MAX_FRAME).map_err(|source| {
            ClientError::Protocol {
                addr: cfg.addr.clone(),
                source,
            }
        })?;
        let mut payload = vec![0u8; header.len as usize];
        tokio::time::timeout(cfg.connect_timeout, rd.read_exact(&mut payload))
            .await
            .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect_err)?;
        let hello = frame::hello_ok(&cfg.addr, &header, &payload)?;
        let inner = Arc::new(Inner {
            addr: cfg.addr.clone(),
            writer: tokio::sync::Mutex::new(wr),
            pending: Mutex::new(Pending {
                waiters: HashMap::new(),
                death: None,
            }),
            next_id: AtomicU64::new(1),
            hello,
            dead: AtomicBool::new(false),
            timeout: cfg.request_timeout,
            caps: cfg.capabilities.clone(),
            tenant: cfg.tenant.clone(),
            caps_presented: AtomicU64::new(0),
        });
        let reader = tokio::spawn(read_loop(rd, inner.clone()));
        Ok(Self {
            inner,
            _reader: Arc::new(ReaderTask(reader)),
        })
    }

    /// Whether the connection has failed (a new one is needed).
    pub fn is_dead(&self) -> bool {
        self.inner.dead.load(Ordering::Acquire)
    }

    /// Limits the server announced.
    pub fn limits(&self) -> Limits {
        self.inner.hello.limits
    }

    /// The server's pool identity.
    pub fn server_id(&self) -> u64 {
        self.inner.hello.server_id
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    async fn call(
        &self,
        build: impl FnOnce(&mut Vec<u8>, u64),
    ) -> Result<(FrameHeader, Bytes), ClientError> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut buf = Vec::new();
        build(&mut buf, id);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = inner.pending.lock().expect("pending lock");
            if let Some(death) = &p.death {
                return Err(death.to_error(&inner.addr));
            }
            p.waiters.insert(id, tx);
        }
        let write = async {
            let mut w = inner.writer.lock().await;
            let mut guard = WriteGuard { inner, done: false };
            // Under the writer lock: the CAPS frames go out before this
            // request and any request after it.
            let mut buf = buf;
            if let Some(caps) = &inner.caps {
                let generation = caps.generation();
                if generation != inner.caps_presented.load(Ordering::Relaxed) {
                    let mut frames = Vec::new();
                    caps.encode(&inner.tenant, &mut frames, || {
                        inner.next_id.fetch_add(1, Ordering::Relaxed)
                    });
                    frames.extend_from_slice(&buf);
                    buf = frames;
                    inner.caps_presented.store(generation, Ordering::Relaxed);
                }
            }
            let r = match w.write_all(&buf).await {
                Ok(()) => w.flush().await,
                Err(e) => Err(e),
            };
            guard.done = true;
            r
        };
        match tokio::time::timeout(inner.timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                inner.die(Death::Io(e.kind(), e.to_string()));
                return Err(ClientError::Io {
                    addr: inner.addr.clone(),
                    source: e,
                });
            }
            Err(_) => {
                inner.forget(id);
                return Err(ClientError::Timeout {
                    addr: inner.addr.clone(),
                    timeout: inner.timeout,
                });
            }
        }
        match tokio::time::timeout(inner.timeout, rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(death))) => Err(death.to_error(&inner.addr)),
            Ok(Err(_)) => Err(ClientError::Closed {
                addr: inner.addr.clone(),
            }),
            Err(_) => {
                inner.forget(id);
                Err(ClientError::Timeout {
                    addr: inner.addr.clone(),
                    timeout: inner.timeout,
                })
            }
        }
    }

    fn decode<'a>(
        &self,
        header: &FrameHeader,
        frame: &'a Bytes,
    ) -> Result<Response<'a>, ClientError> {
        frame::decode(
            &self.inner.addr,
            header,
            &frame[HEADER_LEN..],
            self.inner.hello.limits.max_batch_pages,
        )
    }

    /// Stores pages; returns one status per page.
    pub async fn put(&self, pages: &[(u64, &Page)]) -> Result<Vec<PageStatus>, ClientError> {
        frame::check_batch("PUT", pages.len(), self.limits().max_batch_pages)?;
        let (h, f) = self
            .call(|buf, id| wire::encode_put(buf, id, pages.iter().map(|&(h, p)| (h, p))))
            .await?;
        frame::statuses(
            &self.inner.addr,
            self.decode(&h, &f)?,
            Opcode::PutOk,
            pages.len(),
        )
    }

    /// Fetches pages into `out` (one slot per handle); returns one status per
    /// page. Slots of pages that were not found are left untouched.
    pub async fn get(
        &self,
        handles: &[u64],
        out: &mut [Page],
    ) -> Result<Vec<PageStatus>, ClientError> {
        assert_eq!(handles.len(), out.len(), "one output page per handle");
        frame::check_batch("GET", handles.len(), self.limits().max_batch_pages)?;
        let (h, f) = self
            .call(|buf, id| wire::encode_handles(buf, Opcode::Get, id, handles))
            .await?;
        match self.decode(&h, &f)? {
            Response::GetOk(batch) => {
                let mut statuses = Vec::with_capacity(handles.len());
                frame::copy_get(&self.inner.addr, handles, &batch, out, &mut statuses)?;
                Ok(statuses)
            }
            _ => Err(ClientError::Protocol {
                addr: self.inner.addr.clone(),
                source: wire::DecodeError::Unexpected(h.opcode),
            }),
        }
    }

    /// Frees pages; returns one status per page.
    pub async fn free(&self, handles: &[u64]) -> Result<Vec<PageStatus>, ClientError> {
        frame::check_batch("FREE", handles.len(), self.limits().max_batch_pages)?;
        let (h, f) = self
            .call(|buf, id| wire::encode_handles(buf, Opcode::Free, id, handles))
            .await?;
        frame::statuses(
            &self.inner.addr,
            self.decode(&h, &f)?,
            Opcode::FreeOk,
            handles.len(),
        )
    }

    /// The server's usage as seen by this tenant.
    pub async fn stat(&self) -> Result<Stat, ClientError> {
        let (h, f) = self.call(wire::encode_stat).await?;
        match self.decode(&h, &f)? {
            Response::StatOk(s) => Ok(s),
            _ => Err(ClientError::Protocol {
                addr: self.inner.addr.clone(),
                source: wire::DecodeError::Unexpected(h.opcode),
            }),
        }
    }
}

async fn read_loop(mut rd: ReadHalf, inner: Arc<Inner>) {
    let max = frame::reply_max(&inner.hello.limits);
    let mut buf = BytesMut::with_capacity(256 << 10);
    let death = loop {
        match wire::split_frame(&buf, max) {
            Ok(Some((header, payload, _))) => {
                let len = HEADER_LEN + payload.len();
                let frame = buf.split_to(len).freeze();
                if header.opcode == Opcode::Error {
                    let death = match Response::decode(&header, &frame[HEADER_LEN..], 0) {
                        Ok(Response::Error(e)) => Death::Rejected(e.code, e.message.to_string()),
                        Ok(_) => Death::Closed,
                        Err(e) => Death::Protocol(e),
                    };
                    // An error answering one request ends the connection.
                    break death;
                }
                if header.opcode == Opcode::CapsOk {
                    match Response::decode(&header, &frame[HEADER_LEN..], 0) {
                        Ok(Response::CapsOk(v)) => {
                            if let Some(caps) = &inner.caps {
                                caps.refused(&inner.addr, &v);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => break Death::Protocol(e),
                    }
                    continue;
                }
                let waiter = inner
                    .pending
                    .lock()
                    .expect("pending lock")
                    .waiters
                    .remove(&header.request_id);
                if let Some(tx) = waiter {
                    let _ = tx.send(Ok((header, frame)));
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => break Death::Protocol(e),
        }
        if buf.capacity() - buf.len() < 64 << 10 {
            buf.reserve(256 << 10);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break Death::Closed,
            Ok(_) => {}
            Err(e) => break Death::Io(e.kind(), e.to_string()),
        }
    };
    tracing::debug!(addr = %inner.addr, ?death, "connection ended");
    inner.die(death);
}

//! A blocking connection: the calling thread writes the request and reads
//! the reply itself, with no runtime and no hand-off to another thread. On
//! the page-fault path this saves the wake-ups that dominate latency on
//! small machines.

use std::io::{BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};

use rmem_proto::wire::{
    self, FrameHeader, HEADER_LEN, HelloOk, Limits, Opcode, Page, PageStatus, Response, Stat,
};

use crate::{ClientConfig, ClientError, frame};

/// What a PUT_STAGED or LOCATE asks about.
#[derive(Debug, Clone, Copy)]
pub enum Locate<'a> {
    /// Pages written into the staging buffer, to be stored.
    Staged(&'a [wire::StagedPut]),
    /// Stored pages, to be found.
    Handles(&'a [u64]),
}

/// The byte stream under a connection: plain TCP or TLS over it.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }

    /// Whether TLS holds decrypted bytes not read yet.
    fn buffered(&mut self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(s) => s
                .conn
                .process_new_packets()
                .is_ok_and(|io| io.plaintext_bytes_to_read() > 0),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Completes a TLS handshake on `sock` and checks the server is the one
/// `tls` means; the handshake is bounded by `sock`'s timeouts.
fn handshake(
    cfg: &ClientConfig,
    tls: &crate::config::ClientTls,
    mut sock: TcpStream,
) -> Result<Stream, ClientError> {
    let fail = |message: String| ClientError::Tls {
        addr: cfg.addr.clone(),
        message,
    };
    let mut conn = rustls::ClientConnection::new(
        tls.config.get(),
        rmem_common::tls::data::server_name(&cfg.addr),
    )
    .map_err(|e| fail(e.to_string()))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| fail(e.to_string()))?;
    }
    tls.check(&cfg.addr, conn.peer_certificates())?;
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, sock))))
}

/// One synchronous connection to a memory server.
#[derive(Debug)]
pub struct BlockingConnection {
    addr: String,
    spin: std::time::Duration,
    reader: BufReader<Stream>,
    out: Vec<u8>,
    payload: Vec<u8>,
    next_id: u64,
    hello: HelloOk,
    statuses: Vec<PageStatus>,
    /// RDMA connections' record of where pages are: a PUT or FREE here
    /// makes it stale, so those handles are forgotten.
    locations: std::sync::Arc<crate::LocationCache>,
    /// Capabilities to present (set once the handshake is done).
    caps: Option<Box<Presenting>>,
}

/// A connection's capabilities: the tenant whose it hands over, the
/// generation it last presented, and CAPS_OKs still to read.
#[derive(Debug)]
struct Presenting {
    caps: std::sync::Arc<crate::Capabilities>,
    tenant: String,
    presented: u64,
    pending: usize,
}

impl BlockingConnection {
    /// Connects and performs the handshake.
    pub fn connect(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            addr: cfg.addr.clone(),
            source,
        };
        let mut last = None;
        let mut stream = None;
        for sa in cfg.addr.to_socket_addrs().map_err(connect_err)? {
            match TcpStream::connect_timeout(&sa, cfg.connect_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            connect_err(last.unwrap_or_else(|| std::io::ErrorKind::AddrNotAvailable.into()))
        })?;
        stream.set_nodelay(true).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(cfg.request_timeout))
            .map_err(connect_err)?;
        stream
            .set_write_timeout(Some(cfg.request_timeout))
            .map_err(connect_err)?;
        let stream = match &cfg.tls {
            Some(tls) => handshake(cfg, tls, stream)?,
            None => Stream::Plain(stream),
        };
        let mut conn = Self {
            addr: cfg.addr.clone(),
            spin: cfg.spin,
            reader: BufReader::with_capacity(64 << 10, stream),
            out: frame::hello(cfg),
            payload: Vec::new(),
            next_id: 1,
            hello: HelloOk {
                version: 0,
                flags: 0,
                page_size: 0,
                limits: Limits::for_batch(1),
                server_id: 0,
            },
            statuses: Vec::new(),
            locations: cfg.locations.clone(),
            caps: None,
        };
        conn.send()?;
        let header = conn.receive(frame::HANDSHAKE_MAX_FRAME)?;
        conn.hello = frame::hello_ok(&conn.addr, &header, &conn.payload)?;
        conn.caps = cfg.capabilities.clone().map(|caps| {
            Box::new(Presenting {
                caps,
                tenant: cfg.tenant.clone(),
                presented: 0,
                pending: 0,
            })
        });
        Ok(conn)
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Limits the server announced.
    pub fn limits(&self) -> Limits {
        self.hello.limits
    }

    /// The server's pool identity.
    pub fn server_id(&self) -> u64 {
        self.hello.server_id
    }

    /// Whether the server offered RDMA in its HELLO_OK.
    pub fn offers_rdma(&self) -> bool {
        self.hello.flags & wire::HELLO_RDMA != 0
    }

    /// This side's and the server's IP addresses.
    pub fn ips(&self) -> Result<(std::net::IpAddr, std::net::IpAddr), ClientError> {
        let s = self.reader.get_ref().tcp();
        let local = s.local_addr().map_err(|e| self.io(e))?;
        let peer = s.peer_addr().map_err(|e| self.io(e))?;
        Ok((local.ip(), peer.ip()))
    }

    /// Sends RDMA_CONNECT with this side's queue pair; returns the server's.
    pub fn rdma_connect(
        &mut self,
        endpoint: &wire::RdmaEndpoint,
    ) -> Result<wire::RdmaAccept, ClientError> {
        let id = self.id();
        wire::encode_rdma_connect(&mut self.out, id, endpoint);
        let header = self.call(id)?;
        match self.response(&header)? {
            Response::RdmaAccept(a) => Ok(a),
            _ => Err(frame::unexpected(&self.addr, header.opcode)),
        }
    }

    /// Sends PUT_STAGED (pages already written to the staging buffer) or
    /// LOCATE; `locations` receives one entry per page.
    pub fn locate(
        &mut self,
        request: Locate<'_>,
        locations: &mut Vec<wire::Location>,
    ) -> Result<(), ClientError> {
        let id = self.id();
        let n = match request {
            Locate::Staged(puts) => {
                frame::check_batch("PUT", puts.len(), self.hello.limits.max_batch_pages)?;
                // Forgotten until the answer says where the new copies are
                // (if it never comes, no stale location is left behind).
                for p in puts {
                    self.locations.remove(&p.handle);
                }
                wire::encode_put_staged(&mut self.out, id, puts);
                puts.len()
            }
            Locate::Handles(handles) => {
                frame::check_batch("LOCATE", handles.len(), self.hello.limits.max_batch_pages)?;
                wire::encode_handles(&mut self.out, Opcode::Locate, id, handles);
                handles.len()
            }
        };
        let header = self.call(id)?;
        match self.response(&header)? {
            Response::Located(l) if l.len() == n => {
                locations.clear();
                locations.extend(l.iter());
                Ok(())
            }
            _ => Err(frame::unexpected(&self.addr, header.opcode)),
        }
    }

    fn response(&self, header: &FrameHeader) -> Result<Response<'_>, ClientError> {
        frame::decode(
            &self.addr,
            header,
            &self.payload,
            self.hello.limits.max_batch_pages,
        )
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        if matches!(
            source.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            ClientError::Timeout {
                addr: self.addr.clone(),
                timeout: self
                    .reader
                    .get_ref()
                    .tcp()
                    .read_timeout()
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            }
        } else {
            ClientError::Io {
                addr: self.addr.clone(),
                source,
            }
        }
    }

    fn send(&mut self) -> Result<(), ClientError> {
        self.present_caps();
        let stream = self.reader.get_mut();
        let r = stream.write_all(&self.out).and_then(|()| stream.flush());
        self.out.clear();
        r.map_err(|e| self.io(e))
    }

    /// Polls the socket for up to `self.spin` until a reply is readable, so
    /// a fast reply is picked up without a wake-up.
    fn spin_for_reply(&mut self) {
        if self.spin.is_zero()
            || !self.reader.buffer().is_empty()
            || self.reader.get_mut().buffered()
        {
            return;
        }
        let sock = socket2::SockRef::from(self.reader.get_ref().tcp());
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        let started = std::time::Instant::now();
        loop {
            match sock.recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Data, end of stream or an error: the blocking read sees it.
                _ => return,
            }
            if started.elapsed() >= self.spin {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Reads one frame into `self.payload`.
    fn receive(&mut self, max: u32) -> Result<FrameHeader, ClientError> {
        self.spin_for_reply();
        let mut head = [0u8; HEADER_LEN];
        self.reader.read_exact(&mut head).map_err(|e| self.io(e))?;
        let header = FrameHeader::decode(&head, max).map_err(|source| ClientError::Protocol {
            addr: self.addr.clone(),
            source,
        })?;
        self.payload.resize(header.len as usize, 0);
        self.reader
            .read_exact(&mut self.payload)
            .map_err(|e| self.io(e))?;
        Ok(header)
    }

    fn call(&mut self, id: u64) -> Result<FrameHeader, ClientError> {
        self.send()?;
        self.reply(id)
    }

    /// Puts CAPS frames before the request in `self.out` when the
    /// capabilities changed since this connection last presented them.
    fn present_caps(&mut self) {
        let Some(p) = &mut self.caps else {
            return;
        };
        let generation = p.caps.generation();
        if generation == p.presented || self.out.is_empty() {
            return;
        }
        let mut frames = Vec::new();
        let mut next = self.next_id;
        let n = p.caps.encode(&p.tenant, &mut frames, || {
            next += 1;
            next
        });
        self.next_id = next;
        frames.extend_from_slice(&self.out);
        self.out = frames;
        p.presented = generation;
        p.pending += n;
    }

    /// Reads the answer to request `id`.
    fn reply(&mut self, id: u64) -> Result<FrameHeader, ClientError> {
        let mut header = self.receive(frame::reply_max(&self.hello.limits))?;
        while header.opcode == Opcode::CapsOk
            && let Some(p) = self.caps.as_mut().filter(|p| p.pending > 0)
        {
            p.pending -= 1;
            let caps = p.caps.clone();
            if let Response::CapsOk(v) = self.response(&header)? {
                caps.refused(&self.addr, &v);
            }
            header = self.receive(frame::reply_max(&self.hello.limits))?;
        }
        if header.request_id != id && header.opcode != Opcode::Error {
            return Err(ClientError::Protocol {
                addr: self.addr.clone(),
                source: wire::DecodeError::Unexpected(header.opcode),
            });
        }
        Ok(header)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Stores pages; returns one status per page.
    pub fn put(&mut self, pages: &[(u64, &Page)]) -> Result<Vec<PageStatus>, ClientError> {
        let id = self.put_start(pages)?;
        self.put_finish(id, pages.len())
    }

    /// Sends a PUT without waiting for its answer, so that copies on
    /// several servers are written together; returns its id. The next call
    /// on this connection must be [`Self::put_finish`].
    pub fn put_start(&mut self, pages: &[(u64, &Page)]) -> Result<u64, ClientError> {
        frame::check_batch("PUT", pages.len(), self.hello.limits.max_batch_pages)?;
        for (h, _) in pages {
            self.locations.remove(h);
        }
        let id = self.id();
        wire::encode_put(&mut self.out, id, pages.iter().map(|&(h, p)| (h, p)));
        self.send()?;
        Ok(id)
    }

    /// Reads the answer to the PUT of `count` pages [`Self::put_start`]
    /// sent: one status per page.
    pub fn put_finish(&mut self, id: u64, count: usize) -> Result<Vec<PageStatus>, ClientError> {
        let header = self.reply(id)?;
        let r = frame::decode(
            &self.addr,
            &header,
            &self.payload,
            self.hello.limits.max_batch_pages,
        )?;
        frame::statuses(&self.addr, r, Opcode::PutOk, count)
    }

    /// Fetches pages into `out` (one slot per handle); returns one status per
    /// page. Slots of pages that were not found are left untouched.
    pub fn get(&mut self, handles: &[u64], out: &mut [Page]) -> Result<&[PageStatus], ClientError> {
        let id = self.get_start(handles)?;
        self.get_finish(id, handles, out)
    }

    /// Sends a GET without waiting for its answer, so that requests to
    /// several servers are in flight together; returns its id. The next
    /// call on this connection must be [`Self::get_finish`] with the same
    /// handles.
    pub fn get_start(&mut self, handles: &[u64]) -> Result<u64, ClientError> {
        frame::check_batch("GET", handles.len(), self.hello.limits.max_batch_pages)?;
        let id = self.id();
        wire::encode_handles(&mut self.out, Opcode::Get, id, handles);
        self.send()?;
        Ok(id)
    }

    /// Reads the answer to the GET [`Self::get_start`] sent, as
    /// [`Self::get`] does.
    pub fn get_finish(
        &mut self,
        id: u64,
        handles: &[u64],
        out: &mut [Page],
    ) -> Result<&[PageStatus], ClientError> {
        assert_eq!(handles.len(), out.len(), "one output page per handle");
        let header = self.reply(id)?;
        match frame::decode(
            &self.addr,
            &header,
            &self.payload,
            self.hello.limits.max_batch_pages,
        )? {
            Response::GetOk(batch) => {
                frame::copy_get(&self.addr, handles, &batch, out, &mut self.statuses)?;
                Ok(&self.statuses)
            }
            _ => Err(ClientError::Protocol {
                addr: self.addr.clone(),
                source: wire::DecodeError::Unexpected(header.opcode),
            }),
        }
    }

    /// Frees pages; returns one status per page.
    pub fn free(&mut self, handles: &[u64]) -> Result<Vec<PageStatus>, ClientError> {
        frame::check_batch("FREE", handles.len(), self.hello.limits.max_batch_pages)?;
        for h in handles {
            self.locations.remove(h);
        }
        let id = self.id();
        wire::encode_handles(&mut self.out, Opcode::Free, id, handles);
        let header = self.call(id)?;
        let r = frame::decode(
            &self.addr,
            &header,
            &self.payload,
            self.hello.limits.max_batch_pages,
        )?;
        frame::statuses(&self.addr, r, Opcode::FreeOk, handles.len())
    }

    /// The server's usage as seen by this tenant.
    pub fn stat(&mut self) -> Result<Stat, ClientError> {
        let id = self.id();
        wire::encode_stat(&mut self.out, id);
        let header = self.call(id)?;
        match frame::decode(
            &self.addr,
            &header,
            &self.payload,
            self.hello.limits.max_batch_pages,
        )? {
            Response::StatOk(s) => Ok(s),
            _ => Err(ClientError::Protocol {
                addr: self.addr.clone(),
                source: wire::DecodeError::Unexpected(header.opcode),
            }),
        }
    }
}

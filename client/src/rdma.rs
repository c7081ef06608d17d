//! The RDMA data plane, client side.
//!
//! A connection is an authenticated TCP connection ([`BlockingConnection`])
//! plus a reliable-connected queue pair set up over it (RDMA_CONNECT /
//! RDMA_ACCEPT). The TCP connection stays open as the queue pair's control
//! channel: closing it tears the queue pair down on the server.
//!
//! - **GET** is a one-sided RDMA READ of each page from the server's pool
//!   into this connection's registered buffer, checked against the page's
//!   checksum, then copied out. Where a page is comes from the
//!   [`LocationCache`] (filled by PUT and by LOCATE); a page whose bytes do
//!   not match its checksum (its slot was freed and reused) is located
//!   again, and if it still does not match it is fetched over TCP, where
//!   the server checks its own copy.
//! - **PUT** is RDMA WRITEs of the pages into the connection's staging
//!   buffer on the server, then PUT_STAGED: the server checks each page's
//!   checksum, stores it like a TCP PUT, and answers with its location.
//!   A page counts as stored only once that answer says `ok`.
//! - **FREE** and **STAT** go over TCP.
//!
//! Any RDMA failure (a completion error, a queue pair in error, a timeout)
//! is returned as a retryable [`ClientError::Rdma`]; the caller drops the
//! connection and makes a new one, queue pair included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmem_proto::wire::{
    self, Limits, Location, PAGE_SIZE, Page, PageStatus, RemoteBuffer, StagedPut, Stat, page_crc,
};
use rmem_verbs::{Access, Buffer, Context, Pd, Qp, QpCaps, Transfer, VerbsError};

use crate::blocking::Locate;
use crate::locations::{Loc, LocationCache};
use crate::{BlockingConnection, ClientConfig, ClientError};

/// One RDMA connection to a memory server.
#[derive(Debug)]
pub struct RdmaConnection {
    tcp: BlockingConnection,
    // Field order: the queue pair goes before the buffer's region and the
    // domain it belongs to.
    qp: Qp,
    buf: Buffer,
    _pd: Arc<Pd>,
    staging: RemoteBuffer,
    cache: Arc<LocationCache>,
    spin: Duration,
    timeout: Duration,
    // Scratch, reused so the fault path does not allocate.
    statuses: Vec<PageStatus>,
    locations: Vec<Location>,
    transfers: Vec<Transfer>,
    pending: Vec<usize>,
    expect: Vec<Option<u32>>,
    handles: Vec<u64>,
    staged: Vec<StagedPut>,
    next_wr: u64,
}

fn verbs(addr: &str, source: VerbsError) -> ClientError {
    ClientError::Rdma {
        addr: addr.to_string(),
        source,
    }
}

impl RdmaConnection {
    /// Connects over TCP, authenticates, and sets up a queue pair on the
    /// device port that reaches the server.
    pub fn connect(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let tcp = BlockingConnection::connect(cfg)?;
        Self::upgrade(tcp, cfg)
    }

    /// Sets up the queue pair over an authenticated TCP connection.
    pub fn upgrade(mut tcp: BlockingConnection, cfg: &ClientConfig) -> Result<Self, ClientError> {
        let addr = tcp.addr().to_string();
        if !tcp.offers_rdma() {
            return Err(ClientError::RdmaNotOffered { addr });
        }
        let (local, _) = tcp.ips()?;
        let ctx = Arc::new(
            Context::open(local, cfg.rdma_device.as_deref()).map_err(|e| verbs(&addr, e))?,
        );
        let pd = Pd::new(ctx).map_err(|e| verbs(&addr, e))?;
        let batch = tcp.limits().max_batch_pages;
        let buf = Buffer::new(&pd, batch as usize * PAGE_SIZE, Access::Local)
            .map_err(|e| verbs(&addr, e))?;
        let mut qp = Qp::new(
            &pd,
            QpCaps {
                max_send_wr: batch,
                remote_access: false,
            },
        )
        .map_err(|e| verbs(&addr, e))?;
        let mine = qp.endpoint();
        let accept = tcp.rdma_connect(&mine)?;
        let peer = accept.endpoint;
        qp.connect(&peer).map_err(|e| verbs(&addr, e))?;
        if accept.staging.pages == 0 {
            return Err(ClientError::Protocol {
                addr,
                source: wire::DecodeError::Unexpected(wire::Opcode::RdmaAccept),
            });
        }
        cfg.locations.check_server(tcp.server_id());
        tracing::debug!(%addr, qpn = mine.qpn, peer_qpn = peer.qpn, "RDMA queue pair connected");
        Ok(Self {
            tcp,
            qp,
            buf,
            _pd: pd,
            staging: accept.staging,
            cache: cfg.locations.clone(),
            spin: cfg.spin.max(Duration::from_micros(20)),
            timeout: cfg.request_timeout,
            statuses: Vec::new(),
            locations: Vec::new(),
            transfers: Vec::with_capacity(batch as usize),
            pending: Vec::new(),
            expect: Vec::new(),
            handles: Vec::new(),
            staged: Vec::new(),
            next_wr: 0,
        })
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        self.tcp.addr()
    }

    /// Limits the server announced.
    pub fn limits(&self) -> Limits {
        self.tcp.limits()
    }

    /// The server's pool identity.
    pub fn server_id(&self) -> u64 {
        self.tcp.server_id()
    }

    /// Posts the transfers in `self.transfers` and waits for them.
    fn transfer(&mut self, write: bool) -> Result<(), ClientError> {
        if self.transfers.is_empty() {
            return Ok(());
        }
        self.next_wr += 1;
        let wr = self.next_wr;
        let tcp = &self.tcp;
        let fail = |e| verbs(tcp.addr(), e);
        self.qp.post(write, wr, &self.transfers).map_err(fail)?;
        let deadline = Instant::now() + self.timeout;
        let c = self.qp.cq().next(self.spin, deadline).map_err(fail)?;
        c.check().map_err(fail)?;
        if c.wr_id != wr {
            // A completion of an earlier, abandoned transfer: the queue's
            // bookkeeping is off, so this connection is done for.
            return Err(fail(VerbsError::Unexpected("a stale completion")));
        }
        Ok(())
    }

    /// Stores pages; returns one status per page.
    pub fn put(&mut self, pages: &[(u64, &Page)]) -> Result<Vec<PageStatus>, ClientError> {
        crate::frame::check_batch("PUT", pages.len(), self.limits().max_batch_pages)?;
        let mut out = Vec::with_capacity(pages.len());
        for chunk in pages.chunks(self.staging.pages as usize) {
            self.transfers.clear();
            self.staged.clear();
            let lkey = self.buf.mr().lkey();
            let base = self.buf.mr().addr();
            for (i, &(handle, data)) in chunk.iter().enumerate() {
                self.buf.as_mut_slice()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(data);
                self.transfers.push(Transfer {
                    local_addr: base + (i * PAGE_SIZE) as u64,
                    lkey,
                    len: PAGE_SIZE as u32,
                    remote_addr: self.staging.addr + (i * PAGE_SIZE) as u64,
                    rkey: self.staging.rkey,
                });
                self.staged.push(StagedPut {
                    handle,
                    crc: page_crc(data),
                    index: i as u32,
                });
            }
            self.transfer(true)?;
            self.tcp
                .locate(Locate::Staged(&self.staged), &mut self.locations)?;
            for (put, loc) in self.staged.iter().zip(&self.locations) {
                // Address 0: the server cannot serve this page over RDMA;
                // GETs of it go over TCP.
                if loc.status == PageStatus::Ok && loc.addr != 0 {
                    self.cache.insert(
                        put.handle,
                        Loc {
                            addr: loc.addr,
                            rkey: loc.rkey,
                            crc: put.crc,
                        },
                    );
                }
                out.push(loc.status);
            }
        }
        Ok(out)
    }

    /// Fetches pages into `out` (one slot per handle); returns one status
    /// per page. Slots of pages that were not found are left untouched.
    pub fn get(&mut self, handles: &[u64], out: &mut [Page]) -> Result<&[PageStatus], ClientError> {
        assert_eq!(handles.len(), out.len(), "one output page per handle");
        crate::frame::check_batch("GET", handles.len(), self.limits().max_batch_pages)?;
        self.statuses.clear();
        self.statuses.resize(handles.len(), PageStatus::Ok);
        // Read where the cache says; locate what was unknown or did not
        // check out and read again; what still fails goes over TCP.
        self.pending.clear();
        self.pending.extend(0..handles.len());
        self.read_pending(handles, out)?;
        if !self.pending.is_empty() {
            self.locate_pending(handles)?;
            self.read_pending(handles, out)?;
        }
        if self.pending.is_empty() {
            return Ok(&self.statuses);
        }
        // Still mismatching after a fresh location: let the server check
        // its own copy and send the bytes.
        self.handles.clear();
        self.handles
            .extend(self.pending.iter().map(|&i| handles[i]));
        let mut pages = vec![[0u8; PAGE_SIZE]; self.handles.len()];
        let statuses = self.tcp.get(&self.handles, &mut pages)?.to_vec();
        for ((&i, page), status) in self.pending.iter().zip(&pages).zip(statuses) {
            self.statuses[i] = status;
            if status == PageStatus::Ok {
                out[i].copy_from_slice(page);
            }
        }
        Ok(&self.statuses)
    }

    /// LOCATEs every pending page; pages the server does not have leave
    /// `pending` with their status.
    fn locate_pending(&mut self, handles: &[u64]) -> Result<(), ClientError> {
        self.handles.clear();
        self.handles
            .extend(self.pending.iter().map(|&i| handles[i]));
        self.tcp
            .locate(Locate::Handles(&self.handles), &mut self.locations)?;
        let mut keep = 0;
        for k in 0..self.pending.len() {
            let i = self.pending[k];
            let loc = self.locations[k];
            if loc.status == PageStatus::Ok {
                if loc.addr == 0 {
                    // Not reachable over RDMA: stays pending for the TCP GET.
                    self.cache.remove(&handles[i]);
                    self.pending[keep] = i;
                    keep += 1;
                    continue;
                }
                self.cache.insert(
                    handles[i],
                    Loc {
                        addr: loc.addr,
                        rkey: loc.rkey,
                        crc: loc.crc,
                    },
                );
                self.pending[keep] = i;
                keep += 1;
            } else {
                self.cache.remove(&handles[i]);
                self.statuses[i] = loc.status;
            }
        }
        self.pending.truncate(keep);
        Ok(())
    }

    /// READs every pending page whose location is known into the buffer,
    /// checks it and copies it out; leaves in `pending` the pages with no
    /// known location or whose bytes did not match.
    fn read_pending(&mut self, handles: &[u64], out: &mut [Page]) -> Result<(), ClientError> {
        self.transfers.clear();
        let lkey = self.buf.mr().lkey();
        let base = self.buf.mr().addr();
        self.expect.clear();
        for (slot, &i) in self.pending.iter().enumerate() {
            let Some(loc) = self.cache.get(handles[i]) else {
                self.expect.push(None);
                continue;
            };
            self.transfers.push(Transfer {
                local_addr: base + (slot * PAGE_SIZE) as u64,
                lkey,
                len: PAGE_SIZE as u32,
                remote_addr: loc.addr,
                rkey: loc.rkey,
            });
            self.expect.push(Some(loc.crc));
        }
        if let Err(e) = self.transfer(false) {
            // The connection is done for. A refused rkey or address means
            // locations are stale (a restarted server registers its pool
            // anew): forget them all; otherwise just this batch's.
            if matches!(&e, ClientError::Rdma { source, .. } if source.is_remote_access()) {
                self.cache.clear();
            } else {
                for &i in &self.pending {
                    self.cache.remove(&handles[i]);
                }
            }
            return Err(e);
        }
        let mut keep = 0;
        for k in 0..self.pending.len() {
            let i = self.pending[k];
            let page = &self.buf.as_slice()[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
            match self.expect[k] {
                Some(crc) if page_crc(page) == crc => {
                    out[i].copy_from_slice(page);
                    self.statuses[i] = PageStatus::Ok;
                }
                _ => {
                    self.pending[keep] = i;
                    keep += 1;
                }
            }
        }
        self.pending.truncate(keep);
        Ok(())
    }

    /// Frees pages; returns one status per page.
    pub fn free(&mut self, handles: &[u64]) -> Result<Vec<PageStatus>, ClientError> {
        for h in handles {
            self.cache.remove(h);
        }
        self.tcp.free(handles)
    }

    /// The server's usage as seen by this tenant.
    pub fn stat(&mut self) -> Result<Stat, ClientError> {
        self.tcp.stat()
    }

    /// Where the server says `handle` is: its address and the rkey of the
    /// tenant's region holding it (for diagnostics and tests).
    pub fn locate(&mut self, handle: u64) -> Result<Location, ClientError> {
        self.tcp
            .locate(Locate::Handles(&[handle]), &mut self.locations)?;
        Ok(self.locations[0])
    }

    /// READs one page from an address and rkey given by the caller (for
    /// diagnostics and tests: reading where one is not allowed must fail).
    pub fn read_raw(&mut self, addr: u64, rkey: u32) -> Result<Page, ClientError> {
        self.transfers.clear();
        self.transfers.push(Transfer {
            local_addr: self.buf.mr().addr(),
            lkey: self.buf.mr().lkey(),
            len: PAGE_SIZE as u32,
            remote_addr: addr,
            rkey,
        });
        self.transfer(false)?;
        let mut page = [0u8; PAGE_SIZE];
        page.copy_from_slice(&self.buf.as_slice()[..PAGE_SIZE]);
        Ok(page)
    }

    /// Moves the queue pair to the error state, as a failing link would
    /// (for tests of recovery): every later RDMA operation fails.
    pub fn break_queue_pair(&mut self) -> Result<(), ClientError> {
        let addr = self.tcp.addr().to_string();
        self.qp.set_error().map_err(|e| verbs(&addr, e))
    }

    /// A handle that breaks the queue pair from another thread, in the
    /// middle of a transfer (for tests of recovery).
    pub fn breaker(&self) -> rmem_verbs::QpBreaker {
        self.qp.breaker()
    }
}

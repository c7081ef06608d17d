//! A thread's own connection to a memory server (TCP or RDMA, as its
//! configuration asks), reconnected with backoff
//! until a deadline. Fault handlers and the evictor each own one, so the
//! thread that needs a page sends the request and reads the answer itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmem_client::{
    ClientConfig, ClientError, DataConnection, PAGE_SIZE, Page, PageStatus, PageTransport, Pending,
};

use super::errors::ErrorCounts;
use super::seal::Seal;

/// How long a fault waits, by default, for a server that does not answer
/// before the faulting thread gets SIGBUS (both paths).
///
/// A server that stops answering may be stalled (SIGSTOP, a pause, a
/// network blip) or lost, and the two look the same until it answers
/// again. A stall is not a loss: a server keeps its pages across a lapsed
/// lease (it registers again and keeps every page the registry still
/// covers), so the wait must outlast any stall an operator expects a
/// server to come back from. One minute is six default leases (10 s) and
/// the coordinator's default reap delay for agents (60 s or three
/// leases); a server silent for longer is treated as lost. With
/// redundancy a fault will not wait on one server at all.
pub const DEFAULT_FAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// With more than one copy of a page: how long a fault waits for one
/// server before it reads another copy.
pub const DEFAULT_FAILOVER_AFTER: Duration = Duration::from_millis(500);

/// A reconnecting blocking connection. With a seal, every page it sends is
/// sealed and every page it receives opened (see [`super::seal`]): a page
/// that fails its check is reported `Corrupt`, like a copy the server
/// found damaged, so readers go to another copy.
#[derive(Debug)]
pub struct RemoteConn {
    cfg: ClientConfig,
    conn: Option<DataConnection>,
    seal: Option<Arc<Seal>>,
    /// The sealed pages of the PUT [`Self::put_start`] sent, for
    /// [`Self::put_finish`] (RDMA writes them only then).
    sealed: Vec<Page>,
    /// ...and their handles.
    sealed_handles: Vec<u64>,
    /// Where failed requests and bad page statuses are counted.
    errors: Option<Arc<ErrorCounts>>,
}

impl RemoteConn {
    /// Not connected yet; the first request connects.
    pub fn new(cfg: ClientConfig) -> Self {
        Self {
            cfg,
            conn: None,
            seal: None,
            sealed: Vec::new(),
            sealed_handles: Vec::new(),
            errors: None,
        }
    }

    /// Failed requests and bad page statuses counted in `errors`.
    pub fn counting(mut self, errors: Arc<ErrorCounts>) -> Self {
        self.errors = Some(errors);
        self
    }

    fn count_error(&self, e: &ClientError) {
        if let Some(errors) = &self.errors {
            errors.count(e.reason(), 1);
        }
    }

    fn count_statuses(&self, statuses: &[PageStatus]) {
        if let Some(errors) = &self.errors {
            errors.count_statuses(statuses);
        }
    }

    /// Pages sealed with `seal` on their way out, opened on their way in.
    pub fn sealed(mut self, seal: Option<Arc<Seal>>) -> Self {
        self.seal = seal;
        self
    }

    /// Seals `pages` into `buf`; the batch to send.
    fn seal_batch<'b>(
        seal: &Seal,
        pages: &[(u64, &Page)],
        buf: &'b mut Vec<Page>,
    ) -> Result<Vec<(u64, &'b Page)>, ClientError> {
        buf.resize(pages.len(), [0u8; PAGE_SIZE]);
        seal.seal_batch(pages, buf).map_err(|e| {
            tracing::error!(error = %e, "a batch was not sent");
            ClientError::Page {
                handle: pages.first().map_or(0, |p| p.0),
                status: PageStatus::Denied,
            }
        })?;
        Ok(pages.iter().map(|&(h, _)| h).zip(buf.iter()).collect())
    }

    /// Opens what a GET returned: a page that fails becomes `Corrupt`.
    fn open_batch(&self, handles: &[u64], out: &mut [Page], statuses: &mut [PageStatus]) {
        let Some(seal) = &self.seal else { return };
        for ((&h, page), st) in handles.iter().zip(out.iter_mut()).zip(statuses.iter_mut()) {
            if *st != PageStatus::Ok {
                continue;
            }
            if let Err(e) = seal.open(h, page) {
                tracing::warn!(
                    server = %self.cfg.addr, handle = h, error = %e,
                    "a server returned a page that fails its seal: reading another copy"
                );
                *st = PageStatus::Corrupt;
            }
        }
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        &self.cfg.addr
    }

    fn with<T>(
        &mut self,
        deadline: Instant,
        mut op: impl FnMut(&mut DataConnection) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let mut delay = self.cfg.backoff_initial;
        loop {
            let result = match &mut self.conn {
                Some(c) => op(c),
                None => match DataConnection::connect(&self.cfg) {
                    Ok(c) => {
                        tracing::debug!(addr = %self.cfg.addr, transport = %c.transport(), "connected");
                        op(self.conn.insert(c))
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && Instant::now() + delay < deadline => {
                    tracing::debug!(addr = %self.cfg.addr, error = %e, ?delay, "server request failed; retrying");
                    self.conn = None;
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(self.cfg.backoff_max);
                }
                Err(e) => {
                    self.conn = None;
                    self.count_error(&e);
                    return Err(e);
                }
            }
        }
    }

    /// GET with retries until `deadline`; the page statuses go to
    /// `statuses` (reused, so the fault path does not allocate).
    pub fn get(
        &mut self,
        handles: &[u64],
        out: &mut [Page],
        statuses: &mut Vec<PageStatus>,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        self.get_uncounted(handles, out, statuses, deadline)?;
        self.count_statuses(statuses);
        Ok(())
    }

    /// [`Self::get`] without counting the statuses (its caller does).
    fn get_uncounted(
        &mut self,
        handles: &[u64],
        out: &mut [Page],
        statuses: &mut Vec<PageStatus>,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        loop {
            let presented = self.caps_generation();
            self.with(deadline, |c| {
                let s = c.get(handles, out)?;
                statuses.clear();
                statuses.extend_from_slice(s);
                Ok(())
            })?;
            if !self.renewed_after_denial(presented, statuses, deadline) {
                break;
            }
        }
        self.open_batch(handles, out, statuses);
        Ok(())
    }

    /// The generation of the capabilities this connection presents.
    fn caps_generation(&self) -> Option<u64> {
        self.cfg.capabilities.as_ref().map(|c| c.generation())
    }

    /// After an answer that denied pages: with capabilities, asks for
    /// them to be renewed and waits (until `deadline`) for new ones; whether
    /// to ask again. A server denies the pages of a capability it no longer
    /// holds: one signed by a key an operator retired at once (perhaps
    /// leaked), or one that expired unrenewed.
    fn renewed_after_denial(
        &self,
        presented: Option<u64>,
        statuses: &[PageStatus],
        deadline: Instant,
    ) -> bool {
        let (Some(caps), Some(generation)) = (&self.cfg.capabilities, presented) else {
            return false;
        };
        if !statuses.contains(&PageStatus::Denied) {
            return false;
        }
        tracing::debug!(server = %self.cfg.addr, "pages denied: renewing capabilities and asking again");
        caps.wait_renewed(generation, deadline)
    }

    /// Sends a GET without waiting for its answer (connecting, with
    /// retries, until `deadline`); [`Self::get_finish`] reads it.
    pub fn get_start(
        &mut self,
        handles: &[u64],
        deadline: Instant,
    ) -> Result<Pending, ClientError> {
        self.with(deadline, |c| c.get_start(handles))
    }

    /// The answer to the GET [`Self::get_start`] sent. A connection found
    /// broken only now (a server that restarted or closed it: writing to
    /// it still succeeded) is replaced and the GET sent again, until
    /// `deadline`.
    pub fn get_finish(
        &mut self,
        pending: Pending,
        handles: &[u64],
        out: &mut [Page],
        statuses: &mut Vec<PageStatus>,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        let sealed = self.seal.is_some();
        let presented = self.caps_generation();
        let opened = self.finish(
            deadline,
            (&mut *out, &mut *statuses),
            |c, (out, statuses)| {
                let s = c.get_finish(pending, handles, out)?;
                statuses.clear();
                statuses.extend_from_slice(s);
                Ok(false)
            },
            // `get` opens what it reads itself.
            |me, (out, statuses)| {
                me.get_uncounted(handles, out, statuses, deadline)
                    .map(|()| true)
            },
        )?;
        if !opened && self.renewed_after_denial(presented, statuses, deadline) {
            return self.get(handles, out, statuses, deadline);
        }
        if sealed && !opened {
            self.open_batch(handles, out, statuses);
        }
        self.count_statuses(statuses);
        Ok(())
    }

    /// Sends a PUT without waiting for its answer (connecting, with
    /// retries, until `deadline`); [`Self::put_finish`] reads it.
    pub fn put_start(
        &mut self,
        pages: &[(u64, &Page)],
        deadline: Instant,
    ) -> Result<Pending, ClientError> {
        let r = self.sealed_put(pages, deadline, |c, batch| c.put_start(batch));
        if r.is_ok() && self.seal.is_some() {
            self.sealed_handles.extend(pages.iter().map(|&(h, _)| h));
        }
        r
    }

    /// `op` (a PUT) on `pages`, sealed first with a seal. The sealed pages
    /// stay in `self.sealed` afterwards.
    fn sealed_put<T>(
        &mut self,
        pages: &[(u64, &Page)],
        deadline: Instant,
        mut op: impl FnMut(&mut DataConnection, &[(u64, &Page)]) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let Some(seal) = self.seal.clone() else {
            return self.with(deadline, |c| op(c, pages));
        };
        let mut buf = std::mem::take(&mut self.sealed);
        self.sealed_handles.clear();
        let r = match Self::seal_batch(&seal, pages, &mut buf) {
            Ok(batch) => self.with(deadline, |c| op(c, &batch)),
            Err(e) => {
                // `with` counts the request's failures; this one never
                // reached it.
                self.count_error(&e);
                Err(e)
            }
        };
        self.sealed = buf;
        r
    }

    /// The answer to the PUT [`Self::put_start`] sent (the same `pages`),
    /// sent again on a new connection as [`Self::get_finish`] does.
    pub fn put_finish(
        &mut self,
        pending: Pending,
        pages: &[(u64, &Page)],
        deadline: Instant,
    ) -> Result<Vec<PageStatus>, ClientError> {
        let presented = self.caps_generation();
        let statuses = self.put_finish_once(pending, pages, deadline)?;
        if self.renewed_after_denial(presented, &statuses, deadline) {
            return self.put(pages, deadline);
        }
        self.count_statuses(&statuses);
        Ok(statuses)
    }

    fn put_finish_once(
        &mut self,
        pending: Pending,
        pages: &[(u64, &Page)],
        deadline: Instant,
    ) -> Result<Vec<PageStatus>, ClientError> {
        if self.seal.is_none() {
            return self.finish(
                deadline,
                (),
                |c, ()| c.put_finish(pending, pages),
                |me, ()| me.put_uncounted(pages, deadline),
            );
        }
        if !self
            .sealed_handles
            .iter()
            .copied()
            .eq(pages.iter().map(|&(h, _)| h))
        {
            // Not the pages `put_start` sealed and sent: never send them
            // unsealed; the answer in flight is dropped with the connection.
            debug_assert!(false, "put_finish with other pages than put_start's");
            self.conn = None;
            return Err(ClientError::Closed {
                addr: self.cfg.addr.clone(),
            });
        }
        // What `put_start` sealed (the same pages, in order).
        let buf = std::mem::take(&mut self.sealed);
        let batch: Vec<(u64, &Page)> = pages.iter().map(|&(h, _)| h).zip(buf.iter()).collect();
        let r = self.finish(
            deadline,
            (),
            |c, ()| c.put_finish(pending, &batch),
            |me, ()| me.put_uncounted(pages, deadline),
        );
        drop(batch);
        self.sealed = buf;
        r
    }

    /// Reads the answer to a request sent earlier with `read`; on a
    /// connection found broken only now, drops it and, before `deadline`,
    /// does the whole request again with `again` on a new one. `buffers`
    /// go to whichever runs.
    fn finish<B, T>(
        &mut self,
        deadline: Instant,
        mut buffers: B,
        read: impl FnOnce(&mut DataConnection, &mut B) -> Result<T, ClientError>,
        again: impl FnOnce(&mut Self, &mut B) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let r = match &mut self.conn {
            Some(c) => read(c, &mut buffers),
            None => Err(ClientError::Closed {
                addr: self.cfg.addr.clone(),
            }),
        };
        match r {
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                self.conn = None;
                again(self, &mut buffers)
            }
            Err(e) => {
                self.conn = None;
                self.count_error(&e);
                Err(e)
            }
            ok => ok,
        }
    }

    /// PUT with retries until `deadline`.
    pub fn put(
        &mut self,
        pages: &[(u64, &Page)],
        deadline: Instant,
    ) -> Result<Vec<PageStatus>, ClientError> {
        let statuses = self.put_uncounted(pages, deadline)?;
        self.count_statuses(&statuses);
        Ok(statuses)
    }

    /// [`Self::put`] without counting the statuses (its caller does).
    fn put_uncounted(
        &mut self,
        pages: &[(u64, &Page)],
        deadline: Instant,
    ) -> Result<Vec<PageStatus>, ClientError> {
        loop {
            let presented = self.caps_generation();
            let statuses = self.sealed_put(pages, deadline, |c, batch| c.put(batch))?;
            if !self.renewed_after_denial(presented, &statuses, deadline) {
                return Ok(statuses);
            }
        }
    }

    /// FREE with retries until `deadline`.
    pub fn free(
        &mut self,
        handles: &[u64],
        deadline: Instant,
    ) -> Result<Vec<PageStatus>, ClientError> {
        loop {
            let presented = self.caps_generation();
            let statuses = self.with(deadline, |c| c.free(handles))?;
            if !self.renewed_after_denial(presented, &statuses, deadline) {
                return Ok(statuses);
            }
        }
    }

    /// The batch limit of the server (connecting if needed).
    pub fn max_batch(&mut self, deadline: Instant) -> Result<u32, ClientError> {
        self.with(deadline, |c| Ok(c.limits().max_batch_pages))
    }
}

/// A client configuration whose per-call socket timeout suits a thread that
/// must notice a dead server quickly and reconnect.
pub fn thread_config(base: &ClientConfig, fault_timeout: Duration) -> ClientConfig {
    let mut cfg = base.clone();
    cfg.request_timeout = cfg
        .request_timeout
        .min(fault_timeout)
        .max(Duration::from_millis(100));
    cfg.connect_timeout = cfg
        .connect_timeout
        .min(fault_timeout)
        .max(Duration::from_millis(100));
    cfg
}

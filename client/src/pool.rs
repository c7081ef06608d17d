//! A pool of pipelined connections with retries and reconnection.
//!
//! Every data-plane operation is idempotent (a PUT stores the same bytes
//! under the same handle again, a GET or STAT reads, a repeated FREE answers
//! `not_found`), so a request that failed on a broken connection is retried
//! on a fresh one until the request timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rmem_proto::wire::{Limits, Page, PageStatus, Stat};
use tokio::time::Instant;

use crate::{ClientConfig, ClientError, Connection};

/// Runs `$call` on a live connection, retrying retryable failures on fresh
/// connections until the request timeout. (A macro rather than a method
/// taking a closure: async closures that borrow their arguments do not yet
/// produce `Send` futures, and callers spawn these on a runtime.)
macro_rules! with_retry {
    ($self:ident, |$conn:ident| $call:expr) => {{
        let deadline = Instant::now() + $self.cfg.request_timeout;
        let mut delay = $self.cfg.backoff_initial;
        loop {
            let $conn = $self.connection(deadline).await?;
            match $call.await {
                Ok(v) => break Ok::<_, ClientError>(v),
                Err(e) => match $self.retry_delay(&e, deadline, &mut delay) {
                    Some(d) => tokio::time::sleep(d).await,
                    None => break Err(e),
                },
            }
        }
    }};
}

/// A reconnecting pool of connections to one memory server.
#[derive(Debug)]
pub struct Client {
    cfg: Arc<ClientConfig>,
    slots: Vec<tokio::sync::Mutex<Option<Connection>>>,
    next: AtomicUsize,
    limits: Limits,
    server_id: u64,
}

impl Client {
    /// Connects the first connection (failing fast if the server cannot be
    /// reached or refuses the credential); the others connect on first use.
    pub async fn connect(cfg: ClientConfig) -> Result<Self, ClientError> {
        let first = Connection::connect(&cfg).await?;
        let limits = first.limits();
        let server_id = first.server_id();
        let n = cfg.connections.max(1);
        let slots = (0..n)
            .map(|i| tokio::sync::Mutex::new((i == 0).then(|| first.clone())))
            .collect();
        Ok(Self {
            cfg: Arc::new(cfg),
            slots,
            next: AtomicUsize::new(0),
            limits,
            server_id,
        })
    }

    /// Limits the server announced.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The server's pool identity (as of the first connection).
    pub fn server_id(&self) -> u64 {
        self.server_id
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        &self.cfg.addr
    }

    /// A live connection, reconnecting with backoff until `deadline`.
    async fn connection(&self, deadline: Instant) -> Result<Connection, ClientError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let mut delay = self.cfg.backoff_initial;
        loop {
            match Connection::connect(&self.cfg).await {
                Ok(c) => {
                    *slot = Some(c.clone());
                    return Ok(c);
                }
                Err(e) if e.is_retryable() && Instant::now() + delay < deadline => {
                    tracing::debug!(addr = %self.cfg.addr, error = %e, ?delay, "reconnecting");
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(self.cfg.backoff_max);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Delay before the next retry, or `None` when `err` is final or the
    /// deadline is too close.
    fn retry_delay(
        &self,
        err: &ClientError,
        deadline: Instant,
        delay: &mut Duration,
    ) -> Option<Duration> {
        if !err.is_retryable() || Instant::now() + *delay >= deadline {
            return None;
        }
        tracing::debug!(addr = %self.cfg.addr, error = %err, "retrying request");
        let d = jitter(*delay);
        *delay = (*delay * 2).min(self.cfg.backoff_max);
        Some(d)
    }

    /// Stores pages (any number; split into batches); returns one status
    /// per page.
    pub async fn put(&self, pages: &[(u64, &Page)]) -> Result<Vec<PageStatus>, ClientError> {
        let mut out = Vec::with_capacity(pages.len());
        for chunk in pages.chunks(self.limits.max_batch_pages as usize) {
            out.extend(with_retry!(self, |c| c.put(chunk))?);
        }
        Ok(out)
    }

    /// Fetches pages into `out` (any number; split into batches); returns
    /// one status per page.
    pub async fn get(
        &self,
        handles: &[u64],
        out: &mut [Page],
    ) -> Result<Vec<PageStatus>, ClientError> {
        assert_eq!(handles.len(), out.len(), "one output page per handle");
        let batch = self.limits.max_batch_pages as usize;
        let mut statuses = Vec::with_capacity(handles.len());
        for (hs, dst) in handles.chunks(batch).zip(out.chunks_mut(batch)) {
            statuses.extend(with_retry!(self, |c| c.get(hs, dst))?);
        }
        Ok(statuses)
    }

    /// Frees pages (any number); returns one status per page.
    pub async fn free(&self, handles: &[u64]) -> Result<Vec<PageStatus>, ClientError> {
        let mut out = Vec::with_capacity(handles.len());
        for chunk in handles.chunks(self.limits.max_batch_pages as usize) {
            out.extend(with_retry!(self, |c| c.free(chunk))?);
        }
        Ok(out)
    }

    /// The server's usage as seen by this tenant.
    pub async fn stat(&self) -> Result<Stat, ClientError> {
        with_retry!(self, |c| c.stat())
    }
}

fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::random_range(0.5..1.0);
    d.mul_f64(f)
}

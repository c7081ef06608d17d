//! Following the coordinator that leads, across a list of replicas.
//!
//! A member or `rmemctl` is given every coordinator replica's endpoint
//! (`--coordinator a,b,c`, `RMEM_ENDPOINT`, the config files). Only the
//! replica etcd elected serves; the others refuse every call with
//! `rmem-reason: not_leader` and, when they know it, the leader's address
//! in `rmem-leader` (or do not listen at all while they wait to be
//! elected). [`LeaderChannel`] is the one channel the control client's
//! stubs use: it sends each call to the replica it believes leads, and
//! after a call that could not reach it, or that a follower refused, it
//! moves on (to the named leader, else to the next endpoint). The call
//! that found out fails with `Unavailable`, which callers already retry
//! with backoff ([`crate::control::retrying`], the member session), so the
//! retry reaches the new leader.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint};

/// Metadata key in which a follower names the replica that leads.
pub const LEADER_KEY: &str = "rmem-leader";

/// A channel to whichever coordinator replica leads.
#[derive(Debug, Clone)]
pub struct LeaderChannel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The endpoints as given (for messages and leader hints).
    names: Vec<String>,
    /// One lazily connecting channel per endpoint.
    channels: Vec<Channel>,
    /// The one believed to lead.
    current: AtomicUsize,
    /// When each endpoint last could not be reached (ms since `epoch`; 0:
    /// never): a follower's stale hint naming it is not followed for a
    /// while.
    failed: Vec<AtomicU64>,
    epoch: Instant,
}

impl LeaderChannel {
    /// Channels to every endpoint (`names[i]` reached through
    /// `endpoints[i]`), connecting on first use; `first` is tried first.
    pub(crate) fn new(
        names: Vec<String>,
        endpoints: Vec<Endpoint>,
        first: (usize, Channel),
        tls: Option<crate::grpc_tls::Connector>,
    ) -> Self {
        let channels = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                if i == first.0 {
                    first.1.clone()
                } else {
                    match &tls {
                        Some(c) => e.connect_with_connector_lazy(c.clone()),
                        None => e.connect_lazy(),
                    }
                }
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                failed: names.iter().map(|_| AtomicU64::new(0)).collect(),
                names,
                channels,
                current: AtomicUsize::new(first.0),
                epoch: Instant::now(),
            }),
        }
    }

    /// The endpoint calls go to now.
    pub fn current(&self) -> &str {
        &self.inner.names[self.inner.current.load(Ordering::Relaxed)]
    }

    /// Every endpoint, as given.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.names
    }

    /// A call sent to endpoint `used` found it not leading (or not
    /// reachable): go to `leader` if it names a known endpoint, else to
    /// the one after `used` (unless another call moved on already).
    fn move_on(&self, used: usize, leader: Option<&str>) {
        let n = self.inner.names.len();
        let next = leader
            .and_then(|l| self.inner.names.iter().position(|e| same_endpoint(e, l)))
            .filter(|&i| !self.failed_lately(i))
            .unwrap_or((used + 1) % n);
        if next != used
            && self
                .inner
                .current
                .compare_exchange(used, next, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!(
                from = %self.inner.names[used],
                to = %self.inner.names[next],
                "following the coordinator that leads"
            );
        }
    }
}

impl LeaderChannel {
    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Endpoint `i` could not be reached.
    fn failed(&self, i: usize) {
        self.inner.failed[i].store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether endpoint `i` could not be reached in the last
    /// [`STALE_HINT`].
    fn failed_lately(&self, i: usize) -> bool {
        let at = self.inner.failed[i].load(Ordering::Relaxed);
        at != 0 && self.now_ms().saturating_sub(at) < STALE_HINT.as_millis() as u64
    }
}

/// How long a replica that could not be reached is not taken for the
/// leader on a follower's word (the follower learns of the new leader
/// within about an election lease).
const STALE_HINT: Duration = Duration::from_secs(5);

/// Whether endpoint `a` (as configured: `host:port` or a URL) and `b` (as
/// a coordinator advertises itself) name the same replica.
fn same_endpoint(a: &str, b: &str) -> bool {
    let bare = |s: &str| {
        s.split_once("://")
            .map_or(s, |(_, rest)| rest)
            .trim_end_matches('/')
            .to_string()
    };
    bare(a) == bare(b)
}

/// The reason and leader hint of a refused call whose status travels in
/// the response headers (a trailers-only answer, as a refusal is).
fn refused(resp: &http::Response<Body>) -> Option<Option<String>> {
    let h = resp.headers();
    let unavailable = h
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s == "14");
    let not_leader = h
        .get(crate::control::REASON_KEY)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s == "not_leader");
    (unavailable && not_leader).then(|| {
        h.get(LEADER_KEY)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    })
}

impl tonic::codegen::Service<http::Request<Body>> for LeaderChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call readies the channel it goes to.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            // A replica that cannot be reached is passed over before the
            // request is sent (each endpoint once).
            let mut tries = me.inner.names.len();
            let (used, mut channel) = loop {
                let used = me.inner.current.load(Ordering::Acquire);
                let mut channel = me.inner.channels[used].clone();
                let ready = std::future::poll_fn(|cx| {
                    tonic::codegen::Service::<http::Request<Body>>::poll_ready(&mut channel, cx)
                })
                .await;
                match ready {
                    Ok(()) => break (used, channel),
                    Err(e) => {
                        me.failed(used);
                        me.move_on(used, None);
                        tries -= 1;
                        if tries == 0 {
                            return Ok(unavailable(&me.inner.names[used], &e));
                        }
                    }
                }
            };
            match tonic::codegen::Service::call(&mut channel, req).await {
                // Lost on the way (the replica died, a connection broke):
                // Unavailable, which callers retry, not Unknown.
                Err(e) => {
                    me.failed(used);
                    me.move_on(used, None);
                    Ok(unavailable(&me.inner.names[used], &e))
                }
                Ok(resp) => {
                    if let Some(leader) = refused(&resp) {
                        me.move_on(used, leader.as_deref());
                    }
                    Ok(resp)
                }
            }
        })
    }
}

/// The answer a call gets when its replica could not be reached: status
/// UNAVAILABLE, as a coordinator that is not there is.
fn unavailable(endpoint: &str, e: &tonic::transport::Error) -> http::Response<Body> {
    tonic::Status::unavailable(format!("coordinator {endpoint} unreachable: {e}")).into_http()
}

/// How long a lazily connecting channel waits for its replica.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_match_with_or_without_a_scheme() {
        assert!(same_endpoint("10.0.0.1:7470", "http://10.0.0.1:7470"));
        assert!(same_endpoint("http://c:7470/", "c:7470"));
        assert!(!same_endpoint("c:7470", "c:7471"));
    }

    #[tokio::test]
    async fn a_refused_call_moves_to_the_named_leader_or_the_next() {
        let names: Vec<String> = ["a:1", "b:2", "c:3"].map(String::from).into();
        let eps: Vec<Endpoint> = names
            .iter()
            .map(|n| Endpoint::from_shared(format!("http://{n}")).unwrap())
            .collect();
        let first = (0, eps[0].connect_lazy());
        let ch = LeaderChannel::new(names, eps, first, None);
        ch.move_on(0, Some("http://c:3"));
        assert_eq!(ch.current(), "c:3");
        // A late answer from a call that went to `a` moves nothing.
        ch.move_on(0, None);
        assert_eq!(ch.current(), "c:3");
        ch.move_on(2, Some("nowhere:9"));
        assert_eq!(ch.current(), "a:1");
        // A hint naming a replica that could not be reached just now is a
        // follower's stale word: the next is tried instead.
        ch.failed(2);
        ch.move_on(0, Some("c:3"));
        assert_eq!(ch.current(), "b:2");
    }
}

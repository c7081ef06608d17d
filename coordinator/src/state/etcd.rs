//! The coordinator's records in etcd, and the election of the one replica
//! that may write them.
//!
//! Several coordinator replicas share one etcd. Each grants itself an etcd
//! lease and campaigns (etcd's election service) under `PREFIX election`;
//! the replica whose election key is oldest leads, loads the records and
//! serves. Every write it makes is a transaction whose first comparison
//! is that its election key still has the create revision it won with: a
//! replica whose lease expired (stalled, cut off) can never write again,
//! even before it notices. When it notices (the lease's keep-alive fails
//! for a lease period, or a write is refused) it stops serving; the
//! supervisor starts it again as a candidate, as Kubernetes' controller
//! managers do.
//!
//! Keys under `PREFIX` (default `/rmem/`):
//!
//! | key | value |
//! | --- | --- |
//! | `election/<lease id>` | a candidate's gRPC address (etcd's election keys) |
//! | `log/<seq, 20 digits>` | one [`Record`] (JSON), appended by the leader |
//! | `snap/current` | `<generation> <first log seq after it> <chunks>` |
//! | `snap/<generation, 20 digits>/<chunk, 6 digits>` | the snapshot's records, one JSON per line |
//!
//! An append is one key (a few hundred bytes), so a write costs one etcd
//! round trip and a fsync of etcd's own log. Compaction writes the
//! snapshot in chunks of at most [`CHUNK`] bytes (etcd takes requests up to
//! 1.5 MiB), then in one transaction points `snap/current` at it and
//! deletes the log keys it covers and every older snapshot. Loading reads
//! the snapshot's chunks and the log after it in pages, so no response
//! nears gRPC's message limit however many members and intervals there
//! are. etcd keeps old revisions until it compacts its own history: run it
//! with `--auto-compaction-retention` (see docs/DEPLOY.md).

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaderKey, SortOrder, SortTarget, Txn,
    TxnOp,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Record, StateError, StateStore};

/// Largest snapshot chunk, in bytes.
const CHUNK: usize = 512 << 10;

/// Log keys read per request when loading.
const PAGE: i64 = 512;

/// How long a replica keeps trying to reach etcd when it starts.
const START_WITHIN: Duration = Duration::from_secs(60);

/// A leader stops acting this fraction of the election TTL before etcd
/// could let its lease expire.
const MARGIN: u32 = 5;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the coordinator's state lives in etcd, and how it is elected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Client URLs of etcd's members (`http://HOST:PORT`).
    pub endpoints: Vec<String>,
    /// Prefix of every key rmem writes; ends with `/`.
    pub prefix: String,
    /// The election lease: a leader that stops renewing it for this long is
    /// replaced.
    pub election_ttl: Duration,
    /// This replica's gRPC address, as members reach it (the election's
    /// value: followers name it as the leader).
    pub advertise: String,
    /// TLS to etcd (https:// endpoints).
    pub tls: Option<EtcdTls>,
}

/// What this replica needs to reach etcd over TLS, read once at start.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's certificates (PEM).
    pub ca: Vec<u8>,
    /// This replica's client certificate and key (PEM), if etcd checks
    /// them.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl EtcdTls {
    /// Reads the files `config` names; None for http:// endpoints.
    pub fn read(config: &crate::config::EtcdConfig) -> Result<Option<Self>, StateError> {
        if !config.tls() {
            return Ok(None);
        }
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| StateError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        let Some(ca) = &config.ca_file else {
            return Ok(None);
        };
        let identity = match (&config.cert_file, &config.key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Ok(Some(Self {
            ca: read(ca)?,
            identity,
        }))
    }

    fn options(&self) -> etcd_client::TlsOptions {
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&self.ca));
        match &self.identity {
            Some((cert, key)) => tls.identity(etcd_client::Identity::from_pem(cert, key)),
            None => tls,
        }
    }
}

/// Whether this replica still leads, checked without etcd: every call of a
/// leader-only service and every action of the coordinator's own (fencing,
/// expiring leases) asks it first.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// Cancelled once this replica no longer leads.
    deposed: CancellationToken,
    /// Until when the election lease surely holds (see [`keep_alive`]).
    valid_until: Arc<Mutex<Instant>>,
    /// The address of the replica that leads, as etcd last said (empty
    /// while none does, or while etcd does not answer).
    leader: Arc<Mutex<String>>,
    /// Whether etcd answered the last time this replica watched the
    /// election (false once the watch broke and could not be made again).
    reachable: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Leadership {
    fn default() -> Self {
        Self::new()
    }
}

impl Leadership {
    /// Not leading (yet).
    pub fn new() -> Self {
        Self {
            deposed: CancellationToken::new(),
            valid_until: Arc::new(Mutex::new(Instant::now())),
            leader: Arc::new(Mutex::new(String::new())),
            reachable: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// Whether etcd answers this replica (as its watch of the election
    /// last found): with no leader and no etcd, calls are refused
    /// `state_unavailable` rather than `not_leader`.
    pub fn etcd_reachable(&self) -> bool {
        self.reachable.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The address of the replica that leads, as etcd last said; empty if
    /// unknown.
    pub fn leader(&self) -> String {
        lock(&self.leader).clone()
    }

    /// Leads surely: not deposed, and the election lease renewed recently
    /// enough that etcd cannot have elected another.
    pub fn holds(&self) -> bool {
        !self.deposed.is_cancelled() && Instant::now() < *lock(&self.valid_until)
    }

    /// Cancelled once this replica no longer leads.
    pub fn deposed(&self) -> CancellationToken {
        self.deposed.clone()
    }
}

/// The etcd-backed [`StateStore`] of the elected replica.
#[derive(Debug)]
pub struct EtcdStore {
    jobs: mpsc::UnboundedSender<Job>,
    leadership: Leadership,
    endpoints: String,
    /// The next log key's sequence number.
    next_seq: u64,
    /// The newest snapshot generation written or tried (loaded: the live
    /// one); the next compaction writes the one after.
    generation: u64,
    appended: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What an operator sees of the replicas and of etcd (`rmemctl status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdView {
    /// The replica that leads, as etcd last said.
    pub leader: String,
    /// Every replica campaigning, the leader first.
    pub replicas: Vec<String>,
    pub endpoints: String,
    /// "healthy, etcd VERSION", or why not.
    pub health: String,
}

/// Asks the etcd thread for an [`EtcdView`], without the coordinator's
/// lock (etcd may be slow to answer).
#[derive(Debug, Clone)]
pub struct Inspector {
    jobs: mpsc::UnboundedSender<Job>,
    endpoints: String,
    leadership: Leadership,
}

impl Inspector {
    /// Blocking (at most about a second more than etcd takes to answer).
    pub fn inspect(&self) -> EtcdView {
        let (tx, rx) = std_mpsc::sync_channel(1);
        let (replicas, health) = match self.jobs.send(Job::Inspect(tx)) {
            Ok(()) => rx
                .recv()
                .unwrap_or_else(|_| (Vec::new(), "this replica stopped".into())),
            Err(_) => (Vec::new(), "this replica stopped".into()),
        };
        EtcdView {
            leader: self.leadership.leader(),
            replicas,
            endpoints: self.endpoints.clone(),
            health,
        }
    }
}

/// A request to the etcd thread.
enum Job {
    Load(std_mpsc::SyncSender<Result<Loaded, etcd_client::Error>>),
    /// The candidates' addresses (oldest first) and etcd's health.
    Inspect(std_mpsc::SyncSender<(Vec<String>, String)>),
    /// The store is dropped: resign and end (inspectors may still hold a
    /// sender, so the channel closing cannot say it).
    Stop,
    /// A guarded put of one log key; false when the guard failed.
    Append {
        seq: u64,
        body: Vec<u8>,
        done: std_mpsc::SyncSender<Result<bool, etcd_client::Error>>,
    },
    Compact {
        generation: u64,
        first_seq: u64,
        chunks: Vec<Vec<u8>>,
        done: std_mpsc::SyncSender<Result<bool, etcd_client::Error>>,
    },
}

struct Loaded {
    records: Vec<Vec<u8>>,
    generation: u64,
    next_seq: u64,
}

impl EtcdStore {
    /// Connects to etcd, campaigns, and returns once this replica leads
    /// (blocking: call it off the async runtime). While it waits,
    /// `leadership` names the replica that leads.
    /// Gives up (resigning) once `cancel` is cancelled.
    pub fn lead(
        options: &EtcdOptions,
        leadership: Leadership,
        cancel: CancellationToken,
    ) -> Result<Self, StateError> {
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let endpoints = options.endpoints.join(",");
        let thread = {
            let (options, l) = (options.clone(), leadership.clone());
            std::thread::Builder::new()
                .name("rmem-etcd".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(Fail::Runtime(e)));
                            return;
                        }
                    };
                    rt.block_on(run(options, jobs_rx, l, cancel, ready_tx));
                })
                .map_err(|source| StateError::Io {
                    path: "the etcd thread".into(),
                    source,
                })?
        };
        let fail = |op: &'static str, source| StateError::Etcd {
            endpoints: endpoints.clone(),
            op,
            source,
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(Fail::Etcd(op, e))) => return Err(fail(op, e)),
            Ok(Err(Fail::Cancelled)) => {
                return Err(StateError::Io {
                    path: "etcd".into(),
                    source: std::io::Error::other("stopped before this replica was elected"),
                });
            }
            Ok(Err(Fail::Runtime(source))) => {
                return Err(StateError::Io {
                    path: "the etcd thread's runtime".into(),
                    source,
                });
            }
            Err(_) => return Err(StateError::Deposed),
        }
        Ok(Self {
            jobs,
            leadership,
            endpoints,
            next_seq: 0,
            generation: 0,
            appended: 0,
            thread: Some(thread),
        })
    }

    /// Reads the replicas and etcd's health for status reports.
    pub fn inspector(&self) -> Inspector {
        Inspector {
            jobs: self.jobs.clone(),
            endpoints: self.endpoints.clone(),
            leadership: self.leadership.clone(),
        }
    }

    /// This replica's leadership, to check before acting.
    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    fn ask<T>(
        &self,
        op: &'static str,
        job: impl FnOnce(std_mpsc::SyncSender<Result<T, etcd_client::Error>>) -> Job,
    ) -> Result<T, StateError> {
        // A std channel: the caller may be on the async runtime, which
        // must not block on a tokio one (waiting for etcd is as blocking as
        // the file log's fdatasync, and as short).
        let (tx, rx) = std_mpsc::sync_channel(1);
        if !self.leadership.holds() || self.jobs.send(job(tx)).is_err() {
            return Err(StateError::Deposed);
        }
        // Waited for only while this replica surely leads: past that, the
        // caller (holding the coordinator's lock) must not go on as if it
        // did, and a write whose outcome is unknown ends the leadership.
        let answer = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(a) => break a,
                Err(std_mpsc::RecvTimeoutError::Timeout) if self.leadership.holds() => {}
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    tracing::error!(op, "etcd did not answer while this coordinator surely led");
                    self.leadership.deposed.cancel();
                    return Err(StateError::Deposed);
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return Err(StateError::Deposed),
            }
        };
        match answer {
            Ok(v) => Ok(v),
            Err(source) => Err(StateError::Etcd {
                endpoints: self.endpoints.clone(),
                op,
                source,
            }),
        }
    }

    /// A guarded write that found another leader.
    fn deposed_now(&self) -> StateError {
        tracing::error!("a write to etcd found that this coordinator no longer leads");
        self.leadership.deposed.cancel();
        StateError::Deposed
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // The thread resigns (revokes its lease) and ends.
        let _ = self.jobs.send(Job::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl StateStore for EtcdStore {
    fn load(&mut self) -> Result<Vec<Record>, StateError> {
        let loaded = self.ask("load", Job::Load)?;
        self.next_seq = loaded.next_seq;
        self.generation = loaded.generation;
        self.appended = 0;
        loaded
            .records
            .iter()
            .enumerate()
            .map(|(index, body)| {
                serde_json::from_slice(body).map_err(|e| StateError::Corrupt {
                    path: format!("etcd {}", self.endpoints),
                    index,
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    fn append(&mut self, record: &Record) -> Result<(), StateError> {
        let body = serde_json::to_vec(record).expect("records serialize");
        let seq = self.next_seq;
        if !self.ask("append", |done| Job::Append { seq, body, done })? {
            return Err(self.deposed_now());
        }
        self.next_seq += 1;
        self.appended += 1;
        Ok(())
    }

    fn compact(&mut self, snapshot: &[Record]) -> Result<(), StateError> {
        let mut chunks = vec![Vec::new()];
        for r in snapshot {
            let line = serde_json::to_vec(r).expect("records serialize");
            let last = chunks.last_mut().expect("one chunk at least");
            if !last.is_empty() && last.len() + line.len() + 1 > CHUNK {
                chunks.push(Vec::new());
            }
            let last = chunks.last_mut().expect("one chunk at least");
            last.extend_from_slice(&line);
            last.push(b'\n');
        }
        // A generation is never written twice: an attempt that failed (or
        // whose answer was lost after it switched) is never the one
        // overwritten by the next, which also drops every older one.
        let (generation, first_seq) = (self.generation + 1, self.next_seq);
        self.generation = generation;
        let done = self.ask("compact", |done| Job::Compact {
            generation,
            first_seq,
            chunks,
            done,
        })?;
        if !done {
            return Err(self.deposed_now());
        }
        self.appended = 0;
        Ok(())
    }

    fn appended(&self) -> usize {
        self.appended
    }

    fn leads(&self) -> bool {
        self.leadership.holds()
    }
}

enum Fail {
    Etcd(&'static str, etcd_client::Error),
    /// The replica stopped before it was elected.
    Cancelled,
    Runtime(std::io::Error),
}

/// Keys of one prefix.
struct Keys(String);

impl Keys {
    fn election(&self) -> String {
        format!("{}election", self.0)
    }
    fn log(&self, seq: u64) -> String {
        format!("{}log/{seq:020}", self.0)
    }
    /// Just past every log key.
    fn log_end(&self) -> String {
        format!("{}log0", self.0)
    }
    fn current(&self) -> String {
        format!("{}snap/current", self.0)
    }
    fn generation(&self, generation: u64) -> String {
        format!("{}snap/{generation:020}/", self.0)
    }
    fn chunk(&self, generation: u64, chunk: usize) -> String {
        format!("{}{chunk:06}", self.generation(generation))
    }
}

/// The etcd thread: connect, take a lease, campaign, then serve jobs while
/// keeping the lease alive.
async fn run(
    options: EtcdOptions,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    leadership: Leadership,
    cancel: CancellationToken,
    ready: std_mpsc::SyncSender<Result<(), Fail>>,
) {
    let Leadership {
        deposed,
        valid_until,
        leader,
        reachable,
    } = leadership;
    let keys = Keys(options.prefix.clone());
    let ttl = options.election_ttl.as_secs().max(1) as i64;
    // A request etcd does not answer within a TTL fails (the change it
    // carries is refused; the lease decides who leads).
    let base = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        // HTTP/2 pings no more often than etcd accepts (it closes a
        // connection pinged more than every 5 s: --grpc-keepalive-min-time).
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
    let base = match &options.tls {
        Some(tls) => base.with_tls(tls.options()),
        None => base,
    };
    let connect = base.clone().with_timeout(options.election_ttl);
    // etcd may not be up yet (started together, restarting): try again
    // with backoff, saying so each time, for at most START_WITHIN.
    let give_up = Instant::now() + START_WITHIN;
    let mut pause = Duration::from_millis(100);
    let (mut client, mut campaigner, lease) = loop {
        let started = async {
            // The campaign waits for as long as another leads: on a client
            // of its own, with no request timeout.
            let campaigner = Client::connect(&options.endpoints, Some(base.clone()))
                .await
                .map_err(|e| Fail::Etcd("connect", e))?;
            let mut client = Client::connect(&options.endpoints, Some(connect.clone()))
                .await
                .map_err(|e| Fail::Etcd("connect", e))?;
            let life = options.election_ttl;
            *lock(&valid_until) = Instant::now() + life - life / MARGIN;
            let lease = client
                .lease_grant(ttl, None)
                .await
                .map_err(|e| Fail::Etcd("grant the election lease", e))?
                .id();
            Ok::<_, Fail>((client, campaigner, lease))
        };
        let started = tokio::select! {
            r = started => r,
            _ = cancel.cancelled() => Err(Fail::Cancelled),
        };
        match started {
            Ok(v) => break v,
            Err(Fail::Etcd(op, e)) if Instant::now() + pause < give_up => {
                reachable.store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(etcd = %options.endpoints.join(","), error = %e, retry_in = ?pause, "etcd: {op} failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        }
    };
    // The lease lives from now on, elected or not; `lapsed` is cancelled
    // when it ends.
    let mut lease = lease;
    let mut lapsed = CancellationToken::new();
    let elected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = client.clone();
    let keep = |lease: i64, lapsed: &CancellationToken| {
        tokio::spawn(keep_alive(
            renewer.clone(),
            lease,
            options.election_ttl,
            lapsed.clone(),
            valid_until.clone(),
            elected.clone(),
        ))
    };
    let mut keeper = keep(lease, &lapsed);
    let leader_seen = leader.clone();
    let observer = tokio::spawn(observe(
        campaigner.clone(),
        keys.election(),
        leader,
        reachable.clone(),
    ));
    // A campaign can wait for hours: one that breaks (etcd restarting, a
    // connection lost) is made again, with the same lease while it lives.
    // A standby whose lease lapsed (etcd away or slow for a TTL) never led,
    // so nothing it did is in doubt: it takes a new lease and campaigns
    // again, for as long as etcd takes to come back.
    let leader = loop {
        let attempt = tokio::select! {
            l = campaign(&mut campaigner, &keys, lease, &options.advertise) => Some(l),
            _ = lapsed.cancelled() => None,
            _ = cancel.cancelled() => break Err(Fail::Cancelled),
        };
        match attempt {
            Some(Ok(l)) => break Ok(l),
            Some(Err(Fail::Etcd(_, e))) => {
                tracing::warn!(error = %e, "the campaign broke off; campaigning again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Some(Err(e)) => break Err(e),
            None => {
                tracing::warn!(
                    "the election lease lapsed before this replica was elected: campaigning again with a new one"
                );
                // No answer for a TTL: callers hear that etcd is away
                // (sooner than the election watch's pings find it).
                reachable.store(false, std::sync::atomic::Ordering::Relaxed);
                lock(&leader_seen).clear();
                // The old candidate key goes with its lease (at once if
                // etcd still answers, else when the lease expires there).
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
                let mut pause = Duration::from_millis(200);
                let granted = loop {
                    let life = options.election_ttl;
                    *lock(&valid_until) = Instant::now() + life - life / MARGIN;
                    let grant = tokio::select! {
                        g = client.lease_grant(ttl, None) => g,
                        _ = cancel.cancelled() => break Err(Fail::Cancelled),
                    };
                    match grant {
                        Ok(g) => break Ok(g.id()),
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?pause, "etcd: grant the election lease failed; trying again");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(5));
                        }
                    }
                };
                match granted {
                    Ok(id) => lease = id,
                    Err(e) => break Err(e),
                }
                reachable.store(true, std::sync::atomic::Ordering::Relaxed);
                lapsed = CancellationToken::new();
                keeper = keep(lease, &lapsed);
            }
        }
    };
    let leader = match leader {
        Ok(l) => l,
        Err(e) => {
            keeper.abort();
            observer.abort();
            let _ = client.lease_revoke(lease).await;
            let _ = ready.send(Err(e));
            return;
        }
    };
    tracing::info!(
        key = %String::from_utf8_lossy(leader.key()),
        revision = leader.rev(),
        "elected: this coordinator leads"
    );
    // From now on the lease ending ends the leadership.
    elected.store(true, std::sync::atomic::Ordering::Relaxed);
    {
        let (lapsed, deposed) = (lapsed.clone(), deposed.clone());
        tokio::spawn(async move {
            lapsed.cancelled().await;
            deposed.cancel();
        });
    }
    if lapsed.is_cancelled() {
        deposed.cancel();
    }
    let _ = ready.send(Ok(()));
    let guard = Compare::create_revision(leader.key(), CompareOp::Equal, leader.rev());
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Load(done) => {
                let _ = done.send(load(&mut client, &keys).await);
            }
            Job::Inspect(done) => {
                let _ = done.send(inspect(&mut client, &keys).await);
            }
            Job::Stop => break,
            Job::Append { seq, body, done } => {
                let key = keys.log(seq);
                let txn = Txn::new()
                    .when([
                        guard.clone(),
                        Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    ])
                    .and_then([TxnOp::put(key.clone(), body.clone(), None)]);
                let r = match client.txn(txn).await {
                    Ok(r) => Ok(r.succeeded()),
                    // No answer: the write may have been made. Read it back,
                    // so one that was is not taken for a failure (the next
                    // append would find its key taken and depose a healthy
                    // leader, and the caller would make the change twice).
                    Err(e) => match client.get(key, None).await {
                        Ok(g) if g.kvs().first().is_some_and(|kv| kv.value() == body) => Ok(true),
                        _ => Err(e),
                    },
                };
                let _ = done.send(r);
            }
            Job::Compact {
                generation,
                first_seq,
                chunks,
                done,
            } => {
                let r = compact(&mut client, &keys, &guard, (generation, first_seq), chunks).await;
                let _ = done.send(r);
            }
        }
    }
    // The store was dropped (the coordinator stops): step down at once so
    // another replica need not wait for the lease to expire.
    keeper.abort();
    observer.abort();
    if deposed.is_cancelled() {
        return; // nothing to give up
    }
    match tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await {
        Ok(Ok(_)) => tracing::info!("resigned: another coordinator can be elected at once"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not resign (the election lease expires on its own)");
        }
        Err(_) => tracing::warn!(
            "etcd did not answer the resignation (the election lease expires on its own)"
        ),
    }
}

/// Keeps `leader` set to the address of the replica that leads (etcd's
/// observe stream of the election), reopening the stream when it breaks;
/// while it cannot, no leader is named (the last one may be gone too) and
/// `reachable` says etcd does not answer.
async fn observe(
    mut client: Client,
    election: String,
    leader: Arc<Mutex<String>>,
    reachable: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    loop {
        match client.observe(election.clone()).await {
            Ok(mut stream) => {
                reachable.store(true, Ordering::Relaxed);
                while let Ok(Some(r)) = stream.message().await {
                    if let Some(kv) = r.kv() {
                        let now = String::from_utf8_lossy(kv.value()).into_owned();
                        let mut l = lock(&leader);
                        if *l != now {
                            tracing::info!(leader = %now, "the coordinators' leader");
                            *l = now;
                        }
                    }
                }
            }
            Err(e) => {
                if reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "etcd does not answer: no coordinator can be elected until it does");
                }
                lock(&leader).clear();
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until this replica's election key is the oldest.
async fn campaign(
    client: &mut Client,
    keys: &Keys,
    lease: i64,
    advertise: &str,
) -> Result<LeaderKey, Fail> {
    // Who leads now, for the log (none when this is the first replica).
    if let Ok(r) = client.leader(keys.election()).await
        && let Some(kv) = r.kv()
    {
        tracing::info!(leader = %String::from_utf8_lossy(kv.value()), "another coordinator leads: waiting to be elected");
    }
    let mut r = client
        .campaign(keys.election(), advertise, lease)
        .await
        .map_err(|e| Fail::Etcd("campaign", e))?;
    r.take_leader().ok_or_else(|| {
        Fail::Etcd(
            "campaign",
            etcd_client::Error::InvalidArgs(
                "etcd answered the campaign without a leader key".into(),
            ),
        )
    })
}

/// Renews the election lease every third of its TTL. It lapses (and a
/// replica that leads is deposed) once the lease is gone, or at the end of the TTL counted from
/// the last renewal etcd confirmed (from when it was sent: etcd renewed
/// it later), less a fifth for safety: it stops before etcd can elect
/// another.
async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    lapsed: CancellationToken,
    valid_until: Arc<Mutex<Instant>>,
    elected: Arc<std::sync::atomic::AtomicBool>,
) {
    let leads = || elected.load(std::sync::atomic::Ordering::Relaxed);
    let every = ttl / 3;
    let mut stream = None;
    loop {
        let sent = Instant::now();
        // Waited for as long as it can still help (an answer credits the
        // lease from `sent`), but not past the lease: an etcd that does not
        // answer must not hold off the check below.
        let bound = lock(&valid_until).saturating_duration_since(sent);
        let alive = match tokio::time::timeout(bound, renew(&mut client, lease, &mut stream)).await
        {
            Ok(alive) => alive,
            Err(_) => {
                // The answer may still come: on this stream it would be
                // taken for the next request's, crediting the lease with a
                // renewal later than the one etcd made. A new stream.
                stream = None;
                None
            }
        };
        match alive {
            Some(true) => *lock(&valid_until) = sent + ttl - ttl / MARGIN,
            Some(false) => {
                if leads() {
                    tracing::error!("the election lease expired: this coordinator no longer leads");
                }
                lapsed.cancel();
                return;
            }
            None => {}
        }
        let until = *lock(&valid_until);
        if Instant::now() >= until {
            if leads() {
                tracing::error!(
                    "etcd did not renew the election lease in time: this coordinator no longer leads"
                );
            }
            lapsed.cancel();
            return;
        }
        tokio::time::sleep(every.min(until - Instant::now())).await;
    }
}

/// One renewal of the election lease on `stream` (opened first if need
/// be): whether the lease still lives, `None` if etcd did not say.
async fn renew(
    client: &mut Client,
    lease: i64,
    stream: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
) -> Option<bool> {
    if stream.is_none() {
        *stream = client.lease_keep_alive(lease).await.ok();
    }
    let (keeper, answers) = stream.as_mut()?;
    let answer = match keeper.keep_alive().await {
        Ok(()) => answers.message().await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(Some(r)) => Some(r.ttl() > 0),
        _ => {
            *stream = None;
            None
        }
    }
}

/// The election's candidates (oldest first) and etcd's health, each
/// bounded by a second.
async fn inspect(client: &mut Client, keys: &Keys) -> (Vec<String>, String) {
    let second = Duration::from_secs(1);
    let candidates = tokio::time::timeout(
        second,
        client.get(
            format!("{}/", keys.election()),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend),
            ),
        ),
    )
    .await;
    let replicas = match candidates {
        Ok(Ok(r)) => r
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .collect(),
        _ => Vec::new(),
    };
    let health = match tokio::time::timeout(second, client.status()).await {
        Ok(Ok(s)) => format!("healthy, etcd {}", s.version()),
        Ok(Err(e)) => format!("unhealthy: {e}"),
        Err(_) => "unhealthy: no answer within 1s".into(),
    };
    (replicas, health)
}

/// The snapshot, then the log keys after it.
async fn load(client: &mut Client, keys: &Keys) -> Result<Loaded, etcd_client::Error> {
    let mut records = Vec::new();
    let (mut generation, mut next_seq) = (0, 0);
    let current = client.get(keys.current(), None).await?;
    if let Some(kv) = current.kvs().first() {
        let text = String::from_utf8_lossy(kv.value()).into_owned();
        let parsed: Vec<u64> = text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        let [g, first, chunks] = parsed[..] else {
            return Err(etcd_client::Error::InvalidArgs(format!(
                "{} holds `{text}`, not `GENERATION FIRST-SEQ CHUNKS`",
                keys.current()
            )));
        };
        (generation, next_seq) = (g, first);
        for c in 0..chunks as usize {
            let r = client.get(keys.chunk(g, c), None).await?;
            let Some(kv) = r.kvs().first() else {
                return Err(etcd_client::Error::InvalidArgs(format!(
                    "snapshot chunk {} is missing",
                    keys.chunk(g, c)
                )));
            };
            records.extend(
                kv.value()
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(<[u8]>::to_vec),
            );
        }
    }
    let mut from = keys.log(next_seq);
    loop {
        let page = client
            .get(
                from.clone(),
                Some(
                    GetOptions::new()
                        .with_range(keys.log_end())
                        .with_sort(SortTarget::Key, SortOrder::Ascend)
                        .with_limit(PAGE),
                ),
            )
            .await?;
        let kvs = page.kvs();
        for kv in kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let seq: u64 = key
                .rsplit('/')
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| etcd_client::Error::InvalidArgs(format!("log key `{key}`")))?;
            next_seq = seq + 1;
            records.push(kv.value().to_vec());
        }
        match kvs.last() {
            Some(kv) if page.more() => {
                let mut next = kv.key().to_vec();
                next.push(0);
                from = String::from_utf8_lossy(&next).into_owned();
            }
            _ => break,
        }
    }
    Ok(Loaded {
        records,
        generation,
        next_seq,
    })
}

/// Writes the snapshot's chunks, then switches to it and drops what it
/// replaces in one transaction. False when the guard failed.
async fn compact(
    client: &mut Client,
    keys: &Keys,
    guard: &Compare,
    (generation, first_seq): (u64, u64),
    chunks: Vec<Vec<u8>>,
) -> Result<bool, etcd_client::Error> {
    let count = chunks.len();
    for (c, chunk) in chunks.into_iter().enumerate() {
        let txn = Txn::new().when([guard.clone()]).and_then([TxnOp::put(
            keys.chunk(generation, c),
            chunk,
            None,
        )]);
        if !client.txn(txn).await?.succeeded() {
            return Ok(false);
        }
    }
    let txn = Txn::new().when([guard.clone()]).and_then([
        TxnOp::put(
            keys.current(),
            format!("{generation} {first_seq} {count}"),
            None,
        ),
        TxnOp::delete(
            keys.log(0),
            Some(etcd_client::DeleteOptions::new().with_range(keys.log(first_seq))),
        ),
        // Every older generation: the one replaced, and any attempt that
        // stopped half way.
        TxnOp::delete(
            keys.generation(0),
            Some(etcd_client::DeleteOptions::new().with_range(keys.generation(generation))),
        ),
    ]);
    Ok(client.txn(txn).await?.succeeded())
}

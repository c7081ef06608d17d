//! The kernel backend's eviction loop, for any number of processes.
//!
//! A [`Supervisor`] owns the [`KernelAgent`] (which serves the module's
//! fetch requests) and DAMON. Processes are attached and detached while it
//! runs; every round it asks DAMON, per process, for the regions not
//! accessed for `min_age`, clips them to the process's private anonymous
//! mappings and evicts them. A process attached with a budget that still
//! holds more than it in RAM then gives up its coldest regions until it is
//! within it (see [`super::budget`]). A process that exits is dropped at the next
//! round. Detaching brings every page of the process back.
//!
//! `rmem-agent kernel --pid N` runs it for one process ([`run`]);
//! `rmem-agent serve` runs it for the processes `rmemctl attach` names
//! (see [`super::admin`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::attached::{Record, Records};
use super::budget;
use super::damon::{self, Damon, DamonConfig};
use super::service::{KernelAgent, KernelConfig, KernelError};
use super::uapi;

/// What the eviction loop runs with.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub kernel: KernelConfig,
    pub damon: DamonConfig,
    /// Between two rounds of eviction.
    pub interval: Duration,
}

/// One attached process's counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DaemonStatus {
    pub pid: i32,
    /// `/proc/PID/comm` when it was attached.
    pub command: String,
    /// The attached range; length 0 is the whole address space.
    pub start: u64,
    pub length: u64,
    pub rounds: u64,
    pub cold_bytes: u64,
    pub evicted_pages: u64,
    /// Most bytes of its anonymous memory kept in RAM; 0: no budget (only
    /// cold pages are evicted).
    pub budget_bytes: u64,
    /// Bytes of its private anonymous memory in RAM and remote at the
    /// last round, from /proc/PID/pagemap (RSS counts remote pages too).
    pub local_bytes: u64,
    pub remote_bytes: u64,
    /// Pages brought back by the detach.
    pub restored_pages: u64,
    pub process_exited: bool,
    /// Redundancy of its evicted pages (`none`, `replicas=N`, `ec=K+M`).
    pub redundancy: String,
    /// Evictions that failed (the pages stayed local), and the last reason.
    pub evict_errors: u64,
    pub last_error: Option<String>,
    pub attached_seconds: f64,
}

/// Agent-wide counters: the module does not say which process a fetch or
/// a free belongs to, so these are not per process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AgentTotals {
    pub fetched_pages: u64,
    /// Of `fetched_pages`, those served by another copy than the first
    /// asked, or rebuilt from their stripe (a server was failing).
    pub fetched_degraded_pages: u64,
    /// Fetches answered with an error: the faulting task got SIGBUS (the
    /// redundancy was exhausted, or a lone copy's server was gone).
    pub failed_fetches: u64,
    pub freed_pages: u64,
    pub kept_local_pages: u64,
    /// The module's counters (zero if it could not be asked).
    pub skipped_ksm_pages: u64,
    pub skipped_locked_pages: u64,
    pub skipped_mapping_pages: u64,
    pub stuck_faults: u64,
    /// Faults the module gave up waiting on the agent for (SIGBUS).
    pub fetch_timeouts: u64,
    /// Pages the module brought back ahead of a fault.
    pub prefetched_pages: u64,
}

/// Why attaching or detaching failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("process {0} is already attached")]
    AlreadyAttached(i32),
    #[error("process {0} is not attached")]
    NotAttached(i32),
    #[error("no process {0}")]
    NoProcess(i32),
    #[error("invalid range: {0}")]
    Range(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

#[derive(Debug)]
struct Proc {
    att: u64,
    since: Instant,
    status: DaemonStatus,
    /// The redundancy asked for it (`None`: the agent's).
    policy: Option<rmem_common::Redundancy>,
}

impl Proc {
    fn record(&self) -> Record {
        Record {
            id: self.att,
            pid: self.status.pid,
            budget_bytes: self.status.budget_bytes,
            redundancy: self.policy.map(|p| p.to_string()),
        }
    }
}

#[derive(Debug)]
struct Inner {
    damon: Damon,
    procs: BTreeMap<i32, Proc>,
}

impl Inner {
    /// Points DAMON at exactly the attached processes.
    fn rewatch(&mut self) -> Result<(), KernelError> {
        let pids: Vec<i32> = self.procs.keys().copied().collect();
        self.damon.watch(&pids).map_err(KernelError::Monitor)
    }
}

/// Attached processes and the loop that evicts their cold pages.
#[derive(Debug)]
pub struct Supervisor {
    agent: KernelAgent,
    inner: Mutex<Inner>,
    /// Eviction rounds since start.
    rounds: std::sync::atomic::AtomicU64,
    /// The module's counters as last read.
    last_info: Mutex<super::uapi::Info>,
    /// What the next daemon needs to take the attachments over.
    records: Records,
}

/// Whether `pid` still runs: a zombie (exited, not yet reaped by its
/// parent) has no memory left to manage.
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z" | "X" | "x"))
}

fn command_of(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

impl Supervisor {
    /// Opens the module and takes DAMON over; no process is attached yet.
    pub fn start(cfg: &DaemonConfig) -> Result<Self, KernelError> {
        // DAMON first: if another user holds it, the module is not touched.
        let damon =
            Damon::new(cfg.damon, cfg.kernel.state_dir.as_deref()).map_err(KernelError::Monitor)?;
        let agent = KernelAgent::start(cfg.kernel.clone())?;
        let sup = Self {
            agent,
            inner: Mutex::new(Inner {
                damon,
                procs: BTreeMap::new(),
            }),
            rounds: std::sync::atomic::AtomicU64::new(0),
            last_info: Mutex::new(super::uapi::Info::default()),
            records: Records::new(cfg.kernel.state_dir.as_deref()),
        };
        sup.take_over();
        Ok(sup)
    }

    /// Takes over the attachments the module kept from an earlier agent
    /// (one that died, or whose detach failed): each of a live process is
    /// managed again with the budget and redundancy recorded for it (the
    /// defaults if there is no record: it is reported); one whose process
    /// exited is removed (nothing of it is left to bring back).
    fn take_over(&self) {
        let atts = match self.agent.attachments() {
            Ok(atts) => atts,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the module's attachments: none taken over");
                return;
            }
        };
        let records = self.records.load();
        let mut inner = self.lock();
        for a in atts {
            if a.flags & uapi::ATT_EXITED != 0 || !alive(a.pid) {
                match self.agent.detach(a.id) {
                    Ok(_) => tracing::info!(
                        pid = a.pid,
                        "removed an attachment of an exited process the module kept"
                    ),
                    Err(e) => {
                        tracing::warn!(pid = a.pid, error = %e, "cannot remove an attachment of an exited process")
                    }
                }
                continue;
            }
            let record = records.iter().find(|r| r.id == a.id && r.pid == a.pid);
            if record.is_none() {
                tracing::warn!(
                    pid = a.pid,
                    id = a.id,
                    "the module holds an attachment this agent has no record of: taken over with no budget and the agent's redundancy"
                );
            }
            let policy = match record.and_then(|r| r.redundancy.as_deref()).map(str::parse) {
                None => None,
                Some(Ok(p)) => Some(p),
                Some(Err(e)) => {
                    tracing::warn!(pid = a.pid, error = %e, "a recorded redundancy is not valid: taking the agent's");
                    None
                }
            };
            let policy = match self.agent.adopt(a.id, policy) {
                Ok(()) => policy,
                Err(e) => {
                    tracing::warn!(pid = a.pid, error = %e, "the recorded redundancy cannot be placed now: its next evictions take the agent's");
                    None
                }
            };
            let (start, length) = if a.flags & uapi::ATTACH_ALL != 0 {
                (0, 0)
            } else {
                (a.start, a.len)
            };
            let status = DaemonStatus {
                pid: a.pid,
                command: command_of(a.pid).unwrap_or_default(),
                start,
                length,
                budget_bytes: record.map_or(0, |r| r.budget_bytes),
                redundancy: self.agent.policy_of(a.id).to_string(),
                ..DaemonStatus::default()
            };
            tracing::info!(pid = a.pid, command = %status.command, budget_bytes = status.budget_bytes,
                redundancy = %status.redundancy, "took over an attachment the module kept from the agent's last run");
            inner.procs.insert(
                a.pid,
                Proc {
                    att: a.id,
                    since: Instant::now(),
                    status,
                    policy,
                },
            );
        }
        if let Err(e) = inner.rewatch() {
            tracing::warn!(error = %e, "DAMON cannot watch the processes taken over");
        }
        self.save(&inner, Vec::new());
    }

    /// Records what a restarted daemon needs of the attachments: those
    /// managed, and `kept` (ones the module still holds whose detach
    /// failed).
    fn save(&self, inner: &Inner, kept: Vec<Record>) {
        let mut records = kept;
        records.extend(inner.procs.values().map(Proc::record));
        self.records.save(records);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches `pid` (`range` `(start, length)`, or the whole address
    /// space) and starts watching it; with a `budget` (bytes), at most that
    /// much of its anonymous memory stays in RAM; its pages have `policy`'s
    /// redundancy (`None`: the agent's).
    pub fn attach(
        &self,
        pid: i32,
        range: Option<(u64, u64)>,
        budget: Option<u64>,
        policy: Option<rmem_common::Redundancy>,
    ) -> Result<DaemonStatus, SupervisorError> {
        if pid <= 0 {
            return Err(SupervisorError::NoProcess(pid));
        }
        if let Some((start, len)) = range {
            let page = super::uapi::PAGE_SIZE as u64;
            if len == 0 || start % page != 0 || len % page != 0 || start.checked_add(len).is_none()
            {
                return Err(SupervisorError::Range(format!(
                    "{start:#x}+{len:#x} must be non-empty and page-aligned"
                )));
            }
        }
        let mut inner = self.lock();
        if inner.procs.contains_key(&pid) {
            return Err(SupervisorError::AlreadyAttached(pid));
        }
        let command = command_of(pid)
            .filter(|_| alive(pid))
            .ok_or(SupervisorError::NoProcess(pid))?;
        let att = self
            .agent
            .attach_with(pid, range, policy)
            .map_err(|e| match e {
                KernelError::Device(io) if io.raw_os_error() == Some(libc::ESRCH) => {
                    SupervisorError::NoProcess(pid)
                }
                e => SupervisorError::Kernel(e),
            })?;
        let (start, length) = range.unwrap_or((0, 0));
        let status = DaemonStatus {
            pid,
            command,
            start,
            length,
            budget_bytes: budget.unwrap_or(0),
            redundancy: self.agent.policy_of(att).to_string(),
            ..DaemonStatus::default()
        };
        inner.procs.insert(
            pid,
            Proc {
                att,
                since: Instant::now(),
                status: status.clone(),
                policy,
            },
        );
        if let Err(e) = inner.rewatch() {
            // Without monitoring the attachment is useless: undo it.
            inner.procs.remove(&pid);
            let _ = self.agent.detach(att);
            let _ = inner.rewatch();
            return Err(e.into());
        }
        self.save(&inner, Vec::new());
        tracing::info!(pid, command = %status.command, "attached");
        Ok(status)
    }

    /// Brings every page of `pid` back and forgets it; returns its final
    /// counters.
    pub fn detach(&self, pid: i32) -> Result<DaemonStatus, SupervisorError> {
        let mut inner = self.lock();
        let p = inner
            .procs
            .remove(&pid)
            .ok_or(SupervisorError::NotAttached(pid))?;
        if let Err(e) = inner.rewatch() {
            tracing::warn!(error = %e, "DAMON could not be restarted for the other processes");
        }
        drop(inner);
        let record = p.record();
        let done = self.finish(p);
        // A failed detach leaves the attachment in the module: the next
        // daemon takes it over as it was.
        let kept = if done.is_err() {
            vec![record]
        } else {
            Vec::new()
        };
        self.save(&self.lock(), kept);
        done
    }

    fn finish(&self, mut p: Proc) -> Result<DaemonStatus, SupervisorError> {
        let restored = self.agent.detach(p.att).map_err(KernelError::from)?;
        p.status.restored_pages = restored;
        p.status.attached_seconds = p.since.elapsed().as_secs_f64();
        tracing::info!(pid = p.status.pid, restored, "detached; every page is back");
        Ok(p.status)
    }

    /// Detaches every process (on shutdown); errors are logged, and the
    /// module keeps a failed attachment for the next agent.
    pub fn detach_all(&self) -> Vec<DaemonStatus> {
        let procs = std::mem::take(&mut self.lock().procs);
        let mut done = Vec::new();
        let mut kept = Vec::new();
        for (pid, p) in procs {
            let record = p.record();
            match self.finish(p) {
                Ok(s) => done.push(s),
                Err(e) => {
                    tracing::error!(pid, error = %e,
                        "detach failed; the module keeps the attachment for the next agent");
                    kept.push(record);
                }
            }
        }
        let mut inner = self.lock();
        let _ = inner.rewatch();
        self.save(&inner, kept);
        done
    }

    /// Sets the budget of attached process `pid` (`None`: no budget).
    pub fn set_budget(&self, pid: i32, budget: Option<u64>) {
        let mut inner = self.lock();
        if let Some(p) = inner.procs.get_mut(&pid) {
            p.status.budget_bytes = budget.unwrap_or(0);
        }
        self.save(&inner, Vec::new());
    }

    /// Every attached process's counters.
    pub fn list(&self) -> Vec<DaemonStatus> {
        let inner = self.lock();
        inner
            .procs
            .values()
            .map(|p| {
                let mut s = p.status.clone();
                s.attached_seconds = p.since.elapsed().as_secs_f64();
                s
            })
            .collect()
    }

    /// The kernel agent it drives.
    pub fn agent(&self) -> &KernelAgent {
        &self.agent
    }

    /// Eviction rounds since start.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// The server the pages go to.
    pub fn server(&self) -> String {
        self.agent.server()
    }

    /// Agent-wide counters.
    pub fn totals(&self) -> AgentTotals {
        let s = self.agent.stats();
        // The module's counters; if it cannot be asked now, the last that
        // were read (counters must not fall back to zero).
        let info = {
            let mut last = self.last_info.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(i) = self.agent.device().info() {
                *last = i;
            }
            *last
        };
        AgentTotals {
            fetched_pages: s.fetched.load(Ordering::Relaxed),
            fetched_degraded_pages: s.fetched_degraded.load(Ordering::Relaxed),
            failed_fetches: s.fetch_errors.load(Ordering::Relaxed),
            freed_pages: s.freed.load(Ordering::Relaxed),
            kept_local_pages: s.kept_local.load(Ordering::Relaxed),
            skipped_ksm_pages: info.skipped_ksm,
            skipped_locked_pages: info.skipped_locked,
            skipped_mapping_pages: info.skipped_mappings,
            stuck_faults: info.stuck_faults,
            fetch_timeouts: info.fetch_timeouts,
            prefetched_pages: info.prefetched,
        }
    }

    /// One round: evicts every attached process's cold pages, then, for a
    /// process over its budget, its coldest pages until it is within it.
    /// Processes that exited are detached and returned.
    pub fn round(&self) -> Vec<DaemonStatus> {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        // The work list under the lock; evictions without it, so attach,
        // detach and list answer during a long round.
        let (work, gone) = {
            let mut inner = self.lock();
            let mut work = Vec::new();
            let mut gone = Vec::new();
            for (&pid, p) in &inner.procs {
                let maps = match damon::anonymous_mappings(pid) {
                    Ok(maps) if alive(pid) => maps,
                    _ => {
                        gone.push(pid);
                        continue;
                    }
                };
                // An attached range limits what may be evicted.
                let maps = match (p.status.start, p.status.length) {
                    (_, 0) => maps,
                    (start, len) => damon::intersect(&[(start, start + len)], &maps),
                };
                let cold = match inner.damon.cold_regions(pid) {
                    Ok(c) => damon::intersect(&c, &maps),
                    Err(e) => {
                        tracing::warn!(pid, error = %e, "DAMON gave no regions this round");
                        Vec::new()
                    }
                };
                let budget = (p.status.budget_bytes > 0).then(|| Budget {
                    pages: p.status.budget_bytes / PAGE,
                    regions: inner.damon.regions_coldest_first(pid).unwrap_or_else(|e| {
                        tracing::warn!(pid, error = %e, "DAMON gave no regions for the budget");
                        Vec::new()
                    }),
                });
                work.push(Work {
                    pid,
                    att: p.att,
                    maps,
                    cold,
                    budget,
                });
            }
            let gone: Vec<Proc> = gone
                .iter()
                .filter_map(|pid| inner.procs.remove(pid))
                .collect();
            if !gone.is_empty() {
                if let Err(e) = inner.rewatch() {
                    tracing::warn!(error = %e, "DAMON could not be restarted");
                }
                self.save(&inner, Vec::new());
            }
            (work, gone)
        };
        let mut exited = Vec::new();
        for mut p in gone {
            p.status.process_exited = true;
            tracing::info!(pid = p.status.pid, "process exited; detaching");
            match self.finish(p) {
                Ok(s) => exited.push(s),
                Err(e) => tracing::warn!(error = %e, "detach of an exited process failed"),
            }
        }
        for w in work {
            let mut done = Done::default();
            let cold_bytes = w.cold.iter().map(|(s, e)| e - s).sum();
            for &(s, e) in &w.cold {
                self.evict(&w, s, e, &mut done);
            }
            let residency = match budget::Residency::read(w.pid, &w.maps) {
                Ok(r) => Some(r),
                // It exited since the round began: the next round detaches it.
                Err(e) if !alive(w.pid) => {
                    tracing::debug!(pid = w.pid, error = %e, "process gone before its pagemap was read");
                    None
                }
                Err(e) => {
                    tracing::warn!(pid = w.pid, error = %e, "cannot read what the process holds in RAM");
                    None
                }
            };
            // (local, remote) pages after this round.
            let held = residency.map(|r| match &w.budget {
                Some(b) => {
                    let moved = self.keep_within(&w, b, &r, &mut done);
                    (r.present.saturating_sub(moved), r.remote + moved)
                }
                None => (r.present, r.remote),
            });
            let mut inner = self.lock();
            // Detached meanwhile: its counters went with it.
            if let Some(p) = inner.procs.get_mut(&w.pid).filter(|p| p.att == w.att) {
                let st = &mut p.status;
                st.rounds += 1;
                st.cold_bytes = cold_bytes;
                st.evicted_pages += done.evicted;
                st.evict_errors += done.errors;
                if let Some((local, remote)) = held {
                    st.local_bytes = local * PAGE;
                    st.remote_bytes = remote * PAGE;
                }
                if done.last_error.is_some() {
                    st.last_error = done.last_error;
                }
            }
        }
        exited
    }

    /// Evicts `[s, e)` of `w`'s process; the pages moved.
    fn evict(&self, w: &Work, s: u64, e: u64, done: &mut Done) -> u64 {
        match self.agent.evict(w.att, s, e - s) {
            Ok(n) => {
                done.evicted += n as u64;
                n as u64
            }
            Err(err) => {
                // Unmapped meanwhile, the process is gone or was detached
                // meanwhile: not worth a warning.
                let quiet = matches!(&err, KernelError::Device(io)
                    if matches!(io.raw_os_error(), Some(libc::EFAULT | libc::ESRCH | libc::ENOENT)));
                if !quiet {
                    tracing::warn!(pid = w.pid, error = %err, start = s, end = e,
                        "eviction failed; the pages stay local");
                }
                done.errors += 1;
                done.last_error = Some(format!("{s:#x}-{e:#x}: {err}"));
                0
            }
        }
    }

    /// Brings `w`'s process within its budget: from what it holds in RAM
    /// (`residency`, read this round), evicts its coldest regions, a
    /// budget's excess at a time, until enough moved. The pages moved.
    fn keep_within(
        &self,
        w: &Work,
        b: &Budget,
        residency: &budget::Residency,
        done: &mut Done,
    ) -> u64 {
        let resident = residency.present;
        let excess = resident.saturating_sub(b.pages);
        if excess == 0 {
            return 0;
        }
        let mut moved = 0;
        'victims: for (s, e) in budget::victims(&b.regions, &w.maps) {
            // The coldest regions are mostly remote already: skip what had
            // nothing in RAM at the round's start rather than walk it.
            if residency.present_in(s, e) == 0 {
                continue;
            }
            let mut at = s;
            while at < e {
                let left = excess.saturating_sub(moved);
                if left == 0 {
                    break 'victims;
                }
                let to = e.min(at + left * PAGE);
                moved += self.evict(w, at, to, done);
                at = to;
            }
        }
        tracing::debug!(
            pid = w.pid,
            resident,
            budget_pages = b.pages,
            moved,
            "budget round"
        );
        moved
    }
}

const PAGE: u64 = super::uapi::PAGE_SIZE as u64;

/// One process's work in a round.
struct Work {
    pid: i32,
    att: u64,
    /// Its private anonymous mappings (within the attached range).
    maps: Vec<(u64, u64)>,
    /// DAMON's cold regions within them.
    cold: Vec<(u64, u64)>,
    budget: Option<Budget>,
}

/// A process's budget, and its regions coldest first.
struct Budget {
    pages: u64,
    regions: Vec<damon::Region>,
}

/// What a round did to one process.
#[derive(Default)]
struct Done {
    evicted: u64,
    errors: u64,
    last_error: Option<String>,
}

/// Sleeps `d` in short steps, returning early once `stop` is set.
pub fn pause(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

/// What `rmem-agent kernel` reports: its one process's status beside the
/// agent's totals (one flat JSON object).
#[derive(Debug, Clone, Serialize)]
pub struct KernelReport {
    #[serde(flatten)]
    pub process: DaemonStatus,
    #[serde(flatten)]
    pub agent: AgentTotals,
}

/// `rmem-agent kernel`: attaches `pid` (with `budget` bytes, if any) and
/// runs rounds until `stop` is set or the process exits, then detaches;
/// `progress` sees each round.
pub fn run(
    cfg: &DaemonConfig,
    pid: i32,
    budget: Option<u64>,
    stop: &AtomicBool,
    mut progress: impl FnMut(&KernelReport),
) -> Result<KernelReport, SupervisorError> {
    let sup = Supervisor::start(cfg)?;
    match sup.attach(pid, None, budget, None) {
        Ok(_) => {}
        // Taken over from the agent's last run: with this run's budget.
        Err(SupervisorError::AlreadyAttached(_)) => sup.set_budget(pid, budget),
        Err(e) => return Err(e),
    }
    let report = |process| KernelReport {
        process,
        agent: sup.totals(),
    };
    while !stop.load(Ordering::Relaxed) {
        pause(cfg.interval, stop);
        if let Some(done) = sup.round().into_iter().find(|s| s.pid == pid) {
            return Ok(report(done));
        }
        if let Some(s) = sup.list().into_iter().find(|s| s.pid == pid) {
            progress(&report(s));
        }
    }
    // Detach even after an error: every page comes back while the fault
    // threads still run.
    sup.detach(pid).map(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_is_alive_and_a_zombie_is_not() {
        assert!(alive(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: a zombie once it has exited.
        assert!(
            tests_wait_for(|| !alive(pid)),
            "an exited child still looks alive"
        );
        child.wait().unwrap();
        assert!(!alive(pid));
        assert!(!alive(-1));
    }

    fn tests_wait_for(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

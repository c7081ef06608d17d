//! The kernel backend's eviction loop, for any number of processes.
//!
//! A [`Supervisor`] owns the [`KernelAgent`] (which serves the module's
//! fetch requests) and DAMON. Processes are attached and detached while it
//! runs; every round it asks DAMON, per process, for the regions not
//! accessed for `min_age`, clips them to the process's private anonymous
//! mappings and evicts them. A process that exits is dropped at the next
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

use super::damon::{self, Damon, DamonConfig};
use super::service::{KernelAgent, KernelConfig, KernelError};

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
    /// Agent-wide counters (the module does not say which process a fetch
    /// or free belongs to).
    pub fetched_pages: u64,
    pub freed_pages: u64,
    pub kept_local_pages: u64,
    /// Pages brought back by the detach.
    pub restored_pages: u64,
    pub process_exited: bool,
    /// Evictions that failed (the pages stayed local), and the last reason.
    pub evict_errors: u64,
    pub last_error: Option<String>,
    pub attached_seconds: f64,
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
        let damon = Damon::new(cfg.damon).map_err(KernelError::Monitor)?;
        let agent = KernelAgent::start(cfg.kernel.clone())?;
        Ok(Self {
            agent,
            inner: Mutex::new(Inner {
                damon,
                procs: BTreeMap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches `pid` (`range` `(start, length)`, or the whole address
    /// space) and starts watching it.
    pub fn attach(
        &self,
        pid: i32,
        range: Option<(u64, u64)>,
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
        let att = self.agent.attach(pid, range).map_err(|e| {
            if e.raw_os_error() == Some(libc::ESRCH) {
                SupervisorError::NoProcess(pid)
            } else {
                SupervisorError::Kernel(e.into())
            }
        })?;
        let (start, length) = range.unwrap_or((0, 0));
        let status = DaemonStatus {
            pid,
            command,
            start,
            length,
            ..DaemonStatus::default()
        };
        inner.procs.insert(
            pid,
            Proc {
                att,
                since: Instant::now(),
                status: status.clone(),
            },
        );
        if let Err(e) = inner.rewatch() {
            // Without monitoring the attachment is useless: undo it.
            inner.procs.remove(&pid);
            let _ = self.agent.detach(att);
            let _ = inner.rewatch();
            return Err(e.into());
        }
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
        self.finish(p)
    }

    fn finish(&self, mut p: Proc) -> Result<DaemonStatus, SupervisorError> {
        let restored = self.agent.detach(p.att).map_err(KernelError::from)?;
        p.status.restored_pages = restored;
        self.fill(&mut p.status, p.since);
        tracing::info!(pid = p.status.pid, restored, "detached; every page is back");
        Ok(p.status)
    }

    /// Detaches every process (on shutdown); errors are logged, and the
    /// module keeps a failed attachment for the next agent.
    pub fn detach_all(&self) -> Vec<DaemonStatus> {
        let procs = std::mem::take(&mut self.lock().procs);
        let mut done = Vec::new();
        for (pid, p) in procs {
            match self.finish(p) {
                Ok(s) => done.push(s),
                Err(e) => tracing::error!(pid, error = %e,
                    "detach failed; the module keeps the attachment for the next agent"),
            }
        }
        let _ = self.lock().rewatch();
        done
    }

    /// Every attached process's counters.
    pub fn list(&self) -> Vec<DaemonStatus> {
        let inner = self.lock();
        inner
            .procs
            .values()
            .map(|p| {
                let mut s = p.status.clone();
                self.fill(&mut s, p.since);
                s
            })
            .collect()
    }

    /// The server the pages go to.
    pub fn server(&self) -> &str {
        self.agent.server()
    }

    /// Agent-wide counters: fetched, freed, kept local.
    pub fn totals(&self) -> (u64, u64, u64) {
        let s = self.agent.stats();
        (
            s.fetched.load(Ordering::Relaxed),
            s.freed.load(Ordering::Relaxed),
            s.kept_local.load(Ordering::Relaxed),
        )
    }

    fn fill(&self, status: &mut DaemonStatus, since: Instant) {
        let (fetched, freed, kept) = self.totals();
        status.fetched_pages = fetched;
        status.freed_pages = freed;
        status.kept_local_pages = kept;
        status.attached_seconds = since.elapsed().as_secs_f64();
    }

    /// One round: evicts every attached process's cold pages. Processes
    /// that exited are detached and returned.
    pub fn round(&self) -> Vec<DaemonStatus> {
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
                let cold = match inner.damon.cold_regions(pid) {
                    Ok(c) => damon::intersect(&c, &maps),
                    Err(e) => {
                        tracing::warn!(pid, error = %e, "DAMON gave no regions this round");
                        Vec::new()
                    }
                };
                work.push((pid, p.att, cold));
            }
            let gone: Vec<Proc> = gone
                .iter()
                .filter_map(|pid| inner.procs.remove(pid))
                .collect();
            if !gone.is_empty()
                && let Err(e) = inner.rewatch()
            {
                tracing::warn!(error = %e, "DAMON could not be restarted");
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
        for (pid, att, cold) in work {
            let cold_bytes = cold.iter().map(|(s, e)| e - s).sum();
            let (mut evicted, mut errors, mut last) = (0u64, 0u64, None);
            for (s, e) in cold {
                match self.agent.evict(att, s, e - s) {
                    Ok(n) => evicted += n as u64,
                    Err(err) => {
                        // Unmapped meanwhile, the process is gone or was
                        // detached meanwhile: not worth a warning.
                        let quiet = matches!(&err, KernelError::Device(io)
                            if matches!(io.raw_os_error(), Some(libc::EFAULT | libc::ESRCH | libc::ENOENT)));
                        if !quiet {
                            tracing::warn!(pid, error = %err, start = s, end = e,
                                "eviction failed; the pages stay local");
                        }
                        errors += 1;
                        last = Some(format!("{s:#x}-{e:#x}: {err}"));
                    }
                }
            }
            let mut inner = self.lock();
            // Detached meanwhile: its counters went with it.
            if let Some(p) = inner.procs.get_mut(&pid).filter(|p| p.att == att) {
                let st = &mut p.status;
                st.rounds += 1;
                st.cold_bytes = cold_bytes;
                st.evicted_pages += evicted;
                st.evict_errors += errors;
                if last.is_some() {
                    st.last_error = last;
                }
            }
        }
        exited
    }
}

/// Sleeps `d` in short steps, returning early once `stop` is set.
pub fn pause(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

/// `rmem-agent kernel`: attaches `pid` and runs rounds until `stop` is set
/// or the process exits, then detaches; `progress` sees each round.
pub fn run(
    cfg: &DaemonConfig,
    pid: i32,
    stop: &AtomicBool,
    mut progress: impl FnMut(&DaemonStatus),
) -> Result<DaemonStatus, SupervisorError> {
    let sup = Supervisor::start(cfg)?;
    sup.attach(pid, None)?;
    while !stop.load(Ordering::Relaxed) {
        pause(cfg.interval, stop);
        if let Some(done) = sup.round().into_iter().find(|s| s.pid == pid) {
            return Ok(done);
        }
        if let Some(s) = sup.list().into_iter().find(|s| s.pid == pid) {
            progress(&s);
        }
    }
    // Detach even after an error: every page comes back while the fault
    // threads still run.
    sup.detach(pid)
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

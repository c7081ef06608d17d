//! `rmem-agent kernel`: keeps one process's cold pages on a memory server
//! through the module. Every interval it asks DAMON for the regions that
//! were not accessed for `min_age`, clips them to the process's private
//! anonymous mappings and evicts them; the fault threads bring pages back
//! on access. On stop it detaches, which brings every page back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::damon::{self, Damon, DamonConfig};
use super::service::{KernelAgent, KernelConfig, KernelError};

/// What `rmem-agent kernel` runs with.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub kernel: KernelConfig,
    pub pid: i32,
    pub damon: DamonConfig,
    /// Between two rounds of eviction.
    pub interval: Duration,
}

/// Counters after a round, and at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DaemonStatus {
    pub pid: i32,
    pub rounds: u64,
    pub cold_bytes: u64,
    pub evicted_pages: u64,
    pub fetched_pages: u64,
    pub freed_pages: u64,
    pub kept_local_pages: u64,
    /// Pages brought back by the final detach.
    pub restored_pages: u64,
    pub process_exited: bool,
    /// Evictions that failed (the pages stayed local), and the last reason.
    pub evict_errors: u64,
    pub last_error: Option<String>,
}

/// Runs until `stop` is set or the process exits; `progress` sees each round.
pub fn run(
    cfg: &DaemonConfig,
    stop: &AtomicBool,
    mut progress: impl FnMut(&DaemonStatus),
) -> Result<DaemonStatus, KernelError> {
    let agent = KernelAgent::start(cfg.kernel.clone())?;
    let att = agent.attach(cfg.pid, None)?;
    let mut status = DaemonStatus {
        pid: cfg.pid,
        ..DaemonStatus::default()
    };
    let result = (|| -> Result<(), KernelError> {
        let damon = Damon::start(cfg.pid, cfg.damon).map_err(KernelError::Monitor)?;
        while !stop.load(Ordering::Relaxed) {
            let next = Instant::now() + cfg.interval;
            while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let Ok(maps) = damon::anonymous_mappings(cfg.pid) else {
                status.process_exited = true;
                break;
            };
            let cold =
                damon::intersect(&damon.cold_regions().map_err(KernelError::Monitor)?, &maps);
            status.cold_bytes = cold.iter().map(|(s, e)| e - s).sum();
            for (s, e) in cold {
                if let Err(err) = agent.evict(att, s, e - s) {
                    // Unmapped meanwhile, or the process is gone: not worth a warning.
                    let quiet = matches!(&err, KernelError::Device(io)
                        if matches!(io.raw_os_error(), Some(libc::EFAULT | libc::ESRCH)));
                    if !quiet {
                        tracing::warn!(error = %err, start = s, end = e, "eviction failed; the pages stay local");
                    }
                    status.evict_errors += 1;
                    status.last_error = Some(format!("{s:#x}-{e:#x}: {err}"));
                }
            }
            status.rounds += 1;
            fill(&mut status, &agent);
            progress(&status);
        }
        Ok(())
    })();
    // Detach even after an error: every page comes back while the fault
    // threads still run.
    match agent.detach(att) {
        Ok(n) => status.restored_pages = n,
        Err(e) => {
            tracing::error!(error = %e, "detach failed; the module keeps the attachment for the next agent")
        }
    }
    fill(&mut status, &agent);
    result.map(|()| status)
}

fn fill(status: &mut DaemonStatus, agent: &KernelAgent) {
    let s = agent.stats();
    status.evicted_pages = s.evicted.load(Ordering::Relaxed);
    status.fetched_pages = s.fetched.load(Ordering::Relaxed);
    status.freed_pages = s.freed.load(Ordering::Relaxed);
    status.kept_local_pages = s.kept_local.load(Ordering::Relaxed);
}

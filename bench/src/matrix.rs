//! The workload matrix: every workload at every local fraction on every
//! system, with its slowdown against the same workload all in local
//! memory.
//!
//! - `local`: plain anonymous memory, no limit (the denominator);
//! - `rmem`: a `RemoteRegion` of the working set whose budget is the local
//!   fraction (plus the same allowance a swap child gets), its pages on
//!   the memory server;
//! - `swap-zram`, `swap-file`: a child process in a memory cgroup limited
//!   to the local fraction (plus a small allowance for the process itself),
//!   swapping to zram or to a file ([`crate::swap`]).

use std::path::PathBuf;
use std::time::Duration;

use rmem_agent::{RegionConfig, RemoteRegion};
use rmem_client::ClientConfig;
use serde::Serialize;

use crate::BenchError;
use crate::swap::{self, Backend, Swap};
use crate::workloads::{self, ALL, Memory, Outcome, PAGE, Workload};

/// The local fractions measured.
pub const FRACTIONS: [f64; 4] = [0.25, 0.5, 0.75, 1.0];

/// What the cgroup allows a swap child beyond its share of the working
/// set: its stack, heap and page tables.
pub const CHILD_ALLOWANCE: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct Effort {
    /// Working-set pages.
    pub pages: usize,
    /// Most operations per cell (scan: pages read).
    pub ops: u64,
    /// Longest timed phase per cell.
    pub budget: Duration,
    /// Where the swap file goes.
    pub swap_dir: PathBuf,
    /// Measure kernel swap (needs root).
    pub swap: bool,
}

/// One workload on one system at one local fraction.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub name: String,
    pub system: String,
    pub local_fraction: f64,
    pub ops_per_s: f64,
    /// All-local operations per second over these (1.0: as fast); null
    /// when the run could not finish.
    pub slowdown: Option<f64>,
    /// `ok`, or `oom-killed`: the memory cgroup's OOM killer ended every
    /// attempt (swap-out could not keep up).
    pub outcome: &'static str,
    pub ops: u64,
    pub seconds: f64,
    pub init_seconds: f64,
    /// Accesses that waited for the backing store (major faults, remote
    /// faults) per operation.
    pub fetches_per_op: f64,
    /// Pages read from the backing store (read-ahead, prefetch included)
    /// per operation.
    pub pages_in_per_op: f64,
}

/// A system that was not measured, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub system: String,
    pub reason: String,
}

/// What the matrix measured: the cells, and how.
#[derive(Debug, Clone)]
pub struct Workloads {
    pub cells: Vec<Cell>,
    pub setup: WorkloadSetup,
}

/// How the cells were measured.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadSetup {
    pub working_set_bytes: u64,
    pub child_allowance_bytes: u64,
    pub skipped: Vec<Skipped>,
    /// Swap that was already on before the run (it took part too, at a
    /// lower priority than the benchmark's).
    pub other_swaps: Vec<String>,
    /// Swap runs the cgroup's OOM killer ended; a cell is tried twice.
    pub oom_kills: u64,
}

fn cell(w: Workload, system: &str, f: f64, o: Outcome, base: f64) -> Cell {
    let ops_per_s = o.ops_per_s();
    Cell {
        name: w.name().into(),
        system: system.into(),
        local_fraction: f,
        ops_per_s,
        slowdown: (ops_per_s > 0.0).then(|| base / ops_per_s),
        outcome: "ok",
        ops: o.ops,
        seconds: o.seconds,
        init_seconds: o.init_seconds,
        fetches_per_op: per_op(o.fetches, o.ops),
        pages_in_per_op: per_op(o.pages_in, o.ops),
    }
}

fn per_op(n: u64, ops: u64) -> f64 {
    if ops == 0 { 0.0 } else { n as f64 / ops as f64 }
}

fn checked(w: Workload, out: Outcome, system: &str) -> Result<Outcome, BenchError> {
    if out.errors > 0 {
        return Err(BenchError::Workload {
            workload: w.name(),
            system: system.to_string(),
            errors: out.errors,
        });
    }
    Ok(out)
}

fn on_rmem(
    client: &ClientConfig,
    w: Workload,
    e: &Effort,
    fraction: f64,
    seed: u64,
) -> Result<Outcome, BenchError> {
    let size = (e.pages * PAGE) as u64;
    // The same local memory a swap child gets: its share of the working
    // set plus the allowance.
    let budget = ((size as f64 * fraction) as u64 + CHILD_ALLOWANCE) / PAGE as u64 * PAGE as u64;
    let region = RemoteRegion::new(
        RegionConfig {
            size,
            budget,
            ..RegionConfig::default()
        },
        client.clone(),
    )?;
    // SAFETY: the region maps `size` bytes, page-aligned, and lives until
    // after the last use of `mem`; its faults are served by its threads.
    let mem = unsafe { Memory::new(region.as_ptr(), e.pages) };
    let t = std::time::Instant::now();
    workloads::init(w, &mem);
    let init_seconds = t.elapsed().as_secs_f64();
    // rmem's waits: remote faults; pages read in: those and the pages
    // prefetched with them.
    let waits = || {
        let s = region.stats();
        (s.faults_remote, s.faults_remote + s.prefetch_issued)
    };
    let mut out = workloads::run(w, &mem, e.ops, e.budget, seed, &waits);
    out.init_seconds = init_seconds;
    drop(region);
    Ok(out)
}

/// Runs the matrix; `progress` hears about each system.
pub fn measure(
    client: &ClientConfig,
    e: &Effort,
    progress: &dyn Fn(&str),
) -> Result<Workloads, BenchError> {
    let mut cells = Vec::new();
    let mut skipped = Vec::new();
    progress("workloads: all-local baseline");
    let mut base = Vec::new();
    for (i, w) in ALL.into_iter().enumerate() {
        let o = checked(
            w,
            workloads::on_anonymous(w, e.pages, e.ops, e.budget, i as u64)?,
            "local",
        )?;
        base.push(o.ops_per_s());
        cells.push(cell(w, "local", 1.0, o, o.ops_per_s()));
    }
    progress("workloads: rmem (userspace path) at 25/50/75/100% local");
    for f in FRACTIONS {
        for (i, w) in ALL.into_iter().enumerate() {
            let o = checked(w, on_rmem(client, w, e, f, i as u64)?, "rmem")?;
            cells.push(cell(w, "rmem", f, o, base[i]));
        }
    }
    let other_swaps = swap::active_swaps();
    let mut oom_kills = 0;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    for backend in [Backend::Zram, Backend::File] {
        let system = backend.system();
        if !e.swap {
            skipped.push(Skipped {
                system: system.into(),
                reason: "--no-swap".into(),
            });
            continue;
        }
        if !root {
            skipped.push(Skipped {
                system: system.into(),
                reason: "not root: the kernel swap baselines need a memory cgroup and swapon"
                    .into(),
            });
            continue;
        }
        progress(&format!("workloads: {system} at 25/50/75/100% local"));
        let capacity = (e.pages * PAGE) as u64 + (16 << 20);
        let dev = match backend {
            Backend::Zram => Swap::zram(capacity),
            Backend::File => Swap::file(&e.swap_dir, capacity),
        };
        let dev = match dev {
            Ok(d) => d,
            Err(err) => {
                skipped.push(Skipped {
                    system: system.into(),
                    reason: format!("cannot set up swap: {err}"),
                });
                continue;
            }
        };
        for f in FRACTIONS {
            for (i, w) in ALL.into_iter().enumerate() {
                let limit = ((e.pages * PAGE) as f64 * f) as u64 + CHILD_ALLOWANCE;
                let spec = swap::child_spec(w, e.pages, e.ops, e.budget, i as u64);
                // Memory cgroup v1 can OOM-kill a process whose swap-out
                // lags (writeback to a slow device): count and retry.
                let mut attempt = 0;
                let o = loop {
                    attempt += 1;
                    match swap::run_limited(&spec, limit) {
                        Ok(o) => break Some(o),
                        Err(e) if e.kind() == std::io::ErrorKind::OutOfMemory => {
                            oom_kills += 1;
                            if attempt == 2 {
                                break None;
                            }
                        }
                        Err(source) => {
                            return Err(BenchError::Swap {
                                system: format!("{system}, {} at {}% local", w.name(), f * 100.0),
                                source,
                            });
                        }
                    }
                };
                cells.push(match o {
                    Some(o) => cell(w, system, f, checked(w, o, system)?, base[i]),
                    None => Cell {
                        outcome: "oom-killed",
                        ..cell(w, system, f, Outcome::default(), base[i])
                    },
                });
            }
        }
        drop(dev);
    }
    Ok(Workloads {
        cells,
        setup: WorkloadSetup {
            working_set_bytes: (e.pages * PAGE) as u64,
            child_allowance_bytes: CHILD_ALLOWANCE,
            skipped,
            other_swaps,
            oom_kills,
        },
    })
}

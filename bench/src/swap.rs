//! What the kernel already offers, measured the same way: a workload in a
//! child process whose memory cgroup allows it the same local memory rmem
//! gets, with swap on zram (compressed, in this machine's RAM: the best a
//! kernel swap can do without a network) or on a file through a loop
//! device (direct I/O, on this machine's disk).
//!
//! Needs root: the benchmark creates the cgroup (v1 or v2, as the host
//! has), the zram device or the loop device, and turns the swap on and off
//! again. Its swap gets the highest priority while it is on.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::workloads::{Outcome, Workload};

/// Which swap backs the cgroup's overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Zram,
    File,
}

impl Backend {
    pub fn system(self) -> &'static str {
        match self {
            Self::Zram => "swap-zram",
            Self::File => "swap-file",
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{cmd}: {e} (util-linux is needed)")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn write(path: impl AsRef<Path>, value: impl std::fmt::Display) -> io::Result<()> {
    let path = path.as_ref();
    fs::write(path, value.to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// A swap device that is on while this lives.
#[derive(Debug)]
pub struct Swap {
    device: String,
    on: bool,
    zram: Option<u32>,
    file: Option<PathBuf>,
}

impl Swap {
    /// Swap on a new zram device of `bytes` (uncompressed).
    pub fn zram(bytes: u64) -> io::Result<Self> {
        let ctl = Path::new("/sys/class/zram-control/hot_add");
        let id: u32 = fs::read_to_string(ctl)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: {e} (is the zram module loaded?)", ctl.display()),
                )
            })?
            .trim()
            .parse()
            .map_err(|_| io::Error::other("zram hot_add gave no device number"))?;
        let mut swap = Self {
            device: format!("/dev/zram{id}"),
            on: false,
            zram: Some(id),
            file: None,
        };
        let sys = PathBuf::from(format!("/sys/block/zram{id}"));
        // lz4 where the kernel has it: zram's usual choice for swap.
        let algos = fs::read_to_string(sys.join("comp_algorithm")).unwrap_or_default();
        if algos
            .split_whitespace()
            .any(|a| a.trim_matches(['[', ']']) == "lz4")
        {
            let _ = write(sys.join("comp_algorithm"), "lz4");
        }
        write(sys.join("disksize"), bytes)?;
        swap.enable()?;
        Ok(swap)
    }

    /// Swap on a file of `bytes` in `dir`, through a loop device with
    /// direct I/O (no second copy in the page cache).
    pub fn file(dir: &Path, bytes: u64) -> io::Result<Self> {
        let path = dir.join(format!("rmem-bench-swap-{}", std::process::id()));
        let f = fs::File::create(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut swap = Self {
            device: String::new(),
            on: false,
            zram: None,
            file: Some(path.clone()),
        };
        // Allocated, not sparse: swap-out should not allocate blocks.
        // SAFETY: posix_fallocate on an open descriptor with valid bounds.
        let r = unsafe {
            libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, bytes as libc::off_t)
        };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        drop(f);
        let path_str = path.to_string_lossy().into_owned();
        swap.device = run(
            "losetup",
            &["--find", "--show", "--direct-io=on", &path_str],
        )?;
        swap.enable()?;
        Ok(swap)
    }

    fn enable(&mut self) -> io::Result<()> {
        run("mkswap", &[&self.device])?;
        run("swapon", &["--priority", "32767", &self.device])?;
        self.on = true;
        Ok(())
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        if self.on
            && let Err(e) = run("swapoff", &[&self.device])
        {
            eprintln!("rmem-bench: cannot turn swap off on {}: {e}", self.device);
            return; // leave the device in place rather than yank it
        }
        if let Some(id) = self.zram {
            let _ = write("/sys/class/zram-control/hot_remove", id);
        }
        if let Some(file) = &self.file {
            if self.device.starts_with("/dev/loop") {
                let _ = run("losetup", &["--detach", &self.device]);
            }
            let _ = fs::remove_file(file);
        }
    }
}

/// A memory cgroup limiting what its processes keep in RAM.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// A new cgroup under the host's memory hierarchy (v2 if unified).
    pub fn new(limit: u64) -> io::Result<Self> {
        let name = format!("rmem-bench-{}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let path = if v2 {
            PathBuf::from("/sys/fs/cgroup").join(&name)
        } else {
            PathBuf::from("/sys/fs/cgroup/memory").join(&name)
        };
        fs::create_dir(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let cg = Self { path };
        if v2 {
            write(cg.path.join("memory.max"), limit)?;
            write(cg.path.join("memory.swap.max"), "max")?;
        } else {
            write(cg.path.join("memory.limit_in_bytes"), limit)?;
            // Only anonymous memory is at stake: prefer swapping it.
            let _ = write(cg.path.join("memory.swappiness"), 100);
        }
        Ok(cg)
    }

    pub fn add(&self, pid: u32) -> io::Result<()> {
        write(self.path.join("cgroup.procs"), pid)
    }

    /// How many processes the cgroup's OOM killer killed.
    pub fn oom_kills(&self) -> u64 {
        // v1: memory.oom_control "oom_kill N"; v2: memory.events "oom_kill N".
        ["memory.oom_control", "memory.events"]
            .iter()
            .filter_map(|f| fs::read_to_string(self.path.join(f)).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Empty once the child is reaped; the kernel may lag a moment.
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "rmem-bench: could not remove cgroup {}",
            self.path.display()
        );
    }
}

/// The child's arguments: `--child WORKLOAD:PAGES:OPS:MILLIS:SEED`.
pub fn child_spec(w: Workload, pages: usize, ops: u64, budget: Duration, seed: u64) -> String {
    format!("{}:{pages}:{ops}:{}:{seed}", w.name(), budget.as_millis())
}

/// Parses what `child_spec` wrote.
pub fn parse_child_spec(s: &str) -> Option<(Workload, usize, u64, Duration, u64)> {
    let mut f = s.split(':');
    let name = f.next()?;
    let w = crate::workloads::ALL
        .into_iter()
        .find(|w| w.name() == name)?;
    let pages = f.next()?.parse().ok()?;
    let ops = f.next()?.parse().ok()?;
    let ms = f.next()?.parse().ok()?;
    let seed = f.next()?.parse().ok()?;
    Some((w, pages, ops, Duration::from_millis(ms), seed))
}

/// Runs the workload in a child process inside a cgroup limited to
/// `limit` bytes, and returns what the child measured.
pub fn run_limited(spec: &str, limit: u64) -> io::Result<Outcome> {
    let cg = Cgroup::new(limit)?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--child", spec])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let result = (|| -> io::Result<String> {
        cg.add(child.id())?;
        // Only now, inside the cgroup, does the child allocate.
        child.stdin.take().expect("piped").write_all(b"go\n")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        Ok(line)
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let line = result?;
    if !status.success() || line.is_empty() {
        let oom = cg.oom_kills();
        let msg = format!("the workload process exited with {status}");
        return Err(if oom > 0 {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("{msg}: killed by its cgroup's OOM killer (limit {limit} bytes)"),
            )
        } else {
            io::Error::other(msg)
        });
    }
    serde_json::from_str::<Outcome>(&line)
        .map_err(|e| io::Error::other(format!("the workload process said {line:?}: {e}")))
}

/// The child's side: waits for the go, runs, prints its outcome.
pub fn child_main(spec: &str) -> io::Result<()> {
    let (w, pages, ops, budget, seed) = parse_child_spec(spec)
        .ok_or_else(|| io::Error::other(format!("bad --child spec {spec:?}")))?;
    let mut go = String::new();
    io::stdin().read_line(&mut go)?;
    let out = crate::workloads::on_anonymous(w, pages, ops, budget, seed)?;
    println!(
        "{}",
        serde_json::to_string(&out).expect("outcome serializes")
    );
    Ok(())
}

/// Swap devices already on (they would take part in the measurement).
pub fn active_swaps() -> Vec<String> {
    fs::read_to_string("/proc/swaps")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_spec_round_trips() {
        for w in crate::workloads::ALL {
            let spec = child_spec(w, 2048, 99, Duration::from_millis(150), 7);
            assert_eq!(
                parse_child_spec(&spec),
                Some((w, 2048, 99, Duration::from_millis(150), 7))
            );
        }
        assert_eq!(parse_child_spec("nope:1:2:3:4"), None);
        assert_eq!(parse_child_spec("zipf:1:2"), None);
    }
}

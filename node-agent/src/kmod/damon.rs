//! Which pages of an attached process are cold, from DAMON (the kernel's
//! data-access monitor, virtual-address mode, sysfs interface).
//!
//! Debian's kernel has DAMON but no idle-page tracking; soft-dirty bits see
//! only writes and the multi-generational LRU has no per-process interface.
//! DAMON samples the accessed bits of the process's page tables and keeps,
//! per region, how often it was accessed in the last aggregation interval
//! (`nr_accesses`) and for how many intervals that has not changed (`age`).
//! A `stat` scheme whose access pattern is "no accesses for at least
//! `min_age`" makes DAMON list exactly the cold regions
//! (`tried_regions`), which the agent then evicts.
//!
//! A second `stat` scheme matches every region, so the agent also learns
//! each region's `nr_accesses` and `age`: a process over its memory budget
//! gives up its coldest regions first (see [`super::budget`]).
//!
//! The agent owns the sysfs kdamonds while it runs: it refuses to start when
//! another user has one configured, and turns its own off on drop.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// DAMON's sysfs root.
pub const DAMON_ROOT: &str = "/sys/kernel/mm/damon/admin/kdamonds";
/// DAMON_STAT (on by default in Debian's kernel) runs an exclusive kdamond
/// that keeps every other DAMON user out.
pub const DAMON_STAT_ENABLED: &str = "/sys/module/damon_stat/parameters/enabled";

/// How DAMON samples.
#[derive(Debug, Clone, Copy)]
pub struct DamonConfig {
    /// Between two checks of an accessed bit.
    pub sample: Duration,
    /// One aggregation: `nr_accesses` counts the samples that found the
    /// region accessed within it.
    pub aggregate: Duration,
    /// A region is cold once unaccessed for this long.
    pub min_age: Duration,
    /// How often DAMON looks at the process's mappings again (its
    /// operations update interval). The kernel's default, 60 s, leaves
    /// every mapping made after attach unmonitored, so unevicted, for up to
    /// a minute: a program attached at its start kept all of its memory
    /// local for that long. Looking costs a walk of the process's VMAs.
    pub update: Duration,
}

impl Default for DamonConfig {
    fn default() -> Self {
        Self {
            sample: Duration::from_millis(5),
            aggregate: Duration::from_millis(100),
            min_age: Duration::from_secs(2),
            update: Duration::from_secs(1),
        }
    }
}

/// A region DAMON monitors, with its access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// Samples that found it accessed in the last aggregation interval.
    pub nr_accesses: u64,
    /// Aggregation intervals its access pattern has kept.
    pub age: u64,
}

/// The scheme listing the cold regions, and the one listing every region.
const COLD_SCHEME: usize = 0;
const ALL_SCHEME: usize = 1;

/// Running kdamonds, one per watched process (a DAMON context's
/// `tried_regions` do not say which target a region belongs to, so each
/// process gets its own kdamond).
///
/// DAMON's sysfs accepts a new `nr_kdamonds` only while every kdamond is
/// off, so changing the set of processes stops all of them, lays them out
/// again and starts them: the processes' access history (region ages)
/// starts over. Attaching and detaching are rare operator actions.
#[derive(Debug)]
pub struct Damon {
    cfg: DamonConfig,
    /// Watched processes; `pids[i]` is kdamond `i`.
    pids: Vec<i32>,
    /// The claim file (in the agent's state directory) naming the kdamonds
    /// this agent runs, so that after its crash the next agent knows them
    /// for its own and takes DAMON back.
    claim: Option<PathBuf>,
}

/// The claim file's name in the agent's state directory.
pub const CLAIM_FILE: &str = "damon";

/// The thread ids of the running kdamonds, in order (-1 for one off).
fn kdamond_pids(n: u64) -> io::Result<Vec<i64>> {
    (0..n as usize)
        .map(|i| {
            let path = kdamond(i).join("pid");
            let text = fs::read_to_string(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            text.trim()
                .parse()
                .map_err(|_| io::Error::other(format!("{}: not a pid: {text:?}", path.display())))
        })
        .collect()
}

fn write(path: impl AsRef<Path>, value: impl std::fmt::Display) -> io::Result<()> {
    let path = path.as_ref();
    fs::write(path, value.to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn read_u64(path: impl AsRef<Path>) -> io::Result<u64> {
    let path = path.as_ref();
    let text = fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|_| io::Error::other(format!("{}: not a number: {text:?}", path.display())))
}

fn kdamond(i: usize) -> PathBuf {
    Path::new(DAMON_ROOT).join(i.to_string())
}

impl Damon {
    /// Takes DAMON over, watching no process yet. Fails if DAMON is missing
    /// or another user (DAMON_STAT among them) holds it. `state_dir` (the
    /// agent's, on tmpfs) keeps the claim: kdamonds an earlier agent of
    /// this node left running when it died are known by it and taken back.
    pub fn new(cfg: DamonConfig, state_dir: Option<&Path>) -> io::Result<Self> {
        let root = Path::new(DAMON_ROOT);
        if !root.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{DAMON_ROOT} missing: the kernel lacks CONFIG_DAMON_SYSFS/CONFIG_DAMON_VADDR"
                ),
            ));
        }
        let claim = state_dir.map(|d| d.join(CLAIM_FILE));
        let configured = read_u64(root.join("nr_kdamonds"))?;
        if configured != 0 {
            // Ours if the claim names exactly the kdamonds running now
            // (their thread ids change whenever they are started again)
            // and the agent that made them is gone.
            let text = claim.as_deref().and_then(|c| fs::read_to_string(c).ok());
            let (owner, kdamonds) = text
                .as_deref()
                .and_then(|t| t.trim().split_once(' '))
                .unwrap_or_default();
            let owner: u32 = owner.parse().unwrap_or(0);
            if owner != 0
                && owner != std::process::id()
                && Path::new(&format!("/proc/{owner}")).exists()
            {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("DAMON is in use by another rmem agent (pid {owner})"),
                ));
            }
            let claimed = owner != 0
                && kdamond_pids(configured).is_ok_and(|running| kdamonds == render(&running));
            if !claimed {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{DAMON_ROOT}: another DAMON user has kdamonds configured"),
                ));
            }
            for i in 0..configured as usize {
                let _ = write(kdamond(i).join("state"), "off");
            }
            write(root.join("nr_kdamonds"), 0)?;
            tracing::info!(
                kdamonds = configured,
                "took DAMON back from the agent's last run"
            );
        }
        let stat = Path::new(DAMON_STAT_ENABLED);
        if fs::read_to_string(stat).is_ok_and(|v| v.trim() == "Y") {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "DAMON_STAT holds DAMON exclusively; turn it off first: echo N > {DAMON_STAT_ENABLED} \
                     (or boot with damon_stat.enabled=0)"
                ),
            ));
        }
        Ok(Self {
            cfg,
            pids: Vec::new(),
            claim,
        })
    }

    /// Takes DAMON over and starts watching process `pid`.
    pub fn start(pid: i32, cfg: DamonConfig) -> io::Result<Self> {
        let mut damon = Self::new(cfg, None)?;
        damon.watch(&[pid])?;
        Ok(damon)
    }

    /// The processes watched, in kdamond order.
    pub fn pids(&self) -> &[i32] {
        &self.pids
    }

    /// Watches exactly `pids` from now on (restarting every kdamond). On
    /// error nothing is watched.
    pub fn watch(&mut self, pids: &[i32]) -> io::Result<()> {
        self.stop_all();
        let r = self.start_all(pids);
        if r.is_err() {
            self.stop_all();
        }
        r
    }

    fn stop_all(&mut self) {
        for i in 0..self.pids.len() {
            let _ = write(kdamond(i).join("state"), "off");
        }
        self.pids.clear();
        let _ = write(Path::new(DAMON_ROOT).join("nr_kdamonds"), 0);
        if let Some(claim) = &self.claim {
            let _ = fs::remove_file(claim);
        }
    }

    fn start_all(&mut self, pids: &[i32]) -> io::Result<()> {
        if pids.is_empty() {
            return Ok(());
        }
        write(Path::new(DAMON_ROOT).join("nr_kdamonds"), pids.len())?;
        // From here on `stop_all` (on error, or on drop) turns them off.
        self.pids = pids.to_vec();
        for (i, &pid) in pids.iter().enumerate() {
            self.configure(&kdamond(i), pid)?;
        }
        for i in 0..pids.len() {
            write(kdamond(i).join("state"), "on")?;
        }
        if let Some(claim) = &self.claim {
            // Without the claim a restart after a crash finds DAMON taken.
            let running = kdamond_pids(pids.len() as u64)?;
            let text = format!("{} {}", std::process::id(), render(&running));
            if let Err(e) = fs::create_dir_all(claim.parent().unwrap_or(Path::new("/")))
                .and_then(|()| fs::write(claim, text))
            {
                tracing::warn!(path = %claim.display(), error = %e, "cannot record the kdamonds this agent runs");
            }
        }
        Ok(())
    }

    fn configure(&self, kdamond: &Path, pid: i32) -> io::Result<()> {
        let cfg = &self.cfg;
        let ctx = kdamond.join("contexts/0");
        write(kdamond.join("contexts/nr_contexts"), 1)?;
        write(ctx.join("operations"), "vaddr")?;
        let intervals = ctx.join("monitoring_attrs/intervals");
        write(intervals.join("sample_us"), cfg.sample.as_micros())?;
        write(intervals.join("aggr_us"), cfg.aggregate.as_micros())?;
        write(intervals.join("update_us"), cfg.update.as_micros())?;
        write(ctx.join("targets/nr_targets"), 1)?;
        write(ctx.join("targets/0/pid_target"), pid)?;
        write(ctx.join("schemes/nr_schemes"), 2)?;
        let intervals_old = (cfg.min_age.as_micros() / cfg.aggregate.as_micros().max(1)).max(1);
        // Cold: no access for at least `min_age`.
        stat_scheme(
            &ctx,
            COLD_SCHEME,
            (0, 0),
            (intervals_old as u64, u32::MAX.into()),
        )?;
        // Everything, for the budget's coldest-first order.
        stat_scheme(&ctx, ALL_SCHEME, (0, u32::MAX.into()), (0, u32::MAX.into()))
    }

    /// Asks `pid`'s kdamond to list what its schemes matched now; the
    /// kdamond's directory. `NotFound` if `pid` is not watched.
    fn refresh(&self, pid: i32) -> io::Result<PathBuf> {
        let i = self.pids.iter().position(|&p| p == pid).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("pid {pid} is not watched"))
        })?;
        let kdamond = kdamond(i);
        write(kdamond.join("state"), "update_schemes_tried_regions")?;
        Ok(kdamond)
    }

    /// The regions of `pid` unaccessed for at least `min_age`, as
    /// `(start, end)`; `NotFound` if `pid` is not watched.
    pub fn cold_regions(&self, pid: i32) -> io::Result<Vec<(u64, u64)>> {
        let kdamond = self.refresh(pid)?;
        let mut regions: Vec<(u64, u64)> = tried_regions(&kdamond, COLD_SCHEME)?
            .iter()
            .map(|r| (r.start, r.end))
            .collect();
        regions.sort_unstable();
        Ok(regions)
    }

    /// Every region of `pid` with its access pattern, coldest first (no
    /// access, oldest pattern first; then fewest accesses).
    pub fn regions_coldest_first(&self, pid: i32) -> io::Result<Vec<Region>> {
        let kdamond = self.refresh(pid)?;
        let mut regions = tried_regions(&kdamond, ALL_SCHEME)?;
        coldest_first(&mut regions);
        Ok(regions)
    }
}

/// Configures scheme `i` of context `ctx` as a `stat` scheme matching
/// regions with `nr_accesses` and `age` in the given inclusive ranges.
fn stat_scheme(ctx: &Path, i: usize, nr_accesses: (u64, u64), age: (u64, u64)) -> io::Result<()> {
    let scheme = ctx.join(format!("schemes/{i}"));
    write(scheme.join("action"), "stat")?;
    let pattern = scheme.join("access_pattern");
    // Every bound is 0 until written: set both ends of each range.
    write(pattern.join("sz/min"), 4096)?;
    write(pattern.join("sz/max"), u64::MAX)?;
    write(pattern.join("nr_accesses/min"), nr_accesses.0)?;
    write(pattern.join("nr_accesses/max"), nr_accesses.1)?;
    write(pattern.join("age/min"), age.0)?;
    write(pattern.join("age/max"), age.1)
}

/// What scheme `i` of `kdamond` matched at its last refresh.
fn tried_regions(kdamond: &Path, i: usize) -> io::Result<Vec<Region>> {
    let dir = kdamond.join(format!("contexts/0/schemes/{i}/tried_regions"));
    let mut regions = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        regions.push(Region {
            start: read_u64(path.join("start"))?,
            end: read_u64(path.join("end"))?,
            nr_accesses: read_u64(path.join("nr_accesses"))?,
            age: read_u64(path.join("age"))?,
        });
    }
    Ok(regions)
}

/// Orders regions coldest first: unaccessed ones before accessed ones,
/// among the unaccessed the longest unaccessed first, among the accessed
/// the least accessed first; ties by address.
pub fn coldest_first(regions: &mut [Region]) {
    regions.sort_by_key(|r| {
        (
            r.nr_accesses,
            std::cmp::Reverse(if r.nr_accesses == 0 { r.age } else { 0 }),
            r.start,
        )
    });
}

/// The kdamonds' thread ids as the claim file holds them, after the
/// agent's pid.
fn render(pids: &[i64]) -> String {
    pids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Drop for Damon {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The private anonymous mappings of `pid` (what the module can evict), as
/// `(start, end)`, from /proc/PID/maps.
pub fn anonymous_mappings(pid: i32) -> io::Result<Vec<(u64, u64)>> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(maps.lines().filter_map(parse_anonymous).collect())
}

fn parse_anonymous(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    let range = f.next()?;
    let perms = f.next()?;
    let (_offset, _dev, inode) = (f.next()?, f.next()?, f.next()?);
    let path = f.next().unwrap_or("");
    let anonymous = inode == "0" && (path.is_empty() || path == "[heap]" || path == "[stack]");
    if !anonymous || !perms.starts_with("rw") || !perms.ends_with('p') {
        return None;
    }
    let (a, b) = range.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

/// The parts of `regions` inside `mappings` (both sorted by start).
pub fn intersect(regions: &[(u64, u64)], mappings: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(rs, re) in regions {
        for &(ms, me) in mappings {
            let (s, e) = (rs.max(ms), re.min(me));
            if s < e {
                out.push((s, e));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_keep_private_writable_anonymous_memory() {
        assert_eq!(
            parse_anonymous("7f00000000-7f00010000 rw-p 00000000 00:00 0 "),
            Some((0x7f00000000, 0x7f00010000))
        );
        assert_eq!(
            parse_anonymous("55d0-55e0 rw-p 00000000 00:00 0 [heap]"),
            Some((0x55d0, 0x55e0))
        );
        assert_eq!(
            parse_anonymous("55d0-55e0 r--p 00000000 08:01 1234 /usr/bin/x"),
            None
        );
        assert_eq!(
            parse_anonymous("55d0-55e0 rw-s 00000000 00:05 99 /dev/zero"),
            None
        );
        assert_eq!(
            parse_anonymous("55d0-55e0 rw-p 00000000 00:00 0 [vvar]"),
            None
        );
    }

    #[test]
    fn the_coldest_regions_come_first() {
        let r = |start, nr_accesses, age| Region {
            start,
            end: start + 0x1000,
            nr_accesses,
            age,
        };
        let mut regions = vec![
            r(0x1000, 3, 9),
            r(0x2000, 0, 5),
            r(0x3000, 0, 50),
            r(0x4000, 1, 2),
        ];
        coldest_first(&mut regions);
        let order: Vec<u64> = regions.iter().map(|r| r.start).collect();
        assert_eq!(order, vec![0x3000, 0x2000, 0x4000, 0x1000]);
    }

    #[test]
    fn intersect_clips_regions_to_mappings() {
        let regions = [(0x1000, 0x9000)];
        let mappings = [(0x0, 0x2000), (0x4000, 0x5000), (0x8000, 0xa000)];
        assert_eq!(
            intersect(&regions, &mappings),
            vec![(0x1000, 0x2000), (0x4000, 0x5000), (0x8000, 0x9000)]
        );
    }
}

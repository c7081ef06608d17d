//! Handle spaces: the names a backend gives the copies it stores.
//!
//! A handle names one stored copy of a page, never an address: a page
//! evicted, brought back and evicted again gets a new handle, so a late
//! free of an old copy can never delete a newer one. Each backend run (the
//! kernel agent's start, a userfaultfd region's creation) draws a random
//! epoch and counts up from `epoch << SPACE_BITS`: its space. In a cluster
//! the space is registered as an interval (byte `4096 * k` of address
//! space `name` standing for handle `base + k`), so frees are
//! invalidations of handle ranges that every subscribed server
//! acknowledges.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::cluster::Cluster;

/// Bits of a handle below the epoch: one space holds 2^40 handles (4 PiB
/// of evictions).
pub const SPACE_BITS: u32 = 40;

/// A handle space registered as an interval.
#[derive(Debug, Clone)]
pub(crate) struct Space {
    pub name: String,
    pub base: u64,
    pub interval: u64,
}

impl Space {
    pub fn contains(&self, h: u64) -> bool {
        h.wrapping_sub(self.base) < 1 << SPACE_BITS
    }

    /// Byte spans of the interval standing for `sorted` handles (all of
    /// this space), consecutive handles coalesced.
    pub fn spans(&self, sorted: &[u64]) -> Vec<(u64, u64)> {
        runs_of(sorted)
            .into_iter()
            .map(|(h, n)| ((h - self.base) * 4096, n * 4096))
            .collect()
    }
}

/// Bases of the spaces this process holds now, so two stores of one agent
/// (regions, or a region and the kernel agent) never draw one epoch.
static LIVE: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

/// A base drawn for a space; released for other draws when dropped.
#[derive(Debug)]
pub(crate) struct Claim(u64);

impl Claim {
    pub fn base(&self) -> u64 {
        self.0
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

/// A base no space in `taken` has, nor any space this process holds: a
/// random 24-bit epoch.
pub(crate) fn new_base(taken: &[u64]) -> Claim {
    claim_from(taken, rand::random::<u32>)
}

/// The first epoch `draw` gives that is free.
fn claim_from(taken: &[u64], mut draw: impl FnMut() -> u32) -> Claim {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let base = u64::from(draw() & 0xff_ffff) << SPACE_BITS;
        if !taken.contains(&base) && live.insert(base) {
            return Claim(base);
        }
    }
}

/// Replaces `path` whole with `bytes` (mode 0600): a crash leaves the old
/// contents or the new, never a mix.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The epochs of a standalone kernel agent's runs whose pages the module may
/// still hold. In a cluster the coordinator's intervals list them; outside
/// one, nothing else does: a new run that drew an old run's epoch would
/// write new pages over handles the module still names. The file lives
/// beside the admin socket (tmpfs, like the module's pages: both end at a
/// reboot), one hexadecimal base per line.
#[derive(Debug)]
pub(crate) struct EpochLog {
    path: PathBuf,
}

impl EpochLog {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// The bases recorded by earlier runs, or none when the module holds no
    /// page (what they stored is garbage). A missing file is an empty one.
    pub fn earlier(&self, module_pages: u64) -> io::Result<Vec<u64>> {
        if module_pages == 0 {
            return Ok(Vec::new());
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| {
                u64::from_str_radix(l, 16).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("not a handle base: {l:?}"),
                    )
                })
            })
            .collect()
    }

    /// Records `bases` (replacing the file whole, so a crash leaves the old
    /// list or the new one), before any page is stored under the newest.
    pub fn record(&self, bases: &[u64]) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text: String = bases.iter().map(|b| format!("{b:x}\n")).collect();
        replace_file(&self.path, text.as_bytes())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Coalesces sorted handles into runs of consecutive ones: (first, count).
pub(crate) fn runs_of(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &h in sorted {
        match out.last_mut() {
            Some((first, n)) if h < *first + *n => {}
            Some((first, n)) if *first + *n == h => *n += 1,
            _ => out.push((h, 1)),
        }
    }
    out
}

/// Invalidates a whole handle space (its servers free what is left) and
/// unregisters it. False if the invalidation did not complete.
pub(crate) fn retire(cluster: &Cluster, s: &Space) -> bool {
    let complete = cluster.invalidate_spans(&s.name, &[(0, (1u64 << SPACE_BITS) * 4096)]);
    if !complete {
        tracing::warn!(space = %s.name, "could not free everything of a handle space");
    }
    if let Err(e) = cluster.unregister(s.interval) {
        tracing::warn!(space = %s.name, error = %e, "cannot unregister a handle space");
    }
    complete
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drawn_epoch_is_free_of_taken_and_live_ones() {
        // Epochs no other test draws (theirs are random; a clash would
        // only make this loop draw on).
        let draws = |seq: Vec<u32>| {
            let mut it = seq.into_iter();
            move || it.next().expect("a free epoch among the draws")
        };
        let held = claim_from(&[], draws(vec![0xabc001]));
        assert_eq!(held.base(), 0xabc001 << SPACE_BITS);
        // Held by this process, then listed as taken: both skipped.
        let taken = [0xabc002 << SPACE_BITS];
        let next = claim_from(&taken, draws(vec![0xabc001, 0xabc002, 0xabc003]));
        assert_eq!(next.base(), 0xabc003 << SPACE_BITS);
        // Released when dropped.
        drop(held);
        let again = claim_from(&[], draws(vec![0xabc001]));
        assert_eq!(again.base(), 0xabc001 << SPACE_BITS);
    }

    #[test]
    fn consecutive_handles_coalesce() {
        assert_eq!(runs_of(&[]), vec![]);
        assert_eq!(
            runs_of(&[1, 2, 3, 3, 7, 9, 10]),
            vec![(1, 3), (7, 1), (9, 2)]
        );
    }

    #[test]
    fn spaces_hold_their_epoch_only() {
        let s = Space {
            name: "n".into(),
            base: 5 << SPACE_BITS,
            interval: 1,
        };
        assert!(s.contains(5 << SPACE_BITS));
        assert!(s.contains((6 << SPACE_BITS) - 1));
        assert!(!s.contains(6 << SPACE_BITS));
        assert!(!s.contains((5 << SPACE_BITS) - 1));
        let b = 5 << SPACE_BITS;
        assert_eq!(
            s.spans(&[b, b + 1, b + 5]),
            vec![(0, 8192), (5 * 4096, 4096)]
        );
    }
}

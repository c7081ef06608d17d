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

/// A base no space in `taken` has: a random 24-bit epoch.
pub(crate) fn new_base(taken: &[u64]) -> u64 {
    loop {
        let base = u64::from(rand::random::<u32>() & 0xff_ffff) << SPACE_BITS;
        if !taken.contains(&base) {
            return base;
        }
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

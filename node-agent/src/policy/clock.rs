//! CLOCK (second chance) over a region's pages, with the reference bit
//! emulated by the page-table entry itself.
//!
//! The kernel this runs on offers no accessed-bit or idle-page interface to
//! userspace, so the agent makes accesses visible: when the hand passes an
//! *active* (mapped) page it removes the page's PTE, keeping the data in the
//! region's memfd, and marks it *inactive*. A touch of an inactive page is a
//! minor fault the agent serves in microseconds, making the page active
//! again: its second chance. A page the hand finds still inactive on its
//! next pass was not touched for a whole revolution and is evicted.
//!
//! The hand only moves when memory must be freed, so a region under its
//! budget pays nothing, and a hot page pays at most one minor fault per
//! revolution.

use crate::mem::Backing;
use crate::region::state::{Kind, States};

/// The clock hand and a buffer of PTEs waiting to be removed.
#[derive(Debug, Default)]
pub struct Clock {
    hand: usize,
    /// Run of pages deactivated but whose PTEs are not removed yet.
    run: Option<(usize, usize)>,
}

impl Clock {
    /// A hand at page 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the hand until `want` victims are claimed (their state set to
    /// `Evicting`) or two revolutions pass. Returns the number claimed.
    ///
    /// PTEs of deactivated pages are removed before the hand can come back
    /// to them, so a claimed victim is never mapped.
    pub fn collect(
        &mut self,
        states: &States,
        backing: &Backing,
        want: usize,
        victims: &mut Vec<usize>,
    ) -> usize {
        let n = states.len();
        let start = victims.len();
        let mut steps = 0;
        while victims.len() - start < want && steps < 2 * n {
            let i = self.hand;
            let s = states.get(i);
            match s.kind() {
                Kind::Active if states.cas(i, s, s.with_kind(Kind::Inactive)) => {
                    self.defer_unmap(backing, i);
                }
                Kind::Inactive if states.cas(i, s, s.with_kind(Kind::Evicting)) => {
                    victims.push(i);
                }
                _ => {}
            }
            steps += 1;
            self.hand += 1;
            if self.hand == n {
                self.hand = 0;
                self.flush(backing);
            }
        }
        self.flush(backing);
        victims.len() - start
    }

    fn defer_unmap(&mut self, backing: &Backing, i: usize) {
        match self.run {
            Some((first, len)) if first + len == i => self.run = Some((first, len + 1)),
            _ => {
                self.flush(backing);
                self.run = Some((i, 1));
            }
        }
    }

    /// Removes the PTEs of the pending run.
    pub fn flush(&mut self, backing: &Backing) {
        if let Some((first, len)) = self.run.take()
            && let Err(e) = backing.unmap_ptes(first, len)
        {
            // The pages stay mapped: harmless for correctness only if no
            // victim is taken from them, so say so loudly.
            tracing::error!(first, len, error = %e, "cannot unmap PTEs for access tracking");
        }
    }
}

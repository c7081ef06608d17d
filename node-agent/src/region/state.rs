//! The state of each page of a region, one atomic word per page.
//!
//! ```text
//!            fault (zero-fill)             clock: unmap PTE
//!  Absent ───────────────────► Active ◄────────────────────► Inactive
//!                                 ▲        minor fault          │
//!          fault (fetch) ┌────────┘                              │ clock: victim
//!  Remote ──► Fetching ──┤  prefetch (no PTE)                    ▼
//!    ▲                   └──────────────────────► Inactive    Evicting
//!    └───────────────────────────────────────────────────────────┘
//!                       server acknowledged, memory freed
//! ```
//!
//! `Fetching` and `Evicting` are owned by one thread; a fault that finds a
//! page in either sets `WAITER`, and the owner wakes the faulting threads
//! when it is done. A fault handler also takes a resident page to
//! `Fetching` while it changes the page's mapping (maps it, or drops its
//! write protection), so the clock can never deactivate or claim a page
//! whose PTE is about to appear. Flags: `CLEAN` — the server holds exactly the local
//! contents (the page is mapped write-protected so the first write is
//! seen); `STORED` — the server holds some copy (freed when the region is
//! dropped); `PREFETCHED` — brought in ahead of use and not touched yet.
//! The stored copy's handle is kept beside the word (`Inner::handles`), and
//! the region's book says which server holds it.

use std::sync::atomic::{AtomicU32, Ordering};

/// Where a page's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Never touched: reads as zeroes, no memory, nothing on a server.
    Absent = 0,
    /// In memory and mapped.
    Active = 1,
    /// In memory, PTE removed: the next touch is observed.
    Inactive = 2,
    /// Owned by one fault handler: being brought in, or its mapping being
    /// changed.
    Fetching = 3,
    /// Being sent out by the evictor.
    Evicting = 4,
    /// Only on the server.
    Remote = 5,
}

pub const KIND_MASK: u32 = 0b111;
pub const CLEAN: u32 = 1 << 3;
pub const STORED: u32 = 1 << 4;
pub const WAITER: u32 = 1 << 5;
pub const PREFETCHED: u32 = 1 << 6;

/// A snapshot of one page's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State(pub u32);

impl State {
    pub fn kind(self) -> Kind {
        match self.0 & KIND_MASK {
            0 => Kind::Absent,
            1 => Kind::Active,
            2 => Kind::Inactive,
            3 => Kind::Fetching,
            4 => Kind::Evicting,
            _ => Kind::Remote,
        }
    }
    pub fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }
    /// The same flags with another kind.
    pub fn with_kind(self, kind: Kind) -> State {
        State((self.0 & !KIND_MASK) | kind as u32)
    }
    pub fn set(self, flag: u32) -> State {
        State(self.0 | flag)
    }
    pub fn clear(self, flag: u32) -> State {
        State(self.0 & !flag)
    }
    /// Whether the page occupies local memory.
    pub fn resident(self) -> bool {
        matches!(
            self.kind(),
            Kind::Active | Kind::Inactive | Kind::Fetching | Kind::Evicting
        )
    }
}

/// The state words of every page.
#[derive(Debug)]
pub struct States(Box<[AtomicU32]>);

impl States {
    /// `pages` pages, all absent.
    pub fn new(pages: usize) -> Self {
        Self(
            (0..pages)
                .map(|_| AtomicU32::new(Kind::Absent as u32))
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, i: usize) -> State {
        State(self.0[i].load(Ordering::Acquire))
    }

    /// Replaces `old` with `new`; false if the word changed meanwhile.
    pub fn cas(&self, i: usize, old: State, new: State) -> bool {
        self.0[i]
            .compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Stores `new` unconditionally and returns the previous word (the owner
    /// of a Fetching/Evicting page uses this to learn about waiters).
    pub fn swap(&self, i: usize, new: State) -> State {
        State(self.0[i].swap(new.0, Ordering::AcqRel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_flags_are_independent() {
        let s = State(Kind::Remote as u32).set(STORED).set(CLEAN);
        assert_eq!(s.kind(), Kind::Remote);
        let t = s.with_kind(Kind::Fetching).set(WAITER);
        assert_eq!(t.kind(), Kind::Fetching);
        assert!(t.has(STORED) && t.has(CLEAN) && t.has(WAITER));
        assert!(t.resident() && !s.resident());
        assert!(!t.clear(WAITER).has(WAITER));
    }

    #[test]
    fn cas_detects_concurrent_change() {
        let st = States::new(2);
        let a = st.get(0);
        assert!(st.cas(0, a, a.with_kind(Kind::Active)));
        assert!(!st.cas(0, a, a.with_kind(Kind::Remote)));
        assert_eq!(st.swap(0, a).kind(), Kind::Active);
    }
}

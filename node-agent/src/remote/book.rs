//! The book: which capacity a backend holds and which server each stored
//! handle is on.
//!
//! - *Grants* are capacity on one server: granted by the coordinator in a
//!   cluster, or one unbounded grant per configured server otherwise.
//!   Batches being evicted take turns over the grants with room (a batch
//!   larger than a grant's room is cut into [`Piece`]s), so pages spread
//!   over the servers whatever the sizes of the grants.
//! - *Runs* are the pieces once stored: first handle, pages, server. A
//!   fault reads the run of its handle to know which server to ask; a free
//!   takes the handle off its run, and the run goes when its last handle
//!   does.
//! - While a run moves to another server (a drain), frees of its handles
//!   are remembered, so the mover can free the copies it wrote after them.

use std::collections::{BTreeMap, BTreeSet};

/// A part of a batch being evicted: `count` handles from `first` go to
/// server `server`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub first: u64,
    pub count: usize,
    pub server: u8,
    pub(crate) grant: Option<usize>,
}

/// Pages of a grant standing for a configured server's whole capacity.
pub(crate) const UNBOUNDED: u64 = 1 << 62;

#[derive(Debug)]
pub(crate) struct Grant {
    pub id: u64,
    /// The server's member id (0 outside a cluster).
    pub member: u64,
    /// Its server is being drained: nothing new goes there.
    pub draining: bool,
    pub server: u8,
    pub pages: u64,
    pub used: u64,
}

#[derive(Debug)]
pub(crate) struct Run {
    pub pages: u64,
    pub server: u8,
    pub grant: Option<usize>,
    /// Handles of the run not freed yet.
    pub live: u64,
}

/// A run being moved, and the handles of it freed meanwhile.
#[derive(Debug)]
pub(crate) struct Moving {
    pub first: u64,
    pub pages: u64,
    pub freed: Vec<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Book {
    pub grants: Vec<Grant>,
    /// First handle -> run.
    pub runs: BTreeMap<u64, Run>,
    /// Server members subscribed to the space's interval.
    pub subscribed: BTreeSet<u64>,
    /// The grant the next batch tries first.
    pub turn: usize,
    pub moving: Option<Moving>,
}

impl Book {
    pub fn run_of(&self, h: u64) -> Option<(u64, &Run)> {
        self.runs
            .range(..=h)
            .next_back()
            .filter(|(first, r)| h - **first < r.pages)
            .map(|(f, r)| (*f, r))
    }

    /// Takes handle `h` off the book; its server if it was on it.
    pub fn forget(&mut self, h: u64) -> Option<u8> {
        let (first, run) = self.run_of(h)?;
        let (server, grant) = (run.server, run.grant);
        let run = self.runs.get_mut(&first).expect("found above");
        run.live -= 1;
        if run.live == 0 {
            self.runs.remove(&first);
        }
        if let Some(g) = grant.and_then(|g| self.grants.get_mut(g)) {
            g.used = g.used.saturating_sub(1);
        }
        if let Some(m) = &mut self.moving
            && h.wrapping_sub(m.first) < m.pages
        {
            m.freed.push(h);
        }
        Some(server)
    }

    /// Places up to `count` handles from `first` on grants with room, in
    /// turn; returns the pieces and how many handles found no room.
    pub fn take(&mut self, first: u64, count: u64) -> (Vec<Piece>, u64) {
        let mut pieces = Vec::new();
        let (mut next, mut left) = (first, count);
        while left > 0 {
            let n = self.grants.len();
            let start = self.turn;
            let Some(k) = (0..n)
                .map(|i| (start + i) % n)
                .find(|&k| self.grants[k].used < self.grants[k].pages && !self.grants[k].draining)
            else {
                break;
            };
            self.turn = k + 1;
            let g = &mut self.grants[k];
            let take = left.min(g.pages - g.used);
            g.used += take;
            pieces.push(Piece {
                first: next,
                count: take as usize,
                server: g.server,
                grant: Some(k),
            });
            next += take;
            left -= take;
        }
        (pieces, left)
    }

    /// Gives back what `pieces` took of their grants (nothing was stored).
    pub fn give_back(&mut self, pieces: &[Piece]) {
        for p in pieces {
            if let Some(g) = p.grant.and_then(|g| self.grants.get_mut(g)) {
                g.used = g.used.saturating_sub(p.count as u64);
            }
        }
    }

    /// Records `pieces` as stored on their servers.
    pub fn record(&mut self, pieces: &[Piece]) {
        for p in pieces.iter().filter(|p| p.count > 0) {
            self.runs.insert(
                p.first,
                Run {
                    pages: p.count as u64,
                    server: p.server,
                    grant: p.grant,
                    live: p.count as u64,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(server: u8, pages: u64, used: u64) -> Grant {
        Grant {
            id: u64::from(server) + 1,
            member: u64::from(server) + 10,
            draining: false,
            server,
            pages,
            used,
        }
    }

    #[test]
    fn the_book_finds_and_forgets_handles() {
        let mut book = Book::default();
        book.grants.push(grant(0, 100, 12));
        book.runs.insert(
            10,
            Run {
                pages: 8,
                server: 3,
                grant: Some(0),
                live: 8,
            },
        );
        book.runs.insert(
            30,
            Run {
                pages: 4,
                server: 1,
                grant: Some(0),
                live: 4,
            },
        );
        assert_eq!(book.run_of(9).map(|r| r.0), None);
        assert_eq!(book.run_of(17).map(|(_, r)| r.server), Some(3));
        assert_eq!(book.run_of(18).map(|r| r.0), None);
        assert_eq!(book.run_of(33).map(|(_, r)| r.server), Some(1));
        assert_eq!(book.forget(18), None);
        for h in 30..34 {
            assert_eq!(book.forget(h), Some(1));
        }
        assert!(book.run_of(30).is_none(), "an emptied run is dropped");
        assert_eq!(book.grants[0].used, 8);
    }

    #[test]
    fn batches_take_turns_over_grants_with_room() {
        let mut book = Book::default();
        book.grants.push(grant(0, 10, 0));
        book.grants.push(grant(1, 100, 0));
        book.grants.push(grant(2, 100, 0));
        book.grants[2].draining = true;
        let (a, left) = book.take(0, 8);
        assert_eq!((a.len(), a[0].server, left), (1, 0, 0));
        let (b, _) = book.take(8, 8);
        assert_eq!(b[0].server, 1, "the next batch goes to the next grant");
        // Grant 0 has 2 pages of room: the batch is cut in two.
        let (c, left) = book.take(16, 5);
        assert_eq!(
            c.iter()
                .map(|p| (p.first, p.count, p.server))
                .collect::<Vec<_>>(),
            [(16, 2, 0), (18, 3, 1)]
        );
        assert_eq!(left, 0);
        let (_, left) = book.take(21, 1000);
        assert_eq!(left, 1000 - 89, "only grant 1's room is left");
        book.give_back(&c);
        assert_eq!((book.grants[0].used, book.grants[1].used), (8, 100 - 3));
    }

    #[test]
    fn frees_during_a_move_are_remembered() {
        let mut book = Book::default();
        book.record(&[Piece {
            first: 100,
            count: 4,
            server: 0,
            grant: None,
        }]);
        book.moving = Some(Moving {
            first: 100,
            pages: 4,
            freed: Vec::new(),
        });
        book.forget(102);
        book.forget(7);
        assert_eq!(book.moving.as_ref().unwrap().freed, [102]);
    }
}

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
//! - With redundancy a piece, and the run it becomes, has one slot per
//!   copy: a server (and grant) each, all distinct servers. Servers found
//!   failing are *suspect* for a while: nothing new goes there, and faults
//!   read another copy first.
//! - While a run moves to another server (a drain), frees of its handles
//!   are remembered, so the mover can free the copies it wrote after them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

pub use rmem_common::redundancy::MAX_COPIES;

/// One copy of a run: its server and the grant it counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slot {
    pub server: u8,
    pub(crate) grant: Option<usize>,
}

/// The copies of a run, on distinct servers; the first is read first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slots {
    n: u8,
    at: [Slot; MAX_COPIES],
}

impl Slots {
    pub fn one(server: u8, grant: Option<usize>) -> Self {
        let mut s = Self::default();
        s.push(Slot { server, grant });
        s
    }

    pub(crate) fn push(&mut self, slot: Slot) {
        self.at[usize::from(self.n)] = slot;
        self.n += 1;
    }

    pub fn len(&self) -> usize {
        usize::from(self.n)
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.at[..self.len()].iter()
    }

    /// The servers holding copies, in reading order.
    pub fn servers(&self) -> impl Iterator<Item = u8> + '_ {
        self.iter().map(|s| s.server)
    }

    pub fn has_server(&self, server: u8) -> bool {
        self.servers().any(|s| s == server)
    }

    /// The first copy's server.
    pub fn server(&self) -> u8 {
        self.at[0].server
    }

    pub(crate) fn slot_mut(&mut self, k: usize) -> &mut Slot {
        &mut self.at[..usize::from(self.n)][k]
    }
}

/// A part of a batch being evicted: `count` handles from `first` go to
/// the servers of `slots` (each handle to every one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub first: u64,
    pub count: usize,
    pub slots: Slots,
}

impl Piece {
    /// The server of its first copy.
    pub fn server(&self) -> u8 {
        self.slots.server()
    }
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
    /// The server's failure domain (empty: its own).
    pub domain: String,
    /// Held over from an earlier run of the kernel agent: it may hold
    /// pages of handles the book has not learned yet, so a drain never
    /// returns it.
    pub inherited: bool,
}

impl Grant {
    /// A grant on `server` with `pages` of room.
    pub fn new(id: u64, member: u64, server: u8, pages: u64) -> Self {
        Self {
            id,
            member,
            draining: false,
            server,
            pages,
            used: 0,
            domain: String::new(),
            inherited: false,
        }
    }

    /// Whether copies on `self` and `other` could fail together: the same
    /// server, or the same named domain.
    fn shares_fate(&self, other: &Grant) -> bool {
        self.server == other.server || (!self.domain.is_empty() && self.domain == other.domain)
    }
}

#[derive(Debug)]
pub(crate) struct Run {
    pub pages: u64,
    pub slots: Slots,
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
    /// Servers found failing, and until when nothing new goes there.
    pub suspects: BTreeMap<u8, Instant>,
    /// Servers the coordinator declared gone: nothing new goes there, they
    /// are read last, and their copies do not count as live.
    pub gone: BTreeSet<u8>,
    /// Copies taken by [`Book::take`] and not yet recorded or given back,
    /// per server: a drain is not done while some are on its server.
    pub placing: BTreeMap<u8, u64>,
}

impl Book {
    pub fn run_of(&self, h: u64) -> Option<(u64, &Run)> {
        self.runs
            .range(..=h)
            .next_back()
            .filter(|(first, r)| h - **first < r.pages)
            .map(|(f, r)| (*f, r))
    }

    /// Takes handle `h` off the book; the servers of its copies if it was
    /// on it.
    pub fn forget(&mut self, h: u64) -> Option<Slots> {
        let (first, run) = self.run_of(h)?;
        let slots = run.slots;
        let run = self.runs.get_mut(&first).expect("found above");
        run.live -= 1;
        if run.live == 0 {
            self.runs.remove(&first);
        }
        for slot in slots.iter() {
            if let Some(g) = slot.grant.and_then(|g| self.grants.get_mut(g)) {
                g.used = g.used.saturating_sub(1);
            }
        }
        if let Some(m) = &mut self.moving
            && h.wrapping_sub(m.first) < m.pages
        {
            m.freed.push(h);
        }
        Some(slots)
    }

    /// Whether nothing new should go to `server` now (found failing, or
    /// declared gone).
    pub fn is_suspect(&self, server: u8, now: Instant) -> bool {
        self.gone.contains(&server) || self.suspects.get(&server).is_some_and(|&until| until > now)
    }

    /// Pages with fewer live copies (not on a gone server) than `copies`.
    pub fn at_risk(&self, copies: usize) -> u64 {
        self.runs
            .values()
            .filter(|r| r.slots.servers().filter(|s| !self.gone.contains(s)).count() < copies)
            .map(|r| r.live)
            .sum()
    }

    fn placing(&mut self, slots: &Slots, add: bool) {
        for s in slots.servers() {
            let n = self.placing.entry(s).or_default();
            if add {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
            }
        }
    }

    fn open(&self, k: usize, now: Instant) -> bool {
        let g = &self.grants[k];
        g.used < g.pages && !g.draining && !self.is_suspect(g.server, now)
    }

    /// Places up to `count` handles from `first` on grants with room, in
    /// turn, each piece on up to `copies` distinct servers; returns the
    /// pieces and how many handles found no room at all.
    pub fn take(&mut self, first: u64, count: u64, copies: usize) -> (Vec<Piece>, u64) {
        let now = Instant::now();
        let mut pieces = Vec::new();
        let (mut next, mut left) = (first, count);
        while left > 0 {
            let n = self.grants.len();
            let start = self.turn;
            let Some(k) = (0..n).map(|i| (start + i) % n).find(|&k| self.open(k, now)) else {
                break;
            };
            self.turn = k + 1;
            let mut chosen = vec![k];
            // Further copies: the grants with most room on other servers,
            // in other failure domains while there are some.
            while chosen.len() < copies.min(MAX_COPIES) {
                let taken: Vec<u8> = chosen.iter().map(|&c| self.grants[c].server).collect();
                let room = |j: usize| self.grants[j].pages - self.grants[j].used;
                let open: Vec<usize> = (0..n)
                    .filter(|&j| self.open(j, now) && !taken.contains(&self.grants[j].server))
                    .collect();
                let apart = open
                    .iter()
                    .copied()
                    .filter(|&j| {
                        chosen
                            .iter()
                            .all(|&c| !self.grants[j].shares_fate(&self.grants[c]))
                    })
                    .max_by_key(|&j| room(j));
                match apart.or_else(|| open.iter().copied().max_by_key(|&j| room(j))) {
                    Some(j) => chosen.push(j),
                    None => break,
                }
            }
            let take = chosen
                .iter()
                .map(|&c| self.grants[c].pages - self.grants[c].used)
                .fold(left, u64::min);
            let mut slots = Slots::default();
            for &c in &chosen {
                self.grants[c].used += take;
                slots.push(Slot {
                    server: self.grants[c].server,
                    grant: Some(c),
                });
            }
            self.placing(&slots, true);
            pieces.push(Piece {
                first: next,
                count: take as usize,
                slots,
            });
            next += take;
            left -= take;
        }
        (pieces, left)
    }

    /// Gives back what `pieces` took of their grants (nothing was stored).
    pub fn give_back(&mut self, pieces: &[Piece]) {
        for p in pieces {
            self.placing(&p.slots, false);
            for slot in p.slots.iter() {
                if let Some(g) = slot.grant.and_then(|g| self.grants.get_mut(g)) {
                    g.used = g.used.saturating_sub(p.count as u64);
                }
            }
        }
    }

    /// Records `pieces` as stored on their servers.
    pub fn record(&mut self, pieces: &[Piece]) {
        for p in pieces {
            if p.slots.iter().any(|s| s.grant.is_some()) {
                self.placing(&p.slots, false);
            }
        }
        for p in pieces.iter().filter(|p| p.count > 0) {
            self.runs.insert(
                p.first,
                Run {
                    pages: p.count as u64,
                    slots: p.slots,
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
        let mut g = Grant::new(u64::from(server) + 1, u64::from(server) + 10, server, pages);
        g.used = used;
        g
    }

    #[test]
    fn the_book_finds_and_forgets_handles() {
        let mut book = Book::default();
        book.grants.push(grant(0, 100, 12));
        book.runs.insert(
            10,
            Run {
                pages: 8,
                slots: Slots::one(3, Some(0)),
                live: 8,
            },
        );
        book.runs.insert(
            30,
            Run {
                pages: 4,
                slots: Slots::one(1, Some(0)),
                live: 4,
            },
        );
        assert_eq!(book.run_of(9).map(|r| r.0), None);
        assert_eq!(book.run_of(17).map(|(_, r)| r.slots.server()), Some(3));
        assert_eq!(book.run_of(18).map(|r| r.0), None);
        assert_eq!(book.run_of(33).map(|(_, r)| r.slots.server()), Some(1));
        assert_eq!(book.forget(18), None);
        for h in 30..34 {
            assert_eq!(book.forget(h).map(|s| s.server()), Some(1));
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
        let (a, left) = book.take(0, 8, 1);
        assert_eq!((a.len(), a[0].server(), left), (1, 0, 0));
        let (b, _) = book.take(8, 8, 1);
        assert_eq!(b[0].server(), 1, "the next batch goes to the next grant");
        // Grant 0 has 2 pages of room: the batch is cut in two.
        let (c, left) = book.take(16, 5, 1);
        assert_eq!(
            c.iter()
                .map(|p| (p.first, p.count, p.server()))
                .collect::<Vec<_>>(),
            [(16, 2, 0), (18, 3, 1)]
        );
        assert_eq!(left, 0);
        let (_, left) = book.take(21, 1000, 1);
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
            slots: Slots::one(0, None),
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

    #[test]
    fn copies_go_to_distinct_servers_and_skip_suspects() {
        let mut book = Book::default();
        book.grants.push(grant(0, 100, 0));
        book.grants.push(grant(1, 100, 0));
        book.grants.push(grant(2, 50, 0));
        // A second grant on server 0: never two copies on one server.
        book.grants.push(grant(0, 100, 0));
        let (p, left) = book.take(0, 10, 2);
        assert_eq!(left, 0);
        let servers: Vec<u8> = p[0].slots.servers().collect();
        assert_eq!(servers.len(), 2);
        assert_ne!(servers[0], servers[1]);
        book.suspects
            .insert(1, Instant::now() + std::time::Duration::from_secs(60));
        for k in 0..10 {
            let (p, _) = book.take(100 + k, 1, 3);
            assert!(!p[0].slots.has_server(1), "a suspect server got a copy");
            assert_eq!(p[0].slots.len(), 2, "only servers 0 and 2 are open");
        }
        book.record(&p);
        let used: u64 = book.grants.iter().map(|g| g.used).sum();
        assert_eq!(book.forget(3).map(|s| s.len()), Some(2));
        assert_eq!(book.grants.iter().map(|g| g.used).sum::<u64>(), used - 2);
    }

    #[test]
    fn further_copies_go_to_other_failure_domains() {
        let mut book = Book::default();
        for (server, domain) in [(0, "a"), (1, "a"), (2, "b")] {
            let mut g = grant(server, 1000, 0);
            g.domain = domain.into();
            book.grants.push(g);
        }
        for k in 0..30 {
            let (p, _) = book.take(k * 10, 10, 2);
            let domains: Vec<&str> = p[0]
                .slots
                .servers()
                .map(|s| book.grants[usize::from(s)].domain.as_str())
                .collect();
            assert_ne!(domains[0], domains[1], "two copies in one rack: {p:?}");
        }
    }
}

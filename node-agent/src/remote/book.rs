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
//! - With erasure coding (`ec=K+M`) a piece's slots are the K data and M
//!   parity slots of its stripes ([`super::stripe`]); a freed data page
//!   stays on its server until its whole stripe is dead, then the stripe's
//!   pages are freed together ([`Freed::Pages`]).
//! - While a run moves to another server (a drain), frees of its handles
//!   are remembered, so the mover can free the copies it wrote after them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

pub use rmem_common::redundancy::MAX_SHARDS;

use super::stripe::{Layout, Striped};

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
    at: [Slot; MAX_SHARDS],
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

    /// Copy or slot `k`.
    pub fn get(&self, k: usize) -> Option<&Slot> {
        self.at[..self.len()].get(k)
    }
}

/// A part of a batch being evicted: `count` handles from `first` go to
/// the servers of `slots`: each handle to every one of them, or, erasure
/// coded, as `stripes` lays them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub first: u64,
    pub count: usize,
    pub slots: Slots,
    pub stripes: Option<Layout>,
    /// Slots its policy asks for (more than `slots` holds when placed
    /// short).
    pub wanted: u8,
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
    /// Given back to the coordinator (its server was drained): kept so
    /// that runs still name grants by index.
    pub released: bool,
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
            released: false,
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
    /// Erasure coded: the layout of its stripes, and what of each lives.
    pub striped: Option<Box<Striped>>,
    /// Copies or slots its policy asks for: with fewer live ones, its
    /// pages are at risk.
    pub wanted: u8,
}

impl Run {
    /// Pages each copy or slot of the run holds (and counts against its
    /// grant): the live handles, or, erasure coded, the live stripes.
    pub fn per_slot(&self) -> u64 {
        match &self.striped {
            None => self.live,
            Some(s) => s.alive().count() as u64,
        }
    }

    /// The handles copy or slot `k` holds.
    pub fn slot_handles(&self, first: u64, k: usize) -> Vec<u64> {
        match &self.striped {
            None => (first..first + self.pages).collect(),
            Some(s) => s.slot_handles(k),
        }
    }
}

/// What freeing a handle lets go on the servers.
// Returned and consumed at once: not worth a box per freed handle.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Freed {
    /// The handle, on each server of these copies.
    Copies(Slots),
    /// These pages, each on its server: its stripe died whole (data and
    /// parity pages). Empty while another data page of the stripe lives.
    Pages(Vec<(u64, u8)>),
}

impl Freed {
    /// (handle, server) of each page to free, `h` being the handle freed.
    pub fn pages(&self, h: u64) -> Vec<(u64, u8)> {
        match self {
            Freed::Copies(slots) => slots.servers().map(|s| (h, s)).collect(),
            Freed::Pages(p) => p.clone(),
        }
    }
}

/// A run being moved, and the handles of it freed meanwhile (pages the
/// mover may have written after their free). Drains of two servers may
/// move the same store's runs at once: each move has its own `token`.
#[derive(Debug)]
pub(crate) struct Moving {
    pub token: u64,
    pub first: u64,
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
    pub moving: Vec<Moving>,
    /// The token of the next move, or of the next batch of frees.
    pub moves: u64,
    /// Frees on their way, a batch per token: handles taken off the book
    /// whose frees may not have reached their servers yet. A move that
    /// starts meanwhile may still read one of them on its old server and
    /// copy it: it frees them on its new server too.
    pub freeing: Vec<(u64, Vec<u64>)>,
    /// Servers found failing, and until when nothing new goes there.
    pub suspects: BTreeMap<u8, Instant>,
    /// Servers the coordinator declared gone: nothing new goes there, they
    /// are read last, and their copies do not count as live.
    pub gone: BTreeSet<u8>,
    /// Copies taken by [`Book::take`] and not yet recorded or given back,
    /// per server: a drain is not done while some are on its server.
    pub placing: BTreeMap<u8, u64>,
    /// Frees a server still owes: handles off the book for good, freed
    /// while it was failing (not waited for) or whose free it did not
    /// answer. Never a live handle: a drain may put one back on it. Paid once it answers
    /// again ([`super::homes::Homes::pay_owed`]); dropped if it is declared
    /// gone (it frees its stale copies when it comes back).
    pub owed: BTreeMap<u8, Vec<u64>>,
    /// When each server's owed frees are tried next, and the wait after
    /// its last failed try.
    pub owed_due: BTreeMap<u8, Instant>,
    pub owed_backoff: BTreeMap<u8, std::time::Duration>,
    /// The kernel agent's record of the runs, for its next run
    /// ([`super::journal`]); written under the book's lock.
    pub journal: Option<super::journal::Journal>,
}

impl Book {
    pub fn run_of(&self, h: u64) -> Option<(u64, &Run)> {
        self.runs
            .range(..=h)
            .next_back()
            .filter(|(first, r)| h - **first < r.pages)
            .map(|(f, r)| (*f, r))
    }

    /// Takes handle `h` off the book; what that lets go on the servers if
    /// it was on it.
    pub fn forget(&mut self, h: u64) -> Option<Freed> {
        let (first, _) = self.run_of(h)?;
        let run = self.runs.get_mut(&first).expect("found above");
        let slots = run.slots;
        let freed = match &mut run.striped {
            None => Freed::Copies(slots),
            Some(st) => {
                let (j, _) = st.layout.locate(h);
                let live = &mut st.live[j as usize];
                *live = live.saturating_sub(1);
                if *live > 0 {
                    Freed::Pages(Vec::new())
                } else {
                    Freed::Pages(
                        st.layout
                            .stripe(j)
                            .map(|(k, h)| (h, slots.get(k).expect("a slot per shard").server))
                            .collect(),
                    )
                }
            }
        };
        run.live -= 1;
        if run.live == 0 {
            self.runs.remove(&first);
        }
        // A copy counts against its grant while it is held.
        let held_by_all = match &freed {
            Freed::Copies(_) => true,
            Freed::Pages(p) => !p.is_empty(),
        };
        if held_by_all {
            for slot in slots.iter() {
                if let Some(g) = slot.grant.and_then(|g| self.grants.get_mut(g)) {
                    g.used = g.used.saturating_sub(1);
                }
            }
        }
        for m in self.moving.iter_mut().filter(|m| m.first == first) {
            m.freed.extend(freed.pages(h).iter().map(|(h, _)| *h));
        }
        Some(freed)
    }

    /// Whether nothing new should go to `server` now (found failing, or
    /// declared gone).
    pub fn is_suspect(&self, server: u8, now: Instant) -> bool {
        self.gone.contains(&server) || self.suspects.get(&server).is_some_and(|&until| until > now)
    }

    /// Pages with fewer live copies or stripe pages (not on a gone
    /// server) than `copies`.
    pub fn at_risk(&self) -> u64 {
        self.runs
            .values()
            .filter(|r| {
                r.slots.servers().filter(|s| !self.gone.contains(s)).count() < usize::from(r.wanted)
            })
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
    ///
    /// Erasure coded (`data` > 1: `copies` is data plus parity pages per
    /// stripe), a piece takes `ceil(count / data)` pages of each of its
    /// servers, and needs at least `data + 1` of them (fewer parity pages
    /// than asked when fewer have room: at risk). Its parity handles are
    /// not taken yet (`parity_first` is 0).
    pub fn take(
        &mut self,
        first: u64,
        count: u64,
        copies: usize,
        data: usize,
    ) -> (Vec<Piece>, u64) {
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
            while chosen.len() < copies.min(MAX_SHARDS) {
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
            if data > 1 && chosen.len() <= data {
                // Not even one parity page: nowhere safe to code this.
                break;
            }
            let per = |pages: u64| pages.div_ceil(data as u64);
            let take = chosen
                .iter()
                .map(|&c| (self.grants[c].pages - self.grants[c].used).saturating_mul(data as u64))
                .fold(left, u64::min);
            let mut slots = Slots::default();
            for &c in &chosen {
                self.grants[c].used += per(take);
                slots.push(Slot {
                    server: self.grants[c].server,
                    grant: Some(c),
                });
            }
            self.placing(&slots, true);
            let stripes = (data > 1).then(|| Layout {
                first: next,
                count: take,
                data: data as u8,
                parity: (chosen.len() - data) as u8,
                parity_first: 0,
            });
            pieces.push(Piece {
                first: next,
                count: take as usize,
                slots,
                stripes,
                wanted: copies.min(MAX_SHARDS) as u8,
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
            let per = p.stripes.map_or(p.count as u64, |l| l.stripes());
            for slot in p.slots.iter() {
                if let Some(g) = slot.grant.and_then(|g| self.grants.get_mut(g)) {
                    g.used = g.used.saturating_sub(per);
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
                    striped: p.stripes.map(|l| Box::new(Striped::new(l))),
                    wanted: p.wanted,
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
                striped: None,
                wanted: 1,
            },
        );
        book.runs.insert(
            30,
            Run {
                pages: 4,
                slots: Slots::one(1, Some(0)),
                live: 4,
                striped: None,
                wanted: 1,
            },
        );
        assert_eq!(book.run_of(9).map(|r| r.0), None);
        assert_eq!(book.run_of(17).map(|(_, r)| r.slots.server()), Some(3));
        assert_eq!(book.run_of(18).map(|r| r.0), None);
        assert_eq!(book.run_of(33).map(|(_, r)| r.slots.server()), Some(1));
        assert_eq!(book.forget(18), None);
        for h in 30..34 {
            assert_eq!(book.forget(h), Some(Freed::Copies(Slots::one(1, Some(0)))));
        }
        assert!(book.run_of(30).is_none(), "an emptied run is dropped");
        assert_eq!(book.grants[0].used, 8);
    }

    #[test]
    fn stripes_take_a_share_of_each_server_and_die_whole() {
        let mut book = Book::default();
        for s in 0..6 {
            book.grants.push(grant(s, 100, 0));
        }
        // ec=4+2: 10 pages are 3 stripes, 3 pages on each of 6 servers.
        let (mut pieces, left) = book.take(1000, 10, 6, 4);
        assert_eq!(left, 0);
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].slots.len(), 6);
        assert!(book.grants.iter().all(|g| g.used == 3));
        let l = pieces[0].stripes.as_mut().expect("coded");
        assert_eq!((l.data, l.parity, l.stripes()), (4, 2, 3));
        l.parity_first = 5000;
        book.record(&pieces);
        assert_eq!(book.runs[&1000].per_slot(), 3);
        // Stripe 0 is handles 1000, 1003, 1006 and 1009: it lives while
        // one of them does, then all six of its pages go.
        for h in [1000, 1003, 1006] {
            assert_eq!(book.forget(h), Some(Freed::Pages(Vec::new())));
        }
        assert!(
            book.grants.iter().all(|g| g.used == 3),
            "held until the stripe dies"
        );
        let Some(Freed::Pages(dead)) = book.forget(1009) else {
            panic!("the stripe died");
        };
        let slots = book.runs[&1000].slots;
        let want: Vec<(u64, u8)> = [1000, 1003, 1006, 1009, 5000, 5003]
            .into_iter()
            .enumerate()
            .map(|(k, h)| (h, slots.get(k).unwrap().server))
            .collect();
        assert_eq!(dead, want);
        assert!(book.grants.iter().all(|g| g.used == 2));
        assert_eq!(book.runs[&1000].per_slot(), 2);
        assert_eq!(book.runs[&1000].slot_handles(1000, 4), [5001, 5002]);
        for h in [1001, 1002, 1004, 1005, 1007, 1008] {
            book.forget(h);
        }
        assert!(book.runs.is_empty());
        assert!(book.grants.iter().all(|g| g.used == 0));
        // Fewer servers with room than data pages plus one: nothing coded.
        for g in &mut book.grants[..2] {
            g.draining = true;
        }
        book.grants[2].used = 100;
        let (pieces, left) = book.take(2000, 8, 6, 4);
        assert!(pieces.is_empty());
        assert_eq!(left, 8);
    }

    #[test]
    fn batches_take_turns_over_grants_with_room() {
        let mut book = Book::default();
        book.grants.push(grant(0, 10, 0));
        book.grants.push(grant(1, 100, 0));
        book.grants.push(grant(2, 100, 0));
        book.grants[2].draining = true;
        let (a, left) = book.take(0, 8, 1, 1);
        assert_eq!((a.len(), a[0].server(), left), (1, 0, 0));
        let (b, _) = book.take(8, 8, 1, 1);
        assert_eq!(b[0].server(), 1, "the next batch goes to the next grant");
        // Grant 0 has 2 pages of room: the batch is cut in two.
        let (c, left) = book.take(16, 5, 1, 1);
        assert_eq!(
            c.iter()
                .map(|p| (p.first, p.count, p.server()))
                .collect::<Vec<_>>(),
            [(16, 2, 0), (18, 3, 1)]
        );
        assert_eq!(left, 0);
        let (_, left) = book.take(21, 1000, 1, 1);
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
            stripes: None,
            wanted: 1,
        }]);
        for token in [1, 2] {
            book.moving.push(Moving {
                token,
                first: 100,
                freed: Vec::new(),
            });
        }
        book.forget(102);
        book.forget(7);
        assert!(book.moving.iter().all(|m| m.freed == [102]));
    }

    #[test]
    fn copies_go_to_distinct_servers_and_skip_suspects() {
        let mut book = Book::default();
        book.grants.push(grant(0, 100, 0));
        book.grants.push(grant(1, 100, 0));
        book.grants.push(grant(2, 50, 0));
        // A second grant on server 0: never two copies on one server.
        book.grants.push(grant(0, 100, 0));
        let (p, left) = book.take(0, 10, 2, 1);
        assert_eq!(left, 0);
        let servers: Vec<u8> = p[0].slots.servers().collect();
        assert_eq!(servers.len(), 2);
        assert_ne!(servers[0], servers[1]);
        book.suspects
            .insert(1, Instant::now() + std::time::Duration::from_secs(60));
        for k in 0..10 {
            let (p, _) = book.take(100 + k, 1, 3, 1);
            assert!(!p[0].slots.has_server(1), "a suspect server got a copy");
            assert_eq!(p[0].slots.len(), 2, "only servers 0 and 2 are open");
        }
        book.record(&p);
        let used: u64 = book.grants.iter().map(|g| g.used).sum();
        assert!(matches!(book.forget(3), Some(Freed::Copies(s)) if s.len() == 2));
        assert_eq!(book.grants.iter().map(|g| g.used).sum::<u64>(), used - 2);
    }

    #[test]
    fn runs_of_different_policies_are_at_risk_by_their_own() {
        let mut book = Book::default();
        for s in 0..3 {
            book.grants.push(grant(s, 1000, 0));
        }
        // One batch with two copies, one with one, one asking for four
        // copies of which three servers exist (placed short).
        let (two, _) = book.take(0, 10, 2, 1);
        let (one, _) = book.take(100, 10, 1, 1);
        let (four, _) = book.take(200, 10, 4, 1);
        assert_eq!((two[0].wanted, one[0].wanted, four[0].wanted), (2, 1, 4));
        assert_eq!(four[0].slots.len(), 3);
        book.record(&two);
        book.record(&one);
        book.record(&four);
        // Only the short run is at risk.
        assert_eq!(book.at_risk(), 10);
        // A server gone: the replicated run on it is at risk too; the lone
        // copy asked for no more than it has unless it was there.
        let gone = two[0].server();
        book.gone.insert(gone);
        let lone_there = u64::from(one[0].server() == gone) * 10;
        assert_eq!(book.at_risk(), 20 + lone_there);
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
            let (p, _) = book.take(k * 10, 10, 2, 1);
            let domains: Vec<&str> = p[0]
                .slots
                .servers()
                .map(|s| book.grants[usize::from(s)].domain.as_str())
                .collect();
            assert_ne!(domains[0], domains[1], "two copies in one rack: {p:?}");
        }
    }
}

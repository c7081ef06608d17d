//! Placement: spreading an agent's capacity over memory servers.
//!
//! Each chunk of a request goes to the better of two servers drawn at
//! random among those taking placements (power of two choices, on free
//! capacity): nearly as even as always picking the emptiest server, with
//! no herd on one server when hundreds of agents allocate at once. Free
//! capacity is what the coordinator has not granted yet, or what the
//! server reports unused, whichever is smaller.

use std::collections::{BTreeMap, HashMap};

use rand::Rng;

use crate::error::CoordError;
use crate::membership::Member;
use crate::state::GrantRecord;

/// Every grant, by id, and by the allocation that made it.
#[derive(Debug, Default)]
pub struct Grants {
    by_id: BTreeMap<u64, GrantRecord>,
    /// (agent, request) → ids of the grants answering that allocation.
    by_request: HashMap<(u64, u64), Vec<u64>>,
}

impl Grants {
    pub fn get(&self, id: u64) -> Result<&GrantRecord, CoordError> {
        self.by_id.get(&id).ok_or(CoordError::UnknownGrant(id))
    }

    pub fn iter(&self) -> impl Iterator<Item = &GrantRecord> {
        self.by_id.values()
    }

    pub fn insert(&mut self, g: GrantRecord) {
        if g.request != 0 {
            let ids = self.by_request.entry((g.agent, g.request)).or_default();
            if !ids.contains(&g.id) {
                ids.push(g.id);
            }
        }
        self.by_id.insert(g.id, g);
    }

    /// Returns `pages` of grant `id`; the grant disappears at zero.
    pub fn release(&mut self, id: u64, pages: u64) {
        if let Some(g) = self.by_id.get_mut(&id) {
            g.pages = g.pages.saturating_sub(pages);
            if g.pages == 0 {
                let key = (g.agent, g.request);
                self.by_id.remove(&id);
                if let Some(ids) = self.by_request.get_mut(&key) {
                    ids.retain(|&i| i != id);
                    if ids.is_empty() {
                        self.by_request.remove(&key);
                    }
                }
            }
        }
    }

    /// The grants still held that answered `agent`'s allocation `request`.
    pub fn of_request(&self, agent: u64, request: u64) -> Vec<&GrantRecord> {
        self.by_request
            .get(&(agent, request))
            .into_iter()
            .flatten()
            .filter_map(|id| self.by_id.get(id))
            .collect()
    }

    /// Pages granted on each server.
    pub fn per_server(&self) -> HashMap<u64, u64> {
        let mut m = HashMap::new();
        for g in self.by_id.values() {
            *m.entry(g.server).or_insert(0) += g.pages;
        }
        m
    }

    /// Pages granted to a tenant.
    pub fn tenant_pages(&self, tenant: &str) -> u64 {
        self.by_id
            .values()
            .filter(|g| g.tenant == tenant)
            .map(|g| g.pages)
            .sum()
    }
}

/// A server that may take pages, how many, and its failure domain.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub server: u64,
    pub free: u64,
    /// Servers of one domain share it (see [`domains`]).
    pub domain: u32,
}

/// Numbers the failure domains of `labels` (one per candidate, in order):
/// equal labels share a number, and an empty label is a domain of its own.
pub fn domains<'a>(labels: impl IntoIterator<Item = &'a str>) -> Vec<u32> {
    let mut seen: HashMap<&str, u32> = HashMap::new();
    let mut next = 0u32;
    labels
        .into_iter()
        .map(|l| {
            if let Some(&d) = seen.get(l) {
                return d;
            }
            let d = next;
            next += 1;
            if !l.is_empty() {
                seen.insert(l, d);
            }
            d
        })
        .collect()
}

/// Where a placement went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// (server, pages) per server used.
    pub servers: Vec<(u64, u64)>,
    /// Some chunk's copies share a failure domain: too few domains had room.
    pub shared_domain: bool,
}

/// Free capacity of a placeable server.
pub fn free_pages(m: &Member, granted: u64) -> u64 {
    let by_grants = m.rec.capacity_pages.saturating_sub(granted);
    let by_report = m.rec.capacity_pages.saturating_sub(m.used_pages);
    by_grants.min(by_report)
}

/// Splits `pages` over `candidates` in chunks of at most `chunk` pages,
/// each chunk to the freer of two random candidates. Returns (server,
/// pages) per server used, or `NoCapacity` without taking anything.
pub fn spread(
    candidates: &mut [Candidate],
    pages: u64,
    chunk: u64,
    rng: &mut impl Rng,
) -> Result<Vec<(u64, u64)>, CoordError> {
    let free: u64 = candidates.iter().map(|c| c.free).sum();
    if pages > free {
        return Err(CoordError::NoCapacity {
            requested: pages,
            free,
        });
    }
    let mut taken: BTreeMap<u64, u64> = BTreeMap::new();
    let mut left = pages;
    while left > 0 {
        let open: Vec<usize> = (0..candidates.len())
            .filter(|&i| candidates[i].free > 0)
            .collect();
        // `free >= pages` guarantees a candidate with room while pages are left.
        let a = open[rng.random_range(0..open.len())];
        let b = open[rng.random_range(0..open.len())];
        let pick = if candidates[b].free > candidates[a].free {
            b
        } else {
            a
        };
        let n = left.min(chunk).min(candidates[pick].free);
        candidates[pick].free -= n;
        *taken.entry(candidates[pick].server).or_insert(0) += n;
        left -= n;
    }
    Ok(taken.into_iter().collect())
}

/// Places `pages` `copies` times in chunks of at most `chunk` pages, each
/// chunk's copies on distinct servers (as many as have room, at least
/// one) in distinct failure domains while domains with room are left, each
/// server the freer of two random candidates. Returns the servers used, or
/// `NoCapacity` without taking anything.
pub fn distinct(
    candidates: &mut [Candidate],
    pages: u64,
    copies: usize,
    chunk: u64,
    rng: &mut impl Rng,
) -> Result<Placed, CoordError> {
    let before: Vec<u64> = candidates.iter().map(|c| c.free).collect();
    let mut taken: BTreeMap<u64, u64> = BTreeMap::new();
    let mut shared_domain = false;
    let mut left = pages;
    while left > 0 {
        let n = left.min(chunk.max(1));
        let mut open: Vec<usize> = (0..candidates.len())
            .filter(|&i| candidates[i].free >= n)
            .collect();
        if open.is_empty() {
            for (c, f) in candidates.iter_mut().zip(before) {
                c.free = f;
            }
            return Err(CoordError::NoCapacity {
                requested: pages * copies as u64,
                free: candidates.iter().map(|c| c.free).sum(),
            });
        }
        let mut used_domains: Vec<u32> = Vec::with_capacity(copies);
        for _ in 0..copies {
            if open.is_empty() {
                break;
            }
            // Candidates of a domain this chunk has no copy in yet; when
            // none is left, any (the copies then share a domain).
            let fresh: Vec<usize> = (0..open.len())
                .filter(|&k| !used_domains.contains(&candidates[open[k]].domain))
                .collect();
            let pool: Vec<usize> = if fresh.is_empty() {
                shared_domain = true;
                (0..open.len()).collect()
            } else {
                fresh
            };
            let a = pool[rng.random_range(0..pool.len())];
            let b = pool[rng.random_range(0..pool.len())];
            let k = if candidates[open[b]].free > candidates[open[a]].free {
                b
            } else {
                a
            };
            let pick = open.swap_remove(k);
            used_domains.push(candidates[pick].domain);
            candidates[pick].free -= n;
            *taken.entry(candidates[pick].server).or_insert(0) += n;
        }
        left -= n;
    }
    Ok(Placed {
        servers: taken.into_iter().collect(),
        shared_domain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn spreads_evenly_and_never_overfills() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut c: Vec<Candidate> = (1..=10)
            .map(|s| Candidate {
                server: s,
                free: 100_000,
                domain: s as u32,
            })
            .collect();
        let mut per: BTreeMap<u64, u64> = BTreeMap::new();
        for _ in 0..100 {
            for (s, n) in spread(&mut c, 5_000, 1_000, &mut rng).unwrap() {
                *per.entry(s).or_default() += n;
            }
        }
        assert_eq!(per.values().sum::<u64>(), 500_000);
        let (min, max) = (per.values().min().unwrap(), per.values().max().unwrap());
        assert!(max - min <= 3_000, "uneven: {per:?}");
        assert!(c.iter().all(|c| c.free <= 100_000));
    }

    #[test]
    fn all_or_nothing_when_capacity_is_short() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut c = vec![
            Candidate {
                server: 1,
                free: 10,
                domain: 1,
            },
            Candidate {
                server: 2,
                free: 5,
                domain: 2,
            },
        ];
        let err = spread(&mut c, 16, 4, &mut rng).unwrap_err();
        assert!(matches!(
            err,
            CoordError::NoCapacity {
                requested: 16,
                free: 15
            }
        ));
        assert_eq!(c[0].free + c[1].free, 15);
        let got = spread(&mut c, 15, 4, &mut rng).unwrap();
        assert_eq!(got, vec![(1, 10), (2, 5)]);
    }

    #[test]
    fn copies_go_to_distinct_servers_with_room() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut c = vec![
            Candidate {
                server: 1,
                free: 100,
                domain: 1,
            },
            Candidate {
                server: 2,
                free: 10,
                domain: 2,
            },
            Candidate {
                server: 3,
                free: 100,
                domain: 3,
            },
        ];
        let got = distinct(&mut c, 50, 2, 100, &mut rng).unwrap().servers;
        let mut servers: Vec<u64> = got.iter().map(|g| g.0).collect();
        servers.sort_unstable();
        assert_eq!(servers, [1, 3], "server 2 has no room for 50");
        // Fewer servers with room than copies: as many as there are.
        let got = distinct(&mut c, 50, 3, 100, &mut rng).unwrap().servers;
        assert_eq!(got.len(), 2);
        assert!(distinct(&mut c, 60, 2, 100, &mut rng).is_err());
        assert_eq!(
            c.iter().map(|c| c.free).sum::<u64>(),
            10,
            "a refusal takes nothing"
        );
        // In chunks, each chunk's two copies on two servers.
        let mut c: Vec<Candidate> = (1..=4)
            .map(|server| Candidate {
                server,
                free: 1000,
                domain: server as u32,
            })
            .collect();
        let got = distinct(&mut c, 400, 2, 10, &mut rng).unwrap().servers;
        assert_eq!(got.iter().map(|g| g.1).sum::<u64>(), 800);
        assert_eq!(got.len(), 4, "chunks spread over every server: {got:?}");
    }

    #[test]
    fn copies_go_to_distinct_domains_while_there_are_enough() {
        let labels = ["a", "a", "b", "b", "", ""];
        let d = domains(labels);
        assert_eq!(d[0], d[1]);
        assert_eq!(d[2], d[3]);
        assert_ne!(d[0], d[2]);
        assert_ne!(d[4], d[5], "an empty label is a domain of its own");
        assert!(!d[..4].contains(&d[4]));
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Two racks of two servers: every chunk has a copy in each rack.
        let make = || -> Vec<Candidate> {
            (0..4)
                .map(|k| Candidate {
                    server: k as u64 + 1,
                    free: 10_000,
                    domain: d[k],
                })
                .collect()
        };
        for _ in 0..50 {
            let mut c = make();
            let placed = distinct(&mut c, 10, 2, 10, &mut rng).unwrap();
            assert!(!placed.shared_domain);
            let racks: Vec<u32> = placed
                .servers
                .iter()
                .map(|(s, _)| d[*s as usize - 1])
                .collect();
            assert_eq!(racks.len(), 2);
            assert_ne!(racks[0], racks[1], "both copies in one rack: {placed:?}");
        }
        // Three copies over two racks: they must share one, and say so.
        let mut c = make();
        let placed = distinct(&mut c, 10, 3, 10, &mut rng).unwrap();
        assert_eq!(placed.servers.len(), 3);
        assert!(placed.shared_domain);
        // One rack full: the copies share the other, and say so.
        let mut c = make();
        c[2].free = 0;
        c[3].free = 0;
        let placed = distinct(&mut c, 10, 2, 10, &mut rng).unwrap();
        assert!(placed.shared_domain);
        assert_eq!(placed.servers.len(), 2);
    }
}

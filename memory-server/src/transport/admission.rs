//! Who may hold a connection before authenticating, and how fast a peer
//! may guess credentials.
//!
//! A connection that has not completed HELLO costs a slot and a task and
//! proves nothing. Without limits, a stranger opening sockets that never
//! say HELLO takes every slot from the agents, and one trying credentials
//! in a loop guesses thousands of times a second. So, per peer (an IPv4
//! address, or an IPv6 /64, which one host usually owns whole):
//! - **Unauthenticated connections** are capped per peer and in total; one
//!   over a cap is refused with `busy` at accept. Authenticated ones count
//!   only against `max_connections`, so a compute node's many connections
//!   are never refused by these caps.
//! - **Failed authentications** are free up to [`FREE_FAILURES`] in a row;
//!   each further one bars the peer for a penalty that doubles, from
//!   [`FIRST_PENALTY`] up to [`MAX_PENALTY`]: its connections are refused
//!   at accept, with the time left, until the bar lifts. A success clears
//!   the record. That leaves a guesser about one try a minute for each
//!   connection it may hold open before HELLO (the bar is checked at
//!   accept), instead of thousands a second.
//!
//! Records of peers with nothing in flight expire after [`FORGET_AFTER`]
//! of quiet; at most [`MAX_PEERS`] are kept (past that, failures of new
//! peers are not recorded, and the total cap still holds).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failed authentications in a row a peer may make before it is barred.
pub const FREE_FAILURES: u32 = 5;
/// The first bar; each further failure doubles it.
pub const FIRST_PENALTY: Duration = Duration::from_millis(500);
/// The longest bar.
pub const MAX_PENALTY: Duration = Duration::from_secs(60);
/// A record with nothing in flight is dropped after this long quiet.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most peers with a record.
const MAX_PEERS: usize = 65536;

/// The caps on unauthenticated connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// In total.
    pub unauthenticated: u32,
    /// From one peer.
    pub unauthenticated_per_peer: u32,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The peer failed to authenticate too often; barred for this long.
    Barred(Duration),
    /// Too many connections from this peer have not authenticated.
    PeerUnauthenticated(u32),
    /// Too many connections in total have not authenticated.
    Unauthenticated(u32),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Barred(d) => write!(
                f,
                "too many failed authentications from this address: retry in {}s",
                d.as_secs_f64().ceil() as u64
            ),
            Self::PeerUnauthenticated(n) => write!(
                f,
                "{n} connections from this address have not authenticated yet"
            ),
            Self::Unauthenticated(n) => {
                write!(f, "{n} connections have not authenticated yet")
            }
        }
    }
}

/// A peer: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerKey {
    V4(u32),
    V6(u64),
}

impl PeerKey {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4.into()),
                None => Self::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug)]
struct Peer {
    unauthenticated: u32,
    failures: u32,
    barred_until: Option<Instant>,
    last: Instant,
}

#[derive(Debug, Default)]
struct Table {
    peers: HashMap<PeerKey, Peer>,
    unauthenticated: u32,
}

/// The admission state of one listener.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    table: Mutex<Table>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection from `ip` was accepted: admits it (counted as
    /// unauthenticated until [`Ticket::authenticated`]) or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        let key = PeerKey::of(ip);
        let mut t = self.table();
        if t.peers.len() >= MAX_PEERS {
            t.peers.retain(|_, p| !p.idle(now));
        }
        if let Some(p) = t.peers.get(&key) {
            if let Some(until) = p.barred_until.filter(|&u| u > now) {
                return Err(Refusal::Barred(until - now));
            }
            if p.unauthenticated >= self.limits.unauthenticated_per_peer {
                return Err(Refusal::PeerUnauthenticated(p.unauthenticated));
            }
        }
        if t.unauthenticated >= self.limits.unauthenticated {
            return Err(Refusal::Unauthenticated(t.unauthenticated));
        }
        let room = t.peers.len() < MAX_PEERS;
        let p = match t.peers.get_mut(&key) {
            Some(p) => p,
            None if room => t.peers.entry(key).or_insert(Peer {
                unauthenticated: 0,
                failures: 0,
                barred_until: None,
                last: now,
            }),
            // No room for a record: only the total cap applies.
            None => {
                t.unauthenticated += 1;
                return Ok(Ticket::new(self, key, false));
            }
        };
        p.unauthenticated += 1;
        p.last = now;
        t.unauthenticated += 1;
        Ok(Ticket::new(self, key, true))
    }

    /// Leaves the unauthenticated count of `key`.
    fn leave(&self, key: PeerKey, recorded: bool, failed: bool, now: Instant) {
        let mut t = self.table();
        t.unauthenticated = t.unauthenticated.saturating_sub(1);
        if !recorded {
            return;
        }
        let Some(p) = t.peers.get_mut(&key) else {
            return;
        };
        p.unauthenticated = p.unauthenticated.saturating_sub(1);
        p.last = now;
        if failed {
            p.failures = p.failures.saturating_add(1);
            if p.failures > FREE_FAILURES {
                let doublings = (p.failures - FREE_FAILURES - 1).min(16);
                let penalty = FIRST_PENALTY
                    .saturating_mul(1 << doublings)
                    .min(MAX_PENALTY);
                p.barred_until = Some(now + penalty);
            }
        } else {
            // Authenticated: the peer knows a credential.
            p.failures = 0;
            p.barred_until = None;
        }
        if p.unauthenticated == 0 && p.failures == 0 {
            t.peers.remove(&key);
        }
    }

    /// Connections not authenticated yet, for stats.
    pub fn unauthenticated(&self) -> u32 {
        self.table().unauthenticated
    }
}

impl Peer {
    /// Nothing in flight, no bar, and quiet for long.
    fn idle(&self, now: Instant) -> bool {
        self.unauthenticated == 0
            && self.barred_until.is_none_or(|u| u <= now)
            && now.duration_since(self.last) > FORGET_AFTER
    }
}

/// An admitted connection's place in the unauthenticated counts, given
/// back once it authenticates, fails to, or ends.
#[derive(Debug)]
pub struct Ticket {
    admission: Option<Arc<Admission>>,
    key: PeerKey,
    recorded: bool,
}

impl Ticket {
    fn new(admission: &Arc<Admission>, key: PeerKey, recorded: bool) -> Self {
        Self {
            admission: Some(admission.clone()),
            key,
            recorded,
        }
    }

    /// The connection authenticated: it no longer counts, and the peer's
    /// failures are forgiven.
    pub fn authenticated(&mut self) {
        self.settle(false, Instant::now());
    }

    /// The connection failed to authenticate (and is being closed).
    pub fn failed(&mut self) {
        self.settle(true, Instant::now());
    }

    fn settle(&mut self, failed: bool, now: Instant) {
        if let Some(a) = self.admission.take() {
            a.leave(self.key, self.recorded, failed, now);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Closed (or timed out) before HELLO: no verdict on the peer.
        if let Some(a) = self.admission.take() {
            let mut t = a.table();
            t.unauthenticated = t.unauthenticated.saturating_sub(1);
            if self.recorded
                && let Some(p) = t.peers.get_mut(&self.key)
            {
                p.unauthenticated = p.unauthenticated.saturating_sub(1);
                if p.unauthenticated == 0 && p.failures == 0 {
                    t.peers.remove(&self.key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(total: u32, per_peer: u32) -> Arc<Admission> {
        Admission::new(Limits {
            unauthenticated: total,
            unauthenticated_per_peer: per_peer,
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn unauthenticated_connections_are_capped_per_peer_and_in_total() {
        let a = admission(3, 2);
        let t1 = a.admit(A).unwrap();
        let mut t2 = a.admit(A).unwrap();
        assert_eq!(a.admit(A).unwrap_err(), Refusal::PeerUnauthenticated(2));
        let _t3 = a.admit(B).unwrap();
        assert_eq!(a.admit(B).unwrap_err(), Refusal::Unauthenticated(3));
        // An authenticated connection no longer counts.
        t2.authenticated();
        let _t4 = a.admit(A).unwrap();
        drop(t1);
        assert_eq!(a.unauthenticated(), 2);
        drop(t2);
        assert_eq!(a.unauthenticated(), 2, "counted once");
    }

    #[test]
    fn repeated_failures_bar_the_peer_for_a_doubling_time() {
        let a = admission(100, 100);
        let now = Instant::now();
        for _ in 0..FREE_FAILURES {
            a.admit_at(A, now).unwrap().settle(true, now);
        }
        // The next failure bars.
        a.admit_at(A, now).unwrap().settle(true, now);
        let Err(Refusal::Barred(d)) = a.admit_at(A, now) else {
            panic!("not barred after {} failures", FREE_FAILURES + 1);
        };
        assert_eq!(d, FIRST_PENALTY);
        // Others are not.
        a.admit_at(B, now).unwrap().settle(false, now);
        // After the bar, the next failure bars twice as long.
        let later = now + FIRST_PENALTY;
        a.admit_at(A, later).unwrap().settle(true, later);
        let Err(Refusal::Barred(d)) = a.admit_at(A, later) else {
            panic!("not barred again");
        };
        assert_eq!(d, FIRST_PENALTY * 2);
        // The bar never exceeds the maximum.
        let mut at = later;
        for _ in 0..40 {
            at += MAX_PENALTY;
            a.admit_at(A, at).unwrap().settle(true, at);
        }
        let Err(Refusal::Barred(d)) = a.admit_at(A, at) else {
            panic!("not barred");
        };
        assert_eq!(d, MAX_PENALTY);
        // A success forgives.
        at += MAX_PENALTY;
        a.admit_at(A, at).unwrap().settle(false, at);
        a.admit_at(A, at).unwrap().settle(true, at);
        assert!(a.admit_at(A, at).is_ok());
    }

    #[test]
    fn a_connection_closed_before_hello_is_no_failure() {
        let a = admission(100, 100);
        for _ in 0..50 {
            drop(a.admit(A).unwrap());
        }
        assert!(a.table().peers.is_empty(), "no record is kept");
        assert!(a.admit(A).is_ok());
    }

    #[test]
    fn ipv6_peers_are_their_64_prefix() {
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let two: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(PeerKey::of(one), PeerKey::of(two));
        assert_ne!(PeerKey::of(one), PeerKey::of(other));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(PeerKey::of(mapped), PeerKey::of(A));
    }
}

//! The keys the coordinator signs capabilities with, and their rotation.
//!
//! A key's life: drawn (by the state's creation, or `rmemctl
//! capability-keys rotate`), it is **pending** for two leases: published
//! in every registration and heartbeat answer, so every live server has
//! learned it before it signs anything (a server that has not heartbeated
//! for a lease is fenced anyway). Then it is **signing**: the newest key
//! past its pending time signs every capability. The key it replaced is
//! **verifying** while capabilities it signed may still be live (one
//! capability life after it stopped signing, plus the publishing time for servers to
//! hear of it), then **retired**: no longer published, and listed as
//! retired so servers forget it. Agents need do nothing: they renew their
//! capabilities on their own schedule and get the new key's.
//!
//! A key that may have leaked is retired **at once** (`rmemctl
//! capability-keys retire ID`), any but the signing one (rotate first): the
//! servers forget it at their next heartbeat and drop, from every
//! connection, the capabilities it signed; an agent denied pages renews its
//! capabilities there and then and asks again.
//!
//! The state keeps each key's PKCS#8 document (so every replica and
//! restart signs with the same keys) and each retired key's public half.

use std::collections::BTreeMap;
use std::time::Duration;

use rmem_common::capability::{self, SigningKey};
use rmem_proto::control::v1 as pb;

use crate::error::CoordError;
use crate::state::Record;

/// A key's state at some moment (times in Unix milliseconds, as every
/// time here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Published, signing from the given time.
    Pending(u64),
    Signing,
    /// Superseded; retired at the given time.
    Verifying(u64),
}

impl KeyState {
    fn name(self) -> &'static str {
        match self {
            Self::Pending(_) => "pending",
            Self::Signing => "signing",
            Self::Verifying(_) => "verifying",
        }
    }
}

#[derive(Debug)]
struct Entry {
    /// PKCS#8, hex, as the state keeps it.
    pkcs8: String,
    key: SigningKey,
    /// Unix milliseconds (keys drawn within one second keep their order);
    /// 0 for a key from before rotation existed.
    created: u64,
}

/// The keys, live and retired.
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: BTreeMap<u32, Entry>,
    /// Retired keys' public halves, by id.
    retired: BTreeMap<u32, Vec<u8>>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The timings a ring runs by.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a new key is published before it signs (two leases).
    pub publish: Duration,
    /// A capability's life.
    pub ttl: Duration,
}

impl KeyRing {
    /// Takes a [`Record::CapabilityKey`] (an unreadable document is logged
    /// and skipped).
    pub fn apply_key(&mut self, id: u32, pkcs8: &str, created: u64) {
        match capability::from_hex(pkcs8).map(|d| SigningKey::from_pkcs8(id, &d)) {
            Some(Ok(key)) => {
                self.keys.insert(
                    id,
                    Entry {
                        pkcs8: pkcs8.to_string(),
                        key,
                        created,
                    },
                );
            }
            _ => tracing::error!(id, "a capability key in the state is unreadable: skipped"),
        }
    }

    /// Takes a [`Record::CapabilityKeyRetired`].
    pub fn apply_retired(&mut self, id: u32, public: &str) {
        self.keys.remove(&id);
        if let Some(bytes) = capability::from_hex(public) {
            self.retired.insert(id, bytes);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The records that rebuild the ring (for a snapshot).
    pub fn records(&self) -> Vec<Record> {
        let live = self.keys.iter().map(|(&id, e)| Record::CapabilityKey {
            id,
            pkcs8: e.pkcs8.clone(),
            created_ms: e.created,
        });
        let retired = self
            .retired
            .iter()
            .map(|(&id, bytes)| Record::CapabilityKeyRetired {
                id,
                public: capability::to_hex(bytes),
            });
        live.chain(retired).collect()
    }

    /// A new key (to commit): its id drawn by `draw` until it is one no
    /// key of this ring, live or retired, has (servers keep both keys of a
    /// reused id, but a coordinator that knows better does not reuse one).
    pub fn draw(&self, mut draw: impl FnMut() -> u32, now: u64) -> Record {
        let pkcs8 = SigningKey::generate().expect("the system's random source works");
        let id = loop {
            let id = draw();
            if !self.keys.contains_key(&id) && !self.retired.contains_key(&id) {
                break id;
            }
        };
        Record::CapabilityKey {
            id,
            pkcs8: capability::to_hex(&pkcs8),
            created_ms: now,
        }
    }

    /// Live keys, oldest first.
    fn by_age(&self) -> Vec<(u32, &Entry)> {
        let mut v: Vec<_> = self.keys.iter().map(|(&id, e)| (id, e)).collect();
        v.sort_by_key(|(id, e)| (e.created, *id));
        v
    }

    /// The key that signs at `now`: the newest past its pending time, or,
    /// when none is (a new state's only key), the oldest.
    pub fn signing(&self, now: u64, t: Timing) -> Option<&SigningKey> {
        let keys = self.by_age();
        keys.iter()
            .rev()
            .find(|(_, e)| e.created + ms(t.publish) <= now)
            .or(keys.first())
            .map(|(_, e)| &e.key)
    }

    /// Each live key's state at `now`.
    pub fn states(&self, now: u64, t: Timing) -> Vec<(u32, u64, KeyState)> {
        let signing = self.signing(now, t).map(SigningKey::id);
        let keys = self.by_age();
        let signing_at = keys.iter().position(|(id, _)| Some(*id) == signing);
        keys.iter()
            .enumerate()
            .map(|(i, (id, e))| {
                let state = match signing_at {
                    Some(s) if i == s => KeyState::Signing,
                    Some(s) if i > s => KeyState::Pending(e.created + ms(t.publish)),
                    _ => {
                        // Superseded when the next key began signing.
                        let next = keys.get(i + 1).map_or(now, |(_, n)| n.created);
                        KeyState::Verifying(next + ms(t.publish) + ms(t.ttl) + ms(t.publish))
                    }
                };
                (*id, e.created, state)
            })
            .collect()
    }

    /// The records retiring every key whose time is up at `now`.
    pub fn due(&self, now: u64, t: Timing) -> Vec<Record> {
        self.states(now, t)
            .into_iter()
            .filter(|(_, _, s)| matches!(s, KeyState::Verifying(at) if *at <= now))
            .filter_map(|(id, _, _)| {
                let e = self.keys.get(&id)?;
                Some(Record::CapabilityKeyRetired {
                    id,
                    public: capability::to_hex(&e.key.public().bytes),
                })
            })
            .collect()
    }

    /// The record retiring key `id` at `now`, before what it signed has
    /// expired (a key that may have leaked): `None` if it is retired
    /// already. The signing key is refused: a rotation must replace it
    /// first, so that a key always signs and servers learned the next one.
    pub fn retire_now(&self, id: u32, now: u64, t: Timing) -> Result<Option<Record>, CoordError> {
        if self.retired.contains_key(&id) {
            return Ok(None);
        }
        let Some(e) = self.keys.get(&id) else {
            return Err(CoordError::UnknownKey(id));
        };
        if self.signing(now, t).map(SigningKey::id) == Some(id) {
            return Err(CoordError::KeySigns(id));
        }
        Ok(Some(Record::CapabilityKeyRetired {
            id,
            public: capability::to_hex(&e.key.public().bytes),
        }))
    }

    /// The live keys' public halves, for members.
    pub fn published(&self) -> Vec<pb::CapabilityKey> {
        self.keys
            .values()
            .map(|e| {
                let p = e.key.public();
                pb::CapabilityKey {
                    id: p.id,
                    public_key: p.bytes,
                }
            })
            .collect()
    }

    /// The retired keys' public halves, for servers to forget.
    pub fn retired(&self) -> Vec<pb::CapabilityKey> {
        self.retired
            .iter()
            .map(|(&id, bytes)| pb::CapabilityKey {
                id,
                public_key: bytes.clone(),
            })
            .collect()
    }

    /// Every key's state, for `rmemctl capability-keys`.
    pub fn status(&self, now: u64, t: Timing) -> Vec<pb::CapabilityKeyStatus> {
        let live =
            self.states(now, t)
                .into_iter()
                .map(|(id, created, s)| pb::CapabilityKeyStatus {
                    id,
                    state: s.name().into(),
                    created: created / 1000,
                    until: match s {
                        KeyState::Pending(at) | KeyState::Verifying(at) => at.div_ceil(1000),
                        KeyState::Signing => 0,
                    },
                });
        let retired = self.retired.keys().map(|&id| pb::CapabilityKeyStatus {
            id,
            state: "retired".into(),
            created: 0,
            until: 0,
        });
        live.chain(retired).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(ring: &mut KeyRing, r: &Record) {
        match r {
            Record::CapabilityKey {
                id,
                pkcs8,
                created_ms,
            } => ring.apply_key(*id, pkcs8, *created_ms),
            Record::CapabilityKeyRetired { id, public } => ring.apply_retired(*id, public),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_key_retires_at_once_unless_it_signs() {
        let t = Timing {
            publish: Duration::from_secs(10),
            ttl: Duration::from_secs(100),
        };
        let mut ids = [1u32, 2, 3].into_iter();
        let mut ring = KeyRing::default();
        for at in [1_000_000, 2_000_000] {
            let k = ring.draw(|| ids.next().unwrap(), at);
            apply(&mut ring, &k);
        }
        // Key 2 is pending: key 1 signs and cannot go; key 2 can (nothing
        // it signed exists).
        let now = 2_005_000;
        assert!(matches!(
            ring.retire_now(1, now, t),
            Err(CoordError::KeySigns(1))
        ));
        assert!(matches!(
            ring.retire_now(9, now, t),
            Err(CoordError::UnknownKey(9))
        ));
        // Key 2 signs: key 1, verifying, retires at once, long before its
        // capabilities' life is up.
        let now = 2_010_000;
        assert!(matches!(
            ring.retire_now(2, now, t),
            Err(CoordError::KeySigns(2))
        ));
        let r = ring.retire_now(1, now, t).unwrap().unwrap();
        apply(&mut ring, &r);
        assert_eq!(ring.published().len(), 1);
        assert_eq!(ring.retired()[0].id, 1);
        assert_eq!(ring.signing(now, t).unwrap().id(), 2);
        assert!(ring.retire_now(1, now, t).unwrap().is_none());
        // A third key, pending, retired before it ever signs.
        let k = ring.draw(|| ids.next().unwrap(), now);
        apply(&mut ring, &k);
        let r = ring.retire_now(3, now + 1, t).unwrap().unwrap();
        apply(&mut ring, &r);
        assert_eq!(ring.signing(now + 20_000, t).unwrap().id(), 2);
    }

    #[test]
    fn a_rotated_key_signs_once_published_and_its_predecessor_retires_after_a_capability_life() {
        let t = Timing {
            publish: Duration::from_secs(10),
            ttl: Duration::from_secs(100),
        };
        let mut ids = [7u32, 7, 9].into_iter();
        let mut ring = KeyRing::default();
        // A new state's key signs at once; of two keys drawn within the
        // same second, before either is published long enough, the first.
        let first = ring.draw(|| ids.next().unwrap(), 1_000_000);
        apply(&mut ring, &first);
        assert_eq!(ring.signing(1_000_000, t).unwrap().id(), 7);
        // Rotation: the id in use is not drawn again.
        let second = ring.draw(|| ids.next().unwrap(), 2_000_000);
        apply(&mut ring, &second);
        assert_eq!(ring.published().len(), 2);
        assert_eq!(ring.signing(2_009_999, t).unwrap().id(), 7);
        assert_eq!(
            ring.states(2_009_999, t)
                .iter()
                .map(|s| s.2)
                .collect::<Vec<_>>(),
            [KeyState::Signing, KeyState::Pending(2_010_000)]
        );
        assert_eq!(ring.signing(2_010_000, t).unwrap().id(), 9);
        assert_eq!(
            ring.states(2_010_000, t)
                .iter()
                .map(|s| s.2)
                .collect::<Vec<_>>(),
            [KeyState::Verifying(2_120_000), KeyState::Signing]
        );
        // The old key verifies until its last capability (signed just
        // before 2010 s, expiring before 2110 s) is dead and servers had the
        // publishing time to hear of it.
        assert!(ring.due(2_119_999, t).is_empty());
        let due = ring.due(2_120_000, t);
        assert_eq!(due.len(), 1);
        apply(&mut ring, &due[0]);
        assert_eq!(ring.published().len(), 1);
        assert_eq!(ring.retired().len(), 1);
        assert_eq!(ring.retired()[0].id, 7);
        let mut quick = KeyRing::default();
        let mut ids = [5u32, 3].into_iter();
        let a = quick.draw(|| ids.next().unwrap(), 5_000_100);
        apply(&mut quick, &a);
        let b = quick.draw(|| ids.next().unwrap(), 5_000_200);
        apply(&mut quick, &b);
        assert_eq!(quick.signing(5_000_300, t).unwrap().id(), 5);
        // A snapshot rebuilds the same ring.
        let mut again = KeyRing::default();
        for r in ring.records() {
            apply(&mut again, &r);
        }
        assert_eq!(again.published(), ring.published());
        assert_eq!(again.retired(), ring.retired());
        assert_eq!(
            again.status(3_000_000, t),
            [
                pb::CapabilityKeyStatus {
                    id: 9,
                    state: "signing".into(),
                    created: 2000,
                    until: 0
                },
                pb::CapabilityKeyStatus {
                    id: 7,
                    state: "retired".into(),
                    created: 0,
                    until: 0
                }
            ]
        );
    }
}

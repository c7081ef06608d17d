//! The capabilities an agent holds, shared by every connection it makes.
//!
//! The agent's remote layer puts a capability here for each handle space
//! it registers (and replaces it when renewed); each connection hands a
//! server the ones of its tenant the first time it sends it a request and
//! again whenever they changed (one CAPS frame pipelined before the
//! request: no extra round trip).
//!
//! A server that refuses a token for its key (retired at once, perhaps
//! leaked) or its age, or that denies pages (it dropped capabilities signed
//! by a key it forgot), asks for renewal now rather than on schedule:
//! [`Capabilities::renew_soon`] wakes the holder's renewal, and
//! [`Capabilities::wait_renewed`] lets a request wait for it and ask again.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmem_proto::wire::{self, MAX_CAPS_PER_FRAME};

/// One token and when it was put here (Unix seconds).
#[derive(Debug, Clone)]
struct Held {
    tenant: String,
    token: Vec<u8>,
    since: u64,
}

/// Capability tokens by a key of the holder's choosing (an interval id).
#[derive(Debug, Default)]
pub struct Capabilities {
    tokens: Mutex<BTreeMap<u64, Held>>,
    /// Bumped on every change; 0 means none was ever set.
    generation: AtomicU64,
    /// Every token is due now: a server refused one or denied pages.
    renew_all: AtomicBool,
    /// Wakes the renewal early.
    wake: tokio::sync::Notify,
}

/// How often [`Capabilities::wait_renewed`] looks for a renewal.
const RENEWAL_POLL: Duration = Duration::from_millis(20);

impl Capabilities {
    /// Keeps `token` (tenant `tenant`'s) under `key`, replacing what was.
    pub fn set(&self, key: u64, tenant: &str, token: Vec<u8>) {
        self.lock().insert(
            key,
            Held {
                tenant: tenant.to_string(),
                token,
                since: rmem_common::capability::unix_now(),
            },
        );
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops the token under `key`.
    pub fn remove(&self, key: u64) {
        if self.lock().remove(&key).is_some() {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Changes so far: a connection that presented at another generation
    /// presents again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Asks for every token to be renewed now (a server refused one, or
    /// denied pages its capabilities should open) and wakes the renewal.
    pub fn renew_soon(&self) {
        self.renew_all.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Marks every token due without waking the renewal (a renewal that
    /// failed tries again on its schedule).
    pub fn renew_later(&self) {
        self.renew_all.store(true, Ordering::Release);
    }

    /// Resolves when [`Self::renew_soon`] was called (at once if it was
    /// since the last wait).
    pub async fn renewal_wanted(&self) {
        self.wake.notified().await;
    }

    /// Asks for a renewal and waits, until `deadline`, for the tokens to
    /// change from `generation` (what [`Self::generation`] was when the
    /// denied request was sent). Whether they did.
    pub fn wait_renewed(&self, generation: u64, deadline: Instant) -> bool {
        if self.generation() != generation {
            return true;
        }
        self.renew_soon();
        loop {
            if self.generation() != generation {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep(RENEWAL_POLL.min(deadline - now));
        }
    }

    /// The keys whose tokens are due for renewal at Unix second `now`:
    /// two thirds of their life gone (or unreadable), or all of them after
    /// [`Self::renew_soon`] (which this consumes).
    pub fn due(&self, now: u64) -> Vec<u64> {
        let all = self.renew_all.swap(false, Ordering::AcqRel);
        self.lock()
            .iter()
            .filter(|(_, h)| {
                if all {
                    return true;
                }
                rmem_common::capability::Capability::unverified(&h.token)
                    .ok()
                    .is_none_or(|c| {
                        let life = c.not_after.saturating_sub(h.since);
                        now >= h.since + life * 2 / 3
                    })
            })
            .map(|(&k, _)| k)
            .collect()
    }

    /// How many tokens are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends CAPS frames of `tenant`'s tokens to `out` (ids from
    /// `next_id`); returns how many frames.
    pub(crate) fn encode(
        &self,
        tenant: &str,
        out: &mut Vec<u8>,
        mut next_id: impl FnMut() -> u64,
    ) -> usize {
        let tokens = self.lock();
        let mine: Vec<&[u8]> = tokens
            .values()
            .filter(|h| h.tenant == tenant)
            .map(|h| h.token.as_slice())
            .collect();
        let mut frames = 0;
        for chunk in mine.chunks(MAX_CAPS_PER_FRAME as usize) {
            wire::encode_caps(out, next_id(), chunk);
            frames += 1;
        }
        frames
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Held>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a server's CAPS_OK: logs what it refused and, for a key it
    /// does not know (retired at once) or a token past its life, asks for
    /// renewal now.
    pub(crate) fn refused(&self, addr: &str, verdicts: &wire::Verdicts<'_>) {
        let mut renew = false;
        for v in verdicts.iter().filter(|v| *v != wire::CapVerdict::Accepted) {
            tracing::warn!(server = addr, verdict = %v, "the server refused a capability: pages of its handle space are denied there until it is renewed");
            renew |= matches!(v, wire::CapVerdict::UnknownKey | wire::CapVerdict::Expired);
        }
        if renew {
            self.renew_soon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmem_common::capability::{Capability, SigningKey, unix_now};

    fn token(first: u64) -> Vec<u8> {
        let key = SigningKey::from_seed(1, &[7; 32]).unwrap();
        key.sign(&Capability {
            key_id: 1,
            tenant: "red".into(),
            agent: "node-1".into(),
            first,
            count: 16,
            not_after: unix_now() + 600,
        })
        .unwrap()
    }

    /// The CAPS_OK of `verdicts`, as a server sends it.
    fn refuse(caps: &Capabilities, verdicts: &[wire::CapVerdict]) {
        let mut out = Vec::new();
        wire::encode_verdicts(&mut out, 1, verdicts);
        let (h, p, _) = wire::split_frame(&out, 1 << 20).unwrap().unwrap();
        let wire::Response::CapsOk(v) = wire::Response::decode(&h, p, 0).unwrap() else {
            panic!("not CAPS_OK");
        };
        caps.refused("server", &v);
    }

    #[test]
    fn a_refusal_for_the_key_or_age_makes_every_token_due_at_once() {
        use wire::CapVerdict as V;
        let caps = Capabilities::default();
        caps.set(1, "red", token(0));
        caps.set(2, "red", token(16));
        let now = unix_now();
        assert!(caps.due(now).is_empty());
        // Refusals a renewal cannot mend leave the schedule alone.
        refuse(&caps, &[V::Accepted, V::NotYours, V::BadSignature]);
        assert!(caps.due(now).is_empty());
        // A key the server does not know (retired at once): all due, once.
        refuse(&caps, &[V::Accepted, V::UnknownKey]);
        assert_eq!(caps.due(now), [1, 2]);
        assert!(caps.due(now).is_empty());
        refuse(&caps, &[V::Expired]);
        assert_eq!(caps.due(now), [1, 2]);
        // A renewal that failed asks again next time, without waking.
        caps.renew_later();
        assert_eq!(caps.due(now), [1, 2]);
    }

    #[test]
    fn a_denied_request_waits_for_renewed_capabilities_until_its_deadline() {
        let caps = std::sync::Arc::new(Capabilities::default());
        caps.set(1, "red", token(0));
        let g = caps.generation();
        // Nobody renews: false at the deadline, with a renewal asked for.
        let t = Instant::now();
        assert!(!caps.wait_renewed(g, t + Duration::from_millis(100)));
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert_eq!(caps.due(unix_now()), [1]);
        // A renewal meanwhile: true as soon as the tokens change.
        let renewer = {
            let caps = caps.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                caps.set(1, "red", token(0));
            })
        };
        assert!(caps.wait_renewed(g, Instant::now() + Duration::from_secs(10)));
        renewer.join().unwrap();
        // Tokens changed since the request: no wait at all.
        assert!(caps.wait_renewed(g, Instant::now()));
    }
}

//! The capabilities an agent holds, shared by every connection it makes.
//!
//! The agent's remote layer puts a capability here for each handle space
//! it registers (and replaces it when renewed); each connection hands a
//! server the ones of its tenant the first time it sends it a request and
//! again whenever they changed (one CAPS frame pipelined before the
//! request: no extra round trip).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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
}

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

    /// The keys whose tokens are due for renewal at Unix second `now`:
    /// two thirds of their life gone (or unreadable).
    pub fn due(&self, now: u64) -> Vec<u64> {
        self.lock()
            .iter()
            .filter(|(_, h)| {
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
}

/// Logs the capabilities a server refused (its CAPS_OK).
pub(crate) fn log_verdicts(addr: &str, verdicts: &wire::Verdicts<'_>) {
    for v in verdicts.iter().filter(|v| *v != wire::CapVerdict::Accepted) {
        tracing::warn!(server = addr, verdict = %v, "the server refused a capability: pages of its handle space are denied there");
    }
}

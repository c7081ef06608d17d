//! Capabilities: what the coordinator lets one agent do on the data plane.
//!
//! A capability says "agent `agent` of tenant `tenant` may read, write and
//! free handles `first .. first + count` until `not_after`", signed by the
//! coordinator with Ed25519. The coordinator issues one per handle space an
//! agent registers (and renews it before it expires); the agent presents
//! it to every server it uses, and a server checks it on its own, with the
//! coordinator's public keys: no round trip per request, and a server never
//! learns anything that would let it act as the agent (the capability names
//! the agent, and under mutual TLS the server checks that the connection's
//! certificate is that agent's).
//!
//! Keys rotate: each has a 32-bit id carried in the capabilities it signs;
//! servers accept every key the coordinator publishes, and the coordinator
//! publishes a retired key until the last capability it signed expired.
//!
//! The token is binary, little-endian:
//!
//! ```text
//! version u8 (1) | key_id u32 | tenant_len u8 | tenant | agent_len u8 | agent
//! | first u64 | count u64 | not_after u64 (Unix seconds) | signature [u8; 64]
//! ```
//!
//! The signature covers `DOMAIN` followed by every byte before it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

/// Token format version.
pub const VERSION: u8 = 1;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Bytes of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// The longest token: both names at their 255-byte limit.
pub const MAX_TOKEN_LEN: usize = 1 + 4 + 1 + 255 + 1 + 255 + 24 + SIGNATURE_LEN;
/// Signed before the token's bytes, so a signature made for anything else
/// never verifies as a capability.
const DOMAIN: &[u8] = b"rmem capability v1\0";

/// What a capability grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub key_id: u32,
    pub tenant: String,
    pub agent: String,
    pub first: u64,
    pub count: u64,
    /// Unix seconds after which the capability grants nothing.
    pub not_after: u64,
}

impl Capability {
    /// Whether the capability names handle `h`.
    pub fn covers(&self, h: u64) -> bool {
        h.wrapping_sub(self.first) < self.count
    }

    /// Whether it still holds at Unix second `now`.
    pub fn live(&self, now: u64) -> bool {
        now <= self.not_after
    }

    fn encode_unsigned(&self, out: &mut Vec<u8>) -> Result<(), CapabilityError> {
        let name = |s: &str| {
            u8::try_from(s.len())
                .ok()
                .filter(|&n| n > 0)
                .ok_or(CapabilityError::Malformed(
                    "a name is empty or longer than 255 bytes",
                ))
        };
        let (t, a) = (name(&self.tenant)?, name(&self.agent)?);
        out.push(VERSION);
        out.extend_from_slice(&self.key_id.to_le_bytes());
        out.push(t);
        out.extend_from_slice(self.tenant.as_bytes());
        out.push(a);
        out.extend_from_slice(self.agent.as_bytes());
        out.extend_from_slice(&self.first.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.not_after.to_le_bytes());
        Ok(())
    }

    /// A token's fields, not verified: what its holder reads to know when
    /// to renew it. A server never trusts this.
    pub fn unverified(token: &[u8]) -> Result<Self, CapabilityError> {
        Self::decode_unsigned(token).map(|(c, _)| c)
    }

    /// Parses a token's fields without checking its signature; returns
    /// them and the length of the signed part.
    fn decode_unsigned(token: &[u8]) -> Result<(Self, usize), CapabilityError> {
        let mut r = Reader(token);
        if r.u8()? != VERSION {
            return Err(CapabilityError::Malformed("unknown version"));
        }
        let key_id = r.u32()?;
        let tenant = r.name()?;
        let agent = r.name()?;
        let (first, count, not_after) = (r.u64()?, r.u64()?, r.u64()?);
        let signed = token.len() - r.0.len();
        if r.0.len() != SIGNATURE_LEN {
            return Err(CapabilityError::Malformed("wrong length"));
        }
        Ok((
            Self {
                key_id,
                tenant,
                agent,
                first,
                count,
                not_after,
            },
            signed,
        ))
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], CapabilityError> {
        if self.0.len() < n {
            return Err(CapabilityError::Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, CapabilityError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, CapabilityError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, CapabilityError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn name(&mut self) -> Result<String, CapabilityError> {
        let n = usize::from(self.u8()?);
        if n == 0 {
            return Err(CapabilityError::Malformed("empty name"));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| CapabilityError::Malformed("a name is not UTF-8"))
    }
}

/// Why a token grants nothing. The messages are stable: servers send them
/// to the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("malformed capability: {0}")]
    Malformed(&'static str),
    #[error("capability signed by unknown key {0} (not published by this server's coordinator)")]
    UnknownKey(u32),
    #[error("capability signature does not verify")]
    BadSignature,
    #[error("capability expired at {0} (Unix seconds)")]
    Expired(u64),
    #[error("cannot make a signing key")]
    Key,
}

/// The current Unix second.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// Lower-case hex of `bytes` (how a key is kept in the coordinator's
/// state).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string, if it is one.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A coordinator's signing key.
pub struct SigningKey {
    id: u32,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new key's PKCS#8 document (what the coordinator's state keeps).
    pub fn generate() -> Result<Vec<u8>, CapabilityError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| CapabilityError::Key)
    }

    /// The key `id` from its PKCS#8 document.
    pub fn from_pkcs8(id: u32, pkcs8: &[u8]) -> Result<Self, CapabilityError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| CapabilityError::Key)?;
        Ok(Self { id, pair })
    }

    /// The key `id` from a 32-byte Ed25519 seed: for fuzzing and tests,
    /// which need the same key on every run. Never for a cluster.
    #[doc(hidden)]
    pub fn from_seed(id: u32, seed: &[u8; 32]) -> Result<Self, CapabilityError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| CapabilityError::Key)?;
        Ok(Self { id, pair })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The public half, as servers get it.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            id: self.id,
            bytes: self.pair.public_key().as_ref().to_vec(),
        }
    }

    /// Signs `cap` (its `key_id` is set to this key's) into a token.
    pub fn sign(&self, cap: &Capability) -> Result<Vec<u8>, CapabilityError> {
        let cap = Capability {
            key_id: self.id,
            ..cap.clone()
        };
        let mut out = Vec::with_capacity(MAX_TOKEN_LEN);
        out.extend_from_slice(DOMAIN);
        cap.encode_unsigned(&mut out)?;
        let sig = self.pair.sign(&out);
        out.extend_from_slice(sig.as_ref());
        out.drain(..DOMAIN.len());
        Ok(out)
    }
}

/// A published verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub id: u32,
    pub bytes: Vec<u8>,
}

/// The keys a server accepts capabilities from.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    /// Keys by id; two keys of one id are both kept (a coordinator that
    /// lost its state draws a new key that may reuse an id, and the
    /// capabilities the old key signed still hold until they expire).
    keys: HashMap<u32, Vec<Vec<u8>>>,
    /// Bumped each time [`Self::forget`] drops a key (shared by clones):
    /// a connection that holds capabilities checked earlier reads it to
    /// know when to check them again.
    forgotten: Arc<AtomicU64>,
}

impl Verifier {
    /// Adds keys (a server never forgets one while it runs: what it
    /// signed expires on its own); keys of the wrong length are skipped and
    /// counted in the result.
    pub fn learn(&mut self, keys: impl IntoIterator<Item = PublicKey>) -> usize {
        let mut bad = 0;
        for k in keys {
            if k.bytes.len() != PUBLIC_KEY_LEN {
                bad += 1;
                continue;
            }
            let same = self.keys.entry(k.id).or_default();
            if !same.contains(&k.bytes) {
                same.push(k.bytes);
            }
        }
        bad
    }

    /// Forgets retired keys (each by id and bytes: a reused id's other
    /// key stays). Returns how many it knew.
    pub fn forget(&mut self, keys: impl IntoIterator<Item = PublicKey>) -> usize {
        let mut forgot = 0;
        for k in keys {
            if let Some(same) = self.keys.get_mut(&k.id) {
                let before = same.len();
                same.retain(|b| *b != k.bytes);
                forgot += before - same.len();
                if same.is_empty() {
                    self.keys.remove(&k.id);
                }
            }
        }
        if forgot > 0 {
            self.forgotten.fetch_add(1, Ordering::Release);
        }
        forgot
    }

    /// How many times a key was forgotten, as a counter to read without
    /// the verifier: one that moved means capabilities checked before
    /// may now be signed by a key no longer known.
    pub fn forgotten(&self) -> Arc<AtomicU64> {
        self.forgotten.clone()
    }

    /// Whether a key of id `id` is known.
    pub fn knows(&self, id: u32) -> bool {
        self.keys.contains_key(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keys known.
    pub fn len(&self) -> usize {
        self.keys.values().map(Vec::len).sum()
    }

    /// The capability a token grants at Unix second `now`.
    pub fn verify(&self, token: &[u8], now: u64) -> Result<Capability, CapabilityError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(CapabilityError::Malformed("too long"));
        }
        let (cap, signed) = Capability::decode_unsigned(token)?;
        let keys = self
            .keys
            .get(&cap.key_id)
            .ok_or(CapabilityError::UnknownKey(cap.key_id))?;
        let mut msg = Vec::with_capacity(DOMAIN.len() + signed);
        msg.extend_from_slice(DOMAIN);
        msg.extend_from_slice(&token[..signed]);
        if !keys.iter().any(|key| {
            UnparsedPublicKey::new(&signature::ED25519, key)
                .verify(&msg, &token[signed..])
                .is_ok()
        }) {
            return Err(CapabilityError::BadSignature);
        }
        if !cap.live(now) {
            return Err(CapabilityError::Expired(cap.not_after));
        }
        Ok(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32) -> SigningKey {
        SigningKey::from_pkcs8(id, &SigningKey::generate().unwrap()).unwrap()
    }

    fn cap() -> Capability {
        Capability {
            key_id: 0,
            tenant: "default".into(),
            agent: "node-1".into(),
            first: 7 << 40,
            count: 1 << 40,
            not_after: 1_000,
        }
    }

    #[test]
    fn a_signed_capability_verifies_with_its_key_only() {
        let (k1, k2) = (key(1), key(2));
        let token = k1.sign(&cap()).unwrap();
        let mut v = Verifier::default();
        assert_eq!(v.verify(&token, 10), Err(CapabilityError::UnknownKey(1)));
        v.learn([k2.public()]);
        assert_eq!(v.verify(&token, 10), Err(CapabilityError::UnknownKey(1)));
        // Key 2's public half published under key 1's id: a forgery.
        v.learn([PublicKey {
            id: 1,
            bytes: k2.public().bytes,
        }]);
        assert_eq!(v.verify(&token, 10), Err(CapabilityError::BadSignature));
        // Both keys of id 1 are kept: the real one verifies.
        v.learn([k1.public()]);
        assert_eq!(v.len(), 3);
        let got = v.verify(&token, 10).unwrap();
        assert_eq!(got, Capability { key_id: 1, ..cap() });
        assert!(got.covers(7 << 40) && got.covers((8 << 40) - 1));
        assert!(!got.covers(8 << 40) && !got.covers((7 << 40) - 1));
        assert_eq!(
            v.verify(&token, 1_001),
            Err(CapabilityError::Expired(1_000))
        );
    }

    #[test]
    fn forgetting_a_key_moves_the_counter_connections_watch() {
        let (k1, k2) = (key(1), key(2));
        let mut v = Verifier::default();
        v.learn([k1.public(), k2.public()]);
        let counter = v.forgotten();
        assert!(v.knows(1) && v.knows(2));
        // A key it does not know: nothing forgotten, the counter stays.
        assert_eq!(v.forget([key(3).public()]), 0);
        assert_eq!(counter.load(Ordering::Acquire), 0);
        assert_eq!(v.forget([k1.public()]), 1);
        assert_eq!(counter.load(Ordering::Acquire), 1);
        assert!(!v.knows(1) && v.knows(2));
        let token = k1.sign(&cap()).unwrap();
        assert_eq!(v.verify(&token, 10), Err(CapabilityError::UnknownKey(1)));
    }

    #[test]
    fn every_changed_byte_is_refused() {
        let k = key(3);
        let mut v = Verifier::default();
        v.learn([k.public()]);
        let token = k.sign(&cap()).unwrap();
        for i in 0..token.len() {
            let mut t = token.clone();
            t[i] ^= 0x01;
            assert!(v.verify(&t, 10).is_err(), "byte {i} changed still verifies");
        }
        for n in 0..token.len() {
            assert!(v.verify(&token[..n], 10).is_err());
        }
        let mut long = token.clone();
        long.push(0);
        assert!(v.verify(&long, 10).is_err());
    }

    #[test]
    fn hex_round_trips() {
        let b: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&b)).unwrap(), b);
        assert_eq!(from_hex("0"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn names_must_fit() {
        let k = key(4);
        for bad in [String::new(), "x".repeat(256)] {
            assert!(
                k.sign(&Capability {
                    agent: bad.clone(),
                    ..cap()
                })
                .is_err()
            );
            assert!(
                k.sign(&Capability {
                    tenant: bad,
                    ..cap()
                })
                .is_err()
            );
        }
        let long = k
            .sign(&Capability {
                agent: "a".repeat(255),
                tenant: "t".repeat(255),
                ..cap()
            })
            .unwrap();
        assert_eq!(long.len(), MAX_TOKEN_LEN);
    }
}

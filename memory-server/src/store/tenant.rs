//! Tenants: who may connect, and how many pages each may hold.

use std::sync::atomic::{AtomicU64, Ordering};

/// A tenant known to the store.
#[derive(Debug)]
pub struct Tenant {
    pub id: u32,
    pub name: String,
    /// Credential a client must present; `None` accepts any.
    pub token: Option<Vec<u8>>,
    /// Page limit; `u64::MAX` for none.
    pub quota_pages: u64,
    used: AtomicU64,
}

impl Tenant {
    /// A tenant with nothing stored yet.
    pub fn new(id: u32, name: String, token: Option<Vec<u8>>, quota_pages: u64) -> Self {
        Self {
            id,
            name,
            token,
            quota_pages,
            used: AtomicU64::new(0),
        }
    }

    /// Pages currently held.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes one page of quota; false when the quota is used up.
    pub fn try_reserve(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                (u < self.quota_pages).then_some(u + 1)
            })
            .is_ok()
    }

    /// Takes one page regardless of the quota (rebuilding after a restart).
    pub fn force_reserve(&self) {
        self.used.fetch_add(1, Ordering::AcqRel);
    }

    /// Gives one page back.
    pub fn release(&self) {
        let prev = self.used.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev > 0, "tenant {} released more than it held", self.id);
    }

    /// Checks a presented credential in constant time.
    pub fn authenticate(&self, credential: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        match &self.token {
            None => true,
            Some(t) => bool::from(t.as_slice().ct_eq(credential)),
        }
    }
}

//! Where a server holds each page, for one-sided RDMA READs.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

/// Where a stored page is and what it must read back as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub addr: u64,
    pub rkey: u32,
    pub crc: u32,
}

/// Locations of pages on one server, shared by every connection made from
/// clones of one [`ClientConfig`](crate::ClientConfig). Cleared when the
/// server's pool identity changes (a server restarted without a pool
/// file). A location may go stale (the page freed and its slot reused):
/// the reader checks the bytes against the checksum and locates again
/// (the server poisons freed slots, so a stale location fails the check).
/// Every PUT or FREE through any connection made from the configuration
/// forgets the handles it touches; a configuration for another tenant
/// ([`ClientConfig::with_tenant`](crate::ClientConfig::with_tenant)) gets
/// a cache of its own.
#[derive(Debug, Default)]
pub struct LocationCache {
    server_id: AtomicU64,
    map: DashMap<u64, Loc>,
}

impl LocationCache {
    /// Forgets everything if `server_id` is not the server the cache
    /// describes.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn check_server(&self, server_id: u64) {
        if self.server_id.swap(server_id, Ordering::AcqRel) != server_id {
            self.map.clear();
        }
    }

    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn insert(&self, handle: u64, loc: Loc) {
        self.map.insert(handle, loc);
    }

    pub(crate) fn remove(&self, handle: &u64) {
        self.map.remove(handle);
    }

    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn get(&self, handle: u64) -> Option<Loc> {
        self.map.get(&handle).map(|l| *l)
    }

    /// Forgets every location.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn clear(&self) {
        self.map.clear();
    }

    /// Number of pages whose location is known.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no location is known.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

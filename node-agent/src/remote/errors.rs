//! Errors the agent met, by stable reason, for `/metrics`
//! (`rmem_agent_errors_total{plane, reason}`): on the data plane
//! ([`super::servers::Servers`] counts), a request to a memory server that
//! failed for good (after its retries) and each page a server answered
//! with a status other than ok on a read or a store; on the control plane
//! ([`super::cluster::Cluster`] counts), a call to the coordinator that
//! failed for good, by the coordinator's `rmem-reason`. Errors are rare,
//! so a mutex over a small map is cheap enough; nothing is counted on
//! success.

use std::collections::BTreeMap;
use std::sync::Mutex;

use rmem_client::PageStatus;

/// Counts by reason (`unreachable`, `timeout`, `no_space`, `corrupt`, ...).
#[derive(Debug, Default)]
pub struct ErrorCounts(Mutex<BTreeMap<Box<str>, u64>>);

impl ErrorCounts {
    /// Counts `n` errors of `reason`.
    pub fn count(&self, reason: &str, n: u64) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(reason) {
            Some(c) => *c += n,
            None => {
                m.insert(reason.into(), n);
            }
        }
    }

    /// Counts the pages of an answer whose status is not ok.
    pub fn count_statuses(&self, statuses: &[PageStatus]) {
        if statuses.iter().all(|s| *s == PageStatus::Ok) {
            return;
        }
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for s in statuses.iter().filter(|s| **s != PageStatus::Ok) {
            *m.entry(s.as_str().into()).or_default() += 1;
        }
    }

    /// Every reason met so far and its count.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason_and_only_bad_statuses() {
        let e = ErrorCounts::default();
        e.count("timeout", 2);
        e.count_statuses(&[PageStatus::Ok, PageStatus::NoSpace, PageStatus::NoSpace]);
        e.count_statuses(&[PageStatus::Ok]);
        assert_eq!(
            e.snapshot(),
            vec![("no_space".to_string(), 2), ("timeout".to_string(), 2)]
        );
    }
}

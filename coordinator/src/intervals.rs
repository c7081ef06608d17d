//! Interval registrations: HMM's `mmu_interval_notifier`, cluster-wide.
//!
//! An interval is a byte range of an address space with subscribers and a
//! sequence number. Intervals of one address space never overlap (a second
//! party mirrors an interval by subscribing to it), so the intervals an
//! invalidation touches are found with one ordered-map range query.
//!
//! Sequence numbers are `epoch << 32 | count`: the coordinator's epoch
//! grows on every start, so a sequence read before a restart never equals
//! one handed out after it, and `ReadRetry` stays correct across restarts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::CoordError;
use crate::state::IntervalRecord;

/// Bytes per page; interval bounds are multiples of it.
pub const PAGE: u64 = 4096;

/// An interval now.
#[derive(Debug, Clone)]
pub struct Interval {
    pub rec: IntervalRecord,
    pub subscribers: BTreeSet<u64>,
    pub seq: u64,
    /// Invalidations of this interval that have begun and not completed.
    pub in_flight: u32,
    /// An invalidation of the whole interval finished (every subscriber
    /// acknowledged or was fenced) and no server subscribed since: nothing
    /// of it is left on a server but what a fenced one frees when it
    /// reconciles. In memory only: after a restart it is unknown again.
    pub cleared: bool,
}

impl Interval {
    pub fn end(&self) -> u64 {
        self.rec.start + self.rec.length
    }

    /// The part of [start, end) inside this interval.
    pub fn clip(&self, start: u64, end: u64) -> (u64, u64) {
        (start.max(self.rec.start), end.min(self.end()))
    }

    /// Persisted form, with current subscribers.
    pub fn record(&self) -> IntervalRecord {
        IntervalRecord {
            subscribers: self.subscribers.iter().copied().collect(),
            ..self.rec.clone()
        }
    }
}

/// Every interval, by id and by position in its address space.
#[derive(Debug, Default)]
pub struct Intervals {
    by_id: BTreeMap<u64, Interval>,
    /// address space -> start -> id
    by_space: HashMap<String, BTreeMap<u64, u64>>,
    epoch: u64,
}

/// Checks a byte range: page-aligned, non-empty, no overflow.
pub fn check_range(start: u64, length: u64) -> Result<u64, CoordError> {
    if length == 0 {
        return Err(CoordError::invalid("length", "must be positive"));
    }
    if !start.is_multiple_of(PAGE) || !length.is_multiple_of(PAGE) {
        return Err(CoordError::invalid(
            "start",
            "start and length must be multiples of 4096",
        ));
    }
    start
        .checked_add(length)
        .ok_or_else(|| CoordError::invalid("length", "start + length overflows"))
}

impl Intervals {
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    pub fn get(&self, id: u64) -> Result<&Interval, CoordError> {
        self.by_id.get(&id).ok_or(CoordError::UnknownInterval(id))
    }

    pub fn get_mut(&mut self, id: u64) -> Result<&mut Interval, CoordError> {
        self.by_id
            .get_mut(&id)
            .ok_or(CoordError::UnknownInterval(id))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Interval> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Ids of the intervals of `space` that overlap [start, end), in address
    /// order.
    pub fn overlapping(&self, space: &str, start: u64, end: u64) -> Vec<u64> {
        let Some(map) = self.by_space.get(space) else {
            return Vec::new();
        };
        let mut ids: Vec<u64> = map
            .range(..end)
            .rev()
            .map(|(_, &id)| id)
            .take_while(|id| self.by_id[id].end() > start)
            .collect();
        ids.reverse();
        ids
    }

    /// Adds an interval (already validated) with a fresh sequence.
    pub fn insert(&mut self, rec: IntervalRecord) {
        self.by_space
            .entry(rec.address_space.clone())
            .or_default()
            .insert(rec.start, rec.id);
        let subscribers = rec.subscribers.iter().copied().collect();
        self.by_id.insert(
            rec.id,
            Interval {
                rec,
                subscribers,
                seq: self.epoch << 32,
                in_flight: 0,
                cleared: false,
            },
        );
    }

    pub fn remove(&mut self, id: u64) -> Option<Interval> {
        let iv = self.by_id.remove(&id)?;
        if let Some(map) = self.by_space.get_mut(&iv.rec.address_space) {
            map.remove(&iv.rec.start);
            if map.is_empty() {
                self.by_space.remove(&iv.rec.address_space);
            }
        }
        Some(iv)
    }

    /// Starts every interval's sequence at `epoch << 32`.
    pub fn restart_sequences(&mut self, epoch: u64) {
        self.epoch = epoch;
        for iv in self.by_id.values_mut() {
            iv.seq = epoch << 32;
        }
    }

    /// Ends every subscription of `member`.
    pub fn unsubscribe_everywhere(&mut self, member: u64) {
        for iv in self.by_id.values_mut() {
            iv.subscribers.remove(&member);
        }
    }

    /// Intervals `member` subscribes to.
    pub fn subscriptions(&self, member: u64) -> usize {
        self.by_id
            .values()
            .filter(|iv| iv.subscribers.contains(&member))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, space: &str, start: u64, length: u64) -> IntervalRecord {
        IntervalRecord {
            id,
            address_space: space.into(),
            start,
            length,
            tenant: "t".into(),
            handle_base: 0,
            owner: 1,
            subscribers: vec![1],
        }
    }

    #[test]
    fn overlap_queries_find_exactly_the_touched_intervals() {
        let mut t = Intervals::default();
        t.insert(rec(1, "a", 0, 4 * PAGE));
        t.insert(rec(2, "a", 8 * PAGE, 4 * PAGE));
        t.insert(rec(3, "a", 12 * PAGE, PAGE));
        t.insert(rec(4, "b", 0, 100 * PAGE));
        assert_eq!(t.overlapping("a", 0, PAGE), vec![1]);
        assert_eq!(t.overlapping("a", 4 * PAGE, 8 * PAGE), Vec::<u64>::new());
        assert_eq!(t.overlapping("a", 3 * PAGE, 9 * PAGE), vec![1, 2]);
        assert_eq!(t.overlapping("a", 0, u64::MAX), vec![1, 2, 3]);
        assert_eq!(t.overlapping("a", 12 * PAGE, 13 * PAGE), vec![3]);
        assert_eq!(t.overlapping("c", 0, u64::MAX), Vec::<u64>::new());
        t.remove(2);
        assert_eq!(t.overlapping("a", 0, u64::MAX), vec![1, 3]);
    }

    #[test]
    fn ranges_are_checked() {
        assert!(check_range(0, 0).is_err());
        assert!(check_range(1, PAGE).is_err());
        assert!(check_range(0, PAGE + 1).is_err());
        assert!(check_range(u64::MAX - PAGE + 1, 2 * PAGE).is_err());
        assert_eq!(check_range(PAGE, PAGE).unwrap(), 2 * PAGE);
    }
}

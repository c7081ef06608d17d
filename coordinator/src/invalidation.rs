//! Invalidation fan-out: mailboxes of events per member, and the
//! invalidations waiting for acknowledgements.
//!
//! An invalidation puts one event per touched interval into the mailbox of
//! each subscriber and waits until every subscriber acknowledged. A member
//! reads its mailbox through one `Watch` stream; events stay in the mailbox
//! until acknowledged, so a stream that breaks and reconnects gets them
//! again. The mailbox holds only unacknowledged events, and each
//! invalidation ends by its deadline, so mailboxes stay bounded.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use rmem_proto::control::v1::{self as pb, watch_event::Event};
use tokio::sync::{Notify, oneshot};

/// One member's undelivered and unacknowledged events.
#[derive(Debug, Default)]
pub struct Mailbox {
    /// (delivery number, event), oldest first.
    events: VecDeque<(u64, pb::WatchEvent)>,
    next: u64,
    /// Bumped when a new stream takes over; older streams stop.
    pub generation: u64,
    pub notify: Arc<Notify>,
    /// The member was fenced: streams send what is left (the notice) and end.
    pub closed: bool,
}

impl Mailbox {
    pub fn push(&mut self, event: Event) {
        self.events
            .push_back((self.next, pb::WatchEvent { event: Some(event) }));
        self.next += 1;
        self.notify.notify_waiters();
    }

    /// A new registration of the member: old events and streams are void.
    pub fn reset(&mut self) {
        self.events.clear();
        self.closed = false;
        self.generation += 1;
        self.notify.notify_waiters();
    }

    /// Events with delivery number >= `cursor`, and the next cursor.
    pub fn since(&self, cursor: u64) -> (Vec<pb::WatchEvent>, u64) {
        let evs = self
            .events
            .iter()
            .filter(|(n, _)| *n >= cursor)
            .map(|(_, e)| e.clone())
            .collect();
        (evs, self.next)
    }

    /// Drops the events of an acknowledged invalidation.
    pub fn acknowledge(&mut self, invalidation: u64) {
        self.events.retain(|(_, e)| {
            !matches!(&e.event, Some(Event::Invalidation(i)) if i.invalidation_id == invalidation)
        });
    }

    /// Drops queued drain notices (they are rebuilt from state when a
    /// stream opens, so they never pile up).
    pub fn drop_drain_notices(&mut self) {
        self.events
            .retain(|(_, e)| !matches!(&e.event, Some(Event::Drain(_))));
    }

    /// Replaces everything with a fencing notice and closes the mailbox.
    pub fn fence(&mut self, invalidation: u64) {
        self.events.clear();
        self.push(Event::Fenced(pb::FencedNotice {
            invalidation_id: invalidation,
        }));
        self.closed = true;
    }

    /// Oldest first, the earliest delivery number still held.
    pub fn oldest(&self) -> u64 {
        self.events.front().map_or(self.next, |(n, _)| *n)
    }
}

/// An invalidation waiting for acknowledgements.
#[derive(Debug)]
pub struct Pending {
    pub waiting: BTreeSet<u64>,
    pub acked: Vec<u64>,
    pub fenced: Vec<u64>,
    pub intervals: Vec<u64>,
    /// Of `intervals`, those one of its ranges covers whole.
    pub whole: Vec<u64>,
    /// When it began (its latency is measured when it finishes).
    pub began: std::time::Instant,
    done: Option<oneshot::Sender<()>>,
}

impl Pending {
    pub fn new(waiting: BTreeSet<u64>, intervals: Vec<u64>) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut p = Self {
            waiting,
            acked: Vec::new(),
            fenced: Vec::new(),
            intervals,
            whole: Vec::new(),
            began: std::time::Instant::now(),
            done: Some(tx),
        };
        p.complete_if_done();
        (p, rx)
    }

    /// Notes that `member` no longer needs to answer (acknowledged or
    /// fenced); true if it was waited for.
    pub fn settle(&mut self, member: u64, acked: bool) -> bool {
        if !self.waiting.remove(&member) {
            return false;
        }
        if acked {
            self.acked.push(member);
        } else {
            self.fenced.push(member);
        }
        self.complete_if_done();
        true
    }

    fn complete_if_done(&mut self) {
        if self.waiting.is_empty()
            && let Some(tx) = self.done.take()
        {
            let _ = tx.send(());
        }
    }
}

/// Mailboxes and pending invalidations.
#[derive(Debug, Default)]
pub struct Fanout {
    pub mailboxes: HashMap<u64, Mailbox>,
    pub pending: HashMap<u64, Pending>,
}

impl Fanout {
    pub fn mailbox(&mut self, member: u64) -> &mut Mailbox {
        self.mailboxes.entry(member).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(id: u64) -> Event {
        Event::Invalidation(pb::InvalidationEvent {
            invalidation_id: id,
            ..Default::default()
        })
    }

    #[test]
    fn mailbox_redelivers_until_acknowledged() {
        let mut m = Mailbox::default();
        m.push(inv(1));
        m.push(inv(2));
        m.push(inv(2));
        let (evs, cursor) = m.since(0);
        assert_eq!((evs.len(), cursor), (3, 3));
        assert!(m.since(cursor).0.is_empty());
        m.acknowledge(2);
        // A new stream starts from the oldest event still held.
        let (evs, _) = m.since(m.oldest());
        assert_eq!(evs.len(), 1);
        m.fence(9);
        assert!(m.closed);
        let (evs, _) = m.since(m.oldest());
        assert!(matches!(evs[0].event, Some(Event::Fenced(_))));
    }

    #[test]
    fn pending_completes_when_everyone_settled() {
        let (mut p, mut rx) = Pending::new([1, 2].into(), vec![7]);
        assert!(p.settle(1, true));
        assert!(!p.settle(1, true), "a second ack changes nothing");
        assert!(rx.try_recv().is_err());
        assert!(p.settle(2, false));
        assert!(rx.try_recv().is_ok());
        assert_eq!((p.acked, p.fenced), (vec![1], vec![2]));
        let (_p, mut rx) = Pending::new(BTreeSet::new(), vec![]);
        assert!(rx.try_recv().is_ok(), "nobody to wait for");
    }
}

//! Members (memory servers and agents) and their leases.
//!
//! A member registers under a stable name and keeps a lease alive with
//! heartbeats. Registration is persisted; liveness is not: after a
//! coordinator restart every member gets one lease period to heartbeat.
//! A member whose lease expired is `Down`; one that failed to acknowledge
//! an invalidation in time is `Fenced`. Either must register again (a new
//! incarnation) before it may serve, and must itself stop serving once it
//! cannot renew its lease.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::error::CoordError;
use crate::state::{MemberRecord, RoleRecord};

/// Whether a member may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Up,
    Down,
    Fenced,
    Left,
}

/// A member as the coordinator sees it now.
#[derive(Debug, Clone)]
pub struct Member {
    pub rec: MemberRecord,
    pub liveness: Liveness,
    pub lease_until: Instant,
    /// Pages in use, as the server last reported.
    pub used_pages: u64,
    /// Pages at risk, as the agent last reported.
    pub at_risk_pages: u64,
}

impl Member {
    /// Up (or draining) with a current lease.
    pub fn serving(&self) -> bool {
        self.liveness == Liveness::Up
    }

    /// A server that may receive new placements.
    pub fn placeable(&self) -> bool {
        self.rec.role == RoleRecord::Server && self.serving() && !self.rec.draining
    }
}

/// Every member, by id and by name.
#[derive(Debug, Default)]
pub struct Members {
    by_id: BTreeMap<u64, Member>,
    by_name: HashMap<String, u64>,
}

impl Members {
    pub fn get(&self, id: u64) -> Result<&Member, CoordError> {
        self.by_id.get(&id).ok_or(CoordError::UnknownMember(id))
    }

    pub fn get_mut(&mut self, id: u64) -> Result<&mut Member, CoordError> {
        self.by_id.get_mut(&id).ok_or(CoordError::UnknownMember(id))
    }

    pub fn by_name(&self, name: &str) -> Option<&Member> {
        self.by_name.get(name).and_then(|id| self.by_id.get(id))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Member> {
        self.by_id.values()
    }

    /// A member heartbeating as `incarnation` may renew its lease.
    pub fn check_current(&self, id: u64, incarnation: u64) -> Result<&Member, CoordError> {
        let m = self.get(id)?;
        if m.rec.incarnation != incarnation {
            return Err(CoordError::StaleIncarnation {
                id,
                got: incarnation,
                current: m.rec.incarnation,
            });
        }
        match m.liveness {
            Liveness::Up => Ok(m),
            Liveness::Down => Err(CoordError::LeaseExpired(id)),
            Liveness::Fenced => Err(CoordError::Fenced(id)),
            Liveness::Left => Err(CoordError::Left { id }),
        }
    }

    /// Applies a registration (new or renewed) with a fresh lease.
    pub fn upsert(&mut self, rec: MemberRecord, lease: Duration, now: Instant) {
        let (used, at_risk) = self
            .by_id
            .get(&rec.id)
            .map_or((0, 0), |m| (m.used_pages, m.at_risk_pages));
        self.by_name.insert(rec.name.clone(), rec.id);
        self.by_id.insert(
            rec.id,
            Member {
                rec,
                liveness: Liveness::Up,
                lease_until: now + lease,
                used_pages: used,
                at_risk_pages: at_risk,
            },
        );
    }

    pub fn set_liveness(&mut self, id: u64, liveness: Liveness) {
        if let Some(m) = self.by_id.get_mut(&id) {
            m.liveness = liveness;
        }
    }

    /// Marks members whose lease ran out as down; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let mut expired = Vec::new();
        for m in self.by_id.values_mut() {
            if m.liveness == Liveness::Up && m.lease_until <= now {
                m.liveness = Liveness::Down;
                expired.push(m.rec.id);
            }
        }
        expired
    }

    /// Persisted form of every member that has not left.
    pub fn records(&self) -> impl Iterator<Item = &MemberRecord> {
        self.by_id
            .values()
            .filter(|m| m.liveness != Liveness::Left)
            .map(|m| &m.rec)
    }
}

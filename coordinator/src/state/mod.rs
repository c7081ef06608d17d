//! What the coordinator remembers across restarts, and where.
//!
//! Every change to the registry (members, intervals, subscriptions,
//! grants) is a [`Record`]; the in-memory model applies records, both when
//! they happen and when they are read back at start-up, so the two paths
//! cannot disagree. Liveness (leases, in-flight invalidations) is not
//! persisted: after a restart every member has one lease period to
//! heartbeat again.
//!
//! [`StateStore`] is the narrow interface to storage: append a record, read
//! them all back, replace them with a snapshot. [`log::FileLog`] keeps them
//! in a local append-only file (one coordinator); [`etcd::EtcdStore`] keeps
//! them in etcd, written only by the replica etcd elected (several
//! coordinators, one leading).

pub mod etcd;
pub mod log;

use serde::{Deserialize, Serialize};

/// A member as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub id: u64,
    pub role: RoleRecord,
    pub name: String,
    pub data_addr: String,
    pub grpc_addr: String,
    pub capacity_pages: u64,
    pub transports: Vec<String>,
    pub incarnation: u64,
    pub draining: bool,
    /// Failure domain (servers; empty: a domain of its own).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    /// Declared gone (servers): its copies are rebuilt elsewhere; it stays
    /// draining until an operator undrains it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleRecord {
    Server,
    Agent,
}

/// An interval as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntervalRecord {
    pub id: u64,
    pub address_space: String,
    pub start: u64,
    pub length: u64,
    pub tenant: String,
    pub handle_base: u64,
    pub owner: u64,
    pub subscribers: Vec<u64>,
}

/// A grant of server capacity to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub id: u64,
    pub agent: u64,
    pub server: u64,
    pub tenant: String,
    pub pages: u64,
    /// The agent's name for the allocation that made this grant (0: none),
    /// and how many grants answered it: a retried allocation finds them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub request: u64,
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub of: u32,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero32(v: &u32) -> bool {
    *v == 0
}

/// One change to the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// The cluster's identity, drawn once when the state is created and
    /// first in every snapshot. Members compare it across registrations: a
    /// coordinator whose state was lost (or that belongs to another
    /// cluster) has another identity, and servers free nothing on its word
    /// that it never knew.
    Identity {
        cluster_id: String,
    },
    /// The coordinator started; sequence numbers and invalidation ids of
    /// this run are prefixed with the epoch, so none repeats one handed out
    /// before a restart.
    Epoch {
        epoch: u64,
    },
    /// A key the coordinator signs capabilities with (an Ed25519 PKCS#8
    /// document, hex): drawn with the identity or by a rotation, kept in
    /// the state so every replica and every restart signs with it (see
    /// `keyring`). `created_ms`: Unix milliseconds (0 for a key from
    /// before rotation).
    CapabilityKey {
        id: u32,
        pkcs8: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        created_ms: u64,
    },
    /// A key retired once every capability it signed had expired: only
    /// its public half is kept, for servers to forget it.
    CapabilityKeyRetired {
        id: u32,
        public: String,
    },
    /// Ids below these were handed out (kept across compaction so ids of
    /// removed objects are never reused).
    IdFloors {
        member: u64,
        interval: u64,
        grant: u64,
    },
    MemberUpsert {
        member: MemberRecord,
    },
    MemberLeft {
        id: u64,
    },
    /// A member lost its lease for not acknowledging an invalidation: its
    /// subscriptions end.
    MemberFenced {
        id: u64,
    },
    /// A server stops (or resumes) taking placements. Resuming also ends
    /// a gone declaration.
    MemberDrain {
        id: u64,
        draining: bool,
    },
    /// A server is declared gone: it drains, and agents rebuild the copies
    /// it held from the others.
    MemberGone {
        id: u64,
    },
    IntervalAdd {
        interval: IntervalRecord,
    },
    IntervalRemove {
        id: u64,
    },
    Subscribe {
        interval: u64,
        member: u64,
    },
    Unsubscribe {
        interval: u64,
        member: u64,
    },
    GrantAdd {
        grant: GrantRecord,
    },
    /// `pages` of the grant returned; at zero pages left it is gone.
    GrantRelease {
        id: u64,
        pages: u64,
    },
}

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot access the state file {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} record {index} is unreadable: {reason}")]
    Corrupt {
        path: String,
        index: usize,
        reason: String,
    },
    #[error("etcd ({endpoints}): {op} failed")]
    Etcd {
        endpoints: String,
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "this coordinator no longer leads (its etcd election lease expired or another replica was elected): it writes nothing more"
    )]
    Deposed,
}

/// Durable storage of [`Record`]s.
pub trait StateStore: Send + std::fmt::Debug {
    /// Every record, oldest first.
    fn load(&mut self) -> Result<Vec<Record>, StateError>;
    /// Appends one record; durable when it returns.
    fn append(&mut self, record: &Record) -> Result<(), StateError>;
    /// Replaces everything with `snapshot` (which describes the same state
    /// in fewer records), atomically.
    fn compact(&mut self, snapshot: &[Record]) -> Result<(), StateError>;
    /// Records appended since the last load or compaction.
    fn appended(&self) -> usize;
    /// Whether this coordinator may act on its state (fence members,
    /// expire leases): always, but for a replica that may no longer lead.
    fn leads(&self) -> bool {
        true
    }
}

/// Keeps records in memory only (tests, throwaway clusters).
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Vec<Record>,
    appended: usize,
}

impl StateStore for MemoryStore {
    fn load(&mut self) -> Result<Vec<Record>, StateError> {
        self.appended = 0;
        Ok(self.records.clone())
    }
    fn append(&mut self, record: &Record) -> Result<(), StateError> {
        self.records.push(record.clone());
        self.appended += 1;
        Ok(())
    }
    fn compact(&mut self, snapshot: &[Record]) -> Result<(), StateError> {
        self.records = snapshot.to_vec();
        self.appended = 0;
        Ok(())
    }
    fn appended(&self) -> usize {
        self.appended
    }
}

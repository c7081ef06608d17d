//! Coordinator errors, each with its gRPC status code and a stable reason
//! that clients match on (sent in the `rmem-reason` metadata key).

use crate::state::StateError;

/// Why a control-plane request failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("unknown member {0}")]
    UnknownMember(u64),
    #[error(
        "member {member} registered with cluster {theirs}, this coordinator is cluster {ours} (it lost its state or is another cluster's); register again"
    )]
    OtherCluster {
        member: u64,
        theirs: String,
        ours: String,
    },
    #[error("unknown interval {0}")]
    UnknownInterval(u64),
    #[error("unknown grant {0}")]
    UnknownGrant(u64),
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
    #[error("unknown server `{0}`")]
    UnknownServer(String),
    #[error(
        "[{start:#x}, {end:#x}) overlaps interval {existing} of the same address space; subscribe to it instead"
    )]
    Overlap { existing: u64, start: u64, end: u64 },
    #[error(
        "handles [{first:#x}, {end:#x}) overlap those of interval {existing}, another member's, in tenant `{tenant}`: draw another handle base"
    )]
    HandlesInUse {
        existing: u64,
        tenant: String,
        first: u64,
        end: u64,
    },
    #[error("the name `{0}` is registered with another role")]
    NameInUse(String),
    #[error("member {0} is not a memory server")]
    NotAServer(u64),
    #[error("the lease of member {0} expired; register again")]
    LeaseExpired(u64),
    #[error("member {0} was fenced for not acknowledging an invalidation; register again")]
    Fenced(u64),
    #[error("member {id} has left the cluster")]
    Left { id: u64 },
    #[error("member {id} incarnation {got} is stale (current {current}); register again")]
    StaleIncarnation { id: u64, got: u64, current: u64 },
    #[error("tenant `{tenant}` would hold {wanted} pages, over its quota of {quota}")]
    QuotaExceeded {
        tenant: String,
        wanted: u64,
        quota: u64,
    },
    #[error("{requested} pages requested, {free} free on servers taking placements")]
    NoCapacity { requested: u64, free: u64 },
    #[error("interval {0} stayed under invalidation past the deadline")]
    Busy(u64),
    #[error("missing or wrong cluster token")]
    Unauthenticated,
    #[error("the caller's certificate names no rmem identity: {0}")]
    NoIdentity(String),
    #[error("{0}: renew it, or ask the cluster's operator why it was revoked")]
    CertificateRefused(#[from] rmem_common::tls::revocation::PeerRefused),
    #[error("{caller} may not {what}")]
    Forbidden { caller: String, what: String },
    #[error("cannot record the change")]
    State(#[from] StateError),
    #[error("no capability key {0}")]
    UnknownKey(u32),
    #[error(
        "capability key {0} signs capabilities now: rotate first (rmemctl capability-keys rotate), then retire it once the new key signs"
    )]
    KeySigns(u32),
    #[error(
        "no coordinator leads: etcd does not answer this replica, so none can be elected; control calls resume once it does (the data plane goes on)"
    )]
    Leaderless,
}

impl CoordError {
    /// The gRPC code.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Invalid { .. } => Code::InvalidArgument,
            Self::UnknownMember(_)
            | Self::OtherCluster { .. }
            | Self::UnknownInterval(_)
            | Self::UnknownGrant(_)
            | Self::UnknownTenant(_)
            | Self::UnknownServer(_)
            | Self::UnknownKey(_) => Code::NotFound,
            Self::Overlap { .. } | Self::HandlesInUse { .. } | Self::NameInUse(_) => {
                Code::AlreadyExists
            }
            Self::NotAServer(_)
            | Self::LeaseExpired(_)
            | Self::Fenced(_)
            | Self::Left { .. }
            | Self::StaleIncarnation { .. }
            | Self::KeySigns(_) => Code::FailedPrecondition,
            Self::QuotaExceeded { .. } | Self::NoCapacity { .. } => Code::ResourceExhausted,
            Self::Busy(_) => Code::Unavailable,
            Self::Unauthenticated | Self::NoIdentity(_) | Self::CertificateRefused(_) => {
                Code::Unauthenticated
            }
            Self::Forbidden { .. } => Code::PermissionDenied,
            Self::State(_) | Self::Leaderless => Code::Unavailable,
        }
    }

    /// A stable, machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_argument",
            Self::UnknownMember(_) => "unknown_member",
            Self::OtherCluster { .. } => "other_cluster",
            Self::UnknownInterval(_) => "unknown_interval",
            Self::UnknownGrant(_) => "unknown_grant",
            Self::UnknownTenant(_) => "unknown_tenant",
            Self::UnknownServer(_) => "unknown_server",
            Self::UnknownKey(_) => "unknown_key",
            Self::KeySigns(_) => "key_signs",
            Self::Overlap { .. } => "overlapping_interval",
            Self::HandlesInUse { .. } => "handles_in_use",
            Self::NameInUse(_) => "name_in_use",
            Self::NotAServer(_) => "not_a_server",
            Self::LeaseExpired(_) => "lease_expired",
            Self::Fenced(_) => "fenced",
            Self::Left { .. } => "left",
            Self::StaleIncarnation { .. } => "stale_incarnation",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::NoCapacity { .. } => "no_capacity",
            Self::Busy(_) => "interval_busy",
            Self::Unauthenticated => "unauthenticated",
            Self::NoIdentity(_) => "no_identity",
            Self::CertificateRefused(_) => "certificate_refused",
            Self::Forbidden { .. } => "forbidden",
            Self::State(StateError::Deposed) => "not_leader",
            Self::State(_) | Self::Leaderless => "state_unavailable",
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Metadata key carrying [`CoordError::reason`].
pub const REASON_KEY: &str = "rmem-reason";
/// Metadata key in which a replica that does not lead names the one that
/// does (with reason `not_leader`).
pub const LEADER_KEY: &str = "rmem-leader";

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        let mut status = tonic::Status::new(e.code(), msg);
        status.metadata_mut().insert(
            REASON_KEY,
            tonic::metadata::MetadataValue::from_static(e.reason()),
        );
        status
    }
}

//! Client errors.

use rmem_proto::wire::{DecodeError, ErrorCode, PageStatus};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {addr} failed")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout {
        addr: String,
        timeout: std::time::Duration,
    },
    #[error("{addr} sent a malformed frame")]
    Protocol {
        addr: String,
        #[source]
        source: DecodeError,
    },
    #[error("{addr} closed the connection: {code}: {message}")]
    Rejected {
        addr: String,
        code: ErrorCode,
        message: String,
    },
    #[error("{addr} sent page {handle} with a bad checksum")]
    Checksum { addr: String, handle: u64 },
    #[error("page {handle}: {status}")]
    Page { handle: u64, status: PageStatus },
    #[error("{what} of {pages} pages exceeds the server's batch limit of {max}")]
    BatchTooLarge {
        what: &'static str,
        pages: usize,
        max: u32,
    },
    /// The TLS handshake failed, or the server is not the one meant.
    #[error("TLS with {addr} failed: {message}")]
    Tls { addr: String, message: String },
    #[error("the connection to {addr} is closed")]
    Closed { addr: String },
    #[error("{addr} does not offer RDMA (start it with --rdma)")]
    RdmaNotOffered { addr: String },
    #[error("this build has no RDMA support (build with the `rdma` feature)")]
    RdmaNotBuilt,
    #[cfg(feature = "rdma")]
    #[error("RDMA with {addr} failed")]
    Rdma {
        addr: String,
        #[source]
        source: rmem_verbs::VerbsError,
    },
}

impl ClientError {
    /// Whether retrying on a fresh connection may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Io { .. }
            | ClientError::Timeout { .. }
            | ClientError::Closed { .. }
            | ClientError::Checksum { .. }
            // A handshake cut short, or an impostor at the address the
            // server is coming back to: bounded by the request timeout.
            | ClientError::Tls { .. } => true,
            ClientError::Rejected { code, .. } => matches!(
                code,
                ErrorCode::ShuttingDown | ErrorCode::Busy | ErrorCode::Timeout
            ),
            // A queue pair in error, a refused post or a lost completion: a
            // new connection brings a new queue pair. What a new one would
            // meet again (no device, no port for the address, the
            // locked-memory limit) is not retried.
            #[cfg(feature = "rdma")]
            ClientError::Rdma { source, .. } => !matches!(
                source,
                rmem_verbs::VerbsError::NoDevices
                    | rmem_verbs::VerbsError::NoPortForAddress { .. }
                    | rmem_verbs::VerbsError::NoSuchDevice(_)
                    | rmem_verbs::VerbsError::MemlockLimit { .. }
            ),
            ClientError::Protocol { .. }
            | ClientError::Page { .. }
            | ClientError::BatchTooLarge { .. }
            | ClientError::RdmaNotOffered { .. }
            | ClientError::RdmaNotBuilt => false,
        }
    }

    /// A short stable name of what went wrong, for metrics (a refusal's
    /// or a page status's own name where the server gave one).
    pub fn reason(&self) -> &'static str {
        match self {
            ClientError::Connect { .. } => "unreachable",
            ClientError::Io { .. } | ClientError::Closed { .. } => "connection_lost",
            ClientError::Timeout { .. } => "timeout",
            ClientError::Protocol { .. } => "protocol",
            ClientError::Rejected { code, .. } => code.as_str(),
            ClientError::Checksum { .. } => "bad_checksum",
            ClientError::Page { status, .. } => status.as_str(),
            ClientError::BatchTooLarge { .. } => "batch_too_large",
            ClientError::Tls { .. } => "tls",
            ClientError::RdmaNotOffered { .. } | ClientError::RdmaNotBuilt => "rdma_unavailable",
            #[cfg(feature = "rdma")]
            ClientError::Rdma { .. } => "rdma",
        }
    }
}

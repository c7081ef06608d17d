//! Pieces shared by every rmem binary.
//!
//! Each module is one concept: [`config`] reads configuration files and
//! names bad fields, [`size`] parses and prints byte sizes the way
//! operators write them (`4GiB`), [`histogram`] records latencies without
//! locks, [`logging`] sets up `tracing`, [`notify`] speaks systemd's
//! readiness protocol, [`shutdown`] turns SIGINT/SIGTERM
//! into a future, [`redundancy`] names how many copies of a page servers
//! hold, [`identity`] says which member (role and name) a certificate
//! belongs to, [`tls`] reads a member's CA, certificate and key and makes
//! the data plane's TLS of them, [`pki`] makes a lab CA and certificates,
//! [`capability`] signs and checks what an agent may do on the data plane,
//! [`metrics`] writes what a daemon's `/metrics` answers and serves it.

pub mod capability;
pub mod config;
pub mod histogram;
pub mod host;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pki;
pub mod redundancy;
pub mod shutdown;
pub mod size;
pub mod tls;

pub use histogram::{Histogram, Percentiles};
pub use redundancy::Redundancy;
pub use size::ByteSize;

/// An error and its sources, joined by `": "` (what a log line or an
/// ERROR frame should say).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

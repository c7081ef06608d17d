//! The RDMA verbs rmem uses, behind safe types. This crate is the only
//! place that calls libibverbs (through `rdma-sys`); everything else sees
//! [`Context`], [`Pd`], [`Mr`], [`Buffer`], [`Cq`] and [`Qp`].
//!
//! - A [`Context`] is an opened device port chosen by IP address: the port
//!   whose GID table holds that address (RoCE v2 preferred), so the queue
//!   pair runs over the interface the TCP connection uses.
//! - A [`Pd`] scopes access: a queue pair can only touch memory regions of
//!   its own protection domain, whatever rkey it presents.
//! - [`Qp`] is a reliable-connected queue pair connected by hand from the
//!   peer's [`Endpoint`], exchanged over
//!   some other channel (rmem uses its authenticated TCP connection).
//!
//! Every object keeps what it was created from alive (`Arc`), so drop
//! order is always right: queue pairs before their completion queues and
//! domains, regions before their domains, everything before the device.
//!
//! Thread safety: libibverbs objects may be used from several threads
//! (the library and its providers lock internally where the hardware
//! needs it); rmem still gives each queue pair and completion queue one
//! user at a time, which is what the `&mut self` methods enforce.

mod cq;
mod device;
mod mr;
mod qp;

use std::io;

pub use cq::{Completion, Cq};
pub use device::Context;
pub use mr::{Access, Buffer, Mr, Pd};
pub use qp::{Endpoint, Qp, QpBreaker, QpCaps, Transfer};

/// What went wrong in a verbs call.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    #[error("no RDMA device found (is the driver loaded, e.g. rdma_rxe, and a link added?)")]
    NoDevices,
    #[error("no active RDMA port has address {ip} in its GID table (devices: {devices})")]
    NoPortForAddress {
        ip: std::net::IpAddr,
        devices: String,
    },
    #[error("no RDMA device named {0}")]
    NoSuchDevice(String),
    #[error("{op} failed")]
    Call {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot register {bytes} bytes for RDMA: the locked-memory limit ({limit}) is too small; \
         raise it (ulimit -l unlimited, LimitMEMLOCK=infinity in the systemd unit, \
         --ulimit memlock=-1 for a container)"
    )]
    MemlockLimit { bytes: usize, limit: String },
    #[error("RDMA {opcode} completed with status {status} ({name}), vendor error {vendor}")]
    Completion {
        opcode: &'static str,
        status: u32,
        name: &'static str,
        vendor: u32,
    },
    #[error("no RDMA completion within {0:?}")]
    Timeout(std::time::Duration),
    #[error("unexpected: {0}")]
    Unexpected(&'static str),
}

impl VerbsError {
    /// The error of a verbs call that set `errno` (or returned it).
    fn call(op: &'static str, ret: i32) -> Self {
        let source = if ret > 0 {
            io::Error::from_raw_os_error(ret)
        } else {
            io::Error::last_os_error()
        };
        Self::Call { op, source }
    }

    /// Whether this is a remote access error: the peer refused the rkey
    /// or address (for example another tenant's memory region).
    pub fn is_remote_access(&self) -> bool {
        matches!(self, Self::Completion { status, .. } if *status == rdma_sys::ibv_wc_status::IBV_WC_REM_ACCESS_ERR)
    }
}

/// Whether any RDMA device is present (without opening one).
pub fn devices_present() -> bool {
    device::device_names()
        .map(|n| !n.is_empty())
        .unwrap_or(false)
}

//! rmem node agent: gives programs memory whose cold pages live on memory
//! servers.
//!
//! - [`region`]: [`RemoteRegion`], memory served by userfaultfd, with its
//!   fault handlers and evictor.
//! - [`policy`]: which pages are cold (CLOCK with PTE-based reference bits).
//! - [`prefetch`]: stream detection and fetch-ahead.
//! - [`uffd`], [`mem`]: the userfaultfd and memfd system interfaces, the
//!   only modules with `unsafe` code.
//! - [`remote`]: where pages live off this node, one layer for both
//!   backends: connections, servers, cluster membership, handle spaces,
//!   the book of where each copy is, drains.
//! - [`kmod`]: the kernel backend: `rmem.ko` through `/dev/rmem`.
//! - [`demo`]: the `rmem-agent demo` workload and report.
//! - [`metrics`]: what `/metrics` answers, for each backend.

pub mod demo;
pub mod kmod;
pub mod mem;
pub mod metrics;
pub mod policy;
pub mod prefetch;
pub mod region;
pub mod remote;
pub mod uffd;

pub use region::{RegionConfig, RegionError, RemoteRegion};
pub use remote::cluster;

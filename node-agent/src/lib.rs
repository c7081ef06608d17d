//! rmem node agent: gives programs memory whose cold pages live on memory
//! servers.
//!
//! - [`region`]: [`RemoteRegion`], memory served by userfaultfd, with its
//!   fault handlers and evictor.
//! - [`policy`]: which pages are cold (CLOCK with PTE-based reference bits).
//! - [`prefetch`]: stream detection and fetch-ahead.
//! - [`uffd`], [`mem`]: the userfaultfd and memfd system interfaces, the
//!   only modules with `unsafe` code.
//! - [`placement`]: which servers a region's pages go to.
//! - [`remote`]: a thread's reconnecting connection to a memory server.
//! - [`cluster`]: membership in a cluster: placement from the coordinator,
//!   intervals, invalidation on drop, moving pages off draining servers.
//! - [`kmod`]: the kernel backend: `rmem.ko` through `/dev/rmem`.
//! - [`demo`]: the `rmem-agent demo` workload and report.

pub mod cluster;
pub mod demo;
pub mod kmod;
pub mod mem;
pub mod placement;
pub mod policy;
pub mod prefetch;
pub mod region;
pub mod remote;
pub mod uffd;

pub use region::{RegionConfig, RegionError, RemoteRegion};

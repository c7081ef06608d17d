//! The remote layer: where pages live off this node, shared by both
//! backends (the kernel agent in [`crate::kmod`] and the userfaultfd
//! regions in [`crate::region`]).
//!
//! - [`conn`]: a thread's reconnecting connection to one memory server.
//! - [`servers`]: the table of servers by one-byte index, and a thread's
//!   connections to them.
//! - [`cluster`]: membership in a cluster: grants, intervals,
//!   invalidations, drain notices.
//! - [`space`]: handle spaces (handles name copies, never addresses).
//! - [`book`]: grants and runs (which server holds each handle).
//! - [`journal`]: the book's runs kept on tmpfs, for a restarted kernel
//!   agent.
//! - [`homes`]: [`Homes`], the store a backend uses: take handles, place a
//!   batch, record it, find a handle's server, free copies.
//! - [`seal`]: pages sealed (encrypted and authenticated) for servers
//!   that are not trusted with them.
//! - [`stripe`]: erasure-coded stripes: their layout and codec.
//! - [`read`]: degraded reads: another copy, or a page rebuilt from its
//!   stripe.
//! - [`drain`]: moving a store's runs off a server being drained (and
//!   rebuilding those of a server gone).
//! - [`errors`]: what went wrong talking to servers, by reason, for
//!   `/metrics`.

pub mod book;
pub mod cluster;
pub mod conn;
pub mod drain;
pub mod errors;
pub mod homes;
pub(crate) mod journal;
pub mod read;
pub mod seal;
pub mod servers;
pub mod space;
pub mod stripe;

pub use cluster::{Cluster, ClusterConfig, ClusterError};
pub use conn::{DEFAULT_FAILOVER_AFTER, DEFAULT_FAULT_TIMEOUT, RemoteConn, thread_config};
pub use homes::{Home, Homes, Piece, Source};
pub use servers::{MAX_SERVERS, Remotes, Servers};

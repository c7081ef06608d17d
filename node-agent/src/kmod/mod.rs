//! The kernel backend: drives `rmem.ko` through `/dev/rmem`.
//!
//! - [`uapi`]: the ioctl structures (mirror of `kmod/include/uapi/rmem.h`).
//! - [`device`]: safe wrappers around the ioctls.
//! - [`damon`]: which pages are cold, from DAMON.
//! - [`budget`]: a process's memory budget: what is in RAM, and which
//!   regions go first when it holds too much.
//! - [`daemon`]: the [`Supervisor`](daemon::Supervisor): attached processes
//!   and the loop that evicts their cold pages (`rmem-agent kernel|serve`).
//! - [`attached`]: the daemon's record of its attachments (budget,
//!   redundancy), so that a restarted daemon takes them over.
//! - [`admin`]: `rmem-agent serve`'s gRPC admin API on a Unix socket.
//! - [`config`]: `rmem-agent serve`'s configuration.
//! - [`service`]: [`KernelAgent`], which serves the module's fetch requests
//!   and freed handles and evicts ranges on request, over the shared
//!   remote layer ([`crate::remote::Homes`]).

pub mod admin;
pub mod attached;
pub mod budget;
pub mod config;
pub mod daemon;
pub mod damon;
pub mod device;
pub mod service;
pub mod uapi;

pub use device::{Device, FetchReply};
pub use service::{KernelAgent, KernelConfig, KernelError, KernelStats};

//! Client library for rmem memory servers, used by the node agent, the admin
//! CLI, the tests and the benchmarks.
//!
//! - [`BlockingConnection`]: one TCP connection, one request at a time, no
//!   runtime and no thread hand-offs. The page-fault path uses it: the
//!   faulting thread sends the request and reads the reply itself.
//! - [`Connection`]: one TCP connection shared by many tasks; requests are
//!   pipelined and answered out of order by request id.
//! - [`Client`]: a pool of [`Connection`]s with request timeouts, retries
//!   and reconnection with exponential backoff.
//! - [`DataConnection`]: a blocking connection over TCP or RDMA (feature
//!   `rdma`: one-sided READs for GET, WRITEs plus a checked commit for
//!   PUT), behind the one [`PageTransport`] interface.
//!
//! - [`control`]: the coordinator's gRPC control plane (membership,
//!   placement, intervals, invalidation) and a member session.
//!
//! Every page received is checked against its CRC32C before it is handed
//! over; a mismatch is an error, never data.

mod blocking;
mod caps;
mod config;
mod conn;
pub mod control;
mod error;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod grpc_tls;
mod leader;
mod locations;
mod pool;
#[cfg(feature = "rdma")]
mod rdma;
mod transport;

pub use blocking::{BlockingConnection, Locate};
pub use caps::Capabilities;
pub use config::{ClientConfig, ClientTls, TlsSource, Transport};
pub use conn::Connection;
pub use error::ClientError;
pub use locations::LocationCache;
pub use pool::Client;
#[cfg(feature = "rdma")]
pub use rdma::RdmaConnection;
pub use rmem_proto::wire::{PAGE_SIZE, Page, PageStatus, Stat};
pub use transport::{DataConnection, PageTransport, Pending};

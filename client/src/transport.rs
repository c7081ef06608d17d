//! One interface for every data-plane operation, whatever carries it.
//!
//! [`PageTransport`] is what the agent's fault handlers and evictor call;
//! [`DataConnection`] is a connection over TCP ([`BlockingConnection`]) or
//! RDMA (`RdmaConnection`, with the `rdma` feature), chosen per server by
//! [`ClientConfig::transport`]: `auto` takes RDMA when the server offers it
//! and a local device reaches the server, TCP otherwise; `rdma` insists.

use rmem_proto::wire::{Limits, Page, PageStatus, Stat};

use crate::{BlockingConnection, ClientConfig, ClientError, Transport};

/// The data-plane operations, with the same meaning on every transport.
pub trait PageTransport {
    /// Stores pages; one status per page. `ok` means the server holds
    /// exactly these bytes (checked against their checksum).
    fn put(&mut self, pages: &[(u64, &Page)]) -> Result<Vec<PageStatus>, ClientError>;
    /// Fetches pages into `out` (one slot per handle), each checked
    /// against its checksum; one status per page.
    fn get(&mut self, handles: &[u64], out: &mut [Page]) -> Result<&[PageStatus], ClientError>;
    /// Frees pages; one status per page.
    fn free(&mut self, handles: &[u64]) -> Result<Vec<PageStatus>, ClientError>;
    /// The server's usage as seen by this tenant.
    fn stat(&mut self) -> Result<Stat, ClientError>;
    /// Limits the server announced.
    fn limits(&self) -> Limits;
    /// The server's pool identity.
    fn server_id(&self) -> u64;
    /// The server's address.
    fn addr(&self) -> &str;
}

/// Implements [`PageTransport`] with a connection's own methods of the
/// same names.
macro_rules! page_transport {
    ($t:ty) => {
        impl PageTransport for $t {
            fn put(&mut self, pages: &[(u64, &Page)]) -> Result<Vec<PageStatus>, ClientError> {
                <$t>::put(self, pages)
            }
            fn get(
                &mut self,
                handles: &[u64],
                out: &mut [Page],
            ) -> Result<&[PageStatus], ClientError> {
                <$t>::get(self, handles, out)
            }
            fn free(&mut self, handles: &[u64]) -> Result<Vec<PageStatus>, ClientError> {
                <$t>::free(self, handles)
            }
            fn stat(&mut self) -> Result<Stat, ClientError> {
                <$t>::stat(self)
            }
            fn limits(&self) -> Limits {
                <$t>::limits(self)
            }
            fn server_id(&self) -> u64 {
                <$t>::server_id(self)
            }
            fn addr(&self) -> &str {
                <$t>::addr(self)
            }
        }
    };
}

page_transport!(BlockingConnection);
#[cfg(feature = "rdma")]
page_transport!(crate::RdmaConnection);

/// A connection over whichever transport was chosen.
// A few per thread and server, made once: their size does not matter, and
// boxing the TCP variant would put a pointer chase on every fault.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum DataConnection {
    Tcp(BlockingConnection),
    #[cfg(feature = "rdma")]
    Rdma(Box<crate::RdmaConnection>),
}

/// A GET or PUT sent and not answered yet ([`DataConnection::get_start`],
/// [`DataConnection::put_start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// On the wire, with this request id.
    Sent(u64),
    /// Not sent: a one-sided transport reads when the answer is asked for.
    Later,
}

impl DataConnection {
    /// Starts a GET of `handles` without waiting: TCP sends the request
    /// (several servers then work on theirs at once); RDMA reads the pages
    /// in [`Self::get_finish`]. Nothing else may be sent on this connection
    /// before `get_finish`.
    pub fn get_start(&mut self, handles: &[u64]) -> Result<Pending, ClientError> {
        match self {
            Self::Tcp(c) => c.get_start(handles).map(Pending::Sent),
            #[cfg(feature = "rdma")]
            Self::Rdma(_) => Ok(Pending::Later),
        }
    }

    /// Starts a PUT of `pages` without waiting, as [`Self::get_start`]
    /// does a GET.
    pub fn put_start(&mut self, pages: &[(u64, &Page)]) -> Result<Pending, ClientError> {
        match self {
            Self::Tcp(c) => c.put_start(pages).map(Pending::Sent),
            #[cfg(feature = "rdma")]
            Self::Rdma(_) => Ok(Pending::Later),
        }
    }

    /// The answer to the PUT `pending` started (the same `pages`): as
    /// [`PageTransport::put`].
    pub fn put_finish(
        &mut self,
        pending: Pending,
        pages: &[(u64, &Page)],
    ) -> Result<Vec<PageStatus>, ClientError> {
        match (self, pending) {
            (Self::Tcp(c), Pending::Sent(id)) => c.put_finish(id, pages.len()),
            (c, _) => c.put(pages),
        }
    }

    /// The answer to the GET `pending` started: as [`PageTransport::get`].
    pub fn get_finish(
        &mut self,
        pending: Pending,
        handles: &[u64],
        out: &mut [Page],
    ) -> Result<&[PageStatus], ClientError> {
        match (self, pending) {
            (Self::Tcp(c), Pending::Sent(id)) => c.get_finish(id, handles, out),
            (c, _) => c.get(handles, out),
        }
    }

    /// Connects with the transport `cfg` asks for.
    pub fn connect(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let tcp = BlockingConnection::connect(cfg)?;
        match cfg.transport {
            Transport::Tcp => Ok(Self::Tcp(tcp)),
            Transport::Rdma => Self::rdma(tcp, cfg),
            Transport::Auto if !tcp.offers_rdma() => Ok(Self::Tcp(tcp)),
            Transport::Auto => Self::auto(tcp, cfg),
        }
    }

    #[cfg(feature = "rdma")]
    fn rdma(tcp: BlockingConnection, cfg: &ClientConfig) -> Result<Self, ClientError> {
        crate::RdmaConnection::upgrade(tcp, cfg).map(|c| Self::Rdma(Box::new(c)))
    }

    #[cfg(not(feature = "rdma"))]
    fn rdma(_: BlockingConnection, _: &ClientConfig) -> Result<Self, ClientError> {
        Err(ClientError::RdmaNotBuilt)
    }

    /// RDMA if it can be set up, else TCP on a fresh connection (a failed
    /// setup may leave the first one in an unknown state).
    fn auto(tcp: BlockingConnection, cfg: &ClientConfig) -> Result<Self, ClientError> {
        match Self::rdma(tcp, cfg) {
            Ok(c) => Ok(c),
            Err(ClientError::RdmaNotBuilt) => BlockingConnection::connect(cfg).map(Self::Tcp),
            // Setting up RDMA failed (no device reaches the server, the
            // locked-memory limit, the server could not make a queue pair):
            // TCP still works. Network errors are the caller's to retry.
            Err(
                e @ (ClientError::RdmaNotOffered { .. }
                | ClientError::Rejected {
                    code: rmem_proto::wire::ErrorCode::RdmaUnavailable,
                    ..
                }),
            ) => Self::fall_back(cfg, &e),
            #[cfg(feature = "rdma")]
            Err(e @ ClientError::Rdma { .. }) => Self::fall_back(cfg, &e),
            Err(e) => Err(e),
        }
    }

    fn fall_back(cfg: &ClientConfig, e: &ClientError) -> Result<Self, ClientError> {
        tracing::warn!(addr = %cfg.addr, error = %rmem_common::error_chain(e), "RDMA unavailable; using TCP");
        BlockingConnection::connect(cfg).map(Self::Tcp)
    }

    /// Which transport this connection uses.
    pub fn transport(&self) -> Transport {
        match self {
            Self::Tcp(_) => Transport::Tcp,
            #[cfg(feature = "rdma")]
            Self::Rdma(_) => Transport::Rdma,
        }
    }
}

/// Forwards a call to the connection inside.
macro_rules! each {
    ($self:ident, $c:ident => $e:expr) => {
        match $self {
            DataConnection::Tcp($c) => $e,
            #[cfg(feature = "rdma")]
            DataConnection::Rdma($c) => $e,
        }
    };
}

impl PageTransport for DataConnection {
    fn put(&mut self, pages: &[(u64, &Page)]) -> Result<Vec<PageStatus>, ClientError> {
        each!(self, c => c.put(pages))
    }
    fn get(&mut self, handles: &[u64], out: &mut [Page]) -> Result<&[PageStatus], ClientError> {
        each!(self, c => c.get(handles, out))
    }
    fn free(&mut self, handles: &[u64]) -> Result<Vec<PageStatus>, ClientError> {
        each!(self, c => c.free(handles))
    }
    fn stat(&mut self) -> Result<Stat, ClientError> {
        each!(self, c => c.stat())
    }
    fn limits(&self) -> Limits {
        each!(self, c => c.limits())
    }
    fn server_id(&self) -> u64 {
        each!(self, c => c.server_id())
    }
    fn addr(&self) -> &str {
        each!(self, c => c.addr())
    }
}

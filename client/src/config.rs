//! What a client connects with.

use std::time::Duration;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the server's data plane.
    pub addr: String,
    pub tenant: String,
    pub credential: Vec<u8>,
    /// Identifies this compute node in the server's logs.
    pub node_id: u64,
    pub connect_timeout: Duration,
    /// Longest a request may take, including retries and reconnects.
    pub request_timeout: Duration,
    /// Connections a [`crate::Client`] keeps open.
    pub connections: usize,
    /// First delay between reconnection attempts; doubled up to
    /// `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long a [`crate::BlockingConnection`] polls the socket for a reply
    /// before it blocks. Zero (the default) blocks at once; a few tens of
    /// microseconds save the thread wake-up (tens of microseconds on a VM)
    /// when replies come fast, at the price of a busy core meanwhile.
    pub spin: Duration,
    /// Which data-plane transport to use.
    pub transport: Transport,
    /// The RDMA device to use (e.g. `mlx5_0`); by default the one whose
    /// port has the address the TCP connection leaves from.
    pub rdma_device: Option<String>,
    /// Where this server's pages are, for RDMA READs; shared by every
    /// connection made from clones of this configuration.
    pub locations: std::sync::Arc<crate::LocationCache>,
    /// Mutual TLS to the server (none: plain TCP).
    pub tls: Option<ClientTls>,
    /// Capabilities to hand the server (an agent in a cluster): shared by
    /// every connection made from clones of this configuration.
    pub capabilities: Option<std::sync::Arc<crate::Capabilities>>,
}

/// A client's TLS: its rustls configuration (its certificate, the cluster
/// CA, servers checked for the server role; see
/// [`rmem_common::tls::data`]), and which server it means.
#[derive(Clone)]
pub struct ClientTls {
    pub config: TlsSource,
    /// The server's name as the coordinator gave it: its certificate must
    /// name it. `None` accepts any memory server of the cluster (tools
    /// given only an address).
    pub server: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Where a client's rustls configuration comes from.
#[derive(Clone, Debug)]
pub enum TlsSource {
    /// Made once.
    Fixed(std::sync::Arc<rustls::ClientConfig>),
    /// Rebuilt when the member's TLS files change (a renewed certificate,
    /// a rotated CA): each new connection takes the current one.
    Reloading(rmem_common::tls::reload::Cached<std::sync::Arc<rustls::ClientConfig>>),
}

impl TlsSource {
    /// The configuration for a connection made now.
    pub fn get(&self) -> std::sync::Arc<rustls::ClientConfig> {
        match self {
            Self::Fixed(c) => c.clone(),
            Self::Reloading(c) => c.get(),
        }
    }
}

impl ClientTls {
    /// Checks a finished handshake's peer against [`Self::server`].
    pub(crate) fn check(
        &self,
        addr: &str,
        certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
    ) -> Result<(), crate::ClientError> {
        match &self.server {
            Some(name) => rmem_common::tls::data::expect_server(certs, name).map_err(|message| {
                crate::ClientError::Tls {
                    addr: addr.to_string(),
                    message,
                }
            }),
            None => Ok(()),
        }
    }
}

/// The data-plane transport of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// RDMA when the server offers it and a local device reaches it (and
    /// this build has RDMA support), TCP otherwise.
    #[default]
    Auto,
    /// TCP only.
    Tcp,
    /// RDMA or fail.
    Rdma,
}

impl Transport {
    /// A short stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Tcp => "tcp",
            Transport::Rdma => "rdma",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Transport::Auto),
            "tcp" => Ok(Transport::Tcp),
            "rdma" => Ok(Transport::Rdma),
            other => Err(format!("unknown transport '{other}' (auto, tcp, rdma)")),
        }
    }
}

impl ClientConfig {
    /// Settings for `addr` with tenant `default` and no credential.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            tenant: "default".into(),
            credential: Vec::new(),
            node_id: 0,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            connections: 4,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
            spin: Duration::ZERO,
            transport: Transport::Auto,
            rdma_device: None,
            locations: Default::default(),
            capabilities: None,
            tls: None,
        }
    }

    /// Connects over mutual TLS with `config`, to the server named `server`
    /// (if given).
    pub fn with_tls(
        mut self,
        config: std::sync::Arc<rustls::ClientConfig>,
        server: Option<String>,
    ) -> Self {
        self.tls = Some(ClientTls {
            config: TlsSource::Fixed(config),
            server,
        });
        self
    }

    /// As [`Self::with_tls`], from a source that may reload.
    pub fn with_tls_source(mut self, config: TlsSource, server: Option<String>) -> Self {
        self.tls = Some(ClientTls { config, server });
        self
    }

    /// Sets the tenant and its credential.
    pub fn with_tenant(
        mut self,
        tenant: impl Into<String>,
        credential: impl Into<Vec<u8>>,
    ) -> Self {
        self.tenant = tenant.into();
        self.credential = credential.into();
        // Handles name pages per tenant: another tenant's locations are not
        // these.
        self.locations = Default::default();
        self
    }
}

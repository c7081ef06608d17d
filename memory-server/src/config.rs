//! Typed configuration of `rmem-server`: a TOML file, overridden by flags,
//! validated with messages that name the offending field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rmem_common::ByteSize;
pub use rmem_common::config::ConfigError;
use rmem_common::config::{from_toml_file, invalid, read_token};
use rmem_proto::wire::{MAX_BATCH_PAGES_HARD, MAX_CREDENTIAL_LEN, MAX_TENANT_LEN, PAGE_SIZE};
use serde::{Deserialize, Serialize};

use crate::store::{Backing, StoreOptions, TenantSpec};

/// Default data-plane address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7480";
/// Default admin gRPC address.
pub const DEFAULT_GRPC: &str = "0.0.0.0:7481";

/// How a file-backed pool makes acknowledged pages durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledged pages survive a crash or kill of the server process
    /// (they are in the kernel's page cache); an OS crash may lose the most
    /// recent ones.
    #[default]
    Process,
    /// Every acknowledged page has been flushed to the file (msync): they
    /// survive an OS crash or power loss, at a large cost per PUT.
    Sync,
}

/// A tenant: a name clients log in as, its credential and its quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Name clients present in their handshake.
    pub name: String,
    /// Stable number under which a file-backed pool records the tenant's
    /// pages. Never reuse an id for another tenant.
    pub id: u32,
    /// Credential, inline. Prefer `token_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// File holding the credential (trailing whitespace is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Largest amount of memory the tenant may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<ByteSize>,
}

/// Membership in an rmem cluster (all optional: without `coordinator` the
/// server runs on its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Coordinator endpoint (`host:port`; several replicas'
    /// comma-separated: the one that leads is followed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Member name, unique in the cluster [default: the host name].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Data-plane address agents connect to [default: `listen`, or the
    /// host name and its port when `listen` is a wildcard].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Admin gRPC address operators reach [default: as for `advertise`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_advertise: Option<String>,
    /// Failure domain: a zone, rack or host label shared by servers that
    /// can fail together. The copies of a page go to distinct domains when
    /// enough exist [default: none, the server is a domain of its own].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Cluster token, inline. Prefer `token_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// File holding the cluster token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// When the coordinator does not know the pages stored here (it lost
    /// its state, was restored from an older copy, or is another
    /// cluster's), the server frees none of them on its word. After this
    /// long it accepts the coordinator's view and frees what no interval
    /// covers [default: never; the agents holding the pages free them].
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub adopt_unknown_after: Option<std::time::Duration>,
    /// How long joining keeps trying while the coordinator cannot be
    /// reached (it is restarting, or starts after this server).
    #[serde(with = "humantime_serde")]
    pub join_timeout: std::time::Duration,
}

/// Everything `rmem-server` runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Data-plane TCP address.
    pub listen: SocketAddr,
    /// Run with no TLS although `listen` or `grpc` is reachable beyond
    /// this host (a lab on a trusted network). Without it such a server
    /// refuses to start unless `[tls]` is given.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Admin gRPC address (health, reflection, stats).
    pub grpc: SocketAddr,
    /// Prometheus metrics on `/metrics` at this address (none by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Size of the page pool.
    pub capacity: ByteSize,
    /// Back the pool with this file so pages survive restarts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_file: Option<PathBuf>,
    /// What an acknowledgement guarantees for a file-backed pool.
    pub durability: Durability,
    /// Commit an anonymous pool's memory at start: slower start, RSS at
    /// capacity at once, no page fault on a slot's first PUT (first PUTs
    /// about twice as fast).
    pub prefault: bool,
    /// Offer the RDMA data plane (one-sided READs for GET, WRITEs plus a
    /// checked commit for PUT) beside TCP. Needs a build with the `rdma`
    /// feature, an RDMA device with the address clients connect to, and a
    /// locked-memory limit large enough for the pool.
    pub rdma: bool,
    /// The RDMA device to use (e.g. `mlx5_0`, `rxe0`); by default the one
    /// whose port has the address a client connected to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma_device: Option<String>,
    /// Most pages in one request.
    pub max_batch_pages: u32,
    /// Most simultaneous client connections.
    pub max_connections: u32,
    /// Most connections that have not authenticated yet (HELLO), in total;
    /// more are refused at accept.
    pub max_unauthenticated: u32,
    /// Most connections from one address (an IPv6 /64) that have not
    /// authenticated yet.
    pub max_unauthenticated_per_peer: u32,
    /// Time a client has to complete its handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection with no request for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time a client has to send the rest of a frame it started.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Tenants. With none, a single tenant `default` (id 0) is served, with
    /// the credential from `--token` / `RMEM_TOKEN`, or without
    /// authentication when none is given.
    #[serde(rename = "tenant", skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<TenantConfig>,
    /// Cluster membership.
    #[serde(skip_serializing_if = "ClusterConfig::is_standalone")]
    pub cluster: ClusterConfig,
    /// Mutual TLS on the data plane and the admin gRPC port, and to the
    /// coordinator: the certificate must name a server (`rmemctl pki issue
    /// server NAME`); its name is the member name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<rmem_common::tls::TlsFiles>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            coordinator: None,
            name: None,
            advertise: None,
            grpc_advertise: None,
            domain: None,
            token: None,
            token_file: None,
            adopt_unknown_after: None,
            join_timeout: std::time::Duration::from_secs(60),
        }
    }
}

impl ServerConfig {
    /// What the server listens on, by setting.
    pub fn listens(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut l = vec![("listen", self.listen), ("grpc", self.grpc)];
        l.extend(self.metrics_listen.map(|a| ("metrics_listen", a)));
        l
    }
}

impl ClusterConfig {
    /// No coordinator: the server runs on its own.
    pub fn is_standalone(&self) -> bool {
        self.coordinator.is_none()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            insecure: false,
            grpc: DEFAULT_GRPC.parse().expect("valid default"),
            metrics_listen: None,
            capacity: ByteSize::gib(1),
            pool_file: None,
            durability: Durability::default(),
            prefault: false,
            rdma: false,
            rdma_device: None,
            max_batch_pages: rmem_proto::wire::DEFAULT_MAX_BATCH_PAGES,
            max_connections: 4096,
            max_unauthenticated: 1024,
            max_unauthenticated_per_peer: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            tenants: Vec::new(),
            cluster: ClusterConfig::default(),
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        from_toml_file(path)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let cap = self.capacity.bytes();
        if cap < PAGE_SIZE as u64 || !cap.is_multiple_of(PAGE_SIZE as u64) {
            return Err(invalid(
                "capacity",
                format!(
                    "{} is not a positive multiple of the 4 KiB page size",
                    self.capacity
                ),
            ));
        }
        if cap / PAGE_SIZE as u64 > u64::from(u32::MAX) {
            return Err(invalid("capacity", "at most 16 TiB per server"));
        }
        if self.max_batch_pages == 0 || self.max_batch_pages > MAX_BATCH_PAGES_HARD {
            return Err(invalid(
                "max_batch_pages",
                format!("must be 1..={MAX_BATCH_PAGES_HARD}"),
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        // Both are bounded by max_connections anyway.
        if self.max_unauthenticated == 0 {
            return Err(invalid("max_unauthenticated", "must be at least 1"));
        }
        if self.max_unauthenticated_per_peer == 0 {
            return Err(invalid(
                "max_unauthenticated_per_peer",
                "must be at least 1",
            ));
        }
        for (field, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be longer than 0s"));
            }
        }
        if self.listen == self.grpc && self.listen.port() != 0 {
            return Err(invalid("grpc", "must differ from `listen`"));
        }
        if let Some(m) = self.metrics_listen
            && m.port() != 0
            && (m == self.listen || m == self.grpc)
        {
            return Err(invalid(
                "metrics_listen",
                "must differ from `listen` and `grpc`",
            ));
        }
        if self.prefault && self.pool_file.is_some() {
            return Err(invalid(
                "prefault",
                "applies to an anonymous pool (a pool file is committed as it is written)",
            ));
        }
        if self.rdma && !cfg!(feature = "rdma") {
            return Err(invalid(
                "rdma",
                "this build has no RDMA support (build with `--features rdma`)",
            ));
        }
        if self.rdma_device.is_some() && !self.rdma {
            return Err(invalid("rdma_device", "needs `rdma = true`"));
        }
        if self.durability == Durability::Sync && self.pool_file.is_none() {
            return Err(invalid(
                "durability",
                "`sync` needs a `pool_file` (an anonymous pool has nothing to sync)",
            ));
        }
        let c = &self.cluster;
        if c.coordinator.as_deref() == Some("") {
            return Err(invalid("cluster.coordinator", "must not be empty"));
        }
        if c.token.is_some() && c.token_file.is_some() {
            return Err(invalid(
                "cluster.token",
                "give token or token_file, not both",
            ));
        }
        for (field, v) in [
            ("cluster.name", &c.name),
            ("cluster.advertise", &c.advertise),
            ("cluster.grpc_advertise", &c.grpc_advertise),
            ("cluster.domain", &c.domain),
        ] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > 255)
            {
                return Err(invalid(field, "must be 1 to 255 bytes"));
            }
            if v.as_deref()
                .is_some_and(|v| v.chars().any(char::is_control))
            {
                return Err(invalid(field, "must not contain control characters"));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let field = |f: &str| format!("tenant[{i}].{f}");
            if t.name.is_empty() || t.name.len() > MAX_TENANT_LEN {
                return Err(invalid(
                    field("name"),
                    format!("must be 1..={MAX_TENANT_LEN} bytes"),
                ));
            }
            if !names.insert(&t.name) {
                return Err(invalid(
                    field("name"),
                    format!("`{}` is defined twice", t.name),
                ));
            }
            if !ids.insert(t.id) {
                return Err(invalid(field("id"), format!("{} is used twice", t.id)));
            }
            if t.token.is_some() && t.token_file.is_some() {
                return Err(invalid(
                    field("token"),
                    "give `token` or `token_file`, not both",
                ));
            }
            if let Some(tok) = &t.token
                && (tok.is_empty() || tok.len() > MAX_CREDENTIAL_LEN)
            {
                return Err(invalid(
                    field("token"),
                    format!("must be 1..={MAX_CREDENTIAL_LEN} bytes"),
                ));
            }
            if let Some(q) = t.quota
                && q.bytes() < PAGE_SIZE as u64
            {
                return Err(invalid(field("quota"), "must be at least one 4 KiB page"));
            }
        }
        // Last: a file's other mistakes are named first.
        rmem_common::tls::check_exposure(&self.listens(), self.tls.is_some(), self.insecure)?;
        Ok(())
    }

    /// Number of pages in the pool.
    pub fn capacity_pages(&self) -> u32 {
        (self.capacity.bytes() / PAGE_SIZE as u64) as u32
    }

    /// The store options this configuration asks for.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            capacity_pages: self.capacity_pages(),
            backing: match &self.pool_file {
                Some(p) => Backing::File(p.clone()),
                None => Backing::Anonymous,
            },
            sync_writes: self.durability == Durability::Sync,
            prefault: self.prefault,
        }
    }

    /// Resolves tenants, reading token files. `default_token` is used for
    /// the implicit `default` tenant when none are configured.
    pub fn tenant_specs(
        &self,
        default_token: Option<&str>,
    ) -> Result<Vec<TenantSpec>, ConfigError> {
        if self.tenants.is_empty() {
            return Ok(vec![TenantSpec {
                id: 0,
                name: "default".into(),
                token: default_token.map(|t| t.as_bytes().to_vec()),
                quota_pages: None,
            }]);
        }
        self.tenants
            .iter()
            .map(|t| {
                let token = match (&t.token, &t.token_file) {
                    (Some(tok), _) => Some(tok.as_bytes().to_vec()),
                    (None, Some(path)) => {
                        Some(read_token(&format!("tenant `{}`", t.name), path)?.into_bytes())
                    }
                    (None, None) => None,
                };
                Ok(TenantSpec {
                    id: t.id,
                    name: t.name.clone(),
                    token,
                    quota_pages: t.quota.map(|q| q.bytes() / PAGE_SIZE as u64),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_but_need_tls_or_insecure() {
        let err = ServerConfig::default().validate().unwrap_err().to_string();
        assert!(
            err.contains("`listen`") && err.contains("--insecure"),
            "{err}"
        );
        let mut c = ServerConfig {
            insecure: true,
            ..Default::default()
        };
        c.validate().unwrap();
        c.insecure = false;
        c.tls = Some(rmem_common::tls::TlsFiles::default());
        c.validate().unwrap();
        // Loopback needs neither.
        c.tls = None;
        c.listen = "127.0.0.1:7480".parse().unwrap();
        c.grpc = "[::1]:7481".parse().unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn parses_a_full_file() {
        let cfg: ServerConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            grpc = "127.0.0.1:9001"
            capacity = "64MiB"
            pool_file = "/var/lib/rmem/pool"
            durability = "sync"
            idle_timeout = "5m"
            [[tenant]]
            name = "batch"
            id = 7
            token = "abc"
            quota = "16MiB"
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.capacity_pages(), 16384);
        assert_eq!(cfg.idle_timeout, Duration::from_secs(300));
        let specs = cfg.tenant_specs(None).unwrap();
        assert_eq!(specs[0].quota_pages, Some(4096));
        assert_eq!(specs[0].token.as_deref(), Some(&b"abc"[..]));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = toml::from_str::<ServerConfig>("capacityy = \"1GiB\"").unwrap_err();
        assert!(err.to_string().contains("capacityy"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let check = |cfg: ServerConfig, field: &str| {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{field}`")),
                "{err} does not name {field}"
            );
        };
        check(
            ServerConfig {
                capacity: ByteSize(1000),
                ..Default::default()
            },
            "capacity",
        );
        check(
            ServerConfig {
                max_batch_pages: 0,
                ..Default::default()
            },
            "max_batch_pages",
        );
        check(
            ServerConfig {
                durability: Durability::Sync,
                ..Default::default()
            },
            "durability",
        );
        let t = TenantConfig {
            name: "x".into(),
            id: 1,
            token: None,
            token_file: None,
            quota: None,
        };
        check(
            ServerConfig {
                tenants: vec![t.clone(), TenantConfig { id: 2, ..t.clone() }],
                ..Default::default()
            },
            "tenant[1].name",
        );
        check(
            ServerConfig {
                tenants: vec![
                    t.clone(),
                    TenantConfig {
                        name: "y".into(),
                        ..t
                    },
                ],
                ..Default::default()
            },
            "tenant[1].id",
        );
    }

    #[test]
    fn implicit_default_tenant() {
        let specs = ServerConfig::default().tenant_specs(Some("t0k")).unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].name, "default");
        assert_eq!(specs[0].token.as_deref(), Some(&b"t0k"[..]));
    }
}

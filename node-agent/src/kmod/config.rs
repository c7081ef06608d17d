//! `rmem-agent serve`'s configuration (`/etc/rmem/agent.toml`; see
//! `deploy/rmem-agent.toml`, which documents every field).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rmem_common::config::{ConfigError, from_toml_file, invalid, read_token};
use serde::{Deserialize, Serialize};

/// Everything `rmem-agent serve` runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Data-plane address (`host:port`) of the memory server holding the
    /// evicted pages. Give this or `coordinator`.
    pub server: String,
    /// A cluster's coordinator (`host:port`): pages go to the servers it
    /// grants, and frees go through its invalidations. Give this or
    /// `server`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// File holding the cluster token (with `coordinator`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_token_file: Option<PathBuf>,
    /// The cluster token, inline. Prefer `cluster_token_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_token: Option<String>,
    /// Member name in the cluster; keep it stable, so a restarted agent
    /// takes over its intervals. Default `<hostname>/kmod`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tenant to log in as.
    pub tenant: String,
    /// The tenant's credential, inline. Prefer `token_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// File holding the tenant's credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The admin socket (`rmemctl attach|detach|attachments`).
    pub socket: PathBuf,
    /// Prometheus metrics on `/metrics` at this address (none by default;
    /// beyond loopback only with `[tls]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The module's device.
    pub device: PathBuf,
    /// Threads answering the module's fetch requests.
    pub fault_threads: usize,
    /// A region is cold once DAMON saw no access to it for this long.
    #[serde(with = "humantime_serde")]
    pub min_age: Duration,
    /// Between two rounds of eviction.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Longest one request to the server may take; an eviction whose
    /// request fails is undone, a fetch tries again within `fault_timeout`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a fault waits for a server that does not answer before
    /// the faulting task gets SIGBUS: longer than any stall a server should
    /// survive (keep it below the module's `fault_timeout_ms`).
    #[serde(with = "humantime_serde")]
    pub fault_timeout: Duration,
    /// Copies of each evicted page on distinct servers (`none`,
    /// `replicas=N`); unset: the cluster's default, one copy on one server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redundancy: Option<rmem_common::Redundancy>,
    /// Most bytes a second spent moving pages off drained servers and
    /// rebuilding the copies of gone ones (unset: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild_bandwidth: Option<rmem_common::ByteSize>,
    /// Seal every evicted page for memory servers not trusted with them:
    /// encrypted and authenticated here (AES-256-GCM), its key and tags
    /// kept in the socket's directory (`seal/`, tmpfs) for as long as the
    /// module holds the pages.
    pub seal: bool,
    /// Data-plane transport to the server: `auto` (RDMA when the server
    /// offers it, this build has it and a local device reaches the server;
    /// TCP otherwise), `tcp`, or `rdma` (or fail).
    #[serde(with = "transport_name")]
    pub transport: rmem_client::Transport,
    /// RDMA device to use (e.g. `mlx5_0`, `rxe0`); default: the one whose
    /// address reaches the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma_device: Option<String>,
    /// Mutual TLS to the coordinator and the memory servers: an `agent`
    /// certificate, whose name is the member name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<rmem_common::tls::TlsFiles>,
}

/// `Transport` as its short name in TOML.
mod transport_name {
    use rmem_client::Transport;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(t: &Transport, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Transport, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            server: String::new(),
            coordinator: None,
            cluster_token_file: None,
            cluster_token: None,
            name: None,
            tls: None,
            tenant: "default".into(),
            token: None,
            token_file: None,
            socket: super::admin::DEFAULT_SOCKET.into(),
            metrics_listen: None,
            device: super::device::DEVICE_PATH.into(),
            fault_threads: 2,
            min_age: Duration::from_secs(2),
            interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            fault_timeout: crate::remote::DEFAULT_FAULT_TIMEOUT,
            redundancy: None,
            rebuild_bandwidth: None,
            seal: false,
            transport: rmem_client::Transport::Auto,
            rdma_device: None,
        }
    }
}

impl ServeConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        from_toml_file(path)
    }

    /// Checks every field; reads `token_file` into `token` (validating
    /// again afterwards passes).
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if let Some(addr) = self.metrics_listen
            && !addr.ip().is_loopback()
            && self.tls.is_none()
        {
            return Err(invalid(
                "metrics_listen",
                format!(
                    "{addr} is reachable beyond this host and TLS is off; give the cluster CA, \
                     this agent's certificate and its key ([tls] or --tls-*), or listen on loopback"
                ),
            ));
        }
        match (self.server.is_empty(), &self.coordinator) {
            (true, None) => {
                return Err(invalid(
                    "server",
                    "required: the memory server's host:port (or give coordinator)",
                ));
            }
            (false, Some(_)) => {
                return Err(invalid(
                    "coordinator",
                    "give server or coordinator, not both",
                ));
            }
            (true, Some(c)) if c.is_empty() => {
                return Err(invalid("coordinator", "must be host:port"));
            }
            _ => {}
        }
        if self.coordinator.is_none()
            && (self.cluster_token.is_some() || self.cluster_token_file.is_some())
        {
            return Err(invalid("cluster_token", "only with coordinator"));
        }
        if let Some(path) = &self.cluster_token_file {
            let from_file = read_token("the cluster token", path)?;
            if self.cluster_token.as_ref().is_some_and(|t| *t != from_file) {
                return Err(invalid(
                    "cluster_token",
                    "give cluster_token or cluster_token_file, not both",
                ));
            }
            self.cluster_token = Some(from_file);
        }
        if self
            .name
            .as_ref()
            .is_some_and(|n| n.is_empty() || n.len() > 128)
        {
            return Err(invalid("name", "must be 1 to 128 bytes"));
        }
        if self.tenant.is_empty() || self.tenant.len() > 64 {
            return Err(invalid("tenant", "must be 1 to 64 bytes"));
        }
        if let Some(path) = &self.token_file {
            let from_file = read_token("the tenant credential", path)?;
            if self.token.as_ref().is_some_and(|t| *t != from_file) {
                return Err(invalid("token", "give token or token_file, not both"));
            }
            self.token = Some(from_file);
        }
        if self.socket.as_os_str().is_empty() {
            return Err(invalid("socket", "must not be empty"));
        }
        if !(1..=64).contains(&self.fault_threads) {
            return Err(invalid("fault_threads", "must be between 1 and 64"));
        }
        let ms = Duration::from_millis;
        if !(ms(100)..=Duration::from_secs(86400)).contains(&self.min_age) {
            return Err(invalid("min_age", "must be between 100ms and 1d"));
        }
        if !(ms(100)..=Duration::from_secs(3600)).contains(&self.interval) {
            return Err(invalid("interval", "must be between 100ms and 1h"));
        }
        if !(ms(10)..=Duration::from_secs(600)).contains(&self.request_timeout) {
            return Err(invalid("request_timeout", "must be between 10ms and 10min"));
        }
        if !(ms(100)..=Duration::from_secs(600)).contains(&self.fault_timeout) {
            return Err(invalid("fault_timeout", "must be between 100ms and 10min"));
        }
        if self
            .rdma_device
            .as_ref()
            .is_some_and(|d| d.is_empty() || d.len() > 64 || d.contains('/'))
        {
            return Err(invalid(
                "rdma_device",
                "must be a device name such as mlx5_0",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeConfig, String> {
        let mut c: ServeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../../../deploy/rmem-agent.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.min_age, Duration::from_secs(5));
    }

    #[test]
    fn errors_name_the_field() {
        for (text, field) in [
            ("", "server"),
            ("server = \"m:7480\"\nfault_threads = 0", "fault_threads"),
            ("server = \"m:7480\"\nmin_age = \"1ms\"", "min_age"),
            ("server = \"m:7480\"\ninterval = \"2h\"", "interval"),
            ("server = \"m:7480\"\ntenant = \"\"", "tenant"),
            ("server = \"m:7480\"\nrdma_device = \"../x\"", "rdma_device"),
            (
                "server = \"m:7480\"\ncoordinator = \"c:7470\"",
                "coordinator",
            ),
            ("coordinator = \"\"", "coordinator"),
            (
                "server = \"m:7480\"\ncluster_token = \"t\"",
                "cluster_token",
            ),
            ("coordinator = \"c:7470\"\nname = \"\"", "name"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(&format!("`{field}`")), "{text}: {err}");
        }
        assert!(
            parse("server = \"m:7480\"\nbogus = 1")
                .unwrap_err()
                .contains("bogus")
        );
    }

    #[test]
    fn the_transport_reads_and_prints_as_its_name() {
        let c = parse("server = \"m:7480\"\ntransport = \"tcp\"").unwrap();
        assert_eq!(c.transport, rmem_client::Transport::Tcp);
        assert!(toml::to_string(&c).unwrap().contains("transport = \"tcp\""));
        let err = parse("server = \"m:7480\"\ntransport = \"udp\"").unwrap_err();
        assert!(err.contains("unknown transport 'udp'"), "{err}");
        assert_eq!(
            parse("server = \"m:7480\"").unwrap().transport,
            rmem_client::Transport::Auto
        );
    }

    #[test]
    fn a_token_file_is_read_and_validating_again_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut c = parse(&format!("server = \"m:7480\"\ntoken_file = {path:?}")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.token.as_deref(), Some("s3cret"));
    }
}

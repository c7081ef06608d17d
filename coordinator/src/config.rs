//! Typed configuration of `rmem-coordinator`: a TOML file, overridden by
//! flags, validated with messages that name the offending field.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rmem_common::ByteSize;
pub use rmem_common::config::ConfigError;
use rmem_common::config::{from_toml_file, invalid, read_token};
use serde::{Deserialize, Serialize};

/// Default gRPC address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7470";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rmem/coordinator";

/// A tenant: the name agents allocate for, the credential its servers
/// expect (handed to agents with their grants), and its cluster-wide quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Credential, inline. Prefer `token_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// File holding the credential (trailing whitespace is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Most memory the tenant may be granted over all servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<ByteSize>,
}

impl TenantConfig {
    /// The credential (empty when the tenant has none).
    pub fn credential(&self) -> String {
        self.token.clone().unwrap_or_default()
    }
}

/// The coordinator's state in etcd, shared by its replicas (one leads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs of etcd's members, e.g. `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prefix of rmem's keys (one per cluster sharing an etcd); starts and
    /// ends with `/`.
    pub prefix: String,
    /// The election lease: a leader that cannot renew it for this long is
    /// replaced, and stops serving.
    #[serde(with = "humantime_serde")]
    pub election_ttl: Duration,
    /// This replica's gRPC address as members reach it [default: the
    /// listen address].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// With `https://` endpoints: the CA that signed etcd's certificates
    /// (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// With `https://` endpoints: this replica's client certificate and
    /// key (PEM), for an etcd that checks them (`--client-cert-auth`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            prefix: "/rmem/".into(),
            election_ttl: Duration::from_secs(5),
            advertise: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl EtcdConfig {
    /// Whether etcd is reached over TLS (its first endpoint is https://).
    pub fn tls(&self) -> bool {
        self.endpoints
            .first()
            .is_some_and(|e| e.starts_with("https://"))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "must name at least one etcd"));
        }
        let tls = self.tls();
        let scheme = if tls { "https://" } else { "http://" };
        for e in &self.endpoints {
            let Some(rest) = e.strip_prefix(scheme) else {
                return Err(invalid(
                    "etcd.endpoints",
                    if e.starts_with("http://") || e.starts_with("https://") {
                        format!("`{e}`: every endpoint must use TLS (https://) or none")
                    } else {
                        format!("`{e}` is not a URL like http://HOST:PORT or https://HOST:PORT")
                    },
                ));
            };
            if rest.is_empty() || rest.contains('/') {
                return Err(invalid(
                    "etcd.endpoints",
                    format!("`{e}` is not a URL like {scheme}HOST:PORT"),
                ));
            }
        }
        if tls && self.ca_file.is_none() {
            return Err(invalid(
                "etcd.ca_file",
                "https:// endpoints need the CA that signed etcd's certificates (--etcd-ca)",
            ));
        }
        if !tls && (self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()) {
            return Err(invalid(
                "etcd.endpoints",
                "TLS files are given but the endpoints are http://; use https://",
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(invalid(
                "etcd.cert_file",
                "a client certificate and its key go together (--etcd-cert and --etcd-key)",
            ));
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(invalid(
                "etcd.prefix",
                "must start and end with `/`, e.g. /rmem/",
            ));
        }
        if !(Duration::from_secs(2)..=Duration::from_secs(600)).contains(&self.election_ttl) {
            return Err(invalid("etcd.election_ttl", "must be between 2s and 10m"));
        }
        if self.election_ttl.subsec_nanos() != 0 {
            return Err(invalid(
                "etcd.election_ttl",
                "must be whole seconds (etcd leases are)",
            ));
        }
        Ok(())
    }
}

/// Everything the coordinator runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC address (every service, health and reflection).
    pub listen: SocketAddr,
    /// Prometheus metrics on `/metrics` at this address (none by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Run with no TLS although `listen` is reachable beyond this host (a
    /// lab on a trusted network). Without it such a coordinator refuses to
    /// start unless `[tls]` is given.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Directory of the state log. Ignored with `ephemeral`.
    pub state_dir: PathBuf,
    /// Keep state in memory only (tests, throwaway clusters).
    pub ephemeral: bool,
    /// Keep state in etcd instead of `state_dir`, and run as one of
    /// several replicas, the one etcd elects leading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdConfig>,
    /// How long a member stays up without a heartbeat.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long subscribers have to acknowledge an invalidation when the
    /// caller names no deadline.
    #[serde(with = "humantime_serde")]
    pub invalidation_deadline: Duration,
    /// Longest deadline a caller may ask for.
    #[serde(with = "humantime_serde")]
    pub max_invalidation_deadline: Duration,
    /// How long after its lease lapsed an agent's intervals are invalidated
    /// (servers free its pages) and its grants released. An agent cut off
    /// for longer loses its remote pages. Default: 60s or three leases,
    /// whichever is longer.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub reap_after: Option<Duration>,
    /// How long after its lease lapsed a server still holding grants is
    /// declared gone: agents then rebuild the copies it held on other
    /// servers (a stall shorter than this costs no rebuild). `0s`: only
    /// `rmemctl mark-gone` declares a server gone.
    #[serde(with = "humantime_serde")]
    pub server_gone_after: Duration,
    /// How long a capability the coordinator signs holds. An agent renews
    /// its capabilities when a third of this is left, so a coordinator
    /// unreachable for longer than about two thirds of it stops the
    /// agent's remote reads: keep it well above any outage the control
    /// plane's replicas are expected to ride out.
    #[serde(with = "humantime_serde")]
    pub capability_ttl: Duration,
    /// Largest piece of one allocation placed on one server.
    pub placement_chunk: ByteSize,
    /// The redundancy agents use unless a region or attachment asks for
    /// another: `replicas=2` (every evicted page on two distinct servers,
    /// so losing any one server loses nothing). Agents place fewer copies,
    /// and count the pages at risk, while the cluster has fewer servers.
    pub redundancy: rmem_common::Redundancy,
    /// Records appended before the log is compacted into a snapshot.
    pub compact_after: usize,
    /// Token every gRPC caller must present (`authorization: Bearer ...`),
    /// inline. Prefer `token_file`. Without either, callers are not
    /// authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Mutual TLS on the gRPC port: callers must present a certificate
    /// signed by `ca_file`, whose identity (`spiffe://rmem/ROLE/NAME`)
    /// decides what they may do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<rmem_common::tls::TlsFiles>,
    /// Tenants. With none, agents allocate for `default` with no
    /// credential and no quota.
    #[serde(rename = "tenant", skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<TenantConfig>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            metrics_listen: None,
            insecure: false,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            ephemeral: false,
            etcd: None,
            lease: Duration::from_secs(10),
            invalidation_deadline: Duration::from_secs(5),
            max_invalidation_deadline: Duration::from_secs(60),
            reap_after: None,
            server_gone_after: Duration::from_secs(30),
            capability_ttl: Duration::from_secs(3600),
            placement_chunk: ByteSize::mib(64),
            redundancy: rmem_common::Redundancy::Replicas(2),
            compact_after: 10_000,
            token: None,
            token_file: None,
            tls: None,
            tenants: Vec::new(),
        }
    }
}

impl CoordinatorConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        from_toml_file(path)
    }

    /// Checks every field and reads token files into `token`.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        let ms = Duration::from_millis;
        if !(ms(100)..=Duration::from_secs(3600)).contains(&self.lease) {
            return Err(invalid("lease", "must be between 100ms and 1h"));
        }
        if !(ms(10)..=Duration::from_secs(600)).contains(&self.max_invalidation_deadline) {
            return Err(invalid(
                "max_invalidation_deadline",
                "must be between 10ms and 10min",
            ));
        }
        if self.invalidation_deadline < ms(10)
            || self.invalidation_deadline > self.max_invalidation_deadline
        {
            return Err(invalid(
                "invalidation_deadline",
                "must be at least 10ms and at most max_invalidation_deadline",
            ));
        }
        if self.reap_after.is_some_and(|r| r < self.lease) {
            return Err(invalid("reap_after", "must be at least the lease"));
        }
        if !self.server_gone_after.is_zero() && self.server_gone_after < ms(100) {
            return Err(invalid(
                "server_gone_after",
                "must be 0s (operator only) or at least 100ms",
            ));
        }
        if !(Duration::from_secs(10)..=Duration::from_secs(7 * 86_400))
            .contains(&self.capability_ttl)
        {
            return Err(invalid("capability_ttl", "must be between 10s and 7 days"));
        }
        let chunk = self.placement_chunk.bytes();
        if chunk < 4096 || !chunk.is_multiple_of(4096) {
            return Err(invalid(
                "placement_chunk",
                "must be a positive multiple of 4KiB",
            ));
        }
        if self.compact_after < 16 {
            return Err(invalid("compact_after", "must be at least 16"));
        }
        if let Some(etcd) = &self.etcd {
            if self.ephemeral {
                return Err(invalid("etcd", "give etcd or ephemeral, not both"));
            }
            etcd.validate()?;
        }
        if !self.ephemeral && self.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "must not be empty (or set ephemeral)"));
        }
        // Validating twice (main, then Coordinator::start) must pass: the
        // first pass has put the file's token into `token`, so a token equal
        // to the file's is not a second source.
        if let Some(path) = &self.token_file {
            let from_file = read_token("the cluster token", path)?;
            if self.token.as_ref().is_some_and(|t| *t != from_file) {
                return Err(invalid("token", "give token or token_file, not both"));
            }
            self.token = Some(from_file);
        }
        if self.token.as_deref() == Some("") {
            return Err(invalid("token", "must not be empty"));
        }
        let mut names = BTreeSet::new();
        for (i, t) in self.tenants.iter_mut().enumerate() {
            let field = |f: &str| format!("tenant[{i}].{f}");
            if t.name.is_empty() || t.name.len() > 64 {
                return Err(invalid(field("name"), "must be 1 to 64 bytes"));
            }
            if !names.insert(t.name.clone()) {
                return Err(invalid(
                    field("name"),
                    format!("`{}` appears twice", t.name),
                ));
            }
            if let Some(path) = &t.token_file {
                let from_file = read_token(&format!("tenant `{}`", t.name), path)?;
                if t.token.as_ref().is_some_and(|tok| *tok != from_file) {
                    return Err(invalid(
                        field("token"),
                        "give token or token_file, not both",
                    ));
                }
                t.token = Some(from_file);
            }
            if let Some(q) = t.quota
                && q.bytes() < 4096
            {
                return Err(invalid(field("quota"), "must be at least 4KiB"));
            }
        }
        // Last: a file's other mistakes are named first.
        rmem_common::tls::check_exposure(&self.listens(), self.tls.is_some(), self.insecure)?;
        Ok(())
    }

    /// What the coordinator listens on, by setting.
    pub fn listens(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut l = vec![("listen", self.listen)];
        l.extend(self.metrics_listen.map(|a| ("metrics_listen", a)));
        l
    }

    /// The reaping delay in force.
    pub fn reap_delay(&self) -> Duration {
        self.reap_after
            .unwrap_or_else(|| (3 * self.lease).max(Duration::from_secs(60)))
    }

    /// The delay after which a lapsed server is declared gone, if any.
    pub fn server_gone_after(&self) -> Option<Duration> {
        (!self.server_gone_after.is_zero()).then_some(self.server_gone_after)
    }

    /// Path of the state log.
    pub fn state_log(&self) -> PathBuf {
        self.state_dir.join("state.log")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CoordinatorConfig, String> {
        let mut c: CoordinatorConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn a_full_file_parses() {
        let c = parse(
            r#"
            listen = "127.0.0.1:9000"
            state_dir = "/tmp/x"
            lease = "3s"
            invalidation_deadline = "500ms"
            placement_chunk = "16MiB"
            [[tenant]]
            name = "blue"
            token = "secret"
            quota = "1GiB"
            "#,
        )
        .unwrap();
        assert_eq!(c.lease, Duration::from_secs(3));
        assert_eq!(c.tenants[0].credential(), "secret");
    }

    #[test]
    fn token_files_are_read_and_validating_again_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, tenant) = (dir.path().join("cluster"), dir.path().join("tenant"));
        std::fs::write(&cluster, "c-secret\n").unwrap();
        std::fs::write(&tenant, "t-secret\n").unwrap();
        let mut c = parse(&format!(
            "insecure = true\ntoken_file = {:?}\n[[tenant]]\nname = \"blue\"\ntoken_file = {:?}\n",
            cluster, tenant
        ))
        .unwrap();
        // main validates, then Coordinator::start validates its copy again.
        c.validate().unwrap();
        assert_eq!(c.token.as_deref(), Some("c-secret"));
        assert_eq!(c.tenants[0].credential(), "t-secret");
        // A different inline token beside the file is still two sources.
        c.token = Some("other".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        for (text, field) in [
            ("lease = \"1ms\"", "`lease`"),
            ("invalidation_deadline = \"2h\"", "`invalidation_deadline`"),
            ("placement_chunk = \"1000\"", "`placement_chunk`"),
            (
                "[[tenant]]\nname = \"a\"\n[[tenant]]\nname = \"a\"",
                "`tenant[1].name`",
            ),
            (
                "[[tenant]]\nname = \"a\"\nquota = \"1\"",
                "`tenant[0].quota`",
            ),
            ("[etcd]", "`etcd.endpoints`"),
            ("[etcd]\nendpoints = [\"https://e:2379\"]", "`etcd.ca_file`"),
            (
                "[etcd]\nendpoints = [\"https://e:2379\", \"http://f:2379\"]\nca_file = \"ca\"",
                "`etcd.endpoints`",
            ),
            (
                "[etcd]\nendpoints = [\"http://e:2379\"]\nca_file = \"ca\"",
                "`etcd.endpoints`",
            ),
            (
                "[etcd]\nendpoints = [\"https://e:2379\"]\nca_file = \"ca\"\ncert_file = \"c\"",
                "`etcd.cert_file`",
            ),
            ("[etcd]\nendpoints = [\"e:2379\"]", "`etcd.endpoints`"),
            (
                "[etcd]\nendpoints = [\"http://e:2379\"]\nprefix = \"rmem\"",
                "`etcd.prefix`",
            ),
            (
                "[etcd]\nendpoints = [\"http://e:2379\"]\nelection_ttl = \"2500ms\"",
                "`etcd.election_ttl`",
            ),
            (
                "ephemeral = true\n[etcd]\nendpoints = [\"http://e:2379\"]",
                "`etcd`",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(field), "{text}: {err}");
        }
        assert!(parse("bogus = 1").unwrap_err().contains("bogus"));
        assert!(parse("").unwrap_err().contains("`listen`"));
        let c = parse(
            "insecure = true\n[etcd]\nendpoints = [\"http://10.0.0.1:2379\", \"http://e2:2379\"]",
        )
        .unwrap();
        let etcd = c.etcd.unwrap();
        assert_eq!(
            (etcd.prefix.as_str(), etcd.election_ttl),
            ("/rmem/", Duration::from_secs(5))
        );
        let c = parse(
            "insecure = true\n[etcd]\nendpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"",
        )
        .unwrap();
        assert!(c.etcd.unwrap().tls());
    }
}

//! `rmem-coordinator`: the control-plane daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rmem_common::logging::{self, LogFormat};
use rmem_coordinator::Coordinator;
use rmem_coordinator::config::{ConfigError, CoordinatorConfig};

/// The rmem coordinator: membership, placement, interval registrations and
/// invalidation fan-out for a cluster of memory servers and node agents.
///
/// One coordinator serves a cluster. Its registry (members, intervals,
/// grants) is kept in an append-only log under --state-dir and restored on
/// restart; leases are not, so members have one lease period to heartbeat
/// after a restart. With --etcd the registry is kept in etcd and several
/// replicas run: the one etcd elects serves, the others wait to take over;
/// a replica that loses leadership stops and exits with status 1.
///
/// Examples:
///   rmem-coordinator --state-dir /var/lib/rmem/coordinator
///   rmem-coordinator --listen 127.0.0.1:7470 --ephemeral
///   rmem-coordinator --etcd http://10.0.0.1:2379,http://10.0.0.2:2379 --advertise 10.0.0.5:7470
///   rmem-coordinator --config /etc/rmem/coordinator.toml --check-config
#[derive(Debug, Parser)]
#[command(name = "rmem-coordinator", version, verbatim_doc_comment)]
struct Args {
    /// TOML configuration file (see deploy/rmem-coordinator.toml).
    #[arg(short, long, env = "RMEM_COORDINATOR_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// gRPC address [default: 0.0.0.0:7470].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Serve Prometheus metrics on http://ADDR/metrics (https with the
    /// cluster's mutual TLS; scrapers need a `monitor` certificate)
    /// [default: none].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Directory of the state log [default: /var/lib/rmem/coordinator].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Keep state in memory only: lost on restart.
    #[arg(long)]
    ephemeral: bool,
    /// Keep state in etcd (client URLs, comma-separated) and run as one of
    /// several replicas: the one etcd elects serves, the others wait.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "URL,...",
        conflicts_with = "ephemeral"
    )]
    etcd: Vec<String>,
    /// Prefix of rmem's keys in etcd [default: /rmem/].
    #[arg(long, value_name = "PREFIX")]
    etcd_prefix: Option<String>,
    /// The election lease in etcd: a leader that cannot renew it this long
    /// is replaced, e.g. 5s [default: 5s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    election_ttl: Option<Duration>,
    /// This replica's address as members reach it, published when it leads
    /// [default: the listen address].
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// With https:// etcd endpoints: the CA that signed etcd's
    /// certificates (PEM).
    #[arg(long, value_name = "PATH")]
    etcd_ca: Option<PathBuf>,
    /// With https:// etcd endpoints: this replica's client certificate
    /// (PEM), for an etcd started with --client-cert-auth.
    #[arg(long, value_name = "PATH", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, value_name = "PATH", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// How long a member stays up without a heartbeat, e.g. 10s [default: 10s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    lease: Option<Duration>,
    /// Default time subscribers have to acknowledge an invalidation
    /// [default: 5s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    invalidation_deadline: Option<Duration>,
    /// How long after an agent's lease lapsed its remote pages are freed and
    /// its capacity returned, e.g. 60s [default: 60s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    reap_after: Option<Duration>,
    /// How long after its lease lapsed a server holding grants is declared
    /// gone, so agents rebuild its copies elsewhere; 0s: only
    /// `rmemctl mark-gone` [default: 30s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    server_gone_after: Option<Duration>,
    /// How long a capability the coordinator signs for an agent's handle
    /// space holds (agents renew them as they age), e.g. 1h [default: 1h].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    capability_ttl: Option<Duration>,
    /// Largest piece of one allocation placed on one server, e.g. 64MiB
    /// [default: 64MiB].
    #[arg(long, value_name = "SIZE")]
    placement_chunk: Option<rmem_common::ByteSize>,
    /// Default redundancy of agents' pages: `none`, `replicas=N` or
    /// `ec=K+M` (e.g. ec=4+2) [default: replicas=2].
    #[arg(long, value_name = "POLICY")]
    redundancy: Option<rmem_common::Redundancy>,
    /// File holding the token every caller must present. Without it (or
    /// RMEM_CLUSTER_TOKEN) callers are not authenticated.
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The cluster token, inline (prefer --token-file).
    #[arg(long, env = "RMEM_CLUSTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: rmem_common::tls::TlsArgs,
    /// Run without TLS although listening beyond loopback (a lab on a
    /// network you trust); logged loudly. Without it, TLS is required there.
    #[arg(long)]
    insecure: bool,
    /// Log format on stderr; RUST_LOG sets the level (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Validate the configuration, print it as TOML, and exit.
    #[arg(long)]
    check_config: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] rmem_coordinator::StartError),
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error(
        "stopped serving: this replica no longer leads (its supervisor starts it again as a candidate)"
    )]
    Deposed,
}

fn config(args: &Args) -> Result<CoordinatorConfig, ConfigError> {
    let mut c = match &args.config {
        Some(p) => CoordinatorConfig::from_file(p)?,
        None => CoordinatorConfig::default(),
    };
    if let Some(v) = args.metrics_listen {
        c.metrics_listen = Some(v);
    }
    if let Some(v) = args.listen {
        c.listen = v;
    }
    if let Some(v) = &args.state_dir {
        c.state_dir = v.clone();
    }
    if args.ephemeral {
        c.ephemeral = true;
    }
    if !args.etcd.is_empty() {
        c.etcd.get_or_insert_with(Default::default).endpoints = args.etcd.clone();
    }
    if let Some(p) = &args.etcd_prefix {
        c.etcd.get_or_insert_with(Default::default).prefix = p.clone();
    }
    if let Some(t) = args.election_ttl {
        c.etcd.get_or_insert_with(Default::default).election_ttl = t;
    }
    if let Some(a) = &args.advertise {
        c.etcd.get_or_insert_with(Default::default).advertise = Some(a.clone());
    }
    if let Some(p) = &args.etcd_ca {
        c.etcd.get_or_insert_with(Default::default).ca_file = Some(p.clone());
    }
    if let Some(p) = &args.etcd_cert {
        c.etcd.get_or_insert_with(Default::default).cert_file = Some(p.clone());
    }
    if let Some(p) = &args.etcd_key {
        c.etcd.get_or_insert_with(Default::default).key_file = Some(p.clone());
    }
    if let Some(v) = args.lease {
        c.lease = v;
    }
    if let Some(v) = args.invalidation_deadline {
        c.invalidation_deadline = v;
    }
    if args.reap_after.is_some() {
        c.reap_after = args.reap_after;
    }
    if let Some(v) = args.server_gone_after {
        c.server_gone_after = v;
    }
    if let Some(v) = args.capability_ttl {
        c.capability_ttl = v;
    }
    if let Some(v) = args.placement_chunk {
        c.placement_chunk = v;
    }
    if let Some(v) = args.redundancy {
        c.redundancy = v;
    }
    if args.token.is_some() || args.token_file.is_some() {
        c.token = args.token.clone();
        c.token_file = args.token_file.clone();
    }
    if args.insecure {
        c.insecure = true;
    }
    if let Some(tls) = args.tls.files()? {
        c.tls = Some(tls);
    }
    c.validate()?;
    Ok(c)
}

fn run(args: &Args) -> Result<(), MainError> {
    let cfg = config(args)?;
    if args.check_config {
        let mut shown = cfg.clone();
        shown.token = shown.token.map(|_| "<hidden>".into());
        for t in &mut shown.tenants {
            t.token = t.token.as_ref().map(|_| "<hidden>".into());
        }
        print!("{}", toml::to_string(&shown).expect("config serializes"));
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(MainError::Runtime)?;
    rt.block_on(async {
        let mut stop = std::pin::pin!(rmem_common::shutdown::stop_signal());
        if cfg.etcd.is_some() {
            // A replica is up once it campaigns; it may wait as a standby
            // for as long as another leads (systemd must not time it out).
            rmem_common::notify::ready();
        }
        let c = tokio::select! {
            c = Coordinator::start(&cfg) => c?,
            sig = &mut stop => {
                tracing::info!(signal = %sig, "stopping before this replica was elected");
                return Ok(());
            }
        };
        if cfg.etcd.is_none() {
            rmem_common::notify::ready();
        }
        let deposed = c.deposed();
        tokio::select! {
            sig = stop => {
                rmem_common::notify::stopping();
                tracing::info!(signal = %sig, "stopping");
                c.shutdown().await;
                Ok(())
            }
            _ = deposed.cancelled() => {
                rmem_common::notify::stopping();
                c.shutdown().await;
                Err(MainError::Deposed)
            }
        }
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format, "info");
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("rmem-coordinator: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(match e {
                MainError::Config(_) => 2,
                _ => 1,
            })
        }
    }
}

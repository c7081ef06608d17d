//! `rmem-server`: the memory server daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rmem_common::ByteSize;
use rmem_common::logging::{self, LogFormat};
use rmem_server::Server;
use rmem_server::config::{ConfigError, Durability, ServerConfig};

/// Stores memory pages for rmem compute nodes and serves them over TCP.
///
/// Compute nodes (rmem agents) push cold pages here and fetch them back on
/// the next access. Settings come from an optional TOML file (--config),
/// overridden by flags. The data plane listens on --listen, the admin gRPC
/// endpoint (health, reflection, Stats) on --grpc.
///
/// Examples:
///   rmem-server --capacity 4GiB
///   rmem-server --capacity 64GiB --pool-file /var/lib/rmem/pool --token-file /etc/rmem/token
///   rmem-server --config /etc/rmem/server.toml --check-config
#[derive(Debug, Parser)]
#[command(name = "rmem-server", version, verbatim_doc_comment)]
struct Args {
    /// TOML configuration file (see deploy/rmem-server.toml).
    #[arg(short, long, env = "RMEM_SERVER_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Data-plane address [default: 0.0.0.0:7480].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Admin gRPC address [default: 0.0.0.0:7481].
    #[arg(long, value_name = "ADDR")]
    grpc: Option<SocketAddr>,
    /// Serve Prometheus metrics on http://ADDR/metrics (https with the
    /// cluster's mutual TLS; scrapers need a `monitor` certificate)
    /// [default: none].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Size of the page pool, e.g. 512MiB, 4GiB [default: 1GiB].
    #[arg(long, value_name = "SIZE")]
    capacity: Option<ByteSize>,
    /// Keep the pool in this file so pages survive restarts (created if
    /// missing; an existing file keeps its size, which must match --capacity).
    #[arg(long, value_name = "PATH")]
    pool_file: Option<PathBuf>,
    /// What an acknowledged PUT survives with --pool-file: `process` (a
    /// crash or kill of the server) or `sync` (also an OS crash; slow)
    /// [default: process].
    #[arg(long, value_enum)]
    durability: Option<Durability>,
    /// Commit an anonymous pool's memory at start (no page fault on a
    /// slot's first PUT; RSS is at capacity from the start).
    #[arg(long)]
    prefault: bool,
    /// Offer the RDMA data plane beside TCP (builds with the `rdma`
    /// feature; clients set up queue pairs over their TCP connection).
    #[arg(long)]
    rdma: bool,
    /// RDMA device to use [default: the one with the address clients
    /// connect to].
    #[arg(long, value_name = "NAME")]
    rdma_device: Option<String>,
    /// Most simultaneous client connections [default: 4096].
    #[arg(long, value_name = "N")]
    max_connections: Option<u32>,
    /// Most pages per request [default: 256, at most 1024].
    #[arg(long, value_name = "N")]
    max_batch_pages: Option<u32>,
    /// Credential of the implicit `default` tenant, used when the config
    /// defines no tenants. Without it (or --token-file) clients are not
    /// authenticated.
    #[arg(
        long,
        env = "RMEM_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// File holding the `default` tenant's credential.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Join the cluster of this coordinator (host:port; several replicas'
    /// comma-separated): register, keep a lease, free pages of invalidated
    /// ranges.
    #[arg(long, env = "RMEM_COORDINATOR", value_name = "HOST:PORT[,...]")]
    coordinator: Option<String>,
    /// Member name in the cluster [default: the host name].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Data-plane address agents should connect to [default: --listen, or
    /// the host name and port when --listen is a wildcard].
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Admin gRPC address to advertise [default: as for --advertise].
    #[arg(long, value_name = "HOST:PORT")]
    grpc_advertise: Option<String>,
    /// Failure domain (zone, rack or host label): copies of a page go to
    /// distinct domains when enough exist [default: its own].
    #[arg(long, value_name = "LABEL")]
    domain: Option<String>,
    /// When the coordinator does not know the pages stored here (it lost
    /// its state or is another cluster's), accept its view after this long
    /// and free what none of its intervals covers [default: never].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    adopt_unknown_after: Option<std::time::Duration>,
    /// How long joining the cluster keeps trying while the coordinator
    /// cannot be reached [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    join_timeout: Option<std::time::Duration>,
    /// File holding the cluster token (or set RMEM_CLUSTER_TOKEN).
    #[arg(long, value_name = "PATH")]
    cluster_token_file: Option<PathBuf>,
    #[arg(long, env = "RMEM_CLUSTER_TOKEN", hide_env_values = true, hide = true)]
    cluster_token: Option<String>,
    /// Mutual TLS on the data plane, the admin port and to the coordinator
    /// (a `server` certificate: its name is the member name).
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

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Server(#[from] rmem_server::ServerError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

impl MainError {
    fn exit_code(&self) -> u8 {
        match self {
            MainError::Config(_) | MainError::Server(rmem_server::ServerError::Config(_)) => 2,
            _ => 1,
        }
    }
}

fn effective_config(args: &Args) -> Result<(ServerConfig, Option<String>), ConfigError> {
    let mut cfg = match &args.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => {$(
            if let Some(v) = args.$field.clone() {
                cfg.$field = v.into();
            }
        )*};
    }
    set!(
        listen,
        grpc,
        capacity,
        durability,
        max_connections,
        max_batch_pages
    );
    if let Some(a) = args.metrics_listen {
        cfg.metrics_listen = Some(a);
    }
    if let Some(p) = &args.pool_file {
        cfg.pool_file = Some(p.clone());
    }
    if args.prefault {
        cfg.prefault = true;
    }
    if args.rdma {
        cfg.rdma = true;
    }
    if let Some(d) = &args.rdma_device {
        cfg.rdma_device = Some(d.clone());
    }
    let cluster = &mut cfg.cluster;
    for (field, arg) in [
        (&mut cluster.coordinator, &args.coordinator),
        (&mut cluster.name, &args.name),
        (&mut cluster.advertise, &args.advertise),
        (&mut cluster.grpc_advertise, &args.grpc_advertise),
        (&mut cluster.domain, &args.domain),
        (&mut cluster.token, &args.cluster_token),
    ] {
        if arg.is_some() {
            *field = arg.clone();
        }
    }
    if let Some(d) = args.join_timeout {
        cluster.join_timeout = d;
    }
    if args.adopt_unknown_after.is_some() {
        cluster.adopt_unknown_after = args.adopt_unknown_after;
    }
    if args.cluster_token_file.is_some() {
        cluster.token_file = args.cluster_token_file.clone();
        cluster.token = None;
    }
    if args.insecure {
        cfg.insecure = true;
    }
    if let Some(tls) = args.tls.files()? {
        cfg.tls = Some(tls);
    }
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(rmem_common::config::read_token("tenant `default`", path)?),
        (None, None) => None,
    };
    cfg.validate()?;
    Ok((cfg, token))
}

fn run(args: Args) -> Result<(), MainError> {
    let (cfg, token) = effective_config(&args)?;
    if args.check_config {
        print!(
            "{}",
            toml::to_string_pretty(&cfg).expect("config serializes")
        );
        eprintln!("configuration is valid");
        return Ok(());
    }
    logging::init(args.log_format, "info");
    if cfg.tenants.is_empty() && token.is_none() {
        tracing::warn!("no tenants configured and no --token: clients are not authenticated");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("rmem-server")
        .build()
        .map_err(MainError::Runtime)?;
    runtime.block_on(async {
        let stop = rmem_common::shutdown::stop_signal();
        let server = Server::start(&cfg, token.as_deref()).await?;
        rmem_common::notify::ready();
        let signal = stop.await;
        rmem_common::notify::stopping();
        tracing::info!(%signal, "stopping: draining connections");
        server.shutdown().await?;
        Ok(())
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("rmem-server: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(e.exit_code())
        }
    }
}

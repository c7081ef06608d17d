//! `rmem-agent`: the rmem node agent.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rmem_agent::demo::{self, DemoConfig};
use rmem_common::ByteSize;
use rmem_common::logging::{self, LogFormat};
use rmem_common::tls::TlsFiles;

/// rmem node agent: keeps programs' cold memory on memory servers.
#[derive(Debug, Parser)]
#[command(name = "rmem-agent", version)]
struct Args {
    /// Log format on stderr; RUST_LOG sets the level (default: warn).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(flatten)]
    tls: AgentTls,
    #[command(subcommand)]
    command: Command,
}

/// Mutual TLS to the coordinator and the memory servers: every binary's
/// three flags, the certificate and key from their own variables, so that
/// one environment (a `deploy/local-cluster.sh` DIR/env) serves `rmemctl`
/// as an admin and the agent as an agent.
#[derive(Debug, clap::Args)]
struct AgentTls {
    /// The cluster CA (PEM). With --tls-cert and --tls-key.
    #[arg(long, global = true, env = "RMEM_TLS_CA", value_name = "PATH")]
    tls_ca: Option<std::path::PathBuf>,
    /// This agent's certificate (PEM; `rmemctl pki issue --role agent`): its
    /// name is the member name.
    #[arg(long, global = true, env = "RMEM_AGENT_TLS_CERT", value_name = "PATH")]
    tls_cert: Option<std::path::PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, global = true, env = "RMEM_AGENT_TLS_KEY", value_name = "PATH")]
    tls_key: Option<std::path::PathBuf>,
    /// Certificates the cluster CA revoked (PEM CRLs, e.g. from `rmemctl
    /// pki revoke`): servers and coordinators holding one are refused.
    #[arg(long, global = true, env = "RMEM_TLS_CRL", value_name = "PATH")]
    tls_crl: Option<std::path::PathBuf>,
}

impl AgentTls {
    /// The files, read as every binary's `TlsArgs` reads them (only the
    /// variables the flags fall back on differ).
    fn files(&self) -> Result<Option<TlsFiles>, rmem_common::config::ConfigError> {
        rmem_common::tls::TlsArgs {
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_crl: self.tls_crl.clone(),
        }
        .files()
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show rmem working on this machine: a region 4x larger than its local
    /// budget, a workload that verifies every byte, and a report.
    ///
    /// With no flags an embedded memory server on loopback holds the
    /// evicted pages; --server uses a running rmem-server instead.
    ///
    /// Example: rmem-agent demo --budget 64MiB --size 256MiB --json
    Demo(DemoArgs),
    /// Keep an unmodified process's cold pages on a memory server (or on a
    /// cluster's servers, --coordinator) through the kernel module
    /// (/dev/rmem, rmem.ko).
    ///
    /// Attaches the process, finds cold regions with DAMON (not accessed
    /// for --min-age) and evicts their pages; CPU accesses fault them back.
    /// SIGINT or SIGTERM detach, which brings every page back, and exit.
    /// Needs root (CAP_SYS_ADMIN) and the module loaded.
    ///
    /// Example: rmem-agent kernel --server mem1:7480 --pid 4242 --min-age 5s
    Kernel(KernelArgs),
    /// Run as the node's daemon for the kernel module: keep the cold pages
    /// of the processes `rmemctl attach --pid N` names on a memory server
    /// (--server) or on the servers a cluster grants (--coordinator).
    ///
    /// Serves rmem.agent.v1.AgentAdmin (attach, detach, list) and
    /// grpc.health.v1 on a Unix socket (mode 0600). Settings come from
    /// --config (/etc/rmem/agent.toml; see deploy/rmem-agent.toml), flags
    /// override it. Tells systemd when ready (Type=notify). SIGINT or
    /// SIGTERM detach every process (bringing every page back) and exit.
    /// Needs root (CAP_SYS_ADMIN) and the module loaded.
    ///
    /// Example: rmem-agent serve --server mem1:7480
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(short, long, env = "RMEM_AGENT_CONFIG", value_name = "PATH")]
    config: Option<std::path::PathBuf>,
    /// Data-plane address of the memory server.
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// Keep the pages on the servers this cluster's coordinator grants
    /// instead of on --server.
    #[arg(long, value_name = "HOST:PORT[,...]", conflicts_with = "server")]
    coordinator: Option<String>,
    /// File holding the cluster token (or set RMEM_CLUSTER_TOKEN).
    #[arg(long, value_name = "PATH")]
    cluster_token_file: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics (https with --tls-*;
    /// beyond loopback only with TLS, and scrapers then need a `monitor`
    /// certificate) [default: none].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Member name in the cluster; keep it stable across restarts
    /// [default: HOST/kmod].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Admin socket [default: /run/rmem/agent.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<std::path::PathBuf>,
    /// The module's device [default: /dev/rmem].
    #[arg(long, value_name = "PATH")]
    device: Option<std::path::PathBuf>,
    /// A region is cold once DAMON saw no access to it for this long [default: 2s].
    #[arg(long, value_parser = parse_duration)]
    min_age: Option<std::time::Duration>,
    /// Between two rounds of eviction [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    interval: Option<std::time::Duration>,
    /// Threads answering the module's fetch requests [default: 2].
    #[arg(long, value_name = "N")]
    fault_threads: Option<usize>,
    /// How long a fault waits for a server that does not answer before the
    /// faulting task gets SIGBUS [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    fault_timeout: Option<std::time::Duration>,
    /// Redundancy of each evicted page on distinct servers: `none`,
    /// `replicas=N` (N copies) or `ec=K+M` (stripes of K data and M parity
    /// pages) [default: the cluster's, `none` on one server].
    #[arg(long, value_name = "POLICY")]
    redundancy: Option<rmem_common::Redundancy>,
    /// Most bytes a second spent moving pages off drained servers and
    /// rebuilding the copies of gone ones, e.g. 100MiB [default: no limit].
    #[arg(long, value_name = "SIZE")]
    rebuild_bandwidth: Option<ByteSize>,
    /// Seal every evicted page for memory servers not trusted with them:
    /// encrypted and authenticated here (AES-256-GCM), so a server or
    /// anyone reading its pool sees no plaintext and a page it alters is
    /// refused (read from another copy) instead of returned. Its keys and
    /// tags stay beside the admin socket (tmpfs) while the module holds
    /// the pages.
    #[arg(long)]
    seal: bool,
    /// Tenant to log in as [default: default].
    #[arg(long)]
    tenant: Option<String>,
    /// File holding the tenant's credential.
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    /// Data-plane transport: auto, tcp or rdma [default: auto].
    #[arg(long)]
    transport: Option<rmem_client::Transport>,
    /// RDMA device to use [default: the one that reaches the server].
    #[arg(long, value_name = "NAME")]
    rdma_device: Option<String>,
    /// Attach this process at start (repeatable).
    #[arg(long, value_name = "PID")]
    attach: Vec<i32>,
    /// Validate the configuration, print it as TOML, and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, clap::Args)]
struct KernelArgs {
    /// Data-plane address of the memory server.
    #[arg(
        long,
        value_name = "HOST:PORT",
        required_unless_present = "coordinator"
    )]
    server: Option<String>,
    /// Keep the pages on the servers this cluster's coordinator grants
    /// instead of on --server; frees go through its invalidations.
    #[arg(long, value_name = "HOST:PORT[,...]", conflicts_with = "server")]
    coordinator: Option<String>,
    /// File holding the cluster token (for --coordinator; or set
    /// RMEM_CLUSTER_TOKEN).
    #[arg(long, value_name = "PATH", requires = "coordinator")]
    cluster_token_file: Option<std::path::PathBuf>,
    #[arg(long, env = "RMEM_CLUSTER_TOKEN", hide_env_values = true, hide = true)]
    cluster_token: Option<String>,
    /// Member name in the cluster; keep it stable across restarts, so a
    /// restarted agent takes over its intervals [default: HOST/kmod].
    #[arg(long, value_name = "NAME", requires = "coordinator")]
    name: Option<String>,
    /// The process to attach.
    #[arg(long)]
    pid: i32,
    /// A region is cold once DAMON saw no access to it for this long.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    min_age: std::time::Duration,
    /// Between two rounds of eviction.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: std::time::Duration,
    /// The module's device.
    #[arg(long, default_value = "/dev/rmem")]
    device: std::path::PathBuf,
    /// Threads answering the module's fetch requests.
    #[arg(long, default_value_t = 2)]
    fault_threads: usize,
    /// How long a fault waits for a server that does not answer before the
    /// faulting task gets SIGBUS.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    fault_timeout: std::time::Duration,
    /// Redundancy of each evicted page on distinct servers: `none`,
    /// `replicas=N` (N copies) or `ec=K+M` (stripes of K data and M parity
    /// pages) [default: the cluster's, `none` on one server].
    #[arg(long, value_name = "POLICY")]
    redundancy: Option<rmem_common::Redundancy>,
    /// Most bytes a second spent moving pages off drained servers and
    /// rebuilding the copies of gone ones, e.g. 100MiB [default: no limit].
    #[arg(long, value_name = "SIZE")]
    rebuild_bandwidth: Option<ByteSize>,
    /// Seal every evicted page for memory servers not trusted with them:
    /// encrypted and authenticated here (AES-256-GCM), so a server or
    /// anyone reading its pool sees no plaintext and a page it alters is
    /// refused (read from another copy) instead of returned. Its keys and
    /// tags stay beside the admin socket (tmpfs) while the module holds
    /// the pages.
    #[arg(long)]
    seal: bool,
    /// Tenant to log in as.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Credential of the tenant.
    #[arg(long, env = "RMEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Most of the process's anonymous memory kept in RAM, e.g. 256MiB
    /// (at least 1MiB): over it, its coldest pages are evicted even before
    /// they count as cold [default: no budget, cold pages only].
    #[arg(long)]
    budget: Option<ByteSize>,
    /// Data-plane transport: `auto` (RDMA when the server offers it and
    /// a local device reaches it, else TCP), `tcp`, `rdma`.
    #[arg(long, default_value = "auto")]
    transport: rmem_client::Transport,
    /// RDMA device to use [default: the one that reaches the server].
    #[arg(long, value_name = "NAME")]
    rdma_device: Option<String>,
    /// Print each round's status, and the final one, as JSON lines.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Local memory the region may keep resident.
    #[arg(long, default_value = "64MiB")]
    budget: ByteSize,
    /// Size of the region [default: 4 x budget].
    #[arg(long)]
    size: Option<ByteSize>,
    /// Worker threads of the workload.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Operations in the Zipfian phase.
    #[arg(long, default_value_t = 200_000)]
    ops: u64,
    /// Serve Prometheus metrics of the region on http://ADDR/metrics while
    /// the demo runs (https with --tls-*; beyond loopback only with TLS).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Use this running rmem-server (HOST:PORT) instead of an embedded one.
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// Get capacity from this cluster's coordinator (HOST:PORT; several
    /// replicas' comma-separated) instead: pages are spread over its
    /// servers.
    #[arg(
        long,
        value_name = "HOST:PORT[,...]",
        env = "RMEM_COORDINATOR",
        conflicts_with = "server"
    )]
    coordinator: Option<String>,
    /// File holding the cluster token (for --coordinator; or set
    /// RMEM_CLUSTER_TOKEN).
    #[arg(long, value_name = "PATH", requires = "coordinator")]
    cluster_token_file: Option<std::path::PathBuf>,
    #[arg(long, env = "RMEM_CLUSTER_TOKEN", hide_env_values = true, hide = true)]
    cluster_token: Option<String>,
    /// How long joining the cluster, and each later control call
    /// (allocating capacity, registering a region), keeps trying while no
    /// coordinator leads (restarting, failing over, etcd away).
    #[arg(long, default_value = "60s", value_parser = parse_duration, requires = "coordinator")]
    join_timeout: std::time::Duration,
    /// Tenant to log in as.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Credential of the tenant.
    #[arg(long, env = "RMEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data-plane transport to --server: `auto` (RDMA when the server
    /// offers it and a local device reaches it, else TCP), `tcp`, `rdma`.
    #[arg(long, default_value = "auto")]
    transport: rmem_client::Transport,
    /// RDMA device to use [default: the one that reaches the server].
    #[arg(long, value_name = "NAME")]
    rdma_device: Option<String>,
    /// Most pages fetched ahead of a sequential or strided stream (0: off).
    #[arg(long, default_value_t = 128)]
    prefetch: usize,
    /// Threads serving the region's page faults (faults on different pages
    /// are served in parallel).
    #[arg(long, default_value_t = 2)]
    fault_threads: usize,
    /// How long a fault waits for a server that does not answer; past it
    /// the faulting thread gets SIGBUS. Longer than any stall a server
    /// should survive (see docs/ARCHITECTURE.md, "Stalled or lost").
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    fault_timeout: std::time::Duration,
    /// Redundancy of each evicted page on distinct servers: `none`,
    /// `replicas=N` (N copies) or `ec=K+M` (stripes of K data and M parity
    /// pages) [default: the cluster's, `none` on one server].
    #[arg(long, value_name = "POLICY")]
    redundancy: Option<rmem_common::Redundancy>,
    /// Seal every page for memory servers not trusted with them: each is
    /// encrypted and authenticated here (AES-256-GCM, a key of this run
    /// only) before it leaves, so a server or anyone reading its pool sees
    /// no plaintext, and a page it alters or swaps is refused and read from
    /// another copy (or the fault fails) instead of returning wrong bytes.
    #[arg(long)]
    seal: bool,
    /// Most bytes a second spent moving pages off drained servers and
    /// rebuilding the copies of gone ones, e.g. 100MiB [default: no limit].
    #[arg(long, value_name = "SIZE")]
    rebuild_bandwidth: Option<ByteSize>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Run the workload this many times (0: until SIGINT or SIGTERM, which
    /// end the run after the current round, freeing its pages).
    #[arg(long, default_value_t = 1, value_name = "N")]
    repeat: u64,
    /// Member name in the cluster (with --coordinator) [default: HOST/PID].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

/// Set by SIGINT/SIGTERM when rounds repeat.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM end the run after the current round.
fn stop_after_round() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; sigaction has no other preconditions.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
}

/// The cluster token: read from `file` when given, else `inline` (the
/// RMEM_CLUSTER_TOKEN variable).
fn cluster_token(
    file: Option<&std::path::Path>,
    inline: Option<String>,
) -> Result<Option<String>, rmem_common::config::ConfigError> {
    match file {
        Some(p) => rmem_common::config::read_token("the cluster token", p).map(Some),
        None => Ok(inline),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format, "warn");
    match args.command {
        Command::Demo(d) => {
            let read = || {
                Ok::<_, rmem_common::config::ConfigError>((
                    cluster_token(d.cluster_token_file.as_deref(), d.cluster_token.clone())?,
                    args.tls.files()?.map(|f| f.read()).transpose()?,
                ))
            };
            let (cluster_token, tls) = match read() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("rmem-agent demo: {e}");
                    return ExitCode::from(2);
                }
            };
            let cfg = DemoConfig {
                budget: d.budget,
                size: d.size.unwrap_or(ByteSize(d.budget.bytes() * 4)),
                threads: d.threads,
                ops: d.ops,
                server: d.server,
                coordinator: d.coordinator,
                cluster_name: d.name,
                join_timeout: d.join_timeout,
                cluster_token,
                tenant: d.tenant,
                token: d.token,
                transport: d.transport,
                rdma_device: d.rdma_device,
                prefetch_max: d.prefetch,
                fault_timeout: d.fault_timeout,
                fault_threads: d.fault_threads,
                redundancy: d.redundancy,
                seal: d.seal,
                rebuild_bandwidth: d.rebuild_bandwidth.map(|b| b.bytes()),
                progress: !d.json && demo::stdout_is_terminal(),
                tls,
                metrics_listen: d.metrics_listen,
                ..DemoConfig::default()
            };
            if !d.json {
                eprintln!(
                    "rmem demo: {} region, {} local budget, {} threads",
                    cfg.size, cfg.budget, cfg.threads
                );
            }
            if d.repeat != 1 {
                stop_after_round();
            }
            let mut round = 0;
            loop {
                round += 1;
                let code = run_once(&cfg, d.json, round);
                let done = code != ExitCode::SUCCESS
                    || (d.repeat != 0 && round >= d.repeat)
                    || STOP.load(std::sync::atomic::Ordering::Relaxed);
                if done {
                    return code;
                }
            }
        }
        Command::Kernel(k) => run_kernel(k, &args.tls),
        Command::Serve(a) => run_serve(a, &args.tls),
    }
}

fn serve_config(
    a: &ServeArgs,
    tls: &AgentTls,
) -> Result<rmem_agent::kmod::config::ServeConfig, rmem_common::config::ConfigError> {
    use rmem_agent::kmod::config::ServeConfig;
    let mut c = match &a.config {
        Some(p) => ServeConfig::from_file(p)?,
        None => ServeConfig::default(),
    };
    if let Some(files) = tls.files()? {
        c.tls = Some(files);
    }
    if let Some(v) = a.metrics_listen {
        c.metrics_listen = Some(v);
    }
    if let Some(v) = &a.server {
        c.server = v.clone();
        c.coordinator = None;
    }
    if let Some(v) = &a.coordinator {
        c.coordinator = Some(v.clone());
        c.server.clear();
    }
    if let Some(v) = &a.cluster_token_file {
        c.cluster_token = None;
        c.cluster_token_file = Some(v.clone());
    } else if let Ok(t) = std::env::var("RMEM_CLUSTER_TOKEN")
        && c.cluster_token.is_none()
        && c.cluster_token_file.is_none()
        && c.coordinator.is_some()
    {
        c.cluster_token = Some(t);
    }
    if let Some(v) = &a.name {
        c.name = Some(v.clone());
    }
    if let Some(v) = &a.socket {
        c.socket = v.clone();
    }
    if let Some(v) = &a.device {
        c.device = v.clone();
    }
    if let Some(v) = a.min_age {
        c.min_age = v;
    }
    if let Some(v) = a.interval {
        c.interval = v;
    }
    if let Some(v) = a.fault_threads {
        c.fault_threads = v;
    }
    if let Some(v) = a.fault_timeout {
        c.fault_timeout = v;
    }
    if a.seal {
        c.seal = true;
    }
    if a.redundancy.is_some() {
        c.redundancy = a.redundancy;
    }
    if a.rebuild_bandwidth.is_some() {
        c.rebuild_bandwidth = a.rebuild_bandwidth;
    }
    if let Some(v) = &a.tenant {
        c.tenant = v.clone();
    }
    if let Some(v) = &a.token_file {
        c.token = None;
        c.token_file = Some(v.clone());
    }
    if let Some(v) = a.transport {
        c.transport = v;
    }
    if let Some(v) = &a.rdma_device {
        c.rdma_device = Some(v.clone());
    }
    c.validate()?;
    Ok(c)
}

/// Prints an error and its sources on one line.
fn report(context: &str, e: &dyn std::error::Error) {
    let mut msg = format!("{context}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{msg}");
}

fn run_serve(a: ServeArgs, tls: &AgentTls) -> ExitCode {
    use rmem_agent::kmod::admin::{self, AdminService};
    use rmem_agent::kmod::daemon::{self, DaemonConfig, Supervisor};
    use rmem_agent::kmod::damon::DamonConfig;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let cfg = match serve_config(&a, tls) {
        Ok(c) => c,
        Err(e) => {
            report("rmem-agent serve", &e);
            return ExitCode::from(2);
        }
    };
    if a.check_config {
        let mut shown = cfg.clone();
        shown.token = shown.token.map(|_| "<hidden>".into());
        shown.cluster_token = shown.cluster_token.map(|_| "<hidden>".into());
        print!("{}", toml::to_string(&shown).expect("config serializes"));
        return ExitCode::SUCCESS;
    }
    let tls = match cfg.tls.as_ref().map(|f| f.read()).transpose() {
        Ok(t) => t,
        Err(e) => {
            report("rmem-agent serve", &e);
            return ExitCode::from(2);
        }
    };
    let tls_pem = tls.clone();
    let home = Home {
        tls,
        server: (!cfg.server.is_empty()).then(|| cfg.server.clone()),
        coordinator: cfg.coordinator.clone(),
        cluster_token: cfg.cluster_token.clone(),
        name: cfg.name.clone(),
        tenant: cfg.tenant.clone(),
        token: cfg.token.clone(),
        transport: cfg.transport,
        rdma_device: cfg.rdma_device.clone(),
        rebuild_bandwidth: cfg.rebuild_bandwidth.map(|b| b.bytes()),
    };
    let mut kernel = match home.kernel_config() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("rmem-agent serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    kernel.device = cfg.device.clone();
    // The admin socket's directory, which the service manager owns.
    kernel.state_dir = cfg.socket.parent().map(std::path::Path::to_path_buf);
    kernel.seal = cfg.seal;
    kernel.fault_threads = cfg.fault_threads;
    kernel.request_timeout = cfg.request_timeout;
    kernel.fault_timeout = cfg.fault_timeout;
    kernel.redundancy = cfg.redundancy;
    let dcfg = DaemonConfig {
        kernel,
        damon: DamonConfig {
            min_age: cfg.min_age,
            ..DamonConfig::default()
        },
        interval: cfg.interval,
    };
    let sup = match Supervisor::start(&dcfg) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            report("rmem-agent serve", &e);
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report("rmem-agent serve: cannot start the runtime", &e);
            return ExitCode::FAILURE;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let result: Result<(), String> = rt.block_on(async {
        let stop_signal = rmem_common::shutdown::stop_signal();
        for &pid in &a.attach {
            let sup = sup.clone();
            match tokio::task::spawn_blocking(move || sup.attach(pid, None, None, None))
                .await
                .expect("attach task")
            {
                // Taken over from the agent's last run.
                Ok(_) | Err(rmem_agent::kmod::daemon::SupervisorError::AlreadyAttached(_)) => {}
                Err(e) => return Err(format!("--attach {pid}: {e}")),
            }
        }
        let listener = admin::bind(&cfg.socket).map_err(|e| format!("admin socket: {e}"))?;
        let _metrics = match cfg.metrics_listen {
            Some(addr) => {
                let endpoint = rmem_common::metrics::endpoint::Endpoint::bind(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                let tls = match &tls_pem {
                    Some(pem) => {
                        // Certificates and CRLs reload as the daemons' do.
                        let files = rmem_common::tls::reload::Reloading::new(pem.clone());
                        files.watch();
                        Some(
                            files
                                .cached(rmem_common::metrics::endpoint::tls_config)
                                .map_err(|e| format!("metrics TLS: {e}"))?,
                        )
                    }
                    None => None,
                };
                let sup = sup.clone();
                Some(endpoint.serve(tls, Arc::new(move || rmem_agent::metrics::kernel(&sup))))
            }
            None => None,
        };
        let rounds = {
            let (sup, stop, interval) = (sup.clone(), stop.clone(), cfg.interval);
            std::thread::Builder::new()
                .name("rmem-rounds".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        daemon::pause(interval, &stop);
                        for s in sup.round() {
                            tracing::info!(
                                pid = s.pid,
                                restored = s.restored_pages,
                                "detached an exited process"
                            );
                        }
                    }
                })
                .map_err(|e| format!("cannot start the eviction thread: {e}"))?
        };
        tracing::info!(socket = %cfg.socket.display(), pages = %sup.server(), "agent ready");
        rmem_common::notify::ready();
        let served = admin::serve(listener, AdminService::new(sup.clone()), async {
            let sig = stop_signal.await;
            tracing::info!(signal = %sig, "stopping: detaching every process");
        })
        .await;
        rmem_common::notify::stopping();
        stop.store(true, Ordering::Relaxed);
        let _ = rounds.join();
        served.map_err(|e| format!("admin API: {e}"))
    });
    let _ = std::fs::remove_file(&cfg.socket);
    let done = sup.detach_all();
    let restored: u64 = done.iter().map(|s| s.restored_pages).sum();
    eprintln!(
        "rmem-agent serve: detached {} process{}, {restored} pages brought back",
        done.len(),
        if done.len() == 1 { "" } else { "es" }
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rmem-agent serve: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the kernel agent keeps pages, as the flags or file say.
struct Home {
    tls: Option<rmem_common::tls::TlsPem>,
    server: Option<String>,
    coordinator: Option<String>,
    cluster_token: Option<String>,
    name: Option<String>,
    tenant: String,
    token: Option<String>,
    transport: rmem_client::Transport,
    rdma_device: Option<String>,
    rebuild_bandwidth: Option<u64>,
}

impl Home {
    /// The kernel agent's configuration; joins the cluster when there is one.
    fn kernel_config(self) -> Result<rmem_agent::kmod::KernelConfig, String> {
        use rmem_agent::cluster::{Cluster, ClusterConfig};
        use rmem_agent::kmod::KernelConfig;
        if let Some(coordinator) = self.coordinator {
            let mut cc = ClusterConfig::new(coordinator);
            cc.token = self.cluster_token;
            cc.tenant = self.tenant;
            cc.rebuild_bandwidth = self.rebuild_bandwidth;
            // With TLS the certificate names the agent.
            cc.name = match self.tls {
                Some(_) => self.name,
                None => Some(
                    self.name
                        .unwrap_or_else(|| format!("{}/kmod", rmem_agent::cluster::hostname())),
                ),
            };
            cc.tls = self.tls;
            let cluster = Cluster::connect(&cc).map_err(|e| {
                let mut msg = format!("cannot join the cluster: {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    msg.push_str(&format!(": {s}"));
                    source = s.source();
                }
                msg
            })?;
            return Ok(KernelConfig::in_cluster(cluster));
        }
        let mut client = rmem_client::ClientConfig::new(self.server.unwrap_or_default())
            .with_tenant(self.tenant, self.token.unwrap_or_default().into_bytes());
        client.transport = self.transport;
        client.rdma_device = self.rdma_device;
        if let Some(pem) = &self.tls {
            client = client.with_tls(pem.data_client().map_err(|e| e.to_string())?, None);
        }
        Ok(KernelConfig::new(client))
    }
}

fn run_kernel(k: KernelArgs, tls: &AgentTls) -> ExitCode {
    use rmem_agent::kmod::daemon::{self, DaemonConfig};
    use rmem_agent::kmod::damon::DamonConfig;
    let read = || {
        Ok::<_, rmem_common::config::ConfigError>((
            cluster_token(k.cluster_token_file.as_deref(), k.cluster_token.clone())?,
            tls.files()?.map(|f| f.read()).transpose()?,
        ))
    };
    let (cluster_token, tls) = match read() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rmem-agent kernel: {e}");
            return ExitCode::from(2);
        }
    };
    let home = Home {
        tls,
        server: k.server,
        coordinator: k.coordinator,
        cluster_token,
        name: k.name,
        tenant: k.tenant,
        token: k.token,
        transport: k.transport,
        rdma_device: k.rdma_device,
        rebuild_bandwidth: k.rebuild_bandwidth.map(|b| b.bytes()),
    };
    let mut kernel = match home.kernel_config() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("rmem-agent kernel: {e}");
            return ExitCode::FAILURE;
        }
    };
    kernel.device = k.device;
    kernel.fault_threads = k.fault_threads;
    kernel.fault_timeout = k.fault_timeout;
    kernel.redundancy = k.redundancy;
    kernel.seal = k.seal;
    let cfg = DaemonConfig {
        kernel,
        damon: DamonConfig {
            min_age: k.min_age,
            ..DamonConfig::default()
        },
        interval: k.interval,
    };
    let budget = k.budget.map(|b| b.bytes());
    if budget.is_some_and(|b| b < rmem_agent::kmod::admin::MIN_BUDGET) {
        eprintln!("rmem-agent kernel: --budget must be at least 1MiB");
        return ExitCode::from(2);
    }
    stop_after_round();
    let json = k.json;
    let result = daemon::run(&cfg, k.pid, budget, &STOP, |st| {
        if json {
            println!("{}", serde_json::to_string(st).expect("status serializes"));
        } else {
            eprintln!(
                "rmem-agent kernel: pid {} round {}: {} KiB cold, {} pages evicted, {} fetched, {} freed",
                st.process.pid,
                st.process.rounds,
                st.process.cold_bytes / 1024,
                st.process.evicted_pages,
                st.agent.fetched_pages,
                st.agent.freed_pages
            );
        }
    });
    match result {
        Ok(st) => {
            if json {
                println!("{}", serde_json::to_string(&st).expect("status serializes"));
            } else {
                eprintln!(
                    "rmem-agent kernel: detached from pid {}{}: {} pages brought back",
                    st.process.pid,
                    if st.process.process_exited {
                        " (exited)"
                    } else {
                        ""
                    },
                    st.process.restored_pages
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rmem-agent kernel: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_once(cfg: &DemoConfig, json: bool, round: u64) -> ExitCode {
    match demo::run(cfg) {
        Ok(report) => {
            // One log line per round, for whoever watches a looping demo.
            tracing::info!(
                round,
                verify_ok = report.verify_ok,
                verify_errors = report.verify_errors,
                pages_verified = report.pages_verified,
                pages_evicted = report.pages_evicted,
                pages_fetched = report.pages_fetched,
                faults_degraded = report.faults_degraded,
                faults_failed = report.faults_failed,
                "demo round done"
            );
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report serializes")
                );
            } else {
                print!("{}", demo::render(&report));
            }
            if report.verify_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        Err(e) => {
            let mut msg = format!("rmem-agent demo: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

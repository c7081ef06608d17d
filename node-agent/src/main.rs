//! `rmem-agent`: the rmem node agent.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rmem_agent::demo::{self, DemoConfig};
use rmem_common::ByteSize;
use rmem_common::logging::{self, LogFormat};

/// rmem node agent: keeps programs' cold memory on memory servers.
#[derive(Debug, Parser)]
#[command(name = "rmem-agent", version)]
struct Args {
    /// Log format on stderr; RUST_LOG sets the level (default: warn).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
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
    /// Keep an unmodified process's cold pages on a memory server through
    /// the kernel module (/dev/rmem, rmem.ko).
    ///
    /// Attaches the process, finds cold regions with DAMON (not accessed
    /// for --min-age) and evicts their pages; CPU accesses fault them back.
    /// SIGINT or SIGTERM detach, which brings every page back, and exit.
    /// Needs root (CAP_SYS_ADMIN) and the module loaded.
    ///
    /// Example: rmem-agent kernel --server mem1:7480 --pid 4242 --min-age 5s
    Kernel(KernelArgs),
}

#[derive(Debug, clap::Args)]
struct KernelArgs {
    /// Data-plane address of the memory server.
    #[arg(long)]
    server: String,
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
    /// Tenant to log in as.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Credential of the tenant.
    #[arg(long, env = "RMEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
    /// Use this running rmem-server (HOST:PORT) instead of an embedded one.
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// Get capacity from this cluster's coordinator (HOST:PORT) instead:
    /// pages are spread over its servers.
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "RMEM_COORDINATOR",
        conflicts_with = "server"
    )]
    coordinator: Option<String>,
    /// Cluster token (for --coordinator).
    #[arg(long, env = "RMEM_CLUSTER_TOKEN", hide_env_values = true, hide = true)]
    cluster_token: Option<String>,
    /// Tenant to log in as.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Credential of the tenant.
    #[arg(long, env = "RMEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Most pages fetched ahead of a sequential or strided stream (0: off).
    #[arg(long, default_value_t = 32)]
    prefetch: usize,
    /// Threads serving the region's page faults (faults on different pages
    /// are served in parallel).
    #[arg(long, default_value_t = 2)]
    fault_threads: usize,
    /// How long a fault waits for an unreachable server; past it the
    /// faulting thread gets SIGBUS (e.g. 500ms, 10s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    fault_timeout: std::time::Duration,
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

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format, "warn");
    match args.command {
        Command::Demo(d) => {
            let cfg = DemoConfig {
                budget: d.budget,
                size: d.size.unwrap_or(ByteSize(d.budget.bytes() * 4)),
                threads: d.threads,
                ops: d.ops,
                server: d.server,
                coordinator: d.coordinator,
                cluster_name: d.name,
                cluster_token: d.cluster_token,
                tenant: d.tenant,
                token: d.token,
                prefetch_max: d.prefetch,
                fault_timeout: d.fault_timeout,
                fault_threads: d.fault_threads,
                progress: !d.json && demo::stdout_is_terminal(),
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
                let code = run_once(&cfg, d.json);
                let done = code != ExitCode::SUCCESS
                    || (d.repeat != 0 && round >= d.repeat)
                    || STOP.load(std::sync::atomic::Ordering::Relaxed);
                if done {
                    return code;
                }
            }
        }
        Command::Kernel(k) => run_kernel(k),
    }
}

fn run_kernel(k: KernelArgs) -> ExitCode {
    use rmem_agent::kmod::daemon::{self, DaemonConfig};
    use rmem_agent::kmod::{KernelConfig, damon::DamonConfig};
    let client = rmem_client::ClientConfig::new(k.server)
        .with_tenant(k.tenant, k.token.unwrap_or_default().into_bytes());
    let mut kernel = KernelConfig::new(client);
    kernel.device = k.device;
    kernel.fault_threads = k.fault_threads;
    let cfg = DaemonConfig {
        kernel,
        pid: k.pid,
        damon: DamonConfig {
            min_age: k.min_age,
            ..DamonConfig::default()
        },
        interval: k.interval,
    };
    stop_after_round();
    let json = k.json;
    let result = daemon::run(&cfg, &STOP, |st| {
        if json {
            println!("{}", serde_json::to_string(st).expect("status serializes"));
        } else {
            eprintln!(
                "rmem-agent kernel: pid {} round {}: {} KiB cold, {} pages evicted, {} fetched, {} freed",
                st.pid,
                st.rounds,
                st.cold_bytes / 1024,
                st.evicted_pages,
                st.fetched_pages,
                st.freed_pages
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
                    st.pid,
                    if st.process_exited { " (exited)" } else { "" },
                    st.restored_pages
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

fn run_once(cfg: &DemoConfig, json: bool) -> ExitCode {
    match demo::run(cfg) {
        Ok(report) => {
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

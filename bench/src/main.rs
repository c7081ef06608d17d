//! `rmem-bench`: how close rmem comes to what this machine allows.
//!
//! One run measures the limits (raw TCP round trip and stream, memcpy), the
//! memory server's data plane, and the userspace fault and eviction paths,
//! against an embedded server on loopback or a running one, and prints a
//! table (or one JSON document) with the ratios that matter.

mod dataplane;
mod limits;
mod region;
mod report;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rmem_client::ClientConfig;
use rmem_common::logging::{self, LogFormat};
use rmem_common::{ByteSize, Histogram, Percentiles};
use rmem_server::embedded::{EmbeddedError, EmbeddedServer};
use serde::Serialize;

/// Measure rmem against the limits of this machine.
///
/// With no flags an embedded memory server on loopback is used. The figures
/// are for people: nothing here passes or fails on speed, but every page
/// read is checked and a wrong byte fails the run.
#[derive(Debug, Parser)]
#[command(name = "rmem-bench", version)]
struct Args {
    /// A short run (seconds) that keeps the harness working; figures are
    /// rough.
    #[arg(long)]
    quick: bool,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Use this running rmem-server (HOST:PORT) instead of an embedded one.
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// Tenant to log in as.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Credential of the tenant.
    #[arg(long, env = "RMEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Size of the benchmark region [default: 512MiB, 32MiB with --quick].
    #[arg(long)]
    region_size: Option<ByteSize>,
    /// Log format on stderr; RUST_LOG sets the level (default: warn).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Why a benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error("I/O failed")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Client(#[from] rmem_client::ClientError),
    #[error(transparent)]
    Region(#[from] rmem_agent::RegionError),
    #[error("the server answered `{0}` for a benchmark page")]
    Page(rmem_client::PageStatus),
    #[error("page {page} read back with wrong contents")]
    Verify { page: usize },
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub mean: f64,
    pub count: u64,
}

impl Latency {
    pub fn from_ns(h: &Histogram) -> Self {
        Self::from_percentiles_ns(h.percentiles())
    }

    pub fn from_percentiles_ns(p: Percentiles) -> Self {
        let s = p.scaled(1000.0);
        Self {
            p50: s.p50,
            p99: s.p99,
            p999: s.p999,
            mean: s.mean,
            count: s.count,
        }
    }
}

/// How much work each part does.
struct Plan {
    limits: limits::Effort,
    dataplane: dataplane::Effort,
    region: region::Effort,
}

impl Plan {
    fn new(args: &Args) -> Result<Self, BenchError> {
        let size = args
            .region_size
            .map(|s| s.bytes())
            .unwrap_or(if args.quick { 32 << 20 } else { 512 << 20 });
        if size < (1 << 20) || !size.is_multiple_of(rmem_client::PAGE_SIZE as u64) {
            return Err(BenchError::Invalid {
                field: "region-size",
                reason: "must be a multiple of 4 KiB and at least 1 MiB".into(),
            });
        }
        Ok(if args.quick {
            Plan {
                limits: limits::Effort {
                    stream_for: Duration::from_millis(300),
                    memcpy_rounds: 4,
                },
                dataplane: dataplane::Effort {
                    ops: 2_000,
                    depth_for: Duration::from_millis(300),
                    pages: 2_048,
                },
                region: region::Effort {
                    size,
                    budget: size / 8,
                    random_reads: 1_000,
                },
            }
        } else {
            Plan {
                limits: limits::Effort {
                    stream_for: Duration::from_secs(3),
                    memcpy_rounds: 32,
                },
                dataplane: dataplane::Effort {
                    ops: 50_000,
                    depth_for: Duration::from_secs(3),
                    pages: 16_384,
                },
                region: region::Effort {
                    size,
                    budget: size / 8,
                    random_reads: 20_000,
                },
            }
        })
    }
}

fn run(args: &Args) -> Result<report::Report, BenchError> {
    let plan = Plan::new(args)?;
    let progress = |what: &str| {
        if !args.json {
            eprintln!("rmem-bench: {what}");
        }
    };
    let embedded = match &args.server {
        Some(_) => None,
        // Prefaulted, as a production server would be: first PUTs then
        // measure rmem, not the kernel zeroing fresh anonymous memory.
        None => Some(EmbeddedServer::with_config(
            &rmem_server::config::ServerConfig {
                listen: "127.0.0.1:0".parse().expect("valid address"),
                grpc: "127.0.0.1:0".parse().expect("valid address"),
                capacity: ByteSize(
                    plan.region.size * 2 + (plan.dataplane.pages as u64 * 4096) + (16 << 20),
                ),
                prefault: true,
                ..Default::default()
            },
            1,
        )?),
    };
    let addr = match (&args.server, &embedded) {
        (Some(a), _) => a.clone(),
        (None, Some(e)) => e.data_addr().to_string(),
        (None, None) => unreachable!("embedded server exists when no --server is given"),
    };
    let client = ClientConfig::new(addr.clone()).with_tenant(
        args.tenant.clone(),
        args.token.clone().unwrap_or_default().into_bytes(),
    );

    let mut raw = limits::PingPong::start()?;
    let rtt = Histogram::new();
    progress("data plane: GET/PUT at depth 1 (raw round trips interleaved) and 32, batches");
    let dataplane = dataplane::measure(&client, plan.dataplane, &mut raw, &rtt)?;
    progress("userspace path: eviction, fault-back (raw round trips interleaved), scan");
    let rmem = region::measure(&client, plan.region, &mut raw)?;
    drop(raw);
    progress("limits: raw TCP stream, memcpy");
    let limits = limits::measure(plan.limits, &rtt)?;
    Ok(report::Report::new(
        report::Setup {
            quick: args.quick,
            server: addr,
            embedded_server: embedded.is_some(),
            region_bytes: plan.region.size,
            budget_bytes: plan.region.budget,
        },
        limits,
        dataplane,
        rmem,
    ))
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format, "warn");
    match run(&args) {
        Ok(r) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("report serializes")
                );
            } else {
                print!("{}", report::render(&r));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = format!("rmem-bench: {e}");
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

//! `rmem-bench`: how close rmem comes to what this machine allows.
//!
//! One run measures the limits (raw TCP round trip and stream, memcpy), the
//! memory server's data plane, the userspace fault and eviction paths, and
//! four workloads at four local-memory fractions on rmem and on kernel swap
//! (zram, a file), against an embedded server on loopback or a running
//! one, and prints tables (or one JSON document) with the ratios that
//! matter, and PNG plots with --plots.

mod capcost;
mod dataplane;
mod limits;
mod matrix;
mod metricscost;
mod plot;
mod rebuild;
mod redundancy;
mod region;
mod report;
mod sealcost;
mod swap;
mod workloads;

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
    /// Mutual TLS to a running server (--server): the cluster CA, and an
    /// admin's or agent's certificate and key.
    #[command(flatten)]
    tls: rmem_common::tls::TlsArgs,
    /// Size of the benchmark region [default: 512MiB, 32MiB with --quick].
    #[arg(long)]
    region_size: Option<ByteSize>,
    /// Working set of the workloads [default: 256MiB, 64MiB with --quick].
    #[arg(long)]
    working_set: Option<ByteSize>,
    /// Longest timed phase of one workload cell, e.g. 2s [default: 2s,
    /// 150ms with --quick].
    #[arg(long, value_parser = parse_duration)]
    cell_time: Option<Duration>,
    /// Skip the kernel swap baselines (they need root, and turn swap on
    /// and off while they run).
    #[arg(long)]
    no_swap: bool,
    /// Directory for the swap file of the swap-file baseline (on the disk
    /// to compare with).
    #[arg(long, default_value = "/var/tmp", value_name = "DIR")]
    swap_dir: std::path::PathBuf,
    /// Write PNG plots (slowdown.png, fault-latency.png) into this directory.
    #[arg(long, value_name = "DIR")]
    plots: Option<std::path::PathBuf>,
    /// Log format on stderr; RUST_LOG sets the level (default: warn).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Internal: run one workload as a kernel-swap child process.
    /// Measure only these sections (comma-separated); the limits are
    /// always measured, as the ratios need them.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SECTION")]
    only: Vec<Section>,
    #[arg(long, hide = true, value_name = "SPEC")]
    child: Option<String>,
}

/// A part of the benchmark that `--only` can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// GET/PUT on the memory server's data plane.
    Dataplane,
    /// The userspace path: eviction, fault-back, scans.
    Region,
    /// Each redundancy policy, healthy and with a server gone.
    Redundancy,
    /// Rebuild of a gone server's pages, per policy.
    Rebuild,
    /// The workloads against kernel swap.
    Workloads,
}

impl Args {
    fn runs(&self, s: Section) -> bool {
        self.only.is_empty() || self.only.contains(&s)
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
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
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("page {page} read back with wrong contents")]
    Verify { page: usize },
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{system}: {errors} reads of the {workload} workload found wrong contents")]
    Workload {
        workload: &'static str,
        system: String,
        errors: u64,
    },
    #[error("{system}: the workload process failed")]
    Swap {
        system: String,
        #[source]
        source: std::io::Error,
    },
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
    matrix: matrix::Effort,
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
        let working_set = args
            .working_set
            .map(|s| s.bytes())
            .unwrap_or(if args.quick { 64 << 20 } else { 256 << 20 });
        if working_set < (4 << 20) || !working_set.is_multiple_of(rmem_client::PAGE_SIZE as u64) {
            return Err(BenchError::Invalid {
                field: "working-set",
                reason: "must be a multiple of 4 KiB and at least 4 MiB".into(),
            });
        }
        let matrix = matrix::Effort {
            pages: (working_set / rmem_client::PAGE_SIZE as u64) as usize,
            ops: if args.quick { 200_000 } else { 20_000_000 },
            budget: args.cell_time.unwrap_or(if args.quick {
                Duration::from_millis(150)
            } else {
                Duration::from_secs(2)
            }),
            swap_dir: args.swap_dir.clone(),
            swap: !args.no_swap,
        };
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
                matrix,
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
                matrix,
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
                    (plan.region.size * 2).max((plan.matrix.pages * 4096) as u64)
                        + (plan.dataplane.pages as u64 * 4096)
                        + (16 << 20),
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
    let mut client = ClientConfig::new(addr.clone()).with_tenant(
        args.tenant.clone(),
        args.token.clone().unwrap_or_default().into_bytes(),
    );
    // A running server on mutual TLS: an admin's (or agent's) certificate.
    if args.server.is_some()
        && let Some(files) = args
            .tls
            .files()
            .map_err(|e| BenchError::Tls(e.to_string()))?
    {
        let pem = files.read().map_err(|e| BenchError::Tls(e.to_string()))?;
        let config = pem
            .data_client()
            .map_err(|e| BenchError::Tls(e.to_string()))?;
        client = client.with_tls(config, None);
    }

    let mut raw = limits::PingPong::start()?;
    let rtt = Histogram::new();
    let dataplane = if args.runs(Section::Dataplane) {
        progress("data plane: GET/PUT at depth 1 (raw round trips interleaved) and 32, batches");
        Some(dataplane::measure(&client, plan.dataplane, &mut raw, &rtt)?)
    } else {
        for _ in 0..plan.dataplane.ops {
            rtt.record_duration(raw.round_trip()?);
        }
        None
    };
    // TLS's cost: against an embedded server of the bench's own (a running
    // server's TLS is its operator's).
    let dataplane_tls = if args.runs(Section::Dataplane) && embedded.is_some() {
        progress("data plane over mutual TLS: the same, against a TLS server");
        Some(dataplane::measure_tls(&client, plan.dataplane, &mut raw)?)
    } else {
        None
    };
    // Capabilities' cost: a server session's GET batches with and without.
    let capabilities = if args.runs(Section::Dataplane) {
        progress("capabilities: a server session's GET batches, checked and not");
        Some(capcost::measure(if args.quick { 5_000 } else { 50_000 })?)
    } else {
        None
    };
    // The costs of sealing and of metrics are measured on half the
    // region section's region, in alternating rounds.
    let half = region::Effort {
        size: plan.region.size / 2,
        budget: plan.region.budget / 2,
        random_reads: plan.region.random_reads / 2,
    };
    // Sealing's cost: the agent's cipher, and the userspace path sealed
    // and not.
    let seal = if args.runs(Section::Region) {
        progress("sealing: the cipher per page, then eviction and faults sealed and plain");
        Some(sealcost::measure(&client, half, 2)?)
    } else {
        None
    };
    // Metrics' cost: the userspace path's faults with a scraper rendering
    // the region's exposition every 10 ms, and without (alternating).
    let metrics = if args.runs(Section::Region) {
        progress("metrics: fault-back latency scraped every 10 ms and not");
        Some(metricscost::measure(&client, half, 2)?)
    } else {
        None
    };
    let rmem = if args.runs(Section::Region) {
        progress("userspace path: eviction, fault-back (raw round trips interleaved), scan");
        Some(region::measure(&client, plan.region, &mut raw)?)
    } else {
        None
    };
    drop(raw);
    progress("limits: raw TCP stream, memcpy");
    let limits = limits::measure(plan.limits, &rtt)?;
    let redundancy = if args.runs(Section::Redundancy) {
        progress("redundancy: none, replicas=2 and ec=4+2 on six servers, then one server gone");
        Some(redundancy::measure(plan.region)?)
    } else {
        None
    };
    let rebuild = if args.runs(Section::Rebuild) {
        progress("rebuild: replicas=2 and ec=4+2, a server of seven declared gone");
        Some(rebuild::measure(plan.region)?)
    } else {
        None
    };
    let workloads = if args.runs(Section::Workloads) {
        Some(matrix::measure(&client, &plan.matrix, &progress)?)
    } else {
        None
    };
    let mut report = report::Report::new(
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
        redundancy,
        rebuild,
        workloads,
    );
    report.set_dataplane_tls(dataplane_tls);
    report.capabilities = capabilities;
    report.seal = seal;
    report.metrics = metrics;
    Ok(report)
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format, "warn");
    if let Some(spec) = &args.child {
        return match swap::child_main(spec) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rmem-bench --child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(r) => {
            if let Some(dir) = &args.plots {
                match plot::write(&r, dir) {
                    Ok(files) => {
                        for f in files {
                            eprintln!("rmem-bench: wrote {}", f.display());
                        }
                    }
                    Err(e) => {
                        eprintln!("rmem-bench: no plots: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
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

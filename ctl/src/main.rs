//! `rmemctl`: administer an rmem cluster through its coordinator.

mod agent;
mod pki;
mod table;
mod views;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use rmem_client::control::{ControlClient, ControlError};
use rmem_proto::admin::v1::server_admin_client::ServerAdminClient;
use rmem_proto::control::v1 as pb;
use serde::Serialize;

use crate::table::{Table, pages};
use crate::views::{
    GrantView, IntervalView, InvalidateView, MemberView, OpView, ServerStatsView, StatsView,
    StatusView,
};

/// Administer an rmem cluster: members, placements, intervals and
/// invalidations through the coordinator's gRPC API (--endpoint); and, on a
/// compute node, the processes its kernel agent manages, through the
/// agent's local socket (attach, detach, attachments; --agent).
///
/// Examples:
///   rmemctl status
///   rmemctl --endpoint coord:7470 servers --output json
///   rmemctl intervals --agent 4
///   rmemctl invalidate --space node1/4242 --start 0x7f0000000000 --length 1GiB
///   rmemctl drain mem-03
///   rmemctl attach --pid 4242 --budget 512MiB   (on a compute node, as root)
///   rmemctl completions bash > /etc/bash_completion.d/rmemctl
#[derive(Debug, Parser)]
#[command(name = "rmemctl", version, verbatim_doc_comment)]
struct Args {
    /// Coordinator endpoint, host:port or URL; several replicas'
    /// comma-separated (calls follow the one that leads).
    #[arg(
        long,
        short,
        global = true,
        env = "RMEM_ENDPOINT",
        default_value = "127.0.0.1:7470"
    )]
    endpoint: String,
    /// File holding the cluster token (or set RMEM_CLUSTER_TOKEN).
    #[arg(long, global = true, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    #[arg(
        long,
        global = true,
        env = "RMEM_CLUSTER_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    token: Option<String>,
    #[command(flatten)]
    tls: rmem_common::tls::TlsArgs,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// How long to wait for the coordinator, e.g. 3s.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Cluster summary: servers and agents by state, capacity, intervals.
    Status,
    /// Memory servers and their capacity.
    Servers,
    /// Node agents.
    Agents,
    /// Interval registrations.
    Intervals {
        /// Only intervals this member owns or subscribes to.
        #[arg(long, value_name = "ID")]
        agent: Option<u64>,
        /// Only this address space.
        #[arg(long, value_name = "NAME")]
        space: Option<String>,
    },
    /// Capacity granted to agents.
    Grants {
        #[arg(long, value_name = "ID")]
        agent: Option<u64>,
        #[arg(long, value_name = "ID")]
        server: Option<u64>,
    },
    /// Invalidate a range of an address space: every subscriber of an
    /// overlapping interval drops it (servers free the pages). Waits for all
    /// acknowledgements; subscribers that do not answer in time are fenced.
    Invalidate {
        /// Address space.
        #[arg(long, value_name = "NAME")]
        space: String,
        /// First byte (decimal or 0x hex), a multiple of 4096.
        #[arg(long, value_parser = parse_u64)]
        start: u64,
        /// Bytes, e.g. 4096, 0x10000 or 64MiB; a multiple of 4096.
        #[arg(long, value_parser = parse_size)]
        length: u64,
        /// Why.
        #[arg(long, value_enum, default_value_t = Reason::Operator)]
        reason: Reason,
        /// How long subscribers have to acknowledge [default: the
        /// coordinator's].
        #[arg(long, value_parser = parse_duration)]
        deadline: Option<Duration>,
    },
    /// Stop placing pages on a server and have agents move theirs away.
    Drain {
        /// Server id or name.
        server: String,
    },
    /// Return a drained server to service (also one declared gone that
    /// came back).
    Undrain {
        /// Server id or name.
        server: String,
    },
    /// Declare a server gone now (known dead: its machine or disk is lost)
    /// instead of waiting for the coordinator's `server_gone_after`: agents
    /// rebuild the copies it held on other servers, and never read it
    /// again. See `status` for the progress.
    MarkGone {
        /// Server id or name.
        server: String,
    },
    /// The keys the coordinator signs agents' capabilities with, and
    /// their state: pending (published, signing after a lease), signing,
    /// verifying (superseded; retired once what it signed has expired),
    /// retired. Admins only.
    ///
    /// Examples:
    ///   rmemctl capability-keys
    ///   rmemctl capability-keys rotate
    ///   rmemctl capability-keys retire 3735928559
    #[command(verbatim_doc_comment)]
    CapabilityKeys {
        #[command(subcommand)]
        action: Option<KeyAction>,
    },
    /// Cluster counters and every server's data-plane statistics.
    Stats,
    /// Ask a daemon's gRPC health service (grpc.health.v1) whether it is
    /// serving; exits 0 if so, 1 if not, 3 if unreachable. Works against
    /// any rmem gRPC port: the coordinator's, or a server's admin port.
    ///
    /// Example: rmemctl --endpoint mem1:7481 health
    Health {
        /// The service to ask about (default: the whole daemon).
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Have this node's agent (rmem-agent serve) keep a process's cold
    /// pages on the memory servers, through the kernel module.
    ///
    /// Example: rmemctl attach --pid 4242
    Attach {
        /// The process.
        #[arg(long)]
        pid: i32,
        /// Start of the range to cover (default: the whole process).
        #[arg(long, value_parser = parse_u64, requires = "length")]
        start: Option<u64>,
        /// Length of the range, e.g. 1GiB.
        #[arg(long, value_parser = parse_size, requires = "start")]
        length: Option<u64>,
        /// Most of its anonymous memory kept in RAM, e.g. 512MiB (at least
        /// 1MiB): over it, its coldest pages are evicted even before they
        /// count as cold [default: no budget, cold pages only].
        #[arg(long, value_parser = parse_size)]
        budget: Option<u64>,
        /// Redundancy of its evicted pages: `none`, `replicas=N` (N copies
        /// on distinct servers) or `ec=K+M` (stripes of K data and M
        /// parity pages) [default: the agent's].
        #[arg(long, value_name = "POLICY")]
        redundancy: Option<rmem_common::Redundancy>,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Bring every page of a process back from the memory servers and stop
    /// managing it.
    ///
    /// Example: rmemctl detach --pid 4242
    Detach {
        /// The process.
        #[arg(long)]
        pid: i32,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// The processes this node's agent manages, with counters.
    Attachments {
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Make a cluster CA and member certificates (for labs and tests; a
    /// production cluster may use its own PKI). Works offline.
    #[command(subcommand)]
    Pki(pki::Pki),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Where the node agent's admin socket is.
#[derive(Debug, clap::Args)]
struct AgentSocket {
    /// The agent's admin socket.
    #[arg(
        long = "agent",
        env = "RMEM_AGENT_SOCKET",
        value_name = "PATH",
        default_value = "/run/rmem/agent.sock"
    )]
    socket: std::path::PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Reason {
    Unmap,
    Clear,
    Protection,
    Exit,
    Operator,
}

impl From<Reason> for pb::Reason {
    fn from(r: Reason) -> Self {
        match r {
            Reason::Unmap => pb::Reason::Unmap,
            Reason::Clear => pb::Reason::Clear,
            Reason::Protection => pb::Reason::Protection,
            Reason::Exit => pb::Reason::Exit,
            Reason::Operator => pb::Reason::Operator,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let s = s.replace('_', "");
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("`{s}`: {e}"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_u64(s).or_else(|_| {
        s.parse::<rmem_common::ByteSize>()
            .map(|b| b.bytes())
            .map_err(|e| e.to_string())
    })
}

#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Token(#[from] rmem_common::config::ConfigError),
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("{endpoint}: {service} is {status}")]
    NotServing {
        endpoint: String,
        service: String,
        status: &'static str,
    },
}

impl From<tonic::Status> for CtlError {
    fn from(s: tonic::Status) -> Self {
        Self::Control(s.into())
    }
}

impl CtlError {
    fn exit_code(&self) -> u8 {
        match self {
            CtlError::Control(ControlError::Unreachable { .. }) => 3,
            CtlError::Control(ControlError::Endpoint { .. }) | CtlError::Token(_) => 2,
            CtlError::Pki(
                pki::PkiError::Exists(_)
                | pki::PkiError::Identity(_)
                | pki::PkiError::Host(_)
                | pki::PkiError::NotThisCa(_),
            ) => 2,
            CtlError::Agent(e) => e.exit_code(),
            _ => 1,
        }
    }
}

fn emit<T: Serialize>(output: Output, value: &T, table: impl FnOnce(&T) -> String) {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value).expect("views serialize") + "\n",
        Output::Table => table(value),
    };
    // A closed pipe (`rmemctl servers | head`) is not an error.
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn members_table(ms: &Vec<MemberView>, servers: bool) -> String {
    let mut t = if servers {
        Table::new(&[
            "ID",
            "NAME",
            "STATE",
            "DATA",
            "CAPACITY",
            "USED",
            "ALLOCATED",
            "LEASE",
            "TRANSPORTS",
            "DOMAIN",
        ])
    } else {
        Table::new(&[
            "ID",
            "NAME",
            "STATE",
            "LEASE",
            "INCARNATION",
            "SUBSCRIPTIONS",
            "AT RISK",
        ])
    };
    for m in ms {
        let lease = if m.lease_remaining_ms >= 0 {
            format!("{:.1}s", m.lease_remaining_ms as f64 / 1000.0)
        } else {
            "expired".into()
        };
        if servers {
            t.row(vec![
                m.id.to_string(),
                m.name.clone(),
                m.state.into(),
                m.data_addr.clone(),
                pages(m.capacity_pages),
                pages(m.used_pages),
                pages(m.allocated_pages),
                lease,
                m.transports.join(","),
                if m.domain.is_empty() {
                    "-".into()
                } else {
                    m.domain.clone()
                },
            ]);
        } else {
            t.row(vec![
                m.id.to_string(),
                m.name.clone(),
                m.state.into(),
                lease,
                m.incarnation.to_string(),
                m.subscriptions.to_string(),
                pages(m.at_risk_pages),
            ]);
        }
    }
    t.render()
}

fn status_table(s: &StatusView) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<16} {v}\n"));
    line(
        "coordinator",
        format!("{} (v{}, epoch {})", s.endpoint, s.version, s.epoch),
    );
    line("cluster", s.cluster_id.clone());
    if s.state_backend == "etcd" {
        line(
            "state",
            format!("etcd {} ({})", s.etcd_endpoints, s.etcd_health),
        );
        let replicas: Vec<String> = s
            .replicas
            .iter()
            .map(|r| {
                if *r == s.leader {
                    format!("{r} (leads)")
                } else {
                    r.clone()
                }
            })
            .collect();
        line("replicas", replicas.join(", "));
    } else if !s.state_backend.is_empty() {
        line("state", s.state_backend.clone());
    }
    line("redundancy", s.redundancy.clone());
    line(
        "servers",
        format!(
            "{} up, {} draining, {} down, {} gone",
            s.servers_up, s.servers_draining, s.servers_down, s.servers_gone
        ),
    );
    line("pages at risk", pages(s.pages_at_risk));
    if s.rebuild_pages_total > 0 || s.rebuild_pages_left > 0 {
        let done = s.rebuild_pages_total.saturating_sub(s.rebuild_pages_left);
        line(
            "rebuild",
            format!(
                "{} of {} rebuilt ({:.0}%), {} left",
                pages(done),
                pages(s.rebuild_pages_total),
                100.0 * done as f64 / s.rebuild_pages_total.max(1) as f64,
                pages(s.rebuild_pages_left)
            ),
        );
    }
    line(
        "agents",
        format!("{} up, {} down", s.agents_up, s.agents_down),
    );
    line(
        "capacity",
        format!(
            "{} total, {} used, {} allocated",
            pages(s.capacity_pages),
            pages(s.used_pages),
            pages(s.allocated_pages)
        ),
    );
    line("intervals", s.intervals.to_string());
    line(
        "invalidations",
        format!(
            "{} total, {} in flight, {} members fenced",
            s.invalidations_total, s.invalidations_in_flight, s.members_fenced_total
        ),
    );
    line("uptime", format!("{:.0}s", s.uptime_seconds));
    out
}

async fn list_members(c: &ControlClient, role: pb::Role) -> Result<Vec<MemberView>, ControlError> {
    let r = c
        .membership()
        .list_members(pb::ListMembersRequest { role: role as i32 })
        .await?;
    Ok(r.into_inner()
        .members
        .into_iter()
        .map(MemberView::from)
        .collect())
}

async fn status(c: &ControlClient) -> Result<StatusView, ControlError> {
    let s = c.admin().status(pb::StatusRequest {}).await?.into_inner();
    Ok(StatusView::new(c.current(), s))
}

/// A server's statistics from its admin port (mutual TLS with `tls`: an
/// admin's certificate, the server's checked for the host it is reached at).
async fn server_stats(
    m: &MemberView,
    tls: Option<&rmem_common::tls::TlsPem>,
    timeout: Duration,
) -> ServerStatsView {
    let mut view = ServerStatsView {
        id: m.id,
        name: m.name.clone(),
        grpc_addr: m.grpc_addr.clone(),
        error: None,
        capacity_pages: 0,
        used_pages: 0,
        cluster_id: String::new(),
        coordinator_unknown: false,
        admissions_refused: 0,
        ops: Vec::new(),
    };
    let fetch = async {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", m.grpc_addr))
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout);
        if let Some(pem) = tls {
            ep = ep
                .tls_config(rmem_client::control::client_tls(pem))
                .map_err(|e| e.to_string())?;
        }
        let ch = ep
            .connect()
            .await
            .map_err(|e| format!("cannot reach: {e}"))?;
        ServerAdminClient::new(ch)
            .stats(rmem_proto::admin::v1::StatsRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| e.message().to_string())
    };
    match tokio::time::timeout(timeout, fetch).await {
        Ok(Ok(s)) => {
            view.capacity_pages = s.capacity_pages;
            view.used_pages = s.used_pages;
            view.cluster_id = s.cluster_id;
            view.coordinator_unknown = s.coordinator_unknown;
            view.admissions_refused = s.admissions_refused;
            view.ops = s
                .ops
                .into_iter()
                .map(|o| {
                    let l = o.latency_us.unwrap_or_default();
                    OpView {
                        op: o.op,
                        requests: o.requests,
                        pages: o.pages,
                        errors: o.errors,
                        p50_us: l.p50,
                        p99_us: l.p99,
                    }
                })
                .collect();
        }
        Ok(Err(e)) => view.error = Some(e),
        Err(_) => view.error = Some(format!("no answer within {timeout:?}")),
    }
    view
}

fn stats_table(s: &StatsView) -> String {
    let mut out = status_table(&s.cluster);
    out.push('\n');
    let mut t = Table::new(&[
        "SERVER", "NAME", "OP", "REQUESTS", "PAGES", "ERRORS", "P50", "P99",
    ]);
    for sv in &s.servers {
        if let Some(e) = &sv.error {
            t.row(vec![
                sv.id.to_string(),
                sv.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("({e})"),
            ]);
        }
        for o in &sv.ops {
            t.row(vec![
                sv.id.to_string(),
                sv.name.clone(),
                o.op.clone(),
                o.requests.to_string(),
                o.pages.to_string(),
                o.errors.to_string(),
                format!("{:.1}µs", o.p50_us),
                format!("{:.1}µs", o.p99_us),
            ]);
        }
    }
    out.push_str(&t.render());
    for sv in s.servers.iter().filter(|sv| sv.coordinator_unknown) {
        out.push_str(&format!(
            "warning: server {} ({}) holds {} pages of cluster {}, which this coordinator does not know (it lost its state?): the server frees none of them on its word\n",
            sv.id, sv.name, sv.used_pages, sv.cluster_id
        ));
    }
    out
}

/// What `rmemctl capability-keys` can do besides listing.
#[derive(Debug, Subcommand)]
enum KeyAction {
    /// Draw a new signing key (routine rotation, or after a suspected
    /// leak of the coordinator's state): it signs once every server can
    /// have learned it, and the old key is retired once every capability
    /// it signed has expired (`capability_ttl`). Nothing restarts.
    Rotate,
    /// Retire a key now, without waiting for what it signed to expire (it
    /// may have leaked): servers forget it at their next heartbeat and
    /// drop the capabilities it signed from every connection; agents are
    /// denied those pages for a moment and renew theirs. The signing key
    /// cannot be retired: rotate first and retire it once the new key
    /// signs (the new one is pending for two leases).
    Retire {
        /// The key's id (as `rmemctl capability-keys` lists it).
        id: u32,
    },
}

/// A capability key, as `rmemctl capability-keys` prints it.
#[derive(Debug, Serialize)]
struct KeyView {
    id: u32,
    state: String,
    /// RFC 3339 (empty for a retired key, or one from before rotation).
    created: String,
    /// When a pending key signs or a verifying one retires (RFC 3339).
    #[serde(skip_serializing_if = "String::is_empty")]
    until: String,
}

impl From<pb::CapabilityKeyStatus> for KeyView {
    fn from(k: pb::CapabilityKeyStatus) -> Self {
        let at = |s: u64| {
            if s == 0 {
                String::new()
            } else {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
                    .to_string()
            }
        };
        Self {
            id: k.id,
            state: k.state,
            created: at(k.created),
            until: at(k.until),
        }
    }
}

fn keys_table(keys: &Vec<KeyView>) -> String {
    let mut t = format!(
        "{:<12} {:<10} {:<21} {}\n",
        "ID", "STATE", "CREATED", "UNTIL"
    );
    for k in keys {
        t.push_str(&format!(
            "{:<12} {:<10} {:<21} {}\n",
            k.id, k.state, k.created, k.until
        ));
    }
    t
}

/// What `rmemctl health` prints.
#[derive(Debug, Serialize)]
struct HealthView {
    endpoint: String,
    service: String,
    status: &'static str,
}

fn health_status(code: i32) -> &'static str {
    use tonic_health::pb::health_check_response::ServingStatus;
    match ServingStatus::try_from(code) {
        Ok(ServingStatus::Serving) => "serving",
        Ok(ServingStatus::NotServing) => "not serving",
        Ok(ServingStatus::ServiceUnknown) => "unknown to the daemon",
        _ => "in an unknown state",
    }
}

fn drain_request(server: &str) -> pb::DrainRequest {
    match server.parse::<u64>() {
        Ok(id) => pb::DrainRequest {
            server_id: id,
            name: String::new(),
        },
        Err(_) => pb::DrainRequest {
            server_id: 0,
            name: server.to_string(),
        },
    }
}

/// The commands that talk to the node agent, not the coordinator.
async fn run_agent(command: Command, out: Output, timeout: Duration) -> Result<(), CtlError> {
    match command {
        Command::Attach {
            pid,
            start,
            length,
            budget,
            redundancy,
            agent,
        } => {
            let mut c = agent::connect(&agent.socket, timeout).await?;
            let r = c
                .attach(rmem_proto::agent::v1::AttachRequest {
                    pid,
                    start: start.unwrap_or(0),
                    length: length.unwrap_or(0),
                    budget_bytes: budget.unwrap_or(0),
                    redundancy: redundancy.map(|r| r.to_string()).unwrap_or_default(),
                })
                .await
                .map_err(agent::AgentError::from)?
                .into_inner();
            let v: Option<agent::AttachmentView> = r.attachment.map(Into::into);
            emit(out, &v, |v| {
                v.as_ref().map(agent::attachment_line).unwrap_or_default()
            });
        }
        Command::Detach { pid, agent } => {
            let mut c = agent::connect(&agent.socket, timeout).await?;
            let r = c
                .detach(rmem_proto::agent::v1::DetachRequest { pid })
                .await
                .map_err(agent::AgentError::from)?
                .into_inner();
            #[derive(Serialize)]
            struct Detached {
                pid: i32,
                restored_pages: u64,
            }
            emit(
                out,
                &Detached {
                    pid,
                    restored_pages: r.restored_pages,
                },
                |d| {
                    format!(
                        "detached pid {}: {} brought back\n",
                        d.pid,
                        pages(d.restored_pages)
                    )
                },
            );
        }
        Command::Attachments { agent } => {
            let mut c = agent::connect(&agent.socket, timeout).await?;
            let r = c
                .list(rmem_proto::agent::v1::ListRequest {})
                .await
                .map_err(agent::AgentError::from)?
                .into_inner();
            emit(
                out,
                &agent::AttachmentsView::from(r),
                agent::attachments_table,
            );
        }
        _ => unreachable!("only agent commands"),
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), CtlError> {
    if let Command::Pki(p) = args.command {
        let issued = match p {
            pki::Pki::Init {
                dir,
                days,
                keep: true,
                members,
                ..
            } => pki::lab(&dir, days, 365, &members)?,
            pki::Pki::Init {
                dir,
                days,
                force,
                members,
                ..
            } => {
                let mut out = vec![pki::init(&dir, days, force)?];
                for m in &members {
                    out.push(pki::issue(&dir, m.role, &m.name, &m.hosts, 365, force)?);
                }
                out
            }
            pki::Pki::Issue {
                dir,
                role,
                name,
                hosts,
                days,
                force,
            } => vec![pki::issue(&dir, role, &name, &hosts, days, force)?],
            pki::Pki::Revoke {
                dir,
                role,
                name,
                cert,
                days,
            } => {
                let cert = pki::revoked_cert(&dir, role, name.as_deref(), cert);
                let r = pki::revoke(&dir, Some(&cert), days)?;
                emit(args.output, &r, pki::revocation_line);
                return Ok(());
            }
            pki::Pki::Crl { dir, days } => {
                let r = pki::revoke(&dir, None, days)?;
                emit(args.output, &r, pki::revocation_line);
                return Ok(());
            }
        };
        emit(args.output, &issued, |v| pki::lines(v));
        return Ok(());
    }
    if matches!(
        args.command,
        Command::Attach { .. } | Command::Detach { .. } | Command::Attachments { .. }
    ) {
        return run_agent(args.command, args.output, args.timeout).await;
    }
    let token = match (&args.token_file, &args.token) {
        (Some(p), _) => Some(rmem_common::config::read_token("the cluster token", p)?),
        (None, t) => t.clone(),
    };
    let tls = args.tls.files()?.map(|f| f.read()).transpose()?;
    let creds = rmem_client::control::Credentials { token, tls };
    let c = ControlClient::connect_with(&args.endpoint, &creds, args.timeout).await?;
    let out = args.output;
    match args.command {
        Command::Completions { .. } | Command::Pki(_) => unreachable!("handled before connecting"),
        Command::Attach { .. } | Command::Detach { .. } | Command::Attachments { .. } => {
            unreachable!("handled by run_agent")
        }
        Command::Status => emit(out, &status(&c).await?, status_table),
        Command::Servers => emit(out, &list_members(&c, pb::Role::Server).await?, |m| {
            members_table(m, true)
        }),
        Command::Agents => emit(out, &list_members(&c, pb::Role::Agent).await?, |m| {
            members_table(m, false)
        }),
        Command::Intervals { agent, space } => {
            let r = c
                .intervals()
                .list(pb::ListIntervalsRequest {
                    member_id: agent.unwrap_or(0),
                    address_space: space.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let v: Vec<IntervalView> = r.intervals.into_iter().map(Into::into).collect();
            emit(out, &v, |v| {
                let mut t = Table::new(&[
                    "ID",
                    "SPACE",
                    "START",
                    "LENGTH",
                    "TENANT",
                    "OWNER",
                    "SUBSCRIBERS",
                    "SEQ",
                    "IN-FLIGHT",
                ]);
                for i in v {
                    t.row(vec![
                        i.id.to_string(),
                        i.address_space.clone(),
                        format!("{:#x}", i.start),
                        pages(i.length / 4096),
                        i.tenant.clone(),
                        i.owner.to_string(),
                        i.subscribers
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        format!("{}:{}", i.seq >> 32, i.seq & 0xffff_ffff),
                        i.invalidations_in_flight.to_string(),
                    ]);
                }
                t.render()
            });
        }
        Command::Grants { agent, server } => {
            let r = c
                .placement()
                .list_grants(pb::ListGrantsRequest {
                    agent_id: agent.unwrap_or(0),
                    server_id: server.unwrap_or(0),
                })
                .await?
                .into_inner();
            let v: Vec<GrantView> = r.grants.into_iter().map(Into::into).collect();
            emit(out, &v, |v| {
                let mut t = Table::new(&["ID", "AGENT", "SERVER", "NAME", "TENANT", "SIZE"]);
                for g in v {
                    t.row(vec![
                        g.id.to_string(),
                        g.agent_id.to_string(),
                        g.server_id.to_string(),
                        g.server_name.clone(),
                        g.tenant.clone(),
                        pages(g.pages),
                    ]);
                }
                t.render()
            });
        }
        Command::Invalidate {
            space,
            start,
            length,
            reason,
            deadline,
        } => {
            let r = c
                .invalidation()
                .invalidate(pb::InvalidateRequest {
                    address_space: space,
                    start,
                    length,
                    reason: pb::Reason::from(reason) as i32,
                    deadline_ms: deadline
                        .map_or(0, |d| d.as_millis().clamp(1, u32::MAX as u128) as u32),
                    origin: 0,
                    more: Vec::new(),
                })
                .await?
                .into_inner();
            emit(out, &InvalidateView::from(r), |v| {
                format!(
                    "invalidation {}: {} intervals, acknowledged by {:?}{}\n",
                    v.invalidation_id,
                    v.intervals.len(),
                    v.acknowledged,
                    if v.fenced.is_empty() {
                        String::new()
                    } else {
                        format!("; FENCED (no answer in time): {:?}", v.fenced)
                    }
                )
            });
        }
        Command::CapabilityKeys { action } => {
            let r = match action {
                None => {
                    c.admin()
                        .capability_keys(pb::CapabilityKeysRequest {})
                        .await?
                }
                Some(KeyAction::Rotate) => {
                    c.admin()
                        .rotate_capability_key(pb::RotateCapabilityKeyRequest {})
                        .await?
                }
                Some(KeyAction::Retire { id }) => {
                    c.admin()
                        .retire_capability_key(pb::RetireCapabilityKeyRequest { id })
                        .await?
                }
            };
            let v: Vec<KeyView> = r.into_inner().keys.into_iter().map(Into::into).collect();
            emit(out, &v, keys_table);
        }
        Command::Drain { server } => {
            let r = c.admin().drain(drain_request(&server)).await?.into_inner();
            let v: Vec<MemberView> = r.server.into_iter().map(Into::into).collect();
            emit(out, &v, |m| members_table(m, true));
        }
        Command::MarkGone { server } => {
            let r = c
                .admin()
                .mark_gone(drain_request(&server))
                .await?
                .into_inner();
            let v: Vec<MemberView> = r.server.into_iter().map(Into::into).collect();
            emit(out, &v, |m| members_table(m, true));
        }
        Command::Undrain { server } => {
            let r = c
                .admin()
                .undrain(drain_request(&server))
                .await?
                .into_inner();
            let v: Vec<MemberView> = r.server.into_iter().map(Into::into).collect();
            emit(out, &v, |m| members_table(m, true));
        }
        Command::Health { service } => {
            let r = tonic_health::pb::health_client::HealthClient::new(c.channel())
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.clone(),
                })
                .await?
                .into_inner();
            let status = health_status(r.status);
            let view = HealthView {
                endpoint: c.endpoint().to_string(),
                service: service.clone(),
                status,
            };
            emit(out, &view, |v| format!("{}: {}\n", v.endpoint, v.status));
            if status != "serving" {
                return Err(CtlError::NotServing {
                    endpoint: view.endpoint,
                    service: if service.is_empty() {
                        "the daemon".into()
                    } else {
                        service
                    },
                    status,
                });
            }
        }
        Command::Stats => {
            let cluster = status(&c).await?;
            let servers = list_members(&c, pb::Role::Server).await?;
            let mut views = Vec::with_capacity(servers.len());
            for m in servers.iter().filter(|m| m.state != "left") {
                views.push(server_stats(m, creds.tls.as_ref(), args.timeout).await);
            }
            emit(
                out,
                &StatsView {
                    cluster,
                    servers: views,
                },
                stats_table,
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::Completions { shell } = args.command {
        clap_complete::generate(
            shell,
            &mut Args::command(),
            "rmemctl",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rmemctl: {}", CtlError::Runtime(e));
            return ExitCode::FAILURE;
        }
    };
    let endpoint = args.endpoint.clone();
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("rmemctl: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            if matches!(e, CtlError::Agent(agent::AgentError::Unreachable { .. })) {
                eprintln!(
                    "rmemctl: is rmem-agent serve running on this node? Set --agent or RMEM_AGENT_SOCKET."
                );
            }
            if matches!(e, CtlError::Control(ControlError::Unreachable { .. })) {
                eprintln!(
                    "rmemctl: is rmem-coordinator running at {endpoint}? Set --endpoint or RMEM_ENDPOINT."
                );
            }
            ExitCode::from(e.exit_code())
        }
    }
}

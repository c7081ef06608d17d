//! `rmemctl attach | detach | attachments`: a node agent's admin API
//! (`rmem.agent.v1.AgentAdmin`), reached over its Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rmem_proto::agent::v1 as pb;
use rmem_proto::agent::v1::agent_admin_client::AgentAdminClient;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::table::{Table, pages};

/// Why talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent at {path}")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent answered {}: {}", code_name(.0.code()), .0.message())]
    Rpc(tonic::Status),
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    }
}

impl AgentError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Unreachable { .. } => 3,
            AgentError::Rpc(s) if s.code() == tonic::Code::InvalidArgument => 2,
            AgentError::Rpc(_) => 1,
        }
    }
}

impl From<tonic::Status> for AgentError {
    fn from(s: tonic::Status) -> Self {
        // A connection refused by the socket surfaces as a status.
        Self::Rpc(s)
    }
}

/// Connects to the agent's socket (tonic needs a URI; the connector
/// ignores it and dials the socket).
pub async fn connect(
    socket: &Path,
    timeout: Duration,
) -> Result<AgentAdminClient<Channel>, AgentError> {
    let unreachable = |source| AgentError::Unreachable {
        path: socket.to_path_buf(),
        source,
    };
    // Fail early with the socket's own error (missing, permission).
    tokio::net::UnixStream::connect(socket)
        .await
        .map_err(unreachable)?;
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://agent.invalid")
        .connect_timeout(timeout)
        .timeout(timeout.max(Duration::from_secs(60)))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| unreachable(std::io::Error::other(e)))?;
    Ok(AgentAdminClient::new(channel))
}

/// One attached process, as printed.
#[derive(Debug, Serialize)]
pub struct AttachmentView {
    pub pid: i32,
    pub command: String,
    pub start: u64,
    pub length: u64,
    pub rounds: u64,
    pub cold_bytes: u64,
    pub evicted_pages: u64,
    pub evict_errors: u64,
    pub last_error: String,
    pub attached_seconds: f64,
    /// 0: no budget.
    pub budget_bytes: u64,
    /// Its private anonymous memory in RAM and remote at the last round.
    pub local_bytes: u64,
    pub remote_bytes: u64,
    /// Redundancy of its evicted pages.
    pub redundancy: String,
}

impl From<pb::Attachment> for AttachmentView {
    fn from(a: pb::Attachment) -> Self {
        Self {
            pid: a.pid,
            command: a.command,
            start: a.start,
            length: a.length,
            rounds: a.rounds,
            cold_bytes: a.cold_bytes,
            evicted_pages: a.evicted_pages,
            evict_errors: a.evict_errors,
            last_error: a.last_error,
            attached_seconds: a.attached_seconds,
            budget_bytes: a.budget_bytes,
            local_bytes: a.local_bytes,
            remote_bytes: a.remote_bytes,
            redundancy: a.redundancy,
        }
    }
}

/// `rmemctl attachments`.
#[derive(Debug, Serialize)]
pub struct AttachmentsView {
    pub server: String,
    pub fetched_pages: u64,
    pub freed_pages: u64,
    pub kept_local_pages: u64,
    /// Summed over the attachments.
    pub local_bytes: u64,
    pub remote_bytes: u64,
    /// The module's: pages eviction left in RAM, by reason, and faults
    /// ended because their page could not move back.
    pub skipped_ksm_pages: u64,
    pub skipped_locked_pages: u64,
    pub skipped_mapping_pages: u64,
    pub stuck_faults: u64,
    /// Fetches served from another copy or rebuilt from a stripe, and
    /// fetches that failed (the faulting task got SIGBUS).
    pub fetched_degraded_pages: u64,
    pub failed_fetches: u64,
    pub attachments: Vec<AttachmentView>,
}

impl From<pb::ListResponse> for AttachmentsView {
    fn from(r: pb::ListResponse) -> Self {
        Self {
            server: r.server,
            fetched_pages: r.fetched_pages,
            freed_pages: r.freed_pages,
            kept_local_pages: r.kept_local_pages,
            local_bytes: r.local_bytes,
            remote_bytes: r.remote_bytes,
            skipped_ksm_pages: r.skipped_ksm_pages,
            skipped_locked_pages: r.skipped_locked_pages,
            skipped_mapping_pages: r.skipped_mapping_pages,
            stuck_faults: r.stuck_faults,
            fetched_degraded_pages: r.fetched_degraded_pages,
            failed_fetches: r.failed_fetches,
            attachments: r.attachments.into_iter().map(Into::into).collect(),
        }
    }
}

/// "LOCAL/BUDGET" of a process with a budget, "-" without one.
fn budget(a: &AttachmentView) -> String {
    if a.budget_bytes == 0 {
        "-".into()
    } else {
        format!(
            "{}/{}",
            pages(a.local_bytes / 4096),
            pages(a.budget_bytes / 4096)
        )
    }
}

fn range(a: &AttachmentView) -> String {
    if a.length == 0 {
        "all".into()
    } else {
        format!("{:#x}+{}", a.start, pages(a.length / 4096))
    }
}

pub fn attachments_table(v: &AttachmentsView) -> String {
    let mut t = Table::new(&[
        "PID",
        "COMMAND",
        "RANGE",
        "ROUNDS",
        "COLD",
        "EVICTED",
        "LOCAL",
        "REMOTE",
        "LOCAL/BUDGET",
        "REDUNDANCY",
        "ERRORS",
        "AGE",
    ]);
    for a in &v.attachments {
        t.row(vec![
            a.pid.to_string(),
            a.command.clone(),
            range(a),
            a.rounds.to_string(),
            pages(a.cold_bytes / 4096),
            pages(a.evicted_pages),
            pages(a.local_bytes / 4096),
            pages(a.remote_bytes / 4096),
            budget(a),
            a.redundancy.clone(),
            a.evict_errors.to_string(),
            format!("{:.0}s", a.attached_seconds),
        ]);
    }
    format!(
        "server {}: {} fetched ({} degraded, {} failed), {} freed, {} kept local; {} local, {} remote in all\n\
         left in RAM by eviction: {} KSM, {} mlocked, {} other mappings; {} stuck faults\n{}",
        v.server,
        pages(v.fetched_pages),
        pages(v.fetched_degraded_pages),
        v.failed_fetches,
        pages(v.freed_pages),
        pages(v.kept_local_pages),
        pages(v.local_bytes / 4096),
        pages(v.remote_bytes / 4096),
        pages(v.skipped_ksm_pages),
        pages(v.skipped_locked_pages),
        pages(v.skipped_mapping_pages),
        v.stuck_faults,
        t.render()
    )
}

pub fn attachment_line(a: &AttachmentView) -> String {
    format!(
        "attached pid {} ({}), range {}, redundancy {}, budget {}\n",
        a.pid,
        a.command,
        range(a),
        a.redundancy,
        if a.budget_bytes == 0 {
            "none".to_string()
        } else {
            pages(a.budget_bytes / 4096)
        }
    )
}

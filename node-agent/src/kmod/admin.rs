//! `rmem-agent serve`'s admin API (`rmem.agent.v1.AgentAdmin`, with
//! grpc.health.v1 and reflection) on a Unix socket.
//!
//! Attaching a process hands its memory to the agent, so the socket is the
//! access control: it is created mode 0600 (root only) in a directory the
//! service manager owns (`/run/rmem` by default). No TCP listener exists.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use rmem_proto::agent::v1 as pb;
use rmem_proto::agent::v1::agent_admin_server::{AgentAdmin, AgentAdminServer};
use tonic::{Request, Response, Status};

use super::daemon::{DaemonStatus, Supervisor, SupervisorError};
use super::service::KernelError;
use crate::remote::ClusterError;

/// Default path of the admin socket.
pub const DEFAULT_SOCKET: &str = "/run/rmem/agent.sock";

/// The gRPC service over a [`Supervisor`].
#[derive(Debug, Clone)]
pub struct AdminService {
    sup: Arc<Supervisor>,
}

/// The smallest budget accepted: less would evict pages the process is
/// touching right now, over and over.
pub const MIN_BUDGET: u64 = 1 << 20;

fn view(s: &DaemonStatus) -> pb::Attachment {
    pb::Attachment {
        pid: s.pid,
        start: s.start,
        length: s.length,
        command: s.command.clone(),
        rounds: s.rounds,
        cold_bytes: s.cold_bytes,
        evicted_pages: s.evicted_pages,
        evict_errors: s.evict_errors,
        last_error: s.last_error.clone().unwrap_or_default(),
        attached_seconds: s.attached_seconds,
        budget_bytes: s.budget_bytes,
        local_bytes: s.local_bytes,
        remote_bytes: s.remote_bytes,
        redundancy: s.redundancy.clone(),
    }
}

fn status(e: SupervisorError) -> Status {
    let msg = e.to_string();
    match e {
        SupervisorError::AlreadyAttached(_) => Status::already_exists(msg),
        SupervisorError::NotAttached(_) | SupervisorError::NoProcess(_) => Status::not_found(msg),
        SupervisorError::Range(_)
        | SupervisorError::Kernel(KernelError::Cluster(ClusterError::TooFewServers { .. })) => {
            Status::invalid_argument(msg)
        }
        SupervisorError::Kernel(KernelError::Monitor(_)) => Status::failed_precondition(msg),
        SupervisorError::Kernel(KernelError::Device(io))
            if matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
        {
            Status::permission_denied(msg)
        }
        SupervisorError::Kernel(_) => Status::internal(msg),
    }
}

impl AdminService {
    pub fn new(sup: Arc<Supervisor>) -> Self {
        Self { sup }
    }

    /// Runs `f` on the supervisor off the async workers (it takes locks and
    /// issues ioctls that may bring many pages back).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Supervisor) -> Result<T, SupervisorError> + Send + 'static,
    ) -> Result<T, Status> {
        let sup = self.sup.clone();
        tokio::task::spawn_blocking(move || f(&sup))
            .await
            .map_err(|e| Status::internal(format!("agent task failed: {e}")))?
            .map_err(status)
    }
}

#[tonic::async_trait]
impl AgentAdmin for AdminService {
    async fn attach(
        &self,
        req: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        let r = req.into_inner();
        let range = (r.length != 0).then_some((r.start, r.length));
        if range.is_none() && r.start != 0 {
            return Err(Status::invalid_argument(
                "start without length: give both, or neither for the whole process",
            ));
        }
        let budget = (r.budget_bytes != 0).then_some(r.budget_bytes);
        if budget.is_some_and(|b| b < MIN_BUDGET) {
            return Err(Status::invalid_argument(format!(
                "budget_bytes: at least {MIN_BUDGET} (1 MiB), or 0 for none"
            )));
        }
        let policy = match r.redundancy.as_str() {
            "" => None,
            p => Some(
                p.parse::<rmem_common::Redundancy>()
                    .map_err(|e| Status::invalid_argument(format!("redundancy: {e}")))?,
            ),
        };
        let st = self
            .blocking(move |s| s.attach(r.pid, range, budget, policy))
            .await?;
        Ok(Response::new(pb::AttachResponse {
            attachment: Some(view(&st)),
        }))
    }

    async fn detach(
        &self,
        req: Request<pb::DetachRequest>,
    ) -> Result<Response<pb::DetachResponse>, Status> {
        let pid = req.into_inner().pid;
        let st = self.blocking(move |s| s.detach(pid)).await?;
        Ok(Response::new(pb::DetachResponse {
            restored_pages: st.restored_pages,
        }))
    }

    async fn list(
        &self,
        _req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let (list, totals, server) = self
            .blocking(|s| Ok((s.list(), s.totals(), s.server().to_string())))
            .await?;
        Ok(Response::new(pb::ListResponse {
            attachments: list.iter().map(view).collect(),
            fetched_pages: totals.fetched_pages,
            freed_pages: totals.freed_pages,
            kept_local_pages: totals.kept_local_pages,
            server,
            skipped_ksm_pages: totals.skipped_ksm_pages,
            skipped_locked_pages: totals.skipped_locked_pages,
            skipped_mapping_pages: totals.skipped_mapping_pages,
            stuck_faults: totals.stuck_faults,
            fetched_degraded_pages: totals.fetched_degraded_pages,
            failed_fetches: totals.failed_fetches,
            local_bytes: list.iter().map(|s| s.local_bytes).sum(),
            remote_bytes: list.iter().map(|s| s.remote_bytes).sum(),
        }))
    }
}

/// Binds the admin socket: a stale socket (nobody listening) is replaced,
/// a live one is an error; the new one is mode 0600.
pub fn bind(path: &Path) -> io::Result<tokio::net::UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another agent serves on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the admin API on `listener` until `stop` completes.
pub async fn serve(
    listener: tokio::net::UnixListener,
    admin: AdminService,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentAdminServer<AdminService>>().await;
    rmem_proto::with_reflection(tonic::transport::Server::builder().add_service(health_service))
        .add_service(AgentAdminServer::new(admin))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop,
        )
        .await
}

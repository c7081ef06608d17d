//! The admin gRPC endpoint: `rmem.admin.v1.ServerAdmin`, the standard health
//! service, and server reflection (v1 and v1alpha) so generic clients such
//! as grpcurl work.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rmem_proto::admin::v1::server_admin_server::{ServerAdmin, ServerAdminServer};
use rmem_proto::admin::v1::{LatencySummary, OpStats, StatsRequest, StatsResponse, TenantUsage};
use tonic::{Request, Response, Status};

use crate::metrics::{Metrics, Op};
use crate::store::Store;

/// Implementation of `ServerAdmin`.
#[derive(Debug, Clone)]
pub struct AdminService {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
}

/// In front of the admin service: with mutual TLS, only an admin's
/// certificate may read the server's statistics (they name its tenants and
/// their use). Health and reflection stay open to any certificate of the
/// cluster CA.
#[derive(Debug, Clone)]
pub struct AdminGate {
    /// With mutual TLS: the files, whose CRLs and the certificate's expiry
    /// are checked on every call.
    pub tls: Option<std::sync::Arc<rmem_common::tls::reload::Reloading>>,
}

impl tonic::service::Interceptor for AdminGate {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let Some(tls) = &self.tls else {
            return Ok(req);
        };
        let certs = req.peer_certs();
        if let Some(cert) = certs.as_deref().and_then(|c| c.first()) {
            tls.check_peer(cert)
                .map_err(|e| Status::unauthenticated(e.to_string()))?;
        }
        let identity = rmem_common::tls::data::peer_identity(certs.as_deref().map(Vec::as_slice))
            .map_err(|e| Status::unauthenticated(format!("no identity: {e}")))?;
        if identity.role != rmem_common::identity::Role::Admin {
            return Err(Status::permission_denied(format!(
                "the certificate names {identity}: server statistics are for admins"
            )));
        }
        Ok(req)
    }
}

impl AdminService {
    /// The tonic service wrapper, behind `gate`.
    pub fn into_server(
        self,
        gate: AdminGate,
    ) -> tonic::service::interceptor::InterceptedService<ServerAdminServer<Self>, AdminGate> {
        tonic::service::interceptor::InterceptedService::new(ServerAdminServer::new(self), gate)
    }

    /// The current statistics.
    pub fn stats(&self) -> StatsResponse {
        let m = &self.metrics;
        let mut tenants: Vec<TenantUsage> = self
            .store
            .tenants()
            .map(|t| TenantUsage {
                name: t.name.clone(),
                id: t.id,
                used_pages: t.used(),
                quota_pages: if t.quota_pages == u64::MAX {
                    0
                } else {
                    t.quota_pages
                },
            })
            .collect();
        tenants.sort_by_key(|t| t.id);
        let ops = Op::ALL
            .iter()
            .map(|&op| {
                let o = m.totals(op);
                let p = o.latency.percentiles().scaled(1000.0);
                OpStats {
                    op: op.as_str().into(),
                    requests: o.requests,
                    pages: o.pages,
                    errors: o.errors,
                    latency_us: Some(LatencySummary {
                        count: p.count,
                        p50: p.p50,
                        p90: p.p90,
                        p99: p.p99,
                        p999: p.p999,
                        max: p.max,
                        mean: p.mean,
                    }),
                }
            })
            .collect();
        StatsResponse {
            server_id: self.store.server_id(),
            version: env!("CARGO_PKG_VERSION").into(),
            page_size: rmem_proto::wire::PAGE_SIZE as u32,
            capacity_pages: self.store.capacity_pages(),
            used_pages: self.store.used_pages(),
            persistent: self.store.persistent(),
            tenants,
            ops,
            connections_open: m.connections_open.load(Ordering::Relaxed),
            connections_total: m.connections_total.load(Ordering::Relaxed),
            protocol_errors: m.protocol_errors.load(Ordering::Relaxed),
            auth_failures: m.auth_failures.load(Ordering::Relaxed),
            uptime_seconds: m.started.elapsed().as_secs_f64(),
            cluster_id: self
                .store
                .cluster_view()
                .map(|v| format!("{:032x}", v.id))
                .unwrap_or_default(),
            coordinator_unknown: self.store.coordinator_unknown(),
            admissions_refused: m.admissions_refused.load(Ordering::Relaxed),
        }
    }
}

#[tonic::async_trait]
impl ServerAdmin for AdminService {
    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Ok(Response::new(AdminService::stats(self)))
    }
}

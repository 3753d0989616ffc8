//! gRPC handlers: [`BrokerService`] for the gateway and [`AdminService`] for
//! the operator (admin socket). Each one first re-validates its request
//! (names, sizes, limits) as if the caller were hostile, then calls the
//! sandbox registry.

use std::sync::Arc;
use std::time::Instant;

use moat_proto::broker::admin_server::Admin;
use moat_proto::broker::broker_server::Broker;
use moat_proto::broker::{
    Caller, GetMetricsReply, GetMetricsRequest, HealthReply, HealthRequest, ListSandboxesReply,
    ListSandboxesRequest, RemoveSandboxReply, RemoveSandboxRequest, RunCommandReply,
    RunCommandRequest, RunReplReply, RunReplRequest, StartSandboxReply, StartSandboxRequest,
    StopSandboxReply, StopSandboxRequest,
};
use tonic::{Request, Response, Status};

use crate::error::BrokerError;
use crate::sandbox::{CommandRequest, MetricsFilter, ReplRequest, SandboxKey, Sandboxes};

/// The `Broker` gRPC service.
#[derive(Debug, Clone)]
pub struct BrokerService {
    sandboxes: Arc<Sandboxes>,
    vmm: String,
}

impl BrokerService {
    pub fn new(sandboxes: Arc<Sandboxes>, vmm: String) -> Self {
        Self { sandboxes, vmm }
    }
}

/// The caller's key id for the audit log and the sandbox's record (the
/// gateway's word only): at most 64 characters of `[A-Za-z0-9._-]`, others
/// replaced, so it never carries terminal escapes into `moat sandbox ls`.
fn key_id(caller: Option<&Caller>) -> String {
    caller
        .map(|c| {
            c.key_id
                .chars()
                .take(64)
                .map(|ch| {
                    if ch.is_ascii_alphanumeric() || "._-".contains(ch) {
                        ch
                    } else {
                        '?'
                    }
                })
                .collect()
        })
        .unwrap_or_else(|| "-".into())
}

/// Runs a lifecycle operation to its end even when the caller goes away:
/// tonic drops a handler whose client cancelled (or whose deadline passed),
/// and a start or stop dropped half-way would leave a VM nothing tracks.
async fn uncancelled<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, BrokerError>> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::spawn(op)
        .await
        .unwrap_or_else(|e| Err(BrokerError::Failed(format!("the operation failed: {e}"))))
}

fn logged<T>(
    op: &str,
    key: &SandboxKey,
    caller: Option<&Caller>,
    started: Instant,
    r: Result<T, BrokerError>,
) -> Result<T, Status> {
    let ms = started.elapsed().as_millis() as u64;
    let key_id = key_id(caller);
    match &r {
        Ok(_) => tracing::info!(op, sandbox = %key, key_id, ms, "ok"),
        Err(e) => tracing::warn!(op, sandbox = %key, key_id, ms, error = %e, "failed"),
    }
    r.map_err(Status::from)
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        Ok(Response::new(HealthReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            vmm: self.vmm.clone(),
            running_sandboxes: self.sandboxes.running(),
            pools: self.sandboxes.pool_status(),
        }))
    }

    async fn start_sandbox(
        &self,
        req: Request<StartSandboxRequest>,
    ) -> Result<Response<StartSandboxReply>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let key = SandboxKey::from_ref(req.sandbox.as_ref()).map_err(Status::from)?;
        let (sandboxes, k, config, caller) = (
            self.sandboxes.clone(),
            key.clone(),
            req.config.clone(),
            key_id(req.caller.as_ref()),
        );
        let r =
            uncancelled(async move { sandboxes.start(&k, config.as_ref(), &caller).await }).await;
        let started_vm = logged("start", &key, req.caller.as_ref(), started, r)?;
        Ok(Response::new(StartSandboxReply {
            started: started_vm,
        }))
    }

    async fn stop_sandbox(
        &self,
        req: Request<StopSandboxRequest>,
    ) -> Result<Response<StopSandboxReply>, Status> {
        let started = Instant::now();
        let key = SandboxKey::from_ref(req.get_ref().sandbox.as_ref()).map_err(Status::from)?;
        let (sandboxes, k) = (self.sandboxes.clone(), key.clone());
        let r = uncancelled(async move { sandboxes.stop(&k).await }).await;
        logged("stop", &key, req.get_ref().caller.as_ref(), started, r)?;
        Ok(Response::new(StopSandboxReply {}))
    }

    async fn run_command(
        &self,
        req: Request<RunCommandRequest>,
    ) -> Result<Response<RunCommandReply>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let key = SandboxKey::from_ref(req.sandbox.as_ref()).map_err(Status::from)?;
        let caller = req.caller.clone();
        let cmd = CommandRequest {
            command: req.command,
            args: req.args,
            timeout_secs: req.timeout_secs,
            envs: req.envs,
            workdir: req.workdir,
        };
        let r = self.sandboxes.run_command(&key, cmd).await;
        Ok(Response::new(logged(
            "command",
            &key,
            caller.as_ref(),
            started,
            r,
        )?))
    }

    async fn run_repl(
        &self,
        req: Request<RunReplRequest>,
    ) -> Result<Response<RunReplReply>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let key = SandboxKey::from_ref(req.sandbox.as_ref()).map_err(Status::from)?;
        let caller = req.caller.clone();
        let cell = ReplRequest {
            language: req.language,
            code: req.code,
            timeout_secs: req.timeout_secs,
        };
        let r = self.sandboxes.run_repl(&key, cell).await;
        Ok(Response::new(logged(
            "repl",
            &key,
            caller.as_ref(),
            started,
            r,
        )?))
    }

    async fn get_metrics(
        &self,
        req: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsReply>, Status> {
        let req = req.into_inner();
        let bad = |e: moat_proto::names::NameError| Status::invalid_argument(e.to_string());
        for ns in &req.namespaces {
            moat_proto::names::validate_name("namespace", ns).map_err(bad)?;
        }
        if let Some(name) = &req.sandbox {
            moat_proto::names::validate_name("sandbox name", name).map_err(bad)?;
        }
        let filter = MetricsFilter {
            namespaces: (!req.all_namespaces).then(|| req.namespaces.clone()),
            sandbox: req.sandbox.clone(),
        };
        let sandboxes = self.sandboxes.metrics(&filter).await;
        tracing::debug!(
            key_id = key_id(req.caller.as_ref()),
            n = sandboxes.len(),
            "metrics"
        );
        Ok(Response::new(GetMetricsReply { sandboxes }))
    }
}

/// The operator's `Admin` gRPC service (admin socket, root peers only).
#[derive(Debug, Clone)]
pub struct AdminService {
    sandboxes: Arc<Sandboxes>,
}

impl AdminService {
    pub fn new(sandboxes: Arc<Sandboxes>) -> Self {
        Self { sandboxes }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_sandboxes(
        &self,
        req: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesReply>, Status> {
        let ns = req.into_inner().namespace;
        if let Some(ns) = &ns {
            moat_proto::names::validate_name("namespace", ns)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let sandboxes = self.sandboxes.list(ns.as_deref()).await;
        Ok(Response::new(ListSandboxesReply { sandboxes }))
    }

    async fn remove_sandbox(
        &self,
        req: Request<RemoveSandboxRequest>,
    ) -> Result<Response<RemoveSandboxReply>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let key = SandboxKey::from_ref(req.sandbox.as_ref()).map_err(Status::from)?;
        let operator = Caller {
            key_id: "operator".into(),
            namespaces: Vec::new(),
        };
        let (sandboxes, k, stop) = (self.sandboxes.clone(), key.clone(), req.stop);
        let r = uncancelled(async move { sandboxes.remove(&k, stop).await }).await;
        let stopped = logged("remove", &key, Some(&operator), started, r)?;
        Ok(Response::new(RemoveSandboxReply { stopped }))
    }
}

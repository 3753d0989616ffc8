//! gRPC handlers. Each one first re-validates its request (names, sizes,
//! limits) as if the gateway were hostile, then calls the sandbox registry.

use std::sync::Arc;
use std::time::Instant;

use moat_proto::broker::broker_server::Broker;
use moat_proto::broker::{
    HealthReply, HealthRequest, RunCommandReply, RunCommandRequest, StartSandboxReply,
    StartSandboxRequest, StopSandboxReply, StopSandboxRequest,
};
use tonic::{Request, Response, Status};

use crate::error::BrokerError;
use crate::sandbox::{CommandRequest, SandboxKey, Sandboxes};

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

fn logged<T>(
    op: &str,
    key: &SandboxKey,
    started: Instant,
    r: Result<T, BrokerError>,
) -> Result<T, Status> {
    let ms = started.elapsed().as_millis() as u64;
    match &r {
        Ok(_) => tracing::info!(op, sandbox = %key, ms, "ok"),
        Err(e) => tracing::warn!(op, sandbox = %key, ms, error = %e, "failed"),
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
        }))
    }

    async fn start_sandbox(
        &self,
        req: Request<StartSandboxRequest>,
    ) -> Result<Response<StartSandboxReply>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let key = SandboxKey::from_ref(req.sandbox.as_ref()).map_err(Status::from)?;
        let r = self.sandboxes.start(&key, req.config.as_ref()).await;
        let started_vm = logged("start", &key, started, r)?;
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
        logged("stop", &key, started, self.sandboxes.stop(&key).await)?;
        Ok(Response::new(StopSandboxReply {}))
    }

    async fn run_command(
        &self,
        req: Request<RunCommandRequest>,
    ) -> Result<Response<RunCommandReply>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let key = SandboxKey::from_ref(req.sandbox.as_ref()).map_err(Status::from)?;
        let cmd = CommandRequest {
            command: req.command,
            args: req.args,
            timeout_secs: req.timeout_secs,
        };
        let r = self.sandboxes.run_command(&key, cmd).await;
        Ok(Response::new(logged("command", &key, started, r)?))
    }
}

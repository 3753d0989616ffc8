//! `moat sandbox ls|rm`: the operator's view of stored sandboxes, through
//! the broker's admin socket (root only). `ls` lists every definition with
//! its state; `rm` forgets one (stopping it first with `--stop`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hyper_util::rt::TokioIo;
use moat_broker::config::BrokerConfig;
use moat_proto::broker::admin_client::AdminClient;
use moat_proto::broker::{ListSandboxesRequest, RemoveSandboxRequest, SandboxRef};
use tonic::transport::{Channel, Endpoint};

#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// List stored sandboxes (running and stopped) with their state.
    Ls(LsArgs),
    /// Forget a sandbox's definition (`NAMESPACE/NAME`).
    Rm(RmArgs),
}

#[derive(Args, Debug)]
pub struct Common {
    /// Broker configuration (names the admin socket).
    #[arg(
        long,
        env = "MOAT_BROKER_CONFIG",
        default_value = "/etc/moat/broker.toml"
    )]
    broker_config: PathBuf,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only this namespace.
    #[arg(long, short)]
    namespace: Option<String>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// `NAMESPACE/NAME` of the sandbox.
    sandbox: String,
    /// Stop it first if it is running (otherwise a running one is refused).
    #[arg(long)]
    stop: bool,
    #[command(flatten)]
    common: Common,
}

pub fn run(cmd: SandboxCommand) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cmd {
            SandboxCommand::Ls(a) => ls(a).await,
            SandboxCommand::Rm(a) => rm(a).await,
        }
    })
}

async fn client(common: &Common) -> Result<AdminClient<Channel>> {
    let config = BrokerConfig::load(&common.broker_config)?;
    let socket = config.admin_socket();
    if !socket.exists() {
        bail!(
            "the broker's admin socket {} does not exist: is moat-broker running (with {})?",
            socket.display(),
            common.broker_config.display()
        );
    }
    Ok(AdminClient::new(connect(&socket).await?))
}

async fn connect(socket: &Path) -> Result<Channel> {
    let path = socket.to_owned();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot connect to the broker's admin socket {} (run as root)",
                socket.display()
            )
        })
}

fn when(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(ms);
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

async fn ls(a: LsArgs) -> Result<()> {
    let mut c = client(&a.common).await?;
    let reply = c
        .list_sandboxes(ListSandboxesRequest {
            namespace: a.namespace.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if a.json {
        for s in &reply.sandboxes {
            println!(
                "{}",
                serde_json::json!({
                    "namespace": s.namespace,
                    "name": s.name,
                    "running": s.running,
                    "image": s.image,
                    "pid": s.pid,
                    "defined_at_ms": s.defined_at_ms,
                    "started_at_ms": s.started_at_ms,
                    "stopped_at_ms": s.stopped_at_ms,
                    "last_used_ms": s.last_used_ms,
                    "stop_reason": s.stop_reason,
                    "owner_key_id": s.owner_key_id,
                })
            );
        }
        return Ok(());
    }
    println!(
        "{:<20} {:<24} {:<8} {:<16} {:<10} {:<10} {:<12} NOTE",
        "NAMESPACE", "NAME", "STATE", "IMAGE", "STARTED", "LAST USE", "KEY"
    );
    for s in &reply.sandboxes {
        let (state, started, used) = if s.running {
            ("running", when(s.started_at_ms), when(s.last_used_ms))
        } else {
            ("stopped", when(s.stopped_at_ms), "-".to_string())
        };
        println!(
            "{:<20} {:<24} {:<8} {:<16} {:<10} {:<10} {:<12} {}",
            s.namespace, s.name, state, s.image, started, used, s.owner_key_id, s.stop_reason
        );
    }
    Ok(())
}

async fn rm(a: RmArgs) -> Result<()> {
    let Some((namespace, name)) = a.sandbox.split_once('/') else {
        bail!(
            "name the sandbox as NAMESPACE/NAME (e.g. default/{}), not {:?}",
            a.sandbox,
            a.sandbox
        );
    };
    let mut c = client(&a.common).await?;
    let reply = c
        .remove_sandbox(RemoveSandboxRequest {
            sandbox: Some(SandboxRef {
                namespace: namespace.into(),
                name: name.into(),
            }),
            stop: a.stop,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    println!(
        "removed {}/{}{}",
        namespace,
        name,
        if reply.stopped {
            " (stopped first)"
        } else {
            ""
        }
    );
    Ok(())
}

//! One running VM: how it is launched (slot, directory, writable disk,
//! cgroup, jailed VM process, console, agent handshake) and how it is torn
//! down. Every step that allocates something is undone by [`VmResources`] on
//! any failure, so a failed start leaves no process, cgroup, disk or socket.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moat_proto::agent::{guest_message, host_message, Script, Setup, Shutdown};
use moat_proto::state::{vm_record::Phase, VmRecord};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, Instant};

use crate::agent::AgentClient;
use crate::cgroups::{Cgroup, CgroupLimits, CgroupManager};
use crate::config::BrokerConfig;
use crate::console::ConsoleLog;
use crate::disk::create_writable_disk;
use crate::error::BrokerError;
use crate::jail::{
    self, JailLayout, JailMode, JailSpec, AGENT_SOCKET, CONSOLE_SOCKET, WRITABLE_DISK,
};
use crate::quota::{NamespacePermit, NamespaceQuota};
use crate::slots::{Slot, SlotAllocator};
use crate::vmm::{Backends, VmSpec};

use super::journal::Journal;
use super::process::{self, ProcessIdentity};
use super::spec::SandboxSpec;

/// Bytes of console output kept per VM.
const CONSOLE_BYTES: usize = 64 << 10;
/// How long a pool VM's interpreters may take to start: the guest allows
/// each 30 s, and there are at most two.
const WARM_WAIT: Duration = Duration::from_secs(75);
/// Console lines quoted in a failed start's error.
const CONSOLE_LINES_IN_ERRORS: usize = 15;

/// What every launch shares.
#[derive(Debug)]
pub struct LaunchContext {
    pub config: Arc<BrokerConfig>,
    pub vmm: Backends,
    pub cgroups: CgroupManager,
    pub slots: SlotAllocator,
    pub running: Arc<Semaphore>,
    pub namespaces: NamespaceQuota,
    pub initramfs: PathBuf,
    pub jail_mode: JailMode,
    pub images: Arc<crate::images::Images>,
    pub network: Arc<crate::network::Networking>,
    pub state: Arc<crate::state::StateStore>,
}

impl LaunchContext {
    /// Directory holding the per-VM jail roots (mount points, empty on the host).
    pub fn jails_dir(&self) -> PathBuf {
        self.config.state_dir.join("jails")
    }

    /// Directory holding per-VM directories.
    pub fn vms_dir(&self) -> PathBuf {
        self.config.state_dir.join("vms")
    }
}

/// How the VM process ended, once it has.
pub type ExitWatch = watch::Receiver<Option<String>>;

/// A VM whose guest agent answered.
#[derive(Debug)]
pub struct RunningVm {
    /// As defined by the caller (compared by a second start).
    pub spec: SandboxSpec,
    /// What runs: the definition with the image's config applied.
    pub effective: SandboxSpec,
    pub agent: AgentClient,
    pub exit: ExitWatch,
    pub pid: Option<u32>,
    /// When the agent answered.
    pub started_at: std::time::SystemTime,
    /// Permits for calls in flight (`limits.max_calls_per_sandbox`).
    calls: Arc<Semaphore>,
    repl_sessions: super::exec::ReplSessions,
    /// CPU use over the last sampling interval, percent of one CPU (f64 bits;
    /// NaN until the first interval has passed).
    cpu_percent: Arc<AtomicU64>,
    /// When a call last began or ended (ms since the Unix epoch).
    last_used: Arc<AtomicU64>,
    /// Set before the broker stops the VM, so its exit is not reported as
    /// unexpected.
    stopping: Arc<AtomicBool>,
    resources: VmResources,
}

/// Everything one call into a running VM needs; holds a call permit.
#[derive(Debug)]
pub struct CallHandle {
    pub agent: AgentClient,
    pub spec: SandboxSpec,
    pub exit: ExitWatch,
    pub repl_sessions: super::exec::ReplSessions,
    last_used: Arc<AtomicU64>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for CallHandle {
    fn drop(&mut self) {
        self.last_used
            .store(crate::state::now_ms(), Ordering::Relaxed);
    }
}

/// What a VM holds on the host; released exactly once.
#[derive(Debug)]
struct VmResources {
    slot: Slot,
    dir: PathBuf,
    cgroup: Option<Cgroup>,
    network: Option<crate::network::SandboxNetwork>,
    /// The sandbox's places under `limits.max_sandboxes` and its
    /// namespace's limit; a pool VM has none until it is claimed.
    permits: Option<(OwnedSemaphorePermit, NamespacePermit)>,
}

impl VmResources {
    /// A free slot and its VM directory's path, nothing allocated yet;
    /// `Busy(busy)` when every slot is taken.
    fn take(
        ctx: &LaunchContext,
        permits: Option<(OwnedSemaphorePermit, NamespacePermit)>,
        busy: &str,
    ) -> Result<Self, BrokerError> {
        let slot = ctx
            .slots
            .take()
            .ok_or_else(|| BrokerError::Busy(busy.to_owned()))?;
        Ok(VmResources {
            slot,
            dir: ctx.vms_dir().join(slot.index.to_string()),
            cgroup: None,
            network: None,
            permits,
        })
    }

    /// Kills whatever is left in the cgroup, removes it, the VM directory
    /// (disk, sockets) and frees the slot.
    async fn release(mut self, ctx: &LaunchContext) -> Result<(), BrokerError> {
        let mut problems = Vec::new();
        if let Some(net) = self.network.take() {
            if let Err(e) = net.detach(&ctx.network).await {
                problems.push(format!("network: {e}"));
            }
        }
        if let Some(cg) = self.cgroup {
            match tokio::task::spawn_blocking(move || cg.remove()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(e.to_string()),
                Err(e) => problems.push(e.to_string()),
            }
        }
        match tokio::fs::remove_dir_all(&self.dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => problems.push(format!("remove {}: {e}", self.dir.display())),
        }
        let root = ctx.jails_dir().join(self.slot.index.to_string());
        match tokio::fs::remove_dir(&root).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => problems.push(format!("remove {}: {e}", root.display())),
        }
        if problems.is_empty() {
            ctx.slots.release(self.slot);
            Ok(())
        } else {
            // The slot stays taken: its uid may still own something.
            Err(BrokerError::Failed(format!(
                "cleanup incomplete: {}",
                problems.join("; ")
            )))
        }
    }
}

fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("VM process exited with status {code}"),
            (_, Some(9)) => "VM process was killed by SIGKILL (out of memory for its cgroup, or killed by the broker)".into(),
            (_, Some(libc::SIGSYS)) => "VM process was killed by SIGSYS: it made a system call outside its seccomp allow-list (jailer/seccomp); the host's kernel audit log (type=1326) names the call".into(),
            (_, Some(sig)) => format!("VM process was killed by signal {sig}"),
            _ => "VM process ended".into(),
        },
        Err(e) => format!("VM process could not be waited for: {e}"),
    }
}

/// How often a VM's CPU use is sampled for metrics.
const CPU_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Samples the cgroup's CPU time every [`CPU_SAMPLE_INTERVAL`] until the VM
/// exits, publishing the last interval's use in percent of one CPU.
fn spawn_cpu_sampler(cgroup: Option<Cgroup>, exit: ExitWatch) -> Arc<AtomicU64> {
    let out = Arc::new(AtomicU64::new(f64::NAN.to_bits()));
    let Some(cgroup) = cgroup else { return out };
    let published = out.clone();
    tokio::spawn(async move {
        let mut last: Option<(Instant, u64)> = None;
        let mut tick = tokio::time::interval(CPU_SAMPLE_INTERVAL);
        while exit.borrow().is_none() {
            tick.tick().await;
            let Some(now_ns) = cgroup.cpu_usage_ns() else {
                break;
            };
            let now = Instant::now();
            if let Some((t0, ns0)) = last {
                let wall = now.duration_since(t0).as_nanos() as f64;
                if wall > 0.0 {
                    let pct = now_ns.saturating_sub(ns0) as f64 / wall * 100.0;
                    published.store(pct.to_bits(), Ordering::Relaxed);
                }
            }
            last = Some((now, now_ns));
        }
    });
    out
}

/// Console lines logged when a VM ends without the broker stopping it.
const CONSOLE_LINES_ON_EXIT: usize = 20;

/// Logs, with the console's last lines, a VM that ends while nobody stops
/// it (a guest power-off, a crashed agent, a kernel panic, a killed VM
/// process), so the operator sees why. Returns the flag `stop` sets first.
fn report_unexpected_exit(hostname: &str, exit: ExitWatch, console: ConsoleLog) -> Arc<AtomicBool> {
    let stopping = Arc::new(AtomicBool::new(false));
    let flag = stopping.clone();
    let hostname = hostname.to_owned();
    tokio::spawn(async move {
        let status = wait_exit(exit).await;
        if !flag.load(Ordering::Relaxed) {
            tracing::warn!(
                sandbox = hostname,
                %status,
                // Debug-quoted: guest text never forms log lines of its own.
                console = ?console.tail(CONSOLE_LINES_ON_EXIT),
                "VM ended without a stop request"
            );
        }
    });
    stopping
}

/// Waits until the VM process has exited (returns at once if it has).
pub async fn wait_exit(mut exit: ExitWatch) -> String {
    loop {
        if let Some(s) = exit.borrow_and_update().clone() {
            return s;
        }
        if exit.changed().await.is_err() {
            return "VM process state unknown".into();
        }
    }
}

/// Who a sandbox's VM process runs as: the volume owner when it has volumes
/// (what it writes is the operator's configured uid's on the host, and
/// readable by the next sandbox mounting it), otherwise its slot's own uid.
fn vm_owner(ctx: &LaunchContext, spec: &SandboxSpec, slot: Slot) -> (u32, u32) {
    if spec.volumes.is_empty() {
        (slot.uid, slot.uid)
    } else {
        (ctx.config.volumes.owner_uid, ctx.config.volumes.owner_gid)
    }
}

/// Launches a VM for `spec` (or claims a ready one from `pool`) and waits
/// for its agent, keeping `journal` in step (see `journal.rs`).
pub async fn launch(
    ctx: &LaunchContext,
    pool: Option<&super::pool::Pool>,
    namespace: &str,
    hostname: &str,
    spec: SandboxSpec,
    journal: &mut Journal,
) -> Result<RunningVm, BrokerError> {
    let limits = &ctx.config.limits;
    let image = super::image::prepare(ctx, hostname, &spec).await?;
    let namespace_permit = ctx.namespaces.try_take(namespace).ok_or_else(|| {
        BrokerError::Busy(format!(
            "namespace {namespace} already runs {} sandboxes, its limit; stop one first",
            ctx.namespaces.max()
        ))
    })?;
    let permit = ctx.running.clone().try_acquire_owned().map_err(|_| {
        BrokerError::Busy(format!(
            "{} sandboxes are already running, the server's limit; stop one or retry later",
            limits.max_sandboxes
        ))
    })?;
    let claimed = match pool {
        Some(pool) => pool.take(&spec, &image).await,
        None => None,
    };
    let (res, booted, (uid, gid)) = match claimed {
        Some(vm) => {
            let mut res = vm.resources;
            res.permits = Some((permit, namespace_permit));
            // The pool serves no sandbox with volumes: its slot's uid.
            let owner = vm_owner(ctx, &spec, res.slot);
            let recorded = journal
                .save(|r| r.vm = Some(starting_record(res.slot, owner)))
                .await;
            let booted = match recorded {
                Ok(()) => {
                    tracing::info!(
                        sandbox = hostname,
                        slot = res.slot.index,
                        "claimed a VM from the warm pool"
                    );
                    Ok(vm.booted)
                }
                Err(e) => {
                    kill_and_wait(&res, vm.booted.exit).await;
                    Err(e)
                }
            };
            (res, booted, owner)
        }
        None => {
            let mut res = VmResources::take(
                ctx,
                Some((permit, namespace_permit)),
                "no free sandbox uid; stop a sandbox or retry later",
            )?;
            let owner = vm_owner(ctx, &spec, res.slot);
            let booted = boot_cold(
                ctx, namespace, hostname, &spec, &image, &mut res, owner, journal,
            )
            .await;
            (res, booted, owner)
        }
    };
    let slot = res.slot;
    let ready = match booted {
        Ok(parts) => {
            let network = res.network.as_ref().map(|net| guest_network(ctx, net));
            let wait = Duration::from_secs(u64::from(limits.boot_timeout_secs));
            let done = match super::identity::fresh(hostname) {
                Ok(identity) => {
                    setup(
                        &parts.agent,
                        &image.effective,
                        limits.background_log_bytes,
                        wait,
                        network,
                        identity,
                    )
                    .await
                }
                Err(e) => Err(e.to_string()),
            };
            match done {
                Ok(()) => Ok(parts),
                Err(e) => {
                    kill_and_wait(&res, parts.exit).await;
                    Err(start_failed(
                        hostname,
                        &format!(
                            "sandbox setup (identity, volumes, network, scripts, exec) failed: {e}"
                        ),
                        &parts.console,
                    ))
                }
            }
        }
        Err(e) => Err(e),
    };
    let started_at = std::time::SystemTime::now();
    let recorded = match ready {
        Ok(parts) => {
            let identity = parts.identity.unwrap_or(ProcessIdentity {
                pid: 0,
                start_ticks: 0,
            });
            let running = VmRecord {
                phase: Phase::Running as i32,
                slot: slot.index,
                uid,
                gid,
                pid: identity.pid,
                pid_start_ticks: identity.start_ticks,
                started_at_ms: unix_ms(started_at),
                image: image.runtime.as_ref().map(super::image::to_record),
            };
            match journal.save(|r| r.vm = Some(running)).await {
                Ok(()) => Ok(parts),
                Err(e) => {
                    kill_and_wait(&res, parts.exit).await;
                    Err(e)
                }
            }
        }
        Err(e) => Err(e),
    };
    match recorded {
        Ok(parts) => Ok(RunningVm {
            cpu_percent: spawn_cpu_sampler(res.cgroup.clone(), parts.exit.clone()),
            stopping: report_unexpected_exit(hostname, parts.exit.clone(), parts.console),
            started_at,
            spec,
            effective: image.effective,
            agent: parts.agent,
            exit: parts.exit,
            pid: parts.identity.map(|i| i.pid),
            calls: Arc::new(Semaphore::new(limits.max_calls_per_sandbox as usize)),
            repl_sessions: Default::default(),
            last_used: Arc::new(AtomicU64::new(crate::state::now_ms())),
            resources: res,
        }),
        Err(e) => {
            if let Err(cleanup) = res.release(ctx).await {
                tracing::error!(%cleanup, "cleanup after failed start");
            } else if journal.record().vm.is_some() {
                if let Err(w) = journal.save(|r| r.vm = None).await {
                    tracing::error!(error = %w, "the failed start stays recorded; the next broker start cleans it");
                }
            }
            Err(e)
        }
    }
}

/// The record of a VM being started in `slot` for `owner`.
fn starting_record(slot: Slot, (uid, gid): (u32, u32)) -> VmRecord {
    VmRecord {
        phase: Phase::Starting as i32,
        slot: slot.index,
        uid,
        gid,
        ..Default::default()
    }
}

/// Kills what runs in the VM's cgroup and waits (bounded) for the VM
/// process to be gone.
async fn kill_and_wait(res: &VmResources, exit: ExitWatch) {
    if let Some(cg) = &res.cgroup {
        cg.kill_all();
    }
    let _ = timeout(Duration::from_secs(5), wait_exit(exit)).await;
}

/// A failed start's error, with the console's last lines.
fn start_failed(hostname: &str, cause: &str, console: &ConsoleLog) -> BrokerError {
    let tail = console.tail(CONSOLE_LINES_IN_ERRORS);
    BrokerError::Failed(format!(
        "sandbox {hostname} failed to start: {cause}; console: {}",
        if tail.is_empty() {
            "(empty)".to_string()
        } else {
            tail
        }
    ))
}

/// A cold start's steps up to the agent's answer: the STARTING record, the
/// volumes and the network, then the boot.
#[allow(clippy::too_many_arguments)]
async fn boot_cold(
    ctx: &LaunchContext,
    namespace: &str,
    hostname: &str,
    spec: &SandboxSpec,
    image: &super::image::PreparedImage,
    res: &mut VmResources,
    owner: (u32, u32),
    journal: &mut Journal,
) -> Result<Booted, BrokerError> {
    if !spec.volumes.is_empty() && ctx.jail_mode == JailMode::Unjailed {
        return Err(BrokerError::InvalidArgument(
            "volumes need the jail, and this server runs development_unjailed; remove config.volumes".into(),
        ));
    }
    let volumes = open_volumes(ctx, namespace, spec)?;
    journal
        .save(|r| r.vm = Some(starting_record(res.slot, owner)))
        .await?;
    if spec.has_nic() {
        let attach_started = Instant::now();
        let net = ctx
            .network
            .attach(namespace, hostname, res.slot.index, spec.scope, &spec.ports)
            .await
            .map_err(|e| {
                if e.is_caller_error() {
                    BrokerError::InvalidArgument(e.to_string())
                } else {
                    BrokerError::Failed(format!("cannot set up the sandbox's network: {e}"))
                }
            })?;
        tracing::info!(
            sandbox = hostname,
            scope = %spec.scope,
            address = %net.nic.guest_addr,
            tap = %net.nic.ifname,
            attach_us = attach_started.elapsed().as_micros() as u64,
            "network attached"
        );
        res.network = Some(net);
    }
    boot(ctx, hostname, image, res, volumes, owner).await
}

/// A warm-pool VM: booted in its own slot, jailed, its agent answering and
/// its interpreters warmed; no sandbox, permits, NIC or volumes yet.
#[derive(Debug)]
pub struct PooledVm {
    /// The image disk it booted (a claim must want the same one).
    pub image_disk: PathBuf,
    booted: Booted,
    resources: VmResources,
}

impl PooledVm {
    /// Whether the VM process still runs.
    pub fn is_alive(&self) -> bool {
        self.booted.exit.borrow().is_none()
    }

    /// Whether its agent answers a Hello within `wait`.
    pub async fn answers(&self, wait: Duration) -> bool {
        let hello = host_message::Body::Hello(moat_proto::agent::Hello {
            protocol_version: moat_proto::agent::PROTOCOL_VERSION,
        });
        matches!(
            self.booted.agent.call(hello, wait).await,
            Ok(reply) if matches!(reply.body, Some(guest_message::Body::Hello(_)))
        )
    }

    /// The console's last lines (why it died, when it did).
    pub fn console_tail(&self) -> String {
        self.booted.console.tail(CONSOLE_LINES_ON_EXIT)
    }

    /// Kills the VM and releases everything it held.
    pub async fn destroy(self, ctx: &LaunchContext) -> Result<(), BrokerError> {
        kill_and_wait(&self.resources, self.booted.exit).await;
        self.resources.release(ctx).await
    }
}

/// Boots a VM for the warm pool: the image `spec` names, at its size, with
/// no NIC or volumes, then starts the interpreters of `warm`. Named
/// `pool-<slot>` until a sandbox claims it.
pub async fn boot_pooled(
    ctx: &LaunchContext,
    spec: &SandboxSpec,
    warm: &[String],
) -> Result<PooledVm, BrokerError> {
    let image = super::image::prepare(ctx, "warm pool", spec).await?;
    let mut res = VmResources::take(
        ctx,
        None,
        "no free sandbox uid for a pool VM (sandbox_ids.count)",
    )?;
    let slot = res.slot;
    let owner = (slot.uid, slot.uid);
    let name = format!("pool-{}", slot.index);
    let booted = match boot(ctx, &name, &image, &mut res, Vec::new(), owner).await {
        Ok(b) => b,
        Err(e) => {
            if let Err(cleanup) = res.release(ctx).await {
                tracing::error!(%cleanup, "cleanup after a failed pool boot");
            }
            return Err(e);
        }
    };
    let vm = PooledVm {
        image_disk: image.disk.clone(),
        booted,
        resources: res,
    };
    if !warm.is_empty() {
        let eff = &image.effective;
        let req = moat_proto::agent::Warm {
            languages: warm.to_vec(),
            env: super::exec::command_env(eff, &[]),
            workdir: eff.workdir.clone().unwrap_or_else(|| "/".into()),
            user: eff.user.clone().unwrap_or_default(),
        };
        let warmed = vm
            .booted
            .agent
            .call(host_message::Body::Warm(req), WARM_WAIT)
            .await;
        match warmed {
            Ok(reply) => match reply.body {
                Some(guest_message::Body::Warm(w)) => {
                    tracing::debug!(pool_vm = name, started = ?w.started, "interpreters warm")
                }
                _ => tracing::warn!(
                    pool_vm = name,
                    reply = %crate::agent::unexpected(&reply),
                    "interpreters not warmed (the image may lack them); the first cell starts one"
                ),
            },
            Err(e) => {
                let tail = vm.console_tail();
                if let Err(cleanup) = vm.destroy(ctx).await {
                    tracing::error!(%cleanup, "cleanup after a failed pool warm-up");
                }
                return Err(BrokerError::Failed(format!(
                    "pool VM {name}: warming the interpreters failed: {e}; console: {tail}"
                )));
            }
        }
    }
    Ok(vm)
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug)]
struct Booted {
    agent: AgentClient,
    exit: ExitWatch,
    identity: Option<ProcessIdentity>,
    console: ConsoleLog,
}

/// Opens every volume's host directory beneath its root (again: the
/// definition was checked at start, but the tree may have changed since).
fn open_volumes(
    ctx: &LaunchContext,
    namespace: &str,
    spec: &SandboxSpec,
) -> Result<Vec<crate::volumes::ResolvedVolume>, BrokerError> {
    spec.volumes
        .iter()
        .zip(&spec.volume_strings)
        .map(|(req, original)| {
            crate::volumes::resolve_volume(original, req, namespace, &ctx.config.volumes)
                .map_err(|e| BrokerError::InvalidArgument(e.to_string()))
        })
        .collect()
}

async fn boot(
    ctx: &LaunchContext,
    hostname: &str,
    image: &super::image::PreparedImage,
    res: &mut VmResources,
    volumes: Vec<crate::volumes::ResolvedVolume>,
    (uid, gid): (u32, u32),
) -> Result<Booted, BrokerError> {
    let spec = &image.effective;
    let cfg = &ctx.config;
    let limits = &cfg.limits;
    let fail = |what: &str, e: &dyn std::fmt::Display| BrokerError::Failed(format!("{what}: {e}"));
    // A leftover directory of this slot (crash) is removed first.
    let _ = tokio::fs::remove_dir_all(&res.dir).await;
    make_private_dir(&res.dir, uid, gid).map_err(|e| fail("cannot create the VM directory", &e))?;
    let writable = res.dir.join(WRITABLE_DISK);
    create_writable_disk(&writable, limits.writable_disk_mib, uid, gid)
        .await
        .map_err(|e| fail("cannot create the writable disk", &e))?;

    let cg_limits = CgroupLimits {
        memory_bytes: (u64::from(spec.memory_mib) + u64::from(limits.vmm_overhead_mib)) << 20,
        cpus: spec.cpus,
        pids_max: limits.vmm_pids_max,
        io: limits.disk_io(),
    };
    let cgroup = ctx
        .cgroups
        .create(&format!("vm-{}", res.slot.index), &cg_limits)
        .map_err(|e| fail("cannot create the sandbox cgroup", &e))?;
    let procs = cgroup.procs_files();
    res.cgroup = Some(cgroup);

    let layout = match ctx.jail_mode {
        JailMode::Jailer(_) => JailLayout::jailed,
        JailMode::Unjailed => JailLayout::unjailed,
    }(
        cfg.boot.kernel.clone(),
        ctx.initramfs.clone(),
        image.disk.clone(),
        res.dir.clone(),
    );
    debug_assert_eq!(layout.host_vm_file(WRITABLE_DISK), writable);
    let agent_socket = layout.host_vm_file(AGENT_SOCKET);
    let console_socket = layout.host_vm_file(CONSOLE_SOCKET);
    let root = ctx.jails_dir().join(res.slot.index.to_string());
    let _ = tokio::fs::remove_dir(&root).await;
    make_private_dir(&root, 0, 0).map_err(|e| fail("cannot create the jail root", &e))?;
    let mut fds: Vec<std::os::fd::OwnedFd> = Vec::new();
    let nic = match res.network.as_mut() {
        Some(net) => {
            let tap = net
                .take_tap()
                .ok_or_else(|| BrokerError::Failed("the sandbox's tap is gone".into()))?;
            fds.push(tap);
            Some(crate::vmm::VmNic {
                tap_fd: 3,
                mac: net.nic.mac.clone(),
            })
        }
        None => None,
    };
    let keeps_tap = nic.is_some();
    // Every volume is bound at /vol/<i> inside the jail (read-only binds
    // for `:ro`, enforced by the host kernel) and /vol is one 9p share: one
    // device however many volumes.
    let vmm = ctx.vmm.for_sandbox(!volumes.is_empty());
    let mut shares = Vec::new();
    let mut volume_binds = Vec::new();
    if !volumes.is_empty() {
        shares.push(crate::vmm::VmShare {
            path: PathBuf::from(VOLUMES_INSIDE),
            tag: VOLUMES_TAG.into(),
            read_only: false,
        });
    }
    for (i, v) in volumes.into_iter().enumerate() {
        volume_binds.push((PathBuf::from(format!("{VOLUMES_INSIDE}/{i}")), !v.read_only));
        tracing::info!(sandbox = hostname, host = %v.host.display(), container = %v.container, read_only = v.read_only, "volume");
        fds.push(v.dir);
    }
    let vm_spec = VmSpec {
        kernel: layout.kernel.inside.clone(),
        initramfs: layout.initramfs.inside.clone(),
        image_disk: layout.image.inside.clone(),
        writable_disk: layout.in_vm_dir(WRITABLE_DISK),
        agent_socket: layout.in_vm_dir(AGENT_SOCKET),
        console_socket: layout.in_vm_dir(CONSOLE_SOCKET),
        memory_mib: spec.memory_mib,
        cpus: spec.cpus,
        hostname: hostname.to_string(),
        guest_pids_max: limits.guest_pids_max,
        test_hooks: cfg.testing.agent_hooks,
        disk_io: limits.disk_io(),
        nic,
        shares,
    };
    let plan = vmm.launch_plan(&vm_spec);
    let jail = JailSpec {
        uid,
        gid,
        extra_groups: vmm.extra_groups(),
        cgroup_procs: procs,
        dir: res.dir.clone(),
        root,
        layout,
        devices: vmm.devices(),
        hostname: format!("moat-vm-{}", res.slot.index),
        rlimit_nofile: 1024,
        rlimit_fsize: u64::from(limits.writable_disk_mib) << 20,
        // RLIMIT_NPROC counts every process of the uid: the volume owner's
        // is shared by all sandboxes with volumes.
        rlimit_nproc: u64::from(limits.vmm_pids_max)
            * if uid != res.slot.uid {
                u64::from(limits.max_sandboxes)
            } else {
                1
            },
        keeps_tap,
        volume_binds,
    };
    let started = Instant::now();
    let mut child = jail::spawn(&plan, &jail, &ctx.jail_mode, fds)
        .map_err(|e| fail("cannot start the VM", &e))?;
    let pid = child.id();
    let identity = pid.and_then(ProcessIdentity::of);
    let console = ConsoleLog::new(CONSOLE_BYTES);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(console.clone().follow(out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(console.clone().follow(err));
    }
    let (exit_tx, exit_rx) = watch::channel(None);
    let sandbox = hostname.to_string();
    tokio::spawn(async move {
        let status = child.wait().await;
        let seccomp_kill = status.as_ref().is_ok_and(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.signal() == Some(libc::SIGSYS)
        });
        let description = describe_exit(status);
        if seccomp_kill {
            tracing::error!(%sandbox, uid, "{description}");
        } else {
            tracing::info!(%sandbox, uid, "{description}");
        }
        let _ = exit_tx.send(Some(description));
    });

    let boot_timeout = Duration::from_secs(u64::from(limits.boot_timeout_secs));
    let deadline = started + boot_timeout;
    let handshake = async {
        // The VMM waits for this connection before running the guest.
        console.attach(&console_socket, uid, deadline).await?;
        AgentClient::connect(
            &agent_socket,
            uid,
            limits.max_agent_frame_bytes as usize,
            deadline,
            true,
        )
        .await
        .map_err(|e| match e {
            crate::agent::AgentError::Timeout(_) => format!(
                "the guest did not come up within {boot_timeout:?} (limits.boot_timeout_secs)"
            ),
            other => format!("the guest agent did not answer: {other}"),
        })
    };
    let outcome = tokio::select! {
        r = handshake => r,
        status = wait_exit(exit_rx.clone()) => Err(format!("{status} during boot")),
    };
    match outcome {
        Ok((agent, hello)) => {
            tracing::info!(
                sandbox = hostname,
                pid,
                uid,
                boot_ms = started.elapsed().as_millis() as u64,
                kernel = %hello.kernel_release,
                "guest agent ready"
            );
            Ok(Booted {
                agent,
                exit: exit_rx,
                identity,
                console,
            })
        }
        Err(cause) => {
            kill_and_wait(res, exit_rx).await;
            Err(start_failed(hostname, &cause, &console))
        }
    }
}

/// Gives the guest its identity, mounts, network and scripts and starts
/// its background `exec` / `start` script.
async fn setup(
    agent: &AgentClient,
    spec: &SandboxSpec,
    log_max_bytes: u64,
    wait: Duration,
    network: Option<moat_proto::agent::Network>,
    identity: moat_proto::agent::Identity,
) -> Result<(), String> {
    let body = host_message::Body::Setup(Setup {
        scripts: spec
            .scripts
            .iter()
            .map(|(name, content)| Script {
                name: name.clone(),
                content: content.clone(),
            })
            .collect(),
        shell: spec.shell.clone(),
        env: super::exec::command_env(spec, &[]),
        workdir: spec.workdir.clone().unwrap_or_else(|| "/".into()),
        exec: spec.exec.clone().unwrap_or_default(),
        log_max_bytes,
        user: spec.user.clone().unwrap_or_default(),
        mounts: spec
            .volumes
            .iter()
            .enumerate()
            .map(|(i, v)| moat_proto::agent::Mount {
                tag: VOLUMES_TAG.into(),
                path: v.container.clone(),
                read_only: v.read_only,
                subdir: i.to_string(),
            })
            .collect(),
        network,
        identity: Some(Box::new(identity)),
    });
    match agent.call(body, wait).await {
        Ok(reply) => match reply.body {
            Some(guest_message::Body::Setup(r)) => {
                tracing::info!(background_pid = r.background_pid, "sandbox setup done");
                Ok(())
            }
            _ => Err(crate::agent::unexpected(&reply).to_string()),
        },
        Err(e) => Err(e.to_string()),
    }
}

/// The 9p share holding every volume, and where it is inside the jail.
const VOLUMES_TAG: &str = "moatvol";
const VOLUMES_INSIDE: &str = "/vol";

/// What the guest agent configures on its NIC.
fn guest_network(
    ctx: &LaunchContext,
    net: &crate::network::SandboxNetwork,
) -> moat_proto::agent::Network {
    use crate::network::firewall::Scope;
    moat_proto::agent::Network {
        mac: net.nic.mac.clone(),
        address: net.nic.guest_addr.to_string(),
        prefix_len: u32::from(net.nic.prefix_len),
        // Scope none only answers its published ports: no route out.
        gateway: if net.scope >= Scope::Group {
            net.nic.host_addr.to_string()
        } else {
            String::new()
        },
        nameservers: ctx.network.nameservers(net),
    }
}

/// Creates `dir` mode 0700 owned by `uid:gid` (and its parents as root 0711).
fn make_private_dir(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
}

impl RunningVm {
    /// A handle for one call, or `None` when the sandbox's call limit is reached.
    pub fn call_handle(&self) -> Option<CallHandle> {
        let permit = self.calls.clone().try_acquire_owned().ok()?;
        self.last_used
            .store(crate::state::now_ms(), Ordering::Relaxed);
        Some(CallHandle {
            agent: self.agent.clone(),
            spec: self.effective.clone(),
            exit: self.exit.clone(),
            repl_sessions: self.repl_sessions.clone(),
            last_used: self.last_used.clone(),
            _permit: permit,
        })
    }

    /// When a call last began or ended, ms since the Unix epoch.
    pub fn last_used_ms(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// Whether a call is running in it now.
    pub fn has_calls_in_flight(&self, max_calls: u32) -> bool {
        self.calls.available_permits() < max_calls as usize
    }

    /// Stops the VM: asks the guest to power off, kills the VM process after
    /// `grace`, then releases everything it held.
    pub async fn stop(self, ctx: &LaunchContext, grace: Duration) -> Result<(), BrokerError> {
        self.stopping.store(true, Ordering::Relaxed);
        if self.exit.borrow().is_none() {
            let _ = self
                .agent
                .notify(host_message::Body::Shutdown(Shutdown {}))
                .await;
            if timeout(grace, wait_exit(self.exit.clone())).await.is_err() {
                tracing::warn!(
                    pid = self.pid,
                    "guest did not power off within {grace:?}; killing the VM process"
                );
                if let Some(cg) = &self.resources.cgroup {
                    cg.kill_all();
                }
                let _ = timeout(Duration::from_secs(10), wait_exit(self.exit.clone())).await;
            }
        }
        self.resources.release(ctx).await
    }

    /// CPU use over the last sampling interval, percent of one CPU.
    pub fn cpu_percent(&self) -> Option<f64> {
        let v = f64::from_bits(self.cpu_percent.load(Ordering::Relaxed));
        v.is_finite().then_some(v)
    }

    /// Bytes the writable disk occupies on the host (allocated blocks).
    pub fn disk_usage_bytes(&self) -> Option<u64> {
        // The VM process owns this directory: never follow a link in it.
        let meta = std::fs::symlink_metadata(self.resources.dir.join(WRITABLE_DISK)).ok()?;
        Some(std::os::unix::fs::MetadataExt::blocks(&meta) * 512)
    }

    /// The guest's address on its NIC, when it has one.
    pub fn guest_address(&self) -> Option<String> {
        self.resources
            .network
            .as_ref()
            .map(|n| n.nic.guest_addr.to_string())
    }

    /// Whether the VM process is still alive.
    pub fn is_alive(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Memory the VM's cgroup is charged now, bytes.
    pub fn cgroup_memory_bytes(&self) -> Option<u64> {
        self.resources
            .cgroup
            .as_ref()
            .and_then(Cgroup::memory_bytes)
    }
}

/// How long a re-adopted VM's agent has to answer a Hello.
const ADOPT_AGENT_WAIT: Duration = Duration::from_secs(10);
/// How long the console socket of a re-adopted VM may take to accept.
const ADOPT_CONSOLE_WAIT: Duration = Duration::from_secs(1);

/// Takes back a VM an earlier broker started, as its record describes it:
/// the slot, the jailer's waiting process (same pid and start time, in the
/// slot's cgroup), the console and agent sockets, and its network. Anything
/// that does not match is an error (the caller logs why); what was found is
/// left for the broker's sweep of slots nothing was re-adopted into.
pub async fn adopt(
    ctx: &LaunchContext,
    namespace: &str,
    hostname: &str,
    spec: SandboxSpec,
    rec: &VmRecord,
) -> Result<RunningVm, String> {
    let limits = &ctx.config.limits;
    // The process is identified before the slot is taken: records are
    // adopted concurrently, and a stale record (its process gone) must fail
    // without holding the slot a live record of the same slot needs.
    let identity = ProcessIdentity {
        pid: rec.pid,
        start_ticks: rec.pid_start_ticks,
    };
    let pidfd = identity.open()?;
    let cgroup = ctx
        .cgroups
        .existing(&format!("vm-{}", rec.slot))
        .ok_or("its cgroup is gone")?;
    if !i32::try_from(rec.pid).is_ok_and(|p| cgroup.pids().contains(&p)) {
        return Err(format!("process {} is not in its cgroup", rec.pid));
    }
    let slot = ctx
        .slots
        .claim(rec.slot)
        .ok_or_else(|| format!("slot {} is out of range or taken twice", rec.slot))?;
    let dir = ctx.vms_dir().join(slot.index.to_string());
    let cgroup = Some(cgroup);
    let namespace_permit = ctx.namespaces.try_take(namespace);
    let permit = ctx.running.clone().try_acquire_owned().ok();
    let (Some(namespace_permit), Some(permit)) = (namespace_permit, permit) else {
        // Not cleaned here (see the failure branch below): the sweep does.
        ctx.slots.release(slot);
        return Err("the server's or namespace's sandbox limit is now lower than what runs".into());
    };
    let mut res = VmResources {
        slot,
        dir,
        cgroup,
        network: None,
        permits: Some((permit, namespace_permit)),
    };
    let adopted = async {
        let expected = vm_owner(ctx, &spec, slot);
        if (rec.uid, rec.gid) != expected {
            return Err(format!(
                "it runs as {}:{}, its definition says {}:{}",
                rec.uid, rec.gid, expected.0, expected.1
            ));
        }
        let exit = process::watch_exit(
            pidfd,
            "VM process ended (it was re-adopted: its exit status went to the process that reaped it)".into(),
        );
        let deadline = Instant::now() + ADOPT_AGENT_WAIT;
        let console_deadline = Instant::now() + ADOPT_CONSOLE_WAIT;
        let console = ConsoleLog::new(CONSOLE_BYTES);
        if let Err(e) = console
            .attach(&res.dir.join(CONSOLE_SOCKET), rec.uid, console_deadline)
            .await
        {
            tracing::warn!(sandbox = hostname, error = %e, "re-adopted without its console");
        }
        let (agent, _hello) = AgentClient::connect(
            &res.dir.join(AGENT_SOCKET),
            rec.uid,
            limits.max_agent_frame_bytes as usize,
            deadline,
            false,
        )
        .await
        .map_err(|e| format!("its agent did not answer: {e}"))?;
        if spec.has_nic() {
            let net = ctx
                .network
                .adopt(namespace, hostname, slot.index, spec.scope, &spec.ports)
                .await
                .map_err(|e| format!("its network: {e}"))?;
            res.network = Some(net);
        }
        let effective = match &rec.image {
            Some(runtime) => {
                super::image::apply_config(&spec, &super::image::from_record(runtime), limits)
                    .map_err(|e| format!("its image config: {e}"))?
            }
            None => spec.clone(),
        };
        Ok((agent, exit, effective, console))
    }
    .await;
    match adopted {
        Ok((agent, exit, effective, console)) => Ok(RunningVm {
            cpu_percent: spawn_cpu_sampler(res.cgroup.clone(), exit.clone()),
            stopping: report_unexpected_exit(hostname, exit.clone(), console),
            started_at: std::time::UNIX_EPOCH + Duration::from_millis(rec.started_at_ms),
            spec,
            effective,
            agent,
            exit,
            pid: Some(rec.pid),
            calls: Arc::new(Semaphore::new(limits.max_calls_per_sandbox as usize)),
            repl_sessions: Default::default(),
            last_used: Arc::new(AtomicU64::new(crate::state::now_ms())),
            resources: res,
        }),
        Err(why) => {
            // Nothing is killed or removed here: the record may be stale and
            // the slot's cgroup and directory another sandbox's (one whose
            // record is read later). The sweep after recovery cleans every
            // slot no VM was re-adopted into.
            if let Some(net) = res.network.take() {
                if let Err(e) = net.detach(&ctx.network).await {
                    tracing::error!(sandbox = hostname, error = %e, "network of a VM that could not be re-adopted");
                }
            }
            ctx.slots.release(res.slot);
            Err(why)
        }
    }
}

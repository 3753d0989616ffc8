//! `moat-broker`: loads and checks its config, prepares the boot files,
//! reads its durable state (re-adopting the VMs an earlier run left running,
//! cleaning everything else that run left), then serves gRPC until
//! SIGTERM/SIGINT. Then it refuses new work, gives calls in flight
//! `lifecycle.shutdown_grace_secs`, and leaves the VMs for the next broker
//! (or stops them, `lifecycle.stop_sandboxes_on_shutdown`).

use std::io::{IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use moat_broker::cgroups::CgroupManager;
use moat_broker::config::BrokerConfig;
use moat_broker::jail::JailMode;
use moat_broker::sandbox::{LaunchContext, Sandboxes};
use moat_broker::service::{AdminService, BrokerService};
use moat_broker::slots::SlotAllocator;
use moat_broker::vmm::{choose_backend, detect_accel, Backend, Backends, Libkrun, Qemu, Vmm};
use moat_broker::{initramfs, server};
use moat_proto::broker::admin_server::AdminServer;
use moat_proto::broker::broker_server::BrokerServer;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// What `--help` adds below the options: the man-page sections.
const BROKER_MANUAL: &str = "\
DESCRIPTION:
  Runs as root (normally the systemd unit moat-broker.service). Serves typed
  gRPC on `socket` to the one uid `gateway_uid` (checked with SO_PEERCRED),
  and an operator socket (`admin_socket`, root only) for `moat sandbox`.
  Each sandbox is a microVM in its own process jailed by moat-jailer (own
  uid, cgroup, namespaces, seccomp): the libkrun runner moat-vmm where
  /dev/kvm is hardware KVM, QEMU microvm elsewhere ([vmm] backend; the
  choice and its reason are logged at start). It re-validates every
  request.

FILES:
  /etc/moat/broker.toml   configuration; every key: docs/configuration.md
  /var/lib/moat           state: sandbox records, VM directories, image store
  /run/moat/broker.sock   the gateway's socket; admin.sock beside it
  /usr/lib/moat           guest kernel, guest agent, base image
  /usr/bin/moat-jailer    confines each VM process
  /usr/bin/moat-vmm       the libkrun runner (one VM per process)

ENVIRONMENT:
  MOAT_LOG  what to log, in tracing's filter syntax: a level (error, warn,
            info, debug, trace) or target=level pairs; default info. An
            invalid filter stops the broker at start with exit status 1.

SIGNALS:
  SIGTERM, SIGINT  refuse new work, finish calls in flight within
                   lifecycle.shutdown_grace_secs, then leave the VMs running
                   for the next broker (or stop them with
                   lifecycle.stop_sandboxes_on_shutdown = true)

EXIT STATUS:
  0 after a clean shutdown (or a passing --check); 1 when the config is
  invalid (the message names the file, line or key, and the reason), when
  [vmm] backend names a backend this host cannot run, or a start-up step
  fails.

SEE ALSO:
  moat(1), moat-gateway(8); /usr/share/doc/moat/operations.md";

/// moat-broker: runs sandboxes as jailed microVMs for moat-gateway.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, after_long_help = BROKER_MANUAL)]
struct Args {
    /// Broker configuration file (TOML).
    #[arg(
        long,
        env = "MOAT_BROKER_CONFIG",
        default_value = "/etc/moat/broker.toml"
    )]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

/// What to log: `MOAT_LOG` in tracing's filter syntax, `info` when unset
/// or empty. A filter that does not parse is refused, not guessed at.
fn log_filter() -> Result<EnvFilter> {
    match std::env::var("MOAT_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).map_err(|e| {
            anyhow!(
                "MOAT_LOG={v:?} is not a log filter ({e}): give a level (error, warn, info, \
                 debug, trace) or target=level pairs such as info,moat_broker=debug"
            )
        }),
        _ => Ok(EnvFilter::new("info")),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter()?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = BrokerConfig::load(&args.config)?;
    config.validate()?;
    for (what, p) in [
        ("boot.kernel", &config.boot.kernel),
        ("boot.agent", &config.boot.agent),
    ] {
        if !p.is_file() {
            bail!(
                "{what} {} does not exist: build it (see README) or fix {}",
                p.display(),
                args.config.display()
            );
        }
    }
    for (name, p) in &config.images.local {
        if !p.is_file() {
            bail!("images.local.{name} {} does not exist", p.display());
        }
    }
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("moat-broker must run as root (it creates cgroups and drops each VM to its own uid)");
    }
    moat_broker::privileges::restrict()?;
    tracing::info!(
        kept = ?moat_broker::privileges::KEPT.iter().map(|(c, _)| c.to_string()).collect::<Vec<_>>(),
        "broker capabilities restricted"
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(config))
}

/// The VM backends for this host (`[vmm] backend`); an explicit choice that
/// cannot work here stops the broker with the reason.
fn choose_vmm(config: &BrokerConfig) -> Result<Backends> {
    let facts = moat_broker::vmm::accel::HostFacts::read(Path::new("/"));
    // The jail's own /dev/kvm node is 0666; the group matters only in
    // development mode (no jail), and group 0 is never given.
    let kvm_gid = std::fs::metadata("/dev/kvm")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .filter(|gid| *gid != 0);
    let runner = match &config.vmm.runner {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("moat-vmm"),
    };
    let (backend, why) =
        choose_backend(&config.vmm.backend, &facts, &runner).map_err(anyhow::Error::msg)?;
    let (accel, accel_why) = detect_accel(&config.vmm.accel, &facts).map_err(anyhow::Error::msg)?;
    let qemu = |why: &str| -> Arc<dyn Vmm> {
        Arc::new(Qemu {
            binary: config.vmm.qemu.clone(),
            accel,
            reason: format!("{accel_why}; {why}"),
            kvm_gid,
        })
    };
    Ok(match backend {
        Backend::Libkrun => Backends {
            primary: Arc::new(Libkrun {
                runner,
                reason: why,
                kvm_gid,
            }),
            with_volumes: qemu("volumes need 9p with mapped-xattr"),
        },
        Backend::Qemu => Backends::single(qemu(&why)),
    })
}

async fn run(config: BrokerConfig) -> Result<()> {
    let config = Arc::new(config);
    // First: a backend that cannot work here stops the broker before it
    // touches anything.
    let vmm = choose_vmm(&config)?;
    tracing::info!(vmm = %vmm.describe(), "VM backend chosen");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&config.state_dir)?;
    std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o711))?;
    let initramfs = write_initramfs(&config.boot.agent, &config.state_dir.join("boot"))?;

    let jail_mode = if config.jail.development_unjailed {
        tracing::warn!("DEVELOPMENT MODE: VM processes run WITHOUT the jail (no namespaces, pivot_root, rlimits or seccomp filter); never use this in production");
        JailMode::Unjailed
    } else {
        let jailer = match &config.jail.jailer {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("moat-jailer"),
        };
        if !jailer.is_file() {
            bail!(
                "jailer {} not found: install moat-jailer next to moat-broker or set [jail] jailer",
                jailer.display()
            );
        }
        tracing::info!(jailer = %jailer.display(), "VM processes are jailed");
        JailMode::Jailer(jailer)
    };
    let cgroups = CgroupManager::detect(&config.cgroups.root, &config.cgroups.parent)?;
    let cgroups = with_io_limits(cgroups, &config);
    let state = Arc::new(
        moat_broker::state::StateStore::open(&config.state_dir)
            .context("sandbox state (state_dir)")?,
    );

    let store = moat_broker::images::Store::open(&config.images.store)?;
    store.recover()?;
    let images = Arc::new(moat_broker::images::Images::new(
        store,
        config.registries.clone(),
        config.images.limits(),
    )?);
    tracing::info!(store = %config.images.store.display(), pull_on_start = config.images.pull_on_start, "image store");

    let network = Arc::new(
        moat_broker::network::Networking::start(&config.network, &config.state_dir)
            .context("guest networking (see [network] in the broker config)")?,
    );

    let ctx = LaunchContext {
        config: config.clone(),
        vmm: vmm.clone(),
        cgroups,
        slots: SlotAllocator::new(config.sandbox_ids.base, config.sandbox_ids.count),
        running: Arc::new(tokio::sync::Semaphore::new(
            config.limits.max_sandboxes as usize,
        )),
        namespaces: moat_broker::quota::NamespaceQuota::new(
            config.limits.max_sandboxes_per_namespace,
        ),
        initramfs,
        jail_mode,
        images,
        network,
        state: state.clone(),
    };
    let sandboxes = Arc::new(Sandboxes::new(ctx));
    let (records, unreadable) = state.load_all().context(
        "reading the sandbox records (nothing was changed; fix the cause and start again)",
    )?;
    for e in unreadable {
        tracing::error!(error = %e, "sandbox record set aside (renamed *.unreadable)");
    }
    let recovery_started = std::time::Instant::now();
    let defined = records.len();
    let adopted = sandboxes.recover(records).await;
    tracing::info!(
        defined,
        adopted = adopted.len(),
        ms = recovery_started.elapsed().as_millis() as u64,
        "state recovered"
    );
    sweep_leftovers(sandboxes.context(), &adopted);
    sandboxes.start_pool();

    let service = BrokerService::new(sandboxes.clone(), vmm.describe());

    let admin_socket = config.admin_socket();
    let admin_listener = server::bind_admin(&admin_socket)?;
    let admin = tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminService::new(sandboxes.clone())))
        .serve_with_incoming(server::authorized_connections(admin_listener, 0));
    tokio::spawn(async move {
        if let Err(e) = admin.await {
            tracing::error!(error = %e, "admin socket server");
        }
    });
    tracing::info!(socket = %admin_socket.display(), "operator socket (root only)");
    let reaper = sandboxes.clone();
    let every = std::time::Duration::from_secs(u64::from(config.lifecycle.check_interval_secs));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            reaper.enforce_lifetimes().await;
        }
    });

    let listener = server::bind(&config.socket, config.gateway_gid)?;
    tracing::info!(socket = %config.socket.display(), gateway_uid = config.gateway_uid, "broker listening");
    let incoming = server::authorized_connections(listener, config.gateway_uid);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let draining = sandboxes.clone();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: no new calls; finishing the ones in flight");
        draining.refuse_new_work();
        let _ = signalled_tx.send(());
    };
    let grace = std::time::Duration::from_secs(u64::from(config.lifecycle.shutdown_grace_secs));
    let server = tonic::transport::Server::builder()
        .add_service(BrokerServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::select! {
        served = server => served.context("gRPC server")?,
        _ = async {
            let _ = signalled_rx.await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(?grace, "calls still in flight after lifecycle.shutdown_grace_secs: failing them"),
    }
    sandboxes
        .shutdown(config.lifecycle.stop_sandboxes_on_shutdown)
        .await;
    let _ = std::fs::remove_file(&config.socket);
    let _ = std::fs::remove_file(&admin_socket);
    tracing::info!("broker stopped");
    Ok(())
}

/// Builds the initramfs from the agent binary into `dir` (atomically).
fn write_initramfs(agent: &Path, dir: &Path) -> Result<PathBuf> {
    let bytes =
        std::fs::read(agent).with_context(|| format!("reading agent {}", agent.display()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    let path = dir.join("initramfs.cpio");
    let tmp = dir.join("initramfs.cpio.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    initramfs::write_initramfs(&mut f, &bytes)?;
    f.flush()?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Removes what an earlier run left behind and no re-adopted VM uses:
/// cgroups (killing what is in them), VM directories and jail roots. A slot
/// whose leftovers cannot be removed is kept out of use (its uid or cgroup
/// may still hold a process), and logged.
fn sweep_leftovers(ctx: &LaunchContext, adopted: &[u32]) {
    let slot_of = |name: &str| name.strip_prefix("vm-").unwrap_or(name).parse::<u32>().ok();
    let kept = |name: &str| slot_of(name).is_some_and(|slot| adopted.contains(&slot));
    let quarantine = |name: &str| {
        if let Some(slot) = slot_of(name) {
            if ctx.slots.claim(slot).is_some() {
                tracing::error!(slot, "slot kept out of use until the next broker start");
            }
        }
    };
    for (name, cg) in ctx.cgroups.leftovers() {
        if kept(&name) {
            continue;
        }
        match cg.remove() {
            Ok(()) => tracing::warn!(cgroup = %name, "removed leftover cgroup of an earlier run"),
            Err(e) => {
                tracing::error!(cgroup = %name, error = %e, "cannot remove leftover cgroup");
                quarantine(&name);
            }
        }
    }
    for dir in [ctx.vms_dir(), ctx.jails_dir()] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if kept(&e.file_name().to_string_lossy()) {
                continue;
            }
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => {
                    tracing::warn!(dir = %e.path().display(), "removed leftover VM directory")
                }
                Err(err) => {
                    tracing::error!(dir = %e.path().display(), error = %err, "cannot remove leftover VM directory");
                    quarantine(&e.file_name().to_string_lossy());
                }
            }
        }
    }
}

/// Finds the host block devices holding the sandboxes' disk files (the
/// state directory and every image) so the cgroup I/O limits can name them,
/// and says what is and is not covered.
fn with_io_limits(cgroups: CgroupManager, config: &BrokerConfig) -> CgroupManager {
    if config.limits.disk_io().is_unlimited() {
        tracing::info!(hierarchy = ?cgroups.hierarchy(), "cgroups (no disk I/O caps configured)");
        return cgroups;
    }
    if !cgroups.io_controller() {
        tracing::warn!(hierarchy = ?cgroups.hierarchy(), "cgroups have no I/O controller here: disk caps are enforced by the VMM's throttling only");
        return cgroups;
    }
    let paths = std::iter::once(config.state_dir.as_path())
        .chain(config.images.local.values().map(PathBuf::as_path));
    let (devices, uncovered) = moat_broker::cgroups::backing_devices(paths, Path::new("/sys"));
    for p in uncovered {
        tracing::warn!(path = %p.display(), "not on a block device: its disk I/O is capped by the VMM's throttling only");
    }
    let shown: Vec<String> = devices.iter().map(ToString::to_string).collect();
    tracing::info!(hierarchy = ?cgroups.hierarchy(), io_devices = ?shown, "cgroups");
    cgroups.with_io_devices(devices)
}

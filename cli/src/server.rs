//! `moat server start`: supervises moat-broker and moat-gateway. Both run in
//! their own process groups; the CLI forwards SIGINT/SIGTERM to them and
//! waits for the broker to finish (bounded). A broker that crashes (killed,
//! or a failure exit) is started again with backoff, like systemd's
//! `Restart=on-failure`: it re-adopts the running sandboxes, and the gateway
//! reconnects. If the gateway dies, or the broker exits cleanly or keeps
//! crashing, the survivor is stopped. Without `--dev` the gateway requires API keys: the CLI
//! creates the signing secret at first start (mode 0600, owned by the
//! gateway's user) and hands the gateway its config file. Also the
//! `keygen` / `revoke` subcommands (`crate::keys`).

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use moat_broker::config::BrokerConfig;
use moat_gateway::auth::secret;

use crate::keys::{self, KeygenArgs, RevokeArgs};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;

#[derive(Subcommand, Debug)]
pub enum ServerCommand {
    /// Start broker and gateway in the foreground until Ctrl-C / SIGTERM.
    Start(StartArgs),
    /// Make an API key (prints it; run as root on the server).
    Keygen(KeygenArgs),
    /// Revoke an API key by its id (the gateway picks it up without restart).
    Revoke(RevokeArgs),
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// Development mode: no API keys, gateway bound to loopback only.
    #[arg(long)]
    dev: bool,
    /// Gateway port (default: the gateway config's `listen`, else 5555).
    #[arg(long)]
    port: Option<u16>,
    /// Gateway address (must be loopback in --dev mode; default: the
    /// gateway config's `listen`, else 127.0.0.1).
    #[arg(long)]
    host: Option<IpAddr>,
    /// Gateway config (TOML: keys, limits, CORS, proxies, metrics; default
    /// /etc/moat/gateway.toml when it exists).
    #[arg(long, env = "MOAT_GATEWAY_CONFIG")]
    gateway_config: Option<PathBuf>,
    /// Broker configuration (names the gateway's uid, boot files, images, limits).
    #[arg(
        long,
        env = "MOAT_BROKER_CONFIG",
        default_value = "/etc/moat/broker.toml"
    )]
    broker_config: PathBuf,
    /// How long to wait for the broker to stop its sandboxes on shutdown.
    #[arg(long, default_value_t = 60)]
    stop_timeout_secs: u64,
}

pub fn run(cmd: ServerCommand) -> Result<()> {
    match cmd {
        ServerCommand::Start(args) => start(args),
        ServerCommand::Keygen(args) => keys::keygen(args),
        ServerCommand::Revoke(args) => keys::revoke(args),
    }
}

/// Path of a sibling binary installed next to `moat`.
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the moat binary")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found next to {}: build or install it",
            name,
            exe.display()
        );
    }
    Ok(path)
}

fn start(args: StartArgs) -> Result<()> {
    let (mut gateway_config, gateway_config_file) =
        keys::gateway_config(args.gateway_config.as_ref())?;
    let listen = SocketAddr::new(
        args.host.unwrap_or(gateway_config.listen.ip()),
        args.port.unwrap_or(gateway_config.listen.port()),
    );
    if args.dev && !listen.ip().to_canonical().is_loopback() {
        bail!("--dev runs without API keys, so it only binds to loopback; {} is not a loopback address", listen.ip());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("moat server start must run as root: the broker needs root, the gateway is dropped to an unprivileged user");
    }
    let config = BrokerConfig::load(&args.broker_config)?;
    config.validate()?;
    gateway_config.listen = listen;
    gateway_config.dev = args.dev;
    gateway_config.broker_socket = config.socket.clone();
    gateway_config
        .validate()
        .context("invalid gateway config")?;
    if !args.dev {
        let path = &gateway_config.auth.secret_file;
        let created = secret::ensure(path, Some((config.gateway_uid, config.gateway_gid)))
            .context("preparing the API key secret")?;
        if created {
            eprintln!(
                "moat: created the API key signing secret {} (mode 0600, uid {})",
                path.display(),
                config.gateway_uid
            );
        }
    }
    let broker_bin = sibling("moat-broker")?;
    let gateway_bin = sibling("moat-gateway")?;

    // Signals are handled synchronously with sigwait; children start with an
    // empty signal mask (std resets it).
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        signals.add(s);
    }
    signals.thread_block()?;

    eprintln!("moat: starting broker ({})", broker_bin.display());
    let mut broker = start_broker(&broker_bin, &args.broker_config, &config.socket)?;
    let mut crashes = Crashes::default();

    eprintln!(
        "moat: starting gateway on http://{listen} as uid {} ({})",
        config.gateway_uid,
        if args.dev {
            "DEV MODE: no API keys"
        } else {
            "API keys required; make one with `moat server keygen`"
        }
    );
    let mut gateway_cmd = Command::new(&gateway_bin);
    if args.dev {
        gateway_cmd.arg("--dev");
    }
    if let Some(file) = &gateway_config_file {
        gateway_cmd.arg("--config").arg(file);
    }
    let mut gateway = supervised(&mut gateway_cmd)
        .args(["--listen", &listen.to_string(), "--broker-socket"])
        .arg(&config.socket)
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| k == "MOAT_LOG" || k == "RUST_LOG" || k == "PATH"))
        .uid(config.gateway_uid)
        .gid(config.gateway_gid)
        .current_dir("/")
        .spawn()
        .context("starting moat-gateway")?;
    if let Err(e) = wait_until(
        Duration::from_secs(30),
        || TcpStream::connect(listen).is_ok(),
        &mut gateway,
    ) {
        stop(&mut gateway, "gateway", Duration::from_secs(10));
        stop(
            &mut broker,
            "broker",
            Duration::from_secs(args.stop_timeout_secs),
        );
        return Err(e.context("the gateway did not come up"));
    }
    eprintln!("moat: ready at http://{listen}/api/v1 (Ctrl-C to stop)");

    let code = loop {
        let sig = signals.wait()?;
        match sig {
            Signal::SIGINT | Signal::SIGTERM => {
                eprintln!("moat: {sig} received, stopping");
                break 0;
            }
            _ => {
                if let Ok(Some(st)) = broker.try_wait() {
                    if st.success() {
                        eprintln!("moat: broker exited ({st}); stopping the gateway");
                        break 1;
                    }
                    let Some(delay) = crashes.next_delay() else {
                        eprintln!("moat: broker exited ({st}) {MAX_CRASHES} times in a row; stopping the gateway");
                        break 1;
                    };
                    eprintln!("moat: broker exited ({st}); starting it again in {delay:?} (it re-adopts the running sandboxes)");
                    std::thread::sleep(delay);
                    match start_broker(&broker_bin, &args.broker_config, &config.socket) {
                        Ok(b) => broker = b,
                        Err(e) => {
                            eprintln!("moat: {e:#}; stopping the gateway");
                            break 1;
                        }
                    }
                }
                if let Ok(Some(st)) = gateway.try_wait() {
                    eprintln!("moat: gateway exited ({st}); stopping the broker");
                    break 1;
                }
            }
        }
    };
    stop(&mut gateway, "gateway", Duration::from_secs(10));
    stop(
        &mut broker,
        "broker",
        Duration::from_secs(args.stop_timeout_secs),
    );
    eprintln!("moat: stopped");
    std::process::exit(code);
}

/// Starts the broker and waits for its socket.
fn start_broker(bin: &Path, config_file: &Path, socket: &Path) -> Result<Child> {
    // A socket left by a crashed broker must not read as ready.
    let _ = std::fs::remove_file(socket);
    let mut broker = supervised(Command::new(bin).arg("--config").arg(config_file))
        .spawn()
        .context("starting moat-broker")?;
    // Re-adopting many sandboxes takes a while: be patient.
    if let Err(e) = wait_until(
        Duration::from_secs(120),
        || socket_ready(socket),
        &mut broker,
    ) {
        stop(&mut broker, "broker", Duration::from_secs(10));
        return Err(e.context("the broker did not come up"));
    }
    Ok(broker)
}

/// Broker crashes in a row (one that ran a minute is not "in a row").
const MAX_CRASHES: u32 = 5;

#[derive(Default)]
struct Crashes {
    count: u32,
    last: Option<Instant>,
}

impl Crashes {
    /// How long to wait before the next start, or `None` to give up.
    fn next_delay(&mut self) -> Option<Duration> {
        if self
            .last
            .is_some_and(|t| t.elapsed() > Duration::from_secs(60))
        {
            self.count = 0;
        }
        self.last = Some(Instant::now());
        self.count += 1;
        (self.count <= MAX_CRASHES).then(|| Duration::from_millis(250 << (self.count - 1)))
    }
}

/// Prepares a child of the supervisor: its own process group (Ctrl-C in the
/// terminal reaches only the CLI, which forwards it), the signal mask the CLI
/// blocked for `sigwait` cleared again, and SIGTERM if the CLI dies, so
/// neither daemon outlives its supervisor.
fn supervised(cmd: &mut Command) -> &mut Command {
    cmd.process_group(0);
    // SAFETY: runs in the forked child before exec; only async-signal-safe
    // calls (sigprocmask, prctl, getppid, kill) on stack values.
    unsafe {
        cmd.pre_exec(|| {
            let empty = SigSet::empty();
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&empty),
                None,
            )?;
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() == 1 {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
            Ok(())
        })
    }
}

/// The broker binds its socket right before serving. (Connecting to test it
/// would be refused, and logged, since only the gateway's uid may connect.)
fn socket_ready(path: &Path) -> bool {
    path.exists()
}

/// Polls `ready` until true, failing if `child` exits or time runs out.
fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool, child: &mut Child) -> Result<()> {
    let start = Instant::now();
    while !ready() {
        if let Some(st) = child.try_wait()? {
            bail!("process exited with {st}");
        }
        if start.elapsed() > limit {
            bail!("not ready after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
fn stop(child: &mut Child, what: &str, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("moat: {what} did not stop within {grace:?}; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

//! `moat server start`: supervises moat-broker and moat-gateway. Both run in
//! their own process groups; on SIGINT/SIGTERM the CLI stops the gateway
//! (letting in-flight requests finish within its `shutdown_grace_secs`),
//! then the broker (bounded). Either daemon that crashes (killed by a
//! signal, or a failure exit) is started again with backoff, like systemd's
//! `Restart=on-failure`, while the other keeps running: a new broker
//! re-adopts the running sandboxes and the gateway reconnects to it; a new
//! gateway serves the same address (clients see refused connections while
//! it is down; MCP sessions start over). After five crashes (`MAX_CRASHES`)
//! in a row of one daemon, or when either exits cleanly (status 0: someone
//! other than this supervisor told it to stop), the survivor is stopped too
//! and the CLI exits with status 1. Without `--dev` the gateway requires API
//! keys: the CLI creates the signing secret at first start (mode 0600, owned
//! by the gateway's user) and hands the gateway its config file. Also the
//! `keygen` / `revoke` subcommands (`crate::keys`).

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
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
    let mut broker_crashes = Crashes::default();

    eprintln!(
        "moat: starting gateway on http://{listen} as uid {} ({})",
        config.gateway_uid,
        if args.dev {
            "DEV MODE: no API keys"
        } else {
            "API keys required; make one with `moat server keygen`"
        }
    );
    let gateway_spec = GatewaySpec {
        bin: gateway_bin,
        dev: args.dev,
        config_file: gateway_config_file,
        listen,
        broker_socket: config.socket.clone(),
        uid: config.gateway_uid,
        gid: config.gateway_gid,
    };
    let mut gateway = match start_gateway(&gateway_spec) {
        Ok(gateway) => gateway,
        Err(e) => {
            stop(
                &mut broker,
                "broker",
                Duration::from_secs(args.stop_timeout_secs),
            );
            return Err(e);
        }
    };
    let mut gateway_crashes = Crashes::default();
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
                    let Some(delay) = broker_crashes.next_delay() else {
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
                    if st.success() {
                        eprintln!(
                            "moat: gateway exited ({st}) without this supervisor asking; stopping the broker"
                        );
                        break 1;
                    }
                    match restart_gateway(&gateway_spec, &mut gateway_crashes, &st) {
                        Restart::Started(g) => gateway = g,
                        Restart::GaveUp => break 1,
                        Restart::StopRequested => {
                            eprintln!(
                                "moat: stop requested while restarting the gateway, stopping"
                            );
                            break 0;
                        }
                    }
                }
            }
        }
    };
    // The gateway finishes in-flight requests within its own grace; give it
    // that and a little more before SIGKILL.
    let gateway_grace = Duration::from_secs(
        gateway_config
            .timeouts
            .shutdown_grace_secs
            .saturating_add(5),
    );
    stop(&mut gateway, "gateway", gateway_grace);
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

/// How `moat-gateway` is run (the same way at every (re)start).
struct GatewaySpec {
    bin: PathBuf,
    dev: bool,
    config_file: Option<PathBuf>,
    listen: SocketAddr,
    broker_socket: PathBuf,
    uid: u32,
    gid: u32,
}

/// How long a (re)started gateway may take to accept connections.
const GATEWAY_START_LIMIT: Duration = Duration::from_secs(30);

/// Starts the gateway (as its unprivileged uid/gid) and waits until it
/// accepts connections; on failure it is stopped and the error says why.
fn start_gateway(spec: &GatewaySpec) -> Result<Child> {
    let mut cmd = Command::new(&spec.bin);
    if spec.dev {
        cmd.arg("--dev");
    }
    if let Some(file) = &spec.config_file {
        cmd.arg("--config").arg(file);
    }
    let mut gateway = supervised(&mut cmd)
        .args(["--listen", &spec.listen.to_string(), "--broker-socket"])
        .arg(&spec.broker_socket)
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| k == "MOAT_LOG" || k == "PATH"))
        .uid(spec.uid)
        .gid(spec.gid)
        .current_dir("/")
        .spawn()
        .context("starting moat-gateway")?;
    if let Err(e) = wait_until(
        GATEWAY_START_LIMIT,
        || TcpStream::connect(spec.listen).is_ok(),
        &mut gateway,
    ) {
        stop(&mut gateway, "gateway", Duration::from_secs(10));
        return Err(e.context(format!(
            "the gateway did not come up on {}; its log above says why",
            spec.listen
        )));
    }
    Ok(gateway)
}

/// What became of restarting a crashed gateway.
enum Restart {
    Started(Child),
    /// [`MAX_CRASHES`] in a row: the stack stops.
    GaveUp,
    /// SIGINT/SIGTERM arrived meanwhile (it is still pending, and the
    /// stack stops as for any stop).
    StopRequested,
}

/// Starts the gateway again after it exited with `status`, with backoff;
/// a start that fails counts as one more crash. The broker, and the
/// sandboxes, keep running meanwhile.
fn restart_gateway(spec: &GatewaySpec, crashes: &mut Crashes, status: &ExitStatus) -> Restart {
    let mut cause = format!("exited ({status})");
    loop {
        let Some(delay) = crashes.next_delay() else {
            eprintln!(
                "moat: gateway {cause}, {MAX_CRASHES} failures in a row; stopping the broker"
            );
            return Restart::GaveUp;
        };
        eprintln!(
            "moat: gateway {cause}; starting it again in {delay:?} (the broker and the sandboxes keep running)"
        );
        std::thread::sleep(delay);
        if stop_requested() {
            return Restart::StopRequested;
        }
        match start_gateway(spec) {
            Ok(gateway) => {
                eprintln!("moat: gateway back at http://{}", spec.listen);
                return Restart::Started(gateway);
            }
            Err(e) => cause = format!("failed to start: {e:#}"),
        }
        if stop_requested() {
            return Restart::StopRequested;
        }
    }
}

/// Whether SIGINT or SIGTERM is pending (they are blocked for `sigwait`,
/// so they wait there until the main loop takes them).
fn stop_requested() -> bool {
    // SAFETY: sigpending fills a zero-initialised sigset_t on the stack
    // through a valid pointer, and sigismember reads it; no other state.
    unsafe {
        let mut pending: libc::sigset_t = std::mem::zeroed();
        if libc::sigpending(&mut pending) != 0 {
            return false;
        }
        libc::sigismember(&pending, libc::SIGINT) == 1
            || libc::sigismember(&pending, libc::SIGTERM) == 1
    }
}

/// Crashes in a row, per daemon, before the stack gives up (one that ran a
/// minute is not "in a row").
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crashes_back_off_then_give_up() {
        let mut crashes = Crashes::default();
        let delays: Vec<Option<Duration>> =
            (0..=MAX_CRASHES).map(|_| crashes.next_delay()).collect();
        assert_eq!(
            delays,
            [250, 500, 1000, 2000, 4000]
                .into_iter()
                .map(|ms| Some(Duration::from_millis(ms)))
                .chain([None])
                .collect::<Vec<_>>()
        );
        // A crash a minute after the last one starts a new series.
        crashes.last = Some(Instant::now() - Duration::from_secs(61));
        assert_eq!(crashes.next_delay(), Some(Duration::from_millis(250)));
    }

    #[test]
    fn a_pending_sigterm_is_a_stop_request() {
        let mut term = SigSet::empty();
        term.add(Signal::SIGTERM);
        term.thread_block().unwrap();
        assert!(!stop_requested());
        // Directed at this thread, where it is blocked: it stays pending.
        nix::sys::signal::raise(Signal::SIGTERM).unwrap();
        assert!(stop_requested());
        assert_eq!(term.wait().unwrap(), Signal::SIGTERM);
        assert!(!stop_requested());
        term.thread_unblock().unwrap();
    }
}

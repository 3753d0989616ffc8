//! The `Setup` request, in this order: applies the sandbox's identity
//! ([`crate::identity`]: hostname, machine id, entropy), mounts the volumes ([`crate::mounts`]),
//! configures the NIC ([`crate::netconf`]), writes the sandbox config's
//! scripts to `<root>/scripts/<name>` (mode 0755, a `#!<shell>` line added
//! when they have none; via a temporary file and a rename), then launches
//! `exec` (`<shell> -c <exec>`) or else the script named `start` in the
//! background: its own session (setsid), stdin `/dev/null`, the request's
//! env and workdir, stdout and stderr appended to
//! `<root>/logs/background.log` through a pipe that [`log`] drains and
//! bounds. The process is never killed by the agent; it lives as long as
//! the VM. A waiter thread reaps it. The whole request is checked before any
//! step runs. In the VM `<root>` is [`ROOT`] and the mounts and NIC are
//! real ([`Vm`]); tests use a temporary directory and a [`Machine`] that
//! records those steps.

mod log;
#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

use moat_proto::agent::{Mount, Setup, SetupResult};

use crate::error::{AgentError, Context, Result};
use crate::exec::{parse_env, path_of, resolve, workdir_path};
use crate::fd;
use crate::user::Identity;
use crate::{identity, mounts, netconf};

/// Where scripts and logs live in the VM.
pub const ROOT: &str = "/.sandbox";
/// Shell used when the request names none.
pub const DEFAULT_SHELL: &str = "/bin/sh";
/// Log bound used when the request says 0.
pub const DEFAULT_LOG_MAX: u64 = 1 << 20;
/// Name of the script run when `exec` is empty.
pub const START_SCRIPT: &str = "start";
/// Most scripts per request.
pub const MAX_SCRIPTS: usize = 256;

/// The steps of a request that change the VM itself rather than files
/// under `<root>`. They get checked input only.
pub trait Machine {
    /// Applies the sandbox's hostname, machine id and entropy.
    fn identity(&mut self, id: &identity::Checked) -> Result<()>;
    /// Mounts the volumes, in order; writable ones are given to `owner`.
    fn mount(&mut self, mounts: &[Mount], owner: Option<&Identity>) -> Result<()>;
    /// Configures the sandbox's NIC.
    fn network(&mut self, cfg: &netconf::Config) -> Result<()>;
}

/// The real [`Machine`]: 9p mounts under `/` and the NIC's ioctls.
pub struct Vm;

impl Machine for Vm {
    fn identity(&mut self, id: &identity::Checked) -> Result<()> {
        identity::apply(id)
    }

    fn mount(&mut self, mounts: &[Mount], owner: Option<&Identity>) -> Result<()> {
        mounts::mount_all(Path::new("/"), mounts, owner)
    }

    fn network(&mut self, cfg: &netconf::Config) -> Result<()> {
        netconf::apply(cfg)
    }
}

/// Handles `req` in the VM.
pub fn run(req: &Setup) -> Result<SetupResult> {
    run_in(Path::new(ROOT), req, &mut Vm)
}

fn bad(msg: impl Into<String>) -> AgentError {
    AgentError::BadRequest(msg.into())
}

/// Whether `name` is a valid script name: `[A-Za-z0-9._-]+`, not `.`/`..`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn mkdir(path: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .ctx(|| format!("create {}", path.display()))?;
    fs::set_permissions(path, Permissions::from_mode(0o755))
        .ctx(|| format!("chmod {}", path.display()))
}

/// Writes one script atomically. The temporary name has a `~`, which no
/// script name can contain.
fn write_script(dir: &Path, name: &str, content: &str, shell: &str) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}~moat-tmp"));
    let what = || format!("write {}", path.display());
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(&tmp)
        .ctx(what)?;
    if !content.starts_with("#!") {
        file.write_all(format!("#!{shell}\n").as_bytes())
            .ctx(what)?;
    }
    file.write_all(content.as_bytes()).ctx(what)?;
    // The mode given to open() is filtered by the umask.
    file.set_permissions(Permissions::from_mode(0o755))
        .ctx(what)?;
    drop(file);
    fs::rename(&tmp, &path).ctx(what)
}

/// Checks `req`, mounts its volumes and configures its NIC through
/// `machine`, writes the scripts, then starts the background process if
/// there is one.
pub fn run_in(root: &Path, req: &Setup, machine: &mut impl Machine) -> Result<SetupResult> {
    if req.scripts.len() > MAX_SCRIPTS {
        return Err(bad(format!(
            "setup: {} scripts (limit {MAX_SCRIPTS})",
            req.scripts.len()
        )));
    }
    if let Some(s) = req.scripts.iter().find(|s| !valid_name(&s.name)) {
        return Err(bad(format!(
            "setup: invalid script name {:?} (allowed: letters, digits, '.', '_', '-'; not \
             \".\" or \"..\")",
            s.name
        )));
    }
    let strings = [&req.shell, &req.workdir, &req.exec]
        .into_iter()
        .chain(&req.env);
    if strings.clone().any(|s| s.contains('\0')) {
        return Err(bad(
            "setup: shell, env, workdir and exec must not contain NUL",
        ));
    }
    let env = parse_env("setup", &req.env)?;
    let shell = if req.shell.is_empty() {
        DEFAULT_SHELL
    } else {
        &req.shell
    };
    mounts::check_all(&req.mounts)?;
    let network = req.network.as_ref().map(netconf::parse).transpose()?;
    let id = req.identity.as_deref().map(identity::check).transpose()?;
    // Read from the image's account files, before a volume can cover them.
    let owner = if mounts::needs_owner(&req.mounts, &req.user) {
        crate::user::resolve(&req.user)?
    } else {
        None
    };

    if let Some(id) = &id {
        machine.identity(id)?;
    }
    if !req.mounts.is_empty() {
        machine.mount(&req.mounts, owner.as_ref())?;
    }
    if let Some(cfg) = &network {
        machine.network(cfg)?;
    }

    let scripts = root.join("scripts");
    mkdir(&scripts)?;
    for script in &req.scripts {
        write_script(&scripts, &script.name, &script.content, shell)?;
    }

    let workdir = workdir_path(&req.workdir);
    let (program, args): (PathBuf, Vec<&str>) = if !req.exec.is_empty() {
        let program = resolve(shell, path_of(&env), &workdir).map_err(|e| {
            AgentError::Unavailable(format!("setup: cannot run shell {shell:?}: {e}"))
        })?;
        (program, vec!["-c", &req.exec])
    } else if req.scripts.iter().any(|s| s.name == START_SCRIPT) {
        (scripts.join(START_SCRIPT), Vec::new())
    } else {
        return Ok(SetupResult { background_pid: 0 });
    };

    let logs = root.join("logs");
    mkdir(&logs)?;
    let log_path = logs.join("background.log");
    let log_file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(&log_path)
        .ctx(|| format!("open {}", log_path.display()))?;
    let cap = match req.log_max_bytes {
        0 => DEFAULT_LOG_MAX,
        n => n,
    };

    let (read_end, write_end) = fd::pipe().ctx(|| "create the background output pipe")?;
    let stderr_end = write_end
        .try_clone()
        .ctx(|| "duplicate the background output pipe")?;
    let identity = crate::user::resolve(&req.user)?;
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| {
            (
                OsStr::new(k),
                OsStr::new(crate::user::env_value(k, v, identity.as_ref())),
            )
        }))
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(stderr_end));

    let group = crate::workload::group_for("background");
    let procs_fd = group.as_ref().map(crate::workload::Group::procs_fd);
    // SAFETY: entering the workload group (raw write/open/close), setsid
    // and the identity switch (raw setgroups/setgid/setuid on data built
    // before the fork) are async-signal-safe; a freshly forked child is
    // never a process group leader, so setsid cannot fail; the group's
    // descriptor outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            crate::workload::enter_in_child(procs_fd)?;
            libc::setsid();
            match &identity {
                Some(id) => crate::user::switch_in_child(id),
                None => Ok(()),
            }
        });
    }
    let spawned = cmd.spawn();
    // Drop our copies of the pipe's write end (held by `cmd`), or the drain
    // would never see end-of-file.
    drop(cmd);
    // The background group lives as long as the VM.
    if let Some(group) = group {
        group.keep();
    }
    let mut child = spawned.map_err(|e| {
        AgentError::Unavailable(format!(
            "setup: cannot start the background process {}: {e}",
            program.display()
        ))
    })?;
    let pid = child.id();
    log::spawn_drain(read_end, log::LogSink::new(log_file, cap));
    let waiter = thread::Builder::new()
        .name(format!("background-{pid}"))
        .spawn(move || {
            let _ = child.wait();
        });
    if let Err(e) = waiter {
        crate::log::log!("cannot start a thread to reap background process {pid}: {e}");
    }
    Ok(SetupResult {
        background_pid: pid,
    })
}

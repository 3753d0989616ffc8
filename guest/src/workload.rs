//! The guest's cgroup layout, which keeps the agent answering whatever the
//! sandbox's code does (fork bombs, memory hogs, busy loops):
//!
//! ```text
//! /sys/fs/cgroup            cgroup2; PID 1 stays here
//!   moat-agent/             the agent server: cpu.weight 10000, memory.min
//!   workload/               all the sandbox's code: pids.max (from
//!                           MOAT_PIDS_MAX), memory.max (RAM less a
//!                           reserve), cpu.weight 100
//!     cmd-N/                one command.run; killed whole at its timeout
//!     repl-N/               one REPL session
//!     background/           the start script / exec process
//!                           (each with its own CPU share of the workload)
//! ```
//!
//! The CPU controller schedules the agent against the workload as two
//! entities, so thousands of runnable workload processes cannot starve it;
//! the pid and memory limits leave the agent pids and memory to work with.
//! The agent's processes also run with `oom_score_adj` -1000 (children go
//! back to 0 before they exec), so the kernel's OOM killer never picks the
//! agent. A command's group is killed whole with `cgroup.kill` at its
//! timeout, which also reaches what left its process group (`setsid`).
//!
//! The root directory is a parameter, so the layout is tested against a
//! plain directory tree.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use nix::mount::{mount, MsFlags};

use crate::error::{AgentError, Context, Result};
use crate::log::log;

/// Where PID 1 mounts the cgroup2 hierarchy.
pub const MOUNT_POINT: &str = "/sys/fs/cgroup";
/// Kernel command line variable with the workload's `pids.max`.
pub const PIDS_MAX_VAR: &str = "MOAT_PIDS_MAX";
/// `pids.max` when the command line names none (or an invalid one).
pub const DEFAULT_PIDS_MAX: u32 = 4096;
/// Accepted `MOAT_PIDS_MAX` values (the broker checks the same range).
const PIDS_MAX_RANGE: std::ops::RangeInclusive<u32> = 16..=32_000;
const AGENT: &str = "moat-agent";
const WORKLOAD: &str = "workload";
/// `cpu.weight` of the agent (the highest the kernel accepts) and of the
/// workload (the kernel's default).
const AGENT_CPU_WEIGHT: &str = "10000";
const WORKLOAD_CPU_WEIGHT: &str = "100";
/// Controllers the two top-level groups are given.
const CONTROLLERS: &str = "+cpu +memory +pids";
/// Controllers each command's and session's group is given: CPU, so a
/// runaway command gets one share of the workload, not all of it, and the
/// next command runs at once. (The workload itself then holds no process:
/// everything runs in a group below it.)
const WORKLOAD_CONTROLLERS: &str = "+cpu";

/// The layout the agent runs under, once PID 1 has prepared it.
static ACTIVE: OnceLock<Layout> = OnceLock::new();
/// Group directories that still held processes when their owner finished
/// (a command's background children); removed once they are empty.
static LINGERING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);

/// A prepared hierarchy rooted at `root`.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// How much of the guest's RAM the workload may not use: what the agent,
/// its threads' stacks and the kernel need to keep answering (1/16 of RAM,
/// 16-48 MiB).
pub fn agent_reserve_bytes(mem_total: u64) -> u64 {
    (mem_total / 16).clamp(16 << 20, 48 << 20)
}

/// The workload's `pids.max` from the `MOAT_PIDS_MAX` value, if valid.
pub fn parse_pids_max(value: Option<&str>) -> std::result::Result<u32, String> {
    match value {
        None => Ok(DEFAULT_PIDS_MAX),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if PIDS_MAX_RANGE.contains(&n) => Ok(n),
            _ => Err(format!(
                "{PIDS_MAX_VAR}={v:?} is not a number in {PIDS_MAX_RANGE:?}; using {DEFAULT_PIDS_MAX}"
            )),
        },
    }
}

/// `MemTotal` from `/proc/meminfo` text, in bytes.
pub fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Opens a control file for writing. `create` is a no-op on cgroupfs
/// (its files exist or cannot be made) and lets the tests use a plain tree.
fn open_control(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Creates `dir` unless it exists (a restarted server finds its groups).
fn ensure_dir(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(e).ctx(|| format!("create {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    open_control(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .ctx(|| format!("write {value:?} to {}", path.display()))
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn agent_dir(&self) -> PathBuf {
        self.root.join(AGENT)
    }

    fn workload_dir(&self) -> PathBuf {
        self.root.join(WORKLOAD)
    }

    /// Creates the agent and workload groups with their limits; returns
    /// the workload's `memory.max`.
    pub fn prepare(&self, mem_total: u64, pids_max: u32) -> Result<u64> {
        write_file(&self.root.join("cgroup.subtree_control"), CONTROLLERS)?;
        ensure_dir(&self.agent_dir())?;
        ensure_dir(&self.workload_dir())?;
        let reserve = agent_reserve_bytes(mem_total);
        let agent = self.agent_dir();
        write_file(&agent.join("cpu.weight"), AGENT_CPU_WEIGHT)?;
        write_file(&agent.join("memory.min"), &(reserve / 2).to_string())?;
        let work = self.workload_dir();
        write_file(&work.join("cgroup.subtree_control"), WORKLOAD_CONTROLLERS)?;
        write_file(&work.join("cpu.weight"), WORKLOAD_CPU_WEIGHT)?;
        write_file(&work.join("pids.max"), &pids_max.to_string())?;
        let memory_max = mem_total.saturating_sub(reserve).max(16 << 20);
        write_file(&work.join("memory.max"), &memory_max.to_string())?;
        Ok(memory_max)
    }

    /// Moves the calling process into the agent's group.
    pub fn join_agent(&self) -> Result<()> {
        write_file(&self.agent_dir().join("cgroup.procs"), "0")
    }

    /// A new, empty group under the workload for one command or session
    /// (`kind` is `cmd`, `repl` or `background`; all but `background` get
    /// a sequence number).
    pub fn new_group(&self, kind: &str) -> Result<Group> {
        remove_lingering();
        let name = if kind == "background" {
            kind.to_owned()
        } else {
            format!("{kind}-{}", NEXT_GROUP.fetch_add(1, Ordering::Relaxed))
        };
        let dir = self.workload_dir().join(name);
        ensure_dir(&dir)?;
        let open = |file: &str| {
            let path = dir.join(file);
            open_control(&path).ctx(|| format!("open {}", path.display()))
        };
        let procs = open("cgroup.procs")?;
        let kill = open("cgroup.kill")?;
        Ok(Group {
            dir,
            procs,
            kill,
            remove_on_drop: true,
        })
    }
}

/// Mounts cgroup2, prepares the layout from the kernel command line and
/// the guest's RAM, and makes it the active one. PID 1 calls this once,
/// before it forks the agent server. A failure leaves the agent running
/// without the layout (logged): commands then run without a group and
/// their timeouts kill only their process group.
pub fn set_up() {
    if let Err(e) = protect_self() {
        log!("the agent is not shielded from the OOM killer: {e}");
    }
    let pids_max =
        parse_pids_max(std::env::var(PIDS_MAX_VAR).ok().as_deref()).unwrap_or_else(|why| {
            log!("{why}");
            DEFAULT_PIDS_MAX
        });
    let prepared = (|| {
        mount(
            Some("cgroup2"),
            MOUNT_POINT,
            Some("cgroup2"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .ctx(|| format!("mount cgroup2 at {MOUNT_POINT}"))?;
        let meminfo = fs::read_to_string("/proc/meminfo").ctx(|| "read /proc/meminfo")?;
        let mem_total = mem_total_bytes(&meminfo)
            .ok_or_else(|| AgentError::Config("no MemTotal in /proc/meminfo".into()))?;
        let layout = Layout::new(MOUNT_POINT);
        let memory_max = layout.prepare(mem_total, pids_max)?;
        Ok::<_, AgentError>((layout, memory_max, mem_total))
    })();
    match prepared {
        Ok((layout, memory_max, mem_total)) => {
            log!(
                "workload cgroup: pids.max {pids_max}, memory.max {} MiB of {} MiB",
                memory_max >> 20,
                mem_total >> 20
            );
            let _ = ACTIVE.set(layout);
        }
        Err(e) => log!("workload limits not applied: {e}"),
    }
}

/// The active layout, if PID 1 prepared one.
pub fn active() -> Option<&'static Layout> {
    ACTIVE.get()
}

/// A group for one command or session under the active layout; `None`
/// (logged) when there is no layout or the group cannot be made.
pub fn group_for(kind: &str) -> Option<Group> {
    let layout = active()?;
    match layout.new_group(kind) {
        Ok(g) => Some(g),
        Err(e) => {
            log!("running without a {kind} group: {e}");
            None
        }
    }
}

/// Gives this process `oom_score_adj` -1000 (inherited by the server).
fn protect_self() -> io::Result<()> {
    fs::write("/proc/self/oom_score_adj", "-1000")
}

/// Retries removing groups whose processes outlived their owner.
fn remove_lingering() {
    let mut lingering = LINGERING.lock().unwrap_or_else(PoisonError::into_inner);
    lingering.retain(|dir| fs::remove_dir(dir).is_err_and(|e| e.kind() != io::ErrorKind::NotFound));
}

/// One workload group: its `cgroup.procs` (the child writes itself in
/// before it execs) and `cgroup.kill`. Dropping it removes the directory,
/// or queues it for removal while processes remain in it.
#[derive(Debug)]
pub struct Group {
    dir: PathBuf,
    procs: File,
    kill: File,
    remove_on_drop: bool,
}

impl Group {
    /// The descriptor [`enter_in_child`] writes to.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// Kills every process in the group, including ones forking right now.
    pub fn kill(&self) {
        if let Err(e) = (&self.kill).write_all(b"1") {
            log!("cannot kill {}: {e}", self.dir.display());
        }
    }

    /// Keeps the directory when the group is dropped (a group that lives
    /// as long as the VM).
    pub fn keep(mut self) {
        self.remove_on_drop = false;
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.remove_on_drop {
            return;
        }
        if fs::remove_dir(&self.dir).is_err() && self.dir.exists() {
            LINGERING
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self.dir.clone());
        }
    }
}

/// In a forked child before exec: moves it into the group behind
/// `procs_fd` (when there is one) and gives it back the default OOM score.
/// Only raw `write`/`open`/`close` calls, so it is async-signal-safe.
pub fn enter_in_child(procs_fd: Option<RawFd>) -> io::Result<()> {
    if let Some(fd) = procs_fd {
        // SAFETY: `fd` is an open descriptor the parent holds until the
        // spawn returns; the buffer is a static byte string.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: a static NUL-terminated path; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened; the buffer is a static byte string.
    let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = io::Error::last_os_error();
    // SAFETY: closes the descriptor opened above, once.
    unsafe { libc::close(fd) };
    if written != 1 {
        return Err(err);
    }
    Ok(())
}

#[cfg(test)]
mod tests;

//! A VM process as the broker knows it across its own restarts: the pid of
//! the jailer's waiting process plus its start time (which together name one
//! process for the life of the host), and a pidfd that reports its exit
//! whether or not this broker started it.

use std::os::fd::{FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// One process, told apart from later ones given the same pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// Clock ticks after boot at which it started (`/proc/<pid>/stat` 22).
    pub start_ticks: u64,
}

impl ProcessIdentity {
    /// The identity of the live process `pid`, if there is one.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(Self {
            pid,
            start_ticks: start_ticks(&stat)?,
        })
    }

    /// A pidfd for this very process: fails when it has exited or the pid
    /// now names another process.
    pub fn open(&self) -> Result<OwnedFd, String> {
        let pid = libc::pid_t::try_from(self.pid)
            .map_err(|_| format!("pid {} is out of range", self.pid))?;
        // SAFETY: pidfd_open with a pid and flags 0; it returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(format!(
                "process {} is gone ({})",
                self.pid,
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Checked after opening: if the start time matches now, the pidfd
        // refers to the recorded process (a pid is not reused while it lives).
        match Self::of(self.pid) {
            Some(now) if now == *self => Ok(pidfd),
            Some(_) => Err(format!(
                "pid {} now belongs to another process (different start time)",
                self.pid
            )),
            None => Err(format!("process {} is gone", self.pid)),
        }
    }
}

/// Field 22 of a `/proc/<pid>/stat` line (the command name in field 2 may
/// hold spaces and parentheses, so fields are counted after the last ')').
fn start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Publishes `description` once the process behind `pidfd` has exited.
pub fn watch_exit(pidfd: OwnedFd, description: String) -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        // SAFETY: the AsyncFd owns the pidfd, which is neither closed nor
        // replaced while registered (it is dropped with the AsyncFd).
        match unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) } {
            Ok(fd) => {
                // A pidfd polls readable once the process has exited.
                let _ = fd.readable().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot watch a VM process; treating it as ended")
            }
        }
        let _ = tx.send(Some(description));
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_read_after_the_command_name() {
        let stat =
            "123 (a) b) c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 50";
        assert_eq!(start_ticks(stat), Some(98765));
        assert_eq!(start_ticks("garbage"), None);
    }

    #[test]
    fn identity_tells_a_live_process_from_a_wrong_start_time() {
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        assert!(me.open().is_ok());
        let other = ProcessIdentity {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(other.open().unwrap_err().contains("another process"));
    }

    #[tokio::test]
    async fn exit_is_seen_through_the_pidfd() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let id = ProcessIdentity::of(child.id()).unwrap();
        let mut rx = watch_exit(id.open().unwrap(), "ended".into());
        let _ = child.wait();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            rx.wait_for(|v| v.is_some()),
        )
        .await
        .unwrap()
        .unwrap();
    }
}

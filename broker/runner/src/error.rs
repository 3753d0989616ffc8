//! The runner's errors, each with the exit status the broker sees.

/// Why the runner stopped before or instead of running the guest.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("console: {0}")]
    Console(std::io::Error),
    #[error("network relay: {0}")]
    Network(std::io::Error),
    #[error("libkrun: {call} failed: {}", std::io::Error::from_raw_os_error(*.errno))]
    Krun { call: &'static str, errno: i32 },
}

/// Exit statuses of `moat-vmm` besides the guest's own end.
pub mod status {
    /// Bad command line.
    pub const USAGE: i32 = 2;
    /// A console, network or libkrun setup step failed.
    pub const SETUP: i32 = 3;
    /// The guest kernel panicked (libkrun itself would exit 0).
    pub const GUEST_PANIC: i32 = 70;
}

impl RunnerError {
    pub fn exit_status(&self) -> i32 {
        match self {
            RunnerError::Usage(_) => status::USAGE,
            _ => status::SETUP,
        }
    }
}

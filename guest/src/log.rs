//! Console logging: one line per event on stderr (the VM's serial console),
//! every line prefixed `moat-agent: `. Write errors are ignored on purpose:
//! PID 1 must never die because the console is gone.

use std::fmt;
use std::io::{self, Write};

/// Prefix of every console line the agent writes.
pub const PREFIX: &str = "moat-agent: ";

/// Writes one prefixed line to stderr, ignoring errors.
pub fn line(args: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "{PREFIX}{args}");
}

/// `log!("format", args..)`: one prefixed console line.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!($($arg)*))
    };
}
pub(crate) use log;

//! `moat`: the operator CLI. `moat server start [--dev]` runs the broker (as
//! root) and the gateway (dropped to the unprivileged user named by the
//! broker config's `gateway_uid`) on this host, and stops both cleanly on
//! Ctrl-C / SIGTERM; `moat server keygen` / `revoke` manage API keys;
//! `moat image pull|import|ls|rm|gc` manage the image store; `moat sandbox
//! ls|rm` list and forget stored sandboxes through the running broker;
//! `moat config check` checks both config files as the daemons would.

mod config;
mod image;
mod keys;
mod sandbox;
mod server;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// moat: self-hosted microVM sandboxes for untrusted code.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run and manage the moat server (broker + gateway).
    Server {
        #[command(subcommand)]
        command: server::ServerCommand,
    },
    /// Manage the OCI image store (pull, import, ls, rm, gc).
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Check the broker and gateway config files.
    Config {
        #[command(subcommand)]
        command: config::ConfigCommand,
    },
    /// List and remove stored sandboxes (through the running broker).
    Sandbox {
        #[command(subcommand)]
        command: sandbox::SandboxCommand,
    },
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Server { command } => server::run(command),
        Command::Image { command } => image::run(command),
        Command::Sandbox { command } => sandbox::run(command),
        Command::Config { command } => config::run(command),
    };
    if let Err(e) = result {
        // The whole chain on one line, never a backtrace.
        eprintln!("moat: {e:#}");
        std::process::exit(1);
    }
}

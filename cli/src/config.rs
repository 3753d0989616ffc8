//! `moat config check`: loads and checks the broker's and the gateway's
//! config files exactly as the daemons do at start (unknown keys, bad
//! values, limits that contradict each other), reporting every problem with
//! its file (and line, for syntax and unknown keys) before a restart would.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use moat_broker::config::BrokerConfig;
use moat_gateway::config::{Config as GatewayConfig, DEFAULT_CONFIG_FILE};

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check the broker and gateway config files; exit 1 naming each problem.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Broker configuration.
    #[arg(
        long,
        env = "MOAT_BROKER_CONFIG",
        default_value = "/etc/moat/broker.toml"
    )]
    broker_config: PathBuf,
    /// Gateway configuration (default: /etc/moat/gateway.toml when it
    /// exists; without one the gateway runs on its defaults).
    #[arg(long, env = "MOAT_GATEWAY_CONFIG")]
    gateway_config: Option<PathBuf>,
}

pub fn run(cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> Result<()> {
    let mut problems = Vec::new();
    // Load errors name the file (and line); validation errors name the key.
    match BrokerConfig::load(&args.broker_config) {
        Err(e) => problems.push(e.to_string()),
        Ok(c) => match c.validate() {
            Ok(()) => println!("{}: ok", args.broker_config.display()),
            Err(e) => problems.push(format!("{}: {e}", args.broker_config.display())),
        },
    }
    let gateway = args.gateway_config.or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG_FILE);
        default.exists().then_some(default)
    });
    match gateway {
        Some(path) => match GatewayConfig::load(&path) {
            Err(e) => problems.push(e.to_string()),
            Ok(c) => match c.validate() {
                Ok(()) => println!("{}: ok", path.display()),
                Err(e) => problems.push(format!("{}: {e}", path.display())),
            },
        },
        None => println!("gateway: no config file, built-in defaults"),
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{p}");
        }
        bail!(
            "{} config problem(s); fix them before (re)starting moat",
            problems.len()
        );
    }
    Ok(())
}

//! `moat-gateway`: reads the command line and config file, checks the
//! configuration, sets up logging (text or JSON, filtered by `MOAT_LOG`,
//! colours only on a terminal), serves the public router
//! on TCP (and a Unix socket when configured) and `/metrics` on its own
//! address when configured, raises its open-files limit to fit
//! `limits.max_connections`, and shuts down gracefully on SIGINT or SIGTERM:
//! the listeners close at once (new connections are refused) and in-flight
//! requests get `timeouts.shutdown_grace_secs` to finish; it then exits 0.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moat_gateway::config::{Args, Config};
use moat_gateway::serve::{ensure_open_files, serve, Listener, ServeOptions};
use moat_gateway::{app, metrics_app, AppState};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Args::parse().into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("moat-gateway: {err}");
            return ExitCode::FAILURE;
        }
    };
    let filter = match log_filter() {
        Ok(filter) => filter,
        Err(err) => {
            eprintln!("moat-gateway: {err}");
            return ExitCode::FAILURE;
        }
    };
    if config.log.json {
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("moat-gateway: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// What to log: `MOAT_LOG` in tracing's filter syntax, `info` when unset
/// or empty. A filter that does not parse is refused, not guessed at.
fn log_filter() -> Result<EnvFilter, String> {
    match std::env::var("MOAT_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).map_err(|e| {
            format!(
                "MOAT_LOG={v:?} is not a log filter ({e}): give a level (error, warn, info, \
                 debug, trace) or target=level pairs such as info,moat_gateway=debug"
            )
        }),
        _ => Ok(EnvFilter::new("info")),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    if config.dev {
        tracing::warn!(
            listen = %config.listen,
            "DEVELOPMENT MODE: NO AUTHENTICATION IS ENFORCED. Anyone who can reach {} \
             can start sandboxes and run code in them. Never expose this address.",
            config.listen
        );
    }
    let state = AppState::from_config(&config).context("cannot set up API keys")?;

    let mut listeners = vec![(
        Listener::Tcp(
            tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?,
        ),
        app(state.clone()),
    )];
    if let Some(path) = &config.unix_socket {
        let listener = Listener::bind_unix(path, config.unix_socket_mode)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        listeners.push((listener, app(state.clone())));
    }
    if let Some(addr) = config.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for /metrics on {addr}"))?;
        listeners.push((Listener::Tcp(listener), metrics_app(state.clone())));
    }

    // Every connection is a file descriptor: let the open-files limit allow
    // limits.max_connections on every listener (plus room for the broker
    // connection, logs and the like).
    let wanted = (config.limits.max_connections as u64)
        .saturating_mul(listeners.len() as u64)
        .saturating_add(256);
    match ensure_open_files(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            open_files_limit = limit,
            wanted,
            "the open-files limit (RLIMIT_NOFILE) is below what limits.max_connections needs on \
             every listener; connections beyond it wait until others close. Raise the hard \
             limit (ulimit -Hn, LimitNOFILE=) or lower limits.max_connections"
        ),
        Ok(limit) => tracing::debug!(open_files_limit = limit, "open-files limit"),
        Err(err) => tracing::warn!(error = %err, "cannot read or raise the open-files limit"),
    }

    let options = ServeOptions {
        header_read_timeout: Duration::from_secs(config.timeouts.header_read_secs),
        max_connections: config.limits.max_connections,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for (listener, router) in listeners {
        tracing::info!(
            listen = %listener.describe(),
            broker_socket = %config.broker_socket.display(),
            auth = if config.dev { "none (dev)" } else { "API keys" },
            "moat-gateway serving"
        );
        servers.spawn(serve(listener, router, options, stop_rx.clone()));
    }

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(config.timeouts.shutdown_grace_secs);
    let drained = tokio::time::timeout(grace, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "in-flight requests did not finish within the shutdown grace; exiting anyway"
        );
    }
    if let Some(path) = &config.unix_socket {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("moat-gateway stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the gateway");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        result = interrupt => {
            if let Err(err) = result {
                tracing::error!(error = %err, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        }
        () = terminate => {}
    }
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

//! `moat-gateway`: parses the command line, checks the configuration, sets
//! up logging, serves the router, and shuts down gracefully on SIGINT or
//! SIGTERM (in-flight requests get a bounded time to finish).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moat_gateway::config::{Args, Config};
use moat_gateway::{app, AppState};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::from(Args::parse());
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("moat-gateway: {err:#}");
            ExitCode::FAILURE
        }
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

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let state = AppState::from_config(&config);
    tracing::info!(
        listen = %config.listen,
        broker_socket = %config.broker_socket.display(),
        "moat-gateway serving"
    );

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let serve = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let grace = config.shutdown_grace;
    tokio::select! {
        served = serve => served.context("server failed")?,
        () = grace_expired(&mut stop_rx, grace) => {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "in-flight requests did not finish within the shutdown grace; exiting anyway"
            );
        }
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

/// Resolves `grace` after shutdown began; never if it does not.
async fn grace_expired(stop: &mut watch::Receiver<bool>, grace: Duration) {
    if stop.wait_for(|stopping| *stopping).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(grace).await;
}

//! The gateway's only way to the privileged broker: a gRPC client
//! (`moat.broker.v1.Broker`) over [`CONNECTIONS`] Unix-socket connections
//! used in turn (one HTTP/2 connection is driven by one task, which caps
//! the calls per second it carries). It connects lazily (so the
//! gateway starts, and answers health checks, before the broker is up),
//! reconnects after the broker restarts, with backoff between failed dials
//! (`dial_backoff.rs`),
//! holds a permit of the gateway-wide bound on calls in flight
//! ([`BrokerCalls`]) for every call, gives every call a deadline, and turns
//! every failure into the wire error through [`crate::error::from_status`].
//! Identical health and metrics questions share calls, and a metrics
//! answer is kept for `metrics_max_age` unless a start or stop through
//! this gateway ended since its call was sent ([`Coalescer`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use moat_proto::broker::broker_client::BrokerClient;
use moat_proto::broker::{
    GetMetricsReply, GetMetricsRequest, HealthReply, HealthRequest, RunCommandReply,
    RunCommandRequest, RunReplReply, RunReplRequest, StartSandboxReply, StartSandboxRequest,
    StopSandboxReply, StopSandboxRequest,
};
use tonic::transport::{Channel, Endpoint};

use crate::coalesce::Coalescer;
use crate::error::{from_status, RpcError};
use crate::limits::broker_calls::BrokerCalls;

/// What a `GetMetrics` asks, without who asks, and after which start or
/// stop (the count of those that ended before it was asked).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MetricsQuestion {
    after_changes: u64,
    all_namespaces: bool,
    namespaces: Vec<String>,
    sandbox: Option<String>,
}

/// Connections to the broker, used in turn. Measured with `moat-bench
/// --only gateway` (16 wrk connections, 2 cores): one connection carried
/// 9.3k `metrics.get`/s.
pub const CONNECTIONS: usize = 4;

/// A cheap-to-clone handle on the broker's gRPC service.
#[derive(Debug, Clone)]
pub struct Broker {
    clients: Arc<[BrokerClient<Channel>]>,
    /// Keyed by the deadline: a request never waits longer than its own.
    health_flights: Arc<Coalescer<Duration, Result<HealthReply, RpcError>>>,
    metrics_flights: Arc<Coalescer<MetricsQuestion, Result<GetMetricsReply, RpcError>>>,
    /// Starts and stops that ended (answered, failed or cancelled).
    changes: Arc<AtomicU64>,
    next: Arc<AtomicUsize>,
    socket: Arc<PathBuf>,
    calls: BrokerCalls,
}

impl Broker {
    /// A client for the broker listening on `socket`, with at most
    /// `max_calls` calls in flight at once (more are refused at once with
    /// [`RpcError::at_capacity`]). Nothing is connected until the first
    /// call; a broker that is down makes calls fail with `-32000` (HTTP
    /// 503), and a later call connects again. Must be called inside a Tokio
    /// runtime. A metrics answer may be given again for `metrics_max_age`
    /// after its call was sent (zero: only to requests joining the call).
    pub fn connect_lazy(
        socket: impl Into<PathBuf>,
        max_calls: usize,
        metrics_max_age: Duration,
    ) -> Self {
        let socket = Arc::new(socket.into());
        let backoff = Arc::new(crate::dial_backoff::DialBackoff::default());
        let clients = (0..CONNECTIONS)
            .map(|_| BrokerClient::new(lazy_channel(&socket, &backoff)))
            .collect();
        Broker {
            clients,
            health_flights: Arc::default(),
            metrics_flights: Arc::new(Coalescer::keeping_for(metrics_max_age)),
            changes: Arc::default(),
            next: Arc::new(AtomicUsize::new(0)),
            socket,
            calls: BrokerCalls::new(max_calls),
        }
    }

    /// The next connection's client.
    fn client(&self) -> BrokerClient<Channel> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }

    /// The broker socket this client dials.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The bound on calls in flight (for `/metrics`).
    pub fn calls(&self) -> &BrokerCalls {
        &self.calls
    }

    /// `Health`: does the broker answer? Concurrent health checks share
    /// one call ([`Coalescer`]).
    pub async fn health(&self, deadline: Duration) -> Result<HealthReply, RpcError> {
        self.health_flights
            .run(deadline, Result::is_ok, || async {
                let mut client = self.client();
                self.call(deadline, HealthRequest {}, |req| async move {
                    client.health(req).await
                })
                .await
            })
            .await
    }

    /// `StartSandbox`.
    pub async fn start_sandbox(
        &self,
        request: StartSandboxRequest,
        deadline: Duration,
    ) -> Result<StartSandboxReply, RpcError> {
        let _change = Change(&self.changes);
        let mut client = self.client();
        self.call(deadline, request, |req| async move {
            client.start_sandbox(req).await
        })
        .await
    }

    /// `StopSandbox`.
    pub async fn stop_sandbox(
        &self,
        request: StopSandboxRequest,
        deadline: Duration,
    ) -> Result<StopSandboxReply, RpcError> {
        let _change = Change(&self.changes);
        let mut client = self.client();
        self.call(deadline, request, |req| async move {
            client.stop_sandbox(req).await
        })
        .await
    }

    /// `RunCommand`.
    pub async fn run_command(
        &self,
        request: RunCommandRequest,
        deadline: Duration,
    ) -> Result<RunCommandReply, RpcError> {
        let mut client = self.client();
        self.call(deadline, request, |req| async move {
            client.run_command(req).await
        })
        .await
    }

    /// `RunRepl`.
    pub async fn run_repl(
        &self,
        request: RunReplRequest,
        deadline: Duration,
    ) -> Result<RunReplReply, RpcError> {
        let mut client = self.client();
        self.call(deadline, request, |req| async move {
            client.run_repl(req).await
        })
        .await
    }

    /// `GetMetrics`. Requests asking the same question share one call
    /// ([`Coalescer`]), and a good answer serves the same question for
    /// `metrics_max_age` after its call was sent, unless a start or stop
    /// ended since (then the question is asked again); the broker hears
    /// the first asker's caller.
    pub async fn get_metrics(
        &self,
        request: GetMetricsRequest,
        deadline: Duration,
    ) -> Result<GetMetricsReply, RpcError> {
        let question = MetricsQuestion {
            after_changes: self.changes.load(Ordering::Acquire),
            all_namespaces: request.all_namespaces,
            namespaces: request.namespaces.clone(),
            sandbox: request.sandbox.clone(),
        };
        self.metrics_flights
            .run(question, Result::is_ok, || async {
                let mut client = self.client();
                self.call(deadline, request, |req| async move {
                    client.get_metrics(req).await
                })
                .await
            })
            .await
    }

    /// Runs one unary call with `deadline`: sent to the broker as
    /// `grpc-timeout`, and enforced here too so a stuck connection cannot
    /// hold a request forever. Refused at once, before anything is sent,
    /// when the gateway already has `limits.max_broker_calls` in flight.
    async fn call<Req, Rep, F, Fut>(
        &self,
        deadline: Duration,
        message: Req,
        send: F,
    ) -> Result<Rep, RpcError>
    where
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Rep>, tonic::Status>>,
    {
        let _permit = self.calls.try_acquire()?;
        let mut request = tonic::Request::new(message);
        request.set_timeout(deadline);
        let started = Instant::now();
        let outcome = match tokio::time::timeout(deadline, send(request)).await {
            Ok(outcome) => outcome,
            Err(_elapsed) => Err(deadline_exceeded(deadline)),
        };
        outcome.map(tonic::Response::into_inner).map_err(|status| {
            // tonic ends a call whose `grpc-timeout` passed with `Cancelled`,
            // on either side of the socket (the broker's tonic enforces the
            // header too): past the deadline, that is our deadline.
            let status = if status.code() == tonic::Code::Cancelled && started.elapsed() >= deadline
            {
                deadline_exceeded(deadline)
            } else {
                status
            };
            from_status(&status, &self.socket)
        })
    }
}

/// A channel that dials `socket` when first used (and again after the
/// broker went away), sharing the dial back-off of every connection.
fn lazy_channel(socket: &Arc<PathBuf>, backoff: &Arc<crate::dial_backoff::DialBackoff>) -> Channel {
    // The URI is required by tonic but unused: the connector below dials
    // the Unix socket whatever it is given.
    let dial = Arc::clone(socket);
    let backoff = Arc::clone(backoff);
    Endpoint::from_static("http://[::]:50051").connect_with_connector_lazy(tower::service_fn(
        move |_| {
            let path = Arc::clone(&dial);
            let backoff = Arc::clone(&backoff);
            async move {
                backoff
                    .check(Instant::now())
                    .map_err(|held| std::io::Error::new(std::io::ErrorKind::NotConnected, held))?;
                match tokio::net::UnixStream::connect(path.as_path()).await {
                    Ok(stream) => {
                        backoff.succeeded();
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                    Err(e) => {
                        backoff.failed(Instant::now(), &e);
                        Err(e)
                    }
                }
            }
        },
    ))
}

/// Counts a start or stop as ended when dropped: answered, failed, or
/// abandoned by its caller (the broker may have changed something anyway).
struct Change<'a>(&'a AtomicU64);

impl Drop for Change<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

fn deadline_exceeded(deadline: Duration) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!(
        "no answer from the broker within {} s",
        deadline.as_secs()
    ))
}

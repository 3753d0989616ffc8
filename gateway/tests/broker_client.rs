//! The gateway's broker client against a real gRPC server on a Unix socket
//! (tonic, the broker's own service trait): calls and their replies and
//! statuses go through, a broker that goes away makes calls fail at once
//! naming the socket, a broker that comes back on the same path is found
//! again, a connection broken during a call fails that call as the
//! broker being away, and metrics answers are kept only as long as they
//! may be.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moat_gateway::broker::Broker;
use moat_proto::broker::broker_server::{Broker as BrokerService, BrokerServer};
use moat_proto::broker::{
    GetMetricsReply, GetMetricsRequest, HealthReply, HealthRequest, RunCommandReply,
    RunCommandRequest, RunReplReply, RunReplRequest, SandboxMetrics, SandboxRef, StartSandboxReply,
    StartSandboxRequest, StopSandboxReply, StopSandboxRequest,
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

const DEADLINE: Duration = Duration::from_secs(5);

/// A broker that answers `Health` with its generation, lists one sandbox
/// per namespace asked (its `started_at_ms` the number of this
/// `GetMetrics` call; a question for sandbox `fail` is refused, naming the
/// call), refuses stops with `NotFound` and never answers `RunCommand`.
struct FakeBroker {
    generation: u32,
    metrics_calls: AtomicU64,
}

#[tonic::async_trait]
impl BrokerService for FakeBroker {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        Ok(Response::new(HealthReply {
            version: format!("generation-{}", self.generation),
            ..Default::default()
        }))
    }

    async fn start_sandbox(
        &self,
        _: Request<StartSandboxRequest>,
    ) -> Result<Response<StartSandboxReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn stop_sandbox(
        &self,
        request: Request<StopSandboxRequest>,
    ) -> Result<Response<StopSandboxReply>, Status> {
        Err(Status::not_found(format!(
            "no sandbox {}",
            request.into_inner().sandbox.unwrap_or_default().name
        )))
    }

    async fn run_command(
        &self,
        _: Request<RunCommandRequest>,
    ) -> Result<Response<RunCommandReply>, Status> {
        std::future::pending().await
    }

    async fn run_repl(&self, _: Request<RunReplRequest>) -> Result<Response<RunReplReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsReply>, Status> {
        let call = self.metrics_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let request = request.into_inner();
        if request.sandbox.as_deref() == Some("fail") {
            return Err(Status::internal(format!("metrics call {call} failed")));
        }
        let sandboxes = request
            .namespaces
            .into_iter()
            .map(|namespace| SandboxMetrics {
                namespace,
                name: "x".into(),
                running: true,
                started_at_ms: Some(call),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(GetMetricsReply { sandboxes }))
    }
}

/// A [`FakeBroker`] served on its own runtime: stopping it ends the
/// runtime, which closes the listener and every connection, as a broker
/// process that exits does.
struct Server {
    runtime: tokio::runtime::Runtime,
}

/// Serves a [`FakeBroker`] on `socket`.
fn serve(socket: &Path, generation: u32) -> Server {
    let _ = std::fs::remove_file(socket);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("the fake broker's runtime");
    let listener = {
        let _entered = runtime.enter();
        UnixListener::bind(socket).expect("bind the broker socket")
    };
    runtime.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(BrokerServer::new(FakeBroker {
                generation,
                metrics_calls: AtomicU64::new(0),
            }))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .expect("serve");
    });
    Server { runtime }
}

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("broker.sock")
}

async fn stop(server: Server) {
    server.runtime.shutdown_background();
    // The runtime's threads close its sockets as they stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn calls_replies_and_statuses_go_through() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let server = serve(&socket, 1);
    let broker = Broker::connect_lazy(&socket, 64, Duration::ZERO);

    let health = broker.health(DEADLINE).await.expect("health");
    assert_eq!(health.version, "generation-1");
    let metrics = broker
        .get_metrics(
            GetMetricsRequest {
                namespaces: vec!["a".into(), "b".into()],
                ..Default::default()
            },
            DEADLINE,
        )
        .await
        .expect("metrics");
    let names: Vec<_> = metrics.sandboxes.iter().map(|s| &s.namespace).collect();
    assert_eq!(names, ["a", "b"]);
    let err = stop_gone(&broker).await;
    assert_eq!(err.code().code(), -32003, "{err:?}");
    assert!(err.message().contains("no sandbox gone"), "{err:?}");
    stop(server).await;
}

#[tokio::test]
async fn a_broker_that_goes_away_and_comes_back_is_found_again() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let broker = Broker::connect_lazy(&socket, 64, Duration::ZERO);

    // Not there yet: refused at once, naming the socket.
    let err = broker.health(DEADLINE).await.expect_err("no broker yet");
    assert_eq!(err.code().code(), -32000, "{err:?}");
    assert!(err.message().contains("broker unreachable"), "{err:?}");
    assert!(
        err.message().contains(&socket.display().to_string()),
        "{err:?}"
    );

    let server = serve(&socket, 1);
    let found = wait_for_health(&broker).await;
    assert_eq!(found.version, "generation-1");

    // Every connection in turn is used before the broker goes away.
    for _ in 0..8 {
        broker.health(DEADLINE).await.expect("health");
    }
    stop(server).await;
    std::fs::remove_file(&socket).unwrap();
    let started = Instant::now();
    let err = broker.health(DEADLINE).await.expect_err("broker gone");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a gone broker fails the call at once"
    );
    assert_eq!(err.code().code(), -32000, "{err:?}");

    let server = serve(&socket, 2);
    let found = wait_for_health(&broker).await;
    assert_eq!(found.version, "generation-2", "the new broker answers");
    for _ in 0..8 {
        let reply = broker.health(DEADLINE).await.expect("every connection");
        assert_eq!(reply.version, "generation-2");
    }
    stop(server).await;
}

#[tokio::test]
async fn a_connection_broken_during_a_call_fails_that_call_as_the_broker_away() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let server = serve(&socket, 1);
    let broker = Broker::connect_lazy(&socket, 64, Duration::ZERO);
    let call = {
        let broker = broker.clone();
        tokio::spawn(async move {
            broker
                .run_command(RunCommandRequest::default(), DEADLINE)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "the fake broker never answers");
    let started = Instant::now();
    stop(server).await;
    let err = call.await.unwrap().expect_err("the connection went away");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "not left to its deadline"
    );
    assert_eq!(err.code().code(), -32000, "{err:?}");
    assert!(err.message().contains("broker"), "{err:?}");
}

#[tokio::test]
async fn concurrent_first_calls_on_fresh_connections_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let server = serve(&socket, 1);
    let broker = Broker::connect_lazy(&socket, 1024, Duration::ZERO);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let broker = broker.clone();
            tokio::spawn(async move {
                broker
                    .get_metrics(
                        GetMetricsRequest {
                            namespaces: vec![format!("ns{i}")],
                            ..Default::default()
                        },
                        DEADLINE,
                    )
                    .await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let reply = task.await.unwrap().expect("metrics");
        assert_eq!(reply.sandboxes[0].namespace, format!("ns{i}"));
    }
    stop(server).await;
}

#[tokio::test]
async fn a_metrics_answer_is_kept_until_too_old_or_a_start_or_stop_ends() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let server = serve(&socket, 1);
    let kept = Broker::connect_lazy(&socket, 64, Duration::from_secs(60));
    // The number of the broker call an answer came from.
    let call_of = |broker: &Broker, namespace: &str, sandbox: Option<&str>| {
        let (broker, namespace) = (broker.clone(), namespace.to_owned());
        let sandbox = sandbox.map(str::to_owned);
        async move {
            broker
                .get_metrics(
                    GetMetricsRequest {
                        namespaces: vec![namespace],
                        sandbox,
                        ..Default::default()
                    },
                    DEADLINE,
                )
                .await
                .map(|reply| reply.sandboxes[0].started_at_ms.expect("numbered"))
                .map_err(|err| err.message().to_owned())
        }
    };
    let first = call_of(&kept, "a", None).await.expect("metrics");
    assert_eq!(call_of(&kept, "a", None).await, Ok(first), "kept");
    let other = call_of(&kept, "b", None).await.expect("metrics");
    assert_ne!(other, first, "another question is asked of the broker");

    // A stop that ended (even refused) may have changed what the broker
    // reports: the next answer comes from a new call.
    stop_gone(&kept).await;
    let after_stop = call_of(&kept, "a", None).await.expect("metrics");
    assert!(after_stop > other, "asked again after the stop");
    assert_eq!(call_of(&kept, "a", None).await, Ok(after_stop), "kept");

    // A refusal is never kept.
    let refused = call_of(&kept, "a", Some("fail"))
        .await
        .expect_err("refused");
    let again = call_of(&kept, "a", Some("fail"))
        .await
        .expect_err("refused");
    assert_ne!(refused, again, "each refused question reached the broker");

    // With no age allowed, every question reaches the broker.
    let fresh = Broker::connect_lazy(&socket, 64, Duration::ZERO);
    let one = call_of(&fresh, "a", None).await.expect("metrics");
    let two = call_of(&fresh, "a", None).await.expect("metrics");
    assert_ne!(one, two);
    stop(server).await;
}

/// Stops sandbox `a/gone`, which the fake broker refuses.
async fn stop_gone(broker: &Broker) -> moat_gateway::error::RpcError {
    broker
        .stop_sandbox(
            StopSandboxRequest {
                sandbox: Some(SandboxRef {
                    namespace: "a".into(),
                    name: "gone".into(),
                }),
                ..Default::default()
            },
            DEADLINE,
        )
        .await
        .expect_err("the broker refused")
}

/// Health once the broker answers (the dial back-off is at most 250 ms).
async fn wait_for_health(broker: &Broker) -> HealthReply {
    let started = Instant::now();
    loop {
        match broker.health(DEADLINE).await {
            Ok(reply) => return reply,
            Err(err) if started.elapsed() < Duration::from_secs(3) => {
                assert_eq!(err.code().code(), -32000, "{err:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("the broker is back but not found: {err:?}"),
        }
    }
}

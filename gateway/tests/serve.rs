//! The accept loop over real TCP (`serve::serve` on 127.0.0.1): clients
//! that connect and stay silent, or go idle after a request, are closed
//! after the header-read deadline, so silent connections filling
//! `max_connections` cannot keep others out for longer than that; and a
//! stop closes the listener at once (new connections are refused) while an
//! in-flight request still completes.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use moat_gateway::serve::{serve, Listener, ServeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_millis(300);
/// How long a test waits for something that must happen (not a measure).
const PATIENCE: Duration = Duration::from_secs(10);

const REQUEST: &[u8] = b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\n";

struct Running {
    addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    served: tokio::task::JoinHandle<()>,
}

async fn start(router: Router, max_connections: usize) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let options = ServeOptions {
        header_read_timeout: DEADLINE,
        max_connections,
    };
    let served = tokio::spawn(serve(Listener::Tcp(listener), router, options, stop_rx));
    Running { addr, stop, served }
}

fn ping() -> Router {
    Router::new().route("/ping", get(|| async { "pong" }))
}

/// Reads one response (headers and a `content-length` body) from `stream`.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "connection closed before a whole response: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Waits for the server to close `stream` (EOF or reset).
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed_and_free_their_slots() {
    let server = start(ping(), 4).await;
    // Two keep-alive connections that completed a request, two that never
    // send a byte: every slot taken.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(REQUEST).await.unwrap();
        let response = read_response(&mut s).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        idle.push(s);
    }
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // A fifth client waits in the backlog, and is served once the deadline
    // has closed the others.
    let mut fifth = TcpStream::connect(server.addr).await.unwrap();
    fifth.write_all(REQUEST).await.unwrap();
    for s in idle.iter_mut().chain(silent.iter_mut()) {
        assert!(closed_by_server(s).await, "a quiet connection stays open");
    }
    let response = read_response(&mut fifth).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let _ = server.stop.send(true);
    drop(fifth);
    tokio::time::timeout(PATIENCE, server.served)
        .await
        .expect("serve returns after the stop")
        .unwrap();
}

#[tokio::test]
async fn a_byte_then_silence_is_closed_too() {
    let server = start(ping(), 4).await;
    // "P" could begin the HTTP/2 preface or "POST": hyper would wait for
    // more; the deadline does not.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"P").await.unwrap();
    assert!(closed_by_server(&mut s).await);
    let _ = server.stop.send(true);
}

#[tokio::test]
async fn draining_refuses_new_connections_and_finishes_in_flight_requests() {
    let (release, released) = watch::channel(false);
    let router = Router::new().route(
        "/slow",
        get(move || {
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                "finished"
            }
        }),
    );
    let server = start(router, 16).await;
    let mut in_flight = TcpStream::connect(server.addr).await.unwrap();
    in_flight
        .write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // The request is being handled (its handler waits for `release`).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = server.stop.send(true);

    // From now on connecting is refused, while the request is in flight.
    let started = tokio::time::Instant::now();
    loop {
        match TcpStream::connect(server.addr).await {
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // Accepted into the backlog (or reset out of it) while the
            // listener was closing: try again.
            _ => {
                assert!(
                    started.elapsed() < PATIENCE,
                    "still accepting connections while draining"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(!server.served.is_finished(), "drain waits for the request");
    let _ = release.send(true);
    let response = read_response(&mut in_flight).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("finished"), "{response}");
    tokio::time::timeout(PATIENCE, server.served)
        .await
        .expect("serve returns once the request is done")
        .unwrap();
}

//! The accept loop: serves a router on a TCP or Unix listener with hyper,
//! HTTP/1.1 and HTTP/2, a cap on open connections, the connection's
//! [`Peer`] put in every request, and a graceful stop: once told to stop it
//! closes its listener (new connections are refused) and returns when open
//! connections have finished their requests.
//!
//! Slow or silent clients cannot hold a connection slot: a new connection
//! must show which HTTP it speaks within the header-read deadline
//! ([`Preface`]: the bytes that tell HTTP/1 from HTTP/2, and for HTTP/2 its
//! first frame), else it is closed; after that hyper's own HTTP/1 header-read
//! deadline applies to every request's headers, idle keep-alive
//! connections included, and HTTP/2 connections must answer pings within
//! it. Also [`ensure_open_files`], so the open-files limit does not cap
//! connections below `limits.max_connections`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::time::Sleep;
use tower::ServiceExt;

use crate::obs::client_ip::Peer;

/// Where connections come from.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds a Unix socket at `path` (a stale file there is replaced) with
    /// permission `mode`.
    pub fn bind_unix(path: &Path, mode: u32) -> std::io::Result<Listener> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        Ok(Listener::Unix(listener, path.to_owned()))
    }

    /// What it listens on, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("http://{a}"))
                .unwrap_or_else(|_| "tcp".to_owned()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

/// Connection handling options.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Time a client has to send a request's headers (and, on a new
    /// connection, to show which HTTP it speaks).
    pub header_read_timeout: Duration,
    /// Open connections at once.
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `stop` turns true, then closes the
/// listener (connecting is refused from then on) and waits for open
/// connections to finish their requests.
pub async fn serve(
    listener: Listener,
    router: Router,
    options: ServeOptions,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(options.header_read_timeout);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            accepted = accept(&listener) => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = router
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(peer);
                request
            });
        let io: Io = TokioIo::new(Box::new(Preface::new(stream, options.header_read_timeout)));
        let connection = builder
            .serve_connection_with_upgrades(io, TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }
    // Draining: close the listening socket first, so new connections are
    // refused (and those waiting in its backlog reset) instead of hanging
    // until the process exits.
    drop(listener);
    graceful.shutdown().await;
}

type Io = TokioIo<Box<dyn IoStream>>;

/// A connected stream of either kind.
trait IoStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> IoStream for T {}

async fn accept(listener: &Listener) -> io::Result<(Box<dyn IoStream>, Peer)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, addr) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok((Box::new(stream), Peer::Tcp(addr)))
        }
        Listener::Unix(l, _) => {
            let (stream, _) = l.accept().await?;
            Ok((Box::new(stream), Peer::Unix))
        }
    }
}

/// The HTTP/2 connection preface; hyper reads up to this much to tell
/// HTTP/2 from HTTP/1.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/2 frame header's length.
const H2_FRAME_HEADER: usize = 9;

/// A new connection's stream until the client has shown which HTTP it
/// speaks: the bytes that differ from the HTTP/2 preface (HTTP/1: hyper's
/// header-read deadline takes over from there), or for HTTP/2 the whole
/// preface and the first frame (the client's SETTINGS, which completes the
/// handshake; pings take over from there). A read still short of that when
/// the deadline passes fails with `TimedOut`, which ends the connection: a
/// client that connects and sends nothing (or a few bytes) cannot hold a
/// connection slot. Afterwards it only passes bytes through.
struct Preface<S> {
    stream: S,
    /// `None` once the client has shown its protocol.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes read so far while the deadline is armed.
    seen: usize,
    /// For HTTP/2: the first frame's header, then where that frame ends.
    h2_frame: [u8; H2_FRAME_HEADER],
    h2_end: Option<usize>,
}

impl<S> Preface<S> {
    fn new(stream: S, within: Duration) -> Self {
        Preface {
            stream,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
            seen: 0,
            h2_frame: [0; H2_FRAME_HEADER],
            h2_end: None,
        }
    }

    /// Takes in bytes just read; disarms the deadline once they show the
    /// protocol.
    fn observe(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.deadline.is_none() {
                return;
            }
            let at = self.seen;
            self.seen += 1;
            if at < H2_PREFACE.len() {
                if byte != H2_PREFACE[at] {
                    // Not HTTP/2: HTTP/1 (or garbage hyper will refuse).
                    self.deadline = None;
                }
                continue;
            }
            let in_frame = at - H2_PREFACE.len();
            if in_frame < H2_FRAME_HEADER {
                self.h2_frame[in_frame] = byte;
                if in_frame + 1 == H2_FRAME_HEADER {
                    let f = &self.h2_frame;
                    let length =
                        (usize::from(f[0]) << 16) | (usize::from(f[1]) << 8) | usize::from(f[2]);
                    self.h2_end = Some(H2_PREFACE.len() + H2_FRAME_HEADER + length);
                }
            }
            if self.h2_end.is_some_and(|end| self.seen >= end) {
                self.deadline = None;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Preface<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if self.deadline.is_some() {
                    self.observe(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                let expired = self
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                self.deadline = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not send a request within the header-read deadline",
                )))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Preface<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Raises this process's soft open-files limit (`RLIMIT_NOFILE`) to
/// `wanted` when it is lower, up to the hard limit (raising the soft limit
/// needs no privilege). Returns the soft limit in force afterwards; when it
/// is still below `wanted`, accepting fails with `EMFILE` before
/// `limits.max_connections` is reached, and the accept loop backs off.
pub fn ensure_open_files(wanted: u64) -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft >= wanted || soft >= hard {
        return Ok(soft);
    }
    let raised = wanted.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, raised, hard).map_err(io::Error::from)?;
    Ok(raised)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Duration = Duration::from_millis(200);

    async fn read_through(client_sends: &[u8]) -> (io::Result<usize>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(client_sends).await.unwrap();
        let mut preface = Preface::new(server, SHORT);
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match preface.read(&mut buf).await {
                Ok(0) => return (Ok(got.len()), got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(err) => return (Err(err), got),
            }
            if preface.deadline.is_none() {
                return (Ok(got.len()), got);
            }
        }
    }

    #[tokio::test]
    async fn silence_and_partial_prefaces_time_out() {
        for sent in [
            &b""[..],
            b"P",
            b"PRI * HTTP/2.0\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x06\x04\x00\x00\x00\x00\x00",
        ] {
            let (outcome, got) = read_through(sent).await;
            let err = outcome.expect_err("must time out");
            assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{sent:?}");
            assert_eq!(got, sent, "bytes read before the deadline pass through");
        }
    }

    #[tokio::test]
    async fn http1_and_a_whole_h2_settings_frame_disarm_it() {
        let (outcome, got) = read_through(b"GET / HTTP/1.1\r\n").await;
        assert!(outcome.is_ok());
        assert!(!got.is_empty());
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        let (outcome, got) = read_through(&h2).await;
        assert!(outcome.is_ok());
        assert_eq!(got, h2);
    }

    #[tokio::test]
    async fn once_disarmed_a_quiet_connection_stays_open() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut preface = Preface::new(server, SHORT);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(preface.read(&mut buf).await.unwrap() > 0);
        assert!(preface.deadline.is_none());
        let quiet = tokio::time::timeout(SHORT * 3, preface.read(&mut buf)).await;
        assert!(quiet.is_err(), "no error after the deadline once disarmed");
    }

    #[test]
    fn open_files_limit_is_never_lowered() {
        let now = ensure_open_files(0).unwrap();
        assert!(now > 0);
        assert_eq!(ensure_open_files(1).unwrap(), now);
        // Asking for more raises it, bounded by the hard limit.
        let (_, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(ensure_open_files(now + 1).unwrap(), (now + 1).min(hard));
    }
}

//! Published ports: `config.ports` entries ("host:container") forward a host
//! TCP port to the guest. This module owns each published port's listening
//! socket, the task accepting on it and the task relaying every connection
//! to the guest; dropping a [`PublishedPort`] closes all of them.

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Bounds on one published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortLimits {
    /// Connections relayed at once; excess connections are accepted and
    /// closed immediately.
    pub max_connections: usize,
    /// How long to wait for the guest to accept each connection.
    pub connect_timeout: Duration,
}

impl Default for PortLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a port could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("port {port} on {addr} is already in use; choose another host port or stop the sandbox using it")]
    InUse { addr: IpAddr, port: u16 },
    #[error("cannot listen on {bind}: {source}")]
    Bind {
        bind: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A host port forwarded to the guest. Drop stops the listener and every
/// connection it carries; the port is free again when `drop` returns.
pub struct PublishedPort {
    local_addr: SocketAddr,
    target: SocketAddr,
    listener: Arc<Mutex<Option<TcpListener>>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for PublishedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishedPort")
            .field("local_addr", &self.local_addr)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl PublishedPort {
    /// Binds `bind` (e.g. 127.0.0.1:8080) and forwards each connection to `target` (guest ip:port).
    pub async fn publish(
        bind: SocketAddr,
        target: SocketAddr,
        limits: PortLimits,
    ) -> Result<Self, PortError> {
        // tokio sets SO_REUSEADDR, which on Linux lets the port be bound
        // while old connections linger in TIME_WAIT but never while another
        // socket listens on it.
        let listener = TcpListener::bind(bind).await.map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                PortError::InUse {
                    addr: bind.ip(),
                    port: bind.port(),
                }
            } else {
                PortError::Bind { bind, source }
            }
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| PortError::Bind { bind, source })?;
        let listener = Arc::new(Mutex::new(Some(listener)));
        let task = tokio::spawn(accept_loop(Arc::clone(&listener), target, limits));
        tracing::debug!(%local_addr, %target, "published port");
        Ok(Self {
            local_addr,
            target,
            listener,
            task,
        })
    }

    /// The address actually bound (the port is resolved when `bind` asked
    /// for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }
}

impl Drop for PublishedPort {
    fn drop(&mut self) {
        // Closing the listener here, rather than when the aborted task is
        // next polled, frees the port before `drop` returns. Aborting the
        // accept task drops its JoinSet, which aborts every connection.
        drop(lock(&self.listener).take());
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Accepts one connection; `None` once the port has been dropped.
async fn accept(
    listener: &Mutex<Option<TcpListener>>,
) -> Option<io::Result<(TcpStream, SocketAddr)>> {
    poll_fn(|cx| match lock(listener).as_ref() {
        Some(listener) => listener.poll_accept(cx).map(Some),
        None => Poll::Ready(None),
    })
    .await
}

async fn accept_loop(
    listener: Arc<Mutex<Option<TcpListener>>>,
    target: SocketAddr,
    limits: PortLimits,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = accept(&listener) => match accepted {
                None => return,
                Some(Ok((client, peer))) => match Arc::clone(&permits).try_acquire_owned() {
                    Ok(permit) => {
                        let timeout = limits.connect_timeout;
                        connections.spawn(relay(client, peer, target, timeout, permit));
                    }
                    Err(_) => {
                        tracing::debug!(%peer, %target, "published port: at limit, closing");
                        drop(client);
                    }
                },
                Some(Err(err)) => {
                    // Out of descriptors, or a connection reset before it
                    // was accepted: back off briefly rather than spin.
                    tracing::debug!(%target, %err, "published port: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Connects to the guest and copies both ways until both sides are done;
/// when the guest cannot be reached the client connection is just closed.
async fn relay(
    mut client: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    connect_timeout: Duration,
    _permit: OwnedSemaphorePermit,
) {
    let mut guest = match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
        Ok(Ok(guest)) => guest,
        Ok(Err(err)) => {
            tracing::debug!(%peer, %target, %err, "published port: cannot reach the guest");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, %target, "published port: timed out connecting to the guest");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = guest.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut client, &mut guest).await {
        Ok((up, down)) => {
            tracing::debug!(%peer, %target, up, down, "published port: connection closed")
        }
        Err(err) => tracing::debug!(%peer, %target, %err, "published port: connection failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WAIT: Duration = Duration::from_secs(5);

    fn limits() -> PortLimits {
        PortLimits {
            max_connections: 16,
            connect_timeout: Duration::from_secs(2),
        }
    }

    fn any_port() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// An echo server on 127.0.0.1; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, data: &[u8]) {
        stream.write_all(data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        tokio::time::timeout(WAIT, stream.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, data);
    }

    /// Reads until the peer closes; true when it did (EOF or reset) in time.
    async fn closed_by_peer(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn bytes_round_trip() {
        let target = echo_server().await;
        let port = PublishedPort::publish(any_port(), target, limits())
            .await
            .unwrap();
        assert_ne!(port.local_addr().port(), 0);
        assert_eq!(port.target(), target);
        let mut a = TcpStream::connect(port.local_addr()).await.unwrap();
        let mut b = TcpStream::connect(port.local_addr()).await.unwrap();
        round_trip(&mut a, b"hello").await;
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        round_trip(&mut b, &big).await;
        round_trip(&mut a, b"again").await;
        // Half-close travels through: the echo server sees EOF and closes.
        a.shutdown().await.unwrap();
        assert!(closed_by_peer(&mut a).await);
    }

    #[tokio::test]
    async fn second_publish_on_the_same_port_is_in_use() {
        let target = echo_server().await;
        let first = PublishedPort::publish(any_port(), target, limits())
            .await
            .unwrap();
        let err = PublishedPort::publish(first.local_addr(), target, limits())
            .await
            .unwrap_err();
        let port = first.local_addr().port();
        assert!(
            matches!(err, PortError::InUse { port: p, .. } if p == port),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&port.to_string()), "{msg}");
        assert!(msg.contains("choose another host port"), "{msg}");
        assert!(msg.contains("stop the sandbox"), "{msg}");
    }

    #[tokio::test]
    async fn a_port_held_by_another_listener_is_in_use() {
        let other = std::net::TcpListener::bind(any_port()).unwrap();
        let target = echo_server().await;
        let err = PublishedPort::publish(other.local_addr().unwrap(), target, limits())
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::InUse { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn drop_frees_the_port_and_closes_connections() {
        let target = echo_server().await;
        let port = PublishedPort::publish(any_port(), target, limits())
            .await
            .unwrap();
        let addr = port.local_addr();
        let mut client = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut client, b"ping").await;
        drop(port);
        // Free as soon as drop returns, without yielding to the runtime.
        let again = PublishedPort::publish(addr, target, limits())
            .await
            .unwrap();
        assert_eq!(again.local_addr(), addr);
        assert!(closed_by_peer(&mut client).await);
        let mut client = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut client, b"pong").await;
    }

    #[tokio::test]
    async fn refused_target_closes_the_client() {
        let refused = {
            let l = TcpListener::bind(any_port()).await.unwrap();
            l.local_addr().unwrap()
        };
        let port = PublishedPort::publish(any_port(), refused, limits())
            .await
            .unwrap();
        let mut client = TcpStream::connect(port.local_addr()).await.unwrap();
        assert!(closed_by_peer(&mut client).await);
    }

    #[tokio::test]
    async fn excess_connections_are_closed() {
        let target = echo_server().await;
        let one = PortLimits {
            max_connections: 1,
            ..limits()
        };
        let port = PublishedPort::publish(any_port(), target, one)
            .await
            .unwrap();
        let mut first = TcpStream::connect(port.local_addr()).await.unwrap();
        round_trip(&mut first, b"first").await;
        let mut second = TcpStream::connect(port.local_addr()).await.unwrap();
        assert!(closed_by_peer(&mut second).await);
        // Once the first one is gone its slot is free again.
        drop(first);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut next = TcpStream::connect(port.local_addr()).await.unwrap();
            let _ = next.write_all(b"third").await;
            let mut back = [0u8; 5];
            if let Ok(Ok(_)) = tokio::time::timeout(WAIT, next.read_exact(&mut back)).await {
                assert_eq!(&back, b"third");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

//! The broker's side of a guest agent channel: a Unix socket that the VMM
//! bridges to the guest's virtio-serial port. Frames are length-prefixed
//! protobuf (`moat_proto::frame`). Several calls may be in flight; a reader
//! task matches replies to callers by id. Everything the guest sends is
//! hostile: frames over the cap, undecodable frames or replies of the wrong
//! kind close the channel, and every call has a deadline.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_proto::agent::{
    guest_message, host_message, GuestMessage, Hello, HelloReply, HostMessage,
};
use moat_proto::frame::{self, FrameError, HEADER_LEN};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout, Instant};

/// Errors talking to a guest agent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error("agent channel closed: {0}")]
    Closed(String),
    #[error("no answer from the guest agent within {0:?}")]
    Timeout(Duration),
    #[error("guest agent sent a malformed reply: {0}")]
    Protocol(String),
    #[error("guest agent refused the request: {0}")]
    Refused(String),
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<GuestMessage>>>>>;

/// A connected agent channel; cheap to clone.
#[derive(Clone, Debug)]
pub struct AgentClient {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    max_frame: usize,
}

impl AgentClient {
    /// Connects to the VMM's agent socket (waiting for it to appear; it must
    /// be a socket owned by the VM's `uid`, see `vm_socket.rs`) and returns
    /// once the guest agent answered a Hello, or fails at `deadline`.
    ///
    /// `booting`: the guest may not listen yet. QEMU's socket exists from
    /// the start and holds what we write until the guest opens its port;
    /// libkrun's appears once the guest's vsock driver is up, and closes a
    /// connection made before the agent listens, so a booting guest's
    /// closed connection is made again until the deadline. Otherwise (a
    /// re-adopted VM, whose agent is up) a closed channel fails at once.
    pub async fn connect(
        socket: &Path,
        uid: u32,
        max_frame: usize,
        deadline: Instant,
        booting: bool,
    ) -> Result<(Self, HelloReply), AgentError> {
        loop {
            let stream = loop {
                match crate::vm_socket::connect_owned(socket, uid).await {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(AgentError::Closed(format!(
                            "cannot connect to {}: {e}",
                            socket.display()
                        )))
                    }
                    Err(_) => sleep(Duration::from_millis(20)).await,
                }
            };
            let client = Self::from_stream(stream, max_frame);
            match Self::hello(&client, deadline).await {
                Ok(reply) => return Ok((client, reply)),
                Err(AgentError::Closed(_)) if booting && Instant::now() < deadline => {
                    sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Says hello until the agent answers or `deadline`; the guest may not
    /// have opened its port yet, and re-asking covers VMMs that drop what
    /// was written before.
    async fn hello(client: &Self, deadline: Instant) -> Result<HelloReply, AgentError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(AgentError::Timeout(Duration::ZERO));
            }
            let wait = (deadline - now).min(Duration::from_millis(1000));
            let hello = host_message::Body::Hello(Hello {
                protocol_version: moat_proto::agent::PROTOCOL_VERSION,
            });
            match client.call(hello, wait).await {
                Ok(GuestMessage {
                    body: Some(guest_message::Body::Hello(reply)),
                    ..
                }) => {
                    if reply.protocol_version != moat_proto::agent::PROTOCOL_VERSION {
                        return Err(AgentError::Protocol(format!(
                            "guest speaks agent protocol {}, broker speaks {}",
                            reply.protocol_version,
                            moat_proto::agent::PROTOCOL_VERSION
                        )));
                    }
                    return Ok(reply);
                }
                Ok(other) => return Err(unexpected(&other)),
                Err(AgentError::Timeout(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn from_stream(stream: UnixStream, max_frame: usize) -> Self {
        let (read, write) = stream.into_split();
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(read_loop(read, pending.clone(), max_frame));
        Self {
            writer: Arc::new(tokio::sync::Mutex::new(write)),
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            max_frame,
        }
    }

    /// Sends one request and waits up to `wait` for its reply.
    pub async fn call(
        &self,
        body: host_message::Body,
        wait: Duration,
    ) -> Result<GuestMessage, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            match pending.as_mut() {
                Some(map) => map.insert(id, tx),
                None => return Err(AgentError::Closed("the VM's agent channel is gone".into())),
            };
        }
        let result = async {
            self.send(HostMessage {
                id,
                body: Some(body),
            })
            .await?;
            rx.await.map_err(|_| {
                AgentError::Closed("the guest closed the channel before answering".into())
            })
        };
        let out = match timeout(wait, result).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout(wait)),
        };
        if let Some(map) = lock(&self.pending).as_mut() {
            map.remove(&id);
        }
        match out {
            Ok(GuestMessage {
                body: Some(guest_message::Body::Failure(f)),
                ..
            }) => Err(AgentError::Refused(f.message)),
            other => other,
        }
    }

    /// Sends a message that expects no reply (e.g. Shutdown).
    pub async fn notify(&self, body: host_message::Body) -> Result<(), AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send(HostMessage {
            id,
            body: Some(body),
        })
        .await
    }

    async fn send(&self, msg: HostMessage) -> Result<(), AgentError> {
        let bytes = frame::encode(&msg, self.max_frame)
            .map_err(|e| AgentError::Protocol(format!("request too large: {e}")))?;
        let mut w = self.writer.lock().await;
        w.write_all(&bytes)
            .await
            .map_err(|e| AgentError::Closed(format!("write: {e}")))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Describes a reply of the wrong kind.
pub fn unexpected(msg: &GuestMessage) -> AgentError {
    AgentError::Protocol(format!("unexpected reply kind for request {}", msg.id))
}

async fn read_loop(mut read: OwnedReadHalf, pending: Pending, max_frame: usize) {
    let reason = loop {
        match read_frame(&mut read, max_frame).await {
            Ok(Some(msg)) => {
                let waiter = lock(&pending).as_mut().and_then(|m| m.remove(&msg.id));
                // Replies nobody waits for (late, or invented by the guest)
                // are dropped.
                if let Some(tx) = waiter {
                    let _ = tx.send(msg);
                }
            }
            Ok(None) => break "end of stream".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    tracing::debug!(%reason, "agent channel closed");
    // Dropping the senders wakes every caller with "closed".
    lock(&pending).take();
}

async fn read_frame(
    read: &mut OwnedReadHalf,
    max: usize,
) -> Result<Option<GuestMessage>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    match read.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::body_len(header, max)?;
    let mut body = vec![0u8; len];
    read.read_exact(&mut body).await?;
    Ok(Some(GuestMessage::decode(body.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_proto::agent::Failure;

    /// A stand-in guest on the other end of a socketpair, speaking frames
    /// with blocking I/O exactly like the real agent's codec.
    fn guest(stream: std::os::unix::net::UnixStream, handler: fn(HostMessage) -> Option<Vec<u8>>) {
        std::thread::spawn(move || {
            let mut r = stream.try_clone().unwrap();
            let mut w = stream;
            while let Ok(Some(msg)) = frame::read::<HostMessage, _>(&mut r, 1 << 20) {
                if let Some(bytes) = handler(msg) {
                    if std::io::Write::write_all(&mut w, &bytes).is_err() {
                        break;
                    }
                }
            }
        });
    }

    fn pair() -> (UnixStream, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (UnixStream::from_std(a).unwrap(), b)
    }

    fn hello() -> host_message::Body {
        host_message::Body::Hello(Hello {
            protocol_version: 1,
        })
    }

    #[tokio::test]
    async fn replies_are_matched_by_id() {
        let (host, g) = pair();
        guest(g, |m| {
            let reply = GuestMessage {
                id: m.id,
                body: Some(guest_message::Body::Hello(HelloReply {
                    protocol_version: 1,
                    agent_version: format!("v{}", m.id),
                    kernel_release: String::new(),
                })),
            };
            Some(frame::encode(&reply, 1 << 20).unwrap())
        });
        let c = AgentClient::from_stream(host, 1 << 20);
        let (a, b) = tokio::join!(
            c.call(hello(), Duration::from_secs(5)),
            c.call(hello(), Duration::from_secs(5))
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        for m in [a, b] {
            match m.body {
                Some(guest_message::Body::Hello(h)) => {
                    assert_eq!(h.agent_version, format!("v{}", m.id))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn connect_retries_a_socket_that_closes_before_the_agent_listens() {
        // libkrun's vsock socket: connections made before the guest's agent
        // listens are closed at once; the broker connects again.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        std::thread::spawn(move || {
            for _ in 0..2 {
                drop(listener.accept().unwrap());
            }
            let (ready, _) = listener.accept().unwrap();
            guest(ready, |m| {
                let reply = GuestMessage {
                    id: m.id,
                    body: Some(guest_message::Body::Hello(HelloReply {
                        protocol_version: 1,
                        agent_version: "third time".into(),
                        kernel_release: String::new(),
                    })),
                };
                Some(frame::encode(&reply, 1 << 20).unwrap())
            });
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let (_client, hello) = AgentClient::connect(&path, uid, 1 << 20, deadline, true)
            .await
            .unwrap();
        assert_eq!(hello.agent_version, "third time");

        // A socket that never answers ends at the deadline, not before.
        let path = dir.path().join("closing.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || loop {
            drop(listener.accept().unwrap());
        });
        let started = Instant::now();
        let err = AgentClient::connect(
            &path,
            uid,
            1 << 20,
            started + Duration::from_millis(500),
            true,
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(500), "{err}");
        assert!(
            matches!(err, AgentError::Closed(_) | AgentError::Timeout(_)),
            "{err}"
        );
        // A guest that is not booting fails at once when it closes.
        let started = Instant::now();
        let err =
            AgentClient::connect(&path, uid, 1 << 20, started + Duration::from_secs(5), false)
                .await
                .unwrap_err();
        assert!(matches!(err, AgentError::Closed(_)), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn oversized_frame_from_guest_closes_the_channel() {
        let (host, g) = pair();
        guest(g, |_| Some(vec![0x7f, 0xff, 0xff, 0xff, 1, 2, 3]));
        let c = AgentClient::from_stream(host, 1024);
        let err = c.call(hello(), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, AgentError::Closed(_)), "{err}");
        // Later calls fail at once instead of waiting.
        let err = c.call(hello(), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, AgentError::Closed(_)), "{err}");
    }

    #[tokio::test]
    async fn silent_guest_times_out_and_failure_is_refused() {
        let (host, g) = pair();
        guest(g, |_| None);
        let c = AgentClient::from_stream(host, 1024);
        let err = c
            .call(hello(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::Timeout(_)), "{err}");

        let (host, g) = pair();
        guest(g, |m| {
            let reply = GuestMessage {
                id: m.id,
                body: Some(guest_message::Body::Failure(Failure {
                    message: "nope".into(),
                })),
            };
            Some(frame::encode(&reply, 1024).unwrap())
        });
        let c = AgentClient::from_stream(host, 1024);
        let err = c.call(hello(), Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(err, AgentError::Refused(ref m) if m == "nope"),
            "{err}"
        );
    }
}

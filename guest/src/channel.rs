//! The agent channel: reads `HostMessage` frames from the virtio-serial port
//! (QEMU) or from a vsock connection (libkrun), handles each request on its
//! own thread and writes `GuestMessage` replies (same id) through one
//! mutex-guarded writer. A host disconnect is not the end: the serial port
//! reads 0 bytes until the host reconnects, so we back off and keep
//! reading; on vsock each host connection is served in turn. With test hooks on ([`crate::testhook`]), some `Exec`
//! requests get deliberately broken replies instead.

use std::fs::OpenOptions;
use std::io::{self, BufReader, Read, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use moat_proto::agent::{
    guest_message, host_message, Failure, GuestMessage, HelloReply, HostMessage, PROTOCOL_VERSION,
};
use moat_proto::frame::{self, FrameError};

use crate::error::{Context, Result};
use crate::log::log;
use crate::testhook;
use crate::{exec, repl, setup};

/// Largest frame accepted or sent.
pub const MAX_FRAME: usize = 16 << 20;
/// Most requests handled at once; more are answered with a `Failure`.
pub const MAX_IN_FLIGHT: usize = 64;
const IDLE_MIN: Duration = Duration::from_millis(5);
const IDLE_MAX: Duration = Duration::from_millis(100);
/// Consecutive read errors (each followed by an [`IDLE_MAX`] pause) after
/// which the channel is declared dead.
const MAX_READ_ERRORS: u32 = 50;

/// What to do when the channel reads end-of-stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnEof {
    /// Back off and read again (virtio-serial: the host may reconnect).
    Wait,
    /// Return from [`Server::serve`] (tests, stream sockets).
    Stop,
}

/// Called for `Shutdown`; in the VM it powers off and does not return.
pub type ShutdownHook = Box<dyn Fn() + Send + Sync>;

/// Shared state of one channel.
pub struct Server<W> {
    writer: Mutex<W>,
    in_flight: AtomicUsize,
    max_in_flight: usize,
    max_frame: usize,
    shutdown: ShutdownHook,
    test_hooks: bool,
}

/// Serves the virtio-serial port at `path` forever (returns only on error).
pub fn serve_port(path: &Path, shutdown: ShutdownHook) -> Result<()> {
    let port = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ctx(|| format!("open agent port {}", path.display()))?;
    let writer = port.try_clone().ctx(|| "duplicate the agent port fd")?;
    let test_hooks = testhook::enabled_from_env();
    if test_hooks {
        log!("test hooks enabled ({}=1)", testhook::ENV);
    }
    let server = Arc::new(
        Server::new(writer, shutdown, MAX_FRAME, MAX_IN_FLIGHT).with_test_hooks(test_hooks),
    );
    server.serve(BufReader::with_capacity(64 * 1024, port), OnEof::Wait)
}

/// Serves host connections on vsock `port`, one at a time, forever
/// (returns only on error). A new connection is the host reconnecting
/// (a restarted broker); requests of the old one still running answer
/// into the old, closed connection.
pub fn serve_vsock(port: u32, shutdown: ShutdownHook) -> Result<()> {
    use nix::sys::socket::{
        accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
    };
    use std::os::fd::{FromRawFd, OwnedFd};
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ctx(|| "create the agent's vsock socket")?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&listener),
        &VsockAddr::new(libc::VMADDR_CID_ANY, port),
    )
    .ctx(|| format!("bind vsock port {port}"))?;
    listen(&listener, Backlog::new(4).unwrap_or(Backlog::MAXCONN))
        .ctx(|| format!("listen on vsock port {port}"))?;
    log!("listening on vsock port {port}");
    let test_hooks = testhook::enabled_from_env();
    let shutdown: Arc<ShutdownHook> = Arc::new(shutdown);
    loop {
        // Close-on-exec: what the agent runs must never hold the channel.
        let fd = match accept4(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            SockFlag::SOCK_CLOEXEC,
        ) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
            Err(e) => return Err(e).ctx(|| format!("accept on vsock port {port}")),
        };
        // SAFETY: accept returned a new fd that nothing else owns.
        let conn = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let writer = conn.try_clone().ctx(|| "duplicate the vsock connection")?;
        let hook = Arc::clone(&shutdown);
        let server = Arc::new(
            Server::new(writer, Box::new(move || hook()), MAX_FRAME, MAX_IN_FLIGHT)
                .with_test_hooks(test_hooks),
        );
        match server.serve(BufReader::with_capacity(64 * 1024, conn), OnEof::Stop) {
            Ok(()) => log!("host disconnected"),
            Err(e) => log!("host connection failed: {e}"),
        }
    }
}

fn failure(id: u64, message: impl Into<String>) -> GuestMessage {
    GuestMessage {
        id,
        body: Some(guest_message::Body::Failure(Failure {
            message: message.into(),
        })),
    }
}

fn hello_reply() -> HelloReply {
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    HelloReply {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel_release,
    }
}

/// Answers one request (everything but `Shutdown`).
pub fn dispatch(msg: HostMessage) -> GuestMessage {
    use guest_message::Body as Reply;
    use host_message::Body as Request;
    fn or_failure<T>(res: Result<T>, ok: impl FnOnce(T) -> Reply) -> Reply {
        match res {
            Ok(result) => ok(result),
            Err(e) => Reply::Failure(Failure {
                message: e.to_string(),
            }),
        }
    }
    let body = match msg.body {
        Some(Request::Hello(_)) => Reply::Hello(hello_reply()),
        Some(Request::Exec(req)) => or_failure(exec::run(&req), Reply::Exec),
        Some(Request::Repl(req)) => or_failure(repl::run(&req), Reply::Repl),
        Some(Request::Setup(req)) => or_failure(setup::run(&req), Reply::Setup),
        Some(Request::Warm(req)) => or_failure(repl::warm(&req), Reply::Warm),
        Some(Request::Shutdown(_)) => Reply::Failure(Failure {
            message: "shutdown is not a request with a reply".to_owned(),
        }),
        None => Reply::Failure(Failure {
            message: format!(
                "empty or unknown request (this agent speaks protocol {PROTOCOL_VERSION}: \
                 hello, exec, repl, setup, warm, shutdown)"
            ),
        }),
    };
    GuestMessage {
        id: msg.id,
        body: Some(body),
    }
}

impl<W: Write + Send + 'static> Server<W> {
    /// A server writing replies to `writer`.
    pub fn new(writer: W, shutdown: ShutdownHook, max_frame: usize, max_in_flight: usize) -> Self {
        Server {
            writer: Mutex::new(writer),
            in_flight: AtomicUsize::new(0),
            max_in_flight,
            max_frame,
            shutdown,
            test_hooks: false,
        }
    }

    /// Turns the test hooks ([`crate::testhook`]) on or off.
    pub fn with_test_hooks(mut self, on: bool) -> Self {
        self.test_hooks = on;
        self
    }

    /// Reads and dispatches requests from `reader`. With [`OnEof::Wait`] it
    /// only returns on a read error; with [`OnEof::Stop`] also at EOF.
    pub fn serve<R: Read>(self: &Arc<Self>, mut reader: R, on_eof: OnEof) -> Result<()> {
        let mut idle = IDLE_MIN;
        let mut connected = false;
        let mut errors = 0;
        loop {
            let eof = match frame::read::<HostMessage, _>(&mut reader, self.max_frame) {
                Ok(Some(msg)) => {
                    if !connected {
                        log!("host connected");
                        connected = true;
                    }
                    idle = IDLE_MIN;
                    self.submit(msg);
                    false
                }
                Ok(None) => true,
                Err(FrameError::TooLarge { len, max }) => {
                    log!("skipping a {len}-byte frame (limit {max})");
                    let skipped = io::copy(&mut (&mut reader).take(len as u64), &mut io::sink());
                    !matches!(skipped, Ok(n) if n == len as u64)
                }
                Err(FrameError::Decode(e)) => {
                    log!("skipping a malformed frame: {e}");
                    false
                }
                Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    log!("host went away in the middle of a frame");
                    true
                }
                Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => false,
                Err(e) => {
                    errors += 1;
                    if errors >= MAX_READ_ERRORS || on_eof == OnEof::Stop {
                        return Err(e.into());
                    }
                    log!("reading the agent port failed ({errors}/{MAX_READ_ERRORS}): {e}");
                    thread::sleep(IDLE_MAX);
                    continue;
                }
            };
            errors = 0;
            if eof {
                if on_eof == OnEof::Stop {
                    return Ok(());
                }
                if connected {
                    log!("host disconnected; waiting for it to reconnect");
                    connected = false;
                }
                thread::sleep(idle);
                idle = (idle * 2).min(IDLE_MAX);
            }
        }
    }

    /// Handles `msg` on its own thread (or refuses it).
    fn submit(self: &Arc<Self>, msg: HostMessage) {
        let id = msg.id;
        if let Some(host_message::Body::Shutdown(_)) = msg.body {
            log!("shutdown requested by the host");
            (self.shutdown)();
            return;
        }
        if self.test_hooks {
            if let Some(hook) = testhook::intercept(&msg) {
                match hook {
                    Ok(misbehaviour) => {
                        log!("test hook {misbehaviour:?} for request {id}");
                        if let Some(bytes) = misbehaviour.bytes() {
                            self.write_raw(id, &bytes);
                        }
                        if misbehaviour == testhook::Misbehaviour::Hang {
                            // This is the reader: nothing is read again.
                            loop {
                                thread::park();
                            }
                        }
                    }
                    Err(message) => self.reply(&failure(id, message)),
                }
                return;
            }
        }
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.reply(&failure(
                id,
                format!("too many requests in flight (limit {})", self.max_in_flight),
            ));
            return;
        }
        let server = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("request-{id}"))
            .spawn(move || {
                let reply = panic::catch_unwind(AssertUnwindSafe(|| dispatch(msg)))
                    .unwrap_or_else(|_| failure(id, "the agent failed handling this request"));
                // Free the slot first: once the host sees this reply it may
                // send the next request at once.
                server.in_flight.fetch_sub(1, Ordering::SeqCst);
                server.reply(&reply);
            });
        if let Err(e) = spawned {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.reply(&failure(id, format!("cannot start a thread: {e}")));
        }
    }

    /// Sends one reply as a whole frame; a reply too large to send becomes a
    /// `Failure` saying so.
    fn reply(&self, msg: &GuestMessage) {
        let bytes = match frame::encode(msg, self.max_frame) {
            Ok(bytes) => bytes,
            Err(e) => {
                log!("reply to request {} not sent: {e}", msg.id);
                match frame::encode(
                    &failure(msg.id, format!("reply not sent: {e}")),
                    self.max_frame,
                ) {
                    Ok(bytes) => bytes,
                    Err(_) => return,
                }
            }
        };
        self.write_raw(msg.id, &bytes);
    }

    /// Writes bytes (whole frames, or test-hook garbage) to the channel.
    fn write_raw(&self, id: u64, bytes: &[u8]) {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = writer.write_all(bytes).and_then(|()| writer.flush()) {
            log!("cannot send the reply to request {id}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_proto::agent::{Exec, Hello, Repl, Script, Setup, Shutdown};
    use prost::Message;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::AtomicBool;

    /// A server on one end of a socket pair; the test is the host.
    struct Harness {
        host: UnixStream,
        shutdown: Arc<AtomicBool>,
        server: thread::JoinHandle<Result<()>>,
    }

    impl Harness {
        fn new(max_frame: usize, max_in_flight: usize) -> Self {
            Self::with_hooks(max_frame, max_in_flight, false)
        }

        fn with_hooks(max_frame: usize, max_in_flight: usize, hooks: bool) -> Self {
            let (host, guest) = UnixStream::pair().expect("socketpair");
            let shutdown = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&shutdown);
            let writer = guest.try_clone().expect("clone");
            let server = Arc::new(
                Server::new(
                    writer,
                    Box::new(move || flag.store(true, Ordering::SeqCst)),
                    max_frame,
                    max_in_flight,
                )
                .with_test_hooks(hooks),
            );
            let server = thread::spawn(move || server.serve(guest, OnEof::Stop));
            host.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            Harness {
                host,
                shutdown,
                server,
            }
        }

        fn send(&mut self, id: u64, body: Option<host_message::Body>) {
            frame::write(&mut self.host, &HostMessage { id, body }, MAX_FRAME).expect("send");
        }

        fn recv(&mut self) -> GuestMessage {
            frame::read(&mut self.host, MAX_FRAME)
                .expect("read")
                .expect("a reply")
        }

        /// Closes the host side; the server must return cleanly.
        fn finish(self) {
            self.host
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            let res = self.server.join().expect("server thread");
            assert!(res.is_ok(), "{res:?}");
        }
    }

    fn hello() -> Option<host_message::Body> {
        Some(host_message::Body::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
        }))
    }

    fn exec_sh(script: &str) -> Option<host_message::Body> {
        Some(host_message::Body::Exec(Exec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            ..Exec::default()
        }))
    }

    fn failure_text(msg: &GuestMessage) -> &str {
        match &msg.body {
            Some(guest_message::Body::Failure(f)) => &f.message,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn hello_is_answered_with_versions_and_same_id() {
        let mut h = Harness::new(MAX_FRAME, 8);
        h.send(41, hello());
        let reply = h.recv();
        assert_eq!(reply.id, 41);
        let Some(guest_message::Body::Hello(hello)) = reply.body else {
            panic!("expected HelloReply, got {reply:?}");
        };
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
        let release = nix::sys::utsname::uname().expect("uname");
        assert_eq!(hello.kernel_release, release.release().to_string_lossy());
        h.finish();
    }

    #[test]
    fn empty_body_is_a_failure() {
        let mut h = Harness::new(MAX_FRAME, 8);
        h.send(5, None);
        let reply = h.recv();
        assert_eq!(reply.id, 5);
        assert!(failure_text(&reply).contains("empty or unknown request"));
        h.finish();
    }

    #[test]
    fn exec_runs_and_refusals_are_failures() {
        let mut h = Harness::new(MAX_FRAME, 8);
        h.send(1, exec_sh("echo hi; exit 4"));
        let reply = h.recv();
        assert_eq!(reply.id, 1);
        let Some(guest_message::Body::Exec(res)) = reply.body else {
            panic!("expected ExecResult, got {reply:?}");
        };
        assert_eq!(res.exit_code, 4);
        assert_eq!(res.output.len(), 1);
        assert_eq!(res.output[0].text, b"hi");

        h.send(2, Some(host_message::Body::Exec(Exec::default())));
        let reply = h.recv();
        assert_eq!(reply.id, 2);
        assert!(failure_text(&reply).contains("empty program"));
        h.finish();
    }

    #[test]
    fn requests_are_handled_concurrently() {
        let mut h = Harness::new(MAX_FRAME, 8);
        h.send(1, exec_sh("sleep 0.5; echo slow"));
        h.send(2, hello());
        let first = h.recv();
        let second = h.recv();
        assert_eq!((first.id, second.id), (2, 1));
        h.finish();
    }

    #[test]
    fn in_flight_limit_refuses_extra_requests() {
        let mut h = Harness::new(MAX_FRAME, 1);
        h.send(1, exec_sh("sleep 0.5"));
        h.send(2, hello());
        let refused = h.recv();
        assert_eq!(refused.id, 2);
        assert!(failure_text(&refused).contains("too many requests in flight"));
        assert_eq!(h.recv().id, 1);
        // The slot is free again.
        h.send(3, hello());
        assert!(matches!(h.recv().body, Some(guest_message::Body::Hello(_))));
        h.finish();
    }

    #[test]
    fn shutdown_calls_the_hook_and_sends_nothing() {
        let mut h = Harness::new(MAX_FRAME, 8);
        h.send(9, Some(host_message::Body::Shutdown(Shutdown {})));
        h.send(10, hello());
        // The only reply is the hello's: shutdown has none.
        assert_eq!(h.recv().id, 10);
        assert!(h.shutdown.load(Ordering::SeqCst));
        h.finish();
    }

    fn hook(name: &str) -> Option<host_message::Body> {
        Some(host_message::Body::Exec(Exec {
            program: testhook::PROGRAM.into(),
            args: vec![name.into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            ..Exec::default()
        }))
    }

    #[test]
    fn test_hooks_misbehave_when_enabled() {
        let mut h = Harness::with_hooks(MAX_FRAME, 8, true);
        h.send(1, hook("garbage"));
        let mut raw = [0u8; 10];
        h.host.read_exact(&mut raw).expect("garbage");
        assert_eq!(raw[..4], 6u32.to_be_bytes());
        assert!(GuestMessage::decode(&raw[4..]).is_err());

        // A stalled request gets nothing, and frees its slot.
        h.send(2, hook("stall"));
        h.send(3, hello());
        assert_eq!(h.recv().id, 3);

        h.send(4, hook("bogus"));
        let reply = h.recv();
        assert_eq!(reply.id, 4);
        assert!(failure_text(&reply).contains("unknown hook"));

        h.send(5, hook("oversized"));
        let mut raw = [0u8; 8];
        h.host.read_exact(&mut raw).expect("oversized");
        assert_eq!(raw, [0x40, 0, 0, 0, b'm', b'o', b'a', b't']);
        h.finish();
    }

    #[test]
    fn test_hooks_are_ordinary_commands_when_disabled() {
        let mut h = Harness::new(MAX_FRAME, 8);
        h.send(1, hook("garbage"));
        let reply = h.recv();
        let Some(guest_message::Body::Exec(res)) = reply.body else {
            panic!("expected ExecResult, got {reply:?}");
        };
        assert_eq!(res.exit_code, 127);
        h.finish();
    }

    #[test]
    fn repl_and_setup_are_dispatched() {
        let mut h = Harness::new(MAX_FRAME, 8);
        h.send(
            1,
            Some(host_message::Body::Repl(Repl {
                language: "cobol".into(),
                ..Repl::default()
            })),
        );
        assert!(failure_text(&h.recv()).contains("unsupported language"));
        h.send(
            2,
            Some(host_message::Body::Setup(Setup {
                scripts: vec![Script {
                    name: "..".into(),
                    content: String::new(),
                }],
                ..Setup::default()
            })),
        );
        assert!(failure_text(&h.recv()).contains("invalid script name"));
        h.finish();
    }

    #[test]
    fn malformed_and_oversized_frames_are_skipped() {
        let mut h = Harness::new(1024, 8);
        // A body that is not a HostMessage (field 1 with a bad wire type).
        h.host.write_all(&[0, 0, 0, 2, 0x0f, 0xff]).expect("write");
        // A frame over the 1024-byte limit, then its body.
        h.host.write_all(&2000u32.to_be_bytes()).expect("write");
        h.host.write_all(&[0xaa; 2000]).expect("write");
        h.send(3, hello());
        let reply = h.recv();
        assert_eq!(reply.id, 3);
        assert!(matches!(reply.body, Some(guest_message::Body::Hello(_))));
        h.finish();
    }
}

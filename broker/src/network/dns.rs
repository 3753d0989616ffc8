//! The per-sandbox DNS responder. The guest's `/etc/resolv.conf` points at
//! the host side of its /30; this module owns the UDP socket bound there
//! (port 53), the parser for the queries that arrive on it, the answers for
//! the names of the sandbox's peers (its group), and the forwarding of every
//! other query to the upstream resolvers when the sandbox may reach the
//! internet (NXDOMAIN otherwise, so guest resolvers fail fast).
//!
//! Parsing and answering are pure functions over byte slices
//! ([`parse_query`], [`respond`], [`answer_a`], ...) that never panic on any
//! input; [`DnsResponder`] is the task that moves datagrams between them and
//! the network.

use std::fmt::Write as _;
use std::future::poll_fn;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Queries longer than this are answered with FORMERR (RFC 1035 UDP limit).
pub const MAX_QUERY_LEN: usize = 512;
/// Upstream replies longer than this are not relayed.
pub const MAX_UPSTREAM_REPLY_LEN: usize = 4096;
/// TTL of the A records for peers: short, peers come and go.
pub const PEER_TTL: u32 = 5;

const HEADER_LEN: usize = 12;
const MAX_NAME_LEN: usize = 255;
const MAX_LABEL_LEN: usize = 63;

/// QTYPE A.
pub const TYPE_A: u16 = 1;
/// QTYPE AAAA.
pub const TYPE_AAAA: u16 = 28;
/// QTYPE ANY (`*`).
pub const TYPE_ANY: u16 = 255;
/// QCLASS IN.
pub const CLASS_IN: u16 = 1;
/// QCLASS ANY (`*`).
pub const CLASS_ANY: u16 = 255;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;

/// Answers names of the sandbox's peers (its group), and forwards other
/// queries upstream when the sandbox may reach the internet.
pub trait PeerLookup: Send + Sync + 'static {
    /// `name` is a single DNS label, already lowercased, without dots; it
    /// only ever contains ASCII letters, digits, `-` and `_`.
    fn lookup(&self, name: &str) -> Option<Ipv4Addr>;
}

/// Bounds on the forwarding half of a responder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsLimits {
    /// How long to wait for each upstream before trying the next one.
    pub upstream_timeout: Duration,
    /// Forwarded queries outstanding at once; excess queries get SERVFAIL.
    pub max_in_flight: usize,
}

impl Default for DnsLimits {
    fn default() -> Self {
        Self {
            upstream_timeout: Duration::from_secs(2),
            max_in_flight: 64,
        }
    }
}

/// DNS response codes this module produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
}

/// The fixed 12-byte DNS header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    /// Parses the header at the start of `packet`; `None` when it is shorter
    /// than a header.
    pub fn parse(packet: &[u8]) -> Option<Self> {
        let word = |i: usize| -> Option<u16> {
            let b = packet.get(i..i + 2)?;
            Some(u16::from_be_bytes([b[0], b[1]]))
        };
        Some(Self {
            id: word(0)?,
            flags: word(2)?,
            qdcount: word(4)?,
            ancount: word(6)?,
            nscount: word(8)?,
            arcount: word(10)?,
        })
    }

    /// QR: set in responses.
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_QR != 0
    }

    /// The 4-bit OPCODE (0 = QUERY).
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0x0f) as u8
    }

    /// RD: recursion desired.
    pub fn recursion_desired(&self) -> bool {
        self.flags & FLAG_RD != 0
    }
}

/// A parsed query: its header fields and its single question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub recursion_desired: bool,
    /// QNAME labels, lowercased; bytes other than ASCII letters, digits,
    /// `-` and `_` are written as `\DDD`.
    pub labels: Vec<String>,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section as received (QNAME, QTYPE, QCLASS), echoed in
    /// replies so the guest sees its own spelling (0x20 randomisation).
    pub question: Vec<u8>,
}

impl Query {
    /// The name in presentation form, without the trailing dot (`.` for the
    /// root).
    pub fn name(&self) -> String {
        if self.labels.is_empty() {
            ".".to_owned()
        } else {
            self.labels.join(".")
        }
    }

    /// The name when it is one plain label (`db`, `DB.`), the only kind of
    /// name that can be a peer's.
    pub fn single_label(&self) -> Option<&str> {
        match self.labels.as_slice() {
            [label] if !label.contains('\\') => Some(label),
            _ => None,
        }
    }
}

/// Why a datagram is not a query this responder answers normally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Too short to hold a header: there is nothing to reply to.
    #[error("shorter than a DNS header ({len} bytes)")]
    NoHeader { len: usize },
    /// QR is set. Responses are never answered, so that two responders
    /// cannot keep replying to each other.
    #[error("not a query (QR set)")]
    NotQuery { header: Header },
    /// A well-formed header with an OPCODE other than QUERY (NOTIMP).
    #[error("opcode {} not supported", header.opcode())]
    NotImplemented { header: Header },
    /// A header followed by something that is not one valid question
    /// (FORMERR).
    #[error("malformed query: {reason}")]
    Malformed {
        header: Header,
        reason: &'static str,
    },
}

/// Parses a query datagram: a header (QR clear, OPCODE QUERY, QDCOUNT 1) and
/// its question (uncompressed QNAME of at most 255 bytes, labels of at most
/// 63). Anything after the question (EDNS OPT records) is left alone.
pub fn parse_query(packet: &[u8]) -> Result<Query, ParseError> {
    let header = Header::parse(packet).ok_or(ParseError::NoHeader { len: packet.len() })?;
    let malformed = |reason| ParseError::Malformed { header, reason };
    if header.is_response() {
        return Err(ParseError::NotQuery { header });
    }
    if packet.len() > MAX_QUERY_LEN {
        return Err(malformed("longer than 512 bytes"));
    }
    if header.opcode() != 0 {
        return Err(ParseError::NotImplemented { header });
    }
    if header.qdcount != 1 {
        return Err(malformed("QDCOUNT is not 1"));
    }

    let mut labels = Vec::new();
    let mut pos = HEADER_LEN;
    loop {
        let len = *packet
            .get(pos)
            .ok_or_else(|| malformed("truncated QNAME"))?;
        match len & 0xc0 {
            0x00 => {}
            0xc0 => return Err(malformed("compression pointer in the question")),
            _ => return Err(malformed("unknown label type")),
        }
        let len = usize::from(len);
        if len == 0 {
            pos += 1;
            break;
        }
        // MAX_LABEL_LEN is implied by the two clear top bits; kept explicit.
        if len > MAX_LABEL_LEN {
            return Err(malformed("label longer than 63 bytes"));
        }
        let label = packet
            .get(pos + 1..pos + 1 + len)
            .ok_or_else(|| malformed("truncated QNAME"))?;
        pos += 1 + len;
        // The name's wire length so far, plus the root label still to come.
        if pos - HEADER_LEN + 1 > MAX_NAME_LEN {
            return Err(malformed("QNAME longer than 255 bytes"));
        }
        labels.push(presentation(label));
    }
    let fixed = packet
        .get(pos..pos + 4)
        .ok_or_else(|| malformed("truncated question"))?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    let question = packet
        .get(HEADER_LEN..pos + 4)
        .ok_or_else(|| malformed("truncated question"))?
        .to_vec();
    Ok(Query {
        id: header.id,
        recursion_desired: header.recursion_desired(),
        labels,
        qtype,
        qclass,
        question,
    })
}

/// A label in lowercase presentation form, with `\DDD` escapes for every
/// byte outside `[a-z0-9_-]`.
fn presentation(label: &[u8]) -> String {
    let mut out = String::with_capacity(label.len());
    for &b in label {
        let b = b.to_ascii_lowercase();
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => out.push(char::from(b)),
            _ => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\{b:03}");
            }
        }
    }
    out
}

fn reply_header(out: &mut Vec<u8>, id: u16, flags: u16, qdcount: u16, ancount: u16) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&qdcount.to_be_bytes());
    out.extend_from_slice(&ancount.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
}

/// Flags of a reply to `q`: QR, RA, RD copied, OPCODE QUERY, `rcode`, and AA
/// when `authoritative`.
fn reply_flags(q: &Query, rcode: Rcode, authoritative: bool) -> u16 {
    let mut flags = FLAG_QR | FLAG_RA | u16::from(rcode as u8);
    if q.recursion_desired {
        flags |= FLAG_RD;
    }
    if authoritative {
        flags |= FLAG_AA;
    }
    flags
}

/// A reply carrying `q`'s question and one A record for it (name as a
/// pointer to offset 12, class IN, TTL [`PEER_TTL`]).
pub fn answer_a(q: &Query, addr: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + q.question.len() + 16);
    reply_header(&mut out, q.id, reply_flags(q, Rcode::NoError, true), 1, 1);
    out.extend_from_slice(&q.question);
    out.extend_from_slice(&[0xc0, 0x0c]);
    out.extend_from_slice(&TYPE_A.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&PEER_TTL.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&addr.octets());
    out
}

/// NOERROR without answers: the name exists (a peer) but has no record of
/// the asked type.
pub fn answer_nodata(q: &Query) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + q.question.len());
    reply_header(&mut out, q.id, reply_flags(q, Rcode::NoError, true), 1, 0);
    out.extend_from_slice(&q.question);
    out
}

/// A reply carrying `q`'s question, no answers and `rcode` (NXDOMAIN,
/// SERVFAIL, ...).
pub fn answer_rcode(q: &Query, rcode: Rcode) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + q.question.len());
    reply_header(&mut out, q.id, reply_flags(q, rcode, false), 1, 0);
    out.extend_from_slice(&q.question);
    out
}

/// The reply to a datagram [`parse_query`] rejected: FORMERR or NOTIMP
/// with no question (it could not be read), or `None` when nothing should
/// be sent (no header, or a response).
pub fn error_reply(err: &ParseError) -> Option<Vec<u8>> {
    let (header, rcode) = match err {
        ParseError::NoHeader { .. } | ParseError::NotQuery { .. } => return None,
        ParseError::NotImplemented { header } => (header, Rcode::NotImp),
        ParseError::Malformed { header, .. } => (header, Rcode::FormErr),
    };
    let flags = FLAG_QR
        | FLAG_RA
        | (header.flags & (0x7800 | FLAG_RD)) // OPCODE and RD, copied
        | u16::from(rcode as u8);
    let mut out = Vec::with_capacity(HEADER_LEN);
    reply_header(&mut out, header.id, flags, 0, 0);
    Some(out)
}

/// What to do with one datagram from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send nothing.
    Drop,
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not a peer and forwarding is allowed: ask the upstreams.
    Forward(Query),
}

/// Decides the fate of one datagram: peers are answered locally (A for
/// QTYPE A/ANY in class IN/ANY, NOERROR/NODATA for anything else), other
/// names are forwarded when `forward` is set and get NXDOMAIN otherwise.
pub fn respond(packet: &[u8], peers: &dyn PeerLookup, forward: bool) -> Action {
    let q = match parse_query(packet) {
        Ok(q) => q,
        Err(err) => {
            tracing::debug!(%err, "dns: rejected datagram");
            return error_reply(&err).map_or(Action::Drop, Action::Reply);
        }
    };
    if let Some(addr) = q.single_label().and_then(|label| peers.lookup(label)) {
        let wants_a = matches!(q.qtype, TYPE_A | TYPE_ANY);
        let in_class = matches!(q.qclass, CLASS_IN | CLASS_ANY);
        tracing::debug!(name = %q.name(), qtype = q.qtype, %addr, "dns: peer");
        return Action::Reply(if wants_a && in_class {
            answer_a(&q, addr)
        } else {
            answer_nodata(&q)
        });
    }
    if forward {
        Action::Forward(q)
    } else {
        tracing::debug!(name = %q.name(), qtype = q.qtype, "dns: NXDOMAIN (no forwarding)");
        Action::Reply(answer_rcode(&q, Rcode::NxDomain))
    }
}

/// Whether `reply` may be relayed as the upstream's answer to query `id`:
/// a header with that ID and QR set, at most [`MAX_UPSTREAM_REPLY_LEN`]
/// bytes.
pub fn is_upstream_reply(reply: &[u8], id: u16) -> bool {
    reply.len() <= MAX_UPSTREAM_REPLY_LEN
        && Header::parse(reply).is_some_and(|h| h.id == id && h.is_response())
}

/// One sandbox's DNS responder. Dropping it closes the socket at once and
/// stops the task along with every forward in flight.
pub struct DnsResponder {
    local_addr: SocketAddr,
    socket: Arc<Mutex<Option<UdpSocket>>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for DnsResponder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResponder")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

struct Config {
    peers: Arc<dyn PeerLookup>,
    upstreams: Arc<[SocketAddr]>,
    forward: bool,
    limits: DnsLimits,
}

impl DnsResponder {
    /// Binds `listen` (the host side of the sandbox's /30, port 53) and
    /// starts answering. When `device` is set the socket only receives what
    /// arrives on that interface (`SO_BINDTODEVICE`): a sandbox's responder
    /// answers its own tap, not the host's other networks or local users.
    /// `upstreams` are tried in order for names that are not peers when
    /// `forward` is set; with `forward` set and no upstreams those names get
    /// SERVFAIL.
    pub async fn bind(
        listen: SocketAddr,
        device: Option<&str>,
        peers: Arc<dyn PeerLookup>,
        upstreams: Vec<SocketAddr>,
        forward: bool,
        limits: DnsLimits,
    ) -> io::Result<Self> {
        let socket = match device {
            None => UdpSocket::bind(listen).await?,
            Some(dev) => bound_to_device(listen, dev)?,
        };
        let local_addr = socket.local_addr()?;
        if forward && upstreams.is_empty() {
            tracing::warn!(
                %local_addr,
                "dns: forwarding allowed but no upstream resolvers; \
                 names outside the group will get SERVFAIL"
            );
        }
        let socket = Arc::new(Mutex::new(Some(socket)));
        let config = Config {
            peers,
            upstreams: upstreams.into(),
            forward,
            limits,
        };
        let task = tokio::spawn(serve(Arc::clone(&socket), config));
        Ok(Self {
            local_addr,
            socket,
            task,
        })
    }

    /// The address the responder is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// A UDP socket bound to `listen` that only sees traffic from `device`
/// (set before the socket is handed to the runtime, so nothing from another
/// interface is ever answered; anything queued in between is discarded).
fn bound_to_device(listen: SocketAddr, device: &str) -> io::Result<UdpSocket> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind(listen)?;
    let name = std::ffi::CString::new(device)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "device name has a NUL"))?;
    let len = libc::socklen_t::try_from(name.as_bytes_with_nul().len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "device name too long"))?;
    // SAFETY: setsockopt on an open socket with a NUL-terminated buffer of
    // `len` bytes that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.set_nonblocking(true)?;
    let mut drain = [0u8; 1];
    while socket.recv_from(&mut drain).is_ok() {}
    UdpSocket::from_std(socket)
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        // Closing the socket here, rather than when the aborted task is next
        // polled, frees the address before `drop` returns.
        drop(lock(&self.socket).take());
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Receives one datagram; `None` once the responder has been dropped.
async fn recv_from(
    socket: &Mutex<Option<UdpSocket>>,
    buf: &mut [u8],
) -> Option<io::Result<(usize, SocketAddr)>> {
    let mut buf = ReadBuf::new(buf);
    poll_fn(|cx| {
        let guard = lock(socket);
        let Some(socket) = guard.as_ref() else {
            return Poll::Ready(None);
        };
        socket
            .poll_recv_from(cx, &mut buf)
            .map(|r| Some(r.map(|from| (buf.filled().len(), from))))
    })
    .await
}

async fn send_to(socket: &Mutex<Option<UdpSocket>>, bytes: &[u8], to: SocketAddr) {
    let sent = poll_fn(|cx| {
        let guard = lock(socket);
        match guard.as_ref() {
            Some(socket) => socket.poll_send_to(cx, bytes, to).map(Some),
            None => Poll::Ready(None),
        }
    })
    .await;
    if let Some(Err(err)) = sent {
        tracing::debug!(%to, %err, "dns: cannot send reply");
    }
}

async fn serve(socket: Arc<Mutex<Option<UdpSocket>>>, config: Config) {
    let permits = Arc::new(Semaphore::new(config.limits.max_in_flight));
    let mut forwards: JoinSet<(SocketAddr, Vec<u8>)> = JoinSet::new();
    // One byte more than a query may hold, so overlong ones are recognised.
    let mut buf = [0u8; MAX_QUERY_LEN + 1];
    loop {
        tokio::select! {
            received = recv_from(&socket, &mut buf) => {
                let (len, from) = match received {
                    None => return,
                    Some(Ok(received)) => received,
                    Some(Err(err)) => {
                        tracing::debug!(%err, "dns: receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let packet = buf.get(..len).unwrap_or_default();
                match respond(packet, config.peers.as_ref(), config.forward) {
                    Action::Drop => {}
                    Action::Reply(reply) => send_to(&socket, &reply, from).await,
                    Action::Forward(q) if config.upstreams.is_empty() => {
                        send_to(&socket, &answer_rcode(&q, Rcode::ServFail), from).await;
                    }
                    Action::Forward(q) => match Arc::clone(&permits).try_acquire_owned() {
                        Ok(permit) => {
                            let upstreams = Arc::clone(&config.upstreams);
                            let timeout = config.limits.upstream_timeout;
                            let packet = packet.to_vec();
                            forwards.spawn(async move {
                                let reply = forward(&packet, &q, &upstreams, timeout).await;
                                drop(permit);
                                (from, reply)
                            });
                        }
                        Err(_) => {
                            tracing::debug!(name = %q.name(), "dns: SERVFAIL (forwards at limit)");
                            let reply = answer_rcode(&q, Rcode::ServFail);
                            send_to(&socket, &reply, from).await;
                        }
                    },
                }
            }
            Some(done) = forwards.join_next(), if !forwards.is_empty() => {
                if let Ok((to, reply)) = done {
                    send_to(&socket, &reply, to).await;
                }
            }
        }
    }
}

/// Asks each upstream in turn and returns the first acceptable reply,
/// unchanged, or SERVFAIL when none came.
async fn forward(packet: &[u8], q: &Query, upstreams: &[SocketAddr], timeout: Duration) -> Vec<u8> {
    for &upstream in upstreams {
        match ask(upstream, packet, q.id, timeout).await {
            Ok(Some(reply)) => return reply,
            Ok(None) => tracing::debug!(%upstream, "dns: upstream timed out"),
            Err(err) => tracing::debug!(%upstream, %err, "dns: upstream failed"),
        }
    }
    tracing::debug!(name = %q.name(), "dns: SERVFAIL (no upstream answered)");
    answer_rcode(q, Rcode::ServFail)
}

/// One attempt on a fresh connected socket; `Ok(None)` when no acceptable
/// reply came within `timeout`. Replies with another ID, QR clear or over
/// the size cap are ignored.
async fn ask(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    timeout: Duration,
) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + timeout;
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    // One byte more than the cap, so oversized replies are recognised.
    let mut buf = vec![0u8; MAX_UPSTREAM_REPLY_LEN + 1];
    loop {
        let Ok(received) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await else {
            return Ok(None);
        };
        let len = received?;
        let reply = buf.get(..len).unwrap_or_default();
        if is_upstream_reply(reply, id) {
            return Ok(Some(reply.to_vec()));
        }
        tracing::debug!(%upstream, len, "dns: ignored upstream datagram");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Peers(Vec<(&'static str, Ipv4Addr)>);

    impl PeerLookup for Peers {
        fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
            self.0.iter().find(|(n, _)| *n == name).map(|(_, ip)| *ip)
        }
    }

    const DB: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 6);

    fn peers() -> Peers {
        Peers(vec![("db", DB), ("web-1", Ipv4Addr::new(10, 213, 0, 10))])
    }

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = Vec::new();
        q.extend_from_slice(&id.to_be_bytes());
        q.extend_from_slice(&FLAG_RD.to_be_bytes());
        q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    fn rcode(reply: &[u8]) -> u8 {
        reply[3] & 0x0f
    }

    fn reply_of(action: Action) -> Vec<u8> {
        match action {
            Action::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn malformed(packet: &[u8]) -> &'static str {
        match parse_query(packet) {
            Err(ParseError::Malformed { reason, .. }) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_simple_query() {
        let q = parse_query(&query(0x1234, "Db.Example.", TYPE_AAAA)).unwrap();
        assert_eq!(q.id, 0x1234);
        assert!(q.recursion_desired);
        assert_eq!(q.labels, ["db", "example"]);
        assert_eq!(q.name(), "db.example");
        assert_eq!(q.single_label(), None);
        assert_eq!(q.qtype, TYPE_AAAA);
        assert_eq!(q.qclass, CLASS_IN);
        assert_eq!(q.question, query(0x1234, "Db.Example.", TYPE_AAAA)[12..]);
    }

    #[test]
    fn single_label_ignores_case_and_trailing_dot() {
        let q = parse_query(&query(1, "DB.", TYPE_A)).unwrap();
        assert_eq!(q.single_label(), Some("db"));
        let root = parse_query(&query(1, "", TYPE_A)).unwrap();
        assert_eq!(root.name(), ".");
        assert_eq!(root.single_label(), None);
    }

    #[test]
    fn odd_bytes_in_a_label_are_escaped_and_never_a_peer() {
        let mut p = query(1, "xdb", TYPE_A);
        p[13] = b'.'; // one label "\046db", not two
        let q = parse_query(&p).unwrap();
        assert_eq!(q.labels, ["\\046db"]);
        assert_eq!(q.single_label(), None);
        p[13] = 0xff;
        assert_eq!(parse_query(&p).unwrap().labels, ["\\255db"]);
    }

    #[test]
    fn rejects_headers_it_does_not_answer() {
        assert_eq!(parse_query(&[]), Err(ParseError::NoHeader { len: 0 }));
        assert_eq!(parse_query(&[0; 11]), Err(ParseError::NoHeader { len: 11 }));
        let mut p = query(7, "db", TYPE_A);
        p[2] |= 0x80; // QR
        assert!(matches!(parse_query(&p), Err(ParseError::NotQuery { .. })));
        let mut p = query(7, "db", TYPE_A);
        p[2] |= 2 << 3; // OPCODE STATUS
        assert!(matches!(
            parse_query(&p),
            Err(ParseError::NotImplemented { .. })
        ));
    }

    #[test]
    fn rejects_malformed_questions() {
        let mut p = query(7, "db", TYPE_A);
        p[5] = 0;
        assert_eq!(malformed(&p), "QDCOUNT is not 1");
        p[5] = 2;
        assert_eq!(malformed(&p), "QDCOUNT is not 1");

        let mut p = query(7, "db", TYPE_A);
        p.truncate(12);
        p.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        assert_eq!(malformed(&p), "compression pointer in the question");

        let mut p = query(7, "db", TYPE_A);
        p[12] = 0x41;
        assert_eq!(malformed(&p), "unknown label type");

        let mut p = query(7, "db", TYPE_A);
        p.resize(MAX_QUERY_LEN + 1, 0);
        assert_eq!(malformed(&p), "longer than 512 bytes");
    }

    #[test]
    fn name_length_is_limited_to_255() {
        let label = "a".repeat(63);
        // 4 * 64 + 1 = 257 bytes on the wire.
        let long = [label.as_str(); 4].join(".");
        assert_eq!(
            malformed(&query(7, &long, TYPE_A)),
            "QNAME longer than 255 bytes"
        );
        // 3 * 64 + 62 + 1 = 255 bytes: the longest allowed.
        let longest = format!("{label}.{label}.{label}.{}", "a".repeat(61));
        assert_eq!(
            parse_query(&query(7, &longest, TYPE_A))
                .unwrap()
                .labels
                .len(),
            4
        );
    }

    #[test]
    fn every_truncation_is_rejected_without_panic() {
        let p = query(9, "web-1.example.com", TYPE_A);
        for len in 0..p.len() {
            let err = parse_query(&p[..len]).unwrap_err();
            if len < HEADER_LEN {
                assert_eq!(err, ParseError::NoHeader { len });
                assert_eq!(error_reply(&err), None);
            } else {
                assert!(
                    matches!(err, ParseError::Malformed { .. }),
                    "{len}: {err:?}"
                );
            }
        }
        assert!(parse_query(&p).is_ok());
    }

    #[test]
    fn garbage_never_panics() {
        let peers = peers();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let base = query(3, "db", TYPE_A);
        for round in 0..20_000 {
            let packet: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 600) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                // A valid query with a few bytes flipped and maybe cut short.
                let mut p = base.clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % p.len();
                    p[i] = next() as u8;
                }
                let cut = (next() as usize) % (p.len() + 1);
                p.truncate(cut);
                p
            };
            let _ = respond(&packet, &peers, round % 3 == 0);
            let _ = is_upstream_reply(&packet, 3);
        }
    }

    #[test]
    fn peer_a_record() {
        let reply = reply_of(respond(&query(0xbeef, "DB", TYPE_A), &peers(), true));
        let q = query(0xbeef, "DB", TYPE_A);
        let mut expected = vec![0xbe, 0xef, 0x85, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        expected.extend_from_slice(&q[12..]);
        expected.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 213, 0, 6]);
        assert_eq!(reply, expected);
        // ANY gets the same record.
        let reply = reply_of(respond(&query(1, "db", TYPE_ANY), &peers(), false));
        assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 1);
        assert_eq!(reply[reply.len() - 4..], DB.octets());
    }

    #[test]
    fn peer_other_types_get_nodata() {
        for qtype in [TYPE_AAAA, 15, 16] {
            let reply = reply_of(respond(&query(2, "db", qtype), &peers(), true));
            assert_eq!(rcode(&reply), Rcode::NoError as u8);
            assert_eq!(&reply[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
            assert_eq!(reply[12..], query(2, "db", qtype)[12..]);
        }
    }

    #[test]
    fn other_names_nxdomain_or_forward() {
        let q = query(5, "example.com", TYPE_A);
        let reply = reply_of(respond(&q, &peers(), false));
        assert_eq!(rcode(&reply), Rcode::NxDomain as u8);
        assert_eq!(reply[0..2], [0, 5]);
        assert_eq!(reply[2] & 0x80, 0x80, "QR");
        assert_eq!(reply[2] & 0x01, 0x01, "RD copied");
        assert_eq!(reply[3] & 0x80, 0x80, "RA");
        assert!(matches!(respond(&q, &peers(), true), Action::Forward(_)));
        // A peer's name with a domain is not a peer name.
        let q = query(5, "db.example.com", TYPE_A);
        assert!(matches!(respond(&q, &peers(), true), Action::Forward(_)));
        // An unknown single label is not answered locally either.
        let q = query(5, "cache", TYPE_A);
        assert!(matches!(respond(&q, &peers(), true), Action::Forward(_)));
    }

    #[test]
    fn formerr_and_notimp_replies() {
        let mut p = query(0x4242, "db", TYPE_A);
        p[5] = 0;
        let reply = reply_of(respond(&p, &peers(), true));
        assert_eq!(reply, [0x42, 0x42, 0x81, 0x81, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut p = query(0x4242, "db", TYPE_A);
        p[2] = 2 << 3; // STATUS, RD clear
        let reply = reply_of(respond(&p, &peers(), true));
        assert_eq!(reply, [0x42, 0x42, 0x90, 0x84, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut p = query(1, "db", TYPE_A);
        p[2] |= 0x80;
        assert_eq!(respond(&p, &peers(), true), Action::Drop);
        assert_eq!(respond(&[1, 2, 3], &peers(), true), Action::Drop);
    }

    #[test]
    fn servfail_echoes_the_question() {
        let q = parse_query(&query(8, "example.com", TYPE_A)).unwrap();
        let reply = answer_rcode(&q, Rcode::ServFail);
        assert_eq!(rcode(&reply), 2);
        assert_eq!(reply[12..], q.question);
    }

    #[test]
    fn upstream_reply_checks() {
        let mut r = query(9, "example.com", TYPE_A);
        assert!(!is_upstream_reply(&r, 9), "QR clear");
        r[2] |= 0x80;
        assert!(is_upstream_reply(&r, 9));
        assert!(!is_upstream_reply(&r, 10), "other ID");
        assert!(!is_upstream_reply(&r[..11], 9), "short");
        r.resize(MAX_UPSTREAM_REPLY_LEN, 0);
        assert!(is_upstream_reply(&r, 9));
        r.push(0);
        assert!(!is_upstream_reply(&r, 9), "oversized");
    }

    // --- the responder over real sockets -------------------------------

    const WAIT: Duration = Duration::from_secs(5);

    /// A fake upstream answering every query with the query itself, QR set,
    /// one extra byte appended, and the ID changed by `id_offset`.
    async fn fake_upstream(id_offset: u16) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let mut reply = buf[..n].to_vec();
                let id = u16::from_be_bytes([reply[0], reply[1]]).wrapping_add(id_offset);
                reply[0..2].copy_from_slice(&id.to_be_bytes());
                reply[2] |= 0x80;
                reply.push(0x99);
                let _ = socket.send_to(&reply, from).await;
            }
        });
        addr
    }

    async fn responder(
        upstreams: Vec<SocketAddr>,
        forward: bool,
        limits: DnsLimits,
    ) -> DnsResponder {
        DnsResponder::bind(
            "127.0.0.1:0".parse().unwrap(),
            None,
            Arc::new(peers()),
            upstreams,
            forward,
            limits,
        )
        .await
        .unwrap()
    }

    fn short_limits() -> DnsLimits {
        DnsLimits {
            upstream_timeout: Duration::from_millis(200),
            max_in_flight: 8,
        }
    }

    async fn ask_responder(server: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(packet, server).await.unwrap();
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(WAIT, client.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => {
                assert_eq!(from, server);
                Some(buf[..n].to_vec())
            }
            Ok(Err(e)) => panic!("recv: {e}"),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn answers_peers_and_nxdomain_without_forwarding() {
        let upstream = fake_upstream(0).await;
        let r = responder(vec![upstream], false, short_limits()).await;
        let reply = ask_responder(r.local_addr(), &query(11, "Web-1.", TYPE_A))
            .await
            .unwrap();
        assert_eq!(rcode(&reply), 0);
        assert_eq!(reply[reply.len() - 4..], [10, 213, 0, 10]);
        let reply = ask_responder(r.local_addr(), &query(12, "example.com", TYPE_A))
            .await
            .unwrap();
        assert_eq!(rcode(&reply), Rcode::NxDomain as u8);
        assert_eq!(reply[0..2], [0, 12]);
    }

    #[tokio::test]
    async fn relays_upstream_replies_unchanged() {
        let upstream = fake_upstream(0).await;
        let r = responder(vec![upstream], true, short_limits()).await;
        let q = query(13, "example.com", TYPE_AAAA);
        let reply = ask_responder(r.local_addr(), &q).await.unwrap();
        let mut expected = q.clone();
        expected[2] |= 0x80;
        expected.push(0x99);
        assert_eq!(reply, expected);
        // Peers are still answered locally.
        let reply = ask_responder(r.local_addr(), &query(14, "db", TYPE_A))
            .await
            .unwrap();
        assert_eq!(reply[reply.len() - 4..], DB.octets());
    }

    #[tokio::test]
    async fn tries_upstreams_in_order() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let good = fake_upstream(0).await;
        let r = responder(
            vec![silent.local_addr().unwrap(), good],
            true,
            short_limits(),
        )
        .await;
        let reply = ask_responder(r.local_addr(), &query(15, "example.com", TYPE_A))
            .await
            .unwrap();
        assert_eq!(*reply.last().unwrap(), 0x99);
    }

    #[tokio::test]
    async fn wrong_id_is_ignored_and_ends_in_servfail() {
        let liar = fake_upstream(1).await;
        let r = responder(vec![liar], true, short_limits()).await;
        let q = query(16, "example.com", TYPE_A);
        let reply = ask_responder(r.local_addr(), &q).await.unwrap();
        assert_eq!(rcode(&reply), Rcode::ServFail as u8);
        assert_eq!(reply[0..2], [0, 16]);
        assert_eq!(reply[12..], q[12..]);
    }

    #[tokio::test]
    async fn no_upstreams_or_no_permits_servfail() {
        let r = responder(vec![], true, short_limits()).await;
        let reply = ask_responder(r.local_addr(), &query(17, "example.com", TYPE_A))
            .await
            .unwrap();
        assert_eq!(rcode(&reply), Rcode::ServFail as u8);

        let upstream = fake_upstream(0).await;
        let limits = DnsLimits {
            max_in_flight: 0,
            ..short_limits()
        };
        let r = responder(vec![upstream], true, limits).await;
        let reply = ask_responder(r.local_addr(), &query(18, "example.com", TYPE_A))
            .await
            .unwrap();
        assert_eq!(rcode(&reply), Rcode::ServFail as u8);
    }

    #[tokio::test]
    async fn garbage_gets_formerr_or_nothing_and_the_responder_survives() {
        let r = responder(vec![], false, short_limits()).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for junk in [&[0xffu8; 3][..], &[0u8; 0][..], &[0xff; 600][..]] {
            client.send_to(junk, r.local_addr()).await.unwrap();
        }
        let mut no_question = query(19, "db", TYPE_A);
        no_question[5] = 0;
        let reply = ask_responder(r.local_addr(), &no_question).await.unwrap();
        assert_eq!(rcode(&reply), Rcode::FormErr as u8);
        let reply = ask_responder(r.local_addr(), &[0x12; 600]).await;
        // 0x12 0x12 flags: QR clear, opcode 2 -> over 512 bytes -> FORMERR.
        assert_eq!(rcode(&reply.unwrap()), Rcode::FormErr as u8);
        let reply = ask_responder(r.local_addr(), &query(20, "db", TYPE_A))
            .await
            .unwrap();
        assert_eq!(reply[reply.len() - 4..], DB.octets());
        // The short junk and the 0xff responses were dropped silently.
        let mut buf = [0u8; 64];
        let stray =
            tokio::time::timeout(Duration::from_millis(200), client.recv_from(&mut buf)).await;
        assert!(stray.is_err(), "unexpected reply to junk: {stray:?}");
    }

    #[tokio::test]
    async fn drop_frees_the_address_at_once() {
        let r = responder(vec![], false, short_limits()).await;
        let addr = r.local_addr();
        drop(r);
        std::net::UdpSocket::bind(addr).unwrap();
    }
}

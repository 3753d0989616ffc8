//! The bearer-token server a token-auth [`super::Registry`] sends clients
//! to, as Docker Hub's auth.docker.io works: `GET /token?service=..&scope=..`
//! with optional Basic credentials answers `{"token", "access_token",
//! "expires_in"}`. Anonymous callers get `pull` on any repository, the
//! configured user `pull` and `push`; wrong credentials get 401.
//!
//! Tokens are ES256 JWTs signed with a P-256 key whose self-signed
//! certificate (made with the `openssl` CLI) is the registry's
//! `auth.token.rootcertbundle`. The certificate travels in the JWT header as
//! `x5c` (base64 DER); docker-registry 2.8 (distribution v2.8.2) checks
//! `x5c` first, verifies the chain against the bundle and then the
//! signature, so no libtrust `kid` is needed. `aud` is a single string,
//! which is what 2.8 parses.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::run;

/// `auth.token.service`: the `aud` of every token.
pub const TOKEN_SERVICE: &str = "moat-e2e-registry";
/// `auth.token.issuer`: the `iss` of every token.
pub const TOKEN_ISSUER: &str = "moat-e2e-token-server";
const LIFETIME_SECS: u64 = 300;

/// One token the server issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// The Basic-auth user, `None` for anonymous requests.
    pub user: Option<String>,
    /// Granted `(repository, actions)`, from the requested scopes.
    pub access: Vec<(String, Vec<String>)>,
}

struct State {
    user: String,
    password: String,
    key: EncodingKey,
    cert_der_b64: String,
    grants: Mutex<Vec<TokenGrant>>,
    serial: AtomicU64,
}

/// A running token server; stops when dropped.
pub(super) struct TokenServer {
    addr: SocketAddr,
    /// The certificate bundle for the registry's config.
    pub(super) cert_bundle: PathBuf,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    /// Makes a signing key and certificate under `dir` and serves on a free
    /// loopback port.
    pub(super) fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        let key_path = dir.join("token-key.pem");
        let cert_bundle = dir.join("token-cert.pem");
        run(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
                .args(["-subj", "/CN=moat-e2e token issuer", "-keyout"])
                .arg(&key_path)
                .arg("-out")
                .arg(&cert_bundle),
            "openssl req (token signing key and certificate)",
        );
        // PKCS#8 key and X.509 certificate: the PEM bodies are the base64 DER.
        let key_der = STANDARD
            .decode(pem_body(&key_path, "PRIVATE KEY"))
            .expect("token key PEM is base64");
        let state = Arc::new(State {
            user: user.into(),
            password: password.into(),
            key: EncodingKey::from_ec_der(&key_der),
            cert_der_b64: pem_body(&cert_bundle, "CERTIFICATE"),
            grants: Mutex::new(Vec::new()),
            serial: AtomicU64::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let addr = listener.local_addr().expect("token server address");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || serve(listener, &state, &stop))
        };
        TokenServer {
            addr,
            cert_bundle,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// `auth.token.realm`: `http://127.0.0.1:PORT/token`.
    pub(super) fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub(super) fn grants(&self) -> Vec<TokenGrant> {
        self.state.grants.lock().expect("grants lock").clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn pem_body(path: &Path, label: &str) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).map(|i| i + begin.len());
    let stop = text.find(&end);
    match (start, stop) {
        (Some(a), Some(b)) if a < b => text[a..b].split_whitespace().collect(),
        _ => panic!("{} has no {label} PEM block", path.display()),
    }
}

fn serve(listener: TcpListener, state: &State, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if let Ok(stream) = stream {
            // A client that hangs up early is its own problem.
            let _ = handle(stream, state);
        }
    }
}

fn handle(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (request.next().unwrap_or_default(), request.next());
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_string());
    let (status, body) = state.answer(method, target.unwrap_or_default(), authorization);
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

impl State {
    fn answer(&self, method: &str, target: &str, authorization: Option<String>) -> (u16, Value) {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path != "/token" {
            return (404, json!({"details": "not found"}));
        }
        if method != "GET" {
            return (405, json!({"details": "only GET /token"}));
        }
        let params: Vec<(String, String)> = query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (percent_decode(k), percent_decode(v)))
            .collect();
        let service = params.iter().find(|(k, _)| k == "service");
        if service.map(|(_, v)| v.as_str()) != Some(TOKEN_SERVICE) {
            return (
                400,
                json!({"details": format!("service must be {TOKEN_SERVICE}")}),
            );
        }
        let user = match authorization {
            None => None,
            Some(header) if self.is_user(&header) => Some(self.user.clone()),
            Some(_) => return (401, json!({"details": "incorrect username or password"})),
        };
        let allowed: &[&str] = if user.is_some() {
            &["pull", "push"]
        } else {
            &["pull"]
        };
        let access: Vec<(String, Vec<String>)> = params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split_whitespace())
            .filter_map(|scope| grant(scope, allowed))
            .collect();
        let token = self.sign(&user, &access);
        self.grants
            .lock()
            .expect("grants lock")
            .push(TokenGrant { user, access });
        (
            200,
            json!({"token": token, "access_token": token, "expires_in": LIFETIME_SECS}),
        )
    }

    fn is_user(&self, header: &str) -> bool {
        let Some(encoded) = header.strip_prefix("Basic ") else {
            return false;
        };
        let decoded = STANDARD.decode(encoded.trim()).unwrap_or_default();
        String::from_utf8_lossy(&decoded) == format!("{}:{}", self.user, self.password)
    }

    fn sign(&self, user: &Option<String>, access: &[(String, Vec<String>)]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let serial = self.serial.fetch_add(1, Ordering::SeqCst);
        let claims = json!({
            "iss": TOKEN_ISSUER,
            "sub": user.clone().unwrap_or_default(),
            "aud": TOKEN_SERVICE,
            "exp": now + LIFETIME_SECS,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("{now}-{serial}"),
            "access": access.iter().map(|(name, actions)| {
                json!({"type": "repository", "name": name, "actions": actions})
            }).collect::<Vec<_>>(),
        });
        let mut header = Header::new(Algorithm::ES256);
        header.x5c = Some(vec![self.cert_der_b64.clone()]);
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign registry token")
    }
}

/// `repository:NAME:a,b` -> (NAME, requested actions that are `allowed`).
fn grant(scope: &str, allowed: &[&str]) -> Option<(String, Vec<String>)> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if kind != "repository" {
        return None;
    }
    let granted: Vec<String> = actions
        .split(',')
        .filter(|a| allowed.contains(a))
        .map(String::from)
        .collect();
    Some((name.to_string(), granted))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

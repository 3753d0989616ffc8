//! The OCI distribution client: manifests by tag or digest, blobs streamed
//! to disk with their digest checked as they arrive, resumed with a Range
//! request after a failure, retried with backoff. Authentication answers the
//! registry's challenge: anonymous or configured-credential bearer tokens
//! (cached per repository), or Basic with configured credentials. Plain
//! HTTP is used only for hosts the operator marked `insecure_http`, and
//! credentials never travel over it to any other host.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RANGE, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::{parse_challenge, Challenge};
use super::digest::{Digest, Hasher};
use super::error::ImageError;
use super::manifest::{ACCEPT as MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};
use super::reference::Reference;

/// Attempts per request on network errors, 429 and 5xx.
const ATTEMPTS: u32 = 4;
/// Largest token response accepted.
const MAX_TOKEN_BYTES: usize = 16 << 10;
/// Cached tokens kept at most (by host and repository); the cache is
/// cleared when it would grow past this.
const MAX_CACHED_TOKENS: usize = 256;

/// Operator settings for one registry host (`[registries."host:port"]`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Speak plain HTTP to this host (loopback test registries; never the
    /// internet).
    pub insecure_http: bool,
    pub username: Option<String>,
    /// File holding the password or token (first line), readable by root
    /// only; never inline in the config.
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Credentials {
    username: String,
    password: String,
}

#[derive(Deserialize)]
struct TokenReply {
    token: Option<String>,
    access_token: Option<String>,
}

/// One registry client for all pulls (connection pool, token cache).
pub struct RegistryClient {
    http: reqwest::Client,
    registries: BTreeMap<String, RegistryConfig>,
    /// Bearer tokens by (host, repository).
    tokens: Mutex<HashMap<(String, String), String>>,
}

/// Hosts a redirect may not lead to: loopback, private, link-local (cloud
/// metadata), unspecified — unless the operator configured that host.
fn internal_ip(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            ip.is_loopback() || ip.is_private() || ip.is_link_local() || ip.is_unspecified()
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            let seg = ip.segments()[0];
            ip.is_loopback()
                || ip.is_unspecified()
                || (seg & 0xfe00) == 0xfc00
                || (seg & 0xffc0) == 0xfe80
        }
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// Redirects (blob CDNs) are followed at most 5 times, never from HTTPS to
/// plain HTTP and never to an internal address, unless the target host is
/// one the operator configured.
fn redirect_policy(configured: Vec<String>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 5 {
            return attempt.error("more than 5 redirects");
        }
        let url = attempt.url().clone();
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => return attempt.error("redirect without a host"),
        };
        let trusted = configured.contains(&host);
        if !trusted && url.scheme() != "https" {
            return attempt.error(format!("refusing a redirect to plain HTTP ({url})"));
        }
        if !trusted && internal_ip(url.host_str().unwrap_or("")) {
            return attempt.error(format!(
                "refusing a redirect to an internal address ({host})"
            ));
        }
        attempt.follow()
    })
}

fn http_client(configured: Vec<String>) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("moat/", env!("CARGO_PKG_VERSION")))
        .redirect(redirect_policy(configured))
        .build()
        .map_err(|e| e.to_string())
}

impl RegistryClient {
    pub fn new(registries: BTreeMap<String, RegistryConfig>) -> Result<Self, ImageError> {
        let http = http_client(registries.keys().cloned().collect()).map_err(|reason| {
            ImageError::Store {
                path: "registry client".into(),
                reason,
            }
        })?;
        Ok(Self {
            http,
            registries,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Settings for a host; Docker Hub's API host reads `docker.io`'s.
    fn config(&self, host: &str) -> RegistryConfig {
        self.registries
            .get(host)
            .or_else(|| {
                (host == "registry-1.docker.io")
                    .then(|| self.registries.get("docker.io"))
                    .flatten()
            })
            .cloned()
            .unwrap_or_default()
    }

    fn scheme(&self, host: &str) -> &'static str {
        if self.config(host).insecure_http {
            "http"
        } else {
            "https"
        }
    }

    fn credentials(&self, host: &str) -> Result<Option<Credentials>, String> {
        let c = self.config(host);
        match (c.username, c.password_file) {
            (Some(username), Some(file)) => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read password_file {}: {e}", file.display()))?;
                Ok(Some(Credentials {
                    username,
                    password: text.lines().next().unwrap_or("").to_owned(),
                }))
            }
            (None, None) => Ok(None),
            _ => Err("set both username and password_file, or neither".into()),
        }
    }

    fn err(r: &Reference, reason: impl Into<String>) -> ImageError {
        ImageError::Registry {
            image: r.to_string(),
            registry: r.registry.clone(),
            reason: reason.into(),
        }
    }

    /// May credentials or tokens be sent to `url`? Only over HTTPS, or to a
    /// host the operator allowed plain HTTP for.
    fn may_send_secrets(&self, url: &reqwest::Url) -> bool {
        if url.scheme() == "https" {
            return true;
        }
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => return false,
        };
        self.config(&host).insecure_http
    }

    /// Sends a GET (with retries), answering one auth challenge.
    async fn get(
        &self,
        r: &Reference,
        url: &str,
        headers: &[(reqwest::header::HeaderName, String)],
    ) -> Result<Response, ImageError> {
        let host = r.api_host().to_owned();
        let key = (host.clone(), r.repository.clone());
        let mut challenged = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.http.get(url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let token = self.tokens.lock().ok().and_then(|t| t.get(&key).cloned());
            if let Some(t) = &token {
                req = req.header(AUTHORIZATION, t);
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) if attempt < ATTEMPTS => {
                    tracing::debug!(error = %e, url, attempt, "registry request failed; retrying");
                    backoff(attempt).await;
                    continue;
                }
                Err(e) => return Err(Self::err(r, format!("{url}: {e}"))),
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                // Only the registry itself gets an answer (a redirect target
                // asking for credentials gets none).
                let from = match (resp.url().host_str(), resp.url().port()) {
                    (Some(h), Some(p)) => format!("{h}:{p}"),
                    (Some(h), None) => h.to_owned(),
                    _ => String::new(),
                };
                if from != host {
                    return Ok(resp);
                }
                let header = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let auth = self.answer(r, &header).await?;
                if let Ok(mut t) = self.tokens.lock() {
                    if t.len() >= MAX_CACHED_TOKENS {
                        t.clear();
                    }
                    t.insert(key.clone(), auth);
                }
                continue;
            }
            if (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error())
                && attempt < ATTEMPTS
            {
                backoff(attempt).await;
                continue;
            }
            return Ok(resp);
        }
    }

    /// The Authorization value answering a challenge.
    async fn answer(&self, r: &Reference, header: &str) -> Result<String, ImageError> {
        let host = r.api_host();
        let creds = self.credentials(host).map_err(|e| Self::err(r, e))?;
        match parse_challenge(header) {
            Some(Challenge::Basic) => {
                let c = creds.ok_or_else(|| {
                    Self::err(
                        r,
                        format!("the registry requires credentials; set username and password_file under [registries.\"{host}\"] in the broker config"),
                    )
                })?;
                // The registry URL is HTTPS or a host the operator allowed
                // plain HTTP for.
                Ok(basic(&c))
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let mut url = reqwest::Url::parse(&realm)
                    .map_err(|e| Self::err(r, format!("token realm {realm:?}: {e}")))?;
                if url.scheme() != "https" && !self.may_send_secrets(&url) {
                    return Err(Self::err(
                        r,
                        format!("token realm {realm} is plain HTTP; allow its host with insecure_http only if it is a trusted loopback service"),
                    ));
                }
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = &service {
                        q.append_pair("service", s);
                    }
                    q.append_pair(
                        "scope",
                        &scope.unwrap_or_else(|| format!("repository:{}:pull", r.repository)),
                    );
                }
                let mut req = self.http.get(url.clone());
                if let Some(c) = &creds {
                    req = req.header(AUTHORIZATION, basic(c));
                }
                let resp = req
                    .send()
                    .await
                    .map_err(|e| Self::err(r, format!("token request to {realm}: {e}")))?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(Self::err(
                        r,
                        format!(
                            "token server {realm} answered {status}{}",
                            if creds.is_some() {
                                " (check the configured credentials)"
                            } else {
                                " (the image may be private: configure credentials for this registry)"
                            }
                        ),
                    ));
                }
                let body = read_capped(resp, MAX_TOKEN_BYTES)
                    .await
                    .map_err(|e| Self::err(r, format!("token reply: {e}")))?;
                let reply: TokenReply = serde_json::from_slice(&body)
                    .map_err(|e| Self::err(r, format!("token reply is not JSON: {e}")))?;
                let token = reply
                    .token
                    .or(reply.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| Self::err(r, "token reply has no token"))?;
                Ok(format!("Bearer {token}"))
            }
            None => Err(Self::err(
                r,
                format!("unauthorized, with an authentication challenge moat does not understand: {header:?}"),
            )),
        }
    }

    fn url(&self, r: &Reference, kind: &str, what: &str) -> String {
        format!(
            "{}://{}/v2/{}/{kind}/{what}",
            self.scheme(r.api_host()),
            r.api_host(),
            r.repository
        )
    }

    /// Fetches a manifest or index by tag or digest: (bytes, content type).
    /// When asked by digest, the bytes must hash to it.
    pub async fn manifest(
        &self,
        r: &Reference,
        reference: &str,
    ) -> Result<(Vec<u8>, Option<String>), ImageError> {
        let url = self.url(r, "manifests", reference);
        let resp = self
            .get(r, &url, &[(ACCEPT, MANIFEST_ACCEPT.to_owned())])
            .await?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(ImageError::NotFound {
                image: r.to_string(),
                detail: format!("{} has no manifest {reference}", r.name()),
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Self::err(
                r,
                format!(
                    "access denied ({status}): the image is private or the credentials are wrong"
                ),
            ));
        }
        if !status.is_success() {
            return Err(Self::err(r, format!("manifest request answered {status}")));
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = read_capped(resp, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| Self::err(r, format!("manifest: {e}")))?;
        let actual = Digest::of(&bytes);
        if let Ok(pinned) = Digest::parse(reference) {
            if actual != pinned {
                return Err(ImageError::Invalid {
                    image: r.to_string(),
                    reason: format!("the registry sent a manifest with digest {actual}, not the {pinned} asked for"),
                });
            }
        } else if let Some(h) = header_digest.and_then(|h| Digest::parse(&h).ok()) {
            if h != actual {
                return Err(ImageError::Invalid {
                    image: r.to_string(),
                    reason: format!("manifest digest {actual} differs from the registry's Docker-Content-Digest {h}"),
                });
            }
        }
        Ok((bytes, content_type))
    }

    /// Downloads blob `d` of `size` bytes into `partial` (appending to what
    /// an earlier attempt left), checking size and digest. `progress` gets
    /// the bytes present so far. On a digest mismatch the partial file is
    /// deleted; on other failures it stays for the next attempt.
    pub async fn blob_to_file(
        &self,
        r: &Reference,
        d: &Digest,
        size: u64,
        partial: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), ImageError> {
        let layer_err = |reason: String| ImageError::Layer {
            image: r.to_string(),
            layer: d.to_string(),
            reason,
        };
        let mut attempt = 0;
        let mut restarted = false;
        loop {
            attempt += 1;
            let resumed = tokio::fs::metadata(partial)
                .await
                .is_ok_and(|m| m.len() > 0);
            match self.blob_attempt(r, d, size, partial, progress).await {
                Ok(()) => return Ok(()),
                Err(BlobFailure::Fatal(reason)) => {
                    let _ = tokio::fs::remove_file(partial).await;
                    if resumed && !restarted {
                        // What an earlier attempt left may be what is wrong:
                        // once, start over from nothing.
                        tracing::warn!(layer = %d.short(), %reason, "resumed download failed; starting it over");
                        restarted = true;
                        continue;
                    }
                    return Err(layer_err(reason));
                }
                Err(BlobFailure::Retry(reason)) if attempt < ATTEMPTS => {
                    tracing::info!(layer = %d.short(), attempt, %reason, "blob download interrupted; resuming");
                    backoff(attempt).await;
                }
                Err(BlobFailure::Retry(reason)) => return Err(layer_err(reason)),
            }
        }
    }

    async fn blob_attempt(
        &self,
        r: &Reference,
        d: &Digest,
        size: u64,
        partial: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), BlobFailure> {
        let io =
            |e: std::io::Error| BlobFailure::Retry(format!("writing {}: {e}", partial.display()));
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(partial)
            .await
            .map_err(io)?;
        let mut have = file.metadata().await.map_err(io)?.len();
        if have > size {
            file.set_len(0).await.map_err(io)?;
            have = 0;
        }
        let mut hasher = Hasher::default();
        if have > 0 {
            let mut buf = vec![0u8; 1 << 16];
            let mut read = 0u64;
            while read < have {
                let n = file.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                read += n as u64;
            }
        }
        let url = self.url(r, "blobs", &d.to_string());
        let mut headers = Vec::new();
        if have > 0 && have < size {
            headers.push((RANGE, format!("bytes={have}-")));
        }
        if have < size || size == 0 {
            let resp = self
                .get(r, &url, &headers)
                .await
                .map_err(|e| BlobFailure::Retry(e.to_string()))?;
            let status = resp.status();
            match status {
                StatusCode::PARTIAL_CONTENT if have > 0 => {}
                StatusCode::OK => {
                    if have > 0 {
                        // The registry ignored the Range: start over.
                        file.set_len(0).await.map_err(io)?;
                        tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(0))
                            .await
                            .map_err(io)?;
                        hasher = Hasher::default();
                        have = 0;
                    }
                }
                StatusCode::NOT_FOUND => {
                    return Err(BlobFailure::Fatal("the registry has no such blob".into()))
                }
                s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                    return Err(BlobFailure::Retry(format!("blob request answered {s}")))
                }
                s => return Err(BlobFailure::Fatal(format!("blob request answered {s}"))),
            }
            if let Some(len) = resp.content_length() {
                if have.checked_add(len).is_none_or(|end| end > size) {
                    return Err(BlobFailure::Fatal(format!(
                        "the registry offers {len} more bytes after {have}; the manifest says {size} in all"
                    )));
                }
            }
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| BlobFailure::Retry(format!("download: {e}")))?;
                if have + chunk.len() as u64 > size {
                    return Err(BlobFailure::Fatal(format!(
                        "the registry sent more than the {size} bytes the manifest says"
                    )));
                }
                file.write_all(&chunk).await.map_err(io)?;
                hasher.update(&chunk);
                have += chunk.len() as u64;
                progress(have);
            }
            file.flush().await.map_err(io)?;
        }
        if have != size {
            return Err(BlobFailure::Retry(format!(
                "download ended after {have} of {size} bytes"
            )));
        }
        let actual = hasher.finish();
        if actual != *d {
            return Err(BlobFailure::Fatal(format!(
                "content has digest {actual}, not {d}: corrupt or tampered blob"
            )));
        }
        Ok(())
    }
}

enum BlobFailure {
    Retry(String),
    Fatal(String),
}

fn basic(c: &Credentials) -> String {
    use base64::Engine as _;
    let pair = format!("{}:{}", c.username, c.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(500 * (1 << attempt.min(4)))).await;
}

/// Reads a response body, refusing more than `max` bytes.
async fn read_capped(resp: Response, max: usize) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|l| l > max as u64) {
        return Err(format!("over {max} bytes"));
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if out.len() + chunk.len() > max {
            return Err(format!("over {max} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::internal_ip;

    #[test]
    fn internal_addresses_are_recognised() {
        for h in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "169.254.169.254",
            "0.0.0.0",
            "[::1]",
            "fd00::1",
            "fe80::1",
            "localhost",
        ] {
            assert!(internal_ip(h), "{h}");
        }
        for h in ["8.8.8.8", "registry-1.docker.io", "[2001:db8::1]"] {
            assert!(!internal_ip(h), "{h}");
        }
    }
}

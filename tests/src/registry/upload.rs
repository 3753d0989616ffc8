//! Pushing an image from an OCI layout byte for byte over the registry API
//! (blob uploads, then manifests children first), for what skopeo changes
//! on the way: it gzips uncompressed layers, so an
//! `application/vnd.oci.image.layer.v1.tar` layer only reaches the
//! registry this way.

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::layout::{Descriptor, Layout, INDEX};
use super::{Auth, Registry, TOKEN_SERVICE};

struct Client<'a> {
    agent: ureq::Agent,
    /// `http://127.0.0.1:PORT`, for relative upload locations.
    origin: String,
    /// `ORIGIN/v2/NAME`.
    base: String,
    authorization: Option<String>,
    layout: &'a Layout,
}

/// Uploads `tag` of `layout` to `registry` as `dest` (`name:tag`) with the
/// registry's own credentials, every blob and manifest exactly as stored;
/// returns the digest of the top manifest (or index).
pub fn upload(layout: &Path, tag: &str, registry: &Registry, dest: &str) -> String {
    let (name, reference) = dest
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("upload: {dest:?} is not name:tag"));
    let layout = Layout::open(layout);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let client = Client {
        authorization: authorization(&agent, registry, name),
        agent,
        origin: registry.url(),
        base: format!("{}/v2/{name}", registry.url()),
        layout: &layout,
    };
    let top = layout.resolve(tag);
    client.manifest(&top, reference);
    top.digest
}

/// The Authorization header for pushing to `name`.
fn authorization(agent: &ureq::Agent, registry: &Registry, name: &str) -> Option<String> {
    let (user, password) = registry.credentials()?;
    let basic = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
    if !matches!(registry.auth(), Auth::Token { .. }) {
        return Some(basic);
    }
    let url = format!(
        "{}?service={TOKEN_SERVICE}&scope=repository:{name}:pull,push",
        registry.token_url().expect("token server")
    );
    let mut reply = agent
        .get(&url)
        .header("Authorization", &basic)
        .call()
        .expect("GET token");
    let body: serde_json::Value = reply.body_mut().read_json().expect("token JSON");
    let token = body["token"].as_str().expect("token in reply");
    Some(format!("Bearer {token}"))
}

impl Client<'_> {
    /// Uploads what `desc` refers to, then `desc` itself as `reference`.
    fn manifest(&self, desc: &Descriptor, reference: &str) {
        let body = self.layout.read_json(&desc.digest);
        if desc.media_type == INDEX {
            for child in body["manifests"].as_array().expect("index manifests") {
                let child = Descriptor::from_json(child);
                self.manifest(&child, &child.digest);
            }
        } else {
            self.blob(&Descriptor::from_json(&body["config"]));
            for layer in body["layers"].as_array().expect("manifest layers") {
                self.blob(&Descriptor::from_json(layer));
            }
        }
        let url = format!("{}/manifests/{reference}", self.base);
        let reply = self
            .request(self.agent.put(&url))
            .header("Content-Type", &desc.media_type)
            .send(&self.layout.read_blob(&desc.digest)[..]);
        expect_status(reply, 201, &url);
    }

    fn blob(&self, desc: &Descriptor) {
        let url = format!("{}/blobs/{}", self.base, desc.digest);
        let head = self.request(self.agent.head(&url)).call();
        if head.is_ok_and(|r| r.status() == 200) {
            return;
        }
        let start = format!("{}/blobs/uploads/", self.base);
        let reply = self.request(self.agent.post(&start)).send_empty();
        let reply = expect_status(reply, 202, &start);
        let location = reply
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("upload Location")
            .to_string();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.origin)
        } else {
            location
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{separator}digest={}", desc.digest);
        let reply = self
            .request(self.agent.put(&put))
            .header("Content-Type", "application/octet-stream")
            .send(&self.layout.read_blob(&desc.digest)[..]);
        expect_status(reply, 201, &put);
    }

    fn request<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => request.header("Authorization", value),
            None => request,
        }
    }
}

fn expect_status(
    reply: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    status: u16,
    url: &str,
) -> ureq::http::Response<ureq::Body> {
    let mut reply = reply.unwrap_or_else(|e| panic!("upload: {url}: {e}"));
    if reply.status().as_u16() != status {
        let text = reply.body_mut().read_to_string().unwrap_or_default();
        panic!(
            "upload: {url}: HTTP {} (want {status}): {text}",
            reply.status()
        );
    }
    reply
}

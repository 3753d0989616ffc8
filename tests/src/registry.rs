//! A loopback OCI registry and an image-building kit for the end-to-end
//! suites, with no Docker: each [`Registry`] is its own `docker-registry`
//! (distribution 2.8) on a free 127.0.0.1 port with its data in a temp dir,
//! killed when dropped, with no auth, htpasswd Basic auth, or bearer tokens
//! from a token server inside the test process ([`Auth`]).
//!
//! This file owns the registry process and the command helpers; the
//! submodules own the rest:
//! - `token`: the bearer-token server (ES256 JWTs, `x5c` header);
//! - `layout`: hand-written OCI layout blobs and `index.json` refs;
//! - `image`: [`ImageBuilder`] (umoci) and [`busybox_rootfs`];
//! - `raw_tar`: [`RawTar`], layer tarballs with hostile entries kept verbatim;
//! - `index`: multi-platform image indexes;
//! - `docker_archive`: `docker save`-style tarballs;
//! - `push`: skopeo push and inspect;
//! - `upload`: byte-for-byte push over the registry API.
//!
//! Needs `docker-registry skopeo umoci apache2-utils busybox-static openssl`
//! (packaging/dev/setup.sh installs them).

mod docker_archive;
mod image;
mod index;
mod layout;
mod push;
mod raw_tar;
mod token;
mod upload;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use docker_archive::docker_archive;
pub use image::{busybox_rootfs, BuiltImage, Compression, ImageBuilder, Platform};
pub use index::{build_index, two_platform_index, BuiltIndex};
pub use layout::{sha256_digest, Descriptor, Layout};
pub use push::{inspect, push, try_push, Format};
pub use raw_tar::RawTar;
pub use token::{TokenGrant, TOKEN_ISSUER, TOKEN_SERVICE};
pub use upload::upload;

use token::TokenServer;

/// How a [`Registry`] authenticates clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Anyone may pull and push.
    None,
    /// htpasswd (`htpasswd -Bbn`) Basic auth: only this user, for everything.
    Basic { user: String, password: String },
    /// Docker Hub-style bearer tokens: anonymous clients get pull tokens,
    /// this user pull and push tokens.
    Token { user: String, password: String },
}

impl Auth {
    pub fn basic(user: &str, password: &str) -> Auth {
        Auth::Basic {
            user: user.into(),
            password: password.into(),
        }
    }

    pub fn token(user: &str, password: &str) -> Auth {
        Auth::Token {
            user: user.into(),
            password: password.into(),
        }
    }
}

/// A running `docker-registry serve`; killed (and its data removed) on drop.
pub struct Registry {
    child: Child,
    port: u16,
    auth: Auth,
    log: PathBuf,
    token: Option<TokenServer>,
    // Declared last: dropped after the registry and token server stop.
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry with `auth` and waits until `/v2/` answers.
    pub fn start(auth: Auth) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("moat-registry-")
            .tempdir()
            .expect("registry temp dir");
        let port = crate::free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: moat-e2e\n",
            dir.path().join("data").display()
        );
        let mut token = None;
        match &auth {
            Auth::None => {}
            Auth::Basic { user, password } => {
                let htpasswd = dir.path().join("htpasswd");
                let line = run(
                    Command::new("htpasswd").args(["-Bbn", user, password]),
                    "htpasswd -Bbn",
                );
                fs::write(&htpasswd, line.trim_end()).expect("write htpasswd");
                config += &format!(
                    "auth:\n  htpasswd:\n    realm: moat-e2e\n    path: {}\n",
                    htpasswd.display()
                );
            }
            Auth::Token { user, password } => {
                let server = TokenServer::start(dir.path(), user, password);
                config += &format!(
                    "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    \
                     issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    server.realm(),
                    server.cert_bundle.display()
                );
                token = Some(server);
            }
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).expect("write registry config");
        let log = dir.path().join("registry.log");
        let logfile = fs::File::create(&log).expect("create registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().expect("dup registry log"))
            .stderr(logfile)
            .spawn()
            .expect("spawn docker-registry (apt-get install docker-registry)");
        let mut registry = Registry {
            child,
            port,
            auth,
            log,
            token,
            _dir: dir,
        };
        registry.wait_ready();
        registry
    }

    /// `127.0.0.1:PORT`, for image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The user and password of Basic or Token auth.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        match &self.auth {
            Auth::None => None,
            Auth::Basic { user, password } | Auth::Token { user, password } => {
                Some((user.as_str(), password.as_str()))
            }
        }
    }

    /// The token endpoint (`auth.token.realm`) for Token auth.
    pub fn token_url(&self) -> Option<String> {
        self.token.as_ref().map(TokenServer::realm)
    }

    /// Every token issued so far (empty unless Token auth).
    pub fn token_grants(&self) -> Vec<TokenGrant> {
        self.token
            .as_ref()
            .map(TokenServer::grants)
            .unwrap_or_default()
    }

    /// The registry's log so far, for failure messages.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        let deadline = Instant::now() + Duration::from_secs(15);
        let url = format!("{}/v2/", self.url());
        loop {
            if let Some(status) = self.child.try_wait().expect("poll docker-registry") {
                panic!("docker-registry exited ({status}):\n{}", self.log_text());
            }
            if let Ok(reply) = agent.get(&url).call() {
                if matches!(reply.status().as_u16(), 200 | 401) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry not ready on {url} after 15 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd`; its stdout, or its status and stderr as the error.
fn try_run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {cmd:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`try_run`], panicking on failure.
fn run(cmd: &mut Command, what: &str) -> String {
    try_run(cmd, what).unwrap_or_else(|e| panic!("{e}"))
}

//! Harness for the end-to-end suites: starts the real stack (`moat server
//! start --dev`, or with API keys when [`Options::keys`] is set; it runs
//! moat-broker as root and moat-gateway as the `moat` user) with its own
//! config, state directory, cgroup parent, uid range and port, talks to it
//! over HTTP (with an `Authorization` header when asked), makes and revokes
//! keys with `moat server keygen` / `revoke`, and inspects the host for
//! leftovers. Each [`Server`] stops its stack when dropped.
//!
//! Needs root, the `moat` user, and the artefacts `make test` builds; the
//! paths come from `MOAT_BUILD_DIR` (kernel, agent, base image) and
//! `MOAT_BIN_DIR` (host binaries).

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod bare_vm;
pub mod registry;
pub mod stats;
pub mod testnet;
pub mod wrk;

static SERVERS: AtomicU32 = AtomicU32::new(0);

fn env_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(default)
    })
}

/// Directory with vmlinux, moat-agent, base.erofs, kernel.release.
pub fn build_dir() -> PathBuf {
    env_dir("MOAT_BUILD_DIR", "build")
}

/// Directory with moat, moat-broker, moat-gateway.
pub fn bin_dir() -> PathBuf {
    env_dir("MOAT_BIN_DIR", "target/release")
}

/// Knobs a suite may turn for its own server.
#[derive(Debug, Clone)]
pub struct Options {
    pub boot_timeout_secs: u32,
    pub max_sandboxes: u32,
    /// Extra `[images.local]` entries: name -> file.
    pub extra_images: Vec<(String, PathBuf)>,
    /// Let guest agents honour `moat-test-hook` commands.
    pub agent_test_hooks: bool,
    /// Run VM processes without the jail (`[jail] development_unjailed`),
    /// for measuring what the jail costs.
    pub unjailed: bool,
    pub max_calls_per_sandbox: u32,
    pub max_output_bytes: u64,
    /// Start without `--dev`: the gateway requires API keys (secret and
    /// revocation list in the server's temp directory).
    pub keys: bool,
    /// Extra gateway config (TOML, top-level keys and tables other than
    /// `[auth]`); when non-empty, or with `keys`, the harness writes a
    /// gateway config and passes `--gateway-config`.
    pub gateway_toml: String,
    /// A program the broker runs in place of the VMM: `[vmm] qemu` on the
    /// QEMU backend, `[vmm] runner` on libkrun (see [`vmm_backend`]).
    pub vmm_program: Option<PathBuf>,
    /// Size of each sandbox's writable disk.
    pub writable_disk_mib: u32,
    /// Extra broker config appended to the harness's (whole tables).
    pub broker_toml: String,
    /// Extra lines for the broker's `[limits]` table.
    pub limits_toml: String,
    /// Extra lines for the broker's `[images]` table.
    pub images_toml: String,
    /// Use a store of this server's own (`images/` in its temp dir) instead
    /// of the shared one set-up filled with the default images
    /// (`build/store`).
    pub private_store: bool,
    /// Let `sandbox.start` pull missing images. Off by default: the suites
    /// send traffic to loopback only, and a mistyped image must not reach
    /// out to a public registry. When on, `images_toml` may still set
    /// `pull_on_start` itself.
    pub pulls: bool,
    /// Extra lines for the broker's `[network]` table (the harness sets a
    /// table, tap prefix and subnet of this server's own).
    pub network_toml: String,
    /// Extra lines for the broker's `[volumes]` table (the harness sets
    /// `dir` to `volumes/` in the server's temp dir).
    pub volumes_toml: String,
    /// Extra lines for the broker's `[lifecycle]` table. The harness sets
    /// `stop_sandboxes_on_shutdown = true` (unlike the product default),
    /// so a suite that ends leaves no VM behind; the restart suites set it
    /// to false here.
    pub lifecycle_toml: String,
    /// `MOAT_LOG` for the broker and the gateway.
    pub log_filter: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            boot_timeout_secs: 60,
            max_sandboxes: 8,
            extra_images: Vec::new(),
            agent_test_hooks: false,
            unjailed: false,
            max_calls_per_sandbox: 16,
            max_output_bytes: 1 << 20,
            keys: false,
            gateway_toml: String::new(),
            vmm_program: None,
            writable_disk_mib: 1024,
            broker_toml: String::new(),
            limits_toml: String::new(),
            images_toml: String::new(),
            private_store: false,
            pulls: false,
            network_toml: String::new(),
            volumes_toml: String::new(),
            lifecycle_toml: String::new(),
            log_filter: "info".into(),
        }
    }
}

/// A running moat stack.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub cgroup_parent: String,
    pub uid_base: u32,
    pub uid_count: u32,
    /// The broker config the harness wrote.
    pub broker_config: PathBuf,
    /// The gateway config the harness wrote (keys mode or extra TOML).
    pub gateway_config: Option<PathBuf>,
    /// This server's nftables table.
    pub net_table: String,
    /// Name prefix of this server's tap devices.
    pub net_prefix: String,
    port: u16,
    keys: bool,
    log_filter: String,
    agent: ureq::Agent,
}

/// An API key made by `moat server keygen`.
#[derive(Debug, Clone)]
pub struct Key {
    pub token: String,
    pub id: String,
}

/// A raw HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The VM backend the suites run on: `MOAT_VMM` (`auto`, `libkrun` or
/// `qemu`), default `auto` (libkrun on hardware KVM, QEMU elsewhere).
pub fn vmm_backend() -> String {
    std::env::var("MOAT_VMM").unwrap_or_else(|_| "auto".into())
}

fn user_ids(name: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(name)
        .expect("getpwnam")
        .unwrap_or_else(|| panic!("user {name:?} missing: run packaging/dev/setup.sh"));
    (u.uid.as_raw(), u.gid.as_raw())
}

impl Server {
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Self {
        let n = SERVERS.fetch_add(1, Ordering::SeqCst);
        let dir = tempfile::Builder::new()
            .prefix("moat-e2e.")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let state_dir = dir.path().join("state");
        let socket = dir.path().join("run/broker.sock");
        let log = dir.path().join("server.log");
        let build = build_dir();
        let (uid, gid) = user_ids("moat");
        let net_table = format!("moate2e_{}_{n}", std::process::id());
        let net_prefix = format!("me{}x{n}x", std::process::id() % 10000);
        let uid_count = 16;
        // uid_base + uid_count is the server's volume owner (VMs with volumes
        // run as it), so servers are spaced by one more.
        let uid_base = 1_910_000_000 + (std::process::id() % 5000) * 1000 + n * (uid_count + 1);
        let cgroup_parent = format!("moat-e2e-{}-{n}", std::process::id());
        let mut images = format!("base = \"{}\"\n", build.join("base.erofs").display());
        for (name, path) in &opts.extra_images {
            images.push_str(&format!("{name} = \"{}\"\n", path.display()));
        }
        let config = format!(
            r#"socket = "{socket}"
gateway_uid = {uid}
gateway_gid = {gid}
state_dir = "{state}"
[boot]
kernel = "{kernel}"
agent = "{agent}"
[images]
default = "base"
store = "{store}"
{pulls}
{images_extra}
[images.local]
{images}
[limits]
boot_timeout_secs = {boot}
max_sandboxes = {maxsb}
stop_timeout_secs = 10
max_command_timeout_secs = 600
max_calls_per_sandbox = {max_calls}
max_output_bytes = {max_output}
writable_disk_mib = {disk}
{limits_extra}
[testing]
agent_hooks = {hooks}
[jail]
development_unjailed = {unjailed}
[sandbox_ids]
base = {uid_base}
count = {uid_count}
[cgroups]
parent = "{cgroup_parent}"
[vmm]
backend = "{backend}"
{vmm_program}
[network]
table = "{net_table}"
iface_prefix = "{net_prefix}"
subnet = "{net_subnet}"
guard_forwarding = false
{network_extra}
[volumes]
owner_uid = {volume_owner}
owner_gid = {volume_owner}
{volumes_dir}
{volumes_extra}
[lifecycle]
{lifecycle}
{extra}
"#,
            lifecycle = if opts.lifecycle_toml.contains("stop_sandboxes_on_shutdown") {
                opts.lifecycle_toml.clone()
            } else {
                format!("stop_sandboxes_on_shutdown = true\n{}", opts.lifecycle_toml)
            },
            net_table = net_table,
            net_prefix = net_prefix,
            net_subnet = {
                // A /26 (16 sandboxes) of 10.128.0.0/9 per server.
                let block = (std::process::id() % 1000) * 32 + n % 32;
                std::net::Ipv4Addr::from(
                    u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + block * 64,
                )
                .to_string()
                    + "/26"
            },
            network_extra = opts.network_toml,
            volume_owner = uid_base + uid_count,
            volumes_dir = if opts
                .volumes_toml
                .lines()
                .any(|l| l.trim_start().starts_with("dir"))
            {
                String::new()
            } else {
                format!("dir = \"{}\"", dir.path().join("volumes").display())
            },
            volumes_extra = opts.volumes_toml,
            socket = socket.display(),
            state = state_dir.display(),
            kernel = build.join("vmlinux").display(),
            agent = build.join("moat-agent").display(),
            boot = opts.boot_timeout_secs,
            maxsb = opts.max_sandboxes,
            max_calls = opts.max_calls_per_sandbox,
            max_output = opts.max_output_bytes,
            hooks = opts.agent_test_hooks,
            disk = opts.writable_disk_mib,
            extra = opts.broker_toml,
            limits_extra = opts.limits_toml,
            store = if opts.private_store {
                dir.path().join("images")
            } else {
                fs::canonicalize(build.join("store")).unwrap_or_else(|_| build.join("store"))
            }
            .display(),
            images_extra = opts.images_toml,
            pulls = if opts.pulls {
                ""
            } else {
                "pull_on_start = false"
            },
            unjailed = opts.unjailed,
            backend = vmm_backend(),
            vmm_program = match (&opts.vmm_program, vmm_backend().as_str()) {
                (None, _) => String::new(),
                (Some(p), "libkrun") => format!("runner = \"{}\"", p.display()),
                (Some(p), _) => format!("qemu = \"{}\"", p.display()),
            },
        );
        let config_path = dir.path().join("broker.toml");
        fs::write(&config_path, config).expect("write config");
        // The gateway (as `moat`) must reach its socket: make the test dir
        // traversable.
        fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");

        let gateway_config = (opts.keys || !opts.gateway_toml.is_empty()).then(|| {
            let path = dir.path().join("gateway.toml");
            let text = format!(
                "{}\n[auth]\nsecret_file = \"{}\"\nrevocation_file = \"{}\"\nrevocation_poll_secs = 1\n",
                opts.gateway_toml,
                dir.path().join("gateway.secret").display(),
                dir.path().join("revoked-keys").display(),
            );
            fs::write(&path, text).expect("write gateway config");
            path
        });

        let port = free_port();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            // Shorter than the gateway's idle keep-alive limit
            // (timeouts.header_read_secs, 10 s): never reuse a connection
            // the gateway may be closing.
            .max_idle_age(Duration::from_secs(5))
            .build()
            .into();
        let mut server = Self {
            child: None,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            state_dir,
            socket,
            log,
            cgroup_parent,
            uid_base,
            uid_count,
            broker_config: config_path,
            gateway_config,
            net_table,
            net_prefix,
            port,
            keys: opts.keys,
            log_filter: opts.log_filter,
            agent,
        };
        server.spawn_supervisor();
        server.wait_healthy();
        server
    }

    /// Runs `moat server start` with this server's configs (log appended).
    fn spawn_supervisor(&mut self) {
        let logfile = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut command = Command::new(bin_dir().join("moat"));
        command.args(["server", "start"]);
        if !self.keys {
            command.arg("--dev");
        }
        if let Some(path) = &self.gateway_config {
            command.arg("--gateway-config").arg(path);
        }
        let child = command
            .args(["--port", &self.port.to_string(), "--broker-config"])
            .arg(&self.broker_config)
            .env("MOAT_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().expect("dup"))
            .stderr(logfile)
            .process_group(0)
            .spawn()
            .expect("spawn moat server start");
        self.child = Some(child);
    }

    /// Starts the stack again on the same state, configs and port, after
    /// [`Server::terminate`] (or after it exited).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "terminate the server first");
        self.spawn_supervisor();
        self.wait_healthy();
    }

    /// Pid of the running moat-broker.
    pub fn broker_pid(&self) -> Option<i32> {
        self.daemons()
            .into_iter()
            .find(|(_, _, name)| name == "moat-broker")
            .map(|(pid, _, _)| pid)
    }

    fn wait_healthy(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = self.get("/api/v1/health") {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!(
                        "moat server exited ({st}) before becoming healthy:\n{}",
                        self.log_text()
                    );
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!("moat server not healthy after 60 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `moat image ARGS --broker-config <this server's>`: (success,
    /// stdout, stderr).
    pub fn image_cli(&self, args: &[&str]) -> (bool, String, String) {
        self.cli("image", args)
    }

    /// Runs `moat sandbox ARGS --broker-config <this server's>`: (success,
    /// stdout, stderr).
    pub fn sandbox_cli(&self, args: &[&str]) -> (bool, String, String) {
        self.cli("sandbox", args)
    }

    fn cli(&self, group: &str, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(bin_dir().join("moat"))
            .arg(group)
            .args(args)
            .arg("--broker-config")
            .arg(&self.broker_config)
            .output()
            .unwrap_or_else(|e| panic!("run moat {group}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The gateway's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The first stdout line of a command run in sandbox `name` (namespace
    /// "default"); panics when it printed nothing.
    pub fn first_line(&self, name: &str, command: &str, args: &[&str]) -> String {
        let r = self.run(name, command, args);
        Self::stdout_lines(&r)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{command} printed nothing in {name}: {r}"))
    }

    /// The guest kernel's boot id: the same only if the guest did not reboot.
    pub fn boot_id(&self, name: &str) -> String {
        self.first_line(name, "cat", &["/proc/sys/kernel/random/boot_id"])
    }

    /// Everything the stack has logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, Value), String> {
        let mut resp = self
            .agent
            .get(format!("{}{path}", self.url))
            .call()
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_json::<Value>().unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// POST a raw JSON body to /api/v1/rpc: (status, body).
    pub fn post(&self, body: &Value) -> (u16, Value) {
        let mut resp = self
            .agent
            .post(format!("{}/api/v1/rpc", self.url))
            .send_json(body)
            .expect("POST /api/v1/rpc");
        let status = resp.status().as_u16();
        let mut text = String::new();
        resp.body_mut()
            .as_reader()
            .read_to_string(&mut text)
            .expect("read body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Any HTTP request to the gateway: `method` GET/POST/DELETE/OPTIONS,
    /// extra `headers`, an optional body (sent as `application/json`).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> HttpReply {
        let url = format!("{}{path}", self.url);
        let result = match body {
            Some(body) => {
                let mut req = match method {
                    "POST" => self.agent.post(&url),
                    "PUT" => self.agent.put(&url),
                    other => panic!("body with {other}"),
                }
                .header("content-type", "application/json");
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.send(body)
            }
            None => {
                let mut req = match method {
                    "GET" => self.agent.get(&url),
                    "DELETE" => self.agent.delete(&url),
                    "OPTIONS" => self.agent.options(&url),
                    other => panic!("no body with {other}"),
                };
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.call()
            }
        };
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect();
        let mut text = String::new();
        let _ = resp.body_mut().as_reader().read_to_string(&mut text);
        HttpReply {
            status,
            headers,
            body: text,
        }
    }

    /// POST a JSON body to /api/v1/rpc with `Authorization: Bearer key`.
    pub fn post_as(&self, key: &str, body: &Value) -> (u16, Value) {
        let auth = format!("Bearer {key}");
        let reply = self.request(
            "POST",
            "/api/v1/rpc",
            &[("authorization", &auth)],
            Some(&body.to_string()),
        );
        (reply.status, reply.json())
    }

    /// One JSON-RPC call with a key: (HTTP status, response object).
    pub fn rpc_as(&self, key: &str, method: &str, params: Value) -> (u16, Value) {
        self.post_as(
            key,
            &json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}),
        )
    }

    /// `moat server keygen` for `namespaces` with lifetime `expire` (90d…).
    pub fn keygen(&self, namespaces: &[&str], expire: &str) -> Key {
        let config = self
            .gateway_config
            .as_ref()
            .expect("keygen needs Options::keys");
        let mut cmd = Command::new(bin_dir().join("moat"));
        cmd.args([
            "server",
            "keygen",
            "--json",
            "--expire",
            expire,
            "--gateway-config",
        ])
        .arg(config);
        for ns in namespaces {
            cmd.args(["--namespace", ns]);
        }
        let out = cmd.output().expect("run moat server keygen");
        assert!(
            out.status.success(),
            "keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("keygen --json output");
        Key {
            token: v["key"].as_str().expect("key").to_string(),
            id: v["key_id"].as_str().expect("key_id").to_string(),
        }
    }

    /// `moat server revoke ID`.
    pub fn revoke(&self, key_id: &str) {
        let config = self
            .gateway_config
            .as_ref()
            .expect("revoke needs Options::keys");
        let out = Command::new(bin_dir().join("moat"))
            .args(["server", "revoke", key_id, "--gateway-config"])
            .arg(config)
            .output()
            .expect("run moat server revoke");
        assert!(
            out.status.success(),
            "revoke failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The gateway's signing secret file (keys mode).
    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("gateway.secret")
    }

    /// One JSON-RPC call: the whole response object.
    pub fn rpc(&self, method: &str, params: Value) -> Value {
        self.post(&json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}))
            .1
    }

    /// One JSON-RPC call that must succeed: its result.
    pub fn ok(&self, method: &str, params: Value) -> Value {
        let resp = self.rpc(method, params.clone());
        match resp.get("result") {
            Some(r) => r.clone(),
            None => panic!(
                "{method} {params} failed: {resp}\nserver log:\n{}",
                self.log_text()
            ),
        }
    }

    /// One JSON-RPC call that must fail: (code, message).
    pub fn err(&self, method: &str, params: Value) -> (i64, String) {
        let resp = self.rpc(method, params.clone());
        let e = resp
            .get("error")
            .unwrap_or_else(|| panic!("{method} {params} should fail: {resp}"));
        (
            e["code"].as_i64().unwrap_or_default(),
            e["message"].as_str().unwrap_or_default().to_string(),
        )
    }

    pub fn start_sandbox(&self, name: &str, config: Value) {
        let r = self.ok(
            "sandbox.start",
            json!({"sandbox": name, "namespace": "default", "config": config}),
        );
        assert_eq!(r, json!(format!("Sandbox {name} started successfully")));
    }

    pub fn stop_sandbox(&self, name: &str) {
        let r = self.ok(
            "sandbox.stop",
            json!({"sandbox": name, "namespace": "default"}),
        );
        assert_eq!(r, json!(format!("Sandbox {name} stopped successfully")));
    }

    /// `sandbox.repl.run` result.
    pub fn repl(&self, name: &str, language: &str, code: &str) -> Value {
        self.ok(
            "sandbox.repl.run",
            json!({"sandbox": name, "namespace": "default", "language": language, "code": code}),
        )
    }

    /// `sandbox.command.run` result.
    pub fn run(&self, name: &str, command: &str, args: &[&str]) -> Value {
        self.ok(
            "sandbox.command.run",
            json!({"sandbox": name, "namespace": "default", "command": command, "args": args}),
        )
    }

    /// The warm pools' figures from the gateway's `GET /metrics` (the
    /// server needs `[metrics] on_public_listener = true`): each
    /// `moat_pool_*` series by its name without the prefix ("ready",
    /// "hits_total", ...), summed over the pools.
    pub fn pool_metrics(&self) -> std::collections::BTreeMap<String, f64> {
        let text = self.request("GET", "/metrics", &[], None).body;
        let mut out = std::collections::BTreeMap::new();
        for l in text.lines().filter_map(|l| l.strip_prefix("moat_pool_")) {
            let Some((name, rest)) = l.split_once('{') else {
                continue;
            };
            if let Some(v) = rest
                .rsplit_once(' ')
                .and_then(|(_, v)| v.parse::<f64>().ok())
            {
                *out.entry(name.to_owned()).or_insert(0.0) += v;
            }
        }
        out
    }

    /// Waits (up to `limit`) until the pools hold `n` ready VMs.
    pub fn wait_pool_ready(&self, n: f64, limit: Duration) {
        let start = Instant::now();
        while self.pool_metrics().get("ready").copied().unwrap_or(0.0) < n {
            assert!(
                start.elapsed() < limit,
                "{n} pool VMs not ready within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stdout lines of a command result.
    pub fn stdout_lines(result: &Value) -> Vec<String> {
        lines_of(result, "stdout")
    }

    /// (pid, uid) of the VM processes (the VMMs themselves, QEMU or the
    /// libkrun runner, not the jailer waiting for them) running under this
    /// server's sandbox uids.
    pub fn vm_pids(&self) -> Vec<(i32, u32)> {
        self.sandbox_processes()
            .into_iter()
            .filter(|(pid, _)| {
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim_end() != "moat-jailer")
            })
            .collect()
    }

    /// (pid, uid) of every process running under this server's sandbox uids.
    pub fn sandbox_processes(&self) -> Vec<(i32, u32)> {
        processes_with_uids(self.uid_base..self.uid_base + self.uid_count + 1)
    }

    /// Sandbox cgroups that exist under this server's parent (any controller).
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for base in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/pids",
        ] {
            if let Ok(rd) = fs::read_dir(Path::new(base).join(&self.cgroup_parent)) {
                found.extend(rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
            }
        }
        found
    }

    /// Tap devices of this server that exist.
    pub fn taps(&self) -> Vec<String> {
        fs::read_dir("/sys/class/net")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&self.net_prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Jail roots that exist.
    pub fn jail_dirs(&self) -> Vec<PathBuf> {
        fs::read_dir(self.state_dir.join("jails"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Per-VM directories (disks, sockets) that exist.
    pub fn vm_dirs(&self) -> Vec<PathBuf> {
        fs::read_dir(self.state_dir.join("vms"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Asserts nothing of any sandbox remains on the host.
    pub fn assert_no_leftovers(&self) {
        // Processes may take a moment to be reaped after a stop's reply.
        let start = Instant::now();
        while !self.sandbox_processes().is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(self.sandbox_processes(), vec![], "VM processes left");
        assert_eq!(self.cgroups(), Vec::<PathBuf>::new(), "cgroups left");
        assert_eq!(self.vm_dirs(), Vec::<PathBuf>::new(), "VM directories left");
    }
}

/// A log line without its colour escapes (`ESC [ ... m`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Lines of one stream in a command/repl result.
pub fn lines_of(result: &Value, stream: &str) -> Vec<String> {
    result["output"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["stream"] == stream)
                .map(|l| l["text"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// (pid, uid) of every process whose real uid is in `uids`.
pub fn processes_with_uids(uids: std::ops::Range<u32>) -> Vec<(i32, u32)> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok());
        if let Some(uid) = uid {
            if uids.contains(&uid) {
                out.push((pid, uid));
            }
        }
    }
    out.sort_unstable();
    out
}

/// (memory limit bytes, CPU quota as a fraction of one CPU) of the cgroup
/// `pid` is in, read from the host's cgroupfs (v1 or v2).
pub fn cgroup_limits(pid: i32) -> (u64, f64) {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/pid/cgroup");
    let path_for = |controller: &str| {
        text.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
    };
    let read = |p: String| {
        fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .trim()
            .to_string()
    };
    if let Some(mem) = path_for("memory") {
        let limit = read(format!("/sys/fs/cgroup/memory{mem}/memory.limit_in_bytes"));
        let cpu = path_for("cpu").expect("cpu cgroup");
        let quota: f64 = read(format!("/sys/fs/cgroup/cpu{cpu}/cpu.cfs_quota_us"))
            .parse()
            .unwrap();
        let period: f64 = read(format!("/sys/fs/cgroup/cpu{cpu}/cpu.cfs_period_us"))
            .parse()
            .unwrap();
        (limit.parse().unwrap(), quota / period)
    } else {
        let path = path_for("").expect("v2 cgroup line");
        let limit = read(format!("/sys/fs/cgroup{path}/memory.max"));
        let cpu = read(format!("/sys/fs/cgroup{path}/cpu.max"));
        let mut it = cpu
            .split_whitespace()
            .map(|v| v.parse::<f64>().unwrap_or(f64::INFINITY));
        let (q, p) = (it.next().unwrap(), it.next().unwrap());
        (limit.parse().unwrap(), q / p)
    }
}

/// Peak resident set (VmHWM) of a process, KiB.
pub fn peak_rss_kib(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

impl Server {
    /// Pid of the `moat server start` supervisor.
    pub fn supervisor_pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// (pid, uid, name) of the supervisor's children (broker, gateway).
    pub fn daemons(&self) -> Vec<(i32, u32, String)> {
        let Some(sup) = self.supervisor_pid() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(status) = fs::read_to_string(e.path().join("status")) else {
                continue;
            };
            let field = |k: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(k))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .map(str::to_string)
            };
            if field("PPid:").and_then(|p| p.parse::<i32>().ok()) == Some(sup)
                && field("State:").as_deref() != Some("Z")
            {
                let uid = field("Uid:")
                    .and_then(|u| u.parse().ok())
                    .unwrap_or(u32::MAX);
                out.push((pid, uid, field("Name:").unwrap_or_default()));
            }
        }
        out
    }

    /// Pid of the running moat-gateway.
    pub fn gateway_pid(&self) -> Option<i32> {
        self.daemons()
            .into_iter()
            .find(|(_, _, name)| name == "moat-gateway")
            .map(|(pid, _, _)| pid)
    }

    /// Waits up to `limit` for the supervisor to exit on its own (it is not
    /// signalled): its status, or `None` when it is still running then.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM to the supervisor and waits for it to exit.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(60) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // A suite that left VMs running for a next broker (or failed
        // midway) must not leave them, or their firewall table, behind.
        for (pid, _) in self.sandbox_processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.net_table])
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(200));
        for cg in self.cgroups() {
            let _ = fs::remove_dir(cg);
        }
        for base in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/cpuacct",
            "/sys/fs/cgroup/pids",
        ] {
            let _ = fs::remove_dir(Path::new(base).join(&self.cgroup_parent));
        }
    }
}

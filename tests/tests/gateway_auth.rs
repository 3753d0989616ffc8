//! Gateway authentication and tenancy against the real stack started with
//! API keys (`moat server start` without `--dev`): keys from `moat server
//! keygen`, revocation with `moat server revoke`, every bad key refused with
//! 401/-32002, a key used outside its namespaces refused with 403/-32002
//! naming the namespace, and a `*` key seeing every namespace.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use moat_e2e::{bin_dir, Options, Server};
use serde_json::{json, Value};

fn keyed() -> Server {
    Server::start_with(Options {
        keys: true,
        ..Options::default()
    })
}

fn metrics(ns: &str) -> Value {
    json!({"jsonrpc": "2.0", "method": "sandbox.metrics.get", "params": {"namespace": ns}, "id": 1})
}

fn assert_refused(s: &Server, auth: Option<&str>, expect: u16, needle: &str) {
    let headers: Vec<(&str, &str)> = auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
    let r = s.request(
        "POST",
        "/api/v1/rpc",
        &headers,
        Some(&metrics("a").to_string()),
    );
    let v = r.json();
    assert_eq!(r.status, expect, "{auth:?}: {}", r.body);
    assert_eq!(v["error"]["code"], -32002, "{auth:?}: {v}");
    assert_eq!(v["jsonrpc"], "2.0");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{auth:?}: {needle:?} not in {message:?}"
    );
}

#[test]
fn every_bad_key_is_refused_with_401() {
    let s = keyed();
    let good = s.keygen(&["a"], "1h");
    let bearer = |t: &str| format!("Bearer {t}");
    let (status, v) = s.post_as(&good.token, &metrics("a"));
    assert_eq!(status, 200, "a good key works: {v}");

    // No key, malformed keys.
    assert_refused(&s, None, 401, "authentication required");
    assert_refused(&s, Some("Bearer not.a.key"), 401, "invalid API key");
    assert_refused(&s, Some("Token abc"), 401, "malformed");
    let mangled = format!("{}x", &good.token[..good.token.len() - 2]);
    assert_refused(&s, Some(&bearer(&mangled)), 401, "invalid API key");

    // alg: none, with claims that would otherwise be fine.
    let b64 = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = b64(&format!(
        r#"{{"jti":"{}","iat":0,"exp":{exp},"namespaces":["*"]}}"#,
        good.id
    ));
    let none = format!("{}.{claims}.", b64(r#"{"alg":"none","typ":"JWT"}"#));
    assert_refused(&s, Some(&bearer(&none)), 401, "algorithm \"none\"");
    // The good key's signature under another algorithm name.
    let sig = good.token.rsplit('.').next().unwrap();
    let hs512 = format!("{}.{claims}.{sig}", b64(r#"{"alg":"HS512","typ":"JWT"}"#));
    assert_refused(&s, Some(&bearer(&hs512)), 401, "HS512");

    // Signed with another secret: keygen pointed at a secret of our own.
    let foreign = s.dir.path().join("foreign.secret");
    std::fs::write(&foreign, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(bin_dir().join("moat"))
        .args([
            "server",
            "keygen",
            "--namespace",
            "*",
            "--expire",
            "1h",
            "--secret-file",
        ])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let foreign_key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_refused(
        &s,
        Some(&bearer(&foreign_key)),
        401,
        "signature does not verify",
    );

    // Expired.
    let short = s.keygen(&["a"], "1s");
    std::thread::sleep(Duration::from_millis(2100));
    assert_refused(&s, Some(&bearer(&short.token)), 401, "expired");

    // Revoked, without a restart.
    s.revoke(&good.id);
    let start = Instant::now();
    loop {
        let (status, _) = s.post_as(&good.token, &metrics("a"));
        if status == 401 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still accepted after revoke"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_refused(&s, Some(&bearer(&good.token)), 401, "revoked");
    // MCP is behind the same check.
    let r = s.request(
        "POST",
        "/mcp",
        &[("authorization", &bearer(&good.token))],
        Some("{}"),
    );
    assert_eq!(r.status, 401);
}

#[test]
fn keys_are_confined_to_their_namespaces_and_star_sees_all() {
    let s = keyed();
    let a = s.keygen(&["team-a"], "1h");
    let b = s.keygen(&["team-b", "team-c"], "1h");
    let star = s.keygen(&["*"], "1h");

    // A on B: 403 naming B, before anything reaches the broker.
    for (method, params) in [
        (
            "sandbox.start",
            json!({"sandbox": "x", "namespace": "team-b", "config": {"memory": 128}}),
        ),
        (
            "sandbox.stop",
            json!({"sandbox": "x", "namespace": "team-b"}),
        ),
        (
            "sandbox.command.run",
            json!({"sandbox": "x", "namespace": "team-b", "command": "true"}),
        ),
        (
            "sandbox.repl.run",
            json!({"sandbox": "x", "namespace": "team-b", "language": "python", "code": "1"}),
        ),
        ("sandbox.metrics.get", json!({"namespace": "team-b"})),
    ] {
        let (status, v) = s.rpc_as(&a.token, method, params);
        assert_eq!(status, 403, "{method}: {v}");
        assert_eq!(v["error"]["code"], -32002, "{method}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("\"team-b\""),
            "{method}: {v}"
        );
    }
    assert!(s.vm_pids().is_empty());

    // One sandbox in team-a and one in team-b (started and stopped: they
    // stay defined and are listed with running: false).
    for (key, ns, name) in [(&a, "team-a", "conf-a"), (&b, "team-b", "conf-b")] {
        let (status, v) = s.rpc_as(
            &key.token,
            "sandbox.start",
            json!({"sandbox": name, "namespace": ns, "config": {"memory": 128}}),
        );
        assert_eq!(status, 200, "{v}\n{}", s.log_text());
        let (status, v) = s.rpc_as(
            &key.token,
            "sandbox.stop",
            json!({"sandbox": name, "namespace": ns}),
        );
        assert_eq!(status, 200, "{v}");
    }
    let names = |key: &str, ns: &str| -> Vec<String> {
        let (status, v) = s.rpc_as(key, "sandbox.metrics.get", json!({"namespace": ns}));
        assert_eq!(status, 200, "{v}");
        let mut n: Vec<String> = v["result"]["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "{}/{}",
                    m["namespace"].as_str().unwrap(),
                    m["name"].as_str().unwrap()
                )
            })
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&a.token, "*"), ["team-a/conf-a"]);
    assert_eq!(names(&b.token, "*"), ["team-b/conf-b"]);
    assert_eq!(names(&star.token, "*"), ["team-a/conf-a", "team-b/conf-b"]);
    assert_eq!(names(&star.token, "team-b"), ["team-b/conf-b"]);
    s.assert_no_leftovers();

    // The broker saw who asked: its audit names the key ids.
    let log = s.log_text();
    assert!(
        log.contains(&a.id) && log.contains(&b.id),
        "key ids in the logs"
    );
}

#[test]
fn the_secret_is_private_to_the_gateway_user_and_never_logged() {
    let s = keyed();
    let secret = s.secret_file();
    let meta = std::fs::metadata(&secret).expect("secret created at first start");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let moat = nix::unistd::User::from_name("moat").unwrap().unwrap();
    assert_eq!(meta.uid(), moat.uid.as_raw());
    let text = std::fs::read_to_string(&secret).unwrap();
    assert_eq!(text.trim().len(), 64);
    assert!(!s.log_text().contains(text.trim()), "secret in the logs");
    // Neither daemon has it on its command line.
    for (pid, _, _) in s.daemons() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains(text.trim()));
    }
    // A restart keeps the same secret (keys stay valid).
    let key = s.keygen(&["a"], "1h");
    assert_eq!(s.post_as(&key.token, &metrics("a")).0, 200);
}

#[test]
fn dev_mode_refuses_a_non_loopback_address() {
    let out = Command::new(bin_dir().join("moat"))
        .args([
            "server",
            "start",
            "--dev",
            "--host",
            "0.0.0.0",
            "--broker-config",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback"), "{err}");
}

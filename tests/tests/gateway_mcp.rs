//! MCP at `/mcp` against the real stack with API keys: the official MCP
//! inspector CLI (npm `@modelcontextprotocol/inspector`, installed by
//! `packaging/dev/setup.sh` under /var/cache/moat/npm, or `MOAT_MCP_INSPECTOR`)
//! lists the five tools and two prompts and runs a command in a real
//! sandbox (one VM); and the streamable HTTP rules over real HTTP: version
//! negotiation, sessions, 202 for notifications, GET 405, DELETE, Origin.

use std::path::PathBuf;
use std::process::Command;

use moat_e2e::{Options, Server};
use serde_json::{json, Value};

fn inspector() -> PathBuf {
    let path = std::env::var_os("MOAT_MCP_INSPECTOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/moat/npm/node_modules/.bin/mcp-inspector"));
    assert!(
        path.exists(),
        "{} missing: run packaging/dev/setup.sh (it installs the MCP inspector)",
        path.display()
    );
    path
}

fn keyed() -> Server {
    Server::start_with(Options {
        keys: true,
        ..Options::default()
    })
}

/// Runs the inspector CLI against the server's /mcp with `key`; its JSON.
fn run_inspector(s: &Server, key: &str, args: &[&str]) -> Value {
    inspect(s, key, args, true)
}

/// As [`run_inspector`]; `ok` says whether the CLI must exit 0 (it exits 1
/// after printing a tool result with `isError: true`).
fn inspect(s: &Server, key: &str, args: &[&str], ok: bool) -> Value {
    let home = s.dir.path().join("inspector-home");
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(inspector())
        .arg("--cli")
        .arg(format!("{}/mcp", s.url))
        .args(["--transport", "http", "--header"])
        .arg(format!("Authorization: Bearer {key}"))
        .args(args)
        .env("HOME", &home)
        .env("MCP_CATALOG_PATH", home.join("mcp.json"))
        .output()
        .expect("run the MCP inspector");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.success(),
        ok,
        "inspector {args:?}: {}\n{stdout}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log_text()
    );
    // The result is the last JSON document printed (after any notice).
    let start = stdout
        .rfind("\n{")
        .map(|i| i + 1)
        .or_else(|| stdout.find('{'))
        .unwrap_or_else(|| panic!("no JSON in: {stdout}"));
    serde_json::from_str(&stdout[start..]).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn the_mcp_inspector_lists_tools_and_prompts_and_runs_a_command() {
    let s = keyed();
    let key = s.keygen(&["default"], "1h").token;

    let tools = run_inspector(&s, &key, &["--method", "tools/list"]);
    let names: Vec<&str> = tools["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{tools}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "sandbox_start",
            "sandbox_stop",
            "sandbox_run_code",
            "sandbox_run_command",
            "sandbox_get_metrics"
        ]
    );

    let prompts = run_inspector(&s, &key, &["--method", "prompts/list"]);
    let names: Vec<&str> = prompts["prompts"]
        .as_array()
        .unwrap_or_else(|| panic!("{prompts}"))
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["create_python_sandbox", "create_node_sandbox"]);

    let prompt = run_inspector(
        &s,
        &key,
        &[
            "--method",
            "prompts/get",
            "--prompt-name",
            "create_python_sandbox",
            "--prompt-args",
            "sandbox_name=mcp-py",
        ],
    );
    assert!(
        prompt["messages"][0]["content"]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("mcp-py"),
        "{prompt}"
    );

    // A real sandbox, then the inspector runs a command in it.
    let (status, v) = s.rpc_as(
        &key,
        "sandbox.start",
        json!({"sandbox": "mcp-one", "namespace": "default", "config": {"memory": 256}}),
    );
    assert_eq!(status, 200, "{v}\n{}", s.log_text());
    let result = run_inspector(
        &s,
        &key,
        &[
            "--method",
            "tools/call",
            "--tool-name",
            "sandbox_run_command",
            "--tool-arg",
            "sandbox=mcp-one",
            "--tool-arg",
            "namespace=default",
            "--tool-arg",
            "command=uname",
        ],
    );
    assert_eq!(result["isError"], false, "{result}");
    assert_eq!(result["structuredContent"]["exit_code"], 0, "{result}");
    assert_eq!(
        result["structuredContent"]["output"][0]["text"], "Linux",
        "{result}"
    );
    assert!(
        result["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Linux"),
        "{result}"
    );

    // A failing operation is a tool result the model can read.
    let result = inspect(
        &s,
        &key,
        &[
            "--method",
            "tools/call",
            "--tool-name",
            "sandbox_run_command",
            "--tool-arg",
            "sandbox=not-started",
            "--tool-arg",
            "namespace=default",
            "--tool-arg",
            "command=uname",
        ],
        false,
    );
    assert_eq!(result["isError"], true, "{result}");
    assert!(
        result["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("not running"),
        "{result}"
    );

    let (_, v) = s.rpc_as(
        &key,
        "sandbox.stop",
        json!({"sandbox": "mcp-one", "namespace": "default"}),
    );
    assert_eq!(v["result"], "Sandbox mcp-one stopped successfully");
    s.assert_no_leftovers();
}

fn mcp(
    s: &Server,
    key: &str,
    session: Option<&str>,
    extra: &[(&str, &str)],
    body: &Value,
) -> moat_e2e::HttpReply {
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("accept", "application/json, text/event-stream"),
    ];
    if let Some(id) = session {
        headers.push(("mcp-session-id", id));
    }
    headers.extend_from_slice(extra);
    s.request("POST", "/mcp", &headers, Some(&body.to_string()))
}

fn init(version: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
           "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "e2e", "version": "0"}}})
}

#[test]
fn streamable_http_rules_over_real_http() {
    let s = keyed();
    let key = s.keygen(&["default"], "1h").token;

    // Version negotiation.
    for (asked, got) in [
        ("2025-11-25", "2025-11-25"),
        ("2025-06-18", "2025-06-18"),
        ("2025-03-26", "2025-03-26"),
        ("2024-11-05", "2024-11-05"),
        ("2099-12-31", "2025-11-25"),
    ] {
        let r = mcp(&s, &key, None, &[], &init(asked));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["result"]["protocolVersion"], got, "{asked}");
        assert!(r.header("mcp-session-id").is_some());
    }

    let r = mcp(&s, &key, None, &[], &init("2025-06-18"));
    let session = r.header("mcp-session-id").unwrap().to_string();
    let v = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let r = mcp(
        &s,
        &key,
        Some(&session),
        &[("mcp-protocol-version", "2025-06-18")],
        &v,
    );
    assert_eq!((r.status, r.body.as_str()), (202, ""));

    let ping = json!({"jsonrpc": "2.0", "id": 2, "method": "ping"});
    let r = mcp(
        &s,
        &key,
        Some(&session),
        &[("mcp-protocol-version", "2025-06-18")],
        &ping,
    );
    assert_eq!(r.json(), json!({"jsonrpc": "2.0", "id": 2, "result": {}}));
    assert_eq!(mcp(&s, &key, None, &[], &ping).status, 400, "no session");
    assert_eq!(
        mcp(&s, &key, Some("bogus"), &[], &ping).status,
        404,
        "unknown session"
    );

    // 2025-06-18 sessions see output schemas; 2024-11-05 ones do not.
    let tools = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"});
    let v = mcp(&s, &key, Some(&session), &[], &tools).json();
    assert!(v["result"]["tools"][0]["outputSchema"].is_object(), "{v}");
    let old = mcp(&s, &key, None, &[], &init("2024-11-05"))
        .header("mcp-session-id")
        .unwrap()
        .to_string();
    let v = mcp(&s, &key, Some(&old), &[], &tools).json();
    assert!(v["result"]["tools"][0].get("outputSchema").is_none(), "{v}");

    // Bad arguments: -32602. Another namespace: 403.
    let call = |args: Value| json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "sandbox_stop", "arguments": args}});
    let v = mcp(
        &s,
        &key,
        Some(&session),
        &[],
        &call(json!({"sandbox": "x"})),
    )
    .json();
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let r = mcp(
        &s,
        &key,
        Some(&session),
        &[],
        &call(json!({"sandbox": "x", "namespace": "other"})),
    );
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (403, json!(-32002))
    );

    // GET: 405. Origin from elsewhere: 403. DELETE ends the session.
    let auth = format!("Bearer {key}");
    let r = s.request(
        "GET",
        "/mcp",
        &[("authorization", &auth), ("accept", "text/event-stream")],
        None,
    );
    assert_eq!(r.status, 405);
    let r = mcp(
        &s,
        &key,
        None,
        &[("origin", "http://evil.example")],
        &init("2025-11-25"),
    );
    assert_eq!(r.status, 403);
    let r = s.request(
        "DELETE",
        "/mcp",
        &[("authorization", &auth), ("mcp-session-id", &session)],
        None,
    );
    assert_eq!(r.status, 204);
    assert_eq!(mcp(&s, &key, Some(&session), &[], &ping).status, 404);
}

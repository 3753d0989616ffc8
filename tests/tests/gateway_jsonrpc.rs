//! Gateway JSON-RPC 2.0 against the real stack, with an API key: the
//! JSON-RPC specification's examples (adapted to moat's methods) each get
//! exactly the specification's response, and `sandbox.metrics.get` reports
//! a real sandbox running and then stopped (one VM).

use moat_e2e::{Options, Server};
use serde_json::{json, Value};

fn keyed() -> (Server, String) {
    let s = Server::start_with(Options {
        keys: true,
        ..Options::default()
    });
    let key = s.keygen(&["*"], "1h").token;
    (s, key)
}

fn raw(s: &Server, key: &str, body: &str) -> (u16, Value, String) {
    let auth = format!("Bearer {key}");
    let r = s.request(
        "POST",
        "/api/v1/rpc",
        &[("authorization", &auth)],
        Some(body),
    );
    (r.status, r.json(), r.body)
}

fn code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error: {v}"))
}

#[test]
fn the_specification_examples_get_the_specification_responses() {
    let (s, key) = keyed();

    // rpc call with invalid JSON.
    let (status, v, _) = raw(
        &s,
        &key,
        r#"{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]"#,
    );
    assert_eq!(
        (status, code(&v), v["id"].clone()),
        (200, -32700, Value::Null),
        "{v}"
    );
    assert_eq!(v["jsonrpc"], "2.0");

    // rpc call with invalid Request object.
    let (status, v, _) = raw(
        &s,
        &key,
        r#"{"jsonrpc": "2.0", "method": 1, "params": "bar"}"#,
    );
    assert_eq!(
        (status, code(&v), v["id"].clone()),
        (200, -32600, Value::Null),
        "{v}"
    );

    // rpc call Batch, invalid JSON.
    let (_, v, _) = raw(
        &s,
        &key,
        r#"[ {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"}, {"jsonrpc": "2.0", "method" ]"#,
    );
    assert_eq!((code(&v), v["id"].clone()), (-32700, Value::Null), "{v}");

    // rpc call with an empty Array: one error object, not an array.
    let (status, v, _) = raw(&s, &key, "[]");
    assert!(v.is_object(), "{v}");
    assert_eq!(
        (status, code(&v), v["id"].clone()),
        (200, -32600, Value::Null)
    );

    // rpc call with an invalid Batch (but not empty).
    let (_, v, _) = raw(&s, &key, "[1]");
    let a = v.as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(a.len(), 1);
    assert_eq!((code(&a[0]), a[0]["id"].clone()), (-32600, Value::Null));

    // rpc call with invalid Batch.
    let (_, v, _) = raw(&s, &key, "[1,2,3]");
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 3);
    assert!(
        a.iter().all(|e| code(e) == -32600 && e["id"].is_null()),
        "{v}"
    );

    // rpc call Batch (mixed): valid call, notification, invalid, unknown method.
    let batch = json!([
        {"jsonrpc": "2.0", "method": "sandbox.metrics.get", "params": {"namespace": "nobody-here"}, "id": "1"},
        {"jsonrpc": "2.0", "method": "sandbox.metrics.get", "params": {"namespace": "x"}},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "sandbox.stop", "params": {"sandbox": "nope", "namespace": "default"}, "id": 9}
    ]);
    let (status, v, _) = raw(&s, &key, &batch.to_string());
    assert_eq!(status, 200);
    let a = v.as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(a.len(), 4, "the notification gets no answer: {v}");
    assert_eq!(
        a[0],
        json!({"jsonrpc": "2.0", "result": {"sandboxes": []}, "id": "1"})
    );
    assert_eq!((code(&a[1]), a[1]["id"].clone()), (-32600, Value::Null));
    assert_eq!((code(&a[2]), a[2]["id"].clone()), (-32601, json!("5")));
    assert_eq!(
        (code(&a[3]), a[3]["id"].clone()),
        (-32003, json!(9)),
        "stop of a sandbox that is not running"
    );

    // rpc call Batch (all notifications): nothing at all.
    let notes = json!([
        {"jsonrpc": "2.0", "method": "sandbox.metrics.get", "params": {"namespace": "a"}},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}
    ]);
    let (status, _, body) = raw(&s, &key, &notes.to_string());
    assert_eq!((status, body.as_str()), (204, ""));

    // rpc call of non-existent method.
    let (status, v, _) = raw(
        &s,
        &key,
        r#"{"jsonrpc": "2.0", "method": "foobar", "id": "1"}"#,
    );
    assert_eq!(
        (status, code(&v), v["id"].clone()),
        (200, -32601, json!("1"))
    );

    // params of the wrong type: positional (array) params, and a field of
    // the wrong type, are invalid params; a scalar is not a valid Request.
    let (_, v, _) = raw(
        &s,
        &key,
        r#"{"jsonrpc": "2.0", "method": "sandbox.stop", "params": ["a", "b"], "id": 2}"#,
    );
    assert_eq!((code(&v), v["id"].clone()), (-32602, json!(2)));
    let (_, v, _) = raw(
        &s,
        &key,
        r#"{"jsonrpc": "2.0", "method": "sandbox.metrics.get", "params": {"namespace": 5}, "id": 3}"#,
    );
    assert_eq!((code(&v), v["id"].clone()), (-32602, json!(3)));
    let (_, v, _) = raw(
        &s,
        &key,
        r#"{"jsonrpc": "2.0", "method": "sandbox.stop", "params": "bar", "id": 4}"#,
    );
    assert_eq!((code(&v), v["id"].clone()), (-32600, json!(4)));

    // ids keep their type.
    for id in [json!(7), json!("seven"), json!(7.5), Value::Null] {
        let (_, v, _) = raw(
            &s,
            &key,
            &json!({"jsonrpc": "2.0", "method": "x", "id": id}).to_string(),
        );
        assert_eq!(v["id"], id);
    }
}

#[test]
fn metrics_report_a_real_sandbox_running_then_stopped() {
    let (s, key) = keyed();
    let (status, v) = s.rpc_as(
        &key,
        "sandbox.start",
        json!({"sandbox": "gw-metrics", "namespace": "default", "config": {"memory": 256}}),
    );
    assert_eq!(status, 200, "{v}\n{}", s.log_text());
    assert_eq!(v["result"], "Sandbox gw-metrics started successfully");

    let (status, v) = s.rpc_as(
        &key,
        "sandbox.metrics.get",
        json!({"namespace": "default", "sandbox": "gw-metrics"}),
    );
    assert_eq!(status, 200, "{v}");
    let list = v["result"]["sandboxes"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(list.len(), 1, "{v}");
    let m = &list[0];
    assert_eq!(
        (
            m["namespace"].as_str(),
            m["name"].as_str(),
            m["running"].as_bool()
        ),
        (Some("default"), Some("gw-metrics"), Some(true)),
        "{v}"
    );
    for field in ["cpu_usage", "memory_usage", "disk_usage"] {
        assert!(m[field].is_number() || m[field].is_null(), "{field}: {v}");
    }
    assert!(
        m["memory_usage"].as_f64().is_some_and(|mib| mib > 0.0),
        "memory of a running VM is known: {v}"
    );

    // "*" with a "*" key: every namespace.
    let (_, v) = s.rpc_as(&key, "sandbox.metrics.get", json!({"namespace": "*"}));
    assert!(
        v["result"]["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "gw-metrics"),
        "{v}"
    );

    let (_, v) = s.rpc_as(
        &key,
        "sandbox.stop",
        json!({"sandbox": "gw-metrics", "namespace": "default"}),
    );
    assert_eq!(
        v["result"], "Sandbox gw-metrics stopped successfully",
        "{v}"
    );
    let (_, v) = s.rpc_as(&key, "sandbox.metrics.get", json!({"namespace": "default"}));
    let list = v["result"]["sandboxes"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    let m = list
        .iter()
        .find(|m| m["name"] == "gw-metrics")
        .unwrap_or_else(|| panic!("defined sandbox listed: {v}"));
    assert_eq!(m["running"], false, "{v}");
    s.assert_no_leftovers();
}

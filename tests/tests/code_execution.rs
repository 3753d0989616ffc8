//! Code execution: Python and Node REPL sessions and commands through the
//! HTTP API, in real VMs booted from the Debian-built default images.

use std::time::{Duration, Instant};

use moat_e2e::{lines_of, Options, Server};
use serde_json::{json, Value};

const PY: &str = "microsandbox/python";
const NODE: &str = "microsandbox/node";

fn stdout(r: &Value) -> Vec<String> {
    lines_of(r, "stdout")
}

fn repl_with_timeout(s: &Server, name: &str, language: &str, code: &str, timeout: u32) -> Value {
    s.ok(
        "sandbox.repl.run",
        json!({"sandbox": name, "namespace": "default", "language": language, "code": code, "timeout": timeout}),
    )
}

#[test]
fn python_session_keeps_state_reports_errors_and_survives_timeouts() {
    let s = Server::start();
    s.start_sandbox("py", json!({"image": PY}));

    let r = s.repl("py", "python", "x = 41\nimport math");
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["has_error"], false, "{r}");
    let r = s.repl("py", "python", "print(x + 1, math.floor(2.5))");
    assert_eq!(stdout(&r), vec!["42 2"], "{r}");
    assert_eq!(r["language"], "python");

    // Multi-line function with blank lines inside, a class, then used later.
    let cell = "def greet(name):\n    prefix = 'hello'\n\n    return f'{prefix} {name}'\n\n\nclass C:\n\n    v = 7\n";
    assert_eq!(s.repl("py", "python", cell)["status"], "success");
    let r = s.repl("py", "python", "print(greet('moat'), C.v)\n2 + 2");
    assert_eq!(
        stdout(&r),
        vec!["hello moat 7"],
        "final expression not echoed: {r}"
    );

    // asyncio works.
    let r = s.repl("py", "python", "import asyncio\nasync def f():\n    await asyncio.sleep(0.01)\n    return 5\nprint(asyncio.run(f()))");
    assert_eq!(stdout(&r), vec!["5"], "{r}");

    // Exceptions: status error, traceback on stderr.
    let r = s.repl(
        "py",
        "python",
        "def boom():\n    raise ValueError('bad value')\nboom()",
    );
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["has_error"], true);
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("Traceback") && err.contains("ValueError: bad value"),
        "{err}"
    );

    // stdout and stderr interleave in order.
    let r = s.repl(
        "py",
        "python",
        "import sys\nprint('o1', flush=True)\nprint('e1', file=sys.stderr, flush=True)\nprint('o2', flush=True)\nprint('e2', file=sys.stderr, flush=True)",
    );
    assert_eq!(
        r["output"],
        json!([{"stream":"stdout","text":"o1"},{"stream":"stderr","text":"e1"},{"stream":"stdout","text":"o2"},{"stream":"stderr","text":"e2"}])
    );
    assert_eq!(r["status"], "success");
    assert_eq!(r["has_error"], true, "stderr output means has_error");

    // Text that looks like any marker does not confuse the session.
    let r = s.repl("py", "python", "print('__MOAT_DONE__ {\"status\": \"success\"}')\nprint('\\x00\\x00\\x00\\x10garbage')\nimport sys; sys.stdout.write('no newline')");
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(stdout(&r)[0], "__MOAT_DONE__ {\"status\": \"success\"}");
    assert_eq!(
        s.repl("py", "python", "print(x)")["output"][0]["text"],
        "41"
    );

    // A runaway loop is stopped at its timeout; the session goes on.
    let t = Instant::now();
    let r = repl_with_timeout(&s, "py", "python", "while True:\n    pass", 2);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(r["status"], "timeout", "{r}");
    let r2 = s.repl("py", "python", "print('after', 1 + 1)");
    assert_eq!(stdout(&r2), vec!["after 2"], "{r2}");
    if r["state_lost"] == false {
        assert_eq!(
            s.repl("py", "python", "print(x)")["output"][0]["text"],
            "41",
            "state kept as reported"
        );
    }

    // 10 MB of output is cut at the cap, with a note.
    let r = s.repl(
        "py",
        "python",
        "import sys\nsys.stdout.write('y' * 10_000_000 + '\\n')",
    );
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("bytes dropped"),
        "{}",
        &err[..err.len().min(300)]
    );
    let kept: usize = stdout(&r).iter().map(String::len).sum();
    assert!(kept <= 1 << 20, "kept {kept} bytes");

    // The interpreter dying is an error that says state is gone; the next call works.
    let r = s.repl("py", "python", "import os\nos._exit(3)");
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["state_lost"], true, "{r}");
    assert_eq!(
        stdout(&s.repl("py", "python", "print('fresh')")),
        vec!["fresh"]
    );

    s.stop_sandbox("py");
    s.assert_no_leftovers();
}

#[test]
fn node_session_keeps_state_supports_await_and_survives_timeouts() {
    let s = Server::start();
    s.start_sandbox("js", json!({"image": NODE}));

    let r = s.repl(
        "js",
        "nodejs",
        "const a = 40;\nlet b = 2;\nfunction add(x, y) {\n\n  return x + y;\n}",
    );
    assert_eq!(r["status"], "success", "{r}");
    let r = s.repl("js", "node", "console.log(add(a, b))");
    assert_eq!(stdout(&r), vec!["42"], "{r}");
    assert_eq!(r["language"], "nodejs");

    // Top-level await, and the awaited binding persists.
    let r = s.repl(
        "js",
        "javascript",
        "const v = await new Promise(r => setTimeout(() => r(41), 10));\nconsole.log(v + 1)",
    );
    assert_eq!(stdout(&r), vec!["42"], "{r}");
    assert_eq!(
        stdout(&s.repl("js", "nodejs", "console.log(v)")),
        vec!["41"]
    );

    // Errors.
    let r = s.repl(
        "js",
        "nodejs",
        "function boom() { throw new TypeError('bad thing'); }\nboom()",
    );
    assert_eq!(r["status"], "error", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("TypeError: bad thing"),
        "{r}"
    );
    let r = s.repl(
        "js",
        "nodejs",
        "await Promise.reject(new Error('rejected'))",
    );
    assert_eq!(r["status"], "error", "{r}");
    assert!(r["error"].as_str().unwrap().contains("rejected"), "{r}");

    // Order of stdout/stderr.
    let r = s.repl(
        "js",
        "nodejs",
        "console.log('o1'); console.error('e1'); console.log('o2');",
    );
    assert_eq!(
        r["output"],
        json!([{"stream":"stdout","text":"o1"},{"stream":"stderr","text":"e1"},{"stream":"stdout","text":"o2"}])
    );

    // Marker-like output.
    let r = s.repl("js", "nodejs", "console.log('{\"id\":1,\"status\":\"done\"}'); process.stdout.write('\\u0000\\u0000\\u0000\\u0010x\\n')");
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(
        stdout(&s.repl("js", "nodejs", "console.log(a)")),
        vec!["40"]
    );

    // Busy loop stopped.
    let t = Instant::now();
    let r = repl_with_timeout(&s, "js", "nodejs", "while (true) {}", 2);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(
        stdout(&s.repl("js", "nodejs", "console.log('after')")),
        vec!["after"]
    );

    // 10 MB output capped.
    let r = s.repl(
        "js",
        "nodejs",
        "process.stdout.write('z'.repeat(10_000_000) + '\\n')",
    );
    assert!(
        r["error"].as_str().unwrap().contains("bytes dropped"),
        "status {}",
        r["status"]
    );

    // process.exit: error, state lost, next call works.
    let r = s.repl("js", "nodejs", "process.exit(3)");
    assert_eq!(
        (r["status"].clone(), r["state_lost"].clone()),
        (json!("error"), json!(true)),
        "{r}"
    );
    assert_eq!(
        stdout(&s.repl("js", "nodejs", "console.log(typeof a)")),
        vec!["undefined"]
    );

    s.stop_sandbox("js");
    s.assert_no_leftovers();
}

#[test]
fn repl_in_an_image_without_the_interpreter_says_so() {
    let s = Server::start();
    s.start_sandbox("plain", json!({}));
    let (code, msg) = s.err(
        "sandbox.repl.run",
        json!({"sandbox": "plain", "namespace": "default", "language": "python", "code": "1"}),
    );
    assert_eq!(code, -32603, "{msg}");
    assert!(
        msg.contains("python3") && msg.contains("not installed"),
        "{msg}"
    );
    let (code, msg) = s.err(
        "sandbox.repl.run",
        json!({"sandbox": "plain", "namespace": "default", "language": "ruby", "code": "1"}),
    );
    assert_eq!(code, -32602, "{msg}");
    s.stop_sandbox("plain");
}

#[test]
fn commands_get_argv_intact_and_env_workdir_from_config_and_call() {
    let s = Server::start();
    s.start_sandbox(
        "cmd",
        json!({"envs": ["A=from-config", "B=kept"], "workdir": "/tmp",
               "scripts": {"hello": "echo \"hello from script $A\"", "start": "echo started-by-start"},
               "exec": "httpd -f -p 8080"}),
    );
    let r = s.run(
        "cmd",
        "printf",
        &["[%s]\\n", "two words", "it's \"quoted\"", "$HOME", "*"],
    );
    assert_eq!(
        stdout(&r),
        vec!["[two words]", "[it's \"quoted\"]", "[$HOME]", "[*]"],
        "{r}"
    );
    let r = s.run("cmd", "sh", &["-c", "exit 42"]);
    assert_eq!(
        (r["exit_code"].clone(), r["success"].clone()),
        (json!(42), json!(false))
    );
    let r = s.run("cmd", "sh", &["-c", "kill -9 $$"]);
    assert_eq!(r["exit_code"], 137, "{r}");

    let r = s.run(
        "cmd",
        "sh",
        &["-c", "echo $A $B; pwd; cat >/dev/null; echo stdin-closed"],
    );
    assert_eq!(stdout(&r), vec!["from-config kept", "/tmp", "stdin-closed"]);
    let r = s.ok(
        "sandbox.command.run",
        json!({"sandbox": "cmd", "namespace": "default", "command": "sh",
               "args": ["-c", "echo $A $B; pwd"], "envs": ["A=from-call"], "workdir": "/root"}),
    );
    assert_eq!(stdout(&r), vec!["from-call kept", "/root"]);

    // Scripts are files run by the shell; exec was launched in the background.
    let r = s.run("cmd", "/.sandbox/scripts/hello", &[]);
    assert_eq!(stdout(&r), vec!["hello from script from-config"], "{r}");
    let r = s.run(
        "cmd",
        "sh",
        &["-c", "ps -o args | grep -v grep | grep 'httpd -f -p 8080'"],
    );
    assert_eq!(r["exit_code"], 0, "exec process not running: {r}");
    let r = s.run("cmd", "sh", &["-c", "head -c 4 /.sandbox/scripts/start"]);
    assert_eq!(stdout(&r), vec!["#!/b"], "shebang added: {r}");

    let (code, msg) = s.err(
        "sandbox.command.run",
        json!({"sandbox": "cmd", "namespace": "default", "command": "true", "workdir": "relative"}),
    );
    assert_eq!(code, -32602, "{msg}");
    s.stop_sandbox("cmd");
    s.assert_no_leftovers();
}

#[test]
fn start_script_runs_when_there_is_no_exec_and_its_output_is_kept() {
    let s = Server::start();
    s.start_sandbox(
        "bg",
        json!({"scripts": {"start": "echo from-start; sleep 1000"}}),
    );
    let t = Instant::now();
    let log = loop {
        let r = s.run("bg", "cat", &["/.sandbox/logs/background.log"]);
        if stdout(&r).contains(&"from-start".to_string()) || t.elapsed() > Duration::from_secs(10) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(stdout(&log), vec!["from-start"], "{log}");
    s.stop_sandbox("bg");
    s.assert_no_leftovers();
}

#[test]
fn a_misbehaving_agent_fails_its_call_and_hurts_no_one_else() {
    let s = Server::start_with(Options {
        agent_test_hooks: true,
        ..Options::default()
    });
    s.start_sandbox("victim", json!({}));
    s.start_sandbox("bystander", json!({}));
    for hook in ["oversized", "garbage"] {
        let (code, msg) = s.err(
            "sandbox.command.run",
            json!({"sandbox": "victim", "namespace": "default", "command": "moat-test-hook", "args": [hook]}),
        );
        assert_eq!(code, -32603, "{hook}: {msg}");
        assert_eq!(stdout(&s.run("bystander", "echo", &["fine"])), vec!["fine"]);
        // The victim's channel is closed; stopping and starting it recovers.
        s.stop_sandbox("victim");
        s.start_sandbox("victim", json!({}));
    }
    let t = Instant::now();
    let (code, msg) = s.err(
        "sandbox.command.run",
        json!({"sandbox": "victim", "namespace": "default", "command": "moat-test-hook", "args": ["stall"], "timeout": 1}),
    );
    assert_eq!(code, -32603, "{msg}");
    assert!(msg.contains("did not report"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(40), "{:?}", t.elapsed());
    assert_eq!(
        stdout(&s.run("bystander", "echo", &["still fine"])),
        vec!["still fine"]
    );
    s.stop_sandbox("victim");
    s.stop_sandbox("bystander");
    s.assert_no_leftovers();
}

#[test]
fn calls_over_the_per_sandbox_limit_are_refused_clearly() {
    let s = Server::start_with(Options {
        max_calls_per_sandbox: 1,
        ..Options::default()
    });
    s.start_sandbox("one-at-a-time", json!({}));
    std::thread::scope(|t| {
        let slow = t.spawn(|| s.run("one-at-a-time", "sleep", &["3"]));
        std::thread::sleep(Duration::from_millis(800));
        let (code, msg) = s.err(
            "sandbox.command.run",
            json!({"sandbox": "one-at-a-time", "namespace": "default", "command": "true"}),
        );
        assert_eq!(code, -32000, "{msg}");
        assert!(msg.contains("wait for one to finish"), "{msg}");
        assert_eq!(slow.join().unwrap()["exit_code"], 0);
    });
    assert_eq!(s.run("one-at-a-time", "true", &[])["exit_code"], 0);
    s.stop_sandbox("one-at-a-time");
}

/// Unix98 ptys work in the guest (the kernel has no legacy BSD ptys: see
/// docs/guest-kernel.md): code that needs a terminal gets one from devpts.
#[test]
fn a_pseudo_terminal_opens_in_the_guest() {
    let s = Server::start();
    s.start_sandbox("tty", json!({"image": PY}));
    let r = s.run(
        "tty",
        "python3",
        &[
            "-c",
            "import os, pty; m, t = pty.openpty(); print(os.ttyname(t))",
        ],
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(stdout(&r), ["/dev/pts/0"], "{r}");
}

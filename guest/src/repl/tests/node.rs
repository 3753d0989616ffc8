//! Node.js sessions.

use std::time::{Duration, Instant};

use moat_proto::agent::ReplStatus;

use super::*;

const JS: &str = "nodejs";

#[test]
fn top_level_await_and_declarations_persist() {
    let reg = Registry::new();
    assert_ok(
        &run(&reg, JS, "const x = await Promise.resolve(41); x+1"),
        &[],
    );
    assert_ok(
        &run(
            &reg,
            JS,
            "let y = x + 1\nfunction twice(v) { return 2 * v }",
        ),
        &[],
    );
    assert_ok(&run(&reg, JS, "console.log(x, y, twice(y))"), &["41 42 84"]);
    assert_ok(
        &run(
            &reg,
            JS,
            "const fs = require('fs'); console.log(typeof fs.readFileSync)",
        ),
        &["function"],
    );
}

#[test]
fn multi_line_cells_with_blank_lines_and_classes() {
    let reg = Registry::new();
    let cell =
        "function area(r) {\n\n  const a = Math.PI * r * r;\n\n  return a.toFixed(2);\n}\n\n\
                class Box {\n\n  constructor(v) { this.v = v; }\n\n}\n\n\
                for (let i = 1; i <= 2; i++) {\n\n  console.log(area(i));\n}\n";
    assert_ok(&run(&reg, JS, cell), &["3.14", "12.57"]);
    assert_ok(&run(&reg, JS, "console.log(new Box(area(1)).v)"), &["3.14"]);
    assert_ok(&run(&reg, JS, "{ a: 1 }"), &[]);
}

#[test]
fn errors_give_a_stack_without_driver_frames() {
    let reg = Registry::new();
    let r = run(
        &reg,
        JS,
        "var kept = 3\nfunction g() { throw new Error('boom') }\ng()",
    );
    assert_eq!(status(&r), ReplStatus::Error, "{r:?}");
    assert!(!r.state_lost);
    let err = stderr(&r);
    assert!(err.starts_with("Error: boom"), "{err}");
    assert!(err.contains("at g (cell:2:"), "{err}");
    for machinery in ["[eval]", "node:repl", "node:vm", "runInThisContext"] {
        assert!(!err.contains(machinery), "{machinery} in {err}");
    }
    assert_ok(&run(&reg, JS, "console.log(kept)"), &["3"]);

    let r = run(&reg, JS, "throw 42");
    assert_eq!(status(&r), ReplStatus::Error);
    assert_eq!(stderr(&r), "Uncaught 42");

    let r = run(&reg, JS, "if (kept) {");
    assert_eq!(status(&r), ReplStatus::Error);
    assert!(stderr(&r).contains("SyntaxError"), "{r:?}");
}

#[test]
fn rejections_are_errors() {
    let reg = Registry::new();
    let r = run(&reg, JS, "await Promise.reject(new TypeError('rejected'))");
    assert_eq!(status(&r), ReplStatus::Error, "{r:?}");
    assert!(stderr(&r).starts_with("TypeError: rejected"), "{r:?}");
    // Not awaited: unhandled, still this cell's error.
    let r = run(
        &reg,
        JS,
        "Promise.reject(new Error('unhandled')); console.log('after')",
    );
    assert_eq!(status(&r), ReplStatus::Error, "{r:?}");
    assert_eq!(stdout(&r), "after");
    assert!(stderr(&r).contains("Error: unhandled"), "{r:?}");
    // Thrown from a callback while the cell waits.
    let r = run(
        &reg,
        JS,
        "setTimeout(() => { throw new Error('late') }, 10)\n\
         await new Promise((r) => setTimeout(r, 100))",
    );
    assert_eq!(status(&r), ReplStatus::Error, "{r:?}");
    assert!(stderr(&r).contains("Error: late"), "{r:?}");
    assert_ok(&run(&reg, JS, "console.log('fine')"), &["fine"]);
}

#[test]
fn stdout_and_stderr_interleave_in_order() {
    let reg = Registry::new();
    let cell = "for (let i = 0; i < 50; i++) {\n  console.log('out', i)\n  \
                console.error('err', i)\n}\nprocess.stdout.write('last\\n')";
    let r = run(&reg, JS, cell);
    assert_eq!(status(&r), ReplStatus::Success);
    let mut expected = Vec::new();
    for i in 0..50 {
        expected.push(("out", format!("out {i}")));
        expected.push(("err", format!("err {i}")));
    }
    expected.push(("out", "last".to_owned()));
    assert_eq!(lines(&r), expected);
}

#[test]
fn timeout_interrupts_loops_and_awaits_and_keeps_state() {
    let reg = Registry::new();
    assert_ok(&run(&reg, JS, "var kept = 'yes'"), &[]);
    let start = Instant::now();
    let r = run_timeout(&reg, JS, "console.log('spinning')\nwhile (true) {}", 1000);
    let took = start.elapsed();
    assert_eq!(status(&r), ReplStatus::Timeout, "{r:?}");
    assert!(!r.state_lost, "{r:?}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(stdout(&r), "spinning");
    assert!(stderr(&r).contains("interrupted"), "{r:?}");
    assert_ok(&run(&reg, JS, "console.log(kept)"), &["yes"]);

    let r = run_timeout(&reg, JS, "await new Promise(() => {})", 500);
    assert_eq!(status(&r), ReplStatus::Timeout, "{r:?}");
    assert!(!r.state_lost, "{r:?}");
    assert_ok(&run(&reg, JS, "console.log(kept)"), &["yes"]);
}

#[test]
fn timeout_kills_what_sigint_cannot_stop() {
    let reg = Registry::new();
    assert_ok(&run(&reg, JS, "var kept = 1"), &[]);
    // After an await the loop runs outside the REPL's SIGINT watchdog.
    let start = Instant::now();
    let r = run_timeout(&reg, JS, "await null\nwhile (true) {}", 500);
    let took = start.elapsed();
    assert_eq!(status(&r), ReplStatus::Timeout, "{r:?}");
    assert!(r.state_lost, "{r:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let r = run(&reg, JS, "console.log(typeof kept)");
    assert_ok(&r, &["undefined"]);
}

#[test]
fn process_exit_is_an_error_with_state_lost() {
    let reg = Registry::new();
    assert_ok(&run(&reg, JS, "var kept = 1"), &[]);
    let r = run(&reg, JS, "console.log('bye'); process.exit(3)");
    assert_eq!(status(&r), ReplStatus::Error, "{r:?}");
    assert!(r.state_lost);
    assert_eq!(stdout(&r), "bye");
    assert!(
        stderr(&r).contains("the nodejs interpreter exited during the cell (exit status 3)"),
        "{r:?}"
    );
    assert_ok(&run(&reg, JS, "console.log(typeof kept)"), &["undefined"]);
}

#[test]
fn protocol_lookalikes_in_output_are_just_output() {
    let reg = Registry::new();
    let cell = "console.log('done 1 ok'); console.log('ready'); console.error('done 1 error');\n\
                console.log('sync 1'); process.stdout.write('cell 2 5\\n')";
    let r = run(&reg, JS, cell);
    assert_eq!(status(&r), ReplStatus::Success);
    assert_eq!(
        lines(&r),
        vec![
            ("out", "done 1 ok".to_owned()),
            ("out", "ready".to_owned()),
            ("err", "done 1 error".to_owned()),
            ("out", "sync 1".to_owned()),
            ("out", "cell 2 5".to_owned()),
        ]
    );
    assert_ok(&run(&reg, JS, "console.log('still fine')"), &["still fine"]);
}

#[test]
fn control_fds_are_not_reachable_by_accident() {
    let reg = Registry::new();
    // fds 3-5 are closed early and reused by Node itself: only the pipes
    // behind them matter.
    let probe = "const fs = require('fs')\n\
                 var mine = fs.readdirSync('/proc/self/fd').map((n) => {\n  \
                 try { return fs.readlinkSync('/proc/self/fd/' + n) } catch (e) { return '' }\n})";
    let r = run(&reg, JS, probe);
    assert_eq!(status(&r), ReplStatus::Success, "{r:?}");
    let control = control_pipes(&reg, JS);
    assert_eq!(control.len(), 3);
    let held = stdout(&run(&reg, JS, "console.log(mine.join('\\n'))"));
    assert!(control.iter().all(|c| held.contains(c.as_str())), "{held}");
    let r = run(
        &reg,
        JS,
        "console.log(require('child_process').execSync('ls -l /proc/self/fd').toString())",
    );
    let child = stdout(&r);
    // libuv gives the child pipes or socketpairs depending on the host, so
    // only check that the listing is real: it names the child's stdio.
    assert!(
        [" 0 -> ", " 1 -> ", " 2 -> "]
            .iter()
            .all(|fd| child.contains(fd)),
        "{child}"
    );
    for c in &control {
        assert!(!child.contains(c.as_str()), "{c} leaked: {child}");
    }
}

#[test]
fn ten_megabytes_of_output_are_capped_and_counted() {
    let reg = Registry::new();
    let mut req = super::request(
        JS,
        "console.log('x'.repeat(10_000_000))\nconsole.log('tail')",
        0,
    );
    req.max_output_bytes = 1 << 20;
    let start = Instant::now();
    let r = reg.run(&req).expect("accepted");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(status(&r), ReplStatus::Success);
    assert_eq!(r.dropped_bytes, 10_000_001 + 5 - (1 << 20));
    assert_eq!(r.output.len(), 1);
    assert_ok(&run(&reg, JS, "console.log('after')"), &["after"]);
}

#[test]
fn missing_node_is_a_failure() {
    assert_missing(
        JS,
        "Node.js (node) is not installed in this sandbox's image",
    );
}

//! Python sessions.

use std::time::{Duration, Instant};

use moat_proto::agent::ReplStatus;

use super::*;

const PY: &str = "python";

#[test]
fn variables_and_imports_persist_and_values_are_not_echoed() {
    let reg = Registry::new();
    assert_ok(&run(&reg, PY, "x = 41\nimport json"), &[]);
    assert_ok(&run(&reg, PY, "x + 1"), &[]);
    assert_ok(
        &run(&reg, PY, "print(x + 1, json.dumps([__name__]))"),
        &["42 [\"__main__\"]"],
    );
}

#[test]
fn multi_line_cells_with_blank_lines_functions_and_classes() {
    let reg = Registry::new();
    let cell =
        "import math\n\ndef area(r):\n\n    a = math.pi * r * r\n\n    return round(a, 2)\n\n\
                class Box:\n    def __init__(self, v):\n\n        self.v = v\n\n\
                for i in range(2):\n\n    print(area(i + 1))\n";
    assert_ok(&run(&reg, PY, cell), &["3.14", "12.57"]);
    assert_ok(&run(&reg, PY, "print(Box(area(1)).v)"), &["3.14"]);
}

#[test]
fn exceptions_give_a_traceback_without_driver_frames() {
    let reg = Registry::new();
    let r = run(&reg, PY, "y = 7\ndef f():\n    return 1 / 0\nf()");
    assert_eq!(status(&r), ReplStatus::Error);
    assert!(!r.state_lost);
    let err = stderr(&r);
    assert!(
        err.starts_with("Traceback (most recent call last):"),
        "{err}"
    );
    assert!(
        err.contains("File \"<cell>\", line 4, in <module>"),
        "{err}"
    );
    assert!(err.contains("File \"<cell>\", line 3, in f"), "{err}");
    assert!(
        err.ends_with("ZeroDivisionError: division by zero"),
        "{err}"
    );
    assert!(
        !err.contains("<moat-driver>") && !err.contains("_moat"),
        "{err}"
    );
    assert_eq!(stdout(&r), "");
    // State survives an exception.
    assert_ok(&run(&reg, PY, "print(y)"), &["7"]);
    // The user's own exec() frames are kept.
    let err = stderr(&run(&reg, PY, "exec('1 / 0')"));
    assert!(
        err.contains("File \"<string>\", line 1, in <module>"),
        "{err}"
    );
}

#[test]
fn syntax_errors_and_sys_exit() {
    let reg = Registry::new();
    let r = run(&reg, PY, "z = 1\ndef broken(:\n    pass");
    assert_eq!(status(&r), ReplStatus::Error);
    let err = stderr(&r);
    assert!(err.contains("SyntaxError"), "{err}");
    assert!(err.contains("File \"<cell>\", line 2"), "{err}");
    assert!(!err.contains("Traceback"), "{err}");
    // Nothing of the broken cell ran.
    assert_eq!(status(&run(&reg, PY, "z")), ReplStatus::Error);

    let r = run(&reg, PY, "import sys\nw = 2\nsys.exit(3)");
    assert_eq!(status(&r), ReplStatus::Error);
    assert_eq!(lines(&r), vec![("err", "SystemExit: 3".to_owned())]);
    assert!(!r.state_lost);
    assert_ok(&run(&reg, PY, "sys.exit(0)"), &[]);
    assert_ok(&run(&reg, PY, "print(w)"), &["2"]);
}

#[test]
fn stdout_and_stderr_interleave_in_order() {
    let reg = Registry::new();
    let cell = "import sys\nfor i in range(50):\n    print('out', i)\n    \
                print('err', i, file=sys.stderr)\nprint('last')";
    let r = run(&reg, PY, cell);
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
fn asyncio_and_top_level_await() {
    let reg = Registry::new();
    let cell = "import asyncio\nasync def twice(v):\n    await asyncio.sleep(0.01)\n    \
                return 2 * v\nprint(asyncio.run(twice(21)))";
    assert_ok(&run(&reg, PY, cell), &["42"]);
    assert_ok(&run(&reg, PY, "v = await twice(5)\nprint(v)"), &["10"]);
    assert_ok(&run(&reg, PY, "print(v + 1)"), &["11"]);
}

#[test]
fn timeout_interrupts_and_keeps_state() {
    let reg = Registry::new();
    assert_ok(&run(&reg, PY, "kept = 'yes'"), &[]);
    let start = Instant::now();
    let r = run_timeout(&reg, PY, "print('spinning')\nwhile True:\n    pass", 1000);
    let took = start.elapsed();
    assert_eq!(status(&r), ReplStatus::Timeout, "{r:?}");
    assert!(!r.state_lost, "{r:?}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(stdout(&r), "spinning");
    let err = stderr(&r);
    assert!(err.contains("KeyboardInterrupt"), "{err}");
    assert!(err.contains("File \"<cell>\", line 2"), "{err}");
    assert!(
        !err.contains("moat-driver") && !err.contains("on_sigint"),
        "{err}"
    );
    assert!(
        err.contains("was interrupted; the python session's state is kept"),
        "{err}"
    );
    assert_ok(&run(&reg, PY, "print(kept)"), &["yes"]);
    // time.sleep is interrupted too.
    let r = run_timeout(&reg, PY, "import time\ntime.sleep(30)", 300);
    assert_eq!(status(&r), ReplStatus::Timeout);
    assert!(!r.state_lost);
    assert_ok(&run(&reg, PY, "print(kept)"), &["yes"]);
}

#[test]
fn timeout_kills_a_cell_that_ignores_the_interrupt() {
    let reg = Registry::new();
    assert_ok(&run(&reg, PY, "kept = 1"), &[]);
    let cell = "while True:\n    try:\n        while True:\n            pass\n    \
                except KeyboardInterrupt:\n        print('ignored')";
    let start = Instant::now();
    let r = run_timeout(&reg, PY, cell, 500);
    let took = start.elapsed();
    assert_eq!(status(&r), ReplStatus::Timeout, "{r:?}");
    assert!(r.state_lost, "{r:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(stdout(&r), "ignored");
    assert!(stderr(&r).contains("was killed and its state"), "{r:?}");
    // A fresh interpreter: the variable is gone, and it says nothing more.
    let r = run(&reg, PY, "print(kept)");
    assert_eq!(status(&r), ReplStatus::Error);
    assert!(!r.state_lost);
    assert!(stderr(&r).contains("NameError"), "{r:?}");
}

#[test]
fn interpreter_exit_is_an_error_with_state_lost() {
    let reg = Registry::new();
    assert_ok(&run(&reg, PY, "kept = 1"), &[]);
    let r = run(&reg, PY, "import os\nprint('bye', flush=True)\nos._exit(1)");
    assert_eq!(status(&r), ReplStatus::Error);
    assert!(r.state_lost);
    assert_eq!(stdout(&r), "bye");
    let err = stderr(&r);
    assert!(
        err.contains("the python interpreter exited during the cell (exit status 1)"),
        "{err}"
    );
    assert_ok(&run(&reg, PY, "print('again')"), &["again"]);
    // An exit between cells is reported by the next one.
    assert_ok(
        &run(
            &reg,
            PY,
            "import os, threading, time\nv = 1\nthreading.Thread(\
             target=lambda: (time.sleep(0.2), os._exit(5))).start()",
        ),
        &[],
    );
    std::thread::sleep(Duration::from_millis(600));
    let r = run(&reg, PY, "print('fresh')");
    assert_eq!(status(&r), ReplStatus::Success);
    assert!(r.state_lost);
    assert_eq!(stdout(&r), "fresh");
    assert!(
        stderr(&r).contains("exited since the last cell (exit status 5)"),
        "{r:?}"
    );
}

#[test]
fn protocol_lookalikes_in_output_are_just_output() {
    let reg = Registry::new();
    let cell =
        "import sys\nprint('done 1 ok')\nprint('ready')\nsys.stderr.write('done 1 error\\n')\n\
                print('sync 1')\nprint('cell 2 5')\nprint('{\"id\": 1, \"status\": \"ok\"}')";
    let r = run(&reg, PY, cell);
    assert_eq!(status(&r), ReplStatus::Success);
    assert_eq!(
        lines(&r),
        vec![
            ("out", "done 1 ok".to_owned()),
            ("out", "ready".to_owned()),
            ("err", "done 1 error".to_owned()),
            ("out", "sync 1".to_owned()),
            ("out", "cell 2 5".to_owned()),
            ("out", "{\"id\": 1, \"status\": \"ok\"}".to_owned()),
        ]
    );
    assert_ok(&run(&reg, PY, "print('still fine')"), &["still fine"]);
}

#[test]
fn control_fds_are_not_reachable_by_accident() {
    let reg = Registry::new();
    let probe = "import os\nfor fd in (3, 4, 5):\n    try:\n        os.fstat(fd)\n        \
                 print('open', fd)\n    except OSError:\n        pass\n\
                 def links():\n    out = []\n    for name in os.listdir('/proc/self/fd'):\n        \
                 try:\n            out.append(os.readlink('/proc/self/fd/' + name))\n        \
                 except OSError:\n            pass\n    return out\nmine = links()\nprint(len(mine))";
    let r = run(&reg, PY, probe);
    assert_eq!(status(&r), ReplStatus::Success, "{r:?}");
    assert!(!stdout(&r).contains("open"), "{r:?}");
    let control = control_pipes(&reg, PY);
    assert_eq!(control.len(), 3);
    // The interpreter holds them (so the check below means something)...
    let r = run(&reg, PY, "print('\\n'.join(mine))");
    let held = stdout(&r);
    assert!(control.iter().all(|c| held.contains(c.as_str())), "{held}");
    // ...but a child started without closing fds does not.
    let r = run(
        &reg,
        PY,
        "import subprocess\nsubprocess.run(['ls', '-l', '/proc/self/fd'], close_fds=False)\n\
         os.system('ls -l /proc/self/fd')",
    );
    let child = stdout(&r);
    assert!(child.contains("pipe:["), "{child}");
    for c in &control {
        assert!(!child.contains(c.as_str()), "{c} leaked: {child}");
    }
}

#[test]
fn ten_megabytes_of_output_are_capped_and_counted() {
    let reg = Registry::new();
    let mut req = super::request(PY, "print('x' * 10_000_000)\nprint('tail')", 0);
    req.max_output_bytes = 1 << 20;
    let start = Instant::now();
    let r = reg.run(&req).expect("accepted");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(status(&r), ReplStatus::Success);
    assert_eq!(r.dropped_bytes, 10_000_001 + 5 - (1 << 20));
    assert_eq!(r.output.len(), 1);
    assert_eq!(r.output[0].text.len(), 1 << 20);
    assert_ok(&run(&reg, PY, "print('after')"), &["after"]);
}

#[test]
fn missing_python_is_a_failure() {
    assert_missing(PY, "python3 is not installed in this sandbox's image");
}

#[test]
fn env_and_workdir_apply_at_start() {
    let reg = Registry::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut req = super::request(
        PY,
        "import os\nprint(os.getcwd(), os.environ['GREETING'])",
        0,
    );
    req.env.push("GREETING=hi there".into());
    req.workdir = dir.path().display().to_string();
    let r = reg.run(&req).expect("accepted");
    assert_ok(&r, &[&format!("{} hi there", dir.path().display())]);
}

#[test]
fn calls_to_one_language_wait_their_turn() {
    let reg = Registry::new();
    assert_ok(&run(&reg, PY, "import time\nlog = []"), &[]);
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            run(
                &reg,
                PY,
                "log.append('first')\ntime.sleep(0.5)\nlog.append('first done')",
            )
        });
        std::thread::sleep(Duration::from_millis(100));
        let second = s.spawn(|| run(&reg, PY, "log.append('second')\nprint(log)"));
        assert_eq!(status(&first.join().expect("first")), ReplStatus::Success);
        assert_ok(
            &second.join().expect("second"),
            &["['first', 'first done', 'second']"],
        );
    });
}

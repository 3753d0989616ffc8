//! Guests that abuse their resources: memory past their RAM, a fork bomb, a
//! full disk, disk I/O past its cap. The sandbox fails or is held to its limits, the host and the
//! other sandboxes carry on, and metrics show what happened.

use std::time::{Duration, Instant};

use moat_e2e::{lines_of, Options, Server};
use serde_json::{json, Value};

fn metrics(s: &Server, name: &str) -> Value {
    let r = s.ok(
        "sandbox.metrics.get",
        json!({"namespace": "default", "sandbox": name}),
    );
    r["sandboxes"][0].clone()
}

fn run_for(s: &Server, name: &str, command: &str, args: &[&str], timeout: u32) -> Value {
    s.ok(
        "sandbox.command.run",
        json!({"sandbox": name, "namespace": "default", "command": command,
               "args": args, "timeout": timeout}),
    )
}

/// The bystander answers, and quickly, whatever its neighbour does.
fn assert_responsive(s: &Server, name: &str) {
    let start = Instant::now();
    let r = s.run(name, "echo", &["alive"]);
    assert_eq!(Server::stdout_lines(&r), vec!["alive"], "{name}: {r}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{name} took {:?}",
        start.elapsed()
    );
}

#[test]
fn memory_past_the_guest_ram_is_contained_in_the_guest() {
    let s = Server::start();
    s.start_sandbox(
        "hog",
        json!({"image": "microsandbox/python", "memory": 256}),
    );
    s.start_sandbox("bystander", json!({}));
    let hog_vm = s.vm_pids();
    let r = run_for(
        &s,
        "hog",
        "python3",
        &[
            "-c",
            "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))",
        ],
        120,
    );
    // Python gets MemoryError or the guest's OOM killer ends it: either way
    // it failed, inside the guest.
    assert_eq!(r["success"], json!(false), "{r}");
    assert_ne!(r["exit_code"], json!(0), "{r}");
    // When the OOM killer ran, it ran inside the workload's cgroup, whose
    // limit leaves the agent its reserve.
    let events = workload_file(&s, "hog", "memory.events");
    let oom_kills: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("memory.events: {events:?}"));
    if r["exit_code"] == json!(137) {
        assert!(
            oom_kills > 0,
            "killed, but not by the workload's OOM: {events}"
        );
    }
    let m = metrics(&s, "hog");
    let mib = m["memory_usage"].as_f64().expect("memory_usage");
    assert!(
        (150.0..=512.0).contains(&mib),
        "memory_usage {mib} MiB: the guest filled its RAM, within RAM + VMM overhead"
    );
    // The VM process survived (its cgroup leaves room for the VMM), and the
    // sandbox works on.
    assert_eq!(s.vm_pids(), hog_vm, "a VM process died or appeared");
    assert_responsive(&s, "hog");
    assert_responsive(&s, "bystander");
    s.stop_sandbox("hog");
    s.stop_sandbox("bystander");
    s.assert_no_leftovers();
}

/// The guest's workload cgroup file `name`, read by a command that forks
/// nothing (it works while the workload is at its pid limit).
fn workload_file(s: &Server, sandbox: &str, name: &str) -> String {
    let r = run_for(
        s,
        sandbox,
        "cat",
        &[&format!("/sys/fs/cgroup/workload/{name}")],
        10,
    );
    assert_eq!(r["success"], json!(true), "{r}");
    lines_of(&r, "stdout").join("\n")
}

#[test]
fn a_fork_bomb_stays_in_its_guest_and_is_stopped_by_the_timeout() {
    let s = Server::start_with(Options {
        limits_toml: "guest_pids_max = 512\n".into(),
        ..Options::default()
    });
    s.start_sandbox("bomb", json!({"cpus": 1}));
    s.start_sandbox("bystander", json!({}));
    let host_processes = s.sandbox_processes().len();
    std::thread::scope(|scope| {
        // Bombed again whenever it dies out (at the pid limit a plain bomb
        // can collapse on its own), by four loops, since a shell whose fork
        // fails exits. The command itself is a `sleep` that forks nothing,
        // so it is still running at its timeout, whatever the bomb does:
        // a command that had ended would leave its leftovers running.
        let bomb = scope.spawn(|| {
            run_for(
                &s,
                "bomb",
                "sh",
                &[
                    "-c",
                    "b() { b & b & wait; }; l() { sleep 1; while :; do b; done; }; \
                     l & l & l & l & exec sleep 3600",
                ],
                20,
            )
        });
        std::thread::sleep(Duration::from_secs(8));
        // The bomb's processes are guest processes: on the host, its
        // sandbox is still one VM process (and the jailer waiting on it).
        assert_eq!(s.sandbox_processes().len(), host_processes);
        let m = metrics(&s, "bomb");
        let cpu = m["cpu_usage"].as_f64().expect("cpu_usage");
        // An idle guest uses a few percent; the margin leaves room for a
        // busy host.
        assert!(
            cpu > 30.0,
            "cpu_usage {cpu}: the bomb should keep its CPU busy"
        );
        assert!(cpu <= 110.0, "cpu_usage {cpu}: held to one CPU");
        // Inside the guest the bomb hit the configured pid limit, and the
        // agent still answers in the bombed sandbox itself.
        let start = Instant::now();
        assert_eq!(workload_file(&s, "bomb", "pids.max"), "512");
        let events = workload_file(&s, "bomb", "pids.events");
        let refused: u64 = events
            .strip_prefix("max ")
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("pids.events: {events:?}"));
        assert!(refused > 0, "the bomb never reached pids.max: {events}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the bombed sandbox's agent took {:?} to answer",
            start.elapsed()
        );
        assert_responsive(&s, "bystander");
        let r = bomb.join().unwrap();
        assert_eq!(r["success"], json!(false), "{r}");
        assert_eq!(r["exit_code"], json!(137), "not killed at its timeout: {r}");
    });
    // The whole process group died with the timeout: the sandbox recovers.
    let start = Instant::now();
    loop {
        let r = s.rpc(
            "sandbox.command.run",
            json!({"sandbox": "bomb", "namespace": "default", "command": "sh",
                   "args": ["-c", "ps | grep -c '[s]h -c b()' || true"], "timeout": 10}),
        );
        if r["result"]["success"] == json!(true) && lines_of(&r["result"], "stdout") == vec!["0"] {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "bomb still running: {r}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_responsive(&s, "bomb");
    s.stop_sandbox("bomb");
    s.stop_sandbox("bystander");
    s.assert_no_leftovers();
}

#[test]
fn a_timeout_kills_what_the_command_started_even_outside_its_process_group() {
    let s = Server::start();
    s.start_sandbox("escape", json!({}));
    // `setsid` leaves the command's process group (and its session), so
    // only the command's workload cgroup still holds it.
    let r = run_for(
        &s,
        "escape",
        "sh",
        &["-c", "setsid sleep 4321 & sleep 4322"],
        2,
    );
    assert_eq!(r["success"], json!(false), "{r}");
    let r = s.run(
        "escape",
        "sh",
        &["-c", "ps | grep -c '[s]leep 432' || true"],
    );
    assert_eq!(lines_of(&r, "stdout"), vec!["0"], "{r}");
    // Without a timeout, what a command leaves running keeps running (a
    // started server is the point of such a command).
    let r = s.run("escape", "sh", &["-c", "setsid sleep 4323 & echo started"]);
    assert_eq!(lines_of(&r, "stdout"), vec!["started"], "{r}");
    let r = s.run(
        "escape",
        "sh",
        &["-c", "ps | grep -c '[s]leep 4323' || true"],
    );
    assert_eq!(lines_of(&r, "stdout"), vec!["1"], "{r}");
    // The agent itself is never the OOM killer's choice; what it runs is.
    let r = s.run(
        "escape",
        "sh",
        &[
            "-c",
            "cat /proc/$PPID/oom_score_adj /proc/self/oom_score_adj /proc/self/cgroup",
        ],
    );
    let lines = lines_of(&r, "stdout");
    assert_eq!(lines[..2], ["-1000", "0"], "{r}");
    assert!(lines[2].starts_with("0::/workload/cmd-"), "{r}");
    s.stop_sandbox("escape");
    s.assert_no_leftovers();
}

#[test]
fn a_full_disk_is_the_guests_problem_only() {
    let s = Server::start_with(Options {
        writable_disk_mib: 128,
        ..Options::default()
    });
    s.start_sandbox("filler", json!({}));
    s.start_sandbox("bystander", json!({}));
    let before = metrics(&s, "filler")["disk_usage"]
        .as_f64()
        .expect("disk_usage");
    let r = run_for(
        &s,
        "filler",
        "dd",
        &["if=/dev/zero", "of=/fill", "bs=1M"],
        300,
    );
    assert_eq!(r["success"], json!(false), "{r}");
    let err = lines_of(&r, "stderr").join("\n");
    assert!(err.contains("No space left on device"), "{r}");
    let used = metrics(&s, "filler")["disk_usage"]
        .as_f64()
        .expect("disk_usage");
    assert!(used > before + 64.0 * 1048576.0, "{before} -> {used}");
    assert!(
        used <= 129.0 * 1048576.0,
        "{used} bytes: more than the disk"
    );
    // On the host, the disk file never grew past its size.
    for dir in s.vm_dirs() {
        let disk = dir.join("rw.ext4");
        let meta = std::fs::metadata(&disk).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.len(), 128 << 20, "{disk:?}");
        assert!(meta.blocks() * 512 <= 129 << 20, "{disk:?}");
    }
    // The guest can free the space and go on.
    let r = s.run(
        "filler",
        "sh",
        &["-c", "rm /fill && echo ok > /after && cat /after"],
    );
    assert_eq!(Server::stdout_lines(&r), vec!["ok"], "{r}");
    assert_responsive(&s, "bystander");
    s.stop_sandbox("filler");
    s.stop_sandbox("bystander");
    s.assert_no_leftovers();
}

/// The line of the VM process's cgroup I/O limit for writes: v1
/// `blkio.throttle.write_bps_device` or v2 `io.max`.
fn cgroup_write_cap(pid: i32) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        if controllers.split(',').any(|c| c == "blkio") {
            return std::fs::read_to_string(format!(
                "/sys/fs/cgroup/blkio{path}/blkio.throttle.write_bps_device"
            ))
            .unwrap();
        }
        if controllers.is_empty() {
            if let Ok(max) = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/io.max")) {
                if !max.is_empty() {
                    return max;
                }
            }
        }
    }
    String::new()
}

#[test]
fn disk_writes_are_held_to_their_cap() {
    const CAP: u64 = 4 << 20;
    let s = Server::start_with(Options {
        limits_toml: format!("disk_write_bps = {CAP}"),
        ..Options::default()
    });
    s.start_sandbox("writer", json!({}));
    let pid = s.vm_pids()[0].0;
    let cap = cgroup_write_cap(pid);
    assert!(
        cap.contains(&format!(" {CAP}")) || cap.contains(&format!("wbps={CAP}")),
        "cgroup write cap: {cap:?}"
    );
    // 24 MiB at 4 MiB/s: about 6 s, whatever the guest's page cache does
    // (fsync pushes it all through the throttled disk).
    let start = Instant::now();
    let r = run_for(
        &s,
        "writer",
        "dd",
        &["if=/dev/zero", "of=/f", "bs=1M", "count=24", "conv=fsync"],
        120,
    );
    let took = start.elapsed();
    assert_eq!(r["success"], json!(true), "{r}");
    assert!(
        took >= Duration::from_millis(4500),
        "24 MiB written in {took:?}: faster than the 4 MiB/s cap"
    );
    s.stop_sandbox("writer");
    s.assert_no_leftovers();
}

use super::*;

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap()
}

#[test]
fn prepare_gives_the_agent_priority_and_bounds_the_workload() {
    let root = tempfile::tempdir().unwrap();
    let layout = Layout::new(root.path());
    let ram = 512u64 << 20;
    assert_eq!(layout.prepare(ram, 1234).unwrap(), (512u64 - 32) << 20);
    assert_eq!(
        read(&root.path().join("cgroup.subtree_control")),
        CONTROLLERS
    );
    let agent = root.path().join(AGENT);
    let work = root.path().join(WORKLOAD);
    assert_eq!(read(&agent.join("cpu.weight")), "10000");
    assert_eq!(read(&work.join("cpu.weight")), "100");
    assert_eq!(read(&work.join("cgroup.subtree_control")), "+cpu");
    assert_eq!(read(&work.join("pids.max")), "1234");
    assert_eq!(
        read(&work.join("memory.max")),
        ((512u64 - 32) << 20).to_string()
    );
    assert_eq!(read(&agent.join("memory.min")), (16u64 << 20).to_string());
    // A second call (a restarted server) finds the groups and succeeds.
    layout.prepare(ram, 1234).unwrap();
}

#[test]
fn the_reserve_scales_with_ram_within_bounds() {
    assert_eq!(agent_reserve_bytes(128 << 20), 16 << 20);
    assert_eq!(agent_reserve_bytes(512 << 20), 32 << 20);
    assert_eq!(agent_reserve_bytes(8 << 30), 48 << 20);
}

#[test]
fn pids_max_comes_from_the_command_line_or_the_default() {
    assert_eq!(parse_pids_max(None), Ok(DEFAULT_PIDS_MAX));
    assert_eq!(parse_pids_max(Some("100")), Ok(100));
    for bad in ["0", "15", "32001", "-1", "lots", ""] {
        let err = parse_pids_max(Some(bad)).unwrap_err();
        assert!(err.contains(PIDS_MAX_VAR) && err.contains("4096"), "{err}");
    }
}

#[test]
fn mem_total_is_read_from_meminfo() {
    let meminfo = "MemTotal:         496892 kB\nMemFree:          400000 kB\n";
    assert_eq!(mem_total_bytes(meminfo), Some(496_892 * 1024));
    assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
    assert_eq!(mem_total_bytes("MemTotal: many kB\n"), None);
}

#[test]
fn groups_are_numbered_killed_and_removed_when_empty() {
    let root = tempfile::tempdir().unwrap();
    let layout = Layout::new(root.path());
    fs::create_dir(root.path().join(WORKLOAD)).unwrap();
    let a = layout.new_group("cmd").unwrap();
    let b = layout.new_group("cmd").unwrap();
    assert_ne!(a.dir(), b.dir());
    let name = a.dir().file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("cmd-"), "{name}");
    a.kill();
    assert_eq!(read(&a.dir().join("cgroup.kill")), "1");
    // The fake group's directory holds files, so it cannot be removed
    // (like a cgroup with processes): it lingers until it can be.
    let dir = a.dir().to_path_buf();
    drop(a);
    assert!(dir.exists());
    fs::remove_file(dir.join("cgroup.kill")).unwrap();
    fs::remove_file(dir.join("cgroup.procs")).unwrap();
    let _c = layout.new_group("repl").unwrap();
    assert!(!dir.exists(), "the empty lingering group was removed");
    let bg = layout.new_group("background").unwrap();
    assert_eq!(bg.dir(), root.path().join(WORKLOAD).join("background"));
    let bg_dir = bg.dir().to_path_buf();
    bg.keep();
    assert!(bg_dir.exists());
}

#[test]
fn a_child_enters_its_group_and_gets_the_default_oom_score() {
    use std::os::unix::process::CommandExt;
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join(WORKLOAD)).unwrap();
    let group = Layout::new(root.path()).new_group("cmd").unwrap();
    let fd = group.procs_fd();
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "cat /proc/self/oom_score_adj"]);
    // SAFETY: enter_in_child only makes raw write/open/close calls.
    unsafe {
        cmd.pre_exec(move || enter_in_child(Some(fd)));
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    // The fake cgroup.procs received the child's "0" (itself).
    assert_eq!(read(&group.dir().join("cgroup.procs")), "0");
}

//! `moat-jail-probe`: stands in for a compromised VMM. The confinement suite
//! runs it through `moat-jailer` with a real sandbox's jail arguments (same
//! uid, binds, namespaces, rlimits and seccomp filter), and it reports what
//! it could reach, one line per attempt: `<check> reached|denied <detail>`.
//!
//! Modes:
//! - `files OTHER_DISK OTHER_PID`: its own disk (the control), another
//!   sandbox's disk by host path and through /proc, host files, writes to
//!   the read-only parts of the jail, and the processes it can see;
//! - `net UDP_PORT ABSTRACT_NAME`: a datagram to a host abstract Unix
//!   socket, the interfaces it has, then an AF_INET socket for a datagram
//!   to a host listener on loopback (outside the allow-list: killed);
//! - `namespaces`: `clone3` (answered ENOSYS), then `clone(CLONE_NEWUSER)`
//!   (outside the allow-list: killed);
//! - `connect PORT`: a TCP connect (outside the allow-list: killed);
//! - `tap-persist`: `ioctl(0, TUNSETPERSIST)`, what would make a tap outlive
//!   its VM (the ioctl allow-list excludes it: killed);
//! - `forbidden`: `ptrace(PTRACE_TRACEME)` (outside the allow-list: killed);
//!   also what it does when started with QEMU's arguments, i.e. when a
//!   broker runs it as its VMM (`[vmm] qemu`).

use std::ffi::CString;
use std::io::Write;

fn report(check: &str, result: Result<String, std::io::Error>) {
    let line = match result {
        Ok(detail) => format!("{check} reached {detail}"),
        Err(e) => format!("{check} denied {e}"),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn open(path: &str, flags: libc::c_int) -> Result<String, std::io::Error> {
    let c = CString::new(path).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path; the fd is closed at once.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened by this function.
    unsafe { libc::close(fd) };
    Ok(path.to_owned())
}

fn files(other_disk: &str, other_pid: &str) {
    report("own-disk", open("/vm/rw.ext4", libc::O_RDONLY));
    report("other-disk", open(other_disk, libc::O_RDONLY));
    report(
        "other-disk-via-proc",
        open(
            &format!("/proc/{other_pid}/root/vm/rw.ext4"),
            libc::O_RDONLY,
        ),
    );
    for host in [
        "/etc/shadow",
        "/etc/passwd",
        "/root",
        "/var/lib/moat",
        "/run/moat",
        "/sys/kernel",
        "/dev/sda",
        "/dev/vda",
        "/dev/mem",
    ] {
        report(&format!("host:{host}"), open(host, libc::O_RDONLY));
    }
    report(
        "write:/usr",
        open("/usr/moat-probe", libc::O_WRONLY | libc::O_CREAT),
    );
    report("write:/disk/image", open("/disk/image", libc::O_WRONLY));
    report("write:/boot/vmlinux", open("/boot/vmlinux", libc::O_WRONLY));
    // /dev is a tmpfs of its own (device nodes work there), read-only.
    report(
        "write:/dev",
        open("/dev/moat-probe", libc::O_WRONLY | libc::O_CREAT),
    );
    report("dev:/dev/null", open("/dev/null", libc::O_RDWR));
    report(
        "processes",
        std::fs::read_dir("/proc").map(|d| {
            let mut pids: Vec<String> = d
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .collect();
            pids.sort();
            pids.join(",")
        }),
    );
}

fn send_udp(port: u16) -> Result<String, std::io::Error> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sock.send_to(b"moat-probe", ("127.0.0.1", port))
        .map(|n| format!("{n} bytes"))
}

fn send_abstract(name: &str) -> Result<String, std::io::Error> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    sock.send_to_addr(b"moat-probe", &addr)
        .map(|n| format!("{n} bytes"))
}

fn net(port: &str, name: &str) {
    report("abstract-unix", send_abstract(name));
    report(
        "interfaces",
        std::fs::read_to_string("/proc/net/dev").map(|t| {
            t.lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(",")
        }),
    );
    // Last: an AF_INET socket is outside the allow-list.
    report("about-to-udp", Ok(String::new()));
    match port.parse() {
        Ok(port) => report("udp-loopback", send_udp(port)),
        Err(_) => report("udp-loopback", Err(std::io::Error::other("bad port"))),
    }
}

/// `clone3` (answered ENOSYS), then `clone(CLONE_NEWUSER)` (killed).
fn namespaces() {
    // SAFETY: clone3 with a null argument block and size 0 is rejected by
    // the kernel or the filter before anything is created.
    let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
    report(
        "clone3",
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok("returned".into())
        },
    );
    report("about-to-clone-newuser", Ok(String::new()));
    // SAFETY: a fork-like clone; the child (if any) exits at once.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::CLONE_NEWUSER | libc::SIGCHLD,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if r == 0 {
        // SAFETY: leaving the child without running any Rust cleanup.
        unsafe { libc::_exit(0) };
    }
    report(
        "clone-newuser",
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok("created".into())
        },
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "files" => files(arg(1), arg(2)),
        "net" => net(arg(1), arg(2)),
        "namespaces" => namespaces(),
        "connect" => {
            report("about-to-connect", Ok(String::new()));
            let r = std::net::TcpStream::connect(("127.0.0.1", arg(1).parse().unwrap_or(1)));
            report("tcp-connect", r.map(|_| "connected".into()));
        }
        "tap-persist" => {
            report("about-to-tunsetpersist", Ok(String::new()));
            // SAFETY: an ioctl with an integer argument on fd 0; whatever fd
            // 0 is, the filter decides on the request number first.
            let r = unsafe { libc::ioctl(0, 0x4004_54cb, 1) };
            report(
                "tunsetpersist",
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok("allowed".into())
                },
            );
        }
        mode if mode == "forbidden" || mode.starts_with('-') => {
            report("about-to-ptrace", Ok(String::new()));
            // SAFETY: PTRACE_TRACEME takes no pointers.
            let r = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            report(
                "ptrace",
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok("allowed".into())
                },
            );
        }
        other => {
            eprintln!(
                "moat-jail-probe: unknown mode {other:?}; use files, net, namespaces, connect, tap-persist or forbidden"
            );
            std::process::exit(2);
        }
    }
}

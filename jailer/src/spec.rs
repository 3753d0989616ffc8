//! The jail's command line, parsed into a typed spec and checked before any
//! step runs (step 1 of the sequence).
//!
//! ```text
//! moat-jailer --uid N --gid N [--group G]... --cgroup-procs FILE...
//!   --root DIR [--ro SRC:DST]... [--rw SRC:DST]... [--dev NAME]...
//!   [--nofile N] [--fsize BYTES] [--nproc N] [--hostname NAME]
//!   [--keep-fd N]... [--bind-fd N:DST:ro|rw]... [--seccomp qemu|libkrun]
//!   -- PROGRAM [ARG]...
//! ```
//! Paths given with `--ro`/`--rw` are bind-mounted at DST inside the new
//! root; `--dev` creates a device node (null, zero, random, urandom, kvm).
//! `--keep-fd` fds stay open into the VMM (a tap device); `--bind-fd` fds
//! are directories (volumes, opened by the broker beneath their roots) bound
//! at DST and then closed, so the jail never resolves a volume by path. The
//! fds named by both flags must be exactly 3, 4, ... with no gap: every
//! other inherited fd is closed. `--seccomp` names the allow-list the VMM
//! runs under (default `qemu`; `libkrun` for the `moat-vmm` runner).

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::error::JailError;

/// A bind mount into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub writable: bool,
}

/// Everything the jail needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub cgroup_procs: Vec<PathBuf>,
    pub root: PathBuf,
    pub binds: Vec<Bind>,
    pub devices: Vec<String>,
    pub nofile: u64,
    pub fsize: Option<u64>,
    pub nproc: u64,
    pub hostname: String,
    /// Fds passed through to the VMM.
    pub keep_fds: Vec<i32>,
    /// Directory fds bound into the jail, then closed.
    pub fd_binds: Vec<FdBind>,
    /// The seccomp allow-list the VMM runs under.
    pub seccomp: SeccompProfile,
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// Which compiled allow-list (`seccomp/<name>-x86_64.json`) to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompProfile {
    Qemu,
    Libkrun,
}

/// A directory the broker opened, bound at `dst` inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdBind {
    pub fd: i32,
    pub dst: PathBuf,
    pub writable: bool,
}

/// Device nodes the jail can create: name, major, minor.
pub const DEVICES: [(&str, u64, u64); 5] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("kvm", 10, 232),
];

fn invalid(msg: impl Into<String>) -> JailError {
    JailError::Spec(msg.into())
}

fn number<T: std::str::FromStr>(flag: &str, v: Option<OsString>) -> Result<T, JailError> {
    v.and_then(|s| s.to_str().and_then(|s| s.parse().ok()))
        .ok_or_else(|| invalid(format!("{flag} needs a number")))
}

fn path(flag: &str, v: Option<OsString>) -> Result<PathBuf, JailError> {
    let p = PathBuf::from(v.ok_or_else(|| invalid(format!("{flag} needs a path")))?);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(invalid(format!(
            "{flag} {} must be absolute without '..'",
            p.display()
        )));
    }
    Ok(p)
}

fn fd_number(flag: &str, v: &str) -> Result<i32, JailError> {
    match v.parse::<i32>() {
        Ok(n) if n >= 3 => Ok(n),
        _ => Err(invalid(format!("{flag} {v:?}: fd numbers start at 3"))),
    }
}

fn fd_bind(flag: &str, v: Option<OsString>) -> Result<FdBind, JailError> {
    let v = v
        .and_then(|v| v.into_string().ok())
        .ok_or_else(|| invalid(format!("{flag} needs N:DST:ro|rw")))?;
    let mut parts = v.splitn(2, ':');
    let fd = fd_number(flag, parts.next().unwrap_or_default())?;
    let rest = parts.next().unwrap_or_default();
    let (dst, mode) = rest
        .rsplit_once(':')
        .ok_or_else(|| invalid(format!("{flag} needs N:DST:ro|rw")))?;
    let writable = match mode {
        "rw" => true,
        "ro" => false,
        m => return Err(invalid(format!("{flag}: mode {m:?} is not ro or rw"))),
    };
    let dst = path(flag, Some(OsString::from(dst)))?;
    if dst == std::path::Path::new("/") {
        return Err(invalid(format!("{flag}: cannot bind over the jail's root")));
    }
    Ok(FdBind { fd, dst, writable })
}

fn bind(flag: &str, v: Option<OsString>, writable: bool) -> Result<Bind, JailError> {
    let v = v.ok_or_else(|| invalid(format!("{flag} needs SRC:DST")))?;
    let bytes = v.as_bytes();
    let colon = bytes
        .iter()
        .rposition(|b| *b == b':')
        .ok_or_else(|| invalid(format!("{flag} needs SRC:DST")))?;
    let src = path(
        flag,
        Some(OsString::from(std::ffi::OsStr::from_bytes(&bytes[..colon]))),
    )?;
    let dst = path(
        flag,
        Some(OsString::from(std::ffi::OsStr::from_bytes(
            &bytes[colon + 1..],
        ))),
    )?;
    if dst == std::path::Path::new("/") {
        return Err(invalid(format!("{flag}: cannot bind over the jail's root")));
    }
    Ok(Bind { src, dst, writable })
}

impl JailSpec {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, JailError> {
        let mut it = args.into_iter();
        let mut s = JailSpec {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            cgroup_procs: Vec::new(),
            root: PathBuf::new(),
            binds: Vec::new(),
            devices: Vec::new(),
            nofile: 1024,
            fsize: None,
            nproc: 256,
            hostname: "moat-vm".into(),
            keep_fds: Vec::new(),
            fd_binds: Vec::new(),
            seccomp: SeccompProfile::Qemu,
            program: PathBuf::new(),
            args: Vec::new(),
        };
        while let Some(flag) = it.next() {
            let flag = flag.to_string_lossy().into_owned();
            match flag.as_str() {
                "--uid" => s.uid = number(&flag, it.next())?,
                "--gid" => s.gid = number(&flag, it.next())?,
                "--group" => s.groups.push(number(&flag, it.next())?),
                "--cgroup-procs" => s.cgroup_procs.push(path(&flag, it.next())?),
                "--root" => s.root = path(&flag, it.next())?,
                "--ro" => s.binds.push(bind(&flag, it.next(), false)?),
                "--rw" => s.binds.push(bind(&flag, it.next(), true)?),
                "--dev" => {
                    let name = it
                        .next()
                        .map(|v| v.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if !DEVICES.iter().any(|(n, _, _)| *n == name) {
                        return Err(invalid(format!("--dev {name:?}: not an allowed device")));
                    }
                    s.devices.push(name);
                }
                "--keep-fd" => {
                    let v = it
                        .next()
                        .map(|v| v.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    s.keep_fds.push(fd_number(&flag, &v)?);
                }
                "--bind-fd" => s.fd_binds.push(fd_bind(&flag, it.next())?),
                "--seccomp" => {
                    s.seccomp = match it.next().and_then(|v| v.into_string().ok()).as_deref() {
                        Some("qemu") => SeccompProfile::Qemu,
                        Some("libkrun") => SeccompProfile::Libkrun,
                        other => {
                            return Err(invalid(format!(
                                "--seccomp {other:?}: use qemu or libkrun"
                            )))
                        }
                    }
                }
                "--nofile" => s.nofile = number(&flag, it.next())?,
                "--fsize" => s.fsize = Some(number(&flag, it.next())?),
                "--nproc" => s.nproc = number(&flag, it.next())?,
                "--hostname" => {
                    s.hostname = it
                        .next()
                        .map(|v| v.to_string_lossy().into_owned())
                        .unwrap_or_default()
                }
                "--" => {
                    s.program = path("program", it.next())?;
                    s.args = it.collect();
                    break;
                }
                other => return Err(invalid(format!("unknown argument {other:?}"))),
            }
        }
        s.validate()?;
        Ok(s)
    }

    /// The checks no later step may skip.
    pub fn validate(&self) -> Result<(), JailError> {
        if self.uid == 0 || self.gid == 0 || self.groups.contains(&0) {
            return Err(invalid(
                "the jailed process never runs as uid, gid or group 0",
            ));
        }
        if self.cgroup_procs.is_empty() {
            return Err(invalid(
                "--cgroup-procs is required: every VM process has its own cgroup",
            ));
        }
        if self.root.as_os_str().is_empty() || self.program.as_os_str().is_empty() {
            return Err(invalid("--root and a program after -- are required"));
        }
        let mut passed: Vec<i32> = self
            .keep_fds
            .iter()
            .copied()
            .chain(self.fd_binds.iter().map(|b| b.fd))
            .collect();
        passed.sort_unstable();
        if passed.iter().zip(3..).any(|(fd, want)| *fd != want) {
            return Err(invalid(
                "--keep-fd and --bind-fd must name fds 3, 4, ... once each, without gaps",
            ));
        }
        if self.nofile == 0 || self.nproc == 0 {
            return Err(invalid("--nofile and --nproc must be above 0"));
        }
        if self.hostname.is_empty()
            || self.hostname.len() > 63
            || !self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "--hostname must be 1-63 letters, digits, '-' or '_'",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<JailSpec, JailError> {
        JailSpec::parse(args.iter().map(OsString::from))
    }

    const OK: [&str; 14] = [
        "--uid",
        "5000",
        "--gid",
        "5000",
        "--cgroup-procs",
        "/sys/fs/cgroup/x/cgroup.procs",
        "--root",
        "/var/lib/moat/jails/0",
        "--ro",
        "/usr:/usr",
        "--dev",
        "null",
        "--",
        "/usr/bin/qemu",
    ];

    #[test]
    fn parses_a_full_spec() {
        let mut args = OK.to_vec();
        args.extend(["-M", "microvm"]);
        let s = parse(&args).unwrap();
        assert_eq!((s.uid, s.gid), (5000, 5000));
        assert_eq!(
            s.binds,
            vec![Bind {
                src: "/usr".into(),
                dst: "/usr".into(),
                writable: false
            }]
        );
        assert_eq!(
            s.args,
            vec![OsString::from("-M"), OsString::from("microvm")]
        );
        assert_eq!(s.seccomp, SeccompProfile::Qemu);
    }

    #[test]
    fn the_seccomp_profile_is_chosen_from_a_closed_list() {
        let with = |profile: &str| {
            let mut args = vec!["--seccomp", profile];
            args.extend(OK);
            parse(&args)
        };
        assert_eq!(with("libkrun").unwrap().seccomp, SeccompProfile::Libkrun);
        assert_eq!(with("qemu").unwrap().seccomp, SeccompProfile::Qemu);
        let err = with("none").unwrap_err().to_string();
        assert!(err.contains("use qemu or libkrun"), "{err}");
    }

    #[test]
    fn refuses_root_ids_missing_cgroup_and_bad_paths() {
        let with = |from: &str, to: &str| {
            let args: Vec<&str> = OK.iter().map(|a| if *a == from { to } else { a }).collect();
            parse(&args)
        };
        assert!(with("5000", "0").is_err());
        assert!(with("/usr:/usr", "/usr:/").is_err());
        assert!(with("/usr:/usr", "/usr/../etc:/etc").is_err());
        assert!(with("/usr:/usr", "usr:/usr").is_err());
        assert!(with("null", "sda").is_err());
        assert!(with("--cgroup-procs", "--bogus").is_err());
        let no_cgroup: Vec<&str> = OK
            .iter()
            .copied()
            .filter(|a| !a.contains("cgroup"))
            .collect();
        assert!(parse(&no_cgroup).is_err());
    }

    #[test]
    fn passed_fds_are_contiguous_from_3() {
        let with = |extra: &[&str]| {
            let mut args: Vec<&str> = OK[..OK.len() - 2].to_vec();
            args.extend(extra);
            args.extend(["--", "/usr/bin/qemu"]);
            parse(&args)
        };
        let s = with(&[
            "--keep-fd",
            "3",
            "--bind-fd",
            "4:/vol/0:ro",
            "--bind-fd",
            "5:/vol/1:rw",
        ])
        .unwrap();
        assert_eq!(s.keep_fds, vec![3]);
        assert_eq!(
            s.fd_binds,
            vec![
                FdBind {
                    fd: 4,
                    dst: "/vol/0".into(),
                    writable: false
                },
                FdBind {
                    fd: 5,
                    dst: "/vol/1".into(),
                    writable: true
                }
            ]
        );
        assert!(with(&["--keep-fd", "4"]).is_err(), "gap at 3");
        assert!(
            with(&["--keep-fd", "3", "--bind-fd", "3:/v:ro"]).is_err(),
            "twice"
        );
        assert!(with(&["--keep-fd", "2"]).is_err());
        assert!(with(&["--bind-fd", "3:/v:rx"]).is_err());
        assert!(with(&["--bind-fd", "3:/:rw"]).is_err());
        assert!(with(&["--bind-fd", "3:/a/../b:rw"]).is_err());
        assert!(with(&["--bind-fd", "3:relative:rw"]).is_err());
    }
}

//! The identity commands, REPL interpreters and the background process run
//! as: the image's `User` as Docker reads it (`name`, `uid`, `name:group`,
//! `uid:gid`), looked up in the guest's `/etc/passwd` and `/etc/group`.
//! Empty means root. The switch happens in the forked child right before
//! exec (supplementary groups, then gid, then uid).

use std::io;

use crate::error::{AgentError, Result};

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// From /etc/passwd, when the user is listed there.
    pub home: Option<String>,
}

/// Resolves `user` against the guest's account files; `None` for root
/// (empty, `root`, `0`).
pub fn resolve(user: &str) -> Result<Option<Identity>> {
    if user.is_empty() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let id = resolve_in(user, &passwd, &group).map_err(AgentError::BadRequest)?;
    Ok((id.uid != 0 || id.gid != 0 || !id.groups.is_empty()).then_some(id))
}

/// Fields of one colon-separated account line.
fn fields(line: &str) -> Vec<&str> {
    line.split(':').collect()
}

fn resolve_in(user: &str, passwd: &str, group: &str) -> std::result::Result<Identity, String> {
    if user.len() > 256 || user.contains('\0') {
        return Err("the image's User is over 256 bytes or has a NUL".into());
    }
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = passwd.lines().map(fields).find(|f| {
        f.len() >= 7
            && (f[0] == user_part || (user_part.parse::<u32>().is_ok() && f[2] == user_part))
    });
    let (uid, primary, name, home) = match (entry, user_part.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse::<u32>()
                .map_err(|_| format!("bad uid in /etc/passwd for {}", f[0]))?,
            f[3].parse::<u32>()
                .map_err(|_| format!("bad gid in /etc/passwd for {}", f[0]))?,
            Some(f[0].to_owned()),
            Some(f[5].to_owned()).filter(|h| h.starts_with('/')),
        ),
        // A numeric uid the image does not list: group root, as Docker.
        (None, Ok(uid)) => (uid, 0, None, None),
        (None, Err(_)) => {
            return Err(format!(
                "the image's User {user_part:?} is not in the guest's /etc/passwd"
            ))
        }
    };
    let groups_file: Vec<Vec<&str>> = group.lines().map(fields).filter(|f| f.len() >= 4).collect();
    let (gid, groups) = match group_part {
        Some(g) => {
            let gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => groups_file
                    .iter()
                    .find(|f| f[0] == g)
                    .and_then(|f| f[2].parse().ok())
                    .ok_or_else(|| {
                        format!("the image's group {g:?} is not in the guest's /etc/group")
                    })?,
            };
            (gid, Vec::new())
        }
        None => {
            let mut extra: Vec<u32> = match &name {
                Some(n) => groups_file
                    .iter()
                    .filter(|f| f[3].split(',').any(|m| m == n))
                    .filter_map(|f| f[2].parse().ok())
                    .collect(),
                None => Vec::new(),
            };
            extra.retain(|g| *g != primary);
            extra.sort_unstable();
            extra.dedup();
            (primary, extra)
        }
    };
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
    })
}

/// Switches the calling (freshly forked) process to `id`. Only raw,
/// async-signal-safe syscalls on data prepared before the fork.
pub fn switch_in_child(id: &Identity) -> io::Result<()> {
    // SAFETY: setgroups reads `groups.len()` gid_t values from a live Vec;
    // setgid/setuid take plain integers.
    unsafe {
        if libc::setgroups(id.groups.len(), id.groups.as_ptr()) != 0
            || libc::setgid(id.gid) != 0
            || libc::setuid(id.uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The environment value to use: a user's own home replaces the root
/// default the broker sends.
pub fn env_value<'a>(key: &str, value: &'a str, id: Option<&'a Identity>) -> &'a str {
    match id.and_then(|i| i.home.as_deref()) {
        Some(home) if key == "HOME" && value == "/root" => home,
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          app:x:1000:1000:App:/home/app:/bin/sh\n\
                          www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nwww-data:x:33:app\napp:x:1000:\ndocker:x:999:app,other\n";

    #[test]
    fn names_and_numbers_resolve_as_docker_does() {
        let app = resolve_in("app", PASSWD, GROUP).unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1000));
        assert_eq!(app.groups, vec![33, 999]);
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        let n = resolve_in("1000", PASSWD, GROUP).unwrap();
        assert_eq!((n.uid, n.gid), (1000, 1000));
        let unlisted = resolve_in("4242", PASSWD, GROUP).unwrap();
        assert_eq!((unlisted.uid, unlisted.gid, unlisted.home), (4242, 0, None));
        let pair = resolve_in("app:www-data", PASSWD, GROUP).unwrap();
        assert_eq!((pair.uid, pair.gid, pair.groups.len()), (1000, 33, 0));
        let nums = resolve_in("5:7", PASSWD, GROUP).unwrap();
        assert_eq!((nums.uid, nums.gid), (5, 7));
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(resolve_in("nobody-here", PASSWD, GROUP)
            .unwrap_err()
            .contains("/etc/passwd"));
        assert!(resolve_in("app:nogroup", PASSWD, GROUP)
            .unwrap_err()
            .contains("/etc/group"));
    }

    #[test]
    fn home_replaces_only_the_root_default() {
        let app = resolve_in("app", PASSWD, GROUP).unwrap();
        assert_eq!(env_value("HOME", "/root", Some(&app)), "/home/app");
        assert_eq!(env_value("HOME", "/custom", Some(&app)), "/custom");
        assert_eq!(env_value("HOME", "/root", None), "/root");
    }
}

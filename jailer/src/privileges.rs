//! Identity and privilege steps: rlimits, the capability bounding set,
//! uid/gid, `no_new_privs`, the parent-death signal.

use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

use crate::error::JailError;
use crate::spec::JailSpec;

/// Highest capability number this kernel knows (read before pivot_root).
pub fn last_cap() -> Result<u32, JailError> {
    let text = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(JailError::step("read cap_last_cap"))?;
    text.trim()
        .parse()
        .map_err(|_| JailError::Spec(format!("cap_last_cap {text:?} is not a number")))
}

pub fn set_rlimits(spec: &JailSpec) -> Result<(), JailError> {
    let set = |r, v: u64| setrlimit(r, v, v).map_err(JailError::errno("setrlimit"));
    set(Resource::RLIMIT_NOFILE, spec.nofile)?;
    set(Resource::RLIMIT_NPROC, spec.nproc)?;
    set(Resource::RLIMIT_CORE, 0)?;
    if let Some(fsize) = spec.fsize {
        set(Resource::RLIMIT_FSIZE, fsize)?;
    }
    Ok(())
}

/// Empties the bounding set, so nothing exec'd later can regain a capability.
pub fn drop_bounding_set(last: u32) -> Result<(), JailError> {
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            return Err(JailError::step("drop the capability bounding set")(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Supplementary groups, then gid, then uid (real, effective, saved). Going
/// from uid 0 to a non-zero uid clears the permitted and effective sets.
pub fn drop_ids(spec: &JailSpec) -> Result<(), JailError> {
    let groups: Vec<Gid> = spec.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&groups).map_err(JailError::errno("setgroups"))?;
    let gid = Gid::from_raw(spec.gid);
    setresgid(gid, gid, gid).map_err(JailError::errno("setresgid"))?;
    let uid = Uid::from_raw(spec.uid);
    setresuid(uid, uid, uid).map_err(JailError::errno("setresuid"))?;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(JailError::step("clear ambient capabilities")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

pub fn no_new_privs() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        return Err(JailError::step("no_new_privs")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// SIGKILL when the parent (the waiting jailer) dies; set after the uid
/// change, which would clear it.
pub fn die_with_parent() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if r != 0 {
        return Err(JailError::step("parent-death signal")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Ends this process by `sig` so the broker sees how the VM process died.
pub fn die_by(sig: Signal) -> ! {
    // SAFETY: resetting a signal's disposition and raising it; no handlers run.
    unsafe {
        libc::signal(sig as libc::c_int, libc::SIG_DFL);
        libc::raise(sig as libc::c_int);
    }
    std::process::exit(128 + sig as i32)
}

//! The seccomp filters compiled at build time from `seccomp/qemu-x86_64.json`
//! (see build.rs): `QEMU` allows only the listed syscalls and kills the
//! process on any other (some with argument checks: `clone` never makes
//! namespaces, `socket` is AF_UNIX only); `ENOSYS` answers io_uring and
//! clone3 with ENOSYS.

use seccompiler::{apply_filter, sock_filter, BpfProgram};

use crate::error::JailError;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

fn program(insns: &[(u16, u8, u8, u32)]) -> BpfProgram {
    insns
        .iter()
        .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
        .collect()
}

/// The filters to install, most specific first.
pub fn filters() -> Vec<BpfProgram> {
    vec![program(generated::ENOSYS), program(generated::QEMU)]
}

/// Installs every filter (needs `no_new_privs` or CAP_SYS_ADMIN).
pub fn install(filters: &[BpfProgram]) -> Result<(), JailError> {
    for f in filters {
        apply_filter(f).map_err(|e| JailError::Spec(format!("install seccomp filter: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compiled_and_nonempty() {
        let f = filters();
        assert_eq!(f.len(), 2);
        assert!(
            f[1].len() > 50,
            "allow-list has {} instructions",
            f[1].len()
        );
    }
}

//! The seccomp filters compiled at build time from `seccomp/*.json` (see
//! build.rs): `QEMU` (for QEMU) and `LIBKRUN` (for the `moat-vmm` runner)
//! allow only the listed syscalls and kill the process on any other (some
//! with argument checks: `clone` never makes namespaces, `socket` is
//! AF_UNIX only); `ENOSYS`, installed under either, answers io_uring and
//! clone3 with ENOSYS.

use seccompiler::{apply_filter, sock_filter, BpfProgram};

use crate::error::JailError;
use crate::spec::SeccompProfile;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

fn program(insns: &[(u16, u8, u8, u32)]) -> BpfProgram {
    insns
        .iter()
        .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
        .collect()
}

/// The filters to install for `profile`, most specific first.
pub fn filters(profile: SeccompProfile) -> Vec<BpfProgram> {
    let allow = match profile {
        SeccompProfile::Qemu => generated::QEMU,
        SeccompProfile::Libkrun => generated::LIBKRUN,
    };
    vec![program(generated::ENOSYS), program(allow)]
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
        for profile in [SeccompProfile::Qemu, SeccompProfile::Libkrun] {
            let f = filters(profile);
            assert_eq!(f.len(), 2);
            assert!(
                f[1].len() > 50,
                "{profile:?} allow-list has {} instructions",
                f[1].len()
            );
        }
        assert_ne!(
            filters(SeccompProfile::Qemu)[1],
            filters(SeccompProfile::Libkrun)[1]
        );
    }
}

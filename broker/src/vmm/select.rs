//! Chooses the VM backend (`[vmm] backend`): libkrun where `/dev/kvm` is
//! hardware KVM (and its runner is installed), QEMU everywhere else. An
//! explicit choice that cannot work on this host is an error at broker
//! start, never a fallback and never a hang (libkrun under kvm-pvm would
//! spin in instruction emulation).

use std::path::Path;

use super::accel::HostFacts;

/// The backend a broker runs every VM on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Libkrun,
    Qemu,
}

/// Why hardware KVM is not usable here, or `None` when it is.
pub fn kvm_unusable(facts: &HostFacts) -> Option<&'static str> {
    if !facts.dev_kvm {
        Some("there is no /dev/kvm")
    } else if facts.kvm_pvm {
        Some("/dev/kvm is kvm-pvm, which cannot run a stock guest kernel")
    } else if !facts.cpu_has_virt {
        Some("the CPU has no VMX/SVM")
    } else {
        None
    }
}

/// Picks the backend for `preference` ("auto", "libkrun", "qemu") and says
/// why. `runner` is the `moat-vmm` binary libkrun needs.
pub fn choose_backend(
    preference: &str,
    facts: &HostFacts,
    runner: &Path,
) -> Result<(Backend, String), String> {
    let runner_missing = || {
        format!(
            "the libkrun runner {} is missing: install moat-vmm next to moat-broker or set [vmm] runner",
            runner.display()
        )
    };
    match (preference, kvm_unusable(facts)) {
        ("qemu", _) => Ok((Backend::Qemu, "qemu chosen in config".into())),
        ("libkrun", Some(why)) => Err(format!(
            "vmm.backend = \"libkrun\" cannot work here: {why}; libkrun needs hardware KVM (VMX/SVM). Use backend = \"qemu\" or \"auto\""
        )),
        ("libkrun", None) if !runner.is_file() => Err(runner_missing()),
        ("auto", None) if !runner.is_file() => Ok((
            Backend::Qemu,
            format!("libkrun not used: {}", runner_missing()),
        )),
        ("libkrun" | "auto", None) => Ok((Backend::Libkrun, "hardware KVM".into())),
        ("auto", Some(why)) => Ok((Backend::Qemu, format!("libkrun not used: {why}"))),
        (other, _) => Err(format!(
            "vmm.backend {other:?}: use \"auto\", \"libkrun\" or \"qemu\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PVM: HostFacts = HostFacts {
        cpu_has_virt: false,
        dev_kvm: true,
        kvm_pvm: true,
    };
    const HARDWARE: HostFacts = HostFacts {
        cpu_has_virt: true,
        dev_kvm: true,
        kvm_pvm: false,
    };

    #[test]
    fn a_pvm_host_runs_qemu_and_refuses_libkrun_with_the_reason() {
        let runner = Path::new("/nonexistent/moat-vmm");
        let (b, why) = choose_backend("auto", &PVM, runner).unwrap();
        assert_eq!(b, Backend::Qemu);
        assert!(why.contains("kvm-pvm"), "{why}");
        let err = choose_backend("libkrun", &PVM, runner).unwrap_err();
        assert!(err.contains("kvm-pvm") && err.contains("\"qemu\""), "{err}");
        let none = HostFacts::default();
        let err = choose_backend("libkrun", &none, runner).unwrap_err();
        assert!(err.contains("no /dev/kvm"), "{err}");
    }

    #[test]
    fn a_hardware_host_runs_libkrun_when_the_runner_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let runner = dir.path().join("moat-vmm");
        // auto without the runner: QEMU, saying why; an explicit libkrun
        // without it is an error.
        let (b, why) = choose_backend("auto", &HARDWARE, &runner).unwrap();
        assert_eq!(b, Backend::Qemu);
        assert!(why.contains("runner") && why.contains("missing"), "{why}");
        let err = choose_backend("libkrun", &HARDWARE, &runner).unwrap_err();
        assert!(err.contains("runner") && err.contains("missing"), "{err}");
        std::fs::write(&runner, b"").unwrap();
        assert_eq!(
            choose_backend("auto", &HARDWARE, &runner).unwrap().0,
            Backend::Libkrun
        );
        assert_eq!(
            choose_backend("libkrun", &HARDWARE, &runner).unwrap().0,
            Backend::Libkrun
        );
        assert_eq!(
            choose_backend("qemu", &HARDWARE, &runner).unwrap().0,
            Backend::Qemu
        );
        assert!(choose_backend("firecracker", &HARDWARE, &runner)
            .unwrap_err()
            .contains("use \"auto\""));
    }
}

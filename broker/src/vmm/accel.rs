//! Chooses between hardware KVM and TCG. A host can have a `/dev/kvm` that
//! cannot run a stock guest kernel (kvm-pvm, see docs): KVM is used only when
//! the CPU advertises VMX/SVM and the PVM module is absent.

use std::path::Path;

/// The accelerator a QEMU VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Host facts the decision rests on (read from `/proc` and `/sys`).
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub cpu_has_virt: bool,
    pub dev_kvm: bool,
    pub kvm_pvm: bool,
}

impl HostFacts {
    pub fn read(root: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
        let cpu_has_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        Self {
            cpu_has_virt,
            dev_kvm: root.join("dev/kvm").exists(),
            kvm_pvm: root.join("sys/module/kvm_pvm").exists(),
        }
    }
}

/// Picks the accelerator for `preference` ("auto", "kvm", "tcg") and says why.
pub fn detect_accel(preference: &str, facts: &HostFacts) -> Result<(Accel, String), String> {
    let why_not = super::select::kvm_unusable(facts);
    match (preference, why_not) {
        ("kvm", Some(why)) => Err(format!(
            "vmm.accel = \"kvm\" but KVM is not usable here: {why}"
        )),
        ("kvm", None) | ("auto", None) => Ok((Accel::Kvm, "hardware KVM".into())),
        ("tcg", _) => Ok((Accel::Tcg, "tcg chosen in config".into())),
        (_, why) => Ok((
            Accel::Tcg,
            format!("tcg software emulation: {}", why.unwrap_or("")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_host_falls_back_to_tcg_and_says_why() {
        let f = HostFacts {
            cpu_has_virt: false,
            dev_kvm: true,
            kvm_pvm: true,
        };
        let (a, why) = detect_accel("auto", &f).unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("kvm-pvm"), "{why}");
        assert!(detect_accel("kvm", &f).unwrap_err().contains("kvm-pvm"));
    }

    #[test]
    fn hardware_host_uses_kvm_unless_told_otherwise() {
        let f = HostFacts {
            cpu_has_virt: true,
            dev_kvm: true,
            kvm_pvm: false,
        };
        assert_eq!(detect_accel("auto", &f).unwrap().0, Accel::Kvm);
        assert_eq!(detect_accel("tcg", &f).unwrap().0, Accel::Tcg);
    }

    #[test]
    fn reads_facts_from_a_fake_root() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("proc")).unwrap();
        std::fs::write(t.path().join("proc/cpuinfo"), "flags\t: fpu svm sse\n").unwrap();
        let f = HostFacts::read(t.path());
        assert!(f.cpu_has_virt && !f.dev_kvm && !f.kvm_pvm);
    }
}

//! A sandbox's identity, from `Setup.identity`: its hostname, a machine id
//! in `/etc/machine-id`, and host entropy mixed into the kernel's pool with
//! the CRNG reseeded at once. A VM from the warm pool booted before its
//! sandbox existed, so none of these may come from its boot: everything
//! that tells sandboxes apart is set here, for cold and pooled VMs alike.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use moat_proto::agent::Identity;
use moat_proto::names::validate_name;

use crate::error::{AgentError, Context, Result};

/// Most entropy bytes accepted (the kernel's input pool is 256 bits; more
/// is mixed in but adds nothing).
pub const MAX_ENTROPY: usize = 512;
/// Entropy bytes required: at least the CRNG's key size.
pub const MIN_ENTROPY: usize = 32;

/// An `Identity` that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub hostname: String,
    pub machine_id: String,
    pub entropy: Vec<u8>,
}

fn bad(msg: String) -> AgentError {
    AgentError::BadRequest(msg)
}

/// Checks every field before anything is changed.
pub fn check(id: &Identity) -> Result<Checked> {
    validate_name("setup: identity.hostname", &id.hostname).map_err(|e| bad(e.to_string()))?;
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if id.machine_id.len() != 32 || !id.machine_id.bytes().all(hex) {
        return Err(bad(format!(
            "setup: identity.machine_id {:?} is not 32 lowercase hex digits",
            id.machine_id
        )));
    }
    if id.machine_id.bytes().all(|b| b == b'0') {
        return Err(bad("setup: identity.machine_id cannot be all zeros".into()));
    }
    if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&id.entropy.len()) {
        return Err(bad(format!(
            "setup: identity.entropy has {} bytes; give {MIN_ENTROPY} to {MAX_ENTROPY}",
            id.entropy.len()
        )));
    }
    Ok(Checked {
        hostname: id.hostname.clone(),
        machine_id: id.machine_id.clone(),
        entropy: id.entropy.clone(),
    })
}

/// Writes `<etc>/machine-id` (mode 0444) through a temporary file and a
/// rename, creating `<etc>` when the image has none.
pub fn write_machine_id(etc: &Path, id: &str) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(etc)
        .ctx(|| format!("create {}", etc.display()))?;
    let path = etc.join("machine-id");
    let tmp = etc.join(".machine-id~moat-tmp");
    let what = || format!("write {}", path.display());
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&tmp)
        .ctx(what)?;
    f.write_all(format!("{id}\n").as_bytes()).ctx(what)?;
    f.set_permissions(Permissions::from_mode(0o444)).ctx(what)?;
    drop(f);
    fs::rename(&tmp, &path).ctx(what)
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// The `struct rand_pool_info` RNDADDENTROPY reads: entropy bits credited,
/// buffer size in bytes, then the bytes (as 32-bit words).
fn rand_pool_info(bytes: &[u8]) -> Vec<u32> {
    let mut words = vec![0u32; 2 + bytes.len().div_ceil(4)];
    words[0] = (bytes.len() * 8) as u32;
    words[1] = bytes.len() as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        words[2 + i] = u32::from_ne_bytes(w);
    }
    words
}

/// Mixes `bytes` into the kernel's entropy pool and reseeds the CRNG from
/// it at once, so every random number drawn after this depends on them.
pub fn reseed(bytes: &[u8]) -> Result<()> {
    let random = File::open("/dev/random").ctx(|| "open /dev/random")?;
    let info = rand_pool_info(bytes);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info: two ints then buf_size
    // bytes, all inside `info`, which outlives the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error()).ctx(|| "RNDADDENTROPY");
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(std::io::Error::last_os_error()).ctx(|| "RNDRESEEDCRNG");
    }
    Ok(())
}

/// Applies a checked identity to this VM.
pub fn apply(id: &Checked) -> Result<()> {
    nix::unistd::sethostname(&id.hostname).ctx(|| format!("sethostname {:?}", id.hostname))?;
    write_machine_id(Path::new("/etc"), &id.machine_id)?;
    reseed(&id.entropy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Identity {
        Identity {
            hostname: "sb-1".into(),
            entropy: vec![7; 64],
            machine_id: "0123456789abcdef0123456789abcdef".into(),
        }
    }

    #[test]
    fn a_good_identity_passes() {
        let c = check(&good()).unwrap();
        assert_eq!(c.hostname, "sb-1");
        assert_eq!(c.entropy.len(), 64);
    }

    #[test]
    fn every_bad_field_is_refused_by_name() {
        let cases: Vec<(Identity, &str)> = vec![
            (
                Identity {
                    hostname: "a.b".into(),
                    ..good()
                },
                "hostname",
            ),
            (
                Identity {
                    machine_id: "0123".into(),
                    ..good()
                },
                "machine_id",
            ),
            (
                Identity {
                    machine_id: "0123456789ABCDEF0123456789ABCDEF".into(),
                    ..good()
                },
                "machine_id",
            ),
            (
                Identity {
                    machine_id: "0".repeat(32),
                    ..good()
                },
                "all zeros",
            ),
            (
                Identity {
                    entropy: vec![1; 8],
                    ..good()
                },
                "entropy",
            ),
            (
                Identity {
                    entropy: vec![1; MAX_ENTROPY + 1],
                    ..good()
                },
                "entropy",
            ),
        ];
        for (id, word) in cases {
            let err = check(&id).expect_err(word);
            assert!(matches!(err, AgentError::BadRequest(_)), "{err}");
            assert!(err.to_string().contains(word), "{word}: {err}");
        }
    }

    #[test]
    fn the_pool_info_header_counts_bits_and_bytes() {
        let w = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(w[0], 40);
        assert_eq!(w[1], 5);
        assert_eq!(w.len(), 4);
        assert_eq!(w[2].to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(w[3].to_ne_bytes(), [5, 0, 0, 0]);
    }

    #[test]
    fn the_machine_id_is_replaced_atomically_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        write_machine_id(&etc, "0123456789abcdef0123456789abcdef").unwrap();
        write_machine_id(&etc, "fedcba9876543210fedcba9876543210").unwrap();
        let path = etc.join("machine-id");
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "fedcba9876543210fedcba9876543210\n"
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o444);
        assert_eq!(fs::read_dir(&etc).unwrap().count(), 1);
    }
}

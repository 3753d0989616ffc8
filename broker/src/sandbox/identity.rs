//! A fresh identity for every sandbox (`Setup.identity`): its hostname, a
//! random machine id and host entropy for the guest's CRNG. Made at each
//! start, cold or from the warm pool, and never reused.

use moat_proto::agent::Identity;

use crate::error::BrokerError;

/// Entropy bytes given to each guest (the guest accepts 32 to 512).
const ENTROPY_BYTES: usize = 64;

/// Fills `buf` from the kernel's CSPRNG.
fn random(buf: &mut [u8]) -> Result<(), BrokerError> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // which is valid, writable memory we own for the whole call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(BrokerError::Failed(format!("getrandom: {e}")));
        }
        filled += n as usize;
    }
    Ok(())
}

/// A new identity for the sandbox `hostname`.
pub fn fresh(hostname: &str) -> Result<Identity, BrokerError> {
    let mut entropy = vec![0u8; ENTROPY_BYTES];
    random(&mut entropy)?;
    let mut id = [0u8; 16];
    // An all-zero id is refused by the guest; 2^-128 is not worth a loop.
    random(&mut id)?;
    Ok(Identity {
        hostname: hostname.to_owned(),
        entropy,
        machine_id: hex::encode(id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_identities_share_nothing_random() {
        let a = fresh("sb").unwrap();
        let b = fresh("sb").unwrap();
        assert_eq!(a.hostname, "sb");
        assert_eq!(a.machine_id.len(), 32);
        assert!(a
            .machine_id
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a.machine_id, b.machine_id);
        assert_ne!(a.entropy, b.entropy);
        assert_eq!(a.entropy.len(), ENTROPY_BYTES);
    }
}

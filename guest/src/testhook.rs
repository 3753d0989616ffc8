//! Test hooks: deliberate protocol misbehaviour, so that the broker's
//! defences against a hostile guest can be tested end to end.
//!
//! Off unless the agent's environment has `MOAT_TEST_HOOKS=1` (the kernel
//! passes unknown `key=value` words of its command line to PID 1 as
//! environment; the broker adds this word only when its operator config
//! enables testing hooks). When on, an `Exec` whose program is exactly
//! [`PROGRAM`] spawns nothing; its first argument picks what happens to the
//! reply to *that* request:
//!
//! - `oversized`: a frame header claiming 1 GiB, then a few bytes;
//! - `garbage`: a valid 4-byte length header followed by bytes that do not
//!   decode as a `GuestMessage`;
//! - `stall`: no reply at all (the request's slot is freed anyway);
//! - `hang`: the agent stops reading its channel for good (a hung agent:
//!   no request is answered again, not even a shutdown).
//!
//! Any other argument gets a `Failure` listing these. When off, such an
//! `Exec` is an ordinary command (normally exit code 127, not found).

use moat_proto::agent::{host_message, HostMessage};

/// Environment variable that enables the hooks when set to "1".
pub const ENV: &str = "MOAT_TEST_HOOKS";
/// The `Exec` program that triggers a hook.
pub const PROGRAM: &str = "moat-test-hook";

/// Length claimed by the `oversized` frame header.
pub const OVERSIZED_LEN: u32 = 1 << 30;

/// Whether this process's environment enables the hooks.
pub fn enabled_from_env() -> bool {
    std::env::var(ENV).is_ok_and(|v| v == "1")
}

/// A deliberate misbehaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    Oversized,
    Garbage,
    Stall,
    Hang,
}

impl Misbehaviour {
    /// The raw bytes to write instead of a reply (`None`: write nothing).
    pub fn bytes(self) -> Option<Vec<u8>> {
        match self {
            Misbehaviour::Oversized => {
                let mut bytes = OVERSIZED_LEN.to_be_bytes().to_vec();
                bytes.extend_from_slice(b"moat");
                Some(bytes)
            }
            // Field 1 with wire type 7, which does not exist: any protobuf
            // decoder rejects it at the first byte.
            Misbehaviour::Garbage => Some(vec![0, 0, 0, 6, 0x0f, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Misbehaviour::Stall | Misbehaviour::Hang => None,
        }
    }
}

/// If `msg` asks for a hook: `Ok` with the misbehaviour, or `Err` with the
/// text of a `Failure` for an unknown hook name.
pub fn intercept(msg: &HostMessage) -> Option<Result<Misbehaviour, String>> {
    let Some(host_message::Body::Exec(exec)) = &msg.body else {
        return None;
    };
    if exec.program != PROGRAM {
        return None;
    }
    Some(match exec.args.first().map(String::as_str) {
        Some("oversized") => Ok(Misbehaviour::Oversized),
        Some("garbage") => Ok(Misbehaviour::Garbage),
        Some("stall") => Ok(Misbehaviour::Stall),
        Some("hang") => Ok(Misbehaviour::Hang),
        Some(other) => Err(format!(
            "{PROGRAM}: unknown hook {other:?}; known hooks: oversized, garbage, stall, hang"
        )),
        None => Err(format!(
            "{PROGRAM}: no hook named; known hooks: oversized, garbage, stall, hang"
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_proto::agent::{Exec, GuestMessage, Hello};
    use moat_proto::frame;
    use prost::Message;

    fn exec(program: &str, args: &[&str]) -> HostMessage {
        HostMessage {
            id: 1,
            body: Some(host_message::Body::Exec(Exec {
                program: program.into(),
                args: args.iter().map(|s| (*s).to_owned()).collect(),
                ..Exec::default()
            })),
        }
    }

    #[test]
    fn only_the_hook_program_is_intercepted() {
        assert_eq!(
            intercept(&exec(PROGRAM, &["garbage"])),
            Some(Ok(Misbehaviour::Garbage))
        );
        assert_eq!(
            intercept(&exec(PROGRAM, &["stall"])),
            Some(Ok(Misbehaviour::Stall))
        );
        assert_eq!(
            intercept(&exec(PROGRAM, &["hang"])),
            Some(Ok(Misbehaviour::Hang))
        );
        assert!(matches!(intercept(&exec(PROGRAM, &["nope"])), Some(Err(_))));
        assert!(matches!(intercept(&exec(PROGRAM, &[])), Some(Err(_))));
        assert_eq!(intercept(&exec("/bin/moat-test-hook", &["stall"])), None);
        let hello = HostMessage {
            id: 2,
            body: Some(host_message::Body::Hello(Hello::default())),
        };
        assert_eq!(intercept(&hello), None);
    }

    #[test]
    fn garbage_has_a_valid_header_and_an_undecodable_body() {
        let bytes = Misbehaviour::Garbage.bytes().expect("bytes");
        let len = frame::body_len([bytes[0], bytes[1], bytes[2], bytes[3]], 1024).expect("len");
        assert_eq!(len, bytes.len() - 4);
        assert!(GuestMessage::decode(&bytes[4..]).is_err());
    }

    #[test]
    fn oversized_claims_a_gibibyte() {
        let bytes = Misbehaviour::Oversized.bytes().expect("bytes");
        assert_eq!(&bytes[..4], &(1u32 << 30).to_be_bytes());
        assert!(bytes.len() < 16);
        assert_eq!(Misbehaviour::Stall.bytes(), None);
    }
}

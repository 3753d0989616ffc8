//! Sandbox and namespace names, as the wire contract defines them: 1-63
//! characters, `[A-Za-z0-9][A-Za-z0-9_-]*`. Both the gateway and the broker
//! check names with this one function (the broker never trusts the gateway's
//! check).

/// Longest accepted name.
pub const MAX_NAME_LEN: usize = 63;

/// Why a name was refused; the message says what a valid name looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} cannot be empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong { what: &'static str, len: usize },
    #[error("{what} {name:?} must start with a letter or digit")]
    BadStart { what: &'static str, name: String },
    #[error("{what} {name:?} contains {ch:?}; use only letters, digits, '-' and '_'")]
    BadChar {
        what: &'static str,
        name: String,
        ch: char,
    },
}

/// Checks a name; `what` ("sandbox name", "namespace") goes into the message.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NameError> {
    let len = name.chars().count();
    if len == 0 {
        return Err(NameError::Empty { what });
    }
    if len > MAX_NAME_LEN {
        return Err(NameError::TooLong { what, len });
    }
    let shown = || name.chars().take(MAX_NAME_LEN).collect::<String>();
    let mut chars = name.chars();
    if let Some(first) = chars.next() {
        if !first.is_ascii_alphanumeric() {
            return Err(NameError::BadStart {
                what,
                name: shown(),
            });
        }
    }
    if let Some(ch) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        return Err(NameError::BadChar {
            what,
            name: shown(),
            ch,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for n in ["a", "default", "my-python_env", "A1", &"x".repeat(63)] {
            assert_eq!(validate_name("sandbox name", n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_invalid_names_with_reason() {
        assert_eq!(
            validate_name("namespace", ""),
            Err(NameError::Empty { what: "namespace" })
        );
        assert!(matches!(
            validate_name("n", &"x".repeat(64)),
            Err(NameError::TooLong { len: 64, .. })
        ));
        assert!(matches!(
            validate_name("n", "-a"),
            Err(NameError::BadStart { .. })
        ));
        assert!(matches!(
            validate_name("n", "_a"),
            Err(NameError::BadStart { .. })
        ));
        for (name, bad) in [
            ("a/b", '/'),
            ("a..b", '.'),
            ("a b", ' '),
            ("a*", '*'),
            ("é", 'é'),
        ] {
            match validate_name("n", name) {
                Err(NameError::BadChar { ch, .. }) => assert_eq!(ch, bad, "{name}"),
                Err(NameError::BadStart { .. }) if name == "é" => {}
                other => panic!("{name}: {other:?}"),
            }
        }
        let msg = validate_name("sandbox name", "a/b")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("letters, digits"), "{msg}");
    }
}

//! The claims inside an API key, and what makes them acceptable: a key id
//! (`jti`) of 1-64 `[A-Za-z0-9_-]` characters, `iat` and `exp` in seconds
//! since the epoch, and at least one namespace, each a valid name or `*`.

use std::collections::BTreeSet;

use moat_proto::names::validate_name;
use serde::{Deserialize, Serialize};

use super::Namespaces;

/// An API key's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Key id: what `moat server revoke` names.
    pub jti: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expires at (seconds since the epoch).
    pub exp: u64,
    /// Namespaces the key may use; `*` means all.
    pub namespaces: Vec<String>,
}

/// Longest key id.
pub const MAX_KEY_ID_LEN: usize = 64;

/// Checks a key id's shape (also used by `moat server revoke`).
pub fn validate_key_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_KEY_ID_LEN {
        return Err(format!(
            "a key id is 1-{MAX_KEY_ID_LEN} characters; got {}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "a key id has only letters, digits, '-' and '_'; found {c:?}"
        ));
    }
    Ok(())
}

/// Checks a namespace list as keygen takes it and a key carries it.
pub fn namespaces(list: &[String]) -> Result<Namespaces, String> {
    if list.is_empty() {
        return Err("a key must name at least one namespace (or '*')".to_owned());
    }
    if list.iter().any(|ns| ns == "*") {
        return Ok(Namespaces::All);
    }
    let mut set = BTreeSet::new();
    for ns in list {
        validate_name("namespace", ns).map_err(|e| e.to_string())?;
        set.insert(ns.clone());
    }
    Ok(Namespaces::Only(set))
}

impl Claims {
    /// Checks the parts the signature does not: id and namespaces.
    pub fn check(&self) -> Result<Namespaces, String> {
        validate_key_id(&self.jti)?;
        if self.iat > self.exp {
            return Err("issued after it expires".to_owned());
        }
        namespaces(&self.namespaces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(jti: &str, namespaces: &[&str]) -> Claims {
        Claims {
            jti: jti.to_owned(),
            iat: 1,
            exp: 2,
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn good_claims() {
        assert_eq!(claims("abc-1", &["*"]).check(), Ok(Namespaces::All));
        assert_eq!(
            claims("abc", &["a", "b", "a"]).check(),
            Ok(Namespaces::Only(["a".to_owned(), "b".to_owned()].into()))
        );
    }

    #[test]
    fn bad_claims() {
        assert!(claims("", &["a"]).check().is_err());
        assert!(claims("a b", &["a"]).check().is_err());
        assert!(claims(&"x".repeat(65), &["a"]).check().is_err());
        assert!(claims("a", &[]).check().is_err());
        assert!(claims("a", &["../x"]).check().is_err());
        let mut c = claims("a", &["a"]);
        c.iat = 3;
        assert!(c.check().is_err());
    }
}

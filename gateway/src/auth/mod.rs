//! Who is calling: API keys ([`keys`]: signed JWTs whose [`claims`] name
//! namespaces), the signing [`secret`] file, the [`revocation`] list, and
//! [`Identity`], what a request carries once authenticated (the key id and
//! the namespaces it covers). [`Authenticator`] turns an `Authorization`
//! header into an identity or the contract's 401; `--dev` mode has no keys
//! and one fixed identity.

pub mod claims;
pub mod keys;
pub mod revocation;
pub mod secret;
pub mod verified;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::http::{header, HeaderMap};
use moat_proto::broker::Caller;

use crate::error::RpcError;
pub use keys::{KeyError, Signer, Verifier};

/// The namespaces a key covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    /// Every namespace (`*`).
    All,
    /// Only these.
    Only(BTreeSet<String>),
}

/// An authenticated caller (cheap to clone: requests carry one each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The key's id (`jti`), or `dev` in development mode.
    pub key_id: Arc<str>,
    pub namespaces: Arc<Namespaces>,
}

impl Identity {
    /// The identity of every request in `--dev` mode.
    pub fn dev() -> Self {
        Identity {
            key_id: "dev".into(),
            namespaces: Arc::new(Namespaces::All),
        }
    }

    /// Whether this caller may use `namespace`.
    pub fn covers(&self, namespace: &str) -> bool {
        match &*self.namespaces {
            Namespaces::All => true,
            Namespaces::Only(set) => set.contains(namespace),
        }
    }

    /// `Ok` when this caller may use `namespace`; else the contract's 403.
    pub fn check(&self, namespace: &str) -> Result<(), RpcError> {
        if self.covers(namespace) {
            Ok(())
        } else {
            Err(RpcError::forbidden(format!(
                "this API key ({}) does not cover namespace {namespace:?}; use a key made with \
                 `moat server keygen --namespace {namespace}`",
                self.key_id
            )))
        }
    }

    /// Who asked, as the broker's requests carry it.
    pub fn caller(&self) -> Caller {
        Caller {
            key_id: self.key_id.to_string(),
            namespaces: match &*self.namespaces {
                Namespaces::All => vec!["*".to_owned()],
                Namespaces::Only(set) => set.iter().cloned().collect(),
            },
        }
    }
}

/// Turns request headers into an [`Identity`].
#[derive(Debug, Clone)]
pub enum Authenticator {
    /// `--dev`: every request is [`Identity::dev`].
    Dev,
    /// API keys checked with this verifier.
    Keys(Verifier),
}

impl Authenticator {
    /// The caller's identity, or HTTP 401 / `-32002` saying what is wrong.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, RpcError> {
        let verifier = match self {
            Authenticator::Dev => return Ok(Identity::dev()),
            Authenticator::Keys(verifier) => verifier,
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(RpcError::unauthenticated(
                "authentication required: send `Authorization: Bearer <API key>` \
                 (an operator makes keys with `moat server keygen`)",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                RpcError::unauthenticated(
                    "malformed Authorization header: expected `Bearer <API key>`",
                )
            })?;
        verifier
            .verify(token)
            .map_err(|err| RpcError::unauthenticated(err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn only(names: &[&str]) -> Identity {
        Identity {
            key_id: "k1".into(),
            namespaces: Arc::new(Namespaces::Only(
                names.iter().map(|s| s.to_string()).collect(),
            )),
        }
    }

    #[test]
    fn coverage_and_caller() {
        let id = only(&["a", "b"]);
        assert!(id.covers("a") && id.covers("b") && !id.covers("c"));
        let err = id.check("c").unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN);
        assert_eq!(err.code().code(), -32002);
        assert!(err.message().contains("\"c\""), "{}", err.message());
        assert_eq!(id.caller().namespaces, vec!["a", "b"]);
        assert_eq!(id.caller().key_id, "k1");
        assert_eq!(Identity::dev().caller().namespaces, vec!["*"]);
        assert!(Identity::dev().covers("anything"));
    }

    #[test]
    fn dev_needs_no_header_and_keys_do() {
        let headers = HeaderMap::new();
        assert_eq!(
            Authenticator::Dev.authenticate(&headers).unwrap(),
            Identity::dev()
        );
        let auth = Authenticator::Keys(Verifier::for_tests([7; 32]));
        let err = auth.authenticate(&headers).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::UNAUTHORIZED);
        assert!(err.message().contains("authentication required"));
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        let err = auth.authenticate(&headers).unwrap_err();
        assert!(err.message().contains("malformed"), "{}", err.message());
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert!(auth.authenticate(&headers).is_err());
    }

    #[test]
    fn a_signed_key_authenticates() {
        let signer = Signer::new([7; 32]);
        let (token, claims) = signer
            .issue(&["a".to_owned()], std::time::Duration::from_secs(60))
            .unwrap();
        let auth = Authenticator::Keys(Verifier::for_tests([7; 32]));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("bearer {token}")).unwrap(),
        );
        let id = auth.authenticate(&headers).unwrap();
        assert_eq!(*id.key_id, claims.jti);
        assert_eq!(id, only(&["a"]).with_key(&claims.jti));
    }

    impl Identity {
        fn with_key(mut self, key: &str) -> Self {
            self.key_id = key.into();
            self
        }
    }
}

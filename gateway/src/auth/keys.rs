//! API keys: [`Signer`] makes them (HS256 JWTs carrying [`Claims`]),
//! [`Verifier`] checks them — signature with the configured algorithm only
//! (`alg: none` and every other algorithm are refused before any signature
//! work), expiry with no leeway, the claims' shape, and the revocation list.
//! Keys that verified are remembered ([`super::verified`]) until they
//! expire; the revocation list is asked on every request.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use super::claims::{self, Claims};
use super::revocation::Revocations;
use super::secret::{Secret, SECRET_LEN};
use super::verified::VerifiedTokens;
use super::Identity;

/// The one algorithm keys are signed with.
pub const ALGORITHM: Algorithm = Algorithm::HS256;

/// Why a key was refused (the message goes to the client with HTTP 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("invalid API key: not a well-formed signed token (expected header.claims.signature)")]
    Malformed,
    #[error(
        "invalid API key: algorithm {0:?} is not accepted; this server only accepts HS256 keys"
    )]
    Algorithm(String),
    #[error(
        "invalid API key: the signature does not verify (made for another server, or altered)"
    )]
    BadSignature,
    #[error(
        "API key {key_id} expired at {exp} (seconds since 1970); ask the operator for a new one"
    )]
    Expired { key_id: String, exp: u64 },
    #[error("API key {0} has been revoked")]
    Revoked(String),
    #[error("invalid API key: {0}")]
    BadClaims(String),
    #[error("cannot sign a key: {0}")]
    Signing(String),
}

/// Makes keys (used by `moat server keygen`).
pub struct Signer {
    key: EncodingKey,
}

impl Signer {
    /// A signer for `secret`.
    pub fn new(secret: [u8; SECRET_LEN]) -> Self {
        Signer {
            key: EncodingKey::from_secret(&secret),
        }
    }

    /// A signer for a loaded secret.
    pub fn from_secret(secret: &Secret) -> Self {
        Signer::new(*secret.bytes())
    }

    /// A new key for `namespaces` valid for `ttl`: the token and its claims.
    pub fn issue(
        &self,
        namespaces: &[String],
        ttl: Duration,
    ) -> Result<(String, Claims), KeyError> {
        claims::namespaces(namespaces).map_err(KeyError::BadClaims)?;
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| KeyError::Signing(e.to_string()))?;
        let iat = now();
        let claims = Claims {
            jti: id.iter().map(|b| format!("{b:02x}")).collect(),
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
            namespaces: namespaces.to_vec(),
        };
        self.sign(&claims).map(|token| (token, claims))
    }

    /// Signs arbitrary claims (tests use it for expired keys).
    pub fn sign(&self, claims: &Claims) -> Result<String, KeyError> {
        jsonwebtoken::encode(&Header::new(ALGORITHM), claims, &self.key)
            .map_err(|e| KeyError::Signing(e.to_string()))
    }
}

/// Checks keys against the secret and the revocation list.
#[derive(Clone)]
pub struct Verifier {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
    revocations: Arc<Revocations>,
    verified: Arc<VerifiedTokens>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("revocations", &self.revocations.path())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `secret` and the revocation list `revocations`.
    pub fn new(secret: &Secret, revocations: Revocations) -> Self {
        let mut validation = Validation::new(ALGORITHM);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp"]);
        Verifier {
            key: Arc::new(DecodingKey::from_secret(secret.bytes())),
            validation: Arc::new(validation),
            revocations: Arc::new(revocations),
            verified: Arc::default(),
        }
    }

    #[cfg(test)]
    pub(crate) fn for_tests(secret: [u8; SECRET_LEN]) -> Self {
        Verifier::new(
            &Secret(secret),
            Revocations::new("/nonexistent/revoked", Duration::from_secs(1)),
        )
    }

    /// The identity a key stands for, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Identity, KeyError> {
        let identity = match self.verified.get(token, now()) {
            Some(identity) => identity,
            None => {
                let (identity, exp) = self.verify_signed(token)?;
                self.verified.insert(token, &identity, exp);
                identity
            }
        };
        if self.revocations.is_revoked(&identity.key_id) {
            return Err(KeyError::Revoked(identity.key_id.to_string()));
        }
        Ok(identity)
    }

    /// The full check of everything but revocation: the identity and the
    /// key's expiry.
    fn verify_signed(&self, token: &str) -> Result<(Identity, u64), KeyError> {
        let alg = header_algorithm(token)?;
        if alg != "HS256" {
            return Err(KeyError::Algorithm(alg.chars().take(16).collect()));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidSignature => KeyError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    KeyError::Algorithm(alg.clone())
                }
                ErrorKind::ExpiredSignature => {
                    let exp = unverified_claims(token).map(|c| (c.jti, c.exp));
                    let (key_id, exp) = exp.unwrap_or_default();
                    KeyError::Expired { key_id, exp }
                }
                ErrorKind::MissingRequiredClaim(claim) => {
                    KeyError::BadClaims(format!("the {claim:?} claim is missing"))
                }
                ErrorKind::Json(err) => KeyError::BadClaims(format!("claims: {err}")),
                ErrorKind::InvalidClaimFormat(claim) => {
                    KeyError::BadClaims(format!("the {claim:?} claim is malformed"))
                }
                _ => KeyError::Malformed,
            },
        )?;
        let claims = data.claims;
        let namespaces = claims.check().map_err(KeyError::BadClaims)?;
        let identity = Identity {
            key_id: claims.jti.into(),
            namespaces: Arc::new(namespaces),
        };
        Ok((identity, claims.exp))
    }
}

/// The `alg` of a token's header, read without trusting anything else.
fn header_algorithm(token: &str) -> Result<String, KeyError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(KeyError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| KeyError::Malformed)?;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| KeyError::Malformed)?;
    match header.get("alg") {
        Some(serde_json::Value::String(alg)) => Ok(alg.clone()),
        _ => Err(KeyError::Malformed),
    }
}

/// The claims of a token whose signature already verified (used only to
/// name an expired key in its error).
fn unverified_claims(token: &str) -> Option<Claims> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Namespaces;

    const SECRET: [u8; 32] = [42; 32];

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            jti: "k1".into(),
            iat: 0,
            exp,
            namespaces: vec!["a".into()],
        }
    }

    #[test]
    fn issued_keys_verify() {
        let (token, claims) = Signer::new(SECRET)
            .issue(&["*".to_owned()], Duration::from_secs(60))
            .unwrap();
        let id = Verifier::for_tests(SECRET).verify(&token).unwrap();
        assert_eq!(*id.key_id, claims.jti);
        assert_eq!(*id.namespaces, Namespaces::All);
        assert_eq!(claims.jti.len(), 32);
        assert_eq!(claims.exp - claims.iat, 60);
    }

    #[test]
    fn foreign_secret_is_a_bad_signature() {
        let (token, _) = Signer::new([1; 32])
            .issue(&["a".to_owned()], Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            Verifier::for_tests(SECRET).verify(&token),
            Err(KeyError::BadSignature)
        );
    }

    #[test]
    fn expired_keys_are_refused_naming_them() {
        let token = Signer::new(SECRET).sign(&claims(now() - 1)).unwrap();
        let err = Verifier::for_tests(SECRET).verify(&token).unwrap_err();
        assert!(
            matches!(err, KeyError::Expired { ref key_id, .. } if key_id == "k1"),
            "{err}"
        );
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let body = b64(&format!(
            r#"{{"jti":"k1","iat":0,"exp":{},"namespaces":["*"]}}"#,
            now() + 60
        ));
        for alg in ["none", "None", "HS384", "RS256", "ES256"] {
            let token = format!(
                "{}.{body}.",
                b64(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#))
            );
            assert_eq!(
                Verifier::for_tests(SECRET).verify(&token),
                Err(KeyError::Algorithm(alg.to_owned())),
                "{alg}"
            );
        }
        // HS384 really signed with the same secret is still refused.
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &claims(now() + 60),
            &EncodingKey::from_secret(&SECRET),
        )
        .unwrap();
        assert_eq!(
            Verifier::for_tests(SECRET).verify(&token),
            Err(KeyError::Algorithm("HS384".to_owned()))
        );
    }

    #[test]
    fn malformed_tokens() {
        let v = Verifier::for_tests(SECRET);
        for token in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!.b.c",
            &format!("{}.x.y", b64("{}")),
        ] {
            assert_eq!(v.verify(token), Err(KeyError::Malformed), "{token}");
        }
        let (token, _) = Signer::new(SECRET)
            .issue(&["a".to_owned()], Duration::from_secs(60))
            .unwrap();
        let tampered = format!("{}x", &token[..token.len() - 1]);
        assert!(v.verify(&tampered).is_err());
    }

    #[test]
    fn bad_claims_are_refused() {
        let signer = Signer::new(SECRET);
        let mut c = claims(now() + 60);
        c.namespaces = vec![];
        let token = signer.sign(&c).unwrap();
        assert!(matches!(
            Verifier::for_tests(SECRET).verify(&token),
            Err(KeyError::BadClaims(_))
        ));
        assert!(signer.issue(&[], Duration::from_secs(1)).is_err());
        assert!(signer
            .issue(&["a/b".to_owned()], Duration::from_secs(1))
            .is_err());
    }

    #[test]
    fn revoked_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked");
        let v = Verifier::new(&Secret(SECRET), Revocations::new(&path, Duration::ZERO));
        let (token, c) = Signer::new(SECRET)
            .issue(&["a".to_owned()], Duration::from_secs(60))
            .unwrap();
        assert!(v.verify(&token).is_ok());
        assert!(v.verify(&token).is_ok(), "now remembered");
        super::super::revocation::append(&path, &c.jti, "test").unwrap();
        assert_eq!(v.verify(&token), Err(KeyError::Revoked(c.jti)));
    }

    #[test]
    fn a_remembered_key_vouches_for_no_other_token() {
        let v = Verifier::for_tests(SECRET);
        let (token, _) = Signer::new(SECRET)
            .issue(&["a".to_owned()], Duration::from_secs(60))
            .unwrap();
        assert!(v.verify(&token).is_ok());
        let tampered = format!("{}x", &token[..token.len() - 1]);
        assert!(v.verify(&tampered).is_err());
        assert!(v.verify(&format!("{token} ")).is_err());
        let foreign = Signer::new([1; 32])
            .issue(&["a".to_owned()], Duration::from_secs(60))
            .unwrap()
            .0;
        assert_eq!(v.verify(&foreign), Err(KeyError::BadSignature));
        assert_eq!(v.verified.len(), 1, "refused keys are not remembered");
    }

    #[test]
    fn a_remembered_key_expires_like_any_other() {
        let v = Verifier::for_tests(SECRET);
        let token = Signer::new(SECRET).sign(&claims(now() + 1)).unwrap();
        assert!(v.verify(&token).is_ok());
        std::thread::sleep(Duration::from_millis(2100));
        assert!(
            matches!(v.verify(&token), Err(KeyError::Expired { ref key_id, .. }) if key_id == "k1"),
            "expired while remembered"
        );
    }
}

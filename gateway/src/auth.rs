//! Connection tokens: JWTs signed with an HMAC secret (HS256/384/512) or an RSA/EC key
//! (RS256, ES256), carrying the user in `sub` and an optional `exp`. Verification only;
//! issuing tokens is the application backend's job.

use crate::config::AuthConfig;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: Option<u64>,
}

/// Who a verified token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// Unix seconds after which the connection must end (4003).
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token invalid: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
}

/// A configured key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("public key is neither RSA nor EC PEM: {0}")]
pub struct KeyError(String);

/// The configured verification keys.
pub struct Verifier {
    keys: Vec<(DecodingKey, &'static [Algorithm])>,
}

const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: &[Algorithm] = &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];

impl Verifier {
    pub fn new(config: &AuthConfig) -> Result<Self, KeyError> {
        let mut keys: Vec<(DecodingKey, &'static [Algorithm])> = config
            .hmac_secrets
            .iter()
            .map(|s| (DecodingKey::from_secret(s.as_bytes()), HMAC))
            .collect();
        for pem in &config.public_keys_pem {
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                (k, RSA)
            } else {
                let k = DecodingKey::from_ec_pem(pem.as_bytes())
                    .map_err(|e| KeyError(e.to_string()))?;
                (k, EC)
            };
            keys.push(key);
        }
        Ok(Self { keys })
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let mut last = AuthError::Invalid("no key for this token's algorithm".into());
        for (key, algorithms) in self
            .keys
            .iter()
            .filter(|(_, algs)| algs.contains(&header.alg))
        {
            let mut validation = Validation::new(header.alg);
            validation.algorithms = algorithms.to_vec();
            validation.set_required_spec_claims(&["sub"]);
            validation.leeway = 5;
            // A token is not valid before its `nbf` (RFC 7519 §4.1.5), within the leeway.
            validation.validate_nbf = true;
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    return Ok(Identity {
                        user: data.claims.sub,
                        expires_at: data.claims.exp,
                    });
                }
                Err(e) if *e.kind() == ErrorKind::ExpiredSignature => {
                    return Err(AuthError::Expired);
                }
                Err(e) => last = AuthError::Invalid(e.to_string()),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn verifier() -> Verifier {
        Verifier::new(&AuthConfig {
            hmac_secrets: vec!["s3cret".into()],
            public_keys_pem: vec![],
        })
        .unwrap()
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn accepts_a_good_token_with_or_without_exp() {
        let v = verifier();
        assert_eq!(
            v.verify(&token("s3cret", json!({"sub": "alice"})))
                .unwrap()
                .user,
            "alice"
        );
        let exp = 4_000_000_000u64;
        let id = v
            .verify(&token("s3cret", json!({"sub": "bob", "exp": exp})))
            .unwrap();
        assert_eq!(
            id,
            Identity {
                user: "bob".into(),
                expires_at: Some(exp)
            }
        );
    }

    #[test]
    fn rejects_bad_and_expired_tokens() {
        let v = verifier();
        assert!(matches!(
            v.verify(&token("wrong", json!({"sub": "a"}))),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(v.verify("garbage"), Err(AuthError::Invalid(_))));
        assert!(matches!(
            v.verify(&token("s3cret", json!({"exp": 4_000_000_000u64}))),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(
            v.verify(&token("s3cret", json!({"sub": "a", "exp": 1000}))),
            Err(AuthError::Expired)
        );
    }

    /// Found by the hostile-input sweep: a token not valid for another hour was accepted.
    #[test]
    fn a_token_is_not_valid_before_its_nbf() {
        let v = verifier();
        let now = jsonwebtoken::get_current_timestamp();
        assert!(matches!(
            v.verify(&token("s3cret", json!({"sub": "a", "nbf": now + 3600}))),
            Err(AuthError::Invalid(_))
        ));
        assert!(
            v.verify(&token("s3cret", json!({"sub": "a", "nbf": now - 10})))
                .is_ok()
        );
    }
}

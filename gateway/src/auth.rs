//! Tokens: JWTs the application backend signs, verified here (never issued).
//!
//! - **Connection tokens** carry the user in `sub`, optional `exp`/`nbf`/`iat`/`aud`/`iss`,
//!   and two optional claims of ours: `channels` (subscribed server-side on connect) and
//!   `grants` (channel patterns the connection is limited to; they also open private
//!   namespaces).
//! - **Subscription tokens** admit one connection's user to one channel of a private
//!   namespace: `sub` (the user, `""` for anonymous), `channel`, and the same time claims.
//!
//! Keys come from `[auth]`: HMAC secrets and PEM public keys (pinned to their family),
//! `[[auth.keys]]` entries pinned to one `alg` and optionally a `kid` (inline or from a
//! file), and a JWKS URL fetched at start, every `jwks_refresh_seconds`, and again (at most
//! once per [`JWKS_MIN_INTERVAL`]) when a token names a `kid` no key has. A token is tried
//! only against keys whose algorithms include its header's `alg`, so an RSA public key can
//! never be used as an HMAC secret (algorithm confusion).

use crate::{channel::ChannelName, config::AuthConfig};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::{Deserialize, de::DeserializeOwned};
use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

/// Most channels a token's `channels` claim may name, and patterns in `grants`.
pub const MAX_TOKEN_CHANNELS: usize = 128;
pub const MAX_GRANTS: usize = 256;
/// A JWKS refresh for an unknown `kid` happens at most this often.
pub const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Largest JWKS document read.
const JWKS_MAX_BYTES: usize = 1024 * 1024;

#[derive(Debug, Deserialize)]
struct ConnectionClaims {
    sub: String,
    /// Only subscription tokens carry it: one is never a connection token.
    channel: Option<serde_json::Value>,
    iat: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    grants: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct SubscriptionClaims {
    sub: String,
    channel: String,
    iat: Option<u64>,
}

/// Who a verified token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// Unix seconds after which the connection must end (4003).
    pub expires_at: Option<u64>,
    /// Channels the connection is subscribed to server-side on connect.
    pub channels: Vec<String>,
    /// When set, the only channels this connection may use (and the private ones it may).
    pub grants: Option<Grants>,
}

impl Identity {
    /// An identity for `user` with no expiry, server-side channels or grants.
    pub fn user(user: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            expires_at: None,
            channels: Vec::new(),
            grants: None,
        }
    }
}

/// Channel patterns from a token's `grants` claim: an exact name, or a prefix ending in
/// `*` (`chat:*`, `room-*`; `*` alone matches everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants(Vec<String>);

impl Grants {
    pub fn allows(&self, channel: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => p == channel,
        })
    }
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
#[error("{0}")]
pub struct KeyError(String);

/// One verification key and what it may verify.
#[derive(Clone)]
struct Key {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
    kid: Option<String>,
}

const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: &[Algorithm] = &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];

/// The configured verification keys and claim checks.
pub struct Verifier {
    /// Keys from the config; never change.
    fixed: Vec<Key>,
    /// Keys from the JWKS URL, replaced on each successful fetch.
    fetched: RwLock<Arc<Vec<Key>>>,
    jwks: Option<Jwks>,
    audience: Vec<String>,
    issuer: Option<String>,
    leeway: u64,
    max_age: Option<u64>,
}

struct Jwks {
    url: String,
    refresh: Duration,
    /// Serialises fetches; holds when the last on-demand (unknown `kid`) one started.
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl Verifier {
    pub fn new(config: &AuthConfig) -> Result<Self, KeyError> {
        let mut fixed: Vec<Key> = config
            .hmac_secrets
            .iter()
            .map(|s| Key {
                key: DecodingKey::from_secret(s.as_bytes()),
                algorithms: HMAC.to_vec(),
                kid: None,
            })
            .collect();
        for pem in &config.public_keys_pem {
            fixed.push(public_key(pem.as_bytes(), None)?);
        }
        for k in &config.keys {
            fixed.push(configured_key(k)?);
        }
        let jwks = config.jwks_url.as_ref().map(|url| Jwks {
            url: url.clone(),
            refresh: Duration::from_secs(config.jwks_refresh_seconds.max(10)),
            last: tokio::sync::Mutex::new(None),
        });
        if let Some(url) = &config.jwks_url
            && !url.starts_with("https://")
            && !url.starts_with("http://")
        {
            return Err(KeyError(format!("jwks_url must be http(s): {url}")));
        }
        Ok(Self {
            fixed,
            fetched: RwLock::new(Arc::new(Vec::new())),
            jwks,
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            leeway: config.leeway_seconds,
            max_age: (config.max_token_age_seconds > 0).then_some(config.max_token_age_seconds),
        })
    }

    /// Whether tokens are checked at all (any key, or a JWKS URL, configured).
    pub fn enabled(&self) -> bool {
        !self.fixed.is_empty() || self.jwks.is_some()
    }

    /// Verifies a connection token, refreshing the JWKS once if it names an unknown `kid`.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        match self.verify_cached(token) {
            Ok(id) => Ok(id),
            Err(e) if self.unknown_kid(token) && self.refresh_for_unknown_kid().await => {
                self.verify_cached(token).map_err(|_| e)
            }
            Err(e) => Err(e),
        }
    }

    /// Verifies a subscription token for `user` and `channel`; returns its expiry.
    pub async fn verify_subscription(
        &self,
        token: &str,
        user: &str,
        channel: &str,
    ) -> Result<Option<u64>, AuthError> {
        match self.verify_subscription_cached(token, user, channel) {
            Ok(exp) => Ok(exp),
            Err(e) if self.unknown_kid(token) && self.refresh_for_unknown_kid().await => self
                .verify_subscription_cached(token, user, channel)
                .map_err(|_| e),
            Err(e) => Err(e),
        }
    }

    /// [`Self::verify`] against the keys held now (no fetch).
    pub fn verify_cached(&self, token: &str) -> Result<Identity, AuthError> {
        let (claims, exp) = self.decode::<ConnectionClaims>(token)?;
        self.check_iat(claims.iat)?;
        if claims.channel.is_some() {
            return Err(AuthError::Invalid(
                "a subscription token (it has a channel claim) is not a connection token".into(),
            ));
        }
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("sub is empty".into()));
        }
        if claims.channels.len() > MAX_TOKEN_CHANNELS {
            return Err(AuthError::Invalid(format!(
                "channels claim lists over {MAX_TOKEN_CHANNELS} channels"
            )));
        }
        if let Some(bad) = claims
            .channels
            .iter()
            .find(|c| ChannelName::parse(c).is_err())
        {
            return Err(AuthError::Invalid(format!(
                "channels claim: bad channel name {:?}",
                truncate(bad)
            )));
        }
        if let Some(grants) = &claims.grants
            && (grants.len() > MAX_GRANTS || grants.iter().any(|g| g.is_empty() || g.len() > 255))
        {
            return Err(AuthError::Invalid(format!(
                "grants claim: 1 to {MAX_GRANTS} patterns of 1 to 255 bytes"
            )));
        }
        Ok(Identity {
            user: claims.sub,
            // Accepted within the leeway, so it also ends at exp + leeway.
            expires_at: exp.map(|e| e.saturating_add(self.leeway)),
            channels: claims.channels,
            grants: claims.grants.map(Grants),
        })
    }

    /// [`Self::verify_subscription`] against the keys held now.
    pub fn verify_subscription_cached(
        &self,
        token: &str,
        user: &str,
        channel: &str,
    ) -> Result<Option<u64>, AuthError> {
        let (claims, exp) = self.decode::<SubscriptionClaims>(token)?;
        self.check_iat(claims.iat)?;
        if claims.sub != user {
            return Err(AuthError::Invalid(
                "subscription token is for another user".into(),
            ));
        }
        if claims.channel != channel {
            return Err(AuthError::Invalid(
                "subscription token is for another channel".into(),
            ));
        }
        Ok(exp)
    }

    /// Decodes and checks signature, `exp`, `nbf`, `aud`, `iss`; returns the claims and
    /// `exp`.
    fn decode<C: DeserializeOwned>(&self, token: &str) -> Result<(C, Option<u64>), AuthError> {
        #[derive(Deserialize)]
        struct Exp {
            exp: Option<u64>,
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let fetched = self.fetched.read().map(|k| k.clone()).unwrap_or_default();
        let all = || self.fixed.iter().chain(fetched.iter());
        // A token naming a kid some key has is checked against that key only; one naming
        // an unknown kid against the keys without a kid (plain secrets and PEMs); one
        // naming none against every key of its algorithm.
        let named = header
            .kid
            .as_ref()
            .is_some_and(|want| all().any(|k| k.kid.as_ref() == Some(want)));
        let candidates: Vec<&Key> = all()
            .filter(|k| k.algorithms.contains(&header.alg))
            .filter(|k| {
                if named {
                    k.kid == header.kid
                } else {
                    header.kid.is_none() || k.kid.is_none()
                }
            })
            .collect();
        let mut last = AuthError::Invalid(format!("no key for algorithm {:?}", header.alg));
        for key in candidates {
            let mut validation = Validation::new(header.alg);
            validation.algorithms = vec![header.alg];
            let mut required = vec!["sub"];
            if !self.audience.is_empty() {
                required.push("aud");
            }
            if self.issuer.is_some() {
                required.push("iss");
            }
            validation.set_required_spec_claims(&required);
            validation.leeway = self.leeway;
            // A token is not valid before its `nbf` (RFC 7519 §4.1.5), within the leeway.
            validation.validate_nbf = true;
            if self.audience.is_empty() {
                validation.validate_aud = false;
            } else {
                validation.set_audience(&self.audience);
            }
            if let Some(issuer) = &self.issuer {
                validation.set_issuer(&[issuer]);
            }
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation) {
                Ok(data) => {
                    let exp = serde_json::from_value::<Exp>(data.claims.clone())
                        .map(|e| e.exp)
                        .map_err(|e| AuthError::Invalid(format!("exp: {e}")));
                    let claims = serde_json::from_value::<C>(data.claims)
                        .map_err(|e| AuthError::Invalid(format!("claims: {e}")));
                    return claims.and_then(|c| Ok((c, exp?)));
                }
                Err(e) if *e.kind() == ErrorKind::ExpiredSignature => {
                    return Err(AuthError::Expired);
                }
                Err(e) => last = AuthError::Invalid(e.to_string()),
            }
        }
        Err(last)
    }

    /// `iat` sanity: not in the future (beyond the leeway), and not older than the
    /// configured maximum age.
    fn check_iat(&self, iat: Option<u64>) -> Result<(), AuthError> {
        let Some(iat) = iat else {
            return if self.max_age.is_some() {
                Err(AuthError::Invalid(
                    "iat is required (max_token_age_seconds)".into(),
                ))
            } else {
                Ok(())
            };
        };
        let now = jsonwebtoken::get_current_timestamp();
        if iat > now + self.leeway {
            return Err(AuthError::Invalid("iat lies in the future".into()));
        }
        if let Some(max) = self.max_age
            && now.saturating_sub(iat) > max + self.leeway
        {
            return Err(AuthError::Expired);
        }
        Ok(())
    }

    fn unknown_kid(&self, token: &str) -> bool {
        self.jwks.is_some()
            && jsonwebtoken::decode_header(token).is_ok_and(|h| {
                h.kid.is_some_and(|kid| {
                    let fetched = self.fetched.read().map(|k| k.clone()).unwrap_or_default();
                    !self
                        .fixed
                        .iter()
                        .chain(fetched.iter())
                        .any(|k| k.kid.as_deref() == Some(kid.as_str()))
                })
            })
    }

    /// Fetches the JWKS now unless a fetch started within [`JWKS_MIN_INTERVAL`]; whether
    /// new keys were loaded. Concurrent callers wait for the one fetch.
    async fn refresh_for_unknown_kid(&self) -> bool {
        let Some(jwks) = &self.jwks else { return false };
        let mut last = jwks.last.lock().await;
        if last.is_some_and(|t| t.elapsed() < JWKS_MIN_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        self.fetch_jwks(&jwks.url).await.is_ok()
    }

    /// Fetches the JWKS at start and every `jwks_refresh_seconds` (no-op without one).
    pub fn watch_jwks(self: &Arc<Self>) {
        let Some(jwks) = &self.jwks else { return };
        let every = jwks.refresh;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let url = this
                    .jwks
                    .as_ref()
                    .map(|j| j.url.clone())
                    .unwrap_or_default();
                let ok = {
                    // Serialised with on-demand fetches, but not counted against their
                    // rate: a rotation right after a scheduled fetch is still seen.
                    let Some(jwks) = &this.jwks else { return };
                    let _serial = jwks.last.lock().await;
                    this.fetch_jwks(&url).await.is_ok()
                };
                // Until the first fetch succeeds, try again soon.
                let wait = if ok { every } else { Duration::from_secs(2) };
                tokio::time::sleep(wait).await;
            }
        });
    }

    async fn fetch_jwks(&self, url: &str) -> Result<(), String> {
        let result = fetch(url).await.and_then(|body| parse_jwks(&body));
        match result {
            Ok(keys) => {
                tracing::info!(url, keys = keys.len(), "JWKS loaded");
                crate::metrics::jwks_fetch("ok");
                if let Ok(mut fetched) = self.fetched.write() {
                    *fetched = Arc::new(keys);
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(url, error = %e, "JWKS fetch failed; keeping the keys held");
                crate::metrics::jwks_fetch("error");
                Err(e)
            }
        }
    }
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn public_key(pem: &[u8], pinned: Option<Algorithm>) -> Result<Key, KeyError> {
    let (key, family) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        (k, RSA)
    } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        (k, EC)
    } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        (k, &[Algorithm::EdDSA][..])
    } else {
        return Err(KeyError(
            "public key is not an RSA, EC or Ed25519 PEM".into(),
        ));
    };
    let algorithms = match pinned {
        Some(alg) if family.contains(&alg) || (family == RSA && is_pss(alg)) => vec![alg],
        Some(alg) => {
            return Err(KeyError(format!(
                "alg {alg:?} does not fit this key's type"
            )));
        }
        None => family.to_vec(),
    };
    Ok(Key {
        key,
        algorithms,
        kid: None,
    })
}

fn is_pss(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512)
}

/// One `[[auth.keys]]` entry: `alg` pinned, material inline or from a file.
fn configured_key(k: &crate::config::KeyConfig) -> Result<Key, KeyError> {
    let alg: Algorithm = k
        .alg
        .parse()
        .map_err(|_| KeyError(format!("unknown alg {:?}", k.alg)))?;
    let material = match (&k.secret, &k.secret_file, &k.pem, &k.pem_file) {
        (Some(s), None, None, None) => s.as_bytes().to_vec(),
        (None, Some(f), None, None) | (None, None, None, Some(f)) => {
            std::fs::read(f).map_err(|e| KeyError(format!("reading {f}: {e}")))?
        }
        (None, None, Some(p), None) => p.as_bytes().to_vec(),
        _ => {
            return Err(KeyError(
                "each [[auth.keys]] entry needs exactly one of secret, secret_file, pem, pem_file"
                    .into(),
            ));
        }
    };
    let is_secret = k.secret.is_some() || k.secret_file.is_some();
    let mut key = if HMAC.contains(&alg) {
        if !is_secret {
            return Err(KeyError(format!("alg {alg:?} needs secret or secret_file")));
        }
        // A secret read from a file loses its trailing newline.
        let trimmed = material.trim_ascii_end();
        Key {
            key: DecodingKey::from_secret(trimmed),
            algorithms: vec![alg],
            kid: None,
        }
    } else {
        if is_secret {
            return Err(KeyError(format!("alg {alg:?} needs pem or pem_file")));
        }
        public_key(&material, Some(alg))?
    };
    key.kid = k.kid.clone();
    Ok(key)
}

/// Keys of a JWKS document; a key without `alg` verifies its type's family. Keys that
/// cannot be used (unknown type, encryption keys) are skipped.
fn parse_jwks(body: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(body).map_err(|e| format!("bad JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(
            jwk.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        ) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        let algorithms = match jwk.common.key_algorithm {
            Some(ka) => match format!("{ka:?}").parse::<Algorithm>() {
                Ok(alg) => vec![alg],
                Err(_) => continue,
            },
            None => match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => RSA.to_vec(),
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => EC.to_vec(),
                jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
                // A symmetric key published in a JWKS would be a leak; never use one.
                _ => continue,
            },
        };
        if algorithms.iter().any(|a| HMAC.contains(a)) {
            continue;
        }
        keys.push(Key {
            key,
            algorithms,
            kid: jwk.common.key_id.clone(),
        });
    }
    Ok(keys)
}

/// GET `url` (http or https, system roots), bounded in size and time.
async fn fetch(url: &str) -> Result<Vec<u8>, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("system roots: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body = tokio::time::timeout(
        Duration::from_secs(10),
        Limited::new(response.into_body(), JWKS_MAX_BYTES).collect(),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok(body.to_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn verifier_with(config: serde_json::Value) -> Verifier {
        let config: AuthConfig = serde_json::from_value(config).unwrap();
        Verifier::new(&config).unwrap()
    }

    fn verifier() -> Verifier {
        verifier_with(json!({"hmac_secrets": ["s3cret"]}))
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn accepts_a_good_token_with_or_without_exp() {
        let v = verifier();
        assert_eq!(
            v.verify_cached(&token("s3cret", json!({"sub": "alice"})))
                .unwrap()
                .user,
            "alice"
        );
        let exp = 4_000_000_000u64;
        let id = v
            .verify_cached(&token("s3cret", json!({"sub": "bob", "exp": exp})))
            .unwrap();
        assert_eq!(
            id,
            Identity {
                expires_at: Some(exp + 5),
                ..Identity::user("bob")
            }
        );
    }

    #[test]
    fn rejects_bad_and_expired_tokens() {
        let v = verifier();
        assert!(matches!(
            v.verify_cached(&token("wrong", json!({"sub": "a"}))),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            v.verify_cached("garbage"),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            v.verify_cached(&token("s3cret", json!({"exp": 4_000_000_000u64}))),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(
            v.verify_cached(&token("s3cret", json!({"sub": "a", "exp": 1000}))),
            Err(AuthError::Expired)
        );
    }

    /// Found by the hostile-input sweep: a token not valid for another hour was accepted.
    #[test]
    fn a_token_is_not_valid_before_its_nbf() {
        let v = verifier();
        assert!(matches!(
            v.verify_cached(&token("s3cret", json!({"sub": "a", "nbf": now() + 3600}))),
            Err(AuthError::Invalid(_))
        ));
        assert!(
            v.verify_cached(&token("s3cret", json!({"sub": "a", "nbf": now() - 10})))
                .is_ok()
        );
    }

    #[test]
    fn leeway_is_configurable() {
        let strict = verifier_with(json!({"hmac_secrets": ["s3cret"], "leeway_seconds": 0}));
        let lenient = verifier_with(json!({"hmac_secrets": ["s3cret"], "leeway_seconds": 120}));
        let t = token("s3cret", json!({"sub": "a", "exp": now() - 60}));
        assert_eq!(strict.verify_cached(&t), Err(AuthError::Expired));
        assert!(lenient.verify_cached(&t).is_ok());
    }

    #[test]
    fn iat_in_the_future_or_too_old_is_refused() {
        let v = verifier_with(json!({"hmac_secrets": ["s3cret"], "max_token_age_seconds": 600}));
        assert!(matches!(
            v.verify_cached(&token("s3cret", json!({"sub": "a", "iat": now() + 3600}))),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(
            v.verify_cached(&token("s3cret", json!({"sub": "a", "iat": now() - 3600}))),
            Err(AuthError::Expired)
        );
        assert!(matches!(
            v.verify_cached(&token("s3cret", json!({"sub": "a"}))),
            Err(AuthError::Invalid(_))
        ));
        assert!(
            v.verify_cached(&token("s3cret", json!({"sub": "a", "iat": now() - 5})))
                .is_ok()
        );
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let v = verifier_with(json!({
            "hmac_secrets": ["s3cret"], "audience": ["gw"], "issuer": "https://auth.example"
        }));
        let good = json!({"sub": "a", "aud": "gw", "iss": "https://auth.example"});
        assert!(v.verify_cached(&token("s3cret", good)).is_ok());
        for bad in [
            json!({"sub": "a", "aud": "other", "iss": "https://auth.example"}),
            json!({"sub": "a", "iss": "https://auth.example"}),
            json!({"sub": "a", "aud": "gw", "iss": "https://evil.example"}),
            json!({"sub": "a", "aud": "gw"}),
        ] {
            assert!(
                matches!(
                    v.verify_cached(&token("s3cret", bad.clone())),
                    Err(AuthError::Invalid(_))
                ),
                "{bad}"
            );
        }
        // Without an audience configured, a token's aud is not held against it.
        assert!(
            verifier()
                .verify_cached(&token("s3cret", json!({"sub": "a", "aud": "x"})))
                .is_ok()
        );
    }

    #[test]
    fn channels_and_grants_claims_are_read_and_bounded() {
        let v = verifier();
        let id = v
            .verify_cached(&token(
                "s3cret",
                json!({"sub": "a", "channels": ["news", "chat:#a"], "grants": ["chat:*", "news"]}),
            ))
            .unwrap();
        assert_eq!(id.channels, ["news", "chat:#a"]);
        let grants = id.grants.unwrap();
        assert!(grants.allows("chat:room") && grants.allows("news"));
        assert!(!grants.allows("newsroom") && !grants.allows("dm:x"));
        let many: Vec<String> = (0..=MAX_TOKEN_CHANNELS).map(|i| format!("c{i}")).collect();
        for bad in [
            json!({"sub": "a", "channels": ["bad channel"]}),
            json!({"sub": "a", "channels": many}),
            json!({"sub": "a", "grants": [""]}),
            json!({"sub": "a", "channels": "news"}),
        ] {
            assert!(
                matches!(
                    v.verify_cached(&token("s3cret", bad.clone())),
                    Err(AuthError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }

    /// Found by the adversarial review: a subscription token at upgrade made a full
    /// connection without the user's grants, and `sub: ""` an "authenticated" nobody.
    #[test]
    fn a_subscription_token_is_not_a_connection_token() {
        let v = verifier();
        for t in [
            token("s3cret", json!({"sub": "alice", "channel": "secret:x"})),
            token("s3cret", json!({"sub": "", "channel": "secret:x"})),
            token("s3cret", json!({"sub": ""})),
        ] {
            assert!(matches!(v.verify_cached(&t), Err(AuthError::Invalid(_))));
        }
    }

    /// Found by the adversarial review: a kid naming a pinned key was also tried
    /// against the keys without a kid.
    #[test]
    fn a_kid_naming_a_key_uses_that_key_only() {
        let v = verifier_with(json!({
            "hmac_secrets": ["s3cret"],
            "keys": [{"alg": "HS256", "kid": "pinned", "secret": "pinned-secret"}]
        }));
        let with = |kid: &str, secret: &[u8]| {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some(kid.into());
            encode(&h, &json!({"sub": "a"}), &EncodingKey::from_secret(secret)).unwrap()
        };
        assert!(v.verify_cached(&with("pinned", b"pinned-secret")).is_ok());
        assert!(v.verify_cached(&with("pinned", b"s3cret")).is_err());
        // An unknown kid: the keys without one; no kid: every key of the algorithm.
        assert!(v.verify_cached(&with("other", b"s3cret")).is_ok());
        assert!(v.verify_cached(&with("other", b"pinned-secret")).is_err());
        assert!(
            v.verify_cached(&token("pinned-secret", json!({"sub": "a"})))
                .is_ok()
        );
    }

    #[test]
    fn subscription_tokens_name_user_and_channel() {
        let v = verifier();
        let t = token(
            "s3cret",
            json!({"sub": "a", "channel": "secret:x", "exp": now() + 60}),
        );
        assert!(v.verify_subscription_cached(&t, "a", "secret:x").is_ok());
        assert!(v.verify_subscription_cached(&t, "b", "secret:x").is_err());
        assert!(v.verify_subscription_cached(&t, "a", "secret:y").is_err());
        let old = token(
            "s3cret",
            json!({"sub": "a", "channel": "secret:x", "exp": 1000}),
        );
        assert_eq!(
            v.verify_subscription_cached(&old, "a", "secret:x"),
            Err(AuthError::Expired)
        );
        let anonymous = token("s3cret", json!({"sub": "", "channel": "secret:x"}));
        assert!(
            v.verify_subscription_cached(&anonymous, "", "secret:x")
                .is_ok()
        );
    }

    const RSA_PUBLIC: &str = include_str!("../tests/keys/rsa_public.pem");
    const RSA_PRIVATE: &str = include_str!("../tests/keys/rsa_private.pem");

    /// Algorithm confusion: an HS256 token "signed" with the RSA public key's PEM as the
    /// secret must not verify against that public key.
    #[test]
    fn an_rsa_key_never_verifies_an_hmac_token() {
        let v = verifier_with(json!({"keys": [{"alg": "RS256", "pem": RSA_PUBLIC, "kid": "r1"}]}));
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "mallory"}),
            &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
        )
        .unwrap();
        assert!(matches!(
            v.verify_cached(&forged),
            Err(AuthError::Invalid(_))
        ));
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("r1".into());
        let good = encode(
            &header,
            &json!({"sub": "alice"}),
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify_cached(&good).unwrap().user, "alice");
        // Pinned to RS256: the same key does not verify RS512.
        let rs512 = encode(
            &Header::new(Algorithm::RS512),
            &json!({"sub": "alice"}),
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(v.verify_cached(&rs512).is_err());
    }

    #[test]
    fn a_kid_selects_its_key_and_keys_rotate() {
        let v = verifier_with(json!({"keys": [
            {"alg": "HS256", "secret": "old", "kid": "2026-10"},
            {"alg": "HS256", "secret": "new", "kid": "2026-11"},
        ]}));
        let with_kid = |secret: &str, kid: &str| {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some(kid.into());
            encode(
                &h,
                &json!({"sub": "a"}),
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        assert!(v.verify_cached(&with_kid("old", "2026-10")).is_ok());
        assert!(v.verify_cached(&with_kid("new", "2026-11")).is_ok());
        assert!(v.verify_cached(&with_kid("new", "2026-10")).is_err());
        assert!(v.verify_cached(&with_kid("new", "unknown")).is_err());
        assert!(v.verify_cached(&token("new", json!({"sub": "a"}))).is_ok());
    }

    #[test]
    fn misconfigured_keys_are_refused_at_start() {
        for bad in [
            json!({"keys": [{"alg": "HS256", "pem": RSA_PUBLIC}]}),
            json!({"keys": [{"alg": "RS256", "secret": "x"}]}),
            json!({"keys": [{"alg": "ES256", "pem": RSA_PUBLIC}]}),
            json!({"keys": [{"alg": "XX1", "secret": "x"}]}),
            json!({"keys": [{"alg": "HS256", "secret": "x", "secret_file": "/x"}]}),
            json!({"jwks_url": "file:///etc/passwd"}),
        ] {
            let config: AuthConfig = serde_json::from_value(bad.clone()).unwrap();
            assert!(Verifier::new(&config).is_err(), "{bad}");
        }
    }

    #[test]
    fn jwks_keys_are_pinned_and_symmetric_keys_skipped() {
        let keys = parse_jwks(
            br#"{"keys":[
                {"kty":"oct","k":"c2VjcmV0","kid":"sym"},
                {"kty":"EC","crv":"P-256","kid":"e1","alg":"ES256",
                 "x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
                 "y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("e1"));
        assert_eq!(keys[0].algorithms, [Algorithm::ES256]);
        assert!(parse_jwks(b"not json").is_err());
    }
}

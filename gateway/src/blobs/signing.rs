//! Signed, expiring blob URLs: `/blobs/{id}?channel=C&expires=UNIX_S&sig=…`, so an
//! `<img src>` can fetch an image from any node without the WebSocket, and caches it (the
//! bytes behind an id never change).
//!
//! `sig` is base64url(HMAC-SHA-256(key, "blob\n{id}\n{channel}\n{expires}")) with a key
//! every node shares (configured, or made once and kept in Redis), compared in constant
//! time. Several configured keys (`new,old`) rotate without downtime: URLs are signed
//! with the first and accepted with any. `expires` is rounded up to a bucket of a quarter of the URL TTL (at least a
//! minute), so the same image published again soon after gets the same URL and browsers
//! reuse their cached copy.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    #[error("the URL has expired")]
    Expired,
    #[error("the signature is not valid")]
    Invalid,
    #[error("no signing key yet")]
    NoKey,
}

pub struct UrlSigner {
    /// Signing key first, then keys still accepted; empty until one is known.
    keys: RwLock<Arc<[Arc<[u8]>]>>,
    ttl: Duration,
}

impl UrlSigner {
    pub fn new(ttl: Duration) -> Self {
        Self {
            keys: RwLock::new(Arc::new([])),
            ttl: ttl.max(Duration::from_secs(1)),
        }
    }

    /// With a key already (tests, or a configured key).
    pub fn with_key(ttl: Duration, key: &[u8]) -> Self {
        let s = Self::new(ttl);
        s.set_key(key);
        s
    }

    pub fn set_key(&self, key: &[u8]) {
        self.set_keys(&[key]);
    }

    /// Signs with the first key; accepts URLs signed with any of them.
    pub fn set_keys(&self, keys: &[&[u8]]) {
        let keys: Vec<Arc<[u8]>> = keys.iter().map(|k| Arc::from(*k)).collect();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys.into();
    }

    pub fn ready(&self) -> bool {
        !self.keys().is_empty()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn keys(&self) -> Arc<[Arc<[u8]>]> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn mac(key: &[u8], id: &str, channel: &str, expires: u64) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        mac.update(format!("blob\n{id}\n{channel}\n{expires}").as_bytes());
        mac
    }

    /// When a URL signed now expires: now + TTL, rounded up to the bucket.
    pub fn expiry(&self, now_unix: u64) -> u64 {
        let bucket = (self.ttl.as_secs() / 4).max(60);
        (now_unix + self.ttl.as_secs()).div_ceil(bucket) * bucket
    }

    /// The signed path and query for blob `id` in `channel`; `None` without a key.
    pub fn sign(&self, id: &str, channel: &str, now_unix: u64) -> Option<String> {
        let keys = self.keys();
        let key = keys.first()?;
        let expires = self.expiry(now_unix);
        let sig = Self::mac(key, id, channel, expires).finalize().into_bytes();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig);
        Some(format!(
            "/blobs/{id}?channel={}&expires={expires}&sig={sig}",
            encode_component(channel)
        ))
    }

    /// Checks a URL's signature (constant time) and expiry.
    pub fn verify(
        &self,
        id: &str,
        channel: &str,
        expires: u64,
        sig: &str,
        now_unix: u64,
    ) -> Result<(), SigError> {
        let keys = self.keys();
        if keys.is_empty() {
            return Err(SigError::NoKey);
        }
        let given = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| SigError::Invalid)?;
        // Every key is tried (constant time each), so timing tells nothing of which.
        let valid = keys.iter().fold(false, |found, key| {
            found
                | Self::mac(key, id, channel, expires)
                    .verify_slice(&given)
                    .is_ok()
        });
        if !valid {
            return Err(SigError::Invalid);
        }
        if expires <= now_unix {
            return Err(SigError::Expired);
        }
        Ok(())
    }
}

/// Percent-encodes a query value: everything but `[A-Za-z0-9_.:@-]`.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"_.:@-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn keys_rotate_sign_with_the_first_accept_any() {
        let ttl = Duration::from_secs(3600);
        let old = UrlSigner::with_key(ttl, b"old");
        let rotating = UrlSigner::new(ttl);
        rotating.set_keys(&[b"new", b"old"]);
        let new_only = UrlSigner::with_key(ttl, b"new");
        let (id, channel) = ("ab".repeat(32), "pics");
        for signer in [&old, &rotating] {
            let url = signer.sign(&id, channel, NOW).unwrap();
            let (_, _, expires, sig) = parts(&url);
            assert_eq!(rotating.verify(&id, channel, expires, &sig, NOW), Ok(()));
        }
        // The rotating node signs with the new key, which a node with only it accepts.
        let (_, _, expires, sig) = parts(&rotating.sign(&id, channel, NOW).unwrap());
        assert_eq!(new_only.verify(&id, channel, expires, &sig, NOW), Ok(()));
        let (_, _, expires, sig) = parts(&old.sign(&id, channel, NOW).unwrap());
        assert_eq!(
            new_only.verify(&id, channel, expires, &sig, NOW),
            Err(SigError::Invalid)
        );
    }

    fn parts(url: &str) -> (String, String, u64, String) {
        let (path, query) = url.split_once('?').unwrap();
        let id = path.strip_prefix("/blobs/").unwrap().to_owned();
        let q = |k: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap()
                .to_owned()
        };
        let channel = crate::http::percent_decode(&q("channel")).unwrap();
        (id, channel, q("expires").parse().unwrap(), q("sig"))
    }

    #[test]
    fn a_signed_url_verifies_until_it_expires() {
        let s = UrlSigner::with_key(Duration::from_secs(3600), b"k");
        let url = s.sign("ab12", "chat:#alice", NOW).unwrap();
        assert!(url.contains("channel=chat:%23alice"), "{url}");
        let (id, channel, expires, sig) = parts(&url);
        assert_eq!(channel, "chat:#alice");
        assert!((NOW + 3600..NOW + 3600 + 900).contains(&expires));
        assert_eq!(s.verify(&id, &channel, expires, &sig, NOW), Ok(()));
        assert_eq!(
            s.verify(&id, &channel, expires, &sig, expires),
            Err(SigError::Expired)
        );
    }

    #[test]
    fn any_tampering_is_refused() {
        let s = UrlSigner::with_key(Duration::from_secs(3600), b"k");
        let (id, channel, expires, sig) = parts(&s.sign("ab12", "room", NOW).unwrap());
        assert_eq!(
            s.verify("ab13", &channel, expires, &sig, NOW),
            Err(SigError::Invalid)
        );
        assert_eq!(
            s.verify(&id, "other", expires, &sig, NOW),
            Err(SigError::Invalid)
        );
        assert_eq!(
            s.verify(&id, &channel, expires + 3600, &sig, NOW),
            Err(SigError::Invalid)
        );
        assert_eq!(
            s.verify(&id, &channel, expires, "!!", NOW),
            Err(SigError::Invalid)
        );
        let other = UrlSigner::with_key(Duration::from_secs(3600), b"other key");
        assert_eq!(
            other.verify(&id, &channel, expires, &sig, NOW),
            Err(SigError::Invalid)
        );
        assert_eq!(
            UrlSigner::new(Duration::from_secs(1)).verify(&id, &channel, expires, &sig, NOW),
            Err(SigError::NoKey)
        );
    }

    #[test]
    fn urls_signed_close_together_are_the_same_so_browsers_cache_them() {
        let s = UrlSigner::with_key(Duration::from_secs(3600), b"k");
        let start = s.expiry(NOW) - 3600 - 899;
        assert_eq!(
            s.sign("ab", "c", start).unwrap(),
            s.sign("ab", "c", start + 600).unwrap()
        );
    }
}

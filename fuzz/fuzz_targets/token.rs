//! The token parser: any string is a verified identity or a documented error, never a
//! panic. Half the inputs are signed with the configured key, so the claims parser (exp,
//! nbf, iat, aud, iss, channels, grants) sees arbitrary JSON behind a valid signature.
#![no_main]

use gateway::{auth::Verifier, config::AuthConfig};
use jsonwebtoken::{EncodingKey, Header, encode};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let config: AuthConfig = serde_json::from_value(serde_json::json!({
            "hmac_secrets": ["fuzz-secret"],
            "audience": ["gw"],
        }))
        .expect("config");
        Verifier::new(&config).expect("verifier")
    })
}

fuzz_target!(|data: &[u8]| {
    let verifier = verifier();
    let Some((&mode, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    if mode % 2 == 0 {
        let _ = verifier.verify_cached(&text);
        let _ = verifier.verify_subscription_cached(&text, "alice", "chat:room");
    } else if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(rest) {
        let key = EncodingKey::from_secret(b"fuzz-secret");
        if let Ok(token) = encode(&Header::default(), &claims, &key) {
            if let Ok(id) = verifier.verify_cached(&token) {
                assert!(!id.user.is_empty() || claims.get("sub").is_some());
            }
            let _ = verifier.verify_subscription_cached(&token, "alice", "chat:room");
        }
    }
});

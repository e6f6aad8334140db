//! Tokens and per-connection limits against the real binary: grants, private namespaces
//! and subscription tokens, server-side subscriptions from the `channels` claim, keys from
//! a JWKS URL (refreshed on an unknown `kid`), connections per user, bytes per second,
//! and the bounds on presence and history replies.

mod common;

use broker_proto::{
    Encoding,
    v1::{
        Connect, HistoryRequest, PresenceRequest, Subscribe, client_frame::Command,
        server_frame::Body,
    },
};
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};
use std::{
    io::{Read, Write},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

const CONFIG: &str = r#"
[auth]
hmac_secrets = ["s3cret"]
[namespaces.default]
allow_anonymous = true
[namespaces.chat]
[namespaces.news]
[namespaces.secret]
private = true
"#;

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(b"s3cret"),
    )
    .unwrap()
}

async fn as_user(server: &Server, claims: Value) -> Client {
    Client::connect(
        &server.ws_url(&format!("?token={}", token(claims))),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap()
}

fn subscribe_with(channel: &str, token: String) -> Command {
    Command::Subscribe(Subscribe {
        channel: channel.into(),
        token,
        ..Default::default()
    })
}

/// A private namespace opens only to a subscription token for the user and channel, or
/// to a token whose `grants` match; `grants` also limit a connection to what they match.
#[tokio::test]
async fn private_namespaces_open_to_subscription_tokens_and_grants() {
    let server = Server::start_with(CONFIG, &["--api-key", "test-key"]);
    let now = get_current_timestamp();
    let mut alice = as_user(&server, json!({"sub": "alice"})).await;
    assert_eq!(
        error_code(&alice.call(subscribe("secret:x")).await),
        Some(103)
    );
    assert_eq!(
        error_code(&alice.call(publish("secret:x", "no")).await),
        Some(103)
    );
    assert_eq!(
        error_code(
            &alice
                .call(Command::History(HistoryRequest {
                    channel: "secret:x".into(),
                    ..Default::default()
                }))
                .await
        ),
        Some(103)
    );
    let for_bob = token(json!({"sub": "bob", "channel": "secret:x"}));
    let for_y = token(json!({"sub": "alice", "channel": "secret:y"}));
    let expired = token(json!({"sub": "alice", "channel": "secret:x", "exp": now - 60}));
    let forged = encode(
        &Header::default(),
        &json!({"sub": "alice", "channel": "secret:x"}),
        &EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    for (bad, code) in [(for_bob, 101), (for_y, 101), (forged, 101), (expired, 109)] {
        let f = alice.call(subscribe_with("secret:x", bad)).await;
        assert_eq!(error_code(&f), Some(code));
    }
    // A good subscription token: subscribed, and the channel opens for publish and
    // history while the subscription lasts.
    let good = token(json!({"sub": "alice", "channel": "secret:x", "exp": now + 60}));
    ok(alice.call(subscribe_with("secret:x", good)).await);
    ok(alice.call(publish("secret:x", "hello")).await);
    match alice.push().await {
        Body::Publication(p) => assert_eq!(&p.data[..], b"hello"),
        other => panic!("{other:?}"),
    }
    ok(alice
        .call(Command::History(HistoryRequest {
            channel: "secret:x".into(),
            ..Default::default()
        }))
        .await);
    ok(alice
        .call(Command::Unsubscribe(broker_proto::v1::Unsubscribe {
            channel: "secret:x".into(),
        }))
        .await);
    assert_eq!(
        error_code(&alice.call(publish("secret:x", "gone")).await),
        Some(103)
    );
    // An anonymous client's subscription token names the empty user; anonymous
    // clients may not use a namespace that needs a token at all.
    let mut anon = server.client(Encoding::Proto).await;
    let f = anon
        .call(subscribe_with(
            "secret:x",
            token(json!({"sub": "", "channel": "secret:x"})),
        ))
        .await;
    assert_eq!(error_code(&f), Some(101));

    // A subscription token is not a connection token (found by the adversarial review:
    // it made a connection without the user's grants, or a user named "").
    for t in [
        token(json!({"sub": "alice", "channel": "secret:x"})),
        token(json!({"sub": "", "channel": "secret:x"})),
    ] {
        let mut c = Client::connect(
            &server.ws_url(&format!("?token={t}")),
            None,
            Encoding::Proto,
        )
        .await
        .unwrap();
        expect_close(&mut c, 4001).await;
    }

    // Grants: only what they match, private namespaces included.
    let mut limited = as_user(
        &server,
        json!({"sub": "carol", "grants": ["chat:room-*", "secret:team"]}),
    )
    .await;
    ok(limited.call(subscribe("chat:room-1")).await);
    ok(limited.call(subscribe("secret:team")).await);
    ok(limited.call(publish("secret:team", "x")).await);
    assert_eq!(
        error_code(&limited.call(subscribe("chat:lobby")).await),
        Some(103)
    );
    assert_eq!(
        error_code(&limited.call(subscribe("secret:other")).await),
        Some(103)
    );
    assert_eq!(
        error_code(&limited.call(publish("news:x", "x")).await),
        Some(103)
    );
    // A subscription token still opens one more channel to a granted connection.
    ok(limited
        .call(subscribe_with(
            "secret:other",
            token(json!({"sub": "carol", "channel": "secret:other"})),
        ))
        .await);
    assert_node_serves(&server).await;
}

/// The `channels` claim subscribes server-side: at upgrade a `ConnectResult` push lists
/// the subscriptions; with `connect` its reply does. Publications follow at once.
#[tokio::test]
async fn the_channels_claim_subscribes_server_side() {
    let server = Server::start_with(CONFIG, &["--api-key", "test-key"]);
    let claims = json!({"sub": "alice", "channels": ["news:today", "chat:#alice"]});
    let mut at_upgrade = as_user(&server, claims.clone()).await;
    let Body::Connect(result) = at_upgrade.push().await else {
        panic!("expected a ConnectResult push")
    };
    let mut names: Vec<_> = result
        .subscriptions
        .iter()
        .map(|s| s.channel.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["chat:#alice", "news:today"]);
    assert!(result.subscriptions.iter().all(|s| !s.epoch.is_empty()));

    let mut by_connect = server.client(Encoding::Proto).await;
    let reply = ok(by_connect
        .call(Command::Connect(Connect {
            token: token(claims),
            ..Default::default()
        }))
        .await);
    let Body::Connect(result) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(result.subscriptions.len(), 2);

    let (status, _) = server.api(
        "POST",
        "/api/v1/publish",
        r#"{"channel":"news:today","data":"aGk="}"#,
    );
    assert_eq!(status, 200);
    for c in [&mut at_upgrade, &mut by_connect] {
        match c.push().await {
            Body::Publication(p) => {
                assert_eq!(p.channel, "news:today");
                assert_eq!(&p.data[..], b"hi");
            }
            other => panic!("{other:?}"),
        }
        // Already subscribed: a second subscribe says so.
        assert_eq!(
            error_code(&c.call(subscribe("news:today")).await),
            Some(105)
        );
    }

    // A refresh of the same user's token after server-side subscriptions is fine; the
    // subscriptions it already holds are not made again.
    let refreshed = ok(at_upgrade
        .call(Command::Connect(Connect {
            token: token(json!({"sub": "alice", "channels": ["news:today"], "exp": get_current_timestamp() + 600})),
            ..Default::default()
        }))
        .await);
    let Body::Connect(result) = refreshed else {
        panic!("{refreshed:?}")
    };
    assert!(result.subscriptions.is_empty());
    // And again: refreshes are not limited to one.
    ok(at_upgrade
        .call(Command::Connect(Connect {
            token: token(json!({"sub": "alice", "exp": get_current_timestamp() + 900})),
            ..Default::default()
        }))
        .await);

    // A channel the node cannot use makes the token invalid.
    let mut bad = as_user(&server, json!({"sub": "a", "channels": ["nope:x"]})).await;
    expect_close(&mut bad, 4001).await;
    let mut malformed = as_user(&server, json!({"sub": "a", "channels": ["has space"]})).await;
    expect_close(&mut malformed, 4001).await;
    assert_node_serves(&server).await;
}

/// A minimal HTTP server for a JWKS document, counting requests.
struct JwksServer {
    url: String,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    fn start(body: String) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let body = Arc::new(Mutex::new(body));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().take(1000) {
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                h.fetch_add(1, Ordering::SeqCst);
                let body = b.lock().unwrap().clone();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { url, body, hits }
    }
}

fn jwks(kids: &[&str]) -> String {
    let jwk: Value = serde_json::from_str(include_str!("keys/rsa_public.jwk.json")).unwrap();
    let keys: Vec<Value> = kids
        .iter()
        .map(|kid| {
            let mut k = jwk.clone();
            k["kid"] = json!(kid);
            k
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

fn rs256(kid: &str, claims: Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    let key = EncodingKey::from_rsa_pem(include_bytes!("keys/rsa_private.pem")).unwrap();
    encode(&header, &claims, &key).unwrap()
}

/// Keys from a JWKS URL: fetched at start, refetched when a token names a `kid` the node
/// does not hold (a key rotation at the issuer), at most once per 10 s.
#[tokio::test]
async fn keys_come_from_a_jwks_url_and_refresh_on_an_unknown_kid() {
    let jwks_server = JwksServer::start(jwks(&["k1"]));
    let config = format!(
        "[auth]\njwks_url = \"{}\"\naudience = [\"gw\"]\n[namespaces.chat]\n",
        jwks_server.url
    );
    let server = Server::start(&config);
    let deadline = Instant::now() + Duration::from_secs(10);
    while jwks_server.hits.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the JWKS was never fetched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let claims = json!({"sub": "alice", "aud": "gw"});
    let mut c = Client::connect(
        &server.ws_url(&format!("?token={}", rs256("k1", claims.clone()))),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap();
    ok(c.call(publish("chat:#alice", "via jwks")).await);
    // Wrong audience: refused.
    let mut c = Client::connect(
        &server.ws_url(&format!(
            "?token={}",
            rs256("k1", json!({"sub": "alice", "aud": "other"}))
        )),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap();
    expect_close(&mut c, 4001).await;

    // The issuer rotates to k2: the first token naming it makes the node refetch.
    *jwks_server.body.lock().unwrap() = jwks(&["k1", "k2"]);
    let before = jwks_server.hits.load(Ordering::SeqCst);
    let mut c = Client::connect(
        &server.ws_url(&format!("?token={}", rs256("k2", claims.clone()))),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap();
    ok(c.call(publish("chat:#alice", "after rotation")).await);
    assert_eq!(jwks_server.hits.load(Ordering::SeqCst), before + 1);
    // A flood of unknown kids costs at most one fetch per 10 s.
    for _ in 0..20 {
        let mut c = Client::connect(
            &server.ws_url(&format!("?token={}", rs256("k9", claims.clone()))),
            None,
            Encoding::Proto,
        )
        .await
        .unwrap();
        expect_close(&mut c, 4001).await;
    }
    assert!(jwks_server.hits.load(Ordering::SeqCst) <= before + 2);
    // An HS256 token signed with the public key's bytes is not accepted (alg pinned).
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(include_bytes!("keys/rsa_public.pem")),
    )
    .unwrap();
    let mut c = Client::connect(
        &server.ws_url(&format!("?token={forged}")),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap();
    expect_close(&mut c, 4001).await;
}

/// `max_connections_per_user`: the next socket of a user at the limit is closed with
/// 4029, whether the token came with the upgrade or in `connect`.
#[tokio::test]
async fn connections_per_user_are_bounded() {
    let server = Server::start(&format!(
        "{CONFIG}\n[limits]\nmax_connections_per_user = 2\n"
    ));
    let alice = json!({"sub": "alice"});
    let mut a1 = as_user(&server, alice.clone()).await;
    let _a2 = as_user(&server, alice.clone()).await;
    ok(a1.call(subscribe("chat:#alice")).await);
    let mut a3 = as_user(&server, alice.clone()).await;
    expect_close(&mut a3, 4029).await;
    let mut by_connect = server.client(Encoding::Proto).await;
    let f = by_connect
        .call(Command::Connect(Connect {
            token: token(alice.clone()),
            ..Default::default()
        }))
        .await;
    assert_eq!(error_code(&f), Some(106));
    expect_close(&mut by_connect, 4029).await;
    let mut bob = as_user(&server, json!({"sub": "bob"})).await;
    ok(bob.call(subscribe("chat:#bob")).await);
    // A closed connection gives its slot back.
    drop(a1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = as_user(&server, alice.clone()).await;
        match tokio::time::timeout(Duration::from_millis(300), again.next_or_closed()).await {
            Ok(Err(code)) => {
                assert_eq!(code, Some(4029));
                assert!(Instant::now() < deadline, "the slot never came back");
            }
            _ => break,
        }
    }
    assert!(server.metric("gateway_connections_rejected_total{reason=\"per_user\"}") >= 2.0);
}

/// `bytes_per_second`: a client sending faster is read more slowly (nothing is dropped,
/// TCP pushes back); others are served meanwhile.
#[tokio::test]
async fn bytes_per_second_slow_a_flooding_client_down() {
    let config =
        "[limits]\nmax_message_bytes = 16384\nbytes_per_second = 20000\nbytes_burst = 20000\n";
    let server = Server::start(config);
    let mut flooder = server.client(Encoding::Proto).await;
    let started = Instant::now();
    let chunk = vec![b'x'; 10_000];
    let frames: Vec<_> = (1..=10)
        .map(|id| broker_proto::v1::ClientFrame {
            id,
            command: Some(publish("flood", chunk.clone())),
        })
        .collect();
    for f in &frames {
        flooder.send_frames(std::slice::from_ref(f)).await;
    }
    // Meanwhile another client is served at once.
    let mut other = server.client(Encoding::Proto).await;
    let t = Instant::now();
    ok(other.call(subscribe("calm")).await);
    assert!(t.elapsed() < Duration::from_secs(1));
    let mut replies = 0;
    while replies < 10 {
        let f = flooder.next().await;
        if f.id > 0 {
            ok(f);
            replies += 1;
        }
    }
    // 100 KB at 20 KB/s after a 20 KB burst: about 4 s.
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(3), "not throttled: {took:?}");
    assert!(server.metric("gateway_read_throttled_microseconds_total") > 0.0);
}

/// Presence replies list at most `max_presence_clients` (and say so); history pages are
/// cut to `max_history_limit`.
#[tokio::test]
async fn presence_and_history_replies_are_bounded() {
    let config = "[limits]\nmax_presence_clients = 3\nmax_history_limit = 5\n";
    let server = Server::start(config);
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut c = server.client(Encoding::Proto).await;
        ok(c.call(subscribe("room")).await);
        clients.push(c);
    }
    let c = &mut clients[0];
    let reply = ok(c
        .call(Command::Presence(PresenceRequest {
            channel: "room".into(),
        }))
        .await);
    let Body::Presence(p) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(p.clients.len(), 3);
    assert!(p.truncated);
    for i in 0..10 {
        ok(c.call(publish("room", format!("m{i}"))).await);
    }
    for limit in [0, 3, 100] {
        let reply = ok(c
            .call(Command::History(HistoryRequest {
                channel: "room".into(),
                since_offset: 0,
                limit,
            }))
            .await);
        let Body::History(h) = reply else {
            panic!("{reply:?}")
        };
        let expected = if limit == 3 { 3 } else { 5 };
        assert_eq!(h.publications.len(), expected, "limit {limit}");
    }
    assert!(server.metric("gateway_presence_truncated_total") >= 1.0);
}

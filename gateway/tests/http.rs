//! End-to-end tests of everything beside the WebSocket protocol: the HTTP API, health and
//! metrics endpoints, token auth, rate limits, idle timeout and the SIGTERM drain.

mod common;

use broker_proto::{
    Encoding,
    v1::{Connect, client_frame::Command, server_frame::Body},
};
use common::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use std::time::Duration;

const API: &str = "[namespaces.chat]\njoin_leave = true\n";

fn api_server() -> Server {
    Server::start_with(API, &["--api-key", "test-key"])
}

#[tokio::test]
async fn api_publish_reaches_websocket_subscribers_in_both_encodings() {
    let server = api_server();
    let mut proto = server.client(Encoding::Proto).await;
    let mut json = server.client(Encoding::Json).await;
    ok(proto.call(subscribe("chat:room")).await);
    ok(json.call(subscribe("chat:room")).await);
    // "aGVsbG8=" is "hello"; field names are the schema's, in camelCase.
    let (status, body) = server.api(
        "POST",
        "/api/v1/publish",
        r#"{"channel":"chat:room","data":"aGVsbG8=","contentType":"text/plain","idempotencyKey":"k1"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["offset"], "1");
    let epoch = body["epoch"].as_str().unwrap().to_owned();
    for c in [&mut proto, &mut json] {
        // Skip the Join pushes of the two subscribers.
        let p = loop {
            match c.push().await {
                Body::Publication(p) => break p,
                Body::Join(_) => continue,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            (&p.data[..], p.content_type.as_str(), p.offset),
            (&b"hello"[..], "text/plain", 1)
        );
        assert!(p.info.is_none(), "API publications carry no client info");
    }
    // The same idempotency key again: same result, not delivered twice.
    let (_, again) = server.api(
        "POST",
        "/api/v1/publish",
        r#"{"channel":"chat:room","data":"aGVsbG8=","idempotencyKey":"k1"}"#,
    );
    assert_eq!(
        (again["offset"].as_str(), again["epoch"].as_str()),
        (Some("1"), Some(epoch.as_str()))
    );
    proto.quiet_for(Duration::from_millis(200)).await;

    let (status, b) = server.api(
        "POST",
        "/api/v1/broadcast",
        r#"{"channels":["chat:room","x","bad name"],"data":"eA=="}"#,
    );
    assert_eq!(status, 200);
    let r = b["responses"].as_array().unwrap();
    assert_eq!(r[0]["offset"], "2");
    assert_eq!(r[1]["offset"], "1");
    assert_eq!(r[2]["error"]["code"], 102);
    assert_eq!(
        &match proto.push().await {
            Body::Publication(p) => p.data,
            other => panic!("{other:?}"),
        }[..],
        b"x"
    );

    let (status, h) = server.api(
        "GET",
        "/api/v1/channels/chat:room/history?since_offset=1&limit=5",
        "",
    );
    assert_eq!(status, 200);
    assert_eq!(
        (h["offset"].as_str(), h["epoch"].as_str()),
        (Some("2"), Some(epoch.as_str()))
    );
    let pubs = h["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 1);
    assert_eq!(
        (pubs[0]["offset"].as_str(), pubs[0]["data"].as_str()),
        (Some("2"), Some("eA=="))
    );

    let (status, p) = server.api("GET", "/api/v1/channels/chat:room/presence", "");
    assert_eq!(status, 200);
    assert_eq!(p["clients"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn api_errors_carry_status_and_code() {
    let server = api_server();
    let cases: Vec<(&str, &str, &str, u16, u32)> = vec![
        (
            "POST",
            "/api/v1/publish",
            r#"{"channel":"bad name","data":""}"#,
            400,
            102,
        ),
        (
            "POST",
            "/api/v1/publish",
            r#"{"channel":"nope:x","data":""}"#,
            400,
            102,
        ),
        (
            "POST",
            "/api/v1/publish",
            r#"{"channel":"x","data":"!!!"}"#,
            400,
            104,
        ),
        ("POST", "/api/v1/publish", "not json", 400, 104),
        (
            "POST",
            "/api/v1/broadcast",
            r#"{"channels":[],"data":""}"#,
            400,
            104,
        ),
        ("GET", "/api/v1/channels/x/history?limit=abc", "", 400, 104),
        ("GET", "/api/v1/nothing", "", 400, 104),
    ];
    for (method, path, body, status, code) in cases {
        let (s, b) = server.api(method, path, body);
        assert_eq!(
            (s, b["error"]["code"].as_u64()),
            (status, Some(u64::from(code))),
            "{method} {path} {body}: {b}"
        );
        assert!(!b["error"]["message"].as_str().unwrap().is_empty());
        assert_eq!(b["error"]["temporary"], false);
    }
    let big = format!(r#"{{"channel":"x","data":"{}"}}"#, "A".repeat(100_000));
    let (s, b) = server.api("POST", "/api/v1/publish", &big);
    assert_eq!((s, b["error"]["code"].as_u64()), (413, Some(110)));
    // Wrong or missing key: 401/101.
    let (s, b) = server.http("POST", "/api/v1/publish", &[("X-API-Key", "wrong")], "{}");
    assert_eq!(s, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["code"],
        101
    );
    let (s, _) = server.http("POST", "/api/v1/publish", &[], "{}");
    assert_eq!(s, 401);
    // Without a configured key the API is off: 403/103.
    let off = Server::start("");
    let (s, b) = off.api("POST", "/api/v1/publish", r#"{"channel":"x","data":""}"#);
    assert_eq!((s, b["error"]["code"].as_u64()), (403, Some(103)));
}

#[tokio::test]
async fn health_readiness_metrics_and_demo_page() {
    let server = api_server();
    assert_eq!(server.http("GET", "/healthz", &[], "").0, 200);
    assert_eq!(server.http("GET", "/readyz", &[], "").0, 200);
    let (status, page) = server.http("GET", "/", &[], "");
    assert_eq!(status, 200);
    assert!(page.contains("/chat.js"), "the chat app is at /");
    let (status, page) = server.http("GET", "/volume", &[], "");
    assert_eq!(status, 200);
    assert!(
        page.contains("/volume.js"),
        "the volume viewer is at /volume"
    );
    let dist = concat!(env!("CARGO_MANIFEST_DIR"), "/web/dist/");
    for (path, file) in [
        ("/client.js", "client.js"),
        ("/client.d.ts", "client.d.ts"),
        ("/client-json.js", "client-json.js"),
    ] {
        let (status, body) = server.http("GET", path, &[], "");
        assert_eq!(status, 200, "{path}");
        let want = std::fs::read_to_string(format!("{dist}{file}")).unwrap();
        assert!(body == want, "{path} is the embedded {file}");
    }
    // Revalidation: the ETag of /client.js gives 304 without the body.
    let head = raw_head(
        server.addr,
        "GET /client.js HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("an ETag")
        .to_owned();
    assert!(head.contains("cache-control: no-cache"), "{head}");
    let again = raw_head(
        server.addr,
        &format!(
            "GET /client.js HTTP/1.1\r\nHost: t\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(again.starts_with("HTTP/1.1 304"), "{again}");
    assert_eq!(server.http("GET", "/nope.js", &[], "").0, 404);
    let mut c = server.client(Encoding::Proto).await;
    ok(c.call(subscribe("m")).await);
    ok(c.call(publish("m", "x")).await);
    c.push().await;
    assert_eq!(server.metric("gateway_connections"), 1.0);
    assert_eq!(server.metric("gateway_subscriptions"), 1.0);
    assert!(server.metric("gateway_deliveries_total") >= 1.0);
    assert!(server.metric("process_cpu_seconds_total") > 0.0);
    assert!(server.metric("process_resident_memory_bytes") > 1e6);
    let (_, text) = server.http("GET", "/metrics", &[], "");
    for name in [
        "gateway_commands_total{command=\"publish\"}",
        "gateway_publications_total{source=\"client\"}",
        "gateway_broker_publish_seconds_bucket",
        "process_open_fds",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
}

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(b"s3cret"),
    )
    .unwrap()
}

const AUTH: &str = r#"
[auth]
hmac_secrets = ["s3cret"]
[namespaces.chat]
[namespaces.public]
allow_anonymous = true
"#;

#[tokio::test]
async fn tokens_at_upgrade_and_in_connect() {
    let server = Server::start(AUTH);
    let good = token(json!({"sub": "alice"}));
    let expired = token(json!({"sub": "alice", "exp": 1000}));
    // Valid token at upgrade, as query or bearer header: user-limited channel works.
    let mut a = Client::connect(
        &server.ws_url(&format!("?token={good}")),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap();
    ok(a.call(subscribe("chat:#alice")).await);
    let bearer = format!("Bearer {good}");
    let mut a2 = Client::connect_with(
        &server.ws_url(""),
        None,
        Encoding::Proto,
        &[("Authorization", &bearer)],
    )
    .await
    .unwrap();
    assert_eq!(
        error_code(&a2.call(subscribe("chat:#bob")).await),
        Some(103)
    );
    // Bad / expired token at upgrade: 4001 / 4003.
    let mut bad = Client::connect(&server.ws_url("?token=garbage"), None, Encoding::Proto)
        .await
        .unwrap();
    assert_eq!(
        bad.closed().await,
        Closed {
            disconnect: Some(4001),
            close: Some(4001)
        }
    );
    let mut old = Client::connect(
        &server.ws_url(&format!("?token={expired}")),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap();
    assert_eq!(
        old.closed().await,
        Closed {
            disconnect: Some(4003),
            close: Some(4003)
        }
    );
    // Anonymous: 101 except where the namespace allows anonymous clients.
    let mut anon = server.client(Encoding::Json).await;
    assert_eq!(error_code(&anon.call(subscribe("room")).await), Some(101));
    ok(anon.call(subscribe("public:lobby")).await);
    // Connect frame with a good token upgrades an anonymous connection...
    let mut late = server.client(Encoding::Proto).await;
    let r = late
        .call(Command::Connect(Connect {
            token: good.clone(),
            ..Default::default()
        }))
        .await;
    assert!(matches!(ok(r), Body::Connect(_)));
    ok(late.call(subscribe("room")).await);
    // ...a bad one gets 101 then close 4001, an expired one 109 then 4003.
    let mut c = server.client(Encoding::Proto).await;
    let r = c
        .call(Command::Connect(Connect {
            token: "garbage".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(error_code(&r), Some(101));
    assert_eq!(
        c.closed().await,
        Closed {
            disconnect: Some(4001),
            close: Some(4001)
        }
    );
    let mut c = server.client(Encoding::Proto).await;
    let r = c
        .call(Command::Connect(Connect {
            token: expired,
            ..Default::default()
        }))
        .await;
    assert_eq!(error_code(&r), Some(109));
    assert_eq!(
        c.closed().await,
        Closed {
            disconnect: Some(4003),
            close: Some(4003)
        }
    );
    assert_node_serves_anonymously(&server).await;
}

async fn assert_node_serves_anonymously(server: &Server) {
    let mut c = server.client(Encoding::Proto).await;
    ok(c.call(subscribe("public:control")).await);
    ok(c.call(publish("public:control", "ok")).await);
    assert!(matches!(c.push().await, Body::Publication(_)));
}

#[tokio::test]
async fn a_token_expiring_mid_connection_closes_4003() {
    let server = Server::start(&format!("{AUTH}[limits]\nping_interval_ms = 200\n"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t = token(json!({"sub": "alice", "exp": now + 1}));
    let mut c = Client::connect(
        &server.ws_url(&format!("?token={t}")),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap();
    ok(c.call(subscribe("room")).await);
    assert_eq!(
        c.closed().await,
        Closed {
            disconnect: Some(4003),
            close: Some(4003)
        }
    );
}

#[tokio::test]
async fn rate_limit_replies_107_then_closes_4029() {
    let server = Server::start(
        "[limits]\ncommands_per_second = 1\ncommand_burst = 5\nrate_limit_strikes = 10\n",
    );
    let mut c = server.client(Encoding::Proto).await;
    for _ in 0..5 {
        ok(c.call(Command::Ping(Default::default())).await);
    }
    let r = c.call(Command::Ping(Default::default())).await;
    assert_eq!(error_code(&r), Some(107));
    assert!(r.error.unwrap().temporary);
    let frames: Vec<_> = (0..20)
        .map(|i| broker_proto::v1::ClientFrame {
            id: 100 + i,
            command: Some(Command::Ping(Default::default())),
        })
        .collect();
    c.send_frames(&frames).await;
    assert_eq!(
        c.closed().await,
        Closed {
            disconnect: Some(4029),
            close: Some(4029)
        }
    );
    assert_node_serves(&server).await;
}

#[tokio::test]
async fn a_silent_client_is_closed_4004() {
    let server = Server::start("[limits]\nping_interval_ms = 200\n");
    let mut c = server.client(Encoding::Proto).await;
    // Not reading means not answering the server's pings.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        c.closed().await,
        Closed {
            disconnect: Some(4004),
            close: Some(4004)
        }
    );
    // A client that reads answers pings and stays.
    let mut live = server.client(Encoding::Proto).await;
    live.quiet_for(Duration::from_millis(800)).await;
    ok(live.call(Command::Ping(Default::default())).await);
}

#[tokio::test]
async fn sigterm_drains_with_1012_and_exits() {
    let mut server = Server::start("[limits]\ndrain_seconds = 1\n");
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = server.client(Encoding::Proto).await;
        ok(c.call(subscribe("d")).await);
        clients.push(c);
    }
    server.signal("TERM");
    // Readiness fails at once; new upgrades are refused.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.http("GET", "/readyz", &[], "").0, 503);
    for c in &mut clients {
        assert_eq!(
            c.closed().await,
            Closed {
                disconnect: Some(1012),
                close: Some(1012)
            }
        );
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the drain");
    assert!(status.success());
}

/// The status line and headers of a raw HTTP request's response.
fn raw_head(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let resp = String::from_utf8_lossy(&resp);
    resp.split_once("\r\n\r\n")
        .map_or(resp.to_string(), |(h, _)| h.to_owned())
}

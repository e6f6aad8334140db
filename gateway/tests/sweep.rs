//! The hostile-input sweep, against the real binary: every input below is something an
//! attacker (or a broken client) sends, across the handshake, WebSocket framing, both
//! encodings, tokens, commands, blobs, RPC and the HTTP API. Each asserts its documented
//! answer (HTTP status, error code or close code). Afterwards a control client proves
//! the node still serves, and its RSS is back near the baseline.
//!
//! The test prints the list of inputs it tried (`--no-capture`); it fails below 60.

mod common;

use broker_proto::{
    Encoding,
    v1::{
        BlobGet, BlobPut, ClientFrame, Connect, HistoryRequest, PresenceRequest, Publish, Rpc,
        client_frame::Command,
    },
};
use common::*;
use futures_util::SinkExt;
use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};
use tokio_tungstenite::tungstenite::Message;

const CONFIG: &str = r#"
allowed_origins = ["https://app.example"]
[limits]
max_channels_per_connection = 4
max_message_bytes = 65536
max_frames_per_message = 16
commands_per_second = 50
command_burst = 50
rate_limit_strikes = 20
handshake_timeout_ms = 1000
api_body_bytes = 4096
[auth]
hmac_secrets = ["s3cret"]
[blobs]
max_bytes = 100000
max_uploads_per_connection = 2
[namespaces.default]
allow_anonymous = true
max_message_bytes = 1024
[namespaces.plain]
allow_anonymous = true
history_size = 0
presence = false
allow_publish = false
[namespaces.chat]
"#;

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(b"s3cret"),
    )
    .unwrap()
}

/// The inputs tried, for the printed list and the count.
#[derive(Default)]
struct Tried(Vec<String>);

impl Tried {
    fn add(&mut self, area: &str, what: &str, answer: impl std::fmt::Display) {
        self.0.push(format!("{area:10} {what} → {answer}"));
    }
}

/// Sends a raw HTTP request; returns the status line.
fn raw_status(server: &Server, request: &[u8]) -> String {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") && s.read(&mut byte).is_ok_and(|n| n == 1) {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).trim_end().to_owned()
}

fn upgrade_request(extra: &str, query: &str) -> String {
    format!(
        "GET /ws{query} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// A WebSocket opened by hand, so frames can be written byte by byte.
fn raw_ws(server: &Server, query: &str) -> TcpStream {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(upgrade_request("", query).as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "handshake cut short");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s
}

/// A client frame: FIN, opcode, masked (unless `unmasked`), payload.
fn ws_frame(fin: bool, rsv: u8, opcode: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n < 65536 => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Reads server frames until a close frame; its code (None if the socket just ended).
fn close_code(s: &mut TcpStream) -> Option<u16> {
    loop {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).ok()?;
        let opcode = head[0] & 0x0f;
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).ok()?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).ok()?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).ok()?;
        if opcode == 8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

/// Writes raw frames on a fresh connection and returns the close code the node sends.
fn frames_close(server: &Server, query: &str, frames: &[Vec<u8>]) -> Option<u16> {
    let mut s = raw_ws(server, query);
    for f in frames {
        if s.write_all(f).is_err() {
            break;
        }
    }
    close_code(&mut s)
}

fn handshake(server: &Server, tried: &mut Tried) {
    let area = "handshake";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "GET /ws without Upgrade",
            "GET /ws HTTP/1.1\r\nHost: t\r\n\r\n".into(),
            "400",
        ),
        (
            "Sec-WebSocket-Version: 12",
            upgrade_request("", "").replace("Version: 13", "Version: 12"),
            "400",
        ),
        (
            "Sec-WebSocket-Key of 3 bytes",
            upgrade_request("", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "abc"),
            "400",
        ),
        (
            "unknown subprotocol only",
            upgrade_request("Sec-WebSocket-Protocol: mqtt\r\n", ""),
            "400",
        ),
        ("?format=xml", upgrade_request("", "?format=xml"), "400"),
        (
            "POST with Upgrade headers",
            upgrade_request("", "").replacen("GET", "POST", 1),
            "404",
        ),
        (
            "64 KiB header value",
            upgrade_request(&format!("X-Junk: {}\r\n", "a".repeat(65_536)), ""),
            "431",
        ),
        (
            "not HTTP at all",
            "\x16\x03\x01\x02\x00\r\n\r\n".into(),
            "400",
        ),
    ];
    for (what, request, expected) in cases {
        let status = raw_status(server, request.as_bytes());
        assert!(
            status.contains(expected) || (expected == "431" && status.is_empty()),
            "{what}: {status}"
        );
        tried.add(
            area,
            what,
            if status.is_empty() { "closed" } else { &status },
        );
    }
    // A request head that never ends is cut off after handshake_timeout_ms.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\n").unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    let _ = n;
    assert!(started.elapsed() < Duration::from_secs(5), "slow head held");
    tried.add(area, "request head never finished (slowloris)", "closed");
}

async fn tokens(server: &Server, tried: &mut Tried) {
    let area = "token";
    let now = get_current_timestamp();
    let forged = encode(
        &Header::default(),
        &json!({"sub": "alice"}),
        &EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    let none_alg = {
        let t = token(json!({"sub": "alice"}));
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[0] = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"; // {"alg":"none","typ":"JWT"}
        format!("{}.{}.", parts[0], parts[1])
    };
    let cases: Vec<(&str, String, u16)> = vec![
        ("garbage token", "not.a.jwt".into(), 4001),
        ("wrong key", forged, 4001),
        ("alg none", none_alg, 4001),
        (
            "expired",
            token(json!({"sub": "a", "exp": now - 600})),
            4003,
        ),
        (
            "nbf in an hour",
            token(json!({"sub": "a", "nbf": now + 3600})),
            4001,
        ),
        (
            "iat in an hour",
            token(json!({"sub": "a", "iat": now + 3600})),
            4001,
        ),
        ("no sub", token(json!({"exp": now + 60})), 4001),
        ("sub is a number", token(json!({"sub": 7})), 4001),
        (
            "channels claim with a bad name",
            token(json!({"sub": "a", "channels": ["a b"]})),
            4001,
        ),
        (
            "200 channels in the claim",
            token(
                json!({"sub": "a", "channels": (0..200).map(|i| format!("c{i}")).collect::<Vec<_>>()}),
            ),
            4001,
        ),
    ];
    for (what, t, code) in cases {
        let mut c = Client::connect(
            &server.ws_url(&format!("?token={t}")),
            None,
            Encoding::Proto,
        )
        .await
        .unwrap();
        expect_close(&mut c, code).await;
        tried.add(area, &format!("{what} at upgrade"), code);
    }
    // The same in `connect`: the error, then the close.
    let mut c = server.client(Encoding::Proto).await;
    let f = c
        .call(Command::Connect(Connect {
            token: "x.y.z".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(error_code(&f), Some(101));
    expect_close(&mut c, 4001).await;
    tried.add(area, "garbage token in connect", "101, close 4001");
    // A namespace that needs a token, without one.
    let mut c = server.client(Encoding::Proto).await;
    assert_eq!(error_code(&c.call(subscribe("chat:x")).await), Some(101));
    tried.add(area, "anonymous subscribe where a token is needed", 101);
}

async fn framing(server: &Server, tried: &mut Tried) {
    let area = "framing";
    let text = |p: &[u8]| ws_frame(true, 0, 1, true, p);
    let ping = br#"{"id":1,"ping":{}}"#;
    let cases: Vec<(&str, &str, Vec<Vec<u8>>, u16)> = vec![
        (
            "unmasked client frame",
            "?format=json",
            vec![ws_frame(true, 0, 1, false, ping)],
            1002,
        ),
        (
            "RSV1 set without an extension",
            "?format=json",
            vec![ws_frame(true, 4, 1, true, ping)],
            1002,
        ),
        (
            "reserved opcode 0x3",
            "?format=json",
            vec![ws_frame(true, 0, 3, true, b"x")],
            1002,
        ),
        (
            "reserved control opcode 0xB",
            "?format=json",
            vec![ws_frame(true, 0, 0xB, true, b"")],
            1002,
        ),
        (
            "ping with 200 bytes",
            "?format=json",
            vec![ws_frame(true, 0, 9, true, &[0; 200])],
            1002,
        ),
        (
            "fragmented ping",
            "?format=json",
            vec![ws_frame(false, 0, 9, true, b"x")],
            1002,
        ),
        (
            "continuation with nothing to continue",
            "?format=json",
            vec![ws_frame(true, 0, 0, true, b"x")],
            1002,
        ),
        (
            "new text frame inside a fragmented message",
            "?format=json",
            vec![
                ws_frame(false, 0, 1, true, b"{"),
                ws_frame(true, 0, 1, true, b"}"),
            ],
            1002,
        ),
        (
            "invalid UTF-8 in a text frame",
            "?format=json",
            vec![text(&[0xff, 0xfe, b'{'])],
            1007,
        ),
        (
            "UTF-8 split across fragments, then invalid",
            "?format=json",
            vec![
                ws_frame(false, 0, 1, true, &[0xe2, 0x82]),
                ws_frame(true, 0, 0, true, &[0x28]),
            ],
            1007,
        ),
        (
            "message over max_message_bytes",
            "?format=json",
            vec![text(&vec![b' '; 70_000])],
            1009,
        ),
        (
            "declared length of 2^62 bytes",
            "?format=json",
            vec![{
                let mut f = vec![0x81, 0xff];
                f.extend_from_slice(&(1u64 << 62).to_be_bytes());
                f.extend_from_slice(&[1, 2, 3, 4]);
                f
            }],
            1009,
        ),
        ("text frame in proto mode", "", vec![text(ping)], 1003),
        (
            "binary frame in JSON mode",
            "?format=json",
            vec![ws_frame(true, 0, 2, true, ping)],
            1003,
        ),
        (
            "close with code 999",
            "?format=json",
            vec![ws_frame(true, 0, 8, true, &999u16.to_be_bytes())],
            1002,
        ),
        (
            "close with a 1-byte payload",
            "?format=json",
            vec![ws_frame(true, 0, 8, true, &[3])],
            1002,
        ),
    ];
    for (what, query, frames, code) in cases {
        let got = frames_close(server, query, &frames);
        assert_eq!(got, Some(code), "{what}");
        tried.add(area, what, code);
    }
}

async fn proto_encoding(server: &Server, tried: &mut Tried) {
    let area = "proto";
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "random bytes",
            vec![
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            1007,
        ),
        ("length prefix past the end", vec![10, 8, 1], 1007),
        (
            "frame declaring 2 GB",
            {
                let mut v = vec![0x80, 0x80, 0x80, 0x80, 0x08];
                v.extend_from_slice(&[0; 16]);
                v
            },
            1009,
        ),
        (
            "17 frames in one message (limit 16)",
            {
                let ping = [8u8, 1, 0x42, 0];
                let mut v = Vec::new();
                for _ in 0..17 {
                    v.push(ping.len() as u8);
                    v.extend_from_slice(&ping);
                }
                v
            },
            1009,
        ),
        (
            "wrong wire type for the id field",
            vec![2, 0x0a, 0x00],
            1007,
        ),
        (
            "string field that is not UTF-8",
            vec![6, 0x1a, 4, 0x0a, 2, 0xff, 0xfe],
            1007,
        ),
    ];
    for (what, payload, code) in cases {
        let mut c = server.client(Encoding::Proto).await;
        c.ws.send(Message::Binary(payload.into())).await.unwrap();
        expect_close(&mut c, code).await;
        tried.add(area, what, code);
    }
    // Unknown fields are skipped (a newer client); a frame without a command is 104.
    let mut c = server.client(Encoding::Proto).await;
    c.ws.send(Message::Binary(vec![5, 8, 5, 0xf8, 0x07, 0x01].into()))
        .await
        .unwrap();
    let f = c.next().await;
    assert_eq!((f.id, error_code(&f)), (5, Some(104)));
    tried.add(area, "unknown field number 127 and no command", 104);
}

async fn json_encoding(server: &Server, tried: &mut Tried) {
    let area = "json";
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let closing: Vec<(&str, String, u16)> = vec![
        ("not JSON", "hello".into(), 1007),
        ("a JSON array", "[1,2,3]".into(), 1007),
        ("10,000 nested arrays", deep, 1007),
        (
            "id larger than u32",
            r#"{"id":99999999999,"ping":{}}"#.into(),
            1007,
        ),
        (
            "channel as a number",
            r#"{"id":1,"subscribe":{"channel":5}}"#.into(),
            1007,
        ),
        (
            "data not base64",
            r#"{"id":1,"publish":{"channel":"a","data":"!!"}}"#.into(),
            1007,
        ),
        (
            "two commands in one frame",
            r#"{"id":1,"ping":{},"subscribe":{"channel":"a"}}"#.into(),
            1007,
        ),
    ];
    for (what, text, code) in closing {
        let mut c = server.client(Encoding::Json).await;
        c.ws.send(Message::Text(text.into())).await.unwrap();
        expect_close(&mut c, code).await;
        tried.add(area, what, code);
    }
    let mut c = server.client(Encoding::Json).await;
    for (id, (what, text)) in [
        ("unknown command", r#"{"id":1,"teleport":{}}"#),
        ("only an id", r#"{"id":2}"#),
    ]
    .iter()
    .enumerate()
    {
        c.ws.send(Message::Text((*text).into())).await.unwrap();
        let f = c.next().await;
        assert_eq!(
            (f.id as usize, error_code(&f)),
            (id + 1, Some(104)),
            "{what}"
        );
        tried.add(area, what, 104);
    }
    c.ws.send(Message::Text(
        r#"{"id":3,"subscribe":{"channel":"n","epoch":null,"future":{"a":1}}}"#.into(),
    ))
    .await
    .unwrap();
    ok(c.next().await);
    tried.add(area, "nulls and unknown fields", "ok (ignored)");
}

async fn commands(server: &Server, tried: &mut Tried) {
    let area = "command";
    let mut c = server.client(Encoding::Proto).await;
    let long = "a".repeat(300);
    let history = |channel: &str, limit| {
        Command::History(HistoryRequest {
            channel: channel.into(),
            since_offset: 0,
            limit,
        })
    };
    let cases: Vec<(&str, Command, u32)> = vec![
        ("channel with a space", subscribe("a b"), 102),
        ("channel of 300 bytes", subscribe(&long), 102),
        ("empty channel", subscribe(""), 102),
        ("unknown namespace", subscribe("nope:x"), 102),
        (
            "publish to another user's channel",
            publish("#bob", "x"),
            103,
        ),
        (
            "publish where clients may not",
            publish("plain:x", "x"),
            103,
        ),
        (
            "publish over the namespace's max_message_bytes",
            publish("big", vec![0u8; 2000]),
            110,
        ),
        ("history where there is none", history("plain:x", 1), 103),
        (
            "presence where there is none",
            Command::Presence(PresenceRequest {
                channel: "plain:x".into(),
            }),
            103,
        ),
        (
            "content type of 300 bytes",
            Command::Publish(Publish {
                channel: "a".into(),
                data: "x".into(),
                content_type: long.clone(),
                ..Default::default()
            }),
            104,
        ),
    ];
    for (what, command, code) in cases {
        assert_eq!(error_code(&c.call(command).await), Some(code), "{what}");
        tried.add(area, what, code);
    }
    ok(c.call(history("h", u32::MAX)).await);
    tried.add(area, "history limit u32::MAX", "ok (capped)");
    ok(c.call(subscribe("s1")).await);
    assert_eq!(error_code(&c.call(subscribe("s1")).await), Some(105));
    tried.add(area, "subscribe twice", 105);
    for ch in ["s2", "s3", "s4"] {
        ok(c.call(subscribe(ch)).await);
    }
    assert_eq!(error_code(&c.call(subscribe("s5")).await), Some(106));
    tried.add(area, "fifth channel (limit 4)", 106);
    ok(c.call(Command::Connect(Connect::default())).await);
    let f = c.call(Command::Connect(Connect::default())).await;
    assert_eq!(error_code(&f), Some(104));
    tried.add(area, "connect twice", 104);
    // A flood: 107 for each command over the rate, then 4029.
    let mut flood = server.client(Encoding::Proto).await;
    let frames: Vec<ClientFrame> = (1..=16)
        .map(|id| ClientFrame {
            id,
            command: Some(Command::Ping(Default::default())),
        })
        .collect();
    let mut limited = 0;
    let closed = 'outer: {
        for _ in 0..20 {
            if flood.try_send_frames(&frames).await.is_err() {
                break 'outer None;
            }
        }
        loop {
            match flood.next_or_closed().await {
                Ok(f) if error_code(&f) == Some(107) => limited += 1,
                Ok(_) => {}
                Err(code) => break Some(code),
            }
        }
    };
    assert!(limited > 0, "no 107 before the close");
    assert_eq!(closed.flatten(), Some(4029));
    tried.add(area, "320 pings at once (50/s allowed)", "107…, close 4029");
}

async fn blobs(server: &Server, tried: &mut Tried) {
    let area = "blob";
    let png = include_bytes!("../../gateway/web/screenshots/chat.png");
    let put = |upload, size, content_type: &str, data: &[u8], last| {
        Command::BlobPut(BlobPut {
            upload,
            channel: "pics".into(),
            content_type: content_type.into(),
            size,
            data: data.to_vec().into(),
            last,
            ..Default::default()
        })
    };
    let mut c = server.client(Encoding::Proto).await;
    let cases: Vec<(&str, Command, u32)> = vec![
        (
            "first chunk without size",
            put(1, 0, "image/png", b"x", true),
            113,
        ),
        (
            "declared size over max_bytes",
            put(2, 10_000_000, "image/png", b"x", false),
            110,
        ),
        (
            "text claimed as PNG",
            put(3, 5, "image/png", b"hello", true),
            112,
        ),
        (
            "chunk for an upload never begun",
            put(99, 0, "", b"x", false),
            113,
        ),
        (
            "more bytes than declared",
            put(4, 2, "image/png", &png[..100], true),
            113,
        ),
        (
            "unknown blob id",
            Command::BlobGet(BlobGet {
                id: "ab".repeat(32),
                channel: "pics".into(),
            }),
            111,
        ),
        (
            "blob id that is not hex",
            Command::BlobGet(BlobGet {
                id: "../../etc/passwd".into(),
                channel: "pics".into(),
            }),
            111,
        ),
    ];
    for (what, command, code) in cases {
        assert_eq!(error_code(&c.call(command).await), Some(code), "{what}");
        tried.add(area, what, code);
    }
    // A third upload in flight (limit 2).
    ok(c.call(put(10, 1000, "image/png", &png[..10], false)).await);
    ok(c.call(put(11, 1000, "image/png", &png[..10], false)).await);
    let f = c.call(put(12, 1000, "image/png", &png[..10], false)).await;
    assert_eq!(error_code(&f), Some(106));
    tried.add(area, "third upload in flight (limit 2)", 106);
    // A claimed id the bytes do not hash to.
    let mut d = server.client(Encoding::Proto).await;
    let f = d
        .call(Command::BlobPut(BlobPut {
            upload: 1,
            channel: "pics".into(),
            content_type: "image/png".into(),
            size: png.len().min(60_000) as u64,
            data: png[..png.len().min(60_000)].to_vec().into(),
            last: true,
            id: "cd".repeat(32),
        }))
        .await;
    assert_eq!(error_code(&f), Some(113));
    tried.add(area, "claimed id that the bytes do not hash to", 113);
}

async fn rpc(server: &Server, tried: &mut Tried) {
    let area = "rpc";
    let mut c = server.client(Encoding::Proto).await;
    let call = |method: &str| {
        Command::Rpc(Rpc {
            method: method.into(),
            data: "{}".into(),
            ..Default::default()
        })
    };
    for (what, method, code) in [
        ("rpc with no backend configured", "slice", 104),
        ("method ../admin", "../admin", 104),
        ("method with a space", "a b", 104),
        ("method of 200 bytes", &"m".repeat(200)[..], 104),
    ] {
        assert_eq!(
            error_code(&c.call(call(method)).await),
            Some(code),
            "{what}"
        );
        tried.add(area, what, code);
    }
}

fn http_api(server: &Server, tried: &mut Tried) {
    let area = "http api";
    let none: &[(&str, &str)] = &[];
    let key: &[(&str, &str)] = &[("X-API-Key", "test-key")];
    let wrong: &[(&str, &str)] = &[("X-API-Key", "guess")];
    let png: &[(&str, &str)] = &[("X-API-Key", "test-key"), ("Content-Type", "image/png")];
    let blob = "ab".repeat(32);
    let big = format!(r#"{{"channel":"a","data":"{}"}}"#, "A".repeat(8000));
    let forged = format!("/blobs/{blob}?channel=pics&expires=9999999999&sig=AAAA");
    let unsigned = format!("/blobs/{blob}");
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        &'a str,
        u16,
    );
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("no API key", "POST", "/api/v1/publish", none, r#"{"channel":"a"}"#, 401),
        ("wrong API key", "POST", "/api/v1/publish", wrong, "{}", 401),
        ("body that is not JSON", "POST", "/api/v1/publish", key, "{{{", 400),
        ("unknown field (ignored, as over the WebSocket)", "POST", "/api/v1/publish", key, r#"{"channel":"a","x":1}"#, 200),
        ("body over api_body_bytes", "POST", "/api/v1/publish", key, &big, 413),
        ("unknown route", "GET", "/api/v1/secrets", key, "", 400),
        ("since_offset not a number", "GET", "/api/v1/channels/a/history?since_offset=x", key, "", 400),
        ("bad percent escape", "GET", "/api/v1/channels/a%zz/history", key, "", 400),
        ("channel in an unknown namespace", "GET", "/api/v1/channels/nope:a/presence", key, "", 400),
        ("broadcast to no channels", "POST", "/api/v1/broadcast", key, r#"{"channels":[]}"#, 400),
        ("disconnect with no user", "POST", "/api/v1/disconnect", key, r#"{"user":""}"#, 400),
        ("blob upload with an empty body", "POST", "/api/v1/blobs?channel=pics", key, "", 400),
        ("blob upload of text as an image", "POST", "/api/v1/blobs?channel=pics", png, "hello", 415),
        ("blob URL with a forged signature", "GET", &forged, none, "", 403),
        ("blob URL without a signature", "GET", &unsigned, none, "", 403),
    ];
    for (what, method, path, headers, body, status) in cases {
        let (got, answer) = server.http(method, path, headers, body);
        assert_eq!(got, status, "{what}: {answer}");
        tried.add(area, what, status);
    }
}

#[tokio::test]
async fn hostile_inputs_get_their_documented_answers_and_the_node_keeps_serving() {
    let server = Server::start_with(CONFIG, &["--api-key", "test-key"]);
    // Warm up (allocator arenas, first connections) before the baseline.
    assert_node_serves(&server).await;
    let baseline = rss_kib(server.pid());
    let mut tried = Tried::default();
    handshake(&server, &mut tried);
    tokens(&server, &mut tried).await;
    framing(&server, &mut tried).await;
    proto_encoding(&server, &mut tried).await;
    json_encoding(&server, &mut tried).await;
    commands(&server, &mut tried).await;
    blobs(&server, &mut tried).await;
    rpc(&server, &mut tried).await;
    http_api(&server, &mut tried);
    // Origins: a browser page from elsewhere is refused (policy).
    let mut c = Client::connect_with(
        &server.ws_url(""),
        None,
        Encoding::Proto,
        &[("Origin", "https://evil.example")],
    )
    .await
    .unwrap();
    expect_close(&mut c, 1008).await;
    tried.add("handshake", "Origin not allowed", 1008);

    for line in &tried.0 {
        println!("{line}");
    }
    println!("{} hostile inputs", tried.0.len());
    assert!(tried.0.len() >= 60, "only {} inputs", tried.0.len());
    assert_node_serves(&server).await;
    // Everything those clients made the node hold is given back (within allocator slack).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let now = rss_kib(server.pid());
        if now <= baseline + 16 * 1024 || std::time::Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("RSS: baseline {baseline} KiB, after the sweep {after} KiB");
    assert!(
        after <= baseline + 16 * 1024,
        "RSS grew from {baseline} KiB to {after} KiB"
    );
}

//! The gateway's own WebSocket frame I/O (`gateway::ws`) against RFC 6455 and against
//! tungstenite: the cases that matter as tests (fragmentation, control frames inside
//! fragmented messages, the close handshake, UTF-8 across fragments, masking, size
//! limits, partial writes), and a differential test that feeds the same random frame
//! streams to our decoder (in random read sizes) and to tungstenite's reader and
//! requires the same messages and the same error.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gateway::ws::{FrameError, Incoming, WebSocket, decode::Decoder};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::io::{Cursor, Read, Write};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
    },
};

const MAX: usize = 1024;

/// A client frame: masked unless `unmasked`; `len_form` forces a longer length encoding.
fn frame(first: u8, payload: &[u8], unmasked: bool, len_form: u8) -> Vec<u8> {
    let mut v = vec![first];
    let mask_bit = if unmasked { 0 } else { 0x80 };
    let len = payload.len();
    match (len, len_form) {
        (0..=125, 0) => v.push(mask_bit | len as u8),
        (0..=0xFFFF, 0 | 1) => {
            v.push(mask_bit | 126);
            v.extend((len as u16).to_be_bytes());
        }
        _ => {
            v.push(mask_bit | 127);
            v.extend((len as u64).to_be_bytes());
        }
    }
    if unmasked {
        v.extend_from_slice(payload);
    } else {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }
    v
}

fn data(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    frame(opcode | if fin { 0x80 } else { 0 }, payload, false, 0)
}

/// What a reader made of a stream: messages up to and including the first close, then
/// how it ended.
#[derive(Debug, PartialEq)]
struct Outcome {
    messages: Vec<Incoming>,
    error: Option<FrameError>,
}

fn ours(stream: &[u8], rng: &mut StdRng) -> Outcome {
    let mut d = Decoder::new(MAX);
    let mut messages = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let n = rng
            .random_range(1..=stream.len() - pos)
            .min(rng.random_range(1..64));
        let mut chunk = stream[pos..pos + n].to_vec();
        pos += n;
        let mut stop = false;
        let r = d.feed(&mut chunk, &mut |m| {
            if !stop {
                stop = matches!(m, Incoming::Close(_));
                messages.push(normalize(m));
            }
        });
        if let Err(e) = r {
            return Outcome {
                messages,
                error: Some(e),
            };
        }
        if stop {
            break;
        }
    }
    Outcome {
        messages,
        error: None,
    }
}

/// tungstenite reports a close code no endpoint may send as 1002 (and answers so); ours
/// reports the code received and answers 1002. Compared as tungstenite reports it.
fn normalize(m: Incoming) -> Incoming {
    match m {
        Incoming::Close(Some((code, _))) if !CloseCode::from(code).is_allowed() => {
            Incoming::Close(Some((1002, Bytes::from_static(b"Protocol violation"))))
        }
        m => m,
    }
}

/// A byte source for tungstenite that swallows what it writes.
struct Feed(Cursor<Vec<u8>>);

impl Read for Feed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Feed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn theirs(stream: &[u8]) -> Outcome {
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX);
    config.max_frame_size = Some(MAX);
    let mut ws = tungstenite::WebSocket::from_raw_socket(
        Feed(Cursor::new(stream.to_vec())),
        Role::Server,
        Some(config),
    );
    let mut messages = Vec::new();
    loop {
        let m = match ws.read() {
            Ok(m) => m,
            Err(e) => {
                let error = match e {
                    tungstenite::Error::Capacity(_) => Some(FrameError::TooBig),
                    tungstenite::Error::Utf8(_) => Some(FrameError::Utf8),
                    // The stream ended without a close: not an error of the frames.
                    tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ) => None,
                    tungstenite::Error::Protocol(_) => Some(FrameError::Protocol("")),
                    e => panic!("unexpected tungstenite error {e}"),
                };
                return Outcome { messages, error };
            }
        };
        let close = matches!(m, Message::Close(_));
        messages.push(match m {
            Message::Binary(b) => Incoming::Binary(b),
            Message::Text(t) => Incoming::Text(Bytes::from(t)),
            Message::Ping(p) => Incoming::Ping(p),
            Message::Pong(p) => Incoming::Pong(p),
            Message::Close(c) => {
                Incoming::Close(c.map(|c| (u16::from(c.code), Bytes::from(c.reason))))
            }
            Message::Frame(_) => unreachable!("tungstenite reads no raw frames"),
        });
        if close {
            return Outcome {
                messages,
                error: None,
            };
        }
    }
}

fn same_error(a: &Option<FrameError>, b: &Option<FrameError>) -> bool {
    match (a, b) {
        (Some(FrameError::Protocol(_)), Some(FrameError::Protocol(_))) => true,
        (a, b) => a == b,
    }
}

/// A random frame: mostly well formed, sometimes each of the ways a frame can be wrong.
/// `open`: whether a fragmented message is under way, and whether it is text.
fn random_frame(rng: &mut StdRng, open: &mut Option<bool>) -> Vec<u8> {
    let pick = rng.random_range(0..100u32);
    let fin = rng.random_bool(0.6);
    if rng.random_bool(0.8) {
        // Mostly follow the fragmentation rules, so that streams get far.
        let (opcode, text) = match *open {
            Some(text) => (0x0, text),
            None if rng.random_bool(0.5) => (0x1, true),
            None => (0x2, false),
        };
        *open = (!fin).then_some(text);
        let len = rng.random_range(0..=40);
        let body: Vec<u8> = if text || rng.random_bool(0.5) {
            // Whole characters: valid when joined (the menu below splits them).
            "aé€😀"
                .repeat(10)
                .chars()
                .take(len)
                .collect::<String>()
                .into_bytes()
        } else {
            (0..len).map(|_| rng.random()).collect()
        };
        return data(opcode, fin, &body);
    }
    let payload = |rng: &mut StdRng, max: usize| -> Vec<u8> {
        let len = match rng.random_range(0..10) {
            0 => rng.random_range(0..=max.min(2000)),
            _ => rng.random_range(0..=20),
        };
        match rng.random_range(0..4) {
            // Valid UTF-8 with multi-byte characters that splits land inside.
            0 | 1 => "aé€😀".repeat(len / 10 + 1).into_bytes()[..len.min(40)].to_vec(),
            _ => (0..len).map(|_| rng.random()).collect(),
        }
    };
    match pick {
        0..=24 => data(0x2, fin, &payload(rng, MAX + 10)),
        25..=44 => data(0x1, fin, &payload(rng, MAX + 10)),
        45..=69 => data(0x0, fin, &payload(rng, MAX + 10)),
        70..=77 => frame(0x89, &payload(rng, 130), false, 0),
        78..=82 => frame(0x8A, &payload(rng, 130), false, 0),
        83..=86 => {
            let code: u16 = match rng.random_range(0..4) {
                0 => 1000,
                1 => 4000,
                2 => rng.random_range(0..1100),
                _ => rng.random(),
            };
            let mut p = code.to_be_bytes().to_vec();
            p.extend(payload(rng, 10));
            if rng.random_bool(0.1) {
                p.truncate(1);
            }
            frame(0x88, &p, false, 0)
        }
        87 => frame(0x80 | rng.random_range(3..8), b"x", false, 0),
        88 => frame(0x80 | rng.random_range(0xB..0x10), b"", false, 0),
        89 => frame(
            0x80 | 0x2 | [0x40, 0x20, 0x10][rng.random_range(0..3)],
            b"r",
            false,
            0,
        ),
        90 => frame(0x82, b"plain", true, 0),
        91 => frame(0x09, b"frag ping", false, 0),
        92..=95 => frame(0x82, &payload(rng, 200), false, rng.random_range(1..3)),
        _ => {
            // A declared length over the limit (the payload need not follow).
            let mut v = vec![0x82, 0x80 | 127];
            v.extend((MAX as u64 + rng.random_range(1..1u64 << 40)).to_be_bytes());
            v.extend([0; 4]);
            v
        }
    }
}

#[test]
fn random_frame_streams_decode_exactly_as_tungstenite_decodes_them() {
    let (mut errors, mut messages, mut closes) = (0, 0, 0);
    for seed in 0..20_000u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut stream = Vec::new();
        let mut open = None;
        for _ in 0..rng.random_range(1..12) {
            stream.extend(random_frame(&mut rng, &mut open));
        }
        // Sometimes the stream stops in the middle of a frame.
        let truncated = rng.random_bool(0.2) && !stream.is_empty();
        if truncated {
            let cut = rng.random_range(0..stream.len());
            stream.truncate(cut);
        }
        let theirs = theirs(&stream);
        let ours = ours(&stream, &mut rng);
        assert_eq!(
            ours.messages, theirs.messages,
            "seed {seed}: messages differ"
        );
        // Ours fails some frames at their header (a control frame over 125 bytes, an
        // unmasked frame, a continuation past the message limit) where tungstenite
        // waits for the payload: on a stream cut inside that payload only ours fails.
        let earlier = truncated && ours.error.is_some() && theirs.error.is_none();
        assert!(
            earlier || same_error(&ours.error, &theirs.error),
            "seed {seed}: ours ended with {:?}, tungstenite with {:?}",
            ours.error,
            theirs.error
        );
        errors += usize::from(ours.error.is_some());
        messages += ours.messages.len();
        closes += ours
            .messages
            .iter()
            .filter(|m| matches!(m, Incoming::Close(_)))
            .count();
    }
    // The generator reaches both sides of every rule: many streams end in each way.
    println!("{errors} streams ended in an error, {messages} messages, {closes} closes");
    assert!(
        errors > 3_000 && messages > 25_000 && closes > 80,
        "{errors} {messages} {closes}"
    );
}

// The RFC 6455 cases, through `WebSocket` over an in-memory socket, with tungstenite as
// the client.

async fn pair(
    max: usize,
) -> (
    WebSocket<tokio::io::DuplexStream>,
    WebSocketStream<tokio::io::DuplexStream>,
) {
    let (server, client) = tokio::io::duplex(1 << 20);
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    (WebSocket::new(server, &[], max, 4096), client)
}

#[tokio::test]
async fn a_ping_inside_a_fragmented_message_is_answered_and_the_message_arrives_whole() {
    let (mut server, client) = pair(MAX).await;
    let mut raw = client.into_inner();
    let mut bytes = data(0x1, false, "frag".as_bytes());
    bytes.extend(frame(0x89, b"hi", false, 0));
    bytes.extend(data(0x0, false, "men".as_bytes()));
    bytes.extend(data(0x0, true, "té".as_bytes()));
    tokio::io::AsyncWriteExt::write_all(&mut raw, &bytes)
        .await
        .unwrap();
    assert_eq!(
        server.next().await.unwrap().unwrap(),
        Incoming::Ping(Bytes::from_static(b"hi"))
    );
    assert_eq!(
        server.next().await.unwrap().unwrap(),
        Incoming::Text(Bytes::from("fragmenté"))
    );
    server.flush().await.unwrap();
    let mut client = WebSocketStream::from_raw_socket(raw, Role::Client, None).await;
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::Pong(Bytes::from_static(b"hi"))
    );
}

#[tokio::test]
async fn the_clients_close_is_echoed_and_a_forbidden_code_is_answered_1002() {
    for (code, answer) in [(1000u16, 1000u16), (4321, 4321), (1005, 1002), (999, 1002)] {
        let (mut server, client) = pair(MAX).await;
        let mut raw = client.into_inner();
        let mut p = code.to_be_bytes().to_vec();
        p.extend(b"bye");
        tokio::io::AsyncWriteExt::write_all(&mut raw, &frame(0x88, &p, false, 0))
            .await
            .unwrap();
        let got = server.next().await.unwrap().unwrap();
        assert_eq!(
            got,
            Incoming::Close(Some((code, Bytes::from_static(b"bye"))))
        );
        assert!(
            server.next().await.is_none(),
            "nothing is read after a close"
        );
        server.flush().await.unwrap();
        drop(server);
        let mut client = WebSocketStream::from_raw_socket(raw, Role::Client, None).await;
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), answer, "close {code}"),
            m => panic!("close {code}: expected a close frame, got {m:?}"),
        }
    }
}

#[tokio::test]
async fn the_servers_close_waits_for_the_clients_and_nothing_follows_it() {
    let (mut server, mut client) = pair(MAX).await;
    server
        .send_all(false, &mut vec![Bytes::from_static(b"last")])
        .await
        .unwrap();
    server.send_close(4008, "slow consumer");
    server
        .send_all(false, &mut vec![Bytes::from_static(b"after")])
        .await
        .unwrap();
    server.send_ping();
    server.flush().await.unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::Binary(Bytes::from_static(b"last"))
    );
    match client.next().await.unwrap().unwrap() {
        Message::Close(Some(CloseFrame { code, reason })) => {
            assert_eq!((u16::from(code), reason.as_str()), (4008, "slow consumer"));
        }
        m => panic!("expected the close, got {m:?}"),
    }
    // tungstenite answers the close; the server reads it as the end of the handshake.
    client.flush().await.unwrap();
    assert!(matches!(server.next().await, Some(Ok(Incoming::Close(_)))));
    assert!(server.next().await.is_none());
}

#[tokio::test]
async fn unmasked_oversized_and_invalid_utf8_frames_fail_with_their_codes() {
    let cases: [(Vec<u8>, FrameError); 4] = [
        (frame(0x82, b"x", true, 0), FrameError::Protocol("")),
        (data(0x2, true, &[0; MAX + 1]), FrameError::TooBig),
        (data(0x1, true, &[0xC3, 0x28]), FrameError::Utf8),
        (
            [data(0x1, false, &[0xE2, 0x82]), data(0x0, false, b"(")].concat(),
            FrameError::Utf8,
        ),
    ];
    for (bytes, want) in cases {
        let (mut server, client) = pair(MAX).await;
        let mut raw = client.into_inner();
        tokio::io::AsyncWriteExt::write_all(&mut raw, &bytes)
            .await
            .unwrap();
        match server.next().await {
            Some(Err(gateway::ws::Error::Frame(e))) => {
                assert!(same_error(&Some(e), &Some(want)), "{e:?} vs {want:?}")
            }
            other => panic!("expected {want:?}, got {other:?}"),
        }
        assert!(server.next().await.is_none());
    }
}

/// A socket that takes at most `step` bytes per write and is full every other call.
struct Trickle {
    inner: tokio::io::DuplexStream,
    step: usize,
    full: bool,
}

impl tokio::io::AsyncRead for Trickle {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.full = !self.full;
        if self.full {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let n = buf.len().min(self.step);
        std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Partial writes and writes abandoned half way (a timeout dropping the future) never
/// corrupt the stream: every message arrives whole and in order, then the close.
#[tokio::test]
async fn partial_and_abandoned_writes_keep_the_stream_whole() {
    let (server, client) = tokio::io::duplex(1 << 22);
    let mut server = WebSocket::new(
        Trickle {
            inner: server,
            step: 7,
            full: false,
        },
        &[],
        MAX,
        4096,
    );
    let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let sent: Vec<Bytes> = (0..200u32)
        .map(|i| Bytes::from(vec![i as u8; (i as usize * 37) % 3000]))
        .collect();
    for m in &sent {
        // Abandon every write after one poll; what the socket did not take stays queued.
        let mut one = vec![m.clone()];
        let write = server.send_all(false, &mut one);
        let _ = futures_util::FutureExt::now_or_never(write);
    }
    server.send_close(1000, "");
    server.flush().await.unwrap();
    for (i, m) in sent.iter().enumerate() {
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Binary(m.clone()),
            "message {i}"
        );
    }
    assert!(matches!(client.next().await, Some(Ok(Message::Close(_)))));
    let _ = client.send(Message::Close(None)).await;
}

/// The client's close comes in the same read as a command: the reply goes out before the
/// close answer, and nothing after it.
#[tokio::test]
async fn replies_to_what_came_before_a_close_go_out_before_its_answer() {
    let (mut server, client) = pair(MAX).await;
    let mut raw = client.into_inner();
    let mut bytes = data(0x2, true, b"command");
    bytes.extend(frame(0x88, &1000u16.to_be_bytes(), false, 0));
    tokio::io::AsyncWriteExt::write_all(&mut raw, &bytes)
        .await
        .unwrap();
    let first = server.next().await.unwrap().unwrap();
    assert_eq!(first, Incoming::Binary(Bytes::from_static(b"command")));
    let reply = Bytes::from_static(b"reply");
    server
        .send_all(false, &mut vec![reply.clone()])
        .await
        .unwrap();
    assert!(matches!(server.next().await, Some(Ok(Incoming::Close(_)))));
    let late = Bytes::from_static(b"too late");
    server.send_all(false, &mut vec![late]).await.unwrap();
    server.flush().await.unwrap();
    drop(server);
    let mut client = WebSocketStream::from_raw_socket(raw, Role::Client, None).await;
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::Binary(reply)
    );
    assert!(matches!(
        client.next().await,
        Some(Ok(Message::Close(Some(_))))
    ));
    let after = client.next().await;
    assert!(
        !matches!(after, Some(Ok(Message::Binary(_)))),
        "data after the close"
    );
}

/// A connection holds at most about one message's worth: a continuation that would take
/// the message past the limit fails at its header, and a header alone reserves little.
#[test]
fn a_connection_holds_no_more_than_the_message_limit() {
    let max = 1 << 20;
    let mut d = Decoder::new(max);
    let mut first = data(0x2, false, &vec![0; max - 10]);
    d.feed(&mut first, &mut |_| {}).unwrap();
    let mut head = data(0x0, true, &[0; 100])[..8].to_vec();
    assert_eq!(d.feed(&mut head, &mut |_| {}), Err(FrameError::TooBig));
    let mut d = Decoder::new(max);
    let mut head = data(0x2, true, &vec![0; max])[..15].to_vec();
    d.feed(&mut head, &mut |_| {}).unwrap();
    assert!(
        d.held_bytes() <= 64 * 1024 + 15,
        "{} held for a header",
        d.held_bytes()
    );
}

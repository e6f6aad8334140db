//! The WebSocket frame decoder (`gateway::ws::decode`) against tungstenite's reader: any
//! bytes, fed in reads of sizes taken from the input, give the same messages and the same
//! error (the decoder may fail earlier on a stream cut inside a frame whose header already
//! breaks a rule), and the decoder never holds more than one message's worth.
#![no_main]

use bytes::Bytes;
use gateway::ws::{FrameError, Incoming, decode::Decoder};
use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Read, Write};
use tokio_tungstenite::tungstenite::{
    self, Message,
    protocol::{Role, WebSocketConfig, frame::coding::CloseCode},
};

const MAX: usize = 4096;

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

fuzz_target!(|input: &[u8]| {
    let Some((&step, stream)) = input.split_first() else {
        return;
    };
    let step = usize::from(step % 64) + 1;
    let mut decoder = Decoder::new(MAX);
    let (mut ours, mut ours_error) = (Vec::new(), None);
    for chunk in stream.chunks(step) {
        let mut chunk = chunk.to_vec();
        let mut closed = false;
        let r = decoder.feed(&mut chunk, &mut |m| {
            if !closed {
                closed = matches!(m, Incoming::Close(_));
                ours.push(match m {
                    Incoming::Close(Some((code, _))) if !CloseCode::from(code).is_allowed() => {
                        Incoming::Close(Some((1002, Bytes::from_static(b"Protocol violation"))))
                    }
                    m => m,
                });
            }
        });
        assert!(
            decoder.held_bytes() <= 2 * MAX + 64 * 1024,
            "held {}",
            decoder.held_bytes()
        );
        if let Err(e) = r {
            ours_error = Some(e);
            break;
        }
        if closed {
            break;
        }
    }

    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX);
    config.max_frame_size = Some(MAX);
    let mut ws = tungstenite::WebSocket::from_raw_socket(
        Feed(Cursor::new(stream.to_vec())),
        Role::Server,
        Some(config),
    );
    let mut theirs = Vec::new();
    let theirs_error = loop {
        match ws.read() {
            Ok(m) => {
                let close = matches!(m, Message::Close(_));
                theirs.push(match m {
                    Message::Binary(b) => Incoming::Binary(b),
                    Message::Text(t) => Incoming::Text(Bytes::from(t)),
                    Message::Ping(p) => Incoming::Ping(p),
                    Message::Pong(p) => Incoming::Pong(p),
                    Message::Close(c) => {
                        Incoming::Close(c.map(|c| (u16::from(c.code), Bytes::from(c.reason))))
                    }
                    Message::Frame(_) => unreachable!(),
                });
                if close {
                    break None;
                }
            }
            Err(tungstenite::Error::Capacity(_)) => break Some(FrameError::TooBig),
            Err(tungstenite::Error::Utf8(_)) => break Some(FrameError::Utf8),
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => break None,
            Err(tungstenite::Error::Protocol(_)) => break Some(FrameError::Protocol("")),
            Err(e) => panic!("unexpected tungstenite error {e}"),
        }
    };
    assert_eq!(ours, theirs);
    let same = match (&ours_error, &theirs_error) {
        (Some(FrameError::Protocol(_)), Some(FrameError::Protocol(_))) => true,
        (a, b) => a == b,
    };
    // Ours fails some frames at the header; tungstenite then waits for a payload the
    // stream may not have.
    assert!(
        same || (ours_error.is_some() && theirs_error.is_none()),
        "{ours_error:?} vs {theirs_error:?}"
    );
});

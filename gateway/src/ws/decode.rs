//! RFC 6455 frames from bytes, as plain data: no socket, no clock. The decoder is fed
//! whatever a read returned and keeps only the bytes of an unfinished frame (and the
//! fragments of an unfinished message), so an idle connection holds nothing.
//!
//! Frame headers are parsed by tungstenite's `FrameHeader::parse`; the rules applied to
//! them (masking, reserved bits, control frames, fragmentation, UTF-8, size limits) and
//! their order follow tungstenite's `WebSocketContext`, which a differential test holds
//! this decoder to (`gateway/tests/ws_conformance.rs`).

use bytes::Bytes;
use std::io::Cursor;
use tokio_tungstenite::tungstenite::protocol::frame::{
    FrameHeader,
    coding::{Control, Data, OpCode},
};

/// What a client sent, one message or control frame at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Binary(Bytes),
    /// Valid UTF-8 (checked across fragments as they arrive).
    Text(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// A close frame: its code and reason, if it had any.
    Close(Option<(u16, Bytes)>),
}

impl Incoming {
    /// Payload bytes, for read budgets.
    pub fn len(&self) -> usize {
        match self {
            Self::Binary(b) | Self::Text(b) | Self::Ping(b) | Self::Pong(b) => b.len(),
            Self::Close(c) => c.as_ref().map_or(0, |(_, r)| 2 + r.len()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why the connection must fail (RFC 6455 §7.1.7), and the close code it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// 1002.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// 1007: a text message or close reason that is not UTF-8.
    #[error("invalid UTF-8")]
    Utf8,
    /// 1009: a frame or message over the size limit.
    #[error("message too big")]
    TooBig,
}

/// The message being assembled from fragments.
struct Fragments {
    text: bool,
    bytes: Vec<u8>,
    /// Bytes known to be valid UTF-8 so far (text only); the rest is an unfinished
    /// sequence at the end.
    checked: usize,
}

pub struct Decoder {
    max_message: usize,
    /// Bytes of an unfinished frame, header included. Empty between frames.
    partial: Vec<u8>,
    fragments: Option<Box<Fragments>>,
    /// A close frame arrived: nothing after it is read.
    closed: bool,
}

/// Spare capacity an unfinished frame's buffer may keep without being shrunk.
const KEEP_BYTES: usize = 1024;
/// How far ahead of the bytes received an unfinished frame's buffer is reserved.
const RESERVE_BYTES: usize = 64 * 1024;

impl Decoder {
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            partial: Vec::new(),
            fragments: None,
            closed: false,
        }
    }

    /// Bytes held for unfinished frames and messages (for tests and memory accounting).
    pub fn held_bytes(&self) -> usize {
        self.partial.capacity() + self.fragments.as_ref().map_or(0, |f| f.bytes.capacity())
    }

    /// Decodes every frame `input` completes, handing each to `out` in order; unmasks in
    /// place. Bytes of a frame still unfinished are kept for the next call. After an
    /// error or a close frame nothing more is decoded.
    pub fn feed(&mut self, input: &mut [u8], out: &mut impl FnMut(Incoming)) -> Result<(), Error> {
        if self.closed {
            return Ok(());
        }
        if self.partial.is_empty() {
            let (used, frame) = self.decode(input, out)?;
            let rest = &input[used..];
            if !rest.is_empty() {
                // Room for the unfinished frame, up to RESERVE_BYTES ahead of what has
                // arrived: a header alone does not reserve a whole large frame.
                self.partial
                    .reserve_exact(frame.min(RESERVE_BYTES).max(rest.len()));
                self.partial.extend_from_slice(rest);
            }
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.partial);
        buf.extend_from_slice(input);
        let (used, frame) = self.decode(&mut buf, out)?;
        buf.drain(..used);
        if buf.is_empty() {
            // Between frames a connection holds nothing.
            buf = Vec::new();
        } else {
            // Keep room for the unfinished frame only, not the size of a larger frame
            // decoded before it.
            let want = frame.min(buf.len() + RESERVE_BYTES).max(buf.len());
            if buf.capacity() > (2 * want).max(KEEP_BYTES) {
                buf.shrink_to(want);
            }
        }
        self.partial = buf;
        Ok(())
    }

    /// Decodes whole frames from the start of `buf`; returns the bytes used and the
    /// length of the unfinished frame after them, when its header is complete.
    fn decode(
        &mut self,
        buf: &mut [u8],
        out: &mut impl FnMut(Incoming),
    ) -> Result<(usize, usize), Error> {
        let mut pos = 0;
        while pos < buf.len() && !self.closed {
            let mut cursor = Cursor::new(&buf[pos..]);
            let Some((header, length)) =
                FrameHeader::parse(&mut cursor).map_err(|_| Error::Protocol("reserved opcode"))?
            else {
                break;
            };
            // A continuation counts against what its message already holds; a control
            // frame and an unmasked frame fail at the header, before their payload.
            let held = match (&header.opcode, &self.fragments) {
                (OpCode::Data(Data::Continue), Some(f)) => f.bytes.len() as u64,
                _ => 0,
            };
            if length > (self.max_message as u64).saturating_sub(held) {
                return Err(Error::TooBig);
            }
            if header.mask.is_none() {
                return Err(Error::Protocol("unmasked frame from a client"));
            }
            if matches!(header.opcode, OpCode::Control(_)) && length > 125 {
                return Err(Error::Protocol("control frame over 125 bytes"));
            }
            let start = pos + cursor.position() as usize;
            let end = start + length as usize;
            if end > buf.len() {
                return Ok((pos, end - pos));
            }
            pos = end;
            let payload = &mut buf[start..end];
            match header.mask {
                Some(mask) => unmask(payload, mask),
                None => return Err(Error::Protocol("unmasked frame from a client")),
            }
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(Error::Protocol("reserved bits set"));
            }
            match header.opcode {
                OpCode::Control(control) => {
                    if !header.is_final {
                        return Err(Error::Protocol("fragmented control frame"));
                    }
                    if payload.len() > 125 {
                        return Err(Error::Protocol("control frame over 125 bytes"));
                    }
                    out(match control {
                        Control::Close => {
                            self.closed = true;
                            Incoming::Close(close_payload(payload)?)
                        }
                        Control::Ping => Incoming::Ping(Bytes::copy_from_slice(payload)),
                        Control::Pong => Incoming::Pong(Bytes::copy_from_slice(payload)),
                        Control::Reserved(_) => return Err(Error::Protocol("reserved opcode")),
                    });
                }
                OpCode::Data(data) => {
                    if let Some(m) = self.data(data, header.is_final, payload)? {
                        out(m);
                    }
                }
            }
        }
        Ok((pos, 0))
    }

    fn data(&mut self, data: Data, fin: bool, payload: &[u8]) -> Result<Option<Incoming>, Error> {
        let text = match (data, self.fragments.as_mut()) {
            (Data::Continue, None) => {
                return Err(Error::Protocol("continuation with nothing to continue"));
            }
            (Data::Continue, Some(f)) => {
                if f.bytes.len() > self.max_message
                    || payload.len() > self.max_message - f.bytes.len()
                {
                    return Err(Error::TooBig);
                }
                f.bytes.extend_from_slice(payload);
                if f.text {
                    check_utf8(&f.bytes, &mut f.checked)?;
                }
                if !fin {
                    return Ok(None);
                }
                let f = self.fragments.take().expect("fragments present");
                if f.text && f.checked != f.bytes.len() {
                    return Err(Error::Utf8);
                }
                let bytes = Bytes::from(f.bytes);
                return Ok(Some(if f.text {
                    Incoming::Text(bytes)
                } else {
                    Incoming::Binary(bytes)
                }));
            }
            (_, Some(_)) => return Err(Error::Protocol("new message inside a fragmented one")),
            (Data::Text, None) => true,
            (Data::Binary, None) => false,
            (Data::Reserved(_), None) => return Err(Error::Protocol("reserved opcode")),
        };
        if fin {
            if text && std::str::from_utf8(payload).is_err() {
                return Err(Error::Utf8);
            }
            let bytes = Bytes::copy_from_slice(payload);
            return Ok(Some(if text {
                Incoming::Text(bytes)
            } else {
                Incoming::Binary(bytes)
            }));
        }
        let mut f = Box::new(Fragments {
            text,
            bytes: payload.to_vec(),
            checked: 0,
        });
        if text {
            check_utf8(&f.bytes, &mut f.checked)?;
        }
        self.fragments = Some(f);
        Ok(None)
    }
}

/// Advances `checked` over the valid UTF-8 in `bytes`; an unfinished sequence at the
/// end is not an error yet.
fn check_utf8(bytes: &[u8], checked: &mut usize) -> Result<(), Error> {
    match std::str::from_utf8(&bytes[*checked..]) {
        Ok(_) => *checked = bytes.len(),
        Err(e) if e.error_len().is_none() => *checked += e.valid_up_to(),
        Err(_) => return Err(Error::Utf8),
    }
    Ok(())
}

fn close_payload(payload: &[u8]) -> Result<Option<(u16, Bytes)>, Error> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(Error::Protocol("close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let reason = &payload[2..];
            std::str::from_utf8(reason).map_err(|_| Error::Utf8)?;
            Ok(Some((code, Bytes::copy_from_slice(reason))))
        }
    }
}

/// XORs a client's payload with its mask (RFC 6455 §5.3), eight bytes at a time.
pub fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// A server frame's header (never masked) for `len` payload bytes; returns its length.
pub fn header(opcode: u8, fin: bool, len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = opcode | if fin { 0x80 } else { 0 };
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= 0xFFFF {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut head = [0u8; 10];
        let n = header(opcode, fin, payload.len(), &mut head);
        let mut v = head[..n].to_vec();
        v[1] |= 0x80;
        v.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        unmask(&mut p, mask);
        v.extend(p);
        v
    }

    fn decode_all(
        d: &mut Decoder,
        bytes: &[u8],
        step: usize,
    ) -> (Vec<Incoming>, Result<(), Error>) {
        let mut got = Vec::new();
        for chunk in bytes.chunks(step.max(1)) {
            let mut c = chunk.to_vec();
            if let Err(e) = d.feed(&mut c, &mut |m| got.push(m)) {
                return (got, Err(e));
            }
        }
        (got, Ok(()))
    }

    #[test]
    fn a_message_split_at_every_byte_decodes_the_same_and_leaves_nothing_held() {
        let mut bytes = frame(OP_BINARY, false, b"hello ");
        bytes.extend(frame(OP_PING, true, b"p"));
        bytes.extend(frame(0x0, true, &[7u8; 300]));
        bytes.extend(frame(OP_TEXT, true, "héllo".as_bytes()));
        for step in [1, 2, 3, 7, 64, 4096] {
            let mut d = Decoder::new(1 << 20);
            let (got, r) = decode_all(&mut d, &bytes, step);
            assert_eq!(r, Ok(()));
            let mut whole = b"hello ".to_vec();
            whole.extend([7u8; 300]);
            assert_eq!(
                got,
                vec![
                    Incoming::Ping(Bytes::from_static(b"p")),
                    Incoming::Binary(whole.into()),
                    Incoming::Text(Bytes::from("héllo")),
                ]
            );
            assert_eq!(d.held_bytes(), 0, "step {step}");
        }
    }

    #[test]
    fn a_large_frame_is_given_back_once_decoded() {
        let bytes = frame(OP_BINARY, true, &[1u8; 100_000]);
        let mut d = Decoder::new(1 << 20);
        let (got, r) = decode_all(&mut d, &bytes, 16 * 1024);
        assert_eq!((got.len(), r), (1, Ok(())));
        assert_eq!(d.held_bytes(), 0);
    }

    #[test]
    fn a_large_frame_read_in_pieces_is_not_kept_for_the_small_one_after_it() {
        let mut bytes = frame(OP_BINARY, true, &[1u8; 200_000]);
        let small = frame(OP_BINARY, true, &[2u8; 3000]);
        bytes.extend_from_slice(&small[..2000]);
        let mut d = Decoder::new(1 << 20);
        let (got, r) = decode_all(&mut d, &bytes, 16 * 1024);
        assert_eq!((got.len(), r), (1, Ok(())));
        assert!(d.held_bytes() < 8 * 1024, "{} held", d.held_bytes());
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted_and_invalid_utf8_fails_early() {
        let e = "é".as_bytes();
        let mut bytes = frame(OP_TEXT, false, &e[..1]);
        bytes.extend(frame(0x0, true, &e[1..]));
        let (got, r) = decode_all(&mut Decoder::new(1024), &bytes, 1);
        assert_eq!((got, r), (vec![Incoming::Text(Bytes::from("é"))], Ok(())));
        // An invalid sequence fails at the fragment that makes it invalid, before fin.
        let mut bytes = frame(OP_TEXT, false, &e[..1]);
        bytes.extend(frame(0x0, false, b"a"));
        let (_, r) = decode_all(&mut Decoder::new(1024), &bytes, 100);
        assert_eq!(r, Err(Error::Utf8));
    }

    #[test]
    fn sizes_are_checked_at_the_header_and_across_fragments() {
        let (_, r) = decode_all(
            &mut Decoder::new(100),
            &frame(OP_BINARY, true, &[0; 101])[..6],
            6,
        );
        assert_eq!(r, Err(Error::TooBig));
        let mut bytes = frame(OP_BINARY, false, &[0; 60]);
        bytes.extend(frame(0x0, true, &[0; 41]));
        let (_, r) = decode_all(&mut Decoder::new(100), &bytes, 1000);
        assert_eq!(r, Err(Error::TooBig));
    }

    #[test]
    fn unmask_matches_the_bytewise_rule() {
        let mask = [0xA1, 0x02, 0xF3, 0x44];
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }
}

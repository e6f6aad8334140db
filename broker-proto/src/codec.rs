//! Framing for both encodings. A WebSocket message carries one or more frames:
//! - `gateway.v1.proto`: binary messages, each frame prefixed by its length as a varint;
//! - `gateway.v1.json`: text messages, frames in the proto3 JSON mapping separated by `\n`.
//!
//! Decoding is bounded (frames per message, bytes per frame) and every malformed input
//! is a typed [`DecodeError`], never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use serde::{Serialize, de::DeserializeOwned};

/// The two encodings of the schema, negotiated per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Proto,
    Json,
}

impl Encoding {
    pub const PROTO_SUBPROTOCOL: &'static str = "gateway.v1.proto";
    pub const JSON_SUBPROTOCOL: &'static str = "gateway.v1.json";

    pub fn subprotocol(self) -> &'static str {
        match self {
            Self::Proto => Self::PROTO_SUBPROTOCOL,
            Self::Json => Self::JSON_SUBPROTOCOL,
        }
    }

    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name.trim() {
            Self::PROTO_SUBPROTOCOL => Some(Self::Proto),
            Self::JSON_SUBPROTOCOL => Some(Self::Json),
            _ => None,
        }
    }

    /// The `?format=` fallback for clients that cannot set subprotocols.
    pub fn from_format(name: &str) -> Option<Self> {
        match name {
            "proto" | "protobuf" => Some(Self::Proto),
            "json" => Some(Self::Json),
            _ => None,
        }
    }

    /// Whether this encoding travels in binary (`true`) or text WebSocket messages.
    pub fn is_binary(self) -> bool {
        self == Self::Proto
    }
}

/// Bounds applied while decoding one WebSocket message.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frames_per_message: usize,
    pub max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frames_per_message: 128,
            max_frame_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message: no frames")]
    Empty,
    #[error("bad length prefix: {0}")]
    Length(prost::DecodeError),
    #[error("frame truncated: prefix says {declared} bytes, {available} remain")]
    Truncated { declared: usize, available: usize },
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    FrameTooLarge { size: usize, max: usize },
    #[error("more than {max} frames in one message")]
    TooManyFrames { max: usize },
    #[error("protobuf frame does not decode: {0}")]
    Proto(#[from] prost::DecodeError),
    #[error("JSON frame does not decode: {0}")]
    Json(#[from] serde_json::Error),
    #[error("text message is not valid UTF-8")]
    NotUtf8,
}

impl DecodeError {
    /// Whether the frame was too large rather than malformed (1009, not 1007).
    pub fn is_size(&self) -> bool {
        matches!(
            self,
            Self::FrameTooLarge { .. } | Self::TooManyFrames { .. }
        )
    }
}

/// One frame in the proto3 JSON mapping, where `null` means the field's default
/// (JavaScript clients send it routinely). pbjson refuses `null` for scalars, so a frame
/// that fails is read again with its `null` members removed.
fn from_json_line<M: DeserializeOwned>(line: &str) -> Result<M, serde_json::Error> {
    match serde_json::from_str(line) {
        Ok(frame) => Ok(frame),
        Err(e) if !line.contains("null") => Err(e),
        Err(_) => {
            let mut value: serde_json::Value = serde_json::from_str(line)?;
            strip_nulls(&mut value);
            serde_json::from_value(value)
        }
    }
}

fn strip_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Decodes every frame of one WebSocket message. With [`Encoding::Proto`], `bytes` fields
/// of the result borrow from `payload` (no copy).
pub fn decode_frames<M>(
    encoding: Encoding,
    payload: Bytes,
    limits: &Limits,
) -> Result<Vec<M>, DecodeError>
where
    M: Message + Default + DeserializeOwned,
{
    let mut frames = Vec::new();
    let mut push = |frame: M| {
        if frames.len() == limits.max_frames_per_message {
            return Err(DecodeError::TooManyFrames {
                max: limits.max_frames_per_message,
            });
        }
        frames.push(frame);
        Ok(())
    };
    match encoding {
        Encoding::Proto => {
            let mut buf = payload;
            while buf.has_remaining() {
                let len = prost::decode_length_delimiter(&mut buf).map_err(DecodeError::Length)?;
                if len > limits.max_frame_bytes {
                    return Err(DecodeError::FrameTooLarge {
                        size: len,
                        max: limits.max_frame_bytes,
                    });
                }
                if len > buf.remaining() {
                    return Err(DecodeError::Truncated {
                        declared: len,
                        available: buf.remaining(),
                    });
                }
                push(M::decode(buf.split_to(len))?)?;
            }
        }
        Encoding::Json => {
            let text = std::str::from_utf8(&payload).map_err(|_| DecodeError::NotUtf8)?;
            for line in text.split('\n') {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                if line.len() > limits.max_frame_bytes {
                    return Err(DecodeError::FrameTooLarge {
                        size: line.len(),
                        max: limits.max_frame_bytes,
                    });
                }
                push(from_json_line(line)?)?;
            }
        }
    }
    if frames.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(frames)
}

/// Encodes one frame as it travels inside a message: length-prefixed for proto, a bare
/// JSON object for JSON. The result can be shared by every recipient and packed with
/// others by [`Batch`].
pub fn encode_frame<M: Message + Serialize>(encoding: Encoding, frame: &M) -> Bytes {
    match encoding {
        Encoding::Proto => {
            let len = frame.encoded_len();
            let mut buf = BytesMut::with_capacity(len + prost::length_delimiter_len(len));
            // Cannot fail: the buffer was sized above.
            let _ = frame.encode_length_delimited(&mut buf);
            buf.freeze()
        }
        Encoding::Json => {
            let mut w = BytesMut::new().writer();
            // Serializing generated types to memory cannot fail.
            let _ = serde_json::to_writer(&mut w, frame);
            w.into_inner().freeze()
        }
    }
}

/// Packs encoded frames into one WebSocket message payload.
#[derive(Debug)]
pub struct Batch {
    encoding: Encoding,
    buf: BytesMut,
    frames: usize,
}

impl Batch {
    pub fn new(encoding: Encoding, capacity: usize) -> Self {
        Self {
            encoding,
            buf: BytesMut::with_capacity(capacity),
            frames: 0,
        }
    }

    pub fn push(&mut self, encoded: &[u8]) {
        if self.encoding == Encoding::Json && self.frames > 0 {
            self.buf.put_u8(b'\n');
        }
        self.buf.extend_from_slice(encoded);
        self.frames += 1;
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Takes the packed payload, leaving the batch empty and holding no memory (a split
    /// would keep the rest of the allocation alive for as long as the batch lives).
    pub fn take(&mut self) -> Bytes {
        self.frames = 0;
        std::mem::take(&mut self.buf).freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ClientFrame, Publish, ServerFrame, client_frame::Command, server_frame::Body};

    fn publish(id: u32, data: &'static [u8]) -> ClientFrame {
        ClientFrame {
            id,
            command: Some(Command::Publish(Publish {
                channel: "chat:room".into(),
                data: Bytes::from_static(data),
                content_type: "text/plain".into(),
                ..Default::default()
            })),
        }
    }

    fn pack(encoding: Encoding, frames: &[ClientFrame]) -> Bytes {
        let mut batch = Batch::new(encoding, 64);
        for f in frames {
            batch.push(&encode_frame(encoding, f));
        }
        batch.take()
    }

    #[test]
    fn round_trips_batches_in_both_encodings() {
        let frames = vec![
            publish(1, b"hello"),
            publish(2, b"\x00\xff binary"),
            ClientFrame::default(),
        ];
        for encoding in [Encoding::Proto, Encoding::Json] {
            let payload = pack(encoding, &frames);
            let back: Vec<ClientFrame> =
                decode_frames(encoding, payload, &Limits::default()).unwrap();
            assert_eq!(back, frames, "{encoding:?}");
        }
    }

    #[test]
    fn json_uses_the_proto3_mapping() {
        let json = encode_frame(Encoding::Json, &publish(7, b"hi"));
        let text = std::str::from_utf8(&json).unwrap();
        assert!(text.contains(r#""contentType":"text/plain""#), "{text}");
        assert!(text.contains(r#""data":"aGk=""#), "{text}");
        assert!(!text.contains('\n'));
        // 64-bit integers are strings on output, and either form is accepted on input.
        let frame =
            r#"{"id":3,"subscribe":{"channel":"a","recover":true,"offset":"42","epoch":"e"}}"#;
        let parsed: Vec<ClientFrame> =
            decode_frames(Encoding::Json, Bytes::from(frame), &Limits::default()).unwrap();
        let numeric = frame.replace(r#""42""#, "42");
        let parsed2: Vec<ClientFrame> =
            decode_frames(Encoding::Json, Bytes::from(numeric), &Limits::default()).unwrap();
        assert_eq!(parsed, parsed2);
        match &parsed[0].command {
            Some(Command::Subscribe(s)) => assert_eq!((s.offset, s.recover), (42, true)),
            other => panic!("{other:?}"),
        }
    }

    /// Found by the hostile-input sweep: `null` (what JavaScript sends for "unset") and
    /// an unknown command closed the connection with 1007; the binary encoding answered
    /// 104 for the same. Now `null` is the default, and unknown fields are ignored.
    #[test]
    fn json_null_is_the_default_and_unknown_fields_are_ignored() {
        let decode = |text: &'static str| -> Vec<ClientFrame> {
            decode_frames(Encoding::Json, Bytes::from(text), &Limits::default()).unwrap()
        };
        let with_null =
            decode(r#"{"id":1,"subscribe":{"channel":"room","epoch":null,"offset":null}}"#);
        assert_eq!(
            with_null,
            decode(r#"{"id":1,"subscribe":{"channel":"room"}}"#)
        );
        let unknown = decode(r#"{"id":2,"teleport":{"to":"mars"}}"#);
        assert_eq!((unknown[0].id, &unknown[0].command), (2, &None));
        let newer = decode(r#"{"id":3,"ping":{},"priority":"high"}"#);
        assert!(newer[0].command.is_some());
        // Still errors: broken JSON, a wrong type.
        for bad in [
            r#"{"id":1,"subscribe":"#,
            r#"{"id":"x"}"#,
            r#"{"id":1,"subscribe":{"channel":5}}"#,
        ] {
            assert!(
                decode_frames::<ClientFrame>(Encoding::Json, Bytes::from(bad), &Limits::default())
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn proto_payload_is_sliced_not_copied() {
        let payload = pack(Encoding::Proto, &[publish(1, b"0123456789abcdef")]);
        let range = payload.as_ptr_range();
        let frames: Vec<ClientFrame> =
            decode_frames(Encoding::Proto, payload.clone(), &Limits::default()).unwrap();
        let Some(Command::Publish(p)) = &frames[0].command else {
            panic!()
        };
        assert!(
            range.contains(&p.data.as_ptr()),
            "data should point into the received message"
        );
    }

    #[test]
    fn rejects_malformed_input_with_typed_errors() {
        let limits = Limits {
            max_frames_per_message: 2,
            max_frame_bytes: 64,
        };
        type Case = (Encoding, Bytes, fn(&DecodeError) -> bool);
        let cases: Vec<Case> = vec![
            (Encoding::Proto, Bytes::new(), |e| {
                matches!(e, DecodeError::Empty)
            }),
            (Encoding::Proto, Bytes::from_static(&[0xff; 11]), |e| {
                matches!(e, DecodeError::Length(_))
            }),
            (Encoding::Proto, Bytes::from_static(&[10, 1, 2]), |e| {
                matches!(
                    e,
                    DecodeError::Truncated {
                        declared: 10,
                        available: 2
                    }
                )
            }),
            (Encoding::Proto, Bytes::from_static(&[100]), |e| {
                matches!(e, DecodeError::FrameTooLarge { size: 100, max: 64 })
            }),
            (Encoding::Proto, Bytes::from_static(&[2, 0xff, 0xff]), |e| {
                matches!(e, DecodeError::Proto(_))
            }),
            (Encoding::Proto, Bytes::from_static(&[0, 0, 0]), |e| {
                matches!(e, DecodeError::TooManyFrames { max: 2 })
            }),
            (Encoding::Json, Bytes::from_static(b"{not json"), |e| {
                matches!(e, DecodeError::Json(_))
            }),
            (Encoding::Json, Bytes::from_static(b"{\"id\":\"x\"}"), |e| {
                matches!(e, DecodeError::Json(_))
            }),
            (Encoding::Json, Bytes::from_static(b"\xff\xfe"), |e| {
                matches!(e, DecodeError::NotUtf8)
            }),
            (Encoding::Json, Bytes::from_static(b"\n \n"), |e| {
                matches!(e, DecodeError::Empty)
            }),
            (Encoding::Json, Bytes::from_static(b"{}\n{}\n{}"), |e| {
                matches!(e, DecodeError::TooManyFrames { .. })
            }),
        ];
        for (encoding, payload, check) in cases {
            let err = decode_frames::<ClientFrame>(encoding, payload.clone(), &limits).unwrap_err();
            assert!(check(&err), "{encoding:?} {payload:?}: {err}");
        }
    }

    #[test]
    fn image_frames_round_trip_in_both_encodings() {
        use crate::v1::{BlobChunk, BlobPut, BlobRef, Rpc, RpcResult};
        let jpeg: &'static [u8] = b"\xff\xd8\xff\xe0 not base64 on the wire";
        let client = vec![
            ClientFrame {
                id: 1,
                command: Some(Command::BlobPut(BlobPut {
                    upload: 7,
                    channel: "chat:room".into(),
                    content_type: "image/jpeg".into(),
                    size: 1 << 40,
                    data: Bytes::from_static(jpeg),
                    last: true,
                    id: "ab".repeat(32),
                })),
            },
            ClientFrame {
                id: 2,
                command: Some(Command::Rpc(Rpc {
                    method: "slice".into(),
                    data: Bytes::from_static(b"\x00\x01"),
                    content_type: "application/octet-stream".into(),
                })),
            },
            ClientFrame {
                id: 3,
                command: Some(Command::Publish(Publish {
                    channel: "chat:room".into(),
                    blobs: vec![BlobRef {
                        id: "cd".repeat(32),
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            },
        ];
        let server = vec![
            ServerFrame {
                id: 4,
                error: None,
                body: Some(Body::BlobChunk(BlobChunk {
                    id: "ab".repeat(32),
                    offset: 65_536,
                    data: Bytes::from_static(jpeg),
                    last: true,
                    size: 70_000,
                    content_type: "image/jpeg".into(),
                })),
            },
            ServerFrame {
                id: 5,
                error: None,
                body: Some(Body::Rpc(RpcResult {
                    data: Bytes::from_static(jpeg),
                    content_type: "image/jpeg".into(),
                })),
            },
        ];
        for encoding in [Encoding::Proto, Encoding::Json] {
            let back: Vec<ClientFrame> =
                decode_frames(encoding, pack(encoding, &client), &Limits::default()).unwrap();
            assert_eq!(back, client, "{encoding:?}");
            for frame in &server {
                let bytes = encode_frame(encoding, frame);
                let back: Vec<ServerFrame> =
                    decode_frames(encoding, bytes, &Limits::default()).unwrap();
                assert_eq!(&back[0], frame, "{encoding:?}");
            }
        }
        // Binary in proto: the bytes appear as they are; JSON names fields in camelCase.
        let proto = encode_frame(Encoding::Proto, &server[0]);
        assert!(proto.windows(jpeg.len()).any(|w| w == jpeg));
        let json = encode_frame(Encoding::Json, &client[0]);
        let text = std::str::from_utf8(&json).unwrap();
        assert!(
            text.contains(r#""blobPut":{"#) && text.contains(r#""contentType":"image/jpeg""#),
            "{text}"
        );
        assert!(text.contains(r#""size":"1099511627776""#), "{text}");
    }

    #[test]
    fn decodes_server_frames_too() {
        let frame = ServerFrame {
            id: 9,
            error: None,
            body: Some(Body::Pong(Default::default())),
        };
        for encoding in [Encoding::Proto, Encoding::Json] {
            let back: Vec<ServerFrame> =
                decode_frames(encoding, encode_frame(encoding, &frame), &Limits::default())
                    .unwrap();
            assert_eq!(back, vec![frame.clone()]);
        }
    }
}

/// Property tests: any frames survive a round trip in both encodings, and no input, however
/// malformed, makes the decoder panic (it answers an error instead).
#[cfg(test)]
mod properties {
    use super::*;
    use crate::v1::{BlobRef, ClientFrame, Publish, ServerFrame, Subscribe, client_frame::Command};
    use proptest::prelude::*;

    fn command() -> impl Strategy<Value = Option<Command>> {
        let publish = (
            "[A-Za-z0-9_.:@#/=-]{1,40}",
            proptest::collection::vec(any::<u8>(), 0..300),
            "\\PC{0,20}",
            "\\PC{0,20}",
            proptest::collection::vec("[0-9a-f]{64}", 0..3),
        )
            .prop_map(|(channel, data, content_type, key, blobs)| {
                Command::Publish(Publish {
                    channel,
                    data: data.into(),
                    content_type,
                    idempotency_key: key,
                    blobs: blobs
                        .into_iter()
                        .map(|id| BlobRef {
                            id,
                            ..BlobRef::default()
                        })
                        .collect(),
                })
            });
        let subscribe = (
            "\\PC{0,40}",
            any::<bool>(),
            any::<u64>(),
            "\\PC{0,16}",
            "\\PC{0,16}",
        )
            .prop_map(|(channel, recover, offset, epoch, token)| {
                Command::Subscribe(Subscribe {
                    channel,
                    recover,
                    offset,
                    epoch,
                    token,
                })
            });
        prop_oneof![Just(None), publish.prop_map(Some), subscribe.prop_map(Some)]
    }

    fn frames() -> impl Strategy<Value = Vec<ClientFrame>> {
        proptest::collection::vec(
            (any::<u32>(), command()).prop_map(|(id, command)| ClientFrame { id, command }),
            1..8,
        )
    }

    proptest! {
        #[test]
        fn frames_round_trip_in_both_encodings(frames in frames()) {
            for encoding in [Encoding::Proto, Encoding::Json] {
                let mut batch = Batch::new(encoding, 64);
                for f in &frames {
                    batch.push(&encode_frame(encoding, f));
                }
                let back: Vec<ClientFrame> =
                    decode_frames(encoding, batch.take(), &Limits::default()).unwrap();
                prop_assert_eq!(&back, &frames);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for encoding in [Encoding::Proto, Encoding::Json] {
                let _ = decode_frames::<ClientFrame>(encoding, Bytes::from(bytes.clone()), &Limits::default());
                let _ = decode_frames::<ServerFrame>(encoding, Bytes::from(bytes.clone()), &Limits::default());
            }
        }

        #[test]
        fn json_shaped_garbage_never_panics(text in "[{}\\[\\]\":,a-z0-9 .null-]{0,200}") {
            let _ = decode_frames::<ClientFrame>(Encoding::Json, Bytes::from(text), &Limits::default());
        }
    }
}

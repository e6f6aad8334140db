//! The gateway wire contract: the `gateway.v1` schema as Rust types, the framing codec for
//! both encodings, and the error and close codes clients rely on.
//!
//! Like mini-redis's `frame.rs`, this crate turns bytes into frames and back and does no
//! I/O, so the server, the load generator and the tests all speak through the same code.

pub mod codec;
pub mod codes;

/// Generated from `proto/gateway/v1/gateway.proto`: prost types plus serde impls that
/// follow the proto3 JSON mapping (camelCase names, bytes as base64, 64-bit ints as strings).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/gateway.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/gateway.v1.serde.rs"));
}

pub use codec::{Batch, DecodeError, Encoding, Limits, decode_frames, encode_frame};
pub use codes::{CloseCode, ErrorCode};

//! Compiles `proto/` with protox (pure Rust, so no `protoc` is needed on any machine), then
//! generates prost types and pbjson serde impls (the proto3 JSON mapping) from the same
//! descriptors, so both encodings come from one schema.

use prost::Message;
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["gateway/v1/gateway.proto"], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    prost_build::Config::new()
        // Payload fields become `Bytes`: decoding a received WebSocket message slices it
        // instead of copying, and a publication's data is shared, never duplicated.
        .bytes(["."])
        .out_dir(&out_dir)
        .compile_fds(descriptors.clone())?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptors.encode_to_vec())?
        // A client newer than the server may send fields (or commands) it does not know:
        // ignore them, as the binary encoding does; a frame left without a command is 104.
        .ignore_unknown_fields()
        .out_dir(&out_dir)
        .build(&[".gateway.v1"])?;
    Ok(())
}

//! The JSON frame decoder (newline-separated frames, proto3 JSON mapping): any bytes decode
//! to frames or to an error; decoded frames survive a JSON round trip.
#![no_main]

use broker_proto::{Encoding, Limits, decode_frames, encode_frame, v1::ClientFrame};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_frames_per_message: 64,
        max_frame_bytes: 64 * 1024,
    };
    if let Ok(frames) =
        decode_frames::<ClientFrame>(Encoding::Json, Bytes::copy_from_slice(data), &limits)
    {
        assert!(frames.len() <= limits.max_frames_per_message);
        for frame in &frames {
            let again = encode_frame(Encoding::Json, frame);
            let back: Vec<ClientFrame> = decode_frames(Encoding::Json, again, &limits)
                .expect("a decoded frame encodes to something decodable");
            assert_eq!(&back[0], frame);
        }
    }
});

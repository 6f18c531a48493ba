//! Arbitrary bytes into the frame decoder (protocol §2).
//!
//! Properties, for every input:
//! - `decode` and `frame_len` never panic, under the default frame limit and a tiny one;
//! - `frame_len` and `decode` agree on where the first frame ends;
//! - a partial frame (`Ok(None)`) leaves the buffer untouched;
//! - a decoded frame re-encodes to exactly the bytes it was decoded from (the encoding is
//!   canonical), `encode_chunks` produces the same bytes, and decoding the re-encoding
//!   gives the same frame back;
//! - every error maps to one of the three codec error codes and prints a message.
//!
//! Consecutive frames in one input are decoded one after another, as `FrameReader` does.

#![no_main]

use bytes::BytesMut;
use directmq_protocol::{
    decode, encode, encode_chunks, frame_len, max_frame_bytes, ErrorCode, Frame,
    DEFAULT_MAX_MESSAGE_BYTES,
};
use libfuzzer_sys::fuzz_target;

/// At most this many frames are decoded from one input, to keep runs short.
const MAX_FRAMES: usize = 64;

fuzz_target!(|data: &[u8]| {
    check(data, max_frame_bytes(DEFAULT_MAX_MESSAGE_BYTES));
    // A tiny limit exercises the size check against ordinary inputs.
    check(data, 64);
});

fn check(data: &[u8], limit: u64) {
    let mut buf = BytesMut::from(data);
    for _ in 0..MAX_FRAMES {
        let before = buf.clone();
        let expected_len = frame_len(&buf, limit);
        match decode(&mut buf, limit) {
            Ok(Some(frame)) => {
                let consumed = before.len() - buf.len();
                assert!(
                    matches!(expected_len, Ok(Some(n)) if n == consumed),
                    "frame_len said {expected_len:?}, decode consumed {consumed}"
                );
                round_trip(&frame, &before[..consumed], limit);
            }
            Ok(None) => {
                assert!(
                    matches!(expected_len, Ok(None)),
                    "frame_len said {expected_len:?} for a partial frame"
                );
                assert_eq!(
                    buf, before,
                    "a partial frame must leave the buffer untouched"
                );
                return;
            }
            Err(e) => {
                let code = e.code();
                assert!(
                    [
                        ErrorCode::MALFORMED_FRAME,
                        ErrorCode::UNKNOWN_FRAME_KIND,
                        ErrorCode::FRAME_TOO_LARGE,
                    ]
                    .contains(&code),
                    "unexpected code {code} for {e}"
                );
                assert!(!e.to_string().is_empty());
                // A header error is reported from the header alone.
                if let Err(header) = &expected_len {
                    assert_eq!(header.code(), code);
                }
                return;
            }
        }
    }
}

fn round_trip(frame: &Frame, original: &[u8], limit: u64) {
    let mut encoded = BytesMut::new();
    encode(frame, &mut encoded);
    assert_eq!(
        &encoded[..],
        original,
        "{} frame did not re-encode to its own bytes",
        frame.name()
    );
    let mut chunks = Vec::new();
    encode_chunks(frame, &mut chunks);
    let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    assert_eq!(&joined[..], original, "encode_chunks differs from encode");
    let again = decode(&mut encoded, limit)
        .expect("a re-encoded frame decodes")
        .expect("a re-encoded frame is complete");
    assert!(encoded.is_empty(), "bytes left after the re-encoded frame");
    assert_eq!(&again, frame, "decode(encode(frame)) != frame");
}

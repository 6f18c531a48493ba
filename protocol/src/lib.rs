//! DirectMQ wire protocol: frame types, the codec and the stable error codes.
//!
//! This crate is the bottom layer, like `quinn-proto`: it knows nothing of sockets, runtimes
//! or files — no tokio, no quinn, no disk. The broker and the client both speak it; the
//! storage layer never sees it. The protocol is described in `docs/protocol.md`; comments
//! cite its sections as `§N`.
//!
//! A frame is a fixed 9-byte header, a bincode *meta* section, then a *data* section holding
//! message payloads back to back (§2). Payloads are never copied when decoding: each one is a
//! [`Bytes`] slice of the received frame.

#![forbid(unsafe_code)]

mod codec;
mod error;
mod frame;
mod names;

pub use codec::{
    decode, encode, encode_chunks, encode_chunks_backed, frame_len, DecodeError, HEADER_LEN,
};
pub use error::ErrorCode;
pub use frame::*;
pub use names::{validate_channel_name, validate_identifier, validate_prefix, NameError};

/// ALPN identifier negotiated in the TLS handshake (§1). A future incompatible protocol gets
/// a new ALPN *and* a new hello version, so an old broker refuses it during the handshake.
pub const ALPN: &[u8] = b"directmq/2";

/// ALPNs of earlier protocol versions. A broker accepts them in the handshake only to answer
/// the Hello with `UNSUPPORTED_VERSION` (whose frames have not changed): an old agent then
/// gets an error that says to upgrade and stops, instead of a failed handshake it would
/// take for a network fault and retry forever.
pub const OLDER_ALPNS: &[&[u8]] = &[b"directmq/1"];

/// The protocol version named in [`Hello`] and [`HelloOk`] (§3).
pub const PROTOCOL_VERSION: u16 = 2;

/// Default largest message payload (64 MiB, SPEC §2).
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 64 * 1024 * 1024;

/// Room for frame metadata on top of the largest payload.
pub const FRAME_OVERHEAD_BYTES: u64 = 1024 * 1024;

/// The largest frame a peer accepts for a given largest message.
pub fn max_frame_bytes(max_message_bytes: u64) -> u64 {
    max_message_bytes.saturating_add(FRAME_OVERHEAD_BYTES)
}

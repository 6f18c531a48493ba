//! Stable numeric error codes (§6). A code, once published, is never reused for another
//! meaning; new codes are appended. Unknown codes from a newer peer decode fine and print as
//! `UNKNOWN (N)`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A stable numeric error code that travels in [`crate::ErrorFrame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

macro_rules! codes {
    ($($name:ident = $num:expr, $text:expr;)*) => {
        impl ErrorCode {
            $(#[doc = $text] pub const $name: ErrorCode = ErrorCode($num);)*

            /// Every code this version knows, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The short, stable name of the code (`"FRAME_TOO_LARGE"`).
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($num => stringify!($name),)*
                    _ => "UNKNOWN",
                }
            }

            /// What the code means, as one sentence.
            pub fn description(self) -> &'static str {
                match self.0 {
                    $($num => $text,)*
                    _ => "an error this client version does not know",
                }
            }
        }
    };
}

codes! {
    MALFORMED_FRAME = 1, "the frame could not be decoded";
    UNKNOWN_FRAME_KIND = 2, "the frame kind is not known to this broker";
    FRAME_TOO_LARGE = 3, "the frame is larger than the peer accepts";
    UNSUPPORTED_VERSION = 4, "the protocol version is not supported";
    UNEXPECTED_FRAME = 5, "the frame is not valid at this point of the stream";
    FRAME_TIMEOUT = 6, "a frame started but did not finish arriving in time";
    INVALID_CHANNEL_NAME = 10, "the channel name is invalid";
    CHANNEL_NOT_FOUND = 11, "the channel does not exist";
    CHANNEL_EXISTS = 12, "the channel already exists";
    MESSAGE_TOO_LARGE = 13, "the message is larger than max_message_bytes";
    CONSUMER_BUSY = 14, "another session is already active for this consumer";
    INVALID_SEQUENCE = 15, "sequence numbers must strictly increase within a batch";
    INVALID_NAME = 16, "the producer id or consumer name is invalid";
    OFFSET_OUT_OF_RANGE = 17, "the offset is beyond the channel's head";
    MESSAGES_DROPPED = 18, "messages ahead of this session are no longer stored (a drop-oldest bound or retention); subscribe again to continue after them";
    UNAUTHORIZED = 20, "the identity is not allowed to do this";
    STORAGE_FULL = 30, "the broker's storage is full; retry later";
    STORAGE_ERROR = 31, "the broker could not write to its storage";
    SHUTTING_DOWN = 40, "the broker is shutting down";
    INTERNAL = 50, "the broker hit an internal error";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_named() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.0), "duplicate code {}", code.0);
            assert_ne!(code.name(), "UNKNOWN");
        }
        assert_eq!(ErrorCode(999).name(), "UNKNOWN");
        assert_eq!(
            ErrorCode::FRAME_TOO_LARGE.to_string(),
            "FRAME_TOO_LARGE (3)"
        );
    }

    #[test]
    fn code_numbers_are_pinned() {
        // These numbers are a public contract; changing one breaks deployed clients.
        assert_eq!(ErrorCode::MALFORMED_FRAME.0, 1);
        assert_eq!(ErrorCode::CONSUMER_BUSY.0, 14);
        assert_eq!(ErrorCode::UNAUTHORIZED.0, 20);
        assert_eq!(ErrorCode::STORAGE_FULL.0, 30);
    }
}

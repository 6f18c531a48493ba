//! Name rules (SPEC §2): channel names are 1–255 bytes of `[A-Za-z0-9._-]` segments
//! separated by `/`; producer ids and consumer names are one such segment.

use std::fmt;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    Empty,
    /// The name is longer than 255 bytes.
    TooLong { len: usize },
    /// A `/`-separated segment is empty (leading, trailing or doubled `/`).
    EmptySegment,
    /// A byte outside `[A-Za-z0-9._-]` (and `/` between segments of channel names).
    InvalidByte { byte: u8, position: usize },
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => write!(f, "the name is empty"),
            NameError::TooLong { len } => {
                write!(f, "the name is {len} bytes long; at most 255 are allowed")
            }
            NameError::EmptySegment => write!(
                f,
                "the name has an empty segment (a leading, trailing or doubled '/')"
            ),
            NameError::InvalidByte { byte, position } => write!(
                f,
                "byte {position} ({:?}) is not allowed; use letters, digits, '.', '_', '-'{}",
                char::from(*byte),
                if *byte == b'/' { "" } else { " and '/'" }
            ),
        }
    }
}

impl std::error::Error for NameError {}

const MAX_NAME_LEN: usize = 255;

fn allowed(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-')
}

/// Checks a channel name such as `dc-a/db1/orders/s1007`.
pub fn validate_channel_name(name: &str) -> Result<(), NameError> {
    check(name, true)
}

/// Checks a producer id or consumer name: one segment, no `/`.
pub fn validate_identifier(name: &str) -> Result<(), NameError> {
    check(name, false)
}

/// Checks a channel-name prefix for listing, watching and ACLs: empty (every channel), or
/// the start of a valid channel name, which may end in `/` (`dc-a/`, `dc-a/db1/s1`).
pub fn validate_prefix(prefix: &str) -> Result<(), NameError> {
    if prefix.is_empty() {
        return Ok(());
    }
    check(prefix.strip_suffix('/').unwrap_or(prefix), true)
}

fn check(name: &str, slashes: bool) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(NameError::Empty);
    }
    if bytes.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: bytes.len() });
    }
    let mut segment_len = 0usize;
    for (position, &byte) in bytes.iter().enumerate() {
        if byte == b'/' && slashes {
            if segment_len == 0 {
                return Err(NameError::EmptySegment);
            }
            segment_len = 0;
        } else if allowed(byte) {
            segment_len += 1;
        } else {
            return Err(NameError::InvalidByte { byte, position });
        }
    }
    if segment_len == 0 {
        return Err(NameError::EmptySegment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_empty_or_the_start_of_a_channel_name() {
        for ok in ["", "dc-a/", "dc-a", "dc-a/db1/s", "dc-a/db1/"] {
            validate_prefix(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in ["/", "dc-a//", "/dc-a", "dc a/", "dc-a/*"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn accepts_spec_examples() {
        validate_channel_name("dc-a/db1/orders/s1007").unwrap();
        validate_channel_name("t").unwrap();
        validate_channel_name(&"a".repeat(255)).unwrap();
        validate_identifier("agent-7.dc_b").unwrap();
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(validate_channel_name(""), Err(NameError::Empty));
        assert_eq!(
            validate_channel_name(&"a".repeat(256)),
            Err(NameError::TooLong { len: 256 })
        );
        assert_eq!(validate_channel_name("/a"), Err(NameError::EmptySegment));
        assert_eq!(validate_channel_name("a/"), Err(NameError::EmptySegment));
        assert_eq!(validate_channel_name("a//b"), Err(NameError::EmptySegment));
        assert_eq!(
            validate_channel_name("a b"),
            Err(NameError::InvalidByte {
                byte: b' ',
                position: 1
            })
        );
        assert!(validate_channel_name("ü").is_err());
        assert_eq!(
            validate_identifier("a/b"),
            Err(NameError::InvalidByte {
                byte: b'/',
                position: 1
            })
        );
    }
}

//! Byte strings in words, for error messages and the command-line tools.
//!
//! Keys and values are arbitrary bytes, but a terminal shows text:
//! - [`escape`] is lossless and unambiguous: valid UTF-8 that is printable
//!   stays as it is, a backslash becomes `\\`, every other byte becomes
//!   `\xNN` (control characters are escaped per byte of their UTF-8
//!   encoding). So a message never breaks across lines, and two different
//!   byte strings never print the same way.
//! - [`hex`] is the exact form, two lower-case digits per byte;
//!   [`parse_hex`] reads it back.

/// Escapes `bytes` for display (see the module comment for the rules).
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else if c.is_control() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    push_hex_escape(&mut out, b);
                }
            } else {
                out.push(c);
            }
        }
        for &b in chunk.invalid() {
            push_hex_escape(&mut out, b);
        }
    }
    out
}

fn push_hex_escape(out: &mut String, b: u8) {
    out.push_str("\\x");
    out.push(HEX_DIGITS[usize::from(b >> 4)]);
    out.push(HEX_DIGITS[usize::from(b & 0x0f)]);
}

const HEX_DIGITS: [char; 16] = [
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f',
];

/// Lower-case hex of `bytes`, two digits per byte.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(HEX_DIGITS[usize::from(b >> 4)]);
        out.push(HEX_DIGITS[usize::from(b & 0x0f)]);
    }
    out
}

/// Parses hex, two digits per byte, either case; `None` unless every
/// character is a hex digit and there is an even number of them. The
/// inverse of [`hex`].
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    // `from_str_radix` alone would take a sign: "+1" is not hex here.
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_printable_utf8_and_escapes_the_rest() {
        assert_eq!(escape(b"hello world"), "hello world");
        assert_eq!(escape("héllo ✓".as_bytes()), "héllo ✓");
        assert_eq!(escape(b"a\nb\tc"), "a\\x0ab\\x09c");
        assert_eq!(escape(&[0xff, b'a', 0x00]), "\\xffa\\x00");
        assert_eq!(escape(b"back\\slash"), "back\\\\slash");
        // A truncated multi-byte sequence is invalid UTF-8: escaped per byte.
        assert_eq!(escape(&[b'x', 0xe2, 0x9c]), "x\\xe2\\x9c");
        // A non-ASCII control character (U+0085) is escaped per byte.
        assert_eq!(escape("\u{85}".as_bytes()), "\\xc2\\x85");
        assert_eq!(escape(b""), "");
    }

    #[test]
    fn hex_round_trips_and_bad_hex_is_refused() {
        assert_eq!(parse_hex(&hex(&[0, 0xff, 0xa0])), Some(vec![0, 0xff, 0xa0]));
        assert_eq!(parse_hex("00FFa0"), Some(vec![0, 0xff, 0xa0]));
        assert_eq!(parse_hex(""), Some(vec![]));
        assert_eq!(parse_hex("0"), None);
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex("é0"), None);
        assert_eq!(parse_hex("+1"), None);
    }

    #[test]
    fn escape_is_unambiguous() {
        // The literal text `\xff` and the byte 0xff must print differently.
        assert_ne!(escape(b"\\xff"), escape(&[0xff]));
        assert_eq!(escape(b"\\xff"), "\\\\xff");
    }
}

//! Base64 with the standard alphabet and padding (RFC 4648 section 4), the encoding of SMTP AUTH
//! challenges and responses (RFC 4954 section 4).
//!
//! Decoding is strict, as RFC 4954 section 4 requires: "servers and clients MUST reject (and not
//! ignore) any character not explicitly allowed by the BASE64 alphabet, and MUST reject any
//! sequence of BASE64 characters that contains the pad character ('=') anywhere other than the
//! end of the string". Line breaks, white space, the URL-safe alphabet and missing padding are
//! all refused, and so are pad bits that are not zero (RFC 4648 section 3.5), so that every
//! value has exactly one accepted encoding.

use std::fmt;

/// The alphabet of RFC 4648 section 4, table 1.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The input of [`decode`] is not strict base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidBase64;

impl fmt::Display for InvalidBase64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid base64")
    }
}

impl std::error::Error for InvalidBase64 {}

/// Encodes `input`, padded with `=` to a multiple of four characters.
pub fn encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let octet = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = octet(0) << 16 | octet(1) << 8 | octet(2);
        // A chunk of n octets fills n + 1 characters; the rest of the four are padding.
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(group >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes strict base64; the empty input is the empty value.
pub fn decode(input: &[u8]) -> Result<Vec<u8>, InvalidBase64> {
    if !input.len().is_multiple_of(4) {
        return Err(InvalidBase64);
    }
    let groups = input.len() / 4;
    let mut out = Vec::with_capacity(groups * 3);
    for (index, quantum) in input.chunks_exact(4).enumerate() {
        let padding = quantum.iter().rev().take_while(|&&b| b == b'=').count();
        // At most "==", and only at the end of the whole string.
        if padding > 2 || (padding > 0 && index + 1 != groups) {
            return Err(InvalidBase64);
        }
        let mut group = 0u32;
        for &c in &quantum[..4 - padding] {
            group = group << 6 | u32::from(value(c).ok_or(InvalidBase64)?);
        }
        group <<= 6 * padding;
        let [_, octets @ ..] = group.to_be_bytes();
        let (data, pad_bits) = octets.split_at(3 - padding);
        // RFC 4648 section 3.5: "the pad bits MUST be set to zero by conforming encoders";
        // decoders MAY reject them otherwise, which keeps one encoding per value.
        if pad_bits.iter().any(|&b| b != 0) {
            return Err(InvalidBase64);
        }
        out.extend_from_slice(data);
    }
    Ok(out)
}

/// The value of one alphabet character; `None` for anything else, `=` included.
fn value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 4648 section 10.
    const VECTORS: [(&str, &str); 7] = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];

    #[test]
    fn rfc4648_test_vectors() {
        for (plain, encoded) in VECTORS {
            assert_eq!(encode(plain.as_bytes()), encoded, "{plain:?}");
            assert_eq!(decode(encoded.as_bytes()), Ok(plain.as_bytes().to_vec()), "{encoded:?}");
        }
    }

    #[test]
    fn every_alphabet_character_and_octet() {
        let all: Vec<u8> = (0..=255).collect();
        let encoded = encode(&all);
        assert_eq!(decode(encoded.as_bytes()), Ok(all));
        let alphabet = std::str::from_utf8(ALPHABET).unwrap();
        assert_eq!(decode(alphabet.as_bytes()).map(|d| encode(&d)), Ok(alphabet.to_owned()));
        // RFC 4616 section 4, the PLAIN example "\0tim\0tanstaaftanstaaf".
        assert_eq!(encode(b"\0tim\0tanstaaftanstaaf"), "AHRpbQB0YW5zdGFhZnRhbnN0YWFm");
    }

    #[test]
    fn refuses_anything_but_strict_base64() {
        let invalid: &[&[u8]] = &[
            b"Zg",          // padding missing
            b"Zg=",         // padding short
            b"Zg===",       // padding too long
            b"Z===",        // one character cannot hold an octet
            b"====",        //
            b"=AAA",        // RFC 4954 section 4's examples of misplaced padding
            b"AAA=BBB",     //
            b"Zg==Zg==",    // padding before the end
            b"Zh==",        // non-zero pad bits (RFC 4648 section 3.5)
            b"Zm9=",        //
            b"Zm9v ",       // white space
            b" Zm9v",       //
            b"Zm\r\n9v",    // a line break
            b"Zm9v\n",      //
            b"Zm\t9v",      //
            b"Zm9-",        // the URL-safe alphabet (RFC 4648 section 5)
            b"Zm9_",        //
            b"Zm9*",        // any other character
            b"*",           // the cancel line is not base64
            b"=",           // only an AUTH initial response may be "="
            b"Zm9\xc3\xa9", // not ASCII
            b"\0\0\0\0",    //
        ];
        for input in invalid {
            assert_eq!(decode(input), Err(InvalidBase64), "{:?}", String::from_utf8_lossy(input));
        }
    }

    proptest! {
        #[test]
        fn round_trips(data in prop::collection::vec(any::<u8>(), 0..300)) {
            let encoded = encode(&data);
            prop_assert_eq!(encoded.len() % 4, 0);
            prop_assert_eq!(decode(encoded.as_bytes()), Ok(data));
        }

        /// Whatever decodes, encodes back to the same text: one encoding per value.
        #[test]
        fn accepted_input_is_canonical(input in "[A-Za-z0-9+/]{0,12}={0,3}") {
            if let Ok(data) = decode(input.as_bytes()) {
                prop_assert_eq!(encode(&data), input);
            }
        }
    }
}

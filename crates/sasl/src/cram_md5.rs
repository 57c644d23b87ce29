//! `CRAM-MD5` (RFC 2195): the server sends a unique message id, the client answers with its
//! user name and the HMAC-MD5 of the challenge keyed with the shared secret. Only when
//! [`Settings::cram_md5`] is set; see there why it is off by default.

use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use subtle::ConstantTimeEq;

use crate::exchange::{authorize, out_of_order, utf8};
use crate::saslprep::prepare_identity;
use crate::{AuthError, AuthErrorKind, CredentialRequest, Credentials, Mechanism, Settings, Step};

const MECHANISM: Mechanism = Mechanism::CramMd5;

#[derive(Debug)]
pub(crate) struct CramMd5 {
    state: State,
}

#[derive(Debug)]
enum State {
    Start,
    Response { challenge: String },
    Verifying { challenge: String, authcid: String, digest: [u8; 16] },
    Done,
}

impl CramMd5 {
    pub(crate) fn new() -> CramMd5 {
        CramMd5 { state: State::Start }
    }

    /// The challenge. RFC 2195 section 2: "The data encoded in the first ready response
    /// contains an presumptively arbitrary string of random digits, a timestamp, and the
    /// fully-qualified primary host name of the server.  The syntax of the unencoded form must
    /// correspond to that of an RFC 822 'msg-id'". The random and the time stamp are there to
    /// make the challenge unique; a 144-bit random nonce does that alone, so there is no clock
    /// here: `<nonce@hostname>`.
    pub(crate) fn first_challenge(&mut self, settings: &Settings) -> Step {
        let nonce = match settings.nonce_source.nonce() {
            Ok(nonce) => nonce,
            Err(error) => {
                return Step::Failure(AuthError::new(
                    AuthErrorKind::TemporaryFailure,
                    MECHANISM,
                    error.to_string(),
                ));
            }
        };
        // The left part of a msg-id is a dot-atom; a nonce of other characters is a bug in the
        // nonce source.
        if nonce.is_empty()
            || !nonce.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=.-_".contains(&b))
        {
            return Step::Failure(AuthError::new(
                AuthErrorKind::TemporaryFailure,
                MECHANISM,
                format!("nonce {nonce:?} cannot be part of a message id"),
            ));
        }
        let challenge = format!("<{nonce}@{}>", settings.hostname);
        self.state = State::Response { challenge: challenge.clone() };
        Step::Challenge(challenge.into_bytes())
    }

    /// The answer: "a string consisting of the user name, a space, and a 'digest'", the digest
    /// "a 16-octet value which is sent in hexadecimal format, using lower-case ASCII
    /// characters". The user name may itself contain spaces, so it ends at the last one.
    pub(crate) fn step(&mut self, response: &[u8]) -> Step {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Response { challenge } => match parse(response) {
                Ok((authcid, digest)) => {
                    let request = CredentialRequest::CramMd5 { authcid: authcid.clone() };
                    self.state = State::Verifying { challenge, authcid, digest };
                    Step::NeedCredentials(request)
                }
                Err(error) => Step::Failure(error),
            },
            State::Start | State::Verifying { .. } | State::Done => {
                out_of_order(MECHANISM, "response without an outstanding challenge")
            }
        }
    }

    pub(crate) fn resume(&mut self, credentials: Credentials, settings: &Settings) -> Step {
        let (State::Verifying { challenge, authcid, digest }, Credentials::CramMd5Secret(secret)) =
            (std::mem::replace(&mut self.state, State::Done), credentials)
        else {
            return out_of_order(MECHANISM, "credentials not asked for, or of the wrong kind");
        };
        // Compute the digest for an unknown user too (with an empty key), so that the time
        // taken does not tell the two apart.
        let key = secret.as_ref().map_or(&b""[..], |secret| secret.expose().as_bytes());
        let mut mac =
            <Hmac<Md5> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(challenge.as_bytes());
        let expected = mac.finalize().into_bytes();
        let matches: bool = expected.as_slice().ct_eq(&digest).into();
        if matches && secret.is_some() {
            authorize(MECHANISM, settings, authcid, None)
        } else {
            Step::Failure(AuthError::new(
                AuthErrorKind::InvalidCredentials,
                MECHANISM,
                format!("wrong digest or unknown user {authcid:?}"),
            ))
        }
    }
}

fn parse(response: &[u8]) -> Result<(String, [u8; 16]), AuthError> {
    let malformed = |detail: &str| AuthError::new(AuthErrorKind::Malformed, MECHANISM, detail);
    let text = utf8(MECHANISM, "response", response)?;
    let (name, hex) =
        text.rsplit_once(' ').ok_or_else(|| malformed("no space between user name and digest"))?;
    let digest = decode_hex(hex).ok_or_else(|| malformed("digest is not 32 hexadecimal digits"))?;
    Ok((prepare_identity(MECHANISM, "user name", name)?, digest))
}

/// 32 hexadecimal digits. Upper case is accepted too: refusing it would protect nothing.
fn decode_hex(hex: &str) -> Option<[u8; 16]> {
    let hex = hex.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let mut digest = [0u8; 16];
    for (octet, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        *octet = u8::try_from(high * 16 + low).ok()?;
    }
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_and_digest() {
        let (name, digest) = parse(b"tim b913a602c7eda7a495b4e6e7334d3890").unwrap();
        assert_eq!(name, "tim");
        assert_eq!(digest[..4], [0xb9, 0x13, 0xa6, 0x02]);
        let (name, _) = parse(b"tim smith B913A602C7EDA7A495B4E6E7334D3890").unwrap();
        assert_eq!(name, "tim smith");
    }

    #[test]
    fn refuses_malformed_answers() {
        for response in [
            &b""[..],
            b"tim",
            b"timb913a602c7eda7a495b4e6e7334d3890",
            b"tim b913a602c7eda7a495b4e6e7334d389",
            b"tim b913a602c7eda7a495b4e6e7334d38900",
            b"tim g913a602c7eda7a495b4e6e7334d3890",
            b"tim +913a602c7eda7a495b4e6e7334d3890",
            b"\xfftim b913a602c7eda7a495b4e6e7334d3890",
        ] {
            assert_eq!(
                parse(response).unwrap_err().kind(),
                AuthErrorKind::Malformed,
                "{:?}",
                String::from_utf8_lossy(response)
            );
        }
        assert_eq!(
            parse(b" b913a602c7eda7a495b4e6e7334d3890").unwrap_err().kind(),
            AuthErrorKind::InvalidCredentials
        );
    }
}

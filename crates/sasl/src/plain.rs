//! `PLAIN` (RFC 4616): one client message, `[authzid] NUL authcid NUL passwd`.

use crate::exchange::{out_of_order, password_verified, utf8};
use crate::saslprep::prepare_identity;
use crate::{
    AuthError, AuthErrorKind, CredentialRequest, Credentials, MAX_PASSWORD_LEN, Mechanism,
    Password, Settings, Step,
};

const MECHANISM: Mechanism = Mechanism::Plain;

#[derive(Debug)]
pub(crate) struct Plain {
    state: State,
}

#[derive(Debug)]
enum State {
    /// Waiting for the message (the initial response, or the answer to the empty challenge).
    Message,
    /// The password is with the caller.
    Verifying {
        authcid: String,
        authzid: Option<String>,
    },
    Done,
}

impl Plain {
    pub(crate) fn new() -> Plain {
        Plain { state: State::Message }
    }

    pub(crate) fn step(&mut self, response: &[u8]) -> Step {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Message => match parse(response) {
                Ok(message) => {
                    let request = CredentialRequest::Password {
                        authcid: message.authcid.clone(),
                        password: message.password,
                    };
                    self.state =
                        State::Verifying { authcid: message.authcid, authzid: message.authzid };
                    Step::NeedCredentials(request)
                }
                Err(error) => Step::Failure(error),
            },
            State::Verifying { .. } => out_of_order(MECHANISM, "response while verifying"),
            State::Done => out_of_order(MECHANISM, "response after the outcome"),
        }
    }

    pub(crate) fn resume(&mut self, credentials: Credentials, settings: &Settings) -> Step {
        match (std::mem::replace(&mut self.state, State::Done), credentials) {
            (State::Verifying { authcid, authzid }, Credentials::PasswordVerified(verified)) => {
                password_verified(MECHANISM, settings, verified, authcid, authzid)
            }
            _ => out_of_order(MECHANISM, "credentials not asked for, or of the wrong kind"),
        }
    }
}

struct Message {
    authzid: Option<String>,
    authcid: String,
    password: Password,
}

/// Parses the message. RFC 4616 section 2:
///
/// ```text
/// message   = [authzid] UTF8NUL authcid UTF8NUL passwd
/// authcid   = 1*SAFE ; MUST accept up to 255 octets
/// authzid   = 1*SAFE ; MUST accept up to 255 octets
/// passwd    = 1*SAFE ; MUST accept up to 255 octets
/// ```
///
/// SAFE is any UTF-8 character but NUL. The identities come back SASLprep-ed; the password as
/// sent, since the check against the stored hash prepares it.
fn parse(message: &[u8]) -> Result<Message, AuthError> {
    let malformed = |detail: &str| AuthError::new(AuthErrorKind::Malformed, MECHANISM, detail);
    let mut fields = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password)) =
        (fields.next(), fields.next(), fields.next())
    else {
        return Err(malformed("message lacks the two NULs of authzid NUL authcid NUL passwd"));
    };
    // "the NUL (U+0000) character MUST NOT appear in authzid, authcid, or passwd productions."
    if password.contains(&0) {
        return Err(malformed("NUL in the password: more than three fields"));
    }
    if authcid.is_empty() {
        return Err(malformed("empty authcid"));
    }
    if password.is_empty() {
        return Err(malformed("empty password"));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(AuthError::new(
            AuthErrorKind::TooLong,
            MECHANISM,
            format!("password of {} octets, more than {MAX_PASSWORD_LEN}", password.len()),
        ));
    }
    let authcid = prepare_identity(MECHANISM, "authcid", utf8(MECHANISM, "authcid", authcid)?)?;
    let authzid = match utf8(MECHANISM, "authzid", authzid)? {
        "" => None,
        authzid => Some(prepare_identity(MECHANISM, "authzid", authzid)?),
    };
    let password = Password::new(utf8(MECHANISM, "password", password)?);
    Ok(Message { authzid, authcid, password })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_IDENTITY_LEN;

    fn parsed(message: &[u8]) -> Result<(Option<String>, String, String), AuthErrorKind> {
        parse(message)
            .map(|m| (m.authzid, m.authcid, m.password.expose().to_owned()))
            .map_err(|error| error.kind())
    }

    #[test]
    fn parses_the_three_fields() {
        assert_eq!(
            parsed(b"\0tim\0tanstaaftanstaaf"),
            Ok((None, "tim".into(), "tanstaaftanstaaf".into()))
        );
        assert_eq!(
            parsed(b"Ursel\0Kurt\0xipj3plmq"),
            Ok((Some("Ursel".into()), "Kurt".into(), "xipj3plmq".into()))
        );
        // SASLprep applies to the identities, not (yet) to the password.
        assert_eq!(
            parsed("\0I\u{00AD}X\0pass\u{00AD}word".as_bytes()),
            Ok((None, "IX".into(), "pass\u{00AD}word".into()))
        );
    }

    #[test]
    fn refuses_malformed_messages() {
        for message in [
            &b""[..],
            b"tim",
            b"\0tim",              // one NUL
            b"tim\0tanstaaf",      // one NUL
            b"\0tim\0",            // empty password
            b"\0\0tanstaaf",       // empty authcid
            b"\0tim\0tan\0staaf",  // NUL in the password
            b"\0\xfftim\0secret",  // not UTF-8
            b"\0tim\0\xc3(",       // not UTF-8
            b"\xc3(\0tim\0secret", // authzid not UTF-8
        ] {
            assert_eq!(
                parsed(message).err(),
                Some(AuthErrorKind::Malformed),
                "{:?}",
                String::from_utf8_lossy(message)
            );
        }
    }

    #[test]
    fn accepts_255_octet_fields_and_bounds_longer_ones() {
        let name = "n".repeat(MAX_IDENTITY_LEN);
        let password = "p".repeat(MAX_PASSWORD_LEN);
        let message = format!("{name}\0{name}\0{password}");
        assert!(parsed(message.as_bytes()).is_ok());
        let long_name = format!("{name}n");
        let message = format!("\0{long_name}\0{password}");
        assert_eq!(parsed(message.as_bytes()).err(), Some(AuthErrorKind::TooLong));
        let message = format!("{long_name}\0{name}\0{password}");
        assert_eq!(parsed(message.as_bytes()).err(), Some(AuthErrorKind::TooLong));
        let message = format!("\0{name}\0{password}p");
        assert_eq!(parsed(message.as_bytes()).err(), Some(AuthErrorKind::TooLong));
    }

    #[test]
    fn identities_that_saslprep_refuses_are_invalid_credentials() {
        assert_eq!(parsed(b"\0tim\x07\0secret").err(), Some(AuthErrorKind::InvalidCredentials));
        assert_eq!(
            parsed("\u{00AD}\0tim\0secret".as_bytes()).err(),
            Some(AuthErrorKind::InvalidCredentials)
        );
    }
}

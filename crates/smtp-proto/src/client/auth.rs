//! Authenticating to the server with SMTP AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN
//! mechanisms.
//!
//! Both mechanisms send the password itself, readable by anyone who sees the connection; the
//! session therefore sends them only over TLS unless told otherwise (see
//! [`ClientConfig::allow_plaintext_auth`](super::ClientConfig::allow_plaintext_auth)).

use std::fmt;

use super::reply::ServerReply;
use crate::base64;

/// Longest command line including CRLF (RFC 5321 section 4.5.3.1.4: "The maximum total length
/// of a command line including the command word and the `<CRLF>` is 512 octets").
const COMMAND_LINE_MAX: usize = 512;

/// A user name and password for SMTP AUTH, as a smart host that relays only for known clients
/// asks for.
///
/// They are sent as given. RFC 4954 section 4 says both sides "SHOULD" prepare user names with
/// SASLprep (RFC 4013); preparation leaves printable ASCII unchanged, so only non-ASCII
/// credentials need to be given in prepared form.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    /// Credentials that PLAIN can carry. RFC 4616 section 2: `message = [authzid] UTF8NUL
    /// authcid UTF8NUL passwd`, where `authcid` and `passwd` are `1*SAFE` (anything but NUL)
    /// and NUL "MUST NOT appear in authzid, authcid, or passwd productions". An empty or
    /// NUL-containing value would make a malformed message, or shift its fields; refusing it
    /// here lets a configuration check report it before any mail waits on it.
    pub fn new(
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Result<Credentials, InvalidCredentials> {
        let (username, password) = (username.into(), password.into());
        let usable = |value: &str| !value.is_empty() && !value.contains('\0');
        if usable(&username) && usable(&password) {
            Ok(Credentials { username, password })
        } else {
            Err(InvalidCredentials)
        }
    }

    /// The user name, for logs and for telling connections of different logins apart.
    pub fn username(&self) -> &str {
        &self.username
    }
}

/// The password stays out of logs: a `{:?}` of a session or its configuration shows only the
/// user name.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why [`Credentials::new`] refused its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidCredentials;

impl fmt::Display for InvalidCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the SMTP AUTH user name and password must be non-empty and contain no NUL")
    }
}

impl std::error::Error for InvalidCredentials {}

/// The SASL mechanisms we can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mechanism {
    /// RFC 4616: one client message, no server challenge.
    Plain,
    /// The user name and the password, each the answer to a server prompt. Never standardized
    /// (draft-murchison-sasl-login), but some servers offer nothing else.
    Login,
}

impl Mechanism {
    /// PLAIN when the server offers it, else LOGIN, else nothing. Both send the password in
    /// the clear, so neither is safer; PLAIN is the standard one (RFC 4954 section 15 makes it
    /// mandatory to implement) and takes one round trip instead of three.
    pub(super) fn choose(offered: &[String]) -> Option<Mechanism> {
        let offers = |name: &str| offered.iter().any(|m| m == name);
        if offers("PLAIN") {
            Some(Mechanism::Plain)
        } else if offers("LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }

    /// The name on the AUTH command line (and in `Extensions::auth`).
    pub(super) fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }

    /// The client's message number `index` of the exchange, before base64 encoding; `None`
    /// past the last one.
    fn message(self, credentials: &Credentials, index: usize) -> Option<Vec<u8>> {
        match (self, index) {
            // An empty authzid: RFC 4616 section 2, the server then derives the authorization
            // identity from the authentication identity, which is what a relay client wants.
            (Mechanism::Plain, 0) => Some(
                [b"\0", credentials.username.as_bytes(), b"\0", credentials.password.as_bytes()]
                    .concat(),
            ),
            (Mechanism::Login, 0) => Some(credentials.username.as_bytes().to_vec()),
            (Mechanism::Login, 1) => Some(credentials.password.as_bytes().to_vec()),
            _ => None,
        }
    }
}

/// An AUTH exchange in progress. It holds no secret: each response is made from the
/// [`Credentials`] when it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Exchange {
    mechanism: Mechanism,
    /// How many of the mechanism's messages went out, in the AUTH command or as responses.
    sent: usize,
}

impl Exchange {
    /// Starts the exchange: the exchange and its AUTH command line.
    ///
    /// PLAIN goes with its message as the initial response (RFC 4954 section 4), saving a
    /// round trip, unless the line would be too long: "If use of the initial response argument
    /// would cause the AUTH command to exceed this length, the client MUST NOT use the initial
    /// response parameter (and instead proceed as defined in Section 5.1 of \[SASL\])", that is,
    /// send it in answer to the server's empty challenge. LOGIN starts with the server's
    /// prompt for the user name.
    pub(super) fn start(mechanism: Mechanism, credentials: &Credentials) -> (Exchange, Vec<u8>) {
        let mut command = format!("AUTH {}", mechanism.name());
        let initial = match mechanism {
            Mechanism::Plain => mechanism.message(credentials, 0).map(|m| base64::encode(&m)),
            Mechanism::Login => None,
        };
        // The PLAIN message is never empty (it holds two NULs), so the "=" that stands for an
        // empty initial response is never needed.
        let mut sent = 0;
        if let Some(initial) = initial
            && command.len() + 1 + initial.len() + 2 <= COMMAND_LINE_MAX
        {
            command.push(' ');
            command.push_str(&initial);
            sent = 1;
        }
        command.push_str("\r\n");
        (Exchange { mechanism, sent }, command.into_bytes())
    }

    pub(super) fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// The response line to a 334 challenge, or `None` when the exchange must be cancelled:
    /// the challenge is not base64, or the mechanism has nothing more to say.
    ///
    /// Neither mechanism uses what a challenge says (LOGIN's prompts are "Username:" and
    /// "Password:" by convention only), so only its form is checked. RFC 4954 section 4: "If
    /// the client cannot BASE64 decode any of the server's challenges, it MUST cancel the
    /// authentication using the "*" response", and a challenge "MUST NOT contain any text
    /// other than the BASE64 encoded challenge".
    pub(super) fn answer(
        &mut self,
        credentials: &Credentials,
        challenge: &ServerReply,
    ) -> Option<Vec<u8>> {
        let [text] = &challenge.lines[..] else {
            return None;
        };
        base64::decode(text.as_bytes()).ok()?;
        let message = self.mechanism.message(credentials, self.sent)?;
        self.sent += 1;
        let mut line = base64::encode(&message).into_bytes();
        line.extend_from_slice(b"\r\n");
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(username: &str, password: &str) -> Credentials {
        Credentials::new(username, password).unwrap()
    }

    fn challenge(text: &str) -> ServerReply {
        ServerReply::new(334, vec![text.to_owned()])
    }

    #[test]
    fn credentials_that_plain_cannot_carry_are_refused() {
        assert!(Credentials::new("user", "pass").is_ok());
        for (username, password) in [("", "pass"), ("user", ""), ("us\0er", "pass"), ("user", "\0")]
        {
            assert_eq!(Credentials::new(username, password), Err(InvalidCredentials));
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let shown = format!("{:?}", credentials("relay@example.org", "hunter2"));
        assert!(shown.contains("relay@example.org"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn plain_is_preferred_then_login() {
        let offered = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let choose = |names: &[&str]| Mechanism::choose(&offered(names));
        assert_eq!(choose(&["LOGIN", "CRAM-MD5", "PLAIN"]), Some(Mechanism::Plain));
        assert_eq!(choose(&["CRAM-MD5", "LOGIN"]), Some(Mechanism::Login));
        assert_eq!(choose(&["CRAM-MD5", "SCRAM-SHA-256", "XOAUTH2"]), None);
        assert_eq!(choose(&[]), None);
    }

    #[test]
    fn plain_with_initial_response() {
        // The example of RFC 4616 section 4, without its authzid.
        let (mut exchange, command) =
            Exchange::start(Mechanism::Plain, &credentials("tim", "tanstaaftanstaaf"));
        assert_eq!(command, b"AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n");
        // PLAIN has nothing more to say.
        assert_eq!(exchange.answer(&credentials("tim", "x"), &challenge("")), None);
    }

    #[test]
    fn plain_too_long_for_the_command_line_waits_for_the_challenge() {
        // "\0u\0" and the password: 372 octets encode to 496 characters, and "AUTH PLAIN ",
        // those and CRLF make 509 octets; 373 octets encode to 500, three too many.
        for (password_len, inline) in [(369, true), (370, false)] {
            let credentials = credentials("u", &"p".repeat(password_len));
            let encoded = base64::encode(&Mechanism::Plain.message(&credentials, 0).unwrap());
            let (mut exchange, command) = Exchange::start(Mechanism::Plain, &credentials);
            if inline {
                assert_eq!(command, format!("AUTH PLAIN {encoded}\r\n").into_bytes());
                assert_eq!(command.len(), 509);
            } else {
                assert_eq!(encoded.len(), 500);
                assert_eq!(command, b"AUTH PLAIN\r\n");
                // RFC 4954 section 4: the server's challenge is "334 " with no text.
                let response = exchange.answer(&credentials, &challenge("")).unwrap();
                assert_eq!(response, format!("{encoded}\r\n").into_bytes());
            }
        }
    }

    #[test]
    fn login_answers_the_two_prompts_in_order() {
        let credentials = credentials("user@example.org", "s3cr\u{e9}t");
        let (mut exchange, command) = Exchange::start(Mechanism::Login, &credentials);
        assert_eq!(command, b"AUTH LOGIN\r\n");
        assert_eq!(
            exchange.answer(&credentials, &challenge("VXNlcm5hbWU6")).unwrap(),
            b"dXNlckBleGFtcGxlLm9yZw==\r\n"
        );
        // What a prompt says does not matter, only that it is base64.
        assert_eq!(exchange.answer(&credentials, &challenge("")).unwrap(), b"czNjcsOpdA==\r\n");
        assert_eq!(exchange.answer(&credentials, &challenge("UGFzc3dvcmQ6")), None);
    }

    #[test]
    fn malformed_challenges_cancel() {
        let credentials = credentials("user", "pass");
        // RFC 4954 section 4 names "=AAA" as one; "Zh==" has pad bits that are not zero.
        for text in ["Username:", "VXNlcm5hbWU6 extra", "=AAA", "Zh==", "VXNlcm5hbWU"] {
            let (mut exchange, _) = Exchange::start(Mechanism::Login, &credentials);
            assert_eq!(exchange.answer(&credentials, &challenge(text)), None, "{text:?}");
        }
        // A challenge is one line (RFC 4954 section 8: `continue-req`).
        let (mut exchange, _) = Exchange::start(Mechanism::Login, &credentials);
        let two_lines = ServerReply::new(334, vec!["VXNl".into(), "cm5hbWU6".into()]);
        assert_eq!(exchange.answer(&credentials, &two_lines), None);
    }
}

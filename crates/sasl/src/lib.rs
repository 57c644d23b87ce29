//! The server side of SMTP AUTH (RFC 4954): the SASL mechanisms `PLAIN` (RFC 4616), `LOGIN`
//! (the de-facto mechanism with "Username:" and "Password:" prompts), `SCRAM-SHA-256`
//! (RFC 5802 and RFC 7677) and, only when enabled, `CRAM-MD5` (RFC 2195); and the formats in
//! which user credentials are stored: [`PasswordHash`] (argon2id) and [`ScramCredentials`].
//!
//! Nothing here does I/O, reads a clock or looks up users. The SMTP layer reads lines and
//! writes replies; the user database is asked by the caller, which may take its time (it is
//! usually a query to a database), while the exchange waits in a [`Step::NeedCredentials`].
//!
//! # Driving an exchange
//!
//! ```text
//! C: AUTH SCRAM-SHA-256 biwsbj11c2VyLHI9ck9wck5HZndFYmVSV2diTkVrcU8=
//! ```
//!
//! 1. [`Mechanism::from_name`] the first argument, and check [`Settings::permits`]: a
//!    mechanism that is unknown or not permitted gets `504 5.5.4` (RFC 4954 section 4).
//! 2. Decode the initial response, if any, with [`decode_initial_response`] (which turns the
//!    `=` of an empty initial response into an empty one), then
//!    [`ServerExchange::start`].
//! 3. Act on each [`Step`]:
//!    * [`Step::Challenge`]: send `334 ` followed by [`encode_challenge`], read the next line,
//!      [`decode_response`] it and pass it to [`ServerExchange::step`]. A `*` line
//!      ([`Response::Cancel`]) ends the exchange with `501` (RFC 4954 section 4: "If the
//!      server receives such a response, it MUST reject the AUTH command by sending a 501
//!      reply"); a line that is not base64 ends it with `501 5.5.2`, one that is too long
//!      with `500 5.5.6` ([`DecodeError`]).
//!    * [`Step::NeedCredentials`]: look the user up and pass what was found (or that nothing
//!      was) to [`ServerExchange::resume`]. For `PLAIN` and `LOGIN` that means checking the
//!      password, with [`verify_password`] for an argon2 [`PasswordHash`]; argon2 is
//!      deliberately slow, so do it off the I/O threads.
//!    * [`Step::Success`]: reply `235 2.7.0`; the client is now `authzid`.
//!    * [`Step::Failure`]: reply as [`AuthErrorKind`] says and log the error's text (which
//!      never contains a password).
//!
//! Every failure of the credentials themselves (unknown user, wrong password, wrong proof,
//! authorization identity refused) is the same [`AuthErrorKind::InvalidCredentials`], so that
//! the reply tells a client nothing about which users exist; the error's text says more for
//! the log.

mod cram_md5;
mod credentials;
mod error;
mod exchange;
mod login;
mod plain;
mod random;
mod saslprep;
mod scram;
mod wire;

use std::fmt;

pub use credentials::{
    Argon2Params, CredentialError, PasswordHash, ScramCredentials, verify_password,
};
pub use error::{AuthError, AuthErrorKind, ScramError};
pub use exchange::{
    AuthorizeFn, CredentialRequest, Credentials, NonceSource, OsRandom, ServerExchange, Settings,
    Step,
};
pub use random::RandomError;
pub use saslprep::{SaslprepError, saslprep};
pub use wire::{
    DecodeError, MAX_LINE_LEN, Response, decode_initial_response, decode_response, encode_challenge,
};

/// The longest authentication or authorization identity accepted, in octets. RFC 4616 section
/// 2: "Servers MUST be capable of accepting authzid, authcid, and passwd productions up to and
/// including 255 octets." An identity is a database key, so there is no reason to take more.
pub const MAX_IDENTITY_LEN: usize = 255;

/// The longest password accepted, in octets: well above the 255 that RFC 4616 requires, for
/// long generated passphrases, but bounded so that a client cannot make us hash megabytes.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// A SASL mechanism this crate implements on the server side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// RFC 4616: the client sends authzid, authcid and password in one message.
    Plain,
    /// The de-facto `LOGIN` mechanism: the server prompts for the user name, then the
    /// password. Never standardised, but many clients offer nothing else.
    Login,
    /// RFC 5802 with SHA-256 (RFC 7677), without channel binding: the password never crosses
    /// the wire, and the server keeps only keys derived from it.
    ScramSha256,
    /// RFC 2195. Off unless [`Settings::cram_md5`] is set: it needs the password itself (or an
    /// equivalent) on the server, see [`Settings::cram_md5`].
    CramMd5,
}

impl Mechanism {
    /// The mechanism with this name. SASL names are upper case (RFC 4422 section 3.1), but SMTP
    /// commands are case-insensitive and some clients send `auth plain`, so case is ignored.
    pub fn from_name(name: &str) -> Option<Mechanism> {
        [Mechanism::ScramSha256, Mechanism::Plain, Mechanism::Login, Mechanism::CramMd5]
            .into_iter()
            .find(|mechanism| mechanism.name().eq_ignore_ascii_case(name))
    }

    /// The registered name, as advertised in the EHLO `AUTH` line.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::CramMd5 => "CRAM-MD5",
        }
    }

    /// The client sends the password itself: such a mechanism must not be offered without TLS
    /// (RFC 4954 section 4: "A server implementation MUST implement a configuration in which it
    /// does NOT permit any plaintext password mechanisms, unless either the STARTTLS command
    /// has been negotiated or some other mechanism that protects the session from password
    /// snooping has been provided").
    pub fn sends_plaintext_password(self) -> bool {
        matches!(self, Mechanism::Plain | Mechanism::Login)
    }

    /// The client may send its first message with the AUTH command. `PLAIN` and SCRAM are
    /// client-first; `LOGIN` takes the user name there, as most servers allow; `CRAM-MD5` is
    /// server-first, and RFC 4954 section 4 says "If the client uses an initial-response
    /// argument to the AUTH command with a SASL mechanism in which the client does not begin
    /// the authentication exchange, the server MUST reject the AUTH command with a 501 reply".
    pub fn accepts_initial_response(self) -> bool {
        !matches!(self, Mechanism::CramMd5)
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A password or shared secret. Its `Debug` form hides the value, so that logging a
/// [`Step`] or a [`Credentials`] cannot leak it; [`Password::expose`] gives it.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Password {
        Password(password.into())
    }

    /// The password itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<hidden>)")
    }
}

#[cfg(test)]
mod tests;

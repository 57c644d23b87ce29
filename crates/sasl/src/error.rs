//! Why an exchange failed: a kind, which decides the SMTP reply, and a text for the log.

use std::fmt;

use crate::Mechanism;

/// The kind of failure, which decides the reply (RFC 4954 sections 4 and 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthErrorKind {
    /// Unknown user, wrong password or proof, an authorization identity the user may not act
    /// as, an identity that SASLprep refuses, channel binding the client insists on. Reply
    /// `535 5.7.8` (RFC 4954 section 6: "This response to the AUTH command indicates that the
    /// authentication failed due to invalid or insufficient authentication credentials").
    /// These are one kind on purpose: the client must not learn which users exist.
    InvalidCredentials,
    /// The decoded response does not follow the mechanism's syntax: a `PLAIN` message without
    /// its NULs, SCRAM attributes out of order, text that is not UTF-8. Reply `501 5.5.2`, as
    /// for a response that is not base64.
    Malformed,
    /// The AUTH command carried an initial response for a server-first mechanism. Reply
    /// `501 5.7.0` (RFC 4954 section 4: "the server MUST reject the AUTH command with a 501
    /// reply.  Servers using the enhanced status codes extension \[ESMTP-CODES\] SHOULD return
    /// an enhanced status code of 5.7.0 in this case").
    InitialResponseNotAllowed,
    /// The mechanism is known but not enabled (`CRAM-MD5` without
    /// [`Settings::cram_md5`](crate::Settings::cram_md5)). Reply `504 5.5.4`, as for an unknown
    /// mechanism (RFC 4954 section 4).
    MechanismNotAvailable,
    /// A response longer than the mechanism accepts. Reply `500 5.5.6` (RFC 4954 section 6:
    /// "the client sending a \[BASE64\] response that is longer than the maximum buffer size
    /// available for the currently selected SASL mechanism").
    TooLong,
    /// A failure on our side: the random number generator failed, or the exchange was driven
    /// out of order (a bug in the caller). Reply `454 4.7.0` (RFC 4954 section 6: "the
    /// authentication failed due to a temporary server failure").
    TemporaryFailure,
}

/// The `server-error-value` of RFC 5802 section 7 that describes a SCRAM failure.
///
/// RFC 5802 section 5.1 makes sending it optional: "a server implementation MAY conclude the
/// SASL exchange with a failure without sending the server-final-message." This server does
/// that (SMTP has a failure reply of its own, and one round trip fewer), so the value is for
/// the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScramError {
    /// A message does not follow the syntax of RFC 5802 section 7.
    InvalidEncoding,
    /// The client used the reserved `m` attribute (a mandatory extension).
    ExtensionsNotSupported,
    /// The client proof does not match the stored key.
    InvalidProof,
    /// The `c=` attribute does not repeat the GS2 header of the first message.
    ChannelBindingsDontMatch,
    /// The client asked for channel binding (`p=`), which this server does not offer.
    ChannelBindingNotSupported,
    /// No SCRAM credentials for this user. The exchange went on with invented ones, so that
    /// the client could not tell.
    UnknownUser,
    /// The user name has a `=` that is not `=2C` or `=3D`, or SASLprep refuses it.
    InvalidUsernameEncoding,
    /// Anything else, for example a nonce that was changed.
    OtherError,
}

impl ScramError {
    /// The value as RFC 5802 section 7 spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ScramError::InvalidEncoding => "invalid-encoding",
            ScramError::ExtensionsNotSupported => "extensions-not-supported",
            ScramError::InvalidProof => "invalid-proof",
            ScramError::ChannelBindingsDontMatch => "channel-bindings-dont-match",
            ScramError::ChannelBindingNotSupported => "channel-binding-not-supported",
            ScramError::UnknownUser => "unknown-user",
            ScramError::InvalidUsernameEncoding => "invalid-username-encoding",
            ScramError::OtherError => "other-error",
        }
    }
}

impl fmt::Display for ScramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed exchange. Its text names the mechanism and what went wrong, for the log; it never
/// contains a password, but may contain a user name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    kind: AuthErrorKind,
    mechanism: Mechanism,
    scram: Option<ScramError>,
    detail: String,
}

impl AuthError {
    pub(crate) fn new(
        kind: AuthErrorKind,
        mechanism: Mechanism,
        detail: impl Into<String>,
    ) -> AuthError {
        AuthError { kind, mechanism, scram: None, detail: detail.into() }
    }

    /// The same error with its RFC 5802 error value.
    pub(crate) fn with_scram(self, scram: ScramError) -> AuthError {
        AuthError { scram: Some(scram), ..self }
    }

    /// What kind of failure this is, which decides the reply.
    pub fn kind(&self) -> AuthErrorKind {
        self.kind
    }

    /// The mechanism of the exchange that failed.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// For SCRAM failures, the RFC 5802 error value.
    pub fn scram_error(&self) -> Option<ScramError> {
        self.scram
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.mechanism, self.detail)?;
        if let Some(scram) = self.scram {
            write!(f, " (e={scram})")?;
        }
        Ok(())
    }
}

impl std::error::Error for AuthError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_the_mechanism_and_the_scram_error() {
        let error = AuthError::new(AuthErrorKind::Malformed, Mechanism::Plain, "no NUL");
        assert_eq!(error.to_string(), "PLAIN: no NUL");
        let error = AuthError::new(
            AuthErrorKind::InvalidCredentials,
            Mechanism::ScramSha256,
            "client proof does not match",
        )
        .with_scram(ScramError::InvalidProof);
        assert_eq!(
            error.to_string(),
            "SCRAM-SHA-256: client proof does not match (e=invalid-proof)"
        );
        assert_eq!(error.scram_error(), Some(ScramError::InvalidProof));
        assert_eq!(error.mechanism(), Mechanism::ScramSha256);
    }
}

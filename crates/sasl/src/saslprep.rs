//! SASLprep (RFC 4013), the preparation of user names and passwords before they are compared
//! or hashed, so that different encodings of the same text give the same result.

use std::borrow::Cow;
use std::fmt;

use crate::{AuthError, AuthErrorKind, MAX_IDENTITY_LEN, Mechanism};

/// Why [`saslprep`] refused a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslprepError(String);

impl fmt::Display for SaslprepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SaslprepError {}

/// Prepares a user name or password with SASLprep: non-ASCII spaces become spaces, soft
/// hyphens and the like vanish, the result is in Unicode normalization form KC, and control
/// characters, private-use and unassigned code points, and badly mixed right-to-left text are
/// refused. Plain printable ASCII comes back unchanged and borrowed.
///
/// An empty result is refused too: RFC 4616 section 2, "if preparation fails or results in an
/// empty string, verification SHALL fail".
///
/// Every string is prepared as a "stored" string (RFC 3454 section 7), with unassigned code
/// points refused, also user names the client sends, which could be "query" strings. That is
/// stricter than needed, never looser: a name with a code point unassigned in Unicode 3.2 can
/// neither be stored nor match. The same function prepares the password before it is hashed
/// ([`PasswordHash`](crate::PasswordHash), [`ScramCredentials`](crate::ScramCredentials)) and
/// before it is checked, so a password means the same under `PLAIN`, `LOGIN` and SCRAM.
pub fn saslprep(input: &str) -> Result<Cow<'_, str>, SaslprepError> {
    let prepared = stringprep::saslprep(input).map_err(|error| SaslprepError(error.to_string()))?;
    if prepared.is_empty() {
        return Err(SaslprepError("empty after SASLprep".to_owned()));
    }
    Ok(prepared)
}

/// Prepares the authentication or authorization identity of `PLAIN`, `LOGIN` or `CRAM-MD5`,
/// the form in which the caller looks it up. `what` names it in the error.
pub(crate) fn prepare_identity(
    mechanism: Mechanism,
    what: &str,
    identity: &str,
) -> Result<String, AuthError> {
    if identity.len() > MAX_IDENTITY_LEN {
        return Err(AuthError::new(
            AuthErrorKind::TooLong,
            mechanism,
            format!("{what} of {} octets, more than {MAX_IDENTITY_LEN}", identity.len()),
        ));
    }
    let prepared = saslprep(identity).map(Cow::into_owned).map_err(|error| {
        AuthError::new(
            AuthErrorKind::InvalidCredentials,
            mechanism,
            format!("{what} {identity:?} refused by SASLprep: {error}"),
        )
    })?;
    // NFKC can lengthen a name (U+FDFA alone becomes 18 characters), so the bound holds for
    // what the caller looks up too.
    if prepared.len() > MAX_IDENTITY_LEN {
        return Err(AuthError::new(
            AuthErrorKind::TooLong,
            mechanism,
            format!(
                "{what} of {} octets after SASLprep, more than {MAX_IDENTITY_LEN}",
                prepared.len()
            ),
        ));
    }
    Ok(prepared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_is_unchanged_and_borrowed() {
        assert!(matches!(saslprep("user@example.org"), Ok(Cow::Borrowed("user@example.org"))));
        assert!(matches!(saslprep("pen cil!"), Ok(Cow::Borrowed("pen cil!"))));
    }

    #[test]
    fn rfc_4013_examples() {
        // The table of examples in RFC 4013 section 3, in its order.
        assert_eq!(saslprep("I\u{00AD}X").unwrap(), "IX");
        assert_eq!(saslprep("user").unwrap(), "user");
        assert_eq!(saslprep("USER").unwrap(), "USER");
        assert_eq!(saslprep("\u{00AA}").unwrap(), "a");
        assert_eq!(saslprep("\u{2168}").unwrap(), "IX");
        assert!(saslprep("\u{0007}").is_err());
        assert!(saslprep("\u{0627}1").is_err());
    }

    #[test]
    fn normalizes_compatibility_forms() {
        // RFC 5802 section 3 suggests testing code points whose NFC and NFKC differ.
        assert_eq!(saslprep("\u{00BD}").unwrap(), "1\u{2044}2");
        assert_eq!(saslprep("a\u{00A0}b").unwrap(), "a b");
    }

    #[test]
    fn refuses_empty_results_and_controls() {
        assert!(saslprep("").is_err());
        assert!(saslprep("\u{00AD}").is_err());
        assert!(saslprep("a\tb").is_err());
        assert!(saslprep("a\u{E000}").is_err());
    }

    #[test]
    fn identities_are_bounded() {
        let long = "a".repeat(MAX_IDENTITY_LEN + 1);
        let error = prepare_identity(Mechanism::Plain, "authcid", &long).unwrap_err();
        assert_eq!(error.kind(), AuthErrorKind::TooLong);
        let longest = "a".repeat(MAX_IDENTITY_LEN);
        assert_eq!(prepare_identity(Mechanism::Plain, "authcid", &longest).unwrap(), longest);
        let error = prepare_identity(Mechanism::Login, "user name", "a\u{7}").unwrap_err();
        assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials);
    }

    /// A bound the `sasl` fuzz target checks: 85 U+FDFA (255 octets) came out of SASLprep as
    /// a 2805-octet identity.
    #[test]
    fn identities_are_bounded_after_saslprep() {
        let expanding = "\u{FDFA}".repeat(85);
        assert_eq!(expanding.len(), MAX_IDENTITY_LEN);
        assert!(saslprep(&expanding).unwrap().len() > MAX_IDENTITY_LEN);
        let error = prepare_identity(Mechanism::Plain, "authcid", &expanding).unwrap_err();
        assert_eq!(error.kind(), AuthErrorKind::TooLong);
        assert_eq!(prepare_identity(Mechanism::Plain, "authcid", "\u{FDFA}").unwrap().len(), 33);
    }
}

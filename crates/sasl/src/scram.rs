//! `SCRAM-SHA-256` (RFC 5802, with SHA-256 by RFC 7677), without channel binding.
//!
//! ```text
//! C: n,,n=user,r=<client nonce>                          client-first-message
//! S: r=<client nonce><server nonce>,s=<salt>,i=<count>   server-first-message
//! C: c=biws,r=<both nonces>,p=<ClientProof>              client-final-message
//! S: v=<ServerSignature>                                 server-final-message
//! C: (empty)
//! ```
//!
//! SCRAM sends its last message "together with a server's indication of a successful
//! outcome" (RFC 5802 section 5), but SMTP has no room for that (RFC 4954 section 4: "the
//! SMTP protocol doesn't support the SASL feature of returning additional data with a
//! successful outcome"), so the server-final-message goes out as one more `334` challenge,
//! and the `235` follows the client's empty answer.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use subtle::{Choice, ConstantTimeEq};

use crate::credentials::{hmac_sha256, sha256};
use crate::exchange::{authorize, out_of_order, utf8};
use crate::{
    AuthError, AuthErrorKind, CredentialRequest, Credentials, MAX_IDENTITY_LEN, Mechanism,
    ScramCredentials, ScramError, Settings, Step, saslprep,
};

const MECHANISM: Mechanism = Mechanism::ScramSha256;

#[derive(Debug)]
pub(crate) struct Scram {
    state: State,
}

#[derive(Debug)]
enum State {
    ClientFirst,
    /// The user's credentials are being looked up.
    Lookup(ClientFirst),
    /// The server-first-message is out.
    ClientFinal(Pending),
    /// The server-final-message is out; the client answers it with an empty response.
    Acknowledge {
        authcid: String,
        authzid: String,
    },
    Done,
}

/// What the exchange keeps of the client-first-message.
#[derive(Debug)]
struct ClientFirst {
    /// `gs2-header` as sent: the client-final-message's `c=` must repeat it.
    gs2_header: String,
    /// `client-first-message-bare` as sent: the start of AuthMessage.
    bare: String,
    nonce: String,
    /// The user name, unescaped and SASLprep-ed.
    authcid: String,
    /// The `a=` attribute, unescaped and SASLprep-ed.
    authzid: Option<String>,
}

#[derive(Debug)]
struct Pending {
    first: ClientFirst,
    server_first: String,
    /// Client and server nonce together.
    nonce: String,
    credentials: ScramCredentials,
    /// False when the credentials were invented for an unknown user.
    known_user: bool,
}

fn error(kind: AuthErrorKind, scram: ScramError, detail: impl Into<String>) -> AuthError {
    AuthError::new(kind, MECHANISM, detail).with_scram(scram)
}

fn malformed(detail: impl Into<String>) -> AuthError {
    error(AuthErrorKind::Malformed, ScramError::InvalidEncoding, detail)
}

impl Scram {
    pub(crate) fn new() -> Scram {
        Scram { state: State::ClientFirst }
    }

    pub(crate) fn step(&mut self, response: &[u8], settings: &Settings) -> Step {
        match std::mem::replace(&mut self.state, State::Done) {
            State::ClientFirst => match parse_client_first(response) {
                Ok(first) => {
                    let request = CredentialRequest::Scram { authcid: first.authcid.clone() };
                    self.state = State::Lookup(first);
                    Step::NeedCredentials(request)
                }
                Err(error) => Step::Failure(error),
            },
            State::ClientFinal(pending) => match verify_client_final(&pending, response) {
                Ok(server_signature) => {
                    let ClientFirst { authcid, authzid, .. } = pending.first;
                    match authorize(MECHANISM, settings, authcid, authzid) {
                        Step::Success { authcid, authzid } => {
                            self.state = State::Acknowledge { authcid, authzid };
                            let server_final = format!("v={}", STANDARD.encode(server_signature));
                            Step::Challenge(server_final.into_bytes())
                        }
                        refused => refused,
                    }
                }
                Err(error) => Step::Failure(error),
            },
            State::Acknowledge { authcid, authzid } => {
                if response.is_empty() {
                    Step::Success { authcid, authzid }
                } else {
                    Step::Failure(malformed("data in the answer to the server-final-message"))
                }
            }
            State::Lookup(_) => out_of_order(MECHANISM, "response while looking up the user"),
            State::Done => out_of_order(MECHANISM, "response after the outcome"),
        }
    }

    pub(crate) fn resume(&mut self, credentials: Credentials, settings: &Settings) -> Step {
        let (State::Lookup(first), Credentials::Scram(found)) =
            (std::mem::replace(&mut self.state, State::Done), credentials)
        else {
            return out_of_order(MECHANISM, "credentials not asked for, or of the wrong kind");
        };
        let (credentials, known_user) = match found {
            Some(credentials) => (credentials, true),
            None => (invented_credentials(settings, &first.authcid), false),
        };
        let server_nonce = match settings.nonce_source.nonce() {
            Ok(nonce) if !nonce.is_empty() && nonce.bytes().all(is_printable) => nonce,
            Ok(nonce) => {
                return Step::Failure(AuthError::new(
                    AuthErrorKind::TemporaryFailure,
                    MECHANISM,
                    format!("nonce {nonce:?} is not printable ASCII without commas"),
                ));
            }
            Err(error) => {
                return Step::Failure(AuthError::new(
                    AuthErrorKind::TemporaryFailure,
                    MECHANISM,
                    error.to_string(),
                ));
            }
        };
        // RFC 5802 section 5.1, r: "the server augments that value with its own nonce in its
        // first response."
        let nonce = format!("{}{server_nonce}", first.nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&credentials.salt),
            credentials.iterations
        );
        let challenge = server_first.clone().into_bytes();
        self.state =
            State::ClientFinal(Pending { first, server_first, nonce, credentials, known_user });
        Step::Challenge(challenge)
    }
}

/// Credentials for a user who has none, so that the server-first-message looks like one for
/// a real user: a salt of the usual length that is the same each time the name is asked for
/// (a fresh random salt each time would give the game away), the usual iteration count, and
/// keys no proof can match.
fn invented_credentials(settings: &Settings, authcid: &str) -> ScramCredentials {
    let key = |label: &[u8]| hmac_sha256(&settings.secret, &[label, authcid.as_bytes()]);
    ScramCredentials {
        salt: key(b"SCRAM-SHA-256 salt\0")[..ScramCredentials::SALT_LEN].to_vec(),
        iterations: settings.scram_iterations.max(1),
        stored_key: key(b"SCRAM-SHA-256 stored key\0"),
        server_key: key(b"SCRAM-SHA-256 server key\0"),
    }
}

/// `printable = %x21-2B / %x2D-7E`: printable ASCII except `,`.
fn is_printable(b: u8) -> bool {
    matches!(b, 0x21..=0x2B | 0x2D..=0x7E)
}

/// Parses the client-first-message (RFC 5802 section 7):
///
/// ```text
/// client-first-message = gs2-header client-first-message-bare
/// gs2-header      = gs2-cbind-flag "," [ authzid ] ","
/// gs2-cbind-flag  = ("p=" cb-name) / "n" / "y"
/// client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
/// ```
fn parse_client_first(message: &[u8]) -> Result<ClientFirst, AuthError> {
    let message = utf8(MECHANISM, "client-first-message", message)
        .map_err(|error| error.with_scram(ScramError::InvalidEncoding))?;
    let (flag, rest) = message
        .split_once(',')
        .ok_or_else(|| malformed("no GS2 header in client-first-message"))?;
    match flag {
        // The client does not support channel binding.
        "n" => {}
        // The client supports channel binding but thinks we do not. RFC 5802 section 6: "If
        // the flag is set to "y" and the server supports channel binding, the server MUST fail
        // authentication." We do not (we never advertise SCRAM-SHA-256-PLUS), so the client is
        // right and there is no downgrade to detect.
        "y" => {}
        // "If the channel binding flag was "p" and the server does not support the indicated
        // channel binding type, then the server MUST fail authentication." We support none.
        _ if flag.starts_with("p=") => {
            return Err(error(
                AuthErrorKind::InvalidCredentials,
                ScramError::ChannelBindingNotSupported,
                format!("client requires channel binding {:?}", &flag[2..]),
            ));
        }
        // RFC 5802 section 5: "the client's first message will always start with "n", "y", or
        // "p"; otherwise, the message is invalid and authentication MUST fail."
        _ => return Err(malformed(format!("channel binding flag {flag:?} is not n, y or p="))),
    }
    let (authzid, bare) =
        rest.split_once(',').ok_or_else(|| malformed("GS2 header does not end with a comma"))?;
    let gs2_header = &message[..message.len() - bare.len()];
    let authzid = match authzid {
        "" => None,
        _ => {
            let name = authzid
                .strip_prefix("a=")
                .ok_or_else(|| malformed(format!("{authzid:?} in the GS2 header is not a=")))?;
            Some(prepare_name("authzid", &unescape_saslname(name)?)?)
        }
    };

    let mut attributes = bare.split(',');
    let username = attributes.next().unwrap_or_default();
    if username.starts_with("m=") {
        // RFC 5802 section 5.1, m: "its presence in a client or a server message MUST cause
        // authentication failure when the attribute is parsed by the other end."
        return Err(error(
            AuthErrorKind::Malformed,
            ScramError::ExtensionsNotSupported,
            "mandatory extension (m=) requested",
        ));
    }
    let username = username
        .strip_prefix("n=")
        .ok_or_else(|| malformed("no n= attribute for the user name"))?;
    let authcid = prepare_name("user name", &unescape_saslname(username)?)?;
    let nonce = attributes
        .next()
        .and_then(|nonce| nonce.strip_prefix("r="))
        .ok_or_else(|| malformed("no r= attribute after the user name"))?;
    if nonce.is_empty() || !nonce.bytes().all(is_printable) {
        return Err(malformed("client nonce is not printable ASCII"));
    }
    check_extensions(attributes)?;
    Ok(ClientFirst {
        gs2_header: gs2_header.to_owned(),
        bare: bare.to_owned(),
        nonce: nonce.to_owned(),
        authcid,
        authzid,
    })
}

/// Undoes the escaping of a `saslname` (RFC 5802 section 5.1, n: "The characters ',' or '='
/// in usernames are sent as '=2C' and '=3D' respectively.  If the server receives a username
/// that contains '=' not followed by either '2C' or '3D', then the server MUST fail the
/// authentication.").
fn unescape_saslname(escaped: &str) -> Result<String, AuthError> {
    let invalid =
        |detail: &str| error(AuthErrorKind::Malformed, ScramError::InvalidUsernameEncoding, detail);
    if escaped.is_empty() {
        return Err(invalid("empty name"));
    }
    if escaped.contains('\0') {
        return Err(invalid("NUL in a name"));
    }
    let mut name = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(at) = rest.find('=') {
        name.push_str(&rest[..at]);
        match rest.get(at + 1..at + 3) {
            Some("2C") => name.push(','),
            Some("3D") => name.push('='),
            _ => return Err(invalid("'=' in a name not followed by 2C or 3D")),
        }
        rest = &rest[at + 3..];
    }
    name.push_str(rest);
    Ok(name)
}

/// RFC 5802 section 5.1, n: "Upon receipt of the username by the server, the server MUST
/// either prepare it using the "SASLprep" profile ... If the preparation of the username
/// fails or results in an empty string, the server SHOULD abort the authentication
/// exchange."
fn prepare_name(what: &str, name: &str) -> Result<String, AuthError> {
    if name.len() > MAX_IDENTITY_LEN {
        return Err(error(
            AuthErrorKind::TooLong,
            ScramError::InvalidUsernameEncoding,
            format!("{what} of {} octets, more than {MAX_IDENTITY_LEN}", name.len()),
        ));
    }
    let prepared = saslprep(name).map(|name| name.into_owned()).map_err(|reason| {
        error(
            AuthErrorKind::InvalidCredentials,
            ScramError::InvalidUsernameEncoding,
            format!("{what} {name:?} refused by SASLprep: {reason}"),
        )
    })?;
    // NFKC can lengthen a name; the bound holds for what the caller looks up too.
    if prepared.len() > MAX_IDENTITY_LEN {
        return Err(error(
            AuthErrorKind::TooLong,
            ScramError::InvalidUsernameEncoding,
            format!(
                "{what} of {} octets after SASLprep, more than {MAX_IDENTITY_LEN}",
                prepared.len()
            ),
        ));
    }
    Ok(prepared)
}

/// Optional extensions (`attr-val = ALPHA "=" value`) are ignored, as RFC 5802 section 7 says
/// ("unrecognized attributes not defined in this document MUST be ignored"), but must be
/// well-formed; `m` is a mandatory extension, which we do not know.
fn check_extensions<'a>(attributes: impl Iterator<Item = &'a str>) -> Result<(), AuthError> {
    for attribute in attributes {
        let bytes = attribute.as_bytes();
        if bytes.len() < 3
            || !bytes[0].is_ascii_alphabetic()
            || bytes[1] != b'='
            || bytes.contains(&0)
        {
            return Err(malformed(format!("malformed attribute {attribute:?}")));
        }
        if bytes[0] == b'm' {
            return Err(error(
                AuthErrorKind::Malformed,
                ScramError::ExtensionsNotSupported,
                "mandatory extension (m=) requested",
            ));
        }
    }
    Ok(())
}

/// Checks the client-final-message and returns the ServerSignature for the server-final one.
///
/// ```text
/// client-final-message-without-proof = channel-binding "," nonce ["," extensions]
/// client-final-message = client-final-message-without-proof "," proof
/// ```
///
/// RFC 5802 section 3: "The server authenticates the client by computing the
/// ClientSignature, exclusive-ORing that with the ClientProof to recover the ClientKey and
/// verifying the correctness of the ClientKey by applying the hash function and comparing the
/// result to the StoredKey."
fn verify_client_final(pending: &Pending, message: &[u8]) -> Result<[u8; 32], AuthError> {
    let message = utf8(MECHANISM, "client-final-message", message)
        .map_err(|error| error.with_scram(ScramError::InvalidEncoding))?;
    let (without_proof, proof) =
        message.rsplit_once(",p=").ok_or_else(|| malformed("no p= attribute at the end"))?;
    let mut attributes = without_proof.split(',');
    let channel_binding = attributes
        .next()
        .and_then(|attribute| attribute.strip_prefix("c="))
        .ok_or_else(|| malformed("client-final-message does not start with c="))?;
    let nonce = attributes
        .next()
        .and_then(|attribute| attribute.strip_prefix("r="))
        .ok_or_else(|| malformed("no r= attribute after c="))?;
    check_extensions(attributes)?;

    // RFC 5802 section 6: "The server MUST always validate the client's "c=" field." Without
    // channel binding, cbind-input is the GS2 header alone.
    let channel_binding =
        STANDARD.decode(channel_binding).map_err(|_| malformed("c= is not base64"))?;
    if channel_binding != pending.first.gs2_header.as_bytes() {
        return Err(error(
            AuthErrorKind::InvalidCredentials,
            ScramError::ChannelBindingsDontMatch,
            "c= does not repeat the GS2 header of the client-first-message",
        ));
    }
    // RFC 5802 section 5.1, r: "The server MUST verify that the nonce sent by the client in
    // the second message is the same as the one sent by the server in its first message."
    if nonce != pending.nonce {
        return Err(error(
            AuthErrorKind::InvalidCredentials,
            ScramError::OtherError,
            "nonce differs from the one in the server-first-message",
        ));
    }
    let proof = STANDARD.decode(proof).map_err(|_| malformed("p= is not base64"))?;
    let proof = <[u8; 32]>::try_from(proof).map_err(|proof| {
        error(
            AuthErrorKind::InvalidCredentials,
            ScramError::InvalidProof,
            format!("client proof of {} octets instead of 32", proof.len()),
        )
    })?;

    let credentials = &pending.credentials;
    let auth_message = [
        pending.first.bare.as_bytes(),
        b",",
        pending.server_first.as_bytes(),
        b",",
        without_proof.as_bytes(),
    ];
    let client_signature = hmac_sha256(&credentials.stored_key, &auth_message);
    let mut client_key = proof;
    for (key, signature) in client_key.iter_mut().zip(client_signature) {
        *key ^= signature;
    }
    // The proof is computed and compared for an unknown user too, so that timing does not
    // tell the two apart.
    let proof_matches = sha256(&client_key).ct_eq(&credentials.stored_key);
    if !bool::from(proof_matches & Choice::from(u8::from(pending.known_user))) {
        let (scram, detail) = if pending.known_user {
            (
                ScramError::InvalidProof,
                format!("client proof for {:?} does not match", pending.first.authcid),
            )
        } else {
            (ScramError::UnknownUser, format!("unknown user {:?}", pending.first.authcid))
        };
        return Err(error(AuthErrorKind::InvalidCredentials, scram, detail));
    }
    Ok(hmac_sha256(&credentials.server_key, &auth_message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(message: &str) -> Result<ClientFirst, (AuthErrorKind, Option<ScramError>)> {
        parse_client_first(message.as_bytes()).map_err(|error| (error.kind(), error.scram_error()))
    }

    #[test]
    fn parses_client_first_messages() {
        let parsed = first("n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        assert_eq!(parsed.gs2_header, "n,,");
        assert_eq!(parsed.bare, "n=user,r=rOprNGfwEbeRWgbNEkqO");
        assert_eq!(parsed.nonce, "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(parsed.authcid, "user");
        assert_eq!(parsed.authzid, None);

        let parsed = first("y,a=admin=2Cx,n=us=3Der=2C,r=abc,x=ignored,y=also=").unwrap();
        assert_eq!(parsed.gs2_header, "y,a=admin=2Cx,");
        assert_eq!(parsed.authcid, "us=er,");
        assert_eq!(parsed.authzid.as_deref(), Some("admin,x"));
        assert_eq!(parsed.bare, "n=us=3Der=2C,r=abc,x=ignored,y=also=");

        // SASLprep of the user name: the lookup uses the prepared form.
        assert_eq!(first("n,,n=I\u{00AD}X,r=abc").unwrap().authcid, "IX");
    }

    /// A bound the `sasl` fuzz target checks: SASLprep lengthened a 255-octet name (85
    /// U+FDFA) to 2805 octets, past the bound on what the caller looks up.
    #[test]
    fn names_are_bounded_after_saslprep() {
        let expanding = "\u{FDFA}".repeat(85);
        for message in [format!("n,,n={expanding},r=abc"), format!("n,a={expanding},n=u,r=abc")] {
            assert_eq!(
                first(&message).err(),
                Some((AuthErrorKind::TooLong, Some(ScramError::InvalidUsernameEncoding)))
            );
        }
    }

    #[test]
    fn refuses_malformed_client_first_messages() {
        use AuthErrorKind::*;
        use ScramError::*;
        for (message, expected) in [
            ("", (Malformed, Some(InvalidEncoding))),
            ("n", (Malformed, Some(InvalidEncoding))),
            ("n,", (Malformed, Some(InvalidEncoding))),
            ("x,,n=user,r=abc", (Malformed, Some(InvalidEncoding))),
            ("N,,n=user,r=abc", (Malformed, Some(InvalidEncoding))),
            ("p=tls-unique,,n=user,r=abc", (InvalidCredentials, Some(ChannelBindingNotSupported))),
            (
                "p=tls-exporter,,n=user,r=abc",
                (InvalidCredentials, Some(ChannelBindingNotSupported)),
            ),
            ("n,b=admin,n=user,r=abc", (Malformed, Some(InvalidEncoding))),
            ("n,,m=ext,n=user,r=abc", (Malformed, Some(ExtensionsNotSupported))),
            ("n,,n=user,r=abc,m=ext", (Malformed, Some(ExtensionsNotSupported))),
            ("n,,r=abc,n=user", (Malformed, Some(InvalidEncoding))),
            ("n,,n=user", (Malformed, Some(InvalidEncoding))),
            ("n,,n=user,r=", (Malformed, Some(InvalidEncoding))),
            ("n,,n=user,r=a b", (Malformed, Some(InvalidEncoding))),
            ("n,,n=user,r=abc,", (Malformed, Some(InvalidEncoding))),
            ("n,,n=user,r=abc,x", (Malformed, Some(InvalidEncoding))),
            ("n,,n=user,r=abc,1=x", (Malformed, Some(InvalidEncoding))),
            ("n,,n=,r=abc", (Malformed, Some(InvalidUsernameEncoding))),
            ("n,,n=us=er,r=abc", (Malformed, Some(InvalidUsernameEncoding))),
            ("n,,n=user=2,r=abc", (Malformed, Some(InvalidUsernameEncoding))),
            ("n,,n=us\0er,r=abc", (Malformed, Some(InvalidUsernameEncoding))),
            ("n,a=x=41,n=user,r=abc", (Malformed, Some(InvalidUsernameEncoding))),
            ("n,,n=us\u{7}er,r=abc", (InvalidCredentials, Some(InvalidUsernameEncoding))),
            ("n,,n=\u{00AD},r=abc", (InvalidCredentials, Some(InvalidUsernameEncoding))),
        ] {
            assert_eq!(first(message).err(), Some(expected), "{message:?}");
        }
        assert_eq!(
            parse_client_first(b"n,,n=\xff,r=abc").unwrap_err().scram_error(),
            Some(InvalidEncoding)
        );
        let long = format!("n,,n={},r=abc", "u".repeat(MAX_IDENTITY_LEN + 1));
        assert_eq!(first(&long).err(), Some((TooLong, Some(InvalidUsernameEncoding))));
    }

    /// The RFC 7677 example's client-final-message, checked against its credentials: accepted
    /// for a known user, refused when the same credentials stand in for an unknown one (so a
    /// proof that happened to match invented credentials would still fail).
    #[test]
    fn proof_check_needs_a_known_user() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let pending = |known_user| Pending {
            first: parse_client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap(),
            server_first: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                           s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
                .to_owned(),
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".to_owned(),
            credentials: ScramCredentials::derive("pencil", &salt, 4096).unwrap(),
            known_user,
        };
        let client_final = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let signature = verify_client_final(&pending(true), client_final).unwrap();
        assert_eq!(STANDARD.encode(signature), "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        let error = verify_client_final(&pending(false), client_final).unwrap_err();
        assert_eq!(error.scram_error(), Some(ScramError::UnknownUser));
    }

    #[test]
    fn invented_credentials_are_stable_per_user_and_look_real() {
        let settings = Settings::new("mx.example.org", [1; 32]);
        let a = invented_credentials(&settings, "nobody");
        let b = invented_credentials(&settings, "nobody");
        let c = invented_credentials(&settings, "someone");
        assert_eq!(a.salt, b.salt);
        assert_ne!(a.salt, c.salt);
        assert_eq!(a.salt.len(), ScramCredentials::SALT_LEN);
        assert_eq!(a.iterations, ScramCredentials::DEFAULT_ITERATIONS);
        let other_secret = Settings::new("mx.example.org", [2; 32]);
        assert_ne!(invented_credentials(&other_secret, "nobody").salt, a.salt);
    }
}

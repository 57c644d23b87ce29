//! The exchange: one AUTH command from start to outcome, as a state machine that the SMTP
//! layer feeds with decoded client lines and looked-up credentials.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::cram_md5::CramMd5;
use crate::login::Login;
use crate::plain::Plain;
use crate::random::{RandomError, random_bytes};
use crate::scram::Scram;
use crate::{AuthError, AuthErrorKind, MAX_LINE_LEN, Mechanism, Password, ScramCredentials};

/// The longest decoded response: what the longest line [`MAX_LINE_LEN`] can carry.
const MAX_RESPONSE_LEN: usize = (MAX_LINE_LEN - 2) / 4 * 3;

/// Whether the user `authcid` may act as `authzid` (a different identity): the policy for
/// proxy authorization, see [`Settings::authorize`].
pub type AuthorizeFn = dyn Fn(&str, &str) -> bool + Send + Sync;

/// Where the server's nonces come from: SCRAM's server nonce and CRAM-MD5's challenge.
/// [`OsRandom`] in the server; tests put in fixed values.
pub trait NonceSource: Send + Sync {
    /// A fresh, unpredictable nonce of printable ASCII. SCRAM needs it without `,` (RFC 5802
    /// section 7, `printable`); CRAM-MD5 puts it in a message id, so there it must be made of
    /// letters, digits and `+/=.-_` only. An exchange that gets an unusable nonce fails with
    /// [`AuthErrorKind::TemporaryFailure`].
    fn nonce(&self) -> Result<String, RandomError>;
}

/// Nonces from the operating system's random number generator: 18 octets (144 bits) in
/// base64, 24 characters that suit both SCRAM and CRAM-MD5.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandom;

impl NonceSource for OsRandom {
    fn nonce(&self) -> Result<String, RandomError> {
        let bytes: [u8; 18] = random_bytes()?;
        Ok(STANDARD.encode(bytes))
    }
}

/// What every exchange of a server shares. Build it once, keep it in an [`Arc`].
#[derive(Clone)]
pub struct Settings {
    /// Our host name, in the CRAM-MD5 challenge (RFC 2195 section 2: "the fully-qualified
    /// primary host name of the server").
    pub hostname: String,
    /// The key from which the SCRAM salt of an unknown user is derived, so that asking twice
    /// for the same unknown user gives the same salt, as for a real one, and the server's
    /// first message does not tell which users exist. Keep it secret, and the same across
    /// restarts and across the servers of one domain: if it changes, so do the invented
    /// salts, and a client that notices can tell an unknown user from a real one.
    pub secret: [u8; 32],
    /// The iteration count sent for unknown users. Set it to the count the real users'
    /// [`ScramCredentials`] have, [`ScramCredentials::DEFAULT_ITERATIONS`] unless changed.
    pub scram_iterations: u32,
    /// Offer and accept `CRAM-MD5`. Off by default: the server must hold each user's password
    /// itself (or the HMAC-MD5 contexts of RFC 2195 section 2, which are as good as the
    /// password for logging in), so a leaked user database gives away every account at once,
    /// where argon2 hashes and SCRAM keys still have to be attacked one guess at a time. It
    /// also rests on MD5 and does not authenticate the server. Enable it only for old clients
    /// that have nothing else, and only with plaintext-equivalent secrets kept apart.
    pub cram_md5: bool,
    /// The policy for authorization identities that differ from the authenticated user
    /// (`PLAIN`'s authzid, SCRAM's `a=`): called with (authcid, authzid) after the
    /// credentials are verified. `None` (the default) refuses every such request; an empty
    /// authzid, or one equal to the authcid after SASLprep, needs no permission.
    pub authorize: Option<Arc<AuthorizeFn>>,
    /// The source of nonces; [`OsRandom`] by default.
    pub nonce_source: Arc<dyn NonceSource>,
}

impl Settings {
    /// Settings with the defaults: SCRAM's [`ScramCredentials::DEFAULT_ITERATIONS`], no
    /// CRAM-MD5, no proxy authorization, nonces from [`OsRandom`].
    pub fn new(hostname: impl Into<String>, secret: [u8; 32]) -> Settings {
        Settings {
            hostname: hostname.into(),
            secret,
            scram_iterations: ScramCredentials::DEFAULT_ITERATIONS,
            cram_md5: false,
            authorize: None,
            nonce_source: Arc::new(OsRandom),
        }
    }

    /// The mechanisms to advertise in the EHLO `AUTH` line, strongest first. Without TLS,
    /// `PLAIN` and `LOGIN` are left out ([`Mechanism::sends_plaintext_password`]).
    pub fn mechanisms(&self, tls_active: bool) -> Vec<Mechanism> {
        [Mechanism::ScramSha256, Mechanism::Plain, Mechanism::Login, Mechanism::CramMd5]
            .into_iter()
            .filter(|&mechanism| self.permits(mechanism, tls_active))
            .collect()
    }

    /// Whether an AUTH command may use `mechanism`: it is enabled, and it does not send the
    /// password in the clear unless TLS is active. A mechanism that is not permitted gets
    /// `504 5.5.4`, like an unknown one.
    pub fn permits(&self, mechanism: Mechanism, tls_active: bool) -> bool {
        (tls_active || !mechanism.sends_plaintext_password())
            && (mechanism != Mechanism::CramMd5 || self.cram_md5)
    }
}

/// Leaves out the secret and the functions.
impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("hostname", &self.hostname)
            .field("scram_iterations", &self.scram_iterations)
            .field("cram_md5", &self.cram_md5)
            .field("authorize", &self.authorize.is_some())
            .finish_non_exhaustive()
    }
}

/// What the SMTP layer does next.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send these octets with [`encode_challenge`](crate::encode_challenge) in a `334` reply
    /// and pass the client's answer to [`ServerExchange::step`].
    Challenge(Vec<u8>),
    /// Look up the user and pass what was found to [`ServerExchange::resume`].
    NeedCredentials(CredentialRequest),
    /// Authenticated: reply `235 2.7.0`. Both identities are SASLprep-ed.
    Success {
        /// The user whose credentials were checked.
        authcid: String,
        /// The identity the session now acts as: the same as `authcid` unless the client
        /// asked for another one and [`Settings::authorize`] allowed it.
        authzid: String,
    },
    /// The exchange is over and failed; see [`AuthErrorKind`] for the reply.
    Failure(AuthError),
}

/// What the exchange needs to know about a user, with the user's name (SASLprep-ed, at most
/// [`MAX_IDENTITY_LEN`](crate::MAX_IDENTITY_LEN) octets).
#[derive(Debug, Clone)]
pub enum CredentialRequest {
    /// `PLAIN` or `LOGIN`: check this password, for example with
    /// [`verify_password`](crate::verify_password), and answer
    /// [`Credentials::PasswordVerified`].
    Password {
        /// The user.
        authcid: String,
        /// The password as the client sent it; [`PasswordHash::verify`](crate::PasswordHash::verify)
        /// SASLprep-s it.
        password: Password,
    },
    /// SCRAM: answer [`Credentials::Scram`] with the user's stored credentials.
    Scram {
        /// The user.
        authcid: String,
    },
    /// CRAM-MD5: answer [`Credentials::CramMd5Secret`] with the user's shared secret.
    CramMd5 {
        /// The user.
        authcid: String,
    },
}

impl CredentialRequest {
    /// The user to look up.
    pub fn authcid(&self) -> &str {
        match self {
            CredentialRequest::Password { authcid, .. }
            | CredentialRequest::Scram { authcid }
            | CredentialRequest::CramMd5 { authcid } => authcid,
        }
    }
}

/// The answer to a [`CredentialRequest`], of the matching kind.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// Whether the password was right. False also for an unknown user: the client is not
    /// told the difference.
    PasswordVerified(bool),
    /// The user's SCRAM credentials; `None` for an unknown user, or one without SCRAM
    /// credentials. The exchange then goes on with invented credentials and fails at the
    /// proof, so that the client cannot tell.
    Scram(Option<ScramCredentials>),
    /// The user's CRAM-MD5 shared secret (in practice, the password); `None` for an unknown
    /// user.
    CramMd5Secret(Option<Password>),
}

/// One authentication exchange on the server side, from the AUTH command to success or
/// failure. See the crate documentation for how to drive it.
#[derive(Debug)]
pub struct ServerExchange {
    mechanism: Mechanism,
    settings: Arc<Settings>,
    machine: Machine,
}

#[derive(Debug)]
enum Machine {
    Plain(Plain),
    Login(Login),
    /// Boxed: SCRAM keeps its messages and the user's keys, several times what the others
    /// keep.
    Scram(Box<Scram>),
    CramMd5(CramMd5),
    /// Refused at the start, before the mechanism's state machine began.
    Refused,
}

impl ServerExchange {
    /// Starts an exchange for the AUTH command. `initial_response` is its second argument,
    /// decoded with [`decode_initial_response`](crate::decode_initial_response): `None` when
    /// there was none, an empty slice for `=`.
    ///
    /// The returned step is the first thing to do: the first challenge, a credential lookup
    /// when the initial response already says enough (`AUTH PLAIN <response>`), or a failure.
    /// A client-first mechanism started without an initial response begins with an empty
    /// challenge (RFC 4422 section 5, 2a: "If a SASL mechanism is defined as client-first and
    /// the client does not send an initial response in the authentication request, then the
    /// first server challenge MUST be empty").
    pub fn start(
        mechanism: Mechanism,
        initial_response: Option<&[u8]>,
        settings: Arc<Settings>,
    ) -> (ServerExchange, Step) {
        let refuse = |kind, detail: &str| {
            let exchange =
                ServerExchange { mechanism, settings: settings.clone(), machine: Machine::Refused };
            (exchange, Step::Failure(AuthError::new(kind, mechanism, detail)))
        };
        if mechanism == Mechanism::CramMd5 && !settings.cram_md5 {
            return refuse(AuthErrorKind::MechanismNotAvailable, "not enabled");
        }
        if initial_response.is_some() && !mechanism.accepts_initial_response() {
            return refuse(
                AuthErrorKind::InitialResponseNotAllowed,
                "initial response given, but the server speaks first",
            );
        }
        let machine = match mechanism {
            Mechanism::Plain => Machine::Plain(Plain::new()),
            Mechanism::Login => Machine::Login(Login::new()),
            Mechanism::ScramSha256 => Machine::Scram(Box::new(Scram::new())),
            Mechanism::CramMd5 => Machine::CramMd5(CramMd5::new()),
        };
        let mut exchange = ServerExchange { mechanism, settings, machine };
        let step = match initial_response {
            Some(response) => exchange.step(response),
            None => match &mut exchange.machine {
                Machine::Plain(_) | Machine::Scram(_) => Step::Challenge(Vec::new()),
                Machine::Login(login) => login.first_challenge(),
                Machine::CramMd5(cram) => cram.first_challenge(&exchange.settings),
                Machine::Refused => out_of_order(mechanism, "refused exchange started"),
            },
        };
        (exchange, step)
    }

    /// Feeds the client's decoded answer to the last [`Step::Challenge`].
    ///
    /// A response longer than [`MAX_LINE_LEN`] can carry fails with
    /// [`AuthErrorKind::TooLong`]. Calling this when no challenge is outstanding fails the
    /// exchange with [`AuthErrorKind::TemporaryFailure`]: that is a bug in the caller.
    pub fn step(&mut self, response: &[u8]) -> Step {
        if response.len() > MAX_RESPONSE_LEN {
            self.machine = Machine::Refused;
            return Step::Failure(AuthError::new(
                AuthErrorKind::TooLong,
                self.mechanism,
                format!("response of {} octets", response.len()),
            ));
        }
        match &mut self.machine {
            Machine::Plain(plain) => plain.step(response),
            Machine::Login(login) => login.step(response),
            Machine::Scram(scram) => scram.step(response, &self.settings),
            Machine::CramMd5(cram) => cram.step(response),
            Machine::Refused => out_of_order(self.mechanism, "response after the outcome"),
        }
    }

    /// Feeds the answer to the last [`Step::NeedCredentials`]. An answer of the wrong kind,
    /// or one nobody asked for, fails the exchange with [`AuthErrorKind::TemporaryFailure`]:
    /// that is a bug in the caller.
    pub fn resume(&mut self, credentials: Credentials) -> Step {
        match &mut self.machine {
            Machine::Plain(plain) => plain.resume(credentials, &self.settings),
            Machine::Login(login) => login.resume(credentials, &self.settings),
            Machine::Scram(scram) => scram.resume(credentials, &self.settings),
            Machine::CramMd5(cram) => cram.resume(credentials, &self.settings),
            Machine::Refused => out_of_order(self.mechanism, "credentials after the outcome"),
        }
    }

    /// The mechanism of this exchange.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }
}

/// The failure for an exchange driven out of order, which is a bug in the caller: a response
/// when credentials were asked for, credentials of the wrong kind, anything after the outcome.
pub(crate) fn out_of_order(mechanism: Mechanism, what: &str) -> Step {
    Step::Failure(AuthError::new(
        AuthErrorKind::TemporaryFailure,
        mechanism,
        format!("exchange driven out of order: {what}"),
    ))
}

/// The end of an exchange whose credentials were verified: the authorization identity the
/// client asked for, if any, is checked, then the client is in.
///
/// RFC 4616 section 2: the server verifies "that the authentication credentials permit the
/// client to act as the (presented or derived) authorization identity"; without one, "the
/// server derives an authorization identity from the prepared representation of the provided
/// authentication identity string". Both are compared after SASLprep.
pub(crate) fn authorize(
    mechanism: Mechanism,
    settings: &Settings,
    authcid: String,
    authzid: Option<String>,
) -> Step {
    match authzid {
        Some(authzid) if authzid != authcid => {
            let allowed =
                settings.authorize.as_ref().is_some_and(|allow| allow(&authcid, &authzid));
            if allowed {
                Step::Success { authcid, authzid }
            } else {
                Step::Failure(AuthError::new(
                    AuthErrorKind::InvalidCredentials,
                    mechanism,
                    format!("{authcid:?} may not act as {authzid:?}"),
                ))
            }
        }
        _ => Step::Success { authzid: authcid.clone(), authcid },
    }
}

/// The password of `PLAIN` or `LOGIN` after the caller checked it.
pub(crate) fn password_verified(
    mechanism: Mechanism,
    settings: &Settings,
    verified: bool,
    authcid: String,
    authzid: Option<String>,
) -> Step {
    if verified {
        authorize(mechanism, settings, authcid, authzid)
    } else {
        Step::Failure(AuthError::new(
            AuthErrorKind::InvalidCredentials,
            mechanism,
            format!("wrong password or unknown user {authcid:?}"),
        ))
    }
}

/// Text of a mechanism message, which must be UTF-8.
pub(crate) fn utf8<'a>(
    mechanism: Mechanism,
    what: &str,
    octets: &'a [u8],
) -> Result<&'a str, AuthError> {
    std::str::from_utf8(octets).map_err(|_| {
        AuthError::new(AuthErrorKind::Malformed, mechanism, format!("{what} is not UTF-8"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::new("mx.example.org", [7; 32])
    }

    #[test]
    fn plaintext_mechanisms_only_with_tls() {
        let settings = settings();
        assert_eq!(settings.mechanisms(false), [Mechanism::ScramSha256]);
        assert_eq!(
            settings.mechanisms(true),
            [Mechanism::ScramSha256, Mechanism::Plain, Mechanism::Login]
        );
        let settings = Settings { cram_md5: true, ..self::settings() };
        assert_eq!(settings.mechanisms(false), [Mechanism::ScramSha256, Mechanism::CramMd5]);
        assert!(settings.permits(Mechanism::CramMd5, true));
        assert!(!settings.permits(Mechanism::Plain, false));
    }

    #[test]
    fn os_random_nonces_are_fresh_base64() {
        let a = OsRandom.nonce().unwrap();
        let b = OsRandom.nonce().unwrap();
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'), "{a}");
    }

    #[test]
    fn settings_debug_leaves_out_the_secret() {
        let shown = format!("{:?}", settings());
        assert!(!shown.contains("secret") && !shown.contains("7, 7"), "{shown}");
    }

    #[test]
    fn authorization_identity_policy() {
        let outcome = |settings: &Settings, authzid: Option<&str>| match authorize(
            Mechanism::Plain,
            settings,
            "alice".into(),
            authzid.map(Into::into),
        ) {
            Step::Success { authcid, authzid } => Ok((authcid, authzid)),
            Step::Failure(error) => Err(error.kind()),
            other => panic!("unexpected {other:?}"),
        };
        let strict = settings();
        assert_eq!(outcome(&strict, None), Ok(("alice".into(), "alice".into())));
        assert_eq!(outcome(&strict, Some("alice")), Ok(("alice".into(), "alice".into())));
        assert_eq!(outcome(&strict, Some("bob")), Err(AuthErrorKind::InvalidCredentials));
        let proxy = Settings {
            authorize: Some(Arc::new(|authcid: &str, authzid: &str| {
                authcid == "alice" && authzid.ends_with("@lists.example.org")
            })),
            ..settings()
        };
        assert_eq!(
            outcome(&proxy, Some("news@lists.example.org")),
            Ok(("alice".into(), "news@lists.example.org".into()))
        );
        assert_eq!(outcome(&proxy, Some("bob")), Err(AuthErrorKind::InvalidCredentials));
    }
}

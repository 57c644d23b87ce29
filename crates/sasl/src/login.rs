//! `LOGIN`: never standardised (an expired draft, draft-murchison-sasl-login), but offered by
//! most servers and the only mechanism of some clients. The server prompts "Username:", then
//! "Password:"; the client answers each with the bare value. There is no authorization
//! identity.

use crate::exchange::{out_of_order, password_verified, utf8};
use crate::saslprep::prepare_identity;
use crate::{
    AuthError, AuthErrorKind, CredentialRequest, Credentials, MAX_PASSWORD_LEN, Mechanism,
    Password, Settings, Step,
};

const MECHANISM: Mechanism = Mechanism::Login;

/// The prompts every client expects, byte for byte (base64 `VXNlcm5hbWU6` and `UGFzc3dvcmQ6`;
/// some clients match on the encoded form).
const USERNAME_PROMPT: &[u8] = b"Username:";
const PASSWORD_PROMPT: &[u8] = b"Password:";

#[derive(Debug)]
pub(crate) struct Login {
    state: State,
}

#[derive(Debug)]
enum State {
    Username,
    Password { authcid: String },
    Verifying { authcid: String },
    Done,
}

impl Login {
    pub(crate) fn new() -> Login {
        Login { state: State::Username }
    }

    /// The first prompt, when the AUTH command carried no user name.
    pub(crate) fn first_challenge(&self) -> Step {
        Step::Challenge(USERNAME_PROMPT.to_vec())
    }

    /// The user name (from the prompt or the AUTH command), then the password.
    pub(crate) fn step(&mut self, response: &[u8]) -> Step {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Username => {
                let authcid = utf8(MECHANISM, "user name", response)
                    .and_then(|name| prepare_identity(MECHANISM, "user name", name));
                match authcid {
                    Ok(authcid) => {
                        self.state = State::Password { authcid };
                        Step::Challenge(PASSWORD_PROMPT.to_vec())
                    }
                    Err(error) => Step::Failure(error),
                }
            }
            State::Password { authcid } => match password(response) {
                Ok(password) => {
                    self.state = State::Verifying { authcid: authcid.clone() };
                    Step::NeedCredentials(CredentialRequest::Password { authcid, password })
                }
                Err(error) => Step::Failure(error),
            },
            State::Verifying { .. } => out_of_order(MECHANISM, "response while verifying"),
            State::Done => out_of_order(MECHANISM, "response after the outcome"),
        }
    }

    pub(crate) fn resume(&mut self, credentials: Credentials, settings: &Settings) -> Step {
        match (std::mem::replace(&mut self.state, State::Done), credentials) {
            (State::Verifying { authcid }, Credentials::PasswordVerified(verified)) => {
                password_verified(MECHANISM, settings, verified, authcid, None)
            }
            _ => out_of_order(MECHANISM, "credentials not asked for, or of the wrong kind"),
        }
    }
}

fn password(response: &[u8]) -> Result<Password, AuthError> {
    if response.is_empty() {
        return Err(AuthError::new(AuthErrorKind::Malformed, MECHANISM, "empty password"));
    }
    if response.len() > MAX_PASSWORD_LEN {
        return Err(AuthError::new(
            AuthErrorKind::TooLong,
            MECHANISM,
            format!("password of {} octets, more than {MAX_PASSWORD_LEN}", response.len()),
        ));
    }
    utf8(MECHANISM, "password", response).map(Password::new)
}

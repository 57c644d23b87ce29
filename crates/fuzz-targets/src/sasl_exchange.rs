//! `sasl`: the SASL line decoders and [`ServerExchange`] for each mechanism, fed arbitrary
//! client lines, with the user database answering both ways.
//!
//! Input: one octet of settings, one octet of format, then LF-separated client lines (the
//! first one is the AUTH command's initial response when the settings say so). With format
//! bit 0 the lines are base64 as on the wire, `*` cancelling; without it they are the decoded
//! responses themselves, which mutate better.
//!
//! Settings bits: 0-1 the mechanism (PLAIN, LOGIN, SCRAM-SHA-256, CRAM-MD5), 2 an initial
//! response, 3 the database knows alice (password "secret"), 4 CRAM-MD5 enabled, 5 alice may
//! act as postmaster, 6 the SCRAM client-final-message is computed here from the next line as
//! the password (so that right and wrong passwords both reach the proof check), 7 the database
//! answers with credentials of the wrong kind.
//!
//! Oracles: the two base64 decoders of the project agree; no panic; `Success` only for alice,
//! only when the database knew her, and only with her password: the PLAIN or LOGIN password
//! the database checked, the SCRAM proof or the CRAM-MD5 digest that "secret" gives; the
//! authorization identity is alice's own unless the policy allowed it; the SCRAM server
//! signature is the one the password gives; and with the right password a computed SCRAM
//! proof is accepted.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use sasl::{
    AuthErrorKind, CredentialRequest, Credentials, Mechanism, NonceSource, Password, RandomError,
    Response, ScramCredentials, ScramError, ServerExchange, Settings, Step,
    decode_initial_response, decode_response, encode_challenge,
};
use sha2::{Digest, Sha256};

use crate::util::Bytes;

/// The one account.
pub(crate) const USER: &str = "alice";
pub(crate) const PASSWORD: &str = "secret";
/// The identity alice may act as when proxy authorization is on.
pub(crate) const PROXY: &str = "postmaster";
const SALT: &[u8] = b"fuzz salt";
/// Low, so that an execution stays fast; the count changes nothing in the logic.
const ITERATIONS: u32 = 1;
const SERVER_NONCE: &str = "3rfcNHYJY1ZVvWVs7j";

struct FixedNonce;

impl NonceSource for FixedNonce {
    fn nonce(&self) -> Result<String, RandomError> {
        Ok(SERVER_NONCE.to_owned())
    }
}

pub(crate) fn settings(cram_md5: bool, proxy: bool) -> Arc<Settings> {
    let mut settings = Settings::new("mx.fuzz.example", [7; 32]);
    settings.cram_md5 = cram_md5;
    settings.scram_iterations = ITERATIONS;
    settings.nonce_source = Arc::new(FixedNonce);
    if proxy {
        settings.authorize =
            Some(Arc::new(|authcid: &str, authzid: &str| authcid == USER && authzid == PROXY));
    }
    Arc::new(settings)
}

/// The user database, and what it saw, for the oracle.
pub(crate) struct Accounts {
    pub(crate) knows_alice: bool,
    pub(crate) wrong_kind: bool,
    scram: ScramCredentials,
    /// A PLAIN or LOGIN password was checked and was alice's.
    pub(crate) password_ok: bool,
    pub(crate) answered: bool,
}

impl Accounts {
    pub(crate) fn new(knows_alice: bool, wrong_kind: bool) -> Accounts {
        let scram = ScramCredentials::derive(PASSWORD, SALT, ITERATIONS).expect("valid parameters");
        Accounts { knows_alice, wrong_kind, scram, password_ok: false, answered: false }
    }

    pub(crate) fn answer(&mut self, request: &CredentialRequest) -> Credentials {
        let authcid = request.authcid();
        assert!(authcid.len() <= sasl::MAX_IDENTITY_LEN, "identity of {} octets", authcid.len());
        assert!(!authcid.is_empty(), "empty identity");
        self.answered = true;
        let alice = self.knows_alice && authcid == USER;
        let credentials = match request {
            CredentialRequest::Password { password, .. } => {
                assert!(password.expose().len() <= sasl::MAX_PASSWORD_LEN);
                self.password_ok = alice && password.expose() == PASSWORD;
                Credentials::PasswordVerified(self.password_ok)
            }
            CredentialRequest::Scram { .. } => {
                Credentials::Scram(alice.then(|| self.scram.clone()))
            }
            CredentialRequest::CramMd5 { .. } => {
                Credentials::CramMd5Secret(alice.then(|| Password::new(PASSWORD)))
            }
        };
        if !self.wrong_kind {
            return credentials;
        }
        match credentials {
            Credentials::PasswordVerified(_) => Credentials::Scram(Some(self.scram.clone())),
            Credentials::Scram(_) => Credentials::CramMd5Secret(Some(Password::new(PASSWORD))),
            Credentials::CramMd5Secret(_) => Credentials::PasswordVerified(true),
        }
    }
}

/// What the client sent and the server challenged, in order, for checking a success.
#[derive(Default)]
pub(crate) struct Transcript {
    pub(crate) challenges: Vec<Vec<u8>>,
    pub(crate) responses: Vec<Vec<u8>>,
}

/// Panics unless a `Success` is deserved.
pub(crate) fn check_success(
    mechanism: Mechanism,
    accounts: &Accounts,
    proxy: bool,
    transcript: &Transcript,
    authcid: &str,
    authzid: &str,
) {
    assert!(!accounts.wrong_kind, "{mechanism}: success with credentials of the wrong kind");
    assert!(accounts.answered, "{mechanism}: success without asking the database");
    assert!(accounts.knows_alice, "{mechanism}: success for an unknown user");
    assert_eq!(authcid, USER, "{mechanism}: success for someone else");
    assert!(
        authzid == authcid || (proxy && authzid == PROXY),
        "{mechanism}: {authcid} acts as {authzid}"
    );
    match mechanism {
        Mechanism::Plain | Mechanism::Login => {
            assert!(accounts.password_ok, "{mechanism}: success with a wrong password")
        }
        Mechanism::ScramSha256 => {
            // client-first, client-final, then the empty answer to the server-final.
            let [.., first, last, _] = &transcript.responses[..] else {
                panic!("SCRAM success after {} responses", transcript.responses.len());
            };
            let server_first =
                transcript.challenges.iter().rev().find(|c| c.starts_with(b"r=")).expect("r=");
            let expected = scram_proof(first, server_first, last).map(|(proof, _)| proof);
            let sent = String::from_utf8_lossy(last);
            let sent = sent.rsplit_once(",p=").map(|(_, proof)| proof.to_owned());
            assert!(
                expected.is_some() && sent == expected,
                "SCRAM success with a proof that is not the password's"
            );
        }
        Mechanism::CramMd5 => {
            let challenge = transcript.challenges.first().expect("the CRAM-MD5 challenge");
            let response = transcript.responses.last().expect("the CRAM-MD5 answer");
            let digest = String::from_utf8_lossy(response)
                .rsplit_once(' ')
                .map(|(_, hex)| hex.to_ascii_lowercase());
            assert_eq!(
                digest.as_deref(),
                Some(cram_digest(challenge).as_str()),
                "CRAM-MD5 success with a digest that is not the password's"
            );
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac_sha256(key: &[u8], text: &[u8]) -> [u8; 32] {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(text);
    mac.finalize().into_bytes().into()
}

/// The ClientProof (base64) and ServerSignature (base64) that alice's password gives for this
/// exchange (RFC 5802 section 3), or `None` when the messages are not shaped for it.
fn scram_proof(
    client_first: &[u8],
    server_first: &[u8],
    client_final: &[u8],
) -> Option<(String, String)> {
    scram_proof_for(PASSWORD, client_first, server_first, client_final)
}

fn scram_proof_for(
    password: &str,
    client_first: &[u8],
    server_first: &[u8],
    client_final: &[u8],
) -> Option<(String, String)> {
    let client_first = std::str::from_utf8(client_first).ok()?;
    let server_first = std::str::from_utf8(server_first).ok()?;
    let client_final = std::str::from_utf8(client_final).ok()?;
    // client-first-message-bare follows the two commas of the GS2 header.
    let mut parts = client_first.splitn(3, ',');
    let bare = parts.nth(2)?;
    let without_proof = match client_final.rsplit_once(",p=") {
        Some((without_proof, _)) => without_proof,
        None => client_final,
    };
    let salt = server_first.split(',').find_map(|a| a.strip_prefix("s="))?;
    let salt = STANDARD.decode(salt).ok()?;
    let iterations: u32 =
        server_first.split(',').find_map(|a| a.strip_prefix("i="))?.parse().ok()?;
    if iterations == 0 || iterations > 10_000 {
        return None;
    }
    // Hi(password, salt, i), RFC 5802 section 2.2.
    let mut u = hmac_sha256(password.as_bytes(), &[&salt[..], &1u32.to_be_bytes()].concat());
    let mut salted = u;
    for _ in 1..iterations {
        u = hmac_sha256(password.as_bytes(), &u);
        salted.iter_mut().zip(u).for_each(|(s, x)| *s ^= x);
    }
    let client_key = hmac_sha256(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let auth_message = format!("{bare},{server_first},{without_proof}");
    let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
    let proof: Vec<u8> = client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
    let server_key = hmac_sha256(&salted, b"Server Key");
    let server_signature = hmac_sha256(&server_key, auth_message.as_bytes());
    Some((STANDARD.encode(proof), STANDARD.encode(server_signature)))
}

/// The CRAM-MD5 digest of alice's password for a challenge, in lower case hex.
fn cram_digest(challenge: &[u8]) -> String {
    let mut mac = <Hmac<Md5> as KeyInit>::new_from_slice(PASSWORD.as_bytes()).expect("any key");
    mac.update(challenge);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The client-final-message a SCRAM client with `password` sends after `server_first`, given
/// its `client_first`.
fn scram_client_final(password: &str, client_first: &[u8], server_first: &[u8]) -> Option<Vec<u8>> {
    let first = std::str::from_utf8(client_first).ok()?;
    let mut parts = first.splitn(3, ',');
    let gs2_header = format!("{},{},", parts.next()?, parts.next()?);
    let server = std::str::from_utf8(server_first).ok()?;
    let nonce = server.split(',').find_map(|a| a.strip_prefix("r="))?;
    let without_proof = format!("c={},r={nonce}", STANDARD.encode(gs2_header));
    let (proof, _) =
        scram_proof_for(password, client_first, server_first, without_proof.as_bytes())?;
    Some(format!("{without_proof},p={proof}").into_bytes())
}

/// The two decoders of base64 lines in the project, `sasl`'s and `smtp-proto`'s, implement the
/// same strict rule (RFC 4954 section 4) and must agree; an accepted line re-encodes to itself.
pub(crate) fn check_line_decoders(line: &[u8]) {
    let ours = smtp_proto::base64::decode(line).ok();
    match decode_response(line) {
        Ok(Response::Cancel) => assert_eq!(line, b"*"),
        Ok(Response::Data(data)) => {
            assert_eq!(ours.as_ref(), Some(&data), "only sasl accepts {line:?}");
            assert_eq!(encode_challenge(&data).as_bytes(), line, "not canonical: {line:?}");
        }
        Err(sasl::DecodeError::TooLong(_)) => assert!(line.len() > sasl::MAX_LINE_LEN - 2),
        Err(sasl::DecodeError::InvalidBase64(_)) => {
            assert_eq!(ours, None, "only smtp-proto accepts {line:?}")
        }
    }
    match decode_initial_response(line) {
        Ok(data) if line == b"=" => assert!(data.is_empty()),
        Ok(data) => assert_eq!(ours.as_ref(), Some(&data)),
        Err(_) => assert!(ours.is_none() || line.len() > sasl::MAX_LINE_LEN - 2),
    }
}

pub fn sasl(data: &[u8]) {
    let mut bytes = Bytes::new(data);
    let flags = bytes.byte();
    let wire = bytes.byte() & 1 != 0;
    let mechanism =
        [Mechanism::Plain, Mechanism::Login, Mechanism::ScramSha256, Mechanism::CramMd5]
            [usize::from(flags & 3)];
    let initial = flags & 4 != 0;
    let proxy = flags & 32 != 0;
    let smart = flags & 64 != 0 && mechanism == Mechanism::ScramSha256;
    let mut accounts = Accounts::new(flags & 8 != 0, flags & 128 != 0);
    let settings = settings(flags & 16 != 0, proxy);
    let mut lines = Vec::new();
    while !bytes.is_empty() {
        let line = bytes.line();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        check_line_decoders(line);
        lines.push(line);
    }
    let mut lines = lines.into_iter();
    let mut transcript = Transcript::default();

    let initial_response = match (initial, wire) {
        (false, _) => None,
        (true, false) => Some(lines.next().unwrap_or_default().to_vec()),
        (true, true) => match decode_initial_response(lines.next().unwrap_or_default()) {
            Ok(response) => Some(response),
            Err(_) => return,
        },
    };
    if let Some(response) = &initial_response {
        transcript.responses.push(response.clone());
    }
    let (mut exchange, mut step) =
        ServerExchange::start(mechanism, initial_response.as_deref(), settings);
    let mut smart_password: Option<String> = None;
    for _ in 0..16 {
        step = match step {
            Step::Challenge(challenge) => {
                let line = encode_challenge(&challenge);
                assert_eq!(STANDARD.decode(&line).ok().as_ref(), Some(&challenge));
                let server_first = challenge.starts_with(b"r=");
                if let Some(password) = &smart_password
                    && challenge.starts_with(b"v=")
                {
                    // The server proves itself with the signature the password gives.
                    let first = &transcript.responses[transcript.responses.len() - 2];
                    let last = &transcript.responses[transcript.responses.len() - 1];
                    let server_first = transcript.challenges.last().expect("server-first");
                    let (_, signature) = scram_proof_for(password, first, server_first, last)
                        .expect("a computed exchange");
                    assert_eq!(challenge, format!("v={signature}").into_bytes());
                }
                transcript.challenges.push(challenge);
                let response = if smart && server_first {
                    let password = String::from_utf8_lossy(lines.next().unwrap_or_default());
                    let first = transcript.responses.last().cloned().unwrap_or_default();
                    let challenge = transcript.challenges.last().expect("just pushed");
                    match scram_client_final(&password, &first, challenge) {
                        Some(client_final) => {
                            smart_password = Some(password.into_owned());
                            client_final
                        }
                        None => return,
                    }
                } else if wire {
                    match decode_response(lines.next().unwrap_or(b"*")) {
                        Ok(Response::Data(response)) => response,
                        Ok(Response::Cancel) | Err(_) => return,
                    }
                } else {
                    match lines.next() {
                        Some(response) => response.to_vec(),
                        None => return,
                    }
                };
                transcript.responses.push(response.clone());
                exchange.step(&response)
            }
            Step::NeedCredentials(request) => {
                let credentials = accounts.answer(&request);
                exchange.resume(credentials)
            }
            Step::Success { authcid, authzid } => {
                check_success(mechanism, &accounts, proxy, &transcript, &authcid, &authzid);
                return;
            }
            Step::Failure(error) => {
                let _ = error.to_string();
                assert_eq!(error.mechanism(), mechanism);
                if accounts.wrong_kind && accounts.answered {
                    assert_eq!(error.kind(), AuthErrorKind::TemporaryFailure, "{error}");
                }
                // A proof computed from the right password is accepted.
                if let Some(password) = &smart_password
                    && password == PASSWORD
                    && accounts.knows_alice
                    && !accounts.wrong_kind
                {
                    assert_ne!(error.scram_error(), Some(ScramError::InvalidProof), "{error}");
                }
                return;
            }
        };
    }
    panic!("{mechanism}: no outcome after 16 steps");
}

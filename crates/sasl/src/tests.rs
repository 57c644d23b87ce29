//! Whole exchanges, driven as the SMTP layer drives them: base64 lines in, steps out.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use crate::*;

/// A nonce source that always gives the same nonce, to reproduce published examples.
struct FixedNonce(&'static str);

impl NonceSource for FixedNonce {
    fn nonce(&self) -> Result<String, RandomError> {
        Ok(self.0.to_owned())
    }
}

fn settings() -> Settings {
    Settings::new("mx.example.org", [42; 32])
}

fn start(
    mechanism: Mechanism,
    initial: Option<&str>,
    settings: Settings,
) -> (ServerExchange, Step) {
    let initial = initial.map(|line| decode_initial_response(line.as_bytes()).unwrap());
    ServerExchange::start(mechanism, initial.as_deref(), Arc::new(settings))
}

/// Sends one client line, base64-encoded as a client would, through the decoder.
fn send(exchange: &mut ServerExchange, response: &[u8]) -> Step {
    let line = STANDARD.encode(response);
    match decode_response(line.as_bytes()).unwrap() {
        Response::Data(data) => exchange.step(&data),
        Response::Cancel => panic!("a base64 line is never a cancel"),
    }
}

fn challenge(step: Step) -> Vec<u8> {
    match step {
        Step::Challenge(challenge) => {
            // What goes into the 334 reply must decode back to the same octets.
            let line = encode_challenge(&challenge);
            assert_eq!(STANDARD.decode(&line).unwrap(), challenge);
            challenge
        }
        other => panic!("expected a challenge, got {other:?}"),
    }
}

fn challenge_text(step: Step) -> String {
    String::from_utf8(challenge(step)).unwrap()
}

fn request(step: Step) -> CredentialRequest {
    match step {
        Step::NeedCredentials(request) => request,
        other => panic!("expected a credential request, got {other:?}"),
    }
}

fn success(step: Step) -> (String, String) {
    match step {
        Step::Success { authcid, authzid } => (authcid, authzid),
        other => panic!("expected success, got {other:?}"),
    }
}

fn failure(step: Step) -> AuthError {
    match step {
        Step::Failure(error) => error,
        other => panic!("expected failure, got {other:?}"),
    }
}

fn password_request(step: Step) -> (String, String) {
    match request(step) {
        CredentialRequest::Password { authcid, password } => {
            (authcid, password.expose().to_owned())
        }
        other => panic!("expected a password to check, got {other:?}"),
    }
}

#[test]
fn mechanism_names_round_trip_and_ignore_case() {
    for mechanism in
        [Mechanism::Plain, Mechanism::Login, Mechanism::ScramSha256, Mechanism::CramMd5]
    {
        assert_eq!(Mechanism::from_name(mechanism.name()), Some(mechanism));
        assert_eq!(Mechanism::from_name(&mechanism.name().to_lowercase()), Some(mechanism));
        assert_eq!(mechanism.to_string(), mechanism.name());
    }
    assert_eq!(Mechanism::from_name("SCRAM-SHA-256-PLUS"), None);
    assert_eq!(Mechanism::from_name("SCRAM-SHA-1"), None);
    assert_eq!(Mechanism::from_name("XOAUTH2"), None);
    assert_eq!(Mechanism::from_name(""), None);
}

/// The server keeps an exchange across the await of a credential lookup, possibly on another
/// thread, and shares the settings between sessions.
#[test]
fn exchanges_can_move_between_threads() {
    fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<ServerExchange>();
    send_and_sync::<Settings>();
    send_and_sync::<Step>();
    send_and_sync::<Credentials>();
}

#[test]
fn password_debug_hides_the_value() {
    let shown = format!("{:?}", Password::new("hunter2"));
    assert!(!shown.contains("hunter2"), "{shown}");
    let step = Step::NeedCredentials(CredentialRequest::Password {
        authcid: "tim".into(),
        password: Password::new("hunter2"),
    });
    let shown = format!("{step:?}");
    assert!(shown.contains("tim") && !shown.contains("hunter2"), "{shown}");
}

// ---------------------------------------------------------------------------------------------
// PLAIN

#[test]
fn plain_with_initial_response() {
    // RFC 4954 section 4.1: "AUTH PLAIN dGVzdAB0ZXN0ADEyMzQ=", authzid "test", authcid "test",
    // password "1234".
    let (mut exchange, step) = start(Mechanism::Plain, Some("dGVzdAB0ZXN0ADEyMzQ="), settings());
    assert_eq!(password_request(step), ("test".into(), "1234".into()));
    let outcome = exchange.resume(Credentials::PasswordVerified(true));
    assert_eq!(success(outcome), ("test".into(), "test".into()));
}

#[test]
fn plain_without_initial_response_starts_with_an_empty_challenge() {
    let (mut exchange, step) = start(Mechanism::Plain, None, settings());
    assert_eq!(challenge(step), b"");
    let step = send(&mut exchange, b"\0tim\0tanstaaftanstaaf");
    assert_eq!(password_request(step), ("tim".into(), "tanstaaftanstaaf".into()));
    let outcome = exchange.resume(Credentials::PasswordVerified(true));
    assert_eq!(success(outcome), ("tim".into(), "tim".into()));
}

#[test]
fn plain_checks_the_password_with_the_stored_hash() {
    let cheap = Argon2Params { memory_kib: 64, iterations: 1, parallelism: 1 };
    let stored = PasswordHash::hash_with("tanstaaftanstaaf", cheap).unwrap();
    for (password, verified) in [("tanstaaftanstaaf", true), ("tanstaaf", false)] {
        let message = STANDARD.encode(format!("\0tim\0{password}"));
        let (mut exchange, step) = start(Mechanism::Plain, Some(&message), settings());
        let (authcid, password) = password_request(step);
        assert_eq!(authcid, "tim");
        let ok = verify_password(Some(&stored), &password);
        assert_eq!(ok, verified);
        let outcome = exchange.resume(Credentials::PasswordVerified(ok));
        if verified {
            success(outcome);
        } else {
            let error = failure(outcome);
            assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials);
            assert!(!error.to_string().contains("tanstaaf"), "{error}");
        }
    }
}

#[test]
fn plain_wrong_password_and_unknown_user_fail_alike() {
    let (mut exchange, step) = start(Mechanism::Plain, Some("AHRpbQB3cm9uZw=="), settings());
    password_request(step);
    let error = failure(exchange.resume(Credentials::PasswordVerified(false)));
    assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials);
    assert_eq!(error.mechanism(), Mechanism::Plain);
    assert!(!verify_password(None, "wrong"));
}

#[test]
fn plain_authorization_identity() {
    // authzid equal to authcid after SASLprep needs no permission.
    let message = STANDARD.encode("ti\u{00AD}m\0tim\0secret");
    let (mut exchange, step) = start(Mechanism::Plain, Some(&message), settings());
    password_request(step);
    assert_eq!(success(exchange.resume(Credentials::PasswordVerified(true))).1, "tim");

    // Another identity is refused, after the password check, by default...
    let message = STANDARD.encode("postmaster\0tim\0secret");
    let (mut exchange, step) = start(Mechanism::Plain, Some(&message), settings());
    password_request(step);
    let error = failure(exchange.resume(Credentials::PasswordVerified(true)));
    assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials);
    assert!(error.to_string().contains("may not act as"), "{error}");

    // ...and allowed when the policy says so.
    let policy = Settings {
        authorize: Some(Arc::new(|authcid: &str, authzid: &str| {
            authcid == "tim" && authzid == "postmaster"
        })),
        ..settings()
    };
    let (mut exchange, step) = start(Mechanism::Plain, Some(&message), policy);
    password_request(step);
    assert_eq!(
        success(exchange.resume(Credentials::PasswordVerified(true))),
        ("tim".into(), "postmaster".into())
    );
}

#[test]
fn plain_malformed_messages() {
    for message in
        [&b"tim\0secret"[..], b"timsecret", b"\0tim\0", b"\0tim\0sec\0ret", b"\0\xfe\0secret"]
    {
        let (mut exchange, step) = start(Mechanism::Plain, None, settings());
        challenge(step);
        let error = failure(send(&mut exchange, message));
        assert_eq!(error.kind(), AuthErrorKind::Malformed, "{error}");
        // The exchange is over.
        assert_eq!(
            failure(send(&mut exchange, b"\0tim\0secret")).kind(),
            AuthErrorKind::TemporaryFailure
        );
    }
    // "=" is an empty initial response, which is no PLAIN message.
    let (_, step) = start(Mechanism::Plain, Some("="), settings());
    assert_eq!(failure(step).kind(), AuthErrorKind::Malformed);
}

#[test]
fn plain_overlong_input() {
    let message = format!("\0{}\0secret", "u".repeat(MAX_IDENTITY_LEN + 1));
    let (mut exchange, step) = start(Mechanism::Plain, None, settings());
    challenge(step);
    assert_eq!(failure(send(&mut exchange, message.as_bytes())).kind(), AuthErrorKind::TooLong);

    let message = format!("\0tim\0{}", "p".repeat(MAX_PASSWORD_LEN + 1));
    let (mut exchange, step) = start(Mechanism::Plain, None, settings());
    challenge(step);
    assert_eq!(failure(send(&mut exchange, message.as_bytes())).kind(), AuthErrorKind::TooLong);

    // A response longer than any line can carry, handed over without the decoder.
    let (mut exchange, step) = start(Mechanism::Plain, None, settings());
    challenge(step);
    let huge = vec![b'a'; MAX_LINE_LEN];
    assert_eq!(failure(exchange.step(&huge)).kind(), AuthErrorKind::TooLong);
    // And a line longer than the limit never gets that far.
    let line = "A".repeat(MAX_LINE_LEN);
    assert!(matches!(decode_response(line.as_bytes()), Err(DecodeError::TooLong(_))));
}

#[test]
fn bad_base64_and_cancel_are_the_callers_501s() {
    let (_, step) = start(Mechanism::Plain, None, settings());
    challenge(step);
    assert!(matches!(decode_response(b"AHRpbQB0aW0=\t"), Err(DecodeError::InvalidBase64(_))));
    assert!(matches!(decode_response(b"AHRpbQB0aW0"), Err(DecodeError::InvalidBase64(_))));
    assert_eq!(decode_response(b"*"), Ok(Response::Cancel));
    assert!(matches!(
        decode_initial_response(b"AHRpbQB0a W0="),
        Err(DecodeError::InvalidBase64(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// LOGIN

#[test]
fn login_prompts_for_user_name_then_password() {
    let (mut exchange, step) = start(Mechanism::Login, None, settings());
    assert_eq!(encode_challenge(&challenge(step)), "VXNlcm5hbWU6");
    let step = send(&mut exchange, b"tim");
    assert_eq!(encode_challenge(&challenge(step)), "UGFzc3dvcmQ6");
    let step = send(&mut exchange, b"tanstaaftanstaaf");
    assert_eq!(password_request(step), ("tim".into(), "tanstaaftanstaaf".into()));
    assert_eq!(
        success(exchange.resume(Credentials::PasswordVerified(true))),
        ("tim".into(), "tim".into())
    );
}

#[test]
fn login_takes_the_user_name_as_initial_response() {
    let (mut exchange, step) = start(Mechanism::Login, Some("dGlt"), settings());
    assert_eq!(challenge(step), b"Password:");
    let step = send(&mut exchange, b"secret");
    assert_eq!(password_request(step), ("tim".into(), "secret".into()));
    let error = failure(exchange.resume(Credentials::PasswordVerified(false)));
    assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials);
}

#[test]
fn login_refuses_empty_and_unusable_input() {
    let (_, step) = start(Mechanism::Login, Some("="), settings());
    assert_eq!(failure(step).kind(), AuthErrorKind::InvalidCredentials);

    let (mut exchange, step) = start(Mechanism::Login, Some("dGlt"), settings());
    challenge(step);
    assert_eq!(failure(send(&mut exchange, b"")).kind(), AuthErrorKind::Malformed);

    let (mut exchange, step) = start(Mechanism::Login, None, settings());
    challenge(step);
    assert_eq!(failure(send(&mut exchange, b"\xc3(")).kind(), AuthErrorKind::Malformed);

    let (mut exchange, step) = start(Mechanism::Login, Some("dGlt"), settings());
    challenge(step);
    let long = "p".repeat(MAX_PASSWORD_LEN + 1);
    assert_eq!(failure(send(&mut exchange, long.as_bytes())).kind(), AuthErrorKind::TooLong);
}

// ---------------------------------------------------------------------------------------------
// SCRAM-SHA-256

const RFC_7677_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";

fn rfc_7677_credentials() -> ScramCredentials {
    let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
    ScramCredentials::derive("pencil", &salt, 4096).unwrap()
}

fn rfc_7677_settings() -> Settings {
    Settings { nonce_source: Arc::new(FixedNonce(RFC_7677_SERVER_NONCE)), ..settings() }
}

/// RFC 7677 section 3, message for message, with the server nonce of the example.
#[test]
fn scram_rfc_7677_example() {
    let (mut exchange, step) = start(
        Mechanism::ScramSha256,
        Some(&STANDARD.encode("n,,n=user,r=rOprNGfwEbeRWgbNEkqO")),
        rfc_7677_settings(),
    );
    match request(step) {
        CredentialRequest::Scram { authcid } => assert_eq!(authcid, "user"),
        other => panic!("{other:?}"),
    }
    let server_first =
        challenge_text(exchange.resume(Credentials::Scram(Some(rfc_7677_credentials()))));
    assert_eq!(
        server_first,
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    );
    let server_final = challenge_text(send(
        &mut exchange,
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
          p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    ));
    assert_eq!(server_final, "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    assert_eq!(success(send(&mut exchange, b"")), ("user".into(), "user".into()));
}

/// The RFC 7677 exchange with one thing changed, up to the client-final-message.
fn scram_rfc_7677_final(client_final: &str) -> AuthError {
    let (mut exchange, step) = start(Mechanism::ScramSha256, None, rfc_7677_settings());
    assert_eq!(challenge(step), b"");
    request(send(&mut exchange, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"));
    challenge(exchange.resume(Credentials::Scram(Some(rfc_7677_credentials()))));
    failure(send(&mut exchange, client_final.as_bytes()))
}

#[test]
fn scram_wrong_proof() {
    let error = scram_rfc_7677_final(
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
         p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVA=",
    );
    assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials);
    assert_eq!(error.scram_error(), Some(ScramError::InvalidProof));
    // A proof of the wrong length.
    let error = scram_rfc_7677_final(
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+",
    );
    assert_eq!(error.scram_error(), Some(ScramError::InvalidProof));
}

#[test]
fn scram_tampered_nonce() {
    for nonce in [
        "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k1",
        "rOprNGfwEbeRWgbNEkqO",
        "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0x",
    ] {
        let error = scram_rfc_7677_final(&format!(
            "c=biws,r={nonce},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        ));
        assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials, "{nonce}");
        assert_eq!(error.scram_error(), Some(ScramError::OtherError));
    }
}

#[test]
fn scram_channel_binding_field_must_repeat_the_gs2_header() {
    // "eSws" is "y,,", but the client-first-message said "n,,".
    let error = scram_rfc_7677_final(
        "c=eSws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
         p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    );
    assert_eq!(error.scram_error(), Some(ScramError::ChannelBindingsDontMatch));
}

#[test]
fn scram_malformed_client_final_messages() {
    for client_final in [
        "",
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,c=biws,p=AAAA",
        "c=biws,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        "c=bi ws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=AAAA",
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZap!",
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,=x,p=AAAA",
    ] {
        let error = scram_rfc_7677_final(client_final);
        assert_eq!(error.kind(), AuthErrorKind::Malformed, "{client_final:?}: {error}");
    }
    let error = scram_rfc_7677_final(
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,m=x,p=AAAA",
    );
    assert_eq!(error.scram_error(), Some(ScramError::ExtensionsNotSupported));
}

#[test]
fn scram_requested_channel_binding_is_refused() {
    let (_, step) = start(
        Mechanism::ScramSha256,
        Some(&STANDARD.encode("p=tls-exporter,,n=user,r=rOprNGfwEbeRWgbNEkqO")),
        settings(),
    );
    let error = failure(step);
    assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials);
    assert_eq!(error.scram_error(), Some(ScramError::ChannelBindingNotSupported));
}

#[test]
fn scram_answer_to_the_server_final_message_must_be_empty() {
    let (mut exchange, step) = start(
        Mechanism::ScramSha256,
        Some(&STANDARD.encode("n,,n=user,r=rOprNGfwEbeRWgbNEkqO")),
        rfc_7677_settings(),
    );
    request(step);
    challenge(exchange.resume(Credentials::Scram(Some(rfc_7677_credentials()))));
    challenge(send(
        &mut exchange,
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
          p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    ));
    assert_eq!(failure(send(&mut exchange, b"v=x")).kind(), AuthErrorKind::Malformed);
}

#[test]
fn scram_unknown_user_looks_like_a_known_one_until_the_proof() {
    let settings = settings();
    let known = ScramCredentials::generate("pencil").unwrap();
    let server_first = |authcid: &str, credentials: Option<ScramCredentials>| {
        let first = STANDARD.encode(format!("n,,n={authcid},r=clientnonce"));
        let (mut exchange, step) = start(Mechanism::ScramSha256, Some(&first), settings.clone());
        request(step);
        let text = challenge_text(exchange.resume(Credentials::Scram(credentials)));
        (exchange, text)
    };
    let shape = |server_first: &str| -> (usize, usize, String) {
        let mut attributes = server_first.split(',');
        let nonce = attributes.next().unwrap().strip_prefix("r=clientnonce").unwrap();
        let salt = attributes.next().unwrap().strip_prefix("s=").unwrap();
        let iterations = attributes.next().unwrap().to_owned();
        assert_eq!(attributes.next(), None);
        (nonce.len(), STANDARD.decode(salt).unwrap().len(), iterations)
    };
    let (_, real) = server_first("alice", Some(known));
    let (mut exchange, fake) = server_first("mallory", None);
    assert_eq!(shape(&real), shape(&fake));
    assert_eq!(shape(&fake), (24, 16, "i=4096".to_owned()));

    // The invented salt is the same each time, as a real one would be.
    let (_, again) = server_first("mallory", None);
    let salt = |text: &str| text.split(',').nth(1).unwrap().to_owned();
    assert_eq!(salt(&fake), salt(&again));
    let (_, other) = server_first("trudy", None);
    assert_ne!(salt(&fake), salt(&other));

    // The exchange fails at the proof, with the same kind as a wrong password.
    let nonce = fake.split(',').next().unwrap();
    let client_final = format!("c=biws,{nonce},p={}", STANDARD.encode([0u8; 32]));
    let error = failure(send(&mut exchange, client_final.as_bytes()));
    assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials);
    assert_eq!(error.scram_error(), Some(ScramError::UnknownUser));
}

#[test]
fn scram_authorization_identity() {
    let password = "pencil";
    let credentials = ScramCredentials::derive(password, b"salt of sixteen!", 16).unwrap();
    let run = |settings: Settings, gs2_header: &str| {
        let client = ScramClient::new("user", password, "nonce", gs2_header);
        let (mut exchange, step) =
            start(Mechanism::ScramSha256, Some(&STANDARD.encode(client.first())), settings);
        request(step);
        let server_first =
            challenge_text(exchange.resume(Credentials::Scram(Some(credentials.clone()))));
        let (client_final, _) = client.last(&server_first);
        match send(&mut exchange, client_final.as_bytes()) {
            Step::Challenge(_) => Ok(success(send(&mut exchange, b""))),
            Step::Failure(error) => Err(error.kind()),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(run(settings(), "n,a=user,"), Ok(("user".into(), "user".into())));
    assert_eq!(run(settings(), "n,a=admin,"), Err(AuthErrorKind::InvalidCredentials));
    let policy = Settings {
        authorize: Some(Arc::new(|_: &str, authzid: &str| authzid == "admin")),
        ..settings()
    };
    assert_eq!(run(policy, "n,a=admin,"), Ok(("user".into(), "admin".into())));
}

#[test]
fn scram_unusable_nonce_source_is_a_temporary_failure() {
    let settings = Settings { nonce_source: Arc::new(FixedNonce("a,b")), ..settings() };
    let (mut exchange, step) =
        start(Mechanism::ScramSha256, Some(&STANDARD.encode("n,,n=user,r=abc")), settings);
    request(step);
    let error = failure(exchange.resume(Credentials::Scram(Some(rfc_7677_credentials()))));
    assert_eq!(error.kind(), AuthErrorKind::TemporaryFailure);
}

/// A SCRAM-SHA-256 client written from the formulas of RFC 5802 section 3, with its own HMAC
/// (RFC 2104) and Hi(), so that it shares no code with the server.
struct ScramClient {
    gs2_header: String,
    bare: String,
    nonce: String,
    password: String,
}

impl ScramClient {
    fn new(user: &str, password: &str, nonce: &str, gs2_header: &str) -> ScramClient {
        let escaped = user.replace('=', "=3D").replace(',', "=2C");
        ScramClient {
            gs2_header: gs2_header.to_owned(),
            bare: format!("n={escaped},r={nonce}"),
            nonce: nonce.to_owned(),
            password: password.to_owned(),
        }
    }

    fn first(&self) -> String {
        format!("{}{}", self.gs2_header, self.bare)
    }

    /// The client-final-message for this server-first-message, and the ServerSignature the
    /// server must answer with.
    fn last(&self, server_first: &str) -> (String, String) {
        let mut attributes = server_first.split(',');
        let nonce = attributes.next().unwrap().strip_prefix("r=").unwrap();
        assert!(nonce.starts_with(&self.nonce) && nonce.len() > self.nonce.len());
        let salt = STANDARD.decode(attributes.next().unwrap().strip_prefix("s=").unwrap()).unwrap();
        let iterations: u32 =
            attributes.next().unwrap().strip_prefix("i=").unwrap().parse().unwrap();

        let salted_password = hi(self.password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted_password, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c={},r={nonce}", STANDARD.encode(&self.gs2_header));
        let auth_message = format!("{},{server_first},{without_proof}", self.bare);
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(client_signature).map(|(k, s)| k ^ s).collect();
        let server_key = hmac(&salted_password, b"Server Key");
        let server_signature = hmac(&server_key, auth_message.as_bytes());
        (
            format!("{without_proof},p={}", STANDARD.encode(proof)),
            format!("v={}", STANDARD.encode(server_signature)),
        )
    }
}

/// HMAC-SHA-256 as RFC 2104 defines it: H(K XOR opad, H(K XOR ipad, text)).
fn hmac(key: &[u8], text: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new().chain_update(block.map(|b| b ^ 0x36)).chain_update(text).finalize();
    Sha256::new().chain_update(block.map(|b| b ^ 0x5c)).chain_update(inner).finalize().into()
}

/// Hi(str, salt, i) of RFC 5802 section 2.2: U1 := HMAC(str, salt + INT(1)), Ui := HMAC(str,
/// Ui-1), Hi := U1 XOR U2 XOR ... XOR Ui.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()].concat());
    let mut result = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (r, x) in result.iter_mut().zip(u) {
            *r ^= x;
        }
    }
    result
}

#[test]
fn independent_client_reproduces_the_rfc_7677_example() {
    let client = ScramClient::new("user", "pencil", "rOprNGfwEbeRWgbNEkqO", "n,,");
    let (client_final, server_final) = client.last(
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    );
    assert_eq!(
        client_final,
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
         p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    );
    assert_eq!(server_final, "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
}

/// A full exchange of the test client against the server; `Ok` with the identities, or the
/// failure.
fn scram_exchange(
    user: &str,
    client_password: &str,
    credentials: Option<ScramCredentials>,
    gs2_header: &str,
) -> Result<(String, String), AuthError> {
    let client = ScramClient::new(user, client_password, "fyko+d2lbbFgONRv9qkxdawL", gs2_header);
    let (mut exchange, step) =
        start(Mechanism::ScramSha256, Some(&STANDARD.encode(client.first())), settings());
    let request = request(step);
    assert_eq!(request.authcid(), user);
    let server_first = challenge_text(exchange.resume(Credentials::Scram(credentials)));
    let (client_final, expected_server_final) = client.last(&server_first);
    match send(&mut exchange, client_final.as_bytes()) {
        Step::Challenge(server_final) => {
            // The client authenticates the server (RFC 5802 section 5).
            assert_eq!(String::from_utf8(server_final).unwrap(), expected_server_final);
            Ok(success(send(&mut exchange, b"")))
        }
        Step::Failure(error) => Err(error),
        other => panic!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random users and passwords, credentials stored with random salts and iteration counts
    /// (low, to keep the test quick; the RFC example covers 4096): the right password always
    /// gets in and the server proves itself, a wrong one never does.
    #[test]
    fn scram_client_and_server_agree(
        user in "[a-z][a-z0-9.,=@+-]{0,30}",
        password in "[ -~]{0,20}[!-~]",
        wrong in "[ -~]{0,20}[!-~]",
        salt in proptest::collection::vec(any::<u8>(), 1..32),
        iterations in 1u32..64,
        flag in prop_oneof![Just("n,,"), Just("y,,")],
    ) {
        let credentials = ScramCredentials::derive(&password, &salt, iterations).unwrap();
        // Through the stored form, as the server would have it.
        let credentials: ScramCredentials = credentials.to_string().parse().unwrap();
        prop_assert_eq!(
            scram_exchange(&user, &password, Some(credentials.clone()), flag).unwrap(),
            (user.clone(), user.clone())
        );
        if wrong != password {
            let error = scram_exchange(&user, &wrong, Some(credentials), flag).unwrap_err();
            prop_assert_eq!(error.scram_error(), Some(ScramError::InvalidProof));
        }
        let error = scram_exchange(&user, &password, None, flag).unwrap_err();
        prop_assert_eq!(error.scram_error(), Some(ScramError::UnknownUser));
    }

    /// Whatever a client sends, each mechanism answers with a step and never panics, and the
    /// exchange ends within a few steps.
    #[test]
    fn arbitrary_responses_never_panic(
        mechanism in prop_oneof![
            Just(Mechanism::Plain),
            Just(Mechanism::Login),
            Just(Mechanism::ScramSha256),
            Just(Mechanism::CramMd5),
        ],
        initial in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        responses in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..6),
    ) {
        let settings = Arc::new(Settings { cram_md5: true, ..settings() });
        let (mut exchange, mut step) = ServerExchange::start(mechanism, initial.as_deref(), settings);
        let mut responses = responses.iter();
        for _ in 0..8 {
            step = match step {
                Step::Challenge(_) => match responses.next() {
                    Some(response) => exchange.step(response),
                    None => break,
                },
                Step::NeedCredentials(CredentialRequest::Password { .. }) => {
                    exchange.resume(Credentials::PasswordVerified(false))
                }
                Step::NeedCredentials(CredentialRequest::Scram { .. }) => {
                    exchange.resume(Credentials::Scram(Some(rfc_7677_credentials())))
                }
                Step::NeedCredentials(CredentialRequest::CramMd5 { .. }) => {
                    exchange.resume(Credentials::CramMd5Secret(Some(Password::new("secret"))))
                }
                Step::Success { .. } => panic!("random input authenticated"),
                Step::Failure(_) => break,
            };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CRAM-MD5

fn cram_settings() -> Settings {
    Settings {
        hostname: "postoffice.reston.mci.net".into(),
        cram_md5: true,
        nonce_source: Arc::new(FixedNonce("1896.697170952")),
        ..settings()
    }
}

/// RFC 2195 section 2, with the challenge of the example.
#[test]
fn cram_md5_rfc_2195_example() {
    let (mut exchange, step) = start(Mechanism::CramMd5, None, cram_settings());
    assert_eq!(
        encode_challenge(&challenge(step)),
        "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
    );
    let response = decode_response(b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw").unwrap();
    let Response::Data(response) = response else { panic!("not data") };
    match request(exchange.step(&response)) {
        CredentialRequest::CramMd5 { authcid } => assert_eq!(authcid, "tim"),
        other => panic!("{other:?}"),
    }
    let outcome =
        exchange.resume(Credentials::CramMd5Secret(Some(Password::new("tanstaaftanstaaf"))));
    assert_eq!(success(outcome), ("tim".into(), "tim".into()));
}

#[test]
fn cram_md5_wrong_secret_and_unknown_user() {
    for secret in [Some(Password::new("tanstaaf")), None] {
        let (mut exchange, step) = start(Mechanism::CramMd5, None, cram_settings());
        challenge(step);
        request(send(&mut exchange, b"tim b913a602c7eda7a495b4e6e7334d3890"));
        let error = failure(exchange.resume(Credentials::CramMd5Secret(secret)));
        assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials);
    }
}

/// For an unknown user the digest is computed with an empty key, to take the same time; a
/// client that sends exactly that digest must still fail.
#[test]
fn cram_md5_unknown_user_cannot_use_the_empty_key() {
    use hmac::{Hmac, KeyInit, Mac};
    let (mut exchange, step) = start(Mechanism::CramMd5, None, cram_settings());
    let challenge = challenge(step);
    let mut mac = <Hmac<md5::Md5> as KeyInit>::new_from_slice(b"").unwrap();
    mac.update(&challenge);
    let digest: String =
        mac.finalize().into_bytes().iter().map(|octet| format!("{octet:02x}")).collect();
    request(send(&mut exchange, format!("nobody {digest}").as_bytes()));
    let error = failure(exchange.resume(Credentials::CramMd5Secret(None)));
    assert_eq!(error.kind(), AuthErrorKind::InvalidCredentials);
}

#[test]
fn cram_md5_is_off_by_default_and_server_first() {
    let (_, step) = start(Mechanism::CramMd5, None, settings());
    assert_eq!(failure(step).kind(), AuthErrorKind::MechanismNotAvailable);
    let (_, step) = start(Mechanism::CramMd5, Some("dGlt"), cram_settings());
    assert_eq!(failure(step).kind(), AuthErrorKind::InitialResponseNotAllowed);
    // Even an empty initial response is one.
    let (mut exchange, step) = start(Mechanism::CramMd5, Some("="), cram_settings());
    assert_eq!(failure(step).kind(), AuthErrorKind::InitialResponseNotAllowed);
    assert_eq!(failure(exchange.step(b"tim")).kind(), AuthErrorKind::TemporaryFailure);
}

#[test]
fn cram_md5_nonce_must_fit_a_message_id() {
    let settings = Settings { nonce_source: Arc::new(FixedNonce("a b")), ..cram_settings() };
    let (_, step) = start(Mechanism::CramMd5, None, settings);
    assert_eq!(failure(step).kind(), AuthErrorKind::TemporaryFailure);
}

// ---------------------------------------------------------------------------------------------
// Driving an exchange out of order

#[test]
fn out_of_order_calls_fail_without_authenticating() {
    // A response while the password is being checked.
    let (mut exchange, step) = start(Mechanism::Plain, Some("AHRpbQBzZWNyZXQ="), settings());
    password_request(step);
    assert_eq!(failure(exchange.step(b"")).kind(), AuthErrorKind::TemporaryFailure);
    assert_eq!(
        failure(exchange.resume(Credentials::PasswordVerified(true))).kind(),
        AuthErrorKind::TemporaryFailure
    );

    // Credentials of the wrong kind.
    let (mut exchange, step) =
        start(Mechanism::ScramSha256, Some(&STANDARD.encode("n,,n=user,r=abc")), settings());
    request(step);
    assert_eq!(
        failure(exchange.resume(Credentials::PasswordVerified(true))).kind(),
        AuthErrorKind::TemporaryFailure
    );

    // Credentials nobody asked for.
    let (mut exchange, step) = start(Mechanism::Login, None, settings());
    challenge(step);
    assert_eq!(
        failure(exchange.resume(Credentials::PasswordVerified(true))).kind(),
        AuthErrorKind::TemporaryFailure
    );

    // Anything after success.
    let (mut exchange, step) = start(Mechanism::Plain, Some("AHRpbQBzZWNyZXQ="), settings());
    password_request(step);
    success(exchange.resume(Credentials::PasswordVerified(true)));
    assert_eq!(failure(exchange.step(b"")).kind(), AuthErrorKind::TemporaryFailure);
    assert_eq!(exchange.mechanism(), Mechanism::Plain);
}

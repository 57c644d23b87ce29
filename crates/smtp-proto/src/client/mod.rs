//! The client side of SMTP, for delivering mail to other servers, as state machines without I/O.
//!
//! A driver owns the socket and does four things in a loop: feed what it reads to a
//! [`ReplyParser`], hand each complete [`ServerReply`] to the state machine it is running,
//! write the bytes the machine returns, and run the TLS handshake when told to.
//!
//! - [`ClientSession`] covers the connection: the greeting, EHLO (or HELO), STARTTLS, AUTH
//!   (RFC 4954, with [`Credentials`]), RSET and QUIT. It says [`SessionStep::Ready`] once mail
//!   transactions may start, and knows the server's [`Extensions`].
//! - [`Transaction`] covers one message: MAIL, RCPT, DATA or BDAT, pipelined when the server
//!   offers PIPELINING (RFC 2920), and reports a result for every recipient.
//!
//! ```text
//! connect ─► session.on_reply(greeting) ─► Send(EHLO) ─► … ─► Ready
//!            Transaction::begin ─► write commands ─► tx.on_reply(…) ─► … ─► Done(outcome)
//!            (another Transaction, after session.rset() if the outcome asks for it)
//!            session.quit()
//! ```

mod auth;
mod extensions;
mod reply;
mod session;
mod transaction;

use std::fmt;

use crate::reply::EnhancedStatus;

pub use auth::{Credentials, InvalidCredentials};
pub use extensions::Extensions;
pub use reply::{ReplyError, ReplyParser, ServerReply};
pub use session::{ClientConfig, ClientSession, SessionStep, TlsIntent};
pub use transaction::{
    AfterTransaction, Envelope, EnvelopeRecipient, FramedContent, RecipientResult, Refusal,
    Transaction, TransactionOutcome, TransactionStep, is_seven_bit,
};

/// Why a session, a transaction or a recipient failed: what the queue needs to decide between
/// retrying and bouncing, and what a delivery status notification reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    /// The RFC 3463 status: the server's enhanced status code when it sent one, otherwise
    /// derived from the reply code or chosen for the local condition. Class 5 is permanent,
    /// class 4 transient.
    pub status: EnhancedStatus,
    /// What failed, e.g. `RCPT TO refused` or `STARTTLS not offered but TLS required`.
    pub description: String,
    /// The server's reply, when the failure is the server's answer. Its `Display` form is
    /// what a DSN reports as `Diagnostic-Code: smtp; ...` (RFC 3464 section 2.3.6).
    pub reply: Option<ServerReply>,
}

impl ClientError {
    /// True when retrying cannot help: the status is of class 5.
    pub fn is_permanent(&self) -> bool {
        self.status.0 == 5
    }

    /// A failure without a server reply behind it.
    pub(crate) fn local(status: EnhancedStatus, description: impl Into<String>) -> ClientError {
        ClientError { status, description: description.into(), reply: None }
    }

    /// The server answered `reply` where success was needed. The status is the reply's
    /// enhanced status code, or else X.0.0 of the reply's class (RFC 3463 section 3.1).
    /// Replies that are neither 4xx nor 5xx are protocol confusion, which may clear up on
    /// another attempt, so they count as transient whatever status code they carry.
    pub(crate) fn refused(description: impl Into<String>, reply: ServerReply) -> ClientError {
        let status = match reply.code / 100 {
            5 => reply.status.unwrap_or(EnhancedStatus(5, 0, 0)),
            4 => reply.status.unwrap_or(EnhancedStatus(4, 0, 0)),
            _ => PROTOCOL_ERROR,
        };
        ClientError { status, description: description.into(), reply: Some(reply) }
    }

    /// The server answered `reply`, but local policy decides the status.
    pub(crate) fn with_status(
        status: EnhancedStatus,
        description: impl Into<String>,
        reply: ServerReply,
    ) -> ClientError {
        ClientError { status, description: description.into(), reply: Some(reply) }
    }
}

/// X.5.0, "other or undefined protocol status" (RFC 3463 section 3.6), transient: the
/// conversation went wrong in a way another attempt may not repeat.
pub(crate) const PROTOCOL_ERROR: EnhancedStatus = EnhancedStatus(4, 5, 0);

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reply {
            Some(reply) => write!(f, "{}: {reply}", self.description),
            None => write!(f, "{} ({})", self.description, self.status),
        }
    }
}

impl std::error::Error for ClientError {}

/// A stream that cannot be read as SMTP replies can no longer be trusted: the failure is
/// transient, the connection should be closed.
impl From<ReplyError> for ClientError {
    fn from(error: ReplyError) -> ClientError {
        ClientError::local(PROTOCOL_ERROR, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::reply;
    use crate::session::{Event, ServerSession, SessionConfig};
    use crate::types::{BodyType, ForwardPath, Notify, OriginalRecipient, Ret};

    fn reply(code: u16, text: &str) -> ServerReply {
        ServerReply::new(code, text.split('\n').map(str::to_owned).collect())
    }

    #[test]
    fn status_comes_from_the_reply_or_its_class() {
        let error = ClientError::refused("RCPT TO refused", reply(550, "5.1.1 No such user"));
        assert_eq!(error.status, EnhancedStatus(5, 1, 1));
        assert!(error.is_permanent());
        assert_eq!(error.to_string(), "RCPT TO refused: 550 5.1.1 No such user");

        let error = ClientError::refused("MAIL FROM refused", reply(451, "Try later"));
        assert_eq!(error.status, EnhancedStatus(4, 0, 0));
        assert!(!error.is_permanent());

        let error = ClientError::refused("DATA refused", reply(250, "2.0.0 what?"));
        assert_eq!(error.status, PROTOCOL_ERROR);
        assert!(!error.is_permanent());
    }

    #[test]
    fn local_errors_show_their_status() {
        let error = ClientError::local(EnhancedStatus(4, 4, 2), "connection lost");
        assert_eq!(error.to_string(), "connection lost (4.4.2)");
        let error = ClientError::from(ReplyError::LineTooLong);
        assert!(!error.is_permanent());
        assert!(error.description.contains("longer than"), "{error}");
    }

    /// Our own server session at the other end of an in-memory connection. It accepts every
    /// sender, refuses recipients whose local part starts with "unknown", and stores messages.
    /// With AUTH mechanisms, it knows one account: "relay", password "secret".
    struct Peer {
        server: ServerSession,
        replies: ReplyParser,
        stored: Vec<crate::session::Transaction>,
        /// The mechanism and the client's messages of the AUTH exchange under way.
        auth: Option<(String, Vec<Vec<u8>>)>,
    }

    impl Peer {
        fn new() -> Peer {
            Peer::with_auth(&[])
        }

        /// A peer that offers these AUTH mechanisms under TLS.
        fn with_auth(mechanisms: &[&str]) -> Peer {
            let config = SessionConfig {
                starttls: true,
                auth_mechanisms: mechanisms.iter().map(|m| m.to_string()).collect(),
                ..SessionConfig::default()
            };
            let mut server = ServerSession::new(Arc::new(config), false);
            server.greet();
            let mut peer =
                Peer { server, replies: ReplyParser::new(), stored: Vec::new(), auth: None };
            peer.deliver_output();
            peer
        }

        /// What the client writes; the server's answers go to the reply parser.
        fn write(&mut self, mut input: &[u8]) {
            loop {
                let (used, event) = self.server.feed(input);
                input = &input[used..];
                match event {
                    Event::NeedInput | Event::Close => break,
                    Event::Mail => self.server.mail_verdict(Ok(())),
                    Event::Rcpt => {
                        let refused = matches!(
                            &self.server.pending_rcpt().unwrap().path,
                            ForwardPath::Mailbox(m) if m.local_part.starts_with("unknown")
                        );
                        let verdict = if refused { Err(reply::NO_SUCH_USER) } else { Ok(()) };
                        self.server.rcpt_verdict(verdict);
                    }
                    Event::Message => {
                        self.stored.push(self.server.take_message().unwrap());
                        let queued = reply::Reply::new(250, EnhancedStatus(2, 0, 0), "queued");
                        self.server.message_verdict(queued);
                    }
                    Event::StartTls => {
                        // The handshake, as far as this test is concerned.
                        self.deliver_output();
                        self.server.tls_started();
                        return;
                    }
                    Event::Auth => {
                        let request = self.server.pending_auth().unwrap().clone();
                        let messages = request.initial_response.into_iter().collect();
                        self.auth = Some((request.mechanism, messages));
                        self.authenticate();
                    }
                    Event::AuthResponse => {
                        let response = self.server.pending_auth_response().unwrap().to_vec();
                        self.auth.as_mut().unwrap().1.push(response);
                        self.authenticate();
                    }
                    Event::AuthAborted => self.auth = None,
                }
            }
            self.deliver_output();
        }

        /// The next step of the AUTH exchange: a challenge until the mechanism has all the
        /// client's messages, then the verdict.
        fn authenticate(&mut self) {
            let (mechanism, messages) = self.auth.as_ref().unwrap();
            let (prompts, expected): (&[&[u8]], &[&[u8]]) = match mechanism.as_str() {
                "PLAIN" => (&[b""], &[b"\0relay\0secret"]),
                "LOGIN" => (&[b"Username:", b"Password:"], &[b"relay", b"secret"]),
                other => panic!("{other}"),
            };
            if messages.len() < expected.len() {
                self.server.auth_challenge(prompts[messages.len()]);
            } else if messages == expected {
                self.server.auth_success("relay".into());
                self.auth = None;
            } else {
                self.server.auth_failure(reply::AUTH_INVALID_CREDENTIALS);
                self.auth = None;
            }
        }

        fn deliver_output(&mut self) {
            self.replies.feed(self.server.output());
            self.server.clear_output();
        }

        fn reply(&mut self) -> ServerReply {
            self.replies.next_reply().expect("a reply is due").unwrap()
        }
    }

    fn config(tls: TlsIntent) -> ClientConfig {
        ClientConfig {
            helo_name: "client.example".into(),
            tls,
            auth: None,
            allow_plaintext_auth: false,
        }
    }

    /// Runs the session up to Ready and returns it.
    fn connect(peer: &mut Peer, tls: TlsIntent) -> ClientSession {
        match open(peer, config(tls)) {
            (session, SessionStep::Ready) => session,
            (_, other) => panic!("{other:?}"),
        }
    }

    /// Runs the session until it is ready or fails.
    fn open(peer: &mut Peer, config: ClientConfig) -> (ClientSession, SessionStep) {
        let mut session = ClientSession::new(config, false);
        let mut step = session.on_reply(peer.reply());
        loop {
            step = match step {
                SessionStep::Send(bytes) => {
                    peer.write(&bytes);
                    session.on_reply(peer.reply())
                }
                SessionStep::StartTls => {
                    assert!(peer.replies.is_empty());
                    session.tls_established()
                }
                SessionStep::Ready | SessionStep::Failed(_) => return (session, step),
                SessionStep::Closed => panic!("closed"),
            };
        }
    }

    fn with_credentials(tls: TlsIntent, password: &str) -> ClientConfig {
        ClientConfig { auth: Some(Credentials::new("relay", password).unwrap()), ..config(tls) }
    }

    fn deliver(
        peer: &mut Peer,
        extensions: &Extensions,
        envelope: &Envelope,
        content: &[u8],
    ) -> TransactionOutcome {
        let (mut transaction, first) = Transaction::begin(extensions, envelope).unwrap();
        peer.write(&first);
        loop {
            match transaction.on_reply(peer.reply()) {
                TransactionStep::Send(bytes) => peer.write(&bytes),
                TransactionStep::SendContent => {
                    peer.write(&transaction.frame_content(content).to_vec());
                }
                TransactionStep::ReadReply => {}
                TransactionStep::Done(outcome) => {
                    assert!(peer.replies.is_empty(), "every reply was consumed");
                    return outcome;
                }
            }
        }
    }

    fn envelope() -> Envelope {
        let recipient = |address: &str| EnvelopeRecipient {
            address: address.into(),
            notify: Some(Notify { success: true, failure: true, delay: false }),
            orcpt: Some(OriginalRecipient { addr_type: "rfc822".into(), address: address.into() }),
        };
        Envelope {
            sender: "sender@example.org".into(),
            body: BodyType::EightBitMime,
            ret: Some(Ret::Headers),
            envid: Some("envelope+1".into()),
            size: 40,
            recipients: vec![recipient("alice@localhost"), recipient("unknown@localhost")],
            ..Envelope::default()
        }
    }

    const CONTENT: &[u8] = b"Subject: test\r\n\r\n.leading dot\r\n..two\r\nGr\xc3\xbc\xc3\x9fe\r\n";

    fn check_delivery(peer: &Peer, outcome: &TransactionOutcome, chunked: bool) {
        let [alice, unknown] = &outcome.recipients[..] else { panic!("{outcome:?}") };
        assert!(matches!(alice, RecipientResult::Accepted(reply) if reply.code == 250));
        let RecipientResult::Failed(refused) = unknown else { panic!("{unknown:?}") };
        assert_eq!(refused.reply.as_ref().unwrap().to_string(), "550 5.1.1 No such user here");
        assert_eq!(outcome.connection, AfterTransaction::Ready);
        assert!(outcome.dsn_passed_on);

        let [stored] = &peer.stored[..] else { panic!("one message") };
        assert_eq!(stored.content, CONTENT);
        assert_eq!(stored.chunked, chunked);
        assert_eq!(stored.mail.envid.as_deref(), Some("envelope+1"));
        assert_eq!(stored.mail.ret, Some(Ret::Headers));
        assert_eq!(stored.mail.body, Some(BodyType::EightBitMime));
        assert_eq!(stored.mail.size, Some(40));
        let [rcpt] = &stored.recipients[..] else { panic!("one recipient") };
        assert_eq!(rcpt.path.to_string(), "alice@localhost");
        assert_eq!(rcpt.orcpt.as_ref().unwrap().address, "alice@localhost");
        assert!(rcpt.notify.unwrap().success);
    }

    #[test]
    fn delivers_to_our_own_server_with_starttls_pipelining_and_bdat() {
        let mut peer = Peer::new();
        let mut session = connect(&mut peer, TlsIntent::Required);
        assert!(session.tls_active() && session.used_esmtp());
        assert!(session.extensions().chunking && session.extensions().pipelining);
        assert!(!session.extensions().starttls, "not offered again after TLS");

        let outcome = deliver(&mut peer, session.extensions(), &envelope(), CONTENT);
        check_delivery(&peer, &outcome, true);

        // The connection carries a second message, then says goodbye.
        let outcome = deliver(&mut peer, session.extensions(), &envelope(), b"x\r\n");
        assert_eq!(peer.stored.len(), 2);
        assert_eq!(peer.stored[1].content, b"x\r\n");
        assert_eq!(outcome.connection, AfterTransaction::Ready);
        peer.write(&session.quit());
        assert_eq!(session.on_reply(peer.reply()), SessionStep::Closed);
    }

    #[test]
    fn delivers_to_our_own_server_with_data_pipelined_or_not() {
        for pipelining in [true, false] {
            let mut peer = Peer::new();
            let session = connect(&mut peer, TlsIntent::Never);
            assert!(!session.tls_active());
            let extensions =
                Extensions { chunking: false, pipelining, ..session.extensions().clone() };
            let outcome = deliver(&mut peer, &extensions, &envelope(), CONTENT);
            check_delivery(&peer, &outcome, false);
        }
    }

    #[test]
    fn nobody_accepted_by_our_own_server() {
        for chunking in [true, false] {
            let mut peer = Peer::new();
            let mut session = connect(&mut peer, TlsIntent::Opportunistic);
            let extensions = Extensions { chunking, ..session.extensions().clone() };
            let mut envelope = envelope();
            envelope.recipients.remove(0);
            let outcome = deliver(&mut peer, &extensions, &envelope, CONTENT);
            assert!(
                matches!(&outcome.recipients[0], RecipientResult::Failed(e) if e.is_permanent())
            );
            assert!(peer.stored.is_empty());
            assert_eq!(outcome.connection, AfterTransaction::NeedsReset);
            peer.write(&session.rset());
            assert_eq!(session.on_reply(peer.reply()), SessionStep::Ready);
            // The connection is clean again.
            let outcome = deliver(&mut peer, &extensions, &self::envelope(), CONTENT);
            check_delivery(&peer, &outcome, chunking);
        }
    }

    #[test]
    fn authenticates_to_our_own_server_after_starttls() {
        // PLAIN is preferred; LOGIN is used when it is all the server offers.
        for mechanisms in [&["LOGIN", "PLAIN"][..], &["LOGIN"]] {
            let mut peer = Peer::with_auth(mechanisms);
            let (mut session, step) =
                open(&mut peer, with_credentials(TlsIntent::Required, "secret"));
            assert_eq!(step, SessionStep::Ready, "{mechanisms:?}");
            assert!(session.tls_active() && session.authenticated());
            assert_eq!(peer.server.authenticated_as(), Some("relay"));
            assert!(peer.replies.is_empty());

            let outcome = deliver(&mut peer, session.extensions(), &envelope(), CONTENT);
            check_delivery(&peer, &outcome, true);
            peer.write(&session.quit());
            assert_eq!(session.on_reply(peer.reply()), SessionStep::Closed);
        }
    }

    #[test]
    fn our_own_server_refuses_a_wrong_password() {
        for mechanisms in [&["PLAIN"][..], &["LOGIN"]] {
            let mut peer = Peer::with_auth(mechanisms);
            let (mut session, step) =
                open(&mut peer, with_credentials(TlsIntent::Required, "wrong"));
            let SessionStep::Failed(error) = step else { panic!("{step:?}") };
            assert_eq!(error.status, EnhancedStatus(4, 7, 8), "{error}");
            assert!(!session.authenticated());
            assert_eq!(peer.server.authenticated_as(), None);
            // The server is back at reading commands.
            peer.write(&session.quit());
            assert_eq!(session.on_reply(peer.reply()), SessionStep::Closed);
        }
    }

    #[test]
    fn our_own_server_offers_no_password_mechanism_without_tls() {
        // With TLS refused by the client's policy, and plain text allowed, the server still
        // keeps PLAIN and LOGIN to itself: the session fails instead of going on without AUTH.
        let mut peer = Peer::with_auth(&["PLAIN", "LOGIN"]);
        let config = ClientConfig {
            allow_plaintext_auth: true,
            ..with_credentials(TlsIntent::Never, "secret")
        };
        let (_, step) = open(&mut peer, config);
        let SessionStep::Failed(error) = step else { panic!("{step:?}") };
        assert_eq!(error.description, "AUTH not offered but credentials configured");
        assert!(!error.is_permanent());
    }
}

//! `server_session`: the whole [`ServerSession`] fed arbitrary octets, cut arbitrarily, with
//! every event answered: senders whose local part starts with "refuse" and recipients whose
//! local part starts with "unknown" are refused, messages containing "FAIL" are refused with
//! 452, and AUTH runs the real SASL exchanges against one account (see [`crate::sasl`]).
//!
//! Input: two octets of configuration, one octet choosing how to cut the rest, then what the
//! client sends.
//!
//! Oracles: no panic; every reply well-formed (see `replies.rs`); each event comes with what
//! it promises (a pending MAIL, RCPT, message or AUTH), and only where the protocol allows it:
//! no MAIL before AUTH where AUTH is required, no AUTH without EHLO, inside a transaction,
//! twice, or with a mechanism the connection may not use, no STARTTLS twice or inside a
//! transaction, no message without recipients, over the size limit or (under `reject`) with a
//! bare line ending; the output of one read bounded by the lines it held; the message held
//! never over `max_message_size`; and, under the fuzz binary's counting allocator, the
//! session's heap bounded by the configured limits.

use std::sync::Arc;

use sasl::{AuthErrorKind, Mechanism, ServerExchange, Settings, Step};
use smtp_proto::codec::BareLineEndings;
use smtp_proto::reply::{self, Reply};
use smtp_proto::session::{AUTH_LINE_LIMIT, PARAMETER_ALLOWANCE};
use smtp_proto::trace::count_received_headers;
use smtp_proto::{
    AuthWithoutTls, Event, ForwardPath, ReversePath, ServerSession, SessionConfig, Transaction,
    is_plaintext_mechanism,
};

use crate::heap;
use crate::replies::{SeenReply, check_replies};
use crate::sasl_exchange::{Accounts, Transcript, check_success, settings};
use crate::util::{Bytes, Split};

pub(crate) const HOSTNAME: &str = "mx.fuzz.example";

/// The longest single reply the session writes, with room to spare: the EHLO answer (its
/// mechanisms included) and the 555 that echoes 64 characters of a parameter are the longest.
const REPLY_MAX: usize = 1024;

pub fn server_session(data: &[u8]) {
    let mut bytes = Bytes::new(data);
    let a = bytes.byte();
    let b = bytes.byte();
    let cut = bytes.byte();
    let mechanisms: &[&str] = match a >> 3 & 3 {
        0 => &[],
        1 => &["PLAIN", "LOGIN"],
        2 => &["SCRAM-SHA-256", "PLAIN", "LOGIN"],
        _ => &["SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN", "XOAUTH2"],
    };
    let config = SessionConfig {
        hostname: HOSTNAME.into(),
        max_message_size: [25 * 1024 * 1024, 100, 1000, 65536][usize::from(b & 3)],
        max_recipients: if b & 4 != 0 { 3 } else { 100 },
        max_command_line: if b & 8 != 0 { 1000 } else { 512 },
        max_data_line: if b & 16 != 0 { 0 } else { 1000 },
        address_limits: Default::default(),
        max_errors: if b & 32 != 0 { 3 } else { 20 },
        max_received_headers: if b & 64 != 0 { 2 } else { 100 },
        bare_line_endings: if a & 1 != 0 {
            BareLineEndings::Normalize
        } else {
            BareLineEndings::Reject
        },
        starttls: a & 4 != 0,
        auth_mechanisms: mechanisms.iter().map(|m| (*m).to_owned()).collect(),
        auth_without_tls: [
            AuthWithoutTls::SafeMechanisms,
            AuthWithoutTls::Never,
            AuthWithoutTls::AllMechanisms,
            AuthWithoutTls::SafeMechanisms,
        ][usize::from(a >> 6)],
        auth_required: a & 32 != 0,
    };
    let input = bytes.rest();
    let pieces = Split::choose(cut).pieces(input);
    let mut run = Run::new(config, a & 2 != 0, b & 128 != 0);
    let base = heap::start();
    for piece in pieces {
        if !run.feed(piece) {
            break;
        }
    }
    run.finish(cut & 0x80 != 0);
    if heap::installed() {
        let peak = heap::peak_since(base);
        let limit = run.heap_bound();
        assert!(peak <= limit, "the session held {peak} octets, more than {limit}");
    }
}

/// A driver of one session, with the policy described in the module documentation.
pub(crate) struct Run {
    pub(crate) config: Arc<SessionConfig>,
    session: ServerSession,
    settings: Arc<Settings>,
    proxy: bool,
    accounts: Accounts,
    exchange: Option<(ServerExchange, Mechanism, Transcript)>,
    /// Replies read back, kept only when asked for (they grow with the input).
    pub(crate) replies: Option<Vec<SeenReply>>,
    /// Contents of the messages handed over, kept only when asked for.
    pub(crate) messages: Option<Vec<Vec<u8>>>,
    pub(crate) closed: bool,
    /// Since the last flush: LFs consumed, calls into the session; each may add two replies.
    units: usize,
    largest_output: usize,
}

impl Run {
    pub(crate) fn new(config: SessionConfig, tls: bool, proxy: bool) -> Run {
        let config = Arc::new(config);
        let mut session = ServerSession::new(config.clone(), tls);
        session.greet();
        let mut run = Run {
            config,
            session,
            settings: settings(true, proxy),
            proxy,
            accounts: Accounts::new(true, false),
            exchange: None,
            replies: None,
            messages: None,
            closed: false,
            units: 1,
            largest_output: 0,
        };
        run.flush();
        run
    }

    /// Feeds one read's worth of octets, answering every event; false once the session closed.
    pub(crate) fn feed(&mut self, mut input: &[u8]) -> bool {
        loop {
            if self.closed {
                let (used, event) = self.session.feed(input);
                assert_eq!((used, event), (input.len(), Event::Close), "input after the close");
                return false;
            }
            let (used, event) = self.session.feed(input);
            assert!(used <= input.len());
            self.units += 1 + input[..used].iter().filter(|&&b| b == b'\n').count();
            input = &input[used..];
            self.check_held();
            match event {
                Event::NeedInput => {
                    assert!(input.is_empty(), "NeedInput with {} octets left", input.len());
                    self.flush();
                    return true;
                }
                Event::Mail => self.mail(),
                Event::Rcpt => self.rcpt(),
                Event::Message => {
                    self.flush();
                    self.message();
                }
                Event::StartTls => {
                    assert!(input.is_empty(), "octets after STARTTLS were kept");
                    assert!(self.config.starttls && !self.session.is_tls(), "STARTTLS accepted");
                    assert!(self.session.transaction().is_none(), "STARTTLS in a transaction");
                    assert!(
                        self.session.output().ends_with(b"220 2.0.0 Ready to start TLS\r\n"),
                        "STARTTLS without its 220"
                    );
                    self.flush();
                    self.session.tls_started();
                    assert!(self.session.is_tls());
                    assert!(self.session.authenticated_as().is_none(), "AUTH survived STARTTLS");
                    assert!(self.session.greeting().is_none(), "EHLO survived STARTTLS");
                    assert!(self.session.transaction().is_none());
                    return true;
                }
                Event::Auth => {
                    self.flush();
                    self.start_auth();
                }
                Event::AuthResponse => {
                    self.flush();
                    self.continue_auth();
                }
                Event::AuthAborted => {
                    assert!(self.exchange.take().is_some(), "an exchange aborted that never began");
                }
                Event::Close => {
                    assert!(self.session.is_closed());
                    self.exchange = None;
                    self.closed = true;
                    self.flush();
                    return false;
                }
            }
        }
    }

    /// The end of the input: the driver may close the session itself (a timeout).
    pub(crate) fn finish(&mut self, timeout: bool) {
        let _ = self.session.in_data();
        if timeout && !self.closed {
            self.session.send(reply::TIMEOUT.and_close());
            self.units += 1;
            assert!(self.session.is_closed());
            self.closed = true;
        }
        self.flush();
    }

    /// What the whole run may hold on the heap: the message, read buffers, one read's replies
    /// (twice each, for a growing vector), and the recipients of a transaction.
    fn heap_bound(&self) -> usize {
        let message = usize::try_from(self.config.max_message_size).unwrap_or(usize::MAX);
        message.saturating_mul(2)
            + 2 * (self.config.max_command_line + PARAMETER_ALLOWANCE)
            + 2 * AUTH_LINE_LIMIT
            + 8 * self.largest_output
            + self.config.max_recipients * 8 * 1024
            + (1 << 20)
    }

    /// Checks and clears what the session wrote, as sending it would.
    fn flush(&mut self) {
        let output = self.session.output();
        let bound = self.units * 2 * REPLY_MAX;
        assert!(
            output.len() <= bound,
            "{} octets of replies for {} lines and calls",
            output.len(),
            self.units
        );
        self.largest_output = self.largest_output.max(output.len());
        let replies = check_replies(output, HOSTNAME);
        if let Some(all) = &mut self.replies {
            all.extend(replies);
        }
        self.session.clear_output();
        self.units = 0;
    }

    /// The transaction never holds more than the size limit.
    fn check_held(&self) {
        if let Some(transaction) = self.session.transaction() {
            assert!(
                transaction.content.len() as u64 <= self.config.max_message_size,
                "{} octets held, limit {}",
                transaction.content.len(),
                self.config.max_message_size
            );
            assert!(transaction.recipients.len() <= self.config.max_recipients);
        }
        if let Some(response) = self.session.pending_auth_response() {
            assert!(response.len() <= (AUTH_LINE_LIMIT - 2) / 4 * 3);
        }
    }

    fn verdict_count(&mut self) {
        self.units += 1;
    }

    fn mail(&mut self) {
        let mail = self.session.pending_mail().expect("Event::Mail without a MAIL").clone();
        let greeting = self.session.greeting().expect("MAIL before EHLO or HELO");
        assert!(greeting.esmtp || !mail.has_parameters, "ESMTP parameters after HELO");
        assert!(self.session.transaction().is_none(), "MAIL inside a transaction");
        if self.config.auth_required {
            assert!(self.session.authenticated_as().is_some(), "MAIL before AUTH");
        }
        if let ReversePath::Mailbox(mailbox) = &mail.path {
            assert!(mail.smtputf8 || mailbox.is_ascii(), "UTF-8 sender without SMTPUTF8");
        }
        assert!(mail.size.is_none_or(|size| size <= self.config.max_message_size));
        let refused = match &mail.path {
            ReversePath::Mailbox(mailbox) => mailbox.local_part.starts_with("refuse"),
            ReversePath::Null => false,
        };
        self.verdict_count();
        self.session.mail_verdict(if refused { Err(reply::RELAY_DENIED) } else { Ok(()) });
    }

    fn rcpt(&mut self) {
        let rcpt = self.session.pending_rcpt().expect("Event::Rcpt without a RCPT").clone();
        let transaction = self.session.transaction().expect("RCPT outside a transaction");
        assert!(transaction.recipients.len() < self.config.max_recipients);
        if let ForwardPath::Mailbox(mailbox) = &rcpt.path {
            assert!(
                transaction.mail.smtputf8 || mailbox.is_ascii(),
                "UTF-8 recipient without SMTPUTF8"
            );
        }
        let refused = match &rcpt.path {
            ForwardPath::Mailbox(mailbox) => mailbox.local_part.starts_with("unknown"),
            ForwardPath::Postmaster => false,
        };
        self.verdict_count();
        self.session.rcpt_verdict(if refused { Err(reply::NO_SUCH_USER) } else { Ok(()) });
    }

    fn message(&mut self) {
        let transaction = self.session.take_message().expect("Event::Message without a message");
        self.check_message(&transaction);
        let refused = transaction.content.windows(4).any(|w| w == b"FAIL");
        if let Some(messages) = &mut self.messages {
            messages.push(transaction.content);
        }
        self.verdict_count();
        self.session.message_verdict(if refused {
            reply::INSUFFICIENT_STORAGE
        } else {
            Reply::new(250, reply::EnhancedStatus(2, 0, 0), "Ok: queued as FUZZ")
        });
    }

    fn check_message(&self, transaction: &Transaction) {
        assert!(!transaction.recipients.is_empty(), "a message without recipients");
        assert!(transaction.recipients.len() <= self.config.max_recipients);
        assert!(transaction.content.len() as u64 <= self.config.max_message_size, "too big");
        assert!(
            count_received_headers(&transaction.content) <= self.config.max_received_headers,
            "a looping message accepted"
        );
        if self.config.auth_required {
            assert!(self.session.authenticated_as().is_some(), "a message before AUTH");
        }
        if !transaction.chunked && self.config.bare_line_endings == BareLineEndings::Reject {
            let content = &transaction.content;
            let bare = (0..content.len()).any(|i| match content[i] {
                b'\n' => i == 0 || content[i - 1] != b'\r',
                b'\r' => content.get(i + 1) != Some(&b'\n'),
                _ => false,
            });
            assert!(!bare, "a bare line ending in a DATA message");
        }
    }

    fn start_auth(&mut self) {
        let request = self.session.pending_auth().expect("Event::Auth without AUTH").clone();
        assert!(
            self.session.greeting().is_some_and(|greeting| greeting.esmtp),
            "AUTH without EHLO"
        );
        assert!(self.session.authenticated_as().is_none(), "AUTH twice");
        assert!(self.session.transaction().is_none(), "AUTH inside a transaction");
        assert!(self.exchange.is_none(), "AUTH while an exchange runs");
        assert!(
            self.config.auth_mechanisms.contains(&request.mechanism),
            "AUTH {} was not offered",
            request.mechanism
        );
        if !self.session.is_tls() {
            let allowed = match self.config.auth_without_tls {
                AuthWithoutTls::Never => false,
                AuthWithoutTls::SafeMechanisms => !is_plaintext_mechanism(&request.mechanism),
                AuthWithoutTls::AllMechanisms => true,
            };
            assert!(allowed, "AUTH {} without TLS", request.mechanism);
        }
        self.verdict_count();
        let Some(mechanism) = Mechanism::from_name(&request.mechanism) else {
            self.session.auth_failure(reply::AUTH_UNAVAILABLE);
            return;
        };
        let mut transcript = Transcript::default();
        if let Some(response) = &request.initial_response {
            transcript.responses.push(response.clone());
        }
        let (exchange, step) = ServerExchange::start(
            mechanism,
            request.initial_response.as_deref(),
            self.settings.clone(),
        );
        self.exchange = Some((exchange, mechanism, transcript));
        self.auth_step(step);
    }

    fn continue_auth(&mut self) {
        let response =
            self.session.pending_auth_response().expect("AuthResponse without one").to_vec();
        let Some((exchange, _, transcript)) = self.exchange.as_mut() else {
            panic!("a response to no exchange");
        };
        transcript.responses.push(response.clone());
        let step = exchange.step(&response);
        self.verdict_count();
        self.auth_step(step);
    }

    fn auth_step(&mut self, mut step: Step) {
        loop {
            let Some((exchange, mechanism, transcript)) = self.exchange.as_mut() else {
                return;
            };
            step = match step {
                Step::Challenge(challenge) => {
                    transcript.challenges.push(challenge.clone());
                    self.session.auth_challenge(&challenge);
                    return;
                }
                Step::NeedCredentials(request) => {
                    let credentials = self.accounts.answer(&request);
                    exchange.resume(credentials)
                }
                Step::Success { authcid, authzid } => {
                    check_success(
                        *mechanism,
                        &self.accounts,
                        self.proxy,
                        transcript,
                        &authcid,
                        &authzid,
                    );
                    self.exchange = None;
                    self.session.auth_success(authzid.clone());
                    assert_eq!(self.session.authenticated_as(), Some(authzid.as_str()));
                    return;
                }
                Step::Failure(error) => {
                    self.exchange = None;
                    // Which reply goes with which error is the server's choice (conn.rs);
                    // the session only sees a failure reply, temporary or permanent.
                    let reply = match error.kind() {
                        AuthErrorKind::TemporaryFailure => reply::AUTH_TEMPORARY_FAILURE,
                        _ => reply::AUTH_INVALID_CREDENTIALS,
                    };
                    self.session.auth_failure(reply);
                    assert!(self.session.authenticated_as().is_none());
                    return;
                }
            };
        }
    }
}

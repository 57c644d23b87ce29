//! The server side of an SMTP session as a state machine without I/O.
//!
//! The driver feeds received bytes with [`ServerSession::feed`], writes out what
//! [`ServerSession::output`] holds, and answers the [`Event`]s that need a decision it alone
//! can make (is this recipient local? is the message durable?). Replies to pipelined commands
//! accumulate in the output buffer, so the driver can send them in one write when it would
//! otherwise block (RFC 2920 section 3.2).

use std::sync::Arc;

use crate::codec::{BareLineEndings, DataDecoder, DataDefect, DataProgress, LineRead, LineReader};
use crate::parse::parse_command;
use crate::reply::{self, Reply};
use crate::trace::count_received_headers;
use crate::types::{
    AddressLimits, BodyType, Command, Domain, ForwardPath, MailFrom, RcptTo, ReversePath,
};

/// Extra octets allowed on MAIL and RCPT lines beyond the base command line limit: the ESMTP
/// parameters we advertise raise it (RFC 1870 section 3: SIZE, 26; RFC 3461 sections 4.1-4.4:
/// ORCPT 500, ENVID 100, NOTIFY and RET; RFC 4954 section 5: AUTH, 500).
pub const PARAMETER_ALLOWANCE: usize = 1024;

/// Limits and features of one listener.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our host name, for the greeting, EHLO and Received.
    pub hostname: String,
    /// Largest accepted message in octets, advertised with SIZE (RFC 1870).
    pub max_message_size: u64,
    /// Recipients per transaction; more get 452 4.5.3 (RFC 5321 section 4.5.3.1.8: at least 100).
    pub max_recipients: usize,
    /// Longest command line including CRLF (RFC 5321 section 4.5.3.1.4: 512).
    pub max_command_line: usize,
    /// Longest DATA text line including CRLF (RFC 5321 section 4.5.3.1.6: 1000), 0 for none.
    pub max_data_line: usize,
    pub address_limits: AddressLimits,
    /// Failed commands tolerated before the session is closed with 421.
    pub max_errors: u32,
    /// A message with more Received fields than this is looping (RFC 5321 section 6.3).
    pub max_received_headers: usize,
    pub bare_line_endings: BareLineEndings,
    /// STARTTLS is offered on this listener (until TLS is active).
    pub starttls: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            hostname: "localhost".into(),
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_command_line: 512,
            max_data_line: 1000,
            address_limits: AddressLimits::default(),
            max_errors: 20,
            max_received_headers: 100,
            bare_line_endings: BareLineEndings::Reject,
            starttls: false,
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Every input byte was used: send the output, then read more.
    NeedInput,
    /// A MAIL command awaits [`ServerSession::mail_verdict`]; see [`ServerSession::pending_mail`].
    Mail,
    /// A RCPT command awaits [`ServerSession::rcpt_verdict`]; see [`ServerSession::pending_rcpt`].
    Rcpt,
    /// A complete message awaits storage: take it with [`ServerSession::take_message`] and
    /// answer with [`ServerSession::message_verdict`].
    Message,
    /// The output ends with the 220 reply to STARTTLS. Send it, drop every byte read after the
    /// STARTTLS line (RFC 3207 section 4.2; CVE-2011-0411), run the TLS handshake, then call
    /// [`ServerSession::tls_started`].
    StartTls,
    /// Send the output and close the connection.
    Close,
}

/// The EHLO or HELO the client gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub name: Domain,
    /// EHLO rather than HELO: ESMTP extensions may be used.
    pub esmtp: bool,
}

/// One mail transaction, from MAIL to the end of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub mail: MailFrom,
    /// Accepted recipients, in order.
    pub recipients: Vec<RcptTo>,
    /// The message as received: dot-unstuffed (DATA) or concatenated chunks (BDAT).
    pub content: Vec<u8>,
    /// The message came with BDAT (RFC 3030).
    pub chunked: bool,
    /// RCPT commands tried, accepted or not; with none accepted, DATA gets 554 rather than 503.
    rcpt_attempts: usize,
}

#[derive(Debug)]
enum State {
    Command,
    AwaitMail(MailFrom),
    AwaitRcpt(RcptTo),
    Data(DataDecoder),
    /// Reading a BDAT chunk. With `discard`, the chunk is read and dropped and that reply is
    /// sent at its end (RFC 3030 section 2: the octets must be consumed to stay in sync).
    Bdat {
        remaining: u64,
        last: bool,
        discard: Option<Reply>,
    },
    AwaitMessage,
    Closed,
}

/// The server side of one SMTP session.
#[derive(Debug)]
pub struct ServerSession {
    config: Arc<SessionConfig>,
    state: State,
    greeting: Option<Greeting>,
    tls: bool,
    transaction: Option<Transaction>,
    lines: LineReader,
    output: Vec<u8>,
    errors: u32,
}

impl ServerSession {
    /// A new session; `tls` is true on implicit-TLS listeners (RFC 8314).
    pub fn new(config: Arc<SessionConfig>, tls: bool) -> ServerSession {
        let lines = LineReader::new(config.max_command_line + PARAMETER_ALLOWANCE);
        ServerSession {
            config,
            state: State::Command,
            greeting: None,
            tls,
            transaction: None,
            lines,
            output: Vec::with_capacity(512),
            errors: 0,
        }
    }

    /// Queues the 220 greeting (RFC 5321 section 4.3.1).
    pub fn greet(&mut self) {
        let text = format!("{} ESMTP Postilion", self.config.hostname);
        Reply::plain(220, text).write_to(&mut self.output);
    }

    /// Replies waiting to be sent.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Marks the output as sent.
    pub fn clear_output(&mut self) {
        self.output.clear();
    }

    /// Queues a reply chosen by the driver (timeouts, shutdown); a closing reply ends the session.
    pub fn send(&mut self, reply: Reply) {
        if reply.close {
            self.state = State::Closed;
        }
        reply.write_to(&mut self.output);
    }

    pub fn greeting(&self) -> Option<&Greeting> {
        self.greeting.as_ref()
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// True while message data is being received; a graceful shutdown lets these finish.
    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data(_) | State::Bdat { .. })
            || self.transaction.as_ref().is_some_and(|t| t.chunked)
    }

    pub fn transaction(&self) -> Option<&Transaction> {
        self.transaction.as_ref()
    }

    pub fn pending_mail(&self) -> Option<&MailFrom> {
        match &self.state {
            State::AwaitMail(mail) => Some(mail),
            _ => None,
        }
    }

    pub fn pending_rcpt(&self) -> Option<&RcptTo> {
        match &self.state {
            State::AwaitRcpt(rcpt) => Some(rcpt),
            _ => None,
        }
    }

    /// Consumes input until an event needs the driver. Returns how many bytes were used; the
    /// rest must be fed again after the event is handled (except after `StartTls` and `Close`).
    pub fn feed(&mut self, input: &[u8]) -> (usize, Event) {
        let mut pos = 0;
        loop {
            match &mut self.state {
                State::Closed => return (input.len(), Event::Close),
                State::AwaitMail(_) => return (pos, Event::Mail),
                State::AwaitRcpt(_) => return (pos, Event::Rcpt),
                State::AwaitMessage => return (pos, Event::Message),
                State::Bdat { remaining, last, discard } => {
                    let n = (*remaining).min((input.len() - pos) as u64) as usize;
                    if discard.is_none()
                        && let Some(transaction) = self.transaction.as_mut()
                    {
                        transaction.content.extend_from_slice(&input[pos..pos + n]);
                    }
                    *remaining -= n as u64;
                    pos += n;
                    if *remaining > 0 {
                        return (pos, Event::NeedInput);
                    }
                    let (last, discard) = (*last, discard.take());
                    self.state = State::Command;
                    if let Some(event) = self.end_chunk(last, discard) {
                        return (pos, event);
                    }
                }
                State::Data(decoder) => {
                    let Some(transaction) = self.transaction.as_mut() else {
                        self.state = State::Command;
                        continue;
                    };
                    match decoder.decode(&input[pos..], &mut transaction.content) {
                        DataProgress::NeedMore => return (input.len(), Event::NeedInput),
                        DataProgress::BareLineEnding => {
                            self.transaction = None;
                            self.send(reply::BARE_LINE_ENDING.and_close());
                            return (input.len(), Event::Close);
                        }
                        DataProgress::End { consumed } => {
                            pos += consumed;
                            let defect = decoder.defect();
                            self.state = State::Command;
                            if let Some(event) = self.end_message(defect) {
                                return (pos, event);
                            }
                        }
                    }
                }
                State::Command => {
                    if pos == input.len() {
                        return (pos, Event::NeedInput);
                    }
                    let limits = self.config.address_limits;
                    let (n, read) = self.lines.read(&input[pos..]);
                    pos += n;
                    let parsed = match read {
                        LineRead::Incomplete => return (pos, Event::NeedInput),
                        LineRead::TooLong => Err(reply::LINE_TOO_LONG),
                        LineRead::Line(line) => {
                            // MAIL and RCPT may use the parameter allowance; nothing else may
                            // exceed the base limit.
                            let too_long = line.len() + 2 > self.config.max_command_line;
                            match parse_command(line, &limits) {
                                Ok(command @ (Command::Mail(_) | Command::Rcpt(_))) => Ok(command),
                                _ if too_long => Err(reply::LINE_TOO_LONG),
                                Ok(command) => Ok(command),
                                Err(error) => Err(Reply::from(&error)),
                            }
                        }
                    };
                    self.lines.clear();
                    let outcome = match parsed {
                        Ok(command) => self.command(command),
                        Err(reply) => self.fail(reply),
                    };
                    if let Some(event) = outcome {
                        if event == Event::StartTls {
                            // Nothing after the STARTTLS line may be used (RFC 3207 section 4.2).
                            return (input.len(), event);
                        }
                        return (pos, event);
                    }
                }
            }
        }
    }

    /// Answers a pending MAIL: `Ok` accepts the sender, `Err` refuses it with that reply.
    pub fn mail_verdict(&mut self, verdict: Result<(), Reply>) {
        let State::AwaitMail(mail) = std::mem::replace(&mut self.state, State::Command) else {
            return;
        };
        match verdict {
            Ok(()) => {
                self.transaction = Some(Transaction {
                    mail,
                    recipients: Vec::new(),
                    content: Vec::new(),
                    chunked: false,
                    rcpt_attempts: 0,
                });
                self.send(reply::SENDER_OK);
            }
            Err(reply) => {
                let _ = self.fail(reply);
            }
        }
    }

    /// Answers a pending RCPT: `Ok` accepts the recipient, `Err` refuses it with that reply.
    pub fn rcpt_verdict(&mut self, verdict: Result<(), Reply>) {
        let State::AwaitRcpt(rcpt) = std::mem::replace(&mut self.state, State::Command) else {
            return;
        };
        let Some(transaction) = self.transaction.as_mut() else {
            return;
        };
        transaction.rcpt_attempts += 1;
        match verdict {
            Ok(()) => {
                transaction.recipients.push(rcpt);
                self.send(reply::RECIPIENT_OK);
            }
            Err(reply) => {
                let _ = self.fail(reply);
            }
        }
    }

    /// Hands the completed message to the driver (once, after [`Event::Message`]).
    pub fn take_message(&mut self) -> Option<Transaction> {
        match self.state {
            State::AwaitMessage => self.transaction.take(),
            _ => None,
        }
    }

    /// Answers the stored (or refused) message; the transaction is over either way.
    pub fn message_verdict(&mut self, reply: Reply) {
        if !matches!(self.state, State::AwaitMessage) {
            return;
        }
        self.state = State::Command;
        self.transaction = None;
        if reply.is_positive() {
            self.send(reply);
        } else {
            let _ = self.fail(reply);
        }
    }

    /// The TLS handshake after STARTTLS succeeded: the session starts over (RFC 3207 section
    /// 4.2: the server MUST discard any knowledge obtained from the client, such as the EHLO).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.greeting = None;
        self.transaction = None;
        self.lines.reset();
        self.state = State::Command;
    }

    fn command(&mut self, command: Command) -> Option<Event> {
        match command {
            Command::Ehlo(name) => {
                self.greet_client(name, true);
                let reply = self.ehlo_reply();
                self.send(reply);
                None
            }
            Command::Helo(name) => {
                self.greet_client(name, false);
                self.send(Reply::plain(250, self.config.hostname.clone()));
                None
            }
            Command::Mail(mail) => self.mail(mail),
            Command::Rcpt(rcpt) => self.rcpt(rcpt),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.transaction = None;
                self.send(reply::RESET_OK);
                None
            }
            Command::Noop => {
                self.send(reply::OK);
                None
            }
            Command::Quit => {
                self.send(reply::BYE.and_close());
                Some(Event::Close)
            }
            Command::Vrfy(_) => {
                self.send(reply::VRFY_CANNOT_VERIFY);
                None
            }
            Command::Expn(_) => self.fail(reply::EXPN_DISABLED),
            Command::Help(_) => {
                self.send(reply::HELP);
                None
            }
            Command::StartTls => {
                if self.tls {
                    self.fail(reply::TLS_ALREADY_ACTIVE)
                } else if !self.config.starttls {
                    self.fail(reply::STARTTLS_UNAVAILABLE)
                } else if self.transaction.is_some() {
                    self.fail(reply::STARTTLS_IN_TRANSACTION)
                } else {
                    self.send(reply::READY_TO_START_TLS);
                    self.greeting = None;
                    self.lines.reset();
                    Some(Event::StartTls)
                }
            }
        }
    }

    /// RFC 5321 section 4.1.4: EHLO or HELO in a session resets any transaction, like RSET.
    fn greet_client(&mut self, name: Domain, esmtp: bool) {
        self.transaction = None;
        self.greeting = Some(Greeting { name, esmtp });
    }

    fn ehlo_reply(&self) -> Reply {
        let mut text = format!(
            "{}\nPIPELINING\nSIZE {}\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES\nCHUNKING\nBINARYMIME\nDSN\nHELP",
            self.config.hostname, self.config.max_message_size
        );
        if self.config.starttls && !self.tls {
            text.push_str("\nSTARTTLS");
        }
        Reply::plain(250, text)
    }

    fn mail(&mut self, mail: MailFrom) -> Option<Event> {
        let Some(greeting) = &self.greeting else {
            return self.fail(reply::NEED_HELO);
        };
        if self.transaction.is_some() {
            return self.fail(reply::NESTED_MAIL);
        }
        if mail.has_parameters && !greeting.esmtp {
            return self.fail(reply::PARAMETERS_NEED_EHLO);
        }
        // RFC 6531 section 3.4: without SMTPUTF8, a non-ASCII address MUST be refused.
        if let ReversePath::Mailbox(mailbox) = &mail.path
            && !mail.smtputf8
            && !mailbox.is_ascii()
        {
            return self.fail(reply::NEEDS_SMTPUTF8);
        }
        // RFC 1870 section 6.1: a declared size over the limit gets 552 at MAIL time.
        if mail.size.is_some_and(|size| size > self.config.max_message_size) {
            return self.fail(reply::MESSAGE_TOO_BIG);
        }
        self.state = State::AwaitMail(mail);
        Some(Event::Mail)
    }

    fn rcpt(&mut self, rcpt: RcptTo) -> Option<Event> {
        let (Some(greeting), Some(transaction)) = (&self.greeting, &self.transaction) else {
            return self.fail(reply::NEED_MAIL);
        };
        if rcpt.has_parameters && !greeting.esmtp {
            return self.fail(reply::PARAMETERS_NEED_EHLO);
        }
        if let ForwardPath::Mailbox(mailbox) = &rcpt.path
            && !transaction.mail.smtputf8
            && !mailbox.is_ascii()
        {
            return self.fail(reply::NEEDS_SMTPUTF8);
        }
        if transaction.recipients.len() >= self.config.max_recipients {
            // RFC 5321 section 4.5.3.1.10: 452 and the client sends the rest later. A client
            // doing what the RFC asks is not misbehaving, so this is not counted as an error.
            self.send(reply::TOO_MANY_RECIPIENTS);
            return None;
        }
        self.state = State::AwaitRcpt(rcpt);
        Some(Event::Rcpt)
    }

    fn data(&mut self) -> Option<Event> {
        let Some(transaction) = &self.transaction else {
            return self.fail(if self.greeting.is_some() {
                reply::NEED_MAIL
            } else {
                reply::NEED_HELO
            });
        };
        if transaction.chunked {
            return self.fail(reply::DATA_AFTER_BDAT);
        }
        if transaction.recipients.is_empty() {
            return self.fail(if transaction.rcpt_attempts == 0 {
                reply::NEED_RCPT
            } else {
                reply::NO_VALID_RECIPIENTS
            });
        }
        if transaction.mail.body == Some(BodyType::BinaryMime) {
            return self.fail(reply::BINARYMIME_NEEDS_BDAT);
        }
        self.send(reply::START_DATA);
        self.state = State::Data(DataDecoder::new(
            self.config.bare_line_endings,
            self.config.max_message_size,
            self.config.max_data_line,
        ));
        None
    }

    fn bdat(&mut self, size: u64, last: bool) -> Option<Event> {
        if size > self.config.max_message_size {
            // Reading and dropping that much would keep the connection busy for nothing; the
            // stream cannot be resynchronised any other way, so the session ends.
            self.transaction = None;
            self.send(reply::BDAT_CHUNK_TOO_BIG.and_close());
            return Some(Event::Close);
        }
        let discard = match &mut self.transaction {
            None => Some(reply::BDAT_WITHOUT_TRANSACTION),
            Some(transaction) if transaction.recipients.is_empty() => {
                Some(if transaction.rcpt_attempts == 0 {
                    reply::NEED_RCPT
                } else {
                    reply::NO_VALID_RECIPIENTS
                })
            }
            Some(transaction) => {
                transaction.chunked = true;
                if transaction.content.len() as u64 + size > self.config.max_message_size {
                    Some(reply::MESSAGE_TOO_BIG)
                } else {
                    transaction.content.reserve(size as usize);
                    None
                }
            }
        };
        self.state = State::Bdat { remaining: size, last, discard };
        None
    }

    fn end_chunk(&mut self, last: bool, discard: Option<Reply>) -> Option<Event> {
        if let Some(reply) = discard {
            // RFC 3030 section 2: after a failed chunk the transaction is over.
            if reply.code == reply::MESSAGE_TOO_BIG.code {
                self.transaction = None;
            }
            return self.fail(reply);
        }
        if last {
            return self.end_message(None);
        }
        let received = self.transaction.as_ref().map_or(0, |t| t.content.len());
        self.send(Reply::owned(
            250,
            reply::EnhancedStatus(2, 0, 0),
            format!("{received} octets received"),
        ));
        None
    }

    fn end_message(&mut self, defect: Option<DataDefect>) -> Option<Event> {
        let refusal = match defect {
            Some(DataDefect::TooBig) => Some(reply::MESSAGE_TOO_BIG),
            Some(DataDefect::LineTooLong) => Some(reply::DATA_LINE_TOO_LONG),
            None => {
                let hops =
                    self.transaction.as_ref().map_or(0, |t| count_received_headers(&t.content));
                (hops > self.config.max_received_headers).then_some(reply::MAIL_LOOP)
            }
        };
        if let Some(reply) = refusal {
            self.transaction = None;
            return self.fail(reply);
        }
        self.state = State::AwaitMessage;
        Some(Event::Message)
    }

    /// Sends a failure reply and counts it; past the error limit the session ends.
    fn fail(&mut self, reply: Reply) -> Option<Event> {
        self.send(reply);
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            self.transaction = None;
            self.send(reply::TOO_MANY_ERRORS.and_close());
            return Some(Event::Close);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::BareLineEndings;

    /// A driver with fixed policy: every sender is accepted, recipients whose local part
    /// starts with "unknown" are refused, and messages are "queued as TEST".
    struct Driver {
        session: ServerSession,
        messages: Vec<Transaction>,
        starttls: usize,
        closed: bool,
    }

    impl Driver {
        fn new(config: SessionConfig) -> Driver {
            Driver::with_tls(config, false)
        }

        fn with_tls(config: SessionConfig, tls: bool) -> Driver {
            let mut session = ServerSession::new(Arc::new(config), tls);
            session.greet();
            session.clear_output();
            Driver { session, messages: Vec::new(), starttls: 0, closed: false }
        }

        /// Feeds the bytes in one piece and returns the replies produced.
        fn run(&mut self, input: &[u8]) -> String {
            self.feed(input);
            self.take()
        }

        fn feed(&mut self, mut input: &[u8]) {
            loop {
                let (used, event) = self.session.feed(input);
                input = &input[used..];
                match event {
                    Event::NeedInput => {
                        assert!(input.is_empty());
                        return;
                    }
                    Event::Mail => self.session.mail_verdict(Ok(())),
                    Event::Rcpt => {
                        let rcpt = self.session.pending_rcpt().unwrap();
                        let refused = match &rcpt.path {
                            ForwardPath::Mailbox(m) => m.local_part.starts_with("unknown"),
                            ForwardPath::Postmaster => false,
                        };
                        self.session.rcpt_verdict(if refused {
                            Err(reply::NO_SUCH_USER)
                        } else {
                            Ok(())
                        });
                    }
                    Event::Message => {
                        let message = self.session.take_message().unwrap();
                        self.messages.push(message);
                        self.session.message_verdict(Reply::new(
                            250,
                            reply::EnhancedStatus(2, 0, 0),
                            "Ok: queued as TEST",
                        ));
                    }
                    Event::StartTls => {
                        assert!(input.is_empty(), "bytes after STARTTLS must be dropped");
                        self.starttls += 1;
                        self.session.tls_started();
                        return;
                    }
                    Event::Close => {
                        self.closed = true;
                        return;
                    }
                }
            }
        }

        fn take(&mut self) -> String {
            let out = String::from_utf8(self.session.output().to_vec()).unwrap();
            self.session.clear_output();
            out
        }
    }

    fn codes(output: &str) -> Vec<&str> {
        output.lines().filter(|l| l.as_bytes().get(3) == Some(&b' ')).map(|l| &l[..3]).collect()
    }

    fn ehlo() -> Driver {
        let mut driver = Driver::new(SessionConfig::default());
        driver.run(b"EHLO client.example\r\n");
        driver
    }

    #[test]
    fn greeting_and_ehlo() {
        let mut session = ServerSession::new(Arc::new(SessionConfig::default()), false);
        session.greet();
        assert_eq!(session.output(), b"220 localhost ESMTP Postilion\r\n");
        let mut driver = Driver::new(SessionConfig { starttls: true, ..SessionConfig::default() });
        let out = driver.run(b"ehlo client.example\r\n");
        assert_eq!(
            out,
            "250-localhost\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n\
             250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250-DSN\r\n250-HELP\r\n250 STARTTLS\r\n"
        );
        assert_eq!(driver.run(b"HELO client.example\r\n"), "250 localhost\r\n");
    }

    #[test]
    fn starttls_not_offered_without_config_or_under_tls() {
        let out = Driver::new(SessionConfig::default()).run(b"EHLO a\r\n");
        assert!(!out.contains("STARTTLS"));
        let config = SessionConfig { starttls: true, ..SessionConfig::default() };
        let out = Driver::with_tls(config, true).run(b"EHLO a\r\nSTARTTLS\r\n");
        assert!(!out.contains("STARTTLS"));
        assert!(out.ends_with("503 5.5.1 TLS already active\r\n"));
        let out = Driver::new(SessionConfig::default()).run(b"EHLO a\r\nSTARTTLS\r\n");
        assert!(out.ends_with("502 5.5.1 STARTTLS not available\r\n"));
    }

    #[test]
    fn complete_transaction_with_data() {
        let mut driver = ehlo();
        let out = driver.run(b"MAIL FROM:<alice@example.org>\r\n");
        assert_eq!(out, "250 2.1.0 Sender ok\r\n");
        assert_eq!(driver.run(b"RCPT TO:<bob@localhost>\r\n"), "250 2.1.5 Recipient ok\r\n");
        assert_eq!(driver.run(b"DATA\r\n"), "354 2.0.0 End data with <CR><LF>.<CR><LF>\r\n");
        assert_eq!(
            driver.run(b"Subject: hi\r\n\r\n..dot\r\n.\r\n"),
            "250 2.0.0 Ok: queued as TEST\r\n"
        );
        let message = &driver.messages[0];
        assert_eq!(message.content, b"Subject: hi\r\n\r\n.dot\r\n");
        assert_eq!(message.recipients.len(), 1);
        assert!(!message.chunked);
        assert_eq!(driver.run(b"QUIT\r\n"), "221 2.0.0 Bye\r\n");
        assert!(driver.closed);
    }

    #[test]
    fn pipelined_transactions_reply_in_order_at_any_split() {
        let input: &[u8] = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\nRCPT TO:<unknown@localhost>\r\n\
            RCPT TO:<y@localhost>\r\nDATA\r\nbody\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nBDAT 5\r\n12345BDAT 3 LAST\r\nabcNOOP\r\nQUIT\r\n";
        let expected = {
            let mut driver = Driver::new(SessionConfig::default());
            driver.run(input)
        };
        assert_eq!(
            codes(&expected),
            [
                "250", "250", "250", "550", "250", "354", "250", "250", "250", "250", "250", "250",
                "221"
            ]
        );
        for split in 0..input.len() {
            let mut driver = Driver::new(SessionConfig::default());
            driver.feed(&input[..split]);
            driver.feed(&input[split..]);
            assert_eq!(driver.take(), expected, "split at {split}");
            assert_eq!(driver.messages.len(), 2);
            assert_eq!(driver.messages[0].content, b"body\r\n");
            assert_eq!(driver.messages[0].recipients.len(), 2);
            assert_eq!(driver.messages[1].content, b"12345abc");
            assert!(driver.messages[1].chunked);
        }
    }

    #[test]
    fn sequence_errors() {
        let mut driver = Driver::new(SessionConfig::default());
        assert_eq!(driver.run(b"MAIL FROM:<a@b>\r\n"), "503 5.5.1 Send EHLO or HELO first\r\n");
        assert_eq!(driver.run(b"RCPT TO:<a@b>\r\n"), "503 5.5.1 Need MAIL command first\r\n");
        assert_eq!(driver.run(b"DATA\r\n"), "503 5.5.1 Send EHLO or HELO first\r\n");
        driver.run(b"EHLO c\r\n");
        assert_eq!(driver.run(b"DATA\r\n"), "503 5.5.1 Need MAIL command first\r\n");
        assert_eq!(driver.run(b"RCPT TO:<a@b>\r\n"), "503 5.5.1 Need MAIL command first\r\n");
        driver.run(b"MAIL FROM:<a@b>\r\n");
        assert_eq!(driver.run(b"MAIL FROM:<a@b>\r\n"), "503 5.5.1 Sender already specified\r\n");
        assert_eq!(driver.run(b"DATA\r\n"), "503 5.5.1 Need RCPT command first\r\n");
        driver.run(b"RCPT TO:<unknown1@localhost>\r\n");
        assert_eq!(driver.run(b"DATA\r\n"), "554 5.5.1 No valid recipients\r\n");
        assert_eq!(driver.run(b"RSET\r\n"), "250 2.0.0 Reset state\r\n");
        assert_eq!(driver.run(b"RCPT TO:<a@b>\r\n"), "503 5.5.1 Need MAIL command first\r\n");
    }

    #[test]
    fn ehlo_resets_the_transaction() {
        let mut driver = ehlo();
        driver.run(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\n");
        driver.run(b"EHLO again\r\n");
        assert_eq!(driver.run(b"DATA\r\n"), "503 5.5.1 Need MAIL command first\r\n");
    }

    #[test]
    fn simple_commands() {
        let mut driver = ehlo();
        assert_eq!(driver.run(b"NOOP\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(driver.run(b"noop whatever\r\n"), "250 2.0.0 Ok\r\n");
        assert!(driver.run(b"VRFY bob\r\n").starts_with("252 2.5.0 "));
        assert_eq!(driver.run(b"EXPN list\r\n"), "502 5.5.1 EXPN command not implemented\r\n");
        assert!(driver.run(b"HELP\r\n").starts_with("214-2.0.0 Commands:"));
        assert_eq!(driver.run(b"FOO\r\n"), "500 5.5.1 Command not recognized\r\n");
        assert!(driver.run(b"MAIL FROM:bad\r\n").starts_with("501 5.5.2 "));
        assert!(driver.run(b"MAIL FROM:<a@b> FOO=BAR\r\n").starts_with("555 5.5.4 "));
        assert!(driver.run(b"DATA now\r\n").starts_with("501 5.5.2 "));
    }

    #[test]
    fn helo_sessions_cannot_use_parameters() {
        let mut driver = Driver::new(SessionConfig::default());
        driver.run(b"HELO c\r\n");
        assert_eq!(
            driver.run(b"MAIL FROM:<a@b> SIZE=10\r\n"),
            "555 5.5.4 ESMTP parameters require EHLO\r\n"
        );
        assert!(driver.run(b"MAIL FROM:<a@b>\r\n").starts_with("250"));
        assert_eq!(
            driver.run(b"RCPT TO:<c@d> NOTIFY=NEVER\r\n"),
            "555 5.5.4 ESMTP parameters require EHLO\r\n"
        );
    }

    #[test]
    fn size_limits() {
        let config = SessionConfig { max_message_size: 100, ..SessionConfig::default() };
        let mut driver = Driver::new(config);
        driver.run(b"EHLO c\r\n");
        assert!(driver.run(b"MAIL FROM:<a@b> SIZE=101\r\n").starts_with("552 5.3.4 "));
        assert!(driver.run(b"MAIL FROM:<a@b> SIZE=100\r\n").starts_with("250"));
        driver.run(b"RCPT TO:<c@localhost>\r\nDATA\r\n");
        let mut body = b"x".repeat(99);
        body.extend_from_slice(b"\r\n.\r\n");
        assert!(driver.run(&body).starts_with("552 5.3.4 "), "101 octets with CRLF");
        assert!(driver.messages.is_empty());
        driver.run(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\nDATA\r\n");
        let mut body = b"x".repeat(98);
        body.extend_from_slice(b"\r\n.\r\n");
        assert!(driver.run(&body).starts_with("250"), "exactly 100 octets with CRLF");
    }

    #[test]
    fn too_many_recipients_is_452_and_not_an_error() {
        let config = SessionConfig { max_recipients: 3, max_errors: 2, ..SessionConfig::default() };
        let mut driver = Driver::new(config);
        driver.run(b"EHLO c\r\nMAIL FROM:<a@b>\r\n");
        let mut input = Vec::new();
        for i in 0..10 {
            input.extend_from_slice(format!("RCPT TO:<u{i}@localhost>\r\n").as_bytes());
        }
        let out = driver.run(&input);
        assert_eq!(
            codes(&out),
            ["250", "250", "250", "452", "452", "452", "452", "452", "452", "452"]
        );
        assert!(out.contains("452 4.5.3 Too many recipients"));
        assert!(!driver.closed);
        assert!(driver.run(b"DATA\r\n").starts_with("354"));
    }

    #[test]
    fn error_limit_closes_with_421() {
        let config = SessionConfig { max_errors: 3, ..SessionConfig::default() };
        let mut driver = Driver::new(config);
        let out = driver.run(b"BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n");
        assert_eq!(codes(&out), ["500", "500", "500", "421"]);
        assert!(out.ends_with("421 4.7.0 Too many errors, closing connection\r\n"));
        assert!(driver.closed && driver.session.is_closed());
    }

    #[test]
    fn ten_thousand_pipelined_commands() {
        let mut driver = ehlo();
        let input = b"NOOP\r\n".repeat(10_000);
        let out = driver.run(&input);
        assert_eq!(out.lines().count(), 10_000);
    }

    #[test]
    fn overlong_command_line_gets_500_and_session_continues() {
        let mut driver = ehlo();
        let mut line = b"NOOP ".to_vec();
        line.extend(std::iter::repeat_n(b'a', 600));
        line.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(driver.run(&line), "500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n");
        // MAIL may use the parameter allowance.
        let mut mail = b"MAIL FROM:<a@b> ENVID=".to_vec();
        mail.extend(std::iter::repeat_n(b'e', 100));
        mail.extend_from_slice(b" RET=HDRS SIZE=1000 BODY=8BITMIME\r\n");
        assert!(mail.len() < 512 + PARAMETER_ALLOWANCE);
        assert!(driver.run(&mail).starts_with("250"));
    }

    #[test]
    fn gigantic_line_does_not_grow_memory() {
        let mut driver = ehlo();
        let chunk = vec![b'A'; 1 << 20];
        for _ in 0..64 {
            driver.feed(&chunk);
            assert!(driver.session.output().is_empty());
        }
        assert_eq!(driver.run(b"\r\nNOOP\r\n"), "500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n");
    }

    #[test]
    fn nul_and_invalid_utf8_in_commands() {
        let mut driver = ehlo();
        assert!(driver.run(b"NO\x00OP\r\n").starts_with("500 5.5.2 "));
        assert!(driver.run(b"MAIL FROM:<\xff@b>\r\n").starts_with("500 5.5.2 "));
        assert!(driver.run(b"NOOP\r\n").starts_with("250"));
    }

    #[test]
    fn smtputf8_rules() {
        let mut driver = ehlo();
        assert!(
            driver.run("MAIL FROM:<jösé@example.org>\r\n".as_bytes()).starts_with("553 5.6.7 ")
        );
        assert!(
            driver.run("MAIL FROM:<jösé@example.org> SMTPUTF8\r\n".as_bytes()).starts_with("250")
        );
        assert!(driver.run("RCPT TO:<ünï@localhost>\r\n".as_bytes()).starts_with("250"));
        driver.run(b"RSET\r\nMAIL FROM:<a@b>\r\n");
        assert!(driver.run("RCPT TO:<ünï@localhost>\r\n".as_bytes()).starts_with("553 5.6.7 "));
    }

    #[test]
    fn bare_line_endings_rejected_by_default() {
        let mut driver = ehlo();
        driver.run(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\nDATA\r\n");
        let out = driver.run(b"line\n.\nMAIL FROM:<evil@x>\r\n");
        assert!(out.starts_with("521 5.5.2 "), "{out}");
        assert!(driver.closed);
        assert!(driver.messages.is_empty());
    }

    #[test]
    fn smuggling_in_normalize_mode_yields_one_message() {
        let config = SessionConfig {
            bare_line_endings: BareLineEndings::Normalize,
            ..SessionConfig::default()
        };
        for fake in [&b"\n.\n"[..], b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n"] {
            let mut driver = Driver::new(config.clone());
            let mut input =
                b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\nDATA\r\nhello".to_vec();
            input.extend_from_slice(fake);
            input.extend_from_slice(
                b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@localhost>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n",
            );
            let out = driver.run(&input);
            assert_eq!(codes(&out), ["250", "250", "250", "354", "250", "221"], "{fake:?}");
            assert_eq!(driver.messages.len(), 1, "{fake:?}");
            let content = &driver.messages[0].content;
            assert!(content.windows(8).any(|w| w == b"smuggled"));
        }
    }

    #[test]
    fn data_line_limit() {
        let mut driver = ehlo();
        driver.run(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\nDATA\r\n");
        let mut body = vec![b'x'; 1001];
        body.extend_from_slice(b"\r\n.\r\n");
        assert!(driver.run(&body).starts_with("550 5.6.0 "));
        assert!(driver.run(b"MAIL FROM:<a@b>\r\n").starts_with("250"), "transaction ended");
    }

    #[test]
    fn mail_loop_detection() {
        let config = SessionConfig { max_received_headers: 3, ..SessionConfig::default() };
        let mut driver = Driver::new(config);
        driver.run(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\nDATA\r\n");
        let out = driver.run(b"Received: 1\r\nReceived: 2\r\nReceived: 3\r\n\r\nx\r\n.\r\n");
        assert!(out.starts_with("250"));
        driver.run(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\nDATA\r\n");
        let out = driver
            .run(b"Received: 1\r\nReceived: 2\r\nReceived: 3\r\nReceived: 4\r\n\r\nx\r\n.\r\n");
        assert_eq!(out, "554 5.4.6 Too many Received headers: mail loop detected\r\n");
        assert_eq!(driver.messages.len(), 1);
    }

    #[test]
    fn bdat_chunks() {
        let mut driver = ehlo();
        driver.run(b"MAIL FROM:<a@b> BODY=BINARYMIME\r\nRCPT TO:<c@localhost>\r\n");
        assert_eq!(driver.run(b"BDAT 4\r\n\r\n.\n"), "250 2.0.0 4 octets received\r\n");
        assert_eq!(driver.run(b"BDAT 0\r\n"), "250 2.0.0 4 octets received\r\n");
        assert_eq!(driver.run(b"BDAT 3 LAST\r\n\x00\xff\r"), "250 2.0.0 Ok: queued as TEST\r\n");
        assert_eq!(driver.messages[0].content, b"\r\n.\n\x00\xff\r");
        driver.run(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\n");
        assert!(driver.run(b"BDAT 0 LAST\r\n").starts_with("250 2.0.0 Ok"));
        assert!(driver.messages[1].content.is_empty());
    }

    #[test]
    fn bdat_without_transaction_discards_the_chunk() {
        let mut driver = ehlo();
        let out = driver.run(b"BDAT 10\r\nQUIT\r\nQUITNOOP\r\n");
        assert_eq!(
            out,
            "503 5.5.1 BDAT chunk discarded: need MAIL and RCPT first\r\n250 2.0.0 Ok\r\n"
        );
        driver.run(b"MAIL FROM:<a@b>\r\n");
        assert_eq!(driver.run(b"BDAT 2 LAST\r\nxx"), "503 5.5.1 Need RCPT command first\r\n");
    }

    #[test]
    fn data_and_bdat_do_not_mix() {
        let mut driver = ehlo();
        driver.run(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\nBDAT 1\r\nx");
        assert_eq!(
            driver.run(b"DATA\r\n"),
            "503 5.5.1 DATA cannot follow BDAT in a transaction\r\n"
        );
        driver.run(b"RSET\r\nMAIL FROM:<a@b> BODY=BINARYMIME\r\nRCPT TO:<c@localhost>\r\n");
        assert_eq!(
            driver.run(b"DATA\r\n"),
            "503 5.5.1 BODY=BINARYMIME requires BDAT, not DATA\r\n"
        );
    }

    #[test]
    fn bdat_over_the_size_limit() {
        let config = SessionConfig { max_message_size: 10, ..SessionConfig::default() };
        let mut driver = Driver::new(config.clone());
        driver.run(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\nBDAT 6\r\n123456");
        let out = driver.run(b"BDAT 6 LAST\r\n123456NOOP\r\n");
        assert_eq!(codes(&out), ["552", "250"]);
        assert!(driver.messages.is_empty());
        assert!(driver.run(b"BDAT 1\r\nx").starts_with("503"), "transaction is over");
        let mut driver = Driver::new(config);
        driver.run(b"EHLO c\r\n");
        let out = driver.run(b"BDAT 18446744073709551615 LAST\r\nxxxx");
        assert!(out.starts_with("552 5.3.4 ") && driver.closed);
    }

    #[test]
    fn starttls_drops_pipelined_commands_and_forgets_the_session() {
        let config = SessionConfig { starttls: true, ..SessionConfig::default() };
        let mut driver = Driver::new(config);
        driver.run(b"EHLO c\r\n");
        let out = driver.run(b"STARTTLS\r\nMAIL FROM:<injected@x>\r\nRCPT TO:<c@localhost>\r\n");
        assert_eq!(out, "220 2.0.0 Ready to start TLS\r\n");
        assert_eq!(driver.starttls, 1);
        assert!(driver.session.is_tls());
        assert_eq!(driver.run(b"MAIL FROM:<a@b>\r\n"), "503 5.5.1 Send EHLO or HELO first\r\n");
        let out = driver.run(b"EHLO c\r\n");
        assert!(!out.contains("STARTTLS"));
        assert_eq!(driver.run(b"STARTTLS\r\n"), "503 5.5.1 TLS already active\r\n");
    }

    #[test]
    fn starttls_refused_in_a_transaction() {
        let config = SessionConfig { starttls: true, ..SessionConfig::default() };
        let mut driver = Driver::new(config);
        driver.run(b"EHLO c\r\nMAIL FROM:<a@b>\r\n");
        assert_eq!(
            driver.run(b"STARTTLS\r\n"),
            "503 5.5.1 STARTTLS not allowed during a mail transaction\r\n"
        );
    }

    /// RFC 5321 Appendix D.1, a typical SMTP transaction scenario.
    #[test]
    fn rfc5321_appendix_d1() {
        let mut driver =
            Driver::new(SessionConfig { hostname: "foo.com".into(), ..SessionConfig::default() });
        let mut session_out = String::new();
        for (command, code) in [
            ("EHLO bar.com", "250"),
            ("MAIL FROM:<Smith@bar.com>", "250"),
            ("RCPT TO:<Jones@foo.com>", "250"),
            ("RCPT TO:<unknownGreen@foo.com>", "550"),
            ("RCPT TO:<Brown@foo.com>", "250"),
            ("DATA", "354"),
        ] {
            let out = driver.run(format!("{command}\r\n").as_bytes());
            assert_eq!(codes(&out).last(), Some(&code), "{command}");
            session_out.push_str(&out);
        }
        let out = driver.run(b"Blah blah blah...\r\n...etc. etc. etc.\r\n.\r\n");
        assert!(out.starts_with("250"));
        assert_eq!(driver.messages[0].content, b"Blah blah blah...\r\n..etc. etc. etc.\r\n");
        assert_eq!(driver.messages[0].recipients.len(), 2);
        assert_eq!(driver.run(b"QUIT\r\n"), "221 2.0.0 Bye\r\n");
    }

    #[test]
    fn message_verdict_failure_counts_and_ends_transaction() {
        let mut driver = ehlo();
        driver.run(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@localhost>\r\nDATA\r\n");
        let (_, event) = driver.session.feed(b"x\r\n.\r\n");
        assert_eq!(event, Event::Message);
        assert!(driver.session.take_message().is_some());
        driver.session.message_verdict(reply::INSUFFICIENT_STORAGE);
        assert_eq!(driver.take(), "452 4.3.1 Insufficient system storage, try again later\r\n");
        assert_eq!(driver.run(b"DATA\r\n"), "503 5.5.1 Need MAIL command first\r\n");
    }

    #[test]
    fn case_insensitive_verbs() {
        let mut driver = Driver::new(SessionConfig::default());
        let out = driver.run(
            b"eHlO c\r\nmail from:<a@b>\r\nrcpt to:<c@localhost>\r\ndata\r\nx\r\n.\r\nquit\r\n",
        );
        assert_eq!(codes(&out), ["250", "250", "250", "354", "250", "221"]);
    }
}

//! One mail transaction from the client side: MAIL, RCPT, and the message with DATA or BDAT
//! (RFC 5321 section 3.3, RFC 2920 PIPELINING, RFC 3030 CHUNKING), with the ESMTP parameters
//! of SIZE, 8BITMIME, BINARYMIME, SMTPUTF8 and DSN.

use std::borrow::Cow;
use std::fmt;

use super::extensions::Extensions;
use super::reply::ServerReply;
use super::{ClientError, PROTOCOL_ERROR};
use crate::codec::dot_stuff;
use crate::reply::EnhancedStatus;
use crate::types::{BodyType, Notify, OriginalRecipient, Ret};

/// Longest ENVID sent, in characters before xtext encoding (RFC 3461 section 4.4: "MAY be up
/// to 100 characters").
const ENVID_MAX: usize = 100;
/// Longest ORCPT parameter sent (RFC 3461 section 4.2: "the entire ORCPT parameter MAY be up to
/// 500 characters in length").
const ORCPT_MAX: usize = 500;

/// X.4.2, "bad connection" (RFC 3463 section 3.5), transient.
const CONNECTION_LOST: EnhancedStatus = EnhancedStatus(4, 4, 2);

/// What is to be delivered, as the queue holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// The reverse-path in wire form without the angle brackets (`user@example.org`, a local
    /// part that needs quotes quoted); empty for the null sender `<>` of notifications.
    pub sender: String,
    /// How the message was declared when it was received (`BODY=`).
    pub body: BodyType,
    /// The content of an [`BodyType::EightBitMime`] message holds only 7-bit octets (see
    /// [`is_seven_bit`]), so it may go to a server without 8BITMIME.
    pub seven_bit_content: bool,
    /// The message needs SMTPUTF8 (it was received with it). Non-ASCII addresses need it
    /// whatever this says.
    pub smtputf8: bool,
    /// DSN `RET=` (RFC 3461 section 4.3).
    pub ret: Option<Ret>,
    /// DSN `ENVID=` (RFC 3461 section 4.4), decoded.
    pub envid: Option<String>,
    /// The message size in octets, for `SIZE=` (RFC 1870) and the server's size limit.
    pub size: u64,
    /// At least one.
    pub recipients: Vec<EnvelopeRecipient>,
}

/// One recipient of an [`Envelope`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvelopeRecipient {
    /// The forward-path in wire form without the angle brackets.
    pub address: String,
    /// DSN `NOTIFY=` (RFC 3461 section 4.1), as received.
    pub notify: Option<Notify>,
    /// DSN `ORCPT=` (RFC 3461 section 4.2), decoded, as received.
    pub orcpt: Option<OriginalRecipient>,
}

/// True when `content` may travel as 7-bit data: no octet above 127 and no NUL (RFC 2045
/// section 2.7). An 8BITMIME message whose content passes can go to a server without 8BITMIME
/// unchanged; see [`Envelope::seven_bit_content`].
pub fn is_seven_bit(content: &[u8]) -> bool {
    content.iter().all(|&b| b != 0 && b < 0x80)
}

/// Why a message cannot be sent to this server at all, decided before any command is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What every recipient gets; there is never a server reply behind it.
    pub error: ClientError,
    /// The refusal comes from what this server offers; another host for the same destination
    /// (the next MX) may accept the message.
    pub try_next_host: bool,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Refusal {}

/// What the driver must do after handing the transaction a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransactionStep {
    /// Write these bytes, then read the next reply.
    Send(Vec<u8>),
    /// Write the message framed by [`Transaction::frame_content`], then read the next reply.
    SendContent,
    /// Write nothing; read the next reply (the answer to the next pipelined command).
    ReadReply,
    /// The transaction is over.
    Done(TransactionOutcome),
}

/// How one recipient fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientResult {
    /// The server took responsibility for the message: the final reply to its content.
    Accepted(ServerReply),
    /// Not delivered: refused by the server at MAIL, RCPT, DATA or the end of the content, or
    /// undecided when the connection failed.
    Failed(ClientError),
}

/// What the connection is good for after a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterTransaction {
    /// Another transaction may start, or QUIT.
    Ready,
    /// The server may still hold part of this transaction: send
    /// [`ClientSession::rset`](super::ClientSession::rset) before another one.
    NeedsReset,
    /// The server is closing the connection (421), or it broke: send nothing more.
    Closing,
}

/// The result of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionOutcome {
    /// One result per recipient, in the order of [`Envelope::recipients`].
    pub recipients: Vec<RecipientResult>,
    /// MAIL was refused; every recipient failed with this.
    pub mail_failure: Option<ClientError>,
    /// See [`Transaction::dsn_passed_on`].
    pub dsn_passed_on: bool,
    /// Whether the connection can carry another transaction.
    pub connection: AfterTransaction,
}

/// The message on the wire, in up to three parts so that large content is written from the
/// caller's buffer rather than copied (one vectored write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramedContent<'a> {
    head: Vec<u8>,
    body: Cow<'a, [u8]>,
    tail: &'static [u8],
}

impl FramedContent<'_> {
    /// The parts, to be written in order; some may be empty.
    pub fn parts(&self) -> [&[u8]; 3] {
        [&self.head, &self.body, self.tail]
    }

    /// The parts in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts().concat()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Awaiting the reply to MAIL.
    Mail,
    /// Awaiting the reply to the RCPT of this recipient.
    Rcpt(usize),
    /// Awaiting the reply to DATA.
    Data,
    /// The content was sent; awaiting the final reply.
    Content,
    /// Awaiting the reply to the lone "." sent after an unwanted 354.
    EmptyMessage,
    Done(TransactionOutcome),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RecipientState {
    /// No reply to its RCPT yet.
    Waiting,
    /// RCPT accepted; its fate is the final reply's.
    Accepted,
    Decided(RecipientResult),
}

/// One mail transaction on a session that said [`SessionStep::Ready`](super::SessionStep).
///
/// With PIPELINING, MAIL, every RCPT and DATA go out in one write: RFC 2920 section 3.1 lets
/// MAIL and RCPT appear anywhere in a group and DATA only last. The replies are then taken one
/// by one, "correlating that count with the number of commands known to have been issued".
/// Without PIPELINING, each command waits for the reply to the one before. With CHUNKING the
/// message goes as one `BDAT <size> LAST` chunk, sent only once the RCPT replies show that
/// someone will receive it (RFC 3030 section 2: "after all MAIL and RCPT responses are
/// collected and processed"); otherwise with DATA.
///
/// A large group goes out in one write while the server's replies wait to be read. RFC 2920
/// section 3.1 warns that a client that does not read while it writes can deadlock if neither
/// side's buffers take the group; with the usual socket buffers, replies to a few hundred
/// recipients fit easily.
#[derive(Debug)]
pub struct Transaction {
    /// One RCPT command line per recipient, CRLF included.
    rcpts: Vec<Vec<u8>>,
    pipelining: bool,
    /// The content goes with BDAT rather than DATA.
    chunking: bool,
    dsn_passed_on: bool,
    phase: Phase,
    recipients: Vec<RecipientState>,
    mail_failure: Option<ClientError>,
}

impl Transaction {
    /// Starts a transaction: checks that the server can take the message, and returns the
    /// transaction with the bytes to write first (MAIL, or the whole pipelined group).
    pub fn begin(
        extensions: &Extensions,
        envelope: &Envelope,
    ) -> Result<(Transaction, Vec<u8>), Refusal> {
        check_addresses(envelope)?;
        let smtputf8 = envelope.smtputf8
            || !envelope.sender.is_ascii()
            || envelope.recipients.iter().any(|r| !r.address.is_ascii());
        check_capabilities(extensions, envelope, smtputf8)?;

        let mut first = mail_command(extensions, envelope, smtputf8);
        let rcpts: Vec<Vec<u8>> =
            envelope.recipients.iter().map(|r| rcpt_command(extensions, r)).collect();
        let chunking = extensions.chunking;
        let pipelining = extensions.pipelining;
        if pipelining {
            for rcpt in &rcpts {
                first.extend_from_slice(rcpt);
            }
            if !chunking {
                first.extend_from_slice(b"DATA\r\n");
            }
        }
        let transaction = Transaction {
            rcpts,
            pipelining,
            chunking,
            dsn_passed_on: extensions.dsn,
            phase: Phase::Mail,
            recipients: vec![RecipientState::Waiting; envelope.recipients.len()],
            mail_failure: None,
        };
        Ok((transaction, first))
    }

    /// True when the server offers DSN, so the DSN parameters went with the message and the
    /// server is now responsible for notifications. When false, RFC 3461 section 5.2.2 puts
    /// them on us: a recipient with `NOTIFY=SUCCESS` that the server accepts MUST get a
    /// "relayed" notice from our side.
    pub fn dsn_passed_on(&self) -> bool {
        self.dsn_passed_on
    }

    /// Takes the next reply, in the order the commands were sent.
    pub fn on_reply(&mut self, reply: ServerReply) -> TransactionStep {
        if reply.code == 421 && !matches!(self.phase, Phase::Done(_)) {
            // RFC 5321 section 3.8: the server is shutting down the channel; no replies to the
            // rest of a pipelined group will come.
            let error = ClientError::refused("server closing connection", reply);
            if self.phase == Phase::Mail {
                // Nothing of this transaction was taken: another host may do better.
                self.mail_failure = Some(error.clone());
            }
            return self.done(RecipientResult::Failed(error), AfterTransaction::Closing);
        }
        match self.phase {
            Phase::Mail => self.mail_reply(reply),
            Phase::Rcpt(index) => self.rcpt_reply(index, reply),
            Phase::Data => self.data_reply(reply),
            Phase::Content => self.content_reply(reply),
            // Everyone was decided before the lone dot went out; the transaction is over
            // whatever the server says to it.
            Phase::EmptyMessage => self.done(nobody_accepted(), AfterTransaction::Ready),
            Phase::Done(ref outcome) => TransactionStep::Done(outcome.clone()),
        }
    }

    /// The message as it goes on the wire after [`TransactionStep::SendContent`].
    ///
    /// With BDAT, a `BDAT <size> LAST` line and the content as it is: chunks are counted in
    /// octets, so nothing in them needs escaping. With DATA, the content made transparent
    /// (RFC 5321 section 4.5.2): a "." starting a line is doubled, a bare CR or LF becomes
    /// CRLF (section 2.3.8: they "MUST NOT" be sent, and a server that reads them as line
    /// endings must not find an end of data we did not mean), the last line gets its CRLF,
    /// and "." CRLF ends the data. Content that needs none of this is not copied.
    pub fn frame_content<'a>(&self, content: &'a [u8]) -> FramedContent<'a> {
        if self.chunking {
            return FramedContent {
                head: format!("BDAT {} LAST\r\n", content.len()).into_bytes(),
                body: Cow::Borrowed(content),
                tail: b"",
            };
        }
        if needs_transparency(content) {
            let mut stuffed = Vec::with_capacity(content.len() + content.len() / 64 + 5);
            dot_stuff(content, &mut stuffed);
            return FramedContent { head: Vec::new(), body: Cow::Owned(stuffed), tail: b"" };
        }
        let tail: &[u8] =
            if content.is_empty() || content.ends_with(b"\r\n") { b".\r\n" } else { b"\r\n.\r\n" };
        FramedContent { head: Vec::new(), body: Cow::Borrowed(content), tail }
    }

    /// The outcome when the connection failed before the transaction was done: every
    /// recipient not yet decided fails transiently. RFC 5321 section 3.8: a client that loses
    /// the connection "SHOULD ... treat the mail transaction as if a 451 response had been
    /// received". A transaction that is already done keeps its outcome.
    pub fn abort(mut self, reason: &str) -> TransactionOutcome {
        if let Phase::Done(outcome) = self.phase {
            return outcome;
        }
        let error = ClientError::local(CONNECTION_LOST, reason);
        self.finish(RecipientResult::Failed(error), AfterTransaction::Closing)
    }

    fn mail_reply(&mut self, reply: ServerReply) -> TransactionStep {
        if reply.is_positive() {
            self.phase = Phase::Rcpt(0);
            return self.next_rcpt(0);
        }
        let error = ClientError::refused("MAIL FROM refused", reply);
        self.mail_failure = Some(error.clone());
        if !self.pipelining {
            return self.done(RecipientResult::Failed(error), AfterTransaction::Ready);
        }
        // The RCPT (and DATA) replies of the group are still on their way and must be read;
        // they no longer matter.
        for recipient in &mut self.recipients {
            *recipient = RecipientState::Decided(RecipientResult::Failed(error.clone()));
        }
        self.phase = Phase::Rcpt(0);
        TransactionStep::ReadReply
    }

    fn rcpt_reply(&mut self, index: usize, reply: ServerReply) -> TransactionStep {
        if self.mail_failure.is_none() {
            self.recipients[index] = if reply.is_positive() {
                RecipientState::Accepted
            } else {
                let error = ClientError::refused("RCPT TO refused", reply);
                RecipientState::Decided(RecipientResult::Failed(error))
            };
        }
        let next = index + 1;
        if next < self.rcpts.len() {
            self.phase = Phase::Rcpt(next);
            return self.next_rcpt(next);
        }
        if self.pipelining && !self.chunking {
            // DATA was part of the group; its reply comes next.
            self.phase = Phase::Data;
            return TransactionStep::ReadReply;
        }
        if let Some(error) = self.mail_failure.clone() {
            return self.done(RecipientResult::Failed(error), AfterTransaction::Ready);
        }
        if !self.any_accepted() {
            // MAIL was accepted: the server holds a transaction without recipients.
            return self.done(nobody_accepted(), AfterTransaction::NeedsReset);
        }
        if self.chunking {
            self.phase = Phase::Content;
            TransactionStep::SendContent
        } else {
            self.phase = Phase::Data;
            TransactionStep::Send(b"DATA\r\n".to_vec())
        }
    }

    fn data_reply(&mut self, reply: ServerReply) -> TransactionStep {
        if reply.is_intermediate() {
            if self.mail_failure.is_none() && self.any_accepted() {
                self.phase = Phase::Content;
                return TransactionStep::SendContent;
            }
            // RFC 2920 section 3.1: "if none of the RCPT TO recipient addresses were accepted
            // the client must then check the response to the DATA command ... if the DATA
            // command was accepted the client SMTP should send a single dot."
            self.phase = Phase::EmptyMessage;
            return TransactionStep::Send(b".\r\n".to_vec());
        }
        let error = ClientError::refused("DATA refused", reply);
        let connection = if self.mail_failure.is_some() {
            AfterTransaction::Ready
        } else {
            AfterTransaction::NeedsReset
        };
        self.done(RecipientResult::Failed(error), connection)
    }

    /// The final reply, after the end of data or the last BDAT chunk, decides for every
    /// recipient accepted at RCPT (RFC 5321 section 4.2.5).
    fn content_reply(&mut self, reply: ServerReply) -> TransactionStep {
        if reply.is_positive() {
            return self.done(RecipientResult::Accepted(reply), AfterTransaction::Ready);
        }
        let error = ClientError::refused("message refused", reply);
        // RFC 3030 section 2: after a failed BDAT "a RSET command MUST be issued to clear the
        // transaction before additional commands may be sent". After the end of DATA the
        // transaction is over either way.
        let connection =
            if self.chunking { AfterTransaction::NeedsReset } else { AfterTransaction::Ready };
        self.done(RecipientResult::Failed(error), connection)
    }

    fn next_rcpt(&self, index: usize) -> TransactionStep {
        if self.pipelining {
            TransactionStep::ReadReply
        } else {
            TransactionStep::Send(self.rcpts[index].clone())
        }
    }

    fn any_accepted(&self) -> bool {
        self.recipients.contains(&RecipientState::Accepted)
    }

    fn done(
        &mut self,
        undecided: RecipientResult,
        connection: AfterTransaction,
    ) -> TransactionStep {
        TransactionStep::Done(self.finish(undecided, connection))
    }

    /// Ends the transaction: recipients still waiting for a decision get `undecided`.
    fn finish(
        &mut self,
        undecided: RecipientResult,
        connection: AfterTransaction,
    ) -> TransactionOutcome {
        let recipients = self
            .recipients
            .iter()
            .map(|state| match state {
                RecipientState::Decided(result) => result.clone(),
                RecipientState::Waiting | RecipientState::Accepted => undecided.clone(),
            })
            .collect();
        let outcome = TransactionOutcome {
            recipients,
            mail_failure: self.mail_failure.clone(),
            dsn_passed_on: self.dsn_passed_on,
            connection,
        };
        self.phase = Phase::Done(outcome.clone());
        outcome
    }
}

/// What undecided recipients get when none was accepted; there are none left by then, as
/// every RCPT was answered.
fn nobody_accepted() -> RecipientResult {
    RecipientResult::Failed(ClientError::local(PROTOCOL_ERROR, "no recipient accepted"))
}

/// Addresses go into command lines verbatim, so one with a control character (a CR or LF
/// would end the command early) must never be sent. The queue only holds addresses our
/// parser accepted, which excludes them; this guards the command stream all the same.
fn check_addresses(envelope: &Envelope) -> Result<(), Refusal> {
    let bad = |status: EnhancedStatus, what: &str| Refusal {
        error: ClientError::local(status, format!("{what} address contains control characters")),
        try_next_host: false,
    };
    if envelope.sender.chars().any(char::is_control) {
        // X.1.7, "bad sender's mailbox address syntax".
        return Err(bad(EnhancedStatus(5, 1, 7), "sender"));
    }
    if envelope
        .recipients
        .iter()
        .any(|r| r.address.is_empty() || r.address.chars().any(char::is_control))
    {
        // X.1.3, "bad destination mailbox address syntax".
        return Err(bad(EnhancedStatus(5, 1, 3), "recipient"));
    }
    if envelope.recipients.is_empty() {
        return Err(Refusal {
            error: ClientError::local(EnhancedStatus(5, 5, 0), "no recipients"),
            try_next_host: false,
        });
    }
    Ok(())
}

/// Refuses a message the server cannot take as it is. Each of these depends on what this
/// server offers, so another host for the same destination may do better.
fn check_capabilities(
    extensions: &Extensions,
    envelope: &Envelope,
    smtputf8: bool,
) -> Result<(), Refusal> {
    let refuse = |status: EnhancedStatus, reason: String| {
        Err(Refusal { error: ClientError::local(status, reason), try_next_host: true })
    };
    if smtputf8 && !extensions.smtputf8 {
        // RFC 6531 section 3.2: without SMTPUTF8 at the server, the client "MUST NOT transmit
        // an internationalized email address and MUST NOT transmit a mail message containing
        // internationalized mail headers"; X.6.7 (section 3.5) names the condition.
        return refuse(EnhancedStatus(5, 6, 7), "SMTPUTF8 required but not offered".into());
    }
    match envelope.body {
        BodyType::BinaryMime if !(extensions.binary_mime && extensions.chunking) => {
            // RFC 3030 section 3: "If a receiver-SMTP does not indicate support the BINARYMIME
            // message format then the sender-SMTP MUST NOT, under any circumstances, send
            // binary data"; BINARYMIME "can only be used with" CHUNKING. We do not convert
            // (X.6.3, "conversion required but not supported").
            return refuse(
                EnhancedStatus(5, 6, 3),
                "BINARYMIME message but BINARYMIME and CHUNKING not offered".into(),
            );
        }
        BodyType::EightBitMime if !extensions.eight_bit_mime && !envelope.seven_bit_content => {
            // RFC 6152 section 3: the client "must not, under any circumstances, attempt to
            // transfer a content that contains characters outside of the US-ASCII octet
            // range"; it may convert to 7-bit MIME or "treat the barrier to 8-bit as a
            // permanent error". We do not convert.
            return refuse(
                EnhancedStatus(5, 6, 3),
                "8-bit message but 8BITMIME not offered".into(),
            );
        }
        _ => {}
    }
    if let Some(limit) = extensions.size_limit()
        && envelope.size > limit
    {
        // RFC 1870 section 4: a message larger than the announced limit "will be rejected with
        // a permanent failure (552) reply code"; X.3.4, "message too big for system".
        return refuse(
            EnhancedStatus(5, 3, 4),
            format!("message size {} exceeds the server's limit of {limit}", envelope.size),
        );
    }
    Ok(())
}

/// `MAIL FROM:<reverse-path> [SP Mail-parameters] CRLF` (RFC 5321 section 4.1.1.2), with the
/// parameters the server announced support for.
fn mail_command(extensions: &Extensions, envelope: &Envelope, smtputf8: bool) -> Vec<u8> {
    let mut line = format!("MAIL FROM:<{}>", envelope.sender);
    if extensions.size.is_some() {
        // RFC 1870 section 6.
        line.push_str(&format!(" SIZE={}", envelope.size));
    }
    let body = match envelope.body {
        // RFC 3030 section 3: BINARYMIME "MUST be added".
        BodyType::BinaryMime => Some(BodyType::BinaryMime),
        // RFC 6152 section 3; a 7-bit message needs no BODY= at all. An 8-bit declaration
        // whose content is 7-bit goes without BODY= to a server without 8BITMIME.
        BodyType::EightBitMime if extensions.eight_bit_mime => Some(BodyType::EightBitMime),
        _ => None,
    };
    if let Some(body) = body {
        line.push_str(" BODY=");
        line.push_str(body.as_str());
    }
    if smtputf8 {
        // RFC 6531 section 3.4: the client "MUST supply the SMTPUTF8 parameter" when the
        // envelope or message requires it.
        line.push_str(" SMTPUTF8");
    }
    if extensions.dsn {
        // RFC 3461 section 5.2.1 (a), (b): RET and ENVID are relayed as received. An ENVID
        // beyond what the RFC allows would make the server refuse the whole message, so it is
        // left out instead.
        if let Some(ret) = envelope.ret {
            line.push_str(" RET=");
            line.push_str(ret.as_str());
        }
        if let Some(envid) = &envelope.envid
            && envid.chars().count() <= ENVID_MAX
        {
            line.push_str(" ENVID=");
            push_xtext(&mut line, envid);
        }
    }
    line.push_str("\r\n");
    line.into_bytes()
}

/// `RCPT TO:<forward-path> [SP Rcpt-parameters] CRLF` (RFC 5321 section 4.1.1.3).
fn rcpt_command(extensions: &Extensions, recipient: &EnvelopeRecipient) -> Vec<u8> {
    let mut line = format!("RCPT TO:<{}>", recipient.address);
    if extensions.dsn {
        // RFC 3461 section 5.2.1 (c), (d): NOTIFY and ORCPT are relayed as received. Without
        // DSN at the server, section 5.2.2 (a): they "MUST NOT be issued".
        if let Some(notify) = recipient.notify {
            line.push_str(&format!(" NOTIFY={notify}"));
        }
        if let Some(orcpt) = recipient.orcpt.as_ref().and_then(orcpt_parameter) {
            line.push(' ');
            line.push_str(&orcpt);
        }
    }
    line.push_str("\r\n");
    line.into_bytes()
}

/// `ORCPT=addr-type;xtext` (RFC 3461 section 4.2). A `utf-8` address, or any address that is
/// not ASCII (which `rfc822` may not carry), goes as RFC 6533 `utf-8-addr-xtext`, the form that
/// is safe "even when SMTPUTF8 SMTP extension is not advertised". `None` when the parameter
/// would be longer than the RFC allows or the address type is not an atom: the server would
/// refuse the recipient over a parameter that only serves notifications.
fn orcpt_parameter(orcpt: &OriginalRecipient) -> Option<String> {
    let mut parameter = String::from("ORCPT=");
    if orcpt.addr_type.eq_ignore_ascii_case("utf-8") || !orcpt.address.is_ascii() {
        let addr_type = if orcpt.address.is_ascii() { orcpt.addr_type.as_str() } else { "utf-8" };
        parameter.push_str(addr_type);
        parameter.push(';');
        push_utf8_addr_xtext(&mut parameter, &orcpt.address);
    } else {
        if !is_atom(&orcpt.addr_type) {
            return None;
        }
        parameter.push_str(&orcpt.addr_type);
        parameter.push(';');
        push_xtext(&mut parameter, &orcpt.address);
    }
    (parameter.len() <= ORCPT_MAX).then_some(parameter)
}

/// RFC 822 `atom`: what `addr-type` must be.
fn is_atom(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|b| matches!(b, b'!'..=b'~') && !b"()<>@,;:\\\".[]".contains(&b))
}

/// Appends `text` as xtext (RFC 3461 section 4): "any ASCII CHAR between '!' and '~'
/// inclusive, except for '+' and '='", as itself, every other octet as `+` and two upper case
/// hex digits.
fn push_xtext(out: &mut String, text: &str) {
    for b in text.bytes() {
        if matches!(b, b'!'..=b'~') && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
}

/// Appends `address` as `utf-8-addr-xtext = 1*(QCHAR / EmbeddedUnicodeChar)` (RFC 6533 section
/// 3): QCHAR is printable ASCII but `\`, `+` and `=`; everything else is `\x{HEXPOINT}`, the
/// code point in upper case hex with at least two digits.
fn push_utf8_addr_xtext(out: &mut String, address: &str) {
    for c in address.chars() {
        if matches!(c, '!'..='~') && !matches!(c, '\\' | '+' | '=') {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:02X}}}", u32::from(c)));
        }
    }
}

/// True when DATA content must be rewritten to be sent: a line starts with ".", or a CR or LF
/// is not part of a CRLF pair.
fn needs_transparency(content: &[u8]) -> bool {
    if content.first() == Some(&b'.') {
        return true;
    }
    let mut i = 0;
    while let Some(offset) = content[i..].iter().position(|&b| b == b'\r' || b == b'\n') {
        let at = i + offset;
        if content[at] == b'\n' || content.get(at + 1) != Some(&b'\n') {
            return true;
        }
        if content.get(at + 2) == Some(&b'.') {
            return true;
        }
        i = at + 2;
    }
    false
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::client::ReplyParser;
    use crate::codec::{BareLineEndings, DataDecoder, DataProgress};
    use crate::parse::parse_command;
    use crate::types::{AddressLimits, Command, ForwardPath, ReversePath};

    fn reply(wire: &str) -> ServerReply {
        let mut parser = ReplyParser::new();
        parser.feed(wire.as_bytes());
        parser.next_reply().unwrap().unwrap()
    }

    fn all_extensions() -> Extensions {
        Extensions {
            pipelining: true,
            size: Some(0),
            eight_bit_mime: true,
            smtputf8: true,
            binary_mime: true,
            chunking: true,
            dsn: true,
            starttls: false,
            enhanced_status_codes: true,
            auth: Vec::new(),
        }
    }

    /// Pipelining and 8BITMIME but no CHUNKING: DATA is used.
    fn pipelining() -> Extensions {
        Extensions { pipelining: true, eight_bit_mime: true, ..Extensions::default() }
    }

    fn envelope(recipients: &[&str]) -> Envelope {
        Envelope {
            sender: "sender@example.org".into(),
            size: 1234,
            recipients: recipients
                .iter()
                .map(|address| EnvelopeRecipient {
                    address: address.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Envelope::default()
        }
    }

    fn begin(extensions: &Extensions, envelope: &Envelope) -> (Transaction, String) {
        let (transaction, first) = Transaction::begin(extensions, envelope).unwrap();
        (transaction, String::from_utf8(first).unwrap())
    }

    fn send(text: &str) -> TransactionStep {
        TransactionStep::Send(text.as_bytes().to_vec())
    }

    fn done(step: TransactionStep) -> TransactionOutcome {
        match step {
            TransactionStep::Done(outcome) => outcome,
            other => panic!("expected the end, got {other:?}"),
        }
    }

    fn accepted(result: &RecipientResult) -> Option<u16> {
        match result {
            RecipientResult::Accepted(reply) => Some(reply.code),
            RecipientResult::Failed(_) => None,
        }
    }

    fn failed(result: &RecipientResult) -> &ClientError {
        match result {
            RecipientResult::Failed(error) => error,
            RecipientResult::Accepted(reply) => panic!("accepted: {reply}"),
        }
    }

    const OK: &str = "250 2.1.0 Ok\r\n";
    const GO: &str = "354 End data with <CR><LF>.<CR><LF>\r\n";
    const QUEUED: &str = "250 2.0.0 Ok: queued as ABC\r\n";

    #[test]
    fn pipelined_transaction() {
        let (mut tx, first) = begin(&pipelining(), &envelope(&["a@x.example", "b@x.example"]));
        assert_eq!(
            first,
            "MAIL FROM:<sender@example.org>\r\n\
             RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n"
        );
        assert_eq!(tx.on_reply(reply(OK)), TransactionStep::ReadReply);
        assert_eq!(tx.on_reply(reply(OK)), TransactionStep::ReadReply);
        assert_eq!(tx.on_reply(reply(OK)), TransactionStep::ReadReply);
        assert_eq!(tx.on_reply(reply(GO)), TransactionStep::SendContent);
        assert_eq!(
            tx.frame_content(b"Subject: x\r\n\r\nhi\r\n").to_vec(),
            b"Subject: x\r\n\r\nhi\r\n.\r\n"
        );
        let outcome = done(tx.on_reply(reply(QUEUED)));
        assert_eq!(
            outcome.recipients.iter().map(accepted).collect::<Vec<_>>(),
            [Some(250), Some(250)]
        );
        assert_eq!(outcome.mail_failure, None);
        assert_eq!(outcome.connection, AfterTransaction::Ready);
        assert!(!outcome.dsn_passed_on);
        let RecipientResult::Accepted(final_reply) = &outcome.recipients[0] else { panic!() };
        assert_eq!(final_reply.to_string(), "250 2.0.0 Ok: queued as ABC");
    }

    #[test]
    fn lock_step_transaction() {
        let (mut tx, first) =
            begin(&Extensions::default(), &envelope(&["a@x.example", "b@x.example"]));
        assert_eq!(first, "MAIL FROM:<sender@example.org>\r\n");
        assert_eq!(tx.on_reply(reply(OK)), send("RCPT TO:<a@x.example>\r\n"));
        assert_eq!(tx.on_reply(reply(OK)), send("RCPT TO:<b@x.example>\r\n"));
        assert_eq!(tx.on_reply(reply(OK)), send("DATA\r\n"));
        assert_eq!(tx.on_reply(reply(GO)), TransactionStep::SendContent);
        let outcome = done(tx.on_reply(reply(QUEUED)));
        assert_eq!(
            outcome.recipients.iter().map(accepted).collect::<Vec<_>>(),
            [Some(250), Some(250)]
        );
    }

    #[test]
    fn partial_rcpt_failure() {
        for extensions in [pipelining(), Extensions::default()] {
            let (mut tx, _) = begin(&extensions, &envelope(&["a@x", "nobody@x", "later@x", "c@x"]));
            let steps: Vec<TransactionStep> = [
                OK,
                OK,
                "550 5.1.1 No such user\r\n",
                "450 4.2.0 Greylisted\r\n",
                "251 2.1.5 User not local; will forward\r\n",
            ]
            .iter()
            .map(|r| tx.on_reply(reply(r)))
            .collect();
            let after_last_rcpt =
                if extensions.pipelining { TransactionStep::ReadReply } else { send("DATA\r\n") };
            assert_eq!(steps[4], after_last_rcpt);
            assert_eq!(tx.on_reply(reply(GO)), TransactionStep::SendContent);
            let outcome = done(tx.on_reply(reply("452 4.3.1 Disk full\r\n")));
            let [a, nobody, later, c] = &outcome.recipients[..] else { panic!() };
            assert_eq!(failed(a).reply.as_ref().unwrap().code, 452, "the final reply decides");
            assert!(!failed(a).is_permanent());
            assert_eq!(failed(nobody).to_string(), "RCPT TO refused: 550 5.1.1 No such user");
            assert!(failed(nobody).is_permanent());
            assert_eq!(failed(later).status, EnhancedStatus(4, 2, 0));
            assert!(!failed(later).is_permanent());
            assert_eq!(failed(c).reply.as_ref().unwrap().code, 452);
            assert_eq!(outcome.connection, AfterTransaction::Ready);
        }
    }

    #[test]
    fn final_reply_permanent_failure() {
        let (mut tx, _) = begin(&pipelining(), &envelope(&["a@x"]));
        for r in [OK, OK, GO] {
            tx.on_reply(reply(r));
        }
        let outcome = done(tx.on_reply(reply("554 5.7.1 Spam\r\n")));
        let error = failed(&outcome.recipients[0]);
        assert!(error.is_permanent());
        assert_eq!(error.to_string(), "message refused: 554 5.7.1 Spam");
    }

    #[test]
    fn all_rcpts_fail_and_354_comes_anyway() {
        let (mut tx, _) = begin(&pipelining(), &envelope(&["x@x", "y@x"]));
        assert_eq!(tx.on_reply(reply(OK)), TransactionStep::ReadReply);
        assert_eq!(tx.on_reply(reply("550 5.1.1 No\r\n")), TransactionStep::ReadReply);
        assert_eq!(tx.on_reply(reply("550 5.1.1 No\r\n")), TransactionStep::ReadReply);
        // RFC 2920 section 3.1: send a single dot, not the message.
        assert_eq!(tx.on_reply(reply(GO)), send(".\r\n"));
        let outcome = done(tx.on_reply(reply("554 5.5.1 No valid recipients\r\n")));
        assert!(
            outcome
                .recipients
                .iter()
                .all(|r| failed(r).to_string().starts_with("RCPT TO refused: 550"))
        );
        assert_eq!(outcome.connection, AfterTransaction::Ready);
    }

    #[test]
    fn all_rcpts_fail_and_data_is_refused() {
        let (mut tx, _) = begin(&pipelining(), &envelope(&["x@x"]));
        tx.on_reply(reply(OK));
        tx.on_reply(reply("550 5.1.1 No\r\n"));
        let outcome = done(tx.on_reply(reply("554 5.5.1 No valid recipients\r\n")));
        assert_eq!(failed(&outcome.recipients[0]).reply.as_ref().unwrap().code, 550);
        // RFC 2920 section 3.1: "If the DATA command was properly rejected the client SMTP
        // can just issue RSET".
        assert_eq!(outcome.connection, AfterTransaction::NeedsReset);
    }

    #[test]
    fn all_rcpts_fail_without_pipelining_sends_no_data() {
        let (mut tx, _) = begin(&Extensions::default(), &envelope(&["x@x", "y@x"]));
        tx.on_reply(reply(OK));
        assert_eq!(tx.on_reply(reply("550 5.1.1 No\r\n")), send("RCPT TO:<y@x>\r\n"));
        let outcome = done(tx.on_reply(reply("551 5.1.6 Moved\r\n")));
        assert_eq!(failed(&outcome.recipients[1]).status, EnhancedStatus(5, 1, 6));
        assert_eq!(outcome.connection, AfterTransaction::NeedsReset);
    }

    #[test]
    fn mail_failure_without_pipelining() {
        let (mut tx, _) = begin(&Extensions::default(), &envelope(&["a@x", "b@x"]));
        let outcome = done(tx.on_reply(reply("553 5.1.8 Bad sender domain\r\n")));
        let mail_failure = outcome.mail_failure.clone().unwrap();
        assert_eq!(mail_failure.to_string(), "MAIL FROM refused: 553 5.1.8 Bad sender domain");
        assert!(outcome.recipients.iter().all(|r| *failed(r) == mail_failure));
        assert_eq!(outcome.connection, AfterTransaction::Ready);
    }

    #[test]
    fn mail_failure_with_pipelining_consumes_every_reply() {
        let (mut tx, _) = begin(&pipelining(), &envelope(&["a@x", "b@x"]));
        assert_eq!(
            tx.on_reply(reply("452 4.3.1 Insufficient storage\r\n")),
            TransactionStep::ReadReply
        );
        assert_eq!(tx.on_reply(reply("503 5.5.1 Need MAIL\r\n")), TransactionStep::ReadReply);
        assert_eq!(tx.on_reply(reply("503 5.5.1 Need MAIL\r\n")), TransactionStep::ReadReply);
        let outcome = done(tx.on_reply(reply("503 5.5.1 Need MAIL\r\n")));
        let mail_failure = outcome.mail_failure.clone().unwrap();
        assert!(!mail_failure.is_permanent());
        assert!(outcome.recipients.iter().all(|r| *failed(r) == mail_failure));
        assert_eq!(outcome.connection, AfterTransaction::Ready);

        // A server that says 354 to DATA even so gets a lone dot.
        let (mut tx, _) = begin(&pipelining(), &envelope(&["a@x"]));
        tx.on_reply(reply("550 5.7.1 Go away\r\n"));
        tx.on_reply(reply(OK));
        assert_eq!(tx.on_reply(reply(GO)), send(".\r\n"));
        let outcome = done(tx.on_reply(reply("554 5.5.1 Nothing\r\n")));
        assert_eq!(failed(&outcome.recipients[0]).description, "MAIL FROM refused");
    }

    #[test]
    fn mail_failure_with_pipelining_and_chunking() {
        let (mut tx, first) = begin(&all_extensions(), &envelope(&["a@x"]));
        assert!(!first.contains("BDAT") && !first.contains("DATA"));
        assert_eq!(tx.on_reply(reply("550 5.7.1 No\r\n")), TransactionStep::ReadReply);
        let outcome = done(tx.on_reply(reply("503 5.5.1 Need MAIL\r\n")));
        assert!(outcome.mail_failure.is_some());
        assert_eq!(outcome.connection, AfterTransaction::Ready);
    }

    #[test]
    fn data_refused_after_accepted_recipients() {
        let (mut tx, _) = begin(&pipelining(), &envelope(&["a@x", "b@x"]));
        tx.on_reply(reply(OK));
        tx.on_reply(reply(OK));
        tx.on_reply(reply("550 5.1.1 No\r\n"));
        let outcome = done(tx.on_reply(reply("451 4.3.0 Try later\r\n")));
        assert_eq!(failed(&outcome.recipients[0]).description, "DATA refused");
        assert!(!failed(&outcome.recipients[0]).is_permanent());
        assert_eq!(failed(&outcome.recipients[1]).description, "RCPT TO refused");
        assert_eq!(outcome.connection, AfterTransaction::NeedsReset);
    }

    #[test]
    fn bdat_transaction() {
        let (mut tx, first) = begin(&all_extensions(), &envelope(&["a@x", "b@x"]));
        assert_eq!(
            first,
            "MAIL FROM:<sender@example.org> SIZE=1234\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\n"
        );
        assert_eq!(tx.on_reply(reply(OK)), TransactionStep::ReadReply);
        assert_eq!(tx.on_reply(reply("550 no\r\n")), TransactionStep::ReadReply);
        assert_eq!(tx.on_reply(reply(OK)), TransactionStep::SendContent);
        let content = b".leading dot\r\nbare\nlf\r\n";
        let framed = tx.frame_content(content);
        let head = format!("BDAT {} LAST\r\n", content.len());
        assert_eq!(framed.parts(), [head.as_bytes(), content, b""]);
        let outcome = done(tx.on_reply(reply(QUEUED)));
        assert_eq!(outcome.recipients.iter().map(accepted).collect::<Vec<_>>(), [None, Some(250)]);
        assert!(outcome.dsn_passed_on);

        // Without pipelining: one command at a time, then BDAT.
        let extensions = Extensions { pipelining: false, ..all_extensions() };
        let (mut tx, first) = begin(&extensions, &envelope(&["a@x"]));
        assert_eq!(first, "MAIL FROM:<sender@example.org> SIZE=1234\r\n");
        assert_eq!(tx.on_reply(reply(OK)), send("RCPT TO:<a@x>\r\n"));
        assert_eq!(tx.on_reply(reply(OK)), TransactionStep::SendContent);
        assert_eq!(tx.frame_content(b"").to_vec(), b"BDAT 0 LAST\r\n");
        let outcome = done(tx.on_reply(reply("552 5.3.4 Too big\r\n")));
        assert!(failed(&outcome.recipients[0]).is_permanent());
        // RFC 3030 section 2: RSET after a failed BDAT.
        assert_eq!(outcome.connection, AfterTransaction::NeedsReset);
    }

    #[test]
    fn bdat_not_sent_when_nobody_was_accepted() {
        let (mut tx, _) = begin(&all_extensions(), &envelope(&["a@x"]));
        tx.on_reply(reply(OK));
        let outcome = done(tx.on_reply(reply("550 5.1.1 No\r\n")));
        assert_eq!(failed(&outcome.recipients[0]).reply.as_ref().unwrap().code, 550);
        assert_eq!(outcome.connection, AfterTransaction::NeedsReset);
    }

    #[test]
    fn closing_reply_ends_the_transaction() {
        let (mut tx, _) = begin(&pipelining(), &envelope(&["a@x", "b@x", "c@x"]));
        tx.on_reply(reply(OK));
        tx.on_reply(reply("550 5.1.1 No\r\n"));
        let outcome = done(tx.on_reply(reply("421 4.3.2 Shutting down\r\n")));
        assert_eq!(failed(&outcome.recipients[0]).reply.as_ref().unwrap().code, 550);
        for undecided in &outcome.recipients[1..] {
            assert_eq!(failed(undecided).reply.as_ref().unwrap().code, 421);
            assert!(!failed(undecided).is_permanent());
        }
        assert_eq!(outcome.connection, AfterTransaction::Closing);
    }

    #[test]
    fn abort_marks_undecided_recipients_transient() {
        let (mut tx, _) = begin(&pipelining(), &envelope(&["a@x", "b@x", "c@x"]));
        tx.on_reply(reply(OK));
        tx.on_reply(reply(OK));
        tx.on_reply(reply("550 5.1.1 No\r\n"));
        let outcome = tx.abort("connection reset while reading the reply to RCPT");
        let [a, b, c] = &outcome.recipients[..] else { panic!() };
        assert_eq!(failed(a).status, EnhancedStatus(4, 4, 2));
        assert_eq!(failed(a).description, "connection reset while reading the reply to RCPT");
        assert_eq!(failed(a).reply, None);
        assert!(failed(b).is_permanent());
        assert_eq!(failed(c).status, EnhancedStatus(4, 4, 2));
        assert_eq!(outcome.connection, AfterTransaction::Closing);

        // After the content: delivery is unknown, so it is retried (RFC 5321 section 3.8).
        let (mut tx, _) = begin(&pipelining(), &envelope(&["a@x"]));
        for r in [OK, OK, GO] {
            tx.on_reply(reply(r));
        }
        let outcome = tx.abort("timeout");
        assert!(!failed(&outcome.recipients[0]).is_permanent());
    }

    #[test]
    fn abort_after_done_keeps_the_outcome() {
        let (mut tx, _) = begin(&pipelining(), &envelope(&["a@x"]));
        for r in [OK, OK, GO] {
            tx.on_reply(reply(r));
        }
        let outcome = done(tx.on_reply(reply(QUEUED)));
        assert_eq!(done(tx.on_reply(reply(OK))), outcome, "replies after the end change nothing");
        assert_eq!(tx.abort("late"), outcome);
    }

    #[test]
    fn unexpected_reply_codes_are_transient_failures() {
        // A 354 to MAIL or a 250 to DATA: the server is confused.
        let (mut tx, _) = begin(&Extensions::default(), &envelope(&["a@x"]));
        let outcome = done(tx.on_reply(reply(GO)));
        assert!(!outcome.mail_failure.unwrap().is_permanent());

        let (mut tx, _) = begin(&pipelining(), &envelope(&["a@x"]));
        tx.on_reply(reply(OK));
        tx.on_reply(reply(OK));
        let outcome = done(tx.on_reply(reply(OK)));
        let error = failed(&outcome.recipients[0]);
        assert_eq!(error.status, PROTOCOL_ERROR);
        assert_eq!(outcome.connection, AfterTransaction::NeedsReset);
    }

    #[test]
    fn mail_parameters() {
        let mut env = envelope(&["a@x"]);
        env.body = BodyType::EightBitMime;
        env.ret = Some(Ret::Headers);
        env.envid = Some("QQ 1+2=3".into());
        let (_, first) = begin(&all_extensions(), &env);
        assert!(
            first.starts_with(
                "MAIL FROM:<sender@example.org> SIZE=1234 BODY=8BITMIME RET=HDRS \
                 ENVID=QQ+201+2B2+3D3\r\n"
            ),
            "{first}"
        );

        // Nothing the server did not announce.
        let extensions = Extensions { eight_bit_mime: true, ..Extensions::default() };
        let (_, first) = begin(&extensions, &env);
        assert_eq!(first, "MAIL FROM:<sender@example.org> BODY=8BITMIME\r\n");

        // 7BIT needs no BODY=.
        env.body = BodyType::SevenBit;
        let (_, first) = begin(&all_extensions(), &env);
        assert!(!first.contains("BODY="), "{first}");

        env.body = BodyType::BinaryMime;
        let (_, first) = begin(&all_extensions(), &env);
        assert!(first.contains(" BODY=BINARYMIME "), "{first}");
    }

    #[test]
    fn null_sender() {
        let mut env = envelope(&["a@x"]);
        env.sender = String::new();
        let (_, first) = begin(&Extensions::default(), &env);
        assert_eq!(first, "MAIL FROM:<>\r\n");
    }

    #[test]
    fn smtputf8_parameter() {
        let mut env = envelope(&["a@x"]);
        let (_, first) = begin(&all_extensions(), &env);
        assert!(!first.contains("SMTPUTF8"), "not needed, so not sent: {first}");
        env.smtputf8 = true;
        let (_, first) = begin(&all_extensions(), &env);
        assert!(
            first.starts_with("MAIL FROM:<sender@example.org> SIZE=1234 SMTPUTF8\r\n"),
            "{first}"
        );
        // A UTF-8 address needs it even when the envelope does not say so.
        let env = envelope(&["jörg@x.example"]);
        let (_, first) = begin(&all_extensions(), &env);
        assert!(first.contains(" SMTPUTF8\r\nRCPT TO:<jörg@x.example>\r\n"), "{first}");
    }

    #[test]
    fn dsn_parameters_passed_or_not() {
        let mut env = envelope(&["a@x", "b@x"]);
        env.ret = Some(Ret::Full);
        env.envid = Some("id1".into());
        env.recipients[0].notify = Some(Notify { success: true, failure: true, delay: false });
        env.recipients[0].orcpt =
            Some(OriginalRecipient { addr_type: "rfc822".into(), address: "A+b=c@x".into() });
        env.recipients[1].notify = Some(Notify::NEVER);

        let (tx, first) = begin(&all_extensions(), &env);
        assert!(tx.dsn_passed_on());
        assert_eq!(
            first,
            "MAIL FROM:<sender@example.org> SIZE=1234 RET=FULL ENVID=id1\r\n\
             RCPT TO:<a@x> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bb+3Dc@x\r\n\
             RCPT TO:<b@x> NOTIFY=NEVER\r\n"
        );

        // RFC 3461 section 5.2.2 (a): not to a server without DSN.
        let extensions = Extensions { dsn: false, ..all_extensions() };
        let (tx, first) = begin(&extensions, &env);
        assert!(!tx.dsn_passed_on());
        assert_eq!(
            first,
            "MAIL FROM:<sender@example.org> SIZE=1234\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\n"
        );
    }

    #[test]
    fn utf8_orcpt_uses_utf8_addr_xtext() {
        let utf8 = |addr_type: &str, address: &str| {
            orcpt_parameter(&OriginalRecipient {
                addr_type: addr_type.into(),
                address: address.into(),
            })
        };
        assert_eq!(utf8("utf-8", "jörg@x.example").unwrap(), "ORCPT=utf-8;j\\x{F6}rg@x.example");
        assert_eq!(
            utf8("UTF-8", "a b+c=d\\e@x").unwrap(),
            "ORCPT=UTF-8;a\\x{20}b\\x{2B}c\\x{3D}d\\x{5C}e@x"
        );
        assert_eq!(utf8("utf-8", "😀@x").unwrap(), "ORCPT=utf-8;\\x{1F600}@x");
        // An rfc822 address that is not ASCII cannot be rfc822.
        assert_eq!(utf8("rfc822", "jörg@x").unwrap(), "ORCPT=utf-8;j\\x{F6}rg@x");
        // Too long, or an address type that would break the command: left out.
        assert_eq!(utf8("rfc822", &"a".repeat(490)), None);
        assert!(utf8("rfc822", &"a".repeat(487)).is_some());
        assert_eq!(utf8("rfc 822", "a@x"), None);
        assert_eq!(utf8("", "a@x"), None);
    }

    #[test]
    fn overlong_envid_is_left_out() {
        let mut env = envelope(&["a@x"]);
        env.envid = Some("e".repeat(101));
        let (_, first) = begin(&all_extensions(), &env);
        assert!(!first.contains("ENVID"), "{first}");
        env.envid = Some("e".repeat(100));
        let (_, first) = begin(&all_extensions(), &env);
        assert!(first.contains("ENVID"), "{first}");
    }

    fn refusal(extensions: &Extensions, envelope: &Envelope) -> Refusal {
        match Transaction::begin(extensions, envelope) {
            Err(refusal) => refusal,
            Ok(_) => panic!("expected a refusal"),
        }
    }

    #[test]
    fn refusals() {
        let without = |change: fn(&mut Extensions)| {
            let mut extensions = all_extensions();
            change(&mut extensions);
            extensions
        };

        let mut env = envelope(&["a@x"]);
        env.smtputf8 = true;
        let refused = refusal(&without(|e| e.smtputf8 = false), &env);
        assert_eq!(refused.error.status, EnhancedStatus(5, 6, 7));
        assert!(refused.error.is_permanent() && refused.try_next_host);
        assert_eq!(
            refusal(&without(|e| e.smtputf8 = false), &envelope(&["ü@x"])).error.status,
            EnhancedStatus(5, 6, 7)
        );

        let mut env = envelope(&["a@x"]);
        env.body = BodyType::BinaryMime;
        for extensions in [without(|e| e.binary_mime = false), without(|e| e.chunking = false)] {
            let refused = refusal(&extensions, &env);
            assert_eq!(refused.error.status, EnhancedStatus(5, 6, 3));
            assert!(refused.try_next_host);
        }

        let mut env = envelope(&["a@x"]);
        env.body = BodyType::EightBitMime;
        let no_8bit = without(|e| e.eight_bit_mime = false);
        let refused = refusal(&no_8bit, &env);
        assert_eq!(refused.error.status, EnhancedStatus(5, 6, 3));
        assert_eq!(refused.to_string(), "8-bit message but 8BITMIME not offered (5.6.3)");
        // Declared 8-bit but actually 7-bit: sent without BODY=.
        env.seven_bit_content = true;
        let (_, first) = begin(&no_8bit, &env);
        assert!(!first.contains("BODY="), "{first}");

        let mut env = envelope(&["a@x"]);
        env.size = 1001;
        let refused = refusal(&without(|e| e.size = Some(1000)), &env);
        assert_eq!(refused.error.status, EnhancedStatus(5, 3, 4));
        assert!(refused.try_next_host);
        assert_eq!(
            refused.error.description,
            "message size 1001 exceeds the server's limit of 1000"
        );
        env.size = 1000;
        assert!(Transaction::begin(&without(|e| e.size = Some(1000)), &env).is_ok());
        env.size = u64::MAX;
        assert!(
            Transaction::begin(&without(|e| e.size = Some(0)), &env).is_ok(),
            "SIZE 0: no limit"
        );
        assert!(Transaction::begin(&without(|e| e.size = None), &env).is_ok());
    }

    #[test]
    fn broken_envelopes_are_refused() {
        let mut env = envelope(&["a@x"]);
        env.sender = "evil@x>\r\nRCPT TO:<victim@y".into();
        let refused = refusal(&all_extensions(), &env);
        assert_eq!(refused.error.status, EnhancedStatus(5, 1, 7));
        assert!(!refused.try_next_host);
        let refused = refusal(&all_extensions(), &envelope(&["a@x", "b@x>\r\nDATA"]));
        assert_eq!(refused.error.status, EnhancedStatus(5, 1, 3));
        assert_eq!(
            refusal(&all_extensions(), &envelope(&[""])).error.status,
            EnhancedStatus(5, 1, 3)
        );
        assert_eq!(
            refusal(&all_extensions(), &envelope(&[])).error.status,
            EnhancedStatus(5, 5, 0)
        );
    }

    #[test]
    fn postmaster_and_quoted_local_parts_go_through() {
        let (mut tx, _) = begin(&Extensions::default(), &envelope(&["Postmaster", "\"j d\"@x"]));
        assert_eq!(tx.on_reply(reply(OK)), send("RCPT TO:<Postmaster>\r\n"));
        assert_eq!(tx.on_reply(reply(OK)), send("RCPT TO:<\"j d\"@x>\r\n"));
    }

    fn data_framing(content: &[u8]) -> Vec<u8> {
        let (tx, _) = begin(&Extensions::default(), &envelope(&["a@x"]));
        tx.frame_content(content).to_vec()
    }

    #[test]
    fn data_framing_and_dot_stuffing() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
            (b"no final line ending", b"no final line ending\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n..b\r\n", b"a\r\n...b\r\n.\r\n"),
            (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
            (b"mid.dle\r\n", b"mid.dle\r\n.\r\n"),
            // Bare line endings become CRLF, and a dot after them is stuffed.
            (b"a\nb\r\n", b"a\r\nb\r\n.\r\n"),
            (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r.\r\n", b"a\r\n..\r\n.\r\n"),
            (b"a\r", b"a\r\n.\r\n"),
            (b"a\r\r\n", b"a\r\n\r\n.\r\n"),
        ];
        for (content, wire) in cases {
            assert_eq!(data_framing(content), *wire, "{:?}", String::from_utf8_lossy(content));
        }
    }

    #[test]
    fn clean_content_is_not_copied() {
        let (tx, _) = begin(&Extensions::default(), &envelope(&["a@x"]));
        let content = b"Subject: x\r\n\r\nbody.\r\n";
        let framed = tx.frame_content(content);
        assert!(matches!(framed.body, Cow::Borrowed(_)));
        assert_eq!(framed.parts(), [&b""[..], content, b".\r\n"]);
        let framed = tx.frame_content(b"x\r\n.y\r\n");
        assert!(matches!(framed.body, Cow::Owned(_)));
    }

    #[test]
    fn seven_bit_check() {
        assert!(is_seven_bit(b"plain ascii\r\n~\x7f\t"));
        assert!(is_seven_bit(b""));
        assert!(!is_seven_bit("grüße".as_bytes()));
        assert!(!is_seven_bit(b"nul\x00"));
    }

    /// Decodes DATA framing as our own server does.
    fn server_reads(wire: &[u8]) -> (DataProgress, Vec<u8>) {
        let mut decoder = DataDecoder::new(BareLineEndings::Reject, u64::MAX, 0);
        let mut body = Vec::new();
        let progress = decoder.decode(wire, &mut body);
        (progress, body)
    }

    fn address() -> impl Strategy<Value = String> {
        "[a-z0-9.+=_-]{1,20}@[a-z]{1,10}\\.example".prop_filter("dot-string", |a| {
            !a.starts_with('.') && !a.contains("..") && !a.contains(".@")
        })
    }

    proptest! {
        #[test]
        fn data_framing_ends_exactly_where_the_server_finds_the_end(
            content in prop::collection::vec(prop::sample::select(b"ab.\r\n".to_vec()), 0..60),
        ) {
            let wire = data_framing(&content);
            let (progress, body) = server_reads(&wire);
            prop_assert_eq!(progress, DataProgress::End { consumed: wire.len() });
            // What arrives is the content with every line ending made CRLF and a final one.
            let mut expected = Vec::new();
            let mut i = 0;
            while i < content.len() {
                match content[i] {
                    b'\r' if content.get(i + 1) == Some(&b'\n') => {
                        expected.extend_from_slice(b"\r\n");
                        i += 1;
                    }
                    b'\r' | b'\n' => expected.extend_from_slice(b"\r\n"),
                    b => expected.push(b),
                }
                i += 1;
            }
            if !expected.is_empty() && !expected.ends_with(b"\r\n") {
                expected.extend_from_slice(b"\r\n");
            }
            prop_assert_eq!(body, expected);
        }

        #[test]
        fn commands_round_trip_through_the_server_parser(
            sender in prop::option::of(address()),
            recipient in address(),
            size in any::<u64>(),
            body in prop::sample::select(
                vec![BodyType::SevenBit, BodyType::EightBitMime, BodyType::BinaryMime]
            ),
            ret in prop::option::of(prop::sample::select(vec![Ret::Full, Ret::Headers])),
            envid in prop::option::of("[ -~]{1,100}"),
            notify in prop::option::of((any::<bool>(), any::<bool>(), any::<bool>())),
            orcpt in prop::option::of(prop_oneof![
                "[ -~]{1,60}".prop_map(|a| ("rfc822".to_string(), a)),
                "[ -~\u{a0}-\u{2fff}]{1,40}".prop_map(|a| ("utf-8".to_string(), a)),
            ]),
        ) {
            let notify = notify.map(|(success, failure, delay)| Notify { success, failure, delay });
            let orcpt = orcpt.map(|(addr_type, address)| OriginalRecipient { addr_type, address });
            let env = Envelope {
                sender: sender.clone().unwrap_or_default(),
                body,
                ret,
                envid: envid.clone(),
                size,
                recipients: vec![EnvelopeRecipient {
                    address: recipient.clone(),
                    notify,
                    orcpt: orcpt.clone(),
                }],
                ..Envelope::default()
            };
            let (_, first) = Transaction::begin(&all_extensions(), &env).unwrap();
            let limits = AddressLimits { local_part: 1000, domain: 1000 };
            let lines: Vec<&[u8]> =
                first.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
            prop_assert_eq!(lines.len(), 2);
            let parse = |line: &[u8]| parse_command(line.strip_suffix(b"\r").unwrap(), &limits);
            let Ok(Command::Mail(mail)) = parse(lines[0]) else {
                return Err(TestCaseError::fail(format!("{:?}", String::from_utf8_lossy(lines[0]))));
            };
            prop_assert_eq!(mail.path.to_string(), sender.unwrap_or_default());
            prop_assert_eq!(matches!(mail.path, ReversePath::Null), env.sender.is_empty());
            prop_assert_eq!(mail.size, Some(size));
            prop_assert_eq!(mail.body, (body != BodyType::SevenBit).then_some(body));
            prop_assert_eq!(mail.ret, ret);
            prop_assert_eq!(mail.envid, envid);
            let Ok(Command::Rcpt(rcpt)) = parse(lines[1]) else {
                return Err(TestCaseError::fail(format!("{:?}", String::from_utf8_lossy(lines[1]))));
            };
            let ForwardPath::Mailbox(mailbox) = &rcpt.path else {
                return Err(TestCaseError::fail("not a mailbox"));
            };
            prop_assert_eq!(mailbox.to_string(), recipient);
            prop_assert_eq!(rcpt.notify, notify);
            prop_assert_eq!(rcpt.orcpt, orcpt);
        }
    }
}

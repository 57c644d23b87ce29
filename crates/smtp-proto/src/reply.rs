//! SMTP replies: the type, its wire form, and every reply text the server sends.
//!
//! Reply texts live here and nowhere else, so that codes and enhanced status codes (RFC 3463)
//! can be reviewed in one place.

use std::borrow::Cow;
use std::fmt;

use crate::types::CommandError;

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedStatus(pub u8, pub u16, pub u16);

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code (RFC 5321 section 4.2).
    pub code: u16,
    /// The enhanced status code, sent on every reply but the greeting and the EHLO/HELO
    /// answer (RFC 2034 section 3).
    pub status: Option<EnhancedStatus>,
    /// The text; each `\n` starts a new reply line.
    pub text: Cow<'static, str>,
    /// The server closes the connection after sending this reply.
    pub close: bool,
}

impl Reply {
    pub const fn new(code: u16, status: EnhancedStatus, text: &'static str) -> Reply {
        Reply { code, status: Some(status), text: Cow::Borrowed(text), close: false }
    }

    pub fn owned(code: u16, status: EnhancedStatus, text: String) -> Reply {
        Reply { code, status: Some(status), text: Cow::Owned(text), close: false }
    }

    /// A reply without an enhanced status code (greeting, EHLO).
    pub fn plain(code: u16, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply { code, status: None, text: text.into(), close: false }
    }

    /// The same reply, followed by closing the connection.
    pub fn and_close(mut self) -> Reply {
        self.close = true;
        self
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form: every line but the last as `code-text`, the last as `code text`
    /// (RFC 5321 section 4.2.1), each with the enhanced status code when there is one. Control
    /// characters in the text are replaced so that a reply can never inject a line.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let separator = if lines.peek().is_some() { b'-' } else { b' ' };
            out.extend_from_slice(itoa3(self.code).as_slice());
            out.push(separator);
            if let Some(status) = self.status {
                out.extend_from_slice(status.to_string().as_bytes());
                if !line.is_empty() {
                    out.push(b' ');
                }
            }
            for &b in line.as_bytes() {
                out.push(if b < 0x20 || b == 0x7f { b'?' } else { b });
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 16);
        self.write_to(&mut out);
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.to_bytes();
        f.write_str(String::from_utf8_lossy(&bytes).trim_end())
    }
}

fn itoa3(code: u16) -> [u8; 3] {
    let code = code.min(999);
    [b'0' + (code / 100) as u8, b'0' + (code / 10 % 10) as u8, b'0' + (code % 10) as u8]
}

const fn st(class: u8, subject: u16, detail: u16) -> EnhancedStatus {
    EnhancedStatus(class, subject, detail)
}

// Generic replies.
pub const OK: Reply = Reply::new(250, st(2, 0, 0), "Ok");
pub const RESET_OK: Reply = Reply::new(250, st(2, 0, 0), "Reset state");
pub const SENDER_OK: Reply = Reply::new(250, st(2, 1, 0), "Sender ok");
pub const RECIPIENT_OK: Reply = Reply::new(250, st(2, 1, 5), "Recipient ok");
pub const BYE: Reply = Reply::new(221, st(2, 0, 0), "Bye");
/// RFC 2034 section 4 puts enhanced status codes on 2xx, 4xx and 5xx replies: the
/// intermediate 354 has none.
pub const START_DATA: Reply = Reply {
    code: 354,
    status: None,
    text: Cow::Borrowed("End data with <CR><LF>.<CR><LF>"),
    close: false,
};
pub const READY_TO_START_TLS: Reply = Reply::new(220, st(2, 0, 0), "Ready to start TLS");
/// RFC 5321 section 3.5.3: 252 when the server will not verify but will accept mail.
pub const VRFY_CANNOT_VERIFY: Reply =
    Reply::new(252, st(2, 5, 0), "Cannot VRFY user, but will accept message and attempt delivery");
pub const EXPN_DISABLED: Reply = Reply::new(502, st(5, 5, 1), "EXPN command not implemented");
pub const HELP: Reply = Reply::new(
    214,
    st(2, 0, 0),
    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH\n\
     See RFC 5321 and https://www.rfc-editor.org/info/rfc5321",
);

// Sequence errors (RFC 5321 section 4.3.2: 503).
pub const NEED_HELO: Reply = Reply::new(503, st(5, 5, 1), "Send EHLO or HELO first");
pub const NESTED_MAIL: Reply = Reply::new(503, st(5, 5, 1), "Sender already specified");
pub const NEED_MAIL: Reply = Reply::new(503, st(5, 5, 1), "Need MAIL command first");
pub const NEED_RCPT: Reply = Reply::new(503, st(5, 5, 1), "Need RCPT command first");
/// RFC 5321 section 3.3: after every RCPT failed, DATA may get 554 "no valid recipients".
pub const NO_VALID_RECIPIENTS: Reply = Reply::new(554, st(5, 5, 1), "No valid recipients");
/// RFC 3030 section 3: BODY=BINARYMIME requires BDAT.
pub const BINARYMIME_NEEDS_BDAT: Reply =
    Reply::new(503, st(5, 5, 1), "BODY=BINARYMIME requires BDAT, not DATA");
/// RFC 3030 section 2: DATA and BDAT may not be mixed in one transaction.
pub const DATA_AFTER_BDAT: Reply =
    Reply::new(503, st(5, 5, 1), "DATA cannot follow BDAT in a transaction");
pub const TLS_ALREADY_ACTIVE: Reply = Reply::new(503, st(5, 5, 1), "TLS already active");
pub const STARTTLS_IN_TRANSACTION: Reply =
    Reply::new(503, st(5, 5, 1), "STARTTLS not allowed during a mail transaction");
pub const STARTTLS_UNAVAILABLE: Reply = Reply::new(502, st(5, 5, 1), "STARTTLS not available");
pub const BDAT_WITHOUT_TRANSACTION: Reply =
    Reply::new(503, st(5, 5, 1), "BDAT chunk discarded: need MAIL and RCPT first");
pub const PARAMETERS_NEED_EHLO: Reply =
    Reply::new(555, st(5, 5, 4), "ESMTP parameters require EHLO");

// Syntax errors.
pub const LINE_TOO_LONG: Reply = Reply::new(500, st(5, 5, 2), "Line too long");
pub const BAD_CHARACTERS: Reply =
    Reply::new(500, st(5, 5, 2), "Command line contains invalid characters");
pub const UNKNOWN_COMMAND: Reply = Reply::new(500, st(5, 5, 1), "Command not recognized");
/// RFC 6531 section 3.4: a non-ASCII address needs the SMTPUTF8 parameter.
pub const NEEDS_SMTPUTF8: Reply =
    Reply::new(553, st(5, 6, 7), "Non-ASCII address requires the SMTPUTF8 parameter");

// Policy and resource replies.
pub const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, st(4, 5, 3), "Too many recipients");
pub const MESSAGE_TOO_BIG: Reply =
    Reply::new(552, st(5, 3, 4), "Message size exceeds fixed maximum message size");
pub const BDAT_CHUNK_TOO_BIG: Reply = Reply::new(
    552,
    st(5, 3, 4),
    "BDAT chunk exceeds fixed maximum message size; closing connection",
);
pub const NO_SUCH_USER: Reply = Reply::new(550, st(5, 1, 1), "No such user here");
pub const RELAY_DENIED: Reply = Reply::new(554, st(5, 7, 1), "Relay access denied");
pub const INSUFFICIENT_STORAGE: Reply =
    Reply::new(452, st(4, 3, 1), "Insufficient system storage, try again later");
pub const LOCAL_ERROR: Reply =
    Reply::new(451, st(4, 3, 0), "Local error in processing, try again later");
/// RFC 5321 section 6.3: a message with too many Received headers is looping.
pub const MAIL_LOOP: Reply =
    Reply::new(554, st(5, 4, 6), "Too many Received headers: mail loop detected");
/// RFC 5321 section 2.3.8 forbids bare CR and LF in message text; accepting them is how SMTP
/// smuggling works (CVE-2023-51764), so the session ends.
pub const BARE_LINE_ENDING: Reply = Reply::new(
    521,
    st(5, 5, 2),
    "Bare CR or LF in message data; lines must end with CRLF (RFC 5321 section 2.3.8)",
);
/// RFC 5321 section 4.5.3.1.6: text lines are limited to 1000 octets including CRLF.
pub const DATA_LINE_TOO_LONG: Reply =
    Reply::new(550, st(5, 6, 0), "Message contains a line longer than the limit");
pub const TOO_MANY_ERRORS: Reply =
    Reply::new(421, st(4, 7, 0), "Too many errors, closing connection");
pub const SHUTTING_DOWN: Reply =
    Reply::new(421, st(4, 3, 2), "Service shutting down, closing connection");
pub const TIMEOUT: Reply = Reply::new(421, st(4, 4, 2), "Timeout, closing connection");
pub const TOO_MANY_CONNECTIONS: Reply =
    Reply::new(421, st(4, 7, 0), "Too many connections, try again later");

// SMTP AUTH (RFC 4954 sections 4 and 6, with the enhanced status codes section 6 suggests).
pub const AUTH_SUCCESSFUL: Reply = Reply::new(235, st(2, 7, 0), "Authentication successful");
/// AUTH on a listener without mechanisms: not implemented here, as for STARTTLS.
pub const AUTH_UNAVAILABLE: Reply = Reply::new(502, st(5, 5, 1), "AUTH not available");
pub const AUTH_NEEDS_EHLO: Reply = Reply::new(503, st(5, 5, 1), "Send EHLO first");
pub const ALREADY_AUTHENTICATED: Reply = Reply::new(503, st(5, 5, 1), "Already authenticated");
pub const AUTH_IN_TRANSACTION: Reply =
    Reply::new(503, st(5, 5, 1), "AUTH not permitted during a mail transaction");
pub const UNKNOWN_MECHANISM: Reply =
    Reply::new(504, st(5, 5, 4), "Unrecognized authentication mechanism");
pub const ENCRYPTION_REQUIRED: Reply =
    Reply::new(538, st(5, 7, 11), "Encryption required for requested authentication mechanism");
/// RFC 4954 section 4 asks for 501 and names no enhanced code; 5.0.0 is "other undefined
/// status" (RFC 3463 section 3.1).
pub const AUTH_CANCELLED: Reply = Reply::new(501, st(5, 0, 0), "Authentication cancelled");
pub const INVALID_BASE64: Reply = Reply::new(501, st(5, 5, 2), "Invalid base64 data");
pub const AUTH_LINE_TOO_LONG: Reply =
    Reply::new(500, st(5, 5, 6), "Authentication exchange line is too long");
/// RFC 4954 section 4: an initial response for a mechanism in which the server speaks first
/// "MUST" get 501, and "SHOULD" get 5.7.0.
pub const INITIAL_RESPONSE_NOT_ALLOWED: Reply =
    Reply::new(501, st(5, 7, 0), "Initial response not allowed for this mechanism");
pub const AUTH_INVALID_CREDENTIALS: Reply =
    Reply::new(535, st(5, 7, 8), "Authentication credentials invalid");
pub const AUTH_TEMPORARY_FAILURE: Reply =
    Reply::new(454, st(4, 7, 0), "Temporary authentication failure");
/// A SASL response that does not follow its mechanism's syntax (RFC 4954 section 4: 501).
pub const AUTH_MALFORMED: Reply = Reply::new(501, st(5, 5, 2), "Malformed authentication exchange");
/// Too many failed logins from this address: the session ends, the address waits.
pub const AUTH_TOO_MANY_FAILURES: Reply =
    Reply::new(421, st(4, 7, 0), "Too many failed authentication attempts, try again later");
/// An authenticated user over its message or recipient rate. 450 as for other policy
/// refusals the client should retry later, 4.7.1 "delivery not authorized" (RFC 3463).
pub const RATE_LIMITED: Reply =
    Reply::new(450, st(4, 7, 1), "Rate limit exceeded, try again later");
/// MAIL before AUTH where authentication is required (RFC 6409 section 4.3).
pub const AUTH_REQUIRED: Reply = Reply::new(530, st(5, 7, 0), "Authentication required");

impl From<&CommandError> for Reply {
    fn from(error: &CommandError) -> Reply {
        match error {
            CommandError::UnknownCommand => UNKNOWN_COMMAND,
            CommandError::InvalidCharacters => BAD_CHARACTERS,
            CommandError::Syntax(expected) => {
                Reply::owned(501, st(5, 5, 2), format!("Syntax error, expected: {expected}"))
            }
            CommandError::BadSender(why) => {
                Reply::owned(501, st(5, 1, 7), format!("Bad sender address syntax: {why}"))
            }
            CommandError::BadRecipient(why) => {
                Reply::owned(501, st(5, 1, 3), format!("Bad recipient address syntax: {why}"))
            }
            CommandError::LocalPartTooLong { sender } => Reply::new(
                501,
                if *sender { st(5, 1, 7) } else { st(5, 1, 3) },
                "Local part too long",
            ),
            CommandError::DomainTooLong { sender } => {
                Reply::new(501, if *sender { st(5, 1, 7) } else { st(5, 1, 3) }, "Domain too long")
            }
            CommandError::UnknownParameter(name) => Reply::owned(
                555,
                st(5, 5, 4),
                format!("Unsupported or repeated parameter {}", printable(name, 64)),
            ),
            CommandError::InvalidParameterValue(name) => {
                Reply::owned(501, st(5, 5, 4), format!("Invalid value for parameter {name}"))
            }
        }
    }
}

/// The first `max` characters of untrusted text, with control characters replaced, for
/// echoing in replies and logs.
pub fn printable(text: &str, max: usize) -> String {
    text.chars().take(max).map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_status() {
        assert_eq!(OK.to_bytes(), b"250 2.0.0 Ok\r\n");
    }

    #[test]
    fn multi_line_uses_dash_on_all_but_last() {
        let reply = Reply::plain(250, "host\nPIPELINING\nSIZE 10");
        assert_eq!(reply.to_bytes(), b"250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
    }

    #[test]
    fn multi_line_with_status_on_every_line() {
        assert_eq!(
            HELP.to_bytes().split(|&b| b == b'\n').filter(|l| l.starts_with(b"214")).count(),
            2
        );
        assert!(HELP.to_bytes().starts_with(b"214-2.0.0 Commands"));
    }

    #[test]
    fn control_characters_cannot_inject_lines() {
        let reply = Reply::owned(501, st(5, 5, 2), "bad\r\n250 fake".to_string());
        let wire = reply.to_bytes();
        assert_eq!(wire, b"501-5.5.2 bad?\r\n501 5.5.2 250 fake\r\n");
        let reply = Reply::owned(501, st(5, 5, 2), "a\rb\x00c".to_string());
        assert_eq!(reply.to_bytes(), b"501 5.5.2 a?b?c\r\n");
    }

    #[test]
    fn every_command_error_maps_to_a_failure_reply() {
        let errors = [
            CommandError::UnknownCommand,
            CommandError::InvalidCharacters,
            CommandError::Syntax("X"),
            CommandError::BadSender("x"),
            CommandError::BadRecipient("x"),
            CommandError::LocalPartTooLong { sender: true },
            CommandError::DomainTooLong { sender: false },
            CommandError::UnknownParameter("FOO".into()),
            CommandError::InvalidParameterValue("SIZE"),
        ];
        for error in &errors {
            let reply = Reply::from(error);
            assert!(reply.code >= 500 && reply.code < 600, "{error:?} -> {reply}");
            assert_eq!(reply.status.unwrap().0, 5);
        }
        assert_eq!(Reply::from(&CommandError::UnknownParameter("X".into())).code, 555);
    }

    #[test]
    fn printable_truncates_and_masks() {
        assert_eq!(printable("ab\ncd", 10), "ab?cd");
        assert_eq!(printable("abcdef", 3), "abc");
    }
}

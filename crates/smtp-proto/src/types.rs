//! The values SMTP commands carry: paths, mailboxes and ESMTP parameters.
//!
//! These are the parsed, validated forms. Wire syntax lives in [`crate::parse`]; these types only
//! guarantee what the parser checked (lengths, character classes) and know how to print
//! themselves back in wire form.

use std::fmt;
use std::net::IpAddr;

/// The domain part of a mailbox or an EHLO argument.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A domain name, without a trailing dot. ASCII unless the transaction uses SMTPUTF8
    /// (RFC 6531 section 3.3: `sub-domain =/ U-label`). Stored as received; compare with
    /// [`Domain::eq_ignore_case`].
    Name(String),
    /// An IPv4 or IPv6 address literal, `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
    Address(IpAddr),
    /// A `General-address-literal` (RFC 5321 section 4.1.3) with a tag other than `IPv6`, kept
    /// verbatim without the brackets. Servers have no use for these beyond echoing them.
    GeneralLiteral(String),
}

impl Domain {
    /// Case-insensitive comparison of domain names (RFC 5321 section 2.4); literals compare by
    /// value.
    pub fn eq_ignore_case(&self, other: &str) -> bool {
        match self {
            Domain::Name(name) => name.eq_ignore_ascii_case(other.trim_end_matches('.')),
            _ => false,
        }
    }

    /// True when the domain contains no octet above 0x7F.
    pub fn is_ascii(&self) -> bool {
        match self {
            Domain::Name(name) => name.is_ascii(),
            Domain::Address(_) => true,
            Domain::GeneralLiteral(text) => text.is_ascii(),
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Name(name) => f.write_str(name),
            Domain::Address(IpAddr::V4(ip)) => write!(f, "[{ip}]"),
            Domain::Address(IpAddr::V6(ip)) => write!(f, "[IPv6:{ip}]"),
            Domain::GeneralLiteral(text) => write!(f, "[{text}]"),
        }
    }
}

/// `Mailbox = Local-part "@" ( Domain / address-literal )` (RFC 5321 section 4.1.2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// The local part with quoting removed: `"john doe"@x` is stored as `john doe`. Display
    /// re-quotes it when it is not a valid Dot-string. Case is preserved (RFC 5321 section 2.4:
    /// local parts MAY be case-sensitive).
    pub local_part: String,
    pub domain: Domain,
}

impl Mailbox {
    /// True when neither the local part nor the domain contains an octet above 0x7F; only such
    /// addresses may be used without SMTPUTF8 (RFC 6531 section 3.4).
    pub fn is_ascii(&self) -> bool {
        self.local_part.is_ascii() && self.domain.is_ascii()
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(&self.local_part) {
            f.write_str(&self.local_part)?;
        } else {
            f.write_str("\"")?;
            for c in self.local_part.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        }
        write!(f, "@{}", self.domain)
    }
}

/// True when `s` is an RFC 5321 `Dot-string` (with RFC 6531 UTF-8 atext), so it needs no quotes.
pub fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|atom| {
            !atom.is_empty() && atom.chars().all(|c| !c.is_ascii() || is_atext(c as u8))
        })
}

/// `atext` of RFC 5322 section 3.2.3, the characters of an `Atom`.
pub fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

/// `Reverse-path = Path / "<>"` (RFC 5321 section 4.1.2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>`, the null sender of notifications (RFC 5321 section 4.5.5).
    Null,
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(mailbox) => mailbox.fmt(f),
        }
    }
}

/// `Forward-path = Path`, plus the special `<Postmaster>` of RFC 5321 section 4.1.1.3.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ForwardPath {
    /// `<Postmaster>` with no domain (case-insensitive), which every server MUST accept
    /// (RFC 5321 section 4.5.1).
    Postmaster,
    Mailbox(Mailbox),
}

impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("Postmaster"),
            ForwardPath::Mailbox(mailbox) => mailbox.fmt(f),
        }
    }
}

/// The `BODY=` MAIL parameter (RFC 6152 section 2, RFC 3030 section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
    /// Only with BDAT (RFC 3030 section 3).
    BinaryMime,
}

impl BodyType {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
            BodyType::BinaryMime => "BINARYMIME",
        }
    }
}

/// The DSN `RET=` MAIL parameter (RFC 3461 section 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ret {
    Full,
    Headers,
}

impl Ret {
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Headers => "HDRS",
        }
    }
}

/// The DSN `NOTIFY=` RCPT parameter (RFC 3461 section 4.1). `NOTIFY=NEVER` is all three false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    pub const NEVER: Notify = Notify { success: false, failure: false, delay: false };
}

impl fmt::Display for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words = Vec::with_capacity(3);
        if self.success {
            words.push("SUCCESS");
        }
        if self.failure {
            words.push("FAILURE");
        }
        if self.delay {
            words.push("DELAY");
        }
        if words.is_empty() { f.write_str("NEVER") } else { f.write_str(&words.join(",")) }
    }
}

/// The DSN `ORCPT=addr-type;xtext` RCPT parameter (RFC 3461 section 4.2), xtext-decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OriginalRecipient {
    /// The address type, e.g. `rfc822` or `utf-8`, as given.
    pub addr_type: String,
    /// The decoded address.
    pub address: String,
}

/// A parsed `MAIL FROM:` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    pub path: ReversePath,
    /// `SIZE=` (RFC 1870): the client's estimate of the message size in octets.
    pub size: Option<u64>,
    pub body: Option<BodyType>,
    /// `SMTPUTF8` (RFC 6531 section 3.4).
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// `ENVID=` (RFC 3461 section 4.4), xtext-decoded.
    pub envid: Option<String>,
    /// `AUTH=` (RFC 4954 section 5), xtext-decoded: the mailbox the client says submitted the
    /// message, or `<>` for "unknown". This is only the client's claim. RFC 4954 section 5:
    /// "If the server does not sufficiently trust the authenticated identity of the client, or
    /// if the client is not authenticated, then the server MUST behave as if the AUTH=<>
    /// parameter was supplied"; it MAY log the value. A server that trusts no client simply
    /// ignores it.
    pub auth: Option<ReversePath>,
    /// True when any ESMTP parameter was present, which HELO sessions may not use.
    pub has_parameters: bool,
}

/// A parsed `RCPT TO:` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptTo {
    pub path: ForwardPath,
    pub notify: Option<Notify>,
    pub orcpt: Option<OriginalRecipient>,
    /// True when any ESMTP parameter was present, which HELO sessions may not use.
    pub has_parameters: bool,
}

/// One SMTP command line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO domain-or-literal`.
    Ehlo(Domain),
    /// `HELO domain`. RFC 5321 allows only a domain here, but address literals are common and
    /// accepted.
    Helo(Domain),
    Mail(MailFrom),
    Rcpt(RcptTo),
    Data,
    /// `BDAT chunk-size [LAST]` (RFC 3030 section 2).
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    /// `VRFY string`, the argument as given.
    Vrfy(String),
    /// `EXPN string`, the argument as given.
    Expn(String),
    /// `HELP [string]`.
    Help(Option<String>),
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954 section 4).
    Auth {
        /// The SASL mechanism name, upper case (RFC 4954 section 8: case-insensitive).
        mechanism: String,
        /// The initial response as sent: base64 or `=`, not yet decoded. It may carry a
        /// password, so a parsed command must not be logged.
        initial_response: Option<String>,
    },
}

impl Command {
    /// The command verb, upper case, for logs and metrics.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ehlo(_) => "EHLO",
            Command::Helo(_) => "HELO",
            Command::Mail(_) => "MAIL",
            Command::Rcpt(_) => "RCPT",
            Command::Data => "DATA",
            Command::Bdat { .. } => "BDAT",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::Vrfy(_) => "VRFY",
            Command::Expn(_) => "EXPN",
            Command::Help(_) => "HELP",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
        }
    }
}

/// Length limits applied while parsing paths (RFC 5321 section 4.5.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressLimits {
    /// Maximum octets of a local part (RFC 5321 section 4.5.3.1.1: 64).
    pub local_part: usize,
    /// Maximum octets of a domain (RFC 5321 section 4.5.3.1.2: 255).
    pub domain: usize,
}

impl Default for AddressLimits {
    fn default() -> Self {
        AddressLimits { local_part: 64, domain: 255 }
    }
}

/// Why a command line could not be parsed. Each variant maps to one reply in
/// [`crate::reply`]; the parser never chooses reply codes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// The verb is not one this server knows (500 5.5.1).
    UnknownCommand,
    /// The verb is known but the line does not match its syntax. Carries the expected form,
    /// e.g. `"MAIL FROM:<address> [parameters]"` (501 5.5.2).
    Syntax(&'static str),
    /// The reverse-path is malformed; carries what is wrong (501 5.1.7).
    BadSender(&'static str),
    /// The forward-path is malformed; carries what is wrong (501 5.1.3).
    BadRecipient(&'static str),
    /// The local part is longer than [`AddressLimits::local_part`] (501 5.1.3 or 5.1.7).
    LocalPartTooLong { sender: bool },
    /// The domain is longer than [`AddressLimits::domain`] (501 5.1.3 or 5.1.7).
    DomainTooLong { sender: bool },
    /// An ESMTP parameter this server does not know, or one given twice (555 5.5.4).
    UnknownParameter(String),
    /// A known parameter with a malformed value; carries the parameter name (501 5.5.4).
    InvalidParameterValue(&'static str),
    /// The line contains octets that are not allowed in a command line (NUL, bare CR or LF,
    /// or non-UTF-8 bytes) (500 5.5.2).
    InvalidCharacters,
}

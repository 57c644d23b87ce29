//! Command line parser: RFC 5321 section 4.1 syntax, with the ESMTP parameters of RFC 1870
//! (SIZE), RFC 6152 and RFC 3030 (BODY), RFC 6531 (SMTPUTF8, UTF-8 addresses), RFC 3461
//! (RET, ENVID, NOTIFY, ORCPT) and RFC 4954 (AUTH), and the AUTH command of RFC 4954.
//!
//! The parser works on the octets of one line, walking them with a [`Cursor`]. Functions are
//! named after the ABNF rules they recognise. Nothing is allocated until a value is known to be
//! valid, and then only the strings the returned [`Command`] owns.
//!
//! The parser is deliberately indifferent to session state: it accepts UTF-8 addresses and
//! every parameter it knows, and the session decides whether SMTPUTF8, DSN, AUTH or EHLO permit
//! them. For the same reason the AUTH initial response is left encoded: whether it is decoded
//! at all depends on checks that come first (RFC 4954 section 4 has a 503 for AUTH in a
//! transaction, whatever follows it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::types::{
    AddressLimits, BodyType, Command, CommandError, Domain, ForwardPath, MailFrom, Mailbox, Notify,
    OriginalRecipient, RcptTo, Ret, ReversePath, is_atext,
};

const EHLO_SYNTAX: &str = "EHLO domain";
const HELO_SYNTAX: &str = "HELO domain";
const MAIL_SYNTAX: &str = "MAIL FROM:<address> [parameters]";
const RCPT_SYNTAX: &str = "RCPT TO:<address> [parameters]";
const BDAT_SYNTAX: &str = "BDAT chunk-size [LAST]";
const VRFY_SYNTAX: &str = "VRFY string";
const EXPN_SYNTAX: &str = "EXPN string";
const AUTH_SYNTAX: &str = "AUTH mechanism [initial-response]";

/// Longest ENVID accepted, in characters after xtext decoding (RFC 3461 sections 4.4 and 5.4).
const ENVID_MAX: usize = 100;
/// Longest ORCPT address accepted, in characters after decoding (RFC 3461 sections 4.2 and 5.4).
const ORCPT_MAX: usize = 500;

#[derive(Debug, Clone, Copy)]
enum Verb {
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth,
}

const VERBS: [(&str, Verb); 14] = [
    ("EHLO", Verb::Ehlo),
    ("HELO", Verb::Helo),
    ("MAIL", Verb::Mail),
    ("RCPT", Verb::Rcpt),
    ("DATA", Verb::Data),
    ("BDAT", Verb::Bdat),
    ("RSET", Verb::Rset),
    ("NOOP", Verb::Noop),
    ("QUIT", Verb::Quit),
    ("VRFY", Verb::Vrfy),
    ("EXPN", Verb::Expn),
    ("HELP", Verb::Help),
    ("STARTTLS", Verb::StartTls),
    ("AUTH", Verb::Auth),
];

/// Parses one command line. `line` excludes the terminating CRLF.
pub fn parse_command(line: &[u8], limits: &AddressLimits) -> Result<Command, CommandError> {
    let line = command_line(line)?;
    // RFC 5321 section 4.1.1: the verb is terminated by SP if parameters follow, and by the end
    // of the line otherwise. Anything else glued to the verb makes it a different, unknown verb.
    let (verb, argument) = match line.split_once(' ') {
        Some((verb, argument)) => (verb, Some(argument)),
        None => (line, None),
    };
    // RFC 5321 section 2.4: verbs are not case sensitive.
    let verb = VERBS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(verb))
        .map(|&(_, verb)| verb)
        .ok_or(CommandError::UnknownCommand)?;
    match verb {
        Verb::Ehlo => helo_argument(argument, limits, EHLO_SYNTAX).map(Command::Ehlo),
        Verb::Helo => helo_argument(argument, limits, HELO_SYNTAX).map(Command::Helo),
        Verb::Mail => mail(argument, limits).map(Command::Mail),
        Verb::Rcpt => rcpt(argument, limits).map(Command::Rcpt),
        Verb::Data => no_argument(argument, "DATA", Command::Data),
        Verb::Rset => no_argument(argument, "RSET", Command::Rset),
        Verb::Quit => no_argument(argument, "QUIT", Command::Quit),
        Verb::StartTls => no_argument(argument, "STARTTLS", Command::StartTls),
        // RFC 5321 section 4.1.1.9: `noop = "NOOP" [ SP String ]`, the string is ignored.
        Verb::Noop => Ok(Command::Noop),
        Verb::Vrfy => string_argument(argument, VRFY_SYNTAX).map(Command::Vrfy),
        Verb::Expn => string_argument(argument, EXPN_SYNTAX).map(Command::Expn),
        Verb::Help => Ok(Command::Help(optional_string(argument).map(str::to_owned))),
        Verb::Bdat => bdat(argument),
        Verb::Auth => auth(argument),
    }
}

/// Checks the octets of a command line and returns it as text, without trailing white space.
fn command_line(line: &[u8]) -> Result<&str, CommandError> {
    // RFC 5321 section 2.3.8: implementations "MUST NOT recognize or generate any other
    // character or character sequence as a line terminator" than CRLF, so a CR or LF left
    // inside a line is refused rather than guessed at. NUL has no place in a command at all.
    if line.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')) {
        return Err(CommandError::InvalidCharacters);
    }
    // RFC 6531 section 3.3: anything above 0x7F must be UTF-8.
    let text = std::str::from_utf8(line).map_err(|_| CommandError::InvalidCharacters)?;
    // The C1 controls (U+0080 to U+009F) are UTF-8 too, but control terminals and logs like
    // their ASCII cousins (U+009B is CSI); no address or domain needs them (RFC 6532 section
    // 3.1 builds on Unicode text, and RFC 5198 excludes controls from interchange).
    if text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)) {
        return Err(CommandError::InvalidCharacters);
    }
    // RFC 5321 section 4.1.1: receivers SHOULD tolerate trailing white space.
    Ok(text.trim_end_matches([' ', '\t']))
}

/// The words of an argument, separated by one or more SP.
fn words(argument: Option<&str>) -> impl Iterator<Item = &str> {
    argument.into_iter().flat_map(|text| text.split(' ')).filter(|word| !word.is_empty())
}

/// The argument without leading SP, or `None` when there is none.
fn optional_string(argument: Option<&str>) -> Option<&str> {
    argument.map(|text| text.trim_start_matches(' ')).filter(|text| !text.is_empty())
}

/// RFC 5321 section 4.1.1: RSET, DATA and QUIT take no parameters, and servers SHOULD reject
/// commands carrying them as having invalid syntax. STARTTLS is the same (RFC 3207 section 4).
fn no_argument(
    argument: Option<&str>,
    syntax: &'static str,
    command: Command,
) -> Result<Command, CommandError> {
    match argument {
        None => Ok(command),
        Some(_) => Err(CommandError::Syntax(syntax)),
    }
}

/// `vrfy = "VRFY" SP String` and `expn = "EXPN" SP String` (RFC 5321 sections 4.1.1.6-7). The
/// argument is kept as given: clients commonly send forms that are not a strict `String`.
fn string_argument(argument: Option<&str>, syntax: &'static str) -> Result<String, CommandError> {
    optional_string(argument).map(str::to_owned).ok_or(CommandError::Syntax(syntax))
}

/// `ehlo = "EHLO" SP ( Domain / address-literal )` and `helo = "HELO" SP Domain`
/// (RFC 5321 section 4.1.1.1). HELO also gets address literals, which clients send anyway.
fn helo_argument(
    argument: Option<&str>,
    limits: &AddressLimits,
    syntax: &'static str,
) -> Result<Domain, CommandError> {
    let mut words = words(argument);
    let (Some(word), None) = (words.next(), words.next()) else {
        return Err(CommandError::Syntax(syntax));
    };
    let mut cursor = Cursor::new(word);
    match domain_or_literal(&mut cursor) {
        Ok((domain, length)) if cursor.at_end() && length <= limits.domain => {
            Ok(domain.to_domain())
        }
        _ => Err(CommandError::Syntax(syntax)),
    }
}

/// `bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ]`, `chunk-size = 1*DIGIT`,
/// `end-marker = "LAST"` (RFC 3030 section 2).
fn bdat(argument: Option<&str>) -> Result<Command, CommandError> {
    let error = CommandError::Syntax(BDAT_SYNTAX);
    let mut words = words(argument);
    let Some(size) = words.next().and_then(digits) else {
        return Err(error);
    };
    let last = match words.next() {
        None => false,
        Some(marker) if marker.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(error),
    };
    if words.next().is_some() {
        return Err(error);
    }
    Ok(Command::Bdat { size, last })
}

/// `auth-command = "AUTH" SP sasl-mech [SP initial-response]` (RFC 4954 section 8), with
/// `initial-response = base64 / "="`. The mechanism is upper-cased; the initial response is
/// kept as sent, for the session to decode.
fn auth(argument: Option<&str>) -> Result<Command, CommandError> {
    let mut words = words(argument);
    let (Some(mechanism), initial_response, None) = (words.next(), words.next(), words.next())
    else {
        return Err(CommandError::Syntax(AUTH_SYNTAX));
    };
    if !is_mechanism_name(mechanism) {
        return Err(CommandError::Syntax(AUTH_SYNTAX));
    }
    Ok(Command::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial_response: initial_response.map(str::to_owned),
    })
}

/// `sasl-mech = 1*20mech-char`, `mech-char = UPPER-ALPHA / DIGIT / HYPHEN / UNDERSCORE` (RFC
/// 4422 section 3.1), in either case: RFC 4954 section 8 makes SMTP's use of it
/// case-insensitive. Also for checking configured mechanism names.
pub fn is_mechanism_name(text: &str) -> bool {
    (1..=20).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `1*DIGIT` as a `u64`; `None` when empty, not all digits, or too large.
fn digits(text: &str) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.bytes().try_fold(0u64, |value, b| {
        if b.is_ascii_digit() {
            value.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

// ---------------------------------------------------------------------------------------------
// MAIL and RCPT
// ---------------------------------------------------------------------------------------------

/// `mail = "MAIL FROM:" Reverse-path [SP Mail-parameters]` (RFC 5321 section 4.1.1.2).
fn mail(argument: Option<&str>, limits: &AddressLimits) -> Result<MailFrom, CommandError> {
    let syntax = CommandError::Syntax(MAIL_SYNTAX);
    let rest = argument.and_then(|text| strip_prefix_ignore_case(text, "FROM:")).ok_or(syntax)?;
    let mut cursor = Cursor::new(rest);
    // Not in the grammar, but sent by enough clients that rejecting it helps nobody.
    cursor.eat(b' ');
    let path = match reverse_path(&mut cursor, limits) {
        Ok(path) => path,
        Err(error) => return Err(error.into_command_error(true)),
    };
    let mut mail = MailFrom {
        path,
        size: None,
        body: None,
        smtputf8: false,
        ret: None,
        envid: None,
        auth: None,
        has_parameters: false,
    };
    for param in parameters(cursor.rest(), MAIL_SYNTAX)? {
        let (keyword, value) = esmtp_param(param, MAIL_SYNTAX)?;
        mail.has_parameters = true;
        if keyword.eq_ignore_ascii_case("SIZE") {
            set_once(&mut mail.size, keyword, || size_value(value))?;
        } else if keyword.eq_ignore_ascii_case("BODY") {
            set_once(&mut mail.body, keyword, || body_value(value))?;
        } else if keyword.eq_ignore_ascii_case("SMTPUTF8") {
            if mail.smtputf8 {
                return Err(CommandError::UnknownParameter(keyword.to_owned()));
            }
            // RFC 6531 section 3.4: `SMTPUTF8` takes no value.
            if value.is_some() {
                return Err(CommandError::InvalidParameterValue("SMTPUTF8"));
            }
            mail.smtputf8 = true;
        } else if keyword.eq_ignore_ascii_case("RET") {
            // RFC 3461 section 4.5: RET MUST NOT appear more than once.
            set_once(&mut mail.ret, keyword, || ret_value(value))?;
        } else if keyword.eq_ignore_ascii_case("ENVID") {
            // RFC 3461 section 4.5: ENVID MUST NOT appear more than once.
            set_once(&mut mail.envid, keyword, || envid_value(value))?;
        } else if keyword.eq_ignore_ascii_case("AUTH") {
            set_once(&mut mail.auth, keyword, || auth_value(value, limits))?;
        } else {
            return Err(CommandError::UnknownParameter(keyword.to_owned()));
        }
    }
    Ok(mail)
}

/// `rcpt = "RCPT TO:" ( "<Postmaster@" Domain ">" / "<Postmaster>" / Forward-path )
/// [SP Rcpt-parameters]` (RFC 5321 section 4.1.1.3).
fn rcpt(argument: Option<&str>, limits: &AddressLimits) -> Result<RcptTo, CommandError> {
    let syntax = CommandError::Syntax(RCPT_SYNTAX);
    let rest = argument.and_then(|text| strip_prefix_ignore_case(text, "TO:")).ok_or(syntax)?;
    let mut cursor = Cursor::new(rest);
    cursor.eat(b' ');
    let path = match forward_path(&mut cursor, limits) {
        Ok(path) => path,
        Err(error) => return Err(error.into_command_error(false)),
    };
    let mut rcpt = RcptTo { path, notify: None, orcpt: None, has_parameters: false };
    for param in parameters(cursor.rest(), RCPT_SYNTAX)? {
        let (keyword, value) = esmtp_param(param, RCPT_SYNTAX)?;
        rcpt.has_parameters = true;
        if keyword.eq_ignore_ascii_case("NOTIFY") {
            set_once(&mut rcpt.notify, keyword, || notify_value(value))?;
        } else if keyword.eq_ignore_ascii_case("ORCPT") {
            set_once(&mut rcpt.orcpt, keyword, || orcpt_value(value))?;
        } else {
            return Err(CommandError::UnknownParameter(keyword.to_owned()));
        }
    }
    Ok(rcpt)
}

/// Fills a parameter's slot from its parsed value; a parameter given twice is refused like an
/// unknown one (555), before its value is looked at.
fn set_once<T>(
    slot: &mut Option<T>,
    keyword: &str,
    value: impl FnOnce() -> Result<T, CommandError>,
) -> Result<(), CommandError> {
    if slot.is_some() {
        return Err(CommandError::UnknownParameter(keyword.to_owned()));
    }
    *slot = Some(value()?);
    Ok(())
}

/// `text` without `prefix`, compared ignoring ASCII case.
fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// Why a path did not parse, before it is known whether it was the sender or a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathError {
    /// No angle brackets around the path, or text glued to the closing one.
    Syntax,
    /// The path is bracketed but its contents are malformed.
    Invalid(&'static str),
    LocalPartTooLong,
    DomainTooLong,
}

impl PathError {
    fn into_command_error(self, sender: bool) -> CommandError {
        match self {
            PathError::Syntax => {
                CommandError::Syntax(if sender { MAIL_SYNTAX } else { RCPT_SYNTAX })
            }
            PathError::Invalid(why) if sender => CommandError::BadSender(why),
            PathError::Invalid(why) => CommandError::BadRecipient(why),
            PathError::LocalPartTooLong => CommandError::LocalPartTooLong { sender },
            PathError::DomainTooLong => CommandError::DomainTooLong { sender },
        }
    }
}

/// `Reverse-path = Path / "<>"` (RFC 5321 section 4.1.2).
fn reverse_path(cursor: &mut Cursor<'_>, limits: &AddressLimits) -> Result<ReversePath, PathError> {
    Ok(match path(cursor, limits)? {
        Some(mailbox) => ReversePath::Mailbox(mailbox),
        None => ReversePath::Null,
    })
}

/// `Forward-path = Path`, or the bare `<Postmaster>` (RFC 5321 section 4.1.1.3).
fn forward_path(cursor: &mut Cursor<'_>, limits: &AddressLimits) -> Result<ForwardPath, PathError> {
    // RFC 5321 section 4.1.1.3: "Postmaster" is case-insensitive here, unlike other local parts.
    if cursor.eat_ignore_case("<postmaster>") {
        return Ok(ForwardPath::Postmaster);
    }
    match path(cursor, limits)? {
        Some(mailbox) => Ok(ForwardPath::Mailbox(mailbox)),
        None => Err(PathError::Invalid("empty address")),
    }
}

/// `Path = "<" [ A-d-l ":" ] Mailbox ">"`, or `"<>"` which gives `None` (RFC 5321 section
/// 4.1.2). Addresses without angle brackets are refused: guessing where they end is how
/// parsers disagree.
fn path(cursor: &mut Cursor<'_>, limits: &AddressLimits) -> Result<Option<Mailbox>, PathError> {
    if !cursor.eat(b'<') || !cursor.rest().contains('>') {
        return Err(PathError::Syntax);
    }
    if cursor.eat(b'>') {
        return Ok(None);
    }
    if cursor.peek() == Some(b'@') {
        a_d_l(cursor)?;
    }
    let mailbox = mailbox(cursor, limits)?;
    match cursor.peek() {
        Some(b'>') => {
            cursor.bump();
            Ok(Some(mailbox))
        }
        None => Err(PathError::Syntax),
        Some(_) => Err(PathError::Invalid("invalid domain")),
    }
}

/// `A-d-l ":"` with `A-d-l = At-domain *( "," At-domain )` and `At-domain = "@" Domain`: a
/// source route, which is validated and dropped. RFC 5321 section 4.1.1.3: "Receiving systems
/// MUST recognize source route syntax but SHOULD strip off the source route specification";
/// section 4.1.2: "MUST BE accepted, SHOULD NOT be generated, and SHOULD be ignored".
fn a_d_l(cursor: &mut Cursor<'_>) -> Result<(), PathError> {
    const BAD_ROUTE: PathError = PathError::Invalid("invalid source route");
    loop {
        if !cursor.eat(b'@') {
            return Err(BAD_ROUTE);
        }
        domain_or_literal(cursor).map_err(|_| BAD_ROUTE)?;
        if cursor.eat(b':') {
            return Ok(());
        }
        if !cursor.eat(b',') {
            return Err(BAD_ROUTE);
        }
    }
}

/// `Mailbox = Local-part "@" ( Domain / address-literal )` (RFC 5321 section 4.1.2).
fn mailbox(cursor: &mut Cursor<'_>, limits: &AddressLimits) -> Result<Mailbox, PathError> {
    let start = cursor.pos;
    let local = local_part(cursor)?;
    // RFC 5321 section 4.5.3.1.1: at most 64 octets, counted as sent (quotes included), so that
    // whatever is accepted here can be sent on unchanged.
    if cursor.pos - start > limits.local_part {
        return Err(PathError::LocalPartTooLong);
    }
    if !cursor.eat(b'@') {
        return Err(PathError::Invalid(match cursor.peek() {
            None | Some(b'>') => "missing @domain",
            Some(_) => "invalid local part",
        }));
    }
    let (domain, length) = domain_or_literal(cursor).map_err(PathError::Invalid)?;
    // RFC 5321 section 4.5.3.1.2: at most 255 octets.
    if length > limits.domain {
        return Err(PathError::DomainTooLong);
    }
    Ok(Mailbox { local_part: local.unquote(), domain: domain.to_domain() })
}

/// A validated local part as it appeared on the wire.
#[derive(Debug, Clone, Copy)]
enum LocalPart<'a> {
    Dot(&'a str),
    /// The text between the quotes, quoted-pairs still escaped.
    Quoted(&'a str),
}

impl LocalPart<'_> {
    fn unquote(self) -> String {
        match self {
            LocalPart::Dot(text) => text.to_owned(),
            LocalPart::Quoted(text) => {
                let mut out = String::with_capacity(text.len());
                let mut chars = text.chars();
                while let Some(c) = chars.next() {
                    if c == '\\' {
                        out.extend(chars.next());
                    } else {
                        out.push(c);
                    }
                }
                out
            }
        }
    }
}

/// `Local-part = Dot-string / Quoted-string` (RFC 5321 section 4.1.2).
fn local_part<'a>(cursor: &mut Cursor<'a>) -> Result<LocalPart<'a>, PathError> {
    if cursor.peek() == Some(b'"') {
        quoted_string(cursor).map(LocalPart::Quoted)
    } else {
        dot_string(cursor).map(LocalPart::Dot)
    }
}

/// `Dot-string = Atom *("." Atom)` (RFC 5321 section 4.1.2).
fn dot_string<'a>(cursor: &mut Cursor<'a>) -> Result<&'a str, PathError> {
    let start = cursor.pos;
    loop {
        if atom(cursor).is_empty() {
            return Err(PathError::Invalid("invalid local part"));
        }
        if !cursor.eat(b'.') {
            return Ok(cursor.since(start));
        }
    }
}

/// `Atom = 1*atext`, with `atext =/ UTF8-non-ascii` (RFC 6531 section 3.3). Returns the
/// possibly empty run of atext.
fn atom<'a>(cursor: &mut Cursor<'a>) -> &'a str {
    cursor.take_while(|b| is_atext(b) || !b.is_ascii())
}

/// `Quoted-string = DQUOTE *QcontentSMTP DQUOTE` with `QcontentSMTP = qtextSMTP /
/// quoted-pairSMTP` (RFC 5321 section 4.1.2). Returns the text between the quotes, undecoded.
fn quoted_string<'a>(cursor: &mut Cursor<'a>) -> Result<&'a str, PathError> {
    const UNTERMINATED: PathError = PathError::Invalid("unterminated quoted string");
    cursor.eat(b'"');
    let start = cursor.pos;
    loop {
        match cursor.peek() {
            None => return Err(UNTERMINATED),
            Some(b'"') => {
                let text = cursor.since(start);
                cursor.bump();
                return Ok(text);
            }
            // quoted-pairSMTP = %d92 %d32-126
            Some(b'\\') => {
                cursor.bump();
                match cursor.peek() {
                    Some(32..=126) => cursor.bump(),
                    None => return Err(UNTERMINATED),
                    Some(_) => return Err(PathError::Invalid("invalid quoted pair")),
                }
            }
            Some(b) if qtext_smtp(b) => cursor.bump(),
            Some(_) => return Err(PathError::Invalid("invalid character in quoted string")),
        }
    }
}

/// `qtextSMTP = %d32-33 / %d35-91 / %d93-126` (RFC 5321 section 4.1.2), plus
/// `qtextSMTP =/ UTF8-non-ascii` (RFC 6531 section 3.3).
fn qtext_smtp(b: u8) -> bool {
    matches!(b, 32..=33 | 35..=91 | 93..=126) || !b.is_ascii()
}

// ---------------------------------------------------------------------------------------------
// Domains and address literals
// ---------------------------------------------------------------------------------------------

/// A validated domain or literal, borrowed from the line until it is known to be wanted.
#[derive(Debug, Clone, Copy)]
enum DomainRef<'a> {
    Name(&'a str),
    Address(IpAddr),
    General(&'a str),
}

impl DomainRef<'_> {
    fn to_domain(self) -> Domain {
        match self {
            DomainRef::Name(name) => Domain::Name(name.to_owned()),
            DomainRef::Address(ip) => Domain::Address(ip),
            DomainRef::General(text) => Domain::GeneralLiteral(text.to_owned()),
        }
    }
}

/// `Domain / address-literal`. Returns the value and its length in octets as it counts against
/// [`AddressLimits::domain`]: the name without a trailing dot, or the literal with its brackets.
fn domain_or_literal<'a>(cursor: &mut Cursor<'a>) -> Result<(DomainRef<'a>, usize), &'static str> {
    let start = cursor.pos;
    if cursor.peek() == Some(b'[') {
        let literal = address_literal(cursor).ok_or("invalid address literal")?;
        return Ok((literal, cursor.pos - start));
    }
    let text =
        cursor.take_while(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || !b.is_ascii());
    if text.is_empty() {
        return Err("missing domain");
    }
    // RFC 5321 section 4.1.2: only letters, digits and hyphens MUST appear in labels, and a
    // command using other characters MUST be rejected with 501, which every caller's error
    // maps to.
    let name = domain(text).ok_or("invalid domain")?;
    Ok((DomainRef::Name(name), name.len()))
}

/// `Domain = sub-domain *("." sub-domain)` (RFC 5321 section 4.1.2). One trailing dot, the
/// DNS root, is accepted and left out of the returned name.
fn domain(text: &str) -> Option<&str> {
    let name = text.strip_suffix('.').unwrap_or(text);
    (!name.is_empty() && name.split('.').all(sub_domain)).then_some(name)
}

/// `sub-domain = Let-dig [Ldh-str]` (RFC 5321 section 4.1.2), or a U-label (RFC 6531 section
/// 3.3). Any non-ASCII character counts as a letter; IDNA validity is not checked here.
fn sub_domain(label: &str) -> bool {
    match (label.as_bytes().first(), label.as_bytes().last()) {
        (Some(&first), Some(&last)) => {
            let_dig(first) && let_dig(last) && label.bytes().all(|b| let_dig(b) || b == b'-')
        }
        _ => false,
    }
}

/// `Let-dig = ALPHA / DIGIT`, extended to non-ASCII octets for U-labels.
fn let_dig(b: u8) -> bool {
    b.is_ascii_alphanumeric() || !b.is_ascii()
}

/// `Ldh-str = *( ALPHA / DIGIT / "-" ) Let-dig`, ASCII only (used for literal tags).
fn ldh_str(text: &str) -> bool {
    text.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `address-literal = "[" ( IPv4-address-literal / IPv6-address-literal /
/// General-address-literal ) "]"` (RFC 5321 section 4.1.3).
fn address_literal<'a>(cursor: &mut Cursor<'a>) -> Option<DomainRef<'a>> {
    cursor.eat(b'[');
    let inner = cursor.take_while(dcontent);
    if !cursor.eat(b']') {
        return None;
    }
    match inner.split_once(':') {
        // `IPv6-address-literal = "IPv6:" IPv6-addr`; ABNF strings are case-insensitive.
        Some((tag, address)) if tag.eq_ignore_ascii_case("IPv6") => {
            ipv6_addr(address).map(|ip| DomainRef::Address(IpAddr::V6(ip)))
        }
        Some((tag, content)) => {
            general_address_literal(tag, content).then_some(DomainRef::General(inner))
        }
        None => ipv4_address_literal(inner).map(|ip| DomainRef::Address(IpAddr::V4(ip))),
    }
}

/// `dcontent = %d33-90 / %d94-126`: printable US-ASCII except `[`, `\` and `]`.
fn dcontent(b: u8) -> bool {
    matches!(b, 33..=90 | 94..=126)
}

/// `General-address-literal = Standardized-tag ":" 1*dcontent`, `Standardized-tag = Ldh-str`
/// (RFC 5321 section 4.1.3). The content has already been limited to dcontent.
fn general_address_literal(tag: &str, content: &str) -> bool {
    ldh_str(tag) && !content.is_empty()
}

/// `IPv4-address-literal = Snum 3("." Snum)` (RFC 5321 section 4.1.3).
fn ipv4_address_literal(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        *octet = snum(parts.next()?)?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// `Snum = 1*3DIGIT`, "representing a decimal integer value in the range 0 through 255".
fn snum(text: &str) -> Option<u8> {
    if text.is_empty() || text.len() > 3 {
        return None;
    }
    u8::try_from(digits(text)?).ok()
}

/// `IPv6-addr = IPv6-full / IPv6-comp / IPv6v4-full / IPv6v4-comp` (RFC 5321 section 4.1.3).
/// As the grammar says, "::" stands for at least two groups of zeros.
fn ipv6_addr(text: &str) -> Option<Ipv6Addr> {
    let mut groups = [0u16; 8];
    match text.split_once("::") {
        // IPv6-full / IPv6v4-full
        None => {
            if ipv6_groups(text, &mut groups)? != 8 {
                return None;
            }
        }
        // IPv6-comp / IPv6v4-comp: "No more than 6 groups in addition to the "::" may be
        // present", where an IPv4 tail counts as two.
        Some((head, tail)) => {
            let mut head_groups = [0u16; 8];
            let mut tail_groups = [0u16; 8];
            let head_count =
                if head.is_empty() { 0 } else { ipv6_hex_list(head, &mut head_groups)? };
            let tail_count = if tail.is_empty() { 0 } else { ipv6_groups(tail, &mut tail_groups)? };
            if head_count + tail_count > 6 {
                return None;
            }
            groups[..head_count].copy_from_slice(&head_groups[..head_count]);
            groups[8 - tail_count..].copy_from_slice(&tail_groups[..tail_count]);
        }
    }
    Some(Ipv6Addr::from(groups))
}

/// `IPv6-hex *(":" IPv6-hex)` with no IPv4 tail. Returns the number of groups written.
fn ipv6_hex_list(text: &str, out: &mut [u16; 8]) -> Option<usize> {
    let mut count = 0;
    for piece in text.split(':') {
        *out.get_mut(count)? = ipv6_hex(piece)?;
        count += 1;
    }
    Some(count)
}

/// `IPv6-hex *(":" IPv6-hex)` optionally ending in `":" IPv4-address-literal` (or being just
/// one). Returns the number of 16-bit groups written, the IPv4 tail counting as two.
fn ipv6_groups(text: &str, out: &mut [u16; 8]) -> Option<usize> {
    let (hex, ipv4) = match text.rsplit_once(':') {
        Some((hex, last)) if last.contains('.') => (Some(hex), Some(last)),
        None if text.contains('.') => (None, Some(text)),
        _ => (Some(text), None),
    };
    let mut count = match hex {
        Some(hex) => ipv6_hex_list(hex, out)?,
        None => 0,
    };
    if let Some(ipv4) = ipv4 {
        let [a, b, c, d] = ipv4_address_literal(ipv4)?.octets();
        *out.get_mut(count)? = u16::from_be_bytes([a, b]);
        *out.get_mut(count + 1)? = u16::from_be_bytes([c, d]);
        count += 2;
    }
    Some(count)
}

/// `IPv6-hex = 1*4HEXDIG`.
fn ipv6_hex(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 4 {
        return None;
    }
    text.bytes().try_fold(0u16, |value, b| Some(value << 4 | u16::from(hex_digit(b)?)))
}

/// The value of one `HEXDIG`, either case (RFC 5234 appendix B.1: ABNF strings are
/// case-insensitive).
fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// ESMTP parameters
// ---------------------------------------------------------------------------------------------

/// The parameters after a path: nothing, or SP followed by `esmtp-param *(SP esmtp-param)`
/// (RFC 5321 section 4.1.2). Runs of spaces between parameters are tolerated.
fn parameters<'a>(
    rest: &'a str,
    syntax: &'static str,
) -> Result<impl Iterator<Item = &'a str>, CommandError> {
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(CommandError::Syntax(syntax));
    }
    Ok(rest.split(' ').filter(|param| !param.is_empty()))
}

/// `esmtp-param = esmtp-keyword ["=" esmtp-value]`. Returns the keyword and the raw value;
/// each parameter checks its value, so that an unknown keyword is reported as such whatever
/// follows it.
fn esmtp_param<'a>(
    param: &'a str,
    syntax: &'static str,
) -> Result<(&'a str, Option<&'a str>), CommandError> {
    let (keyword, value) = match param.split_once('=') {
        Some((keyword, value)) => (keyword, Some(value)),
        None => (param, None),
    };
    if !esmtp_keyword(keyword) {
        return Err(CommandError::Syntax(syntax));
    }
    Ok((keyword, value))
}

/// `esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")`.
fn esmtp_keyword(text: &str) -> bool {
    text.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `esmtp-value = 1*(%d33-60 / %d62-126)` (RFC 5321 section 4.1.2), with `esmtp-value =/
/// UTF8-non-ascii` (RFC 6531 section 3.3).
fn esmtp_value(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| matches!(b, 33..=60 | 62..=126) || !b.is_ascii())
}

/// The value a parameter requires, checked against `esmtp-value`.
fn required_value<'a>(value: Option<&'a str>, name: &'static str) -> Result<&'a str, CommandError> {
    value.filter(|value| esmtp_value(value)).ok_or(CommandError::InvalidParameterValue(name))
}

/// `size-value = 1*20DIGIT` (RFC 1870 section 3), as long as it fits in 64 bits.
fn size_value(value: Option<&str>) -> Result<u64, CommandError> {
    digits(required_value(value, "SIZE")?).ok_or(CommandError::InvalidParameterValue("SIZE"))
}

/// `body-value = "7BIT" / "8BITMIME" / "BINARYMIME"` (RFC 6152 section 2, RFC 3030 section 3).
fn body_value(value: Option<&str>) -> Result<BodyType, CommandError> {
    let value = required_value(value, "BODY")?;
    [BodyType::SevenBit, BodyType::EightBitMime, BodyType::BinaryMime]
        .into_iter()
        .find(|body| body.as_str().eq_ignore_ascii_case(value))
        .ok_or(CommandError::InvalidParameterValue("BODY"))
}

/// `ret-value = "FULL" / "HDRS"` (RFC 3461 section 4.3).
fn ret_value(value: Option<&str>) -> Result<Ret, CommandError> {
    let value = required_value(value, "RET")?;
    [Ret::Full, Ret::Headers]
        .into_iter()
        .find(|ret| ret.as_str().eq_ignore_ascii_case(value))
        .ok_or(CommandError::InvalidParameterValue("RET"))
}

/// `envid-parameter = "ENVID=" xtext` (RFC 3461 section 4.4), decoded.
fn envid_value(value: Option<&str>) -> Result<String, CommandError> {
    // RFC 3461 section 4.4: the decoded value MUST be printable US-ASCII; up to 100 characters.
    xtext(required_value(value, "ENVID")?)
        .filter(|envid| envid.len() <= ENVID_MAX && printable_ascii(envid))
        .ok_or(CommandError::InvalidParameterValue("ENVID"))
}

/// `auth-param = "AUTH=" xtext` (RFC 4954 section 8): "The decoded form of the xtext MUST be
/// either a <mailbox> or the two characters "<>"". The mailbox is held to the same syntax and
/// limits as the paths.
fn auth_value(value: Option<&str>, limits: &AddressLimits) -> Result<ReversePath, CommandError> {
    let invalid = CommandError::InvalidParameterValue("AUTH");
    let decoded = xtext(required_value(value, "AUTH")?).ok_or_else(|| invalid.clone())?;
    // Decoded hexchars could carry the C1 controls that `command_line` refuses on the wire.
    if decoded.chars().any(char::is_control) {
        return Err(invalid);
    }
    if decoded == "<>" {
        return Ok(ReversePath::Null);
    }
    let mut cursor = Cursor::new(&decoded);
    match mailbox(&mut cursor, limits) {
        Ok(mailbox) if cursor.at_end() => Ok(ReversePath::Mailbox(mailbox)),
        _ => Err(invalid),
    }
}

/// `notify-esmtp-value = "NEVER" / 1#notify-list-element`, `notify-list-element = "SUCCESS"
/// / "FAILURE" / "DELAY"` (RFC 3461 section 4.1), in any case.
fn notify_value(value: Option<&str>) -> Result<Notify, CommandError> {
    let invalid = CommandError::InvalidParameterValue("NOTIFY");
    let value = required_value(value, "NOTIFY")?;
    if value.eq_ignore_ascii_case("NEVER") {
        return Ok(Notify::NEVER);
    }
    let mut notify = Notify::NEVER;
    for element in value.split(',') {
        // RFC 3461 section 4.1: "the NEVER keyword MUST appear by itself", so it falls through
        // to the error here.
        let flag = if element.eq_ignore_ascii_case("SUCCESS") {
            &mut notify.success
        } else if element.eq_ignore_ascii_case("FAILURE") {
            &mut notify.failure
        } else if element.eq_ignore_ascii_case("DELAY") {
            &mut notify.delay
        } else {
            return Err(invalid);
        };
        if *flag {
            return Err(invalid);
        }
        *flag = true;
    }
    Ok(notify)
}

/// `orcpt-parameter = "ORCPT=" original-recipient-address`, `original-recipient-address =
/// addr-type ";" xtext`, `addr-type = atom` (RFC 3461 section 4.2). For the `utf-8` address
/// type the address is `utf-8-addr-xtext` or `utf-8-addr-unitext` (RFC 6533 section 3).
fn orcpt_value(value: Option<&str>) -> Result<OriginalRecipient, CommandError> {
    let invalid = CommandError::InvalidParameterValue("ORCPT");
    let value = required_value(value, "ORCPT")?;
    let Some((addr_type, encoded)) = value.split_once(';') else {
        return Err(invalid);
    };
    if !rfc822_atom(addr_type) || encoded.is_empty() {
        return Err(invalid);
    }
    let address = if addr_type.eq_ignore_ascii_case("utf-8") {
        // Control characters would end up in DSN header fields.
        utf_8_addr_xtext(encoded)
            .filter(|address| address.chars().all(|c| c == ' ' || c == '\t' || !c.is_control()))
    } else {
        // RFC 3461 section 4.2: the decoded address MUST be printable US-ASCII.
        xtext(encoded).filter(|address| printable_ascii(address))
    };
    match address {
        Some(address) if address.chars().count() <= ORCPT_MAX => {
            Ok(OriginalRecipient { addr_type: addr_type.to_owned(), address })
        }
        _ => Err(invalid),
    }
}

/// RFC 822 `atom = 1*<any CHAR except specials, SPACE and CTLs>`.
fn rfc822_atom(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|b| matches!(b, 33..=126) && !b"()<>@,;:\\\".[]".contains(&b))
}

/// "Printable (graphic and white space) characters from the US-ASCII repertoire" (RFC 3461).
fn printable_ascii(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b' '..=b'~' | b'\t'))
}

/// `xtext = *( xchar / hexchar )` (RFC 3461 section 4), decoded. `xchar` is `!` to `~` except
/// `+` and `=`; `hexchar` is `+` and two upper case hex digits. `None` when the text is not
/// xtext or does not decode to UTF-8.
fn xtext(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(hexchar(bytes.get(i + 1..i + 3)?)?);
                i += 3;
            }
            b @ b'!'..=b'~' if b != b'=' => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// The octet a `hexchar` encodes, from the two digits after the `+`: "two upper case
/// hexadecimal digits" (RFC 3461 section 4).
fn hexchar(pair: &[u8]) -> Option<u8> {
    let upper = |b: u8| if b.is_ascii_lowercase() { None } else { hex_digit(b) };
    match pair {
        [high, low] => Some(upper(*high)? << 4 | upper(*low)?),
        _ => None,
    }
}

/// `utf-8-addr-xtext = 1*(QCHAR / EmbeddedUnicodeChar)` and `utf-8-addr-unitext =
/// 1*(QUCHAR / EmbeddedUnicodeChar)` (RFC 6533 section 3), decoded. RFC 3461 `hexchar`s are
/// decoded too: `+` cannot appear unescaped in either form, so a client that applied xtext
/// encoding on top is understood without ambiguity.
fn utf_8_addr_xtext(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => {
                let (c, used) = embedded_unicode_char(&bytes[i..])?;
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                i += used;
            }
            b'+' => {
                out.push(hexchar(bytes.get(i + 1..i + 3)?)?);
                i += 3;
            }
            // QCHAR = %x21-2a / %x2c-3c / %x3e-5b / %x5d-7e, QUCHAR adds UTF-8.
            b @ (0x21..=0x7e | 0x80..) if b != b'=' => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// `EmbeddedUnicodeChar = %x5C.78 "{" HEXPOINT "}"`, HEXPOINT being 2 to 6 hex digits naming a
/// Unicode scalar value (RFC 6533 section 3). Returns the character and the octets used.
fn embedded_unicode_char(bytes: &[u8]) -> Option<(char, usize)> {
    let rest = bytes.strip_prefix(b"\\x{")?;
    let end = rest.iter().position(|&b| b == b'}')?;
    let hexpoint = &rest[..end];
    if !(2..=6).contains(&hexpoint.len()) {
        return None;
    }
    let value =
        hexpoint.iter().try_fold(0u32, |value, &b| Some(value << 4 | u32::from(hex_digit(b)?)))?;
    Some((char::from_u32(value)?, 3 + end + 1))
}

// ---------------------------------------------------------------------------------------------
// Cursor
// ---------------------------------------------------------------------------------------------

/// A position in a line of text. It only ever stops on ASCII octets or at the end of a run of
/// non-ASCII ones, so every slice it hands out lies on character boundaries.
#[derive(Debug)]
struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Cursor { text, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn bump(&mut self) {
        self.pos += 1;
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn eat(&mut self, b: u8) -> bool {
        let found = self.peek() == Some(b);
        if found {
            self.bump();
        }
        found
    }

    /// Consumes `expected` if the text continues with it, ignoring ASCII case.
    fn eat_ignore_case(&mut self, expected: &str) -> bool {
        let found = self
            .text
            .as_bytes()
            .get(self.pos..self.pos + expected.len())
            .is_some_and(|next| next.eq_ignore_ascii_case(expected.as_bytes()));
        if found {
            self.pos += expected.len();
        }
        found
    }

    /// Consumes octets while `accept` holds; `accept` must treat all non-ASCII octets alike.
    fn take_while(&mut self, accept: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(&accept) {
            self.bump();
        }
        self.since(start)
    }

    fn since(&self, start: usize) -> &'a str {
        &self.text[start..self.pos]
    }

    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    type Case = (&'static str, Result<Command, CommandError>);

    fn parse(line: &str) -> Result<Command, CommandError> {
        parse_command(line.as_bytes(), &AddressLimits::default())
    }

    fn check(cases: &[Case]) {
        for (line, expected) in cases {
            assert_eq!(&parse(line), expected, "line: {line:?}");
        }
    }

    fn name(text: &str) -> Domain {
        Domain::Name(text.to_owned())
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Domain {
        Domain::Address(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    }

    fn v6(text: &str) -> Domain {
        Domain::Address(IpAddr::V6(text.parse::<Ipv6Addr>().unwrap()))
    }

    fn general(text: &str) -> Domain {
        Domain::GeneralLiteral(text.to_owned())
    }

    fn mailbox(local_part: &str, domain: Domain) -> Mailbox {
        Mailbox { local_part: local_part.to_owned(), domain }
    }

    fn mail_from(path: ReversePath) -> MailFrom {
        MailFrom {
            path,
            size: None,
            body: None,
            smtputf8: false,
            ret: None,
            envid: None,
            auth: None,
            has_parameters: false,
        }
    }

    /// `MAIL FROM:<local@domain>` with no parameters.
    fn mail(local_part: &str, domain: Domain) -> Result<Command, CommandError> {
        Ok(Command::Mail(mail_from(ReversePath::Mailbox(mailbox(local_part, domain)))))
    }

    /// `MAIL FROM:<a@b>` with parameters set by `set`.
    fn mail_params(set: impl FnOnce(&mut MailFrom)) -> Result<Command, CommandError> {
        let mut mail = mail_from(ReversePath::Mailbox(mailbox("a", name("b"))));
        mail.has_parameters = true;
        set(&mut mail);
        Ok(Command::Mail(mail))
    }

    fn rcpt_to(path: ForwardPath) -> RcptTo {
        RcptTo { path, notify: None, orcpt: None, has_parameters: false }
    }

    fn rcpt(local_part: &str, domain: Domain) -> Result<Command, CommandError> {
        Ok(Command::Rcpt(rcpt_to(ForwardPath::Mailbox(mailbox(local_part, domain)))))
    }

    /// `RCPT TO:<a@b>` with parameters set by `set`.
    fn rcpt_params(set: impl FnOnce(&mut RcptTo)) -> Result<Command, CommandError> {
        let mut rcpt = rcpt_to(ForwardPath::Mailbox(mailbox("a", name("b"))));
        rcpt.has_parameters = true;
        set(&mut rcpt);
        Ok(Command::Rcpt(rcpt))
    }

    fn notify(success: bool, failure: bool, delay: bool) -> Result<Command, CommandError> {
        rcpt_params(|r| r.notify = Some(Notify { success, failure, delay }))
    }

    fn orcpt(addr_type: &str, address: &str) -> Result<Command, CommandError> {
        rcpt_params(|r| {
            r.orcpt = Some(OriginalRecipient {
                addr_type: addr_type.to_owned(),
                address: address.to_owned(),
            })
        })
    }

    fn syntax(expected: &'static str) -> Result<Command, CommandError> {
        Err(CommandError::Syntax(expected))
    }

    fn bad_sender(why: &'static str) -> Result<Command, CommandError> {
        Err(CommandError::BadSender(why))
    }

    fn bad_recipient(why: &'static str) -> Result<Command, CommandError> {
        Err(CommandError::BadRecipient(why))
    }

    fn unknown_param(keyword: &str) -> Result<Command, CommandError> {
        Err(CommandError::UnknownParameter(keyword.to_owned()))
    }

    fn invalid_value(keyword: &'static str) -> Result<Command, CommandError> {
        Err(CommandError::InvalidParameterValue(keyword))
    }

    #[test]
    fn commands_without_arguments() {
        check(&[
            ("DATA", Ok(Command::Data)),
            ("data", Ok(Command::Data)),
            ("DaTa", Ok(Command::Data)),
            ("DATA ", Ok(Command::Data)),
            ("DATA \t ", Ok(Command::Data)),
            ("DATA\t", Ok(Command::Data)),
            ("DATA x", syntax("DATA")),
            ("DATA  x", syntax("DATA")),
            ("RSET", Ok(Command::Rset)),
            ("rset", Ok(Command::Rset)),
            ("RSET now", syntax("RSET")),
            ("QUIT", Ok(Command::Quit)),
            ("Quit ", Ok(Command::Quit)),
            ("QUIT please", syntax("QUIT")),
            ("STARTTLS", Ok(Command::StartTls)),
            ("starttls", Ok(Command::StartTls)),
            ("STARTTLS x", syntax("STARTTLS")),
        ]);
    }

    #[test]
    fn commands_with_optional_or_free_arguments() {
        check(&[
            ("NOOP", Ok(Command::Noop)),
            ("noop", Ok(Command::Noop)),
            ("NOOP anything at all", Ok(Command::Noop)),
            ("NOOP <>:@\"", Ok(Command::Noop)),
            ("HELP", Ok(Command::Help(None))),
            ("HELP ", Ok(Command::Help(None))),
            ("help MAIL", Ok(Command::Help(Some("MAIL".into())))),
            ("HELP  two words", Ok(Command::Help(Some("two words".into())))),
            ("VRFY user", Ok(Command::Vrfy("user".into()))),
            ("vrfy <user@example.org>", Ok(Command::Vrfy("<user@example.org>".into()))),
            ("VRFY \"John Doe\"", Ok(Command::Vrfy("\"John Doe\"".into()))),
            ("VRFY  spaced ", Ok(Command::Vrfy("spaced".into()))),
            ("VRFY", syntax("VRFY string")),
            ("VRFY ", syntax("VRFY string")),
            ("EXPN list", Ok(Command::Expn("list".into()))),
            ("expn Example-People", Ok(Command::Expn("Example-People".into()))),
            ("EXPN", syntax("EXPN string")),
            ("EXPN   ", syntax("EXPN string")),
        ]);
    }

    #[test]
    fn unknown_commands() {
        check(&[
            ("", Err(CommandError::UnknownCommand)),
            (" ", Err(CommandError::UnknownCommand)),
            ("FOO", Err(CommandError::UnknownCommand)),
            ("FOO bar", Err(CommandError::UnknownCommand)),
            ("DATAX", Err(CommandError::UnknownCommand)),
            ("DATA:", Err(CommandError::UnknownCommand)),
            ("DAT", Err(CommandError::UnknownCommand)),
            (" DATA", Err(CommandError::UnknownCommand)),
            ("MAILFROM:<a@b>", Err(CommandError::UnknownCommand)),
            ("MAIL:FROM:<a@b>", Err(CommandError::UnknownCommand)),
            ("EHLO\texample.com", Err(CommandError::UnknownCommand)),
            ("AUTHPLAIN", Err(CommandError::UnknownCommand)),
            ("TURN", Err(CommandError::UnknownCommand)),
            ("STARTTLSX", Err(CommandError::UnknownCommand)),
            ("ÉHLO x", Err(CommandError::UnknownCommand)),
        ]);
    }

    #[test]
    fn invalid_characters() {
        let lines: &[&[u8]] = &[
            b"NO\x00OP",
            b"NOOP\x00",
            b"\x00",
            b"DATA\r",
            b"DA\rTA",
            b"DATA\n",
            b"\nDATA",
            b"FOO\r\nDATA",
            b"MAIL FROM:<\xff@b>",
            b"MAIL FROM:<a@b\xc3>",
            b"EHLO \xc3\x28",
            b"EHLO \xed\xa0\x80",
            b"\xff",
            b"RCPT TO:<a@b> NOTIFY=\xfe",
            b"NOOP \xc0\xaf",
            // C1 controls: U+009B (CSI) and U+0085 (NEL).
            b"MAIL FROM:<s\xc2\x9b31m@b> SMTPUTF8",
            b"RCPT TO:<a+\xc2\x85@b>",
        ];
        for line in lines {
            assert_eq!(
                parse_command(line, &AddressLimits::default()),
                Err(CommandError::InvalidCharacters),
                "line: {line:?}"
            );
        }
    }

    #[test]
    fn ehlo_and_helo() {
        check(&[
            ("EHLO example.com", Ok(Command::Ehlo(name("example.com")))),
            ("ehlo Mail.Example.COM", Ok(Command::Ehlo(name("Mail.Example.COM")))),
            ("EHLO example.com.", Ok(Command::Ehlo(name("example.com")))),
            ("EHLO localhost", Ok(Command::Ehlo(name("localhost")))),
            ("EHLO 123.example", Ok(Command::Ehlo(name("123.example")))),
            ("EHLO 1", Ok(Command::Ehlo(name("1")))),
            ("EHLO a-b--c.d", Ok(Command::Ehlo(name("a-b--c.d")))),
            ("EHLO xn--bcher-kva.example", Ok(Command::Ehlo(name("xn--bcher-kva.example")))),
            ("EHLO bücher.example", Ok(Command::Ehlo(name("bücher.example")))),
            ("EHLO 例子.广告", Ok(Command::Ehlo(name("例子.广告")))),
            ("EHLO example.com ", Ok(Command::Ehlo(name("example.com")))),
            ("EHLO  example.com", Ok(Command::Ehlo(name("example.com")))),
            ("EHLO [192.0.2.1]", Ok(Command::Ehlo(v4(192, 0, 2, 1)))),
            ("EHLO [IPv6:2001:db8::1]", Ok(Command::Ehlo(v6("2001:db8::1")))),
            ("EHLO [ipv6:::1]", Ok(Command::Ehlo(v6("::1")))),
            ("EHLO [x-tag:some-content]", Ok(Command::Ehlo(general("x-tag:some-content")))),
            ("HELO example.com", Ok(Command::Helo(name("example.com")))),
            ("helo example.com.", Ok(Command::Helo(name("example.com")))),
            ("HELO [10.0.0.1]", Ok(Command::Helo(v4(10, 0, 0, 1)))),
            ("EHLO", syntax("EHLO domain")),
            ("EHLO ", syntax("EHLO domain")),
            ("EHLO a b", syntax("EHLO domain")),
            ("EHLO example.com extra words", syntax("EHLO domain")),
            ("EHLO -example.com", syntax("EHLO domain")),
            ("EHLO example-.com", syntax("EHLO domain")),
            ("EHLO example.-com", syntax("EHLO domain")),
            ("EHLO a..b", syntax("EHLO domain")),
            ("EHLO .", syntax("EHLO domain")),
            ("EHLO ..", syntax("EHLO domain")),
            ("EHLO .example.com", syntax("EHLO domain")),
            ("EHLO example.com..", syntax("EHLO domain")),
            ("EHLO under_score.example", syntax("EHLO domain")),
            ("EHLO exa*mple", syntax("EHLO domain")),
            ("EHLO <example.com>", syntax("EHLO domain")),
            ("EHLO [192.0.2.1", syntax("EHLO domain")),
            ("EHLO 192.0.2.1]", syntax("EHLO domain")),
            ("EHLO [192.0.2.1]x", syntax("EHLO domain")),
            ("EHLO [192.0.2]", syntax("EHLO domain")),
            ("EHLO [IPv6:zz::1]", syntax("EHLO domain")),
            ("EHLO []", syntax("EHLO domain")),
            ("HELO", syntax("HELO domain")),
            ("HELO a b", syntax("HELO domain")),
            ("HELO bad_name", syntax("HELO domain")),
        ]);
    }

    #[test]
    fn ehlo_domain_length_limit() {
        let exact =
            format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(63));
        assert_eq!(exact.len(), 255);
        assert_eq!(parse(&format!("EHLO {exact}")), Ok(Command::Ehlo(name(&exact))));
        assert_eq!(parse(&format!("EHLO {exact}.")), Ok(Command::Ehlo(name(&exact))));
        assert_eq!(parse(&format!("EHLO x{exact}")), syntax("EHLO domain"));
        assert_eq!(parse(&format!("HELO x{exact}")), syntax("HELO domain"));
    }

    /// Literals through EHLO: the value, or `None` for a syntax error.
    #[test]
    fn address_literals() {
        let cases: &[(&str, Option<Domain>)] = &[
            ("[0.0.0.0]", Some(v4(0, 0, 0, 0))),
            ("[255.255.255.255]", Some(v4(255, 255, 255, 255))),
            ("[001.02.3.004]", Some(v4(1, 2, 3, 4))),
            ("[1.2.3.256]", None),
            ("[1.2.3.0255]", None),
            ("[1.2.3.4.5]", None),
            ("[1.2.3.]", None),
            ("[.1.2.3]", None),
            ("[1..2.3]", None),
            ("[1.2.3]", None),
            ("[-1.2.3.4]", None),
            ("[+1.2.3.4]", None),
            ("[1.2.3.a]", None),
            ("[ 1.2.3.4]", None),
            ("[1.2.3.4 ]", None),
            ("[IPv6:1:2:3:4:5:6:7:8]", Some(v6("1:2:3:4:5:6:7:8"))),
            ("[IPv6:2001:DB8:0:0:0:0:0:1]", Some(v6("2001:db8::1"))),
            ("[IPv6:ffff:FFFF:abcd:0:0:0:0:0]", Some(v6("ffff:ffff:abcd::"))),
            ("[IPv6:::]", Some(v6("::"))),
            ("[IPv6:::1]", Some(v6("::1"))),
            ("[IPv6:1::]", Some(v6("1::"))),
            ("[IPv6:1::2]", Some(v6("1::2"))),
            ("[IPv6:1:2:3:4:5:6::]", Some(v6("1:2:3:4:5:6::"))),
            ("[IPv6:1:2:3::4:5:6]", Some(v6("1:2:3::4:5:6"))),
            ("[IPv6:::1:2:3:4:5:6]", Some(v6("::1:2:3:4:5:6"))),
            ("[IPV6:0001:0db8::]", Some(v6("1:db8::"))),
            ("[IPv6:::ffff:192.0.2.1]", Some(v6("::ffff:192.0.2.1"))),
            ("[IPv6:::192.0.2.1]", Some(v6("::192.0.2.1"))),
            ("[IPv6:1:2:3:4:5:6:192.0.2.1]", Some(v6("1:2:3:4:5:6:192.0.2.1"))),
            ("[IPv6:1:2:3:4::192.0.2.1]", Some(v6("1:2:3:4::192.0.2.1"))),
            ("[IPv6:1::2:3:192.0.2.1]", Some(v6("1::2:3:192.0.2.1"))),
            // "::" must stand for at least two groups (RFC 5321 section 4.1.3).
            ("[IPv6:1:2:3:4:5:6:7::]", None),
            ("[IPv6:::1:2:3:4:5:6:7]", None),
            ("[IPv6:1:2:3:4:5::192.0.2.1]", None),
            ("[IPv6:1:2:3:4:5:6:7]", None),
            ("[IPv6:1:2:3:4:5:6:7:8:9]", None),
            ("[IPv6:1:2:3:4:5:192.0.2.1]", None),
            ("[IPv6:1:2:3:4:5:6:7:192.0.2.1]", None),
            ("[IPv6:192.0.2.1]", None),
            ("[IPv6:::192.0.2]", None),
            ("[IPv6:::192.0.2.1:1]", None),
            ("[IPv6:192.0.2.1::]", None),
            ("[IPv6:12345::]", None),
            ("[IPv6:g::]", None),
            ("[IPv6::1]", None),
            ("[IPv6:1:]", None),
            ("[IPv6:1:::2]", None),
            ("[IPv6:1::2::3]", None),
            ("[IPv6:]", None),
            ("[IPv6:+1::]", None),
            ("[x-tag:content]", Some(general("x-tag:content"))),
            ("[Tag9:a:b:c]", Some(general("Tag9:a:b:c"))),
            ("[t:!#~^]", Some(general("t:!#~^"))),
            ("[tag:]", None),
            ("[:content]", None),
            ("[tag-:content]", None),
            ("[ta_g:content]", None),
            ("[tag:con tent]", None),
            ("[tag:a\\b]", None),
            ("[tag:[b]", None),
            ("[tag:é]", None),
            ("[]", None),
            ("[[1.2.3.4]]", None),
        ];
        for (literal, expected) in cases {
            let line = format!("EHLO {literal}");
            let expected = match expected {
                Some(domain) => Ok(Command::Ehlo(domain.clone())),
                None => syntax("EHLO domain"),
            };
            assert_eq!(parse(&line), expected, "line: {line:?}");
        }
    }

    #[test]
    fn mail_paths() {
        let a_b = || mail("a", name("b"));
        check(&[
            ("MAIL FROM:<a@b>", a_b()),
            ("mail from:<a@b>", a_b()),
            ("Mail From:<a@b>", a_b()),
            ("MAIL FROM: <a@b>", a_b()),
            ("MAIL FROM:<a@b> ", a_b()),
            ("MAIL FROM:<a@b>\t", a_b()),
            ("MAIL FROM:<a@b.>", a_b()),
            ("MAIL FROM:<>", Ok(Command::Mail(mail_from(ReversePath::Null)))),
            ("MAIL FROM: <>", Ok(Command::Mail(mail_from(ReversePath::Null)))),
            ("MAIL FROM:<John.Doe@Example.COM>", mail("John.Doe", name("Example.COM"))),
            ("MAIL FROM:<!#$%&'*+-/=?^_`{|}~@b>", mail("!#$%&'*+-/=?^_`{|}~", name("b"))),
            ("MAIL FROM:<a.b.c@d.e.f>", mail("a.b.c", name("d.e.f"))),
            ("MAIL FROM:<a@[192.0.2.1]>", mail("a", v4(192, 0, 2, 1))),
            ("MAIL FROM:<a@[IPv6:2001:db8::1]>", mail("a", v6("2001:db8::1"))),
            ("MAIL FROM:<a@[tag:x]>", mail("a", general("tag:x"))),
            // Source routes are accepted and dropped (RFC 5321 section 4.1.1.3, appendix C).
            ("MAIL FROM:<@x:a@b>", a_b()),
            ("MAIL FROM:<@x.example,@y.example:a@b>", a_b()),
            ("MAIL FROM:<@[192.0.2.1],@y:a@b>", a_b()),
            // Quoted local parts are stored unquoted.
            ("MAIL FROM:<\"a\"@b>", a_b()),
            ("MAIL FROM:<\"john doe\"@b>", mail("john doe", name("b"))),
            ("MAIL FROM:<\"a\\\"b\\\\c\"@d>", mail("a\"b\\c", name("d"))),
            ("MAIL FROM:<\"Joe\\,Smith\"@d>", mail("Joe,Smith", name("d"))),
            ("MAIL FROM:<\"\\ \"@d>", mail(" ", name("d"))),
            ("MAIL FROM:<\"\"@d>", mail("", name("d"))),
            ("MAIL FROM:<\"a>b\"@d>", mail("a>b", name("d"))),
            ("MAIL FROM:<\"<@:,[]\"@d>", mail("<@:,[]", name("d"))),
            ("MAIL FROM:<\".a..b.\"@d>", mail(".a..b.", name("d"))),
            // UTF-8 (RFC 6531); the session decides whether SMTPUTF8 allows it.
            ("MAIL FROM:<jösé@example.org>", mail("jösé", name("example.org"))),
            ("MAIL FROM:<用户@例子.广告>", mail("用户", name("例子.广告"))),
            ("MAIL FROM:<\"ü x\"@b>", mail("ü x", name("b"))),
            ("MAIL FROM:<😀.x@b>", mail("😀.x", name("b"))),
        ]);
    }

    #[test]
    fn mail_path_errors() {
        let mail_syntax = || syntax("MAIL FROM:<address> [parameters]");
        check(&[
            ("MAIL", mail_syntax()),
            ("MAIL ", mail_syntax()),
            ("MAIL FROM", mail_syntax()),
            ("MAIL FROM:", mail_syntax()),
            ("MAIL FROM: ", mail_syntax()),
            ("MAIL FROM:  <a@b>", mail_syntax()),
            ("MAIL  FROM:<a@b>", mail_syntax()),
            ("MAIL FROM :<a@b>", mail_syntax()),
            ("MAIL FROM<a@b>", mail_syntax()),
            ("MAIL TO:<a@b>", mail_syntax()),
            ("MAIL FRÖM:<a@b>", mail_syntax()),
            ("MAIL FROM:a@b", mail_syntax()),
            ("MAIL FROM:a@b>", mail_syntax()),
            ("MAIL FROM:<a@b", mail_syntax()),
            ("MAIL FROM:<", mail_syntax()),
            ("MAIL FROM:<\"a>\"@b", mail_syntax()),
            ("MAIL FROM:<a@b>x", mail_syntax()),
            ("MAIL FROM:<a@b>>", mail_syntax()),
            ("MAIL FROM:<a@b><c@d>", mail_syntax()),
            ("MAIL FROM:<>x", mail_syntax()),
            ("MAIL FROM:\t<a@b>", mail_syntax()),
            ("MAIL FROM:<Postmaster>", bad_sender("missing @domain")),
            ("MAIL FROM:<a>", bad_sender("missing @domain")),
            ("MAIL FROM:<a@>", bad_sender("missing domain")),
            ("MAIL FROM:<@b>", bad_sender("invalid source route")),
            ("MAIL FROM:<@>", bad_sender("invalid source route")),
            ("MAIL FROM:<@:a@b>", bad_sender("invalid source route")),
            ("MAIL FROM:<@x,y:a@b>", bad_sender("invalid source route")),
            ("MAIL FROM:<@x;a@b>", bad_sender("invalid source route")),
            ("MAIL FROM:<@x,:a@b>", bad_sender("invalid source route")),
            ("MAIL FROM:<@-x:a@b>", bad_sender("invalid source route")),
            ("MAIL FROM:<@x:>", bad_sender("invalid local part")),
            ("MAIL FROM:<a b@c>", bad_sender("invalid local part")),
            ("MAIL FROM:< a@b>", bad_sender("invalid local part")),
            ("MAIL FROM:<.a@b>", bad_sender("invalid local part")),
            ("MAIL FROM:<a.@b>", bad_sender("invalid local part")),
            ("MAIL FROM:<a..b@c>", bad_sender("invalid local part")),
            ("MAIL FROM:<a(b)@c>", bad_sender("invalid local part")),
            ("MAIL FROM:<a\\b@c>", bad_sender("invalid local part")),
            ("MAIL FROM:<\"a\"b@c>", bad_sender("invalid local part")),
            ("MAIL FROM:<a\"b\"@c>", bad_sender("invalid local part")),
            ("MAIL FROM:<\"a@b>", bad_sender("unterminated quoted string")),
            ("MAIL FROM:<\"a\\>", bad_sender("unterminated quoted string")),
            ("MAIL FROM:<\"a\tb\"@c>", bad_sender("invalid character in quoted string")),
            ("MAIL FROM:<\"a\x7fb\"@c>", bad_sender("invalid character in quoted string")),
            ("MAIL FROM:<\"a\\\tb\"@c>", bad_sender("invalid quoted pair")),
            ("MAIL FROM:<\"a\\éb\"@c>", bad_sender("invalid quoted pair")),
            ("MAIL FROM:<a@b c>", bad_sender("invalid domain")),
            ("MAIL FROM:<a@b@c>", bad_sender("invalid domain")),
            ("MAIL FROM:<a@b_c>", bad_sender("invalid domain")),
            ("MAIL FROM:<a@-b>", bad_sender("invalid domain")),
            ("MAIL FROM:<a@b->", bad_sender("invalid domain")),
            ("MAIL FROM:<a@b..c>", bad_sender("invalid domain")),
            ("MAIL FROM:<a@.>", bad_sender("invalid domain")),
            ("MAIL FROM:<a@b..>", bad_sender("invalid domain")),
            ("MAIL FROM:<a@[192.0.2.1]x>", bad_sender("invalid domain")),
            ("MAIL FROM:<a@[1.2.3]>", bad_sender("invalid address literal")),
            ("MAIL FROM:<a@[1.2.3.4>", bad_sender("invalid address literal")),
            ("MAIL FROM:<a@[IPv6:1:2]>", bad_sender("invalid address literal")),
            ("MAIL FROM:<a@[]>", bad_sender("invalid address literal")),
        ]);
    }

    #[test]
    fn rcpt_paths() {
        let a_b = || rcpt("a", name("b"));
        let postmaster = || Ok(Command::Rcpt(rcpt_to(ForwardPath::Postmaster)));
        let rcpt_syntax = || syntax("RCPT TO:<address> [parameters]");
        check(&[
            ("RCPT TO:<a@b>", a_b()),
            ("rcpt to:<a@b>", a_b()),
            ("RCPT TO: <a@b>", a_b()),
            ("RCPT TO:<a@b>  ", a_b()),
            ("RCPT TO:<@x,@y:a@b>", a_b()),
            ("RCPT TO:<\"a b\"@[IPv6:::1]>", rcpt("a b", v6("::1"))),
            ("RCPT TO:<ünï@localhost>", rcpt("ünï", name("localhost"))),
            ("RCPT TO:<Postmaster>", postmaster()),
            ("RCPT TO:<postmaster>", postmaster()),
            ("RCPT TO:<POSTMASTER>", postmaster()),
            ("RCPT TO: <PostMaster>", postmaster()),
            ("RCPT TO:<Postmaster> ", postmaster()),
            ("RCPT TO:<Postmaster@example.com>", rcpt("Postmaster", name("example.com"))),
            (
                "RCPT TO:<Postmaster> NOTIFY=NEVER",
                Ok(Command::Rcpt(RcptTo {
                    notify: Some(Notify::NEVER),
                    has_parameters: true,
                    ..rcpt_to(ForwardPath::Postmaster)
                })),
            ),
            ("RCPT TO:<>", bad_recipient("empty address")),
            ("RCPT TO: <>", bad_recipient("empty address")),
            ("RCPT TO:<a>", bad_recipient("missing @domain")),
            ("RCPT TO:<\"postmaster\">", bad_recipient("missing @domain")),
            ("RCPT TO:<a b@c>", bad_recipient("invalid local part")),
            ("RCPT TO:<a@>", bad_recipient("missing domain")),
            ("RCPT TO:<a@b_c>", bad_recipient("invalid domain")),
            ("RCPT TO:<@a:b>", bad_recipient("missing @domain")),
            ("RCPT TO:<@a b@c>", bad_recipient("invalid source route")),
            ("RCPT TO:<a@[1.2.3.4.5]>", bad_recipient("invalid address literal")),
            ("RCPT TO:<\"a>", bad_recipient("unterminated quoted string")),
            ("RCPT", rcpt_syntax()),
            ("RCPT TO", rcpt_syntax()),
            ("RCPT TO:", rcpt_syntax()),
            ("RCPT FROM:<a@b>", rcpt_syntax()),
            ("RCPT  TO:<a@b>", rcpt_syntax()),
            ("RCPT TO:  <a@b>", rcpt_syntax()),
            ("RCPT TO:a@b", rcpt_syntax()),
            ("RCPT TO:Postmaster", rcpt_syntax()),
            ("RCPT TO:<Postmaster", rcpt_syntax()),
            ("RCPT TO:<Postmaster>x", rcpt_syntax()),
            ("RCPT TO:<a@b", rcpt_syntax()),
            ("RCPT TO:<a@b>,<c@d>", rcpt_syntax()),
        ]);
    }

    #[test]
    fn local_part_length_limit() {
        let limits = AddressLimits::default();
        assert_eq!(limits.local_part, 64);
        let exact = "l".repeat(64);
        assert_eq!(parse(&format!("MAIL FROM:<{exact}@b>")), mail(&exact, name("b")));
        assert_eq!(parse(&format!("RCPT TO:<{exact}@b>")), rcpt(&exact, name("b")));
        let over = "l".repeat(65);
        assert_eq!(
            parse(&format!("MAIL FROM:<{over}@b>")),
            Err(CommandError::LocalPartTooLong { sender: true })
        );
        assert_eq!(
            parse(&format!("RCPT TO:<{over}@b>")),
            Err(CommandError::LocalPartTooLong { sender: false })
        );
        // Quoted local parts count as sent, quotes and backslashes included.
        let quoted = "q".repeat(62);
        assert_eq!(parse(&format!("MAIL FROM:<\"{quoted}\"@b>")), mail(&quoted, name("b")));
        let quoted = "q".repeat(63);
        assert_eq!(
            parse(&format!("MAIL FROM:<\"{quoted}\"@b>")),
            Err(CommandError::LocalPartTooLong { sender: true })
        );
        let escaped = "\\q".repeat(32);
        assert_eq!(
            parse(&format!("RCPT TO:<\"{escaped}\"@b>")),
            Err(CommandError::LocalPartTooLong { sender: false })
        );
        // Octets, not characters: 32 two-octet characters are 64 octets.
        let utf8 = "é".repeat(32);
        assert_eq!(parse(&format!("MAIL FROM:<{utf8}@b>")), mail(&utf8, name("b")));
        let utf8 = format!("x{utf8}");
        assert_eq!(
            parse(&format!("MAIL FROM:<{utf8}@b>")),
            Err(CommandError::LocalPartTooLong { sender: true })
        );
        // Custom limits.
        let small = AddressLimits { local_part: 3, domain: 255 };
        assert!(parse_command(b"MAIL FROM:<abc@b>", &small).is_ok());
        assert_eq!(
            parse_command(b"MAIL FROM:<abcd@b>", &small),
            Err(CommandError::LocalPartTooLong { sender: true })
        );
    }

    #[test]
    fn domain_length_limit() {
        let exact =
            format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(63));
        assert_eq!(exact.len(), 255);
        assert_eq!(parse(&format!("MAIL FROM:<x@{exact}>")), mail("x", name(&exact)));
        assert_eq!(parse(&format!("MAIL FROM:<x@{exact}.>")), mail("x", name(&exact)));
        assert_eq!(parse(&format!("RCPT TO:<x@{exact}>")), rcpt("x", name(&exact)));
        let over = format!("e{exact}");
        assert_eq!(
            parse(&format!("MAIL FROM:<x@{over}>")),
            Err(CommandError::DomainTooLong { sender: true })
        );
        assert_eq!(
            parse(&format!("RCPT TO:<x@{over}>")),
            Err(CommandError::DomainTooLong { sender: false })
        );
        // Literals count with their brackets.
        let small = AddressLimits { local_part: 64, domain: 9 };
        assert!(parse_command(b"MAIL FROM:<x@[1.2.3.4]>", &small).is_ok());
        assert!(parse_command(b"MAIL FROM:<x@abcdefghi>", &small).is_ok());
        assert_eq!(
            parse_command(b"MAIL FROM:<x@[1.2.3.45]>", &small),
            Err(CommandError::DomainTooLong { sender: true })
        );
        assert_eq!(
            parse_command(b"RCPT TO:<x@abcdefghij>", &small),
            Err(CommandError::DomainTooLong { sender: false })
        );
        // Source route domains are not limited: they are thrown away.
        assert!(parse_command(b"RCPT TO:<@abcdefghijk:x@y>", &small).is_ok());
    }

    #[test]
    fn mail_parameters() {
        check(&[
            ("MAIL FROM:<a@b> SIZE=0", mail_params(|m| m.size = Some(0))),
            ("MAIL FROM:<a@b> SIZE=1000", mail_params(|m| m.size = Some(1000))),
            ("MAIL FROM:<a@b> size=007", mail_params(|m| m.size = Some(7))),
            ("MAIL FROM:<a@b> SIZE=18446744073709551615", mail_params(|m| m.size = Some(u64::MAX))),
            ("MAIL FROM:<a@b> BODY=7BIT", mail_params(|m| m.body = Some(BodyType::SevenBit))),
            (
                "MAIL FROM:<a@b> BODY=8BITMIME",
                mail_params(|m| m.body = Some(BodyType::EightBitMime)),
            ),
            (
                "MAIL FROM:<a@b> body=8bitmime",
                mail_params(|m| m.body = Some(BodyType::EightBitMime)),
            ),
            (
                "MAIL FROM:<a@b> BODY=BinaryMime",
                mail_params(|m| m.body = Some(BodyType::BinaryMime)),
            ),
            ("MAIL FROM:<a@b> SMTPUTF8", mail_params(|m| m.smtputf8 = true)),
            ("MAIL FROM:<a@b> smtputf8", mail_params(|m| m.smtputf8 = true)),
            ("MAIL FROM:<a@b> RET=FULL", mail_params(|m| m.ret = Some(Ret::Full))),
            ("MAIL FROM:<a@b> ret=hdrs", mail_params(|m| m.ret = Some(Ret::Headers))),
            ("MAIL FROM:<a@b> ENVID=QQ314159", mail_params(|m| m.envid = Some("QQ314159".into()))),
            ("MAIL FROM:<a@b> envid=a+2Bb", mail_params(|m| m.envid = Some("a+b".into()))),
            ("MAIL FROM:<a@b> ENVID=+3D+20+09", mail_params(|m| m.envid = Some("= \t".into()))),
            ("MAIL FROM:<a@b> ENVID=+41+7E", mail_params(|m| m.envid = Some("A~".into()))),
            (
                "MAIL FROM:<a@b> SIZE=10 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x",
                mail_params(|m| {
                    m.size = Some(10);
                    m.body = Some(BodyType::EightBitMime);
                    m.smtputf8 = true;
                    m.ret = Some(Ret::Headers);
                    m.envid = Some("x".into());
                }),
            ),
            (
                "MAIL FROM:<a@b>  SIZE=10   BODY=7BIT ",
                mail_params(|m| {
                    m.size = Some(10);
                    m.body = Some(BodyType::SevenBit);
                }),
            ),
            (
                "MAIL FROM:<> SIZE=10",
                Ok(Command::Mail(MailFrom {
                    size: Some(10),
                    has_parameters: true,
                    ..mail_from(ReversePath::Null)
                })),
            ),
            ("MAIL FROM: <a@b> SMTPUTF8", mail_params(|m| m.smtputf8 = true)),
        ]);
    }

    /// RFC 4954 section 5 and its examples in section 5.1.
    #[test]
    fn mail_auth_parameter() {
        let auth = |path: ReversePath| mail_params(|m| m.auth = Some(path));
        let auth_mailbox = |local_part: &str, domain: &str| {
            auth(ReversePath::Mailbox(mailbox(local_part, name(domain))))
        };
        check(&[
            ("MAIL FROM:<a@b> AUTH=<>", auth(ReversePath::Null)),
            ("MAIL FROM:<a@b> auth=+3C+3E", auth(ReversePath::Null)),
            ("MAIL FROM:<e=mc2@example.com> AUTH=e+3Dmc2@example.com", {
                let mut mail =
                    mail_from(ReversePath::Mailbox(mailbox("e=mc2", name("example.com"))));
                mail.auth = Some(ReversePath::Mailbox(mailbox("e=mc2", name("example.com"))));
                mail.has_parameters = true;
                Ok(Command::Mail(mail))
            }),
            ("MAIL FROM:<a@b> AUTH=john+2B@example.org", auth_mailbox("john+", "example.org")),
            ("MAIL FROM:<a@b> AUTH=\"john\"@example.org", auth_mailbox("john", "example.org")),
            ("MAIL FROM:<a@b> AUTH=a@[192.0.2.1]", {
                auth(ReversePath::Mailbox(mailbox("a", v4(192, 0, 2, 1))))
            }),
            ("MAIL FROM:<a@b> AUTH=+C3+A9@example.org", auth_mailbox("é", "example.org")),
            (
                "MAIL FROM:<a@b> SIZE=5 AUTH=<> ENVID=x",
                mail_params(|m| {
                    m.size = Some(5);
                    m.auth = Some(ReversePath::Null);
                    m.envid = Some("x".into());
                }),
            ),
            ("MAIL FROM:<a@b> AUTH", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=", invalid_value("AUTH")),
            // The decoded value is a mailbox, without angle brackets, or exactly "<>".
            ("MAIL FROM:<a@b> AUTH=<a@b>", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=<", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=<<>>", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=alice", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=a@b@c", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=a@", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=@b", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=a+20b@c", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=a@b+0D+0A", invalid_value("AUTH")),
            // Not xtext: "=" and a lower case or short hexchar.
            ("MAIL FROM:<a@b> AUTH=e=mc2@example.com", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=e+3dmc2@example.com", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=a+@b", invalid_value("AUTH")),
            // RFC 4954 section 8: "non-US-ASCII is only allowed as hexchar".
            ("MAIL FROM:<a@b> AUTH=é@example.org", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=<> AUTH=<>", unknown_param("AUTH")),
        ]);
        let long = format!("MAIL FROM:<a@b> AUTH={}@b", "l".repeat(65));
        assert_eq!(parse(&long), invalid_value("AUTH"), "the local part limit applies");
    }

    /// Found by the `address` fuzz target: a C1 control (U+0087), refused in a command line,
    /// reached the parsed AUTH= mailbox through xtext hexchars.
    #[test]
    fn mail_auth_parameter_refuses_decoded_control_characters() {
        check(&[
            ("MAIL FROM:<a@b> AUTH=zx0+C2+87+E6+85+87@x", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=a@b+C2+9B", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=\"a+C2+85b\"@x", invalid_value("AUTH")),
            ("MAIL FROM:<a@b> AUTH=a+7F@x", invalid_value("AUTH")),
            (
                "MAIL FROM:<a@b> AUTH=+C2+A0a@x",
                mail_params(|m| m.auth = Some(ReversePath::Mailbox(mailbox("\u{a0}a", name("x"))))),
            ),
        ]);
    }

    #[test]
    fn auth_command() {
        let auth = |mechanism: &str, initial_response: Option<&str>| {
            Ok(Command::Auth {
                mechanism: mechanism.to_owned(),
                initial_response: initial_response.map(str::to_owned),
            })
        };
        let auth_syntax = || syntax("AUTH mechanism [initial-response]");
        check(&[
            ("AUTH PLAIN", auth("PLAIN", None)),
            ("auth plain", auth("PLAIN", None)),
            ("Auth Scram-Sha-256", auth("SCRAM-SHA-256", None)),
            ("AUTH PLAIN dGVzdAB0ZXN0ADEyMzQ=", auth("PLAIN", Some("dGVzdAB0ZXN0ADEyMzQ="))),
            ("AUTH EXTERNAL =", auth("EXTERNAL", Some("="))),
            ("AUTH  LOGIN  dXNlcg==  ", auth("LOGIN", Some("dXNlcg=="))),
            ("AUTH X_MECH-1", auth("X_MECH-1", None)),
            ("AUTH ABCDEFGHIJKLMNOPQRST", auth("ABCDEFGHIJKLMNOPQRST", None)),
            // The initial response is kept as sent; the session decodes it.
            ("AUTH PLAIN not*base64", auth("PLAIN", Some("not*base64"))),
            ("AUTH PLAIN *", auth("PLAIN", Some("*"))),
            ("AUTH", auth_syntax()),
            ("AUTH ", auth_syntax()),
            ("AUTH PLAIN a b", auth_syntax()),
            ("AUTH ABCDEFGHIJKLMNOPQRSTU", auth_syntax()),
            ("AUTH PL.AIN", auth_syntax()),
            ("AUTH PLAIN=", auth_syntax()),
            ("AUTH PLÄIN", auth_syntax()),
            ("AUTH =", auth_syntax()),
            ("AUTH\tPLAIN", Err(CommandError::UnknownCommand)),
        ]);
        assert_eq!(parse("AUTH PLAIN").map(|c| c.verb()), Ok("AUTH"));
    }

    #[test]
    fn mechanism_names() {
        for name in ["PLAIN", "LOGIN", "SCRAM-SHA-256", "CRAM-MD5", "GS2-KRB5", "X_1", "plain"] {
            assert!(is_mechanism_name(name), "{name}");
        }
        for name in ["", "SCRAM-SHA-256-PLUS-EXTRA", "A B", "A.B", "Ä", "A\n"] {
            assert!(!is_mechanism_name(name), "{name:?}");
        }
    }

    #[test]
    fn mail_parameter_errors() {
        let mail_syntax = || syntax("MAIL FROM:<address> [parameters]");
        check(&[
            ("MAIL FROM:<a@b> SIZE", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=18446744073709551616", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=99999999999999999999999", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=-1", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=+1", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=1x", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=1.5", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=1=1", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=١", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=1\tBODY=7BIT", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> BODY", invalid_value("BODY")),
            ("MAIL FROM:<a@b> BODY=", invalid_value("BODY")),
            ("MAIL FROM:<a@b> BODY=8BIT", invalid_value("BODY")),
            ("MAIL FROM:<a@b> BODY=7BITS", invalid_value("BODY")),
            ("MAIL FROM:<a@b> SMTPUTF8=", invalid_value("SMTPUTF8")),
            ("MAIL FROM:<a@b> SMTPUTF8=yes", invalid_value("SMTPUTF8")),
            ("MAIL FROM:<a@b> RET", invalid_value("RET")),
            ("MAIL FROM:<a@b> RET=HEADERS", invalid_value("RET")),
            ("MAIL FROM:<a@b> RET=", invalid_value("RET")),
            ("MAIL FROM:<a@b> ENVID", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=a+2b", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=a+2", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=a+", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=a+ZZ", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=a=b", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=+0D+0A", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=+00", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=+7F", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=+C3+A9", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=+FF", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> ENVID=é", invalid_value("ENVID")),
            ("MAIL FROM:<a@b> FOO", unknown_param("FOO")),
            ("MAIL FROM:<a@b> foo=bar", unknown_param("foo")),
            ("MAIL FROM:<a@b> X-Custom=1", unknown_param("X-Custom")),
            ("MAIL FROM:<a@b> NOTIFY=NEVER", unknown_param("NOTIFY")),
            ("MAIL FROM:<a@b> ORCPT=rfc822;a@b", unknown_param("ORCPT")),
            ("MAIL FROM:<a@b> FOO=\x01", unknown_param("FOO")),
            ("MAIL FROM:<a@b> FOO SIZE=x", unknown_param("FOO")),
            ("MAIL FROM:<a@b> SIZE=x FOO", invalid_value("SIZE")),
            ("MAIL FROM:<a@b> SIZE=1 SIZE=1", unknown_param("SIZE")),
            ("MAIL FROM:<a@b> SIZE=1 size=2", unknown_param("size")),
            ("MAIL FROM:<a@b> BODY=7BIT BODY=8BITMIME", unknown_param("BODY")),
            ("MAIL FROM:<a@b> SMTPUTF8 SmtpUtf8", unknown_param("SmtpUtf8")),
            ("MAIL FROM:<a@b> RET=FULL RET=HDRS", unknown_param("RET")),
            ("MAIL FROM:<a@b> ENVID=1 ENVID=2", unknown_param("ENVID")),
            ("MAIL FROM:<a@b> =x", mail_syntax()),
            ("MAIL FROM:<a@b> -X", mail_syntax()),
            ("MAIL FROM:<a@b> FOO_BAR", mail_syntax()),
            ("MAIL FROM:<a@b> <c@d>", mail_syntax()),
            ("MAIL FROM:<a@b> SIZE=1 \"x\"", mail_syntax()),
            ("MAIL FROM:<a@b> SÏZE=1", mail_syntax()),
        ]);
    }

    #[test]
    fn envid_length_limit() {
        let exact = "e".repeat(100);
        let line = format!("MAIL FROM:<a@b> ENVID={exact}");
        assert_eq!(parse(&line), mail_params(|m| m.envid = Some(exact.clone())));
        // The limit applies to the decoded value.
        let encoded = "+2B".repeat(100);
        let line = format!("MAIL FROM:<a@b> ENVID={encoded}");
        assert_eq!(parse(&line), mail_params(|m| m.envid = Some("+".repeat(100))));
        let line = format!("MAIL FROM:<a@b> ENVID={exact}e");
        assert_eq!(parse(&line), invalid_value("ENVID"));
        let line = format!("MAIL FROM:<a@b> ENVID={encoded}+2B");
        assert_eq!(parse(&line), invalid_value("ENVID"));
    }

    #[test]
    fn rcpt_parameters() {
        check(&[
            ("RCPT TO:<a@b> NOTIFY=NEVER", notify(false, false, false)),
            ("RCPT TO:<a@b> notify=never", notify(false, false, false)),
            ("RCPT TO:<a@b> NOTIFY=SUCCESS", notify(true, false, false)),
            ("RCPT TO:<a@b> NOTIFY=FAILURE", notify(false, true, false)),
            ("RCPT TO:<a@b> NOTIFY=DELAY", notify(false, false, true)),
            ("RCPT TO:<a@b> NOTIFY=SUCCESS,FAILURE", notify(true, true, false)),
            ("RCPT TO:<a@b> NOTIFY=FAILURE,DELAY", notify(false, true, true)),
            ("RCPT TO:<a@b> NOTIFY=DELAY,SUCCESS", notify(true, false, true)),
            ("RCPT TO:<a@b> NOTIFY=success,Delay,FAILURE", notify(true, true, true)),
            ("RCPT TO:<a@b> ORCPT=rfc822;a@b", orcpt("rfc822", "a@b")),
            ("RCPT TO:<a@b> orcpt=RFC822;a@b", orcpt("RFC822", "a@b")),
            ("RCPT TO:<a@b> ORCPT=rfc822;a+2Bb@c", orcpt("rfc822", "a+b@c")),
            ("RCPT TO:<a@b> ORCPT=rfc822;a+20b+3Dc@d", orcpt("rfc822", "a b=c@d")),
            ("RCPT TO:<a@b> ORCPT=rfc822;<a@b>", orcpt("rfc822", "<a@b>")),
            ("RCPT TO:<a@b> ORCPT=rfc822;a;b", orcpt("rfc822", "a;b")),
            ("RCPT TO:<a@b> ORCPT=x-local;anything", orcpt("x-local", "anything")),
            ("RCPT TO:<a@b> ORCPT=utf-8;j\\x{F6}rg@example", orcpt("utf-8", "jörg@example")),
            ("RCPT TO:<a@b> ORCPT=UTF-8;j\\x{f6}rg@example", orcpt("UTF-8", "jörg@example")),
            ("RCPT TO:<a@b> ORCPT=utf-8;jörg@example", orcpt("utf-8", "jörg@example")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{2B}b\\x{3D}c", orcpt("utf-8", "a+b=c")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{5C}b\\x{20}c", orcpt("utf-8", "a\\b c")),
            ("RCPT TO:<a@b> ORCPT=utf-8;\\x{1F600}@x", orcpt("utf-8", "😀@x")),
            ("RCPT TO:<a@b> ORCPT=utf-8;\\x{10FFFF}", orcpt("utf-8", "\u{10FFFF}")),
            ("RCPT TO:<a@b> ORCPT=utf-8;\\x{000041}", orcpt("utf-8", "A")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a+2Bb", orcpt("utf-8", "a+b")),
            ("RCPT TO:<a@b> ORCPT=utf-8;j+C3+B6rg", orcpt("utf-8", "jörg")),
            (
                "RCPT TO:<a@b> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b",
                rcpt_params(|r| {
                    r.notify = Some(Notify { success: true, failure: true, delay: false });
                    r.orcpt = Some(OriginalRecipient {
                        addr_type: "rfc822".into(),
                        address: "a@b".into(),
                    });
                }),
            ),
        ]);
    }

    #[test]
    fn rcpt_parameter_errors() {
        check(&[
            ("RCPT TO:<a@b> NOTIFY", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=NEVER,SUCCESS", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=SUCCESS,NEVER", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=NEVER,NEVER", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=SUCCESS,SUCCESS", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=DELAY,FAILURE,delay", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=SUCCESS,", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=,SUCCESS", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=SUCCESS,,DELAY", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=ALWAYS", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=SUCCESS;FAILURE", invalid_value("NOTIFY")),
            ("RCPT TO:<a@b> ORCPT", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=rfc822", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=rfc822;", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=;a@b", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=rf(c;a@b", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=rfc.822;a@b", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=rfc822;a=b", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=rfc822;a+2bb", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=rfc822;a+2", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=rfc822;a+0Ab", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=rfc822;j+C3+B6rg", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=rfc822;jörg", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{D800}", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{110000}", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{A}", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{0000041}", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{}", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{4G}", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{41", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x41", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\X{41}", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\b", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{0A}b", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a\\x{85}b", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;a+FFb", invalid_value("ORCPT")),
            ("RCPT TO:<a@b> SIZE=10", unknown_param("SIZE")),
            ("RCPT TO:<a@b> SMTPUTF8", unknown_param("SMTPUTF8")),
            ("RCPT TO:<a@b> FOO=BAR", unknown_param("FOO")),
            ("RCPT TO:<a@b> NOTIFY=NEVER NOTIFY=NEVER", unknown_param("NOTIFY")),
            ("RCPT TO:<a@b> ORCPT=rfc822;a ORCPT=rfc822;b", unknown_param("ORCPT")),
            ("RCPT TO:<a@b> =NEVER", syntax("RCPT TO:<address> [parameters]")),
            ("RCPT TO:<a@b> NOTIFY:NEVER", syntax("RCPT TO:<address> [parameters]")),
        ]);
    }

    #[test]
    fn orcpt_length_limit() {
        let exact = "o".repeat(500);
        let line = format!("RCPT TO:<a@b> ORCPT=rfc822;{exact}");
        assert_eq!(parse(&line), orcpt("rfc822", &exact));
        let line = format!("RCPT TO:<a@b> ORCPT=rfc822;{exact}o");
        assert_eq!(parse(&line), invalid_value("ORCPT"));
        let wide = "ö".repeat(500);
        let line = format!("RCPT TO:<a@b> ORCPT=utf-8;{wide}");
        assert_eq!(parse(&line), orcpt("utf-8", &wide));
    }

    #[test]
    fn bdat() {
        let bdat = |size, last| Ok(Command::Bdat { size, last });
        let bdat_syntax = || syntax("BDAT chunk-size [LAST]");
        check(&[
            ("BDAT 0", bdat(0, false)),
            ("BDAT 0 LAST", bdat(0, true)),
            ("BDAT 1", bdat(1, false)),
            ("bdat 5 last", bdat(5, true)),
            ("BDAT 5 Last ", bdat(5, true)),
            ("BDAT 007", bdat(7, false)),
            ("BDAT  86  LAST", bdat(86, true)),
            ("BDAT 18446744073709551615", bdat(u64::MAX, false)),
            ("BDAT 18446744073709551615 LAST", bdat(u64::MAX, true)),
            ("BDAT", bdat_syntax()),
            ("BDAT ", bdat_syntax()),
            ("BDAT 18446744073709551616", bdat_syntax()),
            ("BDAT 99999999999999999999999999", bdat_syntax()),
            ("BDAT -1", bdat_syntax()),
            ("BDAT +1", bdat_syntax()),
            ("BDAT 1x", bdat_syntax()),
            ("BDAT x", bdat_syntax()),
            ("BDAT 0x10", bdat_syntax()),
            ("BDAT 1LAST", bdat_syntax()),
            ("BDAT LAST", bdat_syntax()),
            ("BDAT LAST 1", bdat_syntax()),
            ("BDAT 1 FIRST", bdat_syntax()),
            ("BDAT 1 LAST x", bdat_syntax()),
            ("BDAT 1 LAST LAST", bdat_syntax()),
            ("BDAT 1 2", bdat_syntax()),
            ("BDAT 1,5", bdat_syntax()),
            ("BDAT ٣", bdat_syntax()),
        ]);
    }

    #[test]
    fn every_error_variant_is_produced() {
        let produced = [
            parse("XYZZY"),
            parse("NO\0OP"),
            parse("DATA x"),
            parse("MAIL FROM:<a>"),
            parse("RCPT TO:<a>"),
            parse(&format!("MAIL FROM:<{}@b>", "x".repeat(65))),
            parse(&format!("RCPT TO:<a@{}>", "x".repeat(256))),
            parse("MAIL FROM:<a@b> FOO"),
            parse("MAIL FROM:<a@b> SIZE=x"),
        ];
        let names: Vec<_> = produced
            .iter()
            .map(|result| match result {
                Err(CommandError::UnknownCommand) => "UnknownCommand",
                Err(CommandError::InvalidCharacters) => "InvalidCharacters",
                Err(CommandError::Syntax(_)) => "Syntax",
                Err(CommandError::BadSender(_)) => "BadSender",
                Err(CommandError::BadRecipient(_)) => "BadRecipient",
                Err(CommandError::LocalPartTooLong { .. }) => "LocalPartTooLong",
                Err(CommandError::DomainTooLong { .. }) => "DomainTooLong",
                Err(CommandError::UnknownParameter(_)) => "UnknownParameter",
                Err(CommandError::InvalidParameterValue(_)) => "InvalidParameterValue",
                Ok(_) => "Ok",
            })
            .collect();
        assert_eq!(
            names,
            [
                "UnknownCommand",
                "InvalidCharacters",
                "Syntax",
                "BadSender",
                "BadRecipient",
                "LocalPartTooLong",
                "DomainTooLong",
                "UnknownParameter",
                "InvalidParameterValue",
            ]
        );
    }

    #[test]
    fn display_round_trips_for_awkward_mailboxes() {
        let mailboxes = [
            mailbox("a", name("b")),
            mailbox("john doe", name("example.org")),
            mailbox("a\"b\\c", name("d")),
            mailbox("", name("d")),
            mailbox(".a", name("d")),
            mailbox("a..b", name("d")),
            mailbox("a.", name("d")),
            mailbox("Postmaster", name("d")),
            mailbox("ü x", name("bücher.example")),
            mailbox("x", v4(192, 0, 2, 1)),
            mailbox("x", v6("2001:db8::1")),
            mailbox("x", v6("::ffff:192.0.2.1")),
            mailbox("x", v6("::")),
            mailbox("x", v6("1:0:2:3:4:5:6:7")),
            mailbox("x", general("tag:a:b")),
        ];
        for mailbox in mailboxes {
            let line = format!("RCPT TO:<{mailbox}>");
            let expected = Ok(Command::Rcpt(rcpt_to(ForwardPath::Mailbox(mailbox.clone()))));
            assert_eq!(parse(&line), expected, "line: {line:?}");
        }
    }

    // --- property tests ----------------------------------------------------------------------

    const NON_ASCII: &[char] = &['é', 'ü', 'ß', 'ñ', 'Ω', 'ж', '中', '文', '😀', '\u{a0}'];

    fn atext_char() -> impl Strategy<Value = char> {
        let ascii: Vec<char> = (0x21u8..0x7f).filter(|&b| is_atext(b)).map(char::from).collect();
        prop_oneof![4 => prop::sample::select(ascii), 1 => prop::sample::select(NON_ASCII)]
    }

    fn dot_string_local_part() -> impl Strategy<Value = String> {
        let atom = prop::collection::vec(atext_char(), 1..8).prop_map(String::from_iter);
        prop::collection::vec(atom, 1..4).prop_map(|atoms| atoms.join("."))
    }

    /// Anything a Quoted-string can carry: printable ASCII and space, plus UTF-8.
    fn quoted_local_part() -> impl Strategy<Value = String> {
        let ascii: Vec<char> = (0x20u8..0x7f).map(char::from).collect();
        let c = prop_oneof![4 => prop::sample::select(ascii), 1 => prop::sample::select(NON_ASCII)];
        prop::collection::vec(c, 0..20).prop_map(String::from_iter)
    }

    fn label() -> impl Strategy<Value = String> {
        let let_dig: Vec<char> = ('a'..='z').chain('A'..='Z').chain('0'..='9').collect();
        let inner = let_dig.iter().copied().chain(['-']).collect::<Vec<_>>();
        let edge =
            prop_oneof![8 => prop::sample::select(let_dig), 1 => prop::sample::select(NON_ASCII)];
        let middle =
            prop_oneof![8 => prop::sample::select(inner), 1 => prop::sample::select(NON_ASCII)];
        (edge.clone(), prop::collection::vec(middle, 0..10), prop::option::of(edge)).prop_map(
            |(first, middle, last)| {
                let mut label = String::from(first);
                if let Some(last) = last {
                    label.extend(middle);
                    label.push(last);
                }
                label
            },
        )
    }

    fn domain_value() -> impl Strategy<Value = Domain> {
        let name =
            prop::collection::vec(label(), 1..4).prop_map(|labels| Domain::Name(labels.join(".")));
        let ipv4 = any::<[u8; 4]>().prop_map(|octets| Domain::Address(IpAddr::from(octets)));
        let ipv6 = any::<[u16; 8]>()
            .prop_map(|groups| Domain::Address(IpAddr::from(Ipv6Addr::from(groups))));
        let sparse_ipv6 = prop::collection::vec(prop_oneof![3 => Just(0u16), 1 => any::<u16>()], 8)
            .prop_map(|groups| {
                let groups: [u16; 8] = groups.try_into().unwrap();
                Domain::Address(IpAddr::from(Ipv6Addr::from(groups)))
            });
        let mapped = any::<[u8; 4]>().prop_map(|octets| {
            Domain::Address(IpAddr::V6(Ipv4Addr::from(octets).to_ipv6_mapped()))
        });
        let dcontent: Vec<char> = (33u8..=126).filter(|&b| dcontent(b)).map(char::from).collect();
        let general = (label(), prop::collection::vec(prop::sample::select(dcontent), 1..12))
            .prop_filter("an ASCII tag that is not IPv6", |(tag, _)| {
                tag.is_ascii() && !tag.eq_ignore_ascii_case("ipv6")
            })
            .prop_map(|(tag, content)| {
                Domain::GeneralLiteral(format!("{tag}:{}", String::from_iter(content)))
            });
        prop_oneof![6 => name, 1 => ipv4, 1 => ipv6, 1 => sparse_ipv6, 1 => mapped, 1 => general]
    }

    fn mailbox_value() -> impl Strategy<Value = Mailbox> {
        let local = prop_oneof![dot_string_local_part(), quoted_local_part()];
        (local, domain_value()).prop_map(|(local_part, domain)| Mailbox { local_part, domain })
    }

    /// xtext encoding (RFC 3461 section 4), hex-encoding some characters that need not be.
    fn encode_xtext(text: &str, extra: &[bool]) -> String {
        let mut out = String::new();
        for (i, b) in text.bytes().enumerate() {
            if matches!(b, b'!'..=b'~')
                && b != b'+'
                && b != b'='
                && !extra.get(i).copied().unwrap_or(false)
            {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("+{b:02X}"));
            }
        }
        out
    }

    /// `utf-8-addr-xtext` encoding (RFC 6533 section 3).
    fn encode_utf8_addr_xtext(text: &str) -> String {
        let mut out = String::new();
        for c in text.chars() {
            if matches!(c, '!'..='~') && !matches!(c, '+' | '=' | '\\') {
                out.push(c);
            } else {
                out.push_str(&format!("\\x{{{:02X}}}", u32::from(c)));
            }
        }
        out
    }

    const WIDE: AddressLimits = AddressLimits { local_part: 1000, domain: 1000 };

    proptest! {
        #[test]
        fn mail_round_trips(mailbox in mailbox_value()) {
            let line = format!("MAIL FROM:<{mailbox}>");
            let expected = Command::Mail(mail_from(ReversePath::Mailbox(mailbox)));
            prop_assert_eq!(parse_command(line.as_bytes(), &WIDE), Ok(expected), "line: {:?}", line);
        }

        #[test]
        fn rcpt_round_trips(mailbox in mailbox_value()) {
            let path = ForwardPath::Mailbox(mailbox);
            let line = format!("RCPT TO:<{path}>");
            let expected = Command::Rcpt(rcpt_to(path));
            prop_assert_eq!(parse_command(line.as_bytes(), &WIDE), Ok(expected), "line: {:?}", line);
        }

        #[test]
        fn round_trips_with_source_route_and_parameters(
            mailbox in mailbox_value(),
            route in prop::collection::vec(domain_value(), 1..3),
            size in any::<u64>(),
            body in prop::sample::select(vec![BodyType::SevenBit, BodyType::EightBitMime, BodyType::BinaryMime]),
        ) {
            let route: Vec<String> = route.iter().map(|domain| format!("@{domain}")).collect();
            let line = format!(
                "MAIL FROM:<{}:{mailbox}> SIZE={size} BODY={} SMTPUTF8",
                route.join(","),
                body.as_str()
            );
            let expected = Command::Mail(MailFrom {
                size: Some(size),
                body: Some(body),
                smtputf8: true,
                has_parameters: true,
                ..mail_from(ReversePath::Mailbox(mailbox))
            });
            prop_assert_eq!(parse_command(line.as_bytes(), &WIDE), Ok(expected), "line: {:?}", line);
        }

        #[test]
        fn ehlo_round_trips(domain in domain_value()) {
            let line = format!("EHLO {domain}");
            prop_assert_eq!(parse_command(line.as_bytes(), &WIDE), Ok(Command::Ehlo(domain)));
        }

        #[test]
        fn envid_round_trips(
            envid in prop::collection::vec(prop::sample::select((0x20u8..0x7f).chain([b'\t']).collect::<Vec<_>>()), 1..=100),
            extra in prop::collection::vec(any::<bool>(), 100),
        ) {
            let envid = String::from_utf8(envid).unwrap();
            let line = format!("MAIL FROM:<a@b> ENVID={}", encode_xtext(&envid, &extra));
            prop_assert_eq!(parse(&line), mail_params(|m| m.envid = Some(envid)));
        }

        #[test]
        fn orcpt_round_trips(address in "[ -~]{1,100}", extra in prop::collection::vec(any::<bool>(), 100)) {
            let line = format!("RCPT TO:<a@b> ORCPT=rfc822;{}", encode_xtext(&address, &extra));
            prop_assert_eq!(parse(&line), orcpt("rfc822", &address));
        }

        #[test]
        fn utf8_orcpt_round_trips(address in "[ -~\u{a0}-\u{2fff}\u{10000}-\u{1ffff}]{1,60}") {
            let line = format!("RCPT TO:<a@b> ORCPT=utf-8;{}", encode_utf8_addr_xtext(&address));
            prop_assert_eq!(parse(&line), orcpt("utf-8", &address));
        }

        #[test]
        fn auth_round_trips(
            mechanism in "[A-Z0-9_-]{1,20}",
            initial_response in prop::option::of("[A-Za-z0-9+/]{0,40}={0,2}"),
        ) {
            let initial_response = initial_response.filter(|ir| !ir.is_empty());
            let line = match &initial_response {
                Some(ir) => format!("AUTH {} {ir}", mechanism.to_lowercase()),
                None => format!("AUTH {}", mechanism.to_lowercase()),
            };
            prop_assert_eq!(parse(&line), Ok(Command::Auth { mechanism, initial_response }));
        }

        #[test]
        fn mail_auth_round_trips(mailbox in mailbox_value(), extra in prop::collection::vec(any::<bool>(), 100)) {
            let line = format!("MAIL FROM:<a@b> AUTH={}", encode_xtext(&mailbox.to_string(), &extra));
            let expected = Command::Mail(MailFrom {
                auth: Some(ReversePath::Mailbox(mailbox)),
                has_parameters: true,
                ..mail_from(ReversePath::Mailbox(Mailbox { local_part: "a".into(), domain: name("b") }))
            });
            prop_assert_eq!(parse_command(line.as_bytes(), &WIDE), Ok(expected), "line: {:?}", line);
        }

        #[test]
        fn bdat_round_trips(size in any::<u64>(), last in any::<bool>()) {
            let line = format!("BDAT {size}{}", if last { " LAST" } else { "" });
            prop_assert_eq!(parse(&line), Ok(Command::Bdat { size, last }));
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(line in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_command(&line, &AddressLimits::default());
        }

        #[test]
        fn never_panics_on_command_like_lines(
            verb in prop::sample::select(vec!["MAIL FROM:", "RCPT TO:", "EHLO ", "BDAT ", "VRFY "]),
            rest in "[<>@\\[\\]\"\\\\:.,;=+ a-zA-Z0-9é{}x-]{0,60}",
        ) {
            let line = format!("{verb}{rest}");
            let _ = parse(&line);
        }

        #[test]
        fn invalid_characters_always_rejected(
            prefix in "[ -~]{0,20}",
            bad in prop::sample::select(vec![0u8, b'\r', b'\n']),
            suffix in "[ -~]{0,20}",
        ) {
            let mut line = prefix.into_bytes();
            line.push(bad);
            line.extend_from_slice(suffix.as_bytes());
            prop_assert_eq!(
                parse_command(&line, &AddressLimits::default()),
                Err(CommandError::InvalidCharacters)
            );
        }
    }
}

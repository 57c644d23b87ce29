//! Command line parser: RFC 5321 section 4.1 syntax, with the ESMTP parameters of RFC 1870
//! (SIZE), RFC 6152 and RFC 3030 (BODY), RFC 6531 (SMTPUTF8, UTF-8 addresses) and RFC 3461
//! (RET, ENVID, NOTIFY, ORCPT).
//!
//! Functions are named after the ABNF rules they implement.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::types::{
    AddressLimits, BodyType, Command, CommandError, Domain, ForwardPath, MailFrom, Mailbox, Notify,
    OriginalRecipient, RcptTo, Ret, ReversePath, is_atext,
};

/// Parses one command line. `line` excludes the terminating CRLF.
pub fn parse_command(line: &[u8], limits: &AddressLimits) -> Result<Command, CommandError> {
    // RFC 5321 section 2.3.8: CR and LF only as the line terminator; NUL is never text.
    if line.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
        return Err(CommandError::InvalidCharacters);
    }
    let line = std::str::from_utf8(line).map_err(|_| CommandError::InvalidCharacters)?;
    // Be liberal with trailing blanks, which some clients send.
    let line = line.trim_end_matches([' ', '\t']);
    let (verb, rest) = match line.find(' ') {
        Some(space) => (&line[..space], Some(&line[space + 1..])),
        None => (line, None),
    };
    if verb.len() > 8 || !verb.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(CommandError::UnknownCommand);
    }
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" => helo_argument(rest).map(Command::Ehlo).ok_or(CommandError::Syntax("EHLO domain")),
        "HELO" => helo_argument(rest).map(Command::Helo).ok_or(CommandError::Syntax("HELO domain")),
        "MAIL" => mail(rest.unwrap_or(""), limits).map(Command::Mail),
        "RCPT" => rcpt(rest.unwrap_or(""), limits).map(Command::Rcpt),
        "DATA" => no_argument(rest, Command::Data, "DATA"),
        "BDAT" => bdat(rest),
        "RSET" => no_argument(rest, Command::Rset, "RSET"),
        "QUIT" => no_argument(rest, Command::Quit, "QUIT"),
        "STARTTLS" => no_argument(rest, Command::StartTls, "STARTTLS"),
        "NOOP" => Ok(Command::Noop),
        "VRFY" => {
            required_string(rest).map(Command::Vrfy).ok_or(CommandError::Syntax("VRFY string"))
        }
        "EXPN" => {
            required_string(rest).map(Command::Expn).ok_or(CommandError::Syntax("EXPN string"))
        }
        "HELP" => {
            Ok(Command::Help(rest.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string)))
        }
        _ => Err(CommandError::UnknownCommand),
    }
}

fn no_argument(
    rest: Option<&str>,
    command: Command,
    syntax: &'static str,
) -> Result<Command, CommandError> {
    match rest {
        None => Ok(command),
        Some(_) => Err(CommandError::Syntax(syntax)),
    }
}

fn required_string(rest: Option<&str>) -> Option<String> {
    rest.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string)
}

/// `ehlo = "EHLO" SP ( Domain / address-literal ) CRLF` (RFC 5321 section 4.1.1.1).
fn helo_argument(rest: Option<&str>) -> Option<Domain> {
    let argument = rest?;
    if argument.is_empty() || argument.contains([' ', '\t']) {
        return None;
    }
    if argument.starts_with('[') {
        return address_literal(argument);
    }
    domain(argument.strip_suffix('.').unwrap_or(argument), usize::MAX).ok().map(Domain::Name)
}

/// `Mail-parameters` after `MAIL FROM:` (RFC 5321 section 4.1.1.2).
fn mail(rest: &str, limits: &AddressLimits) -> Result<MailFrom, CommandError> {
    const SYNTAX: &str = "MAIL FROM:<address> [parameters]";
    let rest = strip_prefix_ignore_case(rest, "FROM:").ok_or(CommandError::Syntax(SYNTAX))?;
    // Many clients put a space after the colon; RFC 5321 does not, but nothing is ambiguous.
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let (path, params) = split_path(rest).ok_or(CommandError::Syntax(SYNTAX))?;
    let path = if path == "<>" {
        ReversePath::Null
    } else {
        ReversePath::Mailbox(path_mailbox(path, limits, true)?)
    };
    let mut mail = MailFrom {
        path,
        size: None,
        body: None,
        smtputf8: false,
        ret: None,
        envid: None,
        has_parameters: false,
    };
    let mut seen: Vec<String> = Vec::new();
    for (keyword, value) in esmtp_params(params, &mut seen)? {
        mail.has_parameters = true;
        match keyword.to_ascii_uppercase().as_str() {
            // RFC 1870 section 3: size-value ::= 1*20DIGIT.
            "SIZE" => {
                let value =
                    value.filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
                let size = value.and_then(|v| v.parse().ok());
                mail.size = Some(size.ok_or(CommandError::InvalidParameterValue("SIZE"))?);
            }
            "BODY" => {
                mail.body = Some(match value.map(str::to_ascii_uppercase).as_deref() {
                    Some("7BIT") => BodyType::SevenBit,
                    Some("8BITMIME") => BodyType::EightBitMime,
                    Some("BINARYMIME") => BodyType::BinaryMime,
                    _ => return Err(CommandError::InvalidParameterValue("BODY")),
                })
            }
            // RFC 6531 section 3.4: the SMTPUTF8 parameter has no value.
            "SMTPUTF8" => match value {
                None => mail.smtputf8 = true,
                Some(_) => return Err(CommandError::InvalidParameterValue("SMTPUTF8")),
            },
            "RET" => {
                mail.ret = Some(match value.map(str::to_ascii_uppercase).as_deref() {
                    Some("FULL") => Ret::Full,
                    Some("HDRS") => Ret::Headers,
                    _ => return Err(CommandError::InvalidParameterValue("RET")),
                })
            }
            // RFC 3461 section 4.4: ENVID is xtext, at most 100 characters.
            "ENVID" => {
                let value = value.filter(|v| !v.is_empty() && v.len() <= 100);
                let decoded = value.and_then(xtext);
                mail.envid = Some(decoded.ok_or(CommandError::InvalidParameterValue("ENVID"))?);
            }
            _ => return Err(CommandError::UnknownParameter(keyword.to_string())),
        }
    }
    Ok(mail)
}

/// `Rcpt-parameters` after `RCPT TO:` (RFC 5321 section 4.1.1.3).
fn rcpt(rest: &str, limits: &AddressLimits) -> Result<RcptTo, CommandError> {
    const SYNTAX: &str = "RCPT TO:<address> [parameters]";
    let rest = strip_prefix_ignore_case(rest, "TO:").ok_or(CommandError::Syntax(SYNTAX))?;
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let (path, params) = split_path(rest).ok_or(CommandError::Syntax(SYNTAX))?;
    // RFC 5321 section 4.1.1.3: "<Postmaster>" without a domain, case-insensitively.
    let path = if path.eq_ignore_ascii_case("<postmaster>") {
        ForwardPath::Postmaster
    } else if path == "<>" {
        return Err(CommandError::BadRecipient("empty address"));
    } else {
        ForwardPath::Mailbox(path_mailbox(path, limits, false)?)
    };
    let mut rcpt = RcptTo { path, notify: None, orcpt: None, has_parameters: false };
    let mut seen: Vec<String> = Vec::new();
    for (keyword, value) in esmtp_params(params, &mut seen)? {
        rcpt.has_parameters = true;
        match keyword.to_ascii_uppercase().as_str() {
            "NOTIFY" => {
                rcpt.notify =
                    Some(notify(value).ok_or(CommandError::InvalidParameterValue("NOTIFY"))?)
            }
            "ORCPT" => {
                rcpt.orcpt = Some(orcpt(value).ok_or(CommandError::InvalidParameterValue("ORCPT"))?)
            }
            _ => return Err(CommandError::UnknownParameter(keyword.to_string())),
        }
    }
    Ok(rcpt)
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// Splits `<path> params` at the `>` that closes the path, honouring quoted strings.
fn split_path(text: &str) -> Option<(&str, &str)> {
    if !text.starts_with('<') {
        return None;
    }
    let bytes = text.as_bytes();
    let (mut i, mut quoted) = (1, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => {
                let (path, rest) = text.split_at(i + 1);
                return match rest {
                    "" => Some((path, "")),
                    _ => rest.strip_prefix(' ').map(|params| (path, params)),
                };
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// `Path = "<" [ A-d-l ":" ] Mailbox ">"`; the source route is accepted and ignored (RFC 5321
/// section 4.1.1.3 and Appendix C: servers SHOULD ignore it).
fn path_mailbox(path: &str, limits: &AddressLimits, sender: bool) -> Result<Mailbox, CommandError> {
    let bad =
        |why| if sender { CommandError::BadSender(why) } else { CommandError::BadRecipient(why) };
    let inner = &path[1..path.len() - 1];
    let inner = match inner.strip_prefix('@') {
        Some(route) => {
            let (route, mailbox) = route.split_once(':').ok_or_else(|| bad("bad source route"))?;
            for hop in route.split(',') {
                let hop = hop.strip_prefix('@').unwrap_or(hop);
                if hop.is_empty() || domain(hop, limits.domain).is_err() {
                    return Err(bad("bad source route"));
                }
            }
            mailbox
        }
        None => inner,
    };
    mailbox(inner, limits, sender)
}

/// `Mailbox = Local-part "@" ( Domain / address-literal )`.
fn mailbox(text: &str, limits: &AddressLimits, sender: bool) -> Result<Mailbox, CommandError> {
    let bad =
        |why| if sender { CommandError::BadSender(why) } else { CommandError::BadRecipient(why) };
    let (local_part, rest) = local_part(text).ok_or_else(|| bad("bad local part"))?;
    if local_part.len() > limits.local_part {
        return Err(CommandError::LocalPartTooLong { sender });
    }
    let domain_text = rest.strip_prefix('@').ok_or_else(|| bad("missing @domain"))?;
    let domain_text =
        domain_text.strip_suffix('.').filter(|d| !d.ends_with('.')).unwrap_or(domain_text);
    if domain_text.len() > limits.domain {
        return Err(CommandError::DomainTooLong { sender });
    }
    let domain = if domain_text.starts_with('[') {
        address_literal(domain_text).ok_or_else(|| bad("bad address literal"))?
    } else {
        Domain::Name(domain(domain_text, limits.domain).map_err(|_| bad("bad domain"))?)
    };
    Ok(Mailbox { local_part, domain })
}

/// `Local-part = Dot-string / Quoted-string`; returns the unquoted local part and the rest.
fn local_part(text: &str) -> Option<(String, &str)> {
    if let Some(quoted) = text.strip_prefix('"') {
        return quoted_string(quoted);
    }
    let end = text.rfind('@')?;
    let dot = &text[..end];
    dot_string(dot).then(|| (dot.to_string(), &text[end..]))
}

/// `Dot-string = Atom *("." Atom)`, with UTF-8 allowed in atext (RFC 6531 section 3.3).
fn dot_string(text: &str) -> bool {
    !text.is_empty()
        && text
            .split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(|b| b >= 0x80 || is_atext(b)))
}

/// `Quoted-string = DQUOTE *QcontentSMTP DQUOTE` after the opening quote; `qtextSMTP` is
/// printable ASCII but `"` and `\` (or UTF-8), `quoted-pairSMTP` is `\` and a printable.
fn quoted_string(text: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &text[i + 1..])),
            '\\' => {
                let (_, escaped) = chars.next()?;
                if !(' '..='~').contains(&escaped) {
                    return None;
                }
                out.push(escaped);
            }
            ' '..='~' => out.push(c),
            c if !c.is_ascii() => out.push(c),
            _ => return None,
        }
    }
    None
}

/// `Domain = sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]` or a U-label
/// (RFC 6531 section 3.3). Returns the domain unchanged.
fn domain(text: &str, max: usize) -> Result<String, ()> {
    if text.is_empty() || text.len() > max {
        return Err(());
    }
    for label in text.split('.') {
        let bytes = label.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes.iter().all(|&b| b >= 0x80 || b.is_ascii_alphanumeric() || b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-';
        if !ok {
            return Err(());
        }
    }
    Ok(text.to_string())
}

/// `address-literal = "[" ( IPv4-address-literal / IPv6-address-literal /
/// General-address-literal ) "]"` (RFC 5321 section 4.1.3).
fn address_literal(text: &str) -> Option<Domain> {
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    if let Some(v6) = strip_prefix_ignore_case(inner, "IPv6:") {
        return v6.parse::<Ipv6Addr>().ok().map(|ip| Domain::Address(IpAddr::V6(ip)));
    }
    if inner.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        // Snum = 1*3DIGIT, four of them: reject leading-zero tricks like 010 by re-printing.
        let ip: Ipv4Addr = inner.parse().ok()?;
        return (ip.to_string() == inner).then_some(Domain::Address(IpAddr::V4(ip)));
    }
    // General-address-literal = Standardized-tag ":" 1*dcontent (dcontent: %d33-90 / %d94-126).
    let (tag, content) = inner.split_once(':')?;
    let tag_ok = !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let content_ok = !content.is_empty()
        && content.bytes().all(|b| (33..=90).contains(&b) || (94..=126).contains(&b));
    (tag_ok && content_ok).then(|| Domain::GeneralLiteral(inner.to_string()))
}

/// `esmtp-param = esmtp-keyword ["=" esmtp-value]` separated by SP (RFC 5321 section 4.1.2).
/// A keyword given twice is refused like an unknown one.
fn esmtp_params<'a>(
    text: &'a str,
    seen: &mut Vec<String>,
) -> Result<Vec<(&'a str, Option<&'a str>)>, CommandError> {
    let mut params = Vec::new();
    for param in text.split(' ').filter(|p| !p.is_empty()) {
        let (keyword, value) = match param.split_once('=') {
            Some((keyword, value)) => (keyword, Some(value)),
            None => (param, None),
        };
        let keyword_ok = keyword.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && keyword.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !keyword_ok {
            return Err(CommandError::UnknownParameter(keyword.to_string()));
        }
        // esmtp-value = 1*(%d33-60 / %d62-126), plus UTF-8 (RFC 6531 section 3.3).
        if let Some(value) = value {
            if value.is_empty()
                || !value.bytes().all(|b| b >= 0x80 || ((33..=126).contains(&b) && b != b'='))
            {
                return Err(match keyword.to_ascii_uppercase().as_str() {
                    "SIZE" => CommandError::InvalidParameterValue("SIZE"),
                    "BODY" => CommandError::InvalidParameterValue("BODY"),
                    "RET" => CommandError::InvalidParameterValue("RET"),
                    "ENVID" => CommandError::InvalidParameterValue("ENVID"),
                    "NOTIFY" => CommandError::InvalidParameterValue("NOTIFY"),
                    "ORCPT" => CommandError::InvalidParameterValue("ORCPT"),
                    _ => CommandError::UnknownParameter(keyword.to_string()),
                });
            }
        }
        let upper = keyword.to_ascii_uppercase();
        if seen.contains(&upper) {
            return Err(CommandError::UnknownParameter(keyword.to_string()));
        }
        seen.push(upper);
        params.push((keyword, value));
    }
    Ok(params)
}

/// `NOTIFY=NEVER` or a comma list of SUCCESS, FAILURE, DELAY (RFC 3461 section 4.1).
fn notify(value: Option<&str>) -> Option<Notify> {
    let value = value?;
    if value.eq_ignore_ascii_case("NEVER") {
        return Some(Notify::NEVER);
    }
    let mut notify = Notify::NEVER;
    for word in value.split(',') {
        let flag = match word.to_ascii_uppercase().as_str() {
            "SUCCESS" => &mut notify.success,
            "FAILURE" => &mut notify.failure,
            "DELAY" => &mut notify.delay,
            _ => return None,
        };
        if *flag {
            return None;
        }
        *flag = true;
    }
    Some(notify)
}

/// `ORCPT=addr-type ";" xtext` (RFC 3461 section 4.2); `utf-8` addresses use the
/// utf-8-addr-xtext of RFC 6533 section 3, with `\x{HEX}` escapes.
fn orcpt(value: Option<&str>) -> Option<OriginalRecipient> {
    let (addr_type, encoded) = value?.split_once(';')?;
    if addr_type.is_empty() || !addr_type.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return None;
    }
    if encoded.is_empty() || encoded.len() > 500 {
        return None;
    }
    let address = xtext(encoded)?;
    let address =
        if addr_type.eq_ignore_ascii_case("utf-8") { unitext(&address)? } else { address };
    Some(OriginalRecipient { addr_type: addr_type.to_string(), address })
}

/// Decodes xtext: `+XX` (two upper-case hex digits) stands for an octet (RFC 3461 section 4).
fn xtext(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'=' => return None,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Decodes the `\x{HEX}` escapes of RFC 6533 utf-8-addr-unitext.
fn unitext(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("\\x{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let end = after.find('}')?;
        let code = u32::from_str_radix(&after[..end], 16).ok()?;
        if end == 0 || end > 6 {
            return None;
        }
        out.push(char::from_u32(code)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// `bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF` (RFC 3030 section 2).
fn bdat(rest: Option<&str>) -> Result<Command, CommandError> {
    const SYNTAX: &str = "BDAT chunk-size [LAST]";
    let rest = rest.ok_or(CommandError::Syntax(SYNTAX))?;
    let (size, last) = match rest.split_once(' ') {
        Some((size, marker)) if marker.eq_ignore_ascii_case("LAST") => (size, true),
        Some(_) => return Err(CommandError::Syntax(SYNTAX)),
        None => (rest, false),
    };
    if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CommandError::Syntax(SYNTAX));
    }
    let size = size.parse::<u64>().map_err(|_| CommandError::Syntax(SYNTAX))?;
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Command, CommandError> {
        parse_command(line.as_bytes(), &AddressLimits::default())
    }

    fn mailbox_of(local: &str, domain: &str) -> Mailbox {
        Mailbox { local_part: local.into(), domain: Domain::Name(domain.into()) }
    }

    fn mail_from(line: &str) -> MailFrom {
        match parse(line) {
            Ok(Command::Mail(mail)) => mail,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn rcpt_to(line: &str) -> RcptTo {
        match parse(line) {
            Ok(Command::Rcpt(rcpt)) => rcpt,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn simple_commands() {
        let table: &[(&str, Result<Command, CommandError>)] = &[
            ("DATA", Ok(Command::Data)),
            ("data", Ok(Command::Data)),
            ("RSET", Ok(Command::Rset)),
            ("QUIT", Ok(Command::Quit)),
            ("quit  ", Ok(Command::Quit)),
            ("STARTTLS", Ok(Command::StartTls)),
            ("NOOP", Ok(Command::Noop)),
            ("NOOP anything at all", Ok(Command::Noop)),
            ("HELP", Ok(Command::Help(None))),
            ("HELP mail", Ok(Command::Help(Some("mail".into())))),
            ("VRFY bob", Ok(Command::Vrfy("bob".into()))),
            ("EXPN list", Ok(Command::Expn("list".into()))),
            ("VRFY", Err(CommandError::Syntax("VRFY string"))),
            ("EXPN ", Err(CommandError::Syntax("EXPN string"))),
            ("DATA x", Err(CommandError::Syntax("DATA"))),
            ("RSET x", Err(CommandError::Syntax("RSET"))),
            ("QUIT now", Err(CommandError::Syntax("QUIT"))),
            ("STARTTLS x", Err(CommandError::Syntax("STARTTLS"))),
            ("DATAX", Err(CommandError::UnknownCommand)),
            ("FOO", Err(CommandError::UnknownCommand)),
            ("", Err(CommandError::UnknownCommand)),
            (" DATA", Err(CommandError::UnknownCommand)),
            ("GET / HTTP/1.1", Err(CommandError::UnknownCommand)),
            ("MAIL\tFROM:<a@b>", Err(CommandError::UnknownCommand)),
        ];
        for (line, expected) in table {
            assert_eq!(&parse(line), expected, "{line:?}");
        }
    }

    #[test]
    fn invalid_characters() {
        for line in
            [&b"NO\x00OP"[..], b"NOOP\r", b"NO\rOP", b"NOOP\n", b"MAIL FROM:<\xff@b>", b"\xc3"]
        {
            assert_eq!(
                parse_command(line, &AddressLimits::default()),
                Err(CommandError::InvalidCharacters),
                "{line:?}"
            );
        }
    }

    #[test]
    fn ehlo_and_helo() {
        assert_eq!(
            parse("EHLO client.example.org"),
            Ok(Command::Ehlo(Domain::Name("client.example.org".into())))
        );
        assert_eq!(parse("ehlo host."), Ok(Command::Ehlo(Domain::Name("host".into()))));
        assert_eq!(parse("HELO x"), Ok(Command::Helo(Domain::Name("x".into()))));
        assert_eq!(
            parse("EHLO [192.0.2.1]"),
            Ok(Command::Ehlo(Domain::Address("192.0.2.1".parse().unwrap())))
        );
        assert_eq!(
            parse("EHLO [IPv6:2001:db8::1]"),
            Ok(Command::Ehlo(Domain::Address("2001:db8::1".parse().unwrap())))
        );
        assert_eq!(
            parse("EHLO bücher.example"),
            Ok(Command::Ehlo(Domain::Name("bücher.example".into())))
        );
        for bad in [
            "EHLO",
            "EHLO ",
            "EHLO a b",
            "EHLO -a.example",
            "EHLO a-.example",
            "EHLO a..b",
            "EHLO a_b",
            "EHLO [300.1.1.1]",
            "EHLO [IPv6:zz]",
            "EHLO a\tb",
            "EHLO evil;x",
        ] {
            assert_eq!(parse(bad), Err(CommandError::Syntax("EHLO domain")), "{bad:?}");
        }
        assert_eq!(parse("HELO"), Err(CommandError::Syntax("HELO domain")));
    }

    #[test]
    fn mail_paths() {
        assert_eq!(
            mail_from("MAIL FROM:<alice@example.org>").path,
            ReversePath::Mailbox(mailbox_of("alice", "example.org"))
        );
        assert_eq!(mail_from("mail from:<>").path, ReversePath::Null);
        assert_eq!(
            mail_from("MAIL FROM: <a@b.example>").path,
            ReversePath::Mailbox(mailbox_of("a", "b.example"))
        );
        assert_eq!(
            mail_from("MAIL FROM:<a@b.example.>").path,
            ReversePath::Mailbox(mailbox_of("a", "b.example"))
        );
        assert_eq!(
            mail_from("MAIL FROM:<@relay1.example,@relay2.example:joe@c.example>").path,
            ReversePath::Mailbox(mailbox_of("joe", "c.example"))
        );
        assert_eq!(
            mail_from("MAIL FROM:<\"john \\\"q\\\" doe\"@example.org>").path,
            ReversePath::Mailbox(mailbox_of("john \"q\" doe", "example.org"))
        );
        assert_eq!(
            mail_from("MAIL FROM:<\"a@b\"@example.org>").path,
            ReversePath::Mailbox(mailbox_of("a@b", "example.org"))
        );
        assert_eq!(
            mail_from("MAIL FROM:<jösé@exämple.org> SMTPUTF8").path,
            ReversePath::Mailbox(mailbox_of("jösé", "exämple.org"))
        );
        assert_eq!(
            mail_from("MAIL FROM:<a@[192.0.2.1]>").path,
            ReversePath::Mailbox(Mailbox {
                local_part: "a".into(),
                domain: Domain::Address("192.0.2.1".parse().unwrap())
            })
        );
        assert_eq!(
            mail_from("MAIL FROM:<a@[x-tag:stuff]>").path,
            ReversePath::Mailbox(Mailbox {
                local_part: "a".into(),
                domain: Domain::GeneralLiteral("x-tag:stuff".into())
            })
        );
    }

    #[test]
    fn bad_paths() {
        let syntax = Err(CommandError::Syntax("MAIL FROM:<address> [parameters]"));
        for line in [
            "MAIL FROM:a@b",
            "MAIL FROM:",
            "MAIL TO:<a@b>",
            "MAIL FROM:<a@b",
            "MAIL FROM:<a@b>x",
            "MAIL FROM  :<a@b>",
            "MAIL  FROM:<a@b>",
            "MAIL FROM:  <a@b>",
            "MAIL FROM:<\"unterminated@b>",
        ] {
            assert_eq!(parse(line), syntax, "{line:?}");
        }
        for line in [
            "MAIL FROM:<a>",
            "MAIL FROM:<@b>",
            "MAIL FROM:<a@>",
            "MAIL FROM:<.a@b>",
            "MAIL FROM:<a.@b>",
            "MAIL FROM:<a..b@c>",
            "MAIL FROM:<a b@c>",
            "MAIL FROM:<a@b..c>",
            "MAIL FROM:<a@[1.2.3]>",
            "MAIL FROM:<@x:a>",
            "MAIL FROM:<@:a@b>",
            "MAIL FROM:<a@b@c>",
            "MAIL FROM:<a@-b.c>",
            "MAIL FROM:<a(comment)@b>",
        ] {
            assert!(
                matches!(parse(line), Err(CommandError::BadSender(_))),
                "{line:?}: {:?}",
                parse(line)
            );
        }
        assert!(matches!(parse("RCPT TO:<a>"), Err(CommandError::BadRecipient(_))));
        assert!(matches!(parse("RCPT TO:<>"), Err(CommandError::BadRecipient(_))));
        assert_eq!(
            parse("RCPT TO:a@b"),
            Err(CommandError::Syntax("RCPT TO:<address> [parameters]"))
        );
    }

    #[test]
    fn length_limits() {
        let limits = AddressLimits::default();
        let local = "a".repeat(64);
        let ok = format!("MAIL FROM:<{local}@b>");
        assert!(parse_command(ok.as_bytes(), &limits).is_ok());
        let long = format!("MAIL FROM:<{local}a@b>");
        assert_eq!(
            parse_command(long.as_bytes(), &limits),
            Err(CommandError::LocalPartTooLong { sender: true })
        );
        let label = "d".repeat(63);
        let domain = format!("{label}.{label}.{label}.{}", "e".repeat(63));
        assert_eq!(domain.len(), 255);
        let ok = format!("RCPT TO:<a@{domain}>");
        assert!(parse_command(ok.as_bytes(), &limits).is_ok());
        let long = format!("RCPT TO:<a@{domain}x>");
        assert_eq!(
            parse_command(long.as_bytes(), &limits),
            Err(CommandError::DomainTooLong { sender: false })
        );
        assert!(
            matches!(
                parse(&format!("MAIL FROM:<a@{}.b>", "x".repeat(64))),
                Err(CommandError::BadSender(_))
            ),
            "label over 63"
        );
    }

    #[test]
    fn postmaster() {
        assert_eq!(rcpt_to("RCPT TO:<Postmaster>").path, ForwardPath::Postmaster);
        assert_eq!(rcpt_to("rcpt to:<POSTMASTER>").path, ForwardPath::Postmaster);
        assert_eq!(
            rcpt_to("RCPT TO:<postmaster@localhost>").path,
            ForwardPath::Mailbox(mailbox_of("postmaster", "localhost"))
        );
        assert!(matches!(parse("MAIL FROM:<Postmaster>"), Err(CommandError::BadSender(_))));
    }

    #[test]
    fn mail_parameters() {
        let mail =
            mail_from("MAIL FROM:<a@b> SIZE=1000 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=QQ+2B314");
        assert_eq!(mail.size, Some(1000));
        assert_eq!(mail.body, Some(BodyType::EightBitMime));
        assert!(mail.smtputf8 && mail.has_parameters);
        assert_eq!(mail.ret, Some(Ret::Headers));
        assert_eq!(mail.envid.as_deref(), Some("QQ+314"));
        assert!(!mail_from("MAIL FROM:<a@b>").has_parameters);
        assert_eq!(mail_from("MAIL FROM:<a@b> body=BINARYMIME").body, Some(BodyType::BinaryMime));
        assert_eq!(mail_from("MAIL FROM:<a@b> BODY=7BIT").body, Some(BodyType::SevenBit));
        assert_eq!(mail_from("MAIL FROM:<a@b> RET=FULL").ret, Some(Ret::Full));
        assert_eq!(mail_from("MAIL FROM:<a@b> SIZE=18446744073709551615").size, Some(u64::MAX));
        let table: &[(&str, CommandError)] = &[
            ("MAIL FROM:<a@b> SIZE=", CommandError::InvalidParameterValue("SIZE")),
            ("MAIL FROM:<a@b> SIZE", CommandError::InvalidParameterValue("SIZE")),
            ("MAIL FROM:<a@b> SIZE=-1", CommandError::InvalidParameterValue("SIZE")),
            ("MAIL FROM:<a@b> SIZE=1e3", CommandError::InvalidParameterValue("SIZE")),
            (
                "MAIL FROM:<a@b> SIZE=18446744073709551616",
                CommandError::InvalidParameterValue("SIZE"),
            ),
            ("MAIL FROM:<a@b> BODY=9BIT", CommandError::InvalidParameterValue("BODY")),
            ("MAIL FROM:<a@b> SMTPUTF8=yes", CommandError::InvalidParameterValue("SMTPUTF8")),
            ("MAIL FROM:<a@b> RET=SOME", CommandError::InvalidParameterValue("RET")),
            ("MAIL FROM:<a@b> ENVID=a+zz", CommandError::InvalidParameterValue("ENVID")),
            ("MAIL FROM:<a@b> ENVID=a+2b", CommandError::InvalidParameterValue("ENVID")),
            ("MAIL FROM:<a@b> SIZE=1 SIZE=2", CommandError::UnknownParameter("SIZE".into())),
            ("MAIL FROM:<a@b> FOO=bar", CommandError::UnknownParameter("FOO".into())),
            ("MAIL FROM:<a@b> AUTH=<>", CommandError::UnknownParameter("AUTH".into())),
            ("MAIL FROM:<a@b> NOTIFY=NEVER", CommandError::UnknownParameter("NOTIFY".into())),
            ("MAIL FROM:<a@b> =x", CommandError::UnknownParameter("".into())),
        ];
        for (line, error) in table {
            assert_eq!(parse(line).as_ref().err(), Some(error), "{line:?}");
        }
        let envid = format!("MAIL FROM:<a@b> ENVID={}", "e".repeat(101));
        assert_eq!(parse(&envid).err(), Some(CommandError::InvalidParameterValue("ENVID")));
    }

    #[test]
    fn rcpt_parameters() {
        let rcpt = rcpt_to("RCPT TO:<a@b> NOTIFY=success,Delay ORCPT=rfc822;bob+2Bx@example.org");
        assert_eq!(rcpt.notify, Some(Notify { success: true, failure: false, delay: true }));
        assert_eq!(
            rcpt.orcpt,
            Some(OriginalRecipient {
                addr_type: "rfc822".into(),
                address: "bob+x@example.org".into()
            })
        );
        assert_eq!(rcpt_to("RCPT TO:<a@b> NOTIFY=NEVER").notify, Some(Notify::NEVER));
        assert_eq!(
            rcpt_to("RCPT TO:<a@b> ORCPT=utf-8;j\\x{F6}s\\x{E9}@example.org")
                .orcpt
                .unwrap()
                .address,
            "jösé@example.org"
        );
        for (line, error) in [
            ("RCPT TO:<a@b> NOTIFY=NEVER,SUCCESS", CommandError::InvalidParameterValue("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=SUCCESS,SUCCESS", CommandError::InvalidParameterValue("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=SOMETIMES", CommandError::InvalidParameterValue("NOTIFY")),
            ("RCPT TO:<a@b> NOTIFY=", CommandError::InvalidParameterValue("NOTIFY")),
            ("RCPT TO:<a@b> ORCPT=rfc822", CommandError::InvalidParameterValue("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=;a@b", CommandError::InvalidParameterValue("ORCPT")),
            ("RCPT TO:<a@b> ORCPT=utf-8;\\x{110000}", CommandError::InvalidParameterValue("ORCPT")),
            ("RCPT TO:<a@b> SIZE=10", CommandError::UnknownParameter("SIZE".into())),
            (
                "RCPT TO:<a@b> NOTIFY=NEVER NOTIFY=NEVER",
                CommandError::UnknownParameter("NOTIFY".into()),
            ),
        ] {
            assert_eq!(parse(line).err(), Some(error), "{line:?}");
        }
    }

    #[test]
    fn bdat_forms() {
        assert_eq!(parse("BDAT 0"), Ok(Command::Bdat { size: 0, last: false }));
        assert_eq!(parse("BDAT 1000 LAST"), Ok(Command::Bdat { size: 1000, last: true }));
        assert_eq!(parse("bdat 5 last"), Ok(Command::Bdat { size: 5, last: true }));
        assert_eq!(
            parse("BDAT 18446744073709551615"),
            Ok(Command::Bdat { size: u64::MAX, last: false })
        );
        for bad in [
            "BDAT",
            "BDAT ",
            "BDAT -1",
            "BDAT 1x",
            "BDAT 18446744073709551616",
            "BDAT 1 FIRST",
            "BDAT 1 LAST x",
            "BDAT +1",
        ] {
            assert_eq!(parse(bad), Err(CommandError::Syntax("BDAT chunk-size [LAST]")), "{bad:?}");
        }
    }

    #[test]
    fn xtext_and_unitext() {
        assert_eq!(xtext("a+2Bb+3Dc").as_deref(), Some("a+b=c"));
        assert_eq!(xtext("+").as_deref(), None);
        assert_eq!(xtext("+4").as_deref(), None);
        assert_eq!(xtext("+4g").as_deref(), None);
        assert_eq!(unitext("a\\x{E9}b").as_deref(), Some("aéb"));
        assert_eq!(unitext("\\x{}").as_deref(), None);
        assert_eq!(unitext("\\x{E9").as_deref(), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn atom() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,8}|[a-z]{1,3}[é中ü][a-z]{0,3}"
        }

        fn local_part() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::collection::vec(atom(), 1..4).prop_map(|atoms| atoms.join(".")),
                "[ -~é]{1,20}",
            ]
        }

        fn domain() -> impl Strategy<Value = Domain> {
            prop_oneof![
                prop::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..4)
                    .prop_map(|labels| Domain::Name(labels.join("."))),
                any::<[u8; 4]>().prop_map(|o| Domain::Address(IpAddr::from(o))),
                any::<[u16; 8]>().prop_map(|s| Domain::Address(IpAddr::from(s))),
            ]
        }

        proptest! {
            #[test]
            fn mailbox_display_parses_back(local in local_part(), domain in domain()) {
                let mailbox = Mailbox { local_part: local, domain };
                let line = format!("MAIL FROM:<{mailbox}> SMTPUTF8");
                let parsed = mail_from(&line);
                prop_assert_eq!(parsed.path, ReversePath::Mailbox(mailbox.clone()));
                let line = format!("RCPT TO:<{mailbox}>");
                prop_assert_eq!(rcpt_to(&line).path, ForwardPath::Mailbox(mailbox));
            }

            #[test]
            fn arbitrary_lines_never_panic(line in prop::collection::vec(any::<u8>(), 0..200)) {
                let _ = parse_command(&line, &AddressLimits::default());
            }
        }
    }
}

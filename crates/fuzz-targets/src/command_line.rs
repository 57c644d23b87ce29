//! `command_line`: the command parser on arbitrary octets.
//!
//! Oracles: no panic; every error maps to a well-formed reply; a line that parses with the
//! default address limits parses the same with no limits; trailing white space and the case
//! of the verb change nothing; and a parsed command printed back in wire form parses to the
//! same value.

use std::fmt::Write;

use smtp_proto::{
    AddressLimits, Command, CommandError, ForwardPath, MailFrom, RcptTo, Reply, ReversePath,
    parse_command,
};

use crate::replies::check_replies;

/// Each line of the input (LF-separated, a CR before the LF dropped) is a command line, and
/// so is the whole input with its line endings.
pub fn command_line(data: &[u8]) {
    let _ = check_line(data);
    for line in data.split(|&b| b == b'\n') {
        let _ = check_line(line.strip_suffix(b"\r").unwrap_or(line));
    }
}

/// Every oracle for one command line; the parsed command, if any.
pub(crate) fn check_line(line: &[u8]) -> Result<Command, CommandError> {
    let limits = AddressLimits::default();
    let result = parse_command(line, &limits);
    match &result {
        Err(error) => {
            check_replies(&Reply::from(error).to_bytes(), "");
        }
        Ok(command) => {
            let unlimited = AddressLimits { local_part: usize::MAX, domain: usize::MAX };
            assert_eq!(
                parse_command(line, &unlimited).as_ref(),
                Ok(command),
                "accepted with limits, refused or different without: {:?}",
                String::from_utf8_lossy(line)
            );
            let trimmed = String::from_utf8_lossy(line);
            let trimmed = trimmed.trim_end_matches([' ', '\t']);
            let verb = trimmed.split(' ').next().unwrap_or_default().as_bytes();
            assert!(
                verb.eq_ignore_ascii_case(command.verb().as_bytes()),
                "{:?} parsed as {}",
                String::from_utf8_lossy(line),
                command.verb()
            );
            let wire = render(command);
            assert_eq!(
                parse_command(wire.as_bytes(), &limits).as_ref(),
                Ok(command),
                "{:?} parsed as {command:?}, printed back as {wire:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
    for blank in [&b" "[..], b"\t", b" \t "] {
        let padded = [line, blank].concat();
        assert_eq!(
            parse_command(&padded, &limits),
            result,
            "trailing white space changed {:?}",
            String::from_utf8_lossy(line)
        );
    }
    let verb_len = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    for recase in [u8::to_ascii_lowercase, u8::to_ascii_uppercase] {
        let mut other = line.to_vec();
        other[..verb_len].iter_mut().for_each(|b| *b = recase(b));
        assert_eq!(
            parse_command(&other, &limits),
            result,
            "the case of the verb changed {:?}",
            String::from_utf8_lossy(line)
        );
    }
    result
}

/// The wire form of a command, as a client would send it.
pub(crate) fn render(command: &Command) -> String {
    match command {
        Command::Ehlo(domain) => format!("EHLO {domain}"),
        Command::Helo(domain) => format!("HELO {domain}"),
        Command::Mail(mail) => render_mail(mail),
        Command::Rcpt(rcpt) => render_rcpt(rcpt),
        Command::Data => "DATA".into(),
        Command::Bdat { size, last } => format!("BDAT {size}{}", if *last { " LAST" } else { "" }),
        Command::Rset => "RSET".into(),
        Command::Noop => "NOOP".into(),
        Command::Quit => "QUIT".into(),
        Command::Vrfy(text) => format!("VRFY {text}"),
        Command::Expn(text) => format!("EXPN {text}"),
        Command::Help(None) => "HELP".into(),
        Command::Help(Some(text)) => format!("HELP {text}"),
        Command::StartTls => "STARTTLS".into(),
        Command::Auth { mechanism, initial_response: None } => format!("AUTH {mechanism}"),
        Command::Auth { mechanism, initial_response: Some(response) } => {
            format!("AUTH {mechanism} {response}")
        }
    }
}

fn render_mail(mail: &MailFrom) -> String {
    let mut line = format!("MAIL FROM:<{}>", mail.path);
    if let Some(size) = mail.size {
        let _ = write!(line, " SIZE={size}");
    }
    if let Some(body) = mail.body {
        let _ = write!(line, " BODY={}", body.as_str());
    }
    if mail.smtputf8 {
        line.push_str(" SMTPUTF8");
    }
    if let Some(ret) = mail.ret {
        let _ = write!(line, " RET={}", ret.as_str());
    }
    if let Some(envid) = &mail.envid {
        let _ = write!(line, " ENVID={}", xtext(envid));
    }
    match &mail.auth {
        None => {}
        Some(ReversePath::Null) => line.push_str(" AUTH=<>"),
        Some(ReversePath::Mailbox(mailbox)) => {
            let _ = write!(line, " AUTH={}", xtext(&mailbox.to_string()));
        }
    }
    line
}

fn render_rcpt(rcpt: &RcptTo) -> String {
    let mut line = match &rcpt.path {
        ForwardPath::Postmaster => "RCPT TO:<Postmaster>".to_owned(),
        ForwardPath::Mailbox(mailbox) => format!("RCPT TO:<{mailbox}>"),
    };
    if let Some(notify) = rcpt.notify {
        let _ = write!(line, " NOTIFY={notify}");
    }
    if let Some(orcpt) = &rcpt.orcpt {
        let address = if orcpt.addr_type.eq_ignore_ascii_case("utf-8") {
            utf_8_addr_xtext(&orcpt.address)
        } else {
            xtext(&orcpt.address)
        };
        let _ = write!(line, " ORCPT={};{address}", orcpt.addr_type);
    }
    line
}

/// RFC 3461 section 4 `xtext`: `!` to `~` except `+` and `=` as themselves, every other octet
/// as `+` and two upper case hex digits.
pub(crate) fn xtext(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

/// RFC 6533 section 3 `utf-8-addr-xtext`: QCHAR as itself, every other character as
/// `\x{HEXPOINT}`.
fn utf_8_addr_xtext(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if ('!'..='~').contains(&c) && !matches!(c, '+' | '=' | '\\') {
            out.push(c);
        } else {
            let _ = write!(out, "\\x{{{:02X}}}", u32::from(c));
        }
    }
    out
}

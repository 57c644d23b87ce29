//! `address`: the path parser, reached through MAIL FROM, RCPT TO and the AUTH= parameter.
//!
//! The input is the text of a path. Besides the oracles of every command line (see
//! [`crate::command_line`]), a mailbox that parses is printed with `Display` and must parse
//! back to the same value, in each place a mailbox may stand.

use smtp_proto::{Command, ForwardPath, Mailbox, ReversePath};

use crate::command_line::{check_line, xtext};

pub fn address(data: &[u8]) {
    for verb in [&b"MAIL FROM:"[..], b"RCPT TO:"] {
        let _ = check_line(&[verb, data].concat());
        let _ = check_line(&[verb, b"<", data, b">"].concat());
        if let Ok(mailbox) = parsed_mailbox(check_line(&[verb, b"<", data, b">"].concat())) {
            round_trip(&mailbox);
        }
    }
    // The same text as the mailbox of an AUTH= parameter (RFC 4954 section 5), xtext-encoded.
    if let Ok(text) = std::str::from_utf8(data) {
        let line = format!("MAIL FROM:<> AUTH={}", xtext(text));
        if let Ok(Command::Mail(mail)) = check_line(line.as_bytes())
            && let Some(ReversePath::Mailbox(mailbox)) = mail.auth
        {
            round_trip(&mailbox);
        }
    }
}

/// The mailbox of a MAIL or RCPT command.
fn parsed_mailbox(result: Result<Command, smtp_proto::CommandError>) -> Result<Mailbox, ()> {
    match result {
        Ok(Command::Mail(mail)) => match mail.path {
            ReversePath::Mailbox(mailbox) => Ok(mailbox),
            ReversePath::Null => Err(()),
        },
        Ok(Command::Rcpt(rcpt)) => match rcpt.path {
            ForwardPath::Mailbox(mailbox) => Ok(mailbox),
            ForwardPath::Postmaster => Err(()),
        },
        _ => Err(()),
    }
}

/// `Display` of a mailbox parses back to it, as a sender, a recipient and an AUTH= value.
fn round_trip(mailbox: &Mailbox) {
    let text = mailbox.to_string();
    for line in [format!("MAIL FROM:<{text}>"), format!("RCPT TO:<{text}>")] {
        let parsed = parsed_mailbox(check_line(line.as_bytes()));
        assert_eq!(parsed.as_ref(), Ok(mailbox), "{mailbox:?} printed as {line:?}");
    }
    let line = format!("MAIL FROM:<> AUTH={}", xtext(&text));
    match check_line(line.as_bytes()) {
        Ok(Command::Mail(mail)) => {
            assert_eq!(mail.auth, Some(ReversePath::Mailbox(mailbox.clone())), "{line:?}")
        }
        other => panic!("{mailbox:?} as {line:?}: {other:?}"),
    }
}

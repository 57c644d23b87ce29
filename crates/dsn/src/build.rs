//! Assembling a notice: the RFC 6522 container, the explanation, the RFC 3464 fields and the
//! returned content.

use smtp_proto::trace::rfc5322_date_at as date;
use smtp_proto::{BodyType, Ret, is_atext};

use crate::field::{clean, clean_lines, clean_word, push_field, push_wrapped};
use crate::{Action, Diagnostic, DsnError, Kind, Notification, RecipientReport, Report, Returned};

/// RFC 2045 section 2.8: 8bit data has lines of at most 998 octets, no NUL, and CR and LF
/// only together as CRLF. The returned message is passed through unchanged, so it can only
/// be returned when it already is such data.
const MAX_LINE: usize = 998;

/// RFC 2046 section 5.1.1: `boundary := 0*69<bchars> bcharsnospace`, at most 70 characters.
const MAX_BOUNDARY: usize = 70;

/// The longest start of a boundary, taken from the Message-ID. The rest of the 70 characters
/// is room for [`boundary`] to extend it: each extension character divides the number of
/// occurrences in the content by at least 62, so no content that fits in memory needs more
/// than 11 of them (62^11 > 2^64).
const BOUNDARY_BASE: usize = 56;

/// Which original message part goes in the notice, and what the explanation says about it.
struct Return<'a> {
    what: Returned,
    content: &'a [u8],
    note: String,
}

pub(crate) fn build(report: &Report, content: &[u8]) -> Result<Notification, DsnError> {
    validate(report)?;
    let kind = kind(&report.recipients);
    let host = &report.reporting_mta;
    // RFC 6533: the "global" types when the original was an SMTPUTF8 message or any address
    // needs UTF-8. Otherwise the notice is plain RFC 3464, where every field is ASCII.
    let global = report.original.smtputf8
        || !report.original.sender.is_ascii()
        || report.recipients.iter().any(|r| {
            !r.final_recipient.is_ascii()
                || r.original_recipient.as_ref().is_some_and(|o| !o.address.is_ascii())
        });
    let returned = choose_return(kind, report.original.ret, content, report.return_size_limit);

    let explanation = explanation(report, kind, global, &returned.note);
    let explanation_8bit = !explanation.is_ascii();
    let status = delivery_status(report, global);

    let mut parts: Vec<(String, &[u8])> = Vec::with_capacity(3);
    // Each part declares what it holds: 7bit when it is all ASCII, else 8bit.
    let mut declared_8bit = explanation_8bit;
    parts.push((
        if explanation_8bit {
            part_header("text/plain; charset=utf-8", "8bit")
        } else {
            part_header("text/plain; charset=us-ascii", "7bit")
        },
        explanation.as_bytes(),
    ));
    parts.push(if global {
        // RFC 6533 section 6.4: "The 8-bit content transfer encoding MUST be used with this
        // content-type, unless it is sent over a 7-bit transport environment".
        declared_8bit = true;
        (part_header("message/global-delivery-status", "8bit"), status.as_bytes())
    } else {
        // RFC 3464 section 2.1: "7bit" encoding "MUST be used"; `clean` made it ASCII.
        (part_header("message/delivery-status", "7bit"), status.as_bytes())
    });
    if returned.what != Returned::Nothing {
        let content_8bit = !returned.content.is_ascii();
        let (content_type, encoding) = match (returned.what, global) {
            // RFC 6533 section 6.3 for message/global-headers: "Whenever possible, the 8-bit
            // content transfer encoding SHOULD be used"; message/global follows suit.
            (Returned::Full, true) => ("message/global", "8bit"),
            (_, true) => ("message/global-headers", "8bit"),
            // RFC 2046 section 5.2.1 allows only 7bit, 8bit and binary for message/rfc822;
            // 8-bit content is declared 8bit, and the caller must then send the notice with
            // BODY=8BITMIME (Notification::body says so).
            (Returned::Full, false) => {
                ("message/rfc822", if content_8bit { "8bit" } else { "7bit" })
            }
            (_, false) => ("text/rfc822-headers", if content_8bit { "8bit" } else { "7bit" }),
        };
        declared_8bit |= encoding == "8bit";
        parts.push((part_header(content_type, encoding), returned.content));
    }

    let mut texts: Vec<&[u8]> = vec![PREAMBLE.as_bytes()];
    for (header, body) in &parts {
        texts.push(header.as_bytes());
        texts.push(body);
    }
    let boundary = boundary(&boundary_base(&report.message_id), &texts);

    let mut header = String::with_capacity(1024);
    push_field(&mut header, "From", &format!("Mail Delivery System <MAILER-DAEMON@{host}>"));
    // RFC 3464 section 2: "The DSN MUST be addressed (in both the message header and the
    // transport envelope) to the return address from the transport envelope".
    push_field(&mut header, "To", &format!("<{}>", clean(&report.original.sender, global)));
    push_field(&mut header, "Subject", subject(kind));
    push_field(&mut header, "Date", &date(report.date));
    push_field(&mut header, "Message-ID", &format!("<{}@{host}>", report.message_id));
    // RFC 3834 section 5.2: "auto-replied" "MAY be used on Delivery Status Notifications";
    // "auto-generated" "MUST NOT be used to label Delivery Status Notifications".
    push_field(&mut header, "Auto-Submitted", "auto-replied");
    push_field(&mut header, "MIME-Version", "1.0");
    // RFC 6522 section 3 says report-type is "the MIME subtype of the second body part", but
    // RFC 6533 section 4.4 makes message/global-delivery-status "equivalent to message/
    // delivery-status" inside multipart/report; "delivery-status" is what bounce processors
    // look for, so it is used for both.
    push_field(
        &mut header,
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );

    let total = header.len() + texts.iter().map(|t| t.len()).sum::<usize>() + 256;
    let mut message = Vec::with_capacity(total);
    message.extend_from_slice(header.as_bytes());
    message.extend_from_slice(b"\r\n");
    message.extend_from_slice(PREAMBLE.as_bytes());
    for (part_header, body) in &parts {
        message.extend_from_slice(b"\r\n--");
        message.extend_from_slice(boundary.as_bytes());
        message.extend_from_slice(b"\r\n");
        message.extend_from_slice(part_header.as_bytes());
        message.extend_from_slice(b"\r\n");
        message.extend_from_slice(body);
        // RFC 2046 section 5.1.1: the CRLF before the delimiter "is conceptually attached to
        // the boundary", so a body ending in CRLF keeps that CRLF, and a body without a final
        // line ending is returned without one.
    }
    message.extend_from_slice(b"\r\n--");
    message.extend_from_slice(boundary.as_bytes());
    message.extend_from_slice(b"--\r\n");

    Ok(Notification {
        message,
        kind,
        body: if declared_8bit { BodyType::EightBitMime } else { BodyType::SevenBit },
        smtputf8: global,
        returned: returned.what,
    })
}

/// Shown by mail readers that do not understand MIME. It ends with CRLF, which together with
/// the CRLF of the first delimiter leaves one empty line before it.
const PREAMBLE: &str = "This is a delivery status notification in MIME format.\r\n";

fn part_header(content_type: &str, encoding: &str) -> String {
    let mut header = String::with_capacity(96);
    push_field(&mut header, "Content-Type", content_type);
    push_field(&mut header, "Content-Transfer-Encoding", encoding);
    header
}

fn validate(report: &Report) -> Result<(), DsnError> {
    if report.original.sender.is_empty() {
        return Err(DsnError::NullSender);
    }
    if report.recipients.is_empty() {
        return Err(DsnError::NoRecipients);
    }
    if !is_host_name(&report.reporting_mta) {
        return Err(DsnError::InvalidHostName(report.reporting_mta.clone()));
    }
    if !is_dot_atom(&report.message_id) {
        return Err(DsnError::InvalidMessageId(report.message_id.clone()));
    }
    for recipient in &report.recipients {
        let invalid = |reason: String| DsnError::InvalidRecipient {
            recipient: recipient.final_recipient.clone(),
            reason,
        };
        let status = recipient.status;
        // RFC 3464 section 2.3.4: `status-code = DIGIT "." 1*3DIGIT "." 1*3DIGIT`.
        if status.1 > 999 || status.2 > 999 {
            return Err(invalid(format!("status {status} has a field above 999")));
        }
        let fits = match recipient.action {
            // RFC 3464 section 2.3.3 allows a temporary status with "failed": a message that
            // kept failing temporarily until it expired.
            Action::Failed => status.0 == 4 || status.0 == 5,
            Action::Delayed => status.0 == 4,
            Action::Delivered | Action::Relayed | Action::Expanded => status.0 == 2,
        };
        if !fits {
            return Err(invalid(format!(
                "status {status} does not fit action {}",
                recipient.action
            )));
        }
        if recipient.will_retry_until.is_some() && recipient.action != Action::Delayed {
            // RFC 3464 section 2.3.9: Will-Retry-Until "MUST NOT appear in other DSNs".
            return Err(invalid(format!("Will-Retry-Until given for action {}", recipient.action)));
        }
    }
    Ok(())
}

/// An ASCII domain name or address literal, safe in an address, a Message-ID and a DSN field.
fn is_host_name(name: &str) -> bool {
    let literal = name.len() > 2
        && name.starts_with('[')
        && name.ends_with(']')
        && name[1..name.len() - 1].bytes().all(|b| b.is_ascii_alphanumeric() || b".:".contains(&b));
    let domain = name.split('.').all(|label| {
        !label.is_empty()
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    name.len() <= 255 && (literal || domain)
}

/// RFC 5322 section 3.2.3 `dot-atom-text`, the left side of a Message-ID (section 3.6.4); at
/// most 128 octets, far more than any unique id needs, so the Message-ID field stays short.
fn is_dot_atom(text: &str) -> bool {
    text.len() <= 128 && text.split('.').all(|atom| !atom.is_empty() && atom.bytes().all(is_atext))
}

/// The notice's kind from its recipients: a notice reporting any failure is a failure notice
/// (and RFC 3461 section 4.3 lets only such notices return the whole message), then delay,
/// then success; relayed only when every recipient was relayed.
fn kind(recipients: &[RecipientReport]) -> Kind {
    let has = |kind: Kind| recipients.iter().any(|r| r.action.kind() == kind);
    [Kind::Failure, Kind::Delay, Kind::Success]
        .into_iter()
        .find(|&k| has(k))
        .unwrap_or(Kind::Relayed)
}

fn subject(kind: Kind) -> &'static str {
    match kind {
        Kind::Failure => "Undelivered Mail Returned to Sender",
        Kind::Delay => "Delayed Mail (still being retried)",
        Kind::Success => "Successful Mail Delivery Report",
        Kind::Relayed => "Relayed Mail Report",
    }
}

/// Chooses what to return of the original message.
///
/// RFC 3461 section 4.3: RET applies only to DSNs that report a failure; "If a DSN contains no
/// indications of delivery failure, only the headers of the message should be returned." For
/// a failure without RET, RFC 6522 section 3: the reporting agent "SHOULD return the full
/// message content". And RFC 3461 section 6.2: "if the length of the message is greater than some
/// implementation-specified length, the MTA MAY return only the headers even if the RET
/// parameter specified FULL."
fn choose_return(kind: Kind, ret: Option<Ret>, content: &[u8], limit: usize) -> Return<'_> {
    let mut reason = None;
    if kind == Kind::Failure && ret != Some(Ret::Headers) {
        if content.len() > limit {
            reason = Some(format!(
                "Your message is larger than {limit} octets, so only its header is \
                 attached below."
            ));
        } else if !is_8bit_data(content) {
            reason = Some(
                "Your message has lines that cannot be returned unchanged (longer than 998 \
                 octets, a bare CR or LF, or a NUL octet), so only its header is attached below."
                    .to_string(),
            );
        } else {
            return Return {
                what: Returned::Full,
                content,
                note: "Your message is attached below.".to_string(),
            };
        }
    }
    let header = header_section(content);
    if header.len() > limit {
        return Return {
            what: Returned::Nothing,
            content: &[],
            note: format!(
                "The header of your message is larger than {limit} octets, so it is not \
                 attached."
            ),
        };
    }
    if !is_8bit_data(header) {
        return Return {
            what: Returned::Nothing,
            content: &[],
            note: "The header of your message has lines that cannot be returned unchanged, \
                   so it is not attached."
                .to_string(),
        };
    }
    let note = reason.unwrap_or_else(|| {
        if kind == Kind::Failure {
            "As you asked, only the header of your message is attached below.".to_string()
        } else {
            "The header of your message is attached below.".to_string()
        }
    });
    Return { what: Returned::Headers, content: header, note }
}

/// The header section of a message: everything before the first empty line, which ends with
/// the line ending of the last field. A message without an empty line is all header.
fn header_section(content: &[u8]) -> &[u8] {
    let mut start = 0;
    while start < content.len() {
        let end =
            content[start..].iter().position(|&b| b == b'\n').map_or(content.len(), |i| start + i);
        let line = &content[start..end];
        if line.is_empty() || line == b"\r" {
            return &content[..start];
        }
        start = end + 1;
    }
    content
}

/// True when `bytes` can go unchanged into a part declared 7bit or 8bit (RFC 2045 section
/// 2.8): no NUL, CR only before LF, LF only after CR, lines of at most 998 octets.
fn is_8bit_data(bytes: &[u8]) -> bool {
    let mut line_len = 0;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            0 => return false,
            b'\r' if bytes.get(i + 1) != Some(&b'\n') => return false,
            b'\n' if i == 0 || bytes[i - 1] != b'\r' => return false,
            b'\r' => {}
            b'\n' => line_len = 0,
            _ => {
                line_len += 1;
                if line_len > MAX_LINE {
                    return false;
                }
            }
        }
    }
    true
}

/// The start of the boundary: unique per notice, because it comes from the Message-ID, and
/// made of characters that need no care anywhere (letters, digits, `.`, `_`, `-`).
fn boundary_base(message_id: &str) -> String {
    let unique: String = message_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect();
    let mut base = format!("=_dsn.{unique}");
    base.truncate(BOUNDARY_BASE);
    base
}

/// A boundary that occurs in none of `texts`, so no line of any part can be taken for a
/// delimiter (RFC 2046 section 5.1: "The boundary delimiter MUST NOT appear inside any of
/// the encapsulated parts"). Checking for the string anywhere, not just at line starts, also
/// keeps lenient parsers right.
///
/// Why this terminates quickly: while the candidate occurs somewhere, look at the characters
/// that follow its occurrences. If one of the 62 letters and digits never follows, the
/// candidate extended by it occurs nowhere, since every occurrence of the longer string is an
/// occurrence of the candidate followed by that character. If all 62 follow, the candidate
/// occurs at least 62 times, and extending it by the least frequent follower keeps at most a
/// 62nd of the occurrences. So each round either ends or divides the occurrences by 62.
fn boundary(base: &str, texts: &[&[u8]]) -> String {
    const EXTENSIONS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut candidate = base.to_string();
    loop {
        let mut found = false;
        let mut followers = [0usize; 256];
        for text in texts {
            for at in occurrences(text, candidate.as_bytes()) {
                found = true;
                if let Some(&next) = text.get(at + candidate.len()) {
                    followers[usize::from(next)] += 1;
                }
            }
        }
        if !found {
            debug_assert!(candidate.len() <= MAX_BOUNDARY);
            return candidate;
        }
        let least = EXTENSIONS
            .iter()
            .min_by_key(|&&c| followers[usize::from(c)])
            .expect("the extension alphabet is not empty");
        candidate.push(char::from(*least));
    }
}

/// Start offsets of every occurrence of `needle` in `haystack`, overlapping ones included.
fn occurrences<'a>(haystack: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    haystack.windows(needle.len()).enumerate().filter(move |(_, w)| *w == needle).map(|(i, _)| i)
}

/// The first part: what happened, in words.
fn explanation(report: &Report, kind: Kind, global: bool, returned_note: &str) -> String {
    let mut text = String::with_capacity(1024);
    push_wrapped(
        &mut text,
        "",
        &format!("This is the mail delivery system at {}.", report.reporting_mta),
    );
    text.push_str("\r\n");
    push_wrapped(&mut text, "", intro(kind));
    for recipient in &report.recipients {
        text.push_str("\r\n");
        recipient_explanation(&mut text, recipient, global);
    }
    text.push_str("\r\n");
    push_wrapped(&mut text, "", returned_note);
    text
}

fn intro(kind: Kind) -> &'static str {
    match kind {
        Kind::Failure => {
            "Your message could not be delivered to one or more of its recipients. The \
             recipients and the reasons are listed below."
        }
        Kind::Delay => {
            "Your message has not been delivered yet to the recipients listed below. This is \
             only a warning: delivery is still being retried, and you do not need to send the \
             message again. You will be told if delivery fails for good."
        }
        Kind::Success => "Your message was delivered to the recipients listed below.",
        Kind::Relayed => {
            "Your message was passed on to the recipients listed below, through a system that \
             does not confirm delivery. Unless delivery fails later, this is the last notice \
             about them."
        }
    }
}

fn recipient_explanation(text: &mut String, recipient: &RecipientReport, global: bool) {
    let what = match recipient.action {
        Action::Failed => "could not be delivered, no further attempts",
        Action::Delayed => "not delivered yet, still trying",
        Action::Delivered => "delivered",
        Action::Relayed => "relayed to a system that does not confirm delivery",
        Action::Expanded => "delivered to an alias and forwarded to its members",
    };
    let address = clean(&recipient.final_recipient, global);
    push_wrapped(text, "", &format!("<{address}>: {what} (status {})", recipient.status));
    if let Some(original) = &recipient.original_recipient
        && original.address != recipient.final_recipient
    {
        let original = clean(&original.address, global);
        push_wrapped(text, "    ", &format!("originally addressed to {original}"));
    }
    if let Some(diagnostic) = &recipient.diagnostic {
        let (intro, reply) = match (diagnostic, &recipient.remote_mta) {
            (Diagnostic::Smtp(reply), Some(mta)) => {
                (format!("The server {} replied:", clean_word(mta, global)), reply)
            }
            (Diagnostic::Smtp(reply), None) => ("The reply was:".to_string(), reply),
            (Diagnostic::Local(reason), _) => ("Reason:".to_string(), reason),
        };
        push_wrapped(text, "    ", &intro);
        for line in clean_lines(reply, global).split('\n') {
            push_wrapped(text, "        ", line);
        }
    }
    if let Some(until) = recipient.will_retry_until {
        push_wrapped(text, "    ", &format!("Delivery will be retried until {}.", date(until)));
    }
}

/// The second part: the RFC 3464 fields, or the RFC 6533 ones for a global notice.
fn delivery_status(report: &Report, global: bool) -> String {
    let original = &report.original;
    let mut status = String::with_capacity(512);
    if let Some(envid) = &original.envid {
        // RFC 3461 section 6.3 (a): "if an ENVID parameter was present on the MAIL command,
        // an Original-Envelope-ID field MUST be supplied"; RFC 3464 section 2.2.1: "The DSN
        // MUST preserve the original case and spelling of the envelope-id."
        push_field(&mut status, "Original-Envelope-Id", &clean(envid, global));
    }
    // RFC 3461 section 6.3 (b): "If Reporting MTA can determine its fully-qualified Internet
    // domain name, the MTA-name-type subfield MUST be "dns"".
    push_field(&mut status, "Reporting-MTA", &format!("dns; {}", report.reporting_mta));
    if let Some(from) = &original.received_from {
        // RFC 3464 section 2.2.4: the HELO name, "and the network address used by the SMTP
        // client SHOULD be included as a comment enclosed in parentheses".
        let helo = clean_word(&from.helo, global);
        push_field(&mut status, "Received-From-MTA", &format!("dns; {helo} ({})", from.ip));
    }
    push_field(&mut status, "Arrival-Date", &date(original.arrival_date));
    for recipient in &report.recipients {
        status.push_str("\r\n");
        recipient_fields(&mut status, recipient, global);
    }
    status
}

fn recipient_fields(status: &mut String, recipient: &RecipientReport, global: bool) {
    if let Some(original) = &recipient.original_recipient {
        // RFC 3464 section 2.1.2: `address-type = atom`. A type that is not one cannot be
        // written as it is; "unknown" is the type RFC 3464 section 2.3.1 offers for that.
        let addr_type =
            if !original.addr_type.is_empty() && original.addr_type.bytes().all(is_atext) {
                original.addr_type.as_str()
            } else {
                "unknown"
            };
        let address = if global && addr_type.eq_ignore_ascii_case("utf-8") {
            // RFC 6533 section 3: the xtext form "SHOULD be converted to the utf-8-address
            // form" in message/global-delivery-status.
            decode_unitext(&original.address)
        } else {
            original.address.clone()
        };
        push_field(
            status,
            "Original-Recipient",
            &format!("{addr_type}; {}", clean(&address, global)),
        );
    }
    // RFC 3464 section 2.3.2: the reporting MTA "MUST report exactly the address received in
    // the envelope, unless that address contains characters such as CR or LF which are not
    // allowed in a DSN field". RFC 6533 section 4.1: use the utf-8 type for addresses
    // "containing characters outside the ASCII repertoire".
    let final_type = if recipient.final_recipient.is_ascii() { "rfc822" } else { "utf-8" };
    push_field(
        status,
        "Final-Recipient",
        &format!("{final_type}; {}", clean(&recipient.final_recipient, global)),
    );
    push_field(status, "Action", recipient.action.as_str());
    push_field(status, "Status", &recipient.status.to_string());
    if let Some(mta) = &recipient.remote_mta {
        push_field(status, "Remote-MTA", &format!("dns; {}", clean_word(mta, global)));
    }
    if let Some(diagnostic) = &recipient.diagnostic {
        let (diagnostic_type, text) = match diagnostic {
            Diagnostic::Smtp(reply) => ("smtp", reply),
            Diagnostic::Local(reason) => ("X-Postilion", reason),
        };
        push_field(
            status,
            "Diagnostic-Code",
            &format!("{diagnostic_type}; {}", clean_lines(text, global)),
        );
    }
    if let Some(attempt) = recipient.last_attempt {
        push_field(status, "Last-Attempt-Date", &date(attempt));
    }
    if let Some(until) = recipient.will_retry_until {
        push_field(status, "Will-Retry-Until", &date(until));
    }
}

/// Undoes the `\x{HEXPOINT}` escapes of an RFC 6533 utf-8 address. RFC 6533 section 3: "if an
/// address is labeled with the UTF-8 address type but does not conform to utf-8 syntax, then
/// it MUST be copied into the message/global-delivery-status field without alteration", so
/// any malformed escape returns the address unchanged.
fn decode_unitext(address: &str) -> String {
    let mut decoded = String::with_capacity(address.len());
    let mut rest = address;
    while let Some(at) = rest.find('\\') {
        decoded.push_str(&rest[..at]);
        let escape = &rest[at..];
        let Some(hex) = escape.strip_prefix("\\x{").and_then(|e| e.split_once('}')) else {
            return address.to_string();
        };
        let (digits, after) = hex;
        let code = (2..=6)
            .contains(&digits.len())
            .then(|| u32::from_str_radix(digits, 16).ok())
            .flatten()
            .and_then(char::from_u32);
        let Some(c) = code else { return address.to_string() };
        decoded.push(c);
        rest = after;
    }
    decoded.push_str(rest);
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_section_ends_before_the_empty_line() {
        assert_eq!(header_section(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"), b"A: 1\r\nB: 2\r\n");
        assert_eq!(header_section(b"A: 1\r\n"), b"A: 1\r\n");
        assert_eq!(header_section(b"A: 1"), b"A: 1");
        assert_eq!(header_section(b"\r\nbody"), b"");
        assert_eq!(header_section(b"A: 1\n\nbody"), b"A: 1\n");
        assert_eq!(header_section(b""), b"");
    }

    #[test]
    fn eight_bit_data_rules() {
        assert!(is_8bit_data(b"a\r\nb\xc3\xa9\r\n"));
        assert!(is_8bit_data(b"no final line ending"));
        assert!(is_8bit_data(b""));
        assert!(!is_8bit_data(b"bare\nlf\r\n"));
        assert!(!is_8bit_data(b"\nleading lf"));
        assert!(!is_8bit_data(b"bare\rcr\r\n"));
        assert!(!is_8bit_data(b"trailing cr\r"));
        assert!(!is_8bit_data(b"nul\0\r\n"));
        let mut line = vec![b'x'; 998];
        line.extend_from_slice(b"\r\n");
        assert!(is_8bit_data(&line));
        line.insert(0, b'x');
        assert!(!is_8bit_data(&line));
    }

    #[test]
    fn boundary_avoids_every_occurrence() {
        let base = "=_dsn.X";
        assert_eq!(boundary(base, &[b"nothing here"]), base);
        // The base followed by every letter and digit but one: that one extends it.
        let mut text = Vec::new();
        for &c in b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxy" {
            text.extend_from_slice(base.as_bytes());
            text.push(c);
            text.extend_from_slice(b"\r\n");
        }
        assert_eq!(boundary(base, &[&text]), "=_dsn.Xz");
        // All 62 followers: two rounds, and the result occurs in no text.
        text.extend_from_slice(b"--=_dsn.Xz\r\n");
        let found = boundary(base, &[b"unrelated", &text]);
        assert_eq!(found.len(), base.len() + 2);
        assert!(occurrences(&text, found.as_bytes()).next().is_none());
        // An occurrence at the very end of a text has no follower and still counts.
        assert_ne!(boundary(base, &[base.as_bytes()]), base);
    }

    #[test]
    fn boundary_base_is_safe_and_bounded() {
        assert_eq!(boundary_base("0ABC.1{x}"), "=_dsn.0ABC.1x");
        assert_eq!(boundary_base(&"a".repeat(200)).len(), BOUNDARY_BASE);
    }

    #[test]
    fn host_names_and_message_ids() {
        assert!(is_host_name("mx.example.org"));
        assert!(is_host_name("[192.0.2.1]"));
        assert!(is_host_name("[IPv6:2001:db8::1]"));
        assert!(!is_host_name(""));
        assert!(!is_host_name("mx..example"));
        assert!(!is_host_name("mx.example.org\r\nBcc: x"));
        assert!(!is_host_name("bücher.example"));
        assert!(!is_host_name("[]"));
        assert!(is_dot_atom("0ABCDEF123456.dsn"));
        assert!(!is_dot_atom("a..b"));
        assert!(!is_dot_atom("a b"));
        assert!(!is_dot_atom(""));
    }

    #[test]
    fn unitext_decoding() {
        assert_eq!(decode_unitext("j\\x{F6}rg@b\\x{FC}cher.example"), "jörg@bücher.example");
        assert_eq!(decode_unitext("plain@example.org"), "plain@example.org");
        assert_eq!(decode_unitext("a\\x{2B}b@x"), "a+b@x");
        // Malformed: copied unchanged.
        assert_eq!(decode_unitext("a\\x{D800}b@x"), "a\\x{D800}b@x");
        assert_eq!(decode_unitext("a\\x{1}b@x"), "a\\x{1}b@x");
        assert_eq!(decode_unitext("a\\b@x"), "a\\b@x");
        assert_eq!(decode_unitext("a\\x{F6@x"), "a\\x{F6@x");
    }
}

//! Whether a notice is due: the NOTIFY rules of RFC 3461 and the loop rules of RFC 5321 and
//! RFC 3834. Pure functions, for the queue manager.

use smtp_proto::Notify;

use crate::Kind;

/// Whether a notice of `kind` is due for one recipient, given its NOTIFY parameter.
///
/// * Never to a null sender. RFC 3461 section 5.2: "A DSN MUST NOT be returned to the sender
///   for any message for which the return address from the SMTP MAIL command was NULL ("<>"),
///   even if the sender's address is available from other sources (e.g., the message
///   header)." Notices themselves go out with a null sender, so this is also what keeps a
///   notice that cannot be delivered from producing another notice (RFC 5321 section 3.6.3:
///   "SMTP servers MUST NOT send notification messages about problems transporting
///   notification messages"). The postmaster may still be told through the log.
/// * NOTIFY=NEVER (all three keywords false) suppresses every notice.
/// * With NOTIFY, each kind needs its keyword: FAILURE for failures (RFC 3461 section 5.2.6),
///   DELAY for delay warnings (section 5.2.5 (c): "If the NOTIFY parameter was supplied which
///   did not contain the DELAY keyword, a "delayed" DSN MUST NOT be issued"), SUCCESS for
///   delivered, expanded and relayed notices (sections 5.2.3, 5.2.7.3 and 5.2.2 (b)).
/// * Without NOTIFY: failures are always reported (section 5.2.6 (c): "If no NOTIFY parameter
///   was supplied for the recipient, a "failed" DSN MUST be issued"); success and relay never
///   (section 5.2.3 (c): "the MTA MUST NOT issue a DSN", section 5.2.2 (e)); delay warnings
///   only when `delay_by_default` is set. Section 4.1 allows reading a missing NOTIFY as
///   "either NOTIFY=FAILURE or NOTIFY=FAILURE,DELAY"; like Postfix, the server sends
///   unrequested delay warnings only when configured to.
pub fn should_notify(
    kind: Kind,
    notify: Option<Notify>,
    sender_is_null: bool,
    delay_by_default: bool,
) -> bool {
    if sender_is_null {
        return false;
    }
    match (kind, notify) {
        (Kind::Failure, Some(notify)) => notify.failure,
        (Kind::Delay, Some(notify)) => notify.delay,
        (Kind::Success | Kind::Relayed, Some(notify)) => notify.success,
        (Kind::Failure, None) => true,
        (Kind::Delay, None) => delay_by_default,
        (Kind::Success | Kind::Relayed, None) => false,
    }
}

/// True when the message (its header section is enough) is itself a report or an automatic
/// reply: its top-level Content-Type is `multipart/report` (a DSN, an MDN, an abuse report),
/// or it has `Auto-Submitted: auto-replied` (RFC 3834 section 5.2).
///
/// Notices from conforming systems have a null sender, and [`should_notify`] already refuses
/// those. This catches the ones sent with a real reverse-path, so that the queue manager can
/// log a failure to deliver them instead of answering with another notice (RFC 5321 section
/// 3.6.3 forbids notices about notices; RFC 3834 section 2: "Automatic responses SHOULD NOT
/// be issued in response to any message which contains an Auto-Submitted header field ...
/// where that field has any value other than "no""). `Auto-Submitted: auto-generated` is not
/// matched: that marks mail from periodic jobs, whose senders do want to hear about failures.
pub fn is_notification(content: &[u8]) -> bool {
    header_fields(content).any(|(name, value)| {
        let keyword = first_token(&value);
        (name.eq_ignore_ascii_case(b"content-type")
            && keyword.eq_ignore_ascii_case(b"multipart/report"))
            || (name.eq_ignore_ascii_case(b"auto-submitted")
                && keyword.eq_ignore_ascii_case(b"auto-replied"))
    })
}

/// The fields of the header section as (name, unfolded value), up to the first empty line.
/// Lines without a colon are skipped; lines starting with white space continue a field
/// (RFC 5322 section 2.2.3).
fn header_fields(content: &[u8]) -> impl Iterator<Item = (&[u8], Vec<u8>)> {
    let mut lines = content
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .take_while(|line| !line.is_empty())
        .peekable();
    std::iter::from_fn(move || {
        loop {
            let line = lines.next()?;
            let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
            if line[0] == b' ' || line[0] == b'\t' {
                continue;
            }
            let mut value = line[colon + 1..].to_vec();
            while let Some(next) = lines.next_if(|l| l[0] == b' ' || l[0] == b'\t') {
                value.extend_from_slice(next);
            }
            return Some((line[..colon].trim_ascii_end(), value));
        }
    })
}

/// The first token of a structured field value: after white space and comments, up to white
/// space, `;` or `(`. `Content-Type: (why) multipart/report; ...` gives `multipart/report`.
fn first_token(value: &[u8]) -> &[u8] {
    let mut i = 0;
    let mut depth = 0usize;
    while i < value.len() {
        match value[i] {
            b'\\' if depth > 0 => i += 1,
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b' ' | b'\t' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        i += 1;
    }
    let rest = &value[i.min(value.len())..];
    let end =
        rest.iter().position(|&b| matches!(b, b' ' | b'\t' | b';' | b'(')).unwrap_or(rest.len());
    &rest[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEVER: Notify = Notify::NEVER;
    const FAILURE: Notify = Notify { success: false, failure: true, delay: false };
    const DELAY: Notify = Notify { success: false, failure: false, delay: true };
    const SUCCESS: Notify = Notify { success: true, failure: false, delay: false };
    const ALL: Notify = Notify { success: true, failure: true, delay: true };

    #[test]
    fn should_notify_table() {
        use Kind::*;
        // (kind, notify, delay_by_default, expected) for a non-null sender.
        let table = [
            (Failure, None, false, true),
            (Failure, None, true, true),
            (Delay, None, false, false),
            (Delay, None, true, true),
            (Success, None, true, false),
            (Relayed, None, true, false),
            (Failure, Some(NEVER), true, false),
            (Delay, Some(NEVER), true, false),
            (Success, Some(NEVER), true, false),
            (Relayed, Some(NEVER), true, false),
            (Failure, Some(FAILURE), false, true),
            (Delay, Some(FAILURE), true, false),
            (Success, Some(FAILURE), false, false),
            (Relayed, Some(FAILURE), false, false),
            (Failure, Some(DELAY), false, false),
            (Delay, Some(DELAY), false, true),
            (Success, Some(DELAY), false, false),
            (Failure, Some(SUCCESS), false, false),
            (Delay, Some(SUCCESS), true, false),
            (Success, Some(SUCCESS), false, true),
            (Relayed, Some(SUCCESS), false, true),
            (Failure, Some(ALL), false, true),
            (Delay, Some(ALL), false, true),
            (Success, Some(ALL), false, true),
            (Relayed, Some(ALL), false, true),
        ];
        for (kind, notify, delay_by_default, expected) in table {
            assert_eq!(
                should_notify(kind, notify, false, delay_by_default),
                expected,
                "{kind} {notify:?} delay_by_default={delay_by_default}"
            );
        }
    }

    #[test]
    fn never_to_the_null_sender() {
        for kind in [Kind::Failure, Kind::Delay, Kind::Success, Kind::Relayed] {
            for notify in [None, Some(NEVER), Some(FAILURE), Some(DELAY), Some(SUCCESS), Some(ALL)]
            {
                assert!(!should_notify(kind, notify, true, true), "{kind} {notify:?}");
            }
        }
    }

    #[test]
    fn recognises_reports_and_auto_replies() {
        assert!(is_notification(
            b"From: x\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n\
              \tboundary=b\r\n\r\nbody"
        ));
        assert!(is_notification(b"CONTENT-TYPE: (c) Multipart/Report;x=y\n\nbody"));
        assert!(is_notification(b"Subject: away\r\nAuto-Submitted:\r\n auto-replied\r\n\r\n"));
        assert!(is_notification(b"Auto-Submitted: auto-replied; owner-email=x@y\r\n\r\n"));
        assert!(!is_notification(b"Auto-Submitted: no\r\n\r\n"));
        assert!(!is_notification(b"Auto-Submitted: auto-generated\r\n\r\n"));
        assert!(!is_notification(b"Content-Type: multipart/mixed; boundary=x\r\n\r\n"));
        assert!(!is_notification(b"Content-Type: multipart/reports\r\n\r\n"));
        // Only the header section counts.
        assert!(!is_notification(b"Subject: s\r\n\r\nContent-Type: multipart/report\r\n"));
        assert!(!is_notification(b""));
        assert!(!is_notification(b"no colon here\r\n (comment only\r\n"));
    }

    #[test]
    fn first_token_skips_comments() {
        assert_eq!(first_token(b"  (a (nested\\) one) b) text/plain; x"), b"text/plain");
        assert_eq!(first_token(b" auto-replied(why)"), b"auto-replied");
        assert_eq!(first_token(b"(unterminated"), b"");
        assert_eq!(first_token(b""), b"");
    }
}

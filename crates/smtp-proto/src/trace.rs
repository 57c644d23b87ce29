//! Trace information (RFC 5321 section 4.4): building the Received header and counting the
//! ones a message already has, for loop detection (RFC 5321 section 6.3).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// The facts a Received header records about the hop that delivered a message to us.
#[derive(Debug, Clone)]
pub struct ReceivedFacts<'a> {
    /// The name the client gave in EHLO/HELO.
    pub helo: &'a str,
    pub client_ip: IpAddr,
    /// The client's name from reverse DNS, when verified.
    pub client_name: Option<&'a str>,
    /// Our host name.
    pub by: &'a str,
    pub esmtp: bool,
    /// TLS protocol version and cipher suite, e.g. `("TLSv1.3", "TLS13_AES_256_GCM_SHA384")`.
    pub tls: Option<(&'a str, &'a str)>,
    pub authenticated: bool,
    pub smtputf8: bool,
    pub queue_id: &'a str,
    /// The recipient, named only when the message has exactly one (RFC 5321 section 7.2
    /// warns that listing several discloses blind copies).
    pub single_recipient: Option<&'a str>,
    /// Seconds since the Unix epoch.
    pub unix_time: i64,
}

/// The `with` protocol keyword of RFC 3848 (and RFC 6531 section 3.7.3 for UTF8SMTP).
pub fn protocol_keyword(
    esmtp: bool,
    tls: bool,
    authenticated: bool,
    smtputf8: bool,
) -> &'static str {
    match (esmtp, smtputf8, tls, authenticated) {
        (false, _, _, _) => "SMTP",
        (true, false, false, false) => "ESMTP",
        (true, false, true, false) => "ESMTPS",
        (true, false, false, true) => "ESMTPA",
        (true, false, true, true) => "ESMTPSA",
        (true, true, false, false) => "UTF8SMTP",
        (true, true, true, false) => "UTF8SMTPS",
        (true, true, false, true) => "UTF8SMTPA",
        (true, true, true, true) => "UTF8SMTPSA",
    }
}

/// Builds the Received header field, folded, ending with CRLF.
///
/// Untrusted values (the EHLO name, the recipient) are passed through [`sanitize`], so that no
/// client can inject a line or a second header field here.
pub fn received_header(facts: &ReceivedFacts<'_>) -> String {
    let mut header = String::with_capacity(256);
    // RFC 5321 section 4.4: the From part is an Extended-Domain, which may be an address
    // literal; its brackets are kept when what is inside is an address.
    let helo = match facts.helo.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) if is_literal_address(inner) => format!("[{inner}]"),
        _ => sanitize(facts.helo),
    };
    let ip = match facts.client_ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("IPv6:{ip}"),
    };
    let client_name = facts.client_name.map(sanitize).unwrap_or_else(|| "unknown".to_string());
    let _ = write!(header, "Received: from {helo} ({client_name} [{ip}])\r\n\tby {}", facts.by);
    if let Some((version, cipher)) = facts.tls {
        let _ =
            write!(header, "\r\n\t(using {} with cipher {})", sanitize(version), sanitize(cipher));
    }
    let keyword =
        protocol_keyword(facts.esmtp, facts.tls.is_some(), facts.authenticated, facts.smtputf8);
    let _ = write!(header, "\r\n\twith {keyword} id {}", facts.queue_id);
    if let Some(rcpt) = facts.single_recipient {
        let _ = write!(header, "\r\n\tfor <{}>", sanitize(rcpt));
    }
    let _ = write!(header, ";\r\n\t{}\r\n", rfc5322_date(facts.unix_time));
    header
}

/// `192.0.2.1` or `IPv6:2001:db8::1`, the inside of an address literal.
fn is_literal_address(inner: &str) -> bool {
    match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
            inner[5..].parse::<std::net::Ipv6Addr>().is_ok()
        }
        _ => inner.parse::<std::net::Ipv4Addr>().is_ok(),
    }
}

/// Replaces characters that must not reach a header field: controls (CR, LF, NUL...), and
/// the parentheses and brackets that would change the meaning of the trace comment.
pub fn sanitize(value: &str) -> String {
    value
        .chars()
        .take(255)
        .map(|c| {
            if c.is_control() || matches!(c, '(' | ')' | '[' | ']' | '<' | '>' | ';') {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// [`rfc5322_date`] of a point in time, to the second (rounded down, also before 1970).
pub fn rfc5322_date_at(time: SystemTime) -> String {
    let seconds = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => {
            let before = before.duration();
            let whole = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            // Round down, so that 0.5 s before the epoch is still in 1969.
            -whole - i64::from(before.subsec_nanos() > 0)
        }
    };
    rfc5322_date(seconds)
}

/// An RFC 5322 section 3.3 date-time in UTC, e.g. `Sun, 22 Nov 2026 22:32:05 +0000`.
pub fn rfc5322_date(unix_time: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = unix_time.div_euclid(86_400);
    let secs = unix_time.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day), using the
/// 400-year era decomposition.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Counts the `Received:` fields in the header section of a message (up to the first empty
/// line). Header names are case-insensitive (RFC 5322 section 1.2.2).
pub fn count_received_headers(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(rfc5322_date(1_795_386_725), "Sun, 22 Nov 2026 22:32:05 +0000");
        assert_eq!(rfc5322_date(4_107_542_399), "Sun, 28 Feb 2100 23:59:59 +0000");
        assert_eq!(rfc5322_date(4_133_980_799), "Fri, 31 Dec 2100 23:59:59 +0000");
        assert_eq!(rfc5322_date(-1), "Wed, 31 Dec 1969 23:59:59 +0000");
    }

    #[test]
    fn dates_of_points_in_time_round_down_also_before_the_epoch() {
        use std::time::Duration;
        assert_eq!(rfc5322_date_at(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date_at(UNIX_EPOCH - Duration::from_millis(500)),
            "Wed, 31 Dec 1969 23:59:59 +0000"
        );
        assert_eq!(
            rfc5322_date_at(UNIX_EPOCH + Duration::from_millis(1_795_386_725_900)),
            "Sun, 22 Nov 2026 22:32:05 +0000"
        );
    }

    #[test]
    fn keywords() {
        assert_eq!(protocol_keyword(false, true, true, true), "SMTP");
        assert_eq!(protocol_keyword(true, false, false, false), "ESMTP");
        assert_eq!(protocol_keyword(true, true, false, false), "ESMTPS");
        assert_eq!(protocol_keyword(true, true, true, false), "ESMTPSA");
        assert_eq!(protocol_keyword(true, true, true, true), "UTF8SMTPSA");
        assert_eq!(protocol_keyword(true, true, false, true), "UTF8SMTPS");
    }

    #[test]
    fn received_header_has_every_fact_and_no_injection() {
        let facts = ReceivedFacts {
            helo: "evil\r\nX-Injected: yes",
            client_ip: "192.0.2.7".parse().unwrap(),
            client_name: None,
            by: "mx.example.org",
            esmtp: true,
            tls: Some(("TLSv1.3", "TLS13_AES_128_GCM_SHA256")),
            authenticated: false,
            smtputf8: false,
            queue_id: "0ABCDEF123456",
            single_recipient: Some("bob@example.org"),
            unix_time: 0,
        };
        let header = received_header(&facts);
        assert_eq!(
            header,
            "Received: from evil??X-Injected: yes (unknown [192.0.2.7])\r\n\
             \tby mx.example.org\r\n\
             \t(using TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256)\r\n\
             \twith ESMTPS id 0ABCDEF123456\r\n\
             \tfor <bob@example.org>;\r\n\
             \tThu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
        // Every line after the first is a continuation: one header field.
        assert!(header.split("\r\n").skip(1).all(|l| l.is_empty() || l.starts_with('\t')));
        assert_eq!(count_received_headers(header.as_bytes()), 1);
    }

    #[test]
    fn address_literal_helo_keeps_its_brackets() {
        let header = |helo| {
            received_header(&ReceivedFacts {
                helo,
                client_ip: "192.0.2.7".parse().unwrap(),
                client_name: None,
                by: "b",
                esmtp: true,
                tls: None,
                authenticated: true,
                smtputf8: false,
                queue_id: "Q",
                single_recipient: None,
                unix_time: 0,
            })
        };
        assert!(header("[192.0.2.7]").starts_with("Received: from [192.0.2.7] (unknown"));
        assert!(header("[IPv6:2001:db8::1]").starts_with("Received: from [IPv6:2001:db8::1] ("));
        assert!(header("[1.2.3.4] (x)").starts_with("Received: from ?1.2.3.4? ?x? ("));
        assert!(header("[not an address]").starts_with("Received: from ?not an address? ("));
        assert!(header("[1.2.3.4]").contains("with ESMTPA id Q"));
    }

    #[test]
    fn ipv6_client_literal() {
        let facts = ReceivedFacts {
            helo: "h",
            client_ip: "::1".parse().unwrap(),
            client_name: None,
            by: "b",
            esmtp: false,
            tls: None,
            authenticated: false,
            smtputf8: false,
            queue_id: "Q",
            single_recipient: None,
            unix_time: 0,
        };
        assert!(
            received_header(&facts).starts_with(
                "Received: from h (unknown [IPv6:::1])\r\n\tby b\r\n\twith SMTP id Q;"
            )
        );
    }

    #[test]
    fn counts_received_in_header_section_only() {
        let message = b"Received: a\r\nreceived: b\r\n\tcontinued\r\nRECEIVED:c\r\nX-Received: no\r\nSubject: s\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received_headers(message), 3);
        assert_eq!(count_received_headers(b"\r\nReceived: x\r\n"), 0);
        assert_eq!(count_received_headers(b"Received: x\nReceived: y\n\n"), 2);
    }
}

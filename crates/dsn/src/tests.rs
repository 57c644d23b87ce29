//! Notices built through the public API and parsed back with mail-parser.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders, PartType};

use crate::*;

const ORIGINAL: &[u8] =
    b"Received: from client.example.com by mx.example.org; Sun, 22 Nov 2026 00:00:00 +0000\r\n\
From: Alice <alice@example.com>\r\n\
To: bob@example.org\r\n\
Subject: Hello\r\n\
Message-ID: <m1@example.com>\r\n\
\r\n\
Hi Bob,\r\n\
\r\n\
see you.\r\n";

const ORIGINAL_HEADER: &[u8] =
    b"Received: from client.example.com by mx.example.org; Sun, 22 Nov 2026 00:00:00 +0000\r\n\
From: Alice <alice@example.com>\r\n\
To: bob@example.org\r\n\
Subject: Hello\r\n\
Message-ID: <m1@example.com>\r\n";

/// The first boundary tried for [`report`]'s Message-ID.
const FIRST_BOUNDARY: &str = "=_dsn.0ABCDEF123456.dsn";

fn at(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

fn report(recipients: Vec<RecipientReport>) -> Report {
    Report {
        reporting_mta: "mx.example.org".to_string(),
        date: at(1_795_386_725),
        message_id: "0ABCDEF123456.dsn".to_string(),
        return_size_limit: DEFAULT_RETURN_SIZE_LIMIT,
        original: OriginalEnvelope {
            sender: "alice@example.com".to_string(),
            envid: Some("QQ314159".to_string()),
            ret: None,
            smtputf8: false,
            arrival_date: at(1_795_300_000),
            received_from: Some(ReceivedFrom {
                helo: "client.example.com".to_string(),
                ip: "192.0.2.7".parse().unwrap(),
            }),
        },
        recipients,
    }
}

fn failed_bob() -> RecipientReport {
    RecipientReport {
        original_recipient: Some(OriginalRecipient {
            addr_type: "rfc822".to_string(),
            address: "Bob@example.org".to_string(),
        }),
        remote_mta: Some("mx.example.net".to_string()),
        diagnostic: Some(Diagnostic::Smtp("550 5.1.1 No such user".to_string())),
        last_attempt: Some(at(1_795_386_700)),
        ..RecipientReport::new("bob@example.org", Action::Failed, EnhancedStatus(5, 1, 1))
    }
}

fn delayed_carol() -> RecipientReport {
    RecipientReport {
        remote_mta: Some("mx.example.net".to_string()),
        diagnostic: Some(Diagnostic::Smtp("451 4.3.0 Try again later".to_string())),
        last_attempt: Some(at(1_795_386_700)),
        will_retry_until: Some(at(1_795_732_300)),
        ..RecipientReport::new("carol@example.org", Action::Delayed, EnhancedStatus(4, 3, 0))
    }
}

/// Every line ends with CRLF and has at most 998 octets; with `seven_bit`, every octet is
/// ASCII.
fn assert_wire(bytes: &[u8], seven_bit: bool) {
    assert!(bytes.ends_with(b"\r\n"));
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if i == bytes.split(|&b| b == b'\n').count() - 1 {
            assert!(line.is_empty());
            continue;
        }
        let line = line.strip_suffix(b"\r").expect("LF without CR");
        assert!(!line.contains(&b'\r'), "bare CR in line {i}");
        assert!(line.len() <= 998, "line {i} has {} octets", line.len());
    }
    if seven_bit {
        assert!(bytes.is_ascii(), "8-bit octet in a 7-bit notice");
    }
}

fn parse(notice: &Notification) -> Message<'_> {
    MessageParser::default().parse(&notice.message).expect("the notice parses")
}

/// The `type/subtype` of a part, lower case.
fn mime_type(part: &MessagePart<'_>) -> String {
    let ct = part.content_type().expect("every part has a Content-Type");
    format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or("")).to_ascii_lowercase()
}

/// The top-level parts of a notice, after checking the container.
fn report_parts<'a>(message: &'a Message<'a>) -> Vec<&'a MessagePart<'a>> {
    let root = message.root_part();
    assert_eq!(mime_type(root), "multipart/report");
    let ct = root.content_type().unwrap();
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let PartType::Multipart(ids) = &root.body else { panic!("the root is not multipart") };
    ids.iter().map(|&id| &message.parts[id as usize]).collect()
}

/// The raw body of a part: from after its header to before the CRLF of the next delimiter.
fn raw_body<'a>(message: &'a Message<'a>, part: &MessagePart<'_>) -> &'a [u8] {
    &message.raw_message()[part.offset_body as usize..part.offset_end as usize]
}

/// The groups of a delivery-status body as (name, unfolded value) lists, each group parsed
/// by mail-parser as a header section.
fn status_groups(body: &[u8]) -> Vec<Vec<(String, String)>> {
    let text = std::str::from_utf8(body).expect("delivery-status is UTF-8");
    assert!(text.ends_with("\r\n"));
    text.split("\r\n\r\n")
        .map(|group| {
            let group = format!("{}\r\n\r\n", group.trim_end_matches("\r\n"));
            let parsed = MessageParser::default().parse_headers(group.as_bytes()).unwrap();
            parsed
                .headers_raw()
                .map(|(name, value)| {
                    (name.to_string(), value.replace("\r\n", "").trim().to_string())
                })
                .collect()
        })
        .collect()
}

fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

fn text_of<'a>(part: &'a MessagePart<'a>) -> &'a str {
    match &part.body {
        PartType::Text(text) => text,
        other => panic!("not a text part: {other:?}"),
    }
}

/// Explanation text with line breaks and indents made single spaces, for matching phrases
/// that wrapping may have split.
fn prose(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn header<'a>(message: &'a Message<'a>, name: &'a str) -> &'a str {
    message.header_raw(name).unwrap_or_else(|| panic!("no {name} field")).trim()
}

#[test]
fn failure_returns_the_whole_message() {
    let notice = report(vec![failed_bob()]).build(ORIGINAL).unwrap();
    assert_eq!(notice.kind, Kind::Failure);
    assert_eq!(notice.returned, Returned::Full);
    assert_eq!(notice.body, BodyType::SevenBit);
    assert!(!notice.smtputf8);
    assert_wire(&notice.message, true);
    assert!(is_notification(&notice.message));

    let message = parse(&notice);
    assert_eq!(header(&message, "From"), "Mail Delivery System <MAILER-DAEMON@mx.example.org>");
    assert_eq!(header(&message, "To"), "<alice@example.com>");
    assert_eq!(message.subject(), Some("Undelivered Mail Returned to Sender"));
    assert_eq!(header(&message, "Date"), "Sun, 22 Nov 2026 22:32:05 +0000");
    assert_eq!(message.message_id(), Some("0ABCDEF123456.dsn@mx.example.org"));
    assert_eq!(header(&message, "Auto-Submitted"), "auto-replied");
    assert_eq!(header(&message, "MIME-Version"), "1.0");
    let boundary = message.root_part().content_type().unwrap().attribute("boundary").unwrap();
    assert_eq!(boundary, FIRST_BOUNDARY);

    let parts = report_parts(&message);
    assert_eq!(parts.len(), 3);
    assert_eq!(mime_type(parts[0]), "text/plain");
    assert_eq!(parts[0].content_type().unwrap().attribute("charset"), Some("us-ascii"));
    let text = text_of(parts[0]);
    assert!(
        prose(text).contains(
            "<bob@example.org>: could not be delivered, no further attempts (status 5.1.1)"
        ),
        "{text}"
    );
    assert!(text.contains("originally addressed to Bob@example.org"), "{text}");
    assert!(text.contains("The server mx.example.net replied:\r\n        550 5.1.1 No such user"));
    assert!(text.contains("Your message is attached below."));

    assert_eq!(mime_type(parts[1]), "message/delivery-status");
    assert_eq!(parts[1].content_transfer_encoding(), Some("7bit"));
    let groups = status_groups(raw_body(&message, parts[1]));
    assert_eq!(
        groups,
        vec![
            fields(&[
                ("Original-Envelope-Id", "QQ314159"),
                ("Reporting-MTA", "dns; mx.example.org"),
                ("Received-From-MTA", "dns; client.example.com (192.0.2.7)"),
                ("Arrival-Date", "Sat, 21 Nov 2026 22:26:40 +0000"),
            ]),
            fields(&[
                ("Original-Recipient", "rfc822; Bob@example.org"),
                ("Final-Recipient", "rfc822; bob@example.org"),
                ("Action", "failed"),
                ("Status", "5.1.1"),
                ("Remote-MTA", "dns; mx.example.net"),
                ("Diagnostic-Code", "smtp; 550 5.1.1 No such user"),
                ("Last-Attempt-Date", "Sun, 22 Nov 2026 22:31:40 +0000"),
            ]),
        ]
    );

    assert_eq!(mime_type(parts[2]), "message/rfc822");
    assert_eq!(parts[2].content_transfer_encoding(), Some("7bit"));
    assert_eq!(raw_body(&message, parts[2]), ORIGINAL);
    let PartType::Message(returned) = &parts[2].body else { panic!("not a nested message") };
    assert_eq!(returned.subject(), Some("Hello"));
}

#[test]
fn ret_hdrs_returns_only_the_header() {
    let mut report = report(vec![failed_bob()]);
    report.original.ret = Some(Ret::Headers);
    let notice = report.build(ORIGINAL).unwrap();
    assert_eq!(notice.returned, Returned::Headers);
    assert_wire(&notice.message, true);
    let message = parse(&notice);
    let parts = report_parts(&message);
    assert_eq!(mime_type(parts[2]), "text/rfc822-headers");
    assert_eq!(raw_body(&message, parts[2]), ORIGINAL_HEADER);
    assert!(text_of(parts[0]).contains("As you asked, only the header of your message"));
}

#[test]
fn ret_full_returns_the_whole_message() {
    let mut report = report(vec![failed_bob()]);
    report.original.ret = Some(Ret::Full);
    let notice = report.build(ORIGINAL).unwrap();
    assert_eq!(notice.returned, Returned::Full);
    let message = parse(&notice);
    assert_eq!(raw_body(&message, report_parts(&message)[2]), ORIGINAL);
}

#[test]
fn delay_warning() {
    let mut report = report(vec![delayed_carol()]);
    // RET=FULL applies to failures only: a delay warning returns the header.
    report.original.ret = Some(Ret::Full);
    let notice = report.build(ORIGINAL).unwrap();
    assert_eq!(notice.kind, Kind::Delay);
    assert_eq!(notice.returned, Returned::Headers);
    assert_wire(&notice.message, true);
    let message = parse(&notice);
    assert_eq!(message.subject(), Some("Delayed Mail (still being retried)"));
    let parts = report_parts(&message);
    let text = text_of(parts[0]);
    assert!(
        prose(text).contains("<carol@example.org>: not delivered yet, still trying (status 4.3.0)"),
        "{text}"
    );
    assert!(text.contains("Delivery will be retried until Thu, 26 Nov 2026 22:31:40 +0000."));
    assert!(prose(text).contains("you do not need to send the message again"));
    let groups = status_groups(raw_body(&message, parts[1]));
    assert_eq!(
        groups[1],
        fields(&[
            ("Final-Recipient", "rfc822; carol@example.org"),
            ("Action", "delayed"),
            ("Status", "4.3.0"),
            ("Remote-MTA", "dns; mx.example.net"),
            ("Diagnostic-Code", "smtp; 451 4.3.0 Try again later"),
            ("Last-Attempt-Date", "Sun, 22 Nov 2026 22:31:40 +0000"),
            ("Will-Retry-Until", "Thu, 26 Nov 2026 22:31:40 +0000"),
        ])
    );
    assert_eq!(mime_type(parts[2]), "text/rfc822-headers");
    assert_eq!(raw_body(&message, parts[2]), ORIGINAL_HEADER);
}

#[test]
fn success_report_for_delivered_and_expanded_recipients() {
    let delivered = RecipientReport {
        last_attempt: Some(at(1_795_386_700)),
        ..RecipientReport::new("bob@example.org", Action::Delivered, EnhancedStatus(2, 0, 0))
    };
    let expanded = RecipientReport {
        original_recipient: Some(OriginalRecipient {
            addr_type: "rfc822".to_string(),
            address: "team@example.org".to_string(),
        }),
        ..RecipientReport::new("team@example.org", Action::Expanded, EnhancedStatus(2, 0, 0))
    };
    let mut report = report(vec![delivered, expanded]);
    report.original.envid = None;
    report.original.received_from = None;
    let notice = report.build(ORIGINAL).unwrap();
    assert_eq!(notice.kind, Kind::Success);
    assert_eq!(notice.returned, Returned::Headers);
    assert_wire(&notice.message, true);
    let message = parse(&notice);
    assert_eq!(message.subject(), Some("Successful Mail Delivery Report"));
    let parts = report_parts(&message);
    let text = text_of(parts[0]);
    assert!(text.contains("<bob@example.org>: delivered (status 2.0.0)"));
    assert!(text.contains("<team@example.org>: delivered to an alias and forwarded"));
    // The same address as the ORCPT is not repeated as "originally addressed to".
    assert!(!text.contains("originally"));
    let groups = status_groups(raw_body(&message, parts[1]));
    // RFC 3461 section 6.3 (a): without ENVID, no Original-Envelope-Id.
    assert_eq!(
        groups,
        vec![
            fields(&[
                ("Reporting-MTA", "dns; mx.example.org"),
                ("Arrival-Date", "Sat, 21 Nov 2026 22:26:40 +0000"),
            ]),
            fields(&[
                ("Final-Recipient", "rfc822; bob@example.org"),
                ("Action", "delivered"),
                ("Status", "2.0.0"),
                ("Last-Attempt-Date", "Sun, 22 Nov 2026 22:31:40 +0000"),
            ]),
            fields(&[
                ("Original-Recipient", "rfc822; team@example.org"),
                ("Final-Recipient", "rfc822; team@example.org"),
                ("Action", "expanded"),
                ("Status", "2.0.0"),
            ]),
        ]
    );
}

#[test]
fn relayed_report() {
    let relayed = RecipientReport {
        remote_mta: Some("gateway.example.net".to_string()),
        diagnostic: Some(Diagnostic::Smtp("250 2.1.5 Ok".to_string())),
        ..RecipientReport::new("dana@example.net", Action::Relayed, EnhancedStatus(2, 0, 0))
    };
    let notice = report(vec![relayed]).build(ORIGINAL).unwrap();
    assert_eq!(notice.kind, Kind::Relayed);
    assert_eq!(notice.returned, Returned::Headers);
    assert_wire(&notice.message, true);
    let message = parse(&notice);
    assert_eq!(message.subject(), Some("Relayed Mail Report"));
    let parts = report_parts(&message);
    assert!(prose(text_of(parts[0])).contains("this is the last notice about them"));
    let groups = status_groups(raw_body(&message, parts[1]));
    assert_eq!(groups[1][1], ("Action".to_string(), "relayed".to_string()));
    assert_eq!(mime_type(parts[2]), "text/rfc822-headers");
}

#[test]
fn failure_and_delay_together_make_a_failure_notice() {
    let notice = report(vec![delayed_carol(), failed_bob()]).build(ORIGINAL).unwrap();
    assert_eq!(notice.kind, Kind::Failure);
    assert_eq!(notice.returned, Returned::Full);
    let message = parse(&notice);
    let parts = report_parts(&message);
    let groups = status_groups(raw_body(&message, parts[1]));
    assert_eq!(groups.len(), 3);
    assert_eq!(groups[1][1].1, "delayed");
    assert_eq!(groups[2][2].1, "failed");
}

#[test]
fn size_limit_cuts_back_to_the_header_and_says_so() {
    let mut report = report(vec![failed_bob()]);
    report.return_size_limit = ORIGINAL.len() - 1;
    let notice = report.build(ORIGINAL).unwrap();
    assert_eq!(notice.returned, Returned::Headers);
    let message = parse(&notice);
    let parts = report_parts(&message);
    assert_eq!(mime_type(parts[2]), "text/rfc822-headers");
    assert_eq!(raw_body(&message, parts[2]), ORIGINAL_HEADER);
    let text = text_of(parts[0]);
    let limit = ORIGINAL.len() - 1;
    assert!(text.contains(&format!("larger than {limit} octets, so only its header")), "{text}");

    // Exactly at the limit the whole message still goes back.
    report.return_size_limit = ORIGINAL.len();
    assert_eq!(report.build(ORIGINAL).unwrap().returned, Returned::Full);

    // A header above the limit is not returned at all: two parts.
    report.return_size_limit = ORIGINAL_HEADER.len() - 1;
    let notice = report.build(ORIGINAL).unwrap();
    assert_eq!(notice.returned, Returned::Nothing);
    assert_wire(&notice.message, true);
    let message = parse(&notice);
    let parts = report_parts(&message);
    assert_eq!(parts.len(), 2);
    assert!(text_of(parts[0]).contains("so it is not attached"));
}

#[test]
fn content_that_cannot_pass_unchanged_is_cut_back() {
    let mut content = ORIGINAL.to_vec();
    content.extend_from_slice(b"bare\nline feed\r\n");
    let notice = report(vec![failed_bob()]).build(&content).unwrap();
    assert_eq!(notice.returned, Returned::Headers);
    assert_wire(&notice.message, true);
    let message = parse(&notice);
    let parts = report_parts(&message);
    assert_eq!(raw_body(&message, parts[2]), ORIGINAL_HEADER);
    assert!(text_of(parts[0]).contains("cannot be returned unchanged"));

    let mut long = ORIGINAL_HEADER.to_vec();
    long.extend_from_slice(b"X-Long: ");
    long.extend_from_slice(&[b'x'; 1200]);
    long.extend_from_slice(b"\r\n\r\nbody\r\n");
    let notice = report(vec![failed_bob()]).build(&long).unwrap();
    assert_eq!(notice.returned, Returned::Nothing);
    assert_wire(&notice.message, true);
}

#[test]
fn content_without_final_line_ending_is_returned_exactly() {
    let content = b"Subject: s\r\n\r\nno line ending";
    let notice = report(vec![failed_bob()]).build(content).unwrap();
    assert_wire(&notice.message, true);
    let message = parse(&notice);
    assert_eq!(raw_body(&message, report_parts(&message)[2]), content);
}

#[test]
fn boundary_never_occurs_in_the_content() {
    let mut content = ORIGINAL_HEADER.to_vec();
    content.extend_from_slice(
        format!(
            "Content-Type: multipart/mixed; boundary=\"{FIRST_BOUNDARY}\"\r\n\r\n\
             --{FIRST_BOUNDARY}\r\n\
             Content-Type: text/plain\r\n\r\n\
             a part of the original\r\n\
             --{FIRST_BOUNDARY}--\r\n"
        )
        .as_bytes(),
    );
    let notice = report(vec![failed_bob()]).build(&content).unwrap();
    assert_wire(&notice.message, true);
    let message = parse(&notice);
    let boundary = message.root_part().content_type().unwrap().attribute("boundary").unwrap();
    assert_ne!(boundary, FIRST_BOUNDARY);
    assert!(boundary.starts_with(FIRST_BOUNDARY));
    assert!(boundary.len() <= 70);
    let parts = report_parts(&message);
    assert_eq!(parts.len(), 3);
    assert_eq!(raw_body(&message, parts[2]), content);
    assert!(!content.windows(boundary.len()).any(|w| w == boundary.as_bytes()));

    // The boundary check covers the explanation and the status fields too.
    let mut sneaky = failed_bob();
    sneaky.diagnostic = Some(Diagnostic::Smtp(format!("550 --{FIRST_BOUNDARY}--")));
    let notice = report(vec![sneaky]).build(ORIGINAL).unwrap();
    let message = parse(&notice);
    assert_eq!(report_parts(&message).len(), 3);
    assert_eq!(raw_body(&message, report_parts(&message)[2]), ORIGINAL);
}

#[test]
fn nothing_from_outside_can_inject_a_field_or_a_line() {
    let evil = RecipientReport {
        original_recipient: Some(OriginalRecipient {
            addr_type: "rfc822\r\nX-Injected".to_string(),
            address: "bob@example.org\r\nX-Injected: orcpt".to_string(),
        }),
        remote_mta: Some("mx.example.net\r\nX-Injected: mta".to_string()),
        diagnostic: Some(Diagnostic::Smtp(
            "550-5.1.1 first line\r\n550-5.1.1 X-Injected: reply\r\n\r\n550 5.1.1 \0last\x1b[1m"
                .to_string(),
        )),
        ..RecipientReport::new(
            "bob@example.org\r\nX-Injected: rcpt",
            Action::Failed,
            EnhancedStatus(5, 1, 1),
        )
    };
    let mut report = report(vec![evil]);
    report.original.sender = "alice@example.com\r\nBcc: victim@example.net".to_string();
    report.original.envid = Some("id\r\n\r\nX-Injected: envid".to_string());
    report.original.received_from = Some(ReceivedFrom {
        helo: "helo (fake) \r\nX-Injected: helo".to_string(),
        ip: "2001:db8::7".parse().unwrap(),
    });
    let notice = report.build(ORIGINAL).unwrap();
    assert_wire(&notice.message, true);
    let message = parse(&notice);
    assert!(message.header_raw("Bcc").is_none());
    assert_eq!(header(&message, "To"), "<alice@example.com??Bcc: victim@example.net>");
    for (name, _) in message.headers_raw() {
        assert!(!name.starts_with("X-Injected"));
    }
    let parts = report_parts(&message);
    let groups = status_groups(raw_body(&message, parts[1]));
    assert_eq!(groups.len(), 2, "no extra recipient group");
    for group in &groups {
        for (name, _) in group {
            assert!(!name.starts_with("X-Injected"), "injected field {name}");
        }
    }
    assert_eq!(
        groups[0],
        fields(&[
            ("Original-Envelope-Id", "id????X-Injected: envid"),
            ("Reporting-MTA", "dns; mx.example.org"),
            ("Received-From-MTA", "dns; helo??fake????X-Injected:?helo (2001:db8::7)"),
            ("Arrival-Date", "Sat, 21 Nov 2026 22:26:40 +0000"),
        ])
    );
    assert_eq!(
        groups[1],
        fields(&[
            ("Original-Recipient", "unknown; bob@example.org??X-Injected: orcpt"),
            ("Final-Recipient", "rfc822; bob@example.org??X-Injected: rcpt"),
            ("Action", "failed"),
            ("Status", "5.1.1"),
            ("Remote-MTA", "dns; mx.example.net??X-Injected:?mta"),
            (
                "Diagnostic-Code",
                "smtp; 550-5.1.1 first line 550-5.1.1 X-Injected: reply 550 5.1.1 ?last?[1m"
            ),
        ])
    );
    // RFC 3461 section 9.2: each line of a multi-line reply continues the field.
    let status = std::str::from_utf8(raw_body(&message, parts[1])).unwrap();
    assert!(status.contains(
        "Diagnostic-Code: smtp; 550-5.1.1 first line\r\n 550-5.1.1 X-Injected: reply\r\n \
         550 5.1.1 ?last?[1m\r\n"
    ));
    // The explanation shows the lines, indented, never at the start of a line.
    let text = text_of(parts[0]);
    assert!(text.lines().all(|l| !l.starts_with("X-Injected") && !l.starts_with("550")));
}

#[test]
fn long_values_are_folded_below_998_octets() {
    let mut bob = failed_bob();
    let reply = format!("550 5.7.1 {} {}", "blocked because ".repeat(100), "x".repeat(1500));
    bob.diagnostic = Some(Diagnostic::Smtp(reply.clone()));
    let notice = report(vec![bob]).build(ORIGINAL).unwrap();
    assert_wire(&notice.message, true);
    let message = parse(&notice);
    let parts = report_parts(&message);
    let groups = status_groups(raw_body(&message, parts[1]));
    let (_, diagnostic) = groups[1].iter().find(|(n, _)| n == "Diagnostic-Code").unwrap();
    // Folding at spaces unfolds to the same text; the one over-long word gained a space.
    assert_eq!(diagnostic.replace(' ', ""), format!("smtp;{reply}").replace(' ', ""));
    assert!(diagnostic.starts_with("smtp; 550 5.7.1 blocked because blocked because"));
}

#[test]
fn eight_bit_original_is_declared_8bit() {
    let content = "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve body\r\n".as_bytes();
    let notice = report(vec![failed_bob()]).build(content).unwrap();
    assert_eq!(notice.body, BodyType::EightBitMime);
    assert!(!notice.smtputf8);
    assert_wire(&notice.message, false);
    let message = parse(&notice);
    let parts = report_parts(&message);
    assert_eq!(mime_type(parts[1]), "message/delivery-status");
    assert!(raw_body(&message, parts[1]).is_ascii());
    assert_eq!(mime_type(parts[2]), "message/rfc822");
    assert_eq!(parts[2].content_transfer_encoding(), Some("8bit"));
    assert_eq!(raw_body(&message, parts[2]), content);
    // Everything but the returned message is still 7-bit.
    let end_of_status = parts[1].offset_end as usize;
    assert!(notice.message[..end_of_status].is_ascii());
}

#[test]
fn internationalized_notice_uses_the_global_types() {
    let content = "From: J\u{f6}rg <j\u{f6}rg@b\u{fc}cher.example>\r\n\
                   To: \u{e7}a@example.org\r\n\
                   Subject: gr\u{fc}\u{df}e\r\n\r\nHallo\r\n"
        .as_bytes();
    let recipient = RecipientReport {
        original_recipient: Some(OriginalRecipient {
            addr_type: "utf-8".to_string(),
            address: "\\x{E7}a@example.org".to_string(),
        }),
        remote_mta: Some("mx.example.org".to_string()),
        diagnostic: Some(Diagnostic::Smtp("550 5.1.1 Unbekannter Empf\u{e4}nger".to_string())),
        ..RecipientReport::new("\u{e7}a@example.org", Action::Failed, EnhancedStatus(5, 1, 1))
    };
    let mut report = report(vec![recipient]);
    report.original.sender = "j\u{f6}rg@b\u{fc}cher.example".to_string();
    report.original.smtputf8 = true;
    let notice = report.build(content).unwrap();
    assert!(notice.smtputf8);
    assert_eq!(notice.body, BodyType::EightBitMime);
    assert_eq!(notice.returned, Returned::Full);
    assert_wire(&notice.message, false);

    let message = parse(&notice);
    assert_eq!(header(&message, "To"), "<j\u{f6}rg@b\u{fc}cher.example>");
    let parts = report_parts(&message);
    assert_eq!(mime_type(parts[0]), "text/plain");
    assert_eq!(parts[0].content_type().unwrap().attribute("charset"), Some("utf-8"));
    assert!(text_of(parts[0]).contains("<\u{e7}a@example.org>: could not be delivered"));
    assert_eq!(mime_type(parts[1]), "message/global-delivery-status");
    assert_eq!(parts[1].content_transfer_encoding(), Some("8bit"));
    let groups = status_groups(raw_body(&message, parts[1]));
    assert_eq!(
        groups[1],
        fields(&[
            ("Original-Recipient", "utf-8; \u{e7}a@example.org"),
            ("Final-Recipient", "utf-8; \u{e7}a@example.org"),
            ("Action", "failed"),
            ("Status", "5.1.1"),
            ("Remote-MTA", "dns; mx.example.org"),
            ("Diagnostic-Code", "smtp; 550 5.1.1 Unbekannter Empf\u{e4}nger"),
        ])
    );
    assert_eq!(mime_type(parts[2]), "message/global");
    assert_eq!(raw_body(&message, parts[2]), content);
    let PartType::Message(returned) = &parts[2].body else { panic!("not a nested message") };
    assert_eq!(returned.subject(), Some("gr\u{fc}\u{df}e"));

    // The header only, as message/global-headers.
    report.original.ret = Some(Ret::Headers);
    let notice = report.build(content).unwrap();
    let message = parse(&notice);
    let parts = report_parts(&message);
    assert_eq!(mime_type(parts[2]), "message/global-headers");
    assert!(raw_body(&message, parts[2]).ends_with("gr\u{fc}\u{df}e\r\n".as_bytes()));
}

#[test]
fn smtputf8_alone_makes_a_global_notice_and_ascii_stays_ascii_otherwise() {
    let mut utf8 = report(vec![failed_bob()]);
    utf8.original.smtputf8 = true;
    let notice = utf8.build(ORIGINAL).unwrap();
    assert!(notice.smtputf8);
    let message = parse(&notice);
    let parts = report_parts(&message);
    assert_eq!(mime_type(parts[1]), "message/global-delivery-status");
    assert_eq!(mime_type(parts[2]), "message/global");

    // A UTF-8 reply in a 7-bit notice is made ASCII rather than making the notice global.
    let mut bob = failed_bob();
    bob.diagnostic = Some(Diagnostic::Smtp("550 Empf\u{e4}nger unbekannt".to_string()));
    let notice = report(vec![bob]).build(ORIGINAL).unwrap();
    assert!(!notice.smtputf8);
    assert_wire(&notice.message, true);
}

#[test]
fn local_diagnostic_without_remote_mta() {
    let mut bob = failed_bob();
    bob.remote_mta = None;
    bob.diagnostic = Some(Diagnostic::Local("mailbox is full".to_string()));
    bob.status = EnhancedStatus(5, 2, 2);
    let notice = report(vec![bob]).build(ORIGINAL).unwrap();
    let message = parse(&notice);
    let parts = report_parts(&message);
    let groups = status_groups(raw_body(&message, parts[1]));
    assert!(
        groups[1]
            .contains(&("Diagnostic-Code".to_string(), "X-Postilion; mailbox is full".to_string()))
    );
    assert!(!groups[1].iter().any(|(n, _)| n == "Remote-MTA"));
    assert!(text_of(parts[0]).contains("Reason:\r\n        mailbox is full"));
}

#[test]
fn same_inputs_same_notice() {
    let report = report(vec![failed_bob(), delayed_carol()]);
    assert_eq!(report.build(ORIGINAL).unwrap(), report.build(ORIGINAL).unwrap());
}

#[test]
fn caller_mistakes_are_errors_with_context() {
    let mut r = report(vec![failed_bob()]);
    r.original.sender.clear();
    assert_eq!(r.build(ORIGINAL), Err(DsnError::NullSender));

    assert_eq!(report(vec![]).build(ORIGINAL), Err(DsnError::NoRecipients));

    let mut r = report(vec![failed_bob()]);
    r.reporting_mta = "mx.example.org>\r\nBcc: x".to_string();
    assert!(matches!(r.build(ORIGINAL), Err(DsnError::InvalidHostName(_))));

    let mut r = report(vec![failed_bob()]);
    r.message_id = "a b".to_string();
    assert!(matches!(r.build(ORIGINAL), Err(DsnError::InvalidMessageId(_))));

    let mut bob = failed_bob();
    bob.status = EnhancedStatus(2, 0, 0);
    let error = report(vec![bob]).build(ORIGINAL).unwrap_err();
    assert_eq!(
        error.to_string(),
        "recipient \"bob@example.org\": status 2.0.0 does not fit action failed"
    );

    let mut carol = delayed_carol();
    carol.status = EnhancedStatus(5, 0, 0);
    assert!(report(vec![carol]).build(ORIGINAL).is_err());

    let mut bob = failed_bob();
    bob.status = EnhancedStatus(5, 1000, 1);
    assert!(report(vec![bob]).build(ORIGINAL).is_err());

    let mut bob = failed_bob();
    bob.will_retry_until = Some(at(0));
    let error = report(vec![bob]).build(ORIGINAL).unwrap_err();
    assert!(error.to_string().contains("Will-Retry-Until given for action failed"));

    // A failure may carry a temporary status: it expired after temporary errors.
    let mut bob = failed_bob();
    bob.status = EnhancedStatus(4, 4, 7);
    assert!(report(vec![bob]).build(ORIGINAL).is_ok());
}

#[test]
fn action_kinds() {
    assert_eq!(Action::Failed.kind(), Kind::Failure);
    assert_eq!(Action::Delayed.kind(), Kind::Delay);
    assert_eq!(Action::Delivered.kind(), Kind::Success);
    assert_eq!(Action::Expanded.kind(), Kind::Success);
    assert_eq!(Action::Relayed.kind(), Kind::Relayed);
}

/// The bodies of the parts of a notice, cut at the delimiter lines: after the delimiter and
/// the part's header, up to the CRLF before the next delimiter.
fn bodies<'a>(message: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delimiter = format!("\r\n--{boundary}");
    let mut cuts = Vec::new();
    let mut from = 0;
    while let Some(at) =
        message[from..].windows(delimiter.len()).position(|w| w == delimiter.as_bytes())
    {
        cuts.push(from + at);
        from += at + delimiter.len();
    }
    assert_eq!(&message[from..], b"--\r\n", "the last delimiter closes the report");
    cuts.windows(2)
        .map(|pair| {
            let part = &message[pair[0] + delimiter.len() + 2..pair[1]];
            let header_end = part.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            &part[header_end + 4..]
        })
        .collect()
}

/// The fields a delivery-status part may hold; anything else would be an injected field.
const STATUS_FIELDS: &[&str] = &[
    "Original-Envelope-Id",
    "Reporting-MTA",
    "Received-From-MTA",
    "Arrival-Date",
    "Original-Recipient",
    "Final-Recipient",
    "Action",
    "Status",
    "Remote-MTA",
    "Diagnostic-Code",
    "Last-Attempt-Date",
    "Will-Retry-Until",
];

proptest::proptest! {
    /// Whatever the content and whatever the outside values, the notice is well formed: CRLF
    /// lines within 998 octets, 7-bit unless it says otherwise, two or three parts, one status
    /// group per recipient with only DSN fields, and the returned part byte for byte.
    #[test]
    fn any_input_gives_a_well_formed_notice(
        content in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
        header_first in proptest::prelude::any::<bool>(),
        sender in "\\PC{1,40}",
        recipients in proptest::collection::vec(
            ("\\PC{1,40}", "(\\PC|\r|\n){0,300}", 0..3usize),
            1..4,
        ),
        smtputf8 in proptest::prelude::any::<bool>(),
        limit in 0..4000usize,
    ) {
        let mut content = content;
        if header_first {
            // Give it a plausible header section, so that header returns are exercised.
            let mut with_header = ORIGINAL_HEADER.to_vec();
            with_header.extend_from_slice(b"\r\n");
            with_header.extend_from_slice(&content);
            content = with_header;
        }
        let recipients: Vec<RecipientReport> = recipients
            .into_iter()
            .map(|(address, reply, action)| {
                let (action, status) = match action {
                    0 => (Action::Failed, EnhancedStatus(5, 0, 0)),
                    1 => (Action::Delayed, EnhancedStatus(4, 0, 0)),
                    _ => (Action::Delivered, EnhancedStatus(2, 0, 0)),
                };
                RecipientReport {
                    remote_mta: Some(reply.chars().take(20).collect()),
                    diagnostic: Some(Diagnostic::Smtp(reply)),
                    ..RecipientReport::new(address, action, status)
                }
            })
            .collect();
        let count = recipients.len();
        let mut report = report(recipients);
        report.original.sender = sender;
        report.original.smtputf8 = smtputf8;
        report.return_size_limit = limit;
        let notice = report.build(&content).unwrap();
        assert_wire(&notice.message, notice.body == BodyType::SevenBit);
        let message = parse(&notice);
        let parts = report_parts(&message);
        let expected_parts = if notice.returned == Returned::Nothing { 2 } else { 3 };
        proptest::prop_assert_eq!(parts.len(), expected_parts);
        let groups = status_groups(raw_body(&message, parts[1]));
        proptest::prop_assert_eq!(groups.len(), count + 1);
        for (name, _) in groups.iter().flatten() {
            proptest::prop_assert!(STATUS_FIELDS.contains(&name.as_str()), "field {}", name);
        }
        // mail-parser's offsets are wrong for a returned "message" without a header, so the
        // bodies are cut out at the delimiters, which occur nowhere else.
        let boundary = message.root_part().content_type().unwrap().attribute("boundary").unwrap();
        let bodies = bodies(&notice.message, boundary);
        proptest::prop_assert_eq!(bodies.len(), expected_parts);
        match notice.returned {
            Returned::Full => {
                proptest::prop_assert_eq!(bodies[2], &content[..]);
            }
            Returned::Headers => {
                let returned = bodies[2];
                proptest::prop_assert!(content.starts_with(returned));
                proptest::prop_assert!(returned.len() <= limit);
            }
            Returned::Nothing => {}
        }
    }
}

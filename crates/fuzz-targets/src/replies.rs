//! The well-formedness oracle for what a server session writes: complete replies, each line
//! `code SP|- text CRLF`, one code per reply, and an enhanced status code (RFC 2034, RFC 3463)
//! whose class agrees with the reply code.

use smtp_proto::base64;

/// RFC 5321 section 4.5.3.1.5: "The maximum total length of a reply line including the reply
/// code and the <CRLF> is 512 octets."
const MAX_REPLY_LINE: usize = 512;

/// One reply read back from the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeenReply {
    pub(crate) code: u16,
    /// The text of each line after the code and separator, enhanced status code included.
    pub(crate) lines: Vec<String>,
}

impl SeenReply {
    /// The text of the first line without its enhanced status code.
    pub(crate) fn text(&self) -> &str {
        let first = self.lines.first().map_or("", String::as_str);
        match enhanced_status(first) {
            Some((_, len)) => &first[len..],
            None => first,
        }
    }
}

/// Reads `output` as a sequence of replies and panics unless each is well-formed. `hostname`
/// is the session's, the only text a reply without an enhanced status code may start with
/// (the greeting and the answers to EHLO and HELO, RFC 2034 section 3).
pub(crate) fn check_replies(output: &[u8], hostname: &str) -> Vec<SeenReply> {
    assert!(
        output.is_empty() || output.ends_with(b"\r\n"),
        "output ends inside a line: {:?}",
        tail(output)
    );
    let text = std::str::from_utf8(output)
        .unwrap_or_else(|error| panic!("reply is not UTF-8 ({error}): {:?}", tail(output)));
    let mut replies: Vec<SeenReply> = Vec::new();
    let mut open = false;
    for line in text.split_terminator("\r\n") {
        assert!(
            line.len() + 2 <= MAX_REPLY_LINE,
            "reply line of {} octets: {line:?}",
            line.len() + 2
        );
        assert!(
            !line.bytes().any(|b| b < 0x20 || b == 0x7f),
            "control character in reply line {line:?}"
        );
        let bytes = line.as_bytes();
        assert!(
            bytes.len() >= 4
                && (b'2'..=b'5').contains(&bytes[0])
                && bytes[1..3].iter().all(u8::is_ascii_digit)
                && matches!(bytes[3], b' ' | b'-'),
            "malformed reply line {line:?}"
        );
        let code: u16 = line[..3].parse().expect("three digits");
        let last = bytes[3] == b' ';
        let text = line[4..].to_owned();
        if open {
            let reply = replies.last_mut().expect("an open reply");
            assert_eq!(reply.code, code, "code changes inside a multi-line reply: {line:?}");
            reply.lines.push(text);
        } else {
            replies.push(SeenReply { code, lines: vec![text] });
        }
        open = !last;
    }
    assert!(!open, "the last reply is not finished: {:?}", tail(output));
    for reply in &replies {
        check_status(reply, hostname);
    }
    replies
}

fn check_status(reply: &SeenReply, hostname: &str) {
    let first = &reply.lines[0];
    match reply.code / 100 {
        3 => {
            if reply.code == 334 {
                // RFC 4954 section 4: a challenge is the base64 text alone.
                assert_eq!(reply.lines.len(), 1, "multi-line 334: {reply:?}");
                assert!(
                    base64::decode(first.as_bytes()).is_ok(),
                    "334 text is not base64: {reply:?}"
                );
            }
        }
        class => match enhanced_status(first) {
            Some((status, _)) => {
                assert_eq!(
                    u16::from(status.0),
                    class,
                    "enhanced status class differs from the reply code: {reply:?}"
                );
                // Every line repeats it (RFC 2034 section 4).
                for line in &reply.lines {
                    assert_eq!(
                        enhanced_status(line).map(|(s, _)| s),
                        Some(status),
                        "a line without the reply's enhanced status code: {reply:?}"
                    );
                }
            }
            None => assert!(
                (reply.code == 250 || reply.code == 220) && first.starts_with(hostname),
                "reply without an enhanced status code: {reply:?}"
            ),
        },
    }
}

/// `class "." subject "." detail` at the start of `text` (RFC 3463 section 2: class 2, 4 or
/// 5, subject and detail of 1 to 3 digits), followed by a space or the end, and the octets it
/// takes with that space.
pub(crate) fn enhanced_status(text: &str) -> Option<((u8, u16, u16), usize)> {
    let bytes = text.as_bytes();
    let class = match bytes.first()? {
        b @ (b'2' | b'4' | b'5') => b - b'0',
        _ => return None,
    };
    if bytes.get(1) != Some(&b'.') {
        return None;
    }
    let digits = |start: usize| -> Option<(u16, usize)> {
        let n = bytes.get(start..)?.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=3).contains(&n) {
            return None;
        }
        Some((text[start..start + n].parse().ok()?, start + n))
    };
    let (subject, end) = digits(2)?;
    if bytes.get(end) != Some(&b'.') {
        return None;
    }
    let (detail, end) = digits(end + 1)?;
    match bytes.get(end) {
        None => Some(((class, subject, detail), end)),
        Some(b' ') => Some(((class, subject, detail), end + 1)),
        Some(_) => None,
    }
}

fn tail(output: &[u8]) -> String {
    String::from_utf8_lossy(&output[output.len().saturating_sub(200)..]).into_owned()
}

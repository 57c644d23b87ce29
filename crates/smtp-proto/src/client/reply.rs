//! Reading server replies (RFC 5321 section 4.2): the parsed [`ServerReply`] and the
//! incremental [`ReplyParser`] that finds replies in the byte stream.

use std::collections::VecDeque;
use std::fmt;

use crate::reply::EnhancedStatus;

/// Longest reply line accepted, in octets including the line ending. RFC 5321 section
/// 4.5.3.1.5 allows 512, but servers with long texts exceed it; eight times that is tolerant
/// while still bounding what a broken or hostile server can make us buffer.
const MAX_LINE: usize = 4096;
/// Most lines in one reply. EHLO replies, the longest in practice, have about twenty.
const MAX_LINES: usize = 100;
/// Most octets in one reply, line endings included.
const MAX_REPLY: usize = 64 * 1024;
/// How much of a malformed line an error quotes.
const EXCERPT: usize = 64;

/// One reply from the server, possibly of several lines.
///
/// The text is safe to log and to put in a delivery status notification: octets that are not
/// UTF-8 are replaced (U+FFFD), tabs become spaces and other control characters `?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    /// The three-digit reply code; its first digit is 2 to 5.
    pub code: u16,
    /// The enhanced status code (RFC 2034, RFC 3463), when the first line starts with a
    /// well-formed one whose class matches the first digit of `code`.
    pub status: Option<EnhancedStatus>,
    /// The text of each line after the code and separator, without the enhanced status code
    /// where a line starts with the same one as the first line (RFC 2034 section 4 repeats it
    /// on every line).
    pub lines: Vec<String>,
}

impl ServerReply {
    /// A reply from its code and the text of each line as sent, enhanced status code included.
    /// The text is sanitized and the status code taken out, as described on the fields.
    pub fn new(code: u16, lines: Vec<String>) -> ServerReply {
        let mut lines: Vec<String> = lines.into_iter().map(sanitize).collect();
        let status = lines.first().and_then(|line| leading_status(code, line)).map(|(s, _)| s);
        if let Some(status) = status {
            for line in &mut lines {
                if let Some((found, len)) = leading_status(code, line)
                    && found == status
                {
                    line.drain(..len);
                }
            }
        }
        ServerReply { code, status, lines }
    }

    /// 2xx: the command succeeded.
    pub fn is_positive(&self) -> bool {
        self.code / 100 == 2
    }

    /// 3xx: the server waits for more (354 after DATA).
    pub fn is_intermediate(&self) -> bool {
        self.code / 100 == 3
    }

    /// 4xx: a temporary failure; the same command may succeed later.
    pub fn is_transient(&self) -> bool {
        self.code / 100 == 4
    }

    /// 5xx: a permanent failure; repeating the command will not help.
    pub fn is_permanent(&self) -> bool {
        self.code / 100 == 5
    }

    /// The text of all lines, without the enhanced status code, one line per `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// One line, as logs and the `Diagnostic-Code` field of a DSN want it: `550 5.1.1 No such
/// user`, the lines of a multi-line reply joined with spaces.
impl fmt::Display for ServerReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(status) = self.status {
            write!(f, " {status}")?;
        }
        for line in self.lines.iter().filter(|line| !line.is_empty()) {
            write!(f, " {line}")?;
        }
        Ok(())
    }
}

/// Replaces what must not reach a log line or a DSN header field: control characters, so
/// that a server cannot forge log lines or header fields. Tabs, legal in reply text
/// (RFC 5321 section 4.2: `textstring`), become spaces.
fn sanitize(text: String) -> String {
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() => '?',
            c => c,
        })
        .collect()
}

/// The enhanced status code at the start of `line` and the octets it takes with the one space
/// after it. RFC 2034 section 4: `status-code ::= class "." subject "." detail`, `class ::=
/// "2" / "4" / "5"`, `subject ::= 1*3digit`, `detail ::= 1*3digit`, and "all status codes
/// returned by the server must agree with the primary response code". The code "is always
/// followed by one or more spaces"; the end of the line is accepted too, for lines with no
/// other text.
fn leading_status(code: u16, line: &str) -> Option<(EnhancedStatus, usize)> {
    let class = u8::try_from(code / 100).ok().filter(|class| matches!(class, 2 | 4 | 5))?;
    let bytes = line.as_bytes();
    if bytes.first() != Some(&(b'0' + class)) || bytes.get(1) != Some(&b'.') {
        return None;
    }
    let (subject, after_subject) = number_of_1_to_3_digits(bytes, 2)?;
    if bytes.get(after_subject) != Some(&b'.') {
        return None;
    }
    let (detail, end) = number_of_1_to_3_digits(bytes, after_subject + 1)?;
    let len = match bytes.get(end) {
        None => end,
        Some(b' ') => end + 1,
        Some(_) => return None,
    };
    Some((EnhancedStatus(class, subject, detail), len))
}

/// The value of the 1 to 3 digits starting at `start`, and the position after them.
fn number_of_1_to_3_digits(bytes: &[u8], start: usize) -> Option<(u16, usize)> {
    let digits = bytes[start.min(bytes.len())..].iter().take_while(|b| b.is_ascii_digit()).count();
    if !(1..=3).contains(&digits) {
        return None;
    }
    let value = bytes[start..start + digits]
        .iter()
        .fold(0u16, |value, digit| value * 10 + u16::from(digit - b'0'));
    Some((value, start + digits))
}

/// Why the byte stream could not be read as replies. After any of these the stream cannot be
/// trusted to stay in step with our commands, so the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    /// A line that does not start with a reply code (2 to 5, then two digits) followed by a
    /// space, a hyphen or the end of the line. Carries the start of the line, sanitized.
    Malformed(String),
    /// A line of a multi-line reply with a different code: RFC 5321 section 4.2.1, "the reply
    /// code on each of the lines MUST be the same".
    CodeMismatch {
        /// The code of the reply's first line.
        expected: u16,
        /// The code of the line that differs.
        found: u16,
    },
    /// A line longer than 4096 octets.
    LineTooLong,
    /// A reply of more than 100 lines or 64 KiB.
    ReplyTooLong,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Malformed(line) => write!(f, "malformed reply line {line:?}"),
            ReplyError::CodeMismatch { expected, found } => {
                write!(f, "reply line with code {found} continues a reply with code {expected}")
            }
            ReplyError::LineTooLong => write!(f, "reply line longer than {MAX_LINE} octets"),
            ReplyError::ReplyTooLong => {
                write!(f, "reply longer than {MAX_LINES} lines or {MAX_REPLY} octets")
            }
        }
    }
}

impl std::error::Error for ReplyError {}

/// Finds replies in the bytes read from a server, however the reads split them: a reply may
/// arrive over several reads, and one read may hold several replies (the answers to a
/// pipelined group of commands, RFC 2920).
///
/// Input is consumed as it is fed: complete lines are decoded at once, and only the start of
/// an unfinished line and the lines of an unfinished reply are kept, both bounded. Lines end
/// with CRLF; a bare LF is accepted too, because some servers send it and it cannot make us
/// misread where a reply ends.
///
/// After an error, [`next_reply`](Self::next_reply) returns that error (after any replies
/// completed before it) every time, and further input is ignored.
#[derive(Debug, Default)]
pub struct ReplyParser {
    /// The start of a line whose LF has not arrived.
    partial: Vec<u8>,
    /// The lines so far of a multi-line reply.
    reply: Option<UnfinishedReply>,
    ready: VecDeque<ServerReply>,
    error: Option<ReplyError>,
}

#[derive(Debug)]
struct UnfinishedReply {
    code: u16,
    lines: Vec<String>,
    octets: usize,
}

impl ReplyParser {
    /// A parser at the start of a connection, or of the TLS session after STARTTLS.
    pub fn new() -> ReplyParser {
        ReplyParser::default()
    }

    /// Takes bytes read from the server.
    pub fn feed(&mut self, mut input: &[u8]) {
        while self.error.is_none() && !input.is_empty() {
            let Some(lf) = input.iter().position(|&b| b == b'\n') else {
                if self.partial.len() + input.len() >= MAX_LINE {
                    // The line can no longer end within the limit: fail now rather than
                    // buffer it.
                    self.fail(ReplyError::LineTooLong);
                } else {
                    self.partial.extend_from_slice(input);
                }
                return;
            };
            let (line, rest) = input.split_at(lf + 1);
            input = rest;
            if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut joined = std::mem::take(&mut self.partial);
                joined.extend_from_slice(line);
                self.line(&joined);
                // Keep the allocation for the next split line.
                joined.clear();
                self.partial = joined;
            }
        }
    }

    /// The next complete reply, in the order they arrived; `None` until more input completes
    /// one.
    pub fn next_reply(&mut self) -> Option<Result<ServerReply, ReplyError>> {
        match self.ready.pop_front() {
            Some(reply) => Some(Ok(reply)),
            None => self.error.clone().map(Err),
        }
    }

    /// True when nothing has been received beyond the replies already taken. After the 220
    /// reply to STARTTLS this must hold: bytes that arrived before the TLS handshake would
    /// otherwise be read as if they had come through TLS (the STARTTLS command injection
    /// problem, CVE-2011-0411, seen from the client side).
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
            && self.reply.is_none()
            && self.ready.is_empty()
            && self.error.is_none()
    }

    /// Decodes one complete line, line ending included.
    fn line(&mut self, raw: &[u8]) {
        if raw.len() > MAX_LINE {
            return self.fail(ReplyError::LineTooLong);
        }
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some((code, last, text)) = reply_line(line) else {
            let excerpt = String::from_utf8_lossy(&line[..line.len().min(EXCERPT)]);
            return self.fail(ReplyError::Malformed(sanitize(excerpt.into_owned())));
        };
        let reply =
            self.reply.get_or_insert(UnfinishedReply { code, lines: Vec::new(), octets: 0 });
        if reply.code != code {
            let expected = reply.code;
            return self.fail(ReplyError::CodeMismatch { expected, found: code });
        }
        reply.octets += raw.len();
        if reply.lines.len() == MAX_LINES || reply.octets > MAX_REPLY {
            return self.fail(ReplyError::ReplyTooLong);
        }
        reply.lines.push(String::from_utf8_lossy(text).into_owned());
        if last && let Some(reply) = self.reply.take() {
            self.ready.push_back(ServerReply::new(reply.code, reply.lines));
        }
    }

    fn fail(&mut self, error: ReplyError) {
        self.error = Some(error);
        self.partial = Vec::new();
        self.reply = None;
    }
}

/// `Reply-line = *( Reply-code "-" [ textstring ] CRLF ) Reply-code [ SP textstring ] CRLF`
/// (RFC 5321 section 4.2): the code, whether this is the last line, and the text. The first
/// digit must be 2 to 5 (`Reply-code = %x32-35 %x30-35 %x30-39`); the other two may be any
/// digit, since "a sender-SMTP MUST be prepared to handle codes not specified in this document
/// and MUST do so by interpreting the first digit only". A code alone ends a reply too: the
/// RFC asks clients to accept a missing space.
fn reply_line(line: &[u8]) -> Option<(u16, bool, &[u8])> {
    let digits = line.get(..3)?;
    if !(b'2'..=b'5').contains(&digits[0]) || !digits[1..].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = digits.iter().fold(0u16, |code, digit| code * 10 + u16::from(digit - b'0'));
    match line.get(3) {
        None => Some((code, true, &[])),
        Some(b' ') => Some((code, true, &line[4..])),
        Some(b'-') => Some((code, false, &line[4..])),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::reply::Reply;

    fn parse_all(input: &[u8]) -> Vec<Result<ServerReply, ReplyError>> {
        let mut parser = ReplyParser::new();
        parser.feed(input);
        drain(&mut parser)
    }

    /// Every reply, then the error if there is one (once).
    fn drain(parser: &mut ReplyParser) -> Vec<Result<ServerReply, ReplyError>> {
        let mut out = Vec::new();
        while let Some(result) = parser.next_reply() {
            let failed = result.is_err();
            out.push(result);
            if failed {
                break;
            }
        }
        out
    }

    fn reply(code: u16, status: Option<EnhancedStatus>, lines: &[&str]) -> ServerReply {
        ServerReply { code, status, lines: lines.iter().map(|l| l.to_string()).collect() }
    }

    /// Feeds `input` split at every pair of boundaries, taking replies after each feed, and
    /// checks that the result is what one feed gives.
    fn parse_split_everywhere(input: &[u8]) -> Vec<Result<ServerReply, ReplyError>> {
        let whole = parse_all(input);
        for a in 0..=input.len() {
            for b in a..=input.len() {
                let mut parser = ReplyParser::new();
                let mut replies = Vec::new();
                for part in [&input[..a], &input[a..b], &input[b..]] {
                    parser.feed(part);
                    replies.extend(drain(&mut parser).into_iter().filter(Result::is_ok));
                }
                replies.extend(drain(&mut parser));
                assert_eq!(replies, whole, "split at {a},{b}");
            }
        }
        whole
    }

    #[test]
    fn single_line_replies() {
        let status = Some(EnhancedStatus(2, 1, 0));
        assert_eq!(
            parse_split_everywhere(b"250 2.1.0 Sender ok\r\n"),
            [Ok(reply(250, status, &["Sender ok"]))]
        );
        assert_eq!(
            parse_split_everywhere(b"354 Go ahead\r\n"),
            [Ok(reply(354, None, &["Go ahead"]))]
        );
    }

    #[test]
    fn code_alone_with_or_without_space() {
        assert_eq!(parse_all(b"250\r\n"), [Ok(reply(250, None, &[""]))]);
        assert_eq!(parse_all(b"250 \r\n"), [Ok(reply(250, None, &[""]))]);
        assert_eq!(parse_all(b"250-\r\n250 x\r\n"), [Ok(reply(250, None, &["", "x"]))]);
    }

    #[test]
    fn multi_line_reply_split_everywhere() {
        let input =
            b"250-mx.example.org Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n";
        assert_eq!(
            parse_split_everywhere(input),
            [Ok(reply(
                250,
                None,
                &["mx.example.org Hello", "PIPELINING", "SIZE 1000", "8BITMIME"]
            ))]
        );
    }

    #[test]
    fn pipelined_replies_in_one_read_split_everywhere() {
        let input =
            b"250 2.1.0 Ok\r\n550-5.1.1 No such\r\n550 5.1.1 user\r\n250 2.1.5 Ok\r\n354 Go\r\n";
        let ok0 = reply(250, Some(EnhancedStatus(2, 1, 0)), &["Ok"]);
        let refused = reply(550, Some(EnhancedStatus(5, 1, 1)), &["No such", "user"]);
        let ok5 = reply(250, Some(EnhancedStatus(2, 1, 5)), &["Ok"]);
        let go = reply(354, None, &["Go"]);
        assert_eq!(parse_split_everywhere(input), [Ok(ok0), Ok(refused), Ok(ok5), Ok(go)]);
    }

    #[test]
    fn bare_lf_is_accepted() {
        assert_eq!(
            parse_split_everywhere(b"250-a\n250 b\r\n221 bye\n"),
            [Ok(reply(250, None, &["a", "b"])), Ok(reply(221, None, &["bye"]))]
        );
    }

    #[test]
    fn incomplete_input_gives_nothing_yet() {
        for input in [&b""[..], b"25", b"250 ok", b"250 ok\r", b"250-first\r\n", b"250-a\r\n250 la"]
        {
            let mut parser = ReplyParser::new();
            parser.feed(input);
            assert_eq!(parser.next_reply(), None, "{input:?}");
            assert_eq!(parser.is_empty(), input.is_empty(), "{input:?}");
        }
    }

    #[test]
    fn is_empty_only_when_everything_was_taken() {
        let mut parser = ReplyParser::new();
        parser.feed(b"220 Ready to start TLS\r\n");
        assert!(!parser.is_empty());
        assert!(parser.next_reply().is_some());
        assert!(parser.is_empty());
        parser.feed(b"220 Ready to start TLS\r\n250 injected\r\n");
        assert!(parser.next_reply().is_some());
        assert!(!parser.is_empty(), "a reply after the STARTTLS answer must be noticed");
    }

    #[test]
    fn malformed_lines() {
        for input in [
            &b"hello\r\n"[..],
            b"25x ok\r\n",
            b"2500 ok\r\n",
            b"250ok\r\n",
            b"650 ok\r\n",
            b"150 ok\r\n",
            b"\r\n",
            b" 250 ok\r\n",
            b"250-a\r\n\r\n",
        ] {
            let results = parse_split_everywhere(input);
            assert!(matches!(results.last(), Some(Err(ReplyError::Malformed(_)))), "{input:?}");
        }
    }

    #[test]
    fn malformed_line_is_quoted_sanitized_and_short() {
        let mut input = b"xyz\x1b[31m".to_vec();
        input.extend_from_slice(&[b'a'; 200]);
        input.extend_from_slice(b"\r\n");
        let [Err(ReplyError::Malformed(excerpt))] = &parse_all(&input)[..] else {
            panic!("expected one error");
        };
        assert!(excerpt.starts_with("xyz?[31maaa"), "{excerpt}");
        assert_eq!(excerpt.len(), EXCERPT);
    }

    #[test]
    fn code_mismatch_in_multi_line_reply() {
        assert_eq!(
            parse_split_everywhere(b"250-a\r\n251 b\r\n"),
            [Err(ReplyError::CodeMismatch { expected: 250, found: 251 })]
        );
    }

    #[test]
    fn replies_before_an_error_are_kept_and_the_error_sticks() {
        let mut parser = ReplyParser::new();
        parser.feed(b"250 ok\r\nnonsense\r\n250 after\r\n");
        assert_eq!(parser.next_reply(), Some(Ok(reply(250, None, &["ok"]))));
        let error = Some(Err(ReplyError::Malformed("nonsense".into())));
        assert_eq!(parser.next_reply(), error);
        parser.feed(b"250 more\r\n");
        assert_eq!(parser.next_reply(), error);
        assert!(!parser.is_empty());
    }

    #[test]
    fn line_length_limit_is_exact() {
        let line = |len: usize| {
            let mut line = b"250 ".to_vec();
            line.resize(len - 2, b'x');
            line.extend_from_slice(b"\r\n");
            line
        };
        assert!(parse_all(&line(MAX_LINE))[0].is_ok());
        assert_eq!(parse_all(&line(MAX_LINE + 1)), [Err(ReplyError::LineTooLong)]);
        // The same, arriving in pieces.
        let mut parser = ReplyParser::new();
        for piece in line(MAX_LINE).chunks(100) {
            parser.feed(piece);
        }
        assert!(matches!(parser.next_reply(), Some(Ok(_))));
        let mut parser = ReplyParser::new();
        for piece in line(MAX_LINE + 1).chunks(100) {
            parser.feed(piece);
        }
        assert_eq!(parser.next_reply(), Some(Err(ReplyError::LineTooLong)));
    }

    #[test]
    fn endless_line_does_not_grow_memory() {
        let mut parser = ReplyParser::new();
        let chunk = [b'2'; 1000];
        for _ in 0..1000 {
            parser.feed(&chunk);
            assert!(parser.partial.capacity() <= 2 * MAX_LINE);
        }
        assert_eq!(parser.next_reply(), Some(Err(ReplyError::LineTooLong)));
    }

    #[test]
    fn reply_limits() {
        let mut many = Vec::new();
        for _ in 0..MAX_LINES - 1 {
            many.extend_from_slice(b"250-x\r\n");
        }
        let mut ok = many.clone();
        ok.extend_from_slice(b"250 last\r\n");
        assert_eq!(parse_all(&ok)[0].as_ref().map(|r| r.lines.len()), Ok(MAX_LINES));
        many.extend_from_slice(b"250-x\r\n250 last\r\n");
        assert_eq!(parse_all(&many), [Err(ReplyError::ReplyTooLong)]);

        let long_line = format!("250-{}\r\n", "y".repeat(MAX_LINE - 6));
        let mut big = long_line.repeat(MAX_REPLY / long_line.len() + 1).into_bytes();
        big.extend_from_slice(b"250 end\r\n");
        assert_eq!(parse_all(&big), [Err(ReplyError::ReplyTooLong)]);
    }

    #[test]
    fn text_is_sanitized() {
        let results = parse_all(b"550 5.7.1 bad\x00\x1b[2J\tthing \xff\xfe end\x7f\r\n");
        let [Ok(reply)] = &results[..] else { panic!("{results:?}") };
        assert_eq!(reply.lines, ["bad??[2J thing \u{fffd}\u{fffd} end?"]);
        // A CR inside a line cannot start a new one.
        let results = parse_all(b"250 a\rb\r\n");
        assert_eq!(results, [Ok(self::reply(250, None, &["a?b"]))]);
        // UTF-8 (RFC 6531 section 3.7.4) passes through.
        let results = parse_all("550 5.1.1 Kein Empfänger\r\n".as_bytes());
        assert_eq!(results[0].as_ref().unwrap().lines, ["Kein Empfänger"]);
    }

    #[test]
    fn enhanced_status_present_absent_and_mismatched() {
        let cases: &[(&[u8], Option<EnhancedStatus>, &[&str])] = &[
            (b"550 5.1.1 No such user\r\n", Some(EnhancedStatus(5, 1, 1)), &["No such user"]),
            (b"550 No such user\r\n", None, &["No such user"]),
            (b"452 4.5.3 Too many\r\n", Some(EnhancedStatus(4, 5, 3)), &["Too many"]),
            (b"250 2.0.0\r\n", Some(EnhancedStatus(2, 0, 0)), &[""]),
            (b"550 5.123.456 x\r\n", Some(EnhancedStatus(5, 123, 456)), &["x"]),
            // Class does not match the reply code.
            (b"550 4.1.1 x\r\n", None, &["4.1.1 x"]),
            (b"250 5.0.0 x\r\n", None, &["5.0.0 x"]),
            // 3xx replies carry none (RFC 2034 section 4).
            (b"354 2.0.0 Go ahead\r\n", None, &["2.0.0 Go ahead"]),
            // Not well-formed.
            (b"550 5.1 x\r\n", None, &["5.1 x"]),
            (b"550 5.1.1234 x\r\n", None, &["5.1.1234 x"]),
            (b"550 5.1234.1 x\r\n", None, &["5.1234.1 x"]),
            (b"550 5..1 x\r\n", None, &["5..1 x"]),
            (b"550 5.1.1x\r\n", None, &["5.1.1x"]),
            (b"550 5.1.1. x\r\n", None, &["5.1.1. x"]),
            (b"550 5.1.\r\n", None, &["5.1."]),
            // Repeated on every line, removed from each; a different code on a later line stays.
            (
                b"550-5.7.1 one\r\n550-5.7.1 two\r\n550-5.7.2 three\r\n550 5.7.1\r\n",
                Some(EnhancedStatus(5, 7, 1)),
                &["one", "two", "5.7.2 three", ""],
            ),
            // Only on the first line.
            (b"550-5.7.1 one\r\n550 two\r\n", Some(EnhancedStatus(5, 7, 1)), &["one", "two"]),
            // Only on a later line: not the reply's.
            (b"550-one\r\n550 5.7.1 two\r\n", None, &["one", "5.7.1 two"]),
        ];
        for (input, status, lines) in cases {
            let results = parse_all(input);
            let code = std::str::from_utf8(&input[..3]).unwrap().parse().unwrap();
            assert_eq!(
                results,
                [Ok(reply(code, *status, lines))],
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn classes_and_display() {
        let [Ok(refused)] = &parse_all(b"550-5.1.1 No such\r\n550 5.1.1 user\r\n")[..] else {
            panic!()
        };
        assert!(refused.is_permanent() && !refused.is_transient() && !refused.is_positive());
        assert_eq!(refused.to_string(), "550 5.1.1 No such user");
        assert_eq!(refused.text(), "No such\nuser");

        let [Ok(later)] = &parse_all(b"451 Try later\r\n")[..] else { panic!() };
        assert!(later.is_transient() && !later.is_permanent());
        assert_eq!(later.to_string(), "451 Try later");

        let [Ok(go)] = &parse_all(b"354\r\n")[..] else { panic!() };
        assert!(go.is_intermediate() && !go.is_positive());
        assert_eq!(go.to_string(), "354");

        let [Ok(ok)] = &parse_all(b"250-\r\n250 \r\n")[..] else { panic!() };
        assert!(ok.is_positive());
        assert_eq!(ok.to_string(), "250");
    }

    /// Reply text lines as [`Reply`] writes them: no line breaks inside, and nothing at the
    /// start of the first line that reads as an enhanced status code.
    fn reply_text() -> impl Strategy<Value = String> {
        prop::collection::vec("[ -~\u{a0}-\u{2fff}]{0,30}", 1..5)
            .prop_map(|lines| lines.join("\n"))
            .prop_filter("starts like a status code", |text| {
                !text.starts_with(|c: char| c.is_ascii_digit())
            })
    }

    proptest! {
        #[test]
        fn round_trips_through_the_server_reply_writer(
            code in 200u16..600,
            subject in 0u16..1000,
            detail in 0u16..1000,
            with_status in any::<bool>(),
            text in reply_text(),
            chunk in 1usize..64,
        ) {
            let class = (code / 100) as u8;
            let status =
                (with_status && class != 3).then_some(EnhancedStatus(class, subject, detail));
            let written = Reply { code, status, text: text.clone().into(), close: false };
            let mut parser = ReplyParser::new();
            for piece in written.to_bytes().chunks(chunk) {
                parser.feed(piece);
            }
            let parsed = parser.next_reply().unwrap().unwrap();
            prop_assert_eq!(parsed.code, code);
            prop_assert_eq!(parsed.status, status);
            prop_assert_eq!(parsed.text(), text);
            prop_assert_eq!(parser.next_reply(), None);
            prop_assert!(parser.is_empty());
        }

        #[test]
        fn display_is_one_line(input in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut line = b"550 ".to_vec();
            line.extend(input.iter().filter(|&&b| b != b'\n'));
            line.extend_from_slice(b"\r\n");
            if let Some(Ok(reply)) = parse_all(&line).pop() {
                let shown = reply.to_string();
                prop_assert!(!shown.chars().any(char::is_control), "{:?}", shown);
            }
        }

        #[test]
        fn never_panics_and_stays_bounded(
            input in prop::collection::vec(any::<u8>(), 0..2000),
            chunk in 1usize..300,
        ) {
            let mut parser = ReplyParser::new();
            for piece in input.chunks(chunk) {
                parser.feed(piece);
                while let Some(Ok(_)) = parser.next_reply() {}
                prop_assert!(parser.partial.len() < MAX_LINE);
            }
        }
    }
}

//! The generated message: RFC 5322 headers of a fixed length, in which only the message number
//! changes from one message to the next, and a body built once and shared by every session.

use std::sync::Arc;

/// Digits of the message number in the Subject and Message-ID fields. Fixed width keeps every
/// message the same size; `main` rejects message counts that do not fit.
pub const NUMBER_WIDTH: usize = 10;

/// Printable characters the body lines cycle through (none of them is a dot).
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Characters per full body line, not counting CRLF.
const LINE_CHARS: usize = 76;
const LINE_OCTETS: usize = LINE_CHARS + 2;

/// Everything about the message that is the same for all messages of a run.
pub struct Template {
    head: Box<[u8]>,
    number_fields: [usize; 2],
    /// The dot-stuffed body after the header block, ending with CRLF unless empty. The
    /// end-of-data line is not included.
    pub body: Arc<[u8]>,
}

/// A session's own copy of the header block, patched in place for each message.
pub struct Head {
    bytes: Vec<u8>,
    number_fields: [usize; 2],
}

/// What the headers say.
pub struct HeaderFields<'a> {
    pub from: &'a str,
    pub recipients: &'a [String],
    pub helo: &'a str,
    /// An RFC 5322 date-time, see [`rfc5322_date`].
    pub date: &'a str,
    /// Makes Message-IDs unique across runs.
    pub run_tag: &'a str,
}

impl Template {
    /// A message of `size` octets in total: the headers, then lines of 76 printable characters
    /// and a shorter last line. When `size` is smaller than the headers, the message is just the
    /// headers (the one impossible size, headers plus one octet, gets one octet more).
    pub fn new(fields: &HeaderFields<'_>, size: usize) -> Template {
        let zeros = "0".repeat(NUMBER_WIDTH);
        let mut head = Vec::with_capacity(512);
        let from = if fields.from.is_empty() {
            format!("loadgen@{}", fields.helo)
        } else {
            fields.from.to_owned()
        };
        head.extend_from_slice(format!("From: <{from}>\r\n").as_bytes());
        head.extend_from_slice(b"To: ");
        for (index, recipient) in fields.recipients.iter().enumerate() {
            if index > 0 {
                // One address per line keeps the header lines short for any recipient count.
                head.extend_from_slice(b",\r\n ");
            }
            head.extend_from_slice(format!("<{recipient}>").as_bytes());
        }
        head.extend_from_slice(b"\r\nSubject: loadgen message ");
        let subject_number = head.len();
        head.extend_from_slice(zeros.as_bytes());
        head.extend_from_slice(format!("\r\nDate: {}\r\nMessage-ID: <", fields.date).as_bytes());
        let id_number = head.len();
        head.extend_from_slice(zeros.as_bytes());
        head.extend_from_slice(format!(".{}@{}>\r\n\r\n", fields.run_tag, fields.helo).as_bytes());
        let body = dot_stuff(&body_lines(size.saturating_sub(head.len())));
        Template {
            head: head.into_boxed_slice(),
            number_fields: [subject_number, id_number],
            body: body.into(),
        }
    }

    /// A fresh copy of the header block for one session.
    pub fn head(&self) -> Head {
        Head { bytes: self.head.to_vec(), number_fields: self.number_fields }
    }

    /// Octets per message, headers and body (after dot-stuffing, without the final dot line).
    pub fn message_len(&self) -> usize {
        self.head.len() + self.body.len()
    }
}

impl Head {
    /// Writes `number` into the Subject and Message-ID fields and returns the header block.
    pub fn with_number(&mut self, number: u64) -> &[u8] {
        for start in self.number_fields {
            put_decimal(&mut self.bytes[start..start + NUMBER_WIDTH], number);
        }
        &self.bytes
    }
}

/// Writes `value` as zero-padded decimal filling `digits` (higher digits are dropped).
fn put_decimal(digits: &mut [u8], mut value: u64) {
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// `len` octets of body lines (76 printable characters and CRLF, the last one shorter), or
/// two octets when `len` is 1.
pub fn body_lines(len: usize) -> Vec<u8> {
    let full = len / LINE_OCTETS;
    let (full, last) = match len % LINE_OCTETS {
        0 => (full, None),
        // A line cannot be one octet long: lengthen the previous line by one character.
        1 if full > 0 => (full - 1, Some(LINE_CHARS + 1)),
        1 => (0, Some(0)),
        rest => (full, Some(rest - 2)),
    };
    let mut out = Vec::with_capacity(len + 2);
    for line in 0..full {
        push_line(&mut out, line, LINE_CHARS);
    }
    if let Some(chars) = last {
        push_line(&mut out, full, chars);
    }
    out
}

fn push_line(out: &mut Vec<u8>, line: usize, chars: usize) {
    out.extend((0..chars).map(|column| ALPHABET[(line + column) % ALPHABET.len()]));
    out.extend_from_slice(b"\r\n");
}

/// Doubles a dot at the start of every line (RFC 5321 section 4.5.2).
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 64 + 1);
    let mut line_start = true;
    for &byte in data {
        if line_start && byte == b'.' {
            out.push(b'.');
        }
        out.push(byte);
        line_start = byte == b'\n';
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(recipients: &[String]) -> HeaderFields<'_> {
        HeaderFields {
            from: "sender@example.org",
            recipients,
            helo: "loadgen.example",
            date: "Thu, 01 Jan 1970 00:00:00 +0000",
            run_tag: "tag",
        }
    }

    fn lines(data: &[u8]) -> Vec<&[u8]> {
        let mut lines: Vec<&[u8]> = data.split_inclusive(|&b| b == b'\n').collect();
        assert!(lines.iter().all(|line| line.ends_with(b"\r\n")), "every line ends with CRLF");
        for line in &mut lines {
            *line = &line[..line.len() - 2];
        }
        lines
    }

    #[test]
    fn body_lines_have_the_exact_length() {
        for len in (0..400).chain([1024, 4095, 100 * 1024]) {
            let body = body_lines(len);
            let expected = if len == 1 { 2 } else { len };
            assert_eq!(body.len(), expected, "len {len}");
            for line in lines(&body) {
                assert!(line.len() <= LINE_CHARS + 1);
                assert!(line.iter().all(|b| b.is_ascii_graphic()));
            }
        }
    }

    #[test]
    fn full_lines_are_76_characters() {
        let body = body_lines(10 * LINE_OCTETS);
        assert!(lines(&body).iter().all(|line| line.len() == LINE_CHARS));
    }

    #[test]
    fn messages_have_the_requested_size() {
        let recipients = vec!["user@localhost".to_owned()];
        for size in [300, 1000, 1024, 1025, 10_000, 100 * 1024] {
            let template = Template::new(&fields(&recipients), size);
            assert_eq!(template.message_len(), size);
            assert!(!template.body.starts_with(b"."));
            assert!(template.body.ends_with(b"\r\n"));
        }
        // Smaller than the headers: just the headers.
        let template = Template::new(&fields(&recipients), 10);
        assert!(template.body.is_empty());
        assert!(template.head().with_number(0).ends_with(b"\r\n\r\n"));
    }

    #[test]
    fn headers_are_valid_and_carry_the_number() {
        let recipients = vec!["a@localhost".to_owned(), "b@localhost".to_owned()];
        let template = Template::new(&fields(&recipients), 1024);
        let mut head = template.head();
        let first = head.with_number(42).to_vec();
        let second = head.with_number(9_999_999_999).to_vec();
        assert_eq!(first.len(), second.len());
        let text = String::from_utf8(first).unwrap();
        assert!(text.starts_with("From: <sender@example.org>\r\n"));
        assert!(text.contains("To: <a@localhost>,\r\n <b@localhost>\r\n"));
        assert!(text.contains("Subject: loadgen message 0000000042\r\n"));
        assert!(text.contains("Date: Thu, 01 Jan 1970 00:00:00 +0000\r\n"));
        assert!(text.contains("Message-ID: <0000000042.tag@loadgen.example>\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        for line in lines(text.as_bytes()) {
            assert!(line.len() < 998);
            assert!(!line.starts_with(b"."));
        }
        assert!(String::from_utf8(second).unwrap().contains("message 9999999999\r\n"));
    }

    #[test]
    fn dot_stuffing_doubles_leading_dots_only() {
        assert_eq!(dot_stuff(b".a\r\nb.\r\n..c\r\n.\r\n"), b"..a\r\nb.\r\n...c\r\n..\r\n");
        assert_eq!(dot_stuff(b"no dots\r\n"), b"no dots\r\n");
        assert_eq!(dot_stuff(b""), b"");
        assert_eq!(dot_stuff(b"x\r\n."), b"x\r\n..");
    }
}

//! Incremental decoders for the two framings of the SMTP byte stream: command lines and the
//! DATA body. Both accept input split at any byte boundary and never buffer more than a fixed
//! bound, whatever the client sends.

/// Collects one command line at a time, up to a fixed maximum length.
///
/// Lines end with LF; a CR before the LF is removed. RFC 5321 section 2.3.8 requires CRLF, but a
/// bare LF at the end of a command line cannot change where a command ends, so accepting it
/// costs nothing and helps hand-typed sessions. A CR anywhere else stays in the line and makes
/// the parser reject it.
#[derive(Debug)]
pub struct LineReader {
    buf: Vec<u8>,
    max: usize,
    /// The current line has exceeded `max`; its bytes are being discarded until the LF.
    overflow: bool,
}

/// What [`LineReader::read`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead<'a> {
    /// A complete line, without its line ending.
    Line(&'a [u8]),
    /// A complete line that was longer than the maximum; its content was discarded.
    TooLong,
    /// All input was consumed and no line is complete yet.
    Incomplete,
}

impl LineReader {
    /// `max` is the longest accepted line in octets, including its CRLF.
    pub fn new(max: usize) -> LineReader {
        LineReader { buf: Vec::with_capacity(max.min(1024)), max, overflow: false }
    }

    /// Consumes input up to and including the first LF. Returns how many bytes were consumed
    /// and what was found. The line borrowed from the reader is valid until the next call.
    pub fn read<'a>(&'a mut self, input: &[u8]) -> (usize, LineRead<'a>) {
        match input.iter().position(|&b| b == b'\n') {
            Some(lf) => {
                let consumed = lf + 1;
                if self.overflow || self.buf.len() + consumed > self.max {
                    self.overflow = false;
                    self.buf.clear();
                    return (consumed, LineRead::TooLong);
                }
                self.buf.extend_from_slice(&input[..lf]);
                if self.buf.last() == Some(&b'\r') {
                    self.buf.pop();
                }
                (consumed, LineRead::Line(&self.buf))
            }
            None => {
                if !self.overflow {
                    if self.buf.len() + input.len() >= self.max {
                        // Too long already: forget it now rather than grow, and report it
                        // when its end arrives.
                        self.overflow = true;
                        self.buf.clear();
                    } else {
                        self.buf.extend_from_slice(input);
                    }
                }
                (input.len(), LineRead::Incomplete)
            }
        }
    }

    /// Forgets the line returned by the last [`LineReader::read`], ready for the next one.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// Forgets any partial line, e.g. after STARTTLS.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.overflow = false;
    }
}

/// How a DATA body treats CR and LF octets that are not part of a CRLF pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BareLineEndings {
    /// Refuse the message at the first bare CR or LF (RFC 5321 section 2.3.8: "MUST NOT"
    /// be sent). This is what closes SMTP smuggling: no reading of the stream can disagree
    /// with ours about where the message ends.
    #[default]
    Reject,
    /// For legacy clients: turn each bare CR or LF into CRLF. The end of data is still only
    /// the exact bytes CRLF "." CRLF, so a smuggled "\n.\n" or "\n.\r\n" stays inside the
    /// message as an ordinary line.
    Normalize,
}

/// The DATA body decoder: finds the end of data, removes dot-stuffing (RFC 5321 section
/// 4.5.2) and applies the bare line ending policy, appending the message to a caller buffer.
#[derive(Debug)]
pub struct DataDecoder {
    state: DataState,
    policy: BareLineEndings,
    /// Message octets kept so far; the body stops growing past `max_size`.
    size: u64,
    max_size: u64,
    /// Octets in the current line, including the line ending; used for the line limit.
    line_len: usize,
    max_line: usize,
    too_big: bool,
    line_too_long: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataState {
    /// At the start of a line. `after_crlf` is false when the previous line ended with a
    /// normalized bare CR or LF: then a following "." CRLF is content, not the end.
    LineStart { after_crlf: bool },
    /// A "." at the start of a line.
    Dot { after_crlf: bool },
    /// "." CR at the start of a line.
    DotCr { after_crlf: bool },
    /// Inside a line.
    Text,
    /// A CR inside a line.
    Cr,
}

/// What [`DataDecoder::decode`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataProgress {
    /// All input consumed; the message continues.
    NeedMore,
    /// The end of data: `consumed` octets (including the final CRLF "." CRLF) were used.
    End { consumed: usize },
    /// A bare CR or LF under [`BareLineEndings::Reject`]; the stream cannot be trusted further.
    BareLineEnding,
}

/// Why a completely received message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDefect {
    TooBig,
    LineTooLong,
}

impl DataDecoder {
    /// `max_size` bounds the octets appended to the body; `max_line` is the longest text line
    /// in octets including CRLF (RFC 5321 section 4.5.3.1.6: 1000), 0 for no limit.
    pub fn new(policy: BareLineEndings, max_size: u64, max_line: usize) -> DataDecoder {
        DataDecoder {
            state: DataState::LineStart { after_crlf: true },
            policy,
            size: 0,
            max_size,
            line_len: 0,
            max_line,
            too_big: false,
            line_too_long: false,
        }
    }

    /// The first defect of the message, once it is complete.
    pub fn defect(&self) -> Option<DataDefect> {
        if self.too_big {
            Some(DataDefect::TooBig)
        } else if self.line_too_long {
            Some(DataDefect::LineTooLong)
        } else {
            None
        }
    }

    /// Decodes input, appending message octets to `body`.
    pub fn decode(&mut self, input: &[u8], body: &mut Vec<u8>) -> DataProgress {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                DataState::Text => {
                    // The hot path: copy the run of ordinary octets up to the next CR or LF.
                    let rest = &input[i..];
                    let run = rest.iter().position(|&b| b == b'\r' || b == b'\n');
                    let n = run.unwrap_or(rest.len());
                    self.line_len += n;
                    // Known too long before its end: the line is not kept (see `emit`).
                    if self.max_line != 0 && self.line_len > self.max_line {
                        self.line_too_long = true;
                    }
                    self.emit(body, &rest[..n]);
                    i += n;
                    if run.is_some() {
                        if input[i] == b'\r' {
                            self.state = DataState::Cr;
                        } else if !self.bare(body) {
                            return DataProgress::BareLineEnding;
                        }
                        i += 1;
                    }
                }
                DataState::Cr => {
                    if input[i] == b'\n' {
                        self.line_len += 2;
                        self.end_line(body, true);
                        i += 1;
                    } else {
                        // The CR before this octet was bare; the octet itself is looked at
                        // again from the start of the next line.
                        if !self.bare(body) {
                            return DataProgress::BareLineEnding;
                        }
                    }
                }
                DataState::LineStart { after_crlf } => {
                    if input[i] == b'.' {
                        self.state = DataState::Dot { after_crlf };
                        self.line_len = 1;
                        i += 1;
                    } else {
                        self.state = DataState::Text;
                    }
                }
                DataState::Dot { after_crlf } => match input[i] {
                    b'\r' => {
                        self.state = DataState::DotCr { after_crlf };
                        i += 1;
                    }
                    b'\n' => {
                        // "." then a bare LF: never the end of data.
                        self.emit(body, b".");
                        if !self.bare(body) {
                            return DataProgress::BareLineEnding;
                        }
                        i += 1;
                    }
                    _ => {
                        // RFC 5321 section 4.5.2: a leading period followed by other
                        // characters is deleted (it was added by the client's stuffing).
                        self.state = DataState::Text;
                    }
                },
                DataState::DotCr { after_crlf } => {
                    if input[i] == b'\n' {
                        if after_crlf {
                            // RFC 5321 section 4.1.1.4: the mail data is terminated by a line
                            // containing only a period, i.e. exactly CRLF "." CRLF.
                            self.state = DataState::LineStart { after_crlf: true };
                            return DataProgress::End { consumed: i + 1 };
                        }
                        // Only reachable when normalizing: the line before ended with a bare
                        // line ending, so this "." line is content.
                        self.emit(body, b".");
                        self.line_len += 2;
                        self.end_line(body, true);
                        i += 1;
                    } else {
                        self.emit(body, b".");
                        if !self.bare(body) {
                            return DataProgress::BareLineEnding;
                        }
                    }
                }
            }
        }
        DataProgress::NeedMore
    }

    /// Handles a bare CR or LF: fails under `Reject`, otherwise emits CRLF and starts a line
    /// that cannot end the data. The caller consumes a bare LF; after a bare CR, the octet
    /// that followed it has not been consumed and is read again at the new line start.
    fn bare(&mut self, body: &mut Vec<u8>) -> bool {
        if self.policy == BareLineEndings::Reject {
            return false;
        }
        self.line_len += 1;
        self.end_line(body, false);
        true
    }

    fn end_line(&mut self, body: &mut Vec<u8>, after_crlf: bool) {
        self.emit(body, b"\r\n");
        if self.max_line != 0 && self.line_len > self.max_line {
            self.line_too_long = true;
        }
        self.line_len = 0;
        self.state = DataState::LineStart { after_crlf };
    }

    fn emit(&mut self, body: &mut Vec<u8>, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if self.size > self.max_size {
            self.too_big = true;
        } else if self.line_too_long {
            // The message will be refused at its end: nothing of it needs keeping, and an
            // endless line must not grow memory up to the size limit.
            if body.capacity() != 0 {
                *body = Vec::new();
            }
        } else {
            body.extend_from_slice(bytes);
        }
    }
}

/// Makes message content transparent for sending with DATA (RFC 5321 section 4.5.2) and
/// appends the terminating "." line: a "." at the start of a line is doubled, every CR or LF
/// that is not part of a CRLF pair becomes CRLF (section 2.3.8: they "MUST NOT" be sent, and a
/// receiver that reads them as line endings must not find an end of data we did not mean), and
/// a last line without a line ending gets one.
pub fn dot_stuff(content: &[u8], out: &mut Vec<u8>) {
    let mut at_line_start = true;
    let mut rest = content;
    while let Some(&first) = rest.first() {
        if at_line_start && first == b'.' {
            out.push(b'.');
        }
        let Some(end) = rest.iter().position(|&b| b == b'\r' || b == b'\n') else {
            out.extend_from_slice(rest);
            at_line_start = false;
            break;
        };
        out.extend_from_slice(&rest[..end]);
        out.extend_from_slice(b"\r\n");
        let crlf = rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n');
        rest = &rest[end + if crlf { 2 } else { 1 }..];
        at_line_start = true;
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(policy: BareLineEndings, input: &[u8]) -> (DataProgress, Vec<u8>) {
        let mut decoder = DataDecoder::new(policy, u64::MAX, 0);
        let mut body = Vec::new();
        let progress = decoder.decode(input, &mut body);
        (progress, body)
    }

    /// Feeds `input` split at every pair of boundaries and checks the result is the same.
    fn decode_split_everywhere(policy: BareLineEndings, input: &[u8]) -> (DataProgress, Vec<u8>) {
        let whole = decode_all(policy, input);
        for a in 0..=input.len() {
            for b in a..=input.len() {
                let mut decoder = DataDecoder::new(policy, u64::MAX, 0);
                let mut body = Vec::new();
                let mut offset = 0;
                let mut result = DataProgress::NeedMore;
                for part in [&input[..a], &input[a..b], &input[b..]] {
                    match decoder.decode(part, &mut body) {
                        DataProgress::NeedMore => offset += part.len(),
                        DataProgress::End { consumed } => {
                            result = DataProgress::End { consumed: offset + consumed };
                            break;
                        }
                        DataProgress::BareLineEnding => {
                            result = DataProgress::BareLineEnding;
                            break;
                        }
                    }
                }
                assert_eq!((result, &body), (whole.0, &whole.1), "split at {a},{b}");
            }
        }
        whole
    }

    #[test]
    fn simple_message_ends_at_crlf_dot_crlf() {
        let input = b"Subject: x\r\n\r\nhello\r\n.\r\nMAIL FROM:<a@b>\r\n";
        let (progress, body) = decode_split_everywhere(BareLineEndings::Reject, input);
        assert_eq!(progress, DataProgress::End { consumed: input.len() - 17 });
        assert_eq!(body, b"Subject: x\r\n\r\nhello\r\n");
    }

    #[test]
    fn empty_message() {
        let (progress, body) = decode_split_everywhere(BareLineEndings::Reject, b".\r\n");
        assert_eq!(progress, DataProgress::End { consumed: 3 });
        assert!(body.is_empty());
    }

    #[test]
    fn dot_unstuffing() {
        let input = b"..leading\r\n...two\r\n.x\r\n. \r\nmid.dle\r\n.\r\n";
        let (progress, body) = decode_split_everywhere(BareLineEndings::Reject, input);
        assert_eq!(progress, DataProgress::End { consumed: input.len() });
        assert_eq!(body, b".leading\r\n..two\r\nx\r\n \r\nmid.dle\r\n");
    }

    #[test]
    fn stuffed_dot_line_is_not_the_end() {
        let input = b"a\r\n..\r\nb\r\n.\r\n";
        let (progress, body) = decode_split_everywhere(BareLineEndings::Reject, input);
        assert_eq!(progress, DataProgress::End { consumed: input.len() });
        assert_eq!(body, b"a\r\n.\r\nb\r\n");
    }

    /// Every fake end-of-data of the SMTP smuggling class, with the real end after it.
    const SMUGGLING: &[&[u8]] = &[
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\n.\r",
        b"\r\n\x00.\r\n",
        b"\r\n.\x00\r\n",
        b"\r\n .\r\n",
        b"\r\n.\t\r\n",
        b"\r\n. \r\n",
    ];

    #[test]
    fn smuggling_variants_are_rejected_or_stay_content() {
        for fake in SMUGGLING {
            let mut input = b"first\r\nline".to_vec();
            input.extend_from_slice(fake);
            input.extend_from_slice(
                b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            let bare = fake.iter().enumerate().any(|(i, &b)| {
                (b == b'\n' && (i == 0 || fake[i - 1] != b'\r'))
                    || (b == b'\r' && fake.get(i + 1) != Some(&b'\n'))
            });
            let (progress, body) = decode_split_everywhere(BareLineEndings::Reject, &input);
            if bare {
                assert_eq!(progress, DataProgress::BareLineEnding, "{fake:?}");
            } else {
                // Not bare (NUL or blanks around the dot): plain content, ends only at the
                // real end, with everything in between kept as message text.
                assert_eq!(progress, DataProgress::End { consumed: input.len() }, "{fake:?}");
                assert!(body.windows(9).any(|w| w == b"MAIL FROM"), "{fake:?}");
            }
            let (progress, body) = decode_split_everywhere(BareLineEndings::Normalize, &input);
            assert_eq!(progress, DataProgress::End { consumed: input.len() }, "{fake:?}");
            assert!(body.windows(8).any(|w| w == b"smuggled"), "{fake:?}");
            assert!(body.windows(9).any(|w| w == b"MAIL FROM"), "{fake:?}");
            assert!(!body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "{fake:?}");
        }
    }

    #[test]
    fn normalize_turns_bare_endings_into_crlf() {
        let input = b"a\nb\rc\r\n.\r\n";
        let (progress, body) = decode_split_everywhere(BareLineEndings::Normalize, input);
        assert_eq!(progress, DataProgress::End { consumed: input.len() });
        assert_eq!(body, b"a\r\nb\r\nc\r\n");
    }

    #[test]
    fn normalized_dot_line_is_content_and_keeps_its_dot() {
        let input = b"a\n.\r\nb\r\n.\r\n";
        let (progress, body) = decode_split_everywhere(BareLineEndings::Normalize, input);
        assert_eq!(progress, DataProgress::End { consumed: input.len() });
        assert_eq!(body, b"a\r\n.\r\nb\r\n");
    }

    #[test]
    fn reject_stops_at_first_bare_ending() {
        for input in [&b"a\nb\r\n.\r\n"[..], b"a\rb\r\n.\r\n", b".\n", b".\rx"] {
            let (progress, _) = decode_split_everywhere(BareLineEndings::Reject, input);
            assert_eq!(progress, DataProgress::BareLineEnding, "{input:?}");
        }
    }

    #[test]
    fn binary_octets_pass_through() {
        let mut input: Vec<u8> = (0u8..=255).filter(|&b| b != b'\r' && b != b'\n').collect();
        input.extend_from_slice(b"\r\n.\r\n");
        let (progress, body) = decode_all(BareLineEndings::Reject, &input);
        assert_eq!(progress, DataProgress::End { consumed: input.len() });
        assert_eq!(body, &input[..input.len() - 3]);
    }

    #[test]
    fn size_limit_stops_growth_but_finds_the_end() {
        let mut decoder = DataDecoder::new(BareLineEndings::Reject, 10, 0);
        let mut body = Vec::new();
        let line = b"0123456789012345678901234567890123456789\r\n";
        for _ in 0..1000 {
            assert_eq!(decoder.decode(line, &mut body), DataProgress::NeedMore);
        }
        assert_eq!(decoder.decode(b".\r\n", &mut body), DataProgress::End { consumed: 3 });
        assert!(body.len() <= 10);
        assert_eq!(decoder.defect(), Some(DataDefect::TooBig));
    }

    #[test]
    fn an_overlong_line_is_not_kept() {
        let mut decoder = DataDecoder::new(BareLineEndings::Reject, u64::MAX, 1000);
        let mut body = Vec::new();
        decoder.decode(b"Subject: x\r\n\r\n", &mut body);
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..64 {
            assert_eq!(decoder.decode(&chunk, &mut body), DataProgress::NeedMore);
            assert!(body.capacity() < 4096, "4 MiB of one line must not be held");
        }
        assert_eq!(decoder.decode(b"\r\n.\r\n", &mut body), DataProgress::End { consumed: 5 });
        assert_eq!(decoder.defect(), Some(DataDefect::LineTooLong));
    }

    #[test]
    fn line_limit_counts_crlf() {
        let mut decoder = DataDecoder::new(BareLineEndings::Reject, u64::MAX, 10);
        let mut body = Vec::new();
        decoder.decode(b"12345678\r\n.\r\n", &mut body);
        assert_eq!(decoder.defect(), None);
        let mut decoder = DataDecoder::new(BareLineEndings::Reject, u64::MAX, 10);
        decoder.decode(b"123456789\r\n.\r\n", &mut body);
        assert_eq!(decoder.defect(), Some(DataDefect::LineTooLong));
        let mut decoder = DataDecoder::new(BareLineEndings::Reject, u64::MAX, 10);
        decoder.decode(b"..3456789\r\n.\r\n", &mut body);
        assert_eq!(decoder.defect(), Some(DataDefect::LineTooLong), "stuffed dot counts");
    }

    #[test]
    fn line_reader_handles_splits_and_bare_lf() {
        let mut reader = LineReader::new(512);
        assert_eq!(reader.read(b"EHLO x"), (6, LineRead::Incomplete));
        assert_eq!(reader.read(b".org\r"), (5, LineRead::Incomplete));
        assert_eq!(reader.read(b"\nNOOP\r\n"), (1, LineRead::Line(b"EHLO x.org")));
        reader.clear();
        assert_eq!(reader.read(b"NOOP\r\n"), (6, LineRead::Line(b"NOOP")));
        reader.clear();
        assert_eq!(reader.read(b"QUIT\n"), (5, LineRead::Line(b"QUIT")));
    }

    #[test]
    fn line_reader_bounds_memory_on_huge_lines() {
        let mut reader = LineReader::new(512);
        let chunk = vec![b'A'; 64 * 1024];
        for _ in 0..100 {
            assert_eq!(reader.read(&chunk), (chunk.len(), LineRead::Incomplete));
            assert!(reader.buf.capacity() <= 1024);
        }
        assert_eq!(reader.read(b"AAA\r\nNOOP\r\n"), (5, LineRead::TooLong));
        assert_eq!(reader.read(b"NOOP\r\n"), (6, LineRead::Line(b"NOOP")));
    }

    #[test]
    fn line_reader_limit_is_exact() {
        let mut reader = LineReader::new(8);
        assert_eq!(reader.read(b"123456\r\n"), (8, LineRead::Line(b"123456")));
        reader.clear();
        assert_eq!(reader.read(b"1234567\r\n"), (9, LineRead::TooLong));
        assert_eq!(reader.read(b"1234"), (4, LineRead::Incomplete));
        assert_eq!(reader.read(b"567\r\n"), (5, LineRead::TooLong));
    }

    #[test]
    fn dot_stuff_round_trips_through_the_decoder() {
        let content = b".a\r\n..b\r\nc.\r\n.\r\n\r\nend";
        let mut wire = Vec::new();
        dot_stuff(content, &mut wire);
        assert_eq!(wire, b"..a\r\n...b\r\nc.\r\n..\r\n\r\nend\r\n.\r\n");
        let (progress, body) = decode_all(BareLineEndings::Reject, &wire);
        assert_eq!(progress, DataProgress::End { consumed: wire.len() });
        assert_eq!(body, b".a\r\n..b\r\nc.\r\n.\r\n\r\nend\r\n");
    }

    #[test]
    fn dot_stuff_turns_bare_line_endings_into_crlf() {
        let mut wire = Vec::new();
        dot_stuff(b"a\nb\rc\r\r\n.\n.\r.", &mut wire);
        assert_eq!(wire, b"a\r\nb\r\nc\r\n\r\n..\r\n..\r\n..\r\n.\r\n");
        let (progress, body) = decode_all(BareLineEndings::Reject, &wire);
        assert_eq!(progress, DataProgress::End { consumed: wire.len() });
        assert_eq!(body, b"a\r\nb\r\nc\r\n\r\n.\r\n.\r\n.\r\n");
    }
}

//! Reading SMTP replies (RFC 5321 section 4.2): one buffer per connection, replies of one or
//! more lines, any of which may arrive split across reads, several of which may arrive in one
//! read (pipelining).

use std::fmt;
use std::ops::Range;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Initial buffer size; enough for any ordinary reply and many pipelined ones.
const INITIAL_BUFFER: usize = 4096;
/// A reply longer than this is treated as a protocol error.
const MAX_REPLY: usize = 64 * 1024;

#[derive(Debug)]
pub enum ReplyError {
    /// Not an SMTP reply; the text says why.
    Malformed(String),
    /// No end of reply within [`MAX_REPLY`] octets.
    TooLong,
    /// The server closed the connection.
    Closed,
    Io(std::io::Error),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Malformed(why) => write!(f, "malformed reply: {why}"),
            ReplyError::TooLong => write!(f, "reply longer than {MAX_REPLY} octets"),
            ReplyError::Closed => write!(f, "connection closed by the server"),
            ReplyError::Io(error) => write!(f, "reading reply: {error}"),
        }
    }
}

/// Looks for one complete reply at the start of `data`. Returns its code and length in octets,
/// or `None` when more data is needed. Lines end with LF, optionally preceded by CR; all lines of
/// a reply must carry the same code; every line but the last has `-` after the code.
pub fn parse_reply(data: &[u8]) -> Result<Option<(u16, usize)>, ReplyError> {
    let mut code = None;
    let mut position = 0;
    while let Some(newline) = data[position..].iter().position(|&b| b == b'\n') {
        let end = position + newline + 1;
        let mut line = &data[position..end - 1];
        if let Some(without_cr) = line.strip_suffix(b"\r") {
            line = without_cr;
        }
        let (line_code, last) = parse_line(line)?;
        if code.is_some_and(|code| code != line_code) {
            return Err(ReplyError::Malformed(format!(
                "line with code {line_code} continues a reply with code {}",
                code.unwrap_or_default()
            )));
        }
        code = Some(line_code);
        position = end;
        if last {
            return Ok(Some((line_code, end)));
        }
    }
    Ok(None)
}

/// The code of one reply line (without its line ending) and whether it is the reply's last.
fn parse_line(line: &[u8]) -> Result<(u16, bool), ReplyError> {
    let malformed = || {
        ReplyError::Malformed(format!("{:?}", String::from_utf8_lossy(&line[..line.len().min(80)])))
    };
    let digits = line.get(..3).ok_or_else(malformed)?;
    if !(b'1'..=b'5').contains(&digits[0]) || !digits[1..].iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    let code = digits.iter().fold(0u16, |code, digit| code * 10 + u16::from(digit - b'0'));
    match line.get(3) {
        None | Some(b' ') => Ok((code, true)),
        Some(b'-') => Ok((code, false)),
        Some(_) => Err(malformed()),
    }
}

/// Whether an EHLO reply advertises `keyword` (case-insensitive), e.g. `PIPELINING`.
pub fn ehlo_has(reply: &[u8], keyword: &str) -> bool {
    reply.split(|&b| b == b'\n').skip(1).any(|line| {
        let text = line.get(4..).unwrap_or_default();
        let word_end = text.iter().position(|b| b.is_ascii_whitespace()).unwrap_or(text.len());
        text[..word_end].eq_ignore_ascii_case(keyword.as_bytes())
    })
}

/// The read side of a connection: buffered bytes from the server, split into replies.
pub struct ReplyReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    last: Range<usize>,
}

impl Default for ReplyReader {
    fn default() -> Self {
        ReplyReader { buf: vec![0; INITIAL_BUFFER], start: 0, end: 0, last: 0..0 }
    }
}

impl ReplyReader {
    /// The next complete reply among the buffered bytes, consuming it.
    pub fn next_reply(&mut self) -> Result<Option<u16>, ReplyError> {
        let Some((code, len)) = parse_reply(&self.buf[self.start..self.end])? else {
            return Ok(None);
        };
        self.last = self.start..self.start + len;
        self.start += len;
        Ok(Some(code))
    }

    /// Free space to read into, making room first if needed.
    pub fn spare(&mut self) -> Result<&mut [u8], ReplyError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < MAX_REPLY {
                self.buf.resize((self.buf.len() * 2).min(MAX_REPLY), 0);
            } else {
                return Err(ReplyError::TooLong);
            }
        }
        self.last = 0..0;
        Ok(&mut self.buf[self.end..])
    }

    /// Records that `len` octets were read into [`spare`](Self::spare).
    pub fn filled(&mut self, len: usize) {
        self.end += len;
    }

    /// Octets received but not yet consumed as part of a reply.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The text of the reply returned last, all lines with their line endings.
    pub fn last_reply(&self) -> &[u8] {
        &self.buf[self.last.clone()]
    }

    /// The first line of the last reply, for messages.
    pub fn last_reply_line(&self) -> String {
        let reply = self.last_reply();
        let line = reply.split(|&b| b == b'\n').next().unwrap_or_default();
        String::from_utf8_lossy(line).trim_end().to_owned()
    }

    /// Reads until a complete reply is buffered and returns its code.
    pub async fn read_reply<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<u16, ReplyError> {
        loop {
            if let Some(code) = self.next_reply()? {
                return Ok(code);
            }
            let read = reader.read(self.spare()?).await.map_err(ReplyError::Io)?;
            if read == 0 {
                return Err(ReplyError::Closed);
            }
            self.filled(read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_replies() {
        assert_eq!(parse_reply(b"250 ok\r\n").unwrap(), Some((250, 8)));
        assert_eq!(parse_reply(b"354\r\n").unwrap(), Some((354, 5)));
        assert_eq!(parse_reply(b"221 bye\n").unwrap(), Some((221, 8)));
        assert_eq!(parse_reply(b"250 ok\r\n550 no\r\n").unwrap(), Some((250, 8)));
    }

    #[test]
    fn incomplete_replies_need_more_data() {
        assert_eq!(parse_reply(b"").unwrap(), None);
        assert_eq!(parse_reply(b"25").unwrap(), None);
        assert_eq!(parse_reply(b"250 ok\r").unwrap(), None);
        assert_eq!(parse_reply(b"250-first\r\n250-second\r\n").unwrap(), None);
        assert_eq!(parse_reply(b"250-first\r\n250 la").unwrap(), None);
    }

    #[test]
    fn multi_line_replies() {
        let reply = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n";
        assert_eq!(parse_reply(reply).unwrap(), Some((250, reply.len())));
        let mut longer = reply.to_vec();
        longer.extend_from_slice(b"220 ready\r\n");
        assert_eq!(parse_reply(&longer).unwrap(), Some((250, reply.len())));
    }

    #[test]
    fn malformed_replies() {
        for bad in [
            &b"hello\r\n"[..],
            b"25x ok\r\n",
            b"2500 ok\r\n",
            b"650 ok\r\n",
            b"250-a\r\n251 b\r\n",
            b"\r\n",
        ] {
            assert!(parse_reply(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn capabilities() {
        let reply =
            b"250-mx.example greets you\r\n250-pipelining\r\n250-SIZE 10240000\r\n250 STARTTLS\r\n";
        assert!(ehlo_has(reply, "PIPELINING"));
        assert!(ehlo_has(reply, "SIZE"));
        assert!(ehlo_has(reply, "STARTTLS"));
        assert!(!ehlo_has(reply, "CHUNKING"));
        // The greeting line is not a keyword.
        assert!(!ehlo_has(b"250 PIPELINING\r\n", "PIPELINING"));
    }

    /// Feeds `data` in pieces of `chunk` octets and collects all replies.
    fn replies_in_chunks(data: &[u8], chunk: usize) -> Vec<(u16, Vec<u8>)> {
        let mut reader = ReplyReader::default();
        let mut replies = Vec::new();
        for piece in data.chunks(chunk) {
            let mut rest = piece;
            while !rest.is_empty() {
                let spare = reader.spare().unwrap();
                let len = spare.len().min(rest.len());
                spare[..len].copy_from_slice(&rest[..len]);
                reader.filled(len);
                rest = &rest[len..];
                while let Some(code) = reader.next_reply().unwrap() {
                    replies.push((code, reader.last_reply().to_vec()));
                }
            }
        }
        assert_eq!(reader.buffered(), 0);
        replies
    }

    #[test]
    fn split_reads_give_the_same_replies() {
        let mut data =
            b"220-mx.example ESMTP\r\n220 ready\r\n250-mx\r\n250 PIPELINING\r\n".to_vec();
        for _ in 0..500 {
            data.extend_from_slice(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n");
        }
        data.extend_from_slice(b"550-5.7.1 rejected\r\n550 5.7.1 really\r\n");
        let whole = replies_in_chunks(&data, data.len());
        assert_eq!(whole.len(), 3 + 1500);
        assert_eq!(whole[0], (220, b"220-mx.example ESMTP\r\n220 ready\r\n".to_vec()));
        assert_eq!(whole.last().unwrap().0, 550);
        for chunk in [1, 2, 3, 7, 100, 4095, 4096, 4097] {
            assert_eq!(replies_in_chunks(&data, chunk), whole, "chunk {chunk}");
        }
    }

    #[test]
    fn long_replies_grow_the_buffer_up_to_a_limit() {
        let mut data = Vec::new();
        for _ in 0..200 {
            data.extend_from_slice(b"250-");
            data.extend_from_slice(&[b'x'; 100]);
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b"250 end\r\n");
        let replies = replies_in_chunks(&data, 1000);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].1, data);

        let mut reader = ReplyReader::default();
        let endless = [b'x'; 1024];
        let error = loop {
            match reader.spare() {
                Ok(spare) => {
                    let len = spare.len().min(endless.len());
                    spare[..len].copy_from_slice(&endless[..len]);
                    reader.filled(len);
                }
                Err(error) => break error,
            }
        };
        assert!(matches!(error, ReplyError::TooLong));
    }

    #[tokio::test]
    async fn reads_from_a_stream() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in [&b"250-a\r"[..], b"\n250", b" b\r\n354 go\r\n"] {
                server.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut reader = ReplyReader::default();
        assert_eq!(reader.read_reply(&mut client).await.unwrap(), 250);
        assert_eq!(reader.last_reply(), b"250-a\r\n250 b\r\n");
        assert_eq!(reader.last_reply_line(), "250-a");
        assert_eq!(reader.read_reply(&mut client).await.unwrap(), 354);
        writer.await.unwrap();
        assert!(matches!(reader.read_reply(&mut client).await, Err(ReplyError::Closed)));
    }
}

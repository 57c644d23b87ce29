//! `bdat`: BDAT framing through the session (RFC 3030), against a model.
//!
//! The input is a program: each octet picks a command (MAIL, RCPT, RSET, NOOP, DATA, or BDAT
//! with a size and, from the following octets, a chunk of exactly that size). The transcript
//! is fed to a [`ServerSession`](smtp_proto::ServerSession) cut as the first octets say, and
//! a model of RFC 3030 predicts every reply code, the octet counts of the 250 replies to
//! chunks, the messages handed over and where the session closes.
//!
//! Oracles: those of [`crate::server_session`] for every reply and event, and the session
//! agreeing with the model: whatever a chunk contains (command lines, CRLF "." CRLF, NUL) and
//! however the stream is cut, the session reads exactly the announced octets and then the next
//! command.

use std::fmt::Write;

use smtp_proto::SessionConfig;

use crate::server_session::Run;
use crate::util::{Bytes, Split};

/// The model's transaction.
#[derive(Debug, Default)]
struct ModelTransaction {
    recipients: usize,
    attempts: usize,
    chunked: bool,
    binarymime: bool,
    content: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Code(u16),
    /// 250 to a chunk, with the octets received so far.
    Received(usize),
}

/// Filler for chunks longer than what is left of the input: dangerous to a parser that loses
/// count, harmless to one that does not.
const FILLER: &[u8] = b"\r\n.\r\nQUIT\r\nBDAT 1 LAST\r\n\x00";

pub fn bdat(data: &[u8]) {
    let mut bytes = Bytes::new(data);
    let settings = bytes.byte();
    let cut = bytes.byte();
    let max_size: u64 = [0, 10, 100, 1000, 4096, 65536, 100, 1000][usize::from(settings & 7)];

    let mut transcript = b"EHLO client.fuzz.example\r\n".to_vec();
    let mut expected = vec![Expected::Code(250)];
    let mut messages: Vec<Vec<u8>> = Vec::new();
    let mut transaction: Option<ModelTransaction> = None;
    let mut closes = false;
    let mut commands = 0;
    while !bytes.is_empty() && !closes && commands < 64 {
        commands += 1;
        let op = bytes.byte();
        match op % 8 {
            0 => {
                let binarymime = op & 8 != 0;
                transcript.extend_from_slice(if binarymime {
                    b"MAIL FROM:<a@fuzz.example> BODY=BINARYMIME\r\n"
                } else {
                    b"MAIL FROM:<a@fuzz.example>\r\n"
                });
                if transaction.is_some() {
                    expected.push(Expected::Code(503));
                } else {
                    expected.push(Expected::Code(250));
                    transaction = Some(ModelTransaction { binarymime, ..Default::default() });
                }
            }
            1 | 2 => {
                let refused = op & 8 != 0;
                transcript.extend_from_slice(if refused {
                    b"RCPT TO:<unknown@fuzz.example>\r\n"
                } else {
                    b"RCPT TO:<b@fuzz.example>\r\n"
                });
                match &mut transaction {
                    None => expected.push(Expected::Code(503)),
                    Some(transaction) => {
                        transaction.attempts += 1;
                        if refused {
                            expected.push(Expected::Code(550));
                        } else {
                            transaction.recipients += 1;
                            expected.push(Expected::Code(250));
                        }
                    }
                }
            }
            3..=5 => {
                let last = op & 8 != 0;
                let size = match op >> 4 {
                    0..=7 => u64::from(bytes.byte() % 32),
                    8..=10 => u64::from(bytes.byte()) * 4,
                    11 => max_size.saturating_sub(1),
                    12 => max_size,
                    13 => max_size + 1,
                    14 => u64::MAX,
                    _ => {
                        // Too many digits for 64 bits: a syntax error, and no chunk follows.
                        transcript.extend_from_slice(b"BDAT 18446744073709551616\r\n");
                        expected.push(Expected::Code(501));
                        continue;
                    }
                };
                let style = bytes.byte();
                let verb = if style & 1 != 0 { "bdat" } else { "BDAT" };
                let zeros = if style & 2 != 0 { "00" } else { "" };
                let spaces = if style & 4 != 0 { "  " } else { " " };
                let mut line = format!("{verb}{spaces}{zeros}{size}");
                if last {
                    let _ =
                        write!(line, "{spaces}{}", if style & 8 != 0 { "last" } else { "LAST" });
                }
                line.push_str(if style & 16 != 0 { " \r\n" } else { "\r\n" });
                transcript.extend_from_slice(line.as_bytes());
                if size > max_size {
                    expected.push(Expected::Code(552));
                    closes = true;
                    continue;
                }
                let size = usize::try_from(size).expect("at most max_size");
                let mut chunk = bytes.take(size).to_vec();
                while chunk.len() < size {
                    let n = (size - chunk.len()).min(FILLER.len());
                    chunk.extend_from_slice(&FILLER[..n]);
                }
                transcript.extend_from_slice(&chunk);
                match &mut transaction {
                    None => expected.push(Expected::Code(503)),
                    Some(t) if t.recipients == 0 => {
                        expected.push(Expected::Code(if t.attempts == 0 { 503 } else { 554 }))
                    }
                    Some(t) => {
                        t.chunked = true;
                        if (t.content.len() + size) as u64 > max_size {
                            expected.push(Expected::Code(552));
                            transaction = None;
                        } else {
                            t.content.extend_from_slice(&chunk);
                            if last {
                                let content = std::mem::take(&mut t.content);
                                let refused = content.windows(4).any(|w| w == b"FAIL");
                                expected.push(Expected::Code(if refused { 452 } else { 250 }));
                                messages.push(content);
                                transaction = None;
                            } else {
                                expected.push(Expected::Received(t.content.len()));
                            }
                        }
                    }
                }
            }
            6 => {
                if op & 8 != 0 {
                    transcript.extend_from_slice(b"RSET\r\n");
                    transaction = None;
                } else {
                    transcript.extend_from_slice(b"NOOP\r\n");
                }
                expected.push(Expected::Code(250));
            }
            _ => {
                transcript.extend_from_slice(b"DATA\r\n");
                let code = match &transaction {
                    None => 503,
                    Some(t) if t.chunked => 503,
                    Some(t) if t.recipients == 0 => {
                        if t.attempts == 0 {
                            503
                        } else {
                            554
                        }
                    }
                    Some(t) if t.binarymime => 503,
                    Some(_) => 354,
                };
                expected.push(Expected::Code(code));
                if code == 354 {
                    transcript.extend_from_slice(b"data\r\n..\r\n.\r\n");
                    let content = b"data\r\n.\r\n";
                    if content.len() as u64 > max_size {
                        expected.push(Expected::Code(552));
                    } else {
                        messages.push(content.to_vec());
                        expected.push(Expected::Code(250));
                    }
                    transaction = None;
                }
            }
        }
    }

    let config = SessionConfig {
        hostname: crate::server_session::HOSTNAME.into(),
        max_message_size: max_size,
        max_recipients: 1000,
        max_data_line: 0,
        max_errors: u32::MAX,
        max_received_headers: usize::MAX,
        ..SessionConfig::default()
    };
    let mut run = Run::new(config, false, false);
    run.replies = Some(Vec::new());
    run.messages = Some(Vec::new());
    for piece in Split::choose(cut).pieces(&transcript) {
        if !run.feed(piece) {
            break;
        }
    }
    run.finish(false);
    let replies = run.replies.take().expect("kept");
    let seen: Vec<Expected> = replies
        .iter()
        .map(|reply| match reply.text().strip_suffix(" octets received") {
            Some(count) if reply.code == 250 => {
                Expected::Received(count.parse().expect("a count of octets"))
            }
            _ => Expected::Code(reply.code),
        })
        .collect();
    assert_eq!(seen, expected, "replies to {:?}", String::from_utf8_lossy(&transcript));
    assert_eq!(run.messages.as_ref(), Some(&messages), "messages");
    assert_eq!(run.closed, closes, "closed");
}

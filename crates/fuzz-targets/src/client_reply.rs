//! `client_reply`: the client's reply parser on arbitrary octets in arbitrary pieces.
//!
//! Input: one octet seeding the random splits, then what a server sends.
//!
//! Oracles: no panic; the same replies and the same error however the input is split; every
//! reply has a code of 200 to 599, an enhanced status code of the same class if any, and text
//! without control characters; and a reply printed back in wire form parses to itself.

use std::fmt::Write;

use smtp_proto::{ReplyError, ReplyParser, ServerReply};

use crate::util::{Bytes, Split};

/// The parser's limits (`client/reply.rs`), for telling when a reply printed back no longer
/// fits them.
const MAX_LINE: usize = 4096;
const MAX_REPLY: usize = 64 * 1024;

pub fn client_reply(data: &[u8]) {
    let mut bytes = Bytes::new(data);
    let seed = bytes.byte();
    let input = bytes.rest();
    let mut first: Option<Vec<Result<ServerReply, ReplyError>>> = None;
    for split in Split::all(u64::from(seed)) {
        let results = parse(&split.pieces(input));
        match &first {
            None => first = Some(results),
            Some(first) => {
                assert_eq!(&results, first, "{split:?} disagrees with the whole input {input:?}")
            }
        }
    }
    for result in first.expect("at least one split") {
        match result {
            Ok(reply) => check_reply(&reply),
            Err(error) => {
                let _ = error.to_string();
            }
        }
    }
}

/// Every reply, taken after each piece as a client would, then the error once if there is one.
fn parse(pieces: &[&[u8]]) -> Vec<Result<ServerReply, ReplyError>> {
    let mut parser = ReplyParser::new();
    let mut results = Vec::new();
    for piece in pieces {
        parser.feed(piece);
        while let Some(Ok(reply)) = parser.next_reply() {
            results.push(Ok(reply));
        }
    }
    match parser.next_reply() {
        Some(Err(error)) => {
            assert!(!parser.is_empty(), "an error, yet the parser says it holds nothing");
            // The error stays, and so does the end of the replies.
            assert_eq!(parser.next_reply(), Some(Err(error.clone())));
            results.push(Err(error));
        }
        Some(Ok(reply)) => panic!("a reply left after draining: {reply:?}"),
        None => {}
    }
    results
}

fn check_reply(reply: &ServerReply) {
    assert!((200..600).contains(&reply.code), "{reply:?}");
    if let Some(status) = reply.status {
        assert_eq!(u16::from(status.0), reply.code / 100, "{reply:?}");
    }
    assert!(!reply.lines.is_empty(), "{reply:?}");
    for line in &reply.lines {
        assert!(!line.chars().any(char::is_control), "control character kept: {reply:?}");
    }
    let _ = reply.to_string();
    // Printed back with the enhanced status code on every line, as servers send it.
    let mut wire = String::new();
    for (i, line) in reply.lines.iter().enumerate() {
        let separator = if i + 1 == reply.lines.len() { ' ' } else { '-' };
        let _ = write!(wire, "{}{separator}", reply.code);
        if let Some(status) = reply.status {
            let _ = write!(wire, "{status} ");
        }
        wire.push_str(line);
        wire.push_str("\r\n");
    }
    if wire.len() > MAX_REPLY || wire.split_inclusive('\n').any(|line| line.len() > MAX_LINE) {
        return;
    }
    let mut parser = ReplyParser::new();
    parser.feed(wire.as_bytes());
    assert_eq!(parser.next_reply(), Some(Ok(reply.clone())), "{reply:?} printed as {wire:?}");
    assert!(parser.is_empty(), "{wire:?} left something behind");
}

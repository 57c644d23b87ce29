//! Reading SMTP replies from a connection. The bytes read go to smtp-proto's [`ReplyParser`],
//! which finds the replies however the reads split them; this module only adds the reads.

use std::fmt;

use smtp_proto::{ReplyParser, ServerReply};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Octets asked for per read; enough for any ordinary reply and many pipelined ones.
const READ_SIZE: usize = 4096;

#[derive(Debug)]
pub enum ReplyError {
    /// Not SMTP replies; the parser says why.
    Protocol(smtp_proto::ReplyError),
    /// The server closed the connection.
    Closed,
    Io(std::io::Error),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Protocol(error) => write!(f, "{error}"),
            ReplyError::Closed => write!(f, "connection closed by the server"),
            ReplyError::Io(error) => write!(f, "reading reply: {error}"),
        }
    }
}

/// The read side of a connection: bytes from the server, split into replies.
pub struct ReplyReader {
    parser: ReplyParser,
    buf: Box<[u8]>,
}

impl Default for ReplyReader {
    fn default() -> Self {
        ReplyReader { parser: ReplyParser::new(), buf: vec![0; READ_SIZE].into_boxed_slice() }
    }
}

impl ReplyReader {
    /// The next reply, reading until one is complete.
    pub async fn read_reply<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<ServerReply, ReplyError> {
        loop {
            match self.parser.next_reply() {
                Some(Ok(reply)) => return Ok(reply),
                Some(Err(error)) => return Err(ReplyError::Protocol(error)),
                None => {}
            }
            let read = reader.read(&mut self.buf).await.map_err(ReplyError::Io)?;
            if read == 0 {
                return Err(ReplyError::Closed);
            }
            self.parser.feed(&self.buf[..read]);
        }
    }

    /// True when nothing was received beyond the replies already read.
    pub fn is_empty(&self) -> bool {
        self.parser.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn reads_replies_split_across_writes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for piece in [&b"250-a\r"[..], b"\n250", b" b\r\n354 go\r\n"] {
                server.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut reader = ReplyReader::default();
        let reply = reader.read_reply(&mut client).await.unwrap();
        assert_eq!((reply.code, reply.lines), (250, vec!["a".to_string(), "b".to_string()]));
        assert_eq!(reader.read_reply(&mut client).await.unwrap().code, 354);
        assert!(reader.is_empty());
        writer.await.unwrap();
        assert!(matches!(reader.read_reply(&mut client).await, Err(ReplyError::Closed)));
    }

    #[tokio::test]
    async fn many_pipelined_replies_in_small_reads() {
        let mut data = b"220 mx.example ESMTP\r\n".to_vec();
        for _ in 0..500 {
            data.extend_from_slice(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n");
        }
        data.extend_from_slice(b"550-5.7.1 rejected\r\n550 5.7.1 really\r\n");
        let (mut client, mut server) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move { server.write_all(&data).await.unwrap() });
        let mut reader = ReplyReader::default();
        let mut codes = Vec::new();
        while let Ok(reply) = reader.read_reply(&mut client).await {
            codes.push(reply.code);
            if reply.code == 550 {
                assert_eq!(reply.to_string(), "550 5.7.1 rejected really");
                break;
            }
        }
        writer.await.unwrap();
        assert_eq!(codes.len(), 1 + 1500 + 1);
        assert_eq!(&codes[..4], [220, 250, 250, 354]);
    }

    #[tokio::test]
    async fn malformed_replies_are_protocol_errors() {
        let (mut client, mut server) = tokio::io::duplex(64);
        server.write_all(b"250-a\r\n251 b\r\n").await.unwrap();
        let mut reader = ReplyReader::default();
        let error = reader.read_reply(&mut client).await.unwrap_err();
        assert!(matches!(error, ReplyError::Protocol(_)), "{error}");
    }
}

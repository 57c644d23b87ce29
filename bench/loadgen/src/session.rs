//! One session task: connects, sends messages while the shared counter hands out numbers,
//! reconnects after connection errors (a bounded number of times in a row), and records the
//! end-of-data latency of every message.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use smtp_proto::{Extensions, ServerReply};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::message::{Head, Template};
use crate::reply::{ReplyError, ReplyReader};
use crate::stats::{ErrorKind, SessionStats};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// Plain SMTP.
    None,
    /// STARTTLS after EHLO, then EHLO again (RFC 3207).
    Starttls,
    /// TLS from the first octet (RFC 8314).
    Implicit,
}

impl TlsMode {
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::Starttls => "starttls",
            TlsMode::Implicit => "implicit",
        }
    }
}

/// Everything the sessions share, built once.
pub struct Plan {
    pub addr: SocketAddr,
    pub tls: TlsMode,
    /// Present unless `tls` is `None`.
    pub connector: Option<(TlsConnector, ServerName<'static>)>,
    /// `EHLO name` with CRLF.
    pub ehlo: Box<[u8]>,
    pub envelope: Envelope,
    pub template: Template,
    pub pipelining: bool,
    /// Messages to send in total.
    pub messages: u64,
    /// Messages per connection before QUIT and a new connection; `None` for no limit.
    pub per_connection: Option<u64>,
    /// Connection failures in a row after which a session gives up.
    pub retries: u32,
    /// Limit for connecting, each reply and each write.
    pub timeout: Duration,
    /// The next message number to hand out.
    pub next: AtomicU64,
    /// Whether the missing-PIPELINING warning was printed.
    pub warned: AtomicBool,
}

/// The MAIL, RCPT and DATA commands of every transaction, in one buffer so that pipelining
/// sends them with one write.
pub struct Envelope {
    bytes: Box<[u8]>,
    /// End offset of each command in `bytes`; the last one is DATA.
    ends: Box<[usize]>,
}

impl Envelope {
    pub fn new(from: &str, recipients: &[String]) -> Envelope {
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(recipients.len() + 2);
        bytes.extend_from_slice(format!("MAIL FROM:<{from}>\r\n").as_bytes());
        ends.push(bytes.len());
        for recipient in recipients {
            bytes.extend_from_slice(format!("RCPT TO:<{recipient}>\r\n").as_bytes());
            ends.push(bytes.len());
        }
        bytes.extend_from_slice(b"DATA\r\n");
        ends.push(bytes.len());
        Envelope { bytes: bytes.into_boxed_slice(), ends: ends.into_boxed_slice() }
    }

    fn commands(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(start, end)| &self.bytes[start..end])
    }

    fn count(&self) -> usize {
        self.ends.len()
    }
}

/// Runs one session task until the messages are all handed out or it gives up.
pub async fn run_session(plan: &Plan, capacity: usize) -> SessionStats {
    let mut stats = SessionStats::with_capacity(capacity);
    let mut head = plan.template.head();
    let mut failures = 0u32;
    while plan.next.load(Ordering::Relaxed) < plan.messages {
        if failures > 0 {
            if failures > plan.retries {
                break;
            }
            let backoff =
                Duration::from_millis(50 * u64::from(failures)).min(Duration::from_secs(1));
            tokio::time::sleep(backoff).await;
        }
        stats.connections += 1;
        let mut connection = match Connection::open(plan).await {
            Ok(connection) => connection,
            Err(error) => {
                stats.record_error(error.kind, || error.detail);
                failures += 1;
                continue;
            }
        };
        if plan.pipelining && !connection.pipelining {
            stats.lockstep_fallbacks += 1;
            if !plan.warned.swap(true, Ordering::Relaxed) {
                eprintln!("warning: the server does not offer PIPELINING; sending lock-step");
            }
        }
        let mut sent = 0u64;
        let mut broken = false;
        while plan.per_connection.is_none_or(|limit| sent < limit) {
            let number = plan.next.fetch_add(1, Ordering::Relaxed);
            if number >= plan.messages {
                break;
            }
            sent += 1;
            if connection.send_message(plan, &mut head, number, &mut stats).await {
                failures = 0;
            } else {
                failures += 1;
                broken = true;
                break;
            }
        }
        if !broken {
            connection.quit(plan).await;
        }
    }
    stats
}

/// A failure that ends the connection.
struct ConnError {
    kind: ErrorKind,
    detail: String,
}

impl ConnError {
    fn new(kind: ErrorKind, detail: impl Into<String>) -> ConnError {
        ConnError { kind, detail: detail.into() }
    }

    fn io(error: io::Error) -> ConnError {
        ConnError::new(ErrorKind::Connection, error.to_string())
    }
}

impl From<ReplyError> for ConnError {
    fn from(error: ReplyError) -> ConnError {
        let kind = match error {
            ReplyError::Protocol(_) => ErrorKind::Protocol,
            ReplyError::Closed | ReplyError::Io(_) => ErrorKind::Connection,
        };
        ConnError::new(kind, error.to_string())
    }
}

/// How a transaction ended, when the connection survived it.
enum Outcome {
    Delivered(Duration),
    /// The first unexpected reply code and its first line.
    Rejected(u16, String),
}

struct Connection {
    stream: Stream,
    reader: ReplyReader,
    /// Whether transactions are pipelined on this connection.
    pipelining: bool,
}

impl Connection {
    /// Connects and says EHLO, with TLS as configured.
    async fn open(plan: &Plan) -> Result<Connection, ConnError> {
        let tcp = match tokio::time::timeout(plan.timeout, TcpStream::connect(plan.addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => {
                return Err(ConnError::new(
                    ErrorKind::Connect,
                    format!("connecting to {}: {error}", plan.addr),
                ));
            }
            Err(_) => {
                return Err(ConnError::new(
                    ErrorKind::Connect,
                    format!("connecting to {}: no answer within {:?}", plan.addr, plan.timeout),
                ));
            }
        };
        tcp.set_nodelay(true).map_err(ConnError::io)?;
        let mut reader = ReplyReader::default();
        let (stream, extensions) = match plan.tls {
            TlsMode::None => {
                let mut tcp = tcp;
                let extensions = greet_and_ehlo(&mut tcp, &mut reader, plan).await?;
                (Stream::Plain(tcp), extensions)
            }
            TlsMode::Implicit => {
                let mut tls = handshake(plan, tcp).await?;
                let extensions = greet_and_ehlo(&mut tls, &mut reader, plan).await?;
                (Stream::Tls(Box::new(tls)), extensions)
            }
            TlsMode::Starttls => {
                let mut tcp = tcp;
                if !greet_and_ehlo(&mut tcp, &mut reader, plan).await?.starttls {
                    return Err(ConnError::new(
                        ErrorKind::Tls,
                        "the server does not offer STARTTLS",
                    ));
                }
                command(&mut tcp, &mut reader, b"STARTTLS\r\n", "STARTTLS", plan, |c| c == 220)
                    .await?;
                if !reader.is_empty() {
                    // Anything sent before the handshake must not be taken as protected.
                    return Err(ConnError::new(
                        ErrorKind::Protocol,
                        "the server sent data after its STARTTLS reply",
                    ));
                }
                let mut tls = handshake(plan, tcp).await?;
                let ehlo =
                    command(&mut tls, &mut reader, &plan.ehlo, "EHLO after STARTTLS", plan, is_2xx)
                        .await?;
                (Stream::Tls(Box::new(tls)), Extensions::from_ehlo(&ehlo))
            }
        };
        let pipelining = plan.pipelining && extensions.pipelining;
        Ok(Connection { stream, reader, pipelining })
    }

    /// Sends message `number` and records the result; false when the connection broke.
    async fn send_message(
        &mut self,
        plan: &Plan,
        head: &mut Head,
        number: u64,
        stats: &mut SessionStats,
    ) -> bool {
        match self.transaction(plan, head, number).await {
            Ok(Outcome::Delivered(latency)) => {
                stats.record_latency(latency);
                true
            }
            Ok(Outcome::Rejected(code, line)) => {
                stats.failed += 1;
                stats.record_error(ErrorKind::Reply(code), || {
                    format!("message {}: {line}", number + 1)
                });
                let reset =
                    command(&mut self.stream, &mut self.reader, b"RSET\r\n", "RSET", plan, is_2xx)
                        .await;
                match reset {
                    Ok(_) => true,
                    Err(error) => {
                        stats.record_error(error.kind, || error.detail);
                        false
                    }
                }
            }
            Err(error) => {
                stats.failed += 1;
                stats.record_error(error.kind, || {
                    format!("message {}: {}", number + 1, error.detail)
                });
                false
            }
        }
    }

    /// One mail transaction, pipelined or lock-step. A reply with an unexpected code rejects
    /// the message (the caller resets the transaction); 421 and I/O problems end the connection.
    async fn transaction(
        &mut self,
        plan: &Plan,
        head: &mut Head,
        number: u64,
    ) -> Result<Outcome, ConnError> {
        let envelope = &plan.envelope;
        let last = envelope.count() - 1;
        let mut rejection: Option<(u16, String)> = None;
        let mut go_ahead = false;
        if self.pipelining {
            write(&mut self.stream, &envelope.bytes, plan.timeout).await?;
            // Every pipelined command gets its reply, even after a rejection.
            for index in 0..=last {
                let reply = self.reply(plan).await?;
                let expected = if index == last { reply.code == 354 } else { reply.is_positive() };
                if !expected && rejection.is_none() {
                    rejection = Some((reply.code, reply.to_string()));
                }
                go_ahead = index == last && reply.code == 354;
            }
        } else {
            for (index, command) in envelope.commands().enumerate() {
                write(&mut self.stream, command, plan.timeout).await?;
                let reply = self.reply(plan).await?;
                let expected = if index == last { reply.code == 354 } else { reply.is_positive() };
                if !expected {
                    rejection = Some((reply.code, reply.to_string()));
                    break;
                }
                go_ahead = index == last;
            }
        }
        if go_ahead {
            // The server waits for data even if a recipient was refused: complete the
            // transfer so the connection stays in step.
            let dot_sent = self.write_message(head.with_number(number + 1), plan).await?;
            let reply = self.reply(plan).await?;
            let latency = dot_sent.elapsed();
            if !reply.is_positive() && rejection.is_none() {
                rejection = Some((reply.code, reply.to_string()));
            }
            if rejection.is_none() {
                return Ok(Outcome::Delivered(latency));
            }
        }
        let (code, line) = rejection.unwrap_or_default();
        Ok(Outcome::Rejected(code, line))
    }

    /// Reads a reply; 421 (service closing) ends the connection.
    async fn reply(&mut self, plan: &Plan) -> Result<ServerReply, ConnError> {
        let reply = read_reply(&mut self.stream, &mut self.reader, plan.timeout).await?;
        if reply.code == 421 {
            return Err(ConnError::new(ErrorKind::Reply(421), reply.to_string()));
        }
        Ok(reply)
    }

    /// Writes the header block, the shared body and the end-of-data line, with vectored writes
    /// where the stream supports them. Returns when the last write call began: the moment the
    /// end-of-data dot was handed over.
    async fn write_message(&mut self, head: &[u8], plan: &Plan) -> Result<Instant, ConnError> {
        let stream = &mut self.stream;
        let body = &plan.template.body[..];
        let io = async move {
            let mut buffers = [IoSlice::new(head), IoSlice::new(body), IoSlice::new(b".\r\n")];
            let mut remaining = &mut buffers[..];
            let mut last_write = Instant::now();
            while !remaining.is_empty() {
                last_write = Instant::now();
                let written = stream.write_vectored(remaining).await?;
                if written == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                IoSlice::advance_slices(&mut remaining, written);
            }
            stream.flush().await?;
            Ok(last_write)
        };
        match tokio::time::timeout(plan.timeout, io).await {
            Ok(result) => result.map_err(ConnError::io),
            Err(_) => Err(write_timeout(plan.timeout)),
        }
    }

    /// Says QUIT and closes; errors no longer matter here.
    async fn quit(mut self, plan: &Plan) {
        let _ =
            command(&mut self.stream, &mut self.reader, b"QUIT\r\n", "QUIT", plan, |_| true).await;
        let _ = tokio::time::timeout(plan.timeout, self.stream.shutdown()).await;
    }
}

fn is_2xx(code: u16) -> bool {
    (200..300).contains(&code)
}

fn write_timeout(timeout: Duration) -> ConnError {
    ConnError::new(ErrorKind::Timeout, format!("write not done within {timeout:?}"))
}

async fn handshake(plan: &Plan, tcp: TcpStream) -> Result<TlsStream<TcpStream>, ConnError> {
    let Some((connector, name)) = &plan.connector else {
        return Err(ConnError::new(ErrorKind::Tls, "no TLS configuration"));
    };
    match tokio::time::timeout(plan.timeout, connector.connect(name.clone(), tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(error)) => Err(ConnError::new(ErrorKind::Tls, format!("TLS handshake: {error}"))),
        Err(_) => Err(ConnError::new(ErrorKind::Tls, "TLS handshake timed out")),
    }
}

/// Reads the 220 greeting, then sends EHLO, expects 250 and returns what it announces.
async fn greet_and_ehlo<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reader: &mut ReplyReader,
    plan: &Plan,
) -> Result<Extensions, ConnError> {
    let greeting = read_reply(stream, reader, plan.timeout).await?;
    if greeting.code != 220 {
        return Err(ConnError::new(
            ErrorKind::Reply(greeting.code),
            format!("greeting: {greeting}"),
        ));
    }
    let ehlo = command(stream, reader, &plan.ehlo, "EHLO", plan, is_2xx).await?;
    Ok(Extensions::from_ehlo(&ehlo))
}

/// Sends `line` and reads the reply, which must satisfy `expected`.
async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reader: &mut ReplyReader,
    line: &[u8],
    name: &str,
    plan: &Plan,
    expected: impl Fn(u16) -> bool,
) -> Result<ServerReply, ConnError> {
    write(stream, line, plan.timeout).await?;
    let reply = read_reply(stream, reader, plan.timeout).await?;
    if !expected(reply.code) {
        return Err(ConnError::new(ErrorKind::Reply(reply.code), format!("{name}: {reply}")));
    }
    Ok(reply)
}

async fn write<S: AsyncWrite + Unpin>(
    stream: &mut S,
    data: &[u8],
    timeout: Duration,
) -> Result<(), ConnError> {
    let io = async {
        stream.write_all(data).await?;
        stream.flush().await
    };
    match tokio::time::timeout(timeout, io).await {
        Ok(result) => result.map_err(ConnError::io),
        Err(_) => Err(write_timeout(timeout)),
    }
}

async fn read_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    reader: &mut ReplyReader,
    timeout: Duration,
) -> Result<ServerReply, ConnError> {
    match tokio::time::timeout(timeout, reader.read_reply(stream)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ConnError::new(ErrorKind::Timeout, format!("no reply within {timeout:?}"))),
    }
}

/// A connection with or without TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_commands() {
        let recipients = vec!["a@localhost".to_owned(), "b@localhost".to_owned()];
        let envelope = Envelope::new("s@example.org", &recipients);
        let commands: Vec<&[u8]> = envelope.commands().collect();
        assert_eq!(
            commands,
            [
                &b"MAIL FROM:<s@example.org>\r\n"[..],
                b"RCPT TO:<a@localhost>\r\n",
                b"RCPT TO:<b@localhost>\r\n",
                b"DATA\r\n"
            ]
        );
        assert_eq!(envelope.count(), 4);
        assert_eq!(envelope.bytes[..], commands.concat()[..]);
    }
}

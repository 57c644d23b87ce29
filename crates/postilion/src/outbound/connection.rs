//! One outgoing SMTP connection: the socket (plain, then perhaps TLS), the reply parser, and
//! the sans-IO client session, with the RFC 5321 section 4.5.3.2 timeouts around every wait.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use smtp_proto::EnhancedStatus;
use smtp_proto::client::{
    ClientError, ClientSession, ReplyParser, ServerReply, SessionStep, TlsIntent,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Octets read from the socket at a time.
const READ_BUFFER: usize = 8 * 1024;

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// During the TLS handshake, which owns the TCP stream, and after a failed one.
    Gone,
}

/// A connection that is ready for mail transactions.
pub struct Connection {
    stream: Stream,
    parser: ReplyParser,
    buffer: Box<[u8]>,
    pub session: ClientSession,
    /// Where it goes: the host name (TLS, logs) and the address.
    pub host: String,
    pub address: SocketAddr,
    /// TLS version and cipher, when TLS is active.
    pub tls: Option<String>,
    /// Taken from the idle pool rather than opened for this delivery.
    pub reused: bool,
}

/// How to reach and greet a server.
pub struct Dial<'a> {
    pub host: &'a str,
    pub address: SocketAddr,
    pub helo_name: &'a str,
    pub intent: TlsIntent,
    /// For SMTP AUTH at a smart host.
    pub credentials: Option<smtp_proto::Credentials>,
    /// For the handshake when STARTTLS is used.
    pub tls_config: Option<Arc<ClientConfig>>,
    pub connect_timeout: Duration,
    pub greeting_timeout: Duration,
    pub command_timeout: Duration,
}

/// A status for failures that are ours to describe: X.4.1 "no answer from host" and
/// X.4.2 "bad connection" (RFC 3463 section 3.5).
pub const NO_ANSWER: EnhancedStatus = EnhancedStatus(4, 4, 1);
pub const BAD_CONNECTION: EnhancedStatus = EnhancedStatus(4, 4, 2);
/// X.7.10 "encryption needed" would be for the receiving side; a client whose policy requires
/// TLS that failed reports X.7.4 as for STARTTLS missing.
const TLS_FAILED: EnhancedStatus = EnhancedStatus(4, 7, 4);

fn local_error(status: EnhancedStatus, description: String) -> ClientError {
    ClientError { status, description, reply: None }
}

impl Connection {
    /// Connects, reads the greeting, says EHLO (or HELO), and runs STARTTLS when the intent
    /// asks for it.
    pub async fn open(dial: Dial<'_>) -> Result<Connection, ClientError> {
        let tcp = match tokio::time::timeout(dial.connect_timeout, TcpStream::connect(dial.address))
            .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => {
                return Err(local_error(
                    NO_ANSWER,
                    format!("connecting to {} [{}]: {error}", dial.host, dial.address),
                ));
            }
            Err(_) => {
                return Err(local_error(
                    NO_ANSWER,
                    format!("connecting to {} [{}]: timed out", dial.host, dial.address),
                ));
            }
        };
        let _ = tcp.set_nodelay(true);
        let config = smtp_proto::client::ClientConfig {
            helo_name: dial.helo_name.to_string(),
            tls: dial.intent,
            auth: dial.credentials.clone(),
            allow_plaintext_auth: false,
        };
        let mut connection = Connection {
            stream: Stream::Plain(tcp),
            parser: ReplyParser::new(),
            buffer: vec![0; READ_BUFFER].into_boxed_slice(),
            session: ClientSession::new(config, false),
            host: dial.host.to_string(),
            address: dial.address,
            tls: None,
            reused: false,
        };
        let mut timeout = dial.greeting_timeout;
        loop {
            let reply = connection.read_reply(timeout).await?;
            timeout = dial.command_timeout;
            match connection.session.on_reply(reply) {
                SessionStep::Send(bytes) => connection.write(&bytes, dial.command_timeout).await?,
                SessionStep::StartTls => {
                    // RFC 3207 section 4.2: nothing the server sent before the handshake
                    // may be taken into the TLS session; anything buffered is an attack or a
                    // broken server.
                    if !connection.parser.is_empty() {
                        return Err(local_error(
                            TLS_FAILED,
                            "data pipelined after the STARTTLS reply".into(),
                        ));
                    }
                    let config = dial.tls_config.clone().ok_or_else(|| {
                        local_error(TLS_FAILED, "no TLS client configuration".into())
                    })?;
                    connection.start_tls(config, dial.command_timeout).await?;
                    match connection.session.tls_established() {
                        SessionStep::Send(bytes) => {
                            connection.write(&bytes, dial.command_timeout).await?
                        }
                        other => {
                            return Err(local_error(
                                TLS_FAILED,
                                format!("unexpected step after TLS: {other:?}"),
                            ));
                        }
                    }
                }
                SessionStep::Ready => return Ok(connection),
                SessionStep::Failed(error) => {
                    connection.quit().await;
                    return Err(error);
                }
                SessionStep::Closed => {
                    return Err(local_error(BAD_CONNECTION, "server closed the session".into()));
                }
            }
        }
    }

    async fn start_tls(
        &mut self,
        config: Arc<ClientConfig>,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let name = ServerName::try_from(self.host.trim_end_matches('.').to_string())
            .or_else(|_| ServerName::try_from(self.address.ip().to_string()))
            .map_err(|error| {
                local_error(TLS_FAILED, format!("{} is no TLS server name: {error}", self.host))
            })?;
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(local_error(TLS_FAILED, "TLS is already active".into()));
        };
        let handshake = TlsConnector::from(config).connect(name, tcp);
        match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(tls)) => {
                self.tls = Some(super::tls::describe(tls.get_ref().1));
                self.stream = Stream::Tls(Box::new(tls));
                Ok(())
            }
            Ok(Err(error)) => Err(local_error(
                TLS_FAILED,
                format!("TLS handshake with {} [{}] failed: {error}", self.host, self.address),
            )),
            Err(_) => Err(local_error(
                TLS_FAILED,
                format!("TLS handshake with {} [{}] timed out", self.host, self.address),
            )),
        }
    }

    /// Reads until one whole reply is there.
    pub async fn read_reply(&mut self, timeout: Duration) -> Result<ServerReply, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(reply) = self.parser.next_reply() {
                return reply.map_err(ClientError::from);
            }
            let read = tokio::time::timeout_at(deadline, async {
                match &mut self.stream {
                    Stream::Plain(tcp) => tcp.read(&mut self.buffer).await,
                    Stream::Tls(tls) => tls.read(&mut self.buffer).await,
                    Stream::Gone => Ok(0),
                }
            })
            .await;
            match read {
                Ok(Ok(0)) => {
                    return Err(local_error(
                        BAD_CONNECTION,
                        format!("{} [{}] closed the connection", self.host, self.address),
                    ));
                }
                Ok(Ok(count)) => self.parser.feed(&self.buffer[..count]),
                Ok(Err(error)) => {
                    return Err(local_error(
                        BAD_CONNECTION,
                        format!("reading from {} [{}]: {error}", self.host, self.address),
                    ));
                }
                Err(_) => {
                    return Err(local_error(
                        BAD_CONNECTION,
                        format!(
                            "no reply from {} [{}] within {}s",
                            self.host,
                            self.address,
                            timeout.as_secs()
                        ),
                    ));
                }
            }
        }
    }

    /// Writes and flushes `bytes` within `timeout`.
    pub async fn write(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), ClientError> {
        let result = tokio::time::timeout(timeout, async {
            match &mut self.stream {
                Stream::Plain(tcp) => tcp.write_all(bytes).await,
                Stream::Tls(tls) => {
                    tls.write_all(bytes).await?;
                    tls.flush().await
                }
                Stream::Gone => Err(io::ErrorKind::NotConnected.into()),
            }
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(local_error(
                BAD_CONNECTION,
                format!("writing to {} [{}]: {error}", self.host, self.address),
            )),
            Err(_) => Err(local_error(
                BAD_CONNECTION,
                format!("writing to {} [{}] timed out", self.host, self.address),
            )),
        }
    }

    /// Says QUIT and waits briefly for the answer; the connection is closed either way.
    pub async fn quit(&mut self) {
        let quit = self.session.quit();
        if self.write(&quit, Duration::from_secs(10)).await.is_ok() {
            let _ = self.read_reply(Duration::from_secs(10)).await;
        }
        let _ = match &mut self.stream {
            Stream::Plain(tcp) => tcp.shutdown().await,
            Stream::Tls(tls) => tls.shutdown().await,
            Stream::Gone => Ok(()),
        };
    }

    /// True when the server has sent something unasked (such as a 421 before closing) or
    /// closed the connection while it sat idle: it must not be reused.
    pub async fn is_stale(&self) -> bool {
        if !self.parser.is_empty() {
            return true;
        }
        let tcp = match &self.stream {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
            Stream::Gone => return true,
        };
        // Peeking leaves any TLS record in place. A zero timeout still polls once: data or
        // end of stream is seen at once, a quiet connection times out.
        let mut probe = [0u8; 1];
        tokio::time::timeout(Duration::ZERO, tcp.peek(&mut probe)).await.is_ok()
    }
}

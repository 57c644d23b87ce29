//! A receiving SMTP sink that offers STARTTLS, for relay benchmarks: it accepts every
//! sender and recipient, reads each message and throws it away, and counts. Postfix's
//! smtp-sink does the same job without TLS; this one exists because smtp-sink cannot
//! offer STARTTLS.
//!
//! Like `smtp-sink -c`, it writes its counters to standard output after every finished
//! message and every ended session, as `sess=N quit=N mesg=N` followed by a carriage
//! return, so the same tools can watch either sink. `sess` counts ended sessions, `quit` the
//! QUIT commands, `mesg` the messages received (their final "." read).
//!
//! It runs on one thread, as smtp-sink runs in one process, and answers pipelined commands
//! with one write per batch. It is no conforming SMTP server: it checks no syntax beyond
//! the command verb.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use clap::Parser;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

#[derive(Parser, Debug)]
#[command(about = "SMTP sink with STARTTLS that counts and discards messages")]
struct Args {
    /// Address to listen on, ip:port.
    #[arg(long)]
    listen: SocketAddr,
    /// PEM certificate chain; with --key, STARTTLS is offered.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Name in the greeting and the EHLO reply.
    #[arg(long, default_value = "tls-sink")]
    hostname: String,
}

#[derive(Default)]
struct Counters {
    sessions: AtomicU64,
    quits: AtomicU64,
    messages: AtomicU64,
}

impl Counters {
    fn print(&self) {
        let line = format!(
            "sess={} quit={} mesg={}\r",
            self.sessions.load(Ordering::Relaxed),
            self.quits.load(Ordering::Relaxed),
            self.messages.load(Ordering::Relaxed)
        );
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(line.as_bytes());
        let _ = stdout.flush();
    }
}

struct Sink {
    hostname: String,
    acceptor: Option<TlsAcceptor>,
    counters: Counters,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let acceptor = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some(acceptor(cert, key)?),
        _ => None,
    };
    let sink =
        Arc::new(Sink { hostname: args.hostname.clone(), acceptor, counters: Counters::default() });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    eprintln!("tls-sink: accept: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let sink = sink.clone();
            tokio::spawn(async move {
                if let Err(error) = sink.connection(tcp).await {
                    eprintln!("tls-sink: {error:#}");
                }
                sink.counters.sessions.fetch_add(1, Ordering::Relaxed);
                sink.counters.print();
            });
        }
    })
}

fn acceptor(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What a session wants after its command loop.
enum Next {
    Close,
    StartTls,
}

impl Sink {
    async fn connection(&self, tcp: TcpStream) -> anyhow::Result<()> {
        let _ = tcp.set_nodelay(true);
        let mut plain = BufReader::new(tcp);
        let greeting = format!("220 {} ESMTP\r\n", self.hostname);
        plain.get_mut().write_all(greeting.as_bytes()).await?;
        match self.session(&mut plain, self.acceptor.is_some()).await? {
            Next::Close => Ok(()),
            Next::StartTls => {
                let Some(acceptor) = &self.acceptor else { return Ok(()) };
                // Whatever the client sent after STARTTLS, before the handshake, is dropped.
                let tls = acceptor.accept(plain.into_inner()).await.context("TLS handshake")?;
                let mut tls = BufReader::new(tls);
                self.session(&mut tls, false).await?;
                Ok(())
            }
        }
    }

    /// Serves commands until QUIT, end of input or STARTTLS.
    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut BufReader<S>,
        offer_starttls: bool,
    ) -> anyhow::Result<Next> {
        let mut line = Vec::with_capacity(1024);
        let mut out = Vec::with_capacity(1024);
        loop {
            line.clear();
            if stream.read_until(b'\n', &mut line).await? == 0 {
                return Ok(Next::Close);
            }
            let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
            match &verb[..] {
                b"EHLO" => {
                    out.extend_from_slice(format!("250-{}\r\n", self.hostname).as_bytes());
                    if offer_starttls {
                        out.extend_from_slice(b"250-STARTTLS\r\n");
                    }
                    out.extend_from_slice(
                        b"250-PIPELINING\r\n250-8BITMIME\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n",
                    );
                }
                b"HELO" => out.extend_from_slice(format!("250 {}\r\n", self.hostname).as_bytes()),
                b"STAR" if offer_starttls => {
                    out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
                    stream.get_mut().write_all(&out).await?;
                    stream.get_mut().flush().await?;
                    return Ok(Next::StartTls);
                }
                b"MAIL" => out.extend_from_slice(b"250 2.1.0 Ok\r\n"),
                b"RCPT" => out.extend_from_slice(b"250 2.1.5 Ok\r\n"),
                b"DATA" => {
                    stream.get_mut().write_all(&out).await?;
                    out.clear();
                    stream.get_mut().write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                    stream.get_mut().flush().await?;
                    loop {
                        line.clear();
                        if stream.read_until(b'\n', &mut line).await? == 0 {
                            return Ok(Next::Close);
                        }
                        if line == b".\r\n" {
                            break;
                        }
                    }
                    self.counters.messages.fetch_add(1, Ordering::Relaxed);
                    self.counters.print();
                    out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                }
                b"RSET" | b"NOOP" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
                b"QUIT" => {
                    self.counters.quits.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                    stream.get_mut().write_all(&out).await?;
                    stream.get_mut().flush().await?;
                    return Ok(Next::Close);
                }
                _ => out.extend_from_slice(b"502 5.5.2 Error: command not recognized\r\n"),
            }
            // Answer a pipelined batch with one write, once the client has nothing more
            // buffered.
            if stream.buffer().is_empty() && !out.is_empty() {
                stream.get_mut().write_all(&out).await?;
                stream.get_mut().flush().await?;
                out.clear();
            }
        }
    }
}

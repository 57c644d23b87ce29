//! An SMTP load generator in the spirit of Postfix's smtp-source: concurrent sessions send a
//! fixed number of messages between them and the run reports throughput and percentiles of
//! the end-of-data latency (from sending the final "." to receiving the reply to it).

mod message;
mod reply;
mod session;
mod stats;
mod tls;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;

use smtp_proto::trace::rfc5322_date;

use crate::message::{HeaderFields, NUMBER_WIDTH, Template};
use crate::session::{Envelope, Plan, TlsMode, run_session};
use crate::stats::{RunInfo, Summary};

#[derive(Parser, Debug, Clone)]
#[command(about = "SMTP load generator with end-of-data latency percentiles")]
struct Args {
    /// Server address, host:port.
    #[arg(long, default_value = "127.0.0.1:2525")]
    server: String,
    /// Concurrent sessions (connections).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    sessions: u32,
    /// Messages in total, shared by all sessions.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Message size in octets, headers included.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Recipients per message.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    recipients: u32,
    /// Send MAIL, the RCPTs and DATA in one write, then read their replies (RFC 2920).
    #[arg(long)]
    pipelining: bool,
    /// TLS: STARTTLS after EHLO, implicit TLS from the start, or none. Any server certificate
    /// is accepted (benchmarking only).
    #[arg(long, value_enum, default_value_t = TlsMode::None)]
    tls: TlsMode,
    /// Envelope sender and From address (empty for the null sender).
    #[arg(long, default_value = "sender@example.org")]
    from: String,
    /// Recipient address; `%d` is replaced by the recipient number, 1 to --recipients.
    #[arg(long, default_value = "user@localhost")]
    to: String,
    /// Messages per connection before QUIT and a new connection [default: no limit, each
    /// session keeps its connection until all messages are handed out].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    messages_per_session: Option<u64>,
    /// Print one JSON object on one line instead of text.
    #[arg(long)]
    json: bool,
    /// Name for EHLO (and the Message-ID domain).
    #[arg(long, default_value = "loadgen.example")]
    helo: String,
    /// Connection failures in a row after which a session gives up.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Seconds to wait for a connection, a reply or a write.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Runtime worker threads [default: one per CPU].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads as usize);
    }
    let result = runtime.build().context("starting the runtime").and_then(|runtime| {
        let result = runtime.block_on(run(&args));
        runtime.shutdown_timeout(Duration::from_secs(1));
        result
    });
    let (info, summary) = match result {
        Ok(report) => report,
        Err(error) => {
            eprintln!("loadgen: {error:#}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        println!("{}", summary.json(&info));
    } else {
        println!("{}", summary.human(&info));
    }
    if summary.failed_run() {
        if let Some(first) = &summary.first_error {
            eprintln!("loadgen: first error: {first}");
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Sends the messages and returns the report.
async fn run(args: &Args) -> anyhow::Result<(RunInfo, Summary)> {
    let plan = Arc::new(plan(args)?);
    let info = RunInfo {
        server: args.server.clone(),
        sessions: args.sessions,
        messages: args.messages,
        size: args.size,
        message_bytes: plan.template.message_len(),
        recipients: args.recipients,
        pipelining: args.pipelining,
        tls: args.tls.name(),
    };
    // Room for a fair share and some more; the vector grows if one session sends more.
    let share = args.messages.div_ceil(u64::from(args.sessions));
    let capacity = share.saturating_add(share / 4 + 16).min(args.messages) as usize;
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.sessions)
        .map(|_| {
            let plan = plan.clone();
            tokio::spawn(async move { run_session(&plan, capacity).await })
        })
        .collect();
    let mut sessions = Vec::with_capacity(tasks.len());
    for task in tasks {
        sessions.push(task.await.context("session task failed")?);
    }
    let elapsed = started.elapsed();
    Ok((info, Summary::new(sessions, args.messages, elapsed)))
}

/// Checks the arguments and builds what the sessions share.
fn plan(args: &Args) -> anyhow::Result<Plan> {
    if args.messages >= 10u64.pow(NUMBER_WIDTH as u32) {
        bail!("--messages must be below {}", 10u64.pow(NUMBER_WIDTH as u32));
    }
    if !args.from.is_empty() {
        check_address("--from", &args.from)?;
    }
    check_address("--to", &args.to)?;
    check_address("--helo", &args.helo)?;
    if args.helo.contains('@') {
        bail!("--helo must be a domain name or address literal");
    }
    let addr: SocketAddr = args
        .server
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.server))?
        .next()
        .with_context(|| format!("{} has no address", args.server))?;
    let connector = match args.tls {
        TlsMode::None => None,
        TlsMode::Starttls | TlsMode::Implicit => {
            Some((tls::connector()?, tls::server_name(&args.server)?))
        }
    };
    let recipients: Vec<String> =
        (1..=args.recipients).map(|n| args.to.replace("%d", &n.to_string())).collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let fields = HeaderFields {
        from: &args.from,
        recipients: &recipients,
        helo: &args.helo,
        date: &rfc5322_date(now.as_secs() as i64),
        run_tag: &format!("{:x}.{}", now.as_nanos(), std::process::id()),
    };
    Ok(Plan {
        addr,
        tls: args.tls,
        connector,
        ehlo: format!("EHLO {}\r\n", args.helo).into_bytes().into_boxed_slice(),
        envelope: Envelope::new(&args.from, &recipients),
        template: Template::new(&fields, args.size),
        pipelining: args.pipelining,
        messages: args.messages,
        per_connection: args.messages_per_session,
        retries: args.retries,
        timeout: Duration::from_secs(args.timeout),
        next: AtomicU64::new(0),
        warned: AtomicBool::new(false),
    })
}

/// Rejects what would break the command or header syntax: spaces, controls, angle brackets.
fn check_address(option: &str, value: &str) -> anyhow::Result<()> {
    if value.is_empty() || value.len() > 254 {
        bail!("{option} must have 1 to 254 characters");
    }
    if let Some(bad) =
        value.chars().find(|c| c.is_whitespace() || c.is_control() || "<>".contains(*c))
    {
        bail!("{option} must not contain {bad:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! End-to-end runs against a small SMTP server in the test process.

    use super::*;
    use crate::stats::ErrorKind;
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    use std::sync::atomic::Ordering;
    use tokio::io::{
        AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    };
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    #[derive(Default)]
    struct Server {
        tls: Option<(TlsMode, TlsAcceptor)>,
        offer_pipelining: bool,
        /// Refuse the RCPT of every transaction whose number is a multiple of this.
        reject_every: Option<u64>,
        /// Close the connection instead of answering this transaction's MAIL.
        drop_at: Option<u64>,
        mails: AtomicU64,
        connections: AtomicU64,
        /// Received messages, unstuffed, without the end-of-data line.
        messages: Mutex<Vec<Vec<u8>>>,
    }

    async fn start(server: Server) -> (SocketAddr, Arc<Server>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(server);
        let shared = server.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let server = shared.clone();
                tokio::spawn(async move { server.connection(tcp).await });
            }
        });
        (addr, server)
    }

    fn acceptor() -> TlsAcceptor {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![key.cert.der().clone()], der)
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }

    impl Server {
        async fn connection(&self, tcp: tokio::net::TcpStream) {
            self.connections.fetch_add(1, Ordering::Relaxed);
            match &self.tls {
                None => {
                    self.session(tcp, true, false).await;
                }
                Some((TlsMode::Implicit, acceptor)) => {
                    let tls = acceptor.accept(tcp).await.unwrap();
                    self.session(tls, true, false).await;
                }
                Some((_, acceptor)) => {
                    if let Some(tcp) = self.session(tcp, true, true).await {
                        let tls = acceptor.accept(tcp).await.unwrap();
                        self.session(tls, false, false).await;
                    }
                }
            }
        }

        /// Serves commands; returns the stream when the client starts TLS.
        async fn session<S: AsyncRead + AsyncWrite + Unpin>(
            &self,
            stream: S,
            greet: bool,
            offer_starttls: bool,
        ) -> Option<S> {
            let mut stream = BufReader::new(stream);
            if greet {
                // Split replies exercise the client's buffering.
                for piece in [&b"220-fake.test"[..], b" ESMTP\r\n22", b"0 ready\r\n"] {
                    stream.write_all(piece).await.ok()?;
                    stream.flush().await.ok()?;
                }
            }
            let mut line = Vec::new();
            let mut rejected = false;
            loop {
                line.clear();
                if stream.read_until(b'\n', &mut line).await.ok()? == 0 {
                    return None;
                }
                let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
                let reply: &[u8] = match &verb[..] {
                    b"EHLO" => {
                        let mut ehlo = b"250-fake.test\r\n".to_vec();
                        if self.offer_pipelining {
                            ehlo.extend_from_slice(b"250-PIPELINING\r\n");
                        }
                        if offer_starttls {
                            ehlo.extend_from_slice(b"250-STARTTLS\r\n");
                        }
                        ehlo.extend_from_slice(b"250 8BITMIME\r\n");
                        for piece in ehlo.chunks(5) {
                            stream.write_all(piece).await.ok()?;
                            stream.flush().await.ok()?;
                        }
                        continue;
                    }
                    b"STAR" if offer_starttls => {
                        stream.write_all(b"220 go ahead\r\n").await.ok()?;
                        stream.flush().await.ok()?;
                        return Some(stream.into_inner());
                    }
                    b"MAIL" => {
                        let number = self.mails.fetch_add(1, Ordering::Relaxed) + 1;
                        if self.drop_at == Some(number) {
                            return None;
                        }
                        rejected =
                            self.reject_every.is_some_and(|every| number.is_multiple_of(every));
                        b"250 2.1.0 ok\r\n"
                    }
                    b"RCPT" if rejected => b"550 5.1.1 no such user\r\n",
                    b"RCPT" => b"250 2.1.5 ok\r\n",
                    b"DATA" if rejected => b"554 5.5.1 no valid recipients\r\n",
                    b"DATA" => {
                        stream.write_all(b"354 go ahead\r\n").await.ok()?;
                        stream.flush().await.ok()?;
                        let mut message = Vec::new();
                        loop {
                            line.clear();
                            if stream.read_until(b'\n', &mut line).await.ok()? == 0 {
                                return None;
                            }
                            if line == b".\r\n" {
                                break;
                            }
                            let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
                            message.extend_from_slice(unstuffed);
                        }
                        self.messages.lock().unwrap().push(message);
                        b"250 2.0.0 queued\r\n"
                    }
                    b"RSET" => {
                        rejected = false;
                        b"250 2.0.0 ok\r\n"
                    }
                    b"QUIT" => {
                        let _ = stream.write_all(b"221 2.0.0 bye\r\n").await;
                        let _ = stream.flush().await;
                        // Wait for the client to close.
                        let _ = stream.read(&mut [0; 16]).await;
                        return None;
                    }
                    _ => b"500 5.5.2 unknown\r\n",
                };
                stream.write_all(reply).await.ok()?;
                stream.flush().await.ok()?;
            }
        }
    }

    fn args(addr: SocketAddr, extra: &[&str]) -> Args {
        let addr = addr.to_string();
        let mut argv = vec!["loadgen", "--server", &addr, "--timeout", "10"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    /// The numbers in the Subject fields of the received messages.
    fn subjects(server: &Server) -> BTreeSet<u64> {
        let messages = server.messages.lock().unwrap();
        messages
            .iter()
            .map(|message| {
                let text = std::str::from_utf8(message).unwrap();
                let start = text.find("Subject: loadgen message ").unwrap() + 25;
                text[start..start + NUMBER_WIDTH].parse().unwrap()
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_sessions_send_every_message_once() {
        let (addr, server) = start(Server { offer_pipelining: true, ..Server::default() }).await;
        let args = args(
            addr,
            &[
                "--sessions",
                "3",
                "--messages",
                "50",
                "--size",
                "2000",
                "--recipients",
                "2",
                "--to",
                "user%d@localhost",
                "--pipelining",
                "--messages-per-session",
                "7",
            ],
        );
        let (info, summary) = run(&args).await.unwrap();
        assert_eq!(summary.ok, 50, "{summary:?}");
        assert!(!summary.failed_run(), "{summary:?}");
        assert_eq!(summary.lockstep_fallbacks, 0);
        assert!(summary.connections >= 8, "{summary:?}");
        assert_eq!(server.connections.load(Ordering::Relaxed), summary.connections);
        assert!(summary.p50 <= summary.p99 && summary.p99 <= summary.max);
        assert_eq!(subjects(&server), (1..=50).collect());
        let messages = server.messages.lock().unwrap();
        for message in messages.iter() {
            assert_eq!(message.len(), 2000);
            assert_eq!(info.message_bytes, 2000);
            let text = std::str::from_utf8(message).unwrap();
            assert!(text.contains("To: <user1@localhost>,\r\n <user2@localhost>\r\n"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rejections_and_dropped_connections_are_counted() {
        let server = Server { reject_every: Some(5), drop_at: Some(13), ..Server::default() };
        let (addr, server) = start(server).await;
        let args = args(addr, &["--sessions", "1", "--messages", "20", "--size", "500"]);
        let (_, summary) = run(&args).await.unwrap();
        assert_eq!(summary.ok, 15, "{summary:?}");
        assert_eq!(summary.failed, 5);
        assert_eq!(summary.unsent, 0);
        assert_eq!(summary.errors[&ErrorKind::Reply(550)], 4);
        assert_eq!(summary.errors[&ErrorKind::Connection], 1);
        assert_eq!(summary.error_count(), 5);
        assert_eq!(summary.connections, 2);
        assert!(summary.failed_run());
        assert_eq!(subjects(&server), (1..=20).filter(|n| n % 5 != 0 && *n != 13).collect());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_rejections_read_every_reply() {
        let server = Server { offer_pipelining: true, reject_every: Some(3), ..Server::default() };
        let (addr, server) = start(server).await;
        let argv = ["--sessions", "2", "--messages", "30", "--pipelining", "--recipients", "3"];
        let (_, summary) = run(&args(addr, &argv)).await.unwrap();
        assert_eq!(summary.ok, 20, "{summary:?}");
        assert_eq!(summary.failed, 10);
        assert_eq!(summary.errors[&ErrorKind::Reply(550)], 10);
        assert_eq!(summary.error_count(), 10);
        assert_eq!(summary.connections, 2);
        assert_eq!(server.messages.lock().unwrap().len(), 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn falls_back_to_lock_step_without_pipelining() {
        let (addr, server) = start(Server::default()).await;
        let argv = ["--sessions", "2", "--messages", "10", "--pipelining"];
        let (_, summary) = run(&args(addr, &argv)).await.unwrap();
        assert_eq!(summary.ok, 10, "{summary:?}");
        assert!(!summary.failed_run());
        assert_eq!(summary.lockstep_fallbacks, 2);
        assert_eq!(server.messages.lock().unwrap().len(), 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starttls_and_implicit_tls() {
        for mode in [TlsMode::Starttls, TlsMode::Implicit] {
            let server = Server {
                tls: Some((mode, acceptor())),
                offer_pipelining: true,
                ..Server::default()
            };
            let (addr, server) = start(server).await;
            let argv =
                ["--sessions", "2", "--messages", "20", "--pipelining", "--tls", mode.name()];
            let (_, summary) = run(&args(addr, &argv)).await.unwrap();
            assert_eq!(summary.ok, 20, "{mode:?}: {summary:?}");
            assert!(!summary.failed_run(), "{mode:?}: {summary:?}");
            assert_eq!(subjects(&server), (1..=20).collect());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_servers_give_up_after_the_retries() {
        // Bind and drop to find a port nobody listens on.
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let argv = ["--sessions", "2", "--messages", "10", "--retries", "1"];
        let (_, summary) = run(&args(addr, &argv)).await.unwrap();
        assert_eq!(summary.ok, 0);
        assert_eq!(summary.unsent, 10);
        assert_eq!(summary.errors[&ErrorKind::Connect], 4);
        assert!(summary.failed_run());
    }

    #[test]
    fn bad_arguments_are_refused() {
        let addr: SocketAddr = "127.0.0.1:25".parse().unwrap();
        assert!(plan(&args(addr, &["--to", "a b@localhost"])).is_err());
        assert!(plan(&args(addr, &["--from", "<x>"])).is_err());
        assert!(plan(&args(addr, &["--helo", "a@b"])).is_err());
        assert!(plan(&args(addr, &["--messages", "10000000000"])).is_err());
        assert!(plan(&args(addr, &["--from", ""])).is_ok());
        assert!(Args::try_parse_from(["loadgen", "--sessions", "0"]).is_err());
        assert!(Args::try_parse_from(["loadgen", "--tls", "bogus"]).is_err());
    }
}

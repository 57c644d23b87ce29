//! An SMTP load generator: N concurrent sessions send M messages between them and report
//! messages per second and the latency of the reply to the end of data.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser, Debug, Clone)]
#[command(about = "SMTP load generator with end-of-data latency percentiles")]
struct Args {
    /// Server address, host:port.
    #[arg(long, default_value = "127.0.0.1:2525")]
    server: String,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 10)]
    sessions: usize,
    /// Messages in total, shared by all sessions.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Message size in octets.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    /// Send MAIL, RCPT and DATA in one write (RFC 2920).
    #[arg(long)]
    pipelining: bool,
    #[arg(long, default_value = "loadgen@example.org")]
    from: String,
    /// Recipient address; `%d` is replaced by the recipient number.
    #[arg(long, default_value = "user@localhost")]
    to: String,
    #[arg(long, default_value = "loadgen.example")]
    helo: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct SessionResult {
    /// End-of-data latencies in microseconds.
    latencies: Vec<u32>,
    errors: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let body: Arc<[u8]> = build_body(args.size).into();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for session in 0..args.sessions {
        let (args, body, next) = (args.clone(), body.clone(), next.clone());
        tasks.push(tokio::spawn(async move { session_loop(session, &args, &body, &next).await }));
    }
    let mut latencies = Vec::with_capacity(args.messages as usize);
    let mut errors = Vec::new();
    for task in tasks {
        let result = task.await.context("session task")?;
        latencies.extend(result.latencies);
        errors.extend(result.errors);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let ok = latencies.len();
    let rate = ok as f64 / elapsed;
    let p = |q: f64| percentile(&latencies, q) as f64 / 1000.0;
    if args.json {
        println!(
            "{{\"sessions\":{},\"size\":{},\"pipelining\":{},\"ok\":{},\"errors\":{},\"seconds\":{:.3},\"messages_per_second\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3}}}",
            args.sessions, args.size, args.pipelining, ok, errors.len(), elapsed, rate, p(0.5), p(0.99), p(0.999), p(1.0)
        );
    } else {
        println!("{ok} messages in {elapsed:.2}s: {rate:.1} msg/s, {} errors", errors.len());
        println!("end-of-data latency ms: p50 {:.2} p99 {:.2} p999 {:.2} max {:.2}", p(0.5), p(0.99), p(0.999), p(1.0));
    }
    if let Some(first) = errors.first() {
        eprintln!("first error: {first}");
        std::process::exit(1);
    }
    Ok(())
}

/// A valid message of exactly `size` octets (at least its headers): 78-octet lines, none
/// starting with a dot.
fn build_body(size: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size + 80);
    body.extend_from_slice(b"From: loadgen@example.org\r\nTo: user@localhost\r\nSubject: load\r\n\r\n");
    while body.len() + 78 <= size {
        body.extend(std::iter::repeat_n(b'x', 76));
        body.extend_from_slice(b"\r\n");
    }
    let rest = size.saturating_sub(body.len());
    if rest >= 3 {
        body.extend(std::iter::repeat_n(b'y', rest - 2));
        body.extend_from_slice(b"\r\n");
    }
    body
}

/// The value at quantile `q` of sorted samples (nearest rank).
fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn session_loop(session: usize, args: &Args, body: &[u8], next: &AtomicU64) -> SessionResult {
    let mut result = SessionResult { latencies: Vec::with_capacity((args.messages as usize / args.sessions.max(1)) + 1), errors: Vec::new() };
    let mut reconnects = 0;
    'connect: while next.load(Ordering::Relaxed) < args.messages {
        let mut client = match Client::connect(&args.server, &args.helo).await {
            Ok(client) => client,
            Err(error) => {
                result.errors.push(format!("session {session}: {error:#}"));
                reconnects += 1;
                if reconnects > 10 {
                    return result;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            let number = next.fetch_add(1, Ordering::Relaxed);
            if number >= args.messages {
                let _ = client.command(b"QUIT\r\n").await;
                return result;
            }
            match client.send_message(args, body).await {
                Ok(latency) => result.latencies.push(latency.as_micros().min(u32::MAX as u128) as u32),
                Err(error) => {
                    result.errors.push(format!("message {number}: {error:#}"));
                    continue 'connect;
                }
            }
        }
    }
    result
}

struct Client {
    stream: BufReader<TcpStream>,
    line: Vec<u8>,
    out: Vec<u8>,
}

impl Client {
    async fn connect(server: &str, helo: &str) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(server).await.with_context(|| format!("connecting to {server}"))?;
        stream.set_nodelay(true)?;
        let mut client = Client { stream: BufReader::with_capacity(16 * 1024, stream), line: Vec::new(), out: Vec::new() };
        client.expect(220).await?;
        client.command(format!("EHLO {helo}\r\n").as_bytes()).await?;
        Ok(client)
    }

    async fn send_message(&mut self, args: &Args, body: &[u8]) -> anyhow::Result<Duration> {
        self.out.clear();
        self.out.extend_from_slice(format!("MAIL FROM:<{}>\r\n", args.from).as_bytes());
        for n in 0..args.recipients {
            self.out.extend_from_slice(format!("RCPT TO:<{}>\r\n", args.to.replace("%d", &n.to_string())).as_bytes());
        }
        self.out.extend_from_slice(b"DATA\r\n");
        if args.pipelining {
            self.stream.get_mut().write_all(&self.out).await?;
            for _ in 0..args.recipients + 1 {
                self.expect(250).await?;
            }
            self.expect(354).await?;
        } else {
            let out = std::mem::take(&mut self.out);
            for command in out.split_inclusive(|&b| b == b'\n') {
                let code = if command == b"DATA\r\n" { 354 } else { 250 };
                self.stream.get_mut().write_all(command).await?;
                self.expect(code).await?;
            }
            self.out = out;
        }
        self.stream.get_mut().write_all(body).await?;
        let sent = Instant::now();
        self.stream.get_mut().write_all(b".\r\n").await?;
        self.expect(250).await?;
        Ok(sent.elapsed())
    }

    async fn command(&mut self, command: &[u8]) -> anyhow::Result<()> {
        self.stream.get_mut().write_all(command).await?;
        self.expect_class(2).await
    }

    async fn expect(&mut self, code: u16) -> anyhow::Result<()> {
        let got = self.reply().await?;
        if got != code {
            bail!("expected {code}, got {}", String::from_utf8_lossy(&self.line).trim_end());
        }
        Ok(())
    }

    async fn expect_class(&mut self, class: u16) -> anyhow::Result<()> {
        let got = self.reply().await?;
        if got / 100 != class {
            bail!("expected {class}xx, got {}", String::from_utf8_lossy(&self.line).trim_end());
        }
        Ok(())
    }

    /// Reads one reply, multi-line or not; returns its code.
    async fn reply(&mut self) -> anyhow::Result<u16> {
        loop {
            self.line.clear();
            read_line(&mut self.stream, &mut self.line).await?;
            let code = parse_code(&self.line).with_context(|| format!("bad reply {:?}", String::from_utf8_lossy(&self.line)))?;
            if self.line.get(3) != Some(&b'-') {
                return Ok(code);
            }
        }
    }
}

async fn read_line(stream: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> anyhow::Result<()> {
    loop {
        let byte = stream.read_u8().await.context("connection closed")?;
        line.push(byte);
        if byte == b'\n' {
            return Ok(());
        }
        if line.len() > 4096 {
            bail!("reply line too long");
        }
    }
}

fn parse_code(line: &[u8]) -> Option<u16> {
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !matches!(line.get(3), Some(b' ' | b'-' | b'\r')) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_requested_size_and_valid_lines() {
        for size in [100, 1024, 100 * 1024, 1000] {
            let body = build_body(size);
            assert!(body.len().abs_diff(size) <= 2, "{size}: {}", body.len());
            assert!(body.ends_with(b"\r\n"));
            assert!(body.split(|&b| b == b'\n').all(|l| l.len() <= 999 && !l.starts_with(b".")));
        }
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 0.5), 500);
        assert_eq!(percentile(&samples, 0.99), 990);
        assert_eq!(percentile(&samples, 0.999), 999);
        assert_eq!(percentile(&samples, 1.0), 1000);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.999), 7);
    }

    #[test]
    fn reply_codes() {
        assert_eq!(parse_code(b"250 ok\r\n"), Some(250));
        assert_eq!(parse_code(b"250-PIPELINING\r\n"), Some(250));
        assert_eq!(parse_code(b"250\r\n"), Some(250));
        assert_eq!(parse_code(b"25x ok"), None);
        assert_eq!(parse_code(b"2500 ok"), None);
    }
}

//! Counting results per session, merging them, and printing the summary.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::Duration;

/// What went wrong, for the "errors by reply code" table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    /// An unexpected reply with this code.
    Reply(u16),
    /// The TCP connection could not be made.
    Connect,
    /// The connection broke: reset, closed early, write failure.
    Connection,
    /// No reply (or no progress writing) within the timeout.
    Timeout,
    /// The server's reply was not SMTP.
    Protocol,
    /// TLS handshake failure or STARTTLS not offered.
    Tls,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Reply(code) => write!(f, "{code}"),
            ErrorKind::Connect => f.write_str("connect"),
            ErrorKind::Connection => f.write_str("connection"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Protocol => f.write_str("protocol"),
            ErrorKind::Tls => f.write_str("tls"),
        }
    }
}

/// What one session task saw.
#[derive(Default)]
pub struct SessionStats {
    /// End-of-data latency of every accepted message, in microseconds.
    pub latencies: Vec<u32>,
    /// Messages started but not accepted.
    pub failed: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Connections attempted.
    pub connections: u64,
    /// Connections where PIPELINING was requested but not offered.
    pub lockstep_fallbacks: u64,
    /// The first error in detail.
    pub first_error: Option<String>,
}

impl SessionStats {
    pub fn with_capacity(messages: usize) -> SessionStats {
        SessionStats { latencies: Vec::with_capacity(messages), ..SessionStats::default() }
    }

    pub fn record_latency(&mut self, latency: Duration) {
        self.latencies.push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }

    pub fn record_error(&mut self, kind: ErrorKind, detail: impl FnOnce() -> String) {
        *self.errors.entry(kind).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(detail());
        }
    }
}

/// The run as configured, for the report.
pub struct RunInfo {
    pub server: String,
    pub sessions: u32,
    pub messages: u64,
    /// Requested message size.
    pub size: usize,
    /// Octets actually sent per message (headers and body, dot-stuffed).
    pub message_bytes: usize,
    pub recipients: u32,
    pub pipelining: bool,
    pub tls: &'static str,
}

/// The merged results.
#[derive(Debug, PartialEq)]
pub struct Summary {
    pub ok: u64,
    pub failed: u64,
    /// Messages never started because every session gave up.
    pub unsent: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    pub connections: u64,
    pub lockstep_fallbacks: u64,
    pub seconds: f64,
    /// Latency percentiles in microseconds.
    pub p50: u32,
    pub p99: u32,
    pub p999: u32,
    pub max: u32,
    pub first_error: Option<String>,
}

impl Summary {
    pub fn new(sessions: Vec<SessionStats>, messages: u64, elapsed: Duration) -> Summary {
        let mut latencies = Vec::with_capacity(sessions.iter().map(|s| s.latencies.len()).sum());
        let mut summary = Summary {
            ok: 0,
            failed: 0,
            unsent: 0,
            errors: BTreeMap::new(),
            connections: 0,
            lockstep_fallbacks: 0,
            seconds: elapsed.as_secs_f64(),
            p50: 0,
            p99: 0,
            p999: 0,
            max: 0,
            first_error: None,
        };
        for session in sessions {
            latencies.extend_from_slice(&session.latencies);
            summary.failed += session.failed;
            for (kind, count) in session.errors {
                *summary.errors.entry(kind).or_default() += count;
            }
            summary.connections += session.connections;
            summary.lockstep_fallbacks += session.lockstep_fallbacks;
            summary.first_error = summary.first_error.or(session.first_error);
        }
        latencies.sort_unstable();
        summary.ok = latencies.len() as u64;
        summary.unsent = messages.saturating_sub(summary.ok + summary.failed);
        summary.p50 = percentile(&latencies, 50, 100);
        summary.p99 = percentile(&latencies, 99, 100);
        summary.p999 = percentile(&latencies, 999, 1000);
        summary.max = latencies.last().copied().unwrap_or(0);
        summary
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Whether the run should exit with failure.
    pub fn failed_run(&self) -> bool {
        self.error_count() > 0 || self.failed > 0 || self.unsent > 0
    }

    pub fn messages_per_second(&self) -> f64 {
        self.ok as f64 / self.seconds.max(1e-9)
    }

    /// The human-readable report, several lines.
    pub fn human(&self, info: &RunInfo) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "server {}: {} sessions, {} messages of {} octets, {} recipient{} each, {}, tls {}",
            info.server,
            info.sessions,
            info.messages,
            info.message_bytes,
            info.recipients,
            if info.recipients == 1 { "" } else { "s" },
            if info.pipelining { "pipelining" } else { "lock-step" },
            info.tls
        );
        let _ = writeln!(
            out,
            "messages:   {} ok, {} failed, {} unsent ({} connections)",
            self.ok, self.failed, self.unsent, self.connections
        );
        let _ = write!(out, "errors:     {}", self.error_count());
        if !self.errors.is_empty() {
            let by_kind: Vec<String> =
                self.errors.iter().map(|(kind, count)| format!("{kind}: {count}")).collect();
            let _ = write!(out, " ({})", by_kind.join(", "));
        }
        out.push('\n');
        if self.lockstep_fallbacks > 0 {
            let _ = writeln!(
                out,
                "warning:    {} connections without PIPELINING ran lock-step",
                self.lockstep_fallbacks
            );
        }
        let _ = writeln!(out, "elapsed:    {:.3} s", self.seconds);
        let _ = writeln!(out, "throughput: {:.1} messages/s", self.messages_per_second());
        let _ = write!(
            out,
            "end-of-data latency ms: p50 {}  p99 {}  p999 {}  max {}",
            millis(self.p50),
            millis(self.p99),
            millis(self.p999),
            millis(self.max)
        );
        out
    }

    /// The report as one JSON object on one line.
    pub fn json(&self, info: &RunInfo) -> String {
        let mut out = String::from("{");
        let _ = write!(
            out,
            "\"server\":{},\"sessions\":{},\"messages\":{},\"size\":{},\"message_bytes\":{},\
             \"recipients\":{},\"pipelining\":{},\"tls\":{},",
            json_string(&info.server),
            info.sessions,
            info.messages,
            info.size,
            info.message_bytes,
            info.recipients,
            info.pipelining,
            json_string(info.tls)
        );
        let _ = write!(
            out,
            "\"ok\":{},\"failed\":{},\"unsent\":{},\"errors\":{},\"errors_by_code\":{{",
            self.ok,
            self.failed,
            self.unsent,
            self.error_count()
        );
        for (index, (kind, count)) in self.errors.iter().enumerate() {
            let comma = if index > 0 { "," } else { "" };
            let _ = write!(out, "{comma}{}:{count}", json_string(&kind.to_string()));
        }
        let _ = write!(
            out,
            "}},\"connections\":{},\"lockstep_fallbacks\":{},\"seconds\":{:.3},\
             \"messages_per_second\":{:.1},\"p50_ms\":{},\"p99_ms\":{},\"p999_ms\":{},\
             \"max_ms\":{}}}",
            self.connections,
            self.lockstep_fallbacks,
            self.seconds,
            self.messages_per_second(),
            millis(self.p50),
            millis(self.p99),
            millis(self.p999),
            millis(self.max)
        );
        out
    }
}

/// Microseconds as milliseconds with three decimals.
fn millis(micros: u32) -> String {
    format!("{}.{:03}", micros / 1000, micros % 1000)
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The nearest-rank percentile `numerator / denominator` of ascending `sorted` samples: the
/// smallest sample such that at least that fraction of all samples is not greater. Integer
/// arithmetic, so that e.g. p99.9 of 1000 samples is exactly the 999th.
pub fn percentile(sorted: &[u32], numerator: u64, denominator: u64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let len = sorted.len() as u64;
    let rank = (len * numerator).div_ceil(denominator).clamp(1, len);
    sorted[(rank - 1) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 50, 100), 500);
        assert_eq!(percentile(&samples, 99, 100), 990);
        assert_eq!(percentile(&samples, 999, 1000), 999);
        assert_eq!(percentile(&samples, 1, 1), 1000);
        assert_eq!(percentile(&samples, 0, 1), 1);
        assert_eq!(percentile(&[], 50, 100), 0);
        assert_eq!(percentile(&[7], 999, 1000), 7);
        let ten: Vec<u32> = (1..=10).collect();
        assert_eq!(percentile(&ten, 50, 100), 5);
        assert_eq!(percentile(&ten, 99, 100), 10);
        let hundred_thousand: Vec<u32> = (1..=100_000).collect();
        assert_eq!(percentile(&hundred_thousand, 999, 1000), 99_900);
        assert_eq!(percentile(&hundred_thousand, 99, 100), 99_000);
    }

    fn session(latencies: &[u32], errors: &[(ErrorKind, u64)], failed: u64) -> SessionStats {
        SessionStats {
            latencies: latencies.to_vec(),
            failed,
            errors: errors.iter().copied().collect(),
            connections: 1,
            lockstep_fallbacks: 0,
            first_error: errors.first().map(|(kind, _)| format!("first {kind}")),
        }
    }

    #[test]
    fn summaries_merge_sessions() {
        let sessions = vec![
            session(&[3000, 1000], &[], 0),
            session(&[2000, 5000, 4000], &[(ErrorKind::Reply(550), 2)], 2),
            session(&[], &[(ErrorKind::Connect, 1), (ErrorKind::Reply(550), 1)], 1),
        ];
        let summary = Summary::new(sessions, 10, Duration::from_millis(2500));
        assert_eq!(summary.ok, 5);
        assert_eq!(summary.failed, 3);
        assert_eq!(summary.unsent, 2);
        assert_eq!(summary.error_count(), 4);
        assert_eq!(summary.errors[&ErrorKind::Reply(550)], 3);
        assert_eq!(summary.connections, 3);
        assert_eq!((summary.p50, summary.p99, summary.max), (3000, 5000, 5000));
        assert_eq!(summary.first_error.as_deref(), Some("first 550"));
        assert!(summary.failed_run());
        assert_eq!(summary.messages_per_second(), 2.0);
    }

    fn info() -> RunInfo {
        RunInfo {
            server: "127.0.0.1:2525".into(),
            sessions: 2,
            messages: 10,
            size: 1024,
            message_bytes: 1024,
            recipients: 1,
            pipelining: true,
            tls: "none",
        }
    }

    #[test]
    fn json_is_one_line_with_every_field() {
        let sessions = vec![session(&[1234, 99], &[(ErrorKind::Reply(451), 1)], 1)];
        let mut summary = Summary::new(sessions, 3, Duration::from_millis(1500));
        summary.errors.insert(ErrorKind::Timeout, 2);
        assert_eq!(
            summary.json(&info()),
            "{\"server\":\"127.0.0.1:2525\",\"sessions\":2,\"messages\":10,\"size\":1024,\
             \"message_bytes\":1024,\"recipients\":1,\"pipelining\":true,\"tls\":\"none\",\
             \"ok\":2,\"failed\":1,\"unsent\":0,\"errors\":3,\
             \"errors_by_code\":{\"451\":1,\"timeout\":2},\"connections\":1,\
             \"lockstep_fallbacks\":0,\"seconds\":1.500,\"messages_per_second\":1.3,\
             \"p50_ms\":0.099,\"p99_ms\":1.234,\"p999_ms\":1.234,\"max_ms\":1.234}"
        );
        let clean = Summary::new(vec![session(&[], &[], 0)], 0, Duration::ZERO);
        assert!(clean.json(&info()).contains("\"errors\":0,\"errors_by_code\":{},"));
        assert!(!clean.failed_run());
    }

    #[test]
    fn human_report_lists_errors_by_code() {
        let sessions = vec![session(&[1500], &[(ErrorKind::Reply(554), 1)], 1)];
        let text = Summary::new(sessions, 2, Duration::from_secs(1)).human(&info());
        assert!(text.contains("messages:   1 ok, 1 failed, 0 unsent"), "{text}");
        assert!(text.contains("errors:     1 (554: 1)"), "{text}");
        assert!(text.contains("throughput: 1.0 messages/s"), "{text}");
        assert!(text.contains("p50 1.500  p99 1.500  p999 1.500  max 1.500"), "{text}");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}

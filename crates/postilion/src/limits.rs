//! Abuse limits shared by every session: failed logins per client address and per account
//! (a growing delay, then a temporary ban), connection rates per client address, and
//! message and recipient rates per authenticated account.
//!
//! All counters are in memory, in one process: a restart forgets them, which only gives an
//! attacker a fresh start as slow as the first one. Windows slide: each counter remembers the
//! times of its recent events, at most as many as its limit, so memory stays bounded per key;
//! keys with nothing recent are dropped as the maps are swept.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::AbuseLimits;

/// Sweep the maps for stale keys once they hold this many.
const SWEEP_AT: usize = 10_000;

/// What to do with a session after a failed login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Answer the failure after this delay (zero for the first few failures).
    Delay(Duration),
    /// Too many failures: answer 421 and close; the client address is banned for a while.
    Disconnect,
}

/// Events within a sliding window, keyed by client address or account name.
struct Window<K> {
    events: HashMap<K, VecDeque<Instant>>,
    span: Duration,
}

impl<K: std::hash::Hash + Eq + Clone> Window<K> {
    fn new(span: Duration) -> Window<K> {
        Window { events: HashMap::new(), span }
    }

    /// Records an event and returns how many the key had within the window, this one
    /// included. Keeps at most `cap` times per key.
    fn record(&mut self, key: &K, now: Instant, cap: usize) -> usize {
        self.sweep(now);
        let span = self.span;
        let times = self.events.entry(key.clone()).or_default();
        while times.front().is_some_and(|t| now.duration_since(*t) >= span) {
            times.pop_front();
        }
        times.push_back(now);
        while times.len() > cap.max(1) {
            times.pop_front();
        }
        times.len()
    }

    fn forget(&mut self, key: &K) {
        self.events.remove(key);
    }

    fn sweep(&mut self, now: Instant) {
        if self.events.len() < SWEEP_AT {
            return;
        }
        let span = self.span;
        self.events.retain(|_, times| times.back().is_some_and(|t| now.duration_since(*t) < span));
    }
}

struct State {
    failures_by_ip: Window<IpAddr>,
    failures_by_account: Window<String>,
    banned: HashMap<IpAddr, Instant>,
    connections: Window<IpAddr>,
    messages: Window<String>,
    recipients: Window<String>,
}

pub struct Limiter {
    limits: AbuseLimits,
    state: Mutex<State>,
}

impl Limiter {
    pub fn new(limits: AbuseLimits) -> Limiter {
        let state = State {
            failures_by_ip: Window::new(limits.auth_failure_window),
            failures_by_account: Window::new(limits.auth_failure_window),
            banned: HashMap::new(),
            connections: Window::new(Duration::from_secs(60)),
            messages: Window::new(Duration::from_secs(3600)),
            recipients: Window::new(Duration::from_secs(3600)),
        };
        Limiter { limits, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a new connection from `ip` may be served: not banned, and within the
    /// connection rate. Counts the connection.
    pub fn admit_connection(&self, ip: IpAddr, now: Instant) -> Result<(), &'static str> {
        let mut state = self.state();
        if state.banned.len() >= SWEEP_AT {
            state.banned.retain(|_, until| now < *until);
        }
        let network = ban_key(ip);
        if let Some(until) = state.banned.get(&network).copied() {
            if now < until {
                return Err("Client address temporarily banned after failed logins");
            }
            state.banned.remove(&network);
        }
        let cap = self.limits.connection_rate;
        if cap > 0 && state.connections.record(&ip, now, cap + 1) > cap {
            return Err("Too many connections per minute from this address");
        }
        Ok(())
    }

    /// Records a failed login from `ip` for `account` (if the client named one) and says
    /// how to answer it. The delay doubles with each failure beyond the free ones, counted
    /// by client address and by account, whichever is worse, so that neither many accounts
    /// from one address nor one account from many addresses can be guessed at speed; the
    /// counts are shared by all sessions, so reconnecting does not reset them.
    pub fn auth_failed(&self, ip: IpAddr, account: Option<&str>, now: Instant) -> AfterFailure {
        let limits = &self.limits;
        let mut state = self.state();
        let cap = limits.auth_failures_before_ban + 1;
        let ip = ban_key(ip);
        let by_ip = state.failures_by_ip.record(&ip, now, cap);
        let by_account = match account {
            Some(name) => state.failures_by_account.record(&name.to_lowercase(), now, cap),
            None => 0,
        };
        if by_ip >= limits.auth_failures_before_ban {
            state.banned.insert(ip, now + limits.auth_ban);
            state.failures_by_ip.forget(&ip);
            return AfterFailure::Disconnect;
        }
        let worst = by_ip.max(by_account);
        AfterFailure::Delay(failure_delay(worst, limits.auth_free_failures, limits.auth_max_delay))
    }

    /// A successful login clears the address's failures (the account's stay: they may come
    /// from elsewhere).
    pub fn auth_succeeded(&self, ip: IpAddr) {
        self.state().failures_by_ip.forget(&ban_key(ip));
    }

    /// Counts one message from `account`; `Err` when it is over its hourly limit.
    pub fn message(&self, account: &str, now: Instant) -> Result<(), &'static str> {
        let cap = self.limits.messages_per_hour;
        if cap > 0 && self.state().messages.record(&account.to_lowercase(), now, cap + 1) > cap {
            return Err("message rate limit exceeded");
        }
        Ok(())
    }

    /// Counts one recipient for `account`; `Err` when it is over its hourly limit.
    pub fn recipient(&self, account: &str, now: Instant) -> Result<(), &'static str> {
        let cap = self.limits.recipients_per_hour;
        if cap > 0 && self.state().recipients.record(&account.to_lowercase(), now, cap + 1) > cap {
            return Err("recipient rate limit exceeded");
        }
        Ok(())
    }
}

/// What failed logins are counted and banned by: the address, or for IPv6 its /64, since
/// one host usually has a whole /64 to pick addresses from.
fn ban_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
        },
        v4 => v4,
    }
}

/// No delay for the first `free` failures, then 1s, 2s, 4s ... up to `max`.
fn failure_delay(failures: usize, free: usize, max: Duration) -> Duration {
    if failures <= free {
        return Duration::ZERO;
    }
    let doublings = (failures - free - 1).min(20) as u32;
    Duration::from_secs(1u64 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AbuseLimits {
        AbuseLimits {
            auth_free_failures: 2,
            auth_failures_before_ban: 6,
            auth_failure_window: Duration::from_secs(600),
            auth_max_delay: Duration::from_secs(8),
            auth_ban: Duration::from_secs(300),
            connection_rate: 3,
            messages_per_hour: 2,
            recipients_per_hour: 3,
        }
    }

    #[test]
    fn delays_grow_then_the_address_is_banned() {
        let limiter = Limiter::new(limits());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t = Instant::now();
        let delays: Vec<AfterFailure> =
            (0..6).map(|_| limiter.auth_failed(ip, Some("alice"), t)).collect();
        let secs = |s| AfterFailure::Delay(Duration::from_secs(s));
        assert_eq!(
            delays,
            [
                AfterFailure::Delay(Duration::ZERO),
                AfterFailure::Delay(Duration::ZERO),
                secs(1),
                secs(2),
                secs(4),
                AfterFailure::Disconnect
            ]
        );
        assert!(limiter.admit_connection(ip, t).is_err(), "banned");
        assert!(limiter.admit_connection(other, t).is_ok(), "others are still served");
        // The account's failures slow down guesses from another address too.
        assert_eq!(limiter.auth_failed(other, Some("ALICE"), t), secs(8));
        assert_eq!(limiter.auth_failed(other, Some("bob"), t), AfterFailure::Delay(Duration::ZERO));
        // The ban ends.
        assert!(limiter.admit_connection(ip, t + Duration::from_secs(301)).is_ok());
    }

    #[test]
    fn failures_age_out_and_success_clears_the_address() {
        let limiter = Limiter::new(limits());
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let t = Instant::now();
        let delay = |after| AfterFailure::Delay(Duration::from_secs(after));
        for _ in 0..3 {
            limiter.auth_failed(ip, None, t);
        }
        assert_eq!(limiter.auth_failed(ip, None, t), delay(2));
        let later = t + Duration::from_secs(600);
        assert_eq!(limiter.auth_failed(ip, None, later), AfterFailure::Delay(Duration::ZERO));
        limiter.auth_failed(ip, None, later);
        limiter.auth_failed(ip, None, later);
        limiter.auth_succeeded(ip);
        assert_eq!(limiter.auth_failed(ip, None, later), AfterFailure::Delay(Duration::ZERO));
    }

    #[test]
    fn an_ipv6_ban_covers_the_whole_slash_64() {
        let limiter = Limiter::new(AbuseLimits { auth_failures_before_ban: 2, ..limits() });
        let t = Instant::now();
        let first: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let sibling: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        limiter.auth_failed(first, None, t);
        assert_eq!(limiter.auth_failed(sibling, None, t), AfterFailure::Disconnect);
        assert!(limiter.admit_connection(first, t).is_err());
        assert!(limiter.admit_connection(sibling, t).is_err());
        assert!(limiter.admit_connection(elsewhere, t).is_ok());
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(ban_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn connection_and_sending_rates() {
        let limiter = Limiter::new(limits());
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            limiter.admit_connection(ip, t).unwrap();
        }
        assert!(limiter.admit_connection(ip, t).is_err());
        assert!(limiter.admit_connection(ip, t + Duration::from_secs(61)).is_ok());
        limiter.message("alice", t).unwrap();
        limiter.message("Alice", t).unwrap();
        assert!(limiter.message("alice", t).is_err());
        assert!(limiter.message("bob", t).is_ok());
        for _ in 0..3 {
            limiter.recipient("alice", t).unwrap();
        }
        assert!(limiter.recipient("alice", t).is_err());
        assert!(limiter.recipient("alice", t + Duration::from_secs(3601)).is_ok());
    }

    #[test]
    fn zero_means_unlimited() {
        let limiter = Limiter::new(AbuseLimits {
            connection_rate: 0,
            messages_per_hour: 0,
            recipients_per_hour: 0,
            ..limits()
        });
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let t = Instant::now();
        for _ in 0..100 {
            limiter.admit_connection(ip, t).unwrap();
            limiter.message("a", t).unwrap();
            limiter.recipient("a", t).unwrap();
        }
    }
}

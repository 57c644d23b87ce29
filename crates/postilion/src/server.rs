//! The inbound server: listeners, connection caps, and turning accepted transactions into
//! durable queue entries.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use smtp_proto::reply::{self, EnhancedStatus, Reply};
use smtp_proto::trace::{ReceivedFacts, received_header, rfc5322_date};
use smtp_proto::{Domain, ForwardPath, MailFrom, RcptTo, ReversePath, SessionConfig, Transaction};
use spool::{Envelope, NewMessage, QueueId, QueueStore, Recipient, RecipientStatus, SpoolError};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use accounts::Account;
use dsn::{Action, RecipientReport};

use crate::config::{Config, Role, TlsMode};
use crate::conn;
use crate::delivery::DeliveryQueue;
use crate::router::{Lookup, Router};

/// What every connection shares.
pub struct Server {
    pub config: Config,
    pub router: Arc<Router>,
    pub spool: Arc<dyn QueueStore>,
    pub delivery: DeliveryQueue,
    pub limiter: ConnectionLimiter,
    /// Login failures, bans and rates, shared by all sessions.
    pub abuse: crate::limits::Limiter,
    /// Builds the notices due at acceptance ("expanded").
    pub notifier: Arc<crate::notify::Notifier>,
    /// `None` when no listener offers AUTH.
    pub authenticator: Option<crate::auth::Authenticator>,
    /// Becomes true when the server is shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// The free-space check of the data directory's file system.
    pub free_space: FreeSpace,
}

/// How long a reading of the free space that allowed mail is used again.
const FREE_SPACE_REUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// Readings of the free space on the data directory's file system, for the check at MAIL and
/// at the end of the data.
///
/// A reading (fstatvfs on the open directory, so no path lookup) is a system call, twice per
/// message; at thousands of messages a second a reading that allowed mail is used again for
/// [`FREE_SPACE_REUSE`]. One that refused mail is never reused, so mail is accepted again as
/// soon as space is freed. A disk that fills up within the reuse time is caught by the
/// spool's own write, which is answered with 452 as well.
pub struct FreeSpace {
    dir: std::fs::File,
    /// The last reading that allowed mail: when it was taken, and the octets free.
    last: Mutex<Option<(Instant, u64)>>,
}

impl FreeSpace {
    pub fn new(dir: std::fs::File) -> FreeSpace {
        FreeSpace { dir, last: Mutex::new(None) }
    }

    /// `Ok` if at least `needed` octets are free, else the octets free.
    fn check(&self, needed: u64) -> Result<(), u64> {
        self.check_with(needed, Instant::now(), || {
            rustix::fs::fstatvfs(&self.dir)
                .map(|stat| stat.f_bavail.saturating_mul(stat.f_frsize))
                .unwrap_or(0)
        })
    }

    fn check_with(&self, needed: u64, now: Instant, read: impl FnOnce() -> u64) -> Result<(), u64> {
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((at, free)) = *last
            && now.saturating_duration_since(at) < FREE_SPACE_REUSE
            && free >= needed
        {
            return Ok(());
        }
        let free = read();
        if free >= needed {
            *last = Some((now, free));
            Ok(())
        } else {
            *last = None;
            Err(free)
        }
    }
}

/// One bound listener and how its sessions behave.
pub struct Listener {
    pub name: String,
    pub role: Role,
    pub mode: TlsMode,
    pub session_config: Arc<SessionConfig>,
    /// Present when the listener offers STARTTLS or is implicit TLS.
    pub tls: Option<TlsAcceptor>,
    pub socket: TcpListener,
}

/// Facts about a connection that the Received header and logs need.
#[derive(Debug, Clone)]
pub struct ConnectionFacts {
    pub peer: SocketAddr,
    /// TLS version and cipher once TLS is active.
    pub tls: Option<(String, String)>,
}

impl Server {
    /// Decides a MAIL command: an authenticated user may use only the senders its account
    /// allows, within its message rate; and a message is refused up front when storage
    /// cannot hold it (RFC 1870 section 6.1: 452).
    pub fn check_mail(&self, mail: &MailFrom, account: Option<&Account>) -> Result<(), Reply> {
        if let Some(account) = account {
            let sender = match &mail.path {
                ReversePath::Null => String::new(),
                ReversePath::Mailbox(mailbox) => mailbox.to_string(),
            };
            let restrict = self.authenticator.as_ref().is_some_and(|a| a.restrict_senders);
            if restrict && !account.may_send_as(&sender) {
                warn!(user = %account.name, sender = ?sender, "sender refused: not owned by the user");
                return Err(Reply::owned(
                    553,
                    EnhancedStatus(5, 7, 1),
                    format!("Sender address rejected: not owned by user {}", account.name),
                ));
            }
            if let Err(why) = self.abuse.message(&account.name, Instant::now()) {
                warn!(user = %account.name, why, "message refused");
                return Err(reply::RATE_LIMITED);
            }
        }
        self.check_storage(mail.size.unwrap_or(0))
    }

    /// Decides a RCPT command: local domains by their mailboxes; any other domain only for
    /// authenticated users and clients in `relay.networks` (never an open relay).
    pub fn check_rcpt(
        &self,
        rcpt: &RcptTo,
        client: IpAddr,
        account: Option<&Account>,
    ) -> Result<(), Reply> {
        let may_relay = account.is_some() || self.config.relay.allows(client);
        if let ForwardPath::Mailbox(mailbox) = &rcpt.path {
            // Sender-specified routing in the local part (user%host@us, host!user@us,
            // "user@host"@us): old relay tricks. Never honoured; to a client that may not
            // relay it is what it is meant to be, a relay attempt.
            if mailbox.local_part.contains(['%', '!', '@'])
                && self.router.is_local_domain(&mailbox.domain)
            {
                return Err(if may_relay { reply::NO_SUCH_USER } else { reply::RELAY_DENIED });
            }
        }
        let verdict = match self.router.resolve(&rcpt.path) {
            Lookup::Local(_) => Ok(()),
            Lookup::NoSuchUser => Err(reply::NO_SUCH_USER),
            Lookup::NotLocal if may_relay && routable(rcpt) => Ok(()),
            Lookup::NotLocal => Err(reply::RELAY_DENIED),
        };
        if let (Ok(()), Some(account)) = (&verdict, account)
            && let Err(why) = self.abuse.recipient(&account.name, Instant::now())
        {
            warn!(user = %account.name, why, "recipient refused");
            return Err(reply::RATE_LIMITED);
        }
        verdict
    }

    fn check_storage(&self, needed: u64) -> Result<(), Reply> {
        if let Err(free) =
            self.free_space.check(self.config.spool.free_space_reserve.saturating_add(needed))
        {
            warn!(
                free,
                reserve = self.config.spool.free_space_reserve,
                needed,
                "refusing mail: free space below reserve"
            );
            return Err(reply::INSUFFICIENT_STORAGE);
        }
        Ok(())
    }

    /// Stores a completed transaction durably and answers with the reply for the client:
    /// 250 only once the queue entry is on stable storage (RFC 5321 section 6.1).
    pub async fn accept_message(
        &self,
        transaction: Transaction,
        facts: &ConnectionFacts,
        helo: &str,
        esmtp: bool,
        authenticated_as: Option<&str>,
        submission: bool,
    ) -> Reply {
        let id = QueueId::generate();
        let received_at = SystemTime::now();
        let (recipients, expanded) = self.final_recipients(&transaction.recipients);
        if recipients.is_empty() {
            // Every recipient was accepted at RCPT time, so only a configuration change in
            // between can get here.
            return reply::NO_SUCH_USER;
        }
        let queue_id = id.to_string();
        let single = match transaction.recipients.as_slice() {
            [only] => Some(only.path.to_string()),
            _ => None,
        };
        let unix_time = received_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let header = received_header(&ReceivedFacts {
            helo,
            client_ip: facts.peer.ip(),
            client_name: None,
            by: &self.config.hostname,
            esmtp,
            tls: facts.tls.as_ref().map(|(v, c)| (v.as_str(), c.as_str())),
            authenticated: authenticated_as.is_some(),
            smtputf8: transaction.mail.smtputf8,
            queue_id: &queue_id,
            single_recipient: single.as_deref(),
            unix_time,
        });
        if let Err(reply) = self.check_storage((header.len() + transaction.content.len()) as u64) {
            return reply;
        }
        let fixups = match (submission, authenticated_as) {
            (true, Some(_)) => {
                submission_fixups(&transaction.content, &self.config.hostname, id, unix_time)
            }
            _ => String::new(),
        };
        let mut content =
            Vec::with_capacity(header.len() + fixups.len() + transaction.content.len());
        content.extend_from_slice(header.as_bytes());
        content.extend_from_slice(fixups.as_bytes());
        content.extend_from_slice(&transaction.content);
        let content = Arc::new(content);
        let size = content.len();
        let envelope = Envelope {
            sender: match &transaction.mail.path {
                ReversePath::Null => String::new(),
                ReversePath::Mailbox(mailbox) => mailbox.to_string(),
            },
            body: transaction.mail.body.unwrap_or_default(),
            smtputf8: transaction.mail.smtputf8,
            ret: transaction.mail.ret,
            envid: transaction.mail.envid.clone(),
            client_ip: facts.peer.ip(),
            helo: helo.to_string(),
            tls: facts.tls.as_ref().map(|(v, c)| format!("{v} {c}")),
            authenticated_as: authenticated_as.map(str::to_string),
            received_at,
        };
        // Not for a null sender (the dsn rules say so).
        let expanded: Vec<RecipientReport> =
            expanded.into_iter().filter(|_| !envelope.sender.is_empty()).collect();
        let notices = self.notifier.build(id, &envelope, &content, expanded);
        let preloaded = self.delivery.preload(&content);
        let message =
            NewMessage { id, envelope: envelope.clone(), recipients: recipients.clone(), content };
        // A message and the notices its acceptance calls for are stored together.
        let stored = match notices.is_empty() {
            true => self.spool.store(message).await,
            false => {
                let mut all = vec![message];
                all.extend(notices.iter().cloned());
                self.spool.store_all(all).await
            }
        };
        match stored {
            Ok(()) => {
                info!(
                    queue_id = %id,
                    client = %facts.peer.ip(),
                    tls = facts.tls.as_ref().map(|(v, _)| v.as_str()).unwrap_or("no"),
                    sender = ?envelope.sender,
                    recipients = ?recipients.iter().map(|r| r.address.as_str()).collect::<Vec<_>>(),
                    size,
                    result = "queued",
                    "message accepted"
                );
                let sender = envelope.sender.clone();
                self.delivery.submit(id, envelope, recipients, preloaded);
                self.notifier.submit(id, &sender, notices, &self.delivery);
                Reply::owned(250, EnhancedStatus(2, 0, 0), format!("Ok: queued as {id}"))
            }
            Err(error) => {
                warn!(queue_id = %id, client = %facts.peer.ip(), size, %error, result = "refused", "message not stored");
                match error {
                    SpoolError::StorageFull => reply::INSUFFICIENT_STORAGE,
                    _ => reply::LOCAL_ERROR,
                }
            }
        }
    }

    /// Expands the accepted RCPTs into one queue recipient per final mailbox address; two
    /// RCPTs reaching the same mailbox give it one copy. Also returns the "expanded" reports
    /// due for aliases with several members.
    fn final_recipients(&self, rcpts: &[RcptTo]) -> (Vec<Recipient>, Vec<RecipientReport>) {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(rcpts.len());
        let mut expanded = Vec::new();
        for rcpt in rcpts {
            let addresses = match self.router.resolve(&rcpt.path) {
                Lookup::Local(addresses) => addresses,
                // Accepted for relaying at RCPT time.
                Lookup::NotLocal => vec![rcpt.path.to_string()],
                Lookup::NoSuchUser => continue,
            };
            let original = match &rcpt.path {
                ForwardPath::Postmaster => "Postmaster".to_string(),
                ForwardPath::Mailbox(mailbox) => mailbox.to_string(),
            };
            // RFC 3461 section 5.2.7.3 (c), for an alias with several members: "The NOTIFY
            // parameter is propagated to the forwarding addresses, except that any SUCCESS
            // keyword is removed. If the original NOTIFY parameter for the alias contained
            // the SUCCESS keyword, an "expanded" DSN is issued for the alias."
            let mut notify = rcpt.notify;
            if addresses.len() > 1
                && let Some(asked) = notify.as_mut().filter(|n| n.success)
            {
                asked.success = false;
                let mut report = RecipientReport::new(
                    original.clone(),
                    Action::Expanded,
                    EnhancedStatus(2, 0, 0),
                );
                report.original_recipient = rcpt.orcpt.clone();
                report.last_attempt = Some(SystemTime::now());
                expanded.push(report);
            }
            for address in addresses {
                if seen.insert(self.router.recipient_key(&address)) {
                    out.push(Recipient {
                        address,
                        original: original.clone(),
                        notify,
                        orcpt: rcpt.orcpt.clone(),
                        status: RecipientStatus::Pending,
                    });
                }
            }
        }
        (out, expanded)
    }
}

/// Outbound delivery can route a name or an IP literal, not a general address literal.
fn routable(rcpt: &RcptTo) -> bool {
    match &rcpt.path {
        ForwardPath::Mailbox(mailbox) => !matches!(mailbox.domain, Domain::GeneralLiteral(_)),
        ForwardPath::Postmaster => false,
    }
}

/// RFC 6409 section 8.1 and 8.3: a submission server MAY add a missing Date and Message-ID
/// to a message from an authenticated user. Returns the fields to put in front of the
/// header section, empty when both are there.
fn submission_fixups(content: &[u8], hostname: &str, id: QueueId, unix_time: i64) -> String {
    let header_end = content
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map_or(content.len(), |position| position + 2);
    let has = |name: &str| {
        content[..header_end].split(|&b| b == b'\n').any(|line| {
            line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && line[name.len()] == b':'
        })
    };
    let mut fields = String::new();
    if !has("Date") {
        fields.push_str(&format!("Date: {}\r\n", rfc5322_date(unix_time)));
    }
    if !has("Message-ID") {
        fields.push_str(&format!("Message-ID: <{id}@{hostname}>\r\n"));
    }
    fields
}

/// Caps simultaneous connections, in total and per client address.
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Holds one connection slot; dropping it frees the slot.
pub struct ConnectionPermit {
    server: Arc<Server>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> ConnectionLimiter {
        ConnectionLimiter { max_total, max_per_ip, counts: Mutex::new((0, HashMap::new())) }
    }

    fn try_acquire(&self, ip: IpAddr) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (total, per_ip) = &mut *counts;
        let from_ip = per_ip.get(&ip).copied().unwrap_or(0);
        if *total >= self.max_total || from_ip >= self.max_per_ip {
            return false;
        }
        *total += 1;
        per_ip.insert(ip, from_ip + 1);
        true
    }

    fn release(&self, ip: IpAddr) {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (total, per_ip) = &mut *counts;
        *total = total.saturating_sub(1);
        if let Some(count) = per_ip.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}

impl ConnectionPermit {
    fn acquire(server: &Arc<Server>, ip: IpAddr) -> Option<ConnectionPermit> {
        server.limiter.try_acquire(ip).then(|| ConnectionPermit { server: server.clone(), ip })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.server.limiter.release(self.ip);
    }
}

/// Binds every configured listener's socket. Runs before the async runtime starts and
/// before privileges are dropped, since ports below 1024 need root.
pub fn bind_sockets(config: &Config) -> anyhow::Result<Vec<std::net::TcpListener>> {
    config
        .listeners
        .iter()
        .map(|listener| {
            listen(listener.address).with_context(|| {
                format!("binding listener {} to {}", listener.name, listener.address)
            })
        })
        .collect()
}

/// The queue of connections the kernel completes before we accept them. The standard
/// library's 128 overflows in bursts (hundreds of clients connecting at once, as after a
/// network outage), and the excess then wait for retransmission timeouts.
const LISTEN_BACKLOG: i32 = 4096;

/// A non-blocking listening socket on `address`, with [`LISTEN_BACKLOG`].
fn listen(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
    let family = if address.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let socket = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    // As the standard library does: a restarted server can bind while old connections of
    // the previous one linger in TIME_WAIT.
    sockopt::set_socket_reuseaddr(&socket, true)?;
    rustix::net::bind(&socket, &address)?;
    rustix::net::listen(&socket, LISTEN_BACKLOG)?;
    Ok(std::net::TcpListener::from(socket))
}

/// Sets up every configured listener on its bound socket, printing where each listens.
pub fn listeners(
    config: &Config,
    sockets: Vec<std::net::TcpListener>,
    tls: Option<Arc<rustls::ServerConfig>>,
    auth_mechanisms: &[String],
) -> anyhow::Result<Vec<Arc<Listener>>> {
    let mut listeners = Vec::new();
    for (listener, socket) in config.listeners.iter().zip(sockets) {
        let socket = TcpListener::from_std(socket).context("registering a listening socket")?;
        let acceptor = match listener.tls() {
            TlsMode::None => None,
            TlsMode::Starttls | TlsMode::Implicit => {
                Some(TlsAcceptor::from(tls.clone().context("TLS is needed but not configured")?))
            }
        };
        let session_config = SessionConfig {
            hostname: config.hostname.clone(),
            max_message_size: config.limits.message_size,
            max_recipients: config.limits.recipients,
            max_command_line: config.limits.command_line,
            max_data_line: config.limits.data_line,
            address_limits: smtp_proto::AddressLimits {
                local_part: config.limits.local_part,
                domain: config.limits.domain,
            },
            max_errors: config.limits.errors,
            max_received_headers: config.limits.received_headers,
            bare_line_endings: listener.bare_line_endings.into(),
            starttls: listener.tls() == TlsMode::Starttls,
            auth_mechanisms: match listener.offers_auth() {
                true => auth_mechanisms.to_vec(),
                false => Vec::new(),
            },
            auth_required: listener.requires_auth(),
            auth_without_tls: smtp_proto::session::AuthWithoutTls::SafeMechanisms,
        };
        let local = socket.local_addr().context("reading the bound address")?;
        println!("listening on {local} ({}, {})", listener.name, listener.tls().as_str());
        listeners.push(Arc::new(Listener {
            name: listener.name.clone(),
            role: listener.role,
            mode: listener.tls(),
            session_config: Arc::new(session_config),
            tls: acceptor,
            socket,
        }));
    }
    Ok(listeners)
}

/// Accepts connections until shutdown, then waits for the sessions to end.
pub async fn run(server: Arc<Server>, listeners: Vec<Arc<Listener>>) {
    // Every session holds a clone of `sessions_done`; `recv` returns None once all are gone.
    let (sessions_done, mut all_sessions_done) = mpsc::channel::<()>(1);
    let mut accepters = Vec::new();
    for listener in listeners {
        accepters.push(tokio::spawn(accept_loop(server.clone(), listener, sessions_done.clone())));
    }
    drop(sessions_done);
    for accepter in accepters {
        let _ = accepter.await;
    }
    let _ = all_sessions_done.recv().await;
}

async fn accept_loop(
    server: Arc<Server>,
    listener: Arc<Listener>,
    sessions_done: mpsc::Sender<()>,
) {
    let mut shutdown = server.shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.socket.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(listener = %listener.name, %error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|stopping| *stopping).await; } => return,
        };
        let admitted = server.abuse.admit_connection(peer.ip(), std::time::Instant::now());
        let permit = ConnectionPermit::acquire(&server, peer.ip());
        let server = server.clone();
        let listener = listener.clone();
        let done = sessions_done.clone();
        tokio::spawn(async move {
            let _done = done;
            match (admitted, permit) {
                (Err(why), _) => conn::refuse(stream, peer, why).await,
                (Ok(()), Some(permit)) => conn::serve(server, listener, stream, peer, permit).await,
                (Ok(()), None) => conn::refuse(stream, peer, "Too many connections").await,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::time::Duration;

    #[test]
    fn a_reading_that_allowed_mail_is_used_again_briefly_one_that_refused_never() {
        let space = FreeSpace::new(std::fs::File::open("/").unwrap());
        let reads = Cell::new(0);
        let reading = |free: u64| {
            let reads = &reads;
            move || {
                reads.set(reads.get() + 1);
                free
            }
        };
        let start = Instant::now();
        assert_eq!(space.check_with(100, start, reading(1000)), Ok(()));
        assert_eq!(reads.get(), 1);
        // Within the reuse time, for as much or less: no new reading.
        assert_eq!(space.check_with(1000, start + Duration::from_millis(5), reading(0)), Ok(()));
        assert_eq!(reads.get(), 1);
        // More than that reading had: read again.
        assert_eq!(
            space.check_with(2000, start + Duration::from_millis(6), reading(1500)),
            Err(1500)
        );
        assert_eq!(reads.get(), 2);
        // A refusal is not reused: space freed since is seen at once.
        assert_eq!(space.check_with(100, start + Duration::from_millis(7), reading(5000)), Ok(()));
        assert_eq!(reads.get(), 3);
        // After the reuse time, read again even for less.
        assert_eq!(
            space.check_with(100, start + Duration::from_millis(7) + FREE_SPACE_REUSE, reading(50)),
            Err(50)
        );
        assert_eq!(reads.get(), 4);
    }

    #[test]
    fn the_real_reading_sees_free_space() {
        let space = FreeSpace::new(std::fs::File::open(std::env::temp_dir()).unwrap());
        assert_eq!(space.check(1), Ok(()));
        assert!(space.check(u64::MAX).is_err());
    }
}

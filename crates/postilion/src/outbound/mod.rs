//! Outbound delivery over SMTP: finds the next hop of a domain (a configured route or its MX
//! hosts), connects to each host in turn until one takes the transaction, and reports an
//! [`Attempt`] per recipient. Connections are reused for later messages to the same host, and
//! capped in all and per destination domain.

mod connection;
pub mod dns;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smtp_proto::client::{
    self, AfterTransaction, ClientError, RecipientResult, TlsIntent, Transaction, TransactionStep,
};
use smtp_proto::{BodyType, Credentials, EnhancedStatus};
use spool::{Envelope, QueueId, Recipient};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::config::{OutboundConfig, OutboundTls};
use crate::delivery::Attempt;
use crate::slots::{KeyedPermit, KeyedSlots};
use connection::{Connection, Dial};
use dns::{Exchanger, MxResolver, RouteError};

/// At most this many connections are tried for one delivery, over all exchangers and their
/// addresses, so a domain with many dead hosts costs a bounded time per attempt.
const MAX_CONNECTION_ATTEMPTS: usize = 10;

/// Message data is written in blocks of this size, each under `data_block_timeout`.
const DATA_BLOCK: usize = 64 * 1024;

/// Where a domain's mail goes and how.
struct NextHop {
    exchangers: Vec<Exchanger>,
    port: u16,
    tls: OutboundTls,
    credentials: Option<Credentials>,
}

/// Idle connections are kept per address, port, host name, TLS policy and login: a
/// connection opened under a weaker policy must never serve a delivery that requires more, a
/// certificate verified for one name must not vouch for another, and one authenticated as one
/// user never carries mail routed with another's credentials.
type PoolKey = (SocketAddr, String, OutboundTls, Option<String>);

struct IdleConnection {
    connection: Connection,
    since: Instant,
}

pub struct Outbound {
    config: OutboundConfig,
    helo_name: String,
    resolver: MxResolver,
    tls: tls::ClientTls,
    connections: Arc<Semaphore>,
    destinations: KeyedSlots,
    idle: Mutex<HashMap<PoolKey, Vec<IdleConnection>>>,
}

/// How the outcome of a connection attempt affects the rest of the delivery.
enum Tried {
    /// Every recipient has its result.
    Done(Vec<(usize, Attempt)>),
    /// This host could not take the message; try the next one. The failure stands for every
    /// recipient if no host can.
    NextHost(Attempt),
    /// A connection from the idle pool broke before the server answered anything of this
    /// transaction (it had closed it while idle): try the same host on a new connection.
    Stale,
}

impl Outbound {
    pub fn new(
        config: OutboundConfig,
        dns: &crate::config::DnsConfig,
        hostname: &str,
    ) -> anyhow::Result<Outbound> {
        let helo_name = config.helo_name.clone().unwrap_or_else(|| hostname.to_string());
        // Our own name as an MX means a loop, whatever we say in EHLO.
        let resolver = MxResolver::new(dns, hostname)?;
        let tls = tls::ClientTls::new(config.ca_file.as_deref())?;
        Ok(Outbound {
            connections: Arc::new(Semaphore::new(config.concurrency)),
            helo_name,
            resolver,
            tls,
            destinations: KeyedSlots::new(config.destination_concurrency),
            idle: Mutex::new(HashMap::new()),
            config,
        })
    }

    pub fn concurrency(&self) -> usize {
        self.config.concurrency
    }

    pub fn destination_concurrency(&self) -> usize {
        self.config.destination_concurrency
    }

    pub fn max_recipients(&self) -> usize {
        self.config.max_recipients
    }

    /// Takes a delivery slot of each of `domains` (at most `destination_concurrency`
    /// deliveries to one domain at once), all or nothing (see
    /// [`KeyedSlots::acquire_all`]). The caller takes them before anything else it holds
    /// while it delivers (a remote delivery slot, the message's content): a delivery waiting
    /// for a busy domain then holds nothing that deliveries to other domains need.
    pub async fn reserve_destinations(&self, domains: &[&str]) -> Vec<KeyedPermit> {
        self.destinations.acquire_all(domains).await
    }

    /// Delivers one message to the recipients of one domain, whose destination slot the
    /// caller holds (see [`Outbound::reserve_destinations`]).
    pub async fn deliver(
        &self,
        id: QueueId,
        envelope: &Envelope,
        content: &[u8],
        domain: &str,
        recipients: Vec<(usize, Recipient)>,
    ) -> Vec<(usize, Attempt)> {
        let hop = match self.next_hop(domain).await {
            Ok(hop) => hop,
            Err(RouteError { permanent, status, reason }) => {
                let attempt = Attempt::failed(permanent, status, reason);
                return recipients.iter().map(|(i, _)| (*i, attempt.clone())).collect();
            }
        };
        let _connection = self.connections.acquire().await;
        let mut last_failure = None;
        let mut any_temporary = false;
        let mut tried = 0;
        'hosts: for exchanger in &hop.exchangers {
            for ip in &exchanger.addresses {
                if tried == MAX_CONNECTION_ATTEMPTS {
                    break 'hosts;
                }
                tried += 1;
                let address = SocketAddr::new(*ip, hop.port);
                let connect = self.connect(&exchanger.host, address, hop.tls, &hop.credentials);
                let mut connection = match connect.await {
                    Ok(connection) => connection,
                    Err(failure) => {
                        warn!(queue_id = %id, host = %exchanger.host, %address, error = %failure, "cannot use host");
                        any_temporary = true;
                        last_failure = Some(failure_attempt(&failure, &exchanger.host));
                        continue;
                    }
                };
                let (mut tried, mut after) =
                    self.transfer(&mut connection, id, envelope, content, &recipients).await;
                if matches!(tried, Tried::Stale) {
                    debug!(queue_id = %id, host = %exchanger.host, %address, "idle connection had gone; reconnecting");
                    let fresh = self.open(&exchanger.host, address, hop.tls, &hop.credentials);
                    connection = match fresh.await {
                        Ok(connection) => connection,
                        Err(failure) => {
                            any_temporary = true;
                            last_failure = Some(failure_attempt(&failure, &exchanger.host));
                            continue;
                        }
                    };
                    (tried, after) =
                        self.transfer(&mut connection, id, envelope, content, &recipients).await;
                }
                match after {
                    AfterTransaction::Ready => {
                        self.release(
                            connection,
                            pool_key(address, &exchanger.host, hop.tls, &hop.credentials),
                        )
                        .await
                    }
                    AfterTransaction::NeedsReset => connection.quit().await,
                    AfterTransaction::Closing => {}
                }
                match tried {
                    Tried::Done(results) => return results,
                    // Only from a reused connection, and the retry above is on a new one.
                    Tried::Stale => {
                        any_temporary = true;
                        last_failure = Some(Attempt::failed(
                            false,
                            connection::BAD_CONNECTION,
                            format!("connection to {} lost", exchanger.host),
                        ));
                    }
                    Tried::NextHost(failure) => {
                        any_temporary |=
                            matches!(failure, Attempt::Failed { permanent: false, .. });
                        last_failure = Some(failure);
                    }
                }
            }
        }
        let mut failure = last_failure.unwrap_or_else(|| {
            Attempt::failed(false, connection::NO_ANSWER, format!("no host for {domain} answered"))
        });
        // Final only if every host said so: one that could not be reached may take the
        // message on the next try.
        if let Attempt::Failed { permanent, status, .. } = &mut failure
            && *permanent
            && any_temporary
        {
            *permanent = false;
            *status = EnhancedStatus(4, status.1, status.2);
        }
        recipients.iter().map(|(i, _)| (*i, failure.clone())).collect()
    }

    async fn next_hop(&self, domain: &str) -> Result<NextHop, RouteError> {
        let route = self.config.routes.get(domain).or_else(|| self.config.routes.get("*"));
        let Some(route) = route else {
            return Ok(NextHop {
                exchangers: self.resolver.exchangers(domain).await?,
                port: self.config.port,
                tls: self.config.tls,
                credentials: None,
            });
        };
        let exchangers = match route.mx {
            true => self.resolver.exchangers(&route.host).await?,
            false => vec![self.resolver.host(&route.host).await?],
        };
        // Checked at start-up; read again here so a changed password file takes effect.
        let credentials = route.credentials().map_err(|error| RouteError {
            permanent: false,
            status: EnhancedStatus(4, 7, 0),
            reason: format!("{error:#}"),
        })?;
        Ok(NextHop {
            exchangers,
            port: route.port.unwrap_or(self.config.port),
            tls: route.tls.unwrap_or(self.config.tls),
            credentials,
        })
    }

    /// Runs one transaction on a ready connection.
    async fn transfer(
        &self,
        connection: &mut Connection,
        id: QueueId,
        envelope: &Envelope,
        content: &[u8],
        recipients: &[(usize, Recipient)],
    ) -> (Tried, AfterTransaction) {
        let host = connection.host.clone();
        let wire_envelope = client::Envelope {
            sender: envelope.sender.clone(),
            body: envelope.body,
            // Only needed (and only scanned) when an 8BITMIME message meets a server
            // without 8BITMIME.
            seven_bit_content: envelope.body == BodyType::EightBitMime
                && !connection.session.extensions().eight_bit_mime
                && client::is_seven_bit(content),
            smtputf8: envelope.smtputf8,
            ret: envelope.ret,
            envid: envelope.envid.clone(),
            size: content.len() as u64,
            recipients: recipients
                .iter()
                .map(|(_, r)| client::EnvelopeRecipient {
                    address: r.address.clone(),
                    notify: r.notify,
                    orcpt: r.orcpt.clone(),
                })
                .collect(),
        };
        let (mut transaction, first) = match Transaction::begin(
            connection.session.extensions(),
            &wire_envelope,
        ) {
            Ok(begun) => begun,
            Err(refusal) => {
                warn!(queue_id = %id, host = %host, error = %refusal, "server cannot take the message");
                let attempt = Attempt::Failed {
                    // Final if no other host does better: a capability no host offers
                    // will not appear by waiting.
                    permanent: refusal.error.is_permanent(),
                    status: refusal.error.status,
                    reason: refusal.error.description.clone(),
                    remote_reply: None,
                    remote_host: Some(host),
                };
                let tried = match refusal.try_next_host {
                    true => Tried::NextHost(attempt),
                    false => {
                        Tried::Done(recipients.iter().map(|(i, _)| (*i, attempt.clone())).collect())
                    }
                };
                return (tried, AfterTransaction::Ready);
            }
        };
        let timeouts = &self.config;
        let mut replies = 0usize;
        let outcome = 'transaction: {
            if let Err(error) = connection.write(&first, timeouts.command_timeout).await {
                break 'transaction transaction.abort(&error.description);
            }
            let mut wait = timeouts.command_timeout;
            loop {
                let reply = match connection.read_reply(wait).await {
                    Ok(reply) => reply,
                    Err(error) => break 'transaction transaction.abort(&error.description),
                };
                replies += 1;
                wait = timeouts.command_timeout;
                match transaction.on_reply(reply) {
                    TransactionStep::Send(bytes) => {
                        if bytes.starts_with(b"DATA") {
                            wait = timeouts.data_timeout;
                        }
                        if let Err(error) = connection.write(&bytes, timeouts.command_timeout).await
                        {
                            break 'transaction transaction.abort(&error.description);
                        }
                    }
                    TransactionStep::SendContent => {
                        let framed = transaction.frame_content(content);
                        let parts = framed.parts();
                        // A small message goes out in one write (one packet, one wake-up at
                        // the other end) rather than body and "." apart.
                        let joined;
                        let blocks: Vec<&[u8]> = match parts.iter().map(|p| p.len()).sum::<usize>()
                        {
                            total if total <= DATA_BLOCK => {
                                joined = framed.to_vec();
                                vec![&joined[..]]
                            }
                            // RFC 5321 section 4.5.3.2.5: the data block timeout is for each
                            // send; a slow but steady reader gets a large message in the end.
                            _ => parts.iter().flat_map(|p| p.chunks(DATA_BLOCK)).collect(),
                        };
                        for block in blocks {
                            if let Err(error) =
                                connection.write(block, timeouts.data_block_timeout).await
                            {
                                break 'transaction transaction.abort(&error.description);
                            }
                        }
                        wait = timeouts.data_done_timeout;
                    }
                    TransactionStep::ReadReply => {}
                    TransactionStep::Done(outcome) => break 'transaction outcome,
                }
            }
        };
        let tls = connection.tls.as_deref().unwrap_or("none");
        if connection.reused && replies == 0 && outcome.connection == AfterTransaction::Closing {
            return (Tried::Stale, AfterTransaction::Closing);
        }
        if let Some(error) = &outcome.mail_failure
            && !error.is_permanent()
        {
            warn!(queue_id = %id, host = %host, address = %connection.address, tls, error = %error, "sender refused for now; trying another host");
            return (Tried::NextHost(failure_attempt(error, &host)), outcome.connection);
        }
        let results = recipients
            .iter()
            .zip(outcome.recipients)
            .map(|((index, recipient), result)| {
                let attempt = match result {
                    RecipientResult::Accepted(reply) => {
                        info!(queue_id = %id, recipient = ?recipient.address, host = %host, address = %connection.address, tls, reply = %reply, result = "delivered", "relayed");
                        Attempt::Delivered {
                            detail: reply.to_string(),
                            remote_host: Some(host.clone()),
                            dsn_passed_on: outcome.dsn_passed_on,
                        }
                    }
                    RecipientResult::Failed(error) => Attempt::Failed {
                        permanent: error.is_permanent(),
                        status: error.status,
                        reason: error.description,
                        remote_reply: error.reply.map(|reply| reply.to_string()),
                        remote_host: Some(host.clone()),
                    },
                };
                (*index, attempt)
            })
            .collect();
        (Tried::Done(results), outcome.connection)
    }

    /// An idle connection to the address under the same policy, or a new one.
    async fn connect(
        &self,
        host: &str,
        address: SocketAddr,
        policy: OutboundTls,
        credentials: &Option<Credentials>,
    ) -> Result<Connection, ClientError> {
        while let Some(mut idle) = self.take_idle(&pool_key(address, host, policy, credentials)) {
            if idle.is_stale().await {
                continue;
            }
            idle.reused = true;
            return Ok(idle);
        }
        self.open(host, address, policy, credentials).await
    }

    /// A new connection, greeted and ready.
    async fn open(
        &self,
        host: &str,
        address: SocketAddr,
        policy: OutboundTls,
        credentials: &Option<Credentials>,
    ) -> Result<Connection, ClientError> {
        let (intent, tls_config) = match policy {
            OutboundTls::None => (TlsIntent::Never, None),
            OutboundTls::Opportunistic => {
                (TlsIntent::Opportunistic, Some(self.tls.any_certificate.clone()))
            }
            OutboundTls::Require => (TlsIntent::Required, Some(self.tls.any_certificate.clone())),
            OutboundTls::Verify => (TlsIntent::Required, self.tls.verified.clone()),
        };
        let dial = |intent, tls_config| Dial {
            host,
            address,
            helo_name: &self.helo_name,
            intent,
            tls_config,
            credentials: credentials.clone(),
            connect_timeout: self.config.connect_timeout,
            greeting_timeout: self.config.greeting_timeout,
            command_timeout: self.config.command_timeout,
        };
        match Connection::open(dial(intent, tls_config)).await {
            // Opportunistic TLS must not make mail undeliverable: a server whose handshake
            // fails gets the message in plaintext, as it would without STARTTLS (RFC 7435
            // section 3, and what Postfix does at security level "may").
            Err(error)
                if policy == OutboundTls::Opportunistic
                    && error.status == EnhancedStatus(4, 7, 4) =>
            {
                warn!(host, %address, %error, "TLS failed; retrying without TLS");
                Connection::open(dial(TlsIntent::Never, None)).await
            }
            other => other,
        }
    }

    fn take_idle(&self, key: &PoolKey) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        let connection = list.pop().map(|idle| idle.connection);
        if list.is_empty() {
            idle.remove(key);
        }
        connection
    }

    /// Keeps a connection for the next message to the same host, or closes it. A reaper
    /// closes it after `idle_timeout`.
    async fn release(&self, mut connection: Connection, key: PoolKey) {
        if self.config.idle_timeout.is_zero() {
            connection.quit().await;
            return;
        }
        let surplus = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            // The pool holds no more than could be in use at once: per destination, and in
            // all, so idle sockets stay within the connection limits too.
            let total: usize = idle.values().map(Vec::len).sum();
            let list = idle.entry(key).or_default();
            if list.len() >= self.config.destination_concurrency || total >= self.config.concurrency
            {
                Some(connection)
            } else {
                list.push(IdleConnection { connection, since: Instant::now() });
                None
            }
        };
        if let Some(mut connection) = surplus {
            connection.quit().await;
        }
    }

    /// Closes the connections that have been idle for longer than `idle_timeout`. Runs
    /// periodically for as long as the server does.
    pub async fn reap_idle(&self) {
        let expired: Vec<Connection> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let limit = self.config.idle_timeout;
            let mut expired = Vec::new();
            for list in idle.values_mut() {
                let (old, fresh): (Vec<_>, Vec<_>) =
                    list.drain(..).partition(|entry| entry.since.elapsed() >= limit);
                *list = fresh;
                expired.extend(old.into_iter().map(|entry| entry.connection));
            }
            idle.retain(|_, list| !list.is_empty());
            expired
        };
        for mut connection in expired {
            connection.quit().await;
        }
    }

    /// Says QUIT on every idle connection (at shutdown: RFC 5321 section 4.1.1.10, a client
    /// closes with QUIT rather than dropping the connection).
    pub async fn close_idle(&self) {
        let idle: Vec<Connection> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.drain().flat_map(|(_, list)| list).map(|entry| entry.connection).collect()
        };
        for mut connection in idle {
            connection.quit().await;
        }
    }

    /// How often [`Outbound::reap_idle`] should run; `None` when connections are not kept.
    pub fn reap_interval(&self) -> Option<Duration> {
        let timeout = self.config.idle_timeout;
        (!timeout.is_zero()).then(|| (timeout / 2).max(Duration::from_millis(100)))
    }
}

fn pool_key(
    address: SocketAddr,
    host: &str,
    policy: OutboundTls,
    credentials: &Option<Credentials>,
) -> PoolKey {
    let login = credentials.as_ref().map(|c| c.username().to_string());
    (address, host.to_ascii_lowercase(), policy, login)
}

/// A failed connection attempt as the result for every recipient, should no host do better.
/// Always temporary, even after a 5xx greeting or EHLO refusal: a server that will not talk
/// to us at all says nothing about the recipients, and may be misconfigured only for now
/// (Postfix defers in this case too).
fn failure_attempt(error: &ClientError, host: &str) -> Attempt {
    let EnhancedStatus(_, subject, detail) = error.status;
    Attempt::Failed {
        permanent: false,
        status: EnhancedStatus(4, subject, detail),
        reason: error.description.clone(),
        remote_reply: error.reply.as_ref().map(|reply| reply.to_string()),
        remote_host: Some(host.to_string()),
    }
}

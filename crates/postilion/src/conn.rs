//! Drives one SMTP session over a socket: reads into a bounded buffer, feeds the sans-IO
//! session, writes its replies, and applies timeouts, STARTTLS and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_proto::EnhancedStatus;
use smtp_proto::reply::{self, Reply};
use smtp_proto::{Event, ServerSession};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use accounts::{Account, normalize_name};
use sasl::{AuthErrorKind, Mechanism, ServerExchange};

use crate::config::{Role, TlsMode};
use crate::limits::AfterFailure;
use crate::server::{ConnectionFacts, ConnectionPermit, Listener, Server};

/// Bytes read from the socket at a time. The session never needs more than this buffered:
/// every feed consumes all input or stops for an event that is handled before reading again.
const READ_BUFFER: usize = 16 * 1024;

/// How a session ended on one stream.
enum Ended {
    /// The session is over (QUIT, error limit, timeout, shutdown, peer gone).
    Closed(&'static str),
    /// STARTTLS was accepted: run the handshake and continue on the TLS stream.
    StartTls,
}

/// Tells an over-limit client to come back later (RFC 5321 section 3.8: 421 before closing).
pub async fn refuse(mut stream: TcpStream, peer: SocketAddr, why: &'static str) {
    warn!(client = %peer.ip(), reason = why, "connection refused");
    let wire = Reply::owned(421, EnhancedStatus(4, 7, 0), format!("{why}, try again later"))
        .and_close()
        .to_bytes();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&wire)).await;
}

/// Serves one connection to the end.
pub async fn serve(
    server: Arc<Server>,
    listener: Arc<Listener>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: ConnectionPermit,
) {
    let started = Instant::now();
    let _ = stream.set_nodelay(true);
    let mut facts = ConnectionFacts { peer, tls: None };
    let mut driver = Driver {
        server: &server,
        listener: &listener,
        facts: &mut facts,
        exchange: None,
        auth_name: None,
        account: None,
        checked_account: None,
        messages: 0,
        shutting_down: None,
    };
    let mut session =
        ServerSession::new(listener.session_config.clone(), listener.mode == TlsMode::Implicit);
    let outcome = match (&listener.tls, listener.mode) {
        (Some(acceptor), TlsMode::Implicit) => match driver.handshake(acceptor, stream).await {
            Ok(mut tls) => {
                session.greet();
                driver.run(&mut tls, &mut session).await
            }
            Err(why) => Err(why),
        },
        _ => {
            let mut stream = stream;
            session.greet();
            match driver.run(&mut stream, &mut session).await {
                Ok(Ended::StartTls) => match &listener.tls {
                    Some(acceptor) => match driver.handshake(acceptor, stream).await {
                        Ok(mut tls) => {
                            session.tls_started();
                            driver.run(&mut tls, &mut session).await
                        }
                        Err(why) => Err(why),
                    },
                    None => Ok(Ended::Closed("STARTTLS without TLS configured")),
                },
                other => other,
            }
        }
    };
    let end = match outcome {
        Ok(Ended::Closed(why)) => why,
        Ok(Ended::StartTls) => "second STARTTLS",
        Err(why) => why,
    };
    let messages = driver.messages;
    info!(
        client = %peer.ip(),
        port = peer.port(),
        listener = %listener.name,
        tls = facts.tls.as_ref().map(|(v, _)| v.as_str()).unwrap_or("no"),
        helo = ?session.greeting().map(|g| g.name.to_string()),
        messages,
        seconds = started.elapsed().as_secs_f64(),
        end,
        "connection closed"
    );
}

struct Driver<'a> {
    server: &'a Server,
    listener: &'a Listener,
    facts: &'a mut ConnectionFacts,
    /// The SASL exchange in progress, between AUTH and its outcome.
    exchange: Option<ServerExchange>,
    /// The user named in the exchange in progress, once known, for throttling and logs.
    auth_name: Option<String>,
    /// The account of the authenticated user.
    account: Option<Arc<Account>>,
    /// The account looked up for the credentials of the exchange in progress.
    checked_account: Option<Account>,
    /// Messages accepted in this connection.
    messages: u32,
    /// Set when shutdown began: the moment by which a message in progress must be done.
    shutting_down: Option<tokio::time::Instant>,
}

impl Driver<'_> {
    async fn handshake(
        &mut self,
        acceptor: &tokio_rustls::TlsAcceptor,
        stream: TcpStream,
    ) -> Result<tokio_rustls::server::TlsStream<TcpStream>, &'static str> {
        let timeout = self.server.config.timeouts.tls_handshake;
        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                self.facts.tls = Some(crate::tls::describe(tls.get_ref().1));
                // RFC 3207 section 4.2: nothing learned before TLS carries over, the login
                // included (the session forgets its identity in `tls_started`).
                self.account = None;
                self.exchange = None;
                self.auth_name = None;
                self.checked_account = None;
                Ok(tls)
            }
            Ok(Err(error)) => {
                warn!(client = %self.facts.peer.ip(), %error, "TLS handshake failed");
                Err("TLS handshake failed")
            }
            Err(_) => Err("TLS handshake timed out"),
        }
    }

    /// Runs the session on one stream until it closes or upgrades to TLS.
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        session: &mut ServerSession,
    ) -> Result<Ended, &'static str> {
        let timeouts = &self.server.config.timeouts;
        let mut shutdown = self.server.shutdown.clone();
        let mut buf: Vec<u8> = Vec::with_capacity(READ_BUFFER);
        // When the command being waited for is due: set once per command, so a client that
        // dribbles a line byte by byte is cut off all the same (RFC 5321 section 4.5.3.2.7
        // is a limit on the wait for a command, not on the gap between two bytes).
        let mut command_deadline: Option<tokio::time::Instant> = None;
        loop {
            // A command was completed (it got a reply or raised an event) or DATA started: the
            // next wait is a new one.
            let mut progressed = false;
            // Use everything buffered, answering events as they come.
            let mut start = 0;
            loop {
                let (used, event) = session.feed(&buf[start..]);
                start += used;
                progressed |= !matches!(event, Event::NeedInput);
                match event {
                    Event::NeedInput => break,
                    Event::Mail => {
                        let account = self.account.as_deref();
                        let verdict = session
                            .pending_mail()
                            .map_or(Ok(()), |mail| self.server.check_mail(mail, account));
                        session.mail_verdict(verdict);
                    }
                    Event::Rcpt => {
                        let account = self.account.as_deref();
                        let verdict = session.pending_rcpt().map_or(Ok(()), |rcpt| {
                            self.server.check_rcpt(rcpt, self.facts.peer.ip(), account)
                        });
                        session.rcpt_verdict(verdict);
                    }
                    Event::Message => {
                        // Replies so far go out now: storing may take a while.
                        flush(stream, session).await?;
                        let reply = self.store(session).await;
                        session.message_verdict(reply);
                    }
                    Event::StartTls => {
                        // RFC 3207 section 4.2 / CVE-2011-0411: whatever the client sent after
                        // STARTTLS in plaintext is dropped with the buffer.
                        flush(stream, session).await?;
                        return Ok(Ended::StartTls);
                    }
                    Event::Close => {
                        flush(stream, session).await?;
                        return Ok(Ended::Closed("closed by protocol"));
                    }
                    Event::Auth => {
                        // The check may take a while (a delay after failures, argon2).
                        flush(stream, session).await?;
                        self.start_auth(session).await;
                    }
                    Event::AuthResponse => {
                        flush(stream, session).await?;
                        self.continue_auth(session).await;
                    }
                    Event::AuthAborted => {
                        self.exchange = None;
                        self.auth_name = None;
                    }
                }
            }
            progressed |= !session.output().is_empty();
            buf.clear();
            if self.shutting_down.is_some() && !session.in_data() {
                session.send(reply::SHUTTING_DOWN.and_close());
                flush(stream, session).await?;
                return Ok(Ended::Closed("shutdown"));
            }
            flush(stream, session).await?;
            let now = tokio::time::Instant::now();
            let mut deadline = if session.in_data() {
                // README: the data timeout is the wait for more message data.
                command_deadline = None;
                now + timeouts.data
            } else {
                if progressed || command_deadline.is_none() {
                    command_deadline = Some(now + timeouts.command);
                }
                command_deadline.unwrap_or(now + timeouts.command)
            };
            if let Some(grace_end) = self.shutting_down {
                deadline = deadline.min(grace_end);
            }
            tokio::select! {
                read = stream.read_buf(&mut buf) => match read {
                    Ok(0) => return Ok(Ended::Closed("client closed the connection")),
                    Ok(_) => {}
                    Err(_) => return Err("read error"),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let (reply, why) = match self.shutting_down {
                        Some(_) => (reply::SHUTTING_DOWN, "shutdown grace period over"),
                        None => (reply::TIMEOUT, "timeout"),
                    };
                    session.send(reply.and_close());
                    flush(stream, session).await?;
                    return Ok(Ended::Closed(why));
                }
                _ = async { let _ = shutdown.wait_for(|stopping| *stopping).await; }, if self.shutting_down.is_none() => {
                    self.shutting_down = Some(tokio::time::Instant::now() + timeouts.shutdown_grace);
                }
            }
        }
    }

    async fn store(&mut self, session: &mut ServerSession) -> Reply {
        let (helo, esmtp) = match session.greeting() {
            Some(greeting) => (greeting.name.to_string(), greeting.esmtp),
            None => (String::new(), false),
        };
        let Some(transaction) = session.take_message() else {
            return reply::LOCAL_ERROR;
        };
        let submission = self.listener.role != Role::Mta;
        let reply = self
            .server
            .accept_message(
                transaction,
                self.facts,
                &helo,
                esmtp,
                session.authenticated_as(),
                submission,
            )
            .await;
        if reply.is_positive() {
            self.messages += 1;
        }
        reply
    }
}

impl Driver<'_> {
    async fn start_auth(&mut self, session: &mut ServerSession) {
        let Some(request) = session.pending_auth().cloned() else { return };
        let Some(authenticator) = &self.server.authenticator else {
            session.auth_failure(reply::AUTH_UNAVAILABLE);
            return;
        };
        let Some(mechanism) = Mechanism::from_name(&request.mechanism) else {
            session.auth_failure(reply::AUTH_UNAVAILABLE);
            return;
        };
        let (exchange, step) = ServerExchange::start(
            mechanism,
            request.initial_response.as_deref(),
            authenticator.settings.clone(),
        );
        self.exchange = Some(exchange);
        self.auth_name = None;
        self.auth_step(session, step).await;
    }

    async fn continue_auth(&mut self, session: &mut ServerSession) {
        let Some(response) = session.pending_auth_response().map(<[u8]>::to_vec) else { return };
        let Some(exchange) = self.exchange.as_mut() else {
            session.auth_failure(reply::AUTH_TEMPORARY_FAILURE);
            return;
        };
        let step = exchange.step(&response);
        self.auth_step(session, step).await;
    }

    /// Carries out steps of the exchange until it needs the client again or is over.
    async fn auth_step(&mut self, session: &mut ServerSession, mut step: sasl::Step) {
        let ip = self.facts.peer.ip();
        loop {
            step = match step {
                sasl::Step::Challenge(challenge) => {
                    session.auth_challenge(&challenge);
                    return;
                }
                sasl::Step::NeedCredentials(request) => {
                    let Some(authenticator) = &self.server.authenticator else { return };
                    self.auth_name = Some(request.authcid().to_string());
                    let (credentials, account) = authenticator.credentials(request).await;
                    self.checked_account = account;
                    match self.exchange.as_mut() {
                        Some(exchange) => exchange.resume(credentials),
                        None => return,
                    }
                }
                sasl::Step::Success { authcid, authzid } => {
                    self.exchange = None;
                    // The account whose credentials were just checked. Without an
                    // authorization policy the identity is always that account's own name.
                    let account = self
                        .checked_account
                        .take()
                        .filter(|account| account.name == normalize_name(&authzid));
                    let Some(account) = account else {
                        session.auth_failure(reply::AUTH_TEMPORARY_FAILURE);
                        return;
                    };
                    self.server.abuse.auth_succeeded(ip);
                    info!(client = %ip, user = %authzid, authcid = %authcid, listener = %self.listener.name, "authenticated");
                    self.account = Some(Arc::new(account));
                    session.auth_success(authzid);
                    return;
                }
                sasl::Step::Failure(error) => {
                    self.exchange = None;
                    let name = self.auth_name.take();
                    let reply = match error.kind() {
                        AuthErrorKind::InvalidCredentials => {
                            match self.server.abuse.auth_failed(ip, name.as_deref(), Instant::now())
                            {
                                AfterFailure::Delay(delay) => {
                                    if !delay.is_zero() {
                                        tokio::time::sleep(delay).await;
                                    }
                                    reply::AUTH_INVALID_CREDENTIALS
                                }
                                AfterFailure::Disconnect => {
                                    warn!(client = %ip, user = ?name, "too many failed logins; address banned for a while");
                                    reply::AUTH_TOO_MANY_FAILURES.and_close()
                                }
                            }
                        }
                        AuthErrorKind::Malformed => reply::AUTH_MALFORMED,
                        AuthErrorKind::InitialResponseNotAllowed => {
                            reply::INITIAL_RESPONSE_NOT_ALLOWED
                        }
                        AuthErrorKind::MechanismNotAvailable => reply::UNKNOWN_MECHANISM,
                        AuthErrorKind::TooLong => reply::AUTH_LINE_TOO_LONG,
                        AuthErrorKind::TemporaryFailure => reply::AUTH_TEMPORARY_FAILURE,
                    };
                    warn!(client = %ip, user = ?name, mechanism = error.mechanism().name(), %error, "authentication failed");
                    session.auth_failure(reply);
                    return;
                }
            };
        }
    }
}

/// Sends the session's pending replies.
async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut ServerSession,
) -> Result<(), &'static str> {
    if session.output().is_empty() {
        return Ok(());
    }
    let result = async {
        stream.write_all(session.output()).await?;
        stream.flush().await
    };
    match tokio::time::timeout(Duration::from_secs(60), result).await {
        Ok(Ok(())) => {
            session.clear_output();
            Ok(())
        }
        Ok(Err(_)) => Err("write error"),
        Err(_) => Err("write timeout"),
    }
}

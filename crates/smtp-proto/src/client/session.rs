//! The connection-level part of an SMTP client: greeting, EHLO or HELO, STARTTLS, AUTH, RSET
//! and QUIT.

use super::auth::{Credentials, Exchange, Mechanism};
use super::extensions::Extensions;
use super::reply::ServerReply;
use super::{ClientError, PROTOCOL_ERROR};
use crate::reply::EnhancedStatus;

/// X.7.4, "security features not supported" (RFC 3463 section 3.8), transient: TLS is
/// required and this server cannot give it now. The same status Postfix uses for this case.
const TLS_UNAVAILABLE: EnhancedStatus = EnhancedStatus(4, 7, 4);
/// X.7.10, "encryption needed" (RFC 5248, in the IANA registry of enhanced status codes): "an
/// external strong privacy layer is needed in order to use the requested authentication
/// mechanism. This is primarily intended for use with clear text authentication mechanisms",
/// which PLAIN and LOGIN are. Transient: TLS may work on the next attempt or the next host.
/// (X.7.11, "encryption required for requested authentication mechanism", is the server's
/// answer to an AUTH command, and RFC 4954 section 6 keeps it "for historical purposes only".)
const ENCRYPTION_NEEDED: EnhancedStatus = EnhancedStatus(4, 7, 10);
/// X.7.4 again, which RFC 3463 describes with "secure authentication" as its example: we
/// require authentication and this server cannot do it with us now. Transient, as for TLS.
const AUTH_UNAVAILABLE: EnhancedStatus = EnhancedStatus(4, 7, 4);
/// X.7.0, "other or undefined security status" (RFC 3463 section 3.8; the IANA registry lists
/// it with 454 and 535), for a refused AUTH whose reply carries no enhanced status code.
const AUTH_FAILED: EnhancedStatus = EnhancedStatus(4, 7, 0);

/// Whether to protect the session with STARTTLS (RFC 3207).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsIntent {
    /// Never send STARTTLS.
    Never,
    /// STARTTLS when the server offers it; plain text when it does not, or when it refuses the
    /// STARTTLS command. A TLS handshake that fails after the 220 leaves the connection
    /// unusable; a driver that wants to deliver anyway reconnects with [`TlsIntent::Never`].
    Opportunistic,
    /// STARTTLS or no delivery: a server that does not offer it, or refuses it, fails the
    /// session with a transient error, so the message waits for a server that can.
    Required,
}

/// How the client presents itself and what it insists on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The argument of EHLO and HELO: our fully-qualified domain name, or an address literal
    /// when there is none (RFC 5321 section 4.1.1.1).
    pub helo_name: String,
    /// Whether to use STARTTLS.
    pub tls: TlsIntent,
    /// Authenticate with SMTP AUTH (RFC 4954) after EHLO, and after the EHLO that follows
    /// STARTTLS when TLS is used, before saying [`SessionStep::Ready`]. A server that does not
    /// offer PLAIN or LOGIN, or refuses the credentials, fails the session: the mail waits
    /// rather than go out unauthenticated.
    ///
    /// The session cannot see the server's certificate. RFC 4954 section 14: "If the server
    /// has not provided any certificate, or if the certificate verification fails, the client
    /// MUST NOT attempt to authenticate using the SASL PLAIN mechanism"; a driver that sets
    /// credentials should run a TLS handshake that verifies the certificate against the host
    /// name it connected to. The AUTH command and the responses that follow carry the
    /// password in base64, so a driver that logs what it writes must leave them out.
    pub auth: Option<Credentials>,
    /// Send the credentials over a connection without TLS. Off, the session fails instead of
    /// sending AUTH, so that a smart host that lost (or never had) STARTTLS cannot collect
    /// the password in clear text. For a smart host on the same machine or a trusted network.
    pub allow_plaintext_auth: bool,
}

/// What the driver must do after handing the session a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionStep {
    /// Write these bytes, then read the next reply.
    Send(Vec<u8>),
    /// The server said 220 to STARTTLS. Check that the reply parser holds nothing more
    /// ([`ReplyParser::is_empty`](super::ReplyParser::is_empty); if it does, close the
    /// connection), run the TLS handshake, then call [`ClientSession::tls_established`].
    StartTls,
    /// Mail transactions may start; see [`ClientSession::extensions`].
    Ready,
    /// The session cannot carry mail. Send [`ClientSession::quit`] if the connection still
    /// works, then close it.
    Failed(ClientError),
    /// The server answered QUIT; close the connection.
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting for the 220 greeting.
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    /// Between the 220 to STARTTLS and [`ClientSession::tls_established`].
    Handshake,
    /// The AUTH command or a response to a challenge was sent.
    Auth(Exchange),
    /// "*" was sent to cancel the exchange; whatever the server answers, the session fails
    /// with this.
    AuthCancelled(ClientError),
    Ready,
    Rset,
    Quit,
    Closed,
    Failed(ClientError),
}

/// The client side of one SMTP connection, up to the point where mail transactions run, and
/// between them. Transactions themselves are [`Transaction`](super::Transaction)s.
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    state: State,
    extensions: Extensions,
    tls_active: bool,
    esmtp: bool,
    authenticated: bool,
}

impl ClientSession {
    /// A session on a new connection, before the greeting. `tls_active` is true when the
    /// connection uses implicit TLS (RFC 8314); STARTTLS is then never sent.
    pub fn new(config: ClientConfig, tls_active: bool) -> ClientSession {
        ClientSession {
            config,
            state: State::Greeting,
            extensions: Extensions::default(),
            tls_active,
            esmtp: false,
            authenticated: false,
        }
    }

    /// Takes the next reply from the server: the greeting first, then the answer to each
    /// command the session sent.
    pub fn on_reply(&mut self, reply: ServerReply) -> SessionStep {
        if reply.code == 421 && !matches!(self.state, State::Quit | State::Closed) {
            // RFC 5321 section 3.8: 421 announces that the server is closing the channel,
            // whatever it answers.
            return self.fail(ClientError::refused("server closing connection", reply));
        }
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Greeting => {
                if reply.code == 220 {
                    self.ehlo()
                } else {
                    // RFC 5321 section 3.1: "a 554 response MAY be given in the initial
                    // connection opening message instead of the 220"; the server then waits
                    // for QUIT.
                    self.fail(ClientError::refused("session refused in greeting", reply))
                }
            }
            State::Ehlo => {
                if reply.is_positive() {
                    self.extensions = Extensions::from_ehlo(&reply);
                    self.esmtp = true;
                    self.after_hello()
                } else if matches!(reply.code, 500 | 502 | 504 | 550) {
                    // RFC 5321 section 3.2: "if the server returns a 'command not recognized'
                    // response to EHLO, the client SHOULD be able to fall back and send
                    // HELO"; section 4.3.2 lists 502, 504 and 550 as the other EHLO errors.
                    self.helo(reply)
                } else {
                    self.fail(ClientError::refused("EHLO refused", reply))
                }
            }
            State::Helo => {
                if reply.is_positive() {
                    self.extensions = Extensions::default();
                    self.esmtp = false;
                    self.after_hello()
                } else {
                    self.fail(ClientError::refused("HELO refused", reply))
                }
            }
            State::StartTls => {
                if reply.code == 220 {
                    self.state = State::Handshake;
                    SessionStep::StartTls
                } else if self.config.tls == TlsIntent::Required {
                    self.fail(ClientError::with_status(
                        TLS_UNAVAILABLE,
                        "STARTTLS refused but TLS required",
                        reply,
                    ))
                } else {
                    // RFC 3207 section 4: after a refusal "the client must decide whether or
                    // not to continue"; opportunistic TLS continues in plain text, with what
                    // the EHLO before it announced.
                    self.authenticate()
                }
            }
            State::Handshake => {
                self.fail(ClientError::refused("reply during TLS handshake", reply))
            }
            State::Auth(exchange) => self.auth_reply(exchange, reply),
            // RFC 4954 section 4: the server "MUST reject the AUTH command by sending a 501
            // reply"; any other answer ends the exchange just as well.
            State::AuthCancelled(error) => self.fail(error),
            State::Ready => self.fail(ClientError::refused("unexpected reply", reply)),
            State::Rset => {
                if reply.is_positive() {
                    self.ready()
                } else {
                    self.fail(ClientError::refused("RSET refused", reply))
                }
            }
            State::Quit | State::Closed => SessionStep::Closed,
            State::Failed(error) => self.fail(error),
        }
    }

    /// The TLS handshake after STARTTLS succeeded. RFC 3207 section 4.2: "the client MUST
    /// discard any knowledge obtained from the server, such as the list of SMTP service
    /// extensions, which was not obtained from the TLS negotiation itself. The client SHOULD
    /// send an EHLO command as the first command after a successful TLS negotiation."
    pub fn tls_established(&mut self) -> SessionStep {
        if self.state != State::Handshake {
            return self.fail(ClientError::local(
                PROTOCOL_ERROR,
                "TLS established without a STARTTLS accepted by the server",
            ));
        }
        self.tls_active = true;
        self.extensions = Extensions::default();
        self.esmtp = false;
        self.ehlo()
    }

    /// The RSET command, to clear the server's transaction state before reusing the
    /// connection (see [`AfterTransaction::NeedsReset`](super::AfterTransaction)). Its reply
    /// gives [`SessionStep::Ready`] again.
    pub fn rset(&mut self) -> Vec<u8> {
        self.state = State::Rset;
        b"RSET\r\n".to_vec()
    }

    /// The QUIT command. RFC 5321 section 4.1.1.10: the client "MUST NOT intentionally close
    /// the transmission channel until it sends a QUIT command, and it SHOULD wait until it
    /// receives the reply". Any reply then gives [`SessionStep::Closed`].
    pub fn quit(&mut self) -> Vec<u8> {
        self.state = State::Quit;
        b"QUIT\r\n".to_vec()
    }

    /// What the server announced in its latest EHLO reply; nothing after HELO, and nothing
    /// between STARTTLS and the EHLO that follows it.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The connection is protected by TLS, implicit or after STARTTLS.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The server accepted EHLO (rather than only HELO), so ESMTP is in use; the `with`
    /// protocol name of a Received field depends on it (RFC 3848).
    pub fn used_esmtp(&self) -> bool {
        self.esmtp
    }

    /// The server accepted our credentials (235 to AUTH).
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    fn ehlo(&mut self) -> SessionStep {
        self.state = State::Ehlo;
        SessionStep::Send(format!("EHLO {}\r\n", self.config.helo_name).into_bytes())
    }

    fn helo(&mut self, ehlo_reply: ServerReply) -> SessionStep {
        if self.config.tls == TlsIntent::Required && !self.tls_active {
            // STARTTLS is a service extension: a server without EHLO cannot offer it.
            return self.fail(ClientError::with_status(
                TLS_UNAVAILABLE,
                "EHLO refused but TLS required",
                ehlo_reply,
            ));
        }
        self.state = State::Helo;
        SessionStep::Send(format!("HELO {}\r\n", self.config.helo_name).into_bytes())
    }

    /// After a positive reply to EHLO or HELO: STARTTLS if wanted and possible.
    fn after_hello(&mut self) -> SessionStep {
        // RFC 3207 section 4.2: "A client MUST NOT attempt to start a TLS session if a TLS
        // session is already active."
        if self.tls_active || self.config.tls == TlsIntent::Never {
            return self.authenticate();
        }
        if self.extensions.starttls {
            self.state = State::StartTls;
            return SessionStep::Send(b"STARTTLS\r\n".to_vec());
        }
        match self.config.tls {
            TlsIntent::Required => self
                .fail(ClientError::local(TLS_UNAVAILABLE, "STARTTLS not offered but TLS required")),
            _ => self.authenticate(),
        }
    }

    /// After EHLO, and STARTTLS if any: AUTH if credentials are configured, else ready. The
    /// mechanism is chosen from the latest EHLO reply: RFC 4954 section 3, "The list of
    /// available mechanisms MAY change after a successful STARTTLS command".
    fn authenticate(&mut self) -> SessionStep {
        let Some(credentials) = &self.config.auth else {
            return self.ready();
        };
        if !self.tls_active && !self.config.allow_plaintext_auth {
            return self.fail(ClientError::local(
                ENCRYPTION_NEEDED,
                "TLS not active, credentials not sent in clear text",
            ));
        }
        // Going on without AUTH is no fallback: the smart host would refuse to relay, and an
        // attacker could make us hand it the mail. RFC 4954 section 9: "an attacker could
        // steal the client's mail by hijacking the [SMTP] connection and either pretending the
        // server does not support the Authentication extension or causing all AUTH commands
        // to fail". The failure is transient: a server that offers AUTH only after TLS, or is
        // being reconfigured, may offer it on the next attempt, and until then the mail waits.
        let Some(mechanism) = Mechanism::choose(&self.extensions.auth) else {
            let description = if self.extensions.auth.is_empty() {
                "AUTH not offered but credentials configured".to_owned()
            } else {
                format!(
                    "no supported AUTH mechanism offered (PLAIN or LOGIN; the server offers {})",
                    self.extensions.auth.join(" ")
                )
            };
            return self.fail(ClientError::local(AUTH_UNAVAILABLE, description));
        };
        let (exchange, command) = Exchange::start(mechanism, credentials);
        self.state = State::Auth(exchange);
        SessionStep::Send(command)
    }

    fn auth_reply(&mut self, mut exchange: Exchange, reply: ServerReply) -> SessionStep {
        if reply.code == 235 {
            // PLAIN and LOGIN negotiate no security layer, so nothing learnt before AUTH is
            // void (RFC 4954 section 4) and no new EHLO is due.
            self.authenticated = true;
            return self.ready();
        }
        if reply.code == 334 {
            let answer = self.config.auth.as_ref().and_then(|c| exchange.answer(c, &reply));
            if let Some(line) = answer {
                self.state = State::Auth(exchange);
                return SessionStep::Send(line);
            }
            // Cancelling brings the server back to reading commands, so the driver's QUIT is
            // read as QUIT rather than as a response to the challenge.
            let error = ClientError::with_status(
                PROTOCOL_ERROR,
                format!("unexpected AUTH {} challenge", exchange.mechanism().name()),
                reply,
            );
            self.state = State::AuthCancelled(error);
            return SessionStep::Send(b"*\r\n".to_vec());
        }
        self.fail(auth_refused(exchange.mechanism(), reply))
    }

    fn ready(&mut self) -> SessionStep {
        self.state = State::Ready;
        SessionStep::Ready
    }

    fn fail(&mut self, error: ClientError) -> SessionStep {
        self.state = State::Failed(error.clone());
        SessionStep::Failed(error)
    }
}

/// The server answered the AUTH exchange with something other than 235 or 334.
///
/// A refusal is transient whatever its class, with the server's subject and detail kept (535
/// 5.7.8 gives 4.7.8) and its reply in the error. A refused password is a fault on our side or
/// the smart host's that an administrator has to fix; bouncing the mail that queues up
/// meanwhile would punish its senders for it. Postfix does the same by default
/// (`smtp_sasl_auth_soft_bounce = yes`). The mail waits for the fix, until the queue gives up
/// on it.
///
/// Neither another mechanism nor another attempt is tried, though RFC 4954 section 4 allows
/// both: LOGIN is no stronger than PLAIN, so it cannot satisfy a 534 "mechanism is too weak",
/// and repeating refused credentials brings the account closer to being locked.
fn auth_refused(mechanism: Mechanism, reply: ServerReply) -> ClientError {
    let name = mechanism.name();
    if !matches!(reply.code / 100, 4 | 5) {
        return ClientError::refused(format!("unexpected reply to AUTH {name}"), reply);
    }
    // The replies of RFC 4954 sections 4 and 6.
    let reason = match reply.code {
        432 => " (password transition needed)",
        454 => " (temporary authentication failure)",
        500 => " (exchange line too long)",
        501 => " (exchange not understood)",
        504 => " (mechanism not supported)",
        534 => " (mechanism too weak)",
        535 => " (credentials invalid)",
        538 => " (encryption required for the mechanism)",
        _ => "",
    };
    let status = reply.status.map_or(AUTH_FAILED, |s| EnhancedStatus(4, s.1, s.2));
    ClientError::with_status(status, format!("AUTH {name} refused{reason}"), reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ReplyParser;

    fn reply(wire: &str) -> ServerReply {
        let mut parser = ReplyParser::new();
        parser.feed(wire.as_bytes());
        let reply = parser.next_reply().unwrap().unwrap();
        assert!(parser.is_empty(), "one reply per call: {wire:?}");
        reply
    }

    fn config(tls: TlsIntent) -> ClientConfig {
        ClientConfig {
            helo_name: "client.example".into(),
            tls,
            auth: None,
            allow_plaintext_auth: false,
        }
    }

    fn session(tls: TlsIntent) -> ClientSession {
        ClientSession::new(config(tls), false)
    }

    fn send(text: &str) -> SessionStep {
        SessionStep::Send(text.as_bytes().to_vec())
    }

    const GREETING: &str = "220 mx.example.org ESMTP\r\n";
    const EHLO_PLAIN: &str = "250-mx.example.org\r\n250-PIPELINING\r\n250 SIZE 1000\r\n";
    const EHLO_STARTTLS: &str = "250-mx.example.org\r\n250-PIPELINING\r\n250 STARTTLS\r\n";

    fn failure(step: SessionStep) -> ClientError {
        match step {
            SessionStep::Failed(error) => error,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn ehlo_accepted() {
        let mut session = session(TlsIntent::Opportunistic);
        assert_eq!(session.on_reply(reply(GREETING)), send("EHLO client.example\r\n"));
        assert_eq!(session.on_reply(reply(EHLO_PLAIN)), SessionStep::Ready);
        assert!(session.used_esmtp());
        assert!(!session.tls_active());
        assert!(session.extensions().pipelining);
        assert_eq!(session.extensions().size, Some(1000));
    }

    #[test]
    fn ehlo_not_recognized_falls_back_to_helo() {
        for refusal in ["500 5.5.1 What?\r\n", "502 Not implemented\r\n", "504 x\r\n", "550 no\r\n"]
        {
            let mut session = session(TlsIntent::Opportunistic);
            session.on_reply(reply(GREETING));
            assert_eq!(session.on_reply(reply(refusal)), send("HELO client.example\r\n"));
            assert_eq!(session.on_reply(reply("250 mx.example.org\r\n")), SessionStep::Ready);
            assert!(!session.used_esmtp());
            assert_eq!(session.extensions(), &Extensions::default());
        }
    }

    #[test]
    fn other_ehlo_errors_fail() {
        let mut session = session(TlsIntent::Never);
        session.on_reply(reply(GREETING));
        let error = failure(session.on_reply(reply("501 5.5.4 Bad name\r\n")));
        assert!(error.is_permanent());
        assert_eq!(error.to_string(), "EHLO refused: 501 5.5.4 Bad name");

        let mut session = self::session(TlsIntent::Never);
        session.on_reply(reply(GREETING));
        let error = failure(session.on_reply(reply("451 4.3.0 Busy\r\n")));
        assert!(!error.is_permanent());
    }

    #[test]
    fn helo_refused() {
        let mut session = session(TlsIntent::Never);
        session.on_reply(reply(GREETING));
        session.on_reply(reply("502 No EHLO\r\n"));
        let error = failure(session.on_reply(reply("550 Go away\r\n")));
        assert_eq!(error.description, "HELO refused");
        assert!(error.is_permanent());
    }

    #[test]
    fn starttls_offered_and_opportunistic() {
        let mut session = session(TlsIntent::Opportunistic);
        session.on_reply(reply(GREETING));
        assert_eq!(session.on_reply(reply(EHLO_STARTTLS)), send("STARTTLS\r\n"));
        assert_eq!(
            session.on_reply(reply("220 2.0.0 Ready to start TLS\r\n")),
            SessionStep::StartTls
        );
        assert!(!session.tls_active());
        assert_eq!(session.tls_established(), send("EHLO client.example\r\n"));
        // RFC 3207 section 4.2: what the server said before TLS is forgotten.
        assert!(session.tls_active());
        assert_eq!(session.extensions(), &Extensions::default());
        assert!(!session.used_esmtp());
        // A server that (wrongly) offers STARTTLS again is not taken up on it.
        assert_eq!(session.on_reply(reply(EHLO_STARTTLS)), SessionStep::Ready);
        assert!(session.tls_active() && session.used_esmtp());
        assert!(session.extensions().starttls && session.extensions().pipelining);
    }

    #[test]
    fn starttls_not_offered() {
        let mut session = session(TlsIntent::Opportunistic);
        session.on_reply(reply(GREETING));
        assert_eq!(session.on_reply(reply(EHLO_PLAIN)), SessionStep::Ready);
        assert!(!session.tls_active());

        let mut session = self::session(TlsIntent::Required);
        session.on_reply(reply(GREETING));
        let error = failure(session.on_reply(reply(EHLO_PLAIN)));
        assert_eq!(error.description, "STARTTLS not offered but TLS required");
        assert_eq!(error.status, EnhancedStatus(4, 7, 4));
        assert!(!error.is_permanent());
        assert_eq!(error.reply, None);
        // The driver can still say goodbye.
        assert_eq!(session.quit(), b"QUIT\r\n");
        assert_eq!(session.on_reply(reply("221 2.0.0 Bye\r\n")), SessionStep::Closed);
    }

    #[test]
    fn starttls_offered_but_never_wanted() {
        let mut session = session(TlsIntent::Never);
        session.on_reply(reply(GREETING));
        assert_eq!(session.on_reply(reply(EHLO_STARTTLS)), SessionStep::Ready);
    }

    #[test]
    fn starttls_refused() {
        let mut session = session(TlsIntent::Opportunistic);
        session.on_reply(reply(GREETING));
        session.on_reply(reply(EHLO_STARTTLS));
        assert_eq!(session.on_reply(reply("454 4.7.0 TLS not available\r\n")), SessionStep::Ready);
        assert!(!session.tls_active());
        assert!(session.extensions().pipelining, "the EHLO before STARTTLS still holds");

        let mut session = self::session(TlsIntent::Required);
        session.on_reply(reply(GREETING));
        session.on_reply(reply(EHLO_STARTTLS));
        let error = failure(session.on_reply(reply("502 5.5.1 No\r\n")));
        assert!(!error.is_permanent(), "required TLS waits for a better time: {error}");
        assert_eq!(error.reply.unwrap().code, 502);
    }

    #[test]
    fn required_tls_and_helo_only_server() {
        let mut session = session(TlsIntent::Required);
        session.on_reply(reply(GREETING));
        let error = failure(session.on_reply(reply("502 5.5.1 EHLO not implemented\r\n")));
        assert!(!error.is_permanent());
        assert_eq!(error.description, "EHLO refused but TLS required");
    }

    #[test]
    fn implicit_tls_never_sends_starttls() {
        let mut session = ClientSession::new(config(TlsIntent::Required), true);
        assert!(session.tls_active());
        session.on_reply(reply(GREETING));
        assert_eq!(session.on_reply(reply(EHLO_STARTTLS)), SessionStep::Ready);
        // HELO is fine too: TLS is already there.
        let mut session = ClientSession::new(config(TlsIntent::Required), true);
        session.on_reply(reply(GREETING));
        assert_eq!(session.on_reply(reply("502 no\r\n")), send("HELO client.example\r\n"));
        assert_eq!(session.on_reply(reply("250 mx\r\n")), SessionStep::Ready);
    }

    #[test]
    fn greeting_refusals() {
        let mut session = session(TlsIntent::Opportunistic);
        let error = failure(session.on_reply(reply("554 5.7.1 No SMTP service here\r\n")));
        assert!(error.is_permanent());
        assert_eq!(
            error.to_string(),
            "session refused in greeting: 554 5.7.1 No SMTP service here"
        );
        // Failed stays failed.
        assert_eq!(failure(session.on_reply(reply("250 ok\r\n"))), error);

        let mut session = self::session(TlsIntent::Opportunistic);
        let error = failure(session.on_reply(reply("421 4.3.2 Shutting down\r\n")));
        assert!(!error.is_permanent());

        let mut session = self::session(TlsIntent::Opportunistic);
        let error = failure(session.on_reply(reply("250 hello?\r\n")));
        assert!(!error.is_permanent(), "a greeting that is not 220 is protocol confusion");
    }

    #[test]
    fn closing_reply_at_any_point_fails() {
        let mut session = session(TlsIntent::Opportunistic);
        session.on_reply(reply(GREETING));
        session.on_reply(reply(EHLO_STARTTLS));
        // Not "continue in plain text": the server is going away.
        let error = failure(session.on_reply(reply("421 4.7.0 Too many errors\r\n")));
        assert_eq!(error.description, "server closing connection");
        assert!(!error.is_permanent());

        let mut session = self::session(TlsIntent::Never);
        session.on_reply(reply(GREETING));
        session.on_reply(reply(EHLO_PLAIN));
        let error = failure(session.on_reply(reply("421 4.4.2 Timeout\r\n")));
        assert_eq!(error.reply.unwrap().code, 421);
    }

    #[test]
    fn reply_during_handshake_or_when_idle_is_a_protocol_error() {
        let mut session = session(TlsIntent::Opportunistic);
        session.on_reply(reply(GREETING));
        session.on_reply(reply(EHLO_STARTTLS));
        session.on_reply(reply("220 go\r\n"));
        let error = failure(session.on_reply(reply("250 injected\r\n")));
        assert!(!error.is_permanent());
        assert_eq!(failure(session.tls_established()).status, PROTOCOL_ERROR);

        let mut session = self::session(TlsIntent::Never);
        session.on_reply(reply(GREETING));
        session.on_reply(reply(EHLO_PLAIN));
        assert_eq!(
            failure(session.on_reply(reply("250 what\r\n"))).description,
            "unexpected reply"
        );
    }

    #[test]
    fn tls_established_without_starttls() {
        let mut session = session(TlsIntent::Opportunistic);
        let error = failure(session.tls_established());
        assert_eq!(error.status, PROTOCOL_ERROR);
        assert!(!session.tls_active());
    }

    #[test]
    fn rset_and_quit() {
        let mut session = session(TlsIntent::Never);
        session.on_reply(reply(GREETING));
        session.on_reply(reply(EHLO_PLAIN));
        assert_eq!(session.rset(), b"RSET\r\n");
        assert_eq!(session.on_reply(reply("250 2.0.0 Reset\r\n")), SessionStep::Ready);
        assert!(session.extensions().pipelining, "RSET keeps the EHLO state");
        session.rset();
        let error = failure(session.on_reply(reply("500 5.5.1 What\r\n")));
        assert_eq!(error.description, "RSET refused");

        let mut session = self::session(TlsIntent::Never);
        session.on_reply(reply(GREETING));
        session.on_reply(reply(EHLO_PLAIN));
        assert_eq!(session.quit(), b"QUIT\r\n");
        // Whatever the answer, even 421, the session is over.
        assert_eq!(session.on_reply(reply("421 bye\r\n")), SessionStep::Closed);
        assert_eq!(session.on_reply(reply("221 bye\r\n")), SessionStep::Closed);
    }

    const EHLO_AUTH: &str = "250-mx.example.org\r\n250-AUTH LOGIN PLAIN\r\n250 PIPELINING\r\n";
    const EHLO_LOGIN: &str = "250-mx.example.org\r\n250 AUTH CRAM-MD5 LOGIN\r\n";
    /// "\0relay\0secret" in base64.
    const PLAIN_RESPONSE: &str = "AHJlbGF5AHNlY3JldA==";

    /// A session with credentials, on a connection with implicit TLS or none.
    fn auth_session(tls_active: bool, allow_plaintext_auth: bool) -> ClientSession {
        let config = ClientConfig {
            auth: Some(Credentials::new("relay", "secret").unwrap()),
            allow_plaintext_auth,
            ..config(TlsIntent::Opportunistic)
        };
        ClientSession::new(config, tls_active)
    }

    /// The session after the greeting and an EHLO reply.
    fn after_ehlo(mut session: ClientSession, ehlo: &str) -> (ClientSession, SessionStep) {
        assert_eq!(session.on_reply(reply(GREETING)), send("EHLO client.example\r\n"));
        let step = session.on_reply(reply(ehlo));
        (session, step)
    }

    #[test]
    fn auth_plain_with_initial_response() {
        let (mut session, step) = after_ehlo(auth_session(true, false), EHLO_AUTH);
        assert_eq!(step, send(&format!("AUTH PLAIN {PLAIN_RESPONSE}\r\n")));
        assert!(!session.authenticated());
        assert_eq!(
            session.on_reply(reply("235 2.7.0 Authentication successful\r\n")),
            SessionStep::Ready
        );
        assert!(session.authenticated());
        assert!(session.extensions().pipelining, "the EHLO reply still holds after AUTH");
        // RSET keeps the authentication, as it keeps the EHLO state.
        session.rset();
        assert_eq!(session.on_reply(reply("250 2.0.0 Ok\r\n")), SessionStep::Ready);
        assert!(session.authenticated());
    }

    #[test]
    fn auth_login_exchange() {
        let (mut session, step) = after_ehlo(auth_session(true, false), EHLO_LOGIN);
        assert_eq!(step, send("AUTH LOGIN\r\n"));
        assert_eq!(session.on_reply(reply("334 VXNlcm5hbWU6\r\n")), send("cmVsYXk=\r\n"));
        assert_eq!(session.on_reply(reply("334 UGFzc3dvcmQ6\r\n")), send("c2VjcmV0\r\n"));
        assert_eq!(session.on_reply(reply("235 2.7.0 Accepted\r\n")), SessionStep::Ready);
        assert!(session.authenticated());
    }

    #[test]
    fn auth_after_starttls() {
        let config = ClientConfig {
            auth: Some(Credentials::new("relay", "secret").unwrap()),
            ..config(TlsIntent::Required)
        };
        // The server offers AUTH only under TLS, as many do.
        let (mut session, step) = after_ehlo(ClientSession::new(config, false), EHLO_STARTTLS);
        assert_eq!(step, send("STARTTLS\r\n"));
        assert_eq!(session.on_reply(reply("220 2.0.0 Go ahead\r\n")), SessionStep::StartTls);
        assert_eq!(session.tls_established(), send("EHLO client.example\r\n"));
        assert_eq!(
            session.on_reply(reply(EHLO_AUTH)),
            send(&format!("AUTH PLAIN {PLAIN_RESPONSE}\r\n"))
        );
        assert_eq!(session.on_reply(reply("235 2.7.0 Ok\r\n")), SessionStep::Ready);
        assert!(session.tls_active() && session.authenticated());
    }

    #[test]
    fn auth_refused_before_anything_is_sent_without_tls() {
        // The server offers AUTH, but no STARTTLS: nothing after EHLO goes out.
        let (_, step) = after_ehlo(auth_session(false, false), EHLO_AUTH);
        let error = failure(step);
        assert_eq!(error.status, EnhancedStatus(4, 7, 10));
        assert!(!error.is_permanent());
        assert_eq!(error.reply, None);
        assert_eq!(error.description, "TLS not active, credentials not sent in clear text");

        // STARTTLS refused: opportunistic TLS goes on in plain text, the credentials do not.
        let ehlo = "250-mx.example.org\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n";
        let (mut session, step) = after_ehlo(auth_session(false, false), ehlo);
        assert_eq!(step, send("STARTTLS\r\n"));
        let error = failure(session.on_reply(reply("454 4.7.0 TLS not available\r\n")));
        assert_eq!(error.status, EnhancedStatus(4, 7, 10));

        // Unless plain text is allowed.
        let (_, step) = after_ehlo(auth_session(false, true), EHLO_AUTH);
        assert_eq!(step, send(&format!("AUTH PLAIN {PLAIN_RESPONSE}\r\n")));
    }

    #[test]
    fn auth_without_a_usable_mechanism() {
        let (mut session, step) = after_ehlo(auth_session(true, false), EHLO_PLAIN);
        let error = failure(step);
        assert_eq!(error.status, EnhancedStatus(4, 7, 4));
        assert!(!error.is_permanent());
        assert_eq!(error.description, "AUTH not offered but credentials configured");
        assert!(!session.authenticated());
        assert_eq!(session.quit(), b"QUIT\r\n");

        let ehlo = "250-mx.example.org\r\n250 AUTH CRAM-MD5 SCRAM-SHA-256\r\n";
        let error = failure(after_ehlo(auth_session(true, false), ehlo).1);
        assert_eq!(error.status, EnhancedStatus(4, 7, 4));
        assert_eq!(
            error.to_string(),
            "no supported AUTH mechanism offered (PLAIN or LOGIN; the server offers CRAM-MD5 \
             SCRAM-SHA-256) (4.7.4)"
        );

        // A server that knows only HELO has no service extensions at all.
        let (mut session, step) = after_ehlo(auth_session(true, false), "502 5.5.1 No\r\n");
        assert_eq!(step, send("HELO client.example\r\n"));
        let error = failure(session.on_reply(reply("250 mx.example.org\r\n")));
        assert_eq!(error.status, EnhancedStatus(4, 7, 4));
    }

    #[test]
    fn auth_credentials_refused() {
        let (mut session, _) = after_ehlo(auth_session(true, false), EHLO_AUTH);
        let error =
            failure(session.on_reply(reply("535 5.7.8 Authentication credentials invalid\r\n")));
        // Transient, with the server's detail and reply.
        assert_eq!(error.status, EnhancedStatus(4, 7, 8));
        assert!(!error.is_permanent());
        assert_eq!(
            error.to_string(),
            "AUTH PLAIN refused (credentials invalid): 535 5.7.8 Authentication credentials invalid"
        );
        assert!(!session.authenticated());
        assert_eq!(session.quit(), b"QUIT\r\n");
        assert_eq!(session.on_reply(reply("221 2.0.0 Bye\r\n")), SessionStep::Closed);
    }

    #[test]
    fn auth_refusals_are_transient() {
        let cases = [
            ("535 Authentication failed\r\n", EnhancedStatus(4, 7, 0), "credentials invalid"),
            ("501 5.5.2 Cannot decode\r\n", EnhancedStatus(4, 5, 2), "exchange not understood"),
            ("504 5.5.4 Unrecognized mechanism\r\n", EnhancedStatus(4, 5, 4), "not supported"),
            ("538 5.7.11 Encryption required\r\n", EnhancedStatus(4, 7, 11), "encryption"),
            ("534 5.7.9 Too weak\r\n", EnhancedStatus(4, 7, 9), "too weak"),
            ("454 4.7.0 Try again later\r\n", EnhancedStatus(4, 7, 0), "temporary"),
            ("432 4.7.12 Transition\r\n", EnhancedStatus(4, 7, 12), "transition"),
            ("550 5.7.1 No\r\n", EnhancedStatus(4, 7, 1), "AUTH LOGIN refused"),
        ];
        for (wire, status, description) in cases {
            let (mut session, _) = after_ehlo(auth_session(true, false), EHLO_LOGIN);
            let error = failure(session.on_reply(reply(wire)));
            assert_eq!(error.status, status, "{wire:?}");
            assert!(error.description.contains(description), "{error}");
            assert_eq!(error.reply.unwrap().code, reply(wire).code);
        }

        // A success code other than 235 is protocol confusion.
        let (mut session, _) = after_ehlo(auth_session(true, false), EHLO_AUTH);
        let error = failure(session.on_reply(reply("250 2.0.0 Ok\r\n")));
        assert_eq!(error.status, PROTOCOL_ERROR);
        assert_eq!(error.description, "unexpected reply to AUTH PLAIN");
        assert!(!session.authenticated());

        // So is 421, as everywhere.
        let (mut session, _) = after_ehlo(auth_session(true, false), EHLO_LOGIN);
        session.on_reply(reply("334 VXNlcm5hbWU6\r\n"));
        let error = failure(session.on_reply(reply("421 4.3.2 Shutting down\r\n")));
        assert_eq!(error.description, "server closing connection");
    }

    #[test]
    fn unexpected_challenges_cancel_the_exchange() {
        // PLAIN said everything in its initial response; LOGIN needs base64 prompts.
        for (ehlo, challenge) in [(EHLO_AUTH, "334 \r\n"), (EHLO_LOGIN, "334 Username:\r\n")] {
            let (mut session, _) = after_ehlo(auth_session(true, false), ehlo);
            assert_eq!(session.on_reply(reply(challenge)), send("*\r\n"));
            let error = failure(session.on_reply(reply("501 5.0.0 Canceled\r\n")));
            assert_eq!(error.status, PROTOCOL_ERROR);
            assert!(error.description.starts_with("unexpected AUTH"), "{error}");
            assert_eq!(error.reply.unwrap().code, 334, "the challenge is the cause");
            assert!(!session.authenticated());
        }

        // A third LOGIN prompt.
        let (mut session, _) = after_ehlo(auth_session(true, false), EHLO_LOGIN);
        session.on_reply(reply("334 VXNlcm5hbWU6\r\n"));
        session.on_reply(reply("334 UGFzc3dvcmQ6\r\n"));
        assert_eq!(session.on_reply(reply("334 UGFzc3dvcmQ6\r\n")), send("*\r\n"));
        assert_eq!(failure(session.on_reply(reply("501 Canceled\r\n"))).status, PROTOCOL_ERROR);
    }

    #[test]
    fn the_session_shows_no_secret() {
        let (mut session, _) = after_ehlo(auth_session(true, false), EHLO_LOGIN);
        session.on_reply(reply("334 VXNlcm5hbWU6\r\n"));
        session.on_reply(reply("334 UGFzc3dvcmQ6\r\n"));
        let shown = format!("{session:?}");
        assert!(shown.contains("relay"), "{shown}");
        assert!(!shown.contains("secret") && !shown.contains("c2VjcmV0"), "{shown}");
    }
}

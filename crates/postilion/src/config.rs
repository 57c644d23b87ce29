//! The TOML configuration: serde structs with documented defaults, checked once at start-up.
//! README.md documents every key; keep the two in step.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Deserializer};
use smtp_proto::codec::BareLineEndings;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Our host name: greeting, EHLO, Received. Default: the system host name.
    pub hostname: String,
    /// Where the spool, Maildirs and generated TLS key live. Default `postilion-data`.
    pub data_dir: PathBuf,
    /// Started as root, the server binds its listeners, gives `data_dir` to this user (a name
    /// from /etc/passwd or `uid:gid`) and runs as it. Unset: no change (with a warning when
    /// running as root).
    pub user: Option<String>,
    pub listeners: Vec<ListenerConfig>,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub local: LocalConfig,
    pub spool: SpoolConfig,
    pub delivery: DeliveryConfig,
    pub relay: RelayConfig,
    pub dns: DnsConfig,
    pub outbound: OutboundConfig,
    pub abuse: AbuseLimits,
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// A name for logs. Default `smtp`.
    #[serde(default = "default_listener_name")]
    pub name: String,
    /// `ip:port`; port 0 picks a free port (printed at start-up).
    pub address: SocketAddr,
    /// `mta` (default: port 25 semantics), `submission` (port 587, RFC 6409: AUTH required
    /// before MAIL) or `submissions` (port 465, RFC 8314: implicit TLS, AUTH required).
    #[serde(default)]
    pub role: Role,
    /// `none`, `starttls` or `implicit` (RFC 8314). Default: `implicit` for the
    /// `submissions` role, `starttls` otherwise; see [`ListenerConfig::tls`].
    #[serde(default, rename = "tls")]
    pub tls_mode: Option<TlsMode>,
    /// Whether AUTH is offered. Default: on `submission` and `submissions`, off on `mta`.
    #[serde(default)]
    pub auth: Option<bool>,
    /// `reject` (default) or `normalize` bare CR/LF in DATA.
    #[serde(default)]
    pub bare_line_endings: BareLineEndingsConfig,
}

impl ListenerConfig {
    pub fn tls(&self) -> TlsMode {
        self.tls_mode.unwrap_or(match self.role {
            Role::Submissions => TlsMode::Implicit,
            Role::Mta | Role::Submission => TlsMode::Starttls,
        })
    }

    pub fn offers_auth(&self) -> bool {
        self.auth.unwrap_or(self.role != Role::Mta)
    }

    /// Submission listeners take mail only from authenticated users (RFC 6409 section 4.3).
    pub fn requires_auth(&self) -> bool {
        self.role != Role::Mta
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    #[default]
    Mta,
    Submission,
    Submissions,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Mta => "mta",
            Role::Submission => "submission",
            Role::Submissions => "submissions",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    None,
    #[default]
    Starttls,
    Implicit,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "plain",
            TlsMode::Starttls => "starttls",
            TlsMode::Implicit => "implicit-tls",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BareLineEndingsConfig {
    #[default]
    Reject,
    Normalize,
}

impl From<BareLineEndingsConfig> for BareLineEndings {
    fn from(value: BareLineEndingsConfig) -> Self {
        match value {
            BareLineEndingsConfig::Reject => BareLineEndings::Reject,
            BareLineEndingsConfig::Normalize => BareLineEndings::Normalize,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. Unset: a self-signed certificate is generated in
    /// `<data_dir>/tls/` on first start and kept.
    pub certificate: Option<PathBuf>,
    /// PEM private key for `certificate`.
    pub private_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message in octets (advertised with SIZE). Default 25 MiB.
    #[serde(deserialize_with = "de_size")]
    pub message_size: u64,
    /// Recipients per transaction. Default 100 (RFC 5321 section 4.5.3.1.8).
    pub recipients: usize,
    /// Command line octets including CRLF; MAIL and RCPT get 1024 more for ESMTP parameters.
    /// Default 512 (RFC 5321 section 4.5.3.1.4).
    pub command_line: usize,
    /// DATA text line octets including CRLF, 0 for no limit. Default 1000 (RFC 5321
    /// section 4.5.3.1.6).
    pub data_line: usize,
    /// Default 64 (RFC 5321 section 4.5.3.1.1).
    pub local_part: usize,
    /// Default 255 (RFC 5321 section 4.5.3.1.2).
    pub domain: usize,
    /// Failed commands before 421 and close. Default 20.
    pub errors: u32,
    /// Received fields that mean a loop (RFC 5321 section 6.3). Default 100.
    pub received_headers: usize,
    /// Simultaneous connections over all listeners. Default 1000.
    pub connections: usize,
    /// Simultaneous connections from one IP address. Default 50.
    pub connections_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            message_size: 25 * 1024 * 1024,
            recipients: 100,
            command_line: 512,
            data_line: 1000,
            local_part: 64,
            domain: 255,
            errors: 20,
            received_headers: 100,
            connections: 1000,
            connections_per_ip: 50,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Waiting for the next command. Default 5m (RFC 5321 section 4.5.3.2.7).
    #[serde(deserialize_with = "de_duration")]
    pub command: Duration,
    /// Waiting for more message data. Default 3m (RFC 5321 section 4.5.3.2.5 gives the client
    /// 3 minutes per data block; the server waits as long).
    #[serde(deserialize_with = "de_duration")]
    pub data: Duration,
    /// TLS handshake. Default 30s.
    #[serde(deserialize_with = "de_duration")]
    pub tls_handshake: Duration,
    /// On SIGTERM, how long a message being received may take to finish. Default 30s.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            command: Duration::from_secs(300),
            data: Duration::from_secs(180),
            tls_handshake: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Domains delivered here. Default `["localhost"]`.
    pub domains: Vec<String>,
    /// Mailbox names. Empty (default): every local part is its own mailbox.
    pub mailboxes: Vec<String>,
    /// Mailbox that receives mail for unknown local parts; empty (default) refuses them.
    pub catch_all: String,
    /// Separator of plus-addressing (`user+tag` delivers to `user`); empty disables it.
    /// Default `+`.
    pub recipient_delimiter: String,
    /// Local part -> targets (local parts, or addresses in local domains).
    pub aliases: BTreeMap<String, Vec<String>>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            domains: vec!["localhost".into()],
            mailboxes: Vec::new(),
            catch_all: String::new(),
            recipient_delimiter: "+".into(),
            aliases: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Free space the data directory's file system must keep; below it new mail gets
    /// 452 4.3.1. Default 100 MiB.
    #[serde(deserialize_with = "de_size")]
    pub free_space_reserve: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig { free_space_reserve: 100 * 1024 * 1024 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Concurrent local deliveries. Default 4.
    pub workers: usize,
    /// Concurrent local deliveries into one mailbox, so that a flood into one mailbox leaves
    /// workers to the others. Default 2 (Postfix's `local_destination_concurrency_limit`).
    pub mailbox_concurrency: usize,
    /// First retry delay after a temporary failure; doubles up to `retry_max`. Default 1m.
    #[serde(deserialize_with = "de_duration")]
    pub retry_initial: Duration,
    /// Default 1h.
    #[serde(deserialize_with = "de_duration")]
    pub retry_max: Duration,
    /// A recipient still failing temporarily this long after arrival fails. Default 5d.
    #[serde(deserialize_with = "de_duration")]
    pub max_lifetime: Duration,
    /// A failure notice returns the whole original message up to this size, otherwise only
    /// its header. Default 50000 octets.
    #[serde(deserialize_with = "de_size")]
    pub bounce_size_limit: u64,
    /// A recipient still not delivered this long after arrival gets one delay notice, if its
    /// NOTIFY includes DELAY. `0` never sends one. Default 4h.
    #[serde(deserialize_with = "de_optional_duration")]
    pub delay_warning: Option<Duration>,
    /// Delay notices also for recipients without NOTIFY. Default false, like Postfix.
    pub delay_warning_by_default: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            workers: 4,
            mailbox_concurrency: 2,
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(5 * 86_400),
            bounce_size_limit: dsn::DEFAULT_RETURN_SIZE_LIMIT as u64,
            delay_warning: Some(Duration::from_secs(4 * 3600)),
            delay_warning_by_default: false,
        }
    }
}

/// SMTP AUTH (RFC 4954) on the listeners that offer it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// SASL mechanisms, in the order offered. PLAIN and LOGIN only ever under TLS. Default
    /// `["PLAIN", "LOGIN", "SCRAM-SHA-256"]`.
    pub mechanisms: Vec<String>,
    /// Authenticated users may use only the senders their account allows (553 5.7.1
    /// otherwise). Default true.
    pub restrict_senders: bool,
    /// Accounts kept in the configuration, besides those in `accounts.db`.
    pub accounts: Vec<ConfiguredAccount>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mechanisms: vec!["PLAIN".into(), "LOGIN".into(), "SCRAM-SHA-256".into()],
            restrict_senders: true,
            accounts: Vec::new(),
        }
    }
}

/// An account in the configuration file: hashes only, never a password.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfiguredAccount {
    pub name: String,
    /// argon2id PHC string, as `postilion user` stores it.
    pub password_hash: Option<String>,
    /// SCRAM-SHA-256 keys, as `postilion user` stores them.
    pub scram: Option<String>,
    #[serde(default)]
    pub senders: Vec<String>,
}

/// Limits against abuse, counted over all sessions (see `limits.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbuseLimits {
    /// Failed logins (per client address, and per account) answered without delay. Default 3.
    pub auth_free_failures: usize,
    /// Failed logins from one address within the window that get it banned. Default 10.
    pub auth_failures_before_ban: usize,
    /// How long failed logins are remembered. Default 15m.
    #[serde(deserialize_with = "de_duration")]
    pub auth_failure_window: Duration,
    /// The longest delay before answering a failed login (the delay doubles from 1s).
    /// Default 16s.
    #[serde(deserialize_with = "de_duration")]
    pub auth_max_delay: Duration,
    /// How long a banned address gets 421 at connect. Default 10m.
    #[serde(deserialize_with = "de_duration")]
    pub auth_ban: Duration,
    /// New connections per minute from one address; 0 = no limit (default).
    pub connection_rate: usize,
    /// Messages per hour from one authenticated account; 0 = no limit (default).
    pub messages_per_hour: usize,
    /// Recipients per hour from one authenticated account; 0 = no limit (default).
    pub recipients_per_hour: usize,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        AbuseLimits {
            auth_free_failures: 3,
            auth_failures_before_ban: 10,
            auth_failure_window: Duration::from_secs(900),
            auth_max_delay: Duration::from_secs(16),
            auth_ban: Duration::from_secs(600),
            connection_rate: 0,
            messages_per_hour: 0,
            recipients_per_hour: 0,
        }
    }
}

/// Who may send mail to domains that are not ours.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Client networks (CIDR, e.g. `192.0.2.0/24`, `2001:db8::/32`, or single addresses)
    /// allowed to relay. Empty (default): nobody; loopback is not trusted by default.
    pub networks: Vec<Network>,
}

impl RelayConfig {
    pub fn allows(&self, client: IpAddr) -> bool {
        self.networks.iter().any(|network| network.contains(client))
    }
}

/// An IP network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    pub address: IpAddr,
    pub prefix: u8,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on an IPv6 socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Network, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr =
            address.trim().parse().map_err(|_| format!("{text:?} is not an IP network"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Network { address, prefix })
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Network, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The resolver used for mail routing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// `ip:port` of the name servers to ask. Empty (default): those of /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// How long to wait for one answer. Default 5s.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Tries per name server. Default 2.
    pub attempts: usize,
    /// Cached answers (honouring their TTLs); 0 disables the cache. Default 1024.
    pub cache_size: u64,
    /// Which addresses of a mail exchanger to use and in what order. Default `prefer-ipv6`.
    pub ip_preference: IpPreference,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: crate::outbound::dns::DEFAULT_TIMEOUT,
            attempts: 2,
            cache_size: 1024,
            ip_preference: IpPreference::PreferIpv6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpPreference {
    #[default]
    PreferIpv6,
    PreferIpv4,
    Ipv4Only,
    Ipv6Only,
}

/// TLS for outgoing connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboundTls {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, any certificate (RFC 7435); plaintext when not offered or
    /// when the handshake fails.
    #[default]
    Opportunistic,
    /// STARTTLS must succeed, any certificate: otherwise defer.
    Require,
    /// STARTTLS must succeed with a certificate valid for the host name: otherwise defer.
    Verify,
}

/// Outgoing SMTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// The remote SMTP port. Default 25.
    pub port: u16,
    /// The name sent with EHLO. Default: `hostname`.
    pub helo_name: Option<String>,
    /// Default TLS policy. Default `opportunistic`.
    pub tls: OutboundTls,
    /// PEM file of CA certificates trusted for `verify`, in addition to the system's.
    pub ca_file: Option<PathBuf>,
    /// Simultaneous outgoing connections in all. Default 100.
    pub concurrency: usize,
    /// Simultaneous connections to one destination domain. Default 10.
    pub destination_concurrency: usize,
    /// Recipients per transaction; more are sent in further transactions. Default 100.
    pub max_recipients: usize,
    /// How long an idle connection is kept for the next message to the same host. 0 closes
    /// connections after each delivery. Default 5s.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// TCP connect. Default 30s.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// The 220 greeting. Default 5m (RFC 5321 section 4.5.3.2.1).
    #[serde(deserialize_with = "de_duration")]
    pub greeting_timeout: Duration,
    /// Replies to EHLO, STARTTLS, MAIL, RCPT and RSET. Default 5m (RFC 5321 sections
    /// 4.5.3.2.2 and 4.5.3.2.3).
    #[serde(deserialize_with = "de_duration")]
    pub command_timeout: Duration,
    /// The 354 reply to DATA. Default 2m (RFC 5321 section 4.5.3.2.4).
    #[serde(deserialize_with = "de_duration")]
    pub data_timeout: Duration,
    /// Sending one block of message data. Default 3m (RFC 5321 section 4.5.3.2.5).
    #[serde(deserialize_with = "de_duration")]
    pub data_block_timeout: Duration,
    /// The reply after the end of the data. Default 10m (RFC 5321 section 4.5.3.2.6).
    #[serde(deserialize_with = "de_duration")]
    pub data_done_timeout: Duration,
    /// Per-domain overrides; the key `*` routes every remote domain (a smart host).
    pub routes: BTreeMap<String, RouteConfig>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            port: 25,
            helo_name: None,
            tls: OutboundTls::Opportunistic,
            ca_file: None,
            concurrency: 100,
            destination_concurrency: 10,
            max_recipients: 100,
            idle_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            greeting_timeout: Duration::from_secs(300),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(120),
            data_block_timeout: Duration::from_secs(180),
            data_done_timeout: Duration::from_secs(600),
            routes: BTreeMap::new(),
        }
    }
}

/// Where one domain's mail goes instead of its MX hosts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A host name or IP address; its A/AAAA records are used, not its MX (like Postfix's
    /// `[host]`), unless `mx = true`.
    pub host: String,
    /// Default: `outbound.port`.
    pub port: Option<u16>,
    #[serde(default)]
    pub mx: bool,
    /// Default: `outbound.tls`.
    pub tls: Option<OutboundTls>,
    /// SMTP AUTH (PLAIN or LOGIN) at this host: the user name.
    pub auth_username: Option<String>,
    /// A file holding the password (its first line), readable only by the server.
    pub auth_password_file: Option<PathBuf>,
}

impl RouteConfig {
    /// The credentials for SMTP AUTH, read from the password file.
    pub fn credentials(&self) -> anyhow::Result<Option<smtp_proto::Credentials>> {
        let (Some(username), Some(file)) = (&self.auth_username, &self.auth_password_file) else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the password file {}", file.display()))?;
        let password = text.lines().next().unwrap_or("");
        let credentials = smtp_proto::Credentials::new(username.as_str(), password)
            .with_context(|| format!("credentials for {username}"))?;
        Ok(Some(credentials))
    }
}

fn default_listener_name() -> String {
    "smtp".into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: system_hostname(),
            data_dir: PathBuf::from("postilion-data"),
            user: None,
            listeners: vec![ListenerConfig {
                name: default_listener_name(),
                address: SocketAddr::from(([127, 0, 0, 1], 2525)),
                role: Role::Mta,
                tls_mode: None,
                auth: None,
                bare_line_endings: BareLineEndingsConfig::Reject,
            }],
            tls: TlsConfig::default(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            local: LocalConfig::default(),
            spool: SpoolConfig::default(),
            delivery: DeliveryConfig::default(),
            relay: RelayConfig::default(),
            dns: DnsConfig::default(),
            outbound: OutboundConfig::default(),
            abuse: AbuseLimits::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let mut config: Config = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        config.normalize().with_context(|| format!("checking config file {}", path.display()))?;
        config.check().with_context(|| format!("checking config file {}", path.display()))?;
        Ok(config)
    }

    /// Writes names the one way the code compares them: host and domain names without a
    /// trailing dot, route keys as the router compares domains (lower case, RFC 5321 section
    /// 2.4, and A-labels for internationalized names).
    pub fn normalize(&mut self) -> anyhow::Result<()> {
        self.hostname = self.hostname.trim_end_matches('.').to_string();
        let mut routes = BTreeMap::new();
        for (domain, route) in std::mem::take(&mut self.outbound.routes) {
            let key = crate::router::domain_key(&domain);
            if routes.insert(key.clone(), route).is_some() {
                bail!(
                    "outbound.routes has {key:?} twice (names are compared without case, an internationalized name as its A-label)"
                );
            }
        }
        self.outbound.routes = routes;
        Ok(())
    }

    /// Catches what serde cannot: values out of range and references that do not resolve.
    pub fn check(&self) -> anyhow::Result<()> {
        if !is_host_name(&self.hostname) {
            // It names us in Received fields, EHLO, bounces and their Message-IDs.
            bail!(
                "hostname {:?} is not a host name (letters, digits, hyphens, dots)",
                self.hostname
            );
        }
        if self.listeners.is_empty() {
            bail!("at least one [[listeners]] entry is needed");
        }
        for listener in &self.listeners {
            if listener.role == Role::Submissions && listener.tls() != TlsMode::Implicit {
                bail!(
                    "listener {}: the submissions role is implicit TLS (RFC 8314); \
                     use tls = \"implicit\" or role = \"submission\"",
                    listener.name
                );
            }
            if listener.requires_auth() && !listener.offers_auth() {
                bail!(
                    "listener {}: a {} listener needs auth",
                    listener.name,
                    listener.role.as_str()
                );
            }
        }
        let limits = &self.limits;
        if limits.command_line < 512 {
            bail!("limits.command_line must be at least 512 (RFC 5321 section 4.5.3.1.4)");
        }
        if limits.data_line != 0 && limits.data_line < 1000 {
            bail!("limits.data_line must be 0 or at least 1000 (RFC 5321 section 4.5.3.1.6)");
        }
        if limits.recipients == 0
            || limits.errors == 0
            || limits.connections == 0
            || limits.connections_per_ip == 0
        {
            bail!("limits.recipients, errors, connections and connections_per_ip must be positive");
        }
        if limits.local_part < 64 || limits.domain < 255 {
            bail!(
                "limits.local_part must be at least 64 and limits.domain at least 255 (RFC 5321 section 4.5.3.1)"
            );
        }
        if self.local.domains.is_empty() {
            bail!("local.domains must name at least one domain");
        }
        if self.delivery.workers == 0 || self.delivery.mailbox_concurrency == 0 {
            bail!("delivery.workers and delivery.mailbox_concurrency must be positive");
        }
        let outbound = &self.outbound;
        if outbound.concurrency == 0
            || outbound.destination_concurrency == 0
            || outbound.max_recipients == 0
        {
            bail!(
                "outbound.concurrency, destination_concurrency and max_recipients must be positive"
            );
        }
        if self.abuse.auth_failures_before_ban == 0 {
            bail!("abuse.auth_failures_before_ban must be positive");
        }
        if self.dns.attempts == 0 {
            bail!("dns.attempts must be positive");
        }
        for (domain, route) in &outbound.routes {
            if route.host.is_empty() || route.port == Some(0) {
                bail!("outbound.routes.{domain:?} needs a host and a non-zero port");
            }
            if route.auth_username.is_some() != route.auth_password_file.is_some() {
                bail!(
                    "outbound.routes.{domain:?}: auth_username and auth_password_file go together"
                );
            }
            // RFC 4954 section 14: PLAIN only to a server whose certificate was verified; a
            // password must never go out where anyone could read or intercept it.
            if route.auth_username.is_some()
                && route.tls.unwrap_or(outbound.tls) != OutboundTls::Verify
            {
                bail!("outbound.routes.{domain:?}: SMTP AUTH needs tls = \"verify\"");
            }
            route.credentials().with_context(|| format!("outbound.routes.{domain:?}"))?;
        }
        if self.tls.certificate.is_some() != self.tls.private_key.is_some() {
            bail!("tls.certificate and tls.private_key must be given together");
        }
        crate::router::Router::new(&self.local).context("in [local]")?;
        Ok(())
    }
}

/// The kernel's host name if it is a usable one, or `localhost`.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().trim_end_matches('.').to_string())
        .filter(|name| is_host_name(name))
        .unwrap_or_else(|| "localhost".into())
}

/// RFC 1123 host name syntax: dot-separated labels of letters, digits and inner hyphens,
/// each at most 63 octets, at most 253 in all, no trailing dot.
pub fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Parses `30s`, `5m`, `2h`, `5d`, `250ms` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 =
        number.parse().map_err(|_| format!("{text:?} is not a duration such as 30s or 5m"))?;
    let seconds = match unit.trim() {
        "ms" => return Ok(Duration::from_millis(number)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: unknown unit (use ms, s, m, h or d)")),
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

/// Parses a size: a number of octets, or with a binary unit `K`, `M`, `G` (`KiB`, `MiB`,
/// `GiB` and `KB`, `MB`, `GB` are read the same, as powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a size such as 10M"))?;
    let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit (use K, M or G)")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

fn de_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    match NumberOrText::deserialize(deserializer)? {
        NumberOrText::Number(n) => Ok(n),
        NumberOrText::Text(text) => parse_size(&text).map_err(serde::de::Error::custom),
    }
}

fn de_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    match NumberOrText::deserialize(deserializer)? {
        NumberOrText::Number(n) => Ok(Duration::from_secs(n)),
        NumberOrText::Text(text) => parse_duration(&text).map_err(serde::de::Error::custom),
    }
}

/// A duration where 0 means "never".
fn de_optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let duration = de_duration(deserializer)?;
    Ok((!duration.is_zero()).then_some(duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(432_000)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("10X").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn full_config_parses() {
        let text = r#"
            hostname = "mx.example.org"
            data_dir = "/var/spool/postilion"
            [[listeners]]
            name = "mta"
            address = "0.0.0.0:25"
            [[listeners]]
            name = "submissions"
            address = "[::]:465"
            tls = "implicit"
            bare_line_endings = "normalize"
            [tls]
            certificate = "/etc/cert.pem"
            private_key = "/etc/key.pem"
            [limits]
            message_size = "50M"
            recipients = 200
            [timeouts]
            command = "2m"
            data = 120
            [local]
            domains = ["example.org", "example.net"]
            mailboxes = ["alice", "bob"]
            catch_all = "alice"
            [local.aliases]
            team = ["alice", "bob@example.net"]
            [spool]
            free_space_reserve = "1G"
            [delivery]
            workers = 8
            mailbox_concurrency = 3
            max_lifetime = "3d"
        "#;
        let config: Config = toml::from_str(text).unwrap();
        config.check().unwrap();
        assert_eq!(config.listeners[1].tls(), TlsMode::Implicit);
        assert_eq!(config.limits.message_size, 50 << 20);
        assert_eq!(config.limits.errors, 20, "unset keys keep their defaults");
        assert_eq!(config.timeouts.data, Duration::from_secs(120));
        assert_eq!(config.spool.free_space_reserve, 1 << 30);
        assert_eq!((config.delivery.workers, config.delivery.mailbox_concurrency), (8, 3));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<Config>("hostnme = \"x\"").is_err());
        assert!(toml::from_str::<Config>("[limits]\nmessage_size = \"big\"").is_err());
        let config: Config = toml::from_str("[limits]\ncommand_line = 100").unwrap();
        assert!(config.check().is_err());
        let config: Config =
            toml::from_str("[local]\naliases = { a = [\"x@remote.example\"] }").unwrap();
        config.check().expect("aliases may forward to remote addresses");
        let config: Config = toml::from_str("[local]\naliases = { a = [\"@x\"] }").unwrap();
        assert!(config.check().is_err(), "not an address");
        let config: Config = toml::from_str("[delivery]\nmailbox_concurrency = 0").unwrap();
        assert!(config.check().is_err(), "no delivery into a mailbox could ever start");
    }

    #[test]
    fn names_are_normalized_and_checked() {
        let mut config: Config = toml::from_str(
            "hostname = \"mx.example.org.\"\n\
             [outbound.routes.\"Partner.Example.\"]\nhost = \"relay.example\"",
        )
        .unwrap();
        config.normalize().unwrap();
        config.check().unwrap();
        assert_eq!(config.hostname, "mx.example.org");
        assert!(config.outbound.routes.contains_key("partner.example"));
        let mut twice: Config = toml::from_str(
            "[outbound.routes.\"a.example\"]\nhost = \"x\"\n\
             [outbound.routes.\"A.example\"]\nhost = \"y\"",
        )
        .unwrap();
        assert!(twice.normalize().is_err());
        // An internationalized name is one key, whichever form it is written in.
        let mut idn: Config =
            toml::from_str("[outbound.routes.\"Bücher.Example\"]\nhost = \"relay.example\"")
                .unwrap();
        idn.normalize().unwrap();
        assert!(idn.outbound.routes.contains_key("xn--bcher-kva.example"));
        let mut twice: Config = toml::from_str(
            "[outbound.routes.\"bücher.example\"]\nhost = \"x\"\n\
             [outbound.routes.\"xn--bcher-kva.example\"]\nhost = \"y\"",
        )
        .unwrap();
        assert!(twice.normalize().is_err());
        for bad in ["", "mx..example", "-mx.example", "mx_1.example", "mx example"] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
        assert!(is_host_name("mx-1.example"));
    }

    #[test]
    fn default_config_is_valid() {
        Config::default().check().unwrap();
    }
}

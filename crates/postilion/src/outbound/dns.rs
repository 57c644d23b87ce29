//! Where mail for a domain goes: MX lookup, the implicit MX, null MX, and the addresses of
//! each mail exchanger (RFC 5321 section 5.1, RFC 7505).
//!
//! The decisions (ordering, null MX, our own host in the list) are plain functions over
//! records so they are tested without a DNS server; [`MxResolver`] feeds them from
//! hickory-resolver, pointed at the system's resolvers or at configured name servers.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use smtp_proto::EnhancedStatus;

use crate::config::{DnsConfig, IpPreference};

/// At most this many mail exchangers are tried for one domain, like Postfix's
/// `smtp_mx_address_limit`: a domain publishing hundreds must not hold a delivery for hours.
const MAX_EXCHANGERS: usize = 10;

/// One host to try, in order, with its addresses in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchanger {
    /// The host name (for TLS server name checks and logs), or the address literal.
    pub host: String,
    pub addresses: Vec<IpAddr>,
}

/// Why a domain cannot be reached now or ever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError {
    /// Permanent: bounce. Otherwise try again later.
    pub permanent: bool,
    pub status: EnhancedStatus,
    pub reason: String,
}

impl RouteError {
    fn temporary(status: EnhancedStatus, reason: String) -> RouteError {
        RouteError { permanent: false, status, reason }
    }
    fn permanent(status: EnhancedStatus, reason: String) -> RouteError {
        RouteError { permanent: true, status, reason }
    }
}

/// Orders MX records for delivery attempts. `records` are (preference, exchange) with the
/// exchange as the DNS gave it (a trailing dot is allowed).
///
/// * RFC 7505 section 3: a lone MX with exchange "." (the null MX) means the domain accepts
///   no mail; "SMTP clients MUST NOT attempt to deliver" to it, and the message fails with
///   5.1.10. A "." among other records is a broken zone: the "." entry is ignored.
/// * RFC 5321 section 5.1: lower preference first; "if there are multiple destinations with
///   the same preference and there is no clear reason to favor one ... the SMTP client
///   SHOULD try them in random order".
/// * RFC 5321 section 5.1: if our own host is one of the exchangers, "the SMTP client MUST
///   then discard all records with preference equal to or greater than" its own, so we never
///   loop mail back to ourselves; nothing left means a configuration error (5.4.6 or 4.4.4).
pub fn order_exchangers(
    domain: &str,
    records: &[(u16, String)],
    own_hostname: &str,
    random: &mut impl FnMut() -> u64,
) -> Result<Vec<String>, RouteError> {
    let normalize = |name: &str| name.trim_end_matches('.').to_ascii_lowercase();
    let is_null = |exchange: &str| exchange == "." || exchange.is_empty();
    if records.len() == 1 && is_null(&records[0].1) {
        return Err(RouteError::permanent(
            EnhancedStatus(5, 1, 10),
            format!("{domain} accepts no mail (null MX, RFC 7505)"),
        ));
    }
    let mut ordered: Vec<(u16, u64, String)> = records
        .iter()
        .filter(|(_, exchange)| !is_null(exchange))
        .map(|(preference, exchange)| (*preference, random(), normalize(exchange)))
        .collect();
    ordered.sort();
    // A host listed twice is tried once, at its best preference.
    let mut seen = std::collections::HashSet::new();
    ordered.retain(|(_, _, host)| seen.insert(host.clone()));
    let own = normalize(own_hostname);
    if let Some(own_preference) =
        ordered.iter().filter(|(_, _, host)| *host == own).map(|(p, _, _)| *p).min()
    {
        ordered.retain(|(preference, _, _)| *preference < own_preference);
        if ordered.is_empty() {
            return Err(RouteError::permanent(
                EnhancedStatus(5, 4, 6),
                format!("mail for {domain} loops back to myself ({own} is its best MX)"),
            ));
        }
    }
    ordered.truncate(MAX_EXCHANGERS);
    Ok(ordered.into_iter().map(|(_, _, host)| host).collect())
}

/// Puts the addresses of one host in the order to try them.
pub fn order_addresses(
    mut v6: Vec<IpAddr>,
    mut v4: Vec<IpAddr>,
    preference: IpPreference,
) -> Vec<IpAddr> {
    match preference {
        IpPreference::Ipv4Only => v4,
        IpPreference::Ipv6Only => v6,
        IpPreference::PreferIpv4 => {
            v4.append(&mut v6);
            v4
        }
        IpPreference::PreferIpv6 => {
            v6.append(&mut v4);
            v6
        }
    }
}

/// Looks up where mail goes.
pub struct MxResolver {
    resolver: TokioResolver,
    own_hostname: String,
    ip_preference: IpPreference,
    random: RandomState,
}

/// What a lookup found for one name and type.
enum Found<T> {
    Records(Vec<T>),
    /// The name exists without records of the type (NOERROR/NODATA).
    NoData,
    /// NXDOMAIN.
    NoSuchName,
}

impl MxResolver {
    pub fn new(config: &DnsConfig, own_hostname: &str) -> anyhow::Result<MxResolver> {
        let (resolver_config, mut options) = if config.nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .context("reading the system's DNS configuration (/etc/resolv.conf)")?
        } else {
            (name_servers(&config.nameservers), ResolverOpts::default())
        };
        options.timeout = config.timeout;
        options.attempts = config.attempts;
        // Mail routing must follow the DNS, never /etc/hosts entries meant for other uses.
        options.use_hosts_file = ResolveHosts::Never;
        // Names are looked up as given (absolute); the search list must not turn
        // example.com into example.com.corp.local.
        options.ndots = 0;
        options.cache_size = config.cache_size;
        let resolver =
            TokioResolver::builder_with_config(resolver_config, TokioRuntimeProvider::default())
                .with_options(options)
                .build()
                .context("starting the DNS resolver")?;
        Ok(MxResolver {
            resolver,
            own_hostname: own_hostname.to_string(),
            ip_preference: config.ip_preference,
            random: RandomState::new(),
        })
    }

    /// The hosts to try for `domain`, best first, each with its addresses.
    pub async fn exchangers(&self, domain: &str) -> Result<Vec<Exchanger>, RouteError> {
        if let Some(literal) = address_literal(domain) {
            return Ok(vec![Exchanger { host: domain.to_string(), addresses: vec![literal] }]);
        }
        let fqdn = absolute(domain);
        let hosts = match self.mx_records(&fqdn).await? {
            Found::Records(records) => {
                let mut counter = 0u64;
                let mut random = || {
                    counter += 1;
                    self.random.hash_one(counter)
                };
                order_exchangers(domain, &records, &self.own_hostname, &mut random)?
            }
            // RFC 5321 section 5.1: "If an empty list of MXs is returned, the address is
            // treated as if it was associated with an implicit MX RR, with a preference of
            // 0, pointing to that host."
            Found::NoData => vec![domain.trim_end_matches('.').to_ascii_lowercase()],
            Found::NoSuchName => {
                return Err(RouteError::permanent(
                    EnhancedStatus(5, 1, 2),
                    format!("domain {domain} does not exist (NXDOMAIN)"),
                ));
            }
        };
        let implicit = hosts.len() == 1 && hosts[0] == domain.trim_end_matches('.');
        let mut exchangers = Vec::new();
        let mut last_error = None;
        // One host failing for now (SERVFAIL, a timeout) makes the whole answer temporary,
        // whatever the other hosts did: it may work on the next try.
        let mut any_temporary = false;
        for host in hosts {
            match self.addresses(&host).await {
                Ok(addresses) if !addresses.is_empty() => {
                    exchangers.push(Exchanger { host, addresses })
                }
                Ok(_) => {
                    last_error = Some(RouteError::permanent(
                        EnhancedStatus(5, 1, 2),
                        format!("host {host} has no address"),
                    ))
                }
                Err(error) => {
                    any_temporary |= !error.permanent;
                    last_error = Some(error);
                }
            }
        }
        if exchangers.is_empty() {
            let mut error = last_error.unwrap_or_else(|| {
                RouteError::temporary(EnhancedStatus(4, 4, 3), format!("no host for {domain}"))
            });
            if any_temporary && error.permanent {
                error = RouteError::temporary(
                    EnhancedStatus(4, 4, 3),
                    format!("no usable host for {domain} now ({})", error.reason),
                );
            }
            // A domain without MX whose own name has no address has no mail service at all.
            return Err(if implicit && error.permanent {
                RouteError::permanent(
                    EnhancedStatus(5, 1, 2),
                    format!("domain {domain} has neither MX nor address records"),
                )
            } else {
                error
            });
        }
        Ok(exchangers)
    }

    /// The addresses of a host named in a route (no MX lookup), or the literal itself.
    pub async fn host(&self, host: &str) -> Result<Exchanger, RouteError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Exchanger { host: host.to_string(), addresses: vec![ip] });
        }
        let addresses = self.addresses(&host.to_ascii_lowercase()).await?;
        if addresses.is_empty() {
            return Err(RouteError::temporary(
                EnhancedStatus(4, 4, 3),
                format!("relay host {host} has no address"),
            ));
        }
        Ok(Exchanger { host: host.to_string(), addresses })
    }

    async fn mx_records(&self, fqdn: &str) -> Result<Found<(u16, String)>, RouteError> {
        let lookup = self.resolver.mx_lookup(fqdn).await;
        classify(
            fqdn,
            "MX",
            lookup.map(|lookup| {
                lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect()
            }),
        )
    }

    /// A and AAAA records of `host`, ordered by preference. Both are asked at once; one
    /// family failing temporarily while the other answers still gives a usable host.
    async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, RouteError> {
        let fqdn = absolute(host);
        let want_v4 = self.ip_preference != IpPreference::Ipv6Only;
        let want_v6 = self.ip_preference != IpPreference::Ipv4Only;
        let (v4, v6) = tokio::join!(
            self.address_records(&fqdn, RecordType::A, want_v4),
            self.address_records(&fqdn, RecordType::AAAA, want_v6),
        );
        let take = |found: Found<IpAddr>| match found {
            Found::Records(addresses) => addresses,
            Found::NoData | Found::NoSuchName => Vec::new(),
        };
        match (v4, v6) {
            (Ok(Found::NoSuchName), Ok(Found::NoSuchName)) => Err(RouteError::permanent(
                EnhancedStatus(5, 1, 2),
                format!("host {host} does not exist (NXDOMAIN)"),
            )),
            (Ok(v4), Ok(v6)) => Ok(order_addresses(take(v6), take(v4), self.ip_preference)),
            (Ok(Found::Records(v4)), Err(_)) => Ok(v4),
            (Err(_), Ok(Found::Records(v6))) => Ok(v6),
            (Err(error), _) | (_, Err(error)) => Err(error),
        }
    }
}

impl MxResolver {
    /// The addresses in the A or AAAA records of `fqdn`; no data when not `wanted`.
    async fn address_records(
        &self,
        fqdn: &str,
        record_type: RecordType,
        wanted: bool,
    ) -> Result<Found<IpAddr>, RouteError> {
        if !wanted {
            return Ok(Found::NoData);
        }
        let lookup = self.resolver.lookup(fqdn, record_type).await;
        let addresses = lookup.map(|lookup| {
            lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                })
                .collect()
        });
        classify(fqdn, &record_type.to_string(), addresses)
    }
}

/// Sorts a lookup result into records, no data, no such name, or a temporary failure.
fn classify<T>(
    name: &str,
    record_type: &str,
    result: Result<Vec<T>, NetError>,
) -> Result<Found<T>, RouteError> {
    match result {
        Ok(records) if records.is_empty() => Ok(Found::NoData),
        Ok(records) => Ok(Found::Records(records)),
        Err(error) if error.is_nx_domain() => Ok(Found::NoSuchName),
        Err(error) if error.is_no_records_found() => Ok(Found::NoData),
        // SERVFAIL, REFUSED, timeouts, unreachable name servers: the answer may come later.
        Err(error) => Err(RouteError::temporary(
            EnhancedStatus(4, 4, 3),
            format!("DNS lookup of {record_type} records for {name} failed: {error}"),
        )),
    }
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 section 4.1.3).
fn address_literal(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..].parse().ok(),
        _ => inner.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

fn absolute(name: &str) -> String {
    let name = name.trim_end_matches('.');
    format!("{name}.")
}

/// A resolver configuration that asks only the given servers, over UDP with TCP fallback.
fn name_servers(servers: &[SocketAddr]) -> ResolverConfig {
    let servers = servers
        .iter()
        .map(|server| {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            NameServerConfig::new(server.ip(), true, vec![udp, tcp])
        })
        .collect();
    ResolverConfig::from_name_servers(servers)
}

/// How long the resolver waits for one answer. Also the default of `dns.timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence() -> impl FnMut() -> u64 {
        let mut n = 0;
        move || {
            n += 1;
            n
        }
    }

    fn records(list: &[(u16, &str)]) -> Vec<(u16, String)> {
        list.iter().map(|(p, h)| (*p, h.to_string())).collect()
    }

    #[test]
    fn lower_preference_first() {
        let mx = records(&[(20, "b.example."), (10, "A.example."), (30, "c.example")]);
        let order = order_exchangers("example", &mx, "me.test", &mut sequence()).unwrap();
        assert_eq!(order, ["a.example", "b.example", "c.example"]);
    }

    #[test]
    fn equal_preferences_are_shuffled() {
        let mx = records(&[(10, "a."), (10, "b."), (10, "c."), (5, "first.")]);
        let mut seen = std::collections::HashSet::new();
        let state = RandomState::new();
        for round in 0..200u64 {
            let mut n = 0u64;
            let mut random = || {
                n += 1;
                state.hash_one((round, n))
            };
            let order = order_exchangers("d", &mx, "me", &mut random).unwrap();
            assert_eq!(order[0], "first");
            seen.insert(order[1..].to_vec());
        }
        assert!(seen.len() > 1, "equal preferences must not always come in one order");
    }

    #[test]
    fn null_mx_fails_permanently() {
        let error =
            order_exchangers("d.test", &records(&[(0, ".")]), "me", &mut sequence()).unwrap_err();
        assert!(error.permanent);
        assert_eq!(error.status, EnhancedStatus(5, 1, 10));
        // A "." beside real exchangers is ignored, not obeyed.
        let order =
            order_exchangers("d", &records(&[(0, "."), (10, "mx.d.")]), "me", &mut sequence())
                .unwrap();
        assert_eq!(order, ["mx.d"]);
    }

    #[test]
    fn own_host_and_worse_are_dropped() {
        let mx = records(&[(10, "backup.d."), (5, "primary.d."), (10, "ME.test."), (20, "z.d.")]);
        let order = order_exchangers("d", &mx, "me.test", &mut sequence()).unwrap();
        assert_eq!(order, ["primary.d"]);
        let mx = records(&[(10, "me.test.")]);
        let error = order_exchangers("d", &mx, "me.test", &mut sequence()).unwrap_err();
        assert_eq!(error.status, EnhancedStatus(5, 4, 6));
    }

    #[test]
    fn duplicates_and_limit() {
        let mx: Vec<(u16, String)> = (0..30).map(|i| (i as u16, format!("mx{i}."))).collect();
        let order = order_exchangers("d", &mx, "me", &mut sequence()).unwrap();
        assert_eq!(order.len(), MAX_EXCHANGERS);
        let mx = records(&[(10, "a."), (20, "A.")]);
        assert_eq!(order_exchangers("d", &mx, "me", &mut sequence()).unwrap(), ["a"]);
        let mx = records(&[(10, "a."), (15, "b."), (20, "A.")]);
        assert_eq!(order_exchangers("d", &mx, "me", &mut sequence()).unwrap(), ["a", "b"]);
    }

    #[test]
    fn address_literals() {
        assert_eq!(address_literal("[127.0.0.2]"), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(address_literal("[IPv6:::1]"), Some("::1".parse().unwrap()));
        assert_eq!(address_literal("[ipv6:2001:db8::1]"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(address_literal("example.com"), None);
        assert_eq!(address_literal("[::1]"), None, "IPv6 literals need the tag");
    }

    #[test]
    fn address_order_follows_preference() {
        let v6: Vec<IpAddr> = vec!["::1".parse().unwrap()];
        let v4: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap()];
        let both = |p| order_addresses(v6.clone(), v4.clone(), p);
        assert_eq!(both(IpPreference::PreferIpv6), [v6[0], v4[0]]);
        assert_eq!(both(IpPreference::PreferIpv4), [v4[0], v6[0]]);
        assert_eq!(both(IpPreference::Ipv4Only), [v4[0]]);
        assert_eq!(both(IpPreference::Ipv6Only), [v6[0]]);
    }
}

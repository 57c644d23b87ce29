//! Local recipients: which addresses are ours, and which mailboxes they deliver to.
//!
//! Aliases, plus-addressing and the catch-all are resolved when the message is accepted, like
//! Postfix's virtual alias expansion before queueing: the queue then holds one recipient per
//! final mailbox, so per-recipient delivery state is exact and a crash never redelivers to a
//! mailbox that already has its copy.

use std::collections::{BTreeSet, HashMap, HashSet};

use anyhow::{Context, bail};
use smtp_proto::{Domain, ForwardPath, Mailbox};

use crate::config::LocalConfig;

/// How deep aliases may point to aliases.
const MAX_ALIAS_DEPTH: usize = 8;

/// A domain as the router compares it: without a final dot, in lower case, its labels as
/// A-labels, so that `bücher.example` and `xn--bcher-kva.example` are one domain (an
/// SMTPUTF8 client may give either, RFC 6531 section 3.2; DNS knows only the A-label). A
/// name that is not valid IDNA stays as it is, in ASCII lower case.
pub fn domain_key(domain: &str) -> String {
    let domain = domain.trim_end_matches('.');
    if domain.is_ascii() {
        // A-labels are ASCII already: nothing to map but the case.
        return domain.to_ascii_lowercase();
    }
    idna::domain_to_ascii(domain).unwrap_or_else(|_| domain.to_ascii_lowercase())
}

#[derive(Debug)]
pub struct Router {
    /// Local domains, as [`domain_key`] writes them.
    domains: HashSet<String>,
    /// Listed mailboxes; `None` when every valid local part is a mailbox.
    mailboxes: Option<HashSet<String>>,
    catch_all: Option<String>,
    delimiter: Option<String>,
    /// Alias name (lower case) -> targets as (local part, domain); targets outside the local
    /// domains forward the mail there.
    aliases: HashMap<String, Vec<(String, String)>>,
}

/// Where a final address is delivered.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    /// Over SMTP: the address is not in one of our domains.
    Remote,
    /// Into this local mailbox.
    Mailbox(String),
    /// In one of our domains, but no mailbox takes it (any more: the configuration changed
    /// since the message was accepted).
    NoMailbox,
}

/// The result of looking up a recipient.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// One of our addresses, delivered to these final addresses (at least one): local
    /// mailboxes, or remote addresses an alias forwards to.
    Local(Vec<String>),
    /// A local domain without such a user.
    NoSuchUser,
    /// Not one of our domains.
    NotLocal,
}

impl Router {
    pub fn new(config: &LocalConfig) -> anyhow::Result<Router> {
        let domains: HashSet<String> = config.domains.iter().map(|d| domain_key(d)).collect();
        let mailboxes = if config.mailboxes.is_empty() {
            None
        } else {
            let mut set = HashSet::new();
            for name in &config.mailboxes {
                let name = name.to_lowercase();
                if !maildir::is_valid_mailbox_name(&name) {
                    bail!("mailbox name {name:?} cannot be a Maildir directory");
                }
                set.insert(name);
            }
            Some(set)
        };
        let catch_all = (!config.catch_all.is_empty()).then(|| config.catch_all.to_lowercase());
        let delimiter =
            (!config.recipient_delimiter.is_empty()).then(|| config.recipient_delimiter.clone());
        let first_domain = domain_key(config.domains.first().context("local.domains is empty")?);
        let mut aliases = HashMap::new();
        for (name, targets) in &config.aliases {
            let mut resolved = Vec::new();
            for target in targets {
                let (local, domain) = match target.rsplit_once('@') {
                    Some((local, domain)) => (local.to_lowercase(), domain_key(domain)),
                    None => (target.to_lowercase(), first_domain.clone()),
                };
                if local.is_empty() || domain.is_empty() {
                    bail!("alias {name:?} points to {target:?}, which is not an address");
                }
                resolved.push((local, domain));
            }
            aliases.insert(name.to_lowercase(), resolved);
        }
        let router = Router { domains, mailboxes, catch_all, delimiter, aliases };
        if let Some(catch_all) = &router.catch_all
            && !router.is_mailbox(catch_all)
        {
            bail!("catch_all {catch_all:?} is not a mailbox");
        }
        // Every alias must end in mailboxes within the depth limit.
        for name in config.aliases.keys() {
            let mut out = BTreeSet::new();
            router
                .expand_alias(&name.to_lowercase(), 0, &mut out)
                .with_context(|| format!("alias {name:?}"))?;
        }
        Ok(router)
    }

    pub fn is_local_domain(&self, domain: &Domain) -> bool {
        match domain {
            Domain::Name(name) => self.domains.contains(&domain_key(name)),
            _ => false,
        }
    }

    /// What two final addresses (from [`Router::resolve`], or remote RCPTs) that are one
    /// recipient have in common: our mailboxes ignore case; a remote local part's case is
    /// the remote host's to interpret (RFC 5321 section 2.4), its domain is compared as
    /// [`domain_key`] writes it (an alias's remote target is stored that way, a RCPT keeps
    /// the client's form).
    pub fn recipient_key(&self, address: &str) -> String {
        match address.rsplit_once('@') {
            Some((local, domain)) => {
                let domain = domain_key(domain);
                match self.domains.contains(&domain) {
                    true => format!("{}@{domain}", local.to_lowercase()),
                    false => format!("{local}@{domain}"),
                }
            }
            None => address.to_lowercase(),
        }
    }

    /// Looks up a RCPT TO path.
    pub fn resolve(&self, path: &ForwardPath) -> Lookup {
        let (local_part, domain) = match path {
            // RFC 5321 section 4.5.1: <Postmaster> MUST be accepted.
            ForwardPath::Postmaster => {
                let domain =
                    self.domains.iter().min().cloned().unwrap_or_else(|| "localhost".into());
                ("postmaster".to_string(), domain)
            }
            ForwardPath::Mailbox(Mailbox { local_part, domain: Domain::Name(name) }) => {
                let domain = domain_key(name);
                if !self.domains.contains(&domain) {
                    return Lookup::NotLocal;
                }
                (local_part.clone(), domain)
            }
            // An address literal is never one of our domains.
            ForwardPath::Mailbox(_) => return Lookup::NotLocal,
        };
        let key = local_part.to_lowercase();
        let base = self.strip_extension(&key);
        let mut out = BTreeSet::new();
        for name in [key.as_str(), base] {
            if self.aliases.contains_key(name) {
                return match self.expand_alias(name, 0, &mut out) {
                    Ok(()) => Lookup::Local(out.into_iter().collect()),
                    Err(_) => Lookup::NoSuchUser,
                };
            }
        }
        // RFC 5321 section 4.5.1: postmaster@ every local domain MUST be accepted, whatever
        // the mailbox list says; the local part is case-insensitive here.
        if self.is_mailbox(base) || base == "postmaster" {
            return Lookup::Local(vec![format!("{local_part}@{domain}")]);
        }
        match &self.catch_all {
            Some(catch_all) => Lookup::Local(vec![format!("{catch_all}@{domain}")]),
            None => Lookup::NoSuchUser,
        }
    }

    /// Where a final address (from [`Router::resolve`]) is delivered: over SMTP unless it is
    /// in one of our domains.
    pub fn destination(&self, address: &str) -> Destination {
        let Some((local_part, domain)) = address.rsplit_once('@') else {
            return Destination::Remote;
        };
        if !self.domains.contains(&domain_key(domain)) {
            return Destination::Remote;
        }
        let key = local_part.to_lowercase();
        let base = self.strip_extension(&key);
        match self.is_mailbox(base) || base == "postmaster" {
            true => Destination::Mailbox(base.to_string()),
            false => Destination::NoMailbox,
        }
    }

    fn strip_extension<'a>(&self, local_part: &'a str) -> &'a str {
        match &self.delimiter {
            Some(delimiter) => match local_part.split_once(delimiter.as_str()) {
                Some((base, _)) if !base.is_empty() => base,
                _ => local_part,
            },
            None => local_part,
        }
    }

    fn is_mailbox(&self, name: &str) -> bool {
        match &self.mailboxes {
            Some(listed) => listed.contains(name),
            None => maildir::is_valid_mailbox_name(name),
        }
    }

    fn expand_alias(
        &self,
        name: &str,
        depth: usize,
        out: &mut BTreeSet<String>,
    ) -> anyhow::Result<()> {
        if depth > MAX_ALIAS_DEPTH {
            bail!("aliases nest deeper than {MAX_ALIAS_DEPTH} levels (a loop?)");
        }
        let targets = self.aliases.get(name).map(Vec::as_slice).unwrap_or_default();
        for (local, domain) in targets {
            if !self.domains.contains(domain) {
                // Forwarded: delivered over SMTP like any remote recipient.
                out.insert(format!("{local}@{domain}"));
            } else if local != name && self.aliases.contains_key(local.as_str()) {
                self.expand_alias(local, depth + 1, out)?;
            } else if self.is_mailbox(local) || local == "postmaster" {
                out.insert(format!("{local}@{domain}"));
            } else {
                bail!("target {local}@{domain} is not a mailbox");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpt(address: &str) -> ForwardPath {
        let (local_part, domain) = address.rsplit_once('@').unwrap();
        ForwardPath::Mailbox(Mailbox {
            local_part: local_part.into(),
            domain: Domain::Name(domain.into()),
        })
    }

    fn mailbox(router: &Router, address: &str) -> Option<String> {
        match router.destination(address) {
            Destination::Mailbox(mailbox) => Some(mailbox),
            Destination::Remote | Destination::NoMailbox => None,
        }
    }

    fn local(addresses: &[&str]) -> Lookup {
        Lookup::Local(addresses.iter().map(|a| a.to_string()).collect())
    }

    #[test]
    fn open_mode_every_local_part_is_a_mailbox() {
        let router = Router::new(&LocalConfig::default()).unwrap();
        assert_eq!(router.resolve(&rcpt("alice@localhost")), local(&["alice@localhost"]));
        assert_eq!(router.resolve(&rcpt("Bob@LOCALHOST.")), local(&["Bob@localhost"]));
        assert_eq!(mailbox(&router, "Bob@localhost").as_deref(), Some("bob"));
        assert_eq!(router.resolve(&rcpt("alice@example.org")), Lookup::NotLocal);
        assert_eq!(router.resolve(&rcpt("../etc@localhost")), Lookup::NoSuchUser);
        assert_eq!(router.resolve(&rcpt(".hidden@localhost")), Lookup::NoSuchUser);
    }

    #[test]
    fn a_domain_is_the_same_as_a_u_label_and_as_an_a_label() {
        let config = LocalConfig {
            domains: vec!["Bücher.Example.".into(), "xn--mnchen-3ya.example".into()],
            aliases: [(
                "team".to_string(),
                vec!["alice@bücher.example".to_string(), "bob@Straße.example".to_string()],
            )]
            .into(),
            ..LocalConfig::default()
        };
        let router = Router::new(&config).unwrap();
        // Configured as a U-label, given as an A-label, in any case, and the other way round.
        assert_eq!(
            router.resolve(&rcpt("anna@XN--BCHER-KVA.example")),
            local(&["anna@xn--bcher-kva.example"])
        );
        assert_eq!(
            router.resolve(&rcpt("anna@bücher.example")),
            local(&["anna@xn--bcher-kva.example"])
        );
        assert_eq!(
            router.resolve(&rcpt("max@München.example")),
            local(&["max@xn--mnchen-3ya.example"])
        );
        assert_ne!(router.destination("anna@BÜCHER.example"), Destination::Remote);
        assert!(router.is_local_domain(&Domain::Name("xn--bcher-kva.example".into())));
        assert!(!router.is_local_domain(&Domain::Name("bucher.example".into())));
        // Alias targets too: a local one in the other form, a remote one as its A-label
        // (nontransitional processing, as in IDNA2008: ß stays ß).
        assert_eq!(
            router.resolve(&rcpt("team@xn--bcher-kva.example")),
            local(&["alice@xn--bcher-kva.example", "bob@xn--strae-oqa.example"])
        );
        // Not valid IDNA: compared as it is.
        assert_eq!(domain_key("a..b.Example"), "a..b.example");
        // One recipient, whichever form: the alias's remote target (an A-label) and the same
        // address in a RCPT (a U-label); a remote local part keeps its case, ours do not.
        let key = router.recipient_key("bob@xn--strae-oqa.example");
        assert_eq!(router.recipient_key("bob@Straße.example"), key);
        assert_ne!(router.recipient_key("Bob@Straße.example"), key);
        assert_eq!(
            router.recipient_key("Anna@bücher.example"),
            router.recipient_key("anna@xn--bcher-kva.example")
        );
    }

    #[test]
    fn plus_addressing() {
        let router = Router::new(&LocalConfig::default()).unwrap();
        assert_eq!(router.resolve(&rcpt("alice+news@localhost")), local(&["alice+news@localhost"]));
        assert_eq!(mailbox(&router, "alice+news@localhost").as_deref(), Some("alice"));
        assert_eq!(mailbox(&router, "+x@localhost").as_deref(), Some("+x"));
        let config = LocalConfig { recipient_delimiter: String::new(), ..LocalConfig::default() };
        let router = Router::new(&config).unwrap();
        assert_eq!(mailbox(&router, "alice+news@localhost").as_deref(), Some("alice+news"));
    }

    #[test]
    fn listed_mailboxes_aliases_and_catch_all() {
        let config = LocalConfig {
            domains: vec!["example.org".into(), "example.net".into()],
            mailboxes: vec!["alice".into(), "bob".into()],
            aliases: [
                ("team".to_string(), vec!["alice".to_string(), "bob@example.net".to_string()]),
                ("all".to_string(), vec!["team".to_string(), "alice".to_string()]),
            ]
            .into(),
            ..LocalConfig::default()
        };
        let router = Router::new(&config).unwrap();
        assert_eq!(router.resolve(&rcpt("alice@example.org")), local(&["alice@example.org"]));
        assert_eq!(router.resolve(&rcpt("carol@example.org")), Lookup::NoSuchUser);
        // A copy accepted for carol before she was taken out of the list.
        assert_eq!(router.destination("carol@example.org"), Destination::NoMailbox);
        assert_eq!(
            router.resolve(&rcpt("team@example.org")),
            local(&["alice@example.org", "bob@example.net"])
        );
        assert_eq!(
            router.resolve(&rcpt("ALL+x@example.net")),
            local(&["alice@example.org", "bob@example.net"])
        );
        assert_eq!(router.resolve(&ForwardPath::Postmaster), local(&["postmaster@example.net"]));
        assert_eq!(
            router.resolve(&rcpt("PostMaster@example.org")),
            local(&["PostMaster@example.org"])
        );
        assert_eq!(mailbox(&router, "PostMaster@example.org").as_deref(), Some("postmaster"));
        let config = LocalConfig { catch_all: "bob".into(), ..config };
        let router = Router::new(&config).unwrap();
        assert_eq!(router.resolve(&rcpt("carol@example.org")), local(&["bob@example.org"]));
    }

    #[test]
    fn aliases_forward_to_remote_addresses() {
        let config = LocalConfig {
            aliases: [(
                "team".to_string(),
                vec!["alice".to_string(), "Bob@Remote.Example".to_string()],
            )]
            .into(),
            ..LocalConfig::default()
        };
        let router = Router::new(&config).unwrap();
        assert_eq!(
            router.resolve(&rcpt("team@localhost")),
            local(&["alice@localhost", "bob@remote.example"])
        );
        assert_eq!(router.destination("bob@remote.example"), Destination::Remote);
        assert_ne!(router.destination("alice@LOCALHOST"), Destination::Remote);
    }

    #[test]
    fn bad_alias_configs_are_refused() {
        let looping = LocalConfig {
            aliases: [
                ("a".to_string(), vec!["b".to_string()]),
                ("b".to_string(), vec!["a".to_string()]),
            ]
            .into(),
            ..LocalConfig::default()
        };
        assert!(Router::new(&looping).is_err());
        let unknown = LocalConfig {
            mailboxes: vec!["alice".into()],
            aliases: [("a".to_string(), vec!["nobody".to_string()])].into(),
            ..LocalConfig::default()
        };
        assert!(Router::new(&unknown).is_err());
        let bad_catch_all = LocalConfig {
            mailboxes: vec!["alice".into()],
            catch_all: "zed".into(),
            ..LocalConfig::default()
        };
        assert!(Router::new(&bad_catch_all).is_err());
    }
}

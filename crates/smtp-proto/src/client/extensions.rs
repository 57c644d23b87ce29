//! What a server offers in its EHLO reply (RFC 5321 section 4.1.1.1).

use super::reply::ServerReply;

/// The service extensions a server announced. `Extensions::default()` is a server that offers
/// none, which is what a HELO session gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// `PIPELINING` (RFC 2920).
    pub pipelining: bool,
    /// `SIZE` (RFC 1870): `None` when not offered, otherwise the fixed maximum message size,
    /// where 0 means "no fixed maximum" (sent as `SIZE 0`, as a bare `SIZE`, or with a value
    /// we cannot read). See [`Extensions::size_limit`].
    pub size: Option<u64>,
    /// `8BITMIME` (RFC 6152).
    pub eight_bit_mime: bool,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `BINARYMIME` (RFC 3030 section 3); usable only together with CHUNKING.
    pub binary_mime: bool,
    /// `CHUNKING`, the BDAT command (RFC 3030 section 2).
    pub chunking: bool,
    /// `DSN` (RFC 3461).
    pub dsn: bool,
    /// `STARTTLS` (RFC 3207).
    pub starttls: bool,
    /// `ENHANCEDSTATUSCODES` (RFC 2034).
    pub enhanced_status_codes: bool,
    /// The SASL mechanisms of `AUTH` (RFC 4954), upper case, in the order offered.
    pub auth: Vec<String>,
}

impl Extensions {
    /// Reads the positive reply to EHLO: its first line names the server, every other line is
    /// `ehlo-keyword *( SP ehlo-param )`. RFC 5321 section 4.1.1.1: keywords "MUST always be
    /// recognized and processed in a case-insensitive manner". Unknown keywords are ignored.
    pub fn from_ehlo(reply: &ServerReply) -> Extensions {
        let mut extensions = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => extensions.pipelining = true,
                // RFC 1870 section 3: `size-param ::= [1*DIGIT]`, "a parameter value of 0
                // (zero) indicates that no fixed maximum message size is in force".
                "SIZE" => extensions.size = Some(words.next().and_then(decimal).unwrap_or(0)),
                "8BITMIME" => extensions.eight_bit_mime = true,
                "SMTPUTF8" => extensions.smtputf8 = true,
                "BINARYMIME" => extensions.binary_mime = true,
                "CHUNKING" => extensions.chunking = true,
                "DSN" => extensions.dsn = true,
                "STARTTLS" => extensions.starttls = true,
                "ENHANCEDSTATUSCODES" => extensions.enhanced_status_codes = true,
                "AUTH" => extensions.add_auth(words),
                // Servers from before RFC 4954 was final announce `AUTH=MECH ...`; many still
                // do, next to the standard line.
                _ => {
                    if let Some(first) = keyword.strip_prefix("AUTH=") {
                        extensions.add_auth(std::iter::once(first).chain(words));
                    }
                }
            }
        }
        extensions
    }

    /// The fixed maximum message size in octets, if the server announced one.
    pub fn size_limit(&self) -> Option<u64> {
        self.size.filter(|&limit| limit > 0)
    }

    fn add_auth<'a>(&mut self, mechanisms: impl Iterator<Item = &'a str>) {
        for mechanism in mechanisms.filter(|m| !m.is_empty()) {
            let mechanism = mechanism.to_ascii_uppercase();
            if !self.auth.contains(&mechanism) {
                self.auth.push(mechanism);
            }
        }
    }
}

/// `1*DIGIT` as a number; `None` when it is not one or does not fit.
fn decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ehlo(lines: &[&str]) -> Extensions {
        Extensions::from_ehlo(&ServerReply::new(250, lines.iter().map(|l| l.to_string()).collect()))
    }

    #[test]
    fn full_ehlo_reply() {
        let extensions = ehlo(&[
            "mx.example.org Hello client.example [192.0.2.1]",
            "PIPELINING",
            "SIZE 52428800",
            "8BITMIME",
            "SMTPUTF8",
            "BINARYMIME",
            "CHUNKING",
            "DSN",
            "STARTTLS",
            "ENHANCEDSTATUSCODES",
            "AUTH PLAIN LOGIN",
            "HELP",
            "X-UNKNOWN with params",
        ]);
        assert_eq!(
            extensions,
            Extensions {
                pipelining: true,
                size: Some(52428800),
                eight_bit_mime: true,
                smtputf8: true,
                binary_mime: true,
                chunking: true,
                dsn: true,
                starttls: true,
                enhanced_status_codes: true,
                auth: vec!["PLAIN".into(), "LOGIN".into()],
            }
        );
        assert_eq!(extensions.size_limit(), Some(52428800));
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let extensions =
            ehlo(&["mx", "pipelining", "Size 1000", "8bitmime", "StartTLS", "auth plain"]);
        assert!(extensions.pipelining && extensions.eight_bit_mime && extensions.starttls);
        assert_eq!(extensions.size, Some(1000));
        assert_eq!(extensions.auth, ["PLAIN"]);
    }

    #[test]
    fn size_without_fixed_limit() {
        for line in ["SIZE", "SIZE 0", "SIZE lots", "SIZE 99999999999999999999999"] {
            let extensions = ehlo(&["mx", line]);
            assert_eq!(extensions.size, Some(0), "{line}");
            assert_eq!(extensions.size_limit(), None, "{line}");
        }
        assert_eq!(ehlo(&["mx"]).size, None);
    }

    #[test]
    fn the_first_line_is_the_server_name_not_a_keyword() {
        assert_eq!(ehlo(&["PIPELINING"]), Extensions::default());
        assert_eq!(ehlo(&["mx.example.org says PIPELINING"]), Extensions::default());
    }

    #[test]
    fn old_style_auth_lines_merge() {
        let extensions = ehlo(&["mx", "AUTH=LOGIN PLAIN", "AUTH PLAIN LOGIN CRAM-MD5", "AUTH"]);
        assert_eq!(extensions.auth, ["LOGIN", "PLAIN", "CRAM-MD5"]);
    }

    #[test]
    fn blank_and_odd_lines_are_ignored() {
        let extensions = ehlo(&["mx", "", "   ", "DSN  extra", "\tCHUNKING"]);
        assert!(extensions.dsn && extensions.chunking);
    }
}

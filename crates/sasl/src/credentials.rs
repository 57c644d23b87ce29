//! What the user database stores: an argon2id hash of each password, for `PLAIN` and
//! `LOGIN`, and the SCRAM-SHA-256 keys, for SCRAM. Both are derived from the SASLprep-ed
//! password ([`saslprep`]), so the same password works with every mechanism.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::random::{RandomError, random_bytes};
use crate::{MAX_PASSWORD_LEN, saslprep};

/// Why a credential could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialError {
    /// The password is empty, longer than [`MAX_PASSWORD_LEN`], or refused by SASLprep.
    UnusablePassword(String),
    /// Argon2 parameters out of range, or a SCRAM salt or iteration count that cannot be used.
    InvalidParameters(String),
    /// No random salt could be had.
    Random(RandomError),
    /// A stored string is not in the expected format.
    Malformed {
        /// The format expected: `argon2id PHC` or `SCRAM-SHA-256`.
        format: &'static str,
        /// What is wrong with the string (which is not repeated: it holds secrets).
        reason: String,
    },
}

impl fmt::Display for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialError::UnusablePassword(reason) => write!(f, "unusable password: {reason}"),
            CredentialError::InvalidParameters(reason) => write!(f, "invalid parameters: {reason}"),
            CredentialError::Random(error) => error.fmt(f),
            CredentialError::Malformed { format, reason } => {
                write!(f, "not a valid {format} string: {reason}")
            }
        }
    }
}

impl std::error::Error for CredentialError {}

impl From<RandomError> for CredentialError {
    fn from(error: RandomError) -> CredentialError {
        CredentialError::Random(error)
    }
}

/// The password as it is hashed: SASLprep-ed and within [`MAX_PASSWORD_LEN`].
fn prepare_password(password: &str) -> Result<String, CredentialError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(CredentialError::UnusablePassword(format!(
            "{} octets, more than the {MAX_PASSWORD_LEN} that AUTH accepts",
            password.len()
        )));
    }
    saslprep(password)
        .map(|prepared| prepared.into_owned())
        .map_err(|error| CredentialError::UnusablePassword(error.to_string()))
}

/// The cost of an argon2id hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory in KiB (`m`).
    pub memory_kib: u32,
    /// Passes over the memory (`t`).
    pub iterations: u32,
    /// Lanes (`p`).
    pub parallelism: u32,
}

impl Argon2Params {
    /// The OWASP Password Storage Cheat Sheet's first choice for argon2id: 19 MiB, two passes,
    /// one lane (`m=19456,t=2,p=1`). About 20 ms per hash on a current server core: slow
    /// enough to make guessing expensive, fast enough for a login.
    pub const OWASP: Argon2Params =
        Argon2Params { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 };
}

impl Default for Argon2Params {
    fn default() -> Argon2Params {
        Argon2Params::OWASP
    }
}

/// An argon2id password hash as a PHC string, `$argon2id$v=19$m=19456,t=2,p=1$salt$hash`: the
/// form in which a password for `PLAIN` and `LOGIN` is stored. The string carries its own
/// parameters, so hashes made with other costs keep working when the defaults change.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

impl PasswordHash {
    /// Hashes a password with [`Argon2Params::OWASP`] and a random 16-octet salt.
    pub fn hash(password: &str) -> Result<PasswordHash, CredentialError> {
        PasswordHash::hash_with(password, Argon2Params::OWASP)
    }

    /// Hashes a password with the given cost and a random 16-octet salt.
    pub fn hash_with(
        password: &str,
        params: Argon2Params,
    ) -> Result<PasswordHash, CredentialError> {
        let salt: [u8; 16] = random_bytes()?;
        PasswordHash::hash_with_salt(password, params, &salt)
    }

    fn hash_with_salt(
        password: &str,
        params: Argon2Params,
        salt: &[u8],
    ) -> Result<PasswordHash, CredentialError> {
        let password = prepare_password(password)?;
        let params = Params::new(params.memory_kib, params.iterations, params.parallelism, None)
            .map_err(|error| CredentialError::InvalidParameters(format!("argon2: {error}")))?;
        let hash = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_with_salt(password.as_bytes(), salt)
            .map_err(|error| CredentialError::InvalidParameters(format!("argon2: {error}")))?;
        Ok(PasswordHash(hash.to_string()))
    }

    /// Whether `password` is the one this hash was made from. The password is SASLprep-ed
    /// first, as it was for hashing; one that SASLprep refuses matches nothing. The argon2
    /// crate compares the hashes in constant time.
    ///
    /// This takes as long as the hash's parameters say (about 20 ms with the defaults): call
    /// it where blocking is fine.
    pub fn verify(&self, password: &str) -> bool {
        let Ok(password) = prepare_password(password) else { return false };
        let Ok(hash) = argon2::PasswordHash::new(&self.0) else { return false };
        Argon2::default().verify_password(password.as_bytes(), &hash).is_ok()
    }

    /// The PHC string, to store.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Reads a stored PHC string. Only argon2id version 19 (`0x13`) with a salt and a hash is
/// accepted: that is all this crate writes.
impl FromStr for PasswordHash {
    type Err = CredentialError;

    fn from_str(phc: &str) -> Result<PasswordHash, CredentialError> {
        let malformed =
            |reason: String| CredentialError::Malformed { format: "argon2id PHC", reason };
        let hash = argon2::PasswordHash::new(phc).map_err(|error| malformed(error.to_string()))?;
        if hash.algorithm.as_str() != Algorithm::Argon2id.ident().as_str() {
            return Err(malformed(format!("algorithm {} is not argon2id", hash.algorithm)));
        }
        if hash.version != Some(Version::V0x13.into()) {
            return Err(malformed("version is not v=19".to_owned()));
        }
        if hash.salt.is_none() || hash.hash.is_none() {
            return Err(malformed("salt or hash missing".to_owned()));
        }
        Params::try_from(&hash).map_err(|error| malformed(format!("parameters: {error}")))?;
        Ok(PasswordHash(phc.to_owned()))
    }
}

impl fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Shows the algorithm and parameters but not the salt and hash, which would help an offline
/// guessing attack if they ended up in a log.
impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<&str> = self.0.split('$').take(4).collect();
        write!(f, "PasswordHash({:?}…)", shown.join("$"))
    }
}

/// Checks a password against the stored hash of a user, or against nothing when the user is
/// unknown (`None`). For an unknown user the password is checked against a hash made once
/// with the default parameters and the result thrown away, so that the answer takes about as
/// long as for a real user and its timing does not tell which users exist.
pub fn verify_password(stored: Option<&PasswordHash>, password: &str) -> bool {
    static DUMMY: OnceLock<Option<PasswordHash>> = OnceLock::new();
    match stored {
        Some(hash) => hash.verify(password),
        None => {
            let dummy = DUMMY.get_or_init(|| {
                PasswordHash::hash_with_salt("dummy password", Argon2Params::OWASP, &[0x5a; 16])
                    .ok()
            });
            if let Some(dummy) = dummy {
                std::hint::black_box(dummy.verify(password));
            }
            false
        }
    }
}

/// HMAC-SHA-256 of the concatenation of `parts`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// SHA-256.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The SCRAM-SHA-256 credentials of one user: what the server needs to check a client proof
/// and to prove itself, without the password.
///
/// Stored as text in PostgreSQL's format, `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
/// with standard base64 (see [`fmt::Display`] and [`FromStr`]).
///
/// Whoever reads StoredKey and ServerKey from the database and also sees one exchange (or
/// plays the server) can log in as the user (RFC 5802 section 9), so they are secrets, as a
/// password hash is.
#[derive(Clone)]
pub struct ScramCredentials {
    /// The salt; random and 16 octets long for credentials made here.
    pub salt: Vec<u8>,
    /// The iteration count of Hi() (PBKDF2).
    pub iterations: u32,
    /// StoredKey := H(ClientKey).
    pub stored_key: [u8; 32],
    /// ServerKey := HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

impl ScramCredentials {
    /// The iteration count for new credentials. RFC 7677 section 3: "the hash iteration-count
    /// announced by a server SHOULD be at least 4096". Higher counts make a stolen database
    /// more expensive to attack but every login slower for the client, which does the work.
    pub const DEFAULT_ITERATIONS: u32 = 4096;

    /// The length of the salts made here.
    pub const SALT_LEN: usize = 16;

    /// Credentials for `password` with a random salt and [`Self::DEFAULT_ITERATIONS`].
    pub fn generate(password: &str) -> Result<ScramCredentials, CredentialError> {
        let salt: [u8; Self::SALT_LEN] = random_bytes()?;
        ScramCredentials::derive(password, &salt, Self::DEFAULT_ITERATIONS)
    }

    /// Credentials for `password` with the given salt and iteration count (RFC 5802
    /// section 3):
    ///
    /// ```text
    /// SaltedPassword  := Hi(Normalize(password), salt, i)
    /// ClientKey       := HMAC(SaltedPassword, "Client Key")
    /// StoredKey       := H(ClientKey)
    /// ServerKey       := HMAC(SaltedPassword, "Server Key")
    /// ```
    ///
    /// Normalize is [`saslprep`]. RFC 5802 section 2.2: "implementations MUST either implement
    /// SASLprep or disallow use of non US-ASCII Unicode codepoints".
    pub fn derive(
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Result<ScramCredentials, CredentialError> {
        if salt.is_empty() {
            return Err(CredentialError::InvalidParameters("empty SCRAM salt".to_owned()));
        }
        if iterations == 0 {
            return Err(CredentialError::InvalidParameters(
                "SCRAM iteration count must be positive".to_owned(),
            ));
        }
        let password = prepare_password(password)?;
        // Hi() is PBKDF2 with HMAC as the PRF and the hash's length as dkLen (RFC 5802 section
        // 2.2: "Hi() is, essentially, PBKDF2 [RFC2898] with HMAC() as the pseudorandom
        // function (PRF) and with dkLen == output length of HMAC() == output length of H()").
        let salted_password =
            pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password.as_bytes(), salt, iterations);
        let client_key = hmac_sha256(&salted_password, &[b"Client Key"]);
        Ok(ScramCredentials {
            salt: salt.to_vec(),
            iterations,
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted_password, &[b"Server Key"]),
        })
    }
}

const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";

impl fmt::Display for ScramCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCRAM_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }
}

impl FromStr for ScramCredentials {
    type Err = CredentialError;

    fn from_str(text: &str) -> Result<ScramCredentials, CredentialError> {
        let malformed = |reason: &str| CredentialError::Malformed {
            format: "SCRAM-SHA-256",
            reason: reason.to_owned(),
        };
        let rest =
            text.strip_prefix(SCRAM_PREFIX).ok_or_else(|| malformed("no SCRAM-SHA-256$ prefix"))?;
        let (parameters, keys) =
            rest.split_once('$').ok_or_else(|| malformed("no $ before the keys"))?;
        let (iterations, salt) = parameters
            .split_once(':')
            .ok_or_else(|| malformed("no : after the iteration count"))?;
        let (stored_key, server_key) =
            keys.split_once(':').ok_or_else(|| malformed("no : between the keys"))?;
        if iterations.is_empty()
            || !iterations.bytes().all(|b| b.is_ascii_digit())
            || iterations.starts_with('0')
        {
            return Err(malformed("iteration count is not a positive number"));
        }
        let iterations =
            iterations.parse().map_err(|_| malformed("iteration count is too large"))?;
        let salt = STANDARD.decode(salt).map_err(|_| malformed("salt is not base64"))?;
        if salt.is_empty() {
            return Err(malformed("salt is empty"));
        }
        let key = |encoded: &str, name: &str| -> Result<[u8; 32], CredentialError> {
            STANDARD
                .decode(encoded)
                .ok()
                .and_then(|key| <[u8; 32]>::try_from(key).ok())
                .ok_or_else(|| malformed(&format!("{name} is not 32 octets of base64")))
        };
        Ok(ScramCredentials {
            salt,
            iterations,
            stored_key: key(stored_key, "StoredKey")?,
            server_key: key(server_key, "ServerKey")?,
        })
    }
}

/// Shows the iteration count and salt length but not the keys.
impl fmt::Debug for ScramCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramCredentials")
            .field("salt_len", &self.salt.len())
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters: the hashing is the same, only faster.
    const CHEAP: Argon2Params = Argon2Params { memory_kib: 64, iterations: 1, parallelism: 1 };

    #[test]
    fn hash_and_verify_round_trip() {
        let hash = PasswordHash::hash_with("correct horse", CHEAP).unwrap();
        assert!(hash.as_str().starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{}", hash.as_str());
        assert!(hash.verify("correct horse"));
        assert!(!hash.verify("correct horse "));
        assert!(!hash.verify("Correct horse"));
        assert!(!hash.verify(""));
        let parsed: PasswordHash = hash.as_str().parse().unwrap();
        assert_eq!(parsed, hash);
        assert!(parsed.verify("correct horse"));
    }

    #[test]
    fn default_parameters_are_owasps() {
        let hash = PasswordHash::hash("pencil").unwrap();
        assert!(hash.as_str().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{}", hash.as_str());
        assert!(hash.verify("pencil"));
        assert!(verify_password(Some(&hash), "pencil"));
        assert!(!verify_password(Some(&hash), "pencils"));
        assert!(!verify_password(None, "pencil"));
        assert!(!verify_password(None, "dummy password"));
    }

    #[test]
    fn salts_differ() {
        let a = PasswordHash::hash_with("pencil", CHEAP).unwrap();
        let b = PasswordHash::hash_with("pencil", CHEAP).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn passwords_are_saslprepped_before_hashing() {
        // NO-BREAK SPACE and SOFT HYPHEN: the same password after SASLprep.
        let hash = PasswordHash::hash_with("pen\u{00A0}cil\u{00AD}", CHEAP).unwrap();
        assert!(hash.verify("pen cil"));
        assert!(matches!(
            PasswordHash::hash_with("\u{0007}bell", CHEAP),
            Err(CredentialError::UnusablePassword(_))
        ));
        assert!(matches!(
            PasswordHash::hash_with("", CHEAP),
            Err(CredentialError::UnusablePassword(_))
        ));
        let long = "a".repeat(MAX_PASSWORD_LEN + 1);
        assert!(matches!(
            PasswordHash::hash_with(&long, CHEAP),
            Err(CredentialError::UnusablePassword(_))
        ));
    }

    #[test]
    fn bad_parameters_are_refused() {
        let params = Argon2Params { memory_kib: 1, iterations: 1, parallelism: 1 };
        assert!(matches!(
            PasswordHash::hash_with("pencil", params),
            Err(CredentialError::InvalidParameters(_))
        ));
    }

    #[test]
    fn phc_parsing_accepts_only_argon2id_v19() {
        let good = PasswordHash::hash_with("pencil", CHEAP).unwrap();
        let argon2i = good.as_str().replace("$argon2id$", "$argon2i$");
        let v16 = good.as_str().replace("$v=19$", "$v=16$");
        let (no_hash, _) = good.as_str().rsplit_once('$').unwrap();
        for bad in [
            "",
            "pencil",
            "$argon2id$",
            &argon2i,
            &v16,
            no_hash,
            "$pbkdf2-sha256$i=1$c2FsdA$aGFzaA",
        ] {
            assert!(
                matches!(bad.parse::<PasswordHash>(), Err(CredentialError::Malformed { .. })),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn debug_hides_salt_and_hash() {
        let hash = PasswordHash::hash_with("pencil", CHEAP).unwrap();
        let shown = format!("{hash:?}");
        assert_eq!(shown, "PasswordHash(\"$argon2id$v=19$m=64,t=1,p=1\"…)");
        let credentials = ScramCredentials::derive("pencil", b"salt", 1).unwrap();
        let shown = format!("{credentials:?}");
        assert!(!shown.contains(&STANDARD.encode(credentials.stored_key)), "{shown}");
    }

    /// RFC 7677 section 3 gives the salt and the exchange; StoredKey and ServerKey follow
    /// from them, and the exchange test in `tests.rs` checks them against the RFC's proof.
    #[test]
    fn scram_credentials_match_the_rfc_7677_example() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let credentials = ScramCredentials::derive("pencil", &salt, 4096).unwrap();
        assert_eq!(
            credentials.to_string(),
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
             WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
             wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }

    #[test]
    fn scram_serialization_round_trips() {
        let credentials = ScramCredentials::generate("pencil").unwrap();
        assert_eq!(credentials.salt.len(), ScramCredentials::SALT_LEN);
        assert_eq!(credentials.iterations, 4096);
        let text = credentials.to_string();
        let parsed: ScramCredentials = text.parse().unwrap();
        assert_eq!(parsed.salt, credentials.salt);
        assert_eq!(parsed.iterations, credentials.iterations);
        assert_eq!(parsed.stored_key, credentials.stored_key);
        assert_eq!(parsed.server_key, credentials.server_key);
        assert_eq!(parsed.to_string(), text);
    }

    #[test]
    fn scram_parsing_refuses_malformed_strings() {
        let good = ScramCredentials::derive("pencil", b"salt", 4096).unwrap().to_string();
        let (keys_at, _) = good.rsplit_once('$').unwrap();
        for bad in [
            String::new(),
            good.replace("SCRAM-SHA-256$", "SCRAM-SHA-1$"),
            good.replace("$4096:", "$0:"),
            good.replace("$4096:", "$04096:"),
            good.replace("$4096:", "$-1:"),
            good.replace("$4096:", "$99999999999:"),
            good.replace("$4096:", "$:"),
            good.replace(":c2FsdA==$", ":$"),
            good.replace(":c2FsdA==$", ":c2FsdA$"),
            good.replacen('$', "", 2),
            format!("{keys_at}$AAAA:AAAA"),
            format!("{good}A"),
            good.replace(':', ";"),
        ] {
            assert!(
                matches!(bad.parse::<ScramCredentials>(), Err(CredentialError::Malformed { .. })),
                "{bad:?} was accepted"
            );
        }
        assert!(good.parse::<ScramCredentials>().is_ok());
    }

    #[test]
    fn scram_derivation_refuses_unusable_input() {
        assert!(ScramCredentials::derive("pencil", b"", 4096).is_err());
        assert!(ScramCredentials::derive("pencil", b"salt", 0).is_err());
        assert!(ScramCredentials::derive("", b"salt", 4096).is_err());
        assert!(ScramCredentials::derive("\u{E000}", b"salt", 4096).is_err());
    }
}

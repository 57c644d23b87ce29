//! SMTP AUTH on the server side: the accounts (from the configuration and from
//! `accounts.db`), the SASL settings, and the credential checks the `sasl` exchanges ask for.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use accounts::{Account, AccountDb, normalize_name};
use anyhow::{Context, bail};
use sasl::{CredentialRequest, Credentials, Mechanism, PasswordHash, ScramCredentials, Settings};
use tracing::warn;

use crate::config::AuthConfig;

/// The server-wide secret that makes the invented SCRAM salts of unknown users stable, so
/// that two attempts for the same unknown name look like two for a real one.
const SECRET_FILE: &str = "auth-secret";

pub struct Authenticator {
    pub settings: Arc<Settings>,
    /// The mechanisms offered, in the order given in the configuration.
    pub mechanisms: Vec<Mechanism>,
    /// Authenticated users may use only the sender addresses their account allows.
    pub restrict_senders: bool,
    configured: HashMap<String, Account>,
    db: Arc<AccountDb>,
    /// Password checks running at once. Each argon2id check takes 19 MiB and tens of
    /// milliseconds of CPU; without a bound, many connections trying passwords together
    /// could exhaust memory. One per core keeps the CPU busy and nothing more.
    hashing: tokio::sync::Semaphore,
}

impl Authenticator {
    pub fn new(
        config: &AuthConfig,
        hostname: &str,
        data_dir: &Path,
        db: AccountDb,
    ) -> anyhow::Result<Authenticator> {
        let mut mechanisms = Vec::new();
        for name in &config.mechanisms {
            let mechanism = Mechanism::from_name(name)
                .with_context(|| format!("auth.mechanisms: unknown mechanism {name:?}"))?;
            if mechanism == Mechanism::CramMd5 {
                // It needs the password itself on the server; accounts keep only hashes.
                bail!(
                    "auth.mechanisms: CRAM-MD5 needs stored plaintext passwords, which Postilion does not keep"
                );
            }
            mechanisms.push(mechanism);
        }
        let secret = load_secret(&data_dir.join(SECRET_FILE))?;
        let settings = Arc::new(Settings::new(hostname, secret));
        let mut configured = HashMap::new();
        for account in &config.accounts {
            let name = normalize_name(&account.name);
            if let Some(hash) = &account.password_hash {
                hash.parse::<PasswordHash>()
                    .with_context(|| format!("account {name}: password_hash is not argon2id"))?;
            }
            if let Some(scram) = &account.scram {
                scram
                    .parse::<ScramCredentials>()
                    .with_context(|| format!("account {name}: scram is not SCRAM-SHA-256 keys"))?;
            }
            configured.insert(
                name.clone(),
                Account {
                    name,
                    password_hash: account.password_hash.clone(),
                    scram: account.scram.clone(),
                    senders: account.senders.clone(),
                    enabled: true,
                },
            );
        }
        Ok(Authenticator {
            settings,
            mechanisms,
            restrict_senders: config.restrict_senders,
            configured,
            db: Arc::new(db),
            hashing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
        })
    }

    /// The enabled account of that name: the configuration's first, then the database's.
    pub async fn account(&self, name: &str) -> Option<Account> {
        let name = normalize_name(name);
        if let Some(account) = self.configured.get(&name) {
            return Some(account.clone());
        }
        let db = self.db.clone();
        let lookup = name.clone();
        match tokio::task::spawn_blocking(move || db.get(&lookup)).await {
            Ok(Ok(account)) => account.filter(|account| account.enabled),
            Ok(Err(error)) => {
                warn!(account = %name, %error, "cannot read the accounts database");
                None
            }
            Err(error) => {
                warn!(account = %name, %error, "account lookup failed");
                None
            }
        }
    }

    /// Answers what an exchange asks about a user, with the account looked up, which the
    /// session keeps should the exchange succeed. Unknown and disabled accounts look the
    /// same to the client as a wrong password.
    pub async fn credentials(&self, request: CredentialRequest) -> (Credentials, Option<Account>) {
        let account = self.account(request.authcid()).await;
        let credentials = match request {
            CredentialRequest::Password { password, .. } => {
                let hash = account
                    .as_ref()
                    .and_then(|account| account.password_hash.as_ref())
                    .and_then(|hash| hash.parse::<PasswordHash>().ok());
                // argon2 takes tens of milliseconds of CPU: off the I/O threads. An unknown
                // user still costs a hash, so the timing does not tell.
                let _slot = self.hashing.acquire().await;
                let verified = tokio::task::spawn_blocking(move || {
                    sasl::verify_password(hash.as_ref(), password.expose())
                })
                .await
                .unwrap_or(false);
                Credentials::PasswordVerified(verified)
            }
            CredentialRequest::Scram { .. } => Credentials::Scram(
                account.as_ref().and_then(|account| account.scram.as_ref()?.parse().ok()),
            ),
            CredentialRequest::CramMd5 { .. } => Credentials::CramMd5Secret(None),
        };
        (credentials, account)
    }
}

/// Reads the 32-octet secret, creating it (0600) on first start.
fn load_secret(path: &Path) -> anyhow::Result<[u8; 32]> {
    match std::fs::read(path) {
        Ok(bytes) => {
            bytes.try_into().map_err(|_| anyhow::anyhow!("{} is not 32 octets", path.display()))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).context("generating the authentication secret")?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.write_all(&secret).with_context(|| format!("writing {}", path.display()))?;
            file.sync_all().with_context(|| format!("syncing {}", path.display()))?;
            Ok(secret)
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfiguredAccount;

    fn authenticator(dir: &Path) -> Authenticator {
        let hash = PasswordHash::hash("configured pw").unwrap();
        let config = AuthConfig {
            accounts: vec![ConfiguredAccount {
                name: "App@Example.org".into(),
                password_hash: Some(hash.as_str().into()),
                scram: None,
                senders: vec!["*".into()],
            }],
            ..AuthConfig::default()
        };
        let db = AccountDb::open(&dir.join("accounts.db")).unwrap();
        db.put(&Account {
            name: "alice@example.org".into(),
            password_hash: Some(PasswordHash::hash("alice pw").unwrap().as_str().into()),
            scram: Some(ScramCredentials::generate("alice pw").unwrap().to_string()),
            senders: vec![],
            enabled: true,
        })
        .unwrap();
        db.put(&Account {
            name: "off@example.org".into(),
            password_hash: Some(PasswordHash::hash("off pw").unwrap().as_str().into()),
            scram: None,
            senders: vec![],
            enabled: false,
        })
        .unwrap();
        Authenticator::new(&config, "mx.test", dir, db).unwrap()
    }

    fn password(name: &str, password: &str) -> CredentialRequest {
        CredentialRequest::Password {
            authcid: name.into(),
            password: sasl::Password::new(password),
        }
    }

    #[tokio::test]
    async fn passwords_of_configured_and_stored_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authenticator(dir.path());
        let verified = |c| matches!(c, Credentials::PasswordVerified(true));
        assert!(verified(auth.credentials(password("alice@example.org", "alice pw")).await.0));
        assert!(!verified(auth.credentials(password("alice@example.org", "wrong")).await.0));
        assert!(verified(auth.credentials(password("app@example.org", "configured pw")).await.0));
        assert!(!verified(auth.credentials(password("off@example.org", "off pw")).await.0));
        assert!(!verified(auth.credentials(password("nobody@example.org", "x")).await.0));
        let scram = auth
            .credentials(CredentialRequest::Scram { authcid: "ALICE@example.org".into() })
            .await
            .0;
        assert!(matches!(scram, Credentials::Scram(Some(_))));
    }

    #[test]
    fn the_secret_is_kept_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SECRET_FILE);
        let first = load_secret(&path).unwrap();
        assert_eq!(load_secret(&path).unwrap(), first);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn cram_md5_and_unknown_mechanisms_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = AccountDb::open(&dir.path().join("accounts.db")).unwrap();
        let config = AuthConfig { mechanisms: vec!["CRAM-MD5".into()], ..AuthConfig::default() };
        assert!(Authenticator::new(&config, "mx.test", dir.path(), db).is_err());
        let db = AccountDb::open(&dir.path().join("accounts.db")).unwrap();
        let config = AuthConfig { mechanisms: vec!["GSSAPI".into()], ..AuthConfig::default() };
        assert!(Authenticator::new(&config, "mx.test", dir.path(), db).is_err());
    }
}

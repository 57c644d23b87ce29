//! `postilion user ...`: managing accounts from the command line. Passwords are read from
//! the terminal with echo off, or as one line from standard input when it is not a terminal
//! (for scripts); never from the command line, where other users could read them in the
//! process list.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use accounts::{Account, AccountDb, normalize_name};
use anyhow::{Context, bail};
use clap::Subcommand;
use sasl::{PasswordHash, ScramCredentials};

#[derive(Subcommand)]
pub enum UserCommand {
    /// Creates an account; the password comes from the terminal or standard input.
    Add {
        /// The login name, an address such as alice@example.org.
        name: String,
        /// A sender address the account may use (repeat for more). `@example.org` allows a
        /// whole domain, `*` any sender. Default: the login name only.
        #[arg(long = "sender")]
        senders: Vec<String>,
        /// Creates the account disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Sets a new password.
    Passwd { name: String },
    /// Lists the accounts: name, enabled or not, allowed senders.
    List,
    /// Deletes an account.
    Remove { name: String },
    /// Lets a disabled account log in again.
    Enable { name: String },
    /// Refuses every login of the account, keeping it.
    Disable { name: String },
}

/// The accounts database of a data directory.
pub fn database(data_dir: &Path) -> anyhow::Result<AccountDb> {
    crate::create_private_dir(data_dir)?;
    let path = data_dir.join("accounts.db");
    AccountDb::open(&path).with_context(|| format!("opening {}", path.display()))
}

pub fn run(command: UserCommand, data_dir: &Path) -> anyhow::Result<()> {
    let db = database(data_dir)?;
    match command {
        UserCommand::Add { name, senders, disabled } => {
            let name = checked_name(&name)?;
            if db.get(&name)?.is_some() {
                bail!("account {name} exists already; use `postilion user passwd`");
            }
            let password = read_password()?;
            let (password_hash, scram) = credentials(&password)?;
            db.put(&Account {
                name: name.clone(),
                password_hash,
                scram,
                senders,
                enabled: !disabled,
            })?;
            println!("account {name} added");
        }
        UserCommand::Passwd { name } => {
            let mut account = existing(&db, &name)?;
            let password = read_password()?;
            (account.password_hash, account.scram) = credentials(&password)?;
            db.put(&account)?;
            println!("password of {} changed", account.name);
        }
        UserCommand::List => {
            for account in db.list()? {
                let senders = match account.senders.is_empty() {
                    true => account.name.clone(),
                    false => account.senders.join(","),
                };
                let state = if account.enabled { "enabled" } else { "disabled" };
                println!("{}\t{state}\t{senders}", account.name);
            }
        }
        UserCommand::Remove { name } => {
            db.remove(&name)?;
            println!("account {} removed", normalize_name(&name));
        }
        UserCommand::Enable { name } => set_enabled(&db, &name, true)?,
        UserCommand::Disable { name } => set_enabled(&db, &name, false)?,
    }
    Ok(())
}

fn set_enabled(db: &AccountDb, name: &str, enabled: bool) -> anyhow::Result<()> {
    let mut account = existing(db, name)?;
    account.enabled = enabled;
    db.put(&account)?;
    println!("account {} {}", account.name, if enabled { "enabled" } else { "disabled" });
    Ok(())
}

fn existing(db: &AccountDb, name: &str) -> anyhow::Result<Account> {
    db.get(name)?.with_context(|| format!("no account {}", normalize_name(name)))
}

/// A login name must be usable in SMTP AUTH and logs: an address-like string without
/// spaces or control characters.
fn checked_name(name: &str) -> anyhow::Result<String> {
    let name = normalize_name(name);
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("{name:?} cannot be a login name");
    }
    Ok(name)
}

/// Both stored forms of a password: argon2id for PLAIN and LOGIN, SCRAM keys for
/// SCRAM-SHA-256. Neither can be turned back into the password.
fn credentials(password: &str) -> anyhow::Result<(Option<String>, Option<String>)> {
    let hash = PasswordHash::hash(password).context("hashing the password")?;
    let scram = ScramCredentials::generate(password).context("deriving SCRAM credentials")?;
    Ok((Some(hash.as_str().to_string()), Some(scram.to_string())))
}

fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let password = if stdin.is_terminal() {
        let first = prompt_hidden("Password: ")?;
        let second = prompt_hidden("Again: ")?;
        if first != second {
            bail!("the passwords differ");
        }
        first
    } else {
        let mut line = String::new();
        stdin.lock().read_line(&mut line).context("reading the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if password.is_empty() {
        bail!("empty password");
    }
    Ok(password)
}

/// Reads a line from the terminal with echo turned off, restoring the terminal after.
fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    eprint!("{prompt}");
    std::io::stderr().flush().ok();
    let saved = tcgetattr(&stdin).context("reading the terminal settings")?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    tcsetattr(&stdin, OptionalActions::Now, &quiet).context("turning off echo")?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let restored = tcsetattr(&stdin, OptionalActions::Now, &saved);
    eprintln!();
    read.context("reading the password")?;
    restored.context("restoring the terminal")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

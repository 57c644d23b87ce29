//! `postilion queue`: the queue as the spool holds it, read while the server runs.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use smtp_proto::trace::rfc5322_date_at as date;
use spool::{QueuedMessage, RecipientStatus, SqliteSpool};

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Every message with its sender and each recipient's state, oldest first.
    List,
    /// How many messages are in the queue.
    Count,
}

pub fn run(command: QueueCommand, data_dir: &Path) -> anyhow::Result<()> {
    let spool_dir = data_dir.join("spool");
    let queue = SqliteSpool::read_queue(&spool_dir)
        .with_context(|| format!("reading the queue in {}", spool_dir.display()))?;
    match command {
        QueueCommand::Count => println!("{}", queue.len()),
        QueueCommand::List => {
            let mut out = String::new();
            for message in &queue {
                describe(message, &mut out);
            }
            let _ =
                writeln!(out, "{} message{}", queue.len(), if queue.len() == 1 { "" } else { "s" });
            print!("{out}");
        }
    }
    Ok(())
}

fn describe(message: &QueuedMessage, out: &mut String) {
    let _ = writeln!(
        out,
        "{}  {} octets  {}  from <{}>",
        message.id,
        message.size,
        date(message.envelope.received_at),
        message.envelope.sender
    );
    for recipient in &message.recipients {
        let state = match &recipient.status {
            RecipientStatus::Pending => "pending".to_string(),
            RecipientStatus::Deferred { attempts, next_attempt, last_error, .. } => format!(
                "deferred after {attempts} attempt{}, next {}: {last_error}",
                if *attempts == 1 { "" } else { "s" },
                date(*next_attempt)
            ),
            RecipientStatus::Delivered { at, detail } => {
                format!("delivered {}: {detail}", date(*at))
            }
            RecipientStatus::Failed { at, error } => format!("failed {}: {error}", date(*at)),
        };
        let _ = writeln!(out, "    <{}>  {state}", recipient.address);
    }
}

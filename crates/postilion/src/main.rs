//! Postilion, a mail transfer agent.

mod admission;
mod auth;
mod config;
mod conn;
mod delivery;
mod limits;
mod log;
mod notify;
mod outbound;
mod privileges;
mod queue_listing;
mod router;
mod server;
mod slots;
mod tls;
mod users;

/// Messages are allocated by the session that receives them and freed by the spool's writer
/// thread; the C library's allocator returned that memory to the kernel (madvise) from the
/// writer's thread again and again, and each return stopped the other CPUs to flush their
/// TLBs. mimalloc keeps freed memory for reuse across threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spool::{QueueStore, SqliteSpool};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::server::{ConnectionLimiter, Server};

#[derive(Parser)]
#[command(name = "postilion", version, about = "Postilion mail transfer agent")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Runs the server. Without --config: listens on 127.0.0.1:2525 and accepts mail for
    /// `localhost`, every local part its own mailbox.
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (spool, Maildirs, generated TLS key); overrides `data_dir`.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Checks a configuration file and exits.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Shows the mail queue (read from <data_dir>/spool; the server may be running).
    Queue {
        #[command(subcommand)]
        command: queue_listing::QueueCommand,
        /// The configuration file whose data_dir to use.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// The data directory; overrides the configuration's.
        #[arg(long, global = true)]
        data: Option<PathBuf>,
    },
    /// Manages the accounts that may authenticate (kept in <data_dir>/accounts.db).
    User {
        #[command(subcommand)]
        command: users::UserCommand,
        /// The configuration file whose data_dir to use.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// The data directory; overrides the configuration's.
        #[arg(long, global = true)]
        data: Option<PathBuf>,
    },
}

/// The data directory a command works on: given, from the configuration file, or the
/// default.
fn data_dir(data: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match (data, config) {
        (Some(data), _) => data,
        (None, Some(path)) => Config::load(&path)?.data_dir,
        (None, None) => Config::default().data_dir,
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log = log::LogSink::stderr();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POSTILION_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(log.clone())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Commands::CheckConfig { config } => {
            Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Commands::User { command, config, data } => users::run(command, &data_dir(data, config)?),
        Commands::Queue { command, config, data } => {
            queue_listing::run(command, &data_dir(data, config)?)
        }
        Commands::Serve { config, data } => {
            let mut config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::default(),
            };
            if let Some(data) = data {
                config.data_dir = data;
            }
            let sockets = server::bind_sockets(&config)?;
            if privileges::running_as_root() {
                match &config.user {
                    Some(user) => {
                        let account = privileges::lookup(user)?;
                        create_private_dir(&config.data_dir)?;
                        privileges::hand_over(&config.data_dir, account)?;
                        if let Err(error) =
                            privileges::allow_priority_boost(spool::THREAD_PRIORITY_BOOST)
                        {
                            info!(
                                error = format!("{error:#}"),
                                "the spool threads will run at the server's priority"
                            );
                        }
                        // Before the runtime starts any thread.
                        privileges::become_user(account)?;
                        info!(user = %user, uid = account.uid, gid = account.gid, "privileges dropped");
                    }
                    None => warn!("running as root; set `user` to drop privileges after binding"),
                }
            }
            // After the privileges are dropped, like every other thread. Dropped last, so the
            // runtime's threads are gone before the remaining lines are written out.
            let _log_thread = log.start().context("starting the log thread")?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(serve(config, sockets))
        }
    }
}

async fn serve(config: Config, sockets: Vec<std::net::TcpListener>) -> anyhow::Result<()> {
    create_private_dir(&config.data_dir)?;
    let data_dir = config.data_dir.canonicalize().context("resolving the data directory")?;
    let spool: Arc<dyn QueueStore> =
        Arc::new(SqliteSpool::open(&data_dir.join("spool")).with_context(|| {
            format!("opening the spool in {}", data_dir.join("spool").display())
        })?);
    let router = Arc::new(router::Router::new(&config.local)?);
    let needs_tls = config.listeners.iter().any(|l| l.tls() != config::TlsMode::None);
    let tls = match needs_tls {
        true => Some(tls::server_config(
            config.tls.certificate.as_deref(),
            config.tls.private_key.as_deref(),
            &data_dir,
            &config.hostname,
        )?),
        false => None,
    };
    let (shutdown_tx, shutdown) = watch::channel(false);
    let maildir_root = data_dir.join("maildir");
    create_private_dir(&maildir_root)?;
    let outbound = Arc::new(
        outbound::Outbound::new(config.outbound.clone(), &config.dns, &config.hostname)
            .context("setting up outbound delivery")?,
    );
    // With idle_timeout = 0 nothing is ever pooled, so there is nothing to reap.
    if let Some(interval) = outbound.reap_interval() {
        let outbound = outbound.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                outbound.reap_idle().await;
            }
        });
    }
    let notifier = Arc::new(notify::Notifier {
        hostname: config.hostname.clone(),
        return_size_limit: usize::try_from(config.delivery.bounce_size_limit).unwrap_or(usize::MAX),
        delay_by_default: config.delivery.delay_warning_by_default,
    });
    let (delivery_queue, delivery_done) = delivery::start(
        delivery::Deliverer {
            spool: spool.clone(),
            router: router.clone(),
            maildir: maildir::MaildirRoot::new(maildir_root),
            config: config.delivery.clone(),
            outbound: outbound.clone(),
            notifier: notifier.clone(),
        },
        shutdown.clone(),
    )?;
    let recovered =
        delivery::recover(spool.as_ref(), &delivery_queue).await.context("recovering the queue")?;
    let authenticator = match config.listeners.iter().any(|l| l.offers_auth()) {
        true => Some(auth::Authenticator::new(
            &config.auth,
            &config.hostname,
            &data_dir,
            users::database(&data_dir)?,
        )?),
        false => None,
    };
    let mechanisms: Vec<String> = authenticator
        .iter()
        .flat_map(|a| a.mechanisms.iter().map(|m| m.name().to_string()))
        .collect();
    let listeners = server::listeners(&config, sockets, tls, &mechanisms)?;
    println!("data directory {}", data_dir.display());
    info!(recovered, hostname = %config.hostname, data_dir = %data_dir.display(), "postilion started");
    let grace = config.timeouts.shutdown_grace;
    let server = Arc::new(Server {
        limiter: ConnectionLimiter::new(
            config.limits.connections,
            config.limits.connections_per_ip,
        ),
        router: router.clone(),
        abuse: limits::Limiter::new(config.abuse.clone()),
        notifier,
        authenticator,
        config,
        spool: spool.clone(),
        delivery: delivery_queue,
        shutdown,
        free_space: server::FreeSpace::new(
            std::fs::File::open(&data_dir)
                .with_context(|| format!("opening {}", data_dir.display()))?,
        ),
    });
    let serving = tokio::spawn(server::run(server, listeners));
    wait_for_signal().await;
    info!(
        "shutting down: no new connections; messages in progress have {}s to finish",
        grace.as_secs()
    );
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(grace + Duration::from_secs(5), serving).await.is_err() {
        warn!("sessions still open after the grace period; closing them");
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), delivery_done).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), outbound.close_idle()).await;
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            warn!(%error, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Creates a directory only the server's user can read (0700).
pub(crate) fn create_private_dir(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(())
}

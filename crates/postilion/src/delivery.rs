//! Local delivery: a pool of workers takes queued messages, writes each pending recipient's
//! copy into its Maildir, records the outcome per recipient durably, and removes the message
//! once every recipient is done. Temporary failures are retried with exponential backoff.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use maildir::MaildirRoot;
use spool::{Envelope, QueueId, QueueStore, Recipient, RecipientStatus};
use tokio::sync::{Mutex, mpsc, watch};
use tracing::{error, info, warn};

use crate::config::DeliveryConfig;
use crate::router::Router;

/// One message with the recipients it still has to reach.
struct Job {
    id: QueueId,
    envelope: Arc<Envelope>,
    recipients: Vec<Recipient>,
}

/// Where accepted messages are handed to delivery.
#[derive(Clone)]
pub struct DeliveryQueue {
    jobs: mpsc::UnboundedSender<Job>,
}

impl DeliveryQueue {
    /// Queues a freshly stored message for delivery.
    pub fn submit(&self, id: QueueId, envelope: Envelope, recipients: Vec<Recipient>) {
        let _ = self.jobs.send(Job { id, envelope: Arc::new(envelope), recipients });
    }
}

/// Everything a worker needs.
pub struct Deliverer {
    pub spool: Arc<dyn QueueStore>,
    pub router: Arc<Router>,
    pub maildir: MaildirRoot,
    pub config: DeliveryConfig,
}

/// Starts the workers and returns the queue feeding them; the returned handle finishes when
/// shutdown is signalled and in-flight deliveries are done.
pub fn start(
    deliverer: Deliverer,
    shutdown: watch::Receiver<bool>,
) -> (DeliveryQueue, tokio::task::JoinHandle<()>) {
    let (jobs, receiver) = mpsc::unbounded_channel::<Job>();
    let queue = DeliveryQueue { jobs };
    let receiver = Arc::new(Mutex::new(receiver));
    let deliverer = Arc::new(deliverer);
    let mut workers = Vec::new();
    for _ in 0..deliverer.config.workers {
        let receiver = receiver.clone();
        let deliverer = deliverer.clone();
        let queue = queue.clone();
        let mut shutdown = shutdown.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let job = tokio::select! {
                    job = async { receiver.lock().await.recv().await } => job,
                    _ = async { let _ = shutdown.wait_for(|stopping| *stopping).await; } => None,
                };
                let Some(job) = job else { break };
                deliverer.deliver(job, &queue).await;
            }
        }));
    }
    let handle = tokio::spawn(async move {
        for worker in workers {
            let _ = worker.await;
        }
    });
    (queue, handle)
}

/// Re-queues everything the spool holds after a restart, keeping each retry schedule.
pub async fn recover(spool: &dyn QueueStore, queue: &DeliveryQueue) -> anyhow::Result<usize> {
    let messages = spool.list().await?;
    let count = messages.len();
    for message in messages {
        let job = Job {
            id: message.id,
            envelope: Arc::new(message.envelope),
            recipients: message.recipients,
        };
        match next_attempt(&job.recipients) {
            // Crashed between the last outcome and the removal: finish the removal.
            None => spool.remove(job.id).await?,
            Some(at) => queue.schedule(job, at),
        }
    }
    Ok(count)
}

impl DeliveryQueue {
    /// Queues a job now or at `at`.
    fn schedule(&self, job: Job, at: SystemTime) {
        let delay = at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        if delay.is_zero() {
            let _ = self.jobs.send(job);
            return;
        }
        let jobs = self.jobs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = jobs.send(job);
        });
    }
}

/// The earliest time a non-final recipient is due, or None when all are final.
fn next_attempt(recipients: &[Recipient]) -> Option<SystemTime> {
    recipients
        .iter()
        .filter_map(|r| match &r.status {
            RecipientStatus::Pending => Some(SystemTime::UNIX_EPOCH),
            RecipientStatus::Deferred { next_attempt, .. } => Some(*next_attempt),
            RecipientStatus::Delivered { .. } | RecipientStatus::Failed { .. } => None,
        })
        .min()
}

/// Delay before attempt `attempts + 1`: `initial * 2^attempts`, capped at `max`.
pub fn backoff(initial: Duration, max: Duration, attempts: u32) -> Duration {
    initial.saturating_mul(1u32.checked_shl(attempts).unwrap_or(u32::MAX)).min(max)
}

impl Deliverer {
    async fn deliver(&self, mut job: Job, queue: &DeliveryQueue) {
        let now = SystemTime::now();
        let due: Vec<usize> = job
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| match &r.status {
                RecipientStatus::Pending => true,
                RecipientStatus::Deferred { next_attempt, .. } => *next_attempt <= now,
                _ => false,
            })
            .map(|(i, _)| i)
            .collect();
        if due.is_empty() {
            if let Some(at) = next_attempt(&job.recipients) {
                queue.schedule(job, at);
            }
            return;
        }
        let content = match self.spool.load_content(job.id).await {
            Ok(content) => Arc::new(content),
            Err(error) => {
                error!(queue_id = %job.id, %error, "cannot read message from the spool; retrying later");
                queue.schedule(job, now + self.config.retry_initial);
                return;
            }
        };
        let updates = self.deliver_local(&job, &due, content).await;
        for (index, status) in &updates {
            job.recipients[*index].status = status.clone();
        }
        let result = match next_attempt(&job.recipients) {
            None => self.spool.remove(job.id).await,
            Some(_) => self.spool.update_recipients(job.id, updates).await,
        };
        if let Err(error) = result {
            // The outcome is not durable: deliveries that succeeded may be repeated after a
            // restart, which is the lesser evil than losing mail.
            error!(queue_id = %job.id, %error, "cannot record delivery results");
        }
        if let Some(at) = next_attempt(&job.recipients) {
            queue.schedule(job, at);
        }
    }

    /// Writes each due recipient's copy; returns the new status of each.
    async fn deliver_local(
        &self,
        job: &Job,
        due: &[usize],
        content: Arc<Vec<u8>>,
    ) -> Vec<(usize, RecipientStatus)> {
        let plan: Vec<(usize, String, Option<String>)> = due
            .iter()
            .map(|&i| {
                let address = job.recipients[i].address.clone();
                let mailbox = self.router.mailbox_for(&address);
                (i, address, mailbox)
            })
            .collect();
        let maildir = self.maildir.clone();
        let sender = job.envelope.sender.clone();
        let written = tokio::task::spawn_blocking(move || {
            plan.into_iter()
                .map(|(i, address, mailbox)| {
                    let result = match &mailbox {
                        // RFC 5321 section 4.4: the final delivery adds Return-Path with the
                        // envelope sender.
                        Some(mailbox) => {
                            let prefix =
                                format!("Return-Path: <{sender}>\r\nDelivered-To: {address}\r\n");
                            maildir
                                .deliver(mailbox, prefix.as_bytes(), &content)
                                .map_err(|e| (e.is_transient(), e.to_string()))
                        }
                        None => Err((false, "5.1.1 mailbox no longer exists".to_string())),
                    };
                    (i, address, result)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let written = match written {
            Ok(written) => written,
            Err(error) => {
                error!(queue_id = %job.id, %error, "delivery task failed");
                return Vec::new();
            }
        };
        let now = SystemTime::now();
        written
            .into_iter()
            .map(|(i, address, result)| {
                let status = match result {
                    Ok(path) => {
                        info!(queue_id = %job.id, recipient = %address, path = %path.display(), result = "delivered", "delivered to maildir");
                        RecipientStatus::Delivered { at: now, detail: "delivered to maildir".into() }
                    }
                    Err((transient, why)) => self.failure(job, i, &address, transient, why, now),
                };
                (i, status)
            })
            .collect()
    }

    fn failure(
        &self,
        job: &Job,
        index: usize,
        address: &str,
        transient: bool,
        why: String,
        now: SystemTime,
    ) -> RecipientStatus {
        let attempts = match &job.recipients[index].status {
            RecipientStatus::Deferred { attempts, .. } => attempts + 1,
            _ => 1,
        };
        let age = now.duration_since(job.envelope.received_at).unwrap_or_default();
        if transient && age < self.config.max_lifetime {
            let delay = backoff(self.config.retry_initial, self.config.retry_max, attempts - 1);
            warn!(queue_id = %job.id, recipient = %address, attempts, retry_in = delay.as_secs(), error = %why, result = "deferred", "delivery deferred");
            RecipientStatus::Deferred { attempts, next_attempt: now + delay, last_error: why }
        } else {
            error!(queue_id = %job.id, recipient = %address, attempts, error = %why, result = "failed", "delivery failed");
            RecipientStatus::Failed { at: now, error: why }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let initial = Duration::from_secs(60);
        let max = Duration::from_secs(3600);
        assert_eq!(backoff(initial, max, 0), Duration::from_secs(60));
        assert_eq!(backoff(initial, max, 1), Duration::from_secs(120));
        assert_eq!(backoff(initial, max, 5), Duration::from_secs(1920));
        assert_eq!(backoff(initial, max, 6), max);
        assert_eq!(backoff(initial, max, 200), max);
    }

    #[test]
    fn next_attempt_ignores_final_recipients() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let recipient = |status| Recipient {
            address: "a@b".into(),
            original: "a@b".into(),
            notify: None,
            orcpt: None,
            status,
        };
        let done = recipient(RecipientStatus::Delivered { at, detail: String::new() });
        assert_eq!(next_attempt(std::slice::from_ref(&done)), None);
        let later = recipient(RecipientStatus::Deferred {
            attempts: 1,
            next_attempt: at,
            last_error: String::new(),
        });
        assert_eq!(next_attempt(&[done.clone(), later.clone()]), Some(at));
        assert_eq!(
            next_attempt(&[later, recipient(RecipientStatus::Pending)]),
            Some(SystemTime::UNIX_EPOCH)
        );
    }
}

//! The queue manager: takes queued messages, delivers each due recipient (to its Maildir, or
//! over SMTP to the next hop), records the outcome per recipient durably, queues the
//! delivery status notifications the outcomes call for, and removes the message once every
//! recipient is done. Temporary failures are retried with exponential backoff until
//! `delivery.max_lifetime`.
//!
//! A notification and the outcome that caused it are recorded in one spool transaction, so
//! a crash never loses one and never records a delivery whose notification is missing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use maildir::MaildirRoot;
use smtp_proto::EnhancedStatus;
use spool::{Envelope, QueueId, QueueStore, Recipient, RecipientStatus};
use tokio::sync::{OnceCell, Semaphore, SemaphorePermit, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::admission::{Admission, Lane, LaneLimits};
use crate::config::DeliveryConfig;
use crate::notify::Notifier;
use crate::outbound::Outbound;
use crate::router::{Destination, Router};
use crate::slots::{KeyedPermit, KeyedSlots};

/// Which recipients of a job an attempt is for, decided before it waits for its slots.
struct Plan {
    due: Vec<usize>,
    /// The local recipients, each with its mailbox (`None`: it no longer exists).
    local: Vec<(usize, Option<String>)>,
    remote: Vec<usize>,
}

impl Plan {
    /// The one lane the attempt delivers in, if it delivers in one only: every due
    /// recipient in the same mailbox, or every one in the same remote domain.
    fn lane(&self, job: &Job) -> Option<Lane> {
        match (self.local.as_slice(), self.remote.as_slice()) {
            ([(_, Some(first)), rest @ ..], []) => rest
                .iter()
                .all(|(_, mailbox)| mailbox.as_ref() == Some(first))
                .then(|| Lane::Mailbox(first.clone())),
            ([], [first, rest @ ..]) => {
                let domain = domain_of(&job.recipients[*first].address);
                rest.iter()
                    .all(|&i| domain_of(&job.recipients[i].address) == domain)
                    .then_some(Lane::Domain(domain))
            }
            _ => None,
        }
    }
}

/// A job's place in its lane, given back to the dispatcher when its deliveries are done, or
/// when the attempt ends otherwise. `None`: the job did not wait for a lane.
struct Admitted {
    lane: Option<Lane>,
    done: mpsc::UnboundedSender<Lane>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(lane) = self.lane.take() {
            let _ = self.done.send(lane);
        }
    }
}

/// The content of an attempt's message, shared by its local and remote parts: read once,
/// by the first part that needs it.
#[derive(Clone, Copy)]
struct Loaded<'a> {
    cell: &'a OnceCell<Arc<Vec<u8>>>,
    /// The content kept from acceptance, if any; otherwise it is read from the spool.
    preloaded: Option<&'a Arc<Vec<u8>>>,
}

/// One message with the recipients it still has to reach.
struct Job {
    id: QueueId,
    envelope: Arc<Envelope>,
    recipients: Vec<Recipient>,
    /// The content, when the job came straight from acceptance; otherwise it is read from
    /// the spool when the attempt starts.
    preloaded: Option<Preloaded>,
}

/// At most this many octets of content wait in memory for their first delivery attempt; past
/// it, messages are read back from the spool. A burst of large messages then waits on disk,
/// where it already is, not in memory.
const PRELOAD_BUDGET: usize = 16 << 20;

/// The content of a message just accepted, kept for its first delivery attempt: reading it
/// back from the spool costs a hand-off to a blocking thread and a database read per message.
/// It is the copy the spool stored, shared, not another.
pub struct Preloaded {
    content: Arc<Vec<u8>>,
    held: Arc<AtomicUsize>,
}

impl Drop for Preloaded {
    fn drop(&mut self) {
        self.held.fetch_sub(self.content.len(), Ordering::Relaxed);
    }
}

/// The result of one delivery attempt to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered {
        /// What the receiving side said, for logs and the queue.
        detail: String,
        /// The SMTP server that took the message; `None` for local delivery.
        remote_host: Option<String>,
        /// The next hop was told the DSN parameters (RFC 3461), so notifications from here on
        /// are its business.
        dsn_passed_on: bool,
    },
    Failed {
        permanent: bool,
        status: EnhancedStatus,
        /// Our description of what went wrong.
        reason: String,
        /// The remote server's reply, for the Diagnostic-Code of a notification.
        remote_reply: Option<String>,
        remote_host: Option<String>,
    },
}

impl Attempt {
    pub fn failed(permanent: bool, status: EnhancedStatus, reason: impl Into<String>) -> Attempt {
        Attempt::Failed {
            permanent,
            status,
            reason: reason.into(),
            remote_reply: None,
            remote_host: None,
        }
    }
}

/// A job for the dispatcher: due now, or at the given time.
type Queued = (Job, Option<tokio::time::Instant>);

/// Where accepted messages are handed to delivery.
#[derive(Clone)]
pub struct DeliveryQueue {
    jobs: mpsc::UnboundedSender<Queued>,
    /// Octets held by [`Preloaded`] contents.
    preloaded: Arc<AtomicUsize>,
}

impl DeliveryQueue {
    /// The content, shared, kept for the message's first delivery attempt if the budget
    /// allows.
    pub fn preload(&self, content: &Arc<Vec<u8>>) -> Option<Preloaded> {
        let held = self.preloaded.fetch_add(content.len(), Ordering::Relaxed);
        if held + content.len() > PRELOAD_BUDGET {
            self.preloaded.fetch_sub(content.len(), Ordering::Relaxed);
            return None;
        }
        Some(Preloaded { content: content.clone(), held: self.preloaded.clone() })
    }

    /// Queues a freshly stored message for delivery.
    pub fn submit(
        &self,
        id: QueueId,
        envelope: Envelope,
        recipients: Vec<Recipient>,
        preloaded: Option<Preloaded>,
    ) {
        let job = Job { id, envelope: Arc::new(envelope), recipients, preloaded };
        let _ = self.jobs.send((job, None));
    }

    /// Queues a job now or at `at`; until then it waits in the dispatcher as data.
    fn schedule(&self, mut job: Job, at: SystemTime) {
        let delay = at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        if delay.is_zero() {
            let _ = self.jobs.send((job, None));
            return;
        }
        // A retry later reads the content again rather than hold it meanwhile.
        job.preloaded = None;
        let _ = self.jobs.send((job, Some(tokio::time::Instant::now() + delay)));
    }
}

/// How many jobs may deliver at once, locally and over SMTP, and the threads that write
/// the local copies.
struct Slots {
    local: Semaphore,
    /// `delivery.mailbox_concurrency` per mailbox, taken before `local`: a flood of mail
    /// into one mailbox keeps at most that many of the local slots, and the other mailboxes'
    /// mail goes past it instead of waiting behind the whole flood.
    mailboxes: KeyedSlots,
    remote: Semaphore,
    maildir_writers: MaildirWriters,
}

impl Slots {
    /// Waits for the slots of a job's local part, whose recipients are in `mailboxes`: its
    /// mailboxes' slots (see [`KeyedSlots::acquire_all`]), then a local slot, so that a job
    /// waiting for a mailbox holds no local slot meanwhile. The remote part takes its slot
    /// apart from these, so neither part waits holding the other's slots.
    async fn take_local(&self, mailboxes: &[&str]) -> LocalSlots<'_> {
        let mailboxes = self.mailboxes.acquire_all(mailboxes).await;
        let local = self.local.acquire().await.ok();
        LocalSlots { _mailboxes: mailboxes, _local: local }
    }
}

/// A job's local slots, given back when dropped.
struct LocalSlots<'a> {
    _mailboxes: Vec<KeyedPermit>,
    _local: Option<SemaphorePermit<'a>>,
}

/// How much less CPU share the Maildir writers get than the rest of the server (added to its
/// nice value, up to 19): a thread at nice 10 gets about a tenth of the share of one at 0
/// when both want the CPU, and all of it when nothing else does.
const MAILDIR_WRITER_NICE: i32 = 10;

/// The threads that write Maildir copies (`delivery.workers` of them), at a lower CPU
/// priority than the SMTP sessions and the spool. Writing a copy costs the kernel several
/// times the CPU of accepting the message (an inode, the data, two fsyncs); at a lower
/// priority that work yields to clients waiting for a reply when the CPUs are busy, and a
/// burst of mail is accepted at full speed and delivered right after it, from the spool.
/// When the CPUs are not all busy, the priority changes nothing.
struct MaildirWriters {
    work: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl MaildirWriters {
    fn start(threads: usize) -> anyhow::Result<MaildirWriters> {
        let (work, queue) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for number in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new().name(format!("maildir-{number}")).spawn(move || {
                // Linux: the "process" of getpriority(2) and setpriority(2) is the calling
                // thread here. Relative to the server's own nice value, at most 19.
                let lowered = rustix::process::getpriority_process(None).and_then(|nice| {
                    rustix::process::setpriority_process(None, (nice + MAILDIR_WRITER_NICE).min(19))
                });
                if let Err(error) = lowered {
                    warn!(%error, "cannot lower the priority of a Maildir writer thread");
                }
                loop {
                    // The lock is held only while waiting, never while working.
                    let next = queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).recv();
                    match next {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })?;
        }
        Ok(MaildirWriters { work })
    }

    /// Runs `write` on a writer thread; `None` if it could not run (the threads are gone).
    async fn run<T: Send + 'static>(
        &self,
        write: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (result, receiver) = tokio::sync::oneshot::channel();
        let job = Box::new(move || {
            let _ = result.send(write());
        });
        self.work.send(job).ok()?;
        receiver.await.ok()
    }
}

/// Everything the queue manager needs.
pub struct Deliverer {
    pub spool: Arc<dyn QueueStore>,
    pub router: Arc<Router>,
    pub maildir: MaildirRoot,
    pub config: DeliveryConfig,
    pub outbound: Arc<Outbound>,
    pub notifier: Arc<Notifier>,
}

/// Starts the queue manager and returns the queue feeding it; the returned handle finishes
/// when shutdown is signalled and the deliveries in progress are done.
pub fn start(
    deliverer: Deliverer,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(DeliveryQueue, tokio::task::JoinHandle<()>)> {
    let (jobs, mut receiver) = mpsc::unbounded_channel::<Queued>();
    let queue = DeliveryQueue { jobs, preloaded: Arc::new(AtomicUsize::new(0)) };
    let deliverer = Arc::new(deliverer);
    // Separate bounds for local and remote work, so slow remote hosts never hold up local
    // delivery or bounces; a job waits for its slots before it loads the message, so waiting
    // jobs cost no more than their envelope.
    let slots = Arc::new(Slots {
        local: Semaphore::new(deliverer.config.workers),
        mailboxes: KeyedSlots::new(deliverer.config.mailbox_concurrency),
        remote: Semaphore::new(deliverer.outbound.concurrency()),
        maildir_writers: MaildirWriters::start(deliverer.config.workers)?,
    });
    // Each lane admits twice its slots: those delivering, and as many ready to follow.
    let limits = LaneLimits {
        mailbox: 2 * deliverer.config.mailbox_concurrency,
        domain: 2 * deliverer.outbound.destination_concurrency(),
    };
    let handle = {
        let queue = queue.clone();
        let mut shutdown = shutdown;
        tokio::spawn(async move {
            let mut running = JoinSet::new();
            let mut admission = Admission::new(limits);
            let (done, mut left) = mpsc::unbounded_channel::<Lane>();
            let stopping = shutdown.clone();
            let spawn = |running: &mut JoinSet<()>, (job, plan): (Job, Plan), lane| {
                let deliverer = deliverer.clone();
                let queue = queue.clone();
                let slots = slots.clone();
                let admitted = Admitted { lane, done: done.clone() };
                let mut stopping = stopping.clone();
                running.spawn(async move {
                    // A job still waiting for a slot at shutdown stays in the spool for the
                    // next start.
                    tokio::select! {
                        _ = deliverer.attempt(job, plan, admitted, &queue, &slots) => {}
                        _ = async { let _ = stopping.wait_for(|stopping| *stopping).await; } => {}
                    }
                });
            };
            // A job that is due: planned, then run now or queued in its lane.
            let dispatch =
                |job: Job, admission: &mut Admission<(Job, Plan)>, running: &mut JoinSet<()>| {
                    let Some(plan) = deliverer.plan(&job) else {
                        if let Some(at) = next_attempt(&job.recipients) {
                            queue.schedule(job, at);
                        }
                        return;
                    };
                    // See the admission module for jobs of several lanes.
                    match plan.lane(&job) {
                        Some(lane) => {
                            if let Some(job) = admission.offer((job, plan), &lane) {
                                spawn(running, job, Some(lane));
                            }
                        }
                        None => spawn(running, (job, plan), None),
                    }
                };
            // Retries and recovered jobs not yet due, by time and then arrival (which also
            // makes the keys unique), and the timer for the first of them.
            let mut later: BTreeMap<(tokio::time::Instant, u64), Job> = BTreeMap::new();
            let mut arrivals = 0u64;
            let timer = tokio::time::sleep(Duration::ZERO);
            tokio::pin!(timer);
            loop {
                if let Some((&(first, _), _)) = later.first_key_value()
                    && timer.deadline() != first
                {
                    timer.as_mut().reset(first);
                }
                tokio::select! {
                    // Shutdown first: the tasks it cancels give their places back, and the
                    // jobs waiting for them must not start then. Then places given back:
                    // the jobs waiting for them queued before any new one.
                    biased;
                    _ = shutdown.wait_for(|stopping| *stopping) => break,
                    Some(lane) = left.recv() => {
                        if let Some(job) = admission.release(&lane) {
                            spawn(&mut running, job, Some(lane));
                        }
                    }
                    () = timer.as_mut(), if !later.is_empty() => {
                        let now = tokio::time::Instant::now();
                        while let Some(due) = later.first_entry().filter(|due| due.key().0 <= now) {
                            dispatch(due.remove(), &mut admission, &mut running);
                        }
                    }
                    queued = receiver.recv() => {
                        let Some((job, at)) = queued else { break };
                        match at {
                            Some(at) => {
                                arrivals += 1;
                                later.insert((at, arrivals), job);
                            }
                            None => dispatch(job, &mut admission, &mut running),
                        }
                    }
                }
                // Reap finished deliveries so the set does not grow.
                while running.try_join_next().is_some() {}
            }
            // Jobs still waiting for a place or their time stay in the spool for the next
            // start.
            drop((admission, later));
            while running.join_next().await.is_some() {}
        })
    };
    Ok((queue, handle))
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
            preloaded: None,
        };
        match next_attempt(&job.recipients) {
            // Crashed between the last outcome and the removal: finish the removal.
            None => spool.remove(job.id).await?,
            Some(at) => queue.schedule(job, at),
        }
    }
    Ok(count)
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

/// The domain part of a final address, as the router compares domains (one name for its
/// U-label and A-label forms): what remote recipients are grouped by.
fn domain_of(address: &str) -> String {
    crate::router::domain_key(address.rsplit_once('@').map(|(_, domain)| domain).unwrap_or(""))
}

impl Deliverer {
    /// Which of the job's recipients are due now, and where each goes; `None` if none is.
    fn plan(&self, job: &Job) -> Option<Plan> {
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
            return None;
        }
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        for &i in &due {
            match self.router.destination(&job.recipients[i].address) {
                Destination::Remote => remote.push(i),
                Destination::Mailbox(mailbox) => local.push((i, Some(mailbox))),
                Destination::NoMailbox => local.push((i, None)),
            }
        }
        Some(Plan { due, local, remote })
    }

    /// A delivery attempt: the local and the remote part each wait for their own slots, then
    /// deliver; the outcome is recorded once both are done.
    async fn attempt(
        &self,
        mut job: Job,
        plan: Plan,
        admitted: Admitted,
        queue: &DeliveryQueue,
        slots: &Slots,
    ) {
        let Plan { due, local, remote } = plan;
        let content = OnceCell::new();
        // The preloaded content stays in the job, counted against the preload budget, while
        // the job waits for its slots.
        let preloaded = job.preloaded.as_ref().map(|preloaded| &preloaded.content);
        let loaded = Loaded { cell: &content, preloaded };
        // Each part boxed, allocated only for a job that has it: a waiting job's state stays
        // small (a burst of mail leaves thousands waiting).
        let local_part = async {
            match local.is_empty() {
                true => Vec::new(),
                false => Box::pin(self.local_part(&job, &local, slots, loaded)).await,
            }
        };
        let remote_part = async {
            match remote.is_empty() {
                true => Vec::new(),
                false => Box::pin(self.remote_part(&job, &remote, slots, loaded)).await,
            }
        };
        let (mut attempts, remote_attempts) = tokio::join!(local_part, remote_part);
        // The deliveries are done; recording them is not the lane's business.
        drop(admitted);
        attempts.extend(remote_attempts);
        job.preloaded = None;
        // Either part reads the content again if the other failed to; with none, neither
        // part delivered anything, and there is nothing to record.
        let Some(content) = content.into_inner() else {
            queue.schedule(job, SystemTime::now() + self.config.retry_initial);
            return;
        };
        // Boxed: the attempt's state while it waits for its slots stays small.
        Box::pin(self.record(job, &due, attempts, content, queue)).await;
    }

    /// The local part of an attempt: waits for its slots, then writes the copies.
    async fn local_part(
        &self,
        job: &Job,
        local: &[(usize, Option<String>)],
        slots: &Slots,
        loaded: Loaded<'_>,
    ) -> Vec<(usize, Attempt)> {
        let mailboxes: Vec<&str> = local.iter().filter_map(|(_, m)| m.as_deref()).collect();
        // Held until the copies are written; recording the outcome waits for the spool's
        // writer, and the next job need not wait with it.
        let _slots = slots.take_local(&mailboxes).await;
        let Some(content) = self.content(job.id, loaded).await else { return Vec::new() };
        Box::pin(self.deliver_local(job, local, content, &slots.maildir_writers)).await
    }

    /// The remote part of an attempt: waits for its domains' slots, then for a remote slot,
    /// then delivers over SMTP.
    async fn remote_part(
        &self,
        job: &Job,
        remote: &[usize],
        slots: &Slots,
        loaded: Loaded<'_>,
    ) -> Vec<(usize, Attempt)> {
        let mut by_domain: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for &index in remote {
            by_domain.entry(domain_of(&job.recipients[index].address)).or_default().push(index);
        }
        // The domains' slots first: a job of a lane that waits for its busy domain must not
        // hold one of the remote slots, which every other domain's mail needs.
        let domains: Vec<&str> = by_domain.keys().map(String::as_str).collect();
        let _destinations = self.outbound.reserve_destinations(&domains).await;
        let _slot = slots.remote.acquire().await;
        let Some(content) = self.content(job.id, loaded).await else { return Vec::new() };
        Box::pin(self.deliver_remote(job, by_domain, content)).await
    }

    /// The message's content, read by whichever part of an attempt has its slots first, not
    /// before: a job waiting for slots holds only its envelope. `None` when it cannot be
    /// read (logged).
    async fn content(&self, id: QueueId, loaded: Loaded<'_>) -> Option<Arc<Vec<u8>>> {
        let content = loaded
            .cell
            .get_or_try_init(|| async {
                match loaded.preloaded {
                    Some(content) => Ok(content.clone()),
                    None => self.spool.load_content(id).await.map(Arc::new),
                }
            })
            .await;
        match content {
            Ok(content) => Some(content.clone()),
            Err(error) => {
                error!(queue_id = %id, %error, "cannot read message from the spool; retrying later");
                None
            }
        }
    }

    /// Records the outcome of an attempt: each recipient's new status and the notices it
    /// calls for, in one spool transaction; then schedules what is left.
    async fn record(
        &self,
        mut job: Job,
        due: &[usize],
        mut attempts: Vec<(usize, Attempt)>,
        content: Arc<Vec<u8>>,
        queue: &DeliveryQueue,
    ) {
        // A recipient whose attempt produced no result (a task that failed) is tried again
        // later like any temporary failure, never left to loop at once.
        for &index in due {
            if !attempts.iter().any(|(i, _)| *i == index) {
                let attempt = Attempt::failed(
                    false,
                    EnhancedStatus(4, 3, 0),
                    "delivery attempt did not finish",
                );
                attempts.push((index, attempt));
            }
        }
        let now = SystemTime::now();
        let mut updates = Vec::with_capacity(attempts.len());
        let mut reports = Vec::new();
        // Recipients whose new status calls for a notice.
        let mut reported = Vec::new();
        for (index, attempt) in attempts {
            let (status, attempt) = self.status_after(&job, index, attempt, now);
            let delay_due =
                matches!(status, RecipientStatus::Deferred { delay_notified: true, .. })
                    && !matches!(
                        job.recipients[index].status,
                        RecipientStatus::Deferred { delay_notified: true, .. }
                    );
            let will_retry_until = job.envelope.received_at + self.config.max_lifetime;
            if let Some(report) = self.notifier.report_for(
                &job.envelope,
                &job.recipients[index],
                &attempt,
                &status,
                delay_due.then_some(will_retry_until),
            ) {
                reports.push(report);
                reported.push(index);
            }
            updates.push((index, status));
        }
        let notices = self.notifier.build(job.id, &job.envelope, &content, reports);
        // The slots are free already; while the outcome waits for the spool, the message
        // must not hold its copy, or a stalled spool would let copies pile up.
        drop(content);
        let mut after = job.recipients.clone();
        for (index, status) in &updates {
            after[*index].status = status.clone();
        }
        let remove = next_attempt(&after).is_none();
        // The notices and the outcomes that caused them are one transaction: see the module
        // comment.
        let recorded =
            self.spool.record_outcome(job.id, updates.clone(), remove, notices.clone()).await;
        match recorded {
            Ok(()) => {
                job.recipients = after;
                self.notifier.submit(job.id, &job.envelope.sender, notices, queue);
            }
            Err(error) => {
                // Not durable. Recipients that need no notice keep their new status here, so
                // this process does not deliver them twice (a restart before the next record
                // may); the ones whose notice was not stored are tried again, so that the
                // notice is not lost.
                error!(queue_id = %job.id, %error, "cannot record delivery results; trying again later");
                for (index, status) in updates {
                    if !reported.contains(&index) {
                        job.recipients[index].status = status;
                    }
                }
                if next_attempt(&job.recipients).is_some_and(|at| at <= now) {
                    queue.schedule(job, now + self.config.retry_initial);
                    return;
                }
            }
        }
        if let Some(at) = next_attempt(&job.recipients) {
            queue.schedule(job, at);
        }
    }

    /// Delivers the remote recipients, grouped by destination domain: the domains at once,
    /// one SMTP transaction per `max_recipients` of a domain.
    async fn deliver_remote(
        &self,
        job: &Job,
        by_domain: BTreeMap<String, Vec<usize>>,
        content: Arc<Vec<u8>>,
    ) -> Vec<(usize, Attempt)> {
        let due: usize = by_domain.values().map(Vec::len).sum();
        let mut deliveries = JoinSet::new();
        // The domains at once; a domain's transactions (max_recipients each) one after the
        // other, within its one destination slot.
        for (domain, indexes) in by_domain {
            let outbound = self.outbound.clone();
            let envelope = job.envelope.clone();
            let content = content.clone();
            let chunks: Vec<Vec<(usize, Recipient)>> = indexes
                .chunks(self.outbound.max_recipients())
                .map(|chunk| chunk.iter().map(|&i| (i, job.recipients[i].clone())).collect())
                .collect();
            let id = job.id;
            deliveries.spawn(async move {
                let mut attempts = Vec::new();
                for recipients in chunks {
                    attempts.extend(
                        outbound.deliver(id, &envelope, &content, &domain, recipients).await,
                    );
                }
                attempts
            });
        }
        let mut attempts = Vec::with_capacity(due);
        while let Some(result) = deliveries.join_next().await {
            match result {
                Ok(results) => attempts.extend(results),
                Err(error) => error!(queue_id = %job.id, %error, "outbound delivery task failed"),
            }
        }
        attempts
    }

    /// Writes each due local recipient's copy.
    async fn deliver_local(
        &self,
        job: &Job,
        due: &[(usize, Option<String>)],
        content: Arc<Vec<u8>>,
        writers: &MaildirWriters,
    ) -> Vec<(usize, Attempt)> {
        let plan: Vec<(usize, String, Option<String>)> = due
            .iter()
            .map(|(i, mailbox)| (*i, job.recipients[*i].address.clone(), mailbox.clone()))
            .collect();
        let maildir = self.maildir.clone();
        let sender = job.envelope.sender.clone();
        let written = writers
            .run(move || {
                plan.into_iter()
                    .map(|(i, address, mailbox)| {
                        let result = match &mailbox {
                            // RFC 5321 section 4.4: the final delivery adds Return-Path with the
                            // envelope sender.
                            Some(mailbox) => {
                                let prefix = format!(
                                    "Return-Path: <{sender}>\r\nDelivered-To: {address}\r\n"
                                );
                                maildir
                                    .deliver(mailbox, prefix.as_bytes(), &content)
                                    .map_err(|e| (e.is_transient(), e.to_string()))
                            }
                            None => Err((false, "mailbox no longer exists".to_string())),
                        };
                        (i, address, result)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        let Some(written) = written else {
            error!(queue_id = %job.id, "the Maildir writer threads are gone");
            return Vec::new();
        };
        written
            .into_iter()
            .map(|(i, address, result)| {
                let attempt = match result {
                    Ok(path) => {
                        info!(queue_id = %job.id, recipient = ?address, path = %path.display(), result = "delivered", "delivered to maildir");
                        Attempt::Delivered {
                            detail: "delivered to maildir".into(),
                            remote_host: None,
                            dsn_passed_on: false,
                        }
                    }
                    Err((true, why)) => Attempt::failed(false, EnhancedStatus(4, 3, 0), why),
                    Err((false, why)) => Attempt::failed(true, EnhancedStatus(5, 1, 1), why),
                };
                (i, attempt)
            })
            .collect()
    }

    /// The recipient's new status after an attempt, and the attempt as notifications should
    /// report it (a temporary failure past the lifetime becomes a permanent one, 4.4.7).
    fn status_after(
        &self,
        job: &Job,
        index: usize,
        attempt: Attempt,
        now: SystemTime,
    ) -> (RecipientStatus, Attempt) {
        let address = &job.recipients[index].address;
        let attempts = match &job.recipients[index].status {
            RecipientStatus::Deferred { attempts, .. } => attempts + 1,
            _ => 1,
        };
        match attempt {
            Attempt::Delivered { ref detail, .. } => {
                (RecipientStatus::Delivered { at: now, detail: detail.clone() }, attempt)
            }
            Attempt::Failed { permanent, status, reason, remote_reply, remote_host } => {
                let why = describe_failure(status, &reason, remote_reply.as_deref());
                let age = now.duration_since(job.envelope.received_at).unwrap_or_default();
                if !permanent && age < self.config.max_lifetime {
                    let delay =
                        backoff(self.config.retry_initial, self.config.retry_max, attempts - 1);
                    warn!(queue_id = %job.id, recipient = ?address, attempts, retry_in = delay.as_secs(), error = %why, result = "deferred", "delivery deferred");
                    let already_notified = matches!(
                        job.recipients[index].status,
                        RecipientStatus::Deferred { delay_notified: true, .. }
                    );
                    let deferred = RecipientStatus::Deferred {
                        attempts,
                        next_attempt: now + delay,
                        last_error: why,
                        delay_notified: already_notified
                            || self.config.delay_warning.is_some_and(|after| age >= after),
                    };
                    let attempt =
                        Attempt::Failed { permanent, status, reason, remote_reply, remote_host };
                    return (deferred, attempt);
                }
                let (status, reason) = if permanent {
                    (status, reason)
                } else {
                    // RFC 3463: X.4.7 "Delivery time expired".
                    (
                        EnhancedStatus(5, 4, 7),
                        format!(
                            "delivery time expired after {attempts} attempts; last error: {reason}"
                        ),
                    )
                };
                let why = describe_failure(status, &reason, remote_reply.as_deref());
                error!(queue_id = %job.id, recipient = ?address, attempts, error = %why, result = "failed", "delivery failed");
                (
                    RecipientStatus::Failed { at: now, error: why },
                    Attempt::Failed { permanent: true, status, reason, remote_reply, remote_host },
                )
            }
        }
    }
}

/// One line for the queue and logs: the status, our reason, and the remote reply if any.
fn describe_failure(status: EnhancedStatus, reason: &str, remote_reply: Option<&str>) -> String {
    let EnhancedStatus(class, subject, detail) = status;
    match remote_reply {
        Some(reply) => format!("{class}.{subject}.{detail} {reason} (remote said: {reply})"),
        None => format!("{class}.{subject}.{detail} {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn slots(workers: usize, mailbox_concurrency: usize) -> Slots {
        Slots {
            local: Semaphore::new(workers),
            mailboxes: KeyedSlots::new(mailbox_concurrency),
            remote: Semaphore::new(1),
            maildir_writers: MaildirWriters::start(1).unwrap(),
        }
    }

    /// Polls a waiting `take_local` once; a future polled once is queued for what it waits
    /// for.
    fn poll<'a>(
        take: &mut Pin<Box<impl Future<Output = LocalSlots<'a>>>>,
    ) -> Option<LocalSlots<'a>> {
        match take.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(held) => Some(held),
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_job_waiting_for_its_mailbox_holds_no_local_slot() {
        // One local slot, one delivery per mailbox. A flood into "a" must not keep "b" waiting
        // behind all of it: while the second message for "a" waits for its mailbox, it does
        // not hold or queue for the local slot, so "b" is next.
        let slots = slots(1, 1);
        let first_a = poll(&mut Box::pin(slots.take_local(&["a"]))).unwrap();
        let mut second_a = Box::pin(slots.take_local(&["a"]));
        let mut b = Box::pin(slots.take_local(&["b"]));
        assert!(poll(&mut second_a).is_none());
        assert!(poll(&mut b).is_none(), "the only local slot is taken");
        drop(first_a);
        let b_held = poll(&mut b).expect("b had the first claim on the local slot");
        assert!(poll(&mut second_a).is_none(), "a's turn comes after b's");
        drop(b_held);
        assert!(poll(&mut second_a).is_some());
    }

    #[test]
    fn a_job_for_a_flooded_mailbox_and_another_holds_neither_while_it_waits() {
        let slots = slots(4, 1);
        let flood = poll(&mut Box::pin(slots.take_local(&["z"]))).unwrap();
        let mut both = Box::pin(slots.take_local(&["z", "a"]));
        assert!(poll(&mut both).is_none(), "z is taken");
        let a = poll(&mut Box::pin(slots.take_local(&["a"])));
        assert!(a.is_some(), "a message for a alone goes past the flood into z");
        drop((flood, a));
        assert!(poll(&mut both).is_some());
    }

    #[test]
    fn jobs_for_the_same_mailboxes_in_any_order_never_wait_for_each_other() {
        let slots = slots(2, 1);
        let first = poll(&mut Box::pin(slots.take_local(&["b", "a"]))).unwrap();
        let mut second = Box::pin(slots.take_local(&["a", "b", "a"]));
        assert!(poll(&mut second).is_none(), "both mailboxes are taken");
        drop(first);
        assert!(poll(&mut second).is_some(), "the second job has both mailboxes now");
    }

    #[test]
    fn a_job_has_a_lane_only_when_it_delivers_in_one() {
        let mailbox = |name: &str| Some(name.to_string());
        let plan = |local: Vec<(usize, Option<String>)>, remote: Vec<usize>| Plan {
            due: local.iter().map(|(i, _)| *i).chain(remote.iter().copied()).collect(),
            local,
            remote,
        };
        let two = job(1, &["a@x", "b@x"]);
        assert_eq!(
            plan(vec![(0, mailbox("a")), (1, mailbox("a"))], vec![]).lane(&two),
            Some(Lane::Mailbox("a".into())),
            "two addresses, one mailbox"
        );
        assert_eq!(plan(vec![(0, mailbox("a")), (1, mailbox("b"))], vec![]).lane(&two), None);
        assert_eq!(plan(vec![(0, mailbox("a")), (1, None)], vec![]).lane(&two), None);
        assert_eq!(plan(vec![(0, None)], vec![]).lane(&two), None, "no mailbox, no lane");
        let remote = job(2, &["a@Bücher.example", "b@xn--bcher-kva.example", "c@other.example"]);
        assert_eq!(
            plan(vec![], vec![0, 1]).lane(&remote),
            Some(Lane::Domain("xn--bcher-kva.example".into())),
            "domains compare as lower-case A-labels"
        );
        assert_eq!(plan(vec![], vec![0, 2]).lane(&remote), None);
        assert_eq!(plan(vec![(0, mailbox("a"))], vec![1]).lane(&remote), None, "local and remote");
    }

    /// A job for `addresses`, all pending.
    fn job(id: u64, addresses: &[&str]) -> Job {
        Job {
            id: QueueId(id),
            envelope: Arc::new(Envelope {
                sender: "s@example.org".into(),
                body: smtp_proto::BodyType::SevenBit,
                smtputf8: false,
                ret: None,
                envid: None,
                client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                helo: "c".into(),
                tls: None,
                authenticated_as: None,
                received_at: SystemTime::UNIX_EPOCH,
            }),
            recipients: addresses
                .iter()
                .map(|&address| Recipient {
                    address: address.into(),
                    original: address.into(),
                    notify: None,
                    orcpt: None,
                    status: RecipientStatus::Pending,
                })
                .collect(),
            preloaded: None,
        }
    }

    #[test]
    fn preloaded_content_is_bounded_and_released_when_dropped() {
        let queue = DeliveryQueue {
            jobs: mpsc::unbounded_channel().0,
            preloaded: Arc::new(AtomicUsize::new(0)),
        };
        let half = Arc::new(vec![b'x'; PRELOAD_BUDGET / 2]);
        let first = queue.preload(&half).expect("room for the first half");
        assert!(Arc::ptr_eq(&first.content, &half), "shared, not copied");
        let second = queue.preload(&half).expect("room for the second half");
        let octet = Arc::new(b"one more octet".to_vec());
        assert!(queue.preload(&octet).is_none(), "over the budget");
        assert_eq!(queue.preloaded.load(Ordering::Relaxed), PRELOAD_BUDGET);
        drop(first);
        assert!(queue.preload(&octet).is_some());
        drop(second);
        assert_eq!(queue.preloaded.load(Ordering::Relaxed), 0);
    }

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
            delay_notified: false,
        });
        assert_eq!(next_attempt(&[done.clone(), later.clone()]), Some(at));
        assert_eq!(
            next_attempt(&[later, recipient(RecipientStatus::Pending)]),
            Some(SystemTime::UNIX_EPOCH)
        );
    }

    #[test]
    fn failure_descriptions_carry_their_status() {
        let text = describe_failure(EnhancedStatus(4, 4, 1), "connection refused", None);
        assert_eq!(text, "4.4.1 connection refused");
        let text = describe_failure(
            EnhancedStatus(5, 1, 1),
            "recipient refused",
            Some("550 5.1.1 No such user"),
        );
        assert!(text.ends_with("(remote said: 550 5.1.1 No such user)"));
        assert_eq!(domain_of("A@Example.ORG"), "example.org");
        assert_eq!(domain_of("u@[127.0.0.2]"), "[127.0.0.2]");
    }
}

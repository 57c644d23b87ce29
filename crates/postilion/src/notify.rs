//! Delivery status notifications from the queue manager: which outcomes call for one (RFC
//! 3461 NOTIFY rules, via the dsn crate), building them, and queueing them durably with a null
//! reverse-path so that a notice that cannot be delivered never produces another one.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::SystemTime;

use dsn::{Action, Diagnostic, Kind, OriginalEnvelope, ReceivedFrom, RecipientReport, Report};
use smtp_proto::{EnhancedStatus, Notify};
use spool::{Envelope, NewMessage, QueueId, Recipient, RecipientStatus};
use tracing::{info, warn};

use crate::delivery::{Attempt, DeliveryQueue};

pub struct Notifier {
    /// Our host name: Reporting-MTA and the notices' From and Message-ID.
    pub hostname: String,
    /// Octets of the original returned in full with a failure notice.
    pub return_size_limit: usize,
    /// Delay notices also for recipients that gave no NOTIFY (RFC 3461 section 4.1 lets a
    /// missing NOTIFY mean FAILURE or FAILURE,DELAY).
    pub delay_by_default: bool,
}

impl Notifier {
    /// The report line for one recipient's new status, when its NOTIFY asks for one.
    /// `delay_due` is set (to when retries end) when the recipient just became old enough
    /// for a delay notice.
    pub fn report_for(
        &self,
        envelope: &Envelope,
        recipient: &Recipient,
        attempt: &Attempt,
        status: &RecipientStatus,
        delay_due: Option<SystemTime>,
    ) -> Option<RecipientReport> {
        let (action, code, remote_host, diagnostic) = match (attempt, status) {
            (Attempt::Delivered { remote_host: None, .. }, RecipientStatus::Delivered { .. }) => {
                // RFC 3464 section 2.3.3: "delivered" for final delivery; X.0.0 success.
                (Action::Delivered, EnhancedStatus(2, 0, 0), None, None)
            }
            (
                Attempt::Delivered { remote_host: Some(host), dsn_passed_on, detail },
                RecipientStatus::Delivered { .. },
            ) => {
                // RFC 3461 section 5.2.2: relayed to a server that takes the DSN parameters,
                // that server reports success itself; otherwise we say "relayed".
                if *dsn_passed_on {
                    return None;
                }
                (
                    Action::Relayed,
                    EnhancedStatus(2, 0, 0),
                    Some(host.clone()),
                    Some(Diagnostic::Smtp(detail.clone())),
                )
            }
            (
                Attempt::Failed { status, reason, remote_reply, remote_host, .. },
                RecipientStatus::Failed { .. },
            ) => (
                Action::Failed,
                *status,
                remote_host.clone(),
                Some(diagnostic(remote_reply.as_deref(), reason)),
            ),
            (
                Attempt::Failed { status, reason, remote_reply, remote_host, .. },
                RecipientStatus::Deferred { .. },
            ) if delay_due.is_some() => {
                // RFC 3464 section 2.3.3: "delayed" carries a 4.X.X status.
                let EnhancedStatus(_, subject, detail) = *status;
                (
                    Action::Delayed,
                    EnhancedStatus(4, subject, detail),
                    remote_host.clone(),
                    Some(diagnostic(remote_reply.as_deref(), reason)),
                )
            }
            _ => return None,
        };
        let sender_is_null = envelope.sender.is_empty();
        if !dsn::should_notify(
            action.kind(),
            recipient.notify,
            sender_is_null,
            self.delay_by_default,
        ) {
            return None;
        }
        let mut report = RecipientReport::new(recipient.address.clone(), action, code);
        report.original_recipient = recipient.orcpt.clone();
        report.remote_mta = remote_host;
        report.diagnostic = diagnostic;
        report.last_attempt = Some(SystemTime::now());
        if action == Action::Delayed {
            report.will_retry_until = delay_due;
        }
        Some(report)
    }

    /// Builds one notice per kind of report, ready to be stored with the outcome. A notice
    /// that cannot be built (a caller mistake, not a passing condition) is logged and left
    /// out rather than retried forever.
    pub fn build(
        &self,
        id: QueueId,
        envelope: &Envelope,
        content: &[u8],
        reports: Vec<RecipientReport>,
    ) -> Vec<NewMessage> {
        if reports.is_empty() {
            return Vec::new();
        }
        if dsn::is_notification(content) {
            // RFC 3834 section 2 and RFC 5321 section 3.6.3: never a notice about a notice or
            // an automatic reply, even one sent with a real reverse-path.
            info!(queue_id = %id, "no notification about a notification or auto-reply");
            return Vec::new();
        }
        let original = OriginalEnvelope {
            sender: envelope.sender.clone(),
            envid: envelope.envid.clone(),
            ret: envelope.ret,
            smtputf8: envelope.smtputf8,
            arrival_date: envelope.received_at,
            received_from: Some(ReceivedFrom {
                helo: envelope.helo.clone(),
                ip: envelope.client_ip,
            }),
        };
        let mut notices = Vec::new();
        for kind in [Kind::Failure, Kind::Delay, Kind::Success, Kind::Relayed] {
            let recipients: Vec<RecipientReport> =
                reports.iter().filter(|r| r.action.kind() == kind).cloned().collect();
            if recipients.is_empty() {
                continue;
            }
            let notice_id = QueueId::generate();
            let report = Report {
                reporting_mta: self.hostname.clone(),
                date: SystemTime::now(),
                message_id: notice_id.to_string(),
                return_size_limit: self.return_size_limit,
                original: original.clone(),
                recipients,
            };
            let notification = match report.build(content) {
                Ok(notification) => notification,
                Err(error) => {
                    warn!(queue_id = %id, %error, "cannot build a delivery status notification");
                    continue;
                }
            };
            let notice_envelope = Envelope {
                // RFC 3461 section 6.1: "The DSN sender address (in the SMTP MAIL command)
                // MUST be a null reverse-path".
                sender: String::new(),
                body: notification.body,
                smtputf8: notification.smtputf8,
                ret: None,
                envid: None,
                client_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
                helo: self.hostname.clone(),
                tls: None,
                authenticated_as: None,
                received_at: SystemTime::now(),
            };
            let recipient = Recipient {
                address: envelope.sender.clone(),
                original: envelope.sender.clone(),
                // RFC 3461 section 6.1: NOTIFY "MAY be used, but its value MUST be NEVER".
                notify: Some(Notify::NEVER),
                orcpt: None,
                status: RecipientStatus::Pending,
            };
            notices.push(NewMessage {
                id: notice_id,
                envelope: notice_envelope,
                recipients: vec![recipient],
                content: Arc::new(notification.message),
            });
        }
        notices
    }

    /// Hands stored notices to delivery, each with its content for the first attempt.
    pub fn submit(&self, id: QueueId, to: &str, notices: Vec<NewMessage>, queue: &DeliveryQueue) {
        for notice in notices {
            info!(queue_id = %id, notice = %notice.id, to = ?to, "delivery status notification queued");
            let preloaded = queue.preload(&notice.content);
            queue.submit(notice.id, notice.envelope, notice.recipients, preloaded);
        }
    }
}

/// The Diagnostic-Code of a failure: the remote server's reply when there was one, else our
/// own reason.
fn diagnostic(remote_reply: Option<&str>, reason: &str) -> Diagnostic {
    match remote_reply {
        Some(reply) => Diagnostic::Smtp(reply.to_string()),
        None => Diagnostic::Local(reason.to_string()),
    }
}

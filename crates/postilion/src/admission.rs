//! Which queued jobs get a delivery task now, and which wait as plain data.
//!
//! A delivery task that waits for its slots costs far more than the job it carries: the
//! task's state, the waiters it registers, and memory the allocator takes fresh from the
//! kernel for every one of them. A burst of mail into one mailbox would leave thousands of
//! such tasks waiting behind the mailbox's two slots. So a job that delivers in one lane
//! only (one mailbox, or one remote domain) waits here, in order, while its lane has as many
//! tasks as it admits: a few more than the lane's slots, so that the waiting ones are ready
//! the moment a slot frees. A flooded lane holds back only its own jobs, as with Postfix's
//! per-destination queues.
//!
//! A job for several lanes (several mailboxes or domains, or local and remote recipients)
//! does not wait here: holding a place in one lane while waiting for another would hold up
//! that lane's other jobs, and releasing one lane's place before the job's other deliveries
//! are done is not possible from here. It gets its task at once and waits for its slots
//! there, as every job did before ([`crate::slots::KeyedSlots::acquire_all`] then takes its
//! mailboxes all or nothing).
//!
//! The lanes bound how many tasks wait; they are not the delivery limits themselves, which
//! the tasks still take.

use std::collections::{HashMap, VecDeque};

/// A stream of deliveries that is limited on its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Lane {
    /// A local mailbox, by name.
    Mailbox(String),
    /// A remote destination domain, as `router::domain_key` writes it.
    Domain(String),
}

/// Tasks admitted per lane: the lane's slots, and as many again ready to take them.
pub struct LaneLimits {
    pub mailbox: usize,
    pub domain: usize,
}

/// The admission state: per lane with a task running, the tasks running and the jobs
/// waiting for one to end.
///
/// A lane has jobs waiting only while it is full: [`Admission::release`] admits the first
/// waiting job as soon as a task leaves, so a newcomer never passes them.
pub struct Admission<J> {
    limits: LaneLimits,
    lanes: HashMap<Lane, LaneState<J>>,
}

struct LaneState<J> {
    running: usize,
    waiting: VecDeque<J>,
}

impl<J> Admission<J> {
    pub fn new(limits: LaneLimits) -> Admission<J> {
        Admission { limits, lanes: HashMap::new() }
    }

    /// A job for `lane` asks for a task: returned to be run now (counted in the lane), or
    /// `None`: it waits, to come back from [`Admission::release`].
    pub fn offer(&mut self, job: J, lane: &Lane) -> Option<J> {
        let limit = match lane {
            Lane::Mailbox(_) => self.limits.mailbox,
            Lane::Domain(_) => self.limits.domain,
        };
        match self.lanes.get_mut(lane) {
            Some(state) if state.running >= limit => {
                state.waiting.push_back(job);
                return None;
            }
            Some(state) => state.running += 1,
            None => {
                self.lanes.insert(lane.clone(), LaneState { running: 1, waiting: VecDeque::new() });
            }
        }
        Some(job)
    }

    /// A task admitted for `lane` has ended: the first job waiting there, if any, runs now
    /// in its place (the count stays).
    pub fn release(&mut self, lane: &Lane) -> Option<J> {
        let state = self.lanes.get_mut(lane)?;
        if let Some(job) = state.waiting.pop_front() {
            return Some(job);
        }
        state.running -= 1;
        if state.running == 0 {
            self.lanes.remove(lane);
        }
        None
    }

    /// Jobs waiting for a lane.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lanes.values().map(|state| state.waiting.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(name: &str) -> Lane {
        Lane::Mailbox(name.into())
    }

    fn domain(name: &str) -> Lane {
        Lane::Domain(name.into())
    }

    fn admission() -> Admission<u32> {
        Admission::new(LaneLimits { mailbox: 2, domain: 3 })
    }

    #[test]
    fn a_lane_admits_its_limit_and_the_rest_wait_in_order() {
        let mut admission = admission();
        let a = mailbox("a");
        for job in 0..2 {
            assert_eq!(admission.offer(job, &a), Some(job));
        }
        for job in 2..5 {
            assert_eq!(admission.offer(job, &a), None);
        }
        assert_eq!(admission.waiting(), 3);
        assert_eq!(admission.release(&a), Some(2));
        assert_eq!(admission.release(&a), Some(3));
        assert_eq!(admission.release(&a), Some(4));
        assert_eq!(admission.waiting(), 0);
        // Two tasks still run: the lane has room again only as they end.
        assert_eq!(admission.offer(5, &a), None);
        assert_eq!(admission.release(&a), Some(5));
        assert_eq!(admission.release(&a), None);
        assert_eq!(admission.release(&a), None);
        assert!(admission.lanes.is_empty(), "an idle lane is forgotten");
        assert_eq!(admission.offer(6, &a), Some(6));
    }

    #[test]
    fn a_full_lane_holds_back_only_its_own_jobs() {
        let mut admission = admission();
        for job in 0..10 {
            admission.offer(job, &mailbox("flooded"));
        }
        assert_eq!(admission.offer(10, &mailbox("other")), Some(10));
        assert_eq!(admission.offer(11, &domain("example.org")), Some(11));
        assert_eq!(admission.waiting(), 8);
        // Releasing another lane admits nothing of the flooded one.
        assert_eq!(admission.release(&mailbox("other")), None);
        assert_eq!(admission.waiting(), 8);
    }

    #[test]
    fn domains_have_their_own_limit_and_names() {
        let mut admission = admission();
        let d = domain("example.org");
        for job in 0..3 {
            assert_eq!(admission.offer(job, &d), Some(job));
        }
        assert_eq!(admission.offer(3, &d), None);
        // A mailbox and a domain of the same name are different lanes.
        assert_eq!(admission.offer(4, &mailbox("example.org")), Some(4));
    }
}

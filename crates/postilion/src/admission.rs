//! Which queued jobs get a delivery task now, and which wait as plain data.
//!
//! A delivery task that waits for its slots costs far more than the job it carries: the
//! task's state, the waiters it registers, and memory the allocator takes fresh from the
//! kernel for every one of them. A burst of mail into one mailbox would leave thousands of
//! such tasks waiting behind the mailbox's two slots. So each job has lanes (its mailboxes,
//! or its destination domains), each lane admits a few more jobs than it has slots (the
//! ones waiting are ready the moment a slot frees), and the rest wait here, in order, per
//! lane. A flooded lane holds back only its own jobs, as with Postfix's per-destination
//! queues.
//!
//! The lanes bound how many tasks wait; they are not the delivery limits themselves, which
//! the tasks still take ([`crate::slots::KeyedSlots`] and the worker semaphores).

use std::collections::{HashMap, VecDeque};

/// A stream of deliveries that is limited on its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    /// A local mailbox, by name.
    Mailbox(String),
    /// A remote destination domain, in lower case.
    Domain(String),
}

/// Tasks admitted per lane: the lane's slots, and as many again ready to take them.
pub struct LaneLimits {
    pub mailbox: usize,
    pub domain: usize,
}

/// A job waiting for room: its lanes in order, and how many of them it holds a place in.
struct Waiting<J> {
    job: J,
    lanes: Vec<Lane>,
    held: usize,
}

/// The admission state: places taken per lane, and the jobs waiting behind full lanes.
///
/// A job takes a place in each of its lanes in their order, and waits in the queue of the
/// first one without room holding the places it has: a job for two lanes is never passed
/// over for ever while jobs for one of them come and go, and as every job takes its lanes
/// in the same order, no two jobs wait for each other.
pub struct Admission<J> {
    limits: LaneLimits,
    taken: HashMap<Lane, usize>,
    waiting: HashMap<Lane, VecDeque<Waiting<J>>>,
    waiting_count: usize,
}

impl<J> Admission<J> {
    pub fn new(limits: LaneLimits) -> Admission<J> {
        Admission { limits, taken: HashMap::new(), waiting: HashMap::new(), waiting_count: 0 }
    }

    /// Jobs waiting here for room in a lane.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting_count
    }

    fn limit(&self, lane: &Lane) -> usize {
        match lane {
            Lane::Mailbox(_) => self.limits.mailbox,
            Lane::Domain(_) => self.limits.domain,
        }
    }

    fn has_room(&self, lane: &Lane) -> bool {
        self.taken.get(lane).copied().unwrap_or(0) < self.limit(lane)
    }

    /// A job with `lanes` asks for a task: returned with its lanes (sorted, each named once)
    /// to be run now, or `None`: it waits, to come back from [`Admission::release`]. A job
    /// with no lanes is always admitted.
    pub fn offer(&mut self, job: J, mut lanes: Vec<Lane>) -> Option<(J, Vec<Lane>)> {
        lanes.sort_unstable();
        lanes.dedup();
        self.advance(Waiting { job, lanes, held: 0 })
    }

    /// Admits a job at once, counted in its lanes even past their limit: for a job whose
    /// parts must not wait for each other's lanes (see the caller).
    pub fn admit_now(&mut self, mut lanes: Vec<Lane>) -> Vec<Lane> {
        lanes.sort_unstable();
        lanes.dedup();
        for lane in &lanes {
            *self.taken.entry(lane.clone()).or_insert(0) += 1;
        }
        lanes
    }

    /// Takes places in the job's lanes from `held` on, or queues it at the first lane without
    /// room. A lane has jobs queued only while it is full ([`Admission::release`] admits them
    /// as places free), so a newcomer never passes them.
    fn advance(&mut self, mut waiting: Waiting<J>) -> Option<(J, Vec<Lane>)> {
        while let Some(lane) = waiting.lanes.get(waiting.held) {
            if !self.has_room(lane) {
                let lane = lane.clone();
                self.waiting.entry(lane).or_default().push_back(waiting);
                self.waiting_count += 1;
                return None;
            }
            *self.taken.entry(lane.clone()).or_insert(0) += 1;
            waiting.held += 1;
        }
        Some((waiting.job, waiting.lanes))
    }

    /// A task admitted with `lanes` has left them. Returns the waiting jobs that may run now,
    /// already counted in their lanes, in the order they queued per lane.
    pub fn release(&mut self, lanes: &[Lane]) -> Vec<(J, Vec<Lane>)> {
        let mut admitted = Vec::new();
        for lane in lanes {
            if let Some(count) = self.taken.get_mut(lane) {
                *count -= 1;
                if *count == 0 {
                    self.taken.remove(lane);
                }
            }
            while self.has_room(lane) {
                let Some(queue) = self.waiting.get_mut(lane) else { break };
                let Some(next) = queue.pop_front() else { break };
                if queue.is_empty() {
                    self.waiting.remove(lane);
                }
                self.waiting_count -= 1;
                if let Some(found) = self.advance(next) {
                    admitted.push(found);
                }
            }
        }
        admitted
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

    fn ids(admitted: Vec<(u32, Vec<Lane>)>) -> Vec<u32> {
        admitted.into_iter().map(|(job, _)| job).collect()
    }

    #[test]
    fn a_lane_admits_its_limit_and_parks_the_rest_in_order() {
        let mut admission = admission();
        for job in 0..2 {
            assert!(admission.offer(job, vec![mailbox("a")]).is_some());
        }
        for job in 2..5 {
            assert!(admission.offer(job, vec![mailbox("a")]).is_none());
        }
        assert_eq!(admission.waiting(), 3);
        assert_eq!(ids(admission.release(&[mailbox("a")])), vec![2]);
        assert_eq!(ids(admission.release(&[mailbox("a")])), vec![3]);
        assert_eq!(ids(admission.release(&[mailbox("a")])), vec![4]);
        assert_eq!(admission.waiting(), 0);
        assert!(admission.release(&[mailbox("a")]).is_empty());
    }

    #[test]
    fn a_full_lane_holds_back_only_its_own_jobs() {
        let mut admission = admission();
        for job in 0..10 {
            admission.offer(job, vec![mailbox("flooded")]);
        }
        assert!(admission.offer(10, vec![mailbox("other")]).is_some());
        assert!(admission.offer(11, vec![domain("example.org")]).is_some());
        assert_eq!(admission.waiting(), 8);
    }

    #[test]
    fn domains_have_their_own_limit() {
        let mut admission = admission();
        for job in 0..3 {
            assert!(admission.offer(job, vec![domain("example.org")]).is_some());
        }
        assert!(admission.offer(3, vec![domain("example.org")]).is_none());
        // A mailbox and a domain of the same name are different lanes.
        assert!(admission.offer(4, vec![mailbox("example.org")]).is_some());
    }

    #[test]
    fn a_job_with_no_lanes_is_always_admitted() {
        let mut admission = admission();
        for job in 0..100 {
            assert!(admission.offer(job, Vec::new()).is_some());
        }
        assert_eq!(admission.waiting(), 0);
    }

    #[test]
    fn a_job_for_two_lanes_waits_holding_its_place_in_the_first() {
        let mut admission = admission();
        admission.offer(0, vec![mailbox("a")]);
        admission.offer(1, vec![mailbox("b")]);
        admission.offer(2, vec![mailbox("b")]);
        // "a" has room, "b" has not: it holds a place in "a" and waits for "b".
        assert!(admission.offer(3, vec![mailbox("b"), mailbox("a")]).is_none());
        // "a" is full now (0 and 3); a newcomer waits.
        assert!(admission.offer(4, vec![mailbox("a")]).is_none());
        // Jobs for "b" keep coming, but 3 is first in line there.
        assert!(admission.offer(5, vec![mailbox("b")]).is_none());
        let (job, lanes) = admission.release(&[mailbox("b")]).pop().unwrap();
        assert_eq!(job, 3);
        assert_eq!(lanes, vec![mailbox("a"), mailbox("b")]);
        assert_eq!(admission.waiting(), 2);
        // 3 leaves both lanes: 4 gets "a", 5 gets "b".
        let mut next = ids(admission.release(&lanes));
        next.sort();
        assert_eq!(next, vec![4, 5]);
    }

    #[test]
    fn a_job_holding_a_place_goes_first_when_its_next_lane_frees() {
        let mut admission = admission();
        admission.offer(0, vec![mailbox("b")]);
        admission.offer(1, vec![mailbox("b")]);
        assert!(admission.offer(2, vec![mailbox("a"), mailbox("b")]).is_none());
        assert!(admission.offer(3, vec![mailbox("b")]).is_none());
        // "a" has one place left and nobody queued for it.
        assert!(admission.offer(4, vec![mailbox("a")]).is_some());
        assert!(admission.offer(5, vec![mailbox("a")]).is_none());
        assert_eq!(ids(admission.release(&[mailbox("b")])), vec![2]);
        assert_eq!(ids(admission.release(&[mailbox("b")])), vec![3]);
        assert_eq!(ids(admission.release(&[mailbox("a")])), vec![5]);
    }

    #[test]
    fn a_job_admitted_at_once_counts_in_its_lanes() {
        let mut admission = admission();
        admission.offer(0, vec![mailbox("a")]);
        let lanes = admission.admit_now(vec![mailbox("a"), domain("d"), mailbox("a")]);
        assert_eq!(lanes, vec![mailbox("a"), domain("d")]);
        let lanes_2 = admission.admit_now(vec![mailbox("a")]);
        // "a" holds three now, over its limit: a newcomer waits until two have left.
        assert!(admission.offer(1, vec![mailbox("a")]).is_none());
        assert!(admission.release(&lanes).is_empty());
        assert_eq!(ids(admission.release(&lanes_2)), vec![1]);
    }

    #[test]
    fn released_lanes_are_forgotten_when_idle() {
        let mut admission = admission();
        let (_, lanes) = admission.offer(0, vec![mailbox("a"), domain("d")]).unwrap();
        assert!(admission.release(&lanes).is_empty());
        assert!(admission.taken.is_empty());
        assert!(admission.waiting.is_empty());
    }
}

//! Concurrency limits per key: at most `limit` holders of one key's slots at once (a
//! destination domain's connections, a mailbox's deliveries), the others waiting in turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many times [`KeyedSlots::acquire_all`] gives back what it holds to wait for a busy key
/// before it waits holding the others: keys that stay busy must not starve a job that needs
/// several of them.
const ALL_OR_NOTHING_ROUNDS: usize = 3;

/// Past this many keys, the idle ones are forgotten when the next key is added, so the map
/// does not grow with every key ever used.
const IDLE_KEYS_KEPT: usize = 10_000;

pub struct KeyedSlots {
    limit: usize,
    keys: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// One of a key's slots, given back when dropped.
pub struct KeyedPermit {
    _permit: OwnedSemaphorePermit,
}

impl KeyedSlots {
    pub fn new(limit: usize) -> KeyedSlots {
        KeyedSlots { limit, keys: Mutex::new(HashMap::new()) }
    }

    /// Waits for one slot of each of `keys` (a key named twice counts once) without holding
    /// some while it waits for another: a job for two mailboxes, one of them flooded, must not keep the
    /// other one's slots while it queues behind the flood. It waits for one busy key, then
    /// tries the others at once; when one of them is busy, it gives everything back and
    /// waits for that one. After [`ALL_OR_NOTHING_ROUNDS`] such rounds it waits for the
    /// keys in name order, holding the ones it has: still never a deadlock, as every job
    /// that waits holding takes the keys in the same order.
    pub async fn acquire_all(&self, keys: &[&str]) -> Vec<KeyedPermit> {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let all: Vec<Arc<Semaphore>> = keys.iter().map(|key| self.slots(key)).collect();
        let mut waited_for = None;
        for _ in 0..ALL_OR_NOTHING_ROUNDS {
            let mut held = Vec::with_capacity(all.len());
            if let Some(index) = waited_for {
                held.push(Self::wait(&all[index]).await);
            }
            let mut busy = None;
            for (index, slots) in all.iter().enumerate() {
                if Some(index) == waited_for {
                    continue;
                }
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => held.push(KeyedPermit { _permit: permit }),
                    Err(_) => {
                        busy = Some(index);
                        break;
                    }
                }
            }
            match busy {
                None => return held,
                // What is held is given back here.
                Some(index) => waited_for = Some(index),
            }
        }
        let mut held = Vec::with_capacity(all.len());
        for slots in &all {
            held.push(Self::wait(slots).await);
        }
        held
    }

    async fn wait(slots: &Arc<Semaphore>) -> KeyedPermit {
        // The semaphore is never closed.
        let permit = slots.clone().acquire_owned().await.expect("keyed slots are never closed");
        KeyedPermit { _permit: permit }
    }

    fn slots(&self, key: &str) -> Arc<Semaphore> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slots) = keys.get(key) {
            return slots.clone();
        }
        if keys.len() >= IDLE_KEYS_KEPT {
            // Only the map refers to an idle key's semaphore: every holder of a permit and
            // every waiter keeps a reference of its own. Forgetting it cannot let a key have
            // more than `limit` holders.
            keys.retain(|_, slots| Arc::strong_count(slots) > 1);
        }
        keys.entry(key.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.limit))).clone()
    }

    #[cfg(test)]
    fn known_keys(&self) -> usize {
        self.keys.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use super::*;

    /// Polls `future` once: its output if it is ready at once.
    fn ready<T>(future: impl std::future::Future<Output = T>) -> Option<T> {
        let mut future = std::pin::pin!(future);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn each_key_has_its_own_limit() {
        let slots = KeyedSlots::new(2);
        let first = slots.acquire_all(&["a"]).await;
        let _second = slots.acquire_all(&["a"]).await;
        assert!(ready(slots.acquire_all(&["a"])).is_none(), "a third holder of one key");
        // Another key is not held up by the first.
        let _other = ready(slots.acquire_all(&["b"])).expect("another key waits for nothing");
        drop(first);
        assert!(ready(slots.acquire_all(&["a"])).is_some(), "a slot given back is free again");
    }

    #[tokio::test]
    async fn several_keys_are_waited_for_holding_none_of_them() {
        let slots = KeyedSlots::new(1);
        let flood = slots.acquire_all(&["z"]).await;
        let mut both = Box::pin(slots.acquire_all(&["a", "z"]));
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(both.as_mut().poll(&mut context).is_pending(), "z is busy");
        // While it waits for z, a is free for others.
        let other = ready(slots.acquire_all(&["a"])).expect("a must not be held by a waiting job");
        drop(flood);
        // It gets z, finds a busy, gives z back and waits for a.
        assert!(both.as_mut().poll(&mut context).is_pending(), "a is busy");
        assert!(
            ready(slots.acquire_all(&["z"])).is_some(),
            "z must not be held while waiting for a"
        );
        drop(other);
        let std::task::Poll::Ready(held) = both.as_mut().poll(&mut context) else {
            panic!("both keys are free");
        };
        assert_eq!(held.len(), 2);
        assert!(
            ready(slots.acquire_all(&["a"])).is_none()
                && ready(slots.acquire_all(&["z"])).is_none()
        );
    }

    #[tokio::test]
    async fn keys_that_stay_busy_are_waited_for_in_order_at_last() {
        // Another task takes a and b again and again; the job still gets both, if need be
        // by waiting for them in order after its rounds of giving back.
        let slots = Arc::new(KeyedSlots::new(1));
        let (held_a, held_b) = (slots.acquire_all(&["a"]).await, slots.acquire_all(&["b"]).await);
        let both = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire_all(&["a", "b"]).await.len() }
        });
        let churn = tokio::spawn({
            let slots = slots.clone();
            async move {
                for _ in 0..20 {
                    let (a, b) = (slots.acquire_all(&["a"]).await, slots.acquire_all(&["b"]).await);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    drop((a, b));
                }
            }
        });
        drop((held_a, held_b));
        let got = tokio::time::timeout(Duration::from_secs(10), both).await;
        assert_eq!(got.expect("acquire_all starved").unwrap(), 2);
        churn.await.unwrap();
    }

    #[tokio::test]
    async fn a_key_named_twice_takes_one_slot() {
        let slots = KeyedSlots::new(2);
        let held = slots.acquire_all(&["b", "a", "b"]).await;
        assert_eq!(held.len(), 2);
        assert!(ready(slots.acquire_all(&["b"])).is_some(), "b's second slot is still free");
    }

    #[tokio::test]
    async fn waiters_are_served_in_order() {
        let slots = Arc::new(KeyedSlots::new(1));
        let held = slots.acquire_all(&["mailbox"]).await;
        let (order, mut served) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for number in 0..5 {
            let (slots, order) = (slots.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _permit = slots.acquire_all(&["mailbox"]).await;
                order.send(number).unwrap();
            }));
            // Each waiter is queued before the next one starts.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        let mut got = Vec::new();
        while let Ok(number) = served.try_recv() {
            got.push(number);
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn idle_keys_are_forgotten_but_busy_ones_kept() {
        let slots = KeyedSlots::new(1);
        let busy = slots.acquire_all(&["busy"]).await;
        for key in 1..IDLE_KEYS_KEPT {
            drop(slots.acquire_all(&[key.to_string().as_str()]).await);
        }
        assert_eq!(slots.known_keys(), IDLE_KEYS_KEPT, "none forgotten up to the limit");
        // The next new key clears out the idle ones; the busy key keeps its only slot taken.
        let _new = slots.acquire_all(&["new"]).await;
        assert_eq!(slots.known_keys(), 2);
        assert!(
            ready(slots.acquire_all(&["busy"])).is_none(),
            "the busy key's slot is still taken"
        );
        drop(busy);
        assert!(ready(slots.acquire_all(&["busy"])).is_some());
    }
}

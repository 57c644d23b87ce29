//! Concurrency limits per key: at most `limit` holders of one key's slots at once (a
//! destination domain's connections, a mailbox's deliveries), the others waiting in turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

    /// Waits for one of `key`'s slots. Waiters are served in the order they came.
    pub async fn acquire(&self, key: &str) -> KeyedPermit {
        let slots = self.slots(key);
        // The semaphore is never closed.
        let permit = slots.acquire_owned().await.expect("keyed slots are never closed");
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
        let first = slots.acquire("a").await;
        let _second = slots.acquire("a").await;
        assert!(ready(slots.acquire("a")).is_none(), "a third holder of one key");
        // Another key is not held up by the first.
        let _other = ready(slots.acquire("b")).expect("another key waits for nothing");
        drop(first);
        assert!(ready(slots.acquire("a")).is_some(), "a slot given back is free again");
    }

    #[tokio::test]
    async fn waiters_are_served_in_order() {
        let slots = Arc::new(KeyedSlots::new(1));
        let held = slots.acquire("mailbox").await;
        let (order, mut served) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for number in 0..5 {
            let (slots, order) = (slots.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _permit = slots.acquire("mailbox").await;
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
        let busy = slots.acquire("busy").await;
        for key in 1..IDLE_KEYS_KEPT {
            drop(slots.acquire(&key.to_string()).await);
        }
        assert_eq!(slots.known_keys(), IDLE_KEYS_KEPT, "none forgotten up to the limit");
        // The next new key clears out the idle ones; the busy key keeps its only slot taken.
        let _new = slots.acquire("new").await;
        assert_eq!(slots.known_keys(), 2);
        assert!(ready(slots.acquire("busy")).is_none(), "the busy key's slot is still taken");
        drop(busy);
        assert!(ready(slots.acquire("busy")).is_some());
    }
}

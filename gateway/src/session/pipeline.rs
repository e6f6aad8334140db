//! A session's publishes in flight: a client may send publishes back to back, and where
//! the broker takes each one's place in its channel's order at once (Redis on one server:
//! the publish batcher), the session goes on to the next command while earlier ones wait
//! for their answer in small tasks. Bounded per connection, in count and in payload bytes;
//! over the bound a publish is answered in place, as any other command.
//!
//! Every other command first waits until the session's publishes are answered, so a
//! client still reads its own writes (a history or a presence after a publish sees it),
//! and only runs of consecutive publishes overlap. Replies carry the command's id; a
//! publish's reply may come after a later command's.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use tokio::sync::Notify;

/// Publishes in flight per connection at most.
pub const MAX_PUBLISHES: usize = 32;
/// Their bytes at most, payload plus [`OVERHEAD_BYTES`] each (a single publish may be
/// larger: it is then answered in place).
pub const MAX_BYTES: usize = 64 * 1024;

/// What a publication in flight holds besides its data, counted against [`MAX_BYTES`].
pub const OVERHEAD_BYTES: usize = 512;

#[derive(Default)]
pub struct Pipeline {
    publishes: AtomicUsize,
    bytes: AtomicUsize,
    idle: Notify,
}

/// One publish in flight; dropped once its reply is queued.
pub struct Slot {
    pipeline: Arc<Pipeline>,
    bytes: usize,
}

impl Pipeline {
    /// A slot for a publish of `bytes`, if within the bounds. Only the session takes
    /// slots, so the check cannot race another taker (a concurrent give-back only
    /// leaves more room).
    pub fn take(self: &Arc<Self>, bytes: usize) -> Option<Slot> {
        if self.publishes.load(Ordering::Acquire) >= MAX_PUBLISHES
            || self.bytes.load(Ordering::Acquire) + bytes > MAX_BYTES
        {
            return None;
        }
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.publishes.fetch_add(1, Ordering::AcqRel);
        Some(Slot {
            pipeline: self.clone(),
            bytes,
        })
    }

    /// Resolves once no publish of the session is in flight.
    pub async fn settled(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.publishes.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let p = &self.pipeline;
        p.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        if p.publishes.fetch_sub(1, Ordering::AcqRel) == 1 {
            p.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_count_and_bytes() {
        let p = Arc::new(Pipeline::default());
        let slots: Vec<Slot> = (0..MAX_PUBLISHES).map_while(|_| p.take(10)).collect();
        assert_eq!(slots.len(), MAX_PUBLISHES);
        assert!(p.take(0).is_none(), "over the count");
        drop(slots);
        let big = p.take(MAX_BYTES).expect("fits exactly");
        assert!(p.take(1).is_none(), "over the bytes");
        drop(big);
        assert!(
            p.take(MAX_BYTES + 1).is_none(),
            "larger than the bound alone"
        );
    }

    #[tokio::test]
    async fn settles_when_the_last_slot_goes() {
        let p = Arc::new(Pipeline::default());
        p.settled().await;
        let (a, b) = (p.take(1).unwrap(), p.take(1).unwrap());
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.settled().await }
        });
        tokio::task::yield_now().await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one publish still in flight");
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("settled")
            .unwrap();
    }
}

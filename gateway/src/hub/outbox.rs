//! A connection's bounded outbound queue, fed by the hub from any thread and drained by the
//! connection's task, which writes everything queued in one go. When the queue would
//! exceed its byte budget the connection is marked a slow consumer (4008): dropping
//! silently would be a lost message, so the client is made to reconnect and recover.

use super::Stream;
use broker_proto::CloseCode;
use bytes::Bytes;
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};
use tokio::sync::Notify;

/// What a queued frame is, for the session's delivery rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// A publication; `OutItem::offset` is its offset (0 in channels without history).
    Publication,
    /// The channel's stream restarted under `OutItem::stream`'s epoch.
    Reset,
    /// A push without an offset (Join, Leave).
    Push,
}

/// One queued push: a frame already encoded for this connection's encoding, shared with
/// every other recipient.
#[derive(Debug, Clone)]
pub struct OutItem {
    /// The channel and the epoch this frame belongs to.
    pub stream: Arc<Stream>,
    /// The subscription it was queued for: a frame queued before an unsubscribe must not
    /// reach the next subscription to the same channel.
    pub generation: u32,
    pub kind: ItemKind,
    pub offset: u64,
    pub frame: Bytes,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was full: the item is dropped and the connection is being closed.
    Overflow,
    /// The connection is already closing; the item is dropped.
    Closed,
}

#[derive(Default)]
struct State {
    items: VecDeque<OutItem>,
    bytes: usize,
    close: Option<CloseCode>,
}

pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    limit_bytes: usize,
}

impl Outbox {
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            state: Mutex::default(),
            notify: Notify::new(),
            limit_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, item: OutItem) -> Pushed {
        let mut s = self.lock();
        if s.close.is_some() {
            return Pushed::Closed;
        }
        let len = item.frame.len();
        if s.bytes + len > self.limit_bytes {
            s.close = Some(CloseCode::SlowConsumer);
            drop(s);
            self.notify.notify_one();
            return Pushed::Overflow;
        }
        let wake = s.items.is_empty();
        s.bytes += len;
        s.items.push_back(item);
        drop(s);
        // Only the push that makes the queue non-empty wakes the session: the session
        // drains everything, so later pushes ride along with that one write.
        if wake {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Asks the session to close with `code`; the first request wins.
    pub fn close(&self, code: CloseCode) {
        let mut s = self.lock();
        if s.close.is_none() {
            s.close = Some(code);
            drop(s);
            self.notify.notify_one();
        }
    }

    pub fn closing(&self) -> Option<CloseCode> {
        self.lock().close
    }

    /// Moves every queued item into `into` (which should be empty) and reports a
    /// pending close. Swapping keeps the lock held for a moment only.
    pub fn drain(&self, into: &mut VecDeque<OutItem>) -> Option<CloseCode> {
        let mut s = self.lock();
        std::mem::swap(&mut s.items, into);
        s.bytes = 0;
        s.close
    }

    /// Resolves when something was pushed or a close was requested.
    pub async fn wait(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize) -> OutItem {
        OutItem {
            stream: Arc::new(Stream::new("c".into(), String::new())),
            generation: 1,
            kind: ItemKind::Publication,
            offset: 1,
            frame: Bytes::from(vec![0; n]),
        }
    }

    #[test]
    fn overflow_marks_slow_consumer_and_drops_later_pushes() {
        let o = Outbox::new(100);
        assert_eq!(o.push(item(60)), Pushed::Queued);
        assert_eq!(o.push(item(60)), Pushed::Overflow);
        assert_eq!(o.push(item(1)), Pushed::Closed);
        let mut out = VecDeque::new();
        assert_eq!(o.drain(&mut out), Some(CloseCode::SlowConsumer));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn draining_frees_the_budget() {
        let o = Outbox::new(100);
        let mut out = VecDeque::new();
        for _ in 0..10 {
            assert_eq!(o.push(item(90)), Pushed::Queued);
            assert_eq!(o.drain(&mut out), None);
            out.clear();
        }
        o.close(CloseCode::Draining);
        o.close(CloseCode::SlowConsumer);
        assert_eq!(o.closing(), Some(CloseCode::Draining));
    }
}

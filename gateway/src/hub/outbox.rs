//! A connection's bounded outbound queue, fed by the hub from any thread and drained by the
//! connection's task, which writes everything queued in one go. When the queue would
//! exceed its byte budget the connection is marked a slow consumer (4008): dropping
//! silently would be a lost message, so the client is made to reconnect and recover.
//!
//! Two lanes: pushes and replies, drained whole every time; and a bulk lane for blob
//! chunks, of which each drain takes a bounded amount, so small frames always go first and
//! chunks interleave between them. The bulk lane counts against the same budget; a
//! download waits for room in it ([`Outbox::wait_bulk_room`]) instead of filling it.

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
    /// A reply made off the connection's task (an RPC answer, a download error).
    Reply,
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
    bulk: VecDeque<Bytes>,
    bytes: usize,
    bulk_bytes: usize,
    close: Option<CloseCode>,
}

pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    /// Woken when the bulk lane shrinks or the connection closes.
    bulk_drained: Notify,
    /// Woken when a close is requested.
    closed: Notify,
    limit_bytes: usize,
}

impl Outbox {
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            state: Mutex::default(),
            notify: Notify::new(),
            bulk_drained: Notify::new(),
            closed: Notify::new(),
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
            drop(s);
            self.close(CloseCode::SlowConsumer);
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

    /// Queues a reply made elsewhere (RPC, download errors). A reply may be larger than
    /// the whole budget (an RPC answer), so it is admitted while the queue is within the
    /// budget, whatever its own size: a client that stops reading holds at most the
    /// budget plus one reply before it is closed as a slow consumer.
    pub fn push_reply(&self, frame: Bytes) -> Pushed {
        let mut s = self.lock();
        if s.close.is_some() {
            return Pushed::Closed;
        }
        if s.bytes > self.limit_bytes {
            drop(s);
            self.close(CloseCode::SlowConsumer);
            return Pushed::Overflow;
        }
        s.bytes += frame.len();
        let wake = s.items.is_empty() && s.bulk.is_empty();
        s.items.push_back(OutItem {
            stream: Stream::none(),
            generation: 0,
            kind: ItemKind::Reply,
            offset: 0,
            frame,
        });
        drop(s);
        if wake {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Queues a blob chunk on the bulk lane.
    pub fn push_bulk(&self, frame: Bytes) -> Pushed {
        let mut s = self.lock();
        if s.close.is_some() {
            return Pushed::Closed;
        }
        let len = frame.len();
        if s.bytes + len > self.limit_bytes {
            drop(s);
            self.close(CloseCode::SlowConsumer);
            return Pushed::Overflow;
        }
        let wake = s.items.is_empty() && s.bulk.is_empty();
        s.bytes += len;
        s.bulk_bytes += len;
        s.bulk.push_back(frame);
        drop(s);
        if wake {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Resolves when the bulk lane holds fewer than `below` bytes, or the connection is
    /// closing (check [`Outbox::closing`]).
    pub async fn wait_bulk_room(&self, below: usize) {
        loop {
            let drained = self.bulk_drained.notified();
            {
                let s = self.lock();
                if s.bulk_bytes < below || s.close.is_some() {
                    return;
                }
            }
            drained.await;
        }
    }

    /// Asks the session to close with `code`; the first request wins.
    pub fn close(&self, code: CloseCode) {
        let mut s = self.lock();
        if s.close.is_none() {
            s.close = Some(code);
            drop(s);
            self.notify.notify_one();
            self.bulk_drained.notify_waiters();
            self.closed.notify_waiters();
        }
    }

    /// Resolves once a close is requested (at once if it was already).
    pub async fn closed(&self) {
        loop {
            let requested = self.closed.notified();
            if self.closing().is_some() {
                return;
            }
            requested.await;
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
        s.bytes = s.bulk_bytes;
        s.close
    }

    /// Moves up to about `max_bytes` of bulk frames into `into`; if some remain, the
    /// session is woken again so they follow on its next turn.
    pub fn drain_bulk(&self, into: &mut Vec<Bytes>, max_bytes: usize) {
        let mut s = self.lock();
        let mut taken = 0;
        while taken < max_bytes {
            let Some(frame) = s.bulk.pop_front() else {
                break;
            };
            taken += frame.len();
            into.push(frame);
        }
        s.bulk_bytes -= taken;
        s.bytes -= taken;
        let more = !s.bulk.is_empty();
        drop(s);
        if taken > 0 {
            self.bulk_drained.notify_waiters();
        }
        if more {
            self.notify.notify_one();
        }
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
    fn a_reply_larger_than_the_budget_goes_out_but_a_second_unread_one_closes() {
        let o = Outbox::new(100);
        assert_eq!(o.push_reply(Bytes::from(vec![0; 1000])), Pushed::Queued);
        assert_eq!(o.push_reply(Bytes::from(vec![0; 10])), Pushed::Overflow);
        assert_eq!(o.closing(), Some(CloseCode::SlowConsumer));
        let o = Outbox::new(100);
        assert_eq!(o.push_reply(Bytes::from(vec![0; 1000])), Pushed::Queued);
        let mut out = VecDeque::new();
        assert_eq!(o.drain(&mut out), None);
        assert_eq!(
            o.push_reply(Bytes::from(vec![0; 1000])),
            Pushed::Queued,
            "read meanwhile"
        );
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
    fn bulk_frames_go_out_a_little_at_a_time_after_everything_else() {
        let o = Outbox::new(1000);
        assert_eq!(o.push_bulk(Bytes::from(vec![1; 100])), Pushed::Queued);
        assert_eq!(o.push_bulk(Bytes::from(vec![2; 100])), Pushed::Queued);
        assert_eq!(o.push(item(10)), Pushed::Queued);
        let (mut items, mut bulk) = (VecDeque::new(), Vec::new());
        o.drain(&mut items);
        o.drain_bulk(&mut bulk, 100);
        assert_eq!((items.len(), bulk.len()), (1, 1), "one chunk per turn");
        assert_eq!(o.push(item(10)), Pushed::Queued);
        items.clear();
        bulk.clear();
        o.drain(&mut items);
        o.drain_bulk(&mut bulk, 100);
        assert_eq!(
            (items.len(), bulk[0][0]),
            (1, 2),
            "the small one still first"
        );
        assert_eq!(o.push_bulk(Bytes::from(vec![3; 1001])), Pushed::Overflow);
    }

    #[tokio::test]
    async fn a_download_waits_for_room_in_the_bulk_lane() {
        let o = std::sync::Arc::new(Outbox::new(10_000));
        o.push_bulk(Bytes::from(vec![0; 300]));
        let waiting = tokio::spawn({
            let o = o.clone();
            async move { o.wait_bulk_room(200).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let mut bulk = Vec::new();
        o.drain_bulk(&mut bulk, 1000);
        waiting.await.unwrap();
    }

    #[test]
    fn a_reply_larger_than_the_budget_counts_against_it() {
        let o = Outbox::new(100);
        assert_eq!(o.push_reply(Bytes::from(vec![0; 1000])), Pushed::Queued);
        assert_eq!(
            o.push(item(60)),
            Pushed::Overflow,
            "the reply filled the queue"
        );
        let o = Outbox::new(100);
        assert_eq!(o.push_reply(Bytes::from(vec![0; 1000])), Pushed::Queued);
        let mut out = VecDeque::new();
        assert_eq!(o.drain(&mut out), None);
        assert_eq!(out[0].kind, ItemKind::Reply);
        assert_eq!(o.push(item(60)), Pushed::Queued, "written meanwhile");
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

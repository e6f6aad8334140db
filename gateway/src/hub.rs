//! The node-local tables: which sessions on this node subscribe to which channel, with
//! fan-out to them, and which sessions are live (for draining, the connection limit and
//! disconnecting a user). A publication is encoded once per encoding in use on the channel
//! and the same bytes are queued to every subscriber: no per-subscriber encode or copy.
//!
//! No sockets here: tests drive the hub with outboxes directly.

use crate::{
    metrics::Metrics,
    session::outbox::{OutItem, Outbox, Pushed},
};
use broker_proto::{CloseCode, Encoding, encode_frame, v1::ServerFrame};
use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, MutexGuard},
};

const SHARDS: usize = 64;

pub type SessionId = u64;

#[derive(Clone)]
pub struct Subscriber {
    pub session: SessionId,
    pub encoding: Encoding,
    pub outbox: Arc<Outbox>,
}

#[derive(Default)]
struct Channel {
    subscribers: Vec<Subscriber>,
    json: usize,
}

type Shard = HashMap<Arc<str>, Channel>;

struct LiveSession {
    user: String,
    outbox: Arc<Outbox>,
}

/// Sent through an outbox in place of a publication when a channel's stream restarted
/// (new epoch): the session forgets the channel's last offset, since offsets start again.
pub const STREAM_RESET: u64 = u64::MAX;

pub struct Hub {
    shards: Box<[Mutex<Shard>]>,
    sessions: Mutex<HashMap<SessionId, LiveSession>>,
    hasher: RandomState,
    metrics: Metrics,
}

/// What [`Hub::subscribe`] / [`Hub::unsubscribe`] changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Membership {
    /// First local subscriber / last one gone: the broker must (un)subscribe the node.
    NodeChanged,
    Changed,
    Unchanged,
}

impl Hub {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            sessions: Mutex::default(),
            hasher: RandomState::new(),
            metrics,
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<SessionId, LiveSession>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, id: SessionId, user: String, outbox: Arc<Outbox>) {
        let mut sessions = self.sessions();
        sessions.insert(id, LiveSession { user, outbox });
        self.metrics.connections.set(sessions.len() as f64);
    }

    pub fn unregister(&self, id: SessionId) {
        let mut sessions = self.sessions();
        sessions.remove(&id);
        self.metrics.connections.set(sessions.len() as f64);
    }

    pub fn connection_count(&self) -> usize {
        self.sessions().len()
    }

    /// Asks up to `max` sessions to close with `code`; returns how many were asked.
    pub fn close_sessions(&self, code: CloseCode, max: usize) -> usize {
        let sessions = self.sessions();
        let open = sessions
            .values()
            .filter(|s| s.outbox.closing().is_none())
            .take(max);
        open.map(|s| s.outbox.close(code)).count()
    }

    /// Closes every connection of `user` on this node; returns how many.
    pub fn disconnect_user(&self, user: &str, code: CloseCode) -> usize {
        let sessions = self.sessions();
        let matching = sessions.values().filter(|s| s.user == user);
        matching.map(|s| s.outbox.close(code)).count()
    }

    /// Tells every local subscriber of `channel` that its stream restarted (new epoch).
    pub fn reset(&self, channel: &str) {
        let shard = self.shard(channel);
        let Some((key, entry)) = shard.get_key_value(channel) else {
            return;
        };
        for sub in &entry.subscribers {
            let item = OutItem {
                channel: key.clone(),
                offset: STREAM_RESET,
                frame: bytes::Bytes::new(),
            };
            sub.outbox.push(item);
        }
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, Shard> {
        let i = self.hasher.hash_one(channel) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a subscriber; returns the shared channel key the session should keep.
    pub fn subscribe(&self, channel: &Arc<str>, sub: Subscriber) -> Membership {
        let mut shard = self.shard(channel);
        let entry = shard.entry(channel.clone()).or_default();
        if entry.subscribers.iter().any(|s| s.session == sub.session) {
            return Membership::Unchanged;
        }
        entry.json += usize::from(sub.encoding == Encoding::Json);
        entry.subscribers.push(sub);
        self.metrics.subscriptions.increment(1.0);
        if entry.subscribers.len() == 1 {
            self.metrics.channels.increment(1.0);
            Membership::NodeChanged
        } else {
            Membership::Changed
        }
    }

    pub fn unsubscribe(&self, channel: &str, session: SessionId) -> Membership {
        let mut shard = self.shard(channel);
        let Some(entry) = shard.get_mut(channel) else {
            return Membership::Unchanged;
        };
        let Some(i) = entry.subscribers.iter().position(|s| s.session == session) else {
            return Membership::Unchanged;
        };
        let sub = entry.subscribers.swap_remove(i);
        entry.json -= usize::from(sub.encoding == Encoding::Json);
        self.metrics.subscriptions.decrement(1.0);
        if entry.subscribers.is_empty() {
            shard.remove(channel);
            self.metrics.channels.decrement(1.0);
            Membership::NodeChanged
        } else {
            Membership::Changed
        }
    }

    /// Queues `frame` to every local subscriber of `channel`; returns how many got it.
    pub fn deliver(&self, channel: &str, offset: u64, frame: &ServerFrame) -> usize {
        let shard = self.shard(channel);
        let Some((key, entry)) = shard.get_key_value(channel) else {
            return 0;
        };
        let proto =
            (entry.subscribers.len() > entry.json).then(|| encode_frame(Encoding::Proto, frame));
        let json = (entry.json > 0).then(|| encode_frame(Encoding::Json, frame));
        let (mut delivered, mut dropped) = (0, 0);
        for sub in &entry.subscribers {
            let bytes = match sub.encoding {
                Encoding::Proto => proto.as_ref(),
                Encoding::Json => json.as_ref(),
            };
            let Some(bytes) = bytes else { continue };
            let item = OutItem {
                channel: key.clone(),
                offset,
                frame: bytes.clone(),
            };
            match sub.outbox.push(item) {
                Pushed::Queued => delivered += 1,
                Pushed::Overflow => dropped += 1,
                // Already closing for another reason; the client recovers on reconnect.
                Pushed::Closed => {}
            }
        }
        drop(shard);
        self.metrics.deliveries.increment(delivered as u64);
        if dropped > 0 {
            self.metrics.slow_consumer_drops.increment(dropped as u64);
        }
        delivered
    }

    /// Channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.shard(channel)
            .get(channel)
            .map_or(0, |c| c.subscribers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_proto::v1::{Publication, server_frame::Body};
    use std::collections::VecDeque;

    fn sub(session: SessionId, encoding: Encoding) -> Subscriber {
        Subscriber {
            session,
            encoding,
            outbox: Arc::new(Outbox::new(1 << 16)),
        }
    }

    fn publication(offset: u64) -> ServerFrame {
        ServerFrame {
            id: 0,
            error: None,
            body: Some(Body::Publication(Publication {
                channel: "c".into(),
                offset,
                ..Default::default()
            })),
        }
    }

    fn drained(s: &Subscriber) -> VecDeque<OutItem> {
        let mut out = VecDeque::new();
        s.outbox.drain(&mut out);
        out
    }

    #[test]
    fn fans_out_one_encoding_shared_by_all_subscribers() {
        let hub = Hub::new(Metrics::detached());
        let c: Arc<str> = "c".into();
        let subs = [
            sub(1, Encoding::Proto),
            sub(2, Encoding::Proto),
            sub(3, Encoding::Json),
        ];
        assert_eq!(hub.subscribe(&c, subs[0].clone()), Membership::NodeChanged);
        assert_eq!(hub.subscribe(&c, subs[1].clone()), Membership::Changed);
        assert_eq!(hub.subscribe(&c, subs[2].clone()), Membership::Changed);
        assert_eq!(hub.subscribe(&c, subs[2].clone()), Membership::Unchanged);
        assert_eq!(hub.deliver("c", 7, &publication(7)), 3);
        assert_eq!(hub.deliver("other", 1, &publication(1)), 0);
        let (a, b, j) = (drained(&subs[0]), drained(&subs[1]), drained(&subs[2]));
        assert_eq!((a.len(), b.len(), j.len()), (1, 1, 1));
        assert_eq!(
            a[0].frame.as_ptr(),
            b[0].frame.as_ptr(),
            "proto subscribers share one buffer"
        );
        assert_eq!(j[0].frame[0], b'{', "json subscriber gets JSON");
        assert_eq!(a[0].offset, 7);
    }

    #[test]
    fn unsubscribe_reports_the_last_local_subscriber() {
        let hub = Hub::new(Metrics::detached());
        let c: Arc<str> = "c".into();
        hub.subscribe(&c, sub(1, Encoding::Json));
        hub.subscribe(&c, sub(2, Encoding::Proto));
        assert_eq!(hub.unsubscribe("c", 9), Membership::Unchanged);
        assert_eq!(hub.unsubscribe("c", 1), Membership::Changed);
        assert_eq!(hub.unsubscribe("c", 2), Membership::NodeChanged);
        assert_eq!(hub.subscriber_count("c"), 0);
    }
}

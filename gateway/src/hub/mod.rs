//! The node-local tables: which sessions on this node subscribe to which channel, with
//! fan-out to them, and which sessions are live (for draining, the connection limit and
//! disconnecting a user). A publication is encoded once per encoding in use on the channel
//! and the same bytes are queued to every subscriber: no per-subscriber encode or copy.
//!
//! Brokers call in here with publications in offset order; sessions read what was queued
//! for them from their [`Outbox`]. No sockets: tests drive the hub with outboxes directly.

pub mod outbox;

use crate::{blobs::signing::UrlSigner, clock::Clock, metrics::Metrics};
use broker_proto::{
    CloseCode, Encoding, encode_frame,
    v1::{Publication, Reset, ServerFrame, server_frame::Body},
};
use outbox::{ItemKind, OutItem, Outbox, Pushed};
use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, MutexGuard},
};

const SHARDS: usize = 64;

pub type SessionId = u64;

/// A channel's stream as one node currently knows it: the name and the epoch its
/// publications belong to. Shared by every item queued for the channel, and replaced
/// (never mutated) when the epoch changes, so a queued item keeps the epoch it had.
#[derive(Debug, PartialEq, Eq)]
pub struct Stream {
    pub channel: Arc<str>,
    pub epoch: String,
}

impl Stream {
    pub fn new(channel: Arc<str>, epoch: String) -> Self {
        Self { channel, epoch }
    }

    /// The stream of frames that belong to no channel (replies made off the session).
    pub fn none() -> Arc<Self> {
        static NONE: std::sync::OnceLock<Arc<Stream>> = std::sync::OnceLock::new();
        NONE.get_or_init(|| Arc::new(Stream::new("".into(), String::new())))
            .clone()
    }
}

#[derive(Clone)]
pub struct Subscriber {
    pub session: SessionId,
    pub encoding: Encoding,
    /// Which of the session's subscriptions to this channel (see `OutItem::generation`).
    pub generation: u32,
    pub outbox: Arc<Outbox>,
}

struct Channel {
    subscribers: Vec<Subscriber>,
    json: usize,
    stream: Arc<Stream>,
}

type Shard = HashMap<Arc<str>, Channel>;

struct LiveSession {
    /// `None` for anonymous sessions: one table entry per connection, kept small.
    user: Option<Box<str>>,
    outbox: Arc<Outbox>,
}

pub struct Hub {
    shards: Box<[Mutex<Shard>]>,
    sessions: Mutex<HashMap<SessionId, LiveSession>>,
    hasher: RandomState,
    metrics: Metrics,
    /// Signs the URLs of a publication's blobs, once per node per publication.
    urls: Arc<UrlSigner>,
    clock: Clock,
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
    /// A hub whose blob URLs stay unsigned until a key is set on its signer.
    pub fn new(metrics: Metrics) -> Self {
        Self::with_blob_urls(
            metrics,
            Arc::new(UrlSigner::new(std::time::Duration::from_secs(3600))),
            Clock::system(),
        )
    }

    pub fn with_blob_urls(metrics: Metrics, urls: Arc<UrlSigner>, clock: Clock) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            sessions: Mutex::default(),
            hasher: RandomState::new(),
            metrics,
            urls,
            clock,
        }
    }

    /// Fills in signed, expiring URLs for a publication's blobs (live delivery, history
    /// and recovery replies alike).
    pub fn sign_blobs(&self, publication: &mut Publication) {
        if publication.blobs.is_empty() {
            return;
        }
        let now = self.clock.unix_secs();
        for blob in &mut publication.blobs {
            if let Some(url) = self.urls.sign(&blob.id, &publication.channel, now) {
                blob.url = url;
            }
        }
    }

    pub fn blob_urls(&self) -> &Arc<UrlSigner> {
        &self.urls
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<SessionId, LiveSession>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a live session (or updates its user after `connect`).
    pub fn register(&self, id: SessionId, user: String, outbox: Arc<Outbox>) {
        let mut sessions = self.sessions();
        let user = (!user.is_empty()).then(|| user.into_boxed_str());
        sessions.insert(id, LiveSession { user, outbox });
        self.metrics.connections.set(sessions.len() as f64);
    }

    pub fn unregister(&self, id: SessionId) {
        let mut sessions = self.sessions();
        sessions.remove(&id);
        self.metrics.connections.set(sessions.len() as f64);
    }

    /// Wakes every session whose ping or idle check is due by `now` (the node-wide
    /// sweep, `session::Context::start_sweep`); returns how many.
    pub fn wake_due(&self, now: std::time::Instant) -> usize {
        self.sessions()
            .values()
            .filter(|s| s.outbox.wake_if_due(now))
            .count()
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
        let matching = sessions
            .values()
            .filter(|s| s.user.as_deref().unwrap_or("") == user);
        matching.map(|s| s.outbox.close(code)).count()
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, Shard> {
        let i = self.hasher.hash_one(channel) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a subscriber.
    pub fn subscribe(&self, channel: &Arc<str>, sub: Subscriber) -> Membership {
        let mut shard = self.shard(channel);
        let entry = shard.entry(channel.clone()).or_insert_with(|| Channel {
            subscribers: Vec::new(),
            json: 0,
            stream: Arc::new(Stream::new(channel.clone(), String::new())),
        });
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

    /// The channel's name as the hub holds it, for a subscriber to share rather than keep
    /// its own copy (one fewer allocation per subscription).
    pub fn shared_name(&self, channel: &str) -> Option<Arc<str>> {
        self.shard(channel)
            .get_key_value(channel)
            .map(|(name, _)| name.clone())
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

    /// Queues a publication to every local subscriber of its channel; returns how many
    /// got it. Callers deliver one channel's publications in offset order.
    pub fn deliver(&self, mut publication: Publication) -> usize {
        self.sign_blobs(&mut publication);
        let frame = push(Body::Publication(publication));
        let Some(Body::Publication(p)) = &frame.body else {
            return 0;
        };
        self.fan_out(
            &p.channel,
            ItemKind::Publication,
            p.offset,
            Some(&p.epoch),
            &frame,
        )
    }

    /// Queues a push without an offset (Join, Leave) to every local subscriber.
    pub fn deliver_push(&self, channel: &str, body: Body) -> usize {
        self.fan_out(channel, ItemKind::Push, 0, None, &push(body))
    }

    /// Tells every local subscriber that the channel's stream restarted under `epoch`.
    /// Publications of the old epoch still queued keep their old stream and are skipped.
    pub fn reset(&self, channel: &str, epoch: &str) -> usize {
        let frame = push(Body::Reset(Reset {
            channel: channel.to_owned(),
            epoch: epoch.to_owned(),
        }));
        self.fan_out(channel, ItemKind::Reset, 0, Some(epoch), &frame)
    }

    fn fan_out(
        &self,
        channel: &str,
        kind: ItemKind,
        offset: u64,
        epoch: Option<&str>,
        frame: &ServerFrame,
    ) -> usize {
        let mut shard = self.shard(channel);
        let Some(entry) = shard.get_mut(channel) else {
            return 0;
        };
        if let Some(epoch) = epoch
            && epoch != entry.stream.epoch
        {
            entry.stream = Arc::new(Stream::new(entry.stream.channel.clone(), epoch.to_owned()));
        }
        let proto =
            (entry.subscribers.len() > entry.json).then(|| encode_frame(Encoding::Proto, frame));
        let json = (entry.json > 0).then(|| encode_frame(Encoding::Json, frame));
        let (mut delivered, mut dropped) = (0, 0);
        // Written by this thread through the express lane (messages, payload bytes).
        let (mut written, mut written_bytes) = (0u64, 0u64);
        for sub in &entry.subscribers {
            let bytes = match sub.encoding {
                Encoding::Proto => proto.as_ref(),
                Encoding::Json => json.as_ref(),
            };
            let Some(bytes) = bytes else { continue };
            let item = OutItem {
                stream: entry.stream.clone(),
                generation: sub.generation,
                kind,
                offset,
                frame: bytes.clone(),
            };
            match sub.outbox.push(item) {
                Pushed::Queued => delivered += 1,
                Pushed::Written(bytes) => {
                    delivered += 1;
                    if bytes > 0 {
                        written += 1;
                        written_bytes += bytes as u64;
                    }
                }
                Pushed::Overflow => dropped += 1,
                // Already closing for another reason; the client recovers on reconnect.
                Pushed::Closed => {}
            }
        }
        drop(shard);
        if kind == ItemKind::Publication {
            self.metrics.deliveries.increment(delivered as u64);
        }
        if dropped > 0 {
            self.metrics.slow_consumer_drops.increment(dropped as u64);
        }
        if written > 0 {
            self.metrics.ws_messages_sent.increment(written);
            self.metrics.ws_bytes_sent.increment(written_bytes);
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

fn push(body: Body) -> ServerFrame {
    ServerFrame {
        id: 0,
        error: None,
        body: Some(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn sub(session: SessionId, encoding: Encoding) -> Subscriber {
        Subscriber {
            session,
            encoding,
            generation: 7,
            outbox: Arc::new(Outbox::new(1 << 16)),
        }
    }

    fn publication(offset: u64, epoch: &str) -> Publication {
        Publication {
            channel: "c".into(),
            offset,
            epoch: epoch.into(),
            ..Default::default()
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
        assert_eq!(hub.deliver(publication(7, "e")), 3);
        let mut other = publication(1, "e");
        other.channel = "other".into();
        assert_eq!(hub.deliver(other), 0);
        let (a, b, j) = (drained(&subs[0]), drained(&subs[1]), drained(&subs[2]));
        assert_eq!((a.len(), b.len(), j.len()), (1, 1, 1));
        assert_eq!(
            a[0].frame.as_ptr(),
            b[0].frame.as_ptr(),
            "proto subscribers share one buffer"
        );
        assert_eq!(j[0].frame[0], b'{', "json subscriber gets JSON");
        assert_eq!(
            (a[0].offset, a[0].kind, a[0].generation),
            (7, ItemKind::Publication, 7)
        );
        assert_eq!(a[0].stream.epoch, "e");
    }

    #[test]
    fn a_reset_gives_later_items_the_new_epoch_and_leaves_queued_ones_alone() {
        let hub = Hub::new(Metrics::detached());
        let c: Arc<str> = "c".into();
        let s = sub(1, Encoding::Proto);
        hub.subscribe(&c, s.clone());
        hub.deliver(publication(5, "old"));
        assert_eq!(hub.reset("c", "new"), 1);
        hub.deliver(publication(1, "new"));
        let items = drained(&s);
        let seen: Vec<_> = items
            .iter()
            .map(|i| (i.kind, i.offset, i.stream.epoch.as_str()))
            .collect();
        assert_eq!(
            seen,
            vec![
                (ItemKind::Publication, 5, "old"),
                (ItemKind::Reset, 0, "new"),
                (ItemKind::Publication, 1, "new"),
            ]
        );
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

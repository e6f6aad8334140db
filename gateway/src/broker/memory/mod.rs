//! The embedded broker: per-channel logs held in this process. Offsets, epochs, history
//! with size and TTL, idempotency keys and presence, with the same semantics the Redis
//! broker gives across nodes.
//!
//! Publications reach the hub while the channel's shard is held, so concurrent publishers
//! to one channel are delivered in offset order. A channel's log (and with it its epoch)
//! is forgotten only when it has been idle long enough *and* no local session subscribes
//! to it: a subscriber is never left holding offsets of a stream that quietly restarted.

pub mod blobs;
mod log;

pub use log::{Appended, ChannelLog, MIN_IDEMPOTENCY_TTL};

use super::{
    Broker, BrokerError, HistoryPage, NodeInfo, Position, PresenceChange, PublishRequest, presence,
};
use crate::{
    channel::ChannelName,
    clock::Clock,
    config::{NamespaceOptions, Namespaces},
    hub::Hub,
};
use async_trait::async_trait;
use broker_proto::v1::ClientInfo;
use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

const SHARDS: usize = 32;

#[derive(Default)]
struct Shard {
    logs: HashMap<ChannelName, ChannelLog>,
    presence: HashMap<ChannelName, HashMap<Box<str>, Member>>,
    /// Local subscriptions per channel (sessions that called `subscribe`).
    subscribed: HashMap<ChannelName, usize>,
}

/// A present client's user and display name, by its client id; `None` for an anonymous
/// client without a name, the common case, which then costs its id and a pointer.
type Member = Option<Box<(String, String)>>;

fn member(client: &ClientInfo) -> Member {
    (!(client.user.is_empty() && client.name.is_empty()))
        .then(|| Box::new((client.user.clone(), client.name.clone())))
}

fn client_info(client: &str, member: &Member) -> ClientInfo {
    let (user, name) = member.as_deref().cloned().unwrap_or_default();
    ClientInfo {
        user,
        client: client.to_owned(),
        name,
    }
}

impl Shard {
    fn log(&mut self, channel: &ChannelName, now: Instant) -> &mut ChannelLog {
        self.logs
            .entry(channel.clone())
            .or_insert_with(|| ChannelLog::new(now))
    }
}

/// The in-process [`Broker`].
pub struct MemoryBroker {
    hub: Arc<Hub>,
    namespaces: Namespaces,
    clock: Clock,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    blobs: blobs::MemoryBlobs,
    /// Secrets are this process's own: there is no other node to share them with.
    secrets: Mutex<HashMap<String, Vec<u8>>>,
}

/// The blob store's size when none is configured (tests).
const DEFAULT_BLOB_BYTES: usize = 256 << 20;

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>, namespaces: Namespaces, clock: Clock) -> Self {
        Self::with_blob_store(hub, namespaces, clock, DEFAULT_BLOB_BYTES)
    }

    /// With an embedded blob store of `blob_bytes` bytes.
    pub fn with_blob_store(
        hub: Arc<Hub>,
        namespaces: Namespaces,
        clock: Clock,
        blob_bytes: usize,
    ) -> Self {
        Self {
            hub,
            namespaces,
            blobs: blobs::MemoryBlobs::new(blob_bytes, clock.clone()),
            clock,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            secrets: Mutex::default(),
        }
    }

    fn shard(&self, channel: &ChannelName) -> MutexGuard<'_, Shard> {
        let i = self.hasher.hash_one(channel) as usize % SHARDS;
        // A panic while holding a shard cannot leave a log half-updated in a way later
        // calls would misread, so a poisoned lock is taken over.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets channels that are idle and have no local subscriber. Their epoch goes with
    /// them, so a client recovering from them later gets `recovered=false`.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let Shard {
                logs, subscribed, ..
            } = &mut *shard;
            let before = logs.len();
            logs.retain(|name, log| {
                subscribed.contains_key(name) || !log.idle(&self.namespaces.options(name), now)
            });
            removed += before - logs.len();
        }
        removed
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
    ) -> Result<Position, BrokerError> {
        let now = self.clock.now();
        let mut shard = self.shard(channel);
        let log = shard.log(channel, now);
        match log.append(channel, options, request, now, self.clock.unix_ms()) {
            Appended::Duplicate(position) => Ok(position),
            Appended::New(position, publication) => {
                // Delivered while the shard is held: concurrent publishers to one channel
                // reach the hub in offset order.
                self.hub.deliver(publication);
                Ok(position)
            }
        }
    }

    async fn history(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        since: u64,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        let now = self.clock.now();
        Ok(self
            .shard(channel)
            .log(channel, now)
            .history(options, since, limit, now))
    }

    async fn position(&self, channel: &ChannelName) -> Result<Position, BrokerError> {
        let now = self.clock.now();
        Ok(self.shard(channel).log(channel, now).position())
    }

    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        // Every publication is handed to this node's hub already; the count keeps the
        // channel's log (and epoch) alive while anyone subscribes.
        *self
            .shard(channel)
            .subscribed
            .entry(channel.clone())
            .or_default() += 1;
        Ok(())
    }

    async fn unsubscribe(&self, channel: &ChannelName) {
        let mut shard = self.shard(channel);
        if let Some(n) = shard.subscribed.get_mut(channel) {
            *n -= 1;
            if *n == 0 {
                shard.subscribed.remove(channel);
            }
        }
    }

    async fn presence_update(
        &self,
        channel: &ChannelName,
        client: ClientInfo,
        change: PresenceChange,
        announce: bool,
    ) -> Result<(), BrokerError> {
        let mut shard = self.shard(channel);
        let changed = match change {
            PresenceChange::Join => shard
                .presence
                .entry(channel.clone())
                .or_default()
                .insert(client.client.as_str().into(), member(&client))
                .is_none(),
            PresenceChange::Leave => {
                let Some(members) = shard.presence.get_mut(channel) else {
                    return Ok(());
                };
                let removed = members.remove(client.client.as_str()).is_some();
                if members.is_empty() {
                    shard.presence.remove(channel);
                }
                removed
            }
        };
        if announce && changed {
            self.hub.deliver_push(
                channel.as_str(),
                presence::announcement(channel, client, change),
            );
        }
        Ok(())
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, BrokerError> {
        let mut clients: Vec<ClientInfo> = self
            .shard(channel)
            .presence
            .get(channel)
            .map(|m| m.iter().map(|(c, m)| client_info(c, m)).collect())
            .unwrap_or_default();
        presence::sort(&mut clients);
        Ok(clients)
    }

    async fn disconnect_user(&self, user: &str) -> Result<(), BrokerError> {
        self.hub
            .disconnect_user(user, broker_proto::CloseCode::Disconnected);
        Ok(())
    }

    async fn nodes(&self, this: &NodeInfo) -> Result<Vec<NodeInfo>, BrokerError> {
        Ok(vec![this.clone()])
    }

    async fn upkeep(&self, _this: &NodeInfo) {
        self.sweep(self.clock.now());
    }

    fn blobs(&self) -> &dyn super::blobs::BlobStore {
        &self.blobs
    }

    async fn shared_secret(&self, name: &str) -> Result<Vec<u8>, BrokerError> {
        let mut secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        Ok(secrets
            .entry(name.to_owned())
            .or_insert_with(|| rand::random::<[u8; 32]>().to_vec())
            .clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::NamespaceOptions,
        hub::{Subscriber, outbox::Outbox},
        metrics::Metrics,
    };
    use std::time::Duration;

    fn broker(ttl: u64) -> (Arc<Hub>, MemoryBroker) {
        let hub = Arc::new(Hub::new(Metrics::detached()));
        let options = NamespaceOptions {
            history_ttl_seconds: ttl,
            ..Default::default()
        };
        let namespaces = Namespaces::new(HashMap::from([("default".to_owned(), options)]));
        let broker = MemoryBroker::new(hub.clone(), namespaces, Clock::system());
        (hub, broker)
    }

    #[tokio::test]
    async fn sweep_forgets_idle_channels_nobody_subscribes_to() {
        let (_, broker) = broker(60);
        let ch = ChannelName::parse("c").unwrap();
        let o = broker.namespaces.options(&ch);
        let t = broker.clock.now();
        let first = broker
            .publish(&ch, &o, PublishRequest::default())
            .await
            .unwrap();
        assert_eq!(broker.sweep(t + Duration::from_secs(59)), 0);
        assert_eq!(broker.sweep(t + Duration::from_secs(61)), 1);
        let again = broker.position(&ch).await.unwrap();
        assert_ne!(again.epoch, first.epoch, "a forgotten stream restarts");
        assert_eq!(again.offset, 0);
    }

    /// The reproduced defect: a quiet room with live subscribers was swept and its next
    /// publications reused offsets the subscribers already had under a new epoch.
    #[tokio::test]
    async fn a_channel_with_subscribers_is_never_swept() {
        let (hub, broker) = broker(5);
        let ch = ChannelName::parse("c").unwrap();
        let o = broker.namespaces.options(&ch);
        let outbox = Arc::new(Outbox::new(1 << 16));
        hub.subscribe(
            ch.shared(),
            Subscriber {
                session: 1,
                encoding: broker_proto::Encoding::Proto,
                generation: 1,
                outbox,
            },
        );
        broker.subscribe(&ch).await.unwrap();
        let t = broker.clock.now();
        let first = broker
            .publish(&ch, &o, PublishRequest::default())
            .await
            .unwrap();
        assert_eq!(broker.sweep(t + Duration::from_secs(600)), 0);
        let next = broker
            .publish(&ch, &o, PublishRequest::default())
            .await
            .unwrap();
        assert_eq!((next.offset, &next.epoch), (2, &first.epoch));
        broker.unsubscribe(&ch).await;
        assert_eq!(broker.sweep(t + Duration::from_secs(600)), 1);
    }
}

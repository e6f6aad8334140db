//! The embedded broker: per-channel logs held in this process. Offsets, epochs, history
//! with size and TTL, idempotency keys and presence, with the same semantics the Redis
//! broker gives across nodes.
//!
//! [`ChannelLog`] is the whole of the stream logic as a plain data structure driven with
//! explicit time, so tests exercise trimming and expiry without sleeping.

use super::{Broker, BrokerError, HistoryPage, NodeInfo, Position, PresenceChange, PublishRequest};
use crate::{channel::ChannelName, config::NamespaceOptions, hub::Hub};
use async_trait::async_trait;
use broker_proto::v1::{ClientInfo, Join, Leave, Publication, ServerFrame, server_frame::Body};
use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

/// Idempotency keys are remembered at least this long, even in channels without history.
const MIN_IDEMPOTENCY_TTL: Duration = Duration::from_secs(60);
const SHARDS: usize = 32;

pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// One channel's stream: the offset counter, the epoch and the retained publications.
#[derive(Debug)]
pub struct ChannelLog {
    epoch: String,
    offset: u64,
    entries: VecDeque<(Instant, Publication)>,
    idempotency: HashMap<String, (Instant, Position)>,
    last_publish: Instant,
}

/// What [`ChannelLog::append`] decided.
#[derive(Debug, PartialEq)]
pub enum Appended {
    /// A new publication, to be delivered.
    New(Position, Publication),
    /// A retry of an earlier publish: its first result, not delivered again.
    Duplicate(Position),
}

impl ChannelLog {
    pub fn new(now: Instant) -> Self {
        Self {
            epoch: new_epoch(),
            offset: 0,
            entries: VecDeque::new(),
            idempotency: HashMap::new(),
            last_publish: now,
        }
    }

    pub fn position(&self) -> Position {
        Position {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    pub fn append(
        &mut self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
        now: Instant,
        wall_ms: i64,
    ) -> Appended {
        self.expire(options, now);
        if !request.idempotency_key.is_empty()
            && let Some((_, position)) = self.idempotency.get(&request.idempotency_key)
        {
            return Appended::Duplicate(position.clone());
        }
        let history = options.has_history();
        let (offset, epoch) = if history {
            self.offset += 1;
            (self.offset, self.epoch.clone())
        } else {
            (0, String::new())
        };
        let publication = Publication {
            channel: channel.as_str().to_owned(),
            offset,
            epoch: epoch.clone(),
            data: request.data,
            content_type: request.content_type,
            info: request.info,
            time_unix_ms: wall_ms,
        };
        let position = Position { offset, epoch };
        if history {
            self.entries.push_back((now, publication.clone()));
            while self.entries.len() > options.history_size {
                self.entries.pop_front();
            }
        }
        if !request.idempotency_key.is_empty() {
            self.idempotency
                .insert(request.idempotency_key, (now, position.clone()));
        }
        self.last_publish = now;
        Appended::New(position, publication)
    }

    /// Drops publications older than the history TTL and forgotten idempotency keys.
    pub fn expire(&mut self, options: &NamespaceOptions, now: Instant) {
        let ttl = options.history_ttl();
        while self
            .entries
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= ttl)
        {
            self.entries.pop_front();
        }
        let key_ttl = ttl.max(MIN_IDEMPOTENCY_TTL);
        self.idempotency
            .retain(|_, (at, _)| now.duration_since(*at) < key_ttl);
    }

    pub fn history(
        &mut self,
        options: &NamespaceOptions,
        since: u64,
        limit: usize,
        now: Instant,
    ) -> HistoryPage {
        self.expire(options, now);
        let publications: Vec<Publication> = self
            .entries
            .iter()
            .map(|(_, p)| p)
            .filter(|p| p.offset > since)
            .take(if limit == 0 { usize::MAX } else { limit })
            .cloned()
            .collect();
        let complete = match publications.first() {
            Some(first) => first.offset == since + 1,
            None => since == self.offset,
        };
        HistoryPage {
            position: self.position(),
            publications,
            complete,
        }
    }

    /// Whether nothing would be lost by forgetting this log (its epoch goes with it).
    fn idle(&self, options: &NamespaceOptions, now: Instant) -> bool {
        let keep = options.history_ttl().max(MIN_IDEMPOTENCY_TTL);
        now.duration_since(self.last_publish) >= keep
    }
}

struct Shard {
    logs: HashMap<ChannelName, ChannelLog>,
    presence: HashMap<ChannelName, HashMap<String, ClientInfo>>,
}

/// The in-process [`Broker`].
pub struct MemoryBroker {
    hub: Arc<Hub>,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    logs: HashMap::new(),
                    presence: HashMap::new(),
                })
            })
            .collect();
        Self {
            hub,
            shards,
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, channel: &ChannelName) -> std::sync::MutexGuard<'_, Shard> {
        let i = self.hasher.hash_one(channel) as usize % SHARDS;
        // A panic while holding a shard cannot leave a log half-updated in a way later
        // calls would misread, so a poisoned lock is taken over.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets channels that have neither recent publications nor presence. Their epoch
    /// is gone with them, so a client recovering from them later gets `recovered=false`.
    pub fn sweep(&self, options: impl Fn(&ChannelName) -> NamespaceOptions, now: Instant) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let before = shard.logs.len();
            shard
                .logs
                .retain(|name, log| !log.idle(&options(name), now));
            removed += before - shard.logs.len();
        }
        removed
    }
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
    ) -> Result<Position, BrokerError> {
        let now = Instant::now();
        let mut shard = self.shard(channel);
        let log = shard
            .logs
            .entry(channel.clone())
            .or_insert_with(|| ChannelLog::new(now));
        match log.append(channel, options, request, now, wall_ms()) {
            Appended::Duplicate(position) => Ok(position),
            Appended::New(position, publication) => {
                // Delivered while the shard is held, so concurrent publishers to one
                // channel reach the hub in offset order.
                let frame = ServerFrame {
                    id: 0,
                    error: None,
                    body: Some(Body::Publication(publication)),
                };
                self.hub.deliver(channel.as_str(), position.offset, &frame);
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
        let now = Instant::now();
        let mut shard = self.shard(channel);
        let log = shard
            .logs
            .entry(channel.clone())
            .or_insert_with(|| ChannelLog::new(now));
        Ok(log.history(options, since, limit, now))
    }

    async fn position(&self, channel: &ChannelName) -> Result<Position, BrokerError> {
        let now = Instant::now();
        let mut shard = self.shard(channel);
        Ok(shard
            .logs
            .entry(channel.clone())
            .or_insert_with(|| ChannelLog::new(now))
            .position())
    }

    async fn subscribe(&self, _channel: &ChannelName) -> Result<(), BrokerError> {
        // Every publication is handed to this node's hub already.
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &ChannelName) {}

    async fn presence_update(
        &self,
        channel: &ChannelName,
        client: ClientInfo,
        change: PresenceChange,
        announce: bool,
    ) -> Result<(), BrokerError> {
        let mut shard = self.shard(channel);
        let changed = match change {
            PresenceChange::Join => {
                let members = shard.presence.entry(channel.clone()).or_default();
                members
                    .insert(client.client.clone(), client.clone())
                    .is_none()
            }
            PresenceChange::Leave => {
                let members = shard.presence.get_mut(channel);
                let removed = members
                    .as_ref()
                    .is_some_and(|m| m.contains_key(&client.client));
                if let Some(m) = members {
                    m.remove(&client.client);
                    if m.is_empty() {
                        shard.presence.remove(channel);
                    }
                }
                removed
            }
        };
        if announce && changed {
            let c = channel.as_str().to_owned();
            let body = match change {
                PresenceChange::Join => Body::Join(Join {
                    channel: c,
                    info: Some(client),
                }),
                PresenceChange::Leave => Body::Leave(Leave {
                    channel: c,
                    info: Some(client),
                }),
            };
            self.hub.deliver(
                channel.as_str(),
                0,
                &ServerFrame {
                    id: 0,
                    error: None,
                    body: Some(body),
                },
            );
        }
        Ok(())
    }

    async fn disconnect_user(&self, user: &str) -> Result<(), BrokerError> {
        self.hub
            .disconnect_user(user, broker_proto::CloseCode::Disconnected);
        Ok(())
    }

    async fn heartbeat(&self, _info: &NodeInfo) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn nodes(&self, this: &NodeInfo) -> Result<Vec<NodeInfo>, BrokerError> {
        Ok(vec![this.clone()])
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, BrokerError> {
        let shard = self.shard(channel);
        let mut clients: Vec<ClientInfo> = shard
            .presence
            .get(channel)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        clients.sort_by(|a, b| (&a.user, &a.client).cmp(&(&b.user, &b.client)));
        Ok(clients)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn opts(size: usize, ttl: u64) -> NamespaceOptions {
        NamespaceOptions {
            history_size: size,
            history_ttl_seconds: ttl,
            ..NamespaceOptions::default()
        }
    }

    fn req(data: &'static str, key: &str) -> PublishRequest {
        PublishRequest {
            data: Bytes::from_static(data.as_bytes()),
            idempotency_key: key.into(),
            ..Default::default()
        }
    }

    fn offsets(page: &HistoryPage) -> Vec<u64> {
        page.publications.iter().map(|p| p.offset).collect()
    }

    #[test]
    fn offsets_are_gapless_and_history_is_bounded() {
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(3, 60);
        let t = Instant::now();
        let mut log = ChannelLog::new(t);
        for i in 1..=5u64 {
            match log.append(&ch, &o, req("x", ""), t, 0) {
                Appended::New(p, publication) => assert_eq!((p.offset, publication.offset), (i, i)),
                other => panic!("{other:?}"),
            }
        }
        let page = log.history(&o, 0, 0, t);
        assert_eq!(offsets(&page), vec![3, 4, 5]);
        assert!(!page.complete, "offsets 1 and 2 were trimmed");
        let page = log.history(&o, 2, 0, t);
        assert!(page.complete);
        let page = log.history(&o, 3, 1, t);
        assert_eq!((offsets(&page), page.complete), (vec![4], true));
        let page = log.history(&o, 5, 0, t);
        assert!(page.complete && page.publications.is_empty());
        assert!(
            !log.history(&o, 9, 0, t).complete,
            "an offset from the future is not recoverable"
        );
    }

    #[test]
    fn history_expires_by_ttl() {
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(10, 5);
        let t = Instant::now();
        let mut log = ChannelLog::new(t);
        log.append(&ch, &o, req("a", ""), t, 0);
        log.append(&ch, &o, req("b", ""), t + Duration::from_secs(3), 0);
        let page = log.history(&o, 0, 0, t + Duration::from_secs(6));
        assert_eq!(offsets(&page), vec![2]);
        assert!(!page.complete);
        assert_eq!(
            page.position.offset, 2,
            "the offset counter survives expiry"
        );
    }

    #[test]
    fn idempotency_key_returns_the_first_result() {
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(10, 5);
        let t = Instant::now();
        let mut log = ChannelLog::new(t);
        let Appended::New(first, _) = log.append(&ch, &o, req("a", "k1"), t, 0) else {
            panic!()
        };
        assert_eq!(
            log.append(&ch, &o, req("a", "k1"), t, 0),
            Appended::Duplicate(first.clone())
        );
        assert!(
            matches!(log.append(&ch, &o, req("a", "k2"), t, 0), Appended::New(p, _) if p.offset == 2)
        );
        // Keys are remembered at least a minute, then forgotten.
        let later = t + MIN_IDEMPOTENCY_TTL;
        assert!(
            matches!(log.append(&ch, &o, req("a", "k1"), later, 0), Appended::New(p, _) if p.offset == 3)
        );
    }

    #[test]
    fn channels_without_history_get_no_offsets() {
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(0, 60);
        let t = Instant::now();
        let mut log = ChannelLog::new(t);
        let Appended::New(p, _) = log.append(&ch, &o, req("a", ""), t, 0) else {
            panic!()
        };
        assert_eq!(
            p,
            Position {
                offset: 0,
                epoch: String::new()
            }
        );
        assert!(log.history(&o, 0, 0, t).publications.is_empty());
    }

    #[test]
    fn sweep_forgets_idle_channels_and_their_epoch() {
        let hub = Arc::new(Hub::new(crate::metrics::Metrics::detached()));
        let broker = MemoryBroker::new(hub);
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(10, 60);
        let t = Instant::now();
        let epoch = {
            let mut shard = broker.shard(&ch);
            let log = shard
                .logs
                .entry(ch.clone())
                .or_insert_with(|| ChannelLog::new(t));
            log.append(&ch, &o, req("a", ""), t, 0);
            log.position().epoch
        };
        assert_eq!(broker.sweep(|_| o, t + Duration::from_secs(59)), 0);
        assert_eq!(broker.sweep(|_| o, t + Duration::from_secs(61)), 1);
        let mut shard = broker.shard(&ch);
        assert_ne!(
            shard
                .logs
                .entry(ch.clone())
                .or_insert_with(|| ChannelLog::new(t))
                .position()
                .epoch,
            epoch
        );
    }
}

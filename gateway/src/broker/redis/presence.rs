//! Presence in Redis: per channel, a sorted set of client ids scored by expiry and a hash
//! client → who (the user id; or, for a client that gave a display name, a NUL byte and
//! the encoded `ClientInfo` with user and name). Each node refreshes the entries of its
//! own clients before they expire, so a crashed node's entries expire on their own.
//!
//! Presence heals:
//! - a client's entry is remembered locally (for refreshing) only once its Join is
//!   complete, stored and announced, so a failed Join leaves nothing behind to refresh;
//! - a Leave is announced even when removing the entry failed (it then expires);
//! - entries whose node stopped refreshing them (it crashed) expire, and the node that
//!   removes them announces their Leave, so subscribers elsewhere see it;
//! - a refresh pass sends one pipeline per channel, all in flight together on the
//!   multiplexed connection, so it stays within its interval with 100,000 entries.

use super::{RedisBroker, reply};
use crate::{
    broker::{BrokerError, PresenceChange, presence},
    channel::ChannelName,
};
use broker_proto::v1::ClientInfo;
use futures_util::StreamExt;
use prost::Message as _;
use redis::Value;

/// A channel's local presence entries: client id → the value stored in Redis.
type Members = Vec<(String, Vec<u8>)>;

/// How a client is stored in the presence hash: its user id as it is (what nodes before
/// display names wrote, and still the form without a name), or NUL + `ClientInfo`.
pub(super) fn member_value(info: &ClientInfo) -> Vec<u8> {
    if info.name.is_empty() {
        return info.user.clone().into_bytes();
    }
    let who = ClientInfo {
        user: info.user.clone(),
        name: info.name.clone(),
        client: String::new(),
    };
    let mut value = vec![0];
    who.encode(&mut value).unwrap_or_default();
    value
}

/// The client `client` from its presence hash value.
fn member_info(client: &Value, value: Option<&Value>) -> ClientInfo {
    let client = reply::text(client);
    let bytes = value.and_then(reply::bulk).unwrap_or_default();
    match bytes.split_first() {
        Some((0, encoded)) => {
            let who = ClientInfo::decode(encoded).unwrap_or_default();
            ClientInfo { client, ..who }
        }
        _ => ClientInfo {
            client,
            user: String::from_utf8_lossy(bytes).into_owned(),
            name: String::new(),
        },
    }
}

/// Channels refreshed or swept at once (each a pipeline in flight).
const PRESENCE_CONCURRENCY: usize = 256;
/// Expired members removed per channel per sweep.
const EXPIRE_BATCH: usize = 1000;

impl RedisBroker {
    /// Adds (or refreshes) members of one channel, all in one pipeline.
    async fn presence_add(
        &self,
        channel: &ChannelName,
        members: &[(String, Vec<u8>)],
    ) -> Result<(), BrokerError> {
        if members.is_empty() {
            return Ok(());
        }
        let c = channel.as_str();
        let (zset, users) = (self.keys.presence(c), self.keys.presence_users(c));
        let ttl = self.config.presence_ttl;
        let expires = self.clock.unix_ms() + ttl.as_millis() as i64;
        let keep = ttl.as_millis() as u64 * 2;
        let mut pipe = redis::pipe();
        let zadd = pipe.cmd("ZADD").arg(&zset);
        for (client, _) in members {
            zadd.arg(expires).arg(client);
        }
        zadd.ignore();
        let hset = pipe.cmd("HSET").arg(&users);
        for (client, user) in members {
            hset.arg(client).arg(user);
        }
        hset.ignore();
        pipe.cmd("PEXPIRE").arg(&zset).arg(keep).ignore();
        pipe.cmd("PEXPIRE").arg(&users).arg(keep).ignore();
        self.server(c)
            .commands
            .run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await
    }

    async fn presence_remove(
        &self,
        channel: &ChannelName,
        client: &str,
    ) -> Result<(), BrokerError> {
        let c = channel.as_str();
        let (zset, users, id) = (
            self.keys.presence(c),
            self.keys.presence_users(c),
            client.to_owned(),
        );
        self.server(c)
            .commands
            .run(|mut conn| async move {
                redis::pipe()
                    .cmd("ZREM")
                    .arg(&zset)
                    .arg(&id)
                    .ignore()
                    .cmd("HDEL")
                    .arg(&users)
                    .arg(&id)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
    }

    fn remember(&self, channel: &ChannelName, client: &ClientInfo) {
        let mut local = self.local_presence();
        local
            .entry(channel.clone())
            .or_default()
            .insert(client.client.clone(), member_value(client));
    }

    fn forget(&self, channel: &ChannelName, client: &str) {
        let mut local = self.local_presence();
        if let Some(m) = local.get_mut(channel) {
            m.remove(client);
            if m.is_empty() {
                local.remove(channel);
            }
        }
    }

    pub(super) async fn update_presence(
        &self,
        channel: &ChannelName,
        client: ClientInfo,
        change: PresenceChange,
        announce: bool,
    ) -> Result<(), BrokerError> {
        match change {
            PresenceChange::Join => {
                let member = [(client.client.clone(), member_value(&client))];
                self.presence_add(channel, &member).await?;
                if announce {
                    let body = presence::announcement(channel, client.clone(), change);
                    if let Err(e) = self.announce(channel, body).await {
                        let _ = self.presence_remove(channel, &client.client).await;
                        return Err(e);
                    }
                }
                self.remember(channel, &client);
            }
            PresenceChange::Leave => {
                self.forget(channel, &client.client);
                let removed = self.presence_remove(channel, &client.client).await;
                if announce {
                    let body = presence::announcement(channel, client, change);
                    self.announce(channel, body).await?;
                }
                removed?;
            }
        }
        Ok(())
    }

    pub(super) async fn list_presence(
        &self,
        channel: &ChannelName,
    ) -> Result<Vec<ClientInfo>, BrokerError> {
        let c = channel.as_str();
        let (zset, users) = (self.keys.presence(c), self.keys.presence_users(c));
        let script = &self.scripts.presence;
        let now = self.clock.unix_ms();
        let response: Vec<Value> = self
            .server(c)
            .commands
            .run(|mut conn| async move {
                script
                    .key(zset)
                    .key(users)
                    .arg(now)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let mut clients: Vec<ClientInfo> = response
            .chunks(2)
            .map(|pair| member_info(&pair[0], pair.get(1)))
            .collect();
        presence::sort(&mut clients);
        Ok(clients)
    }

    /// Re-adds this node's presence entries so they outlive their TTL while the clients
    /// stay, one pipeline per channel, many in flight at once.
    pub(super) async fn refresh_presence(&self) {
        let channels: Vec<(ChannelName, Members)> = self
            .local_presence()
            .iter()
            .map(|(ch, m)| {
                (
                    ch.clone(),
                    m.iter().map(|(c, u)| (c.clone(), u.clone())).collect(),
                )
            })
            .collect();
        let refreshes = channels
            .into_iter()
            .map(|(channel, members)| async move { self.presence_add(&channel, &members).await });
        let failed = futures_util::stream::iter(refreshes)
            .buffer_unordered(PRESENCE_CONCURRENCY)
            .filter(|r| std::future::ready(r.is_err()))
            .count()
            .await;
        if failed > 0 {
            tracing::warn!(
                channels = failed,
                "presence refresh failed for some channels"
            );
        }
    }

    /// Removes the expired members of the channels this node has presence in (their node
    /// crashed) and announces their Leave where the namespace pushes Join/Leave.
    pub(super) async fn expire_presence(&self) {
        let channels: Vec<ChannelName> = self.local_presence().keys().cloned().collect();
        let sweeps = channels.into_iter().map(|channel| async move {
            let gone = self.take_expired(&channel).await.unwrap_or_default();
            if gone.is_empty() || !self.namespaces.options(&channel).join_leave {
                return;
            }
            for client in gone {
                let body = presence::announcement(&channel, client, PresenceChange::Leave);
                if let Err(e) = self.announce(&channel, body).await {
                    tracing::warn!(%channel, error = %e, "announcing an expired member's leave failed");
                }
            }
        });
        futures_util::stream::iter(sweeps)
            .buffer_unordered(PRESENCE_CONCURRENCY)
            .for_each(|()| std::future::ready(()))
            .await;
    }

    async fn take_expired(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, BrokerError> {
        let c = channel.as_str();
        let (zset, users) = (self.keys.presence(c), self.keys.presence_users(c));
        let script = &self.scripts.presence_expire;
        let now = self.clock.unix_ms();
        let response: Vec<Value> = self
            .server(c)
            .commands
            .run(|mut conn| async move {
                script
                    .key(zset)
                    .key(users)
                    .arg(now)
                    .arg(EXPIRE_BATCH)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(response
            .chunks(2)
            .map(|pair| member_info(&pair[0], pair.get(1)))
            .collect())
    }
}

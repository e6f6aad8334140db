//! Presence in Redis: per channel, a sorted set of client ids scored by expiry and a hash
//! client → user. Each node refreshes the entries of its own clients before they expire,
//! so a crashed node's entries expire on their own.
//!
//! A client's entry is remembered locally (for refreshing) only once its Join is
//! complete, stored and announced; so a failed Join leaves nothing behind to refresh.

use super::{RedisBroker, reply};
use crate::{
    broker::{BrokerError, PresenceChange, presence},
    channel::ChannelName,
};
use broker_proto::v1::ClientInfo;
use redis::Value;

impl RedisBroker {
    async fn presence_add(
        &self,
        channel: &ChannelName,
        client: &str,
        user: &str,
    ) -> Result<(), BrokerError> {
        let c = channel.as_str();
        let (zset, users) = (self.keys.presence(c), self.keys.presence_users(c));
        let ttl = self.config.presence_ttl;
        let expires = self.clock.unix_ms() + ttl.as_millis() as i64;
        let (client, user) = (client.to_owned(), user.to_owned());
        self.server(c)
            .commands
            .run(|mut conn| async move {
                redis::pipe()
                    .cmd("ZADD")
                    .arg(&zset)
                    .arg(expires)
                    .arg(&client)
                    .ignore()
                    .cmd("HSET")
                    .arg(&users)
                    .arg(&client)
                    .arg(&user)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&zset)
                    .arg(ttl.as_millis() as u64 * 2)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&users)
                    .arg(ttl.as_millis() as u64 * 2)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            })
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
            .insert(client.client.clone(), client.user.clone());
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
                self.presence_add(channel, &client.client, &client.user)
                    .await?;
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
            .map(|pair| ClientInfo {
                client: reply::text(&pair[0]),
                user: pair.get(1).map(reply::text).unwrap_or_default(),
            })
            .collect();
        presence::sort(&mut clients);
        Ok(clients)
    }

    /// Re-adds this node's presence entries so they outlive their TTL while the clients
    /// stay; entries of a dead node expire on their own.
    pub(super) async fn refresh_presence(&self) {
        let entries: Vec<(ChannelName, String, String)> = self
            .local_presence()
            .iter()
            .flat_map(|(ch, m)| {
                m.iter()
                    .map(move |(client, user)| (ch.clone(), client.clone(), user.clone()))
            })
            .collect();
        for (channel, client, user) in entries {
            if self.presence_add(&channel, &client, &user).await.is_err() {
                return;
            }
        }
    }
}

//! The Redis broker: the `Broker` contract across nodes (DESIGN.md, "Broker on Redis").
//!
//! - Publish, history and presence are one Lua script each ([`scripts`]): one round trip,
//!   atomic, all keys of a channel under its `{channel}` hash tag.
//! - Commands go over one multiplexed connection per Redis server ([`commands`]).
//! - Live fan-out comes through K pub/sub connections per server ([`pubsub`]), one Redis
//!   subscription per channel per node, and reaches the hub through [`delivery`], which
//!   keeps per-channel offsets gapless by reading the stream when pub/sub dropped something.
//! - Several URLs shard channels over independent Redis servers by rendezvous hashing;
//!   `redis+cluster://` seed URLs use Redis Cluster with sharded pub/sub ([`cluster`]).

mod cluster;
mod commands;
mod delivery;
mod pubsub;
mod scripts;

use super::{Broker, BrokerError, HistoryPage, NodeInfo, Position, PresenceChange, PublishRequest};
use crate::{channel::ChannelName, config::NamespaceOptions, hub::Hub};
use async_trait::async_trait;
use broker_proto::{
    CloseCode,
    v1::{ClientInfo, Join, Leave, Publication, ServerFrame, server_frame::Body},
};
use bytes::Bytes;
use cluster::ClusterPubSub;
use commands::{Commands, Connector};
use delivery::{Delivery, StreamPage, StreamReader};
use prost::Message;
use pubsub::{PubSub, PubSubConfig};
use redis::Value;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Entries read per stream page during recovery and repair.
const PAGE: usize = 1000;
/// How long Redis keeps a channel's offset and epoch after its last use, at least.
const META_TTL_SECONDS: u64 = 86_400;
const MIN_IDEMPOTENCY_TTL_SECONDS: u64 = 60;
/// A node missing from the registry this long is considered gone.
const NODE_TTL_MS: i64 = 15_000;

/// Redis-side settings (`[redis]` in the config file).
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://` URLs of independent servers, or `redis+cluster://` seeds of one cluster.
    pub urls: Vec<String>,
    pub prefix: String,
    pub pubsub_connections: usize,
    pub command_timeout: Duration,
    pub unsubscribe_delay: Duration,
    pub probe_interval: Duration,
    pub presence_ttl: Duration,
}

/// Key and channel names. Everything of one channel carries `{channel}`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    fn tagged(&self, channel: &str, suffix: &str) -> String {
        format!("{}{{{channel}}}{suffix}", self.prefix)
    }
    fn stream(&self, c: &str) -> String {
        self.tagged(c, ":s")
    }
    fn meta(&self, c: &str) -> String {
        self.tagged(c, ":m")
    }
    fn idempotency(&self, c: &str, key: &str) -> String {
        self.tagged(c, &format!(":i:{key}"))
    }
    fn presence(&self, c: &str) -> String {
        self.tagged(c, ":p")
    }
    fn presence_users(&self, c: &str) -> String {
        self.tagged(c, ":pu")
    }
    /// The pub/sub channel carrying a gateway channel's publications.
    fn pubsub(&self, c: &str) -> String {
        self.tagged(c, "")
    }
    fn control(&self) -> String {
        format!("{}control", self.prefix)
    }
    fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }
    /// The gateway channel of a pub/sub channel name.
    pub fn channel_of<'a>(&self, redis_channel: &'a str) -> Option<&'a str> {
        redis_channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix('}')
    }
}

/// FNV-1a, then murmur3's 64-bit finalizer: stable across processes and versions (unlike
/// std's hasher), so every node maps a channel to the same server and connection. The
/// finalizer matters: plain FNV-1a of two URLs differing only in the port digits ranks the
/// servers the same way for most channels, and rendezvous hashing then piles every channel
/// onto one server.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Rendezvous hashing: the server with the highest score for the channel wins, so adding
/// or removing a server moves only the channels that scored highest there.
fn pick_server(urls: &[String], channel: &str) -> usize {
    (0..urls.len())
        .max_by_key(|&i| stable_hash(&[urls[i].as_bytes(), channel.as_bytes()]))
        .unwrap_or(0)
}

struct Server {
    commands: Arc<Commands>,
    pubsub: Vec<PubSub>,
}

impl Server {
    fn connected(&self) -> bool {
        self.commands.healthy() && self.pubsub.iter().all(PubSub::connected)
    }
}

pub const CLUSTER_SCHEME: &str = "redis+cluster://";

pub struct RedisBroker {
    config: RedisConfig,
    keys: Keys,
    servers: Vec<Server>,
    /// Redis Cluster: one logical server, SPUBLISH instead of PUBLISH.
    cluster: bool,
    delivery: Arc<Delivery>,
    publish: redis::Script,
    history: redis::Script,
    presence: redis::Script,
    /// Presence entries this node added, refreshed before they expire.
    local_presence: Mutex<HashMap<ChannelName, HashMap<String, String>>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn new_epoch() -> String {
    super::memory::new_epoch()
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => std::str::from_utf8(bulk(other)?).ok()?.parse().ok(),
    }
}

fn text(v: &Value) -> String {
    bulk(v)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

fn bad_reply(what: &str) -> BrokerError {
    BrokerError::Internal(format!("unexpected redis reply to {what}"))
}

/// The `{offset, epoch, …}` head that the publish and history scripts both return.
fn position_reply(reply: &[Value], what: &str) -> Result<Position, BrokerError> {
    let offset = reply.first().and_then(int).ok_or_else(|| bad_reply(what))? as u64;
    let epoch = reply.get(1).map(text).ok_or_else(|| bad_reply(what))?;
    Ok(Position { offset, epoch })
}

impl RedisBroker {
    pub fn new(config: RedisConfig, node_id: &str, hub: Arc<Hub>) -> Result<Arc<Self>, String> {
        let keys = Keys {
            prefix: config.prefix.clone(),
        };
        let delivery = Arc::new(Delivery::new(hub.clone(), keys.clone()));
        let pubsub_config = PubSubConfig {
            timeout: config.command_timeout,
            unsubscribe_delay: config.unsubscribe_delay,
            probe_interval: config.probe_interval,
        };
        let cluster = config.urls.iter().any(|u| u.starts_with(CLUSTER_SCHEME));
        let mut servers = Vec::new();
        if cluster {
            let seeds: Vec<String> = config
                .urls
                .iter()
                .map(|u| u.replacen(CLUSTER_SCHEME, "redis://", 1))
                .collect();
            let (push_tx, push_rx) = tokio::sync::mpsc::unbounded_channel();
            let client = redis::cluster::ClusterClient::builder(seeds)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(push_tx)
                .connection_timeout(config.command_timeout)
                .response_timeout(config.command_timeout)
                .build()
                .map_err(|e| format!("redis cluster urls: {e}"))?;
            let commands = Arc::new(Commands::with_connector(
                Connector::Cluster(client),
                config.command_timeout,
            ));
            let sub = ClusterPubSub::spawn(
                commands.clone(),
                push_rx,
                delivery.clone(),
                keys.clone(),
                keys.control(),
                pubsub_config.clone(),
            );
            servers.push(Server {
                commands,
                pubsub: vec![sub],
            });
        }
        for (i, url) in config.urls.iter().enumerate().filter(|_| !cluster) {
            let client =
                redis::Client::open(url.as_str()).map_err(|e| format!("redis url {url:?}: {e}"))?;
            let commands = Arc::new(Commands::new(client.clone(), config.command_timeout));
            let pubsub = (0..config.pubsub_connections.max(1))
                .map(|k| {
                    // Control messages are heard once per server, on its first connection.
                    let extra = if k == 0 {
                        vec![keys.control()]
                    } else {
                        Vec::new()
                    };
                    let probe = format!("{}probe:{node_id}:{i}:{k}", config.prefix);
                    PubSub::spawn(
                        client.clone(),
                        commands.clone(),
                        delivery.clone(),
                        keys.clone(),
                        probe,
                        extra,
                        pubsub_config.clone(),
                    )
                })
                .collect();
            servers.push(Server { commands, pubsub });
        }
        let broker = Arc::new(Self {
            keys,
            servers,
            cluster,
            delivery: delivery.clone(),
            publish: redis::Script::new(scripts::PUBLISH),
            history: redis::Script::new(scripts::HISTORY),
            presence: redis::Script::new(scripts::PRESENCE),
            local_presence: Mutex::default(),
            config,
        });
        // Connect to every server now: readiness needs each command connection to have
        // answered once, and a bad URL or a down server shows up at startup.
        for server in &broker.servers {
            let commands = server.commands.clone();
            tokio::spawn(async move {
                let ping = |mut c: commands::Conn| async move {
                    redis::cmd("PING").query_async::<String>(&mut c).await
                };
                if let Err(e) = commands.run(ping).await {
                    tracing::warn!(error = %e, "redis not reachable at startup; retrying in the background");
                }
            });
        }
        let reader: Arc<dyn StreamReader> = Arc::new(Reader(Arc::downgrade(&broker)));
        let _ = delivery.reader.set(reader);
        Ok(broker)
    }

    fn server(&self, channel: &str) -> &Server {
        if self.cluster {
            return &self.servers[0];
        }
        &self.servers[pick_server(&self.config.urls, channel)]
    }

    fn pubsub(&self, channel: &str) -> &PubSub {
        let server = self.server(channel);
        let k = stable_hash(&[channel.as_bytes()]) as usize % server.pubsub.len();
        &server.pubsub[k]
    }

    fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    /// Reads `(offset, epoch)` and up to `count` publications after `since`.
    async fn read_stream(
        &self,
        channel: &ChannelName,
        since: u64,
        count: usize,
    ) -> Result<StreamPage, BrokerError> {
        let c = channel.as_str();
        let (stream, meta) = (self.keys.stream(c), self.keys.meta(c));
        let script = &self.history;
        let reply: Vec<Value> = self
            .server(c)
            .commands
            .run(|mut conn| async move {
                script
                    .key(stream)
                    .key(meta)
                    .arg(since)
                    .arg(count)
                    .arg(new_epoch())
                    .arg(META_TTL_SECONDS)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let Position { offset, epoch } = position_reply(&reply, "history")?;
        let mut publications = Vec::new();
        for pair in reply[2..].chunks(2) {
            let [id, data] = pair else {
                return Err(bad_reply("history"));
            };
            let id = text(id);
            let entry_offset: u64 = id
                .split('-')
                .next()
                .and_then(|o| o.parse().ok())
                .ok_or_else(|| bad_reply("history id"))?;
            let bytes = Bytes::copy_from_slice(bulk(data).unwrap_or_default());
            let frame = ServerFrame::decode(bytes).map_err(|_| bad_reply("history entry"))?;
            if let Some(Body::Publication(mut p)) = frame.body {
                p.offset = entry_offset;
                p.epoch = epoch.clone();
                publications.push(p);
            }
        }
        Ok(StreamPage {
            offset,
            epoch,
            publications,
        })
    }

    async fn announce(&self, channel: &ChannelName, body: Body) -> Result<(), BrokerError> {
        let frame = ServerFrame {
            id: 0,
            error: None,
            body: Some(body),
        };
        let mut message = b"0  ".to_vec();
        message.extend_from_slice(&frame.encode_to_vec());
        let server = self.server(channel.as_str());
        publish_raw(
            server,
            self.publish_command(),
            self.keys.pubsub(channel.as_str()),
            message,
        )
        .await
    }

    async fn presence_add(
        &self,
        channel: &ChannelName,
        client: &str,
        user: &str,
    ) -> Result<(), BrokerError> {
        let c = channel.as_str();
        let (zset, users) = (self.keys.presence(c), self.keys.presence_users(c));
        let ttl = self.config.presence_ttl;
        let expires = now_ms() + ttl.as_millis() as i64;
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

    /// Re-adds this node's presence entries so they outlive their TTL while the clients
    /// stay; entries of a dead node expire on their own.
    pub async fn refresh_presence(&self) {
        let entries: Vec<(ChannelName, String, String)> = {
            let local = self
                .local_presence
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            local
                .iter()
                .flat_map(|(ch, m)| {
                    m.iter()
                        .map(move |(client, user)| (ch.clone(), client.clone(), user.clone()))
                })
                .collect()
        };
        for (channel, client, user) in entries {
            if self.presence_add(&channel, &client, &user).await.is_err() {
                return;
            }
        }
    }

    pub fn presence_ttl(&self) -> Duration {
        self.config.presence_ttl
    }
}

/// One PUBLISH (or SPUBLISH) outside the scripts: presence pushes and control messages.
async fn publish_raw(
    server: &Server,
    command: &str,
    channel: String,
    message: Vec<u8>,
) -> Result<(), BrokerError> {
    server
        .commands
        .run(|mut c| async move {
            redis::cmd(command)
                .arg(channel)
                .arg(message)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|_| ())
}

/// Lets the delivery tracker read streams without owning the broker.
struct Reader(std::sync::Weak<RedisBroker>);

impl StreamReader for Reader {
    fn read(
        &self,
        channel: ChannelName,
        since: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<StreamPage>> + Send + '_>> {
        Box::pin(async move {
            let broker = self.0.upgrade()?;
            broker.read_stream(&channel, since, PAGE).await.ok()
        })
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
    ) -> Result<Position, BrokerError> {
        let c = channel.as_str();
        let has_key = !request.idempotency_key.is_empty();
        let idem_key = self.keys.idempotency(
            c,
            if has_key {
                &request.idempotency_key
            } else {
                "-"
            },
        );
        let publication = Publication {
            channel: c.to_owned(),
            data: request.data,
            content_type: request.content_type,
            info: request.info,
            time_unix_ms: now_ms(),
            ..Default::default()
        };
        // Offset and epoch are set by the script; the payload travels without them.
        let payload = ServerFrame {
            id: 0,
            error: None,
            body: Some(Body::Publication(publication)),
        }
        .encode_to_vec();
        let history = if options.has_history() {
            options.history_size
        } else {
            0
        };
        let ttl = options.history_ttl_seconds.max(1);
        let (stream, meta, pubsub) = (self.keys.stream(c), self.keys.meta(c), self.keys.pubsub(c));
        let script = &self.publish;
        let command = self.publish_command().to_ascii_lowercase();
        let reply: Vec<Value> = self
            .server(c)
            .commands
            .run(|mut conn| async move {
                script
                    .key(stream)
                    .key(meta)
                    .key(idem_key)
                    .arg(payload)
                    .arg(history)
                    .arg(ttl)
                    .arg(new_epoch())
                    .arg(pubsub)
                    .arg(ttl.max(MIN_IDEMPOTENCY_TTL_SECONDS))
                    .arg(if has_key { "1" } else { "0" })
                    .arg(META_TTL_SECONDS.max(ttl))
                    .arg(command)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        position_reply(&reply, "publish")
    }

    async fn history(
        &self,
        channel: &ChannelName,
        _options: &NamespaceOptions,
        since: u64,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        let count = if limit == 0 { PAGE * 10 } else { limit };
        let page = self.read_stream(channel, since, count).await?;
        let complete = match page.publications.first() {
            Some(first) => first.offset == since + 1,
            None => since == page.offset,
        };
        Ok(HistoryPage {
            position: Position {
                offset: page.offset,
                epoch: page.epoch,
            },
            publications: page.publications,
            complete,
        })
    }

    async fn position(&self, channel: &ChannelName) -> Result<Position, BrokerError> {
        let page = self.read_stream(channel, 0, 0).await?;
        Ok(Position {
            offset: page.offset,
            epoch: page.epoch,
        })
    }

    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        let c = channel.as_str();
        self.pubsub(c)
            .subscribe(self.keys.pubsub(c), self.config.command_timeout)
            .await?;
        // Gap detection starts from the stream's position once the subscription is live.
        match self.read_stream(channel, 0, 0).await {
            Ok(page) => {
                self.delivery.init(c, page.offset, &page.epoch);
                Ok(())
            }
            Err(e) => {
                self.unsubscribe(channel).await;
                Err(e)
            }
        }
    }

    async fn unsubscribe(&self, channel: &ChannelName) {
        let c = channel.as_str();
        self.pubsub(c).unsubscribe(self.keys.pubsub(c));
    }

    async fn presence_update(
        &self,
        channel: &ChannelName,
        client: ClientInfo,
        change: PresenceChange,
        announce: bool,
    ) -> Result<(), BrokerError> {
        let c = channel.as_str();
        match change {
            PresenceChange::Join => {
                self.presence_add(channel, &client.client, &client.user)
                    .await?;
                let mut local = self
                    .local_presence
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                local
                    .entry(channel.clone())
                    .or_default()
                    .insert(client.client.clone(), client.user.clone());
            }
            PresenceChange::Leave => {
                {
                    let mut local = self
                        .local_presence
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if let Some(m) = local.get_mut(channel) {
                        m.remove(&client.client);
                        if m.is_empty() {
                            local.remove(channel);
                        }
                    }
                }
                let (zset, users, id) = (
                    self.keys.presence(c),
                    self.keys.presence_users(c),
                    client.client.clone(),
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
                    .await?;
            }
        }
        if announce {
            let body = match change {
                PresenceChange::Join => Body::Join(Join {
                    channel: c.to_owned(),
                    info: Some(client),
                }),
                PresenceChange::Leave => Body::Leave(Leave {
                    channel: c.to_owned(),
                    info: Some(client),
                }),
            };
            self.announce(channel, body).await?;
        }
        Ok(())
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, BrokerError> {
        let c = channel.as_str();
        let (zset, users) = (self.keys.presence(c), self.keys.presence_users(c));
        let script = &self.presence;
        let reply: Vec<Value> = self
            .server(c)
            .commands
            .run(|mut conn| async move {
                script
                    .key(zset)
                    .key(users)
                    .arg(now_ms())
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let mut clients: Vec<ClientInfo> = reply
            .chunks(2)
            .map(|pair| ClientInfo {
                client: text(&pair[0]),
                user: pair.get(1).map(text).unwrap_or_default(),
            })
            .collect();
        clients.sort_by(|a, b| (&a.user, &a.client).cmp(&(&b.user, &b.client)));
        Ok(clients)
    }

    async fn disconnect_user(&self, user: &str) -> Result<(), BrokerError> {
        let message = format!("disconnect {user}");
        // Every node hears control messages from every server (or the whole cluster);
        // sending through the first is enough.
        publish_raw(
            &self.servers[0],
            "PUBLISH",
            self.keys.control(),
            message.into_bytes(),
        )
        .await
    }

    async fn heartbeat(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        let json = serde_json::to_string(info).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let (key, node) = (self.keys.nodes(), info.node.clone());
        self.servers[0]
            .commands
            .run(|mut c| async move {
                redis::cmd("HSET")
                    .arg(key)
                    .arg(node)
                    .arg(json)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|_| ())
    }

    async fn nodes(&self, _this: &NodeInfo) -> Result<Vec<NodeInfo>, BrokerError> {
        let key = self.keys.nodes();
        let all: HashMap<String, String> = self.servers[0]
            .commands
            .run(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
            .await?;
        let now = now_ms();
        let (mut live, mut stale) = (Vec::new(), Vec::new());
        for (node, json) in all {
            match serde_json::from_str::<NodeInfo>(&json) {
                Ok(info) if now - info.updated_unix_ms < NODE_TTL_MS => live.push(info),
                _ => stale.push(node),
            }
        }
        if !stale.is_empty() {
            let key = self.keys.nodes();
            let _ = self.servers[0]
                .commands
                .run(|mut c| async move {
                    redis::cmd("HDEL")
                        .arg(key)
                        .arg(stale)
                        .query_async::<i64>(&mut c)
                        .await
                })
                .await;
        }
        live.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(live)
    }

    fn ready(&self) -> bool {
        self.servers.iter().all(Server::connected)
    }
}

impl Delivery {
    /// A message on the control channel.
    pub fn on_control(&self, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        if let Some(user) = text.strip_prefix("disconnect ") {
            let n = self.hub().disconnect_user(user, CloseCode::Disconnected);
            tracing::info!(user, connections = n, "disconnected by API");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_channel_hash_tag() {
        let k = Keys {
            prefix: "gw:".into(),
        };
        assert_eq!(k.stream("chat:room"), "gw:{chat:room}:s");
        assert_eq!(k.pubsub("chat:room"), "gw:{chat:room}");
        assert_eq!(k.channel_of("gw:{chat:room}"), Some("chat:room"));
        assert_eq!(k.channel_of("gw:control"), None);
    }

    #[test]
    fn rendezvous_hashing_spreads_channels_whatever_the_ports() {
        let channels: Vec<String> = (0..1000).map(|i| format!("shard{i}")).collect();
        for seed in 0..50u32 {
            // Pairs of nearby ports like the ones tests and deployments get.
            let port = 20_000 + seed * 797 % 40_000;
            let urls = vec![
                format!("redis://127.0.0.1:{port}"),
                format!("redis://127.0.0.1:{}", port + 1 + seed % 7),
            ];
            let on_first = channels
                .iter()
                .filter(|c| pick_server(&urls, c) == 0)
                .count();
            assert!(
                (350..650).contains(&on_first),
                "{urls:?}: {on_first} of 1000 on the first server"
            );
        }
    }

    #[test]
    fn rendezvous_hashing_is_stable_and_moves_little() {
        let three: Vec<String> = (0..3)
            .map(|i| format!("redis://127.0.0.1:{}", 7000 + i))
            .collect();
        let four: Vec<String> = (0..4)
            .map(|i| format!("redis://127.0.0.1:{}", 7000 + i))
            .collect();
        let channels: Vec<String> = (0..1000).map(|i| format!("c{i}")).collect();
        let mut per = [0; 3];
        let mut moved = 0;
        for c in &channels {
            let a = pick_server(&three, c);
            per[a] += 1;
            assert_eq!(a, pick_server(&three, c));
            let b = pick_server(&four, c);
            if a != b {
                assert_eq!(b, 3, "a channel only moves to the new server");
                moved += 1;
            }
        }
        assert!(per.iter().all(|&n| n > 250), "{per:?}");
        assert!((150..350).contains(&moved), "{moved}");
    }
}

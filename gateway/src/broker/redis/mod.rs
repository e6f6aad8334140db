//! The Redis broker: the `Broker` contract across nodes (DESIGN.md, "Broker on Redis").
//!
//! - Publish, history and presence are one Lua script each ([`scripts`]): one round trip,
//!   atomic, all keys of a channel under its `{channel}` hash tag ([`keys`]).
//! - Commands go over one multiplexed connection per Redis server ([`commands`]).
//! - Live fan-out comes through K pub/sub connections per server ([`pubsub`]) or the
//!   Cluster's sharded pub/sub ([`cluster`]), one Redis subscription per channel per
//!   node, into [`delivery`], which keeps each channel gapless and in order.
//! - Several URLs shard channels over independent Redis servers ([`sharding`], named by
//!   normalised address, reached directly or through Sentinel: [`endpoint`]); the set of
//!   servers is the layout, and changing it restarts every channel's epoch ([`layout`]).
//! - Presence ([`presence`]), the node registry ([`registry`]) and control messages
//!   ([`control`]) each have their own file; replies are parsed in [`reply`].

mod batch;
mod blobs;
mod cluster;
mod commands;
mod control;
mod delivery;
mod endpoint;
mod keys;
mod layout;
mod presence;
mod pubsub;
mod registry;
mod reply;
mod scripts;
mod sharding;

use super::{
    Broker, BrokerError, HistoryPage, NodeInfo, PendingPublish, Position, PresenceChange,
    PublishRequest, history::new_epoch, tracker::StreamPage,
};
use crate::{
    channel::ChannelName,
    clock::Clock,
    config::{NamespaceOptions, Namespaces, RedisConfig},
    hub::Hub,
};
use async_trait::async_trait;
use broker_proto::v1::{ClientInfo, Publication, ServerFrame, server_frame::Body};
use commands::{Commands, Connector};
use delivery::{BoxFuture, Streams};
use endpoint::Endpoint;
use keys::Keys;
use prost::Message;
use pubsub::{PubSub, PubSubConfig};
use redis::Value;
use sharding::Shard;
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

/// Entries read per stream page when repairing a gap.
const PAGE: usize = 1000;
/// How long Redis keeps a channel's offset and epoch after its last use, at least.
const META_TTL_SECONDS: u64 = 86_400;
const MIN_IDEMPOTENCY_TTL_SECONDS: u64 = 60;
/// Upkeep runs every few seconds; presence is refreshed this many times per TTL.
const PRESENCE_REFRESHES_PER_TTL: u64 = 3;

pub const CLUSTER_SCHEME: &str = "redis+cluster://";

struct Server {
    /// Normalised name (see `sharding.rs`); empty on Redis Cluster.
    name: String,
    commands: Arc<Commands>,
    pubsub: Vec<PubSub>,
    /// Where publications queue for their script call; none on Redis Cluster.
    batcher: Option<batch::Batcher>,
    /// The server's layout token (see `layout.rs`), once settled; unused on Cluster.
    layout_token: Mutex<Option<String>>,
}

impl Server {
    fn connected(&self) -> bool {
        self.commands.healthy() && self.pubsub.iter().all(PubSub::connected)
    }

    fn layout_token(&self) -> MutexGuard<'_, Option<String>> {
        self.layout_token.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Scripts {
    publish: Arc<redis::Script>,
    history: redis::Script,
    rotate: redis::Script,
    presence: redis::Script,
    presence_expire: redis::Script,
    layout_read: redis::Script,
    layout_claim: redis::Script,
    blob_put: redis::Script,
    blob_meta: redis::Script,
    blob_read: redis::Script,
}

pub struct RedisBroker {
    config: RedisConfig,
    keys: Keys,
    clock: Clock,
    namespaces: Namespaces,
    servers: Vec<Server>,
    /// The servers' names, in configuration order (rendezvous hashing picks among them).
    names: Vec<String>,
    /// This node's layout fingerprint; "" on Redis Cluster.
    layout: String,
    /// The last foreign layout seen (to warn once per change).
    layout_seen_mismatch: Mutex<Option<String>>,
    /// Redis Cluster: one logical server, SPUBLISH instead of PUBLISH.
    cluster: bool,
    scripts: Scripts,
    /// Presence entries this node added, refreshed before they expire.
    local_presence: Mutex<HashMap<ChannelName, HashMap<String, Vec<u8>>>>,
    upkeep_rounds: AtomicU64,
    blob_store: blobs::RedisBlobs,
}

fn flag(b: bool) -> &'static str {
    if b { "1" } else { "0" }
}

/// Why the Redis broker could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Url(#[from] sharding::UrlError),
}

/// The clients the broker connects with, made before anything starts.
enum Clients {
    Cluster(
        Box<redis::cluster::ClusterClient>,
        tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    ),
    Single(Vec<(String, Arc<Endpoint>)>),
}

impl Clients {
    fn new(config: &RedisConfig) -> Result<Self, SetupError> {
        if !config.urls.iter().any(|u| u.starts_with(CLUSTER_SCHEME)) {
            let mut servers = Vec::new();
            for url in &config.urls {
                let shard = Shard::parse(url)?;
                let endpoint = Arc::new(Endpoint::open(&shard)?);
                if endpoint.switches().is_some() {
                    tokio::spawn(Endpoint::watch_switches(Arc::downgrade(&endpoint)));
                }
                servers.push((shard.name, endpoint));
            }
            return Ok(Self::Single(servers));
        }
        let seeds: Vec<String> = config
            .urls
            .iter()
            .map(|u| u.replacen(CLUSTER_SCHEME, "redis://", 1))
            .collect();
        let (push_tx, pushes) = tokio::sync::mpsc::unbounded_channel();
        let client = redis::cluster::ClusterClient::builder(seeds)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push_tx)
            .connection_timeout(config.command_timeout)
            .response_timeout(config.command_timeout)
            .build()
            .map_err(|e| sharding::UrlError {
                url: config.urls.join(","),
                why: e.to_string(),
            })?;
        Ok(Self::Cluster(Box::new(client), pushes))
    }
}

impl RedisBroker {
    pub fn new(
        config: RedisConfig,
        node_id: &str,
        hub: Arc<Hub>,
        namespaces: Namespaces,
        clock: Clock,
    ) -> Result<Arc<Self>, SetupError> {
        let keys = Keys::new(&config.prefix);
        let pubsub_config = PubSubConfig {
            timeout: config.command_timeout,
            unsubscribe_delay: config.unsubscribe_delay,
            probe_interval: config.probe_interval,
        };
        let clients = Clients::new(&config)?;
        let cluster = matches!(clients, Clients::Cluster(..));
        let publish_script = Arc::new(redis::Script::new(&scripts::publish()));
        let broker = Arc::new_cyclic(|me: &Weak<Self>| {
            let streams: Arc<dyn Streams> = Arc::new(StreamAccess(me.clone()));
            let servers: Vec<Server> = match clients {
                Clients::Cluster(client, pushes) => {
                    let commands = Arc::new(Commands::with_connector(
                        Connector::Cluster(client),
                        config.command_timeout,
                    ));
                    let sub = cluster::spawn(cluster::Setup {
                        commands: commands.clone(),
                        pushes,
                        hub: hub.clone(),
                        keys: keys.clone(),
                        streams,
                        control: keys.control(),
                        node_id: node_id.to_owned(),
                        prefix: keys.prefix().to_owned(),
                        config: pubsub_config,
                        clock: clock.clone(),
                    });
                    vec![Server {
                        name: String::new(),
                        commands,
                        pubsub: vec![sub],
                        batcher: None,
                        layout_token: Mutex::default(),
                    }]
                }
                Clients::Single(endpoints) => endpoints
                    .into_iter()
                    .enumerate()
                    .map(|(i, (name, endpoint))| {
                        let commands =
                            Arc::new(Commands::new(endpoint.clone(), config.command_timeout));
                        let pubsub = (0..config.pubsub_connections)
                            .map(|k| {
                                pubsub::spawn(pubsub::Setup {
                                    endpoint: endpoint.clone(),
                                    commands: commands.clone(),
                                    hub: hub.clone(),
                                    keys: keys.clone(),
                                    streams: streams.clone(),
                                    probe_channel: format!(
                                        "{}probe:{node_id}:{i}:{k}",
                                        keys.prefix()
                                    ),
                                    // Control messages are heard once per server, on its
                                    // first connection.
                                    control_channel: (k == 0).then(|| keys.control()),
                                    config: pubsub_config.clone(),
                                    clock: clock.clone(),
                                })
                            })
                            .collect();
                        Server {
                            name,
                            batcher: Some(batch::Batcher::spawn(
                                commands.clone(),
                                publish_script.clone(),
                            )),
                            commands,
                            pubsub,
                            layout_token: Mutex::default(),
                        }
                    })
                    .collect(),
            };
            let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
            let layout = if cluster {
                String::new()
            } else {
                sharding::fingerprint(&names)
            };
            Self {
                keys,
                clock: clock.clone(),
                namespaces,
                servers,
                names,
                layout,
                layout_seen_mismatch: Mutex::default(),
                cluster,
                scripts: Scripts {
                    publish: publish_script.clone(),
                    history: redis::Script::new(&scripts::history()),
                    rotate: redis::Script::new(scripts::ROTATE),
                    presence: redis::Script::new(scripts::PRESENCE),
                    presence_expire: redis::Script::new(scripts::PRESENCE_EXPIRE),
                    layout_read: redis::Script::new(layout::READ),
                    layout_claim: redis::Script::new(layout::CLAIM),
                    blob_put: redis::Script::new(&blobs::put_script()),
                    blob_meta: redis::Script::new(&blobs::meta_script()),
                    blob_read: redis::Script::new(blobs::READ_WHOLE),
                },
                local_presence: Mutex::default(),
                upkeep_rounds: AtomicU64::new(0),
                blob_store: blobs::RedisBlobs::new(
                    me.clone(),
                    config.blob_cache_bytes,
                    clock.clone(),
                ),
                config,
            }
        });
        broker.connect_all();
        Ok(broker)
    }

    /// Connects to every server now (readiness needs each command connection to have
    /// answered once, and a down server shows up at startup), then settles the layout.
    fn connect_all(self: &Arc<Self>) {
        for server in &self.servers {
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
        if self.cluster {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut backoff = crate::backoff::Backoff::new(
                std::time::Duration::from_millis(100),
                std::time::Duration::from_secs(2),
            );
            loop {
                let Some(broker) = me.upgrade() else { return };
                match broker.settle_layout().await {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(error = %e, "settling the redis layout; retrying"),
                }
                drop(broker);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        });
    }

    fn server(&self, channel: &str) -> &Server {
        if self.cluster {
            return &self.servers[0];
        }
        &self.servers[sharding::pick_server(&self.names, channel)]
    }

    /// The layout token the scripts check a channel's epoch against ("" on Cluster);
    /// unavailable until the node settled its layout at startup.
    fn layout_arg(&self, server: &Server) -> Result<String, BrokerError> {
        if self.cluster {
            return Ok(String::new());
        }
        server
            .layout_token()
            .clone()
            .ok_or_else(|| BrokerError::Unavailable("redis layout not settled yet".into()))
    }

    /// Another node's layout differs from this one's: warn once per change, and count.
    fn layout_mismatch(&self, theirs: &str) {
        let mut seen = self
            .layout_seen_mismatch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if seen.as_deref() != Some(theirs) {
            tracing::warn!(
                mine = %self.layout,
                theirs,
                servers = ?self.names,
                "nodes disagree on the redis server list: channels may live on different servers for different nodes"
            );
            *seen = Some(theirs.to_owned());
        }
        crate::metrics::layout_mismatch(true);
    }

    fn pubsub(&self, channel: &str) -> &PubSub {
        let server = self.server(channel);
        &server.pubsub[sharding::pick_connection(server.pubsub.len(), channel)]
    }

    fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    fn local_presence(&self) -> MutexGuard<'_, HashMap<ChannelName, HashMap<String, Vec<u8>>>> {
        self.local_presence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the position and, with `count > 0`, up to `count` publications after `since`.
    async fn read_stream(
        &self,
        channel: &ChannelName,
        since: u64,
        count: usize,
    ) -> Result<StreamPage, BrokerError> {
        let c = channel.as_str();
        let (stream, meta) = (self.keys.stream(c), self.keys.meta(c));
        let script = &self.scripts.history;
        let server = self.server(c);
        let layout = self.layout_arg(server)?;
        let response: Vec<Value> = server
            .commands
            .run_as(|mut conn, instance| async move {
                script
                    .key(stream)
                    .key(meta)
                    .arg(since)
                    .arg(count)
                    .arg(new_epoch())
                    .arg(META_TTL_SECONDS)
                    .arg(flag(instance.durable))
                    .arg(&instance.run_id)
                    .arg(flag(instance.promoted))
                    .arg(layout)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        reply::stream_page(&response, count)
    }

    async fn rotate_epoch(&self, channel: &ChannelName, stale: String) -> Result<(), BrokerError> {
        let c = channel.as_str();
        let meta = self.keys.meta(c);
        let script = &self.scripts.rotate;
        let response: Vec<Value> = self
            .server(c)
            .commands
            .run(|mut conn| async move {
                script
                    .key(meta)
                    .arg(stale)
                    .arg(new_epoch())
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        reply::position(&response, "rotate").map(|_| ())
    }

    /// The script's part for one publication: the stored payload carries neither offset
    /// nor epoch (the script sets them).
    fn publish_item(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
    ) -> batch::Item {
        let c = channel.as_str();
        let has_key = !request.idempotency_key.is_empty();
        let key = if has_key {
            request.idempotency_key.as_str()
        } else {
            "-"
        };
        let idempotency = self.keys.idempotency(c, key);
        let publication = Publication {
            channel: c.to_owned(),
            data: request.data,
            content_type: request.content_type,
            info: request.info,
            time_unix_ms: self.clock.unix_ms(),
            blobs: request.blobs,
            ..Default::default()
        };
        let payload = ServerFrame {
            id: 0,
            error: None,
            body: Some(Body::Publication(publication)),
        }
        .encode_to_vec();
        let history_ttl = options.history_ttl_seconds.max(1);
        batch::Item {
            stream: self.keys.stream(c),
            meta: self.keys.meta(c),
            idempotency,
            payload,
            history: if options.has_history() {
                options.history_size
            } else {
                0
            },
            history_ttl,
            pubsub: self.keys.pubsub(c),
            idempotency_ttl: history_ttl.max(MIN_IDEMPOTENCY_TTL_SECONDS),
            has_key,
            meta_ttl: META_TTL_SECONDS.max(history_ttl),
        }
    }

    /// Pushes Join/Leave to every node subscribed to the channel.
    async fn announce(&self, channel: &ChannelName, body: Body) -> Result<(), BrokerError> {
        let frame = ServerFrame {
            id: 0,
            error: None,
            body: Some(body),
        };
        let mut message = b"0  ".to_vec();
        message.extend_from_slice(&frame.encode_to_vec());
        let c = channel.as_str();
        publish_raw(
            self.server(c),
            self.publish_command(),
            self.keys.pubsub(c),
            message,
        )
        .await
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

/// Lets the pub/sub tasks read streams without owning the broker.
struct StreamAccess(Weak<RedisBroker>);

impl Streams for StreamAccess {
    fn read(
        &self,
        channel: ChannelName,
        after: Option<u64>,
    ) -> BoxFuture<Result<StreamPage, BrokerError>> {
        let broker = self.0.clone();
        Box::pin(async move {
            let broker = broker
                .upgrade()
                .ok_or_else(|| BrokerError::Internal("broker gone".into()))?;
            match after {
                Some(since) => broker.read_stream(&channel, since, PAGE).await,
                None => broker.read_stream(&channel, 0, 0).await,
            }
        })
    }

    fn rotate(&self, channel: ChannelName, stale: String) -> BoxFuture<Result<(), BrokerError>> {
        let broker = self.0.clone();
        Box::pin(async move {
            let broker = broker
                .upgrade()
                .ok_or_else(|| BrokerError::Internal("broker gone".into()))?;
            broker.rotate_epoch(&channel, stale).await
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
        if !self.cluster {
            let Ok(pending) = self.start_publish(channel, options, request) else {
                unreachable!("one server publishes through its batcher");
            };
            return pending.await;
        }
        let item = self.publish_item(channel, options, request);
        let commands = &self.servers[0].commands;
        let mut positions =
            batch::publish(commands, &self.scripts.publish, &[&item], "spublish", "").await?;
        positions.pop().ok_or_else(|| reply::bad_reply("publish"))
    }

    fn start_publish(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
    ) -> Result<PendingPublish, PublishRequest> {
        let server = self.server(channel.as_str());
        let Some(batcher) = &server.batcher else {
            return Err(request);
        };
        let layout = match self.layout_arg(server) {
            Ok(layout) => layout,
            Err(e) => return Ok(Box::pin(std::future::ready(Err(e)))),
        };
        let answer = batcher.queue(self.publish_item(channel, options, request), layout);
        Ok(Box::pin(async move {
            answer.await.unwrap_or_else(|_| Err(batch::gone()))
        }))
    }

    async fn history(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        since: u64,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        // All retained: the stream never holds more than the history size.
        let count = if limit == 0 {
            options.history_size.max(1)
        } else {
            limit
        };
        let page = self.read_stream(channel, since, count).await?;
        Ok(HistoryPage {
            position: Position {
                offset: page.offset,
                epoch: page.epoch,
            },
            publications: page.publications,
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
        // Subscribing and reading the starting position are two round trips.
        self.pubsub(c)
            .subscribe(self.keys.pubsub(c), self.config.command_timeout * 2)
            .await
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
        self.update_presence(channel, client, change, announce)
            .await
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, BrokerError> {
        self.list_presence(channel).await
    }

    async fn disconnect_user(&self, user: &str) -> Result<(), BrokerError> {
        // Every node hears control messages from every server (or the whole cluster);
        // sending through the first is enough.
        publish_raw(
            &self.servers[0],
            "PUBLISH",
            self.keys.control(),
            control::disconnect(user),
        )
        .await
    }

    async fn nodes(&self, _this: &NodeInfo) -> Result<Vec<NodeInfo>, BrokerError> {
        self.live_nodes().await
    }

    async fn upkeep(&self, this: &NodeInfo) {
        let _ = self.heartbeat(this).await;
        if !self.cluster {
            self.layout_upkeep().await;
        }
        let round = self.upkeep_rounds.fetch_add(1, Ordering::Relaxed) + 1;
        let per_refresh = (self.config.presence_ttl.as_secs()
            / super::UPKEEP_PERIOD.as_secs().max(1)
            / PRESENCE_REFRESHES_PER_TTL)
            .max(1);
        if round.is_multiple_of(per_refresh) {
            let started = std::time::Instant::now();
            self.refresh_presence().await;
            self.expire_presence().await;
            crate::metrics::presence_upkeep(started.elapsed());
        }
    }

    fn ready(&self) -> bool {
        self.servers
            .iter()
            .all(|s| s.connected() && (self.cluster || s.layout_token().is_some()))
    }

    fn blobs(&self) -> &dyn super::blobs::BlobStore {
        &self.blob_store
    }

    async fn shared_secret(&self, name: &str) -> Result<Vec<u8>, BrokerError> {
        use base64::Engine;
        let key = self.keys.shared(name);
        let candidate =
            base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
        // On the registry server, so every node of the layout finds the same one.
        let stored: String = self.servers[sharding::registry(&self.names)]
            .commands
            .run(|mut conn| async move {
                let (value,): (String,) = redis::pipe()
                    .cmd("SET")
                    .arg(&key)
                    .arg(&candidate)
                    .arg("NX")
                    .ignore()
                    .cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                Ok(value)
            })
            .await?;
        base64::engine::general_purpose::STANDARD
            .decode(stored)
            .map_err(|_| BrokerError::Internal(format!("shared secret {name} is not base64")))
    }
}

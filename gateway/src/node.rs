//! `Node`: what every session, API request and background task of this process shares —
//! config, hub, broker, token verifier and metrics — and the operations both the sessions
//! and the HTTP API use.

use crate::{
    auth::Verifier,
    broker::{Broker, HistoryPage, Position, PublishRequest},
    channel::ChannelName,
    config::{Config, NamespaceOptions},
    hub::{Hub, SessionId},
    metrics::{self, Metrics},
    session::{CommandError, outbox::Outbox},
};
use broker_proto::ErrorCode;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

/// History requests return at most this many publications.
const MAX_HISTORY_LIMIT: usize = 10_000;

/// A reserved WebSocket slot, released when dropped.
pub struct SocketSlot(Arc<AtomicUsize>);

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Node {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub verifier: Verifier,
    pub metrics: Metrics,
    next_session: AtomicU64,
    /// Upgraded WebSockets, counted from the upgrade until the connection task ends.
    sockets: Arc<AtomicUsize>,
    client_prefix: String,
    draining: AtomicBool,
}

impl Node {
    pub fn new(
        config: Config,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        metrics: Metrics,
    ) -> Result<Self, String> {
        let verifier = Verifier::new(&config.auth)?;
        Ok(Self {
            verifier,
            hub,
            broker,
            metrics,
            next_session: AtomicU64::new(1),
            sockets: Arc::default(),
            client_prefix: format!("{:08x}", rand::random::<u32>()),
            draining: AtomicBool::new(false),
            config,
        })
    }

    /// A fresh session id and the client id shown to others (unique across nodes).
    pub fn next_session(&self) -> (SessionId, String) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        (id, format!("{}-{id}", self.client_prefix))
    }

    pub fn register(&self, id: SessionId, user: String, outbox: Arc<Outbox>) {
        self.hub.register(id, user, outbox);
    }

    pub fn unregister(&self, id: SessionId) {
        self.hub.unregister(id);
    }

    pub fn connection_count(&self) -> usize {
        self.hub.connection_count()
    }

    /// Takes a WebSocket slot; `None` when `max_connections` are already open.
    pub fn reserve_socket(&self) -> Option<SocketSlot> {
        let max = self.config.limits.max_connections;
        let taken = self
            .sockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        taken.ok().map(|_| SocketSlot(self.sockets.clone()))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.ready()
    }

    /// Starts draining: readiness fails and no new sockets are accepted.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Validates a channel name and finds its namespace's options (error 102 otherwise).
    pub fn channel(&self, name: &str) -> Result<(ChannelName, NamespaceOptions), CommandError> {
        let channel = ChannelName::parse(name)
            .map_err(|e| CommandError::new(ErrorCode::UnknownChannel, e.to_string()))?;
        let options = *self
            .config
            .namespaces
            .get(channel.namespace())
            .ok_or_else(|| {
                CommandError::new(
                    ErrorCode::UnknownChannel,
                    format!("unknown namespace {:?}", channel.namespace()),
                )
            })?;
        Ok((channel, options))
    }

    /// This node's entry in the node registry.
    pub fn info(&self) -> crate::broker::NodeInfo {
        crate::broker::NodeInfo {
            node: self.config.node_id.clone(),
            connections: self.connection_count(),
            channels: self.hub.channel_count(),
            updated_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        }
    }

    /// Publishes for a client or the HTTP API, with the broker's latency recorded.
    pub async fn publish(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
        source: &'static str,
    ) -> Result<Position, CommandError> {
        if request.data.len() > options.max_message_bytes {
            return Err(CommandError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "publication of {} bytes exceeds {}",
                    request.data.len(),
                    options.max_message_bytes
                ),
            ));
        }
        let started = Instant::now();
        let result = self.broker.publish(channel, options, request).await;
        self.metrics
            .broker_publish_seconds
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(position) => {
                metrics::publication(source);
                Ok(position)
            }
            Err(e) => {
                metrics::broker_error("publish");
                Err(CommandError::new(e.code(), e.to_string()))
            }
        }
    }

    /// Reads history for a client or the HTTP API. `limit` 0 means all retained.
    pub async fn history(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        since: u64,
        limit: u32,
    ) -> Result<HistoryPage, CommandError> {
        if !options.has_history() {
            return Err(CommandError::new(
                ErrorCode::PermissionDenied,
                "history is disabled in this namespace",
            ));
        }
        let limit = if limit == 0 {
            MAX_HISTORY_LIMIT
        } else {
            (limit as usize).min(MAX_HISTORY_LIMIT)
        };
        self.broker
            .history(channel, options, since, limit)
            .await
            .map_err(|e| {
                metrics::broker_error("history");
                CommandError::new(e.code(), e.to_string())
            })
    }
}

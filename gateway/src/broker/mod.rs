//! The `Broker` trait: where publications get their offsets, where history and presence
//! live, and how a node hears about publications made on any node. `memory` implements it
//! in-process for one machine; `redis` implements it past one machine.
//!
//! A broker hands every publication (and Join/Leave push) for a channel this node has
//! subscribed to the node's [`Hub`](crate::hub::Hub), in offset order per channel, and
//! tells the hub when a channel's stream restarts under a new epoch.
//!
//! The rules both brokers share live here once: what a complete history page is
//! ([`history`]), how Join/Leave are announced ([`presence`]). The no-loss machinery of the
//! Redis broker is two plain state machines, tested without Redis: [`tracker`] (per
//! channel: order, gaps, epochs) and [`subscriptions`] (per pub/sub connection: reference
//! counts, delayed unsubscribe, re-subscribe after reconnect).

pub mod blobs;
pub mod history;
pub mod memory;
pub mod presence;
pub mod redis;
pub mod subscriptions;
pub mod tracker;

use crate::{channel::ChannelName, config::NamespaceOptions};
use async_trait::async_trait;
use broker_proto::{
    ErrorCode,
    v1::{BlobRef, ClientInfo},
};
use bytes::Bytes;
use std::time::Duration;

/// How often the node calls [`Broker::upkeep`].
pub const UPKEEP_PERIOD: Duration = Duration::from_secs(3);

pub use history::{HistoryPage, Position};
pub use presence::PresenceChange;

/// A publish under way (see [`Broker::start_publish`]).
pub type PendingPublish =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Position, BrokerError>> + Send>>;

/// What a client or the HTTP API asks to publish.
#[derive(Debug, Clone, Default)]
pub struct PublishRequest {
    pub data: Bytes,
    pub content_type: String,
    /// A retried publish with the same key returns the first result and is delivered once.
    pub idempotency_key: String,
    /// The publishing client; `None` for the HTTP API.
    pub info: Option<ClientInfo>,
    /// Stored blobs the publication refers to (checked and filled in by `Channels`).
    pub blobs: Vec<BlobRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unavailable(_) => ErrorCode::BrokerUnavailable,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// One node as listed by `GET /api/v1/nodes`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub node: String,
    pub connections: usize,
    pub channels: usize,
    pub updated_unix_ms: i64,
    /// The fingerprint of the Redis servers the node shards over (empty without).
    #[serde(default)]
    pub layout: String,
    /// CPU time the process has used, and its resident memory (the admin page shows
    /// their rates and sizes; absent from entries of older nodes).
    #[serde(default)]
    pub cpu_seconds: f64,
    #[serde(default)]
    pub memory_bytes: u64,
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Assigns the next offset (when the namespace keeps history), stores the publication
    /// and delivers it to every node subscribed to the channel.
    async fn publish(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
    ) -> Result<Position, BrokerError>;

    /// Starts a publish whose place in the channel's order is taken before this returns,
    /// so the caller may start its next publish before this one is answered; the future
    /// gives the answer. `Err` hands the request back where the broker cannot promise
    /// that order (then `publish` it and wait).
    #[allow(clippy::result_large_err)] // the request is handed back, as it came
    fn start_publish(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
    ) -> Result<PendingPublish, PublishRequest> {
        let _ = (channel, options);
        Err(request)
    }

    /// Publications with offset > `since`, oldest first, at most `limit` (0: all retained).
    async fn history(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        since: u64,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError>;

    /// The channel's current offset and epoch.
    async fn position(&self, channel: &ChannelName) -> Result<Position, BrokerError>;

    /// A session on this node subscribes to `channel`: resolves once publications to it
    /// are delivered to this node's hub. Counted once per successful call.
    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError>;

    /// A session on this node left `channel` (pairs with a successful `subscribe`).
    async fn unsubscribe(&self, channel: &ChannelName);

    /// Adds or removes `client` in the channel's presence; `announce` pushes Join/Leave.
    async fn presence_update(
        &self,
        channel: &ChannelName,
        client: ClientInfo,
        change: PresenceChange,
        announce: bool,
    ) -> Result<(), BrokerError>;

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, BrokerError>;

    /// Closes every connection of `user`, on every node (close code 4000).
    async fn disconnect_user(&self, user: &str) -> Result<(), BrokerError>;

    /// The live nodes; `this` is the calling node's own current entry.
    async fn nodes(&self, this: &NodeInfo) -> Result<Vec<NodeInfo>, BrokerError>;

    /// Periodic housekeeping, every few seconds: the node registry heartbeat, presence
    /// refresh, forgetting idle channels.
    async fn upkeep(&self, this: &NodeInfo);

    /// Where blobs are stored.
    fn blobs(&self) -> &dyn blobs::BlobStore;

    /// A random secret every node shares (made once by whichever node asks first):
    /// the blob URL signing key when none is configured.
    async fn shared_secret(&self, name: &str) -> Result<Vec<u8>, BrokerError>;

    /// Whether the broker can serve requests now (`/readyz`).
    fn ready(&self) -> bool {
        true
    }
}

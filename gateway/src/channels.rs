//! `Channels`: the channel operations clients and the HTTP API share — resolving a name to
//! its namespace, and publish, history, presence and subscribe through the broker — with
//! the checks both must apply (namespace exists, history/presence enabled, size limit)
//! and the broker metrics recorded in one place.

use crate::{
    broker::{Broker, HistoryPage, Position, PublishRequest},
    channel::ChannelName,
    config::{NamespaceOptions, Namespaces},
    error::CommandError,
    metrics::{self, Metrics},
};
use broker_proto::{ErrorCode, v1::ClientInfo};
use std::{sync::Arc, time::Instant};

/// A history request returns at most this many publications (recovery returns all that
/// the namespace retains).
pub const MAX_HISTORY_LIMIT: u32 = 10_000;

pub struct Channels {
    namespaces: Namespaces,
    broker: Arc<dyn Broker>,
    metrics: Metrics,
}

/// How many publications a history read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// At most this many (capped at [`MAX_HISTORY_LIMIT`]; 0 means the cap).
    Page(u32),
    /// Everything retained, for recovery.
    All,
}

impl Channels {
    pub fn new(namespaces: Namespaces, broker: Arc<dyn Broker>, metrics: Metrics) -> Self {
        Self {
            namespaces,
            broker,
            metrics,
        }
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    /// Validates a channel name and finds its namespace's options (error 102 otherwise).
    pub fn resolve(&self, name: &str) -> Result<(ChannelName, NamespaceOptions), CommandError> {
        self.namespaces
            .resolve(name)
            .map_err(|e| CommandError::new(ErrorCode::UnknownChannel, e.to_string()))
    }

    /// Publishes for a client or the HTTP API, with the size limit checked and the
    /// broker's latency recorded.
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
        let position = result.inspect_err(|_| metrics::broker_error("publish"))?;
        metrics::publication(source);
        Ok(position)
    }

    /// Reads history after `since` (103 where the namespace keeps none).
    pub async fn history(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        since: u64,
        limit: Limit,
    ) -> Result<HistoryPage, CommandError> {
        if !options.has_history() {
            return Err(CommandError::permission_denied(
                "history is disabled in this namespace",
            ));
        }
        let limit = match limit {
            Limit::All => 0,
            Limit::Page(0) => MAX_HISTORY_LIMIT as usize,
            Limit::Page(n) => n.min(MAX_HISTORY_LIMIT) as usize,
        };
        Ok(self
            .broker
            .history(channel, options, since, limit)
            .await
            .inspect_err(|_| metrics::broker_error("history"))?)
    }

    pub async fn position(&self, channel: &ChannelName) -> Result<Position, CommandError> {
        Ok(self
            .broker
            .position(channel)
            .await
            .inspect_err(|_| metrics::broker_error("history"))?)
    }

    /// The channel's presence (103 where the namespace keeps none).
    pub async fn presence(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
    ) -> Result<Vec<ClientInfo>, CommandError> {
        if !options.presence {
            return Err(CommandError::permission_denied(
                "presence is disabled in this namespace",
            ));
        }
        Ok(self
            .broker
            .presence(channel)
            .await
            .inspect_err(|_| metrics::broker_error("presence"))?)
    }

    /// The node subscribes to `channel` for one more local session.
    pub async fn subscribe(&self, channel: &ChannelName) -> Result<(), CommandError> {
        Ok(self
            .broker
            .subscribe(channel)
            .await
            .inspect_err(|_| metrics::broker_error("subscribe"))?)
    }
}

//! `Node`: what every session, API request and background task of this process shares —
//! config, hub, broker, token verifier, metrics, and the table of live sessions that
//! draining and the connection limit work from.

use crate::{
    auth::Verifier,
    broker::{Broker, HistoryPage, Position, PublishRequest},
    channel::ChannelName,
    config::{Config, NamespaceOptions},
    hub::{Hub, SessionId},
    metrics::{self, Metrics},
    session::{CommandError, outbox::Outbox},
};
use broker_proto::{CloseCode, ErrorCode};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

/// History requests return at most this many publications.
const MAX_HISTORY_LIMIT: usize = 10_000;

struct LiveSession {
    user: String,
    outbox: Arc<Outbox>,
}

pub struct Node {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub verifier: Verifier,
    pub metrics: Metrics,
    sessions: Mutex<HashMap<SessionId, LiveSession>>,
    next_session: AtomicU64,
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
            sessions: Mutex::default(),
            next_session: AtomicU64::new(1),
            client_prefix: format!("{:08x}", rand::random::<u32>()),
            draining: AtomicBool::new(false),
            config,
        })
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<SessionId, LiveSession>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh session id and the client id shown to others (unique across nodes).
    pub fn next_session(&self) -> (SessionId, String) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        (id, format!("{}-{id}", self.client_prefix))
    }

    pub fn register(&self, id: SessionId, user: String, outbox: Arc<Outbox>) {
        let mut sessions = self.sessions();
        if sessions.insert(id, LiveSession { user, outbox }).is_none() {
            self.metrics.connections.set(sessions.len() as f64);
        }
    }

    pub fn unregister(&self, id: SessionId) {
        let mut sessions = self.sessions();
        sessions.remove(&id);
        self.metrics.connections.set(sessions.len() as f64);
    }

    pub fn connection_count(&self) -> usize {
        self.sessions().len()
    }

    /// Whether one more connection fits under `max_connections`.
    pub fn has_room(&self) -> bool {
        self.connection_count() < self.config.limits.max_connections
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

    /// Asks up to `max` sessions to close with `code`; returns how many were asked.
    pub fn close_sessions(&self, code: CloseCode, max: usize) -> usize {
        let sessions = self.sessions();
        let mut asked = 0;
        for s in sessions
            .values()
            .filter(|s| s.outbox.closing().is_none())
            .take(max)
        {
            s.outbox.close(code);
            asked += 1;
        }
        asked
    }

    /// Closes every connection of `user` on this node.
    pub fn disconnect_user(&self, user: &str, code: CloseCode) -> usize {
        let sessions = self.sessions();
        let matching = sessions.values().filter(|s| s.user == user);
        matching.map(|s| s.outbox.close(code)).count()
    }

    /// Publishes for a client or the HTTP API, with the broker's latency recorded.
    pub async fn publish(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
        source: &'static str,
    ) -> Result<Position, CommandError> {
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

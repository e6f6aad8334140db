//! The command side of one Redis server (a multiplexed connection: every command of the
//! node pipelined over one socket) or of a Redis Cluster (redis-rs's cluster connection,
//! routing by key slot), reconnecting with backoff and failing fast in between.
//! Every call is bounded by the command timeout, so a frozen Redis costs a client one
//! timeout, then 108 at once until Redis answers again.

use crate::{backoff::Backoff, broker::BrokerError};
use redis::{
    AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use std::{
    future::Future,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// A connection to one Redis server, or to a Redis Cluster (routing by key slot).
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// How to (re)connect.
pub enum Connector {
    Single(redis::Client, AsyncConnectionConfig),
    Cluster(ClusterClient),
}

impl Connector {
    async fn connect(&self) -> RedisResult<Conn> {
        match self {
            Self::Single(client, config) => client
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Conn::Single),
            Self::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
        }
    }
}

struct State {
    conn: Option<Conn>,
    retry_at: Option<Instant>,
    backoff: Backoff,
}

pub struct Commands {
    connector: Connector,
    timeout: Duration,
    state: Mutex<State>,
    connecting: tokio::sync::Mutex<()>,
    healthy: AtomicBool,
    /// Bumped whenever a new connection replaces the old one.
    generation: std::sync::atomic::AtomicU64,
    /// Whether the server acknowledges only persisted writes (AOF, `appendfsync always`),
    /// read on every new connection; the scripts record it with each channel's epoch.
    durable: AtomicBool,
}

/// Whether an error means the connection (not the command) failed.
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal()
}

impl Commands {
    pub fn new(client: redis::Client, timeout: Duration) -> Self {
        // redis-rs's default response timeout (500 ms) is replaced by ours on purpose.
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout));
        Self::with_connector(Connector::Single(client, config), timeout)
    }

    pub fn with_connector(connector: Connector, timeout: Duration) -> Self {
        Self {
            connector,
            timeout,
            state: Mutex::new(State {
                conn: None,
                retry_at: None,
                backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
            }),
            connecting: tokio::sync::Mutex::new(()),
            healthy: AtomicBool::new(false),
            generation: std::sync::atomic::AtomicU64::new(0),
            durable: AtomicBool::new(false),
        }
    }

    /// Which connection is current; a change means server-side state (such as a cluster
    /// connection's subscriptions) did not carry over.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Whether the server was durable when last connected (see the field).
    pub fn durable(&self) -> bool {
        self.durable.load(Ordering::Relaxed)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live connection, or an error at once while in a backoff window.
    fn current(&self) -> Result<Option<Conn>, BrokerError> {
        let s = self.state();
        if let Some(c) = &s.conn {
            return Ok(Some(c.clone()));
        }
        match s.retry_at {
            Some(t) if Instant::now() < t => {
                Err(BrokerError::Unavailable("redis is down; retrying".into()))
            }
            _ => Ok(None),
        }
    }

    pub async fn connection(&self) -> Result<Conn, BrokerError> {
        if let Some(c) = self.current()? {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.current()? {
            return Ok(c);
        }
        match tokio::time::timeout(self.timeout, self.connector.connect()).await {
            Ok(Ok(c)) => {
                let durable = probe_durable(c.clone(), self.timeout).await;
                self.durable.store(durable, Ordering::Relaxed);
                let mut s = self.state();
                s.conn = Some(c.clone());
                s.retry_at = None;
                s.backoff.reset();
                self.healthy.store(true, Ordering::Relaxed);
                self.generation.fetch_add(1, Ordering::Relaxed);
                Ok(c)
            }
            Ok(Err(e)) => Err(self.failed(e.to_string())),
            Err(_) => Err(self.failed("connect timed out".into())),
        }
    }

    fn failed(&self, why: String) -> BrokerError {
        let mut s = self.state();
        s.conn = None;
        let delay = s.backoff.next_delay();
        s.retry_at = Some(Instant::now() + delay);
        self.healthy.store(false, Ordering::Relaxed);
        tracing::warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "redis command connection failed");
        BrokerError::Unavailable(why)
    }

    /// Runs `f` on the connection within the command timeout.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = self.connection().await?;
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if is_connection_error(&e) => Err(self.failed(e.to_string())),
            Ok(Err(e)) => Err(BrokerError::Internal(e.to_string())),
            Err(_) => Err(self.failed("command timed out".into())),
        }
    }
}

/// Whether the server persists every write before acknowledging it. `CONFIG` may be
/// disabled (managed Redis): then the answer is no, and epochs rotate on every restart,
/// which is safe.
async fn probe_durable(mut conn: Conn, timeout: Duration) -> bool {
    let mut command = redis::cmd("CONFIG");
    command.arg("GET").arg("append*");
    let query = command.query_async::<std::collections::HashMap<String, String>>(&mut conn);
    match tokio::time::timeout(timeout, query).await {
        Ok(Ok(config)) => {
            config.get("appendonly").map(String::as_str) == Some("yes")
                && config.get("appendfsync").map(String::as_str) == Some("always")
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, "cannot read redis persistence config; treating it as not durable");
            false
        }
        Err(_) => false,
    }
}

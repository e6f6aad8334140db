//! The command side of one Redis server (a multiplexed connection: every command of the
//! node pipelined over one socket) or of a Redis Cluster (redis-rs's cluster connection,
//! routing by key slot), reconnecting with backoff and failing fast in between.
//! Every call is bounded by the command timeout, so a frozen Redis costs a client one
//! timeout, then 108 at once until Redis answers again.

use super::endpoint::Endpoint;
use crate::{backoff::Backoff, broker::BrokerError};
use redis::{
    AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo},
};
use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex,
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
    Single(Arc<Endpoint>, AsyncConnectionConfig),
    Cluster(Box<ClusterClient>),
}

impl Connector {
    fn switches(&self) -> u64 {
        match self {
            Self::Single(endpoint, _) => endpoint.switch_count(),
            Self::Cluster(_) => 0,
        }
    }

    async fn connect(&self) -> RedisResult<Conn> {
        match self {
            Self::Single(endpoint, config) => endpoint
                .client()
                .await?
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Conn::Single),
            Self::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
        }
    }
}

/// Who answers on a connection: the identity the scripts record with each channel's epoch
/// (see `scripts.rs`). Read once per new connection, before any script runs on it, so a
/// script never quotes the identity of another server. Empty `run_id` (Redis Cluster: the
/// connection reaches many masters) makes the scripts read it themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Instance {
    pub run_id: String,
    /// This server was promoted from a replica (it may lack acknowledged writes).
    pub promoted: bool,
    /// It acknowledges only persisted writes (AOF with `appendfsync always`).
    pub durable: bool,
}

struct State {
    conn: Option<(Conn, Arc<Instance>)>,
    /// The endpoint's master switch count when `conn` was made.
    switches: u64,
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
}

/// Whether an error means the connection (not the command) failed.
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal()
}

impl Commands {
    pub fn new(endpoint: Arc<Endpoint>, timeout: Duration) -> Self {
        // redis-rs's default response timeout (500 ms) is replaced by ours on purpose.
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout));
        Self::with_connector(Connector::Single(endpoint, config), timeout)
    }

    pub fn with_connector(connector: Connector, timeout: Duration) -> Self {
        Self {
            connector,
            timeout,
            state: Mutex::new(State {
                conn: None,
                switches: 0,
                retry_at: None,
                backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
            }),
            connecting: tokio::sync::Mutex::new(()),
            healthy: AtomicBool::new(false),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Which connection is current; a change means server-side state (such as a cluster
    /// connection's subscriptions) did not carry over.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live connection, or an error at once while in a backoff window.
    fn current(&self) -> Result<Option<(Conn, Arc<Instance>)>, BrokerError> {
        let mut s = self.state();
        if s.conn.is_some() && s.switches != self.connector.switches() {
            // Sentinel named another master: this one may be demoted any moment.
            s.conn = None;
            s.retry_at = None;
        }
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
        self.connection_to().await.map(|(c, _)| c)
    }

    /// The live connection and who answers on it, connecting if needed.
    async fn connection_to(&self) -> Result<(Conn, Arc<Instance>), BrokerError> {
        if let Some(c) = self.current()? {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.current()? {
            return Ok(c);
        }
        let switches = self.connector.switches();
        let connected = tokio::time::timeout(self.timeout, async {
            let conn = self.connector.connect().await?;
            let single = matches!(self.connector, Connector::Single(..));
            let instance = identify(conn.clone(), single).await?;
            Ok::<_, redis::RedisError>((conn, Arc::new(instance)))
        })
        .await;
        match connected {
            Ok(Ok(c)) => {
                let mut s = self.state();
                s.conn = Some(c.clone());
                s.switches = switches;
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
        self.run_as(|conn, _| f(conn)).await
    }

    /// Runs `f` on the connection, telling it who answers there.
    pub async fn run_as<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(Conn, Arc<Instance>) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (conn, instance) = self.connection_to().await?;
        match tokio::time::timeout(self.timeout, f(conn, instance)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if is_connection_error(&e) => Err(self.failed(e.to_string())),
            Ok(Err(e)) => Err(BrokerError::Internal(e.to_string())),
            Err(_) => Err(self.failed("command timed out".into())),
        }
    }
}

/// Who answers on a new connection. One server: its `run_id` and whether it was
/// promoted from a replica (`master_replid2` set), from `INFO`. Redis Cluster: left to
/// the scripts, which run on whichever master owns a channel's slot.
async fn identify(mut conn: Conn, single: bool) -> RedisResult<Instance> {
    let durable = durable(&mut conn).await;
    if !single {
        return Ok(Instance {
            durable,
            ..Instance::default()
        });
    }
    let server: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let replication: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut conn)
        .await?;
    Ok(Instance {
        run_id: info_field(&server, "run_id").unwrap_or_default().to_owned(),
        promoted: info_field(&replication, "master_replid2")
            .is_some_and(|r| r.bytes().any(|b| b != b'0')),
        durable,
    })
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Whether the server persists every write before acknowledging it; on Redis Cluster,
/// whether every master does (a plain `CONFIG GET` would ask one random node, whose answer
/// says nothing about the others). `CONFIG` may be disabled (managed Redis): then the
/// answer is no, and epochs rotate on every restart, which is safe.
async fn durable(conn: &mut Conn) -> bool {
    let mut command = redis::cmd("CONFIG");
    command.arg("GET").arg("append*");
    let answers = match conn {
        Conn::Single(c) => command.query_async::<Value>(c).await.map(|v| vec![v]),
        Conn::Cluster(c) => c
            .route_command(
                command,
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
            )
            .await
            .map(|v| match v {
                Value::Map(per_node) => per_node.into_iter().map(|(_, v)| v).collect(),
                other => vec![other],
            }),
    };
    let answers = match answers {
        Ok(answers) if !answers.is_empty() => answers,
        Ok(_) => return false,
        Err(e) => {
            tracing::info!(error = %e, "cannot read redis persistence config; treating it as not durable");
            return false;
        }
    };
    answers.into_iter().all(|answer| {
        match redis::from_redis_value::<HashMap<String, String>>(answer) {
            Ok(config) => {
                config.get("appendonly").map(String::as_str) == Some("yes")
                    && config.get("appendfsync").map(String::as_str) == Some("always")
            }
            Err(e) => {
                tracing::info!(error = %e, "cannot read redis persistence config; treating it as not durable");
                false
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_info_fields() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\n";
        assert_eq!(info_field(info, "run_id"), Some("abc123"));
        assert_eq!(info_field(info, "run"), None);
        assert_eq!(
            info_field("master_replid2:0000\r\n", "master_replid2"),
            Some("0000")
        );
    }
}

//! The command side of one Redis server: a multiplexed connection (every command of the
//! node pipelined over one socket) that reconnects with backoff and fails fast in between.
//! Every call is bounded by the command timeout, so a frozen Redis costs a client one
//! timeout, then 108 at once until Redis answers again.

use crate::{backoff::Backoff, broker::BrokerError};
use redis::{AsyncConnectionConfig, RedisError, RedisResult, aio::MultiplexedConnection};
use std::{
    future::Future,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

struct State {
    conn: Option<MultiplexedConnection>,
    retry_at: Option<Instant>,
    backoff: Backoff,
}

pub struct Commands {
    client: redis::Client,
    config: AsyncConnectionConfig,
    timeout: Duration,
    state: Mutex<State>,
    connecting: tokio::sync::Mutex<()>,
    healthy: AtomicBool,
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
        Self {
            client,
            config,
            timeout,
            state: Mutex::new(State {
                conn: None,
                retry_at: None,
                backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
            }),
            connecting: tokio::sync::Mutex::new(()),
            healthy: AtomicBool::new(false),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live connection, or an error at once while in a backoff window.
    fn current(&self) -> Result<Option<MultiplexedConnection>, BrokerError> {
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

    async fn connection(&self) -> Result<MultiplexedConnection, BrokerError> {
        if let Some(c) = self.current()? {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.current()? {
            return Ok(c);
        }
        let connect = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config);
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(c)) => {
                let mut s = self.state();
                s.conn = Some(c.clone());
                s.retry_at = None;
                s.backoff.reset();
                self.healthy.store(true, Ordering::Relaxed);
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
        F: FnOnce(MultiplexedConnection) -> Fut,
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

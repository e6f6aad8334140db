//! The gateway server. Data flows one way: [`transport`] (hyper + WebSocket upgrade) →
//! [`session`] (decode, auth, limits, outbound queue) → [`hub`] (node-local channel table,
//! fan-out) ⇄ [`broker`] (offsets, history, presence; `memory` here, Redis across nodes).
//! The HTTP [`api`] sits beside the sessions and uses the same hub and broker.
//!
//! See ARCHITECTURE.md for the data flow and the decisions behind it.

pub mod api;
pub mod auth;
pub mod backoff;
pub mod broker;
pub mod channel;
pub mod config;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod session;
pub mod shutdown;
pub mod transport;

use std::{sync::Arc, time::Duration};

/// Builds the node from `config` and serves until SIGTERM/SIGINT has drained it.
pub async fn run(config: config::Config) -> Result<(), String> {
    let (metrics, prometheus) = metrics::Metrics::install();
    let hub = Arc::new(hub::Hub::new(metrics.clone()));
    let urls = config.redis_urls();
    let (broker, memory, redis): (Arc<dyn broker::Broker>, _, _) = if urls.is_empty() {
        let memory = Arc::new(broker::memory::MemoryBroker::new(hub.clone()));
        (memory.clone(), Some(memory), None)
    } else {
        let r = &config.redis;
        let redis_config = broker::redis::RedisConfig {
            urls,
            prefix: r.prefix.clone(),
            pubsub_connections: r.pubsub_connections,
            command_timeout: Duration::from_millis(r.command_timeout_ms),
            unsubscribe_delay: Duration::from_millis(r.unsubscribe_delay_ms),
            probe_interval: Duration::from_millis(r.probe_interval_ms),
            presence_ttl: Duration::from_secs(r.presence_ttl_seconds.max(1)),
        };
        let redis = broker::redis::RedisBroker::new(redis_config, &config.node_id, hub.clone())?;
        (redis.clone(), None, Some(redis))
    };
    let node = Arc::new(node::Node::new(config, hub, broker, metrics)?);
    if !node.verifier.enabled() {
        tracing::warn!("no token keys configured: clients connect anonymously");
    }
    if node.config.api_key.is_none() {
        tracing::info!("no API key configured: the HTTP API is disabled");
    }

    let listener = tokio::net::TcpListener::bind(node.config.listen)
        .await
        .map_err(|e| format!("binding {}: {e}", node.config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, node = %node.config.node_id, redis = redis.is_some(), "listening");
    // Tests and scripts read the bound address (with --listen 127.0.0.1:0) from stdout.
    println!("listening on {addr}");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(transport::serve(
        node.clone(),
        prometheus.clone(),
        listener,
        stop_rx,
    ));
    let upkeep = tokio::spawn({
        let node = node.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3));
            let mut rounds = 0u64;
            loop {
                tick.tick().await;
                rounds += 1;
                prometheus.run_upkeep();
                let _ = node.broker.heartbeat(&node.info()).await;
                if let Some(memory) = &memory {
                    let namespaces = &node.config.namespaces;
                    let options = |c: &channel::ChannelName| {
                        namespaces.get(c.namespace()).copied().unwrap_or_default()
                    };
                    memory.sweep(options, std::time::Instant::now());
                }
                if let Some(redis) = &redis {
                    let every = (redis.presence_ttl().as_secs() / 3 / 3).max(1);
                    if rounds.is_multiple_of(every) {
                        redis.refresh_presence().await;
                    }
                }
            }
        }
    });

    shutdown::wait_for_signal().await;
    tracing::info!("signal received: draining");
    // Draining refuses new WebSockets (503) but keeps answering /readyz (503) and
    // /healthz, so probes see "not ready" rather than a refused connection.
    node.start_draining();
    shutdown::drain(&node, Duration::from_secs(node.config.limits.drain_seconds)).await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    upkeep.abort();
    tracing::info!("drained, exiting");
    Ok(())
}

//! The gateway server. Data flows one way: [`transport`] (hyper + WebSocket upgrade) →
//! [`session`] (decode, auth, limits, the delivery rule) → [`hub`] (node-local channel
//! table, fan-out into per-connection outboxes) ⇄ [`broker`] (offsets, history, presence;
//! `memory` on one node, `redis` across nodes). The HTTP [`api`] sits beside the sessions
//! and uses the same [`channels`] operations.
//!
//! See ARCHITECTURE.md for the map and where each guarantee is proven.

pub mod api;
pub mod auth;
pub mod backoff;
pub mod blobs;
pub mod broker;
pub mod channel;
pub mod channels;
pub mod clock;
pub mod config;
pub mod error;
pub mod files;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod rpc;
pub mod session;
pub mod shutdown;
pub mod tls;
pub mod transport;
pub mod web;
pub mod ws;

use broker::Broker;
use std::sync::Arc;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("auth: {0}")]
    Auth(#[from] auth::KeyError),
    #[error(transparent)]
    Redis(#[from] broker::redis::SetupError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Builds the node from `config` and serves until SIGTERM/SIGINT has drained it.
pub async fn run(config: config::Config) -> Result<(), StartError> {
    let (metrics, prometheus) = metrics::Metrics::install();
    metrics::limits(
        config.transport.max_connections,
        config.blobs.upload_budget_bytes,
        config.blobs.memory_store_bytes,
    );
    let clock = clock::Clock::system();
    let blob_urls = Arc::new(blobs::signing::UrlSigner::new(config.blobs.url_ttl));
    if let Some(keys) = &config.blobs.signing_key {
        // `new,old`: sign with the first, accept both (rotation without downtime).
        let keys: Vec<&[u8]> = keys
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::as_bytes)
            .collect();
        blob_urls.set_keys(&keys);
    }
    let hub = Arc::new(hub::Hub::with_blob_urls(
        metrics.clone(),
        blob_urls.clone(),
        clock.clone(),
    ));
    let broker: Arc<dyn Broker> = match config.redis() {
        None => Arc::new(broker::memory::MemoryBroker::with_blob_store(
            hub.clone(),
            config.namespaces.clone(),
            clock.clone(),
            config.blobs.memory_store_bytes,
        )),
        Some(redis) => broker::redis::RedisBroker::new(
            redis,
            &config.node_id,
            hub.clone(),
            config.namespaces.clone(),
            clock.clone(),
        )?,
    };
    if !blob_urls.ready() {
        // Every node must sign blob URLs with the same key: without a configured one,
        // the first node to ask makes it and the broker keeps it (Redis) for the others.
        let (broker, blob_urls) = (broker.clone(), blob_urls.clone());
        tokio::spawn(async move {
            loop {
                match broker.shared_secret("blob-signing-key").await {
                    Ok(key) => return blob_urls.set_key(&key),
                    Err(e) => tracing::warn!(error = %e, "fetching the blob signing key; retrying"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }
    let verifier = auth::Verifier::new(&config.auth)?;
    let node = Arc::new(node::Node::new(
        config, hub, broker, verifier, metrics, clock,
    ));
    node.verifier.watch_jwks();
    if !node.verifier.enabled() {
        tracing::warn!("no token keys configured: clients connect anonymously");
    }
    if node.config.api.key.is_none() {
        tracing::info!("no API key configured: the HTTP API is disabled");
    }

    let tls = match &node.config.transport.tls {
        None => None,
        Some((cert, key)) => {
            let tls = tls::Tls::new(cert, key).map_err(StartError::Tls)?;
            tls.watch();
            Some(Arc::new(tls))
        }
    };
    let addr = node.config.transport.listen;
    let listener = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let redis = node.config.redis_url.is_some();
    tracing::info!(%addr, node = %node.config.node_id, redis, "listening");
    // Tests and scripts read the bound address (with --listen 127.0.0.1:0) from stdout.
    println!("listening on {addr}");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(transport::serve(
        node.clone(),
        prometheus.clone(),
        listener,
        tls,
        stop_rx,
    ));
    let upkeep = tokio::spawn({
        let node = node.clone();
        async move {
            let mut tick = tokio::time::interval(broker::UPKEEP_PERIOD);
            loop {
                tick.tick().await;
                prometheus.run_upkeep();
                node.broker().upkeep(&node.info()).await;
            }
        }
    });

    shutdown::wait_for_signal().await;
    tracing::info!("signal received: draining");
    // Draining refuses new WebSockets (503) but keeps answering /readyz (503) and
    // /healthz, so probes see "not ready" rather than a refused connection.
    node.start_draining();
    shutdown::drain(&node, node.config.drain).await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    upkeep.abort();
    tracing::info!("drained, exiting");
    Ok(())
}

/// Pending connections the listener queues (the kernel caps it at `net.core.somaxconn`):
/// a reconnect storm sends thousands of SYNs at once, and every one dropped from a full
/// queue waits a second or more for its retransmission.
const LISTEN_BACKLOG: u32 = 8192;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

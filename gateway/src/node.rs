//! `Node`: what the listener, the HTTP API and the background tasks of this process share —
//! config, hub, channel operations, token verifier, metrics, the sessions' context — plus
//! the node-wide state the transport needs: WebSocket slots and draining.

use crate::{
    auth::Verifier,
    blobs::upload::Budget,
    broker::{Broker, NodeInfo},
    channels::Channels,
    clock::Clock,
    config::Config,
    hub::Hub,
    metrics::Metrics,
    peers::{AddressSlot, PerAddress},
    rpc::RpcClient,
    session,
};
use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

pub use crate::peers::SocketSlot;

pub struct Node {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub channels: Arc<Channels>,
    pub verifier: Arc<Verifier>,
    pub metrics: Metrics,
    pub clock: Clock,
    pub sessions: Arc<session::Context>,
    /// Upgraded WebSockets, counted from the upgrade until the connection task ends.
    sockets: Arc<AtomicUsize>,
    /// The same, per client address (`max_connections_per_ip`).
    per_address: PerAddress,
    draining: AtomicBool,
}

impl Node {
    pub fn new(
        config: Config,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        verifier: Verifier,
        metrics: Metrics,
        clock: Clock,
    ) -> Self {
        let channels = Arc::new(Channels::new(
            config.namespaces.clone(),
            broker,
            metrics.clone(),
            hub.clone(),
            config.blobs.clone(),
            config.reads.clone(),
        ));
        let verifier = Arc::new(verifier);
        let sessions = Arc::new(session::Context::new(
            hub.clone(),
            channels.clone(),
            verifier.clone(),
            clock.clone(),
            config.session.clone(),
            config.node_id.clone(),
            Arc::new(RpcClient::new(config.rpc.clone())),
            Budget::new(config.blobs.upload_budget_bytes),
            config.transport.max_connections_per_user,
        ));
        Self {
            hub,
            channels,
            verifier,
            metrics,
            clock,
            sessions,
            sockets: Arc::default(),
            per_address: PerAddress::new(config.transport.max_connections_per_ip),
            draining: AtomicBool::new(false),
            config,
        }
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        self.channels.broker()
    }

    pub fn connection_count(&self) -> usize {
        self.hub.connection_count()
    }

    /// Takes a WebSocket slot; `None` when `max_connections` are already open.
    pub fn reserve_socket(&self) -> Option<SocketSlot> {
        let max = self.config.transport.max_connections;
        let taken = self
            .sockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        taken.ok().map(|_| SocketSlot::new(self.sockets.clone()))
    }

    /// Takes a slot for one more socket from `addr`; `None` when it holds the maximum.
    pub fn reserve_address(&self, addr: IpAddr) -> Option<AddressSlot> {
        self.per_address.take(addr)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker().ready() && self.hub.blob_urls().ready()
    }

    /// Starts draining: readiness fails and no new sockets are accepted.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// This node's entry in the node registry.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            node: self.config.node_id.clone(),
            connections: self.connection_count(),
            channels: self.hub.channel_count(),
            updated_unix_ms: self.clock.unix_ms(),
            layout: String::new(),
            cpu_seconds: crate::metrics::process_cpu_seconds().unwrap_or(0.0),
            memory_bytes: crate::metrics::process_resident_bytes().unwrap_or(0),
        }
    }
}

//! `Context`: the narrow handles every session of the node shares — the hub it joins, the
//! channel operations, the token verifier, the clock and its settings — and nothing else
//! of the node, so the session core can be built and tested without a listener.

use crate::{
    auth::Verifier,
    blobs::upload::Budget,
    channels::Channels,
    clock::Clock,
    config::SessionConfig,
    hub::{Hub, SessionId},
    peers::PerUser,
    rpc::RpcClient,
};
use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};
use std::time::Duration;

pub struct Context {
    pub hub: Arc<Hub>,
    pub channels: Arc<Channels>,
    pub verifier: Arc<Verifier>,
    pub clock: Clock,
    pub config: SessionConfig,
    /// This node's name, reported in `ConnectResult`.
    pub node_id: String,
    pub rpc: Arc<RpcClient>,
    /// Bytes of unfinished uploads the whole node may hold.
    pub upload_budget: Arc<Budget>,
    /// Sockets per authenticated user (`max_connections_per_user`).
    pub per_user: PerUser,
    next_session: AtomicU64,
    /// Makes client ids unique across nodes and restarts.
    client_prefix: String,
    /// Whether the deadline sweep runs ([`Self::start_sweep`]).
    sweeping: AtomicBool,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        hub: Arc<Hub>,
        channels: Arc<Channels>,
        verifier: Arc<Verifier>,
        clock: Clock,
        config: SessionConfig,
        node_id: String,
        rpc: Arc<RpcClient>,
        upload_budget: Arc<Budget>,
        max_connections_per_user: usize,
    ) -> Self {
        Self {
            hub,
            channels,
            verifier,
            clock,
            config,
            node_id,
            rpc,
            upload_budget,
            per_user: PerUser::new(max_connections_per_user),
            next_session: AtomicU64::new(1),
            client_prefix: format!("{:08x}", rand::random::<u32>()),
            sweeping: AtomicBool::new(false),
        }
    }

    /// A fresh session id and the client id shown to others (unique across nodes).
    /// Starts, once, the task that wakes sessions whose ping or idle check is due: one
    /// pass over the node's sessions every `ping_interval / 10` (10 ms to 1 s), instead of
    /// a timer in every connection's task (112 bytes each, kept by every idle
    /// connection). A ping may go out up to one period late. The task ends with the
    /// context.
    pub fn start_sweep(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let period = (self.config.ping_interval / 10)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let context = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(ctx) = context.upgrade() else {
                    return;
                };
                ctx.hub.wake_due(ctx.clock.now());
            }
        });
    }

    pub fn next_session(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The client id of session `id`, as clients and presence see it: made when needed
    /// rather than kept by every connection.
    pub fn client_id(&self, id: SessionId) -> String {
        format!("{}-{id}", self.client_prefix)
    }
}

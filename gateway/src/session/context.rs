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
    atomic::{AtomicU64, Ordering},
};

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
        }
    }

    /// A fresh session id and the client id shown to others (unique across nodes).
    pub fn next_session(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The client id of session `id`, as clients and presence see it: made when needed
    /// rather than kept by every connection.
    pub fn client_id(&self, id: SessionId) -> String {
        format!("{}-{id}", self.client_prefix)
    }
}

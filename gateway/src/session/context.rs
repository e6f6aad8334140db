//! `Context`: the narrow handles every session of the node shares — the hub it joins, the
//! channel operations, the token verifier, the clock and its settings — and nothing else
//! of the node, so the session core can be built and tested without a listener.

use crate::{
    auth::Verifier,
    channels::Channels,
    clock::Clock,
    config::SessionConfig,
    hub::{Hub, SessionId},
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
    next_session: AtomicU64,
    /// Makes client ids unique across nodes and restarts.
    client_prefix: String,
}

impl Context {
    pub fn new(
        hub: Arc<Hub>,
        channels: Arc<Channels>,
        verifier: Arc<Verifier>,
        clock: Clock,
        config: SessionConfig,
        node_id: String,
    ) -> Self {
        Self {
            hub,
            channels,
            verifier,
            clock,
            config,
            node_id,
            next_session: AtomicU64::new(1),
            client_prefix: format!("{:08x}", rand::random::<u32>()),
        }
    }

    /// A fresh session id and the client id shown to others (unique across nodes).
    pub fn next_session(&self) -> (SessionId, String) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        (id, format!("{}-{id}", self.client_prefix))
    }
}

//! The node registry: every node writes its entry (connections, channels) into one hash
//! every few seconds; `GET /api/v1/nodes` lists the entries that are fresh.

use super::{RedisBroker, Server};
use crate::broker::{BrokerError, NodeInfo};
use std::collections::HashMap;

/// A node missing from the registry this long is considered gone.
const NODE_TTL_MS: i64 = 15_000;

impl RedisBroker {
    /// The registry lives on the server with the smallest name, so every node of a layout
    /// (whatever the order of its URLs) uses the same one; anywhere in a Cluster.
    fn registry(&self) -> &Server {
        &self.servers[super::sharding::registry(&self.names)]
    }

    /// Writes this node's entry, with its layout fingerprint, and compares the layouts
    /// of the live nodes.
    pub(super) async fn heartbeat(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        let info = NodeInfo {
            layout: self.layout.clone(),
            ..info.clone()
        };
        let json =
            serde_json::to_string(&info).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let (key, node) = (self.keys.nodes(), info.node.clone());
        self.registry()
            .commands
            .run(|mut c| async move {
                redis::cmd("HSET")
                    .arg(key)
                    .arg(node)
                    .arg(json)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|_| ())
    }

    pub(super) async fn live_nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        let key = self.keys.nodes();
        let all: HashMap<String, String> = self
            .registry()
            .commands
            .run(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
            .await?;
        let now = self.clock.unix_ms();
        let (mut live, mut stale) = (Vec::new(), Vec::new());
        for (node, json) in all {
            match serde_json::from_str::<NodeInfo>(&json) {
                Ok(info) if now - info.updated_unix_ms < NODE_TTL_MS => live.push(info),
                _ => stale.push(node),
            }
        }
        if !stale.is_empty() {
            let key = self.keys.nodes();
            let _ = self
                .registry()
                .commands
                .run(|mut c| async move {
                    redis::cmd("HDEL")
                        .arg(key)
                        .arg(stale)
                        .query_async::<i64>(&mut c)
                        .await
                })
                .await;
        }
        live.sort_by(|a, b| a.node.cmp(&b.node));
        match live.iter().find(|n| n.layout != self.layout) {
            Some(other) => self.layout_mismatch(&other.layout),
            None => crate::metrics::layout_mismatch(false),
        }
        Ok(live)
    }
}

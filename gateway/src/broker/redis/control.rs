//! Control messages: what every node must hear, whichever Redis server or Cluster shard
//! it uses, on the `<prefix>control` pub/sub channel. Today: "disconnect <user>".

use crate::hub::Hub;
use broker_proto::CloseCode;

const DISCONNECT: &str = "disconnect ";

/// The control message asking every node to disconnect `user`.
pub fn disconnect(user: &str) -> Vec<u8> {
    format!("{DISCONNECT}{user}").into_bytes()
}

/// Acts on a control message heard from Redis.
pub fn on_message(hub: &Hub, payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else {
        return;
    };
    if let Some(user) = text.strip_prefix(DISCONNECT) {
        let n = hub.disconnect_user(user, CloseCode::Disconnected);
        tracing::info!(user, connections = n, "disconnected by API");
    }
}

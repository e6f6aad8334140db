//! Presence changes and how they are announced: both brokers push the same Join/Leave
//! body to a channel's subscribers, and only when the member set really changed.

use crate::channel::ChannelName;
use broker_proto::v1::{ClientInfo, Join, Leave, server_frame::Body};

/// Presence change announced to a channel's subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    Join,
    Leave,
}

/// The push announcing `change` of `client` in `channel`.
pub fn announcement(channel: &ChannelName, client: ClientInfo, change: PresenceChange) -> Body {
    let channel = channel.as_str().to_owned();
    match change {
        PresenceChange::Join => Body::Join(Join {
            channel,
            info: Some(client),
        }),
        PresenceChange::Leave => Body::Leave(Leave {
            channel,
            info: Some(client),
        }),
    }
}

/// Presence lists are sorted by user, then client id, whichever broker holds them.
pub fn sort(clients: &mut [ClientInfo]) {
    clients.sort_by(|a, b| (&a.user, &a.client).cmp(&(&b.user, &b.client)));
}

//! From Redis pub/sub to the hub, in order and without gaps. Redis pub/sub is at-most-once,
//! so the node tracks the last offset it delivered per channel: a publication that skips
//! ahead parks while the missing ones are read from the stream, and after a pub/sub
//! reconnect every channel is caught up from the stream the same way. A new epoch (Redis
//! lost the stream) tells local subscribers to reset before the new stream's publications.
//!
//! Decoding happens once per node; the hub then encodes once per encoding.

use super::Keys;
use crate::{channel::ChannelName, hub::Hub};
use broker_proto::v1::{Publication, ServerFrame, server_frame::Body};
use bytes::Bytes;
use prost::Message;
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

/// A page of the stream: position plus the publications after some offset.
pub struct StreamPage {
    pub offset: u64,
    pub epoch: String,
    pub publications: Vec<Publication>,
}

/// Reads the stream; implemented by the broker (so tests can use a fake-free real Redis).
pub trait StreamReader: Send + Sync + 'static {
    fn read(
        &self,
        channel: ChannelName,
        since: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<StreamPage>> + Send + '_>>;
}

#[derive(Default)]
struct Track {
    last: Option<u64>,
    epoch: String,
    repairing: bool,
    /// Publications that arrived ahead of a gap, waiting for the repair.
    pending: BTreeMap<u64, Publication>,
}

pub struct Delivery {
    hub: Arc<Hub>,
    keys: Keys,
    tracks: Mutex<HashMap<String, Track>>,
    pub(super) reader: std::sync::OnceLock<Arc<dyn StreamReader>>,
}

/// Splits "<offset> <epoch> <payload>".
pub fn parse_envelope(message: &[u8]) -> Option<(u64, &str, &[u8])> {
    let space = message.iter().position(|&b| b == b' ')?;
    let offset = std::str::from_utf8(&message[..space]).ok()?.parse().ok()?;
    let rest = &message[space + 1..];
    let space = rest.iter().position(|&b| b == b' ')?;
    let epoch = std::str::from_utf8(&rest[..space]).ok()?;
    Some((offset, epoch, &rest[space + 1..]))
}

impl Delivery {
    pub fn new(hub: Arc<Hub>, keys: Keys) -> Self {
        Self {
            hub,
            keys,
            tracks: Mutex::default(),
            reader: std::sync::OnceLock::new(),
        }
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    fn tracks(&self) -> MutexGuard<'_, HashMap<String, Track>> {
        self.tracks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message from a channel subscription.
    pub fn on_message(self: &Arc<Self>, redis_channel: &str, payload: &[u8]) {
        let Some(channel) = self.keys.channel_of(redis_channel) else {
            return;
        };
        let Some((offset, epoch, body)) = parse_envelope(payload) else {
            tracing::warn!(channel, "undecodable pub/sub envelope");
            return;
        };
        let frame = match ServerFrame::decode(Bytes::copy_from_slice(body)) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(channel, error = %e, "undecodable pub/sub frame");
                return;
            }
        };
        match frame.body {
            Some(Body::Publication(mut p)) => {
                p.offset = offset;
                p.epoch = epoch.to_owned();
                self.on_publication(channel, p);
            }
            Some(_) => {
                self.hub.deliver(channel, 0, &frame);
            }
            None => {}
        }
    }

    fn deliver(&self, channel: &str, p: Publication) {
        let offset = p.offset;
        let frame = ServerFrame {
            id: 0,
            error: None,
            body: Some(Body::Publication(p)),
        };
        self.hub.deliver(channel, offset, &frame);
    }

    pub fn on_publication(self: &Arc<Self>, channel: &str, p: Publication) {
        if p.offset == 0 {
            // A channel without history: nothing to order or repair.
            return self.deliver(channel, p);
        }
        let mut tracks = self.tracks();
        let t = tracks.entry(channel.to_owned()).or_default();
        if !t.epoch.is_empty() && t.epoch != p.epoch {
            // The stream restarted: everything of the old epoch is gone.
            tracing::warn!(channel, old = %t.epoch, new = %p.epoch, "channel epoch changed");
            self.hub.reset(channel);
            t.epoch = p.epoch.clone();
            t.last = Some(0);
            t.pending.clear();
        }
        if t.epoch.is_empty() {
            t.epoch = p.epoch.clone();
        }
        match t.last {
            None => {
                t.last = Some(p.offset);
                self.deliver(channel, p);
            }
            Some(last) if p.offset <= last => {}
            Some(last) if p.offset == last + 1 && !t.repairing => {
                t.last = Some(p.offset);
                self.deliver(channel, p);
            }
            Some(last) => {
                t.pending.insert(p.offset, p);
                if !t.repairing {
                    t.repairing = true;
                    crate::metrics::repair("gap");
                    self.spawn_repair(channel, last);
                }
            }
        }
    }

    /// Starts tracking a channel the node just subscribed to, at the stream's position.
    pub fn init(&self, channel: &str, offset: u64, epoch: &str) {
        let mut tracks = self.tracks();
        let t = tracks.entry(channel.to_owned()).or_default();
        if t.last.is_none() {
            t.last = Some(offset);
            t.epoch = epoch.to_owned();
        }
    }

    pub fn forget(&self, channel: &str) {
        self.tracks().remove(channel);
    }

    /// After a pub/sub reconnect: catch every tracked channel up from its stream.
    pub fn repair_all(self: &Arc<Self>, channels: &[String]) {
        let mut tracks = self.tracks();
        for redis_channel in channels {
            let Some(channel) = self.keys.channel_of(redis_channel) else {
                continue;
            };
            let Some(t) = tracks.get_mut(channel) else {
                continue;
            };
            if let (Some(last), false) = (t.last, t.repairing) {
                t.repairing = true;
                crate::metrics::repair("reconnect");
                self.spawn_repair(channel, last);
            }
        }
    }

    fn spawn_repair(self: &Arc<Self>, channel: &str, since: u64) {
        let this = self.clone();
        let channel = channel.to_owned();
        tokio::spawn(async move { this.repair(channel, since).await });
    }

    async fn repair(self: Arc<Self>, channel: String, mut since: u64) {
        let Some(reader) = self.reader.get().cloned() else {
            return;
        };
        let Ok(name) = ChannelName::parse(&channel) else {
            return;
        };
        let mut backoff = crate::backoff::Backoff::new(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(2),
        );
        loop {
            let Some(page) = reader.read(name.clone(), since).await else {
                if !self.tracks().get(&channel).is_some_and(|t| t.repairing) {
                    return; // forgotten meanwhile
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            };
            match self.apply(&channel, page) {
                Some(next) => since = next,
                None => return,
            }
        }
    }

    /// Delivers a repair page and what waited behind it; `Some(offset)` asks for another
    /// page after that offset.
    fn apply(&self, channel: &str, page: StreamPage) -> Option<u64> {
        let mut tracks = self.tracks();
        let t = tracks.get_mut(channel)?;
        if !t.epoch.is_empty() && t.epoch != page.epoch {
            tracing::warn!(channel, old = %t.epoch, new = %page.epoch, "channel epoch changed while disconnected");
            self.hub.reset(channel);
            t.epoch = page.epoch.clone();
            t.last = Some(0);
            t.pending.retain(|_, p| p.epoch == page.epoch);
            // Read the new stream from its start.
            return Some(0);
        }
        if t.epoch.is_empty() {
            t.epoch = page.epoch.clone();
        }
        let page_was_full = page.publications.len() >= super::PAGE;
        for p in page.publications {
            let last = t.last.unwrap_or(0);
            if p.offset <= last {
                continue;
            }
            if p.offset > last + 1 {
                crate::metrics::history_gap(p.offset - last - 1);
                tracing::warn!(
                    channel,
                    from = last + 1,
                    to = p.offset - 1,
                    "publications lost: trimmed from the stream"
                );
            }
            t.last = Some(p.offset);
            t.pending.remove(&p.offset);
            self.deliver(channel, p);
        }
        let last = t.last.unwrap_or(0);
        if last < page.offset {
            if page_was_full {
                // More than one page behind: keep going.
                return Some(last);
            }
            // The stream ends before its offset: the rest expired or was trimmed.
            crate::metrics::history_gap(page.offset - last);
            tracing::warn!(
                channel,
                from = last + 1,
                to = page.offset,
                "publications lost: expired from the stream"
            );
            t.last = Some(page.offset);
        }
        // Then whatever arrived live meanwhile, in order.
        while let Some((offset, p)) = t.pending.pop_first() {
            let last = t.last.unwrap_or(0);
            if offset <= last {
                continue;
            }
            if offset > last + 1 {
                // The stream no longer has the missing ones (trimmed or expired): a real
                // loss, counted; clients see the gap in offsets and can resubscribe.
                crate::metrics::history_gap(offset - last - 1);
                tracing::warn!(
                    channel,
                    from = last + 1,
                    to = offset - 1,
                    "publications lost: not in the stream"
                );
            }
            t.last = Some(offset);
            self.deliver(channel, p);
        }
        t.repairing = false;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_envelopes() {
        assert_eq!(
            parse_envelope(b"12 abc payload bytes"),
            Some((12, "abc", &b"payload bytes"[..]))
        );
        assert_eq!(
            parse_envelope(b"0  \x00\x01"),
            Some((0, "", &b"\x00\x01"[..]))
        );
        assert_eq!(parse_envelope(b"x y z"), None);
        assert_eq!(parse_envelope(b"12"), None);
    }
}

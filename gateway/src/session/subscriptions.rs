//! `Subscriptions`: one connection's channels, each with the position its client has, and
//! the rule that decides which queued frames reach the client.
//!
//! The rule is what makes recovery exact. A subscribe joins the live stream first and
//! reads history second, so a publication may be both in the reply and queued live; the
//! reply is written first and sets the subscription's position, and a queued publication
//! at or below that position is a duplicate. In full:
//! - a frame queued for an earlier subscription to the same channel (another generation)
//!   is dropped, so an unsubscribe really ends delivery;
//! - a publication of another epoch than the subscription's is dropped: it belongs to a
//!   stream the client was already moved off (or not yet moved onto, by a reset);
//! - a publication at or below the position is dropped; others advance it;
//! - a reset to the epoch the subscription already has is dropped (its read saw the new
//!   epoch first); otherwise it moves the subscription to the new epoch at offset 0 and
//!   is passed on, so the client learns its old position is void.

use crate::{
    channel::ChannelName,
    hub::{
        Stream,
        outbox::{ItemKind, Lane, OutItem},
    },
};
use std::{collections::HashMap, sync::Arc};

/// A channel this connection subscribes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub channel: ChannelName,
    /// Which subscription to this channel on this connection.
    pub generation: u32,
    /// The epoch and the last offset the client has (from the subscribe reply, then each
    /// publication delivered). Empty epoch and 0 in channels without history.
    pub epoch: String,
    pub last_offset: u64,
    pub presence: bool,
    pub join_leave: bool,
    /// Made with a subscription token or by the token's `channels` claim: the channel's
    /// private namespace and the token's grants do not apply to it while it lasts.
    pub granted: bool,
    /// The stream of the last publication admitted: a queued item sharing it has the
    /// same epoch, without comparing strings per delivery.
    pub seen: Option<Arc<Stream>>,
    /// The namespace's `write_delay_ms`: publications here wait to be written together
    /// (and never take the express lane).
    pub write_delay_ms: u64,
}

/// What to do with a queued frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Deliver,
    Skip,
}

#[derive(Debug, Default)]
pub struct Subscriptions {
    map: Map,
    generation: u32,
}

/// A connection's subscriptions by channel name: most connections hold one or a few,
/// kept in a vector sized exactly (a hash map's smallest table would hold four, ~450
/// bytes per idle connection); past [`FEW`] a hash map.
#[derive(Debug)]
enum Map {
    Few(Vec<Subscription>),
    /// Boxed: the enum is as large as its largest variant in every connection, and a
    /// map (48 bytes) is twice a vector; the extra allocation is paid past `FEW` only.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Arc<str>, Subscription>>),
}

const FEW: usize = 8;

impl Default for Map {
    fn default() -> Self {
        Self::Few(Vec::new())
    }
}

impl Map {
    fn len(&self) -> usize {
        match self {
            Self::Few(v) => v.len(),
            Self::Many(m) => m.len(),
        }
    }

    fn get(&self, channel: &str) -> Option<&Subscription> {
        match self {
            Self::Few(v) => v.iter().find(|s| s.channel.as_str() == channel),
            Self::Many(m) => m.get(channel),
        }
    }

    fn get_mut(&mut self, channel: &str) -> Option<&mut Subscription> {
        match self {
            Self::Few(v) => v.iter_mut().find(|s| s.channel.as_str() == channel),
            Self::Many(m) => m.get_mut(channel),
        }
    }

    fn insert(&mut self, sub: Subscription) {
        match self {
            Self::Few(v) => {
                if let Some(i) = v.iter().position(|s| s.channel == sub.channel) {
                    v[i] = sub;
                } else if v.len() < FEW {
                    v.reserve_exact(1);
                    v.push(sub);
                } else {
                    let mut m: HashMap<Arc<str>, Subscription> = std::mem::take(v)
                        .into_iter()
                        .map(|s| (s.channel.shared().clone(), s))
                        .collect();
                    m.insert(sub.channel.shared().clone(), sub);
                    *self = Self::Many(Box::new(m));
                }
            }
            Self::Many(m) => {
                m.insert(sub.channel.shared().clone(), sub);
            }
        }
    }

    fn remove(&mut self, channel: &str) -> Option<Subscription> {
        let removed = match self {
            Self::Few(v) => {
                let i = v.iter().position(|s| s.channel.as_str() == channel)?;
                let sub = v.swap_remove(i);
                v.shrink_to_fit();
                Some(sub)
            }
            Self::Many(m) => m.remove(channel),
        };
        if self.len() == 0 {
            *self = Self::default();
        }
        removed
    }

    fn drain(&mut self) -> Vec<Subscription> {
        match std::mem::take(self) {
            Self::Few(v) => v,
            Self::Many(m) => m.into_values().collect(),
        }
    }

    fn values(&self) -> impl Iterator<Item = &Subscription> + '_ {
        let (few, many) = match self {
            Self::Few(v) => (Some(v.iter()), None),
            Self::Many(m) => (None, Some(m.values())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    pub fn contains(&self, channel: &str) -> bool {
        self.map.get(channel).is_some()
    }

    /// Whether this connection holds `channel` by a subscription token or the token's
    /// `channels` claim.
    pub fn granted(&self, channel: &str) -> bool {
        self.map.get(channel).is_some_and(|s| s.granted)
    }

    pub fn get(&self, channel: &str) -> Option<&Subscription> {
        self.map.get(channel)
    }

    /// A generation number for the next subscription.
    pub fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1);
        self.generation
    }

    pub fn insert(&mut self, sub: Subscription) {
        self.map.insert(sub);
    }

    pub fn remove(&mut self, channel: &str) -> Option<Subscription> {
        self.map.remove(channel)
    }

    pub fn drain(&mut self) -> impl Iterator<Item = Subscription> + '_ {
        self.map.drain().into_iter()
    }

    /// The subscriptions the hub may deliver to directly (the outbox's express lane):
    /// those whose current stream is known from a publication already admitted.
    pub fn lanes(&self) -> impl Iterator<Item = Lane> + '_ {
        self.map.values().filter_map(|sub| {
            if sub.write_delay_ms > 0 {
                return None;
            }
            Some(Lane {
                stream: sub.seen.clone()?,
                generation: sub.generation,
                last_offset: sub.last_offset,
            })
        })
    }

    /// The longest write delay of the subscribed namespaces (0: write at once).
    pub fn write_delay(&self) -> std::time::Duration {
        let ms = self
            .map
            .values()
            .map(|s| s.write_delay_ms)
            .max()
            .unwrap_or(0);
        std::time::Duration::from_millis(ms)
    }

    /// Takes back a lane's position after the hub delivered on it.
    pub fn advance(&mut self, lane: &Lane) {
        if let Some(sub) = self.map.get_mut(&lane.stream.channel)
            && sub.generation == lane.generation
            && sub
                .seen
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s, &lane.stream))
        {
            sub.last_offset = sub.last_offset.max(lane.last_offset);
        }
    }

    /// Whether `item` goes to the client; updates the subscription's position.
    pub fn admit(&mut self, item: &OutItem) -> Admit {
        if item.kind == ItemKind::Reply {
            return Admit::Deliver;
        }
        let stream: &Stream = &item.stream;
        let Some(sub) = self.map.get_mut(&stream.channel) else {
            return Admit::Skip;
        };
        if sub.generation != item.generation {
            return Admit::Skip;
        }
        match item.kind {
            ItemKind::Push | ItemKind::Reply => Admit::Deliver,
            ItemKind::Reset if sub.epoch == stream.epoch => Admit::Skip,
            ItemKind::Reset => {
                sub.epoch.clone_from(&stream.epoch);
                sub.last_offset = 0;
                sub.seen = None;
                Admit::Deliver
            }
            // Channels without history: no offsets, nothing to compare.
            ItemKind::Publication if item.offset == 0 => {
                // Remembered so the express lane can take this channel's next ones.
                if !sub
                    .seen
                    .as_ref()
                    .is_some_and(|s| Arc::ptr_eq(s, &item.stream))
                {
                    sub.seen = Some(item.stream.clone());
                }
                Admit::Deliver
            }
            ItemKind::Publication => {
                let same_epoch = match &sub.seen {
                    Some(seen) if Arc::ptr_eq(seen, &item.stream) => true,
                    _ if stream.epoch == sub.epoch => {
                        sub.seen = Some(item.stream.clone());
                        true
                    }
                    _ => false,
                };
                if !same_epoch || item.offset <= sub.last_offset {
                    return Admit::Skip;
                }
                sub.last_offset = item.offset;
                Admit::Deliver
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn the_map_grows_past_few_into_a_hash_map_and_back() {
        let mut subs = Subscriptions::default();
        let name = |i: usize| format!("c{i}");
        for i in 0..20 {
            let mut sub = subscription(i as u32, "e", 0);
            sub.channel = ChannelName::parse(&name(i)).unwrap();
            subs.insert(sub);
            assert_eq!(subs.len(), i + 1);
            assert!(matches!(subs.map, Map::Few(_)) == (i < FEW));
        }
        // Inserting a channel again replaces it.
        let mut again = subscription(99, "e", 0);
        again.channel = ChannelName::parse("c3").unwrap();
        subs.insert(again);
        assert_eq!(subs.len(), 20);
        assert_eq!(subs.get("c3").unwrap().generation, 99);
        for i in 0..20 {
            assert!(subs.contains(&name(i)), "{i}");
        }
        assert_eq!(subs.map.values().count(), 20);
        for i in 0..20 {
            assert!(subs.remove(&name(i)).is_some());
            assert!(!subs.contains(&name(i)));
        }
        assert!(subs.is_empty());
        assert!(matches!(subs.map, Map::Few(ref v) if v.capacity() == 0));

        let mut few = Subscriptions::default();
        for i in 0..3 {
            let mut sub = subscription(i, "e", 0);
            sub.channel = ChannelName::parse(&name(i as usize)).unwrap();
            few.insert(sub);
        }
        assert!(few.remove("c1").is_some());
        assert_eq!(few.get("c2").unwrap().generation, 2);
        assert_eq!(few.drain().count(), 2);
        assert!(few.is_empty());
    }

    fn subscription(generation: u32, epoch: &str, last: u64) -> Subscription {
        Subscription {
            granted: false,
            channel: ChannelName::parse("c").unwrap(),
            generation,
            epoch: epoch.into(),
            last_offset: last,
            presence: false,
            join_leave: false,
            seen: None,
            write_delay_ms: 0,
        }
    }

    fn item(generation: u32, kind: ItemKind, epoch: &str, offset: u64) -> OutItem {
        OutItem {
            stream: Arc::new(Stream::new("c".into(), epoch.into())),
            generation,
            kind,
            offset,
            frame: Bytes::new(),
        }
    }

    fn admitted(subs: &mut Subscriptions, items: &[OutItem]) -> Vec<Admit> {
        items.iter().map(|i| subs.admit(i)).collect()
    }

    use Admit::{Deliver, Skip};
    use ItemKind::{Publication, Push, Reset};

    #[test]
    fn publications_already_in_the_reply_are_skipped_once() {
        let mut subs = Subscriptions::default();
        subs.insert(subscription(1, "e", 5));
        let items: Vec<OutItem> = (4..=7).map(|o| item(1, Publication, "e", o)).collect();
        assert_eq!(
            admitted(&mut subs, &items),
            vec![Skip, Skip, Deliver, Deliver]
        );
        assert_eq!(subs.get("c").unwrap().last_offset, 7);
        assert_eq!(
            subs.admit(&items[3]),
            Skip,
            "a duplicate later is skipped too"
        );
    }

    #[test]
    fn frames_queued_for_an_earlier_subscription_are_dropped() {
        // [publish, unsubscribe, subscribe] in a channel without history: the first
        // publication was queued for generation 1 and must not reach generation 2.
        let mut subs = Subscriptions::default();
        subs.insert(subscription(2, "", 0));
        let items = [
            item(1, Publication, "", 0),
            item(1, Push, "", 0),
            item(2, Publication, "", 0),
        ];
        assert_eq!(admitted(&mut subs, &items), vec![Skip, Skip, Deliver]);
        assert_eq!(subs.admit(&item(2, Publication, "", 0)), Deliver);
        assert!(subs.remove("c").is_some());
        assert_eq!(subs.admit(&item(2, Publication, "", 0)), Skip);
    }

    #[test]
    fn a_channel_without_history_gets_a_lane_after_its_first_publication() {
        let mut subs = Subscriptions::default();
        subs.insert(subscription(1, "", 0));
        assert_eq!(subs.lanes().count(), 0, "no stream known yet");
        let first = item(1, Publication, "", 0);
        assert_eq!(subs.admit(&first), Deliver);
        let lanes: Vec<Lane> = subs.lanes().collect();
        assert_eq!(lanes.len(), 1);
        assert!(Arc::ptr_eq(&lanes[0].stream, &first.stream));
        assert_eq!((lanes[0].generation, lanes[0].last_offset), (1, 0));
    }

    #[test]
    fn a_reset_moves_the_subscription_to_the_new_epoch_from_offset_zero() {
        let mut subs = Subscriptions::default();
        subs.insert(subscription(1, "old", 10));
        let items = [
            item(1, Publication, "old", 11),
            item(1, Reset, "new", 0),
            item(1, Publication, "old", 12),
            item(1, Publication, "new", 1),
            item(1, Publication, "new", 2),
        ];
        assert_eq!(
            admitted(&mut subs, &items),
            vec![Deliver, Deliver, Skip, Deliver, Deliver]
        );
        let s = subs.get("c").unwrap();
        assert_eq!((s.epoch.as_str(), s.last_offset), ("new", 2));
    }

    #[test]
    fn a_reset_to_the_epoch_the_reply_already_gave_is_ignored() {
        // The subscribe read saw the new epoch before this node's tracker did: the
        // tracker's late reset must not send the client back to offset 0.
        let mut subs = Subscriptions::default();
        subs.insert(subscription(1, "new", 4));
        let items = [
            item(1, Publication, "old", 9),
            item(1, Reset, "new", 0),
            item(1, Publication, "new", 3),
            item(1, Publication, "new", 5),
        ];
        assert_eq!(admitted(&mut subs, &items), vec![Skip, Skip, Skip, Deliver]);
    }

    #[test]
    fn unknown_channels_are_skipped() {
        let mut subs = Subscriptions::default();
        assert_eq!(subs.admit(&item(1, Publication, "e", 1)), Skip);
        assert_eq!(subs.next_generation(), 1);
        assert_eq!(subs.next_generation(), 2);
    }
}

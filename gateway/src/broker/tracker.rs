//! `ChannelTracker`: how one node turns an at-most-once feed of a channel's publications
//! (Redis pub/sub) into an exactly-once, in-order stream for its local subscribers.
//!
//! It is a plain state machine: events go in (a live publication, a stream page read
//! from Redis, a failed read, a pub/sub reconnect) and actions come out (deliver this,
//! reset the channel to a new epoch, read the stream after offset N, count a loss). It
//! does no I/O and reads no clock; the Redis pub/sub tasks drive it.
//!
//! Rules:
//! - Offsets of one epoch are delivered once each, in order, starting after the stream's
//!   position when the node subscribed. A publication ahead of `last + 1` waits (parked)
//!   while the missing range is read from the stream; one read is in flight at a time and
//!   a result that is no longer awaited (superseded by a newer read) is ignored.
//! - The epoch is the stream's identity. A publication or page of another epoch means the
//!   stream restarted: the old epoch is retired (its late messages are ignored from then
//!   on, so the tracker never flips back), local subscribers get a reset carrying the new
//!   epoch, and the new stream is delivered from its start.
//! - What the stream no longer has (trimmed or expired before the node read it) is
//!   counted as a loss, never skipped silently.
//! - A page of the *same* epoch whose position is behind what had been delivered when the
//!   read was asked for means the stream was rolled back under an unchanged epoch: the
//!   tracker asks for the epoch to be rotated rather than deliver different payloads under
//!   old offsets. (Publications delivered live after the read was asked for may be newer
//!   than the read: they prove nothing.)

use broker_proto::v1::Publication;
use std::{
    collections::{BTreeMap, VecDeque},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Old epochs remembered per channel, to ignore their late messages.
const RETIRED_EPOCHS: usize = 4;
/// Parked publications per channel. Beyond it the newest are dropped: they are in the
/// stream, and the repair read (which reads up to the stream's position) brings them.
const MAX_PARKED: usize = 10_000;
/// Retry delays of a failed stream read: base·2ⁿ, capped.
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

static READ_IDS: AtomicU64 = AtomicU64::new(1);

/// A read of a channel's stream, as the tracker receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamPage {
    /// The stream's epoch and last assigned offset when read.
    pub epoch: String,
    pub offset: u64,
    /// Publications after the read's `after`, oldest first.
    pub publications: Vec<Publication>,
    /// The read stopped at its count before reaching `offset`.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Hand this publication to the local subscribers.
    Deliver(Publication),
    /// The stream restarted under `epoch`: tell the local subscribers.
    Reset { epoch: String },
    /// Read the stream: the position, and (with `after`) the publications after it.
    /// Answer with [`ChannelTracker::on_page`] or [`ChannelTracker::on_read_failed`]
    /// quoting `id`; not before `not_before` when set (a retry).
    Read {
        id: u64,
        after: Option<u64>,
        not_before: Option<Instant>,
    },
    /// Publications `from..=to` are gone from the stream; they cannot be delivered.
    Loss { from: u64, to: u64 },
    /// A publication at or below what was delivered: a duplicate, ignored.
    Duplicate { offset: u64 },
    /// A message of a retired epoch, ignored.
    Stale,
    /// The stream under `epoch` is behind what this node delivered (`delivered`):
    /// Redis lost acknowledged publications without changing the epoch. Rotate the
    /// channel's epoch in Redis if it is still `epoch`; the tracker follows the new one.
    Rollback {
        epoch: String,
        position: u64,
        delivered: u64,
    },
}

#[derive(Debug, Default)]
pub struct ChannelTracker {
    epoch: Option<String>,
    /// The last offset delivered; `None` until the starting position is known.
    last: Option<u64>,
    retired: VecDeque<String>,
    /// The read in flight: its id and what it reads after.
    read: Option<(u64, Option<u64>)>,
    /// Failed reads in a row, for the retry delay.
    attempts: u32,
    parked: BTreeMap<u64, Publication>,
}

impl ChannelTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the starting position is known (live delivery is on).
    pub fn started(&self) -> bool {
        self.last.is_some()
    }

    /// The epoch and last delivered offset, once started.
    pub fn position(&self) -> Option<(&str, u64)> {
        Some((self.epoch.as_deref()?, self.last?))
    }

    /// The node's subscription just became live: read where the stream stands.
    pub fn start(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.request_read(None, None, &mut out);
        out
    }

    /// The pub/sub connection was re-established: whatever was published meanwhile is
    /// only in the stream.
    pub fn reconnected(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.request_read(self.last, None, &mut out);
        out
    }

    /// A publication heard live (offset > 0: channels without history bypass the tracker).
    pub fn on_publication(&mut self, p: Publication) -> Vec<Action> {
        let mut out = Vec::new();
        if self.retired.contains(&p.epoch) {
            out.push(Action::Stale);
            return out;
        }
        if self.last.is_none() {
            // Not started: wait for the starting position. Live messages arrive in order,
            // so a newer epoch replaces whatever older one was parked.
            self.parked.retain(|_, q| q.epoch == p.epoch);
            self.park(p);
            return out;
        }
        if self.epoch.as_deref() != Some(p.epoch.as_str()) {
            self.switch_epoch(p.epoch.clone(), &mut out);
        }
        let last = self.last.unwrap_or(0);
        if p.offset <= last {
            out.push(Action::Duplicate { offset: p.offset });
            // A duplicate is normal around a repair; if nothing is being read, check the
            // stream's position, which exposes a rollback under the same epoch.
            if self.read.is_none() {
                self.request_read(Some(last), None, &mut out);
            }
            return out;
        }
        if p.offset == last + 1 {
            self.deliver(p, &mut out);
            self.drain_parked(&mut out);
        } else {
            self.park(p);
        }
        self.read_gap(&mut out);
        out
    }

    /// The result of the read `id`.
    pub fn on_page(&mut self, id: u64, page: StreamPage) -> Vec<Action> {
        let mut out = Vec::new();
        let Some((read_id, after)) = self.read else {
            return out;
        };
        if read_id != id {
            return out;
        }
        self.read = None;
        self.attempts = 0;
        if self.retired.contains(&page.epoch) {
            // The read raced a restart this tracker already followed.
            out.push(Action::Stale);
            self.read_gap(&mut out);
            return out;
        }
        if self.last.is_none() {
            self.begin_at(page, &mut out);
            return out;
        }
        if self.epoch.as_deref() != Some(page.epoch.as_str()) {
            self.switch_epoch(page.epoch.clone(), &mut out);
            if after == Some(0) {
                self.apply(after, page, &mut out);
            } else {
                // The new stream is delivered from its start.
                self.request_read(Some(0), None, &mut out);
            }
            return out;
        }
        // Evidence of a rollback is a position behind what had been delivered when the
        // read was *asked for*: Redis had those. Live publications delivered since may be
        // newer than the read and prove nothing.
        if let Some(asked) = after
            && page.offset < asked
        {
            out.push(Action::Rollback {
                epoch: page.epoch,
                position: page.offset,
                delivered: asked,
            });
            return out;
        }
        self.apply(after, page, &mut out);
        out
    }

    /// The read `id` failed (Redis unreachable, timeout): retry it after a delay.
    pub fn on_read_failed(&mut self, id: u64, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let Some((read_id, after)) = self.read else {
            return out;
        };
        if read_id != id {
            return out;
        }
        self.read = None;
        let delay = RETRY_BASE
            .saturating_mul(1 << self.attempts.min(8))
            .min(RETRY_MAX);
        self.attempts += 1;
        self.request_read(after, Some(now + delay), &mut out);
        out
    }

    fn begin_at(&mut self, page: StreamPage, out: &mut Vec<Action>) {
        let start = page.offset;
        // Live messages of another epoch than the page's: one of the two is newer, and a
        // fresh read tells which.
        let foreign = self.parked.values().any(|p| p.epoch != page.epoch);
        self.parked
            .retain(|&offset, p| p.epoch == page.epoch && offset > start);
        self.epoch = Some(page.epoch);
        self.last = Some(start);
        self.drain_parked(out);
        if foreign {
            self.request_read(self.last, None, out);
        } else {
            self.read_gap(out);
        }
    }

    fn apply(&mut self, after: Option<u64>, page: StreamPage, out: &mut Vec<Action>) {
        let mut last = self.last.unwrap_or(0);
        for p in page.publications {
            if p.offset <= last || p.epoch != page.epoch {
                continue;
            }
            if p.offset > last + 1 {
                out.push(Action::Loss {
                    from: last + 1,
                    to: p.offset - 1,
                });
            }
            last = p.offset;
            self.parked.remove(&p.offset);
            out.push(Action::Deliver(p));
        }
        self.last = Some(last);
        if after.is_some() && page.truncated && last < page.offset {
            self.request_read(Some(last), None, out);
            return;
        }
        if after.is_some() && last < page.offset {
            // The stream had moved on to `page.offset`, but not kept these.
            out.push(Action::Loss {
                from: last + 1,
                to: page.offset,
            });
            self.last = Some(page.offset);
        }
        self.drain_parked(out);
        self.read_gap(out);
    }

    fn switch_epoch(&mut self, epoch: String, out: &mut Vec<Action>) {
        if let Some(old) = self.epoch.replace(epoch.clone()) {
            self.retired.push_back(old);
            if self.retired.len() > RETIRED_EPOCHS {
                self.retired.pop_front();
            }
        }
        self.parked.retain(|_, p| p.epoch == epoch);
        // Any read in flight was of the old stream.
        self.read = None;
        self.last = Some(0);
        out.push(Action::Reset { epoch });
    }

    fn deliver(&mut self, p: Publication, out: &mut Vec<Action>) {
        self.last = Some(p.offset);
        out.push(Action::Deliver(p));
    }

    fn park(&mut self, p: Publication) {
        if self.parked.len() >= MAX_PARKED {
            if let Some((&newest, _)) = self.parked.last_key_value()
                && p.offset > newest
            {
                return;
            }
            self.parked.pop_last();
        }
        self.parked.insert(p.offset, p);
    }

    /// Delivers parked publications that now follow on.
    fn drain_parked(&mut self, out: &mut Vec<Action>) {
        while let Some(entry) = self.parked.first_entry() {
            let last = self.last.unwrap_or(0);
            let offset = *entry.key();
            if offset <= last {
                entry.remove();
            } else if offset == last + 1 {
                let p = entry.remove();
                self.deliver(p, out);
            } else {
                break;
            }
        }
    }

    /// Reads the missing range when parked publications wait behind a gap.
    fn read_gap(&mut self, out: &mut Vec<Action>) {
        if !self.parked.is_empty() && self.read.is_none() {
            self.request_read(self.last, None, out);
        }
    }

    fn request_read(
        &mut self,
        after: Option<u64>,
        not_before: Option<Instant>,
        out: &mut Vec<Action>,
    ) {
        let id = READ_IDS.fetch_add(1, Ordering::Relaxed);
        self.read = Some((id, after));
        out.push(Action::Read {
            id,
            after,
            not_before,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(offset: u64, epoch: &str) -> Publication {
        Publication {
            channel: "c".into(),
            offset,
            epoch: epoch.into(),
            ..Default::default()
        }
    }

    fn page(epoch: &str, offset: u64, entries: &[u64], truncated: bool) -> StreamPage {
        StreamPage {
            epoch: epoch.into(),
            offset,
            publications: entries.iter().map(|&o| p(o, epoch)).collect(),
            truncated,
        }
    }

    /// The id and `after` of the single read among `actions`.
    fn read_of(actions: &[Action]) -> (u64, Option<u64>) {
        let reads: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Read { id, after, .. } => Some((*id, *after)),
                _ => None,
            })
            .collect();
        assert_eq!(reads.len(), 1, "expected one read in {actions:?}");
        reads[0]
    }

    fn delivered(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver(p) => Some(p.offset),
                _ => None,
            })
            .collect()
    }

    /// A tracker started at `offset` of `epoch`.
    fn started(epoch: &str, offset: u64) -> ChannelTracker {
        let mut t = ChannelTracker::new();
        let (id, after) = read_of(&t.start());
        assert_eq!(after, None);
        assert!(t.on_page(id, page(epoch, offset, &[], false)).is_empty());
        assert_eq!(t.position(), Some((epoch, offset)));
        t
    }

    #[test]
    fn in_order_publications_are_delivered_at_once() {
        let mut t = started("e", 3);
        for o in 4..=6 {
            assert_eq!(
                t.on_publication(p(o, "e")),
                vec![Action::Deliver(p(o, "e"))]
            );
        }
        assert_eq!(t.position(), Some(("e", 6)));
    }

    #[test]
    fn a_gap_parks_later_publications_until_the_stream_fills_it() {
        let mut t = started("e", 0);
        assert_eq!(delivered(&t.on_publication(p(1, "e"))), vec![1]);
        let actions = t.on_publication(p(4, "e"));
        assert_eq!(delivered(&actions), Vec::<u64>::new());
        let (id, after) = read_of(&actions);
        assert_eq!(after, Some(1));
        assert!(t.on_publication(p(5, "e")).is_empty(), "one read at a time");
        let actions = t.on_page(id, page("e", 5, &[2, 3, 4, 5], false));
        assert_eq!(delivered(&actions), vec![2, 3, 4, 5]);
        assert_eq!(t.position(), Some(("e", 5)));
        assert!(matches!(
            t.on_publication(p(5, "e"))[0],
            Action::Duplicate { offset: 5 }
        ));
    }

    #[test]
    fn a_late_message_fills_the_gap_before_the_read_returns() {
        let mut t = started("e", 1);
        let (id, _) = read_of(&t.on_publication(p(3, "e")));
        assert_eq!(delivered(&t.on_publication(p(2, "e"))), vec![2, 3]);
        let actions = t.on_page(id, page("e", 3, &[2, 3], false));
        assert!(delivered(&actions).is_empty(), "already delivered");
        assert_eq!(t.position(), Some(("e", 3)));
    }

    #[test]
    fn parked_and_repaired_messages_interleave_in_offset_order() {
        let mut t = started("e", 0);
        let (id, _) = read_of(&t.on_publication(p(3, "e")));
        t.on_publication(p(5, "e"));
        t.on_publication(p(7, "e"));
        // The stream, read now, has up to 6: 4 and 6 came only through the read.
        let actions = t.on_page(id, page("e", 6, &[1, 2, 3, 4, 5, 6], false));
        assert_eq!(delivered(&actions), vec![1, 2, 3, 4, 5, 6, 7]);
        assert!(!actions.iter().any(|a| matches!(a, Action::Read { .. })));
    }

    #[test]
    fn a_gap_newer_than_the_read_is_read_again() {
        let mut t = started("e", 0);
        let (id, _) = read_of(&t.on_publication(p(2, "e")));
        t.on_publication(p(9, "e"));
        // Read when the stream was at 2: 3..=8 were published after it.
        let actions = t.on_page(id, page("e", 2, &[1, 2], false));
        assert_eq!(delivered(&actions), vec![1, 2]);
        let (id, after) = read_of(&actions);
        assert_eq!(after, Some(2));
        let actions = t.on_page(id, page("e", 9, &[3, 4, 5, 6, 7, 8, 9], false));
        assert_eq!(delivered(&actions), vec![3, 4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn a_truncated_page_continues_from_where_it_stopped() {
        let mut t = started("e", 0);
        let (id, _) = read_of(&t.reconnected());
        let actions = t.on_page(id, page("e", 5, &[1, 2, 3], true));
        assert_eq!(delivered(&actions), vec![1, 2, 3]);
        let (id, after) = read_of(&actions);
        assert_eq!(after, Some(3));
        assert_eq!(
            delivered(&t.on_page(id, page("e", 5, &[4, 5], false))),
            vec![4, 5]
        );
    }

    #[test]
    fn what_the_stream_no_longer_has_is_counted_as_lost() {
        let mut t = started("e", 0);
        let (id, _) = read_of(&t.on_publication(p(9, "e")));
        // 1..=3 trimmed; 7 and 8 expired after the read's last entry.
        let actions = t.on_page(id, page("e", 8, &[4, 5, 6], false));
        assert_eq!(
            actions,
            vec![
                Action::Loss { from: 1, to: 3 },
                Action::Deliver(p(4, "e")),
                Action::Deliver(p(5, "e")),
                Action::Deliver(p(6, "e")),
                Action::Loss { from: 7, to: 8 },
                Action::Deliver(p(9, "e")),
            ]
        );
    }

    #[test]
    fn a_reconnect_reads_everything_after_the_last_delivered() {
        let mut t = started("e", 4);
        let (id, after) = read_of(&t.reconnected());
        assert_eq!(after, Some(4));
        let actions = t.on_page(id, page("e", 6, &[5, 6], false));
        assert_eq!(delivered(&actions), vec![5, 6]);
        // Live copies of what the read delivered are duplicates.
        assert!(matches!(
            t.on_publication(p(6, "e"))[0],
            Action::Duplicate { .. }
        ));
    }

    #[test]
    fn many_channels_reconnect_independently() {
        let mut trackers: Vec<ChannelTracker> = (0..100).map(|i| started("e", i)).collect();
        let reads: Vec<(u64, Option<u64>)> = trackers
            .iter_mut()
            .map(|t| read_of(&t.reconnected()))
            .collect();
        for (i, (t, (id, after))) in trackers.iter_mut().zip(reads).enumerate() {
            let i = i as u64;
            assert_eq!(after, Some(i));
            assert_eq!(
                delivered(&t.on_page(id, page("e", i + 1, &[i + 1], false))),
                vec![i + 1]
            );
        }
    }

    #[test]
    fn a_new_epoch_resets_subscribers_and_replays_the_new_stream_from_its_start() {
        let mut t = started("old", 0);
        for o in 1..=3 {
            t.on_publication(p(o, "old"));
        }
        let actions = t.on_publication(p(2, "new"));
        assert_eq!(
            actions[0],
            Action::Reset {
                epoch: "new".into()
            }
        );
        let (id, after) = read_of(&actions);
        assert_eq!(after, Some(0));
        let actions = t.on_page(id, page("new", 2, &[1, 2], false));
        assert_eq!(delivered(&actions), vec![1, 2]);
        assert_eq!(t.position(), Some(("new", 2)));
        // Late messages of the retired epoch never flip the tracker back.
        assert_eq!(t.on_publication(p(4, "old")), vec![Action::Stale]);
        assert_eq!(t.position(), Some(("new", 2)));
    }

    #[test]
    fn a_page_of_a_new_epoch_restarts_delivery_from_its_start() {
        let mut t = started("old", 5);
        let (id, _) = read_of(&t.reconnected());
        let actions = t.on_page(id, page("new", 3, &[], false));
        assert_eq!(
            actions[0],
            Action::Reset {
                epoch: "new".into()
            }
        );
        let (id, after) = read_of(&actions);
        assert_eq!(after, Some(0));
        let actions = t.on_page(id, page("new", 3, &[1, 2, 3], false));
        assert_eq!(delivered(&actions), vec![1, 2, 3]);
    }

    #[test]
    fn a_stale_read_result_is_ignored() {
        let mut t = started("e", 0);
        let (old, _) = read_of(&t.reconnected());
        let (new, _) = read_of(&t.reconnected());
        assert!(t.on_page(old, page("e", 9, &[1], false)).is_empty());
        assert_eq!(
            delivered(&t.on_page(new, page("e", 1, &[1], false))),
            vec![1]
        );
    }

    #[test]
    fn a_stream_behind_what_was_delivered_asks_for_a_rollback() {
        let mut t = started("e", 0);
        for o in 1..=10 {
            t.on_publication(p(o, "e"));
        }
        // Redis came back from an older snapshot with the same epoch: offset 4 again.
        let actions = t.on_publication(p(4, "e"));
        assert_eq!(actions[0], Action::Duplicate { offset: 4 });
        let (id, after) = read_of(&actions);
        assert_eq!(after, Some(10));
        assert_eq!(
            t.on_page(id, page("e", 4, &[], false)),
            vec![Action::Rollback {
                epoch: "e".into(),
                position: 4,
                delivered: 10
            }]
        );
    }

    /// Found by the adversarial review: a read asked for after offset 16 ran in Redis
    /// before publication 17, but its result came back after 17 was delivered live. The
    /// stream is not behind; nothing must be rotated.
    #[test]
    fn a_read_older_than_live_deliveries_is_not_a_rollback() {
        let mut t = started("e", 16);
        let (id, after) = read_of(&t.reconnected());
        assert_eq!(after, Some(16));
        assert_eq!(delivered(&t.on_publication(p(17, "e"))), vec![17]);
        let actions = t.on_page(id, page("e", 16, &[], false));
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Rollback { .. })),
            "{actions:?}"
        );
        assert_eq!(t.position(), Some(("e", 17)));
        assert_eq!(delivered(&t.on_publication(p(18, "e"))), vec![18]);
    }

    #[test]
    fn live_messages_before_the_start_wait_for_the_position() {
        let mut t = ChannelTracker::new();
        let (id, _) = read_of(&t.start());
        assert!(t.on_publication(p(5, "e")).is_empty());
        assert!(t.on_publication(p(6, "e")).is_empty());
        // The position read saw 5 already: only 6 is new.
        let actions = t.on_page(id, page("e", 5, &[], false));
        assert_eq!(delivered(&actions), vec![6]);
        assert_eq!(t.position(), Some(("e", 6)));
    }

    #[test]
    fn a_failed_read_is_retried_later_with_growing_delays() {
        let mut t = started("e", 0);
        let (id, _) = read_of(&t.reconnected());
        let now = Instant::now();
        let actions = t.on_read_failed(id, now);
        let Action::Read {
            id,
            after: Some(0),
            not_before: Some(at),
        } = actions[0]
        else {
            panic!("{actions:?}")
        };
        assert_eq!(at, now + RETRY_BASE);
        let Action::Read {
            not_before: Some(at2),
            ..
        } = t.on_read_failed(id, now)[0]
        else {
            panic!()
        };
        assert_eq!(at2, now + RETRY_BASE * 2);
    }
}

//! `SubscriptionTable`: the Redis subscriptions one pub/sub connection carries for this
//! node, one per channel however many local sessions want it.
//!
//! A plain data structure with time passed in, used by both the single-server and the
//! Cluster pub/sub tasks (which only perform the SUBSCRIBE/UNSUBSCRIBE it asks for):
//! - References are counted once per request, and only for requests that succeeded: a
//!   request is answered through its [`Waiter`], and counted only if the requester was
//!   still there to take the answer. A requester that gave up cannot take a reference
//!   away from anyone else.
//! - The last reference leaving starts a delay; the Redis subscription ends only if
//!   nobody came back meanwhile (absorbs churn).
//! - When the connection drops, every entry still wanted is subscribed again, in batches,
//!   and its per-channel state `T` survives (the delivery tracker repairs from where it
//!   was). Entries nobody wants any more are dropped together with their state, so no
//!   stale state outlives its subscription.

use crate::broker::BrokerError;
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Someone waiting for a subscribe request's answer.
pub trait Waiter {
    /// Delivers the answer; `false` if the requester is gone (then the request is not
    /// counted).
    fn resolve(self, result: Result<(), BrokerError>) -> bool;
}

impl Waiter for tokio::sync::oneshot::Sender<Result<(), BrokerError>> {
    fn resolve(self, result: Result<(), BrokerError>) -> bool {
        self.send(result).is_ok()
    }
}

/// Where a channel's Redis subscription stands on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Not subscribed (new, or the connection dropped).
    Down,
    /// A SUBSCRIBE was asked for and not yet confirmed.
    Linking,
    Linked,
}

struct Entry<T, W> {
    refs: usize,
    link: Link,
    /// Live delivery is on: requests can be answered at once once linked.
    ready: bool,
    idle_since: Option<Instant>,
    waiters: Vec<W>,
    state: T,
}

/// What the caller must do after [`SubscriptionTable::acquire`].
#[derive(Debug, PartialEq, Eq)]
pub enum Acquired {
    /// Answered already.
    Answered,
    /// Subscribe the channel in Redis, then report [`SubscriptionTable::linked`].
    Link,
    /// Queued behind a subscription or start already under way.
    Queued,
}

pub struct SubscriptionTable<T, W> {
    entries: HashMap<String, Entry<T, W>>,
    connected: bool,
    unsubscribe_delay: Duration,
}

impl<T: Default, W: Waiter> SubscriptionTable<T, W> {
    pub fn new(unsubscribe_delay: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            connected: false,
            unsubscribe_delay,
        }
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// References held on `name` (for tests and metrics).
    pub fn refs(&self, name: &str) -> usize {
        self.entries.get(name).map_or(0, |e| e.refs)
    }

    pub fn link(&self, name: &str) -> Option<Link> {
        self.entries.get(name).map(|e| e.link)
    }

    pub fn state_mut(&mut self, name: &str) -> Option<&mut T> {
        self.entries.get_mut(name).map(|e| &mut e.state)
    }

    /// Every channel the table holds.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// A session wants `name`. While disconnected the request is refused at once.
    pub fn acquire(&mut self, name: &str, waiter: W) -> Acquired {
        if !self.connected {
            waiter.resolve(Err(BrokerError::Unavailable(
                "redis pub/sub is reconnecting".into(),
            )));
            return Acquired::Answered;
        }
        let entry = self
            .entries
            .entry(name.to_owned())
            .or_insert_with(|| Entry {
                refs: 0,
                link: Link::Down,
                ready: false,
                idle_since: None,
                waiters: Vec::new(),
                state: T::default(),
            });
        if entry.link == Link::Linked && entry.ready {
            if waiter.resolve(Ok(())) {
                entry.refs += 1;
                entry.idle_since = None;
            }
            return Acquired::Answered;
        }
        entry.waiters.push(waiter);
        entry.idle_since = None;
        if entry.link == Link::Down {
            entry.link = Link::Linking;
            Acquired::Link
        } else {
            Acquired::Queued
        }
    }

    /// The Redis subscriptions of `names` are confirmed. The caller then starts each one's
    /// delivery, or repairs it when [`Self::is_ready`] (it ran before the link dropped).
    pub fn linked<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        for name in names {
            if let Some(e) = self.entries.get_mut(name) {
                e.link = Link::Linked;
            }
        }
    }

    /// Whether `name`'s delivery was started before (so a relink means repair, not start).
    pub fn is_ready(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| e.ready)
    }

    /// Live delivery of `name` is on: answers everyone waiting and counts those still
    /// there to hear it.
    pub fn set_ready(&mut self, name: &str, now: Instant) {
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        e.ready = true;
        if e.link != Link::Linked {
            return;
        }
        for w in e.waiters.drain(..) {
            if w.resolve(Ok(())) {
                e.refs += 1;
            }
        }
        if e.refs == 0 {
            e.idle_since = Some(now);
        }
    }

    /// Subscribing `name` failed: everyone waiting gets `error`, uncounted.
    pub fn link_failed(&mut self, name: &str, error: &BrokerError) {
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        e.link = Link::Down;
        for w in e.waiters.drain(..) {
            w.resolve(Err(error.clone()));
        }
        if e.refs == 0 {
            self.entries.remove(name);
        }
    }

    /// A session left `name` (after a successful acquire). `false` if nothing was held:
    /// the request is ignored rather than taken from someone else.
    pub fn release(&mut self, name: &str, now: Instant) -> bool {
        let Some(e) = self.entries.get_mut(name) else {
            return false;
        };
        if e.refs == 0 {
            return false;
        }
        e.refs -= 1;
        if e.refs == 0 && e.waiters.is_empty() {
            e.idle_since = Some(now);
        }
        true
    }

    /// Removes the entries idle for the unsubscribe delay, with their state; returns the
    /// ones linked in Redis, to unsubscribe there.
    pub fn take_idle(&mut self, now: Instant) -> Vec<String> {
        let delay = self.unsubscribe_delay;
        let due: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.refs == 0
                    && e.waiters.is_empty()
                    && e.idle_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= delay)
            })
            .map(|(n, _)| n.clone())
            .collect();
        due.into_iter()
            .filter(|n| self.entries.remove(n).is_some_and(|e| e.link != Link::Down))
            .collect()
    }

    /// The connection dropped: nothing is subscribed any more. Entries nobody holds or
    /// waits for are dropped with their state; requests under way stay queued and are
    /// answered once the entry is linked again (or their requesters give up first), so a
    /// blip does not fail them.
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.entries.retain(|_, e| {
            e.link = Link::Down;
            e.refs > 0 || !e.waiters.is_empty()
        });
    }

    /// Redis dropped one subscription by itself (a Cluster slot moved): it must be made
    /// again. Returns whether the table still wants it.
    pub fn unlinked(&mut self, name: &str) -> bool {
        match self.entries.get_mut(name) {
            Some(e) if e.link != Link::Down => {
                e.link = Link::Down;
                true
            }
            _ => false,
        }
    }

    /// A (new) connection is up: every entry must be subscribed again. Returns them in
    /// batches of at most `batch` names, each marked as linking.
    pub fn connect(&mut self, batch: usize) -> Vec<Vec<String>> {
        self.connected = true;
        let mut names: Vec<String> = self
            .entries
            .iter_mut()
            .filter(|(_, e)| e.link == Link::Down)
            .map(|(n, e)| {
                e.link = Link::Linking;
                n.clone()
            })
            .collect();
        names.sort();
        names.chunks(batch.max(1)).map(<[String]>::to_vec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{cell::RefCell, rc::Rc};

    /// A requester: records the answer it got; `gone` ones have stopped waiting.
    #[derive(Clone, Default)]
    struct Req {
        answer: Rc<RefCell<Option<Result<(), BrokerError>>>>,
        gone: bool,
    }

    impl Waiter for Req {
        fn resolve(self, result: Result<(), BrokerError>) -> bool {
            if self.gone {
                return false;
            }
            *self.answer.borrow_mut() = Some(result);
            true
        }
    }

    impl Req {
        fn answered_ok(&self) -> bool {
            matches!(*self.answer.borrow(), Some(Ok(())))
        }
        fn answered_err(&self) -> bool {
            matches!(*self.answer.borrow(), Some(Err(_)))
        }
    }

    type Table = SubscriptionTable<u32, Req>;

    const DELAY: Duration = Duration::from_secs(2);

    fn table() -> Table {
        let mut t = Table::new(DELAY);
        assert!(t.connect(10).is_empty());
        t
    }

    #[test]
    fn the_first_request_links_later_ones_wait_and_all_are_counted_once_live() {
        let now = Instant::now();
        let mut t = table();
        let (a, b) = (Req::default(), Req::default());
        assert_eq!(t.acquire("c", a.clone()), Acquired::Link);
        assert_eq!(t.acquire("c", b.clone()), Acquired::Queued);
        t.linked(["c"]);
        assert!(!a.answered_ok(), "not before delivery is live");
        t.set_ready("c", now);
        assert!(a.answered_ok() && b.answered_ok());
        assert_eq!(t.refs("c"), 2);
        let c = Req::default();
        assert_eq!(t.acquire("c", c.clone()), Acquired::Answered);
        assert!(c.answered_ok());
        assert_eq!(t.refs("c"), 3);
    }

    #[test]
    fn a_requester_that_gave_up_takes_no_reference_from_anyone() {
        let now = Instant::now();
        let mut t = table();
        let y = Req::default();
        t.acquire("c", y.clone());
        let x = Req {
            gone: true,
            ..Req::default()
        };
        t.acquire("c", x);
        t.linked(["c"]);
        t.set_ready("c", now);
        assert_eq!(t.refs("c"), 1, "only y is counted");
        // x's compensating release finds nothing of its own and must not count.
        assert!(t.release("c", now));
        assert!(!t.release("c", now), "a second release takes nothing");
        assert_eq!(t.refs("c"), 0);
    }

    #[test]
    fn a_refused_request_is_not_counted() {
        let now = Instant::now();
        let mut t = Table::new(DELAY);
        let x = Req::default();
        assert_eq!(t.acquire("c", x.clone()), Acquired::Answered);
        assert!(x.answered_err());
        assert!(t.is_empty());
        assert!(!t.release("c", now));
    }

    #[test]
    fn a_failed_link_answers_everyone_with_the_error_and_counts_nobody() {
        let now = Instant::now();
        let mut t = table();
        let held = Req::default();
        t.acquire("c", held.clone());
        t.linked(["c"]);
        t.set_ready("c", now);
        t.disconnected();
        let batches = t.connect(10);
        assert_eq!(batches, vec![vec!["c".to_owned()]]);
        let (a, b) = (Req::default(), Req::default());
        assert_eq!(t.acquire("d", a.clone()), Acquired::Link);
        t.acquire("d", b.clone());
        t.link_failed("d", &BrokerError::Unavailable("x".into()));
        assert!(a.answered_err() && b.answered_err());
        assert_eq!(t.refs("d"), 0);
        assert_eq!(t.link("d"), None, "dropped: nobody holds it");
        assert_eq!(t.refs("c"), 1, "others untouched");
    }

    #[test]
    fn the_last_release_unsubscribes_after_the_delay_unless_someone_returns() {
        let t0 = Instant::now();
        let mut t = table();
        t.acquire("c", Req::default());
        t.linked(["c"]);
        t.set_ready("c", t0);
        *t.state_mut("c").unwrap() = 42;
        assert!(t.release("c", t0));
        assert!(t.take_idle(t0 + DELAY / 2).is_empty());
        // Someone comes back within the delay: kept, with its state.
        assert_eq!(t.acquire("c", Req::default()), Acquired::Answered);
        assert!(t.take_idle(t0 + DELAY * 3).is_empty());
        assert_eq!(t.state_mut("c"), Some(&mut 42));
        assert!(t.release("c", t0 + DELAY * 3));
        assert_eq!(t.take_idle(t0 + DELAY * 4), vec!["c".to_owned()]);
        assert_eq!(t.state_mut("c"), None, "its state goes with it");
    }

    #[test]
    fn a_reconnect_resubscribes_what_is_held_and_drops_idle_entries_with_their_state() {
        let now = Instant::now();
        let mut t = table();
        for name in ["a", "b", "idle"] {
            t.acquire(name, Req::default());
            t.linked([name]);
            t.set_ready(name, now);
            *t.state_mut(name).unwrap() = 7;
        }
        t.release("idle", now);
        let pending = Req::default();
        t.acquire("new", pending.clone());
        t.disconnected();
        assert!(
            pending.answer.borrow().is_none(),
            "a request under way keeps waiting"
        );
        assert_eq!(t.state_mut("idle"), None, "an idle entry does not survive");
        assert_eq!(t.state_mut("a"), Some(&mut 7), "a held one keeps its state");
        // While down, requests are refused without counting.
        let refused = Req::default();
        t.acquire("a", refused.clone());
        assert!(refused.answered_err());
        assert_eq!(t.refs("a"), 1);
        let batches = t.connect(1);
        assert_eq!(
            batches,
            vec![
                vec!["a".to_owned()],
                vec!["b".to_owned()],
                vec!["new".to_owned()]
            ]
        );
        assert_eq!(t.link("a"), Some(Link::Linking));
        assert!(
            t.is_ready("a"),
            "delivery was started before: repair, not start"
        );
        t.linked(["a", "b", "new"]);
        assert_eq!(t.acquire("a", Req::default()), Acquired::Answered);
        t.set_ready("new", now);
        assert!(pending.answered_ok(), "answered once linked again");
        assert_eq!(t.refs("new"), 1);
    }

    #[test]
    fn a_subscription_dropped_by_redis_is_linked_again() {
        let now = Instant::now();
        let mut t = table();
        t.acquire("c", Req::default());
        t.linked(["c"]);
        t.set_ready("c", now);
        assert!(t.unlinked("c"));
        assert!(!t.unlinked("c"), "already down");
        assert!(!t.unlinked("unknown"));
        assert_eq!(t.connect(10), vec![vec!["c".to_owned()]]);
    }
}

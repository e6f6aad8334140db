//! From Redis pub/sub to the hub: the part the single-server and the Cluster pub/sub
//! tasks share. It owns the connection's [`SubscriptionTable`], whose per-channel state
//! is a [`ChannelTracker`], so a channel's tracking lives exactly as long as its
//! subscription; and it performs what the tracker asks: hand publications to the hub,
//! reset subscribers to a new epoch, read the stream, count losses.
//!
//! Messages are decoded once per node; the hub then encodes once per encoding. Stream
//! reads run as separate tasks and come back through [`Done`], so a slow read never holds
//! up live messages of other channels.

use super::{Keys, control, reply};
use crate::{
    broker::{
        BrokerError,
        subscriptions::{Acquired, SubscriptionTable},
        tracker::{Action, ChannelTracker, StreamPage},
    },
    channel::ChannelName,
    clock::Clock,
    hub::Hub,
    metrics,
};
use std::{future::Future, pin::Pin, sync::Arc, time::Instant};
use tokio::sync::{mpsc, oneshot};

/// The answer to a session's subscribe request.
pub type Reply = oneshot::Sender<Result<(), BrokerError>>;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Reads and epoch rotations of a channel's stream, through the broker's commands.
pub trait Streams: Send + Sync + 'static {
    /// The position, and with `after` the publications after it (one page).
    fn read(
        &self,
        channel: ChannelName,
        after: Option<u64>,
    ) -> BoxFuture<Result<StreamPage, BrokerError>>;
    /// Rotates the channel's epoch if it is still `stale`.
    fn rotate(&self, channel: ChannelName, stale: String) -> BoxFuture<Result<(), BrokerError>>;
}

/// Work that finished off the task: a stream read, an epoch rotation.
pub enum Done {
    Read {
        name: String,
        id: u64,
        result: Result<StreamPage, BrokerError>,
    },
    Rotated {
        name: String,
    },
}

pub struct Delivery {
    pub table: SubscriptionTable<ChannelTracker, Reply>,
    /// The tasks read time here.
    pub clock: Clock,
    hub: Arc<Hub>,
    keys: Keys,
    streams: Arc<dyn Streams>,
    done: mpsc::UnboundedSender<Done>,
}

impl Delivery {
    pub fn new(
        hub: Arc<Hub>,
        keys: Keys,
        streams: Arc<dyn Streams>,
        unsubscribe_delay: std::time::Duration,
        clock: Clock,
    ) -> (Self, mpsc::UnboundedReceiver<Done>) {
        let (done, done_rx) = mpsc::unbounded_channel();
        let delivery = Self {
            table: SubscriptionTable::new(unsubscribe_delay),
            clock,
            hub,
            keys,
            streams,
            done,
        };
        (delivery, done_rx)
    }

    /// A session's subscribe request; `Acquired::Link` asks the caller to subscribe the
    /// channel in Redis and then call [`Self::linked`] (or report the failure).
    pub fn acquire(&mut self, name: &str, reply: Reply) -> Acquired {
        self.table.acquire(name, reply)
    }

    pub fn release(&mut self, name: &str, now: Instant) {
        if !self.table.release(name, now) {
            tracing::warn!(
                channel = name,
                "release of a subscription this node does not hold"
            );
        }
    }

    /// Redis confirmed the subscriptions of `names`: start their delivery, or repair it
    /// from the stream when it ran before (messages may have been missed meanwhile).
    pub fn linked(&mut self, names: &[String], now: Instant) {
        self.table.linked(names.iter().map(String::as_str));
        for name in names {
            let repair = self.table.is_ready(name);
            let Some(tracker) = self.table.state_mut(name) else {
                continue;
            };
            let actions = if repair {
                metrics::repair("reconnect");
                tracker.reconnected()
            } else {
                tracker.start()
            };
            self.perform(name, actions);
            if repair {
                // Live delivery is on again and the repair is ordered before anything
                // new: requests can be answered now.
                self.table.set_ready(name, now);
            }
        }
    }

    /// A message on a channel subscription.
    pub fn on_message(&mut self, name: &str, payload: &[u8]) {
        if self.table.state_mut(name).is_none() {
            return; // unsubscribed meanwhile
        }
        let Some(channel) = self.keys.channel_of(name) else {
            return;
        };
        let messages = match reply::messages(payload) {
            Ok(messages) => messages,
            Err(why) => {
                // A publication lost here shows up as a gap at the next one and is read
                // from the stream.
                tracing::warn!(channel, why, "undecodable pub/sub message");
                return;
            }
        };
        for message in messages {
            match message {
                reply::Message::Publication(p) if p.offset == 0 => {
                    // A channel without history: nothing to order or repair.
                    self.hub.deliver(p);
                }
                reply::Message::Publication(p) => {
                    let Some(tracker) = self.table.state_mut(name) else {
                        return;
                    };
                    let actions = tracker.on_publication(p);
                    self.perform(name, actions);
                }
                reply::Message::Push(body) => {
                    self.hub.deliver_push(channel, body);
                }
            }
        }
    }

    /// A message on the control channel.
    pub fn on_control(&self, payload: &[u8]) {
        control::on_message(&self.hub, payload);
    }

    pub fn on_done(&mut self, done: Done, now: Instant) {
        match done {
            Done::Read { name, id, result } => {
                let Some(tracker) = self.table.state_mut(&name) else {
                    return;
                };
                let actions = match result {
                    Ok(page) => tracker.on_page(id, page),
                    Err(e) => {
                        tracing::debug!(channel = name, error = %e, "stream read failed; retrying");
                        tracker.on_read_failed(id, now)
                    }
                };
                let started = tracker.started();
                self.perform(&name, actions);
                if started && !self.table.is_ready(&name) {
                    self.table.set_ready(&name, now);
                }
            }
            Done::Rotated { name } => {
                if let Some(tracker) = self.table.state_mut(&name) {
                    let actions = tracker.reconnected();
                    self.perform(&name, actions);
                }
            }
        }
    }

    fn perform(&mut self, name: &str, actions: Vec<Action>) {
        let Some(channel) = self
            .keys
            .channel_of(name)
            .and_then(|c| ChannelName::parse(c).ok())
        else {
            return;
        };
        for action in actions {
            match action {
                Action::Deliver(p) => {
                    self.hub.deliver(p);
                }
                Action::Reset { epoch } => {
                    tracing::warn!(%channel, epoch, "channel stream restarted under a new epoch");
                    metrics::stream_reset();
                    self.hub.reset(channel.as_str(), &epoch);
                }
                Action::Read {
                    id,
                    after,
                    not_before,
                } => {
                    if after.is_some() && not_before.is_none() {
                        metrics::repair("gap");
                    }
                    let (streams, done, name) =
                        (self.streams.clone(), self.done.clone(), name.to_owned());
                    let channel = channel.clone();
                    tokio::spawn(async move {
                        if let Some(at) = not_before {
                            tokio::time::sleep_until(at.into()).await;
                        }
                        let result = streams.read(channel, after).await;
                        let _ = done.send(Done::Read { name, id, result });
                    });
                }
                Action::Loss { from, to } => {
                    metrics::history_gap(to - from + 1);
                    tracing::warn!(%channel, from, to, "publications lost: no longer in the stream");
                }
                Action::Duplicate { .. } => metrics::tracker_skip("duplicate"),
                Action::Stale => metrics::tracker_skip("stale_epoch"),
                Action::Rollback {
                    epoch,
                    position,
                    delivered,
                } => {
                    tracing::error!(
                        %channel, epoch, position, delivered,
                        "stream went back under an unchanged epoch; rotating the epoch"
                    );
                    metrics::stream_rollback();
                    let (streams, done, name) =
                        (self.streams.clone(), self.done.clone(), name.to_owned());
                    let channel = channel.clone();
                    tokio::spawn(async move {
                        if let Err(e) = streams.rotate(channel, epoch).await {
                            tracing::warn!(error = %e, "epoch rotation failed; retrying on the next read");
                        }
                        let _ = done.send(Done::Rotated { name });
                    });
                }
            }
        }
    }
}

/// Asks a pub/sub task to subscribe and waits until live delivery is on. A request that
/// times out stops waiting in a way the task sees (the answer channel is closed), so the
/// task never counts it; if the answer came first, it stands.
pub async fn request_subscribe<C>(
    tx: &mpsc::UnboundedSender<C>,
    command: impl FnOnce(Reply) -> C,
    timeout: std::time::Duration,
) -> Result<(), BrokerError> {
    let (reply, mut rx) = oneshot::channel();
    tx.send(command(reply))
        .map_err(|_| BrokerError::Internal("pub/sub task gone".into()))?;
    match tokio::time::timeout(timeout, &mut rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(BrokerError::Internal("pub/sub task gone".into())),
        Err(_) => {
            rx.close();
            match rx.try_recv() {
                Ok(result) => result,
                Err(_) => Err(BrokerError::Unavailable("redis subscribe timed out".into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_subscribe_that_timed_out_is_never_counted() {
        let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
        let waiting =
            tokio::spawn(
                async move { request_subscribe(&tx, |r| r, Duration::from_secs(1)).await },
            );
        let reply = rx.recv().await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(waiting.await.unwrap().is_err());
        // The task answers late: the requester is gone, so it must not count it.
        assert!(reply.send(Ok(())).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_beat_the_timeout_stands() {
        let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
        let waiting =
            tokio::spawn(
                async move { request_subscribe(&tx, |r| r, Duration::from_secs(1)).await },
            );
        let reply = rx.recv().await.unwrap();
        assert!(reply.send(Ok(())).is_ok());
        assert_eq!(waiting.await.unwrap(), Ok(()));
    }
}

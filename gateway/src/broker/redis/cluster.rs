//! Sharded pub/sub on Redis Cluster. One RESP3 cluster connection (shared with the
//! commands) carries every `SSUBSCRIBE`; redis-rs routes each to the master owning the
//! channel's slot. The task drives the same [`Delivery`] as the single-server one.
//!
//! Traps:
//! - redis-rs 1.8 re-subscribes a reconnected node with one SSUBSCRIBE listing all its
//!   shard channels, which Redis refuses with CROSSSLOT as soon as the node serves
//!   channels in more than one slot. So on every disconnection this task subscribes each
//!   channel again itself, one channel (one slot) per call, and the trackers repair from
//!   the streams what was published meanwhile.
//! - When a slot moves to another master, Redis ends the shard subscriptions in it with
//!   an `sunsubscribe` push. The table marks such a channel down and the next tick
//!   subscribes it again (now on the new owner) and repairs it.

use super::{
    Keys,
    commands::{Commands, Conn},
    delivery::{Delivery, Done, Streams},
    pubsub::{Command, PubSub, PubSubConfig},
};
use crate::{
    broker::{BrokerError, subscriptions::Acquired},
    clock::Clock,
    hub::Hub,
};
use redis::{PushInfo, PushKind, Value};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::sync::mpsc;

const TICK: Duration = Duration::from_millis(250);

/// What the cluster's subscription task needs.
pub struct Setup {
    pub commands: Arc<Commands>,
    pub pushes: mpsc::UnboundedReceiver<PushInfo>,
    pub hub: Arc<Hub>,
    pub keys: Keys,
    pub streams: Arc<dyn Streams>,
    pub control: String,
    pub config: PubSubConfig,
    pub clock: Clock,
}

/// Starts the cluster's subscription task; returns its handle.
pub fn spawn(setup: Setup) -> PubSub {
    let (tx, rx) = mpsc::unbounded_channel();
    let connected = Arc::new(AtomicBool::new(false));
    let (delivery, done) = Delivery::new(
        setup.hub,
        setup.keys,
        setup.streams,
        setup.config.unsubscribe_delay,
        setup.clock,
    );
    let task = Task {
        commands: setup.commands,
        pushes: setup.pushes,
        delivery,
        done,
        control: setup.control,
        config: setup.config,
        rx,
        generation: None,
        relink: false,
        connected: connected.clone(),
    };
    tokio::spawn(task.run());
    PubSub::new(tx, connected)
}

struct Task {
    commands: Arc<Commands>,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    delivery: Delivery,
    done: mpsc::UnboundedReceiver<Done>,
    control: String,
    config: PubSubConfig,
    rx: mpsc::UnboundedReceiver<Command>,
    /// The command connection's generation our subscriptions live on.
    generation: Option<u64>,
    /// Some subscriptions are down while the connection is up (Redis ended them).
    relink: bool,
    connected: Arc<AtomicBool>,
}

fn bulk_str(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

impl Task {
    async fn cluster(&self) -> Result<redis::cluster_async::ClusterConnection, BrokerError> {
        match self.commands.connection().await? {
            Conn::Cluster(c) => Ok(c),
            Conn::Single(_) => Err(BrokerError::Internal("not a cluster connection".into())),
        }
    }

    async fn ssubscribe(
        &self,
        conn: &mut redis::cluster_async::ClusterConnection,
        name: &str,
    ) -> Result<(), BrokerError> {
        match tokio::time::timeout(self.config.timeout, conn.ssubscribe(name)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::Unavailable(e.to_string())),
            Err(_) => Err(BrokerError::Unavailable("ssubscribe timed out".into())),
        }
    }

    /// After a new connection (whose subscriptions are empty), a dropped one, or a
    /// subscription Redis ended by itself: subscribe everything that is down again, one
    /// channel (one slot) per call; the trackers then repair what was missed.
    async fn ensure_linked(&mut self) {
        let generation = self.commands.generation();
        let fresh = self.generation != Some(generation);
        if fresh && self.generation.is_some() {
            // A new connection: everything it had is gone.
            self.delivery.table.disconnected();
        }
        if !fresh && self.delivery.table.connected() && !self.relink {
            return;
        }
        let Ok(mut conn) = self.cluster().await else {
            self.connected.store(false, Ordering::Relaxed);
            return;
        };
        if (fresh || !self.delivery.table.connected())
            && !matches!(
                tokio::time::timeout(self.config.timeout, conn.subscribe(&self.control)).await,
                Ok(Ok(()))
            )
        {
            return;
        }
        let reconnect = !self.delivery.table.connected() && self.generation.is_some();
        for batch in self.delivery.table.connect(1) {
            for name in &batch {
                if let Err(e) = self.ssubscribe(&mut conn, name).await {
                    tracing::warn!(channel = name, error = %e, "cluster re-subscribe failed; retrying");
                    self.delivery.table.disconnected();
                    self.connected.store(false, Ordering::Relaxed);
                    return;
                }
            }
            self.delivery.linked(&batch, self.delivery.clock.now());
        }
        if reconnect {
            crate::metrics::pubsub_reconnect();
        }
        self.generation = Some(generation);
        self.relink = false;
        self.connected.store(true, Ordering::Relaxed);
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                push = self.pushes.recv() => {
                    let Some(push) = push else { return };
                    self.on_push(push);
                }
                cmd = self.rx.recv() => match cmd {
                    None => return,
                    Some(Command::Unsubscribe(name)) => self.delivery.release(&name, self.delivery.clock.now()),
                    Some(Command::Subscribe(name, reply)) => {
                        if !self.delivery.table.connected() {
                            self.ensure_linked().await;
                        }
                        if self.delivery.acquire(&name, reply) != Acquired::Link {
                            continue;
                        }
                        let linked = match self.cluster().await {
                            Ok(mut conn) => self.ssubscribe(&mut conn, &name).await,
                            Err(e) => Err(e),
                        };
                        match linked {
                            Ok(()) => self.delivery.linked(&[name], self.delivery.clock.now()),
                            Err(e) => self.delivery.table.link_failed(&name, &e),
                        }
                    }
                },
                Some(done) = self.done.recv() => self.delivery.on_done(done, self.delivery.clock.now()),
                _ = tick.tick() => {
                    self.ensure_linked().await;
                    self.unsubscribe_idle().await;
                }
            }
        }
    }

    async fn unsubscribe_idle(&mut self) {
        let idle = self.delivery.table.take_idle(self.delivery.clock.now());
        if idle.is_empty() {
            return;
        }
        if let Ok(mut conn) = self.cluster().await {
            for name in &idle {
                let _ = tokio::time::timeout(self.config.timeout, conn.sunsubscribe(name)).await;
            }
        }
    }

    fn on_push(&mut self, push: PushInfo) {
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                let (Some(channel), Some(Value::BulkString(payload))) =
                    (push.data.first().and_then(bulk_str), push.data.get(1))
                else {
                    return;
                };
                if channel == self.control {
                    self.delivery.on_control(payload);
                } else {
                    self.delivery.on_message(&channel, payload);
                }
            }
            PushKind::SUnsubscribe => {
                // Redis ended a shard subscription by itself (its slot moved): the next
                // tick subscribes it again on the slot's new owner and repairs it.
                if let Some(channel) = push.data.first().and_then(bulk_str)
                    && self.delivery.table.unlinked(&channel)
                {
                    self.relink = true;
                    tracing::info!(channel, "shard subscription ended by redis; re-subscribing");
                }
            }
            PushKind::Disconnection => {
                // Some master's connection dropped; redis-rs reconnects it, and the next
                // tick subscribes everything again and repairs.
                self.delivery.table.disconnected();
                self.connected.store(false, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

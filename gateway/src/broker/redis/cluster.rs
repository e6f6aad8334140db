//! Sharded pub/sub on Redis Cluster. One RESP3 cluster connection (shared with the
//! commands) carries every `SSUBSCRIBE`; redis-rs routes each to the master owning the
//! channel's slot and re-subscribes, slot by slot, after reconnects and topology changes.
//! This task keeps the node's reference counts and delayed unsubscribes, as the
//! single-server task does.
//!
//! Trap: redis-rs 1.8 re-subscribes a reconnected node with one SSUBSCRIBE listing all its
//! shard channels, which Redis refuses with CROSSSLOT as soon as the node serves channels
//! in more than one slot. So on every disconnection this task re-subscribes each channel
//! itself, one channel (one slot) per call, and then repairs every channel from its stream,
//! since messages published meanwhile were not delivered.

use super::{
    Keys,
    commands::{Commands, Conn},
    delivery::Delivery,
    pubsub::{Command, PubSub, PubSubConfig},
};
use crate::broker::BrokerError;
use redis::{PushInfo, PushKind, Value};
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::mpsc;

/// Spawns the cluster's subscription task; see the module doc.
pub struct ClusterPubSub;

#[derive(Default)]
struct Sub {
    refs: usize,
    subscribed: bool,
    idle_since: Option<Instant>,
}

impl ClusterPubSub {
    pub fn spawn(
        commands: Arc<Commands>,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        delivery: Arc<Delivery>,
        keys: Keys,
        control: String,
        config: PubSubConfig,
    ) -> PubSub {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            commands,
            pushes,
            delivery,
            keys,
            control,
            config,
            rx,
            subs: HashMap::new(),
            generation: None,
            resubscribe: false,
        };
        tokio::spawn(task.run());
        PubSub::always_connected(tx)
    }
}

struct Task {
    commands: Arc<Commands>,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    delivery: Arc<Delivery>,
    keys: Keys,
    control: String,
    config: PubSubConfig,
    rx: mpsc::UnboundedReceiver<Command>,
    subs: HashMap<String, Sub>,
    /// The command connection's generation our subscriptions live on.
    generation: Option<u64>,
    /// A connection dropped: every channel must be subscribed again, one per call.
    resubscribe: bool,
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

    /// After a new connection (whose subscriptions are empty) or a dropped one: subscribe
    /// everything again, one channel (so one slot) per call, then repair what was missed.
    async fn ensure_subscribed(&mut self) {
        let generation = self.commands.generation();
        if self.generation == Some(generation) && !self.resubscribe {
            return;
        }
        let Ok(mut conn) = self.cluster().await else {
            return;
        };
        let timeout = self.config.timeout;
        if !matches!(
            tokio::time::timeout(timeout, conn.subscribe(&self.control)).await,
            Ok(Ok(()))
        ) {
            return;
        }
        let names: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| s.refs > 0)
            .map(|(n, _)| n.clone())
            .collect();
        for name in &names {
            if !matches!(
                tokio::time::timeout(timeout, conn.ssubscribe(name)).await,
                Ok(Ok(()))
            ) {
                return; // retried on the next tick
            }
        }
        let again = self.generation.is_some();
        self.generation = Some(generation);
        self.resubscribe = false;
        if again {
            crate::metrics::pubsub_reconnect();
            self.delivery.repair_all(&names);
        }
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                push = self.pushes.recv() => {
                    let Some(push) = push else { return };
                    self.on_push(push);
                }
                cmd = self.rx.recv() => match cmd {
                    None => return,
                    Some(Command::Unsubscribe(name)) => {
                        if let Some(s) = self.subs.get_mut(&name) {
                            s.refs = s.refs.saturating_sub(1);
                            if s.refs == 0 {
                                s.idle_since = Some(Instant::now());
                            }
                        }
                    }
                    Some(Command::Subscribe(name, reply)) => {
                        self.ensure_subscribed().await;
                        let result = self.subscribe(&name).await;
                        let _ = reply.send(result);
                    }
                },
                _ = tick.tick() => {
                    self.ensure_subscribed().await;
                    self.unsubscribe_idle().await;
                }
            }
        }
    }

    async fn subscribe(&mut self, name: &str) -> Result<(), BrokerError> {
        let s = self.subs.entry(name.to_owned()).or_default();
        s.refs += 1;
        s.idle_since = None;
        if s.subscribed {
            return Ok(());
        }
        let result = match self.cluster().await {
            Ok(mut conn) => {
                match tokio::time::timeout(self.config.timeout, conn.ssubscribe(name)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(BrokerError::Unavailable(e.to_string())),
                    Err(_) => Err(BrokerError::Unavailable("ssubscribe timed out".into())),
                }
            }
            Err(e) => Err(e),
        };
        let s = self.subs.entry(name.to_owned()).or_default();
        match &result {
            Ok(()) => s.subscribed = true,
            Err(_) => s.refs -= 1,
        }
        result
    }

    async fn unsubscribe_idle(&mut self) {
        let delay = self.config.unsubscribe_delay;
        let due: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| s.refs == 0 && s.idle_since.is_some_and(|t| t.elapsed() >= delay))
            .map(|(n, _)| n.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        if let Ok(mut conn) = self.cluster().await {
            for name in &due {
                let _ = tokio::time::timeout(self.config.timeout, conn.sunsubscribe(name)).await;
            }
        }
        for name in due {
            self.subs.remove(&name);
            if let Some(channel) = self.keys.channel_of(&name) {
                self.delivery.forget(channel);
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
            PushKind::Disconnection => {
                // Some master's connection dropped; redis-rs reconnects it, and the next
                // tick re-subscribes and repairs.
                self.resubscribe = true;
            }
            _ => {}
        }
    }
}

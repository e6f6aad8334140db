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
//!
//! Self-probe: the task keeps one probe channel per master (a name hashing to a slot the
//! master owns, re-read from `CLUSTER SLOTS` every probe interval) and publishes to each
//! every probe interval; a probe that does not come back within the command timeout means
//! some shard subscription went silent, and every channel is subscribed again and
//! repaired, as after a disconnection.

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

/// One master's probe channel, and when its last probe was sent (not yet heard back).
struct Probe {
    channel: String,
    subscribed: bool,
    sent: Option<std::time::Instant>,
}

/// What the prober tells the subscription task.
enum ProbeEvent {
    /// A probe did not come back: some shard subscription is silent.
    Silent(String),
}

/// What the cluster's subscription task needs.
pub struct Setup {
    pub commands: Arc<Commands>,
    pub pushes: mpsc::UnboundedReceiver<PushInfo>,
    pub hub: Arc<Hub>,
    pub keys: Keys,
    pub streams: Arc<dyn Streams>,
    pub control: String,
    /// Distinguishes this node's probe channels from other nodes'.
    pub node_id: String,
    pub prefix: String,
    pub config: PubSubConfig,
    pub clock: Clock,
}

/// Starts the cluster's subscription task; returns its handle.
pub fn spawn(setup: Setup) -> PubSub {
    let (tx, rx) = mpsc::unbounded_channel();
    let (heard_tx, heard_rx) = mpsc::unbounded_channel();
    let (silent_tx, silent_rx) = mpsc::unbounded_channel();
    let probe_base = format!("{}probe:{}", setup.prefix, setup.node_id);
    let (setup_commands, setup_config, setup_clock) = (
        setup.commands.clone(),
        setup.config.clone(),
        setup.clock.clone(),
    );
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
        probe_base: probe_base.clone(),
        heard: heard_tx,
        silent: silent_rx,
    };
    tokio::spawn(task.run());
    tokio::spawn(
        Prober {
            commands: setup_commands,
            config: setup_config,
            clock: setup_clock,
            base: probe_base,
            probes: Vec::new(),
            heard: heard_rx,
            silent: silent_tx,
        }
        .run(),
    );
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
    probe_base: String,
    /// Probe messages heard, for the prober.
    heard: mpsc::UnboundedSender<String>,
    silent: mpsc::UnboundedReceiver<ProbeEvent>,
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
                Some(ProbeEvent::Silent(probe)) = self.silent.recv() => {
                    tracing::warn!(probe, "a shard subscription went silent; subscribing again and repairing");
                    self.delivery.table.disconnected();
                    self.connected.store(false, Ordering::Relaxed);
                }
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
                if channel.contains(&self.probe_base) {
                    let _ = self.heard.send(channel);
                    return;
                }
                if channel == self.control {
                    self.delivery.on_control(payload);
                } else {
                    self.delivery.on_message(&channel, payload);
                }
            }
            PushKind::SUnsubscribe
                if push
                    .data
                    .first()
                    .and_then(bulk_str)
                    .is_some_and(|c| c.contains(&self.probe_base)) =>
            {
                // A probe channel's slot moved: the prober finds its new owner.
                let _ = self.heard.send(String::new());
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

/// The self-probe, in its own task so a frozen master never holds up subscriptions.
struct Prober {
    commands: Arc<Commands>,
    config: PubSubConfig,
    clock: Clock,
    base: String,
    probes: Vec<Probe>,
    /// Probe channels heard back (empty: re-subscribe every probe channel).
    heard: mpsc::UnboundedReceiver<String>,
    silent: mpsc::UnboundedSender<ProbeEvent>,
}

impl Prober {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.config.probe_interval.max(TICK));
        loop {
            tokio::select! {
                heard = self.heard.recv() => match heard {
                    None => return,
                    Some(channel) if channel.is_empty() => {
                        for p in &mut self.probes {
                            p.subscribed = false;
                            p.sent = None;
                        }
                    }
                    Some(channel) => {
                        if let Some(p) = self.probes.iter_mut().find(|p| p.channel == channel) {
                            p.sent = None;
                        }
                    }
                },
                _ = tick.tick() => self.round().await,
            }
        }
    }

    async fn cluster(&self) -> Result<redis::cluster_async::ClusterConnection, BrokerError> {
        match self.commands.connection().await? {
            Conn::Cluster(c) => Ok(c),
            Conn::Single(_) => Err(BrokerError::Internal("not a cluster connection".into())),
        }
    }

    /// Checks the last probes came back, refreshes the probe channels from the slot
    /// map, and sends the next probes.
    async fn round(&mut self) {
        let now = self.clock.now();
        let overdue = self.config.probe_interval.max(self.config.timeout);
        if let Some(p) = self.probes.iter().find(|p| {
            p.sent
                .is_some_and(|t| now.saturating_duration_since(t) > overdue)
        }) {
            let _ = self.silent.send(ProbeEvent::Silent(p.channel.clone()));
            for p in &mut self.probes {
                p.subscribed = false;
                p.sent = None;
            }
        }
        let Ok(mut conn) = self.cluster().await else {
            return;
        };
        if let Ok(channels) = self.probe_channels(&mut conn).await {
            let mut probes = Vec::with_capacity(channels.len());
            for channel in channels {
                let old = self.probes.iter().position(|p| p.channel == channel);
                probes.push(old.map(|i| self.probes.swap_remove(i)).unwrap_or(Probe {
                    channel,
                    subscribed: false,
                    sent: None,
                }));
            }
            for stale in self.probes.drain(..).filter(|p| p.subscribed) {
                let _ =
                    tokio::time::timeout(self.config.timeout, conn.sunsubscribe(&stale.channel))
                        .await;
            }
            self.probes = probes;
        }
        let timeout = self.config.timeout;
        for probe in &mut self.probes {
            if !probe.subscribed {
                probe.subscribed = matches!(
                    tokio::time::timeout(timeout, conn.ssubscribe(&probe.channel)).await,
                    Ok(Ok(()))
                );
                continue;
            }
            if probe.sent.is_some() {
                continue;
            }
            let mut spublish = redis::cmd("SPUBLISH");
            spublish.arg(&probe.channel).arg("probe");
            let published = spublish.query_async::<i64>(&mut conn);
            // A probe that could not even be sent counts as sent: it cannot come back.
            let _ = tokio::time::timeout(timeout, published).await;
            probe.sent = Some(now);
        }
    }

    /// One channel per master, named so it hashes to the first slot the master owns.
    async fn probe_channels(
        &self,
        conn: &mut redis::cluster_async::ClusterConnection,
    ) -> Result<Vec<String>, BrokerError> {
        let mut command = redis::cmd("CLUSTER");
        command.arg("SLOTS");
        let slots = command.query_async::<Value>(conn);
        let slots = match tokio::time::timeout(self.config.timeout, slots).await {
            Ok(Ok(Value::Array(ranges))) => ranges,
            _ => return Err(BrokerError::Unavailable("CLUSTER SLOTS".into())),
        };
        let mut firsts: Vec<(String, u16)> = Vec::new();
        for range in &slots {
            let Value::Array(r) = range else { continue };
            let (Some(Value::Int(start)), Some(Value::Array(master))) = (r.first(), r.get(2))
            else {
                continue;
            };
            let id = master.get(2).and_then(bulk_str).unwrap_or_default();
            let start = u16::try_from(*start).unwrap_or(0);
            match firsts.iter_mut().find(|(m, _)| *m == id) {
                Some(entry) => entry.1 = entry.1.min(start),
                None => firsts.push((id, start)),
            }
        }
        Ok(firsts
            .into_iter()
            .filter_map(|(_, slot)| {
                let tag = tag_for_slot(slot)?;
                Some(format!("{{{tag}}}{}", self.base))
            })
            .collect())
    }
}

/// A short hash tag whose key slot is `slot` (found by trying; ~16,000 tries at worst).
fn tag_for_slot(slot: u16) -> Option<String> {
    let target = redis::cluster_routing::Slot::new(slot)?;
    (0..200_000u32)
        .map(|i| format!("p{i}"))
        .find(|tag| redis::cluster_routing::Slot::for_key(tag.as_bytes()) == target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_tag_for_any_slot() {
        for slot in [0u16, 1, 5461, 10923, 16383] {
            let tag = tag_for_slot(slot).expect("a tag");
            let key = format!("{{{tag}}}gw:probe:n1");
            assert_eq!(
                redis::cluster_routing::Slot::for_key(key.as_bytes()),
                redis::cluster_routing::Slot::new(slot).unwrap()
            );
        }
    }
}

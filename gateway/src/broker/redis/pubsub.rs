//! One Redis pub/sub connection to one server, and the channels it carries for this node.
//! A task owns the connection and its [`Delivery`] (subscription table and trackers) and
//! only performs I/O: SUBSCRIBE/UNSUBSCRIBE as the table asks, messages into the
//! trackers, stream reads back into them.
//!
//! When the connection dies — or stays silent and its own probe publication does not come
//! back through Redis — the task reconnects with backoff, subscribes everything again in
//! batches, and the trackers repair what was missed from the streams.

use super::{
    Keys,
    commands::Commands,
    delivery::{Delivery, Done, Reply, Streams, request_subscribe},
    endpoint::Endpoint,
};
use crate::{
    backoff::Backoff,
    broker::{BrokerError, subscriptions::Acquired},
    clock::Clock,
    hub::Hub,
};
use futures_util::StreamExt;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::mpsc;

/// Channels re-subscribed per SUBSCRIBE call after a reconnect.
const RESUBSCRIBE_BATCH: usize = 256;
/// How often idle subscriptions and the probe are looked at.
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct PubSubConfig {
    pub timeout: Duration,
    pub unsubscribe_delay: Duration,
    pub probe_interval: Duration,
}

/// What sessions ask of a pub/sub task (this one or the cluster's).
pub enum Command {
    Subscribe(String, Reply),
    Unsubscribe(String),
}

/// Handle to one pub/sub task.
pub struct PubSub {
    tx: mpsc::UnboundedSender<Command>,
    connected: Arc<AtomicBool>,
}

impl PubSub {
    pub fn new(tx: mpsc::UnboundedSender<Command>, connected: Arc<AtomicBool>) -> Self {
        Self { tx, connected }
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Resolves once the node's subscription to `redis_channel` is live and delivering.
    pub async fn subscribe(
        &self,
        redis_channel: String,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        request_subscribe(
            &self.tx,
            |reply| Command::Subscribe(redis_channel, reply),
            timeout,
        )
        .await
    }

    pub fn unsubscribe(&self, redis_channel: String) {
        let _ = self.tx.send(Command::Unsubscribe(redis_channel));
    }
}

/// What one single-server pub/sub task needs.
pub struct Setup {
    pub endpoint: Arc<Endpoint>,
    pub commands: Arc<Commands>,
    pub hub: Arc<Hub>,
    pub keys: Keys,
    pub streams: Arc<dyn Streams>,
    pub probe_channel: String,
    /// The control channel, heard on one connection per server.
    pub control_channel: Option<String>,
    pub config: PubSubConfig,
    pub clock: Clock,
}

/// Starts the task; returns its handle.
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
        endpoint: setup.endpoint,
        commands: setup.commands,
        delivery,
        done,
        probe_channel: setup.probe_channel,
        control_channel: setup.control_channel,
        config: setup.config,
        rx,
        connected: connected.clone(),
    };
    tokio::spawn(task.run());
    PubSub::new(tx, connected)
}

struct Task {
    endpoint: Arc<Endpoint>,
    commands: Arc<Commands>,
    delivery: Delivery,
    done: mpsc::UnboundedReceiver<Done>,
    probe_channel: String,
    control_channel: Option<String>,
    config: PubSubConfig,
    rx: mpsc::UnboundedReceiver<Command>,
    connected: Arc<AtomicBool>,
}

enum Ended {
    Lost(String),
    Stopped,
}

impl Task {
    async fn run(mut self) {
        // The first retry comes quickly: a dropped connection usually reconnects at once,
        // and every publication made meanwhile must still be in the stream to be repaired.
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
        loop {
            match self.connect_and_serve(&mut backoff).await {
                Ended::Stopped => return,
                Ended::Lost(why) => {
                    self.connected.store(false, Ordering::Relaxed);
                    self.delivery.table.disconnected();
                    crate::metrics::pubsub_reconnect();
                    tracing::warn!(error = %why, "redis pub/sub connection lost; reconnecting");
                }
            }
            // While down, subscribe requests are refused at once (the table is
            // disconnected) and reads still complete.
            let until = tokio::time::Instant::now() + backoff.next_delay();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    cmd = self.rx.recv() => match cmd {
                        None => return,
                        Some(cmd) => self.offline(cmd),
                    },
                    Some(done) = self.done.recv() => self.delivery.on_done(done, self.delivery.clock.now()),
                }
            }
        }
    }

    fn offline(&mut self, cmd: Command) {
        let now = self.delivery.clock.now();
        match cmd {
            Command::Subscribe(name, reply) => {
                self.delivery.acquire(&name, reply);
            }
            Command::Unsubscribe(name) => self.delivery.release(&name, now),
        }
    }

    async fn connect_and_serve(&mut self, backoff: &mut Backoff) -> Ended {
        let timeout = self.config.timeout;
        let mut switches = self.endpoint.switches();
        if let Some(s) = &mut switches {
            s.mark_unchanged();
        }
        let connect = async { self.endpoint.client().await?.get_async_pubsub().await };
        let pubsub = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Ended::Lost(e.to_string()),
            Err(_) => return Ended::Lost("connect timed out".into()),
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut always = vec![self.probe_channel.clone()];
        always.extend(self.control_channel.iter().cloned());
        match tokio::time::timeout(timeout, sink.subscribe(&always)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Ended::Lost(e.to_string()),
            Err(_) => return Ended::Lost("subscribe timed out".into()),
        }
        for batch in self.delivery.table.connect(RESUBSCRIBE_BATCH) {
            match tokio::time::timeout(timeout, sink.subscribe(&batch)).await {
                Ok(Ok(())) => self.delivery.linked(&batch, self.delivery.clock.now()),
                Ok(Err(e)) => return Ended::Lost(e.to_string()),
                Err(_) => return Ended::Lost("re-subscribe timed out".into()),
            }
        }
        backoff.reset();
        self.connected.store(true, Ordering::Relaxed);

        let mut last_heard = self.delivery.clock.now();
        let mut probe_sent: Option<Instant> = None;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { return Ended::Lost("connection closed".into()) };
                    let now = self.delivery.clock.now();
                    last_heard = now;
                    probe_sent = None;
                    let channel = msg.get_channel_name();
                    if channel == self.probe_channel {
                        continue;
                    }
                    if self.control_channel.as_deref() == Some(channel) {
                        self.delivery.on_control(msg.get_payload_bytes());
                    } else {
                        self.delivery.on_message(channel, msg.get_payload_bytes());
                    }
                }
                cmd = self.rx.recv() => match cmd {
                    None => return Ended::Stopped,
                    Some(Command::Unsubscribe(name)) => self.delivery.release(&name, self.delivery.clock.now()),
                    Some(Command::Subscribe(name, reply)) => {
                        if self.delivery.acquire(&name, reply) != Acquired::Link {
                            continue;
                        }
                        match tokio::time::timeout(timeout, sink.subscribe(&name)).await {
                            Ok(Ok(())) => self.delivery.linked(&[name], self.delivery.clock.now()),
                            failed => {
                                let why = match failed {
                                    Ok(Err(e)) => e.to_string(),
                                    _ => "subscribe timed out".into(),
                                };
                                self.delivery.table.link_failed(&name, &BrokerError::Unavailable(why.clone()));
                                return Ended::Lost(why);
                            }
                        }
                    }
                },
                Some(done) = self.done.recv() => self.delivery.on_done(done, self.delivery.clock.now()),
                () = switched(&mut switches) => return Ended::Lost("sentinel switched the master".into()),
                _ = tick.tick() => {
                    let idle = self.delivery.table.take_idle(self.delivery.clock.now());
                    if !idle.is_empty() {
                        match tokio::time::timeout(timeout, sink.unsubscribe(&idle)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return Ended::Lost(e.to_string()),
                            Err(_) => return Ended::Lost("unsubscribe timed out".into()),
                        }
                    }
                    // Silence may be a dead subscription (e.g. after a failover): publish to
                    // our own probe channel and expect to hear it back.
                    match probe_sent {
                        Some(sent) if self.delivery.clock.now().saturating_duration_since(sent) > timeout.max(self.config.probe_interval) => {
                            return Ended::Lost("probe did not come back through redis".into());
                        }
                        Some(_) => {}
                        None if self.delivery.clock.now().saturating_duration_since(last_heard) >= self.config.probe_interval => {
                            probe_sent = Some(self.delivery.clock.now());
                            let (commands, channel) = (self.commands.clone(), self.probe_channel.clone());
                            tokio::spawn(async move {
                                let _ = commands
                                    .run(|mut c| async move {
                                        redis::cmd("PUBLISH").arg(&channel).arg("probe").query_async::<i64>(&mut c).await
                                    })
                                    .await;
                            });
                        }
                        None => {}
                    }
                }
            }
        }
    }
}

/// Resolves when Sentinel names a new master (never for a fixed URL).
async fn switched(switches: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    let Some(s) = switches else {
        return std::future::pending().await;
    };
    if s.changed().await.is_err() {
        std::future::pending().await
    }
}

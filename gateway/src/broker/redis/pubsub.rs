//! One Redis pub/sub connection and the channels it carries. A task owns the connection:
//! it reference-counts subscriptions (one Redis subscription per channel per node),
//! unsubscribes after a delay to absorb churn, and when the connection dies — or stays
//! silent and its own probe does not come back through Redis — reconnects with backoff,
//! re-subscribes everything in batches and has the stream repair what was missed.

use super::{Keys, commands::Commands, delivery::Delivery};
use crate::{backoff::Backoff, broker::BrokerError};
use futures_util::StreamExt;
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, oneshot};

/// Channels re-subscribed per SUBSCRIBE call after a reconnect.
const RESUBSCRIBE_BATCH: usize = 256;

#[derive(Debug, Clone)]
pub struct PubSubConfig {
    pub timeout: Duration,
    pub unsubscribe_delay: Duration,
    pub probe_interval: Duration,
}

/// What sessions ask of a pub/sub task (this one or the cluster's).
pub(super) enum Command {
    Subscribe(String, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(String),
}

/// Asks a pub/sub task to subscribe and waits until the subscription is live in Redis.
pub(super) async fn request_subscribe(
    tx: &mpsc::UnboundedSender<Command>,
    redis_channel: String,
    timeout: Duration,
) -> Result<(), BrokerError> {
    let (reply, rx) = oneshot::channel();
    tx.send(Command::Subscribe(redis_channel.clone(), reply))
        .map_err(|_| BrokerError::Internal("pub/sub task gone".into()))?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(BrokerError::Internal("pub/sub task gone".into())),
        Err(_) => {
            // The task will still count this subscription when it gets to it; undo it.
            let _ = tx.send(Command::Unsubscribe(redis_channel));
            Err(BrokerError::Unavailable("redis subscribe timed out".into()))
        }
    }
}

/// Handle to one pub/sub connection task.
pub struct PubSub {
    tx: mpsc::UnboundedSender<Command>,
    connected: Arc<AtomicBool>,
}

#[derive(Default)]
struct Sub {
    refs: usize,
    subscribed: bool,
    idle_since: Option<Instant>,
}

impl PubSub {
    pub fn spawn(
        client: redis::Client,
        commands: Arc<Commands>,
        delivery: Arc<Delivery>,
        keys: Keys,
        probe_channel: String,
        extra_channels: Vec<String>,
        config: PubSubConfig,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let task = Task {
            client,
            commands,
            delivery,
            keys,
            probe_channel,
            extra_channels,
            config,
            rx,
            subs: HashMap::new(),
            connected: connected.clone(),
        };
        tokio::spawn(task.run());
        Self { tx, connected }
    }

    /// A handle to a task that tracks no connection state of its own (the cluster's,
    /// whose connection redis-rs keeps up): it always counts as connected.
    pub(super) fn always_connected(tx: mpsc::UnboundedSender<Command>) -> Self {
        Self {
            tx,
            connected: Arc::new(AtomicBool::new(true)),
        }
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Resolves once the node's subscription to `redis_channel` is live in Redis.
    pub async fn subscribe(
        &self,
        redis_channel: String,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        request_subscribe(&self.tx, redis_channel, timeout).await
    }

    pub fn unsubscribe(&self, redis_channel: String) {
        let _ = self.tx.send(Command::Unsubscribe(redis_channel));
    }
}

struct Task {
    client: redis::Client,
    commands: Arc<Commands>,
    delivery: Arc<Delivery>,
    keys: Keys,
    probe_channel: String,
    /// Always-on subscriptions besides the probe (the control channel).
    extra_channels: Vec<String>,
    config: PubSubConfig,
    rx: mpsc::UnboundedReceiver<Command>,
    subs: HashMap<String, Sub>,
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
                    for s in self.subs.values_mut() {
                        s.subscribed = false;
                    }
                    crate::metrics::pubsub_reconnect();
                    tracing::warn!(error = %why, "redis pub/sub connection lost; reconnecting");
                }
            }
            // While down, subscribe requests fail fast instead of waiting.
            let until = tokio::time::Instant::now() + backoff.next_delay();
            while let Ok(Some(cmd)) = tokio::time::timeout_at(until, self.rx.recv()).await {
                self.refuse(cmd);
            }
        }
    }

    fn refuse(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe(_, reply) => {
                let _ = reply.send(Err(BrokerError::Unavailable(
                    "redis pub/sub is reconnecting".into(),
                )));
            }
            Command::Unsubscribe(name) => self.release(&name),
        }
    }

    fn release(&mut self, name: &str) {
        if let Some(s) = self.subs.get_mut(name) {
            s.refs = s.refs.saturating_sub(1);
            if s.refs == 0 {
                s.idle_since = Some(Instant::now());
            }
        }
    }

    async fn connect_and_serve(&mut self, backoff: &mut Backoff) -> Ended {
        let timeout = self.config.timeout;
        let pubsub = match tokio::time::timeout(timeout, self.client.get_async_pubsub()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Ended::Lost(e.to_string()),
            Err(_) => return Ended::Lost("connect timed out".into()),
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut always = vec![self.probe_channel.clone()];
        always.extend(self.extra_channels.iter().cloned());
        match tokio::time::timeout(timeout, sink.subscribe(&always)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Ended::Lost(e.to_string()),
            Err(_) => return Ended::Lost("subscribe timed out".into()),
        }
        let names: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| s.refs > 0)
            .map(|(n, _)| n.clone())
            .collect();
        for batch in names.chunks(RESUBSCRIBE_BATCH) {
            match tokio::time::timeout(timeout, sink.subscribe(batch)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Ended::Lost(e.to_string()),
                Err(_) => return Ended::Lost("re-subscribe timed out".into()),
            }
        }
        for n in &names {
            if let Some(s) = self.subs.get_mut(n) {
                s.subscribed = true;
            }
        }
        self.subs.retain(|_, s| s.refs > 0);
        backoff.reset();
        self.connected.store(true, Ordering::Relaxed);
        // Anything published while this connection was down is in the streams.
        self.delivery.repair_all(&names);

        let mut last_heard = Instant::now();
        let mut probe_sent: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { return Ended::Lost("connection closed".into()) };
                    last_heard = Instant::now();
                    probe_sent = None;
                    let channel = msg.get_channel_name();
                    if channel == self.probe_channel {
                        continue;
                    }
                    if self.extra_channels.iter().any(|c| c == channel) {
                        self.delivery.on_control(msg.get_payload_bytes());
                    } else {
                        self.delivery.on_message(channel, msg.get_payload_bytes());
                    }
                }
                cmd = self.rx.recv() => match cmd {
                    None => return Ended::Stopped,
                    Some(Command::Unsubscribe(name)) => self.release(&name),
                    Some(Command::Subscribe(name, reply)) => {
                        let s = self.subs.entry(name.clone()).or_default();
                        s.refs += 1;
                        s.idle_since = None;
                        if s.subscribed {
                            let _ = reply.send(Ok(()));
                            continue;
                        }
                        match tokio::time::timeout(timeout, sink.subscribe(&name)).await {
                            Ok(Ok(())) => {
                                s.subscribed = true;
                                let _ = reply.send(Ok(()));
                            }
                            failed => {
                                s.refs -= 1;
                                let why = match failed {
                                    Ok(Err(e)) => e.to_string(),
                                    _ => "subscribe timed out".into(),
                                };
                                let _ = reply.send(Err(BrokerError::Unavailable(why.clone())));
                                return Ended::Lost(why);
                            }
                        }
                    }
                },
                _ = tick.tick() => {
                    let delay = self.config.unsubscribe_delay;
                    let due: Vec<String> = self
                        .subs
                        .iter()
                        .filter(|(_, s)| s.refs == 0 && s.idle_since.is_some_and(|t| t.elapsed() >= delay))
                        .map(|(n, _)| n.clone())
                        .collect();
                    if !due.is_empty() {
                        match tokio::time::timeout(timeout, sink.unsubscribe(&due)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return Ended::Lost(e.to_string()),
                            Err(_) => return Ended::Lost("unsubscribe timed out".into()),
                        }
                        for n in due {
                            self.subs.remove(&n);
                            if let Some(channel) = self.keys.channel_of(&n) {
                                self.delivery.forget(channel);
                            }
                        }
                    }
                    // Silence may be a dead subscription (e.g. after a failover): publish to
                    // our own probe channel and expect to hear it back.
                    match probe_sent {
                        Some(sent) if sent.elapsed() > timeout.max(self.config.probe_interval) => {
                            return Ended::Lost("probe did not come back through redis".into());
                        }
                        Some(_) => {}
                        None if last_heard.elapsed() >= self.config.probe_interval => {
                            probe_sent = Some(Instant::now());
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

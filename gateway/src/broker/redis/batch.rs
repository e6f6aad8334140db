//! Publishes to one Redis server go out in batches: one task per server takes every
//! publication waiting and runs the publish script once for all of them, in the order
//! they were queued, then starts the next batch with whatever queued meanwhile. One batch
//! is in flight at a time, so a channel's publications run in queue order even when
//! Redis asks for the script to be loaded again; at low load a batch holds one
//! publication and costs what a lone script call did (one round trip), under load the
//! batches grow with the round trip instead of the queue.
//!
//! A publication takes its place in the queue when it is [`queue`]d, before its answer
//! comes, which is what lets a session publish again without waiting (per-channel order
//! still holds: the queue is the order). On Redis Cluster nothing is batched: keys of one
//! script call must share a slot, and the cluster connection does not keep two calls'
//! order, so each publication runs alone and its caller waits for it.

use super::{commands::Commands, commands::Instance, flag, reply};
use crate::broker::{BrokerError, Position, history::new_epoch};
use redis::Value;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Publications per script call at most.
const MAX_PUBLICATIONS: usize = 256;
/// Payload bytes per script call: once over, the batch ends (a batch holds at least one).
const MAX_BYTES: usize = 1 << 20;

/// One publication's part of a script call (see `scripts::publish`).
pub struct Item {
    pub stream: String,
    pub meta: String,
    pub idempotency: String,
    pub payload: Vec<u8>,
    /// History size; 0 keeps no history (offset 0, no epoch).
    pub history: usize,
    pub history_ttl: u64,
    pub pubsub: String,
    pub idempotency_ttl: u64,
    pub has_key: bool,
    pub meta_ttl: u64,
}

struct Job {
    item: Item,
    /// The server's layout token when the publication was made (see `layout.rs`).
    layout: String,
    answer: oneshot::Sender<Result<Position, BrokerError>>,
}

/// Queues publications for one server's batching task.
#[derive(Clone)]
pub struct Batcher(mpsc::UnboundedSender<Job>);

/// The answer to a queued publication.
pub type Answer = oneshot::Receiver<Result<Position, BrokerError>>;

impl Batcher {
    /// Starts the server's batching task; it ends when the last `Batcher` is dropped.
    pub fn spawn(commands: Arc<Commands>, script: Arc<redis::Script>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, commands, script));
        Self(tx)
    }

    /// Takes the publication's place in the server's order now; the answer comes later.
    /// (The queue's length is bounded by its callers: each session has a few
    /// publications in flight at most, the HTTP API one request's.)
    pub fn queue(&self, item: Item, layout: String) -> Answer {
        let (answer, rx) = oneshot::channel();
        // A closed queue drops the job, and so its answer: the caller sees the error.
        let _ = self.0.send(Job {
            item,
            layout,
            answer,
        });
        rx
    }
}

/// What a dropped answer means to the publisher.
pub fn gone() -> BrokerError {
    BrokerError::Internal("redis publisher stopped".into())
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Job>,
    commands: Arc<Commands>,
    script: Arc<redis::Script>,
) {
    let mut next = None;
    let mut batch: Vec<Job> = Vec::new();
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut bytes = first.item.payload.len();
        batch.push(first);
        while batch.len() < MAX_PUBLICATIONS && bytes < MAX_BYTES {
            let Ok(job) = rx.try_recv() else { break };
            if job.layout != batch[0].layout {
                next = Some(job);
                break;
            }
            bytes += job.item.payload.len();
            batch.push(job);
        }
        crate::metrics::publish_batch(batch.len());
        let items: Vec<&Item> = batch.iter().map(|j| &j.item).collect();
        let result = publish(&commands, &script, &items, "publish", &batch[0].layout).await;
        drop(items);
        match result {
            Ok(positions) => {
                for (job, position) in batch.drain(..).zip(positions) {
                    let _ = job.answer.send(Ok(position));
                }
            }
            Err(e) => {
                for job in batch.drain(..) {
                    let _ = job.answer.send(Err(e.clone()));
                }
            }
        }
        // Given back after a burst: an idle server keeps no large batch.
        if batch.capacity() > 16 {
            batch = Vec::new();
        }
    }
}

/// Runs the publish script for `items` (all on one server, or one item on Cluster) and
/// reads each one's position, in the order of `items`.
pub async fn publish(
    commands: &Commands,
    script: &redis::Script,
    items: &[&Item],
    command: &str,
    layout: &str,
) -> Result<Vec<Position>, BrokerError> {
    let groups = &by_channel(items);
    let response: Vec<Value> = commands
        .run_as(|mut conn, instance| async move {
            invocation(script, items, groups, command, &instance, layout)
                .invoke_async(&mut conn)
                .await
        })
        .await?;
    if response.len() != items.len() * 3 {
        return Err(reply::bad_reply("publish"));
    }
    // The answers come channel by channel; put them back in the items' order.
    let mut positions = vec![None; items.len()];
    let order = groups.iter().flatten();
    for (&i, answer) in order.zip(response.chunks(3)) {
        positions[i] = Some(reply::position(answer, "publish")?);
    }
    positions
        .into_iter()
        .map(|p| p.ok_or_else(|| reply::bad_reply("publish")))
        .collect()
}

/// The items' indices grouped by channel, channels in order of first appearance, each
/// channel's items in their order.
fn by_channel(items: &[&Item]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let g = *index.entry(item.meta.as_str()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

fn invocation<'a>(
    script: &'a redis::Script,
    items: &[&Item],
    groups: &[Vec<usize>],
    command: &str,
    instance: &Instance,
    layout: &str,
) -> redis::ScriptInvocation<'a> {
    let mut call = script.prepare_invoke();
    for group in groups {
        let first = items[group[0]];
        call.key(&first.stream).key(&first.meta);
    }
    call.arg(command)
        .arg(flag(instance.durable))
        .arg(&instance.run_id)
        .arg(flag(instance.promoted))
        .arg(layout)
        .arg(new_epoch());
    // Idempotency keys follow the channels' keys; an item names its key by index.
    let mut next_key = groups.len() * 2;
    for group in groups {
        let first = items[group[0]];
        call.arg(&first.pubsub)
            .arg(first.history)
            .arg(first.history_ttl)
            .arg(first.meta_ttl)
            .arg(first.idempotency_ttl)
            .arg(group.len());
        for &i in group {
            let item = items[i];
            if item.has_key {
                next_key += 1;
                call.key(&item.idempotency).arg(next_key);
            } else {
                call.arg(0);
            }
            call.arg(&item.payload);
        }
    }
    call
}

#[cfg(test)]
mod tests {
    //! The publish script against a real `redis-server` (started here on a free port).
    use super::*;
    use crate::broker::redis::{endpoint::Endpoint, reply, scripts, sharding::Shard};
    use broker_proto::v1::{Publication, ServerFrame, server_frame::Body};
    use prost::Message as _;
    use std::time::Duration;

    struct Server(std::process::Child, u16);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn redis() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Server(
            std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server on PATH"),
            port,
        );
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start");
    }

    fn item(channel: &str, data: &str, key: &str, history: usize) -> Item {
        let payload = ServerFrame {
            id: 0,
            error: None,
            body: Some(Body::Publication(Publication {
                channel: channel.into(),
                data: data.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
        .encode_to_vec();
        Item {
            stream: format!("t{{{channel}}}:s"),
            meta: format!("t{{{channel}}}:m"),
            idempotency: format!("t{{{channel}}}:i:{key}"),
            payload,
            history,
            history_ttl: 60,
            pubsub: format!("t{{{channel}}}"),
            idempotency_ttl: 60,
            has_key: !key.is_empty(),
            meta_ttl: 60,
        }
    }

    #[tokio::test]
    async fn a_batch_groups_channels_keeps_order_trims_and_finds_duplicates() {
        let server = redis();
        let url = format!("redis://127.0.0.1:{}", server.1);
        let endpoint = Arc::new(Endpoint::open(&Shard::parse(&url).unwrap()).unwrap());
        let commands = Commands::new(endpoint, Duration::from_secs(5));
        let script = redis::Script::new(&scripts::publish());
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe(&["t{a}", "t{b}", "t{n}"]).await.unwrap();

        let items = [
            item("a", "a1", "", 3),
            item("b", "b1", "kb", 3),
            item("a", "a2", "ka", 3),
            item("n", "n1", "", 0),
            item("a", "a3", "ka", 3), // the same key as a2, in the same batch
            item("a", "a4", "", 3),
            item("n", "n2", "", 0),
            item("a", "a5", "", 3),
        ];
        let refs: Vec<&Item> = items.iter().collect();
        let positions = publish(&commands, &script, &refs, "publish", "")
            .await
            .unwrap();
        let offsets: Vec<u64> = positions.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [1, 1, 2, 0, 2, 3, 0, 4]);
        let epoch = &positions[0].epoch;
        assert!(!epoch.is_empty());
        assert_eq!(positions[3].epoch, "");

        // One message per channel, in the channels' first-appearance order.
        use futures_util::StreamExt;
        let mut got = Vec::new();
        let mut stream = pubsub.on_message();
        for _ in 0..3 {
            let m = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .unwrap()
                .unwrap();
            let payload: Vec<u8> = m.get_payload().unwrap();
            for p in reply::messages(&payload).unwrap() {
                let reply::Message::Publication(p) = p else {
                    panic!("a push")
                };
                got.push((
                    m.get_channel_name().to_owned(),
                    p.offset,
                    String::from_utf8(p.data.to_vec()).unwrap(),
                ));
            }
        }
        let expect = [
            ("t{a}", 1, "a1"),
            ("t{a}", 2, "a2"),
            ("t{a}", 3, "a4"),
            ("t{a}", 4, "a5"),
            ("t{b}", 1, "b1"),
            ("t{n}", 0, "n1"),
            ("t{n}", 0, "n2"),
        ];
        let got: Vec<(&str, u64, &str)> = got
            .iter()
            .map(|(c, o, d)| (c.as_str(), *o, d.as_str()))
            .collect();
        assert_eq!(got, expect);

        // The stream holds the last 3 (its history size), ids = offsets.
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let ids: Vec<String> = redis::cmd("XRANGE")
            .arg("t{a}:s")
            .arg("-")
            .arg("+")
            .query_async::<Vec<(String, Vec<(String, Vec<u8>)>)>>(&mut c)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["2-0", "3-0", "4-0"]);

        // A later batch finds the stored key; offsets go on.
        let again = [item("a", "a3 again", "ka", 3), item("a", "a6", "", 3)];
        let refs: Vec<&Item> = again.iter().collect();
        let positions = publish(&commands, &script, &refs, "publish", "")
            .await
            .unwrap();
        let offsets: Vec<u64> = positions.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [2, 5]);
        assert_eq!(&positions[0].epoch, epoch);

        // A batch of nothing but a duplicate stores and sends nothing.
        let only = item("a", "a3 once more", "ka", 3);
        let positions = publish(&commands, &script, &[&only], "publish", "")
            .await
            .unwrap();
        assert_eq!(positions[0].offset, 2);
        let m = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap();
        let payload: Vec<u8> = m.get_payload().unwrap();
        let sent = reply::messages(&payload).unwrap();
        assert_eq!(sent.len(), 1, "only a6 was sent since");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), stream.next())
                .await
                .is_err(),
            "the duplicate sent nothing"
        );
    }
}

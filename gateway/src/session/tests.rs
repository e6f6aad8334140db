//! The session core driven directly: commands in, packed frames out, with the memory
//! broker behind it and no socket. The last test runs the connection task over an
//! in-memory duplex stream to show it stays fair under a flood of deliveries.

use super::{Context, core::SessionCore};
use crate::{
    auth::Verifier,
    broker::{Broker, PublishRequest, memory::MemoryBroker},
    channel::ChannelName,
    channels::Channels,
    clock::Clock,
    config::{AuthConfig, Config, NamespaceOptions, Namespaces},
    hub::Hub,
    metrics::Metrics,
};
use broker_proto::{
    Batch, Encoding, Limits, decode_frames, encode_frame,
    v1::{
        ClientFrame, Ping, Publication, Publish, ServerFrame, Subscribe, Unsubscribe,
        client_frame::Command, server_frame::Body,
    },
};
use bytes::Bytes;
use std::{collections::HashMap, sync::Arc};

struct Node {
    hub: Arc<Hub>,
    broker: Arc<MemoryBroker>,
    ctx: Arc<Context>,
}

fn node(namespaces: &[(&str, NamespaceOptions)]) -> Node {
    let hub = Arc::new(Hub::new(Metrics::detached()));
    let namespaces = Namespaces::new(
        namespaces
            .iter()
            .map(|(n, o)| ((*n).to_owned(), *o))
            .collect::<HashMap<_, _>>(),
    );
    let broker = Arc::new(MemoryBroker::new(
        hub.clone(),
        namespaces.clone(),
        Clock::system(),
    ));
    let channels = Arc::new(Channels::new(
        namespaces,
        broker.clone() as Arc<dyn Broker>,
        Metrics::detached(),
        hub.clone(),
        Config::default().blobs,
        Config::default().reads,
    ));
    let mut config = Config::default().session;
    config.commands_per_second = 1_000_000;
    config.command_burst = 1_000_000;
    let ctx = Arc::new(Context::new(
        hub.clone(),
        channels,
        Arc::new(Verifier::new(&AuthConfig::default()).unwrap()),
        Clock::system(),
        config,
        "test".into(),
        Arc::new(crate::rpc::RpcClient::new(Config::default().rpc)),
        crate::blobs::upload::Budget::new(1 << 20),
        0,
    ));
    Node { hub, broker, ctx }
}

fn session(node: &Node) -> SessionCore {
    let core = SessionCore::new(
        node.ctx.clone(),
        Encoding::Proto,
        None,
        node.ctx.clock.now(),
    );
    core.register();
    core
}

fn frame(id: u32, command: Command) -> ClientFrame {
    ClientFrame {
        id,
        command: Some(command),
    }
}

fn subscribe(channel: &str) -> Command {
    Command::Subscribe(Subscribe {
        channel: channel.into(),
        ..Default::default()
    })
}

fn recover(channel: &str, offset: u64, epoch: &str) -> Command {
    Command::Subscribe(Subscribe {
        channel: channel.into(),
        recover: true,
        offset,
        epoch: epoch.into(),
        ..Default::default()
    })
}

fn publish(channel: &str, data: &'static str) -> Command {
    Command::Publish(Publish {
        channel: channel.into(),
        data: Bytes::from_static(data.as_bytes()),
        ..Default::default()
    })
}

/// Sends `frames` as one message and returns every frame the session then writes.
async fn exchange(core: &mut SessionCore, frames: &[ClientFrame]) -> Vec<ServerFrame> {
    let mut batch = Batch::new(Encoding::Proto, 64);
    for f in frames {
        batch.push(&encode_frame(Encoding::Proto, f));
    }
    assert_eq!(core.on_payload(batch.take()).await, None);
    output(core)
}

fn output(core: &mut SessionCore) -> Vec<ServerFrame> {
    let mut messages = Vec::new();
    assert_eq!(core.take_output(&mut messages), None);
    let limits = Limits {
        max_frames_per_message: 1 << 20,
        max_frame_bytes: 1 << 30,
    };
    messages
        .into_iter()
        .flat_map(|m| decode_frames::<ServerFrame>(Encoding::Proto, m, &limits).unwrap())
        .collect()
}

fn publications(frames: &[ServerFrame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Some(Body::Publication(p)) if f.id == 0 => Some(p.offset),
            _ => None,
        })
        .collect()
}

async fn publish_direct(node: &Node, channel: &str, n: usize) {
    let ch = ChannelName::parse(channel).unwrap();
    let options = node.ctx.channels.namespaces().options(&ch);
    for _ in 0..n {
        node.broker
            .publish(&ch, &options, PublishRequest::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_recovery_reply_and_live_publications_merge_without_loss_or_duplicates() {
    let node = node(&[]);
    let mut a = session(&node);
    let out = exchange(&mut a, &[frame(1, subscribe("room"))]).await;
    let Some(Body::Subscribe(s)) = &out[0].body else {
        panic!("{out:?}")
    };
    let epoch = s.epoch.clone();
    publish_direct(&node, "room", 3).await;
    assert_eq!(publications(&output(&mut a)), vec![1, 2, 3]);

    // b recovers from 1 while 2 and 3 are also queued live for it (the race the rule
    // exists for: they were delivered between b joining the hub and reading history).
    let mut b = session(&node);
    let out = exchange(&mut b, &[frame(1, recover("room", 1, &epoch))]).await;
    let Some(Body::Subscribe(r)) = &out[0].body else {
        panic!()
    };
    assert!(r.recovered);
    let recovered: Vec<u64> = r.publications.iter().map(|p| p.offset).collect();
    assert_eq!(recovered, vec![2, 3]);
    for offset in [2, 3, 4] {
        node.hub.deliver(Publication {
            channel: "room".into(),
            offset,
            epoch: epoch.clone(),
            ..Default::default()
        });
    }
    assert_eq!(
        publications(&output(&mut b)),
        vec![4],
        "2 and 3 came in the reply"
    );
}

/// The reproduced defect: a recovery of more than 10,000 publications was cut at 10,000,
/// reported as complete, and the rest were never delivered.
#[tokio::test]
async fn a_recovery_returns_everything_the_namespace_retains() {
    let big = NamespaceOptions {
        history_size: 20_000,
        ..Default::default()
    };
    let node = node(&[("big", big)]);
    let mut a = session(&node);
    let out = exchange(&mut a, &[frame(1, subscribe("big:log"))]).await;
    let Some(Body::Subscribe(s)) = &out[0].body else {
        panic!()
    };
    let epoch = s.epoch.clone();
    publish_direct(&node, "big:log", 12_000).await;
    let mut b = session(&node);
    let out = exchange(&mut b, &[frame(1, recover("big:log", 0, &epoch))]).await;
    let Some(Body::Subscribe(r)) = &out[0].body else {
        panic!()
    };
    assert!(r.recovered);
    assert_eq!(r.publications.len(), 12_000);
    assert_eq!(r.publications.last().unwrap().offset, 12_000);
    publish_direct(&node, "big:log", 1).await;
    assert_eq!(publications(&output(&mut b)), vec![12_001]);
}

#[tokio::test]
async fn commands_with_id_zero_get_no_reply() {
    let node = node(&[]);
    let mut c = session(&node);
    let out = exchange(
        &mut c,
        &[
            frame(0, Command::Ping(Ping {})),
            frame(0, subscribe("bad name")),
            frame(7, Command::Ping(Ping {})),
        ],
    )
    .await;
    let ids: Vec<u32> = out.iter().map(|f| f.id).collect();
    assert_eq!(ids, vec![7]);
}

/// The reproduced defect: in a channel without history, [publish, unsubscribe, subscribe]
/// delivered the pre-unsubscribe publication after the new subscribe reply.
#[tokio::test]
async fn an_unsubscribe_ends_delivery_of_what_was_queued_before_it() {
    let nohist = NamespaceOptions {
        history_size: 0,
        presence: false,
        ..Default::default()
    };
    let node = node(&[("nohist", nohist)]);
    let mut c = session(&node);
    exchange(&mut c, &[frame(1, subscribe("nohist:x"))]).await;
    let out = exchange(
        &mut c,
        &[
            frame(2, publish("nohist:x", "before")),
            frame(
                3,
                Command::Unsubscribe(Unsubscribe {
                    channel: "nohist:x".into(),
                }),
            ),
            frame(4, subscribe("nohist:x")),
        ],
    )
    .await;
    let ids: Vec<u32> = out.iter().map(|f| f.id).collect();
    assert_eq!(ids, vec![2, 3, 4], "three replies and no stale publication");
    exchange(&mut c, &[frame(5, publish("nohist:x", "after"))]).await;
    let out = output(&mut c);
    assert!(out.is_empty());
    publish_direct(&node, "nohist:x", 1).await;
    assert_eq!(publications(&output(&mut c)), vec![0]);
}

#[tokio::test]
async fn a_reset_reaches_the_client_and_the_new_stream_follows_from_its_start() {
    let node = node(&[]);
    let mut c = session(&node);
    exchange(&mut c, &[frame(1, subscribe("room"))]).await;
    publish_direct(&node, "room", 2).await;
    assert_eq!(publications(&output(&mut c)), vec![1, 2]);
    node.hub.reset("room", "fresh");
    for offset in [1, 2] {
        node.hub.deliver(Publication {
            channel: "room".into(),
            offset,
            epoch: "fresh".into(),
            ..Default::default()
        });
    }
    let out = output(&mut c);
    match &out[0].body {
        Some(Body::Reset(r)) => {
            assert_eq!((r.channel.as_str(), r.epoch.as_str()), ("room", "fresh"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(publications(&out), vec![1, 2]);
}

/// A stream that queues one more delivery for the session every time the session writes,
/// so the session's outbox is never empty when it looks: the worst case for fairness.
struct Flooding<S> {
    inner: S,
    hub: Arc<Hub>,
    epoch: String,
    offset: u64,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Flooding<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Flooding<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if written.is_ready() {
            self.offset += 1;
            let offset = self.offset;
            let epoch = self.epoch.clone();
            self.hub.deliver(Publication {
                channel: "flood".into(),
                offset,
                epoch,
                ..Default::default()
            });
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A client's commands are served while deliveries never stop coming: the connection
/// task takes turns between the client and the outbox. (Serving the outbox first, as the
/// session once did, never reads the ping here.)
#[tokio::test]
async fn a_flood_of_deliveries_does_not_hold_up_a_clients_commands() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::{WebSocketStream, tungstenite::Message, tungstenite::protocol::Role};

    let node = node(&[]);
    let (server_io, client_io) = tokio::io::duplex(1 << 16);
    let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    let send = |f: ClientFrame| Message::Binary(encode_frame(Encoding::Proto, &f));
    // Both commands wait in the socket before the session starts.
    client
        .send(send(frame(1, subscribe("flood"))))
        .await
        .unwrap();
    client
        .send(send(frame(2, Command::Ping(Ping {}))))
        .await
        .unwrap();
    let ctx = node.ctx.clone();
    let flood = ChannelName::parse("flood").unwrap();
    let io = Flooding {
        inner: server_io,
        hub: node.hub.clone(),
        epoch: node.broker.position(&flood).await.unwrap().epoch,
        offset: 0,
    };
    tokio::spawn(async move {
        let ws = crate::ws::WebSocket::new(io, &[], 1 << 20, 4096);
        let params = super::Params {
            encoding: Encoding::Proto,
            token: None,
            reject: None,
            peer: std::net::Ipv4Addr::LOCALHOST.into(),
            fd: None,
            slots: (None, None),
        };
        super::run(ctx, ws, params, &Metrics::detached()).await;
    });
    let limits = Limits {
        max_frames_per_message: 1 << 20,
        max_frame_bytes: 1 << 20,
    };
    let mut messages = 0;
    let answered = loop {
        let Some(Ok(Message::Binary(b))) = client.next().await else {
            panic!("connection ended")
        };
        messages += 1;
        let frames: Vec<ServerFrame> = decode_frames(Encoding::Proto, b, &limits).unwrap();
        if frames.iter().any(|f| f.id == 2) {
            break true;
        }
        if messages > 1_000 {
            break false;
        }
    };
    assert!(answered, "the ping was not answered within 1,000 messages");
    assert!(messages <= 8, "answered only after {messages} messages");
}

/// What an idle connection costs in the task that serves it (printed; the budget is
/// checked by `loadtest/memory.sh`): the session future and the types inside it.
#[tokio::test]
async fn session_sizes() {
    let node = node(&[]);
    let (server_io, _client_io) = tokio::io::duplex(64);
    let ws = crate::ws::WebSocket::new(server_io, &[], 1 << 20, 4096);
    let params = super::Params {
        encoding: Encoding::Proto,
        token: None,
        reject: None,
        peer: std::net::Ipv4Addr::LOCALHOST.into(),
        fd: None,
        slots: (None, None),
    };
    let metrics = Metrics::detached();
    {
        let (io, _c) = tokio::io::duplex(64);
        let mut ws = crate::ws::WebSocket::new(io, &[], 1 << 20, 4096);
        let mut core = session(&node);
        let serve = super::connection::serve(&mut core, &mut ws, &metrics);
        let verify = node.ctx.verifier.verify("x");
        println!(
            "serve future {} B, verify future {} B",
            std::mem::size_of_val(&serve),
            std::mem::size_of_val(&verify)
        );
    }
    let run = super::run(node.ctx.clone(), ws, params, &metrics);
    println!(
        "run future {} B, SessionCore {} B, WebSocket<TcpStream> {} B",
        std::mem::size_of_val(&run),
        std::mem::size_of::<SessionCore>(),
        std::mem::size_of::<crate::ws::WebSocket<tokio::net::TcpStream>>(),
    );
    println!(
        "Sleep {} Notified {} Identity {} Subscriptions {} Batch {} TokenBucket {} ByteBucket {} Decoder {} OptUserSlot {} Limits {} VecDeque {}",
        std::mem::size_of::<tokio::time::Sleep>(),
        std::mem::size_of::<tokio::sync::futures::Notified<'static>>(),
        std::mem::size_of::<Option<crate::auth::Identity>>(),
        std::mem::size_of::<super::subscriptions::Subscriptions>(),
        std::mem::size_of::<broker_proto::Batch>(),
        std::mem::size_of::<super::rate::TokenBucket>(),
        std::mem::size_of::<super::rate::ByteBucket>(),
        std::mem::size_of::<crate::ws::decode::Decoder>(),
        std::mem::size_of::<Option<crate::peers::UserSlot>>(),
        std::mem::size_of::<broker_proto::Limits>(),
        std::mem::size_of::<std::collections::VecDeque<u8>>(),
    );
    println!(
        "Outbox {} B",
        std::mem::size_of::<crate::hub::outbox::Outbox>(),
    );
}

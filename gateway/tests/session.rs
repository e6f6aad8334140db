//! End-to-end tests of the WebSocket protocol against the real binary: every command in
//! both encodings, the error codes a client can trigger, the close codes that apply to one
//! node, and recovery. After every bad input a control client checks the node still serves.

mod common;

use broker_proto::{
    Encoding,
    v1::{
        ClientFrame, Connect, HistoryRequest, PresenceRequest, Publish, ServerFrame, Unsubscribe,
        client_frame::Command, server_frame::Body,
    },
};
use common::*;
use futures_util::SinkExt;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const CONFIG: &str = r#"
[limits]
max_channels_per_connection = 3
[namespaces.chat]
join_leave = true
[namespaces.feed]
allow_publish = false
[namespaces.small]
max_message_bytes = 16
[namespaces.nohist]
history_size = 0
presence = false
[namespaces.slow]
write_delay_ms = 300
"#;

async fn connect(c: &mut Client) -> String {
    match ok(c.call(Command::Connect(Connect::default())).await) {
        Body::Connect(r) => r.client,
        other => panic!("{other:?}"),
    }
}

fn publication(body: Body) -> broker_proto::v1::Publication {
    match body {
        Body::Publication(p) => p,
        other => panic!("expected a publication, got {other:?}"),
    }
}

#[tokio::test]
async fn every_command_in_both_encodings() {
    let server = Server::start(CONFIG);
    for encoding in [Encoding::Proto, Encoding::Json] {
        let channel = format!("chat:room-{encoding:?}");
        let mut alice = server.client(encoding).await;
        let mut bob = server.client(Encoding::Proto).await;

        let Body::Connect(c) = ok(alice.call(Command::Connect(Connect::default())).await) else {
            panic!()
        };
        assert_eq!(c.node, "test-node");
        assert!(c.ping_interval_ms > 0 && c.max_message_bytes > 0 && !c.client.is_empty());
        let bob_id = connect(&mut bob).await;
        assert_ne!(c.client, bob_id);
        assert!(matches!(
            ok(alice.call(Command::Ping(Default::default())).await),
            Body::Pong(_)
        ));

        let Body::Subscribe(s) = ok(alice.call(subscribe(&channel)).await) else {
            panic!()
        };
        assert!(s.recoverable && !s.epoch.is_empty());
        assert_eq!(s.offset, 0);
        ok(bob.call(subscribe(&channel)).await);
        // chat has join_leave: alice sees her own join, then bob's.
        match alice.push().await {
            Body::Join(j) => assert_eq!(j.info.unwrap().client, c.client),
            other => panic!("{other:?}"),
        }
        match alice.push().await {
            Body::Join(j) => assert_eq!(j.info.unwrap().client, bob_id),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(bob.push().await, Body::Join(_)),
            "bob sees his own join"
        );

        // A publish reaches every subscriber, the publisher too, as raw bytes.
        let data: &[u8] = b"\x00\x01binary\xff";
        let reply = bob
            .call(Command::Publish(Publish {
                channel: channel.clone(),
                data: data.to_vec().into(),
                content_type: "application/octet-stream".into(),
                idempotency_key: String::new(),
                blobs: Vec::new(),
            }))
            .await;
        let Body::Publish(p) = ok(reply) else {
            panic!()
        };
        assert_eq!((p.offset, p.epoch.as_str()), (1, s.epoch.as_str()));
        for client in [&mut alice, &mut bob] {
            let pb = publication(client.push().await);
            assert_eq!(
                (&pb.data[..], pb.offset, pb.channel.as_str()),
                (data, 1, channel.as_str())
            );
            assert_eq!(pb.content_type, "application/octet-stream");
            assert_eq!(pb.info.unwrap().client, bob_id);
            assert!(pb.time_unix_ms > 1_600_000_000_000);
        }

        let Body::Presence(pr) = ok(alice
            .call(Command::Presence(PresenceRequest {
                channel: channel.clone(),
            }))
            .await)
        else {
            panic!()
        };
        assert_eq!(pr.clients.len(), 2);

        ok(bob.call(publish(&channel, "second")).await);
        assert_eq!(publication(alice.push().await).offset, 2);
        let history = HistoryRequest {
            channel: channel.clone(),
            since_offset: 1,
            limit: 10,
        };
        let Body::History(h) = ok(alice.call(Command::History(history)).await) else {
            panic!()
        };
        assert_eq!((h.offset, h.epoch.as_str()), (2, s.epoch.as_str()));
        assert_eq!(
            h.publications.iter().map(|p| p.offset).collect::<Vec<_>>(),
            vec![2]
        );

        // After unsubscribing alice gets nothing more; bob sees her leave.
        ok(alice
            .call(Command::Unsubscribe(Unsubscribe {
                channel: channel.clone(),
            }))
            .await);
        assert_eq!(publication(bob.push().await).offset, 2);
        assert!(matches!(bob.push().await, Body::Leave(_)));
        ok(bob.call(publish(&channel, "third")).await);
        assert_eq!(publication(bob.push().await).offset, 3);
        alice.quiet_for(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn batched_frames_get_replies_in_order() {
    let server = Server::start(CONFIG);
    for encoding in [Encoding::Proto, Encoding::Json] {
        let mut c = server.client(encoding).await;
        let frames: Vec<ClientFrame> = (1..=5)
            .map(|id| ClientFrame {
                id,
                command: Some(publish("batch", format!("m{id}"))),
            })
            .chain(std::iter::once(ClientFrame {
                id: 6,
                command: Some(Command::Ping(Default::default())),
            }))
            .collect();
        c.send_frames(&frames).await;
        for id in 1..=6 {
            let f = c.next().await;
            assert_eq!(f.id, id);
            assert!(f.error.is_none());
        }
    }
}

#[tokio::test]
async fn the_same_user_on_two_connections_gets_both_copies() {
    let server = Server::start(CONFIG);
    let mut a1 = server.client(Encoding::Proto).await;
    let mut a2 = server.client(Encoding::Json).await;
    ok(a1.call(subscribe("shared")).await);
    ok(a2.call(subscribe("shared")).await);
    ok(a1.call(publish("shared", "x")).await);
    assert_eq!(&publication(a1.push().await).data[..], b"x");
    assert_eq!(&publication(a2.push().await).data[..], b"x");
}

#[tokio::test]
async fn error_codes_a_client_can_trigger() {
    let server = Server::start(CONFIG);
    for encoding in [Encoding::Proto, Encoding::Json] {
        let mut c = server.client(encoding).await;
        let cases: Vec<(Command, u32)> = vec![
            (subscribe("bad name"), 102),
            (subscribe(""), 102),
            (subscribe("nope:room"), 102),
            (publish("feed:news", "x"), 103),
            (subscribe("chat:#alice"), 103),
            (publish("small:x", "this is more than sixteen bytes"), 110),
            (
                Command::Presence(PresenceRequest {
                    channel: "nohist:x".into(),
                }),
                103,
            ),
            (
                Command::History(HistoryRequest {
                    channel: "nohist:x".into(),
                    ..Default::default()
                }),
                103,
            ),
        ];
        for (command, code) in cases {
            let reply = c.call(command.clone()).await;
            assert_eq!(error_code(&reply), Some(code), "{command:?}");
            let e = reply.error.unwrap();
            assert!(!e.message.is_empty() && !e.temporary);
            assert!(reply.body.is_none());
        }
        // A frame without a command: 104.
        c.send_frames(&[ClientFrame {
            id: 77,
            command: None,
        }])
        .await;
        let f = c.next().await;
        assert_eq!((f.id, error_code(&f)), (77, Some(104)));
        // Already subscribed: 105; over the channel limit (3): 106.
        ok(c.call(subscribe("a")).await);
        assert_eq!(error_code(&c.call(subscribe("a")).await), Some(105));
        ok(c.call(subscribe("b")).await);
        ok(c.call(subscribe("c")).await);
        assert_eq!(error_code(&c.call(subscribe("d")).await), Some(106));
        // Connect twice: 104.
        connect(&mut c).await;
        assert_eq!(
            error_code(&c.call(Command::Connect(Connect::default())).await),
            Some(104)
        );
        assert!(matches!(
            ok(c.call(Command::Ping(Default::default())).await),
            Body::Pong(_)
        ));
    }
    assert_node_serves(&server).await;
}

#[tokio::test]
async fn channels_without_history_have_no_offsets() {
    let server = Server::start(CONFIG);
    let mut c = server.client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(c.call(subscribe("nohist:x")).await) else {
        panic!()
    };
    assert!(!s.recoverable);
    let Body::Publish(p) = ok(c.call(publish("nohist:x", "a")).await) else {
        panic!()
    };
    assert_eq!((p.offset, p.epoch.as_str()), (0, ""));
    assert_eq!(publication(c.push().await).offset, 0);
}

#[tokio::test]
async fn recovery_after_reconnect_loses_and_duplicates_nothing() {
    let server = Server::start(CONFIG);
    for encoding in [Encoding::Proto, Encoding::Json] {
        let channel = format!("rec-{encoding:?}");
        let mut publisher = server.client(Encoding::Proto).await;
        let mut c = server.client(encoding).await;
        let Body::Subscribe(s) = ok(c.call(subscribe(&channel)).await) else {
            panic!()
        };
        for i in 1..=3 {
            ok(publisher.call(publish(&channel, format!("m{i}"))).await);
        }
        let mut last = 0;
        for _ in 0..3 {
            last = publication(c.push().await).offset;
        }
        assert_eq!(last, 3);
        drop(c);
        for i in 4..=8 {
            ok(publisher.call(publish(&channel, format!("m{i}"))).await);
        }
        let mut c = server.client(encoding).await;
        let Body::Subscribe(r) = ok(c.call(recover(&channel, last, &s.epoch)).await) else {
            panic!()
        };
        assert!(r.recovered && r.recoverable);
        assert_eq!(r.offset, 8);
        let offsets: Vec<u64> = r.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, vec![4, 5, 6, 7, 8]);
        assert_eq!(&r.publications[0].data[..], b"m4");
        // Live delivery continues right after the recovered set, without duplicates.
        ok(publisher.call(publish(&channel, "m9")).await);
        assert_eq!(publication(c.push().await).offset, 9);
        c.quiet_for(Duration::from_millis(100)).await;

        // A wrong epoch cannot be recovered: the client is told to reload.
        let mut c2 = server.client(encoding).await;
        let Body::Subscribe(r) = ok(c2.call(recover(&channel, 3, "other-epoch")).await) else {
            panic!()
        };
        assert!(!r.recovered && r.publications.is_empty());
        assert_eq!((r.offset, r.epoch.as_str()), (9, s.epoch.as_str()));
    }
}

#[tokio::test]
async fn recovery_fails_honestly_when_history_was_trimmed() {
    let server = Server::start("[namespaces.tiny]\nhistory_size = 2\n");
    let mut p = server.client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(p.call(subscribe("tiny:x")).await) else {
        panic!()
    };
    for i in 0..5 {
        ok(p.call(publish("tiny:x", format!("{i}"))).await);
    }
    let mut c = server.client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(c.call(recover("tiny:x", 1, &s.epoch)).await) else {
        panic!()
    };
    assert!(!r.recovered, "offsets 2 and 3 are gone");
    let mut c = server.client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(c.call(recover("tiny:x", 3, &s.epoch)).await) else {
        panic!()
    };
    assert!(r.recovered);
    assert_eq!(r.publications.len(), 2);
}

#[tokio::test]
async fn idempotent_publish_is_delivered_once() {
    let server = Server::start(CONFIG);
    let mut c = server.client(Encoding::Proto).await;
    ok(c.call(subscribe("idem")).await);
    let frame = || {
        Command::Publish(Publish {
            channel: "idem".into(),
            data: "x".into(),
            idempotency_key: "k1".into(),
            ..Default::default()
        })
    };
    let Body::Publish(first) = ok(c.call(frame()).await) else {
        panic!()
    };
    let Body::Publish(again) = ok(c.call(frame()).await) else {
        panic!()
    };
    assert_eq!(first, again);
    assert_eq!(publication(c.push().await).offset, first.offset);
    c.quiet_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn bad_frames_close_with_the_documented_code() {
    let server = Server::start("[limits]\nmax_message_bytes = 4096\n");
    // Text in proto mode, binary in JSON mode: 1003.
    let mut c = server.client(Encoding::Proto).await;
    c.ws.send(Message::Text("{}".into())).await.unwrap();
    expect_close(&mut c, 1003).await;
    let mut c = server.client(Encoding::Json).await;
    c.ws.send(Message::Binary(vec![0u8, 1].into()))
        .await
        .unwrap();
    expect_close(&mut c, 1003).await;
    // Frames that do not decode: 1007.
    for (encoding, msg) in [
        (
            Encoding::Proto,
            Message::Binary(vec![5u8, 0xff, 0xff].into()),
        ),
        (Encoding::Proto, Message::Binary(vec![0xffu8; 12].into())),
        (Encoding::Json, Message::Text("{\"id\": \"nope\"".into())),
        (
            Encoding::Json,
            Message::Text("{\"subscribe\": {\"channel\": 5}}".into()),
        ),
    ] {
        let mut c = server.client(encoding).await;
        c.ws.send(msg).await.unwrap();
        expect_close(&mut c, 1007).await;
    }
    // A message over max_message_bytes: 1009.
    for encoding in [Encoding::Proto, Encoding::Json] {
        let mut c = server.client(encoding).await;
        let big = "x".repeat(5000);
        c.send_frames(&[ClientFrame {
            id: 1,
            command: Some(publish("a", big)),
        }])
        .await;
        expect_close(&mut c, 1009).await;
    }
    assert_node_serves(&server).await;
}

#[tokio::test]
async fn protocol_violation_closes_1002() {
    let server = Server::start("");
    let mut c = server.client(Encoding::Proto).await;
    // An unfragmented continuation frame is a protocol error.
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let frame = Frame::message(vec![1u8, 2, 3], OpCode::Data(Data::Continue), true);
    c.ws.send(Message::Frame(frame)).await.unwrap();
    let closed = c.closed().await;
    assert_eq!(closed.close, Some(1002));
    assert_node_serves(&server).await;
}

#[tokio::test]
async fn over_capacity_closes_1013() {
    let server = Server::start("[limits]\nmax_connections = 2\n");
    let _a = server.client(Encoding::Proto).await;
    let mut b = server.client(Encoding::Proto).await;
    ok(b.call(Command::Ping(Default::default())).await);
    let mut c = server.client(Encoding::Proto).await;
    expect_close(&mut c, 1013).await;
    drop(b);
    // Room again once the node noticed that a connection left; until then, 1013.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let mut d = server.client(Encoding::Proto).await;
        d.send_frames(&[ClientFrame {
            id: 1,
            command: Some(Command::Ping(Default::default())),
        }])
        .await;
        match d.next_or_closed().await {
            Ok(ServerFrame {
                body: Some(Body::Pong(_)),
                ..
            }) => break,
            Ok(ServerFrame {
                body: Some(Body::Disconnect(d)),
                ..
            }) => assert_eq!(d.code, 1013),
            Ok(other) => panic!("{other:?}"),
            Err(code) => assert_eq!(code, Some(1013)),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a slot should free up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bad_origin_closes_1008() {
    let server = Server::start("allowed_origins = [\"https://good.example\"]\n");
    let url = server.ws_url("");
    let mut bad = Client::connect_with(
        &url,
        None,
        Encoding::Proto,
        &[("Origin", "https://evil.example")],
    )
    .await
    .unwrap();
    expect_close(&mut bad, 1008).await;
    let mut good = Client::connect_with(
        &url,
        None,
        Encoding::Proto,
        &[("Origin", "https://good.example")],
    )
    .await
    .unwrap();
    ok(good.call(Command::Ping(Default::default())).await);
}

#[tokio::test]
async fn format_query_selects_the_encoding_and_unknown_subprotocols_are_refused() {
    let server = Server::start("");
    let mut c = Client::connect(&server.ws_url("?format=json"), None, Encoding::Json)
        .await
        .unwrap();
    ok(c.call(Command::Ping(Default::default())).await);
    let mut c = Client::connect(&server.ws_url(""), None, Encoding::Proto)
        .await
        .unwrap();
    ok(c.call(Command::Ping(Default::default())).await);
    assert!(
        Client::connect(&server.ws_url(""), Some("mqtt"), Encoding::Proto)
            .await
            .is_err()
    );
    let (status, _) = server.http("GET", "/ws", &[], "");
    assert_eq!(status, 400, "a plain GET is not an upgrade");
}

#[tokio::test]
async fn slow_consumer_is_closed_4008_and_recovers_everything() {
    let server = Server::start(
        "[limits]\noutbound_queue_bytes = 262144\ncommands_per_second = 100000\ncommand_burst = 100000\n\
         [namespaces.big]\nhistory_size = 10000\nmax_message_bytes = 65536\n",
    );
    let channel = "big:firehose";
    let mut slow = server.client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(slow.call(subscribe(channel)).await) else {
        panic!()
    };
    let mut fast = server.client(Encoding::Proto).await;
    ok(fast.call(subscribe(channel)).await);
    let mut publisher = server.client(Encoding::Proto).await;
    // `slow` reads nothing while ~16 MiB are published: kernel buffers fill, then its queue.
    let payload = bytes::Bytes::from(vec![7u8; 8 * 1024]);
    let total = 2000u64;
    // Small rounds, so the fast subscriber (read between rounds) stays under its queue.
    const ROUND: u64 = 4;
    let mut sent = 0u64;
    let mut fast_seen = 0u64;
    while sent < total {
        let frames: Vec<ClientFrame> = (0..ROUND)
            .map(|i| ClientFrame {
                id: (sent + i + 1) as u32,
                command: Some(publish(channel, payload.clone())),
            })
            .collect();
        publisher.send_frames(&frames).await;
        for _ in 0..ROUND {
            assert!(publisher.next().await.error.is_none());
        }
        sent += ROUND;
        // The fast subscriber keeps up and is not delayed by the slow one.
        while fast_seen < sent {
            fast_seen = publication(fast.push().await).offset;
        }
    }
    // The slow client drains what reached it, then sees Disconnect 4008 and the close.
    let mut got = Vec::new();
    let mut disconnect = None;
    let close = loop {
        let f: ServerFrame = match slow.next_or_closed().await {
            Ok(f) => f,
            Err(closed) => break closed,
        };
        match f.body {
            Some(Body::Publication(p)) => got.push(p.offset),
            Some(Body::Disconnect(d)) => disconnect = Some(d.code),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((disconnect, close), (Some(4008), Some(4008)));
    assert!(
        (got.len() as u64) < total,
        "the queue overflowed before everything was delivered"
    );
    assert!(
        got.windows(2).all(|w| w[1] == w[0] + 1),
        "what arrived is in order without gaps"
    );
    let last = got.last().copied().unwrap_or(0);
    // Reconnect and recover: the rest arrives exactly once.
    let mut again = server.client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(again.call(recover(channel, last, &s.epoch)).await) else {
        panic!()
    };
    assert!(r.recovered);
    let recovered: Vec<u64> = r.publications.iter().map(|p| p.offset).collect();
    assert_eq!(recovered, ((last + 1)..=total).collect::<Vec<_>>());
    assert_node_serves(&server).await;
}

#[tokio::test]
async fn a_client_close_is_echoed_and_the_node_forgets_the_connection() {
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
    let server = Server::start("");
    let mut c = server.client(Encoding::Proto).await;
    ok(c.call(subscribe("bye")).await);
    assert_eq!(server.metric("gateway_connections"), 1.0);
    c.ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    })))
    .await
    .unwrap();
    assert_eq!(
        c.closed().await,
        Closed {
            disconnect: None,
            close: Some(1000)
        }
    );
    let deadline = std::time::Instant::now() + TIMEOUT;
    while server.metric("gateway_connections") != 0.0
        || server.metric("gateway_subscriptions") != 0.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the session should be gone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `write_delay_ms`: publications in such a namespace wait and go out together in one
/// WebSocket message; elsewhere each goes out at once, in its own message.
#[tokio::test]
async fn a_write_delay_coalesces_publications_into_one_message() {
    let server = Server::start(CONFIG);
    for (channel, delayed) in [("slow:x", true), ("x", false)] {
        let mut sub = server.client(Encoding::Proto).await;
        ok(sub.call(subscribe(channel)).await);
        let mut publisher = server.client(Encoding::Proto).await;
        let started = std::time::Instant::now();
        for i in 0..5u8 {
            ok(publisher.call(publish(channel, vec![i])).await);
        }
        let mut messages = Vec::new();
        let mut publications = 0;
        while publications < 5 {
            let msg = tokio::time::timeout(
                Duration::from_secs(5),
                futures_util::StreamExt::next(&mut sub.ws),
            )
            .await
            .expect("publications arrive")
            .expect("open")
            .expect("no error");
            let Message::Binary(payload) = msg else {
                continue;
            };
            let limits = broker_proto::Limits::default();
            let frames: Vec<ServerFrame> =
                broker_proto::decode_frames(Encoding::Proto, payload, &limits).unwrap();
            let n = frames
                .iter()
                .filter(|f| matches!(f.body, Some(Body::Publication(_))))
                .count();
            publications += n;
            messages.push((n, started.elapsed()));
        }
        if delayed {
            assert_eq!(messages.len(), 1, "{channel}: {messages:?}");
            assert!(
                messages[0].1 >= Duration::from_millis(250),
                "{channel}: {messages:?}"
            );
        } else {
            assert_eq!(messages.len(), 5, "{channel}: {messages:?}");
        }
    }
}

//! Multi-node tests against real processes: a real `redis-server` on a free port, several
//! `gateway` processes using it, and HAProxy in front where a test needs a load balancer.
//! Every scenario asserts exact offsets: nothing lost, nothing duplicated, order kept.

mod common;

use broker_proto::{
    Encoding,
    v1::{ClientFrame, Connect, Publication, client_frame::Command, server_frame::Body},
};
use common::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use std::time::{Duration, Instant};

const FAST: &str =
    "[redis]\ncommand_timeout_ms = 1000\nprobe_interval_ms = 1000\nunsubscribe_delay_ms = 500\n";

fn cluster(redis: &Redis, n: usize, config: &str) -> Vec<Server> {
    nodes_on(&redis.url(), n, config)
}

fn nodes_on(url: &str, n: usize, config: &str) -> Vec<Server> {
    (0..n)
        .map(|i| {
            let id = format!("node{i}");
            let s = Server::start_with(
                &format!("{FAST}{config}"),
                &[
                    "--redis-url",
                    url,
                    "--node-id",
                    &id,
                    "--api-key",
                    "test-key",
                ],
            );
            s.wait_ready(TIMEOUT);
            s
        })
        .collect()
}

/// Reads publications until `count` arrived; returns them in arrival order. Presence
/// pushes and stream resets (tests that expect one read it with `push`) are skipped.
async fn collect(c: &mut Client, count: usize) -> Vec<Publication> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        match c.push().await {
            Body::Publication(p) => out.push(p),
            Body::Join(_) | Body::Leave(_) | Body::Reset(_) => {}
            other => panic!("{other:?}"),
        }
    }
    out
}

fn offsets(ps: &[Publication]) -> Vec<u64> {
    ps.iter().map(|p| p.offset).collect()
}

/// Publishes through the HTTP API, retrying while the node reports Redis unavailable.
fn api_publish(node: &Server, channel: &str, data: &str) -> (u64, String) {
    api_publish_at(node.addr, channel, data)
}

fn api_publish_at(addr: std::net::SocketAddr, channel: &str, data: &str) -> (u64, String) {
    let body = format!(r#"{{"channel":"{channel}","data":"{}"}}"#, b64(data));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, reply) = api_at(addr, "POST", "/api/v1/publish", &body);
        if status == 200 {
            let offset = reply["offset"].as_str().unwrap().parse().unwrap();
            return (offset, reply["epoch"].as_str().unwrap().to_owned());
        }
        assert_eq!(reply["error"]["code"], 108, "{reply}");
        assert!(Instant::now() < deadline, "publish kept failing: {reply}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn cross_node_fanout_in_both_encodings() {
    let redis = Redis::start(false);
    let nodes = cluster(&redis, 3, "");
    let mut subs = Vec::new();
    for node in &nodes {
        for encoding in [Encoding::Proto, Encoding::Json] {
            let mut c = node.client(encoding).await;
            ok(c.call(subscribe("room")).await);
            subs.push(c);
        }
    }
    let mut publisher = nodes[0].client(Encoding::Proto).await;
    for i in 1..=5 {
        ok(publisher
            .call(publish("room", vec![0u8, i as u8, 0xff]))
            .await);
    }
    for c in &mut subs {
        let got = collect(c, 5).await;
        assert_eq!(offsets(&got), vec![1, 2, 3, 4, 5]);
        assert_eq!(
            &got[2].data[..],
            &[0u8, 3, 0xff],
            "binary data survives both encodings"
        );
        c.quiet_for(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn order_is_kept_under_concurrent_publishers_on_different_nodes() {
    let redis = Redis::start(false);
    let nodes = cluster(
        &redis,
        3,
        "[limits]\ncommands_per_second = 100000\ncommand_burst = 100000\n",
    );
    let mut subs = Vec::new();
    for node in &nodes {
        let mut c = node.client(Encoding::Proto).await;
        ok(c.call(subscribe("ordered")).await);
        subs.push(c);
    }
    const PER: u32 = 150;
    let mut tasks = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        let mut p = node.client(Encoding::Proto).await;
        tasks.push(tokio::spawn(async move {
            for batch in 0..(PER / 10) {
                let frames: Vec<ClientFrame> = (0..10)
                    .map(|j| {
                        let i = batch * 10 + j;
                        ClientFrame {
                            id: i + 1,
                            command: Some(publish("ordered", format!("{k}-{i:04}"))),
                        }
                    })
                    .collect();
                p.send_frames(&frames).await;
                for _ in 0..10 {
                    assert!(p.next().await.error.is_none());
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = 3 * PER as usize;
    let mut sequences = Vec::new();
    for c in &mut subs {
        let got = collect(c, total).await;
        assert_eq!(offsets(&got), (1..=total as u64).collect::<Vec<_>>());
        let data: Vec<String> = got
            .iter()
            .map(|p| String::from_utf8(p.data.to_vec()).unwrap())
            .collect();
        for k in 0..3 {
            let mine: Vec<&String> = data
                .iter()
                .filter(|d| d.starts_with(&format!("{k}-")))
                .collect();
            assert_eq!(mine.len(), PER as usize);
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "publisher {k}'s order is kept"
            );
        }
        sequences.push(data);
    }
    assert!(
        sequences.windows(2).all(|w| w[0] == w[1]),
        "every node delivers the same order"
    );
}

/// A client sending publishes back to back has several in flight at once (the session
/// pipelines them into the node's batched script calls), yet each channel keeps the
/// client's order, a history read sent right after them sees all of them, and the node
/// made fewer script calls than publications.
#[tokio::test]
async fn pipelined_publishes_keep_order_and_read_your_writes() {
    let redis = Redis::start(false);
    let nodes = cluster(
        &redis,
        2,
        "[limits]\ncommands_per_second = 100000\ncommand_burst = 100000\n",
    );
    let mut sub = nodes[1].client(Encoding::Proto).await;
    ok(sub.call(subscribe("pipe-a")).await);
    ok(sub.call(subscribe("pipe-b")).await);
    let mut p = nodes[0].client(Encoding::Proto).await;
    const PER: u32 = 90;
    // Rounds of 20 publishes (fewer than a session has in flight) each followed by a
    // history read of pipe-a, all sent without waiting.
    const ROUND: u32 = 20;
    let mut frames = Vec::new();
    let mut histories = std::collections::HashMap::new();
    let mut next_id = 1;
    for i in 0..2 * PER {
        frames.push(ClientFrame {
            id: next_id,
            command: Some(publish(
                if i % 2 == 0 { "pipe-a" } else { "pipe-b" },
                format!("{i:04}"),
            )),
        });
        next_id += 1;
        if (i + 1) % ROUND == 0 {
            histories.insert(next_id, i.div_ceil(2));
            frames.push(ClientFrame {
                id: next_id,
                command: Some(Command::History(broker_proto::v1::HistoryRequest {
                    channel: "pipe-a".into(),
                    since_offset: 0,
                    limit: 0,
                })),
            });
            next_id += 1;
        }
    }
    for message in frames.chunks(16) {
        p.send_frames(message).await;
    }
    let mut offsets_by_channel: [Vec<(u32, u64)>; 2] = Default::default();
    let mut seen = 0;
    while seen < frames.len() {
        let f = p.next().await;
        assert!(f.error.is_none(), "{f:?}");
        seen += 1;
        match f.body {
            Some(Body::Publish(r)) => {
                let i = match &frames[f.id as usize - 1].command {
                    Some(Command::Publish(p)) => usize::from(p.channel == "pipe-b"),
                    other => panic!("{other:?}"),
                };
                offsets_by_channel[i].push((f.id, r.offset));
            }
            Some(Body::History(h)) => assert_eq!(
                h.publications.len() as u32,
                histories[&f.id],
                "history {} ran after every publish before it",
                f.id
            ),
            other => panic!("{other:?}"),
        }
    }
    for (i, mut replies) in offsets_by_channel.into_iter().enumerate() {
        replies.sort();
        let offsets: Vec<u64> = replies.into_iter().map(|(_, o)| o).collect();
        assert_eq!(offsets, (1..=PER as u64).collect::<Vec<_>>(), "channel {i}");
    }
    let got = collect(&mut sub, 2 * PER as usize).await;
    for channel in ["pipe-a", "pipe-b"] {
        let data: Vec<String> = got
            .iter()
            .filter(|p| p.channel == channel)
            .map(|p| String::from_utf8(p.data.to_vec()).unwrap())
            .collect();
        assert_eq!(data.len(), PER as usize);
        assert!(data.windows(2).all(|w| w[0] < w[1]), "{channel} in order");
        let offsets: Vec<u64> = got
            .iter()
            .filter(|p| p.channel == channel)
            .map(|p| p.offset)
            .collect();
        assert_eq!(offsets, (1..=PER as u64).collect::<Vec<_>>());
    }
    // The same idempotency key twice in one pipeline: stored once, both answered with
    // its position.
    let keyed = |id: u32, key: &str| ClientFrame {
        id,
        command: Some(Command::Publish(broker_proto::v1::Publish {
            channel: "pipe-a".into(),
            data: format!("keyed-{id}").into_bytes().into(),
            idempotency_key: key.into(),
            ..Default::default()
        })),
    };
    p.send_frames(&[keyed(1001, "k"), keyed(1002, "k"), keyed(1003, "")])
        .await;
    let mut replies = std::collections::BTreeMap::new();
    while replies.len() < 3 {
        let f = p.next().await;
        let Some(Body::Publish(r)) = f.body else {
            panic!("{f:?}")
        };
        replies.insert(f.id, r.offset);
    }
    let next = u64::from(PER) + 1;
    assert_eq!(
        replies.into_values().collect::<Vec<_>>(),
        [next, next, next + 1]
    );
    let got = collect(&mut sub, 2).await;
    assert_eq!(offsets(&got), [next, next + 1]);
    assert_eq!(&got[0].data[..], b"keyed-1001");
    sub.quiet_for(Duration::from_millis(200)).await;
    let calls = nodes[0].metric("gateway_broker_publish_batch_size_count");
    let published = nodes[0].metric("gateway_broker_publish_batch_size_sum");
    assert_eq!(published, f64::from(2 * PER + 3));
    assert!(
        calls < published,
        "{calls} script calls for {published} publications: nothing was batched"
    );
}

/// A broadcast through Redis publishes its channels in a few batched script calls, each
/// channel on its own: the bad name fails alone, the others reach another node's
/// subscribers.
#[tokio::test]
async fn a_broadcast_is_published_in_batches() {
    let redis = Redis::start(false);
    let nodes = cluster(&redis, 2, "");
    let mut sub = nodes[1].client(Encoding::Proto).await;
    ok(sub.call(subscribe("wide-7")).await);
    ok(sub.call(subscribe("wide-150")).await);
    let mut names: Vec<String> = (0..200).map(|i| format!("wide-{i}")).collect();
    names.insert(100, "bad channel".into());
    let body = serde_json::json!({ "channels": names, "data": b64("all") }).to_string();
    let (status, reply) = nodes[0].api("POST", "/api/v1/broadcast", &body);
    assert_eq!(status, 200, "{reply}");
    let responses = reply["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 201);
    for (name, r) in names.iter().zip(responses) {
        assert_eq!(r["channel"], name.as_str());
        if name == "bad channel" {
            assert_eq!(r["error"]["code"], 102, "{r}");
        } else {
            assert_eq!(r["offset"], "1", "{r}");
        }
    }
    let got = collect(&mut sub, 2).await;
    let mut channels: Vec<&str> = got.iter().map(|p| p.channel.as_str()).collect();
    channels.sort();
    assert_eq!(channels, ["wide-150", "wide-7"]);
    let calls = nodes[0].metric("gateway_broker_publish_batch_size_count");
    assert!(calls <= 20.0, "{calls} script calls for 200 publications");
}

#[tokio::test]
async fn killed_node_client_reconnects_through_haproxy_and_recovers_exactly() {
    let redis = Redis::start(false);
    let mut nodes = cluster(&redis, 3, "");
    let lb = Haproxy::start(&nodes.iter().map(|n| n.addr).collect::<Vec<_>>());
    let mut c = Client::connect(
        &lb.ws_url(),
        Some(Encoding::PROTO_SUBPROTOCOL),
        Encoding::Proto,
    )
    .await
    .unwrap();
    let Body::Connect(info) = ok(c.call(Command::Connect(Connect::default())).await) else {
        panic!()
    };
    let victim: usize = info.node.trim_start_matches("node").parse().unwrap();
    let other = (victim + 1) % 3;
    let Body::Subscribe(s) = ok(c.call(subscribe("room")).await) else {
        panic!()
    };
    for i in 1..=10 {
        api_publish(&nodes[other], "room", &format!("m{i}"));
    }
    let got = collect(&mut c, 10).await;
    let last = got.last().unwrap().offset;
    assert_eq!(last, 10);

    nodes[victim].kill9();
    for i in 11..=20 {
        api_publish(&nodes[other], "room", &format!("m{i}"));
    }
    let closed = c.closed().await;
    assert_eq!(closed.disconnect, None, "a killed node says nothing");

    // Reconnect through the load balancer; it must route around the dead node.
    let deadline = Instant::now() + TIMEOUT;
    let mut c = loop {
        if let Ok(mut c) = Client::connect(
            &lb.ws_url(),
            Some(Encoding::PROTO_SUBPROTOCOL),
            Encoding::Proto,
        )
        .await
            && let Ok(f) = tokio::time::timeout(
                Duration::from_secs(2),
                c.call(Command::Connect(Connect::default())),
            )
            .await
            && let Some(Body::Connect(i)) = f.body
        {
            assert_ne!(i.node, info.node);
            break c;
        }
        assert!(Instant::now() < deadline, "no live node behind haproxy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let Body::Subscribe(r) = ok(c.call(recover("room", last, &s.epoch)).await) else {
        panic!()
    };
    assert!(r.recovered);
    assert_eq!(offsets(&r.publications), (11..=20).collect::<Vec<_>>());
    assert_eq!(&r.publications[0].data[..], b"m11");
    api_publish(&nodes[other], "room", "m21");
    assert_eq!(offsets(&collect(&mut c, 1).await), vec![21]);
    c.quiet_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn redis_restart_with_persistence_keeps_offsets_and_epoch() {
    let mut redis = Redis::start(true);
    let nodes = cluster(&redis, 2, "");
    let mut sub = nodes[1].client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(sub.call(subscribe("persist")).await) else {
        panic!()
    };
    for i in 1..=3 {
        api_publish(&nodes[0], "persist", &format!("{i}"));
    }
    assert_eq!(offsets(&collect(&mut sub, 3).await), vec![1, 2, 3]);

    redis.restart();
    for n in &nodes {
        n.wait_ready(TIMEOUT);
    }
    for i in 4..=6 {
        let (offset, epoch) = api_publish(&nodes[0], "persist", &format!("{i}"));
        assert_eq!((offset, epoch.as_str()), (i, s.epoch.as_str()));
    }
    // The subscriber stayed connected through the restart and misses nothing.
    assert_eq!(offsets(&collect(&mut sub, 3).await), vec![4, 5, 6]);
    ok(sub.call(Command::Ping(Default::default())).await);
    let mut late = nodes[1].client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(late.call(recover("persist", 3, &s.epoch)).await) else {
        panic!()
    };
    assert!(r.recovered);
    assert_eq!(offsets(&r.publications), vec![4, 5, 6]);
}

#[tokio::test]
async fn redis_restart_without_persistence_changes_the_epoch() {
    let mut redis = Redis::start(false);
    let nodes = cluster(&redis, 2, "");
    let mut sub = nodes[1].client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(sub.call(subscribe("volatile")).await) else {
        panic!()
    };
    for i in 1..=3 {
        api_publish(&nodes[0], "volatile", &format!("{i}"));
    }
    assert_eq!(offsets(&collect(&mut sub, 3).await), vec![1, 2, 3]);

    redis.restart();
    for n in &nodes {
        n.wait_ready(TIMEOUT);
    }
    let (offset, epoch) = api_publish(&nodes[0], "volatile", "after");
    assert_ne!(epoch, s.epoch, "history was lost, so the epoch changed");
    // The live subscriber is told, then gets the new stream from its start.
    match sub.push().await {
        Body::Reset(r) => assert_eq!(
            (r.channel.as_str(), r.epoch.as_str()),
            ("volatile", epoch.as_str())
        ),
        other => panic!("expected a reset, got {other:?}"),
    }
    let got = collect(&mut sub, 1).await;
    assert_eq!(
        (got[0].offset, got[0].epoch.as_str()),
        (offset, epoch.as_str())
    );
    // A client recovering from the old epoch is told it cannot.
    let mut late = nodes[1].client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(late.call(recover("volatile", 3, &s.epoch)).await) else {
        panic!()
    };
    assert!(!r.recovered && r.publications.is_empty());
    assert_eq!(r.epoch, epoch);
}

#[tokio::test]
async fn frozen_redis_fails_fast_then_everything_comes_back() {
    let redis = Redis::start(false);
    let nodes = cluster(&redis, 2, "");
    let mut sub = nodes[1].client(Encoding::Proto).await;
    ok(sub.call(subscribe("frozen")).await);
    let mut publisher = nodes[0].client(Encoding::Proto).await;
    ok(publisher.call(publish("frozen", "before")).await);
    assert_eq!(offsets(&collect(&mut sub, 1).await), vec![1]);

    redis.signal("STOP");
    let stopped = Instant::now();
    for attempt in 0..3 {
        let t = Instant::now();
        let r = publisher
            .call(publish("frozen", format!("during-{attempt}")))
            .await;
        assert_eq!(error_code(&r), Some(108));
        assert!(r.error.unwrap().temporary);
        assert!(
            t.elapsed() < Duration::from_millis(2500),
            "publish must fail fast, took {:?}",
            t.elapsed()
        );
    }
    let deadline = Instant::now() + TIMEOUT;
    while nodes[0].http("GET", "/readyz", &[], "").0 != 503
        || nodes[1].http("GET", "/readyz", &[], "").0 != 503
    {
        assert!(
            Instant::now() < deadline,
            "readiness must fail while redis is frozen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Connected clients stay connected and served.
    ok(sub.call(Command::Ping(Default::default())).await);
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(stopped.elapsed())).await;
    redis.signal("CONT");
    for n in &nodes {
        n.wait_ready(TIMEOUT);
    }
    let (offset, _) = api_publish(&nodes[0], "frozen", "after");
    // Publishes that timed out may still have run once redis resumed; whatever happened,
    // the subscriber sees every offset up to the last one, in order, once.
    let got = collect(&mut sub, (offset - 1) as usize).await;
    assert_eq!(offsets(&got), (2..=offset).collect::<Vec<_>>());
    assert_eq!(&got.last().unwrap().data[..], b"after");
}

#[tokio::test]
async fn killed_pubsub_connections_are_repaired_from_the_stream() {
    let redis = Redis::start(false);
    let nodes = cluster(
        &redis,
        2,
        "[limits]\ncommands_per_second = 100000\ncommand_burst = 100000\n[namespaces.r]\nhistory_size = 1000\n",
    );
    let mut sub = nodes[1].client(Encoding::Proto).await;
    ok(sub.call(subscribe("r:repair")).await);
    let mut publisher = nodes[0].client(Encoding::Proto).await;
    let total = 300u64;
    for i in 0..total {
        ok(publisher.call(publish("r:repair", format!("{i}"))).await);
        if i % 50 == 25 {
            // Drop every pub/sub connection in Redis: messages published before the node
            // re-subscribes are only in the stream.
            redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        }
    }
    let got = collect(&mut sub, total as usize).await;
    assert_eq!(offsets(&got), (1..=total).collect::<Vec<_>>());
    sub.quiet_for(Duration::from_millis(200)).await;
    assert!(nodes[1].metric("gateway_redis_pubsub_reconnects_total") >= 1.0);
}

#[tokio::test]
async fn a_slow_consumer_on_one_node_does_not_delay_the_others() {
    let redis = Redis::start(false);
    let nodes = cluster(
        &redis,
        2,
        // 1 MiB of queue is slack enough for a reader on a busy machine; 24 MB published
        // is more than a non-reader's kernel buffers and queue together.
        "[limits]\noutbound_queue_bytes = 1048576\n[namespaces.big]\nhistory_size = 1000\nmax_message_bytes = 65536\n",
    );
    let mut slow = nodes[1].client(Encoding::Proto).await;
    ok(slow.call(subscribe("big:feed")).await);
    let mut fast_same = nodes[1].client(Encoding::Proto).await;
    ok(fast_same.call(subscribe("big:feed")).await);
    let mut fast_other = nodes[0].client(Encoding::Proto).await;
    ok(fast_other.call(subscribe("big:feed")).await);
    let payload = "x".repeat(60_000);
    let total = 400u64;
    // The fast subscribers read while the publisher runs; `slow` reads nothing.
    let readers: Vec<_> = [fast_same, fast_other]
        .into_iter()
        .map(|mut c| tokio::spawn(async move { offsets(&collect(&mut c, total as usize).await) }))
        .collect();
    let addr = nodes[0].addr;
    let publisher = tokio::task::spawn_blocking(move || {
        for _ in 0..total {
            api_publish_at(addr, "big:feed", &payload);
        }
    });
    publisher.await.unwrap();
    for r in readers {
        let got = tokio::time::timeout(TIMEOUT, r)
            .await
            .expect("fast subscribers are not held up")
            .unwrap();
        assert_eq!(got, (1..=total).collect::<Vec<_>>());
    }
    let closed = slow.closed().await;
    assert_eq!((closed.disconnect, closed.close), (Some(4008), Some(4008)));
}

#[tokio::test]
async fn an_idempotent_publish_retried_through_another_node_is_delivered_once() {
    let redis = Redis::start(false);
    let nodes = cluster(&redis, 3, "");
    let mut sub = nodes[2].client(Encoding::Json).await;
    ok(sub.call(subscribe("idem")).await);
    let body = r#"{"channel":"idem","data":"eA==","idempotencyKey":"order-42"}"#;
    let (s1, first) = nodes[0].api("POST", "/api/v1/publish", body);
    let (s2, retry) = nodes[1].api("POST", "/api/v1/publish", body);
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(first, retry);
    assert_eq!(offsets(&collect(&mut sub, 1).await), vec![1]);
    sub.quiet_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn disconnect_by_user_reaches_every_node_and_nodes_are_listed() {
    let redis = Redis::start(false);
    let nodes = cluster(
        &redis,
        3,
        "[auth]\nhmac_secrets = [\"s3cret\"]\n[namespaces.default]\nallow_anonymous = true\n",
    );
    let token = |user: &str| {
        encode(
            &Header::default(),
            &serde_json::json!({"sub": user}),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap()
    };
    let mut alice1 = Client::connect(
        &nodes[1].ws_url(&format!("?token={}", token("alice"))),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap();
    let mut alice2 = Client::connect(
        &nodes[2].ws_url(&format!("?token={}", token("alice"))),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap();
    let mut bob = Client::connect(
        &nodes[2].ws_url(&format!("?token={}", token("bob"))),
        None,
        Encoding::Proto,
    )
    .await
    .unwrap();
    for c in [&mut alice1, &mut alice2, &mut bob] {
        ok(c.call(subscribe("room")).await);
    }
    let (status, _) = nodes[0].api("POST", "/api/v1/disconnect", r#"{"user":"alice"}"#);
    assert_eq!(status, 200);
    for c in [&mut alice1, &mut alice2] {
        assert_eq!(
            c.closed().await,
            Closed {
                disconnect: Some(4000),
                close: Some(4000)
            }
        );
    }
    ok(bob.call(Command::Ping(Default::default())).await);

    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, body) = nodes[0].api("GET", "/api/v1/nodes", "");
        assert_eq!(status, 200);
        let list = body["nodes"].as_array().unwrap();
        let names: Vec<&str> = list.iter().map(|n| n["node"].as_str().unwrap()).collect();
        let node2 = list.iter().find(|n| n["node"] == "node2");
        if names == ["node0", "node1", "node2"]
            && node2.is_some_and(|n| n["connections"] == 1 && n["channels"] == 1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes never listed right: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn redis_cluster_fans_out_in_order_and_recovers_across_slots() {
    let redis = RedisCluster::start();
    let nodes = nodes_on(
        &redis.url(),
        3,
        "[limits]\ncommands_per_second = 100000\ncommand_burst = 100000\n",
    );
    // Channels whose hash tags land on different masters.
    let channels: Vec<String> = (0..12).map(|i| format!("room{i}")).collect();
    let mut subs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut c = node
            .client(if i % 2 == 0 {
                Encoding::Proto
            } else {
                Encoding::Json
            })
            .await;
        for ch in &channels {
            ok(c.call(subscribe(ch)).await);
        }
        subs.push(c);
    }
    let mut publishers = Vec::new();
    for node in &nodes {
        publishers.push(node.client(Encoding::Proto).await);
    }
    for round in 0..5 {
        for (k, ch) in channels.iter().enumerate() {
            let p = &mut publishers[(round + k) % 3];
            ok(p.call(publish(ch, format!("{ch}-{round}"))).await);
        }
    }
    for c in &mut subs {
        let got = collect(c, channels.len() * 5).await;
        for ch in &channels {
            let mine: Vec<u64> = got
                .iter()
                .filter(|p| &p.channel == ch)
                .map(|p| p.offset)
                .collect();
            assert_eq!(mine, vec![1, 2, 3, 4, 5], "{ch}");
        }
    }
    // A client that missed some recovers them from the cluster's streams.
    let mut late = nodes[2].client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(late.call(subscribe("room7")).await) else {
        panic!()
    };
    assert_eq!(s.offset, 5);
    drop(late);
    for i in 6..=8 {
        ok(publishers[0].call(publish("room7", format!("{i}"))).await);
    }
    let mut back = nodes[1].client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(back.call(recover("room7", 5, &s.epoch)).await) else {
        panic!()
    };
    assert!(r.recovered);
    assert_eq!(offsets(&r.publications), vec![6, 7, 8]);
}

#[tokio::test]
async fn redis_cluster_pubsub_drops_are_repaired_from_the_stream() {
    let redis = RedisCluster::start();
    let nodes = nodes_on(
        &redis.url(),
        2,
        "[limits]\ncommands_per_second = 100000\ncommand_burst = 100000\n[namespaces.r]\nhistory_size = 1000\n",
    );
    // Many channels, so each master serves several slots: re-subscribing them in one
    // SSUBSCRIBE would fail with CROSSSLOT.
    let channels: Vec<String> = (0..12).map(|i| format!("r:cluster{i}")).collect();
    let mut sub = nodes[1].client(Encoding::Proto).await;
    for ch in &channels {
        ok(sub.call(subscribe(ch)).await);
    }
    let mut publisher = nodes[0].client(Encoding::Proto).await;
    let rounds = 20u64;
    for round in 0..rounds {
        for ch in &channels {
            loop {
                let r = publisher.call(publish(ch, format!("{round}"))).await;
                match error_code(&r) {
                    None => break,
                    // The kill below also drops command connections; the publisher retries.
                    Some(108) => tokio::time::sleep(Duration::from_millis(50)).await,
                    other => panic!("{other:?}"),
                }
            }
        }
        if round % 5 == 2 {
            for m in redis.masters() {
                m.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
            }
        }
    }
    let got = collect(&mut sub, channels.len() * rounds as usize).await;
    for ch in &channels {
        let mine: Vec<u64> = got
            .iter()
            .filter(|p| &p.channel == ch)
            .map(|p| p.offset)
            .collect();
        assert_eq!(mine, (1..=rounds).collect::<Vec<_>>(), "{ch}");
    }
    sub.quiet_for(Duration::from_millis(200)).await;
    assert!(nodes[1].metric("gateway_redis_pubsub_reconnects_total") >= 1.0);
}

#[tokio::test]
async fn channels_are_sharded_over_independent_redis_servers() {
    let (a, b) = (Redis::start(false), Redis::start(false));
    let url = format!("{},{}", a.url(), b.url());
    let nodes = nodes_on(&url, 2, "");
    let channels: Vec<String> = (0..16).map(|i| format!("shard{i}")).collect();
    let mut sub = nodes[1].client(Encoding::Proto).await;
    for ch in &channels {
        ok(sub.call(subscribe(ch)).await);
    }
    let mut publisher = nodes[0].client(Encoding::Proto).await;
    for ch in &channels {
        for i in 0..3 {
            ok(publisher.call(publish(ch, format!("{i}"))).await);
        }
    }
    let got = collect(&mut sub, channels.len() * 3).await;
    for ch in &channels {
        let mine: Vec<u64> = got
            .iter()
            .filter(|p| &p.channel == ch)
            .map(|p| p.offset)
            .collect();
        assert_eq!(mine, vec![1, 2, 3], "{ch}");
    }
    // Both servers hold some of the channels' streams, and no channel is on both.
    let on = |r: &Redis, ch: &str| {
        r.cli(&["EXISTS", &format!("gw:{{{ch}}}:s")]).as_deref() == Some(":1")
    };
    let (on_a, on_b): (Vec<_>, Vec<_>) = (
        channels.iter().filter(|c| on(&a, c)).collect(),
        channels.iter().filter(|c| on(&b, c)).collect(),
    );
    assert!(
        !on_a.is_empty() && !on_b.is_empty(),
        "a: {on_a:?} b: {on_b:?}"
    );
    assert_eq!(on_a.len() + on_b.len(), channels.len());
}

/// Join and Leave pushes cross nodes like publications do, on one Redis and on a cluster.
async fn join_and_leave_cross_nodes(url: &str) {
    let nodes = nodes_on(url, 2, "[namespaces.chat]\njoin_leave = true\n");
    let mut watcher = nodes[0].client(Encoding::Proto).await;
    ok(watcher.call(subscribe("chat:lobby")).await);
    assert!(matches!(watcher.push().await, Body::Join(_)), "own join");
    let mut guest = nodes[1].client(Encoding::Json).await;
    let named = Connect {
        name: "Zoë".into(),
        ..Default::default()
    };
    let Body::Connect(info) = ok(guest.call(Command::Connect(named)).await) else {
        panic!()
    };
    ok(guest.call(subscribe("chat:lobby")).await);
    match watcher.push().await {
        Body::Join(j) => {
            let who = j.info.unwrap();
            assert_eq!(
                (who.client, who.name.as_str()),
                (info.client.clone(), "Zoë")
            );
        }
        other => panic!("{other:?}"),
    }
    let (status, presence) = nodes[0].api("GET", "/api/v1/channels/chat:lobby/presence", "");
    assert_eq!(
        (status, presence["clients"].as_array().map(Vec::len)),
        (200, Some(2))
    );
    let names: Vec<&str> = presence["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        vec!["Zoë"],
        "the display name is stored with presence"
    );
    drop(guest);
    match watcher.push().await {
        Body::Leave(l) => assert_eq!(l.info.unwrap().client, info.client),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn join_and_leave_cross_nodes_on_one_redis() {
    let redis = Redis::start(false);
    join_and_leave_cross_nodes(&redis.url()).await;
}

#[tokio::test]
async fn join_and_leave_cross_nodes_on_a_redis_cluster() {
    let redis = RedisCluster::start();
    join_and_leave_cross_nodes(&redis.url()).await;
}

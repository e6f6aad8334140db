//! The ways to lose or duplicate a publication that an adversarial review reproduced
//! against the release binary, each replayed here against real processes: real
//! `redis-server`, gateway nodes, WebSocket clients. Every test asserts exact offsets and
//! payloads; the unit tests of `broker::tracker`, `broker::subscriptions` and
//! `session::subscriptions` prove the same rules in isolation.

mod common;

use broker_proto::{
    Encoding,
    v1::{ClientFrame, Ping, Publication, Unsubscribe, client_frame::Command, server_frame::Body},
};
use common::*;
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

const FAST: &str =
    "[redis]\ncommand_timeout_ms = 1000\nprobe_interval_ms = 1000\nunsubscribe_delay_ms = 500\n";

fn nodes(url: &str, n: usize, config: &str) -> Vec<Server> {
    (0..n)
        .map(|i| {
            let s = Server::start_with(
                config,
                &[
                    "--redis-url",
                    url,
                    "--node-id",
                    &format!("node{i}"),
                    "--api-key",
                    "test-key",
                ],
            );
            s.wait_ready(TIMEOUT);
            s
        })
        .collect()
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Publishes through the HTTP API, retrying while the node reports Redis unavailable.
fn api_publish(node: &Server, channel: &str, data: &str) -> (u64, String) {
    let body = format!(r#"{{"channel":"{channel}","data":"{}"}}"#, b64(data));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, reply) = node.api("POST", "/api/v1/publish", &body);
        if status == 200 {
            let offset = reply["offset"].as_str().unwrap().parse().unwrap();
            return (offset, reply["epoch"].as_str().unwrap().to_owned());
        }
        assert_eq!(reply["error"]["code"], 108, "{reply}");
        assert!(Instant::now() < deadline, "publish kept failing: {reply}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every push until `count` publications arrived (resets included, in order).
async fn pushes_until(c: &mut Client, count: usize) -> Vec<Body> {
    let mut out = Vec::new();
    let mut publications = 0;
    while publications < count {
        let body = c.push().await;
        publications += usize::from(matches!(body, Body::Publication(_)));
        if !matches!(body, Body::Join(_) | Body::Leave(_)) {
            out.push(body);
        }
    }
    out
}

fn publications(pushes: &[Body]) -> Vec<&Publication> {
    pushes
        .iter()
        .filter_map(|b| match b {
            Body::Publication(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn text(p: &Publication) -> String {
    String::from_utf8(p.data.to_vec()).unwrap()
}

/// Defect 1: Redis restarted from an older snapshot came back with an older offset and
/// the same epoch; new publications reused delivered offsets and were dropped, and a
/// recovery from before the restart reported success with different data.
#[tokio::test]
async fn a_redis_rollback_to_an_older_snapshot_rotates_the_epoch() {
    let mut redis = Redis::start(false);
    let nodes = nodes(&redis.url(), 2, FAST);
    let mut live = nodes[1].client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(live.call(subscribe("snap")).await) else {
        panic!()
    };
    let old = s.epoch.clone();
    for i in 1..=3 {
        api_publish(&nodes[0], "snap", &format!("a{i}"));
    }
    assert_eq!(redis.cli(&["SAVE"]).as_deref(), Some("+OK"));
    for i in 4..=10 {
        api_publish(&nodes[0], "snap", &format!("a{i}"));
    }
    let before = pushes_until(&mut live, 10).await;
    let before: Vec<(u64, String)> = publications(&before)
        .iter()
        .map(|p| (p.offset, text(p)))
        .collect();
    assert_eq!(before.last(), Some(&(10, "a10".to_owned())));

    // Redis crashes and restarts from the snapshot taken at offset 3.
    redis.restart();
    for n in &nodes {
        n.wait_ready(TIMEOUT);
    }
    let mut after = Vec::new();
    for i in 4..=6 {
        let (offset, epoch) = api_publish(&nodes[0], "snap", &format!("b{i}"));
        assert_ne!(epoch, old, "the rolled-back stream has a new epoch");
        after.push((offset, epoch));
    }
    let new = after[0].1.clone();
    assert_eq!(after.iter().map(|a| a.0).collect::<Vec<_>>(), vec![4, 5, 6]);

    // The subscriber connected throughout is told, then gets the new stream whole.
    let got = pushes_until(&mut live, 6).await;
    match &got[0] {
        Body::Reset(r) => assert_eq!(r.epoch, new),
        other => panic!("expected a reset first, got {other:?}"),
    }
    let got: Vec<(u64, String, String)> = publications(&got)
        .iter()
        .map(|p| (p.offset, p.epoch.clone(), text(p)))
        .collect();
    let expected: Vec<(u64, String, String)> = ["a1", "a2", "a3", "b4", "b5", "b6"]
        .iter()
        .enumerate()
        .map(|(i, d)| (i as u64 + 1, new.clone(), (*d).to_owned()))
        .collect();
    assert_eq!(got, expected);
    live.quiet_for(Duration::from_millis(300)).await;

    // Recoveries from positions of the old epoch fail honestly.
    for since in [3, 8] {
        let mut late = nodes[1].client(Encoding::Proto).await;
        let Body::Subscribe(r) = ok(late.call(recover("snap", since, &old)).await) else {
            panic!()
        };
        assert!(!r.recovered && r.publications.is_empty(), "from {since}");
        assert_eq!((r.epoch.as_str(), r.offset), (new.as_str(), 6));
    }
    // Never two payloads under one (epoch, offset).
    let mut names: HashMap<(String, u64), String> = HashMap::new();
    for (offset, data) in before {
        names.insert((old.clone(), offset), data);
    }
    for (offset, epoch, data) in got {
        let previous = names.insert((epoch.clone(), offset), data.clone());
        assert!(
            previous.is_none_or(|p| p == data),
            "({epoch}, {offset}) named twice"
        );
    }
}

/// Found by the adversarial review of the fix above: a durable Redis (AOF, fsync always)
/// restarted without AOF loads an older RDB snapshot; the epoch was kept because the
/// previous instance was durable. The current instance must be durable too.
#[tokio::test]
async fn a_durable_redis_restarted_from_an_older_snapshot_rotates_the_epoch() {
    let mut redis = Redis::start(true);
    let nodes = nodes(&redis.url(), 1, FAST);
    let mut c = nodes[0].client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(c.call(subscribe("dur")).await) else {
        panic!()
    };
    for i in 1..=3 {
        api_publish(&nodes[0], "dur", &format!("old{i}"));
    }
    assert_eq!(redis.cli(&["SAVE"]).as_deref(), Some("+OK"));
    for i in 4..=6 {
        api_publish(&nodes[0], "dur", &format!("old{i}"));
    }
    assert_eq!(pushes_until(&mut c, 6).await.len(), 6);
    // Nobody on the node tracks the channel any more (a tracker would notice the stream
    // going back, a second net): the scripts alone must rotate the epoch.
    drop(c);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.set_persistent(false);
    redis.restart();
    nodes[0].wait_ready(TIMEOUT);
    let (offset, epoch) = api_publish(&nodes[0], "dur", "new4");
    assert_eq!(offset, 4, "the snapshot had offset 3");
    assert_ne!(
        epoch, s.epoch,
        "offset 4 is another publication now: a new epoch"
    );
    let mut late = nodes[0].client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(late.call(recover("dur", 4, &s.epoch)).await) else {
        panic!()
    };
    assert!(!r.recovered && r.publications.is_empty());
}

/// Defect 2: a channel in its unsubscribe grace period kept its delivery state through a
/// pub/sub reconnect; once its stream was lost, the next subscriber got the whole new
/// stream replayed instead of only what came after its subscribe.
#[tokio::test]
async fn no_stale_tracking_survives_a_pubsub_reconnect() {
    let redis = Redis::start(false);
    let slow_unsubscribe = "[redis]\ncommand_timeout_ms = 1000\nprobe_interval_ms = 1000\nunsubscribe_delay_ms = 5000\n";
    let nodes = nodes(&redis.url(), 2, slow_unsubscribe);
    let mut first = nodes[1].client(Encoding::Proto).await;
    ok(first.call(subscribe("grace")).await);
    for i in 1..=2 {
        api_publish(&nodes[0], "grace", &format!("{i}"));
    }
    assert_eq!(pushes_until(&mut first, 2).await.len(), 2);
    ok(first
        .call(Command::Unsubscribe(Unsubscribe {
            channel: "grace".into(),
        }))
        .await);
    // In its grace period: the pub/sub connection drops and comes back.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    std::thread::sleep(Duration::from_millis(300));
    nodes[1].wait_ready(TIMEOUT);
    // The stream is lost (a new epoch starts) and moves on while nobody listens.
    redis.cli(&["FLUSHALL"]);
    for i in 1..=5 {
        api_publish(&nodes[0], "grace", &format!("n{i}"));
    }
    let mut plain = nodes[1].client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(plain.call(subscribe("grace")).await) else {
        panic!()
    };
    assert_eq!(s.offset, 5);
    let mut recovering = nodes[1].client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(recovering.call(recover("grace", 5, &s.epoch)).await) else {
        panic!()
    };
    assert!(r.recovered && r.publications.is_empty());
    api_publish(&nodes[0], "grace", "n6");
    for c in [&mut plain, &mut recovering] {
        let got = pushes_until(c, 1).await;
        let got: Vec<(u64, String)> = publications(&got)
            .iter()
            .map(|p| (p.offset, text(p)))
            .collect();
        assert_eq!(got, vec![(6, "n6".to_owned())]);
        c.quiet_for(Duration::from_millis(300)).await;
    }
}

/// Defect 3: a recovery of more than 10,000 publications returned the first 10,000 with
/// `recovered=true`, and the rest were never delivered.
#[tokio::test]
async fn a_recovery_of_12000_publications_through_redis_is_whole() {
    let redis = Redis::start(false);
    let config = format!(
        "{FAST}[limits]\ncommands_per_second = 1000000\ncommand_burst = 1000000\n[namespaces.big]\nhistory_size = 20000\npresence = false\n"
    );
    let nodes = nodes(&redis.url(), 1, &config);
    let mut publisher = nodes[0].client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(publisher.call(subscribe("big:log")).await) else {
        panic!()
    };
    const TOTAL: u32 = 12_000;
    for batch in 0..TOTAL / 100 {
        let frames: Vec<ClientFrame> = (0..100)
            .map(|j| ClientFrame {
                id: batch * 100 + j + 1,
                command: Some(publish("big:log", format!("{}", batch * 100 + j + 1))),
            })
            .collect();
        publisher.send_frames(&frames).await;
        let mut replies = 0;
        while replies < 100 {
            let f = publisher.next().await;
            if f.id != 0 {
                assert!(f.error.is_none(), "{f:?}");
                replies += 1;
            }
        }
    }
    let mut late = nodes[0].client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(late.call(recover("big:log", 0, &s.epoch)).await) else {
        panic!()
    };
    assert!(r.recovered);
    let offsets: Vec<u64> = r.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (1..=u64::from(TOTAL)).collect::<Vec<_>>());
    assert_eq!(text(&r.publications[11_999]), "12000");
    ok(publisher.call(publish("big:log", "next")).await);
    let got = pushes_until(&mut late, 1).await;
    assert_eq!(publications(&got)[0].offset, u64::from(TOTAL) + 1);
}

/// Defect 4: while the pub/sub connection hung, a subscribe that timed out sent a
/// compensating unsubscribe although it was never counted, took another session's
/// reference, and that session silently received nothing more.
#[tokio::test]
async fn a_subscribe_that_times_out_takes_no_one_elses_reference() {
    let redis = Redis::start(false);
    let config = "[redis]\ncommand_timeout_ms = 1000\nprobe_interval_ms = 1000\nunsubscribe_delay_ms = 200\npubsub_connections = 1\n";
    let nodes = nodes(&redis.url(), 2, config);
    let mut y = nodes[1].client(Encoding::Proto).await;
    ok(y.call(subscribe("kept")).await);
    api_publish(&nodes[0], "kept", "before");
    assert_eq!(publications(&pushes_until(&mut y, 1).await)[0].offset, 1);

    redis.signal("STOP");
    // W's subscribe holds up the pub/sub task until it gives up on the connection; then
    // the task spends each reconnect attempt waiting on the frozen Redis. Subscribes to
    // Y's channel keep arriving meanwhile, some early enough in an attempt to time out
    // before the task can refuse them.
    let addr = nodes[1].ws_url("");
    let mut attempts = Vec::new();
    for i in 0..25 {
        let channel = if i == 0 { "other" } else { "kept" };
        let addr = addr.clone();
        attempts.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr, Some(Encoding::PROTO_SUBPROTOCOL), Encoding::Proto)
                .await
                .unwrap();
            let reply = c.call(subscribe(channel)).await;
            (c, error_code(&reply))
        }));
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    redis.signal("CONT");
    for a in attempts {
        let (c, code) = a.await.unwrap();
        assert!(code.is_none() || code == Some(108), "{code:?}");
        drop(c);
    }
    // Let every delayed unsubscribe run, then check Y still receives.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes[1].wait_ready(TIMEOUT);
    for i in 1..=3 {
        api_publish(&nodes[0], "kept", &format!("after{i}"));
    }
    let got = pushes_until(&mut y, 3).await;
    let got: Vec<String> = publications(&got).iter().map(|p| text(p)).collect();
    assert_eq!(got, vec!["after1", "after2", "after3"]);
}

/// Defect 5: the embedded broker forgot a quiet channel that still had subscribers; its
/// next publications restarted at offset 1 under a new epoch, and the subscribers
/// dropped them as duplicates. (Takes a minute: channels are kept at least 60 s.)
#[tokio::test]
async fn a_quiet_channel_with_subscribers_keeps_its_stream() {
    let server = Server::start("[namespaces.quiet]\nhistory_ttl_seconds = 1\n");
    let mut c = server.client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(c.call(subscribe("quiet:room")).await) else {
        panic!()
    };
    let mut publisher = server.client(Encoding::Proto).await;
    for i in 1..=4 {
        ok(publisher.call(publish("quiet:room", format!("{i}"))).await);
    }
    assert_eq!(pushes_until(&mut c, 4).await.len(), 4);
    // Idle for longer than the 60 s the node keeps an unused channel, pinging so the
    // connection stays alive.
    let until = Instant::now() + Duration::from_secs(65);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(5)).await;
        ok(c.call(Command::Ping(Ping {})).await);
    }
    // The idle publisher was closed (it answered no pings); a new one publishes.
    let mut publisher = server.client(Encoding::Proto).await;
    for i in 5..=8 {
        let reply = publisher.call(publish("quiet:room", format!("{i}"))).await;
        let Body::Publish(p) = ok(reply) else {
            panic!()
        };
        assert_eq!((p.offset, p.epoch.as_str()), (i, s.epoch.as_str()));
    }
    let got = pushes_until(&mut c, 4).await;
    let offsets: Vec<u64> = publications(&got).iter().map(|p| p.offset).collect();
    assert_eq!(offsets, vec![5, 6, 7, 8]);
}

/// Replies only for `id > 0`; and [publish, unsubscribe, subscribe] in one message, in a
/// channel without history, does not deliver the publication after the new subscribe.
#[tokio::test]
async fn replies_only_for_ids_and_no_stale_push_after_resubscribing() {
    let server = Server::start("[namespaces.nohist]\nhistory_size = 0\npresence = false\n");
    let mut c = server.client(Encoding::Json).await;
    c.send_frames(&[
        ClientFrame {
            id: 0,
            command: Some(Command::Ping(Ping {})),
        },
        ClientFrame {
            id: 0,
            command: Some(subscribe("bad name")),
        },
        ClientFrame {
            id: 5,
            command: Some(Command::Ping(Ping {})),
        },
    ])
    .await;
    assert_eq!(c.next().await.id, 5, "nothing answers the id-0 commands");
    ok(c.call(subscribe("nohist:x")).await);
    c.send_frames(&[
        ClientFrame {
            id: 10,
            command: Some(publish("nohist:x", "before")),
        },
        ClientFrame {
            id: 11,
            command: Some(Command::Unsubscribe(Unsubscribe {
                channel: "nohist:x".into(),
            })),
        },
        ClientFrame {
            id: 12,
            command: Some(subscribe("nohist:x")),
        },
    ])
    .await;
    for id in [10, 11, 12] {
        assert_eq!(c.next().await.id, id);
    }
    c.quiet_for(Duration::from_millis(300)).await;
    ok(c.call(publish("nohist:x", "after")).await);
    match c.push().await {
        Body::Publication(p) => assert_eq!(&p.data[..], b"after"),
        other => panic!("{other:?}"),
    }
}

/// Found by the adversarial review: on a healthy Redis, pub/sub connection kills under
/// load made a node mistake a stale read for a rollback, rotate epochs and replay whole
/// streams. Nothing was lost in Redis, so no epoch may change and nothing may repeat.
#[tokio::test]
async fn pubsub_kills_under_load_never_rotate_a_healthy_epoch() {
    let redis = Redis::start(false);
    let config = format!(
        "{FAST}pubsub_connections = 1\n[limits]\ncommands_per_second = 1000000\ncommand_burst = 1000000\nmax_channels_per_connection = 256\noutbound_queue_bytes = 268435456\n"
    );
    // The subscriber reads only once publishing stops: its queue must hold everything.
    let nodes = nodes(&redis.url(), 1, &config);
    let channels: Vec<String> = (0..200).map(|i| format!("c{i}")).collect();
    let mut sub = nodes[0].client(Encoding::Proto).await;
    for ch in &channels {
        ok(sub.call(subscribe(ch)).await);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..8usize {
        let (mut c, stop, channels) = (
            nodes[0].client(Encoding::Proto).await,
            stop.clone(),
            channels.clone(),
        );
        publishers.push(tokio::spawn(async move {
            let mut acked = 0usize;
            let mut i = p;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i = (i * 7 + 13) % channels.len();
                let reply = c.call(publish(&channels[i], format!("p{p}-{acked}"))).await;
                match error_code(&reply) {
                    None => acked += 1,
                    Some(108) => tokio::time::sleep(Duration::from_millis(20)).await,
                    Some(other) => panic!("publish failed with {other}"),
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..5 {
        redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for p in publishers {
        total += p.await.unwrap();
    }
    let got = pushes_until(&mut sub, total).await;
    let resets = got.iter().filter(|b| matches!(b, Body::Reset(_))).count();
    let mut per_channel: HashMap<String, Vec<u64>> = HashMap::new();
    for p in publications(&got) {
        per_channel
            .entry(p.channel.clone())
            .or_default()
            .push(p.offset);
    }
    for (ch, offsets) in &per_channel {
        let expected: Vec<u64> = (1..=offsets.len() as u64).collect();
        assert_eq!(offsets, &expected, "{ch}: each offset once, in order");
    }
    assert_eq!(resets, 0, "no epoch changed");
    sub.quiet_for(Duration::from_millis(500)).await;
    assert_eq!(nodes[0].metric("gateway_stream_rollbacks_total"), 0.0);
}

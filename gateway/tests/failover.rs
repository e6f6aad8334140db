//! Redis Cluster, failover, sharding and presence, against real processes: a 3-master
//! Redis Cluster (with replicas where a failover is needed), independent `redis-server`s
//! sharding channels, Redis Sentinel, and gateway nodes. Each test replays one of the
//! silent-loss defects a review reproduced and asserts exact outcomes: every publication
//! delivered, never two payloads under one (epoch, offset), honest recovery answers.

mod common;

use broker_proto::{
    Encoding,
    v1::{Publication, client_frame::Command, server_frame::Body},
};
use common::*;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    process::Command as Process,
    time::{Duration, Instant},
};

const FAST: &str =
    "[redis]\ncommand_timeout_ms = 1000\nprobe_interval_ms = 1000\nunsubscribe_delay_ms = 500\n";

fn nodes_on(url: &str, n: usize, config: &str) -> Vec<Server> {
    (0..n).map(|i| node(url, i, config)).collect()
}

fn node(url: &str, i: usize, config: &str) -> Server {
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
    s.wait_ready(Duration::from_secs(20));
    s
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Publishes through the HTTP API, retrying on temporary errors (Redis failing over or
/// a slot migrating); returns (offset, epoch).
fn api_publish(addr: std::net::SocketAddr, channel: &str, data: &str) -> (u64, String) {
    let body = format!(r#"{{"channel":"{channel}","data":"{}"}}"#, b64(data));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, reply) = api_at(addr, "POST", "/api/v1/publish", &body);
        if status == 200 {
            let offset = reply["offset"].as_str().unwrap().parse().unwrap();
            return (offset, reply["epoch"].as_str().unwrap().to_owned());
        }
        assert!(
            reply["error"]["temporary"] == true,
            "publish failed for good: {reply}"
        );
        assert!(Instant::now() < deadline, "publish kept failing: {reply}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn text(p: &Publication) -> String {
    String::from_utf8(p.data.to_vec()).unwrap()
}

/// What one subscriber saw: publications per epoch (in arrival order) and resets.
#[derive(Default, Debug)]
struct Seen {
    by_epoch: BTreeMap<String, Vec<(u64, String)>>,
    order: Vec<String>,
    resets: Vec<String>,
}

impl Seen {
    fn payloads(&self) -> HashSet<String> {
        self.by_epoch
            .values()
            .flatten()
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// Per epoch: offsets strictly consecutive, each once; across epochs: an
    /// (epoch, offset) pair never names two payloads.
    fn assert_exact(&self) {
        for (epoch, got) in &self.by_epoch {
            let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
            let first = offsets[0];
            let expected: Vec<u64> = (first..first + offsets.len() as u64).collect();
            assert_eq!(
                offsets, expected,
                "epoch {epoch}: gap, duplicate or reorder"
            );
        }
    }
}

/// Reads pushes until `done` says so, recording publications and resets.
async fn watch(c: &mut Client, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !done(seen) {
        assert!(Instant::now() < deadline, "gave up waiting: {seen:?}");
        match c.push().await {
            Body::Publication(p) => {
                if seen.order.last() != Some(&p.epoch) {
                    seen.order.push(p.epoch.clone());
                }
                let entry = seen.by_epoch.entry(p.epoch.clone()).or_default();
                entry.push((p.offset, text(&p)));
            }
            Body::Reset(r) => seen.resets.push(r.epoch),
            Body::Join(_) | Body::Leave(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

fn keyslot(redis: &Redis, key: &str) -> u16 {
    redis
        .cli(&["CLUSTER", "KEYSLOT", key])
        .unwrap()
        .trim_start_matches(':')
        .parse()
        .unwrap()
}

/// Defect 1: a slot migrated while subscribed left the node deaf to the channel (the
/// `sunsubscribe` push was ignored). Now the channel is subscribed again on the new owner;
/// moving to another shard restarts the epoch (DESIGN.md), and every publication reaches
/// the subscriber, in order per epoch.
#[tokio::test]
async fn a_slot_migrated_while_publishing_loses_nothing() {
    let cluster = RedisCluster::start();
    let nodes = nodes_on(&cluster.url(), 2, FAST);
    let slot = keyslot(&cluster.masters()[0], "gw:{mig}:s");
    let (src, src_id) = cluster.owner_of(slot);
    let dst = (src + 1) % 3;
    let dst_id = cluster.node_id(dst);
    let mut sub = nodes[1].client(Encoding::Proto).await;
    ok(sub.call(subscribe("mig")).await);

    const TOTAL: usize = 40;
    let addr = nodes[0].addr;
    let publisher = std::thread::spawn(move || {
        for i in 1..=TOTAL {
            api_publish(addr, "mig", &format!("m{i}"));
            std::thread::sleep(Duration::from_millis(40));
        }
    });
    std::thread::sleep(Duration::from_millis(400));
    let (s, d) = (&cluster.masters()[src], &cluster.masters()[dst]);
    d.cli(&[
        "CLUSTER",
        "SETSLOT",
        &slot.to_string(),
        "IMPORTING",
        &src_id,
    ]);
    s.cli(&[
        "CLUSTER",
        "SETSLOT",
        &slot.to_string(),
        "MIGRATING",
        &dst_id,
    ]);
    let keys = s
        .cli_all(&["CLUSTER", "GETKEYSINSLOT", &slot.to_string(), "1000"])
        .unwrap();
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    let port = d.port.to_string();
    let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
    migrate.extend(keys.iter().copied());
    assert!(
        s.cli_all(&migrate).unwrap().contains("OK"),
        "MIGRATE failed"
    );
    for m in cluster.masters() {
        m.cli(&["CLUSTER", "SETSLOT", &slot.to_string(), "NODE", &dst_id]);
    }
    assert_eq!(cluster.owner_of(slot).0, dst, "the slot moved");
    publisher.join().unwrap();

    let mut seen = Seen::default();
    let last = format!("m{TOTAL}");
    watch(&mut sub, &mut seen, |s| s.payloads().contains(&last)).await;
    let all: HashSet<String> = (1..=TOTAL).map(|i| format!("m{i}")).collect();
    assert_eq!(seen.payloads(), all, "every publication delivered");
    seen.assert_exact();
    assert_eq!(
        seen.resets.len(),
        seen.order.len() - 1,
        "each new epoch announced"
    );
    // The node is subscribed on the new owner: a fresh subscriber there hears new ones.
    let mut fresh = nodes[1].client(Encoding::Proto).await;
    ok(fresh.call(subscribe("mig")).await);
    api_publish(nodes[0].addr, "mig", "after");
    let mut seen = Seen::default();
    watch(&mut fresh, &mut seen, |s| s.payloads().contains("after")).await;
}

/// Defect 3: a failover to a replica that lacked acknowledged publications kept the epoch
/// and reused offsets. Now the promoted replica's epoch is new: the subscriber gets a reset
/// and the new stream, recoveries from lost positions fail honestly, and no
/// (epoch, offset) names two payloads.
#[tokio::test]
async fn a_failover_to_a_lagging_replica_rotates_the_epoch() {
    let mut cluster = RedisCluster::start_with_replicas(1);
    let nodes = nodes_on(&cluster.url(), 2, FAST);
    let slot = keyslot(&cluster.masters()[0], "gw:{lag}:s");
    let (m, m_id) = cluster.owner_of(slot);
    let deadline = Instant::now() + TIMEOUT;
    let replicas = loop {
        let out = cluster.masters()[m]
            .cli_all(&["CLUSTER", "REPLICAS", &m_id])
            .unwrap();
        if !out.trim().is_empty() {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "the master never listed its replica"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let r_port: u16 = replicas
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.split(':').nth(1))
        .and_then(|p| p.split('@').next())
        .and_then(|p| p.parse().ok())
        .expect("the master has a replica");
    let r = cluster
        .masters()
        .iter()
        .position(|s| s.port == r_port)
        .unwrap();

    let mut sub = nodes[1].client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(sub.call(subscribe("lag")).await) else {
        panic!()
    };
    let old = s.epoch;
    for i in 1..=3 {
        api_publish(nodes[0].addr, "lag", &format!("a{i}"));
    }
    let mut seen = Seen::default();
    watch(&mut sub, &mut seen, |s| s.payloads().len() == 3).await;
    // Let a1..a3 reach the replica, then cut it off: b4..b6 exist only on the master.
    let offset_of = |info: &str, key: &str| -> Option<u64> {
        info.lines().find_map(|l| {
            let rest = l.trim().strip_prefix(key)?;
            rest.split(',')
                .find_map(|kv| kv.strip_prefix("offset="))
                .or(Some(rest))
                .and_then(|v| v.trim().parse().ok())
        })
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let info = cluster.masters()[m]
            .cli_all(&["INFO", "replication"])
            .unwrap();
        let master = offset_of(&info, "master_repl_offset:");
        let replica = offset_of(&info, "slave0:");
        if master.is_some() && master == replica {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never caught up: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.masters()[r].signal("STOP");
    cluster.masters()[m].cli(&["CLIENT", "KILL", "TYPE", "replica"]);
    for i in 4..=6 {
        let (offset, epoch) = api_publish(nodes[0].addr, "lag", &format!("b{i}"));
        assert_eq!((offset, epoch.as_str()), (i, old.as_str()));
    }
    cluster.servers_mut()[m].kill9();
    cluster.masters()[r].signal("CONT");
    cluster.masters()[r].cli(&["CLUSTER", "FAILOVER", "TAKEOVER"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.owner_of(slot).0 != r {
        assert!(Instant::now() < deadline, "the replica never took over");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (offset, new) = api_publish(nodes[0].addr, "lag", "c");
    assert_ne!(new, old, "the promoted replica lacked b4..b6: a new epoch");
    assert_eq!(offset, 4, "offsets continue from what the replica had");

    watch(&mut sub, &mut seen, |s| s.payloads().contains("c")).await;
    assert_eq!(seen.resets, vec![new.clone()]);
    seen.assert_exact();
    let mut names: HashMap<(String, u64), String> = HashMap::new();
    for (epoch, got) in &seen.by_epoch {
        for (offset, data) in got {
            let prev = names.insert((epoch.clone(), *offset), data.clone());
            assert!(
                prev.is_none_or(|p| p == *data),
                "({epoch}, {offset}) named twice"
            );
        }
    }
    let new_stream: Vec<&str> = seen.by_epoch[&new]
        .iter()
        .map(|(_, d)| d.as_str())
        .collect();
    assert_eq!(new_stream, vec!["a1", "a2", "a3", "c"]);
    // A client that had b6 under the old epoch cannot recover: that history is gone.
    let mut late = nodes[1].client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(late.call(recover("lag", 6, &old)).await) else {
        panic!()
    };
    assert!(!r.recovered && r.publications.is_empty());
    assert_eq!(r.epoch, new);
}

/// Defect 2: a Cluster subscribe that failed took the channel's reference away twice, so
/// a session subscribed meanwhile received nothing.
#[tokio::test]
async fn a_failed_cluster_subscribe_takes_no_reference_away() {
    let cluster = RedisCluster::start();
    let nodes = nodes_on(&cluster.url(), 2, FAST);
    let slot = keyslot(&cluster.masters()[0], "gw:{x}:s");
    let (m, _) = cluster.owner_of(slot);
    cluster.masters()[m].signal("STOP");
    let url = nodes[1].ws_url("");
    let c1 = tokio::spawn({
        let url = url.clone();
        async move {
            let mut c = Client::connect(&url, Some(Encoding::PROTO_SUBPROTOCOL), Encoding::Proto)
                .await
                .unwrap();
            error_code(&c.call(subscribe("x")).await)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c2 = tokio::spawn(async move {
        let mut c = Client::connect(&url, Some(Encoding::PROTO_SUBPROTOCOL), Encoding::Proto)
            .await
            .unwrap();
        let reply = c.call(subscribe("x")).await;
        (c, error_code(&reply))
    });
    tokio::time::sleep(Duration::from_millis(850)).await;
    cluster.masters()[m].signal("CONT");
    // c1 usually fails (its SSUBSCRIBE times out while the master is paused); either way
    // it must not take c2's reference.
    let _ = c1.await.unwrap();
    let (mut c2, code) = c2.await.unwrap();
    assert_eq!(code, None, "c2's subscribe succeeded");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for i in 0..3 {
        api_publish(nodes[0].addr, "x", &format!("x{i}"));
    }
    let mut seen = Seen::default();
    watch(&mut c2, &mut seen, |s| s.payloads().len() == 3).await;
    seen.assert_exact();
}

/// The Redis user of these tests may not PUBLISH to channel pub/sub names (it may to the
/// nodes' probe and control channels): a Join announce fails while everything else works.
fn acl_redis(rules: &[&str]) -> (Redis, String) {
    let redis = Redis::start(false);
    assert_eq!(
        redis
            .cli_all(&["ACL", "SETUSER", "gw", "on", ">pw"])
            .unwrap()
            .trim(),
        "OK"
    );
    let mut args = vec!["ACL", "SETUSER", "gw"];
    args.extend(rules);
    let out = redis.cli_all(&args).unwrap();
    assert_eq!(out.trim(), "OK", "{rules:?}: {out}");
    let url = format!("redis://gw:pw@127.0.0.1:{}", redis.port);
    (redis, url)
}

/// Defect 4: a failed Join left a presence entry behind, refreshed forever.
#[tokio::test]
async fn a_failed_join_leaves_no_ghost_in_presence() {
    let (_redis, url) = acl_redis(&[
        "+@all",
        "-publish",
        "~*",
        "&*",
        "(+publish &gw:probe:* &gw:control)",
    ]);
    let config = format!("{FAST}presence_ttl_seconds = 3\n[namespaces.chat]\njoin_leave = true\n");
    let nodes = nodes_on(&url, 1, &config);
    let mut c = nodes[0].client(Encoding::Proto).await;
    let reply = c.call(subscribe("chat:room")).await;
    assert!(
        error_code(&reply).is_some(),
        "the Join announce was refused: {reply:?}"
    );
    // Across several refresh rounds (the TTL is 3 s; refreshes run every 3 s).
    for _ in 0..3 {
        let (status, p) = nodes[0].api("GET", "/api/v1/channels/chat:room/presence", "");
        assert_eq!(status, 200);
        // proto3 JSON leaves an empty list out.
        assert_eq!(p["clients"].as_array().map_or(0, Vec::len), 0, "{p}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
}

/// Defect 7: a Leave whose removal failed was never announced.
#[tokio::test]
async fn a_leave_is_announced_even_when_removing_the_entry_fails() {
    let (_redis, url) = acl_redis(&["+@all", "-zrem", "~*", "&*"]);
    let config = format!("{FAST}[namespaces.chat]\njoin_leave = true\n");
    let nodes = nodes_on(&url, 2, &config);
    let mut watcher = nodes[0].client(Encoding::Proto).await;
    ok(watcher.call(subscribe("chat:lobby")).await);
    let mut guest = nodes[1].client(Encoding::Proto).await;
    let Body::Connect(info) = ok(guest.call(Command::Connect(Default::default())).await) else {
        panic!()
    };
    ok(guest.call(subscribe("chat:lobby")).await);
    drop(guest);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "no Leave");
        if let Body::Leave(l) = watcher.push().await {
            assert_eq!(l.info.unwrap().client, info.client);
            break;
        }
    }
}

/// Defect 7: the clients of a crashed node never got a Leave. Now the node that removes
/// their expired presence entries announces it.
#[tokio::test]
async fn a_crashed_nodes_clients_are_announced_as_left() {
    let redis = Redis::start(false);
    let config = format!("{FAST}presence_ttl_seconds = 3\n[namespaces.chat]\njoin_leave = true\n");
    let mut nodes = nodes_on(&redis.url(), 2, &config);
    let mut watcher = nodes[0].client(Encoding::Proto).await;
    ok(watcher.call(subscribe("chat:lobby")).await);
    let mut guest = nodes[1].client(Encoding::Proto).await;
    let Body::Connect(info) = ok(guest.call(Command::Connect(Default::default())).await) else {
        panic!()
    };
    ok(guest.call(subscribe("chat:lobby")).await);
    let mut joined = false;
    while !joined {
        if let Body::Join(j) = watcher.push().await {
            joined = j.info.unwrap().client == info.client;
        }
    }
    nodes[1].kill9();
    let started = Instant::now();
    loop {
        if let Body::Leave(l) = watcher.push().await {
            assert_eq!(l.info.unwrap().client, info.client);
            break;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "within TTL + a sweep"
    );
    let (_, p) = nodes[0].api("GET", "/api/v1/channels/chat:lobby/presence", "");
    assert_eq!(
        p["clients"].as_array().map(Vec::len),
        Some(1),
        "only the watcher"
    );
}

/// Defect 5: nodes that spelled the same servers differently put one channel on different
/// servers; publications from one node never reached subscribers on the other.
#[tokio::test]
async fn nodes_agree_on_shards_however_their_urls_are_spelled() {
    let (a, b) = (Redis::start(false), Redis::start(false));
    let one = format!("redis://127.0.0.1:{},redis://127.0.0.1:{}", a.port, b.port);
    let other = format!(
        "redis://localhost:{}/0,redis://LOCALHOST:{}",
        b.port, a.port
    );
    let nodes = [node(&one, 0, FAST), node(&other, 1, FAST)];
    let channels: Vec<String> = (0..16).map(|i| format!("spell{i}")).collect();
    let mut sub = nodes[1].client(Encoding::Proto).await;
    for ch in &channels {
        ok(sub.call(subscribe(ch)).await);
    }
    for ch in &channels {
        api_publish(nodes[0].addr, ch, ch);
    }
    let mut seen = Seen::default();
    watch(&mut sub, &mut seen, |s| {
        s.payloads().len() == channels.len()
    })
    .await;
    // Same layout: no mismatch reported.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(nodes[0].metric("gateway_redis_layout_mismatch"), 0.0);
    // A node with another server list is reported by the others.
    let odd = node(&format!("redis://127.0.0.1:{}", a.port), 2, FAST);
    let deadline = Instant::now() + Duration::from_secs(12);
    while nodes[0].metric("gateway_redis_layout_mismatch") != 1.0 {
        assert!(Instant::now() < deadline, "mismatch never reported");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(odd);
}

/// Defect 6: changing the server list and reverting it resumed the old server's epoch, so
/// a recovery from before the change answered `recovered=true` without what was published
/// on the other server meanwhile. Now every layout change restarts the epochs.
#[tokio::test]
async fn a_reverted_server_list_does_not_resume_an_old_epoch() {
    let (a, b, c) = (
        Redis::start(false),
        Redis::start(false),
        Redis::start(false),
    );
    let two = format!("{},{}", a.url(), b.url());
    let three = format!("{},{},{}", a.url(), b.url(), c.url());
    let channels: Vec<String> = (0..30).map(|i| format!("moved{i}")).collect();
    let first = node(&two, 0, FAST);
    let mut epochs = Vec::new();
    for ch in &channels {
        let (_, epoch) = api_publish(first.addr, ch, "1");
        for i in 2..=3 {
            api_publish(first.addr, ch, &i.to_string());
        }
        epochs.push(epoch);
    }
    drop(first);
    let wider = node(&three, 1, FAST);
    for ch in &channels {
        for i in 4..=7 {
            api_publish(wider.addr, ch, &i.to_string());
        }
    }
    drop(wider);
    let moved = channels
        .iter()
        .filter(|ch| c.cli(&["EXISTS", &format!("gw:{{{ch}}}:s")]).as_deref() == Some(":1"))
        .count();
    assert!(
        moved > 0,
        "some channels lived on the third server meanwhile"
    );
    let back = node(&two, 2, FAST);
    let mut client = back.client(Encoding::Proto).await;
    for (ch, epoch) in channels.iter().zip(&epochs) {
        let Body::Subscribe(r) = ok(client.call(recover(ch, 3, epoch)).await) else {
            panic!()
        };
        assert!(
            !r.recovered,
            "{ch}: a recovery across a layout change: {r:?}"
        );
        assert_ne!(&r.epoch, epoch);
        ok(client
            .call(Command::Unsubscribe(broker_proto::v1::Unsubscribe {
                channel: ch.clone(),
            }))
            .await);
    }
}

/// Redis Sentinel: the master killed under load, a replica promoted; subscribers keep
/// receiving (after a reset: the promoted replica may lack acknowledged publications),
/// and nothing acknowledged after the failover is lost.
#[tokio::test]
async fn sentinel_failover_under_load_keeps_subscribers_receiving() {
    let mut master = Redis::start(false);
    let replica = Redis::start_with(
        false,
        &["--replicaof", "127.0.0.1", &master.port.to_string()],
    );
    let deadline = Instant::now() + TIMEOUT;
    while !replica
        .cli_all(&["INFO", "replication"])
        .unwrap_or_default()
        .contains("master_link_status:up")
    {
        assert!(Instant::now() < deadline, "replica never synced");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sentinels = Sentinels::start(&master);
    let nodes = nodes_on(&sentinels.url(), 2, FAST);
    let mut sub = nodes[1].client(Encoding::Proto).await;
    ok(sub.call(subscribe("sentinel")).await);
    let addr = nodes[0].addr;
    let publisher = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for i in 1..=60 {
            let (offset, epoch) = api_publish(addr, "sentinel", &format!("s{i}"));
            acked.push((format!("s{i}"), offset, epoch));
            std::thread::sleep(Duration::from_millis(50));
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(800));
    master.kill9();
    let acked = publisher.join().unwrap();
    assert_eq!(
        sentinels.master_port(),
        Some(replica.port),
        "the replica was promoted"
    );
    let first_epoch = acked[0].2.clone();
    let last_epoch = acked.last().unwrap().2.clone();
    assert_ne!(
        first_epoch, last_epoch,
        "a promoted replica restarts the epoch"
    );
    let mut seen = Seen::default();
    watch(&mut sub, &mut seen, |s| s.payloads().contains("s60")).await;
    seen.assert_exact();
    // Everything acknowledged under the final epoch reached the subscriber.
    let got: HashSet<String> = seen.by_epoch[&last_epoch]
        .iter()
        .map(|(_, d)| d.clone())
        .collect();
    for (data, _, epoch) in &acked {
        if *epoch == last_epoch {
            assert!(got.contains(data), "{data} acknowledged but not delivered");
        }
    }
    assert!(seen.resets.contains(&last_epoch));
}

/// Found by the adversarial review: after a manual `SENTINEL FAILOVER` the nodes kept
/// writing to the old master (still up, not yet told to replicate) for ~11 s; every
/// publication acknowledged there was lost when it became a replica. Now the node hears
/// `+switch-master` and moves its connections to the new master at once.
#[tokio::test]
async fn a_sentinel_switch_moves_writes_to_the_new_master_at_once() {
    let master = Redis::start(false);
    let replica = Redis::start_with(
        false,
        &["--replicaof", "127.0.0.1", &master.port.to_string()],
    );
    let sentinels = Sentinels::start(&master);
    let nodes = nodes_on(&sentinels.url(), 1, FAST);
    let mut sub = nodes[0].client(Encoding::Proto).await;
    let Body::Subscribe(s) = ok(sub.call(subscribe("switch")).await) else {
        panic!()
    };
    let (_, before) = api_publish(nodes[0].addr, "switch", "before");
    assert_eq!(before, s.epoch);
    let sentinel = format!("redis://127.0.0.1:{}", sentinels.ports[0]);
    let deadline = Instant::now() + Duration::from_secs(30);
    // The sentinels learn about the replica from the master's INFO; until then there is
    // nobody to fail over to.
    loop {
        let out = Process::new("redis-cli")
            .args(["-u", &sentinel, "SENTINEL", "FAILOVER", "mymaster"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == "OK" {
            break;
        }
        assert!(Instant::now() < deadline, "no failover possible");
        std::thread::sleep(Duration::from_millis(200));
    }
    while sentinels.master_port() != Some(replica.port) {
        assert!(Instant::now() < deadline, "the replica was never promoted");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The old master still accepts writes for seconds; the node must not use it.
    std::thread::sleep(Duration::from_millis(500));
    let (_, after) = api_publish(nodes[0].addr, "switch", "after");
    assert_ne!(after, before, "the promoted replica starts a new epoch");
    let stored = replica
        .cli_all(&["XRANGE", "gw:{switch}:s", "-", "+"])
        .unwrap();
    assert!(
        stored.contains("after"),
        "the publication went to the new master: {stored}"
    );
    let mut seen = Seen::default();
    watch(&mut sub, &mut seen, |s| s.payloads().contains("after")).await;
    assert!(seen.resets.contains(&after));
}

/// Found by the adversarial review: on Redis Cluster the node asked one random master
/// whether Redis persists every write and vouched for all of them. A master whose AOF is
/// off (persistence differing between masters, or turned off at runtime) that restarts
/// from an older RDB snapshot kept its epoch, so one (epoch, offset) named two payloads
/// and a recovery across the restart answered `recovered` with the wrong publications.
#[tokio::test]
async fn a_cluster_master_without_aof_restarted_from_a_snapshot_rotates_the_epoch() {
    let mut cluster = RedisCluster::start();
    for m in cluster.masters() {
        assert_eq!(
            m.cli(&["CONFIG", "SET", "appendonly", "yes"]).as_deref(),
            Some("+OK")
        );
    }
    // Every master persists every write when the node connects (and, with a patient
    // command timeout, the node keeps that connection through the restart below)...
    let patient = "[redis]\ncommand_timeout_ms = 15000\nprobe_interval_ms = 1000\n";
    let nodes = nodes_on(&cluster.url(), 1, patient);
    let slot = keyslot(&cluster.masters()[0], "gw:{mixed}:s");
    let (m, _) = cluster.owner_of(slot);
    // ...then the channel's master stops (as when AOF is rolled out one master at a time).
    let target = &cluster.masters()[m];
    assert_eq!(
        target
            .cli(&["CONFIG", "SET", "appendonly", "no"])
            .as_deref(),
        Some("+OK")
    );
    let mut first = (0, String::new());
    for i in 1..=3 {
        let ack = api_publish(nodes[0].addr, "mixed", &format!("before{i}"));
        if i == 1 {
            first = ack;
        }
    }
    assert_eq!(target.cli(&["SAVE"]).as_deref(), Some("+OK"));
    for i in 4..=5 {
        api_publish(nodes[0].addr, "mixed", &format!("before{i}"));
    }
    cluster.servers_mut()[m].restart();
    let (offset, epoch) = api_publish(nodes[0].addr, "mixed", "after4");
    assert_eq!(offset, first.0 + 3, "the snapshot ended at before3");
    assert_ne!(
        epoch, first.1,
        "offset {offset} names another payload now: a new epoch"
    );
    let mut late = nodes[0].client(Encoding::Proto).await;
    let Body::Subscribe(r) = ok(late.call(recover("mixed", first.0, &first.1)).await) else {
        panic!()
    };
    assert!(
        !r.recovered,
        "before4 and before5 are gone: no honest recovery"
    );
    assert_eq!(r.epoch, epoch);
}

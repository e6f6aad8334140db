//! `loadgen`: a load generator for rates k6 cannot drive. Opens N WebSocket connections,
//! subscribes them to C channels, publishes at a fixed total rate from M publisher
//! connections, and reports delivered messages/s, publish→deliver latency (a wall-clock
//! timestamp travels in each payload), lost and duplicated publications (from the gapless
//! per-channel offsets), and the gateway's CPU seconds and RSS read from `/metrics`, or
//! any server's from `/proc` with `--server-pid`.
//!
//! With `--publishers 0` it only holds the connections (`--hold`), for memory runs.

use broker_proto::v1::{ClientFrame, Publish, Subscribe, client_frame::Command};
use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use loadtest::{
    Ws, connect, connect_as, frames, gateway_process, now_ns, proc_processes, send_frames,
};
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug, Clone)]
#[command(about = "WebSocket load generator for the gateway")]
struct Args {
    /// Gateway address (host:port); WebSocket at /ws, metrics at /metrics. Several,
    /// comma-separated, spread the subscribers round-robin and sum the nodes' CPU and RSS.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Where publishers connect (default: the first --addr)
    #[arg(long)]
    publish_addr: Option<String>,
    /// Read CPU/RSS from these addresses instead of --addr (e.g. the nodes behind a proxy)
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Subscriber connections
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Channels; subscriber i joins channel i % channels
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Channel name prefix
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Publisher connections
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Total publications per second across all publishers
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of publishing
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Payload bytes per publication (at least 8: the timestamp)
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds to hold the connections after publishing (or at all, with 0 publishers)
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Connections opened concurrently
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Do not read the gateway's /metrics (e.g. when several loadgens share one gateway)
    #[arg(long)]
    no_metrics: bool,
    /// Read CPU and RSS from /proc for these process ids (comma-separated, summed) instead
    /// of /metrics: measures any server (e.g. the Bun peer), and each process is reported
    /// on its own line (e.g. gateway nodes and Redis)
    #[arg(long)]
    server_pid: Option<String>,
    /// Connection token for the subscribers (sent as `?token=`)
    #[arg(long)]
    token: Option<String>,
    /// Channels each connection subscribes to besides its own (they get no publications;
    /// for presence and memory load), spread over --extra-channels channels
    #[arg(long, default_value_t = 0)]
    extra_subscriptions: usize,
    #[arg(long, default_value_t = 1000)]
    extra_channels: usize,
}

/// Per-run counters shared by all tasks.
#[derive(Default)]
struct Stats {
    delivered: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    published: AtomicU64,
    publish_errors: AtomicU64,
    latency: Mutex<Option<Histogram<u64>>>,
    /// Wall-clock ns of the last delivery seen by any subscriber.
    last_delivery_ns: AtomicU64,
    /// Deliveries so far, updated as they arrive (the totals above are summed at the end).
    received: AtomicU64,
}

/// Reads one subscriber's stream; returns its last offset when `stop` is set.
async fn subscriber(mut ws: Ws, mut last: u64, stats: Arc<Stats>, stop: Arc<AtomicBool>) -> u64 {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut delivered, mut lost, mut dup) = (0u64, 0u64, 0u64);
    let mut last_ns = 0u64;
    while !stop.load(Relaxed) {
        let msg = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(m))) => m,
            Ok(_) => break,
        };
        let Message::Binary(payload) = msg else {
            continue;
        };
        let now = now_ns();
        last_ns = now;
        let before = delivered;
        for f in frames(&payload) {
            let Some(p) = f.publication else { continue };
            delivered += 1;
            if p.offset <= last {
                dup += 1;
                continue;
            }
            lost += p.offset - last - 1;
            last = p.offset;
            if p.data.len() >= 8 {
                let sent = u64::from_le_bytes(p.data[..8].try_into().unwrap_or_default());
                let _ = hist.record((now.saturating_sub(sent) / 1000).max(1));
            }
        }
        stats.received.fetch_add(delivered - before, Relaxed);
    }
    stats.last_delivery_ns.fetch_max(last_ns, Relaxed);
    stats.delivered.fetch_add(delivered, Relaxed);
    stats.lost.fetch_add(lost, Relaxed);
    stats.duplicated.fetch_add(dup, Relaxed);
    let mut merged = stats.latency.lock().unwrap_or_else(|e| e.into_inner());
    match merged.as_mut() {
        Some(m) => {
            let _ = m.add(&hist);
        }
        None => *merged = Some(hist),
    }
    last
}

async fn publisher(mut ws: Ws, index: usize, args: Args, stats: Arc<Stats>, deadline: Instant) {
    let per = args.rate / args.publishers as f64;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0u64;
    let mut next_id = 1u32;
    let mut acked = 0u64;
    let mut pad = vec![0u8; args.payload.max(8)];
    loop {
        tokio::select! {
            _ = tick.tick(), if Instant::now() < deadline => {
                let due = (start.elapsed().as_secs_f64() * per) as u64;
                let mut batch = Vec::new();
                while sent < due && batch.len() < 1000 {
                    let channel = (index + sent as usize * args.publishers) % args.channels;
                    pad[..8].copy_from_slice(&now_ns().to_le_bytes());
                    batch.push(ClientFrame {
                        id: next_id,
                        command: Some(Command::Publish(Publish {
                            channel: format!("{}{channel}", args.prefix),
                            data: Bytes::copy_from_slice(&pad),
                            ..Default::default()
                        })),
                    });
                    next_id = next_id.wrapping_add(1).max(1);
                    sent += 1;
                }
                if !batch.is_empty() && ws.send(send_frames(&batch)).await.is_err() {
                    break;
                }
            }
            msg = ws.next() => {
                let Some(Ok(Message::Binary(payload))) = msg else {
                    if msg.is_none() { break } else { continue }
                };
                for f in frames(&payload) {
                    if f.id == 0 { continue }
                    acked += 1;
                    if let Some(e) = f.error {
                        stats.publish_errors.fetch_add(1, Relaxed);
                        eprintln!("publish error {}", e.code);
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(5)), if Instant::now() >= deadline => break,
        }
        if Instant::now() >= deadline && acked >= sent {
            break;
        }
    }
    stats.published.fetch_add(acked, Relaxed);
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let stats = Arc::new(Stats::default());
    let metrics_addr = args
        .metrics_addr
        .clone()
        .unwrap_or_else(|| args.addr.clone());
    let sample = async || match (&args.server_pid, args.no_metrics) {
        (Some(pids), _) => proc_processes(pids),
        (None, true) => None,
        (None, false) => gateway_process(&metrics_addr)
            .await
            .map(|(cpu, rss)| vec![(0, cpu, rss)]),
    };
    let before = sample().await;

    // Open and subscribe the subscribers.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut opening = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let (gate, args) = (gate.clone(), args.clone());
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.ok()?;
            let addrs: Vec<&str> = args.addr.split(',').collect();
            let mut ws = connect_as(addrs[i % addrs.len()], args.token.as_deref())
                .await
                .map_err(|e| eprintln!("connect: {e}"))
                .ok()?;
            let channel = format!("{}{}", args.prefix, i % args.channels);
            let subscribe = |id: u32, channel: String| ClientFrame {
                id,
                command: Some(Command::Subscribe(Subscribe {
                    channel,
                    ..Default::default()
                })),
            };
            let mut subs = vec![subscribe(1, channel)];
            for j in 0..args.extra_subscriptions {
                let extra = (i * args.extra_subscriptions + j) % args.extra_channels.max(1);
                subs.push(subscribe(
                    j as u32 + 2,
                    format!("{}extra{extra}", args.prefix),
                ));
            }
            ws.send(send_frames(&subs)).await.ok()?;
            // The subscribe reply gives the offset this subscriber starts after.
            let (mut offset, mut replies) = (None, 0);
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Binary(p) = msg else { continue };
                for f in frames(&p).filter(|f| f.id != 0) {
                    if let Some(e) = f.error {
                        eprintln!("subscribe error {}", e.code);
                        return None;
                    }
                    if f.id == 1 {
                        offset = Some(f.subscribe.map_or(0, |s| s.offset));
                    }
                    replies += 1;
                }
                if replies == subs.len() {
                    return Some((ws, offset.unwrap_or(0)));
                }
            }
            None
        }));
    }
    let mut subscribers = Vec::with_capacity(args.connections);
    for o in opening {
        if let Ok(Some(s)) = o.await {
            subscribers.push(s);
        }
    }
    let opened = subscribers.len();
    println!(
        "subscribed {opened}/{} connections in {:.1}s",
        args.connections,
        started.elapsed().as_secs_f64()
    );
    let settled = sample().await;

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|(ws, last)| tokio::spawn(subscriber(ws, last, stats.clone(), stop.clone())))
        .collect();

    let t0 = Instant::now();
    let t0_ns = now_ns();
    if args.publishers > 0 {
        let deadline = t0 + Duration::from_secs_f64(args.duration);
        let mut pubs = Vec::new();
        for i in 0..args.publishers {
            let first = args.addr.split(',').next().unwrap_or_default().to_owned();
            let ws = connect(args.publish_addr.as_deref().unwrap_or(&first))
                .await
                .expect("publisher connects");
            pubs.push(tokio::spawn(publisher(
                ws,
                i,
                args.clone(),
                stats.clone(),
                deadline,
            )));
        }
        for p in pubs {
            let _ = p.await;
        }
        // Wait for the gateway to deliver what it still has queued: until every expected
        // delivery arrived, or none arrived for two seconds (bounded at two minutes).
        let expected = stats.published.load(Relaxed) * (opened / args.channels.max(1)) as u64;
        let (mut seen, mut quiet_since) = (0, Instant::now());
        let give_up = Instant::now() + Duration::from_secs(120);
        while Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = stats.received.load(Relaxed);
            if now >= expected || quiet_since.elapsed() > Duration::from_secs(2) {
                break;
            }
            if now != seen {
                (seen, quiet_since) = (now, Instant::now());
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let after = sample().await;
    if args.hold > 0.0 {
        println!("holding {opened} connections for {}s", args.hold);
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    }
    stop.store(true, Relaxed);
    for r in readers {
        let _ = r.await;
    }
    let delivered = stats.delivered.load(Relaxed);
    let published = stats.published.load(Relaxed);
    let subs_per_channel = opened as f64 / args.channels as f64;
    let expected = (published as f64 * subs_per_channel).round() as u64;
    let lost_gaps = stats.lost.load(Relaxed);
    let dup = stats.duplicated.load(Relaxed);
    let unique = delivered - dup;
    // Gaps count losses in the middle; a shortfall against the expected total counts
    // losses at the tail that no later offset revealed.
    let lost = lost_gaps.max(expected.saturating_sub(unique));
    let hist = stats
        .latency
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let ms = |q: f64| {
        hist.as_ref()
            .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
    };

    println!(
        "published {published} ({} errors) in {elapsed:.1}s",
        stats.publish_errors.load(Relaxed)
    );
    if published > 0 {
        println!(
            "delivered {delivered} of {expected} expected: {:.0} msgs/s; lost {lost}, duplicated {dup}",
            delivered as f64 / args.duration.min(elapsed),
        );
        println!(
            "latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            ms(0.5),
            ms(0.99),
            ms(0.999),
            ms(1.0)
        );
        // Deliveries over the time until the last one arrived: the rate the gateway
        // sustained, even when it fell behind the offered load and drained a backlog.
        let span = stats.last_delivery_ns.load(Relaxed).saturating_sub(t0_ns) as f64 / 1e9;
        if span > 0.0 {
            println!(
                "sustained {:.0} deliveries/s (last delivery {span:.1}s after publishing began)",
                delivered as f64 / span
            );
        }
    }
    if let (Some(b), Some(s), Some(a)) = (before, settled, after) {
        if args.server_pid.is_some() {
            for ((pid, b_cpu, b_rss), ((_, s_cpu, s_rss), (_, a_cpu, a_rss))) in
                b.iter().zip(s.iter().zip(a.iter()))
            {
                println!(
                    "process {pid}: rss {:.1} MiB -> {:.1} MiB -> {:.1} MiB; cpu {:.2}s while subscribing, {:.2}s while publishing",
                    b_rss / 1048576.0,
                    s_rss / 1048576.0,
                    a_rss / 1048576.0,
                    s_cpu - b_cpu,
                    a_cpu - s_cpu,
                );
            }
        }
        let total = |v: &[(u32, f64, f64)]| {
            v.iter()
                .fold((0.0, 0.0), |(c, r), (_, cpu, rss)| (c + cpu, r + rss))
        };
        let (b, s, a) = (total(&b), total(&s), total(&a));
        let cpu = a.0 - s.0;
        println!(
            "gateway: rss {:.1} MiB -> {:.1} MiB with {opened} connections ({:.0} B/conn); cpu {cpu:.2}s while publishing",
            b.1 / 1048576.0,
            s.1 / 1048576.0,
            (s.1 - b.1) / opened.max(1) as f64
        );
        if cpu > 0.0 && delivered > 0 {
            println!(
                "deliveries per gateway cpu-second: {:.0}",
                delivered as f64 / cpu
            );
            println!(
                "server cpu per delivery: {:.2} us",
                cpu * 1e6 / delivered as f64
            );
        }
    }
}

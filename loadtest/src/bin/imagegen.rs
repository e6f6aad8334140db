//! `imagegen`: benchmarks of the image paths, printing numbers.
//!
//! - `images`: a publisher uploads images (blobs) over the WebSocket and publishes them to
//!   one channel whose subscribers are spread over the given nodes; every subscriber
//!   fetches every image (over the WebSocket or by its signed URL) and checks its SHA-256.
//!   A second publisher sends small messages to the same channel meanwhile, so their
//!   latency with and without images flowing can be compared (`--images-per-second 0`).
//! - `rpc`: runs a backend that answers at once, then calls it directly (pooled HTTP/1.1)
//!   and through the gateway (`rpc` over the WebSocket), with the same concurrency.
//! - `uploads`: many clients upload at once, slowly; reports how many the node's upload
//!   budget admitted, refused (106) and completed, and the node's memory meanwhile.

use broker_proto::v1::{
    BlobGet, BlobPut, BlobRef, ClientFrame, Publish, Rpc, Subscribe, client_frame::Command,
};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use loadtest::{
    LiteFrame, Ws, connect, frames, gateway_process, http_get, metric, now_ns, redis_cpu,
    send_frames,
};
use sha2::{Digest, Sha256};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(about = "Benchmarks of the gateway's image paths")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Images(ImagesArgs),
    Rpc(RpcArgs),
    Uploads(UploadsArgs),
}

#[derive(Parser, Clone)]
struct ImagesArgs {
    /// Gateway nodes (comma-separated); subscribers round-robin, publishers on the first
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    #[arg(long, default_value_t = 1 << 20)]
    image_bytes: usize,
    /// Images published per second (0: small messages only)
    #[arg(long, default_value_t = 2.0)]
    images_per_second: f64,
    /// Small messages per second on the same channel
    #[arg(long, default_value_t = 100.0)]
    small_per_second: f64,
    #[arg(long, default_value_t = 100)]
    small_bytes: usize,
    /// Seconds of publishing
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// How subscribers fetch: `ws` (BlobGet) or `http` (the signed URL, on their node)
    #[arg(long, default_value = "ws")]
    fetch: String,
    /// Upload chunk bytes
    #[arg(long, default_value_t = 256 * 1024)]
    chunk: usize,
    /// Redis address (host:port) to read its CPU from
    #[arg(long)]
    redis: Option<String>,
    #[arg(long, default_value = "imgbench")]
    channel: String,
}

#[derive(Parser, Clone)]
struct RpcArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Where the backend listens (start the gateway with --rpc-url http://THIS)
    #[arg(long, default_value = "127.0.0.1:9099")]
    backend: String,
    /// Concurrent callers (each one call at a time)
    #[arg(long, default_value_t = 20)]
    callers: usize,
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 100)]
    payload: usize,
}

#[derive(Parser, Clone)]
struct UploadsArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    #[arg(long, default_value_t = 1000)]
    uploaders: usize,
    #[arg(long, default_value_t = 1 << 20)]
    image_bytes: usize,
    #[arg(long, default_value_t = 64 * 1024)]
    chunk: usize,
    /// Pause between one uploader's chunks
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    #[arg(long, default_value = "imgupload")]
    channel: String,
}

#[tokio::main]
async fn main() {
    match Cli::parse().mode {
        Mode::Images(a) => images(a).await,
        Mode::Rpc(a) => rpc(a).await,
        Mode::Uploads(a) => uploads(a).await,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A PNG header (so the gateway's sniffing accepts it) followed by pseudo-random bytes
/// unique to `seed`, `size` bytes in all.
fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13];
    v.extend_from_slice(b"IHDR");
    v.extend_from_slice(&640u32.to_be_bytes());
    v.extend_from_slice(&480u32.to_be_bytes());
    v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    v.reserve(size.saturating_sub(v.len()));
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size);
    v
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn summary(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  (n={})",
        ms(h, 0.5),
        ms(h, 0.99),
        ms(h, 0.999),
        ms(h, 1.0),
        h.len()
    )
}

/// Sends `frames` and reads until a reply to each id > 0 came; returns the replies.
async fn call(ws: &mut Ws, batch: Vec<ClientFrame>) -> Result<Vec<LiteFrame>, String> {
    let mut waiting: Vec<u32> = batch.iter().map(|f| f.id).filter(|&id| id > 0).collect();
    for f in batch {
        ws.send(send_frames(&[f]))
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut replies = Vec::new();
    while !waiting.is_empty() {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| "no reply within 30 s".to_string())?;
        let Some(Ok(Message::Binary(payload))) = msg else {
            match msg {
                Some(Ok(_)) => continue,
                other => return Err(format!("connection ended: {other:?}")),
            }
        };
        for f in frames(&payload) {
            if let Some(i) = waiting.iter().position(|&id| id == f.id) {
                waiting.swap_remove(i);
                replies.push(f);
            }
        }
    }
    Ok(replies)
}

fn subscribe(channel: &str) -> ClientFrame {
    ClientFrame {
        id: 1,
        command: Some(Command::Subscribe(Subscribe {
            channel: channel.to_owned(),
            ..Default::default()
        })),
    }
}

/// Uploads `bytes` as upload 1 in chunks; returns the stored blob's id.
async fn upload(
    ws: &mut Ws,
    channel: &str,
    bytes: &[u8],
    chunk: usize,
    next_id: &mut u32,
) -> Result<String, String> {
    let pieces: Vec<&[u8]> = bytes.chunks(chunk).collect();
    let mut batch = Vec::with_capacity(pieces.len());
    for (i, piece) in pieces.iter().enumerate() {
        let first = i == 0;
        *next_id += 1;
        batch.push(ClientFrame {
            id: *next_id,
            command: Some(Command::BlobPut(BlobPut {
                upload: 1,
                channel: if first {
                    channel.to_owned()
                } else {
                    String::new()
                },
                content_type: if first {
                    "image/png".into()
                } else {
                    String::new()
                },
                size: if first { bytes.len() as u64 } else { 0 },
                data: Bytes::copy_from_slice(piece),
                last: i + 1 == pieces.len(),
                id: String::new(),
            })),
        });
    }
    let last = *next_id;
    let replies = call(ws, batch).await?;
    if let Some(e) = replies.iter().find_map(|f| f.error.as_ref()) {
        return Err(format!("upload error {}", e.code));
    }
    replies
        .into_iter()
        .find(|f| f.id == last)
        .and_then(|f| f.blob_put?.blob)
        .map(|b| b.id)
        .ok_or_else(|| "no blob in the final reply".into())
}

#[derive(Default)]
struct ImageStats {
    images_ok: AtomicU64,
    bad_hash: AtomicU64,
    fetch_errors: AtomicU64,
    bytes: AtomicU64,
    small: AtomicU64,
    gaps: AtomicU64,
    last_ns: AtomicU64,
    image_latency: Mutex<Option<Histogram<u64>>>,
    small_latency: Mutex<Option<Histogram<u64>>>,
}

fn merge(into: &Mutex<Option<Histogram<u64>>>, h: &Histogram<u64>) {
    let mut m = into.lock().unwrap_or_else(|e| e.into_inner());
    match m.as_mut() {
        Some(m) => {
            let _ = m.add(h);
        }
        None => *m = Some(h.clone()),
    }
}

struct Download {
    id: String,
    published_ns: u64,
    hasher: Sha256,
    bytes: u64,
}

type Http = Client<HttpConnector, Full<Bytes>>;

async fn fetch_http(http: &Http, node: &str, url: &str) -> Result<Bytes, String> {
    let uri: hyper::Uri = format!("http://{node}{url}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let req = hyper::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let res = http.request(req).await.map_err(|e| e.to_string())?;
    if res.status() != 200 {
        return Err(format!("status {}", res.status()));
    }
    Ok(res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes())
}

/// One subscriber: records small-message latency, fetches and checks every image.
async fn image_subscriber(
    mut ws: Ws,
    node: String,
    args: ImagesArgs,
    stats: Arc<ImageStats>,
    http: Http,
    stop: Arc<AtomicBool>,
) {
    let (mut small, images) = (histogram(), Arc::new(Mutex::new(histogram())));
    let mut downloads: HashMap<u32, Download> = HashMap::new();
    let (mut next_id, mut last_offset) = (10u32, None::<u64>);
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
        for f in frames(&payload) {
            if let Some(p) = f.publication {
                if let Some(last) = last_offset
                    && p.offset > last + 1
                {
                    stats.gaps.fetch_add(p.offset - last - 1, Relaxed);
                }
                last_offset = Some(p.offset);
                let sent = p
                    .data
                    .get(..8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
                if p.blobs.is_empty() {
                    let _ = small.record((now.saturating_sub(sent) / 1000).max(1));
                    stats.small.fetch_add(1, Relaxed);
                    stats.last_ns.fetch_max(now, Relaxed);
                    continue;
                }
                for blob in p.blobs {
                    if args.fetch == "http" {
                        let (http, node, stats, images) =
                            (http.clone(), node.clone(), stats.clone(), images.clone());
                        tokio::spawn(async move {
                            match fetch_http(&http, &node, &blob.url).await {
                                Ok(bytes) => {
                                    let done = now_ns();
                                    check(&stats, &blob.id, &Sha256::digest(&bytes), bytes.len());
                                    let mut h = images.lock().unwrap_or_else(|e| e.into_inner());
                                    let _ = h.record((done.saturating_sub(sent) / 1000).max(1));
                                    stats.last_ns.fetch_max(done, Relaxed);
                                }
                                Err(e) => {
                                    eprintln!("fetch {}: {e}", blob.url);
                                    stats.fetch_errors.fetch_add(1, Relaxed);
                                }
                            }
                        });
                        continue;
                    }
                    next_id += 1;
                    downloads.insert(
                        next_id,
                        Download {
                            id: blob.id.clone(),
                            published_ns: sent,
                            hasher: Sha256::new(),
                            bytes: 0,
                        },
                    );
                    let get = ClientFrame {
                        id: next_id,
                        command: Some(Command::BlobGet(BlobGet {
                            id: blob.id,
                            channel: args.channel.clone(),
                        })),
                    };
                    if ws.send(send_frames(&[get])).await.is_err() {
                        return;
                    }
                }
            } else if let Some(chunk) = f.blob_chunk {
                let Some(d) = downloads.get_mut(&f.id) else {
                    continue;
                };
                d.hasher.update(&chunk.data);
                d.bytes += chunk.data.len() as u64;
                if chunk.last
                    && let Some(d) = downloads.remove(&f.id)
                {
                    check(&stats, &d.id, &d.hasher.finalize(), d.bytes as usize);
                    let mut h = images.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = h.record((now.saturating_sub(d.published_ns) / 1000).max(1));
                    stats.last_ns.fetch_max(now, Relaxed);
                }
            } else if let Some(e) = f.error {
                eprintln!("subscriber got error {} for frame {}", e.code, f.id);
                if downloads.remove(&f.id).is_some() {
                    stats.fetch_errors.fetch_add(1, Relaxed);
                }
            }
        }
    }
    merge(&stats.small_latency, &small);
    merge(
        &stats.image_latency,
        &images.lock().unwrap_or_else(|e| e.into_inner()),
    );
}

fn check(stats: &ImageStats, id: &str, digest: &[u8], len: usize) {
    if hex(digest) == id {
        stats.images_ok.fetch_add(1, Relaxed);
        stats.bytes.fetch_add(len as u64, Relaxed);
    } else {
        stats.bad_hash.fetch_add(1, Relaxed);
    }
}

fn payload(bytes: usize) -> Vec<u8> {
    let mut data = vec![b'.'; bytes.max(8)];
    data[..8].copy_from_slice(&now_ns().to_le_bytes());
    data
}

async fn images(args: ImagesArgs) {
    let nodes: Vec<String> = args.addr.split(',').map(str::to_owned).collect();
    let stats = Arc::new(ImageStats::default());
    let http: Http = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for i in 0..args.subscribers {
        let node = nodes[i % nodes.len()].clone();
        let mut ws = connect(&node).await.expect("subscriber connects");
        let reply = call(&mut ws, vec![subscribe(&args.channel)])
            .await
            .expect("subscribed");
        if let Some(e) = reply[0].error.as_ref() {
            panic!("subscribe error {}", e.code);
        }
        readers.push(tokio::spawn(image_subscriber(
            ws,
            node,
            args.clone(),
            stats.clone(),
            http.clone(),
            stop.clone(),
        )));
    }
    println!(
        "{} subscribers on {} node(s); images of {} bytes at {}/s, small messages of {} bytes at {}/s, for {}s; fetch over {}",
        args.subscribers,
        nodes.len(),
        args.image_bytes,
        args.images_per_second,
        args.small_bytes,
        args.small_per_second,
        args.duration,
        args.fetch
    );
    let all_nodes = args.addr.clone();
    let cpu_before = gateway_process(&all_nodes).await.map(|p| p.0);
    let redis_before = match &args.redis {
        Some(r) => redis_cpu(r).await,
        None => None,
    };
    let t0 = Instant::now();
    let t0_ns = now_ns();
    let deadline = t0 + Duration::from_secs_f64(args.duration);

    // Small messages.
    let small_pub = {
        let (args, node) = (args.clone(), nodes[0].clone());
        tokio::spawn(async move {
            let mut ws = connect(&node).await.expect("publisher connects");
            if args.small_per_second <= 0.0 {
                return 0u64;
            }
            let (mut sent, mut acked, mut errors) = (0u64, 0u64, 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tokio::select! {
                    _ = tick.tick(), if Instant::now() < deadline => {
                        let due = (t0.elapsed().as_secs_f64() * args.small_per_second) as u64;
                        let mut batch = Vec::new();
                        while sent < due {
                            sent += 1;
                            batch.push(ClientFrame {
                                id: sent as u32,
                                command: Some(Command::Publish(Publish {
                                    channel: args.channel.clone(),
                                    data: payload(args.small_bytes).into(),
                                    ..Default::default()
                                })),
                            });
                        }
                        if !batch.is_empty() && ws.send(send_frames(&batch)).await.is_err() {
                            break;
                        }
                    }
                    msg = ws.next() => {
                        let Some(Ok(Message::Binary(p))) = msg else {
                            if msg.is_none() { break } else { continue }
                        };
                        for f in frames(&p).filter(|f| f.id > 0) {
                            acked += 1;
                            if let Some(e) = f.error {
                                errors += 1;
                                eprintln!("small publish error {}", e.code);
                            }
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_secs(10)), if Instant::now() >= deadline => break,
                }
                if Instant::now() >= deadline && acked >= sent {
                    break;
                }
            }
            acked - errors
        })
    };

    // Images: upload, then publish with the blob.
    let mut upload_times = histogram();
    let mut images_published = 0u64;
    if args.images_per_second > 0.0 {
        let mut ws = connect(&nodes[0]).await.expect("publisher connects");
        let mut next_id = 0u32;
        let seed = now_ns();
        let mut i = 0u64;
        while Instant::now() < deadline {
            let due = t0 + Duration::from_secs_f64(i as f64 / args.images_per_second);
            tokio::time::sleep_until(due.into()).await;
            let bytes = image(args.image_bytes, seed + i);
            i += 1;
            let started = Instant::now();
            let id = match upload(&mut ws, &args.channel, &bytes, args.chunk, &mut next_id).await {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("upload: {e}");
                    continue;
                }
            };
            let _ = upload_times.record(started.elapsed().as_micros() as u64);
            assert_eq!(
                id,
                hex(&Sha256::digest(&bytes)),
                "the server's id is the SHA-256"
            );
            next_id += 1;
            let publish = ClientFrame {
                id: next_id,
                command: Some(Command::Publish(Publish {
                    channel: args.channel.clone(),
                    data: payload(8).into(),
                    blobs: vec![BlobRef {
                        id,
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            };
            match call(&mut ws, vec![publish]).await {
                Ok(r) if r[0].error.is_none() => images_published += 1,
                Ok(r) => eprintln!("image publish error {:?}", r[0].error),
                Err(e) => eprintln!("image publish: {e}"),
            }
        }
    }
    let small_published = small_pub.await.unwrap_or(0);
    // Wait for every fetch and small delivery (bounded).
    let subs = args.subscribers as u64;
    let give_up = Instant::now() + Duration::from_secs(120);
    let (mut seen, mut quiet) = (0, Instant::now());
    while Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ok = stats.images_ok.load(Relaxed)
            + stats.bad_hash.load(Relaxed)
            + stats.fetch_errors.load(Relaxed);
        let small = stats.small.load(Relaxed);
        if ok >= images_published * subs && small >= small_published * subs {
            break;
        }
        if ok + small != seen {
            (seen, quiet) = (ok + small, Instant::now());
        } else if quiet.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let cpu_after = gateway_process(&all_nodes).await.map(|p| p.0);
    let redis_after = match &args.redis {
        Some(r) => redis_cpu(r).await,
        None => None,
    };
    stop.store(true, Relaxed);
    for r in readers {
        let _ = r.await;
    }
    let span = stats.last_ns.load(Relaxed).saturating_sub(t0_ns) as f64 / 1e9;
    let bytes = stats.bytes.load(Relaxed);
    println!(
        "images: published {images_published}, fetched and verified {} of {} (bad hash {}, fetch errors {})",
        stats.images_ok.load(Relaxed),
        images_published * subs,
        stats.bad_hash.load(Relaxed),
        stats.fetch_errors.load(Relaxed)
    );
    if images_published > 0 {
        println!(
            "upload (publisher, {} B): {}",
            args.image_bytes,
            summary(&upload_times)
        );
        if let Some(h) = stats.image_latency.lock().unwrap().as_ref() {
            println!("image publish -> verified at a subscriber: {}", summary(h));
        }
        println!(
            "delivered {:.1} MiB/s of images ({:.1} MiB over {span:.1}s)",
            bytes as f64 / 1048576.0 / span.max(1e-9),
            bytes as f64 / 1048576.0
        );
    }
    println!(
        "small: published {small_published}, delivered {} of {} (gaps {})",
        stats.small.load(Relaxed),
        small_published * subs,
        stats.gaps.load(Relaxed)
    );
    if let Some(h) = stats.small_latency.lock().unwrap().as_ref() {
        println!("small message latency: {}", summary(h));
    }
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        println!(
            "gateway cpu: {:.2}s over {span:.1}s ({:.0}% of one core)",
            b - a,
            (b - a) / span * 100.0
        );
    }
    if let (Some(a), Some(b)) = (redis_before, redis_after) {
        println!(
            "redis cpu: {:.2}s ({:.0}% of one core)",
            b - a,
            (b - a) / span * 100.0
        );
    }
}

/// The backend: answers every POST at once with its body.
async fn serve_backend(listen: &str) -> tokio::task::JoinHandle<()> {
    use hyper::{Request, Response, body::Incoming, service::service_fn};
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .unwrap_or_else(|e| panic!("backend cannot listen on {listen}: {e}"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(
                        Response::builder()
                            .header("content-type", "application/octet-stream")
                            .body(Full::new(body))
                            .expect("response"),
                    )
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    })
}

async fn rpc(args: RpcArgs) {
    let backend = serve_backend(&args.backend).await;
    let data = Bytes::from(vec![7u8; args.payload]);
    let duration = Duration::from_secs_f64(args.duration);

    // Directly: pooled HTTP/1.1, one call at a time per caller.
    let http: Http = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for _ in 0..args.callers {
        let (http, data, url) = (
            http.clone(),
            data.clone(),
            format!("http://{}/echo", args.backend),
        );
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            while t0.elapsed() < duration {
                let started = Instant::now();
                let req = hyper::Request::post(url.as_str())
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(data.clone()))
                    .expect("request");
                let Ok(res) = http.request(req).await else {
                    continue;
                };
                let Ok(body) = res.into_body().collect().await else {
                    continue;
                };
                assert_eq!(body.to_bytes(), data);
                let _ = h.record(started.elapsed().as_micros().max(1) as u64);
            }
            h
        }));
    }
    let mut direct = histogram();
    for t in tasks {
        let _ = direct.add(t.await.expect("caller"));
    }
    let direct_secs = t0.elapsed().as_secs_f64();

    // Through the gateway.
    let cpu_before = gateway_process(&args.addr).await.map(|p| p.0);
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for _ in 0..args.callers {
        let (addr, data) = (args.addr.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let mut ws = connect(&addr).await.expect("caller connects");
            let (mut h, mut id, mut errors) = (histogram(), 0u32, 0u64);
            while t0.elapsed() < duration {
                id += 1;
                let started = Instant::now();
                let frame = ClientFrame {
                    id,
                    command: Some(Command::Rpc(Rpc {
                        method: "echo".into(),
                        data: data.clone(),
                        content_type: "application/octet-stream".into(),
                    })),
                };
                let reply = call(&mut ws, vec![frame]).await.expect("rpc reply");
                match (&reply[0].error, &reply[0].rpc) {
                    (None, Some(r)) if r.data == data => {
                        let _ = h.record(started.elapsed().as_micros().max(1) as u64);
                    }
                    other => {
                        errors += 1;
                        eprintln!("rpc: {other:?}");
                    }
                }
            }
            (h, errors)
        }));
    }
    let (mut gateway, mut errors) = (histogram(), 0);
    for t in tasks {
        let (h, e) = t.await.expect("caller");
        let _ = gateway.add(h);
        errors += e;
    }
    let gateway_secs = t0.elapsed().as_secs_f64();
    let cpu_after = gateway_process(&args.addr).await.map(|p| p.0);
    backend.abort();

    println!(
        "{} callers, {} B requests and answers",
        args.callers, args.payload
    );
    println!(
        "direct:  {:.0} calls/s  {}",
        direct.len() as f64 / direct_secs,
        summary(&direct)
    );
    println!(
        "gateway: {:.0} calls/s  {}  errors {errors}",
        gateway.len() as f64 / gateway_secs,
        summary(&gateway)
    );
    println!(
        "added by the gateway: p50 {:+.2} ms, p99 {:+.2} ms",
        ms(&gateway, 0.5) - ms(&direct, 0.5),
        ms(&gateway, 0.99) - ms(&direct, 0.99)
    );
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        println!(
            "gateway cpu: {:.2}s, {:.1} µs per call",
            b - a,
            (b - a) * 1e6 / gateway.len().max(1) as f64
        );
    }
}

#[derive(Default)]
struct UploadStats {
    completed: AtomicU64,
    refused: AtomicU64,
    other_errors: AtomicU64,
    wrong_id: AtomicU64,
}

async fn uploads(args: UploadsArgs) {
    let before = node_memory(&args.addr).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    let mut opening = Vec::new();
    for _ in 0..args.uploaders {
        let (gate, addr) = (gate.clone(), args.addr.clone());
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.ok()?;
            connect(&addr).await.ok()
        }));
    }
    let mut sockets = Vec::new();
    for o in opening {
        if let Ok(Some(ws)) = o.await {
            sockets.push(ws);
        }
    }
    let connected = node_memory(&args.addr).await;
    println!(
        "{} uploaders connected; each uploads {} B in {} B chunks, one every {} ms",
        sockets.len(),
        args.image_bytes,
        args.chunk,
        args.interval_ms
    );
    let stats = Arc::new(UploadStats::default());
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (addr, done) = (args.addr.clone(), done.clone());
        tokio::spawn(async move {
            let (mut rss, mut held) = (0f64, 0f64);
            while !done.load(Relaxed) {
                if let Some((r, h)) = node_memory(&addr).await {
                    rss = rss.max(r);
                    held = held.max(h);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (rss, held)
        })
    };
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut ws) in sockets.into_iter().enumerate() {
        let (args, stats) = (args.clone(), stats.clone());
        tasks.push(tokio::spawn(async move {
            let bytes = image(args.image_bytes, now_ns() ^ i as u64);
            let expected = hex(&Sha256::digest(&bytes));
            let pieces: Vec<&[u8]> = bytes.chunks(args.chunk).collect();
            for (k, piece) in pieces.iter().enumerate() {
                let first = k == 0;
                let frame = ClientFrame {
                    id: k as u32 + 1,
                    command: Some(Command::BlobPut(BlobPut {
                        upload: 1,
                        channel: if first {
                            args.channel.clone()
                        } else {
                            String::new()
                        },
                        content_type: if first {
                            "image/png".into()
                        } else {
                            String::new()
                        },
                        size: if first { bytes.len() as u64 } else { 0 },
                        data: Bytes::copy_from_slice(piece),
                        last: k + 1 == pieces.len(),
                        id: String::new(),
                    })),
                };
                let reply = match call(&mut ws, vec![frame]).await {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("upload: {e}");
                        stats.other_errors.fetch_add(1, Relaxed);
                        return;
                    }
                };
                match &reply[0].error {
                    Some(e) if e.code == 106 => {
                        stats.refused.fetch_add(1, Relaxed);
                        return;
                    }
                    Some(e) => {
                        eprintln!("upload error {}", e.code);
                        stats.other_errors.fetch_add(1, Relaxed);
                        return;
                    }
                    None => {}
                }
                if k + 1 == pieces.len() {
                    let id = reply[0]
                        .blob_put
                        .as_ref()
                        .and_then(|b| b.blob.as_ref())
                        .map(|b| b.id.clone());
                    if id.as_deref() == Some(expected.as_str()) {
                        stats.completed.fetch_add(1, Relaxed);
                    } else {
                        stats.wrong_id.fetch_add(1, Relaxed);
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let took = t0.elapsed().as_secs_f64();
    done.store(true, Relaxed);
    let (max_rss, max_held) = sampler.await.unwrap_or_default();
    let after = node_memory(&args.addr).await;
    println!(
        "in {took:.1}s: completed {} (wrong id {}), refused with 106 {}, other errors {}",
        stats.completed.load(Relaxed),
        stats.wrong_id.load(Relaxed),
        stats.refused.load(Relaxed),
        stats.other_errors.load(Relaxed)
    );
    let mib = |b: f64| b / 1048576.0;
    if let (Some(b), Some(c), Some(a)) = (before, connected, after) {
        println!(
            "gateway rss: {:.1} MiB before, {:.1} MiB connected, {:.1} MiB max while uploading, {:.1} MiB after; unfinished uploads held at most {:.1} MiB",
            mib(b.0),
            mib(c.0),
            mib(max_rss),
            mib(a.0),
            mib(max_held)
        );
    }
}

/// `(rss bytes, unfinished upload bytes)` of one node.
async fn node_memory(addr: &str) -> Option<(f64, f64)> {
    let text = http_get(addr, "/metrics").await?;
    Some((
        metric(&text, "process_resident_memory_bytes")?,
        metric(&text, "gateway_blob_upload_bytes").unwrap_or(0.0),
    ))
}

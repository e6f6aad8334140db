//! Images through the real binary: chunked uploads over the WebSocket and by HTTP, dedup,
//! every limit and error code, downloads over the WebSocket (interleaved behind small
//! frames) and by signed URL (caching headers, 304, 206, tampering, expiry), blobs in
//! publications and history, cross-node reads through Redis, and every RPC outcome
//! against a small HTTP backend this test runs.

mod common;

use base64::Engine;
use broker_proto::{
    Encoding,
    v1::{
        BlobGet, BlobPut, BlobRef, ClientFrame, HistoryRequest, Publish, Rpc, ServerFrame,
        client_frame::Command, server_frame::Body,
    },
};
use bytes::Bytes;
use common::*;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

const KEY: &str = "test-signing-key";

/// `[blobs]` with the test key plus `blobs`; `[limits]` (4 MiB messages) plus `limits`.
fn config_with(blobs: &str, limits: &str) -> String {
    format!(
        "[blobs]\nsigning_key = \"{KEY}\"\nmax_uploads_per_connection = 2\n{blobs}\n[limits]\nmax_message_bytes = 4194304\n{limits}\n"
    )
}

fn config(blobs: &str) -> String {
    config_with(&format!("max_bytes = 3000000\n{blobs}"), "")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A PNG of `size` bytes that says it is `w`×`h` (the gateway reads headers, not pixels).
fn png(w: u32, h: u32, size: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13];
    v.extend_from_slice(b"IHDR");
    v.extend_from_slice(&w.to_be_bytes());
    v.extend_from_slice(&h.to_be_bytes());
    v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push(x as u8);
    }
    v.truncate(size);
    v
}

fn put(upload: u32, channel: &str, size: usize, data: &[u8], last: bool) -> Command {
    Command::BlobPut(BlobPut {
        upload,
        channel: channel.into(),
        content_type: "image/png".into(),
        size: size as u64,
        data: Bytes::copy_from_slice(data),
        last,
        id: String::new(),
    })
}

/// Uploads `bytes` in chunks of `chunk`, checking the flow-control replies; returns the
/// stored blob's reference.
async fn upload(c: &mut Client, channel: &str, bytes: &[u8], chunk: usize) -> BlobRef {
    let n = bytes.len().div_ceil(chunk);
    for (i, part) in bytes.chunks(chunk).enumerate() {
        let last = i + 1 == n;
        let cmd = if i == 0 {
            put(1, channel, bytes.len(), part, last)
        } else {
            Command::BlobPut(BlobPut {
                upload: 1,
                data: Bytes::copy_from_slice(part),
                last,
                ..Default::default()
            })
        };
        let reply = ok(c.call(cmd).await);
        let Body::BlobPut(r) = reply else {
            panic!("{reply:?}")
        };
        if last {
            return r.blob.expect("the last chunk's reply carries the blob");
        }
        assert!(
            r.blob.is_none(),
            "a non-final chunk's reply carries no blob"
        );
    }
    unreachable!()
}

/// Downloads a blob over the WebSocket; also returns every frame seen meanwhile.
async fn download(c: &mut Client, id: &str, channel: &str) -> (Vec<u8>, Vec<ServerFrame>) {
    c.send_frames(&[ClientFrame {
        id: 900,
        command: Some(Command::BlobGet(BlobGet {
            id: id.into(),
            channel: channel.into(),
        })),
    }])
    .await;
    let (mut bytes, mut seen) = (Vec::new(), Vec::new());
    loop {
        let f = c.next().await;
        seen.push(f.clone());
        if f.id != 900 {
            continue;
        }
        match f.body {
            Some(Body::BlobChunk(chunk)) => {
                assert_eq!(chunk.id, id);
                assert_eq!(chunk.offset as usize, bytes.len(), "chunks in order");
                assert!(chunk.data.len() <= 64 * 1024, "chunks are at most 64 KiB");
                if chunk.offset == 0 {
                    assert!(chunk.size > 0 && !chunk.content_type.is_empty());
                }
                bytes.extend_from_slice(&chunk.data);
                if chunk.last {
                    return (bytes, seen);
                }
            }
            other => panic!("{other:?} {:?}", f.error),
        }
    }
}

/// A raw HTTP request; returns status, headers (lowercase names) and body bytes.
fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) and close before reading a large body.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, resp[split + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A URL for blob `id` signed with the test key, expiring at `expires`.
fn signed(id: &str, channel: &str, expires: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(format!("blob\n{id}\n{channel}\n{expires}").as_bytes());
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("/blobs/{id}?channel={channel}&expires={expires}&sig={sig}")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_chunked_upload_is_stored_once_and_read_back_byte_for_byte() {
    let server = Server::start(&config(""));
    let mut c = server.client(Encoding::Proto).await;
    let image = png(640, 480, 300_000, 1);
    let blob = upload(&mut c, "room", &image, 16 * 1024).await;
    assert_eq!(blob.id, sha(&image), "the id is the SHA-256 of the bytes");
    assert_eq!(
        (
            blob.size,
            blob.content_type.as_str(),
            blob.width,
            blob.height
        ),
        (image.len() as u64, "image/png", 640, 480)
    );
    assert!(
        blob.url
            .starts_with(&format!("/blobs/{}?channel=room&expires=", blob.id))
    );
    let (back, _) = download(&mut c, &blob.id, "room").await;
    assert_eq!(sha(&back), sha(&image));
    // Known already: the first chunk names the id and the rest is skipped.
    let reply = ok(c
        .call(Command::BlobPut(BlobPut {
            upload: 5,
            channel: "room".into(),
            content_type: "image/png".into(),
            size: image.len() as u64,
            data: Bytes::copy_from_slice(&image[..1000]),
            last: false,
            id: blob.id.clone(),
        }))
        .await);
    let Body::BlobPut(r) = reply else { panic!() };
    assert_eq!(r.blob.unwrap().id, blob.id);
    let (_, m) = server.http("GET", "/metrics", &[], "");
    assert!(
        m.contains("gateway_blob_uploads_total{outcome=\"known\"} 1"),
        "{m}"
    );
    // JSON clients get the same, bytes in base64.
    let mut j = server.client(Encoding::Json).await;
    let (back, _) = download(&mut j, &blob.id, "room").await;
    assert_eq!(sha(&back), sha(&image));
}

#[tokio::test]
async fn every_bad_upload_gets_its_code_and_the_node_keeps_serving() {
    let server = Server::start(&config(
        "upload_budget_bytes = 400000\n[namespaces.pngonly]\nblob_types = [\"image/png\"]\n[namespaces.gifonly]\nblob_types = [\"image/gif\"]",
    ));
    let mut c = server.client(Encoding::Proto).await;
    let image = png(10, 10, 2000, 2);
    let code = |f: ServerFrame| f.error.map(|e| e.code);
    // No size or type on a first chunk: 113.
    let missing = Command::BlobPut(BlobPut {
        upload: 1,
        channel: "room".into(),
        data: Bytes::from_static(b"x"),
        ..Default::default()
    });
    assert_eq!(code(c.call(missing).await), Some(113));
    // Larger than max_bytes: 110.
    assert_eq!(
        code(c.call(put(1, "room", 4_000_000, &image[..10], false)).await),
        Some(110)
    );
    // More bytes than declared: 113, and the upload is over.
    assert_eq!(
        code(c.call(put(1, "room", 5, &image[..10], false)).await),
        Some(113)
    );
    // Fewer than declared at the end: 113.
    ok(c.call(put(1, "room", 2000, &image[..1000], false)).await);
    let rest = Command::BlobPut(BlobPut {
        upload: 1,
        data: Bytes::copy_from_slice(&image[1000..1500]),
        last: true,
        ..Default::default()
    });
    assert_eq!(code(c.call(rest).await), Some(113));
    // A hash that does not match the claimed id: 113.
    let lying = Command::BlobPut(BlobPut {
        id: sha(b"something else"),
        ..match put(2, "room", 2000, &image, true) {
            Command::BlobPut(p) => p,
            _ => unreachable!(),
        }
    });
    assert_eq!(code(c.call(lying).await), Some(113));
    // Claimed JPEG, bytes are PNG: 112. Not an image: 112. Not allowed here: 112.
    let mut jpeg = match put(3, "room", 2000, &image, true) {
        Command::BlobPut(p) => p,
        _ => unreachable!(),
    };
    jpeg.content_type = "image/jpeg".into();
    assert_eq!(code(c.call(Command::BlobPut(jpeg)).await), Some(112));
    let html = b"<html><script>alert(1)</script></html>".repeat(10);
    assert_eq!(
        code(c.call(put(3, "room", html.len(), &html, true)).await),
        Some(112)
    );
    assert_eq!(
        code(c.call(put(3, "gifonly:x", 2000, &image, true)).await),
        Some(112)
    );
    ok(c.call(put(3, "pngonly:x", 2000, &image, true)).await);
    // Two uploads in flight at most on a connection: 106.
    ok(c.call(put(10, "room", 2000, &image[..100], false)).await);
    ok(c.call(put(11, "room", 2000, &image[..100], false)).await);
    assert_eq!(
        code(c.call(put(12, "room", 2000, &image[..100], false)).await),
        Some(106)
    );
    // The node's upload memory (400 kB; buffers count at their capacity) is shared:
    // another connection hits it: 106.
    let mut other = server.client(Encoding::Proto).await;
    let big = png(10, 10, 200_000, 3);
    ok(other.call(put(1, "room", 300_000, &big, false)).await);
    assert_eq!(
        code(
            other
                .call(put(2, "room", 300_000, &big[..100_000], false))
                .await
        ),
        Some(106)
    );
    // A blob nobody stored: 111, for publish and download alike.
    let ghost = BlobRef {
        id: sha(b"never stored"),
        ..Default::default()
    };
    let publish = Command::Publish(Publish {
        channel: "room".into(),
        blobs: vec![ghost.clone()],
        ..Default::default()
    });
    assert_eq!(code(c.call(publish).await), Some(111));
    let get = Command::BlobGet(BlobGet {
        id: ghost.id,
        channel: "room".into(),
    });
    assert_eq!(code(c.call(get).await), Some(111));
    assert_node_serves(&server).await;
}

#[tokio::test]
async fn abandoned_and_disconnected_uploads_free_their_memory() {
    let server = Server::start(&config_with(
        "max_bytes = 3000000\nupload_idle_seconds = 1",
        "ping_interval_ms = 300",
    ));
    let held = |s: &Server| s.metric("gateway_blob_upload_bytes");
    let image = png(10, 10, 100_000, 4);
    let mut c = server.client(Encoding::Proto).await;
    ok(c.call(put(1, "room", image.len(), &image[..60_000], false))
        .await);
    let first = held(&server);
    assert!(
        (60_000.0..=100_000.0).contains(&first),
        "the chunk's buffer is counted: {first}"
    );
    drop(c);
    let deadline = Instant::now() + TIMEOUT;
    while held(&server) != 0.0 {
        assert!(
            Instant::now() < deadline,
            "a closed connection frees its uploads"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = server.client(Encoding::Proto).await;
    ok(c.call(put(1, "room", image.len(), &image[..60_000], false))
        .await);
    let deadline = Instant::now() + TIMEOUT;
    while held(&server) != 0.0 {
        assert!(Instant::now() < deadline, "an idle upload is dropped");
        // Keep the connection itself alive.
        ok(c.call(Command::Ping(Default::default())).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rest = Command::BlobPut(BlobPut {
        upload: 1,
        data: Bytes::copy_from_slice(&image[60_000..]),
        last: true,
        ..Default::default()
    });
    assert_eq!(
        c.call(rest).await.error.map(|e| e.code),
        Some(113),
        "it is gone"
    );
}

#[tokio::test]
async fn signed_urls_serve_cacheable_bytes_and_refuse_tampering_or_expiry() {
    let with_chat = format!("{}[namespaces.chat]\n", config(""));
    let server = Server::start_with(&with_chat, &["--api-key", "test-key"]);
    let image = png(32, 16, 150_000, 5);
    let (status, headers, body) = http_raw(
        server.addr,
        "POST",
        "/api/v1/blobs?channel=chat%3A%23alice",
        &[("X-API-Key", "test-key"), ("Content-Type", "image/png")],
        &image,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let blob = &reply["blob"];
    assert_eq!(blob["id"], sha(&image));
    assert_eq!(
        (blob["width"].as_u64(), blob["height"].as_u64()),
        (Some(32), Some(16))
    );
    let url = blob["url"].as_str().unwrap();
    assert!(url.contains("channel=chat:%23alice"), "{url}");

    let (status, headers, bytes) = http_raw(server.addr, "GET", url, &[], b"");
    assert_eq!(status, 200);
    assert_eq!(sha(&bytes), sha(&image));
    let etag = format!("\"{}\"", sha(&image));
    assert_eq!(header(&headers, "etag"), Some(etag.as_str()));
    assert_eq!(header(&headers, "content-type"), Some("image/png"));
    assert_eq!(header(&headers, "content-length"), Some("150000"));
    assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
    let cache = header(&headers, "cache-control").unwrap();
    assert!(
        cache.starts_with("private, max-age=") && cache.ends_with(", immutable"),
        "{cache}"
    );
    // Conditional and partial requests.
    let (status, _, body) = http_raw(server.addr, "GET", url, &[("If-None-Match", &etag)], b"");
    assert_eq!((status, body.len()), (304, 0));
    let (status, headers, body) =
        http_raw(server.addr, "GET", url, &[("Range", "bytes=100-199")], b"");
    assert_eq!(status, 206);
    assert_eq!(body, &image[100..200]);
    assert_eq!(
        header(&headers, "content-range"),
        Some("bytes 100-199/150000")
    );
    let (status, _, _) = http_raw(server.addr, "GET", url, &[("Range", "bytes=-0")], b"");
    assert_eq!(status, 416, "an empty suffix range");
    let (status, headers, _) =
        http_raw(server.addr, "GET", url, &[("Range", "bytes=200000-")], b"");
    assert_eq!(status, 416);
    assert_eq!(header(&headers, "content-range"), Some("bytes */150000"));
    let (status, headers, body) = http_raw(server.addr, "HEAD", url, &[], b"");
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(header(&headers, "content-length"), Some("150000"));
    // Tampering: another channel, another expiry, another id, a garbled signature.
    let id = sha(&image);
    let far = now_secs() + 10_000;
    for bad in [
        url.replace("chat:%23alice", "chat:%23bob"),
        url.replace("expires=", "expires=9"),
        url.replace(&id, &sha(b"x")),
        format!("{}x", &url[..url.len() - 1]),
        format!("/blobs/{id}?channel=room&expires={far}"),
        signed(&id, "room", far).replace("sig=", "sig=AA"),
    ] {
        let (status, _, _) = http_raw(server.addr, "GET", &bad, &[], b"");
        assert!(status == 403 || status == 404, "{bad}: {status}");
    }
    // An expired one, signed with the right key: 403.
    let (status, _, body) = http_raw(
        server.addr,
        "GET",
        &signed(&id, "room", now_secs() - 1),
        &[],
        b"",
    );
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    // A valid signature for a blob nobody stored: 404.
    let (status, _, _) = http_raw(
        server.addr,
        "GET",
        &signed(&sha(b"no"), "room", far),
        &[],
        b"",
    );
    assert_eq!(status, 404);
    // HTTP upload errors: wrong type 415, too large 413.
    let (status, _, _) = http_raw(
        server.addr,
        "POST",
        "/api/v1/blobs?channel=room",
        &[("X-API-Key", "test-key"), ("Content-Type", "image/png")],
        b"GIF89a not really",
    );
    assert_eq!(status, 415);
    let huge = png(1, 1, 3_100_000, 6);
    let (status, _, _) = http_raw(
        server.addr,
        "POST",
        "/api/v1/blobs?channel=room",
        &[("X-API-Key", "test-key"), ("Content-Type", "image/png")],
        &huge,
    );
    assert_eq!(status, 413);
}

#[tokio::test]
async fn a_small_publication_overtakes_a_large_download_on_the_same_connection() {
    // Larger than what loopback socket buffers hold (a few MiB each way), so most
    // chunks are still the gateway's to order when the publication comes.
    let server = Server::start(&config_with("max_bytes = 20000000", ""));
    let mut c = server.client(Encoding::Proto).await;
    let image = png(100, 100, 16_000_000, 7);
    let blob = upload(&mut c, "room", &image, 1 << 20).await;
    ok(c.call(subscribe("room")).await);
    let mut other = server.client(Encoding::Proto).await;
    c.send_frames(&[ClientFrame {
        id: 900,
        command: Some(Command::BlobGet(BlobGet {
            id: blob.id.clone(),
            channel: "room".into(),
        })),
    }])
    .await;
    ok(other.call(publish("room", "small")).await);
    let mut chunks_before = 0;
    let mut seen_small = false;
    let mut bytes = Vec::new();
    loop {
        let f = c.next().await;
        match f.body {
            Some(Body::Publication(p)) => {
                assert_eq!(&p.data[..], b"small");
                seen_small = true;
            }
            Some(Body::BlobChunk(chunk)) => {
                if !seen_small {
                    chunks_before += 1;
                }
                bytes.extend_from_slice(&chunk.data);
                if chunk.last {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        seen_small,
        "the publication waited behind every chunk of the download"
    );
    let chunks = image.len().div_ceil(64 * 1024);
    assert!(
        chunks_before < chunks * 3 / 4,
        "the small publication waited behind {chunks_before} of {chunks} chunks"
    );
    assert_eq!(sha(&bytes), sha(&image));
}

#[tokio::test]
async fn blobs_in_publications_reach_every_node_with_urls_that_work_there() {
    let redis = Redis::start(false);
    // No signing key configured: the nodes make one and share it through Redis.
    let cfg = "[redis]\ncommand_timeout_ms = 1000\n[limits]\nmax_message_bytes = 4194304\n";
    let nodes: Vec<Server> = (0..2)
        .map(|i| {
            let s = Server::start_with(
                cfg,
                &[
                    "--redis-url",
                    &redis.url(),
                    "--node-id",
                    &format!("n{i}"),
                    "--api-key",
                    "test-key",
                ],
            );
            s.wait_ready(TIMEOUT);
            s
        })
        .collect();
    let mut far = nodes[1].client(Encoding::Json).await;
    ok(far.call(subscribe("photos")).await);
    let mut near = nodes[0].client(Encoding::Proto).await;
    let image = png(800, 600, 200_000, 8);
    let blob = upload(&mut near, "photos", &image, 64 * 1024).await;
    let reply = ok(near
        .call(Command::Publish(Publish {
            channel: "photos".into(),
            data: Bytes::from_static(b"look"),
            blobs: vec![BlobRef {
                id: blob.id.clone(),
                name: "holiday.png".into(),
                // Whatever the client claims, the store's facts win.
                size: 1,
                content_type: "text/html".into(),
                ..Default::default()
            }],
            ..Default::default()
        }))
        .await);
    assert!(matches!(reply, Body::Publish(_)));
    let Body::Publication(p) = far.push().await else {
        panic!()
    };
    let got = &p.blobs[0];
    assert_eq!(
        (
            got.id.as_str(),
            got.size,
            got.content_type.as_str(),
            got.name.as_str()
        ),
        (
            blob.id.as_str(),
            image.len() as u64,
            "image/png",
            "holiday.png"
        )
    );
    assert_eq!((got.width, got.height), (800, 600));
    // The URL node 1 signed works on node 0 and the other way round.
    for (signer, reader) in [(1, 0), (0, 1)] {
        let url = if signer == 1 {
            got.url.clone()
        } else {
            blob.url.clone()
        };
        let (status, _, bytes) = http_raw(nodes[reader].addr, "GET", &url, &[], b"");
        assert_eq!(
            status, 200,
            "signed by node {signer}, read on node {reader}"
        );
        assert_eq!(sha(&bytes), sha(&image));
    }
    // Over the WebSocket on the other node, and in history with a fresh URL.
    let (back, _) = download(&mut far, &blob.id, "photos").await;
    assert_eq!(sha(&back), sha(&image));
    let history = ok(far
        .call(Command::History(HistoryRequest {
            channel: "photos".into(),
            ..Default::default()
        }))
        .await);
    let Body::History(h) = history else { panic!() };
    assert!(h.publications[0].blobs[0].url.starts_with("/blobs/"));
}

/// The backend the RPC tests call: `/echo` answers the body back with its content type
/// and who asked; `/png` answers an image; `/big` 2 MiB; `/bad` 400; `/fail` 500; `/slow`
/// waits 3 s.
async fn backend() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    let h = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let (ct, user, client) = (
                        h("content-type"),
                        h("x-gateway-user"),
                        h("x-gateway-client"),
                    );
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mut r = Response::new(Full::new(Bytes::new()));
                    match path.as_str() {
                        "/echo" => {
                            *r.body_mut() = Full::new(body);
                            r.headers_mut().insert("content-type", ct.parse().unwrap());
                            r.headers_mut()
                                .insert("x-seen", format!("{user}|{client}").parse().unwrap());
                        }
                        "/png" => {
                            *r.body_mut() = Full::new(Bytes::from(png(4, 4, 5000, 9)));
                            r.headers_mut()
                                .insert("content-type", "image/png".parse().unwrap());
                        }
                        "/who" => {
                            *r.body_mut() = Full::new(Bytes::from(format!("{user}|{client}")));
                        }
                        "/big" => *r.body_mut() = Full::new(Bytes::from(vec![7u8; 2 << 20])),
                        "/bad" => *r.status_mut() = hyper::StatusCode::BAD_REQUEST,
                        "/fail" => *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR,
                        "/slow" => tokio::time::sleep(Duration::from_secs(3)).await,
                        _ => *r.status_mut() = hyper::StatusCode::NOT_FOUND,
                    }
                    Ok::<_, Infallible>(r)
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    addr
}

fn rpc(method: &str, data: &'static [u8]) -> Command {
    Command::Rpc(Rpc {
        method: method.into(),
        data: Bytes::from_static(data),
        content_type: "application/x-test".into(),
    })
}

#[tokio::test]
async fn rpc_outcomes_from_success_to_an_unreachable_backend() {
    let addr = backend().await;
    let cfg = "[rpc]\ntimeout_ms = 1000\nmax_in_flight = 2\n";
    let server = Server::start_with(cfg, &["--rpc-url", &format!("http://{addr}/")]);
    let mut c = server.client(Encoding::Proto).await;
    let Body::Connect(me) = ok(c.call(Command::Connect(Default::default())).await) else {
        panic!()
    };
    // Binary in, binary out, with its content type.
    let Body::Rpc(r) = ok(c.call(rpc("echo", b"\x00\x01\xff")).await) else {
        panic!()
    };
    assert_eq!(
        (&r.data[..], r.content_type.as_str()),
        (&b"\x00\x01\xff"[..], "application/x-test")
    );
    let Body::Rpc(r) = ok(c.call(rpc("png", b"")).await) else {
        panic!()
    };
    assert_eq!((r.content_type.as_str(), r.data.len()), ("image/png", 5000));
    let Body::Rpc(r) = ok(c.call(rpc("who", b"")).await) else {
        panic!()
    };
    assert_eq!(
        String::from_utf8_lossy(&r.data),
        format!("|{}", me.client),
        "anonymous: empty user"
    );
    // Failures: 4xx not temporary; 5xx and timeout temporary; bad method 104.
    let err = |f: ServerFrame| {
        let e = f.error.expect("an error");
        (e.code, e.temporary)
    };
    assert_eq!(err(c.call(rpc("bad", b"")).await), (114, false));
    assert_eq!(err(c.call(rpc("fail", b"")).await), (114, true));
    let t = Instant::now();
    assert_eq!(err(c.call(rpc("slow", b"")).await), (114, true));
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "bounded by rpc.timeout_ms"
    );
    assert_eq!(err(c.call(rpc("../etc", b"")).await).0, 104);
    assert_eq!(err(c.call(rpc("..", b"")).await).0, 104, "a dot segment");
    // Two in flight at most: the third is refused while two slow ones run.
    c.send_frames(&[
        ClientFrame {
            id: 201,
            command: Some(rpc("slow", b"")),
        },
        ClientFrame {
            id: 202,
            command: Some(rpc("slow", b"")),
        },
        ClientFrame {
            id: 203,
            command: Some(rpc("echo", b"x")),
        },
    ])
    .await;
    let first = c.next().await;
    assert_eq!((first.id, first.error.map(|e| e.code)), (203, Some(106)));
    let mut late: Vec<u32> = vec![c.next().await.id, c.next().await.id];
    late.sort_unstable();
    assert_eq!(late, vec![201, 202]);
    // Commands are served while an RPC waits on the backend.
    c.send_frames(&[ClientFrame {
        id: 301,
        command: Some(rpc("slow", b"")),
    }])
    .await;
    ok(c.call(Command::Ping(Default::default())).await);
    assert_eq!(c.next().await.id, 301);
    // Unreachable backend: 114, temporary. No rpc.url: 104.
    let dead = Server::start_with(
        cfg,
        &["--rpc-url", &format!("http://127.0.0.1:{}", free_port())],
    );
    let mut d = dead.client(Encoding::Json).await;
    assert_eq!(err(d.call(rpc("echo", b"")).await), (114, true));
    let none = Server::start("");
    let mut n = none.client(Encoding::Proto).await;
    assert_eq!(err(n.call(rpc("echo", b"")).await).0, 104);
}

/// Found by the adversarial review: a blob id worked like a password. Now a blob is
/// usable only in channels it was granted to (uploaded for, or published in by the
/// backend): elsewhere it is unknown (111) to downloads, publishes and the upload
/// shortcut, and a namespace's type allowlist applies to blobs published into it.
#[tokio::test]
async fn a_blob_is_usable_only_in_the_channels_it_was_granted_to() {
    let cfg = format!(
        "{}[namespaces.strict]\nblob_types = [\"image/jpeg\"]\n",
        config("")
    );
    let server = Server::start_with(&cfg, &["--api-key", "test-key"]);
    let image = png(8, 8, 20_000, 11);
    let mut alice = server.client(Encoding::Proto).await;
    let blob = upload(&mut alice, "room", &image, 8192).await;
    let mut bob = server.client(Encoding::Proto).await;
    let get = |channel: &str| {
        Command::BlobGet(BlobGet {
            id: blob.id.clone(),
            channel: channel.into(),
        })
    };
    assert_eq!(code(bob.call(get("other")).await), Some(111));
    // The upload shortcut does not vouch for it elsewhere: send the bytes.
    let claim = |upload: u32, channel: &str, size: usize| {
        Command::BlobPut(BlobPut {
            upload,
            channel: channel.into(),
            content_type: "image/png".into(),
            size: size as u64,
            id: blob.id.clone(),
            ..Default::default()
        })
    };
    let Body::BlobPut(r) = ok(bob.call(claim(1, "other", image.len())).await) else {
        panic!()
    };
    assert!(r.blob.is_none(), "not known in this channel");
    let with_blob = |channel: &str| {
        Command::Publish(Publish {
            channel: channel.into(),
            blobs: vec![BlobRef {
                id: blob.id.clone(),
                ..Default::default()
            }],
            ..Default::default()
        })
    };
    assert_eq!(code(bob.call(with_blob("other")).await), Some(111));
    // In its own channel the shortcut and the publish work; a wrong size is 113.
    assert_eq!(code(bob.call(claim(2, "room", 5)).await), Some(113));
    let Body::BlobPut(r) = ok(bob.call(claim(3, "room", image.len())).await) else {
        panic!()
    };
    assert_eq!(r.blob.map(|b| b.id), Some(blob.id.clone()));
    ok(bob.call(with_blob("room")).await);
    // The backend publishing it elsewhere grants it there.
    let body = format!(r#"{{"channel":"other","blobs":[{{"id":"{}"}}]}}"#, blob.id);
    assert_eq!(server.api("POST", "/api/v1/publish", &body).0, 200);
    let (bytes, _) = download(&mut bob, &blob.id, "other").await;
    assert_eq!(sha(&bytes), blob.id);
    // A PNG is not for a JPEG-only namespace, whoever publishes it.
    let body = format!(
        r#"{{"channel":"strict:x","blobs":[{{"id":"{}"}}]}}"#,
        blob.id
    );
    let (status, reply) = server.api("POST", "/api/v1/publish", &body);
    assert_eq!((status, reply["error"]["code"].as_u64()), (415, Some(112)));
    assert_node_serves(&server).await;
}

fn code(f: ServerFrame) -> Option<u32> {
    f.error.map(|e| e.code)
}

fn disconnects(server: &Server, code: u16) -> f64 {
    server.metric(&format!("gateway_disconnects_total{{code=\"{code}\"}}"))
}

/// Found by the adversarial review: a client that stopped reading held its session
/// forever (a write blocked on its full socket kept pings, timeouts and the slow-consumer
/// close from running), with its downloads and RPC answers in memory. Now a write that
/// takes too long, or a queue that overflows behind a blocked write, closes it with 4008.
#[tokio::test]
async fn clients_that_stop_reading_are_closed_as_slow_consumers() {
    let addr = backend().await;
    let cfg = config_with("max_bytes = 3000000", "write_timeout_ms = 300\n");
    let server = Server::start_with(&cfg, &["--rpc-url", &format!("http://{addr}/")]);
    let image = png(8, 8, 2_900_000, 12);
    let mut c = server.client(Encoding::Proto).await;
    let blob = upload(&mut c, "room", &image, 1 << 20).await;
    let frames: Vec<ClientFrame> = (1..=4)
        .map(|id| ClientFrame {
            id,
            command: Some(Command::BlobGet(BlobGet {
                id: blob.id.clone(),
                channel: "room".into(),
            })),
        })
        .collect();
    // Never reads: its downloads fill the socket, then the write stalls.
    c.send_frames(&frames).await;
    let deadline = Instant::now() + TIMEOUT;
    while disconnects(&server, 4008) < 1.0 {
        assert!(Instant::now() < deadline, "a stalled downloader is closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // RPC answers larger than the queue: the first is written (and blocks), the second
    // is queued, the third overflows the queue and closes the connection at once.
    let mut r = server.client(Encoding::Proto).await;
    let calls: Vec<ClientFrame> = (1..=4)
        .map(|id| ClientFrame {
            id,
            command: Some(rpc("big", b"")),
        })
        .collect();
    r.send_frames(&calls).await;
    let deadline = Instant::now() + TIMEOUT;
    while disconnects(&server, 4008) < 2.0 {
        assert!(
            Instant::now() < deadline,
            "a client not reading RPC answers is closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + TIMEOUT;
    while server.metric("gateway_connections") > 1.0 {
        assert!(Instant::now() < deadline, "their sessions ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((c, r));
    assert_node_serves(&server).await;
}

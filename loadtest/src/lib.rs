//! What the load generators share: connecting, framing, a lean decoding of server frames,
//! and reading the gateway's and Redis's CPU.

use broker_proto::{Batch, Encoding, encode_frame, v1::ClientFrame};
use bytes::{Buf, Bytes};
use prost::Message as _;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        Message, client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig,
    },
};

/// The parts of `ServerFrame` the generators need; prost skips the rest without
/// allocating, which keeps the client's cost per delivery low.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteFrame {
    #[prost(uint32, tag = "1")]
    pub id: u32,
    #[prost(message, optional, tag = "2")]
    pub error: Option<LiteError>,
    #[prost(message, optional, tag = "4")]
    pub subscribe: Option<LiteSubscribed>,
    #[prost(message, optional, tag = "10")]
    pub publication: Option<LitePublication>,
    #[prost(message, optional, tag = "14")]
    pub blob_put: Option<LiteBlobPut>,
    #[prost(message, optional, tag = "15")]
    pub blob_chunk: Option<LiteBlobChunk>,
    #[prost(message, optional, tag = "16")]
    pub rpc: Option<LiteRpc>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteError {
    #[prost(uint32, tag = "1")]
    pub code: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LitePublication {
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    #[prost(bytes = "bytes", tag = "4")]
    pub data: Bytes,
    #[prost(message, repeated, tag = "8")]
    pub blobs: Vec<LiteBlobRef>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteBlobRef {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(uint64, tag = "2")]
    pub size: u64,
    #[prost(string, tag = "4")]
    pub url: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteBlobPut {
    #[prost(message, optional, tag = "1")]
    pub blob: Option<LiteBlobRef>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteBlobChunk {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    #[prost(bytes = "bytes", tag = "3")]
    pub data: Bytes,
    #[prost(bool, tag = "4")]
    pub last: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteRpc {
    #[prost(bytes = "bytes", tag = "1")]
    pub data: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteSubscribed {
    #[prost(uint64, tag = "2")]
    pub offset: u64,
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The frames of one binary WebSocket message.
pub fn frames(payload: &Bytes) -> impl Iterator<Item = LiteFrame> + '_ {
    let mut buf = payload.clone();
    std::iter::from_fn(move || {
        if !buf.has_remaining() {
            return None;
        }
        let len = prost::decode_length_delimiter(&mut buf).ok()?;
        if len > buf.remaining() {
            return None;
        }
        LiteFrame::decode(buf.split_to(len)).ok()
    })
}

/// A binary WebSocket to `ws://{addr}/ws` with the proto subprotocol.
pub async fn connect(addr: &str) -> Result<Ws, String> {
    connect_as(addr, None).await
}

/// [`connect`] with a connection token (`?token=`) when given.
pub async fn connect_as(addr: &str, token: Option<&str>) -> Result<Ws, String> {
    let query = token.map_or(String::new(), |t| format!("?token={t}"));
    let mut req = format!("ws://{addr}/ws{query}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(Encoding::PROTO_SUBPROTOCOL),
    );
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 16 * 1024;
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// One binary message carrying `frames`.
pub fn send_frames(frames: &[ClientFrame]) -> Message {
    let mut batch = Batch::new(Encoding::Proto, 128 * frames.len());
    for f in frames {
        batch.push(&encode_frame(Encoding::Proto, f));
    }
    Message::Binary(batch.take())
}

/// `(cpu_seconds, rss_bytes)` summed over the gateway nodes at `addrs` (comma-separated).
pub async fn gateway_process(addrs: &str) -> Option<(f64, f64)> {
    let mut total = (0.0, 0.0);
    for addr in addrs.split(',') {
        let text = http_get(addr, "/metrics").await?;
        total.0 += metric(&text, "process_cpu_seconds_total")?;
        total.1 += metric(&text, "process_resident_memory_bytes")?;
    }
    Some(total)
}

/// `(cpu_seconds, rss_bytes)` of each process in `pids` (comma-separated), read from
/// `/proc/PID/stat` (utime + stime) and `/proc/PID/status` (VmRSS): any server can be
/// measured this way, not only one that exports Prometheus metrics.
pub fn proc_processes(pids: &str) -> Option<Vec<(u32, f64, f64)>> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out = Vec::new();
    for pid in pids.split(',') {
        let pid: u32 = pid.trim().parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces; the fields after its ')' are fixed.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let (utime, stime): (f64, f64) =
            (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        out.push((pid, (utime + stime) / ticks, rss_kib * 1024.0));
    }
    Some(out)
}

/// One unlabelled metric's value from a Prometheus text page.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
    })
}

/// The body of `GET path` on `addr` (HTTP/1.1, connection closed after).
pub async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    Some(text)
}

/// Redis's CPU seconds (user + sys) from `INFO cpu`.
pub async fn redis_cpu(addr: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"INFO cpu\r\nQUIT\r\n").await.ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    Some(field("used_cpu_user:")? + field("used_cpu_sys:")?)
}

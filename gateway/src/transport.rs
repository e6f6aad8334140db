//! The listener and HTTP/1.1 with hyper: routes, WebSocket upgrade with subprotocol
//! negotiation and origin check, the connection limit, and the handshake timeout. After
//! the upgrade the socket belongs to a [`session`](crate::session).

use crate::{
    api, files,
    http::{Body, full, query_param, response, text},
    metrics,
    node::Node,
    peers, session,
    tls::Tls,
    web,
    ws::WebSocket,
};
use broker_proto::{CloseCode, Encoding};
use bytes::Bytes;
use futures_util::{FutureExt, future::Either};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::{convert::Infallible, net::IpAddr, sync::Arc};
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Accepts connections until `stop` turns true.
pub async fn serve(
    node: Arc<Node>,
    prometheus: PrometheusHandle,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    mut stop: watch::Receiver<bool>,
) {
    let api = api::service(node.clone());
    let shared = Arc::new((node, prometheus, api));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        limit_unsent(&stream);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return serve_http(stream, shared, peer.ip()).await;
            };
            // The TLS handshake shares the HTTP head's time limit.
            let timeout = shared.0.config.transport.handshake_timeout;
            match tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await {
                Ok(Ok(stream)) => serve_http(stream, shared, peer.ip()).await,
                Ok(Err(e)) => {
                    metrics::rejected("tls");
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => metrics::rejected("tls_timeout"),
            }
        });
    }
}

type Shared = Arc<(Arc<Node>, PrometheusHandle, api::Service)>;

/// Serves HTTP/1.1 (and the WebSocket upgrade) on one connection, plain or TLS.
async fn serve_http<S>(stream: S, shared: Shared, peer: IpAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = shared.0.config.transport.handshake_timeout;
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(&shared.0, &shared.1, &shared.2, peer, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        // A request head (request line and headers) over this is 431: ample for
        // browsers' cookies, small enough that 10,000 idle connections cannot pin
        // hyper's default 400 KB each.
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// Largest request head, and hyper's read buffer per HTTP connection.
const MAX_REQUEST_HEAD: usize = 32 * 1024;

async fn route(
    node: &Arc<Node>,
    prometheus: &PrometheusHandle,
    api: &api::Service,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/ws") => upgrade(node, peer, req),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/favicon.ico") => text(StatusCode::NO_CONTENT, ""),
        (&Method::GET, "/readyz") if node.is_ready() => text(StatusCode::OK, "ready\n"),
        (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        (&Method::GET, "/metrics") => {
            metrics::ready(node.is_ready());
            response(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics::render(prometheus),
            )
        }
        _ if path.starts_with("/api/") => api::call(api, req).await,
        (&Method::GET | &Method::HEAD, p) if p.starts_with("/blobs/") => {
            files::serve(node, req.method(), path, req.uri().query(), req.headers()).await
        }
        // The admin page is off unless configured, and useless without the API key.
        (_, "/admin" | "/admin.js")
            if !(node.config.api.admin && node.config.api.key.is_some()) =>
        {
            text(StatusCode::NOT_FOUND, "not found\n")
        }
        (method, path) => web::serve(method, path, req.headers())
            .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n")),
    }
}

/// Picks the encoding: the first offered subprotocol we speak, else `?format=`, else proto.
fn negotiate(headers: &HeaderMap, query: Option<&str>) -> Result<(Encoding, bool), &'static str> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if let Some(e) = offered.iter().find_map(|p| Encoding::from_subprotocol(p)) {
        return Ok((e, true));
    }
    if !offered.is_empty() {
        return Err(
            "none of the offered subprotocols is supported (gateway.v1.proto, gateway.v1.json)",
        );
    }
    match query_param(query, "format") {
        Some(f) => Encoding::from_format(f)
            .map(|e| (e, false))
            .ok_or("format must be proto or json"),
        None => Ok((Encoding::Proto, false)),
    }
}

/// Whether a `Sec-WebSocket-Key` decodes to exactly 16 bytes.
fn key_is_valid(key: &[u8]) -> bool {
    use base64::Engine as _;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

fn origin_allowed(node: &Node, headers: &HeaderMap) -> bool {
    let allowed = &node.config.transport.allowed_origins;
    if allowed.is_empty() || allowed.iter().any(|o| o == "*") {
        return true;
    }
    // Non-browser clients send no Origin; the check protects browsers' ambient credentials.
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
}

fn upgrade(node: &Arc<Node>, peer: IpAddr, mut req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    // RFC 6455 §4.2.1: the key is base64 of 16 bytes; anything else is not a handshake.
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| is_upgrade && version_ok)
        .filter(|k| key_is_valid(k.as_bytes()))
    else {
        metrics::rejected("bad_handshake");
        return text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)\n",
        );
    };
    if node.is_draining() {
        metrics::rejected("draining");
        return text(StatusCode::SERVICE_UNAVAILABLE, "node is draining\n");
    }
    let (encoding, echo) = match negotiate(headers, req.uri().query()) {
        Ok(n) => n,
        Err(reason) => {
            metrics::rejected("subprotocol");
            return text(StatusCode::BAD_REQUEST, reason);
        }
    };
    // The slot is taken here, before the 101, so a burst of upgrades cannot overshoot
    // the limit; a rejected socket still holds none.
    let slot = node.reserve_socket();
    let client = peers::client_addr(peer, headers, &node.config.transport.trusted_proxies);
    let address_slot = node.reserve_address(client);
    let mut reject = None;
    if !origin_allowed(node, headers) {
        metrics::rejected("origin");
        reject = Some(CloseCode::Policy);
    } else if slot.is_none() {
        metrics::rejected("over_capacity");
        reject = Some(CloseCode::OverCapacity);
    } else if address_slot.is_none() {
        // One address holding too many sockets: back off (4029), not "go elsewhere".
        metrics::rejected("per_ip");
        reject = Some(CloseCode::RateLimited);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = bearer
        .or_else(|| query_param(req.uri().query(), "token"))
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    let accept = derive_accept_key(key.as_bytes());

    let on_upgrade = hyper::upgrade::on(&mut req);
    let start = Start {
        node: node.clone(),
        slots: (slot, address_slot),
        encoding,
        token,
        reject,
        client,
        peer,
    };
    // `then`, not an `async` block: what only the upgrade needs is gone once the session
    // runs, instead of being kept beside it for the connection's life.
    tokio::spawn(session_task(on_upgrade, start));

    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if echo {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(encoding.subprotocol()),
        );
    }
    r
}

/// The task of one WebSocket connection, from the 101 to its close: the future every
/// connection's task holds, so its size is paid by every idle connection (see the
/// `connection_task_size` test).
fn session_task(
    on_upgrade: hyper::upgrade::OnUpgrade,
    start: Start,
) -> impl Future<Output = ()> + Send {
    on_upgrade.then(move |upgraded| start.session(upgraded))
}

/// What an accepted upgrade needs to start its session once hyper hands the socket over.
struct Start {
    node: Arc<Node>,
    slots: session::Slots,
    encoding: Encoding,
    token: Option<String>,
    reject: Option<CloseCode>,
    /// The client's address after trusted proxies; `peer` is the socket's.
    client: IpAddr,
    peer: IpAddr,
}

impl Start {
    fn session(
        self,
        upgraded: hyper::Result<hyper::upgrade::Upgraded>,
    ) -> impl Future<Output = ()> + Send + use<> {
        let upgraded = match upgraded {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "upgrade failed");
                return Either::Left(std::future::ready(()));
            }
        };
        let limits = &self.node.config.transport;
        // Dropped at once: the bytes hyper read past the request head share its whole
        // read buffer.
        let mut fd = None;
        let ws = {
            let (socket, already_read) = Socket::from_upgraded(upgraded);
            if let Socket::Tcp(tcp) = &socket {
                fd = Some(std::os::fd::AsRawFd::as_raw_fd(tcp));
            }
            WebSocket::new(
                socket,
                &already_read,
                limits.max_message_bytes,
                limits.ws_read_buffer_bytes,
            )
        };
        self.node.metrics.connections_accepted.increment(1);
        let params = session::Params {
            encoding: self.encoding,
            token: self.token,
            reject: self.reject,
            peer: self.client,
            fd,
            slots: self.slots,
        };
        let ctx = self.node.sessions.clone();
        Either::Right(session::run(ctx, ws, params, NodeMetrics(self.node)))
    }
}

/// The node's metrics, held through the node.
struct NodeMetrics(Arc<Node>);

impl std::ops::Deref for NodeMetrics {
    type Target = crate::metrics::Metrics;

    fn deref(&self) -> &Self::Target {
        &self.0.metrics
    }
}

/// The socket under an upgraded connection, unwrapped from hyper's `Upgraded` (a boxed
/// stream behind a buffer) so the WebSocket reads and writes it directly.
pub enum Socket {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Any other stream hyper was given (none today).
    /// Boxed: every connection's socket is as large as the largest variant.
    Other(Box<TokioIo<hyper::upgrade::Upgraded>>),
}

impl Socket {
    /// The socket and the bytes hyper read past the request head.
    fn from_upgraded(upgraded: hyper::upgrade::Upgraded) -> (Self, Bytes) {
        let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => return (Self::Tcp(parts.io.into_inner()), parts.read_buf),
            Err(u) => u,
        };
        match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
            Ok(parts) => (Self::Tls(Box::new(parts.io.into_inner())), parts.read_buf),
            Err(u) => (Self::Other(Box::new(TokioIo::new(u))), Bytes::new()),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Other(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, b),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
            Self::Other(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Self::Other(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Other(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Other(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Bytes the kernel may hold unsent for one connection. Linux's send buffer grows to
/// megabytes; whatever sits there is beyond reordering, so a small frame written behind
/// a blob download would wait for all of it to reach the client (seconds on a slow
/// link). With `TCP_NOTSENT_LOWAT` the socket takes little more than this unsent, and
/// the rest waits in the outbox, where small frames go first.
const UNSENT_BYTES: libc::c_int = 128 * 1024;

fn limit_unsent(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let value = UNSENT_BYTES;
    // SAFETY: a valid socket descriptor and a c_int option of the declared size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_NOTSENT_LOWAT not set");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_output<A, B, R>(_: fn(A, B) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// What each connection's task holds (`loadtest/memory.sh` measures the whole):
    /// tokio adds 104 bytes to the future and rounds the cell up to 128. Every idle
    /// connection pays for it, so growing past the cell measured in issue 12 fails here.
    #[test]
    fn connection_task_size() {
        let future = size_of_output(session_task);
        let cell = (future + 104).div_ceil(128) * 128;
        println!("connection task future {future} B, task cell {cell} B");
        assert!(
            cell <= 896,
            "the connection task grew to a {cell}-byte cell"
        );
    }

    /// Found by the hostile-input sweep: `abc` and an empty key were upgraded.
    #[test]
    fn a_websocket_key_must_be_16_bytes_in_base64() {
        assert!(key_is_valid(b"dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in [
            &b""[..],
            b"abc",
            b"dGhlIHNhbXBsZSBub25jZQ",
            b"dGhlIHNhbXBsZSBub25jZSE=",
            b"dGhlIHNhbXBsZSBub25jZQ==dGhl",
            b"!!!!!!!!!!!!!!!!!!!!!!==",
        ] {
            assert!(!key_is_valid(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn negotiates_subprotocol_then_format() {
        let mut h = HeaderMap::new();
        assert_eq!(negotiate(&h, None), Ok((Encoding::Proto, false)));
        assert_eq!(
            negotiate(&h, Some("format=json&x=1")),
            Ok((Encoding::Json, false))
        );
        assert!(negotiate(&h, Some("format=xml")).is_err());
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("foo, gateway.v1.json"),
        );
        assert_eq!(
            negotiate(&h, Some("format=proto")),
            Ok((Encoding::Json, true))
        );
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("foo"),
        );
        assert!(negotiate(&h, None).is_err());
    }
}

//! Test helpers: start the real `gateway` binary on an ephemeral port and talk to it with
//! a real WebSocket client (tokio-tungstenite) and a minimal HTTP/1.1 client.
#![allow(dead_code)]

use broker_proto::{
    Batch, Encoding, Limits, decode_frames, encode_frame,
    v1::{ClientFrame, Publish, ServerFrame, Subscribe, client_frame::Command, server_frame::Body},
};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command as Process, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A running gateway process; killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    config: Option<PathBuf>,
}

static CONFIG_SEQ: AtomicU32 = AtomicU32::new(0);

impl Server {
    pub fn start(config: &str) -> Self {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: &str, args: &[&str]) -> Self {
        Self::start_with_env(config, args, &[])
    }

    /// With extra environment variables for the process.
    pub fn start_with_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let path = std::env::temp_dir().join(format!(
            "gateway-test-{}-{}.toml",
            std::process::id(),
            CONFIG_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, config).unwrap();
        // GATEWAY_TEST_BIN runs the suite against another build (e.g. an older release).
        let bin = std::env::var("GATEWAY_TEST_BIN")
            .ok()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_gateway").to_owned());
        let mut command = Process::new(bin);
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command.arg("--config").arg(&path);
        if !args.contains(&"--node-id") {
            command.args(["--node-id", "test-node"]);
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .env(
                "GATEWAY_LOG",
                std::env::var("GATEWAY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start gateway");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected: {line:?}"));
        Self {
            addr: addr.parse().unwrap(),
            child,
            config: Some(path),
        }
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.addr)
    }

    /// Ends the process at once, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while self.http("GET", "/readyz", &[], "").0 != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "node {} not ready",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        Process::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub async fn client(&self, encoding: Encoding) -> Client {
        Client::connect(&self.ws_url(""), Some(encoding.subprotocol()), encoding)
            .await
            .unwrap()
    }

    /// A plain HTTP request; returns status and body.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        http_at(self.addr, method, path, headers, body)
    }

    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        api_at(self.addr, method, path, body)
    }

    /// The value of an unlabelled metric in `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.http("GET", "/metrics", &[], "");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = self.config.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    let mut c = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    c.max_message_size = Some(256 << 20);
    c.max_frame_size = Some(256 << 20);
    c
}

/// A WebSocket client speaking either encoding.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub encoding: Encoding,
    pushes: VecDeque<ServerFrame>,
    next_id: u32,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq)]
pub struct Closed {
    pub disconnect: Option<u32>,
    pub close: Option<u16>,
}

impl Client {
    pub async fn connect(
        url: &str,
        subprotocol: Option<&str>,
        encoding: Encoding,
    ) -> Result<Self, String> {
        Self::connect_with(url, subprotocol, encoding, &[]).await
    }

    pub async fn connect_with(
        url: &str,
        subprotocol: Option<&str>,
        encoding: Encoding,
        headers: &[(&'static str, &str)],
    ) -> Result<Self, String> {
        let mut req = url.into_client_request().unwrap();
        if let Some(p) = subprotocol {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
        }
        for (k, v) in headers {
            req.headers_mut()
                .insert(*k, HeaderValue::from_str(v).unwrap());
        }
        let (ws, resp) = tokio::time::timeout(
            TIMEOUT,
            tokio_tungstenite::connect_async_with_config(req, Some(client_config()), false),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        if let Some(p) = subprotocol {
            assert_eq!(
                resp.headers()
                    .get("Sec-WebSocket-Protocol")
                    .map(|v| v.to_str().unwrap()),
                Some(p)
            );
        }
        Ok(Self {
            ws,
            encoding,
            pushes: VecDeque::new(),
            next_id: 1,
        })
    }

    pub async fn send_frames(&mut self, frames: &[ClientFrame]) {
        self.try_send_frames(frames).await.unwrap();
    }

    /// Sends frames in one message; `Err` when the connection is gone.
    pub async fn try_send_frames(&mut self, frames: &[ClientFrame]) -> Result<(), String> {
        let mut batch = Batch::new(self.encoding, 256);
        for f in frames {
            batch.push(&encode_frame(self.encoding, f));
        }
        let payload = batch.take();
        let msg = match self.encoding {
            Encoding::Proto => Message::Binary(payload),
            Encoding::Json => Message::Text(payload.try_into().unwrap()),
        };
        self.ws.send(msg).await.map_err(|e| e.to_string())
    }

    /// Reads the next WebSocket message's frames; `None` when the connection ended.
    async fn read(&mut self) -> Option<Result<Vec<ServerFrame>, Closed>> {
        loop {
            let msg = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for the server")?;
            let payload = match msg {
                Ok(Message::Binary(b)) => b,
                Ok(Message::Text(t)) => Bytes::from(t),
                Ok(Message::Close(frame)) => {
                    return Some(Err(Closed {
                        disconnect: None,
                        close: frame.map(|f| u16::from(f.code)),
                    }));
                }
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("client read error: {e}");
                    return None;
                }
            };
            let limits = Limits {
                max_frames_per_message: 100_000,
                max_frame_bytes: 64 << 20,
            };
            return Some(Ok(
                decode_frames(self.encoding, payload, &limits).expect("server frames decode")
            ));
        }
    }

    /// The next frame from the server, reply or push.
    pub async fn next(&mut self) -> ServerFrame {
        if let Some(f) = self.pushes.pop_front() {
            return f;
        }
        match self.read().await {
            Some(Ok(frames)) => {
                self.pushes.extend(frames);
                self.pushes.pop_front().expect("a message with frames")
            }
            Some(Err(closed)) => panic!("connection closed: {closed:?}"),
            None => panic!("connection ended"),
        }
    }

    /// Sends a command and returns its reply; pushes that arrive first are kept for `next`.
    pub async fn call(&mut self, command: Command) -> ServerFrame {
        let id = self.next_id;
        self.next_id += 1;
        self.send_frames(&[ClientFrame {
            id,
            command: Some(command),
        }])
        .await;
        let mut skipped = VecDeque::new();
        let reply = loop {
            let f = match self.pushes.pop_front() {
                Some(f) if f.id == 0 => {
                    skipped.push_back(f);
                    continue;
                }
                Some(f) => f,
                None => match self.read().await {
                    Some(Ok(frames)) => {
                        self.pushes.extend(frames);
                        continue;
                    }
                    Some(Err(closed)) => {
                        panic!("connection closed awaiting reply {id}: {closed:?}")
                    }
                    None => panic!("connection ended awaiting reply {id}"),
                },
            };
            assert_eq!(f.id, id, "replies come in order");
            break f;
        };
        skipped.extend(self.pushes.drain(..));
        self.pushes = skipped;
        reply
    }

    /// Like [`Self::call`], but `None` when the connection ends first (a node going away
    /// under a client that reconnects).
    pub async fn try_call(&mut self, command: Command) -> Option<ServerFrame> {
        let id = self.next_id;
        self.next_id += 1;
        self.try_send_frames(&[ClientFrame {
            id,
            command: Some(command),
        }])
        .await
        .ok()?;
        loop {
            if let Some(i) = self.pushes.iter().position(|f| f.id == id) {
                return self.pushes.remove(i);
            }
            match self.read().await {
                Some(Ok(frames)) => self.pushes.extend(frames),
                _ => return None,
            }
        }
    }

    /// The next push (id 0), skipping nothing: a reply here is a test failure.
    pub async fn push(&mut self) -> Body {
        let f = self.next().await;
        assert_eq!(f.id, 0, "expected a push, got {f:?}");
        f.body.expect("push has a body")
    }

    /// The next frame, or how the connection ended.
    pub async fn next_or_closed(&mut self) -> Result<ServerFrame, Option<u16>> {
        if let Some(f) = self.pushes.pop_front() {
            return Ok(f);
        }
        match self.read().await {
            Some(Ok(frames)) => {
                self.pushes.extend(frames);
                Ok(self.pushes.pop_front().expect("a message with frames"))
            }
            Some(Err(closed)) => Err(closed.close),
            None => Err(None),
        }
    }

    /// Reads until the server closes; returns the Disconnect code and the close code.
    pub async fn closed(&mut self) -> Closed {
        let mut disconnect = None;
        loop {
            while let Some(f) = self.pushes.pop_front() {
                if let Some(Body::Disconnect(d)) = f.body {
                    disconnect = Some(d.code);
                }
            }
            match self.read().await {
                Some(Ok(frames)) => self.pushes.extend(frames),
                Some(Err(c)) => {
                    return Closed {
                        disconnect,
                        close: c.close,
                    };
                }
                None => {
                    return Closed {
                        disconnect,
                        close: None,
                    };
                }
            }
        }
    }

    /// Asserts that no frame arrives within `wait`.
    pub async fn quiet_for(&mut self, wait: Duration) {
        assert!(
            self.pushes.is_empty(),
            "unexpected frames: {:?}",
            self.pushes
        );
        let deadline = tokio::time::Instant::now() + wait;
        // Pings from the server are not frames; reading them also answers them.
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            assert!(
                matches!(m, Message::Ping(_) | Message::Pong(_)),
                "unexpected message: {m:?}"
            );
        }
    }
}

/// Asserts the server closed with `code`, after a `Disconnect` push with the same code.
pub async fn expect_close(c: &mut Client, code: u16) {
    let closed = c.closed().await;
    assert_eq!(
        closed,
        Closed {
            disconnect: Some(u32::from(code)),
            close: Some(code)
        }
    );
}

pub fn subscribe(channel: &str) -> Command {
    Command::Subscribe(Subscribe {
        channel: channel.into(),
        ..Default::default()
    })
}

pub fn recover(channel: &str, offset: u64, epoch: &str) -> Command {
    Command::Subscribe(Subscribe {
        channel: channel.into(),
        recover: true,
        offset,
        epoch: epoch.into(),
        ..Default::default()
    })
}

pub fn publish(channel: &str, data: impl Into<Bytes>) -> Command {
    Command::Publish(Publish {
        channel: channel.into(),
        data: data.into(),
        ..Default::default()
    })
}

pub fn error_code(f: &ServerFrame) -> Option<u32> {
    f.error.as_ref().map(|e| e.code)
}

/// Asserts `f` is a successful reply and returns its body.
pub fn ok(f: ServerFrame) -> Body {
    assert!(f.error.is_none(), "unexpected error: {:?}", f.error);
    f.body.expect("reply has a body")
}

/// Checks that the node still serves: a fresh client subscribes, publishes and receives.
pub async fn assert_node_serves(server: &Server) {
    let mut c = server.client(Encoding::Proto).await;
    let channel = format!("control{}", CONFIG_SEQ.fetch_add(1, Ordering::Relaxed));
    ok(c.call(subscribe(&channel)).await);
    ok(c.call(publish(&channel, "still here")).await);
    match c.push().await {
        Body::Publication(p) => assert_eq!(&p.data[..], b"still here"),
        other => panic!("{other:?}"),
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "gateway-{kind}-{}-{}",
        std::process::id(),
        CONFIG_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A real `redis-server` on a free port, with or without persistence (AOF, fsync always).
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    persistent: bool,
    extra: Vec<String>,
}

impl Redis {
    pub fn start(persistent: bool) -> Self {
        Self::start_with(persistent, &[])
    }

    /// With extra `redis-server` arguments (kept for restarts).
    pub fn start_with(persistent: bool, extra: &[&str]) -> Self {
        let mut r = Self {
            child: None,
            port: free_port(),
            dir: temp_dir("redis"),
            persistent,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let extra = self.extra.clone();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        self.spawn_with(&extra);
    }

    fn spawn_with(&mut self, extra: &[&str]) {
        let aof = if self.persistent { "yes" } else { "no" };
        let child = Process::new("redis-server")
            .args(extra)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                aof,
                "--appendfsync",
                "always",
                "--protected-mode",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (install it: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !matches!(
            self.cli(&["PING"]).as_deref(),
            Some("+PONG") | Some("-NOAUTH Authentication required.")
        ) {
            assert!(std::time::Instant::now() < deadline, "redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one command in RESP and returns the first reply line.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line.trim_end().to_owned())
    }

    /// Sends one command and returns the whole reply (for bulk replies such as INFO).
    pub fn cli_all(&self, args: &[&str]) -> Option<String> {
        let out = Process::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// From the next restart on, with AOF persistence or without (then it loads whatever
    /// RDB snapshot its directory holds).
    pub fn set_persistent(&mut self, persistent: bool) {
        self.persistent = persistent;
    }

    /// Starts again on the same port and directory (so AOF data comes back if persistent).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        Process::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// HAProxy in front of gateway nodes, health-checking `/readyz`, round-robin.
pub struct Haproxy {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Haproxy {
    pub fn start(backends: &[SocketAddr]) -> Self {
        let port = free_port();
        let dir = temp_dir("haproxy");
        let mut cfg = format!(
            "global\n  maxconn 9000\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  \
             timeout server 60s\n  timeout tunnel 1h\n  option redispatch\n  retries 2\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend gw\n\
             backend gw\n  balance roundrobin\n  option httpchk GET /readyz\n"
        );
        for (i, b) in backends.iter().enumerate() {
            cfg.push_str(&format!(
                "  server n{i} {b} check inter 200 fall 1 rise 1\n"
            ));
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Process::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (install it: apt-get install haproxy)");
        let deadline = std::time::Instant::now() + TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the first health checks pass.
        std::thread::sleep(Duration::from_millis(500));
        Self { child, port, dir }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain HTTP/1.1 request to `addr`; returns status and body.
pub fn http_at(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// An HTTP API call with the test key; the body parsed as JSON.
pub fn api_at(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let headers = [
        ("X-API-Key", "test-key"),
        ("Content-Type", "application/json"),
    ];
    let (status, body) = http_at(addr, method, path, &headers, body);
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A 3-master Redis Cluster of real `redis-server` processes (no replicas).
pub struct RedisCluster {
    masters: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> Self {
        Self::start_with_replicas(0)
    }

    /// Three masters, each with `replicas` replicas (the first three servers are the
    /// masters).
    pub fn start_with_replicas(replicas: usize) -> Self {
        let dir = temp_dir("redis-cluster");
        let masters: Vec<Redis> = (0..3 * (1 + replicas))
            .map(|i| {
                let mut r = Redis {
                    child: None,
                    port: free_port(),
                    dir: dir.join(i.to_string()),
                    persistent: false,
                    extra: vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-node-timeout".into(),
                        "2000".into(),
                        "--enable-debug-command".into(),
                        "yes".into(),
                    ],
                };
                std::fs::create_dir_all(&r.dir).unwrap();
                r.spawn();
                r
            })
            .collect();
        let addrs: Vec<String> = masters
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        // Bounded: redis-cli waits forever for a node that died while the cluster forms.
        let status = Process::new("timeout")
            .args(["60", "redis-cli", "--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "redis-cli --cluster create failed");
        let deadline = std::time::Instant::now() + TIMEOUT;
        for m in &masters {
            loop {
                let info = m.cli_all(&["CLUSTER", "INFO"]).unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "cluster never became ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { masters }
    }

    /// Seed URLs for `--redis-url`.
    pub fn url(&self) -> String {
        self.masters
            .iter()
            .map(|m| format!("redis+cluster://127.0.0.1:{}", m.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every server (masters and replicas).
    pub fn masters(&self) -> &[Redis] {
        &self.masters
    }

    pub fn servers_mut(&mut self) -> &mut [Redis] {
        &mut self.masters
    }

    /// The server currently serving `slot` as master, by `CLUSTER SLOTS` from any live
    /// server: its index in `masters()` and its node id.
    pub fn owner_of(&self, slot: u16) -> (usize, String) {
        for server in &self.masters {
            let Some(out) = server.cli_all(&["CLUSTER", "SHARDS"]) else {
                continue;
            };
            if out.trim().is_empty() {
                continue;
            }
            // redis-cli prints the nested reply flat; walk it: slots, then nodes with
            // port, role and health.
            let lines: Vec<&str> = out.lines().map(str::trim).collect();
            let mut i = 0;
            while i < lines.len() {
                if lines[i] == "slots" {
                    let mut ranges = Vec::new();
                    let mut j = i + 1;
                    while j + 1 < lines.len() && lines[j] != "nodes" {
                        if let (Ok(a), Ok(b)) =
                            (lines[j].parse::<u16>(), lines[j + 1].parse::<u16>())
                        {
                            ranges.push((a, b));
                            j += 2;
                        } else {
                            j += 1;
                        }
                    }
                    let owns = ranges.iter().any(|&(a, b)| a <= slot && slot <= b);
                    // Find the master among the nodes of this shard.
                    let mut k = j;
                    let (mut id, mut port, mut master) = (String::new(), 0u16, None);
                    while k < lines.len() && lines[k] != "slots" {
                        match lines[k] {
                            "id" => id = lines[k + 1].to_owned(),
                            "port" => port = lines[k + 1].parse().unwrap_or(0),
                            "role" if lines[k + 1] == "master" => master = Some((id.clone(), port)),
                            _ => {}
                        }
                        k += 1;
                    }
                    if owns && let Some((id, port)) = master {
                        let index = self.masters.iter().position(|m| m.port == port).unwrap();
                        return (index, id);
                    }
                    i = k;
                } else {
                    i += 1;
                }
            }
        }
        panic!("no master owns slot {slot}")
    }

    /// The node id of `masters()[index]`.
    pub fn node_id(&self, index: usize) -> String {
        self.masters[index]
            .cli_all(&["CLUSTER", "MYID"])
            .unwrap()
            .trim()
            .to_owned()
    }
}

/// Redis Sentinel processes watching one master (`mymaster`).
pub struct Sentinels {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    dir: PathBuf,
}

impl Sentinels {
    /// Three sentinels (quorum 2) watching `master`, failing over after 1 s of silence.
    pub fn start(master: &Redis) -> Self {
        let dir = temp_dir("sentinel");
        let mut children = Vec::new();
        let mut ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    dir.display(),
                    master.port
                ),
            )
            .unwrap();
            let child = Process::new("redis-sentinel")
                .arg(&conf)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-sentinel (apt-get install redis-sentinel)");
            children.push(child);
            ports.push(port);
        }
        let s = Self {
            children,
            ports,
            dir,
        };
        let deadline = std::time::Instant::now() + TIMEOUT;
        while s.master_port().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "sentinels did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// `redis+sentinel://` URL for `--redis-url`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }

    /// The master's port as the sentinels currently see it.
    pub fn master_port(&self) -> Option<u16> {
        let out = Process::new("redis-cli")
            .args(["-p", &self.ports[0].to_string()])
            .args(["SENTINEL", "get-master-addr-by-name", "mymaster"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process's resident memory (VmRSS), in KiB; 0 if it cannot be read.
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

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
        let path = std::env::temp_dir().join(format!(
            "gateway-test-{}-{}.toml",
            std::process::id(),
            CONFIG_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, config).unwrap();
        let mut child = Process::new(env!("CARGO_BIN_EXE_gateway"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--node-id",
                "test-node",
                "--config",
            ])
            .arg(&path)
            .args(args)
            .env("GATEWAY_LOG", "warn")
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
        let mut s = std::net::TcpStream::connect(self.addr).unwrap();
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

    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.http(
            method,
            path,
            &[
                ("X-API-Key", "test-key"),
                ("Content-Type", "application/json"),
            ],
            body,
        );
        (
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
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
        let mut batch = Batch::new(self.encoding, 256);
        for f in frames {
            batch.push(&encode_frame(self.encoding, f));
        }
        let payload = batch.take();
        let msg = match self.encoding {
            Encoding::Proto => Message::Binary(payload),
            Encoding::Json => Message::Text(payload.try_into().unwrap()),
        };
        self.ws.send(msg).await.unwrap();
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
                Err(_) => return None,
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

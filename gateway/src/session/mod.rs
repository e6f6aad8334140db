//! One session per WebSocket: decodes client frames, runs commands, and writes replies
//! and pushes. A single task owns the socket; the hub reaches it only through its
//! [`Outbox`], and every wake-up drains all that is queued into as few WebSocket messages
//! (and write syscalls) as possible.
//!
//! Every server-initiated close sends a `Disconnect` frame first, then a close frame with
//! the same code (DESIGN.md, close codes).

mod commands;
pub mod outbox;
mod rate;

use crate::{
    auth::{AuthError, Identity},
    hub::SessionId,
    metrics,
    node::Node,
};
use broker_proto::{
    Batch, CloseCode, DecodeError, Encoding, ErrorCode, Limits, decode_frames, encode_frame,
    v1::{
        ClientFrame, ClientInfo, Disconnect, Error as WireError, ServerFrame, server_frame::Body,
    },
};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use outbox::{OutItem, Outbox};
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Error as WsError, Message,
        error::{CapacityError, ProtocolError},
        protocol::{CloseFrame, frame::coding::CloseCode as WsCloseCode},
    },
};

/// Pushes are packed into WebSocket messages of about this size: large enough that one
/// write carries many small publications, small enough that tungstenite's write buffer
/// (which keeps its capacity) stays modest per connection.
const MAX_BATCH_BYTES: usize = 16 * 1024;
/// How long a closing session waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What the transport learned at upgrade time.
pub struct Params {
    pub encoding: Encoding,
    /// The token given at upgrade (query `token` or `Authorization: Bearer`), verified.
    pub token: Option<Result<Identity, AuthError>>,
    /// Set when the node is full: the session only says so (1013) and ends.
    pub reject: Option<CloseCode>,
}

/// A channel this session subscribes to.
struct Subscription {
    channel: crate::channel::ChannelName,
    /// The highest offset delivered (or recovered) here; publications at or below it
    /// are duplicates of what the client already has and are skipped.
    last_offset: u64,
    presence: bool,
    join_leave: bool,
}

/// A command that failed: its documented code, a message for humans, and whether the
/// connection must close afterwards.
#[derive(Debug)]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
    pub close: Option<CloseCode>,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            close: None,
        }
    }
}

enum Exit {
    /// Close with this code (after a `Disconnect` frame).
    Close(CloseCode),
    /// The peer went away or the socket failed; nothing more can be sent.
    Gone,
}

pub struct Session {
    node: Arc<Node>,
    id: SessionId,
    client: String,
    encoding: Encoding,
    identity: Option<Identity>,
    connected: bool,
    outbox: Arc<Outbox>,
    subscriptions: HashMap<Arc<str>, Subscription>,
    /// Replies and per-session pushes waiting for the next write, already packed.
    batch: Batch,
    drained: VecDeque<OutItem>,
    bucket: rate::TokenBucket,
    strikes: u32,
    limits: Limits,
}

/// Runs a session to its end. The caller has completed the WebSocket upgrade.
pub async fn run<S>(node: Arc<Node>, mut ws: WebSocketStream<S>, params: Params)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let now = Instant::now();
    let (id, client) = node.next_session();
    let outbox = Arc::new(Outbox::new(node.config.limits.outbound_queue_bytes));
    let mut session = Session {
        id,
        client,
        encoding: params.encoding,
        identity: None,
        connected: false,
        outbox,
        subscriptions: HashMap::new(),
        batch: Batch::new(params.encoding, 0),
        drained: VecDeque::new(),
        bucket: rate::TokenBucket::new(
            node.config.limits.commands_per_second,
            node.config.limits.command_burst,
            now,
        ),
        strikes: 0,
        limits: Limits {
            max_frames_per_message: node.config.limits.max_frames_per_message,
            max_frame_bytes: node.config.limits.max_message_bytes,
        },
        node,
    };
    let exit = match (params.reject, params.token) {
        (Some(code), _) => Exit::Close(code),
        (None, Some(Err(AuthError::Invalid(_)))) => Exit::Close(CloseCode::TokenInvalid),
        (None, Some(Err(AuthError::Expired))) => Exit::Close(CloseCode::TokenExpired),
        (None, token) => {
            session.identity = token.and_then(Result::ok);
            session.node.register(
                session.id,
                session.user().to_owned(),
                session.outbox.clone(),
            );
            let exit = session.serve(&mut ws).await;
            Box::pin(session.leave_all()).await;
            session.node.unregister(session.id);
            exit
        }
    };
    if let Exit::Close(code) = exit {
        Box::pin(session.close(&mut ws, code)).await;
    }
}

impl Session {
    fn user(&self) -> &str {
        self.identity.as_ref().map_or("", |i| i.user.as_str())
    }

    fn info(&self) -> ClientInfo {
        ClientInfo {
            user: self.user().to_owned(),
            client: self.client.clone(),
        }
    }

    async fn serve<S>(&mut self, ws: &mut WebSocketStream<S>) -> Exit
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ping_every = self.node.config.ping_interval();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = self.outbox.wait() => {}
                message = ws.next() => {
                    last_heard = Instant::now();
                    match message {
                        // tungstenite queued the echo of the client's close: send it.
                        Some(Ok(Message::Close(_))) => {
                            let _ = tokio::time::timeout(CLOSE_LINGER, ws.flush()).await;
                            return Exit::Gone;
                        }
                        Some(Ok(message)) => {
                            if let Some(exit) = Box::pin(self.on_message(message)).await {
                                return exit;
                            }
                        }
                        Some(Err(e)) => return exit_for(e),
                        None => return Exit::Gone,
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > ping_every * 2 {
                        return Exit::Close(CloseCode::IdleTimeout);
                    }
                    if self.token_expired() {
                        return Exit::Close(CloseCode::TokenExpired);
                    }
                    if ws.feed(Message::Ping(Bytes::new())).await.is_err() {
                        return Exit::Gone;
                    }
                }
            }
            match self.write_pending(ws).await {
                Ok(None) => {}
                Ok(Some(code)) => return Exit::Close(code),
                Err(_) => return Exit::Gone,
            }
        }
    }

    fn token_expired(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.identity
            .as_ref()
            .and_then(|i| i.expires_at)
            .is_some_and(|exp| exp <= now)
    }

    /// Handles one WebSocket message from the client; `Some` ends the session.
    async fn on_message(&mut self, message: Message) -> Option<Exit> {
        let payload = match (message, self.encoding) {
            (Message::Binary(b), Encoding::Proto) => b,
            (Message::Text(t), Encoding::Json) => Bytes::from(t),
            (Message::Binary(_) | Message::Text(_), _) => {
                return Some(Exit::Close(CloseCode::UnsupportedData));
            }
            // tungstenite answers pings itself; `serve` handles the peer's close.
            (Message::Close(_), _) => return Some(Exit::Gone),
            (Message::Ping(_) | Message::Pong(_) | Message::Frame(_), _) => return None,
        };
        let frames: Vec<ClientFrame> = match decode_frames(self.encoding, payload, &self.limits) {
            Ok(frames) => frames,
            Err(DecodeError::Empty) => return None,
            Err(e) if e.is_size() => return Some(Exit::Close(CloseCode::MessageTooBig)),
            Err(e) => {
                tracing::debug!(client = %self.client, error = %e, "undecodable frame");
                return Some(Exit::Close(CloseCode::InvalidPayload));
            }
        };
        for frame in frames {
            if let Some(code) = self.handle(frame).await {
                return Some(Exit::Close(code));
            }
        }
        None
    }

    fn push_frame(&mut self, frame: &ServerFrame) {
        self.batch.push(&encode_frame(self.encoding, frame));
    }

    fn reply(&mut self, id: u32, result: Result<Body, CommandError>) -> Option<CloseCode> {
        match result {
            Ok(body) => {
                self.push_frame(&ServerFrame {
                    id,
                    error: None,
                    body: Some(body),
                });
                None
            }
            Err(e) => {
                metrics::command_error(e.code.code());
                let error = WireError {
                    code: e.code.code(),
                    message: e.message,
                    temporary: e.code.temporary(),
                };
                self.push_frame(&ServerFrame {
                    id,
                    error: Some(error),
                    body: None,
                });
                e.close
            }
        }
    }

    /// Writes queued replies, then everything the hub queued, then flushes once.
    async fn write_pending<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
    ) -> Result<Option<CloseCode>, WsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let close = self.outbox.drain(&mut self.drained);
        let mut messages = 0u64;
        let mut bytes = 0u64;
        for item in self.drained.drain(..) {
            // Items for a channel unsubscribed meanwhile, or already delivered through
            // recovery, are skipped here rather than in the hub.
            let Some(sub) = self.subscriptions.get_mut(&item.channel) else {
                continue;
            };
            if item.offset == crate::hub::STREAM_RESET {
                sub.last_offset = 0;
                continue;
            }
            if item.offset != 0 {
                if item.offset <= sub.last_offset {
                    continue;
                }
                sub.last_offset = item.offset;
            }
            if !self.batch.is_empty() && self.batch.len() + item.frame.len() > MAX_BATCH_BYTES {
                let payload = self.batch.take();
                bytes += payload.len() as u64;
                messages += 1;
                ws.feed(message(self.encoding, payload)).await?;
            }
            self.batch.push(&item.frame);
        }
        if !self.batch.is_empty() {
            let payload = self.batch.take();
            bytes += payload.len() as u64;
            messages += 1;
            ws.feed(message(self.encoding, payload)).await?;
        }
        ws.flush().await?;
        if messages > 0 {
            self.node.metrics.ws_messages_sent.increment(messages);
            self.node.metrics.ws_bytes_sent.increment(bytes);
        }
        Ok(close)
    }

    /// Sends `Disconnect` and the close frame, then waits briefly for the client's close.
    async fn close<S>(&mut self, ws: &mut WebSocketStream<S>, code: CloseCode)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        metrics::disconnect(code.code());
        let disconnect = Disconnect {
            code: u32::from(code.code()),
            reason: code.reason().into(),
            reconnect: code.reconnect(),
        };
        self.push_frame(&ServerFrame {
            id: 0,
            error: None,
            body: Some(Body::Disconnect(disconnect)),
        });
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            let payload = self.batch.take();
            if ws.feed(message(self.encoding, payload)).await.is_err() {
                return;
            }
            let frame = CloseFrame {
                code: WsCloseCode::from(code.code()),
                reason: code.reason().into(),
            };
            if ws.close(Some(frame)).await.is_err() {
                return;
            }
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }

    /// Leaves every channel when the session ends.
    async fn leave_all(&mut self) {
        let subscriptions: Vec<_> = self.subscriptions.drain().collect();
        for (key, sub) in subscriptions {
            self.leave(&key, &sub).await;
        }
    }

    async fn leave(&self, key: &Arc<str>, sub: &Subscription) {
        self.node.hub.unsubscribe(key, self.id);
        self.node.broker.unsubscribe(&sub.channel).await;
        if sub.presence {
            let change = crate::broker::PresenceChange::Leave;
            if let Err(e) = self
                .node
                .broker
                .presence_update(&sub.channel, self.info(), change, sub.join_leave)
                .await
            {
                metrics::broker_error("presence");
                tracing::warn!(channel = %sub.channel, error = %e, "presence leave failed");
            }
        }
    }
}

fn message(encoding: Encoding, payload: Bytes) -> Message {
    match encoding {
        Encoding::Proto => Message::Binary(payload),
        // JSON frames come from serde_json, so the payload is UTF-8 by construction.
        Encoding::Json => match payload.try_into() {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Binary(Bytes::new()),
        },
    }
}

fn exit_for(error: WsError) -> Exit {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Exit::Close(CloseCode::MessageTooBig)
        }
        WsError::Capacity(_) => Exit::Close(CloseCode::MessageTooBig),
        WsError::Utf8(_) => Exit::Close(CloseCode::InvalidPayload),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Exit::Gone,
        WsError::Protocol(_) => Exit::Close(CloseCode::ProtocolError),
        _ => Exit::Gone,
    }
}

//! The connection task: moves bytes and time between a WebSocket and its
//! [`SessionCore`]. It is the only part of a session that knows tungstenite.
//!
//! Fair by construction: each turn waits for the client's next message, the outbox, or
//! the next deadline. The outbox goes first (the client's socket is then not even polled,
//! which matters at a delivery per wake-up), but after [`OUTBOX_STREAK`] outbox turns in a
//! row the client goes first, so a stream of deliveries holds up a client's commands and
//! pings for a bounded number of turns at most.
//! Deadlines (ping, idle, token expiry) are checked on every turn whatever woke it.
//! Every turn ends by writing everything pending in as few messages as possible and one
//! flush.

use super::core::{SessionCore, Tick};
use crate::metrics::Metrics;
use broker_proto::{CloseCode, Encoding};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::{collections::VecDeque, time::Duration};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Error as WsError, Message,
        error::{CapacityError, ProtocolError},
        protocol::frame::{
            Frame,
            coding::{Data, OpCode},
        },
        protocol::{CloseFrame, frame::coding::CloseCode as WsCloseCode},
    },
};

/// Messages larger than this go out as fragments of this size (RFC 6455 §5.4).
const FRAGMENT_BYTES: usize = 16 * 1024;
/// Outbox turns in a row before the client is served first.
const OUTBOX_STREAK: u32 = 4;
/// How long a closing session tries to hand over its farewell (after the rest of a
/// message cut off between fragments) and waits for the client's close frame: a client
/// that catches up on reading within it still learns why.
const CLOSE_LINGER: Duration = Duration::from_secs(3);
/// Bytes per second a client must at least take in: a write may take `write_timeout`
/// (`[limits] write_timeout_ms`) plus the time its bytes need at this rate; a client that
/// takes longer has stopped reading and is closed as a slow consumer (4008). Without a
/// bound, a write blocked on a full socket would hold the session — its pings, idle
/// timeout and outbox — for as long as the client stayed connected.
const MIN_WRITE_RATE: f64 = 64.0 * 1024.0;

/// How a connection ends.
pub enum Exit {
    /// Close with this code (after a `Disconnect` frame).
    Close(CloseCode),
    /// The peer went away or the socket failed; nothing more can be sent.
    Gone,
}

enum Event {
    Message(Option<Result<Message, WsError>>),
    Outbox,
    Deadline,
}

/// Serves the session until it ends; the caller then closes with the exit code.
pub async fn serve<S>(
    core: &mut SessionCore,
    ws: &mut WebSocketStream<S>,
    carry: &mut Carry,
    metrics: &Metrics,
) -> Exit
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let outbox = core.outbox().clone();
    let grace = core.ctx.config.write_timeout;
    let mut outbox_streak = 0u32;
    let mut pending = Vec::new();
    let mut deadline = core.next_deadline();
    let sleep = tokio::time::sleep_until(deadline.into());
    tokio::pin!(sleep);
    // Set while the client is over `bytes_per_second`: the socket is not read until then.
    let mut paused_until: Option<std::time::Instant> = None;
    loop {
        // Commands left from the last message run first; the socket is not read until
        // they are done.
        if core.has_deferred() {
            if let Some(code) = Box::pin(core.resume()).await {
                return Exit::Close(code);
            }
        } else {
            let now = tokio::time::Instant::now().into_std();
            if paused_until.is_some_and(|t| t <= now) {
                paused_until = None;
            }
            let reading = paused_until.is_none();
            let next = paused_until.map_or(core.next_deadline(), |t| t.min(core.next_deadline()));
            if next != deadline {
                deadline = next;
                sleep.as_mut().reset(deadline.into());
            }
            let event = if outbox_streak >= OUTBOX_STREAK {
                tokio::select! {
                    biased;
                    m = ws.next(), if reading => Event::Message(m),
                    _ = outbox.wait() => Event::Outbox,
                    _ = &mut sleep => Event::Deadline,
                }
            } else {
                tokio::select! {
                    biased;
                    _ = outbox.wait() => Event::Outbox,
                    m = ws.next(), if reading => Event::Message(m),
                    _ = &mut sleep => Event::Deadline,
                }
            };
            outbox_streak = match event {
                Event::Outbox => outbox_streak + 1,
                _ => 0,
            };
            if let Event::Message(message) = event {
                let now = tokio::time::Instant::now().into_std();
                core.heard(now);
                if let Some(Ok(m)) = &message
                    && let Some(wait) = core.charge_read(m.len(), now)
                {
                    crate::metrics::read_throttled(wait);
                    paused_until = Some(now + wait);
                }
                match message {
                    // tungstenite queued the echo of the client's close: send it.
                    Some(Ok(Message::Close(_))) => {
                        let _ = tokio::time::timeout(CLOSE_LINGER, ws.flush()).await;
                        return Exit::Gone;
                    }
                    Some(Ok(message)) => {
                        if let Some(exit) = on_message(core, message).await {
                            return exit;
                        }
                    }
                    Some(Err(e)) => return exit_for(e),
                    None => return Exit::Gone,
                }
            }
            match core.on_timer(tokio::time::Instant::now().into_std()) {
                Tick::Nothing => {}
                Tick::Close(code) => return Exit::Close(code),
                Tick::Ping => match bounded(grace, 0, ws.feed(Message::Ping(Bytes::new()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Exit::Gone,
                    Err(Stalled) => return Exit::Close(CloseCode::SlowConsumer),
                },
            }
        }
        let close = core.take_output(&mut pending);
        if close == Some(CloseCode::SlowConsumer) {
            // Its queue overflowed: what is queued would only wait behind what the
            // client is not reading. It recovers it after reconnecting.
            pending.clear();
        }
        // A session's last write gets the grace period only, not time per byte: it must
        // not hold a closing session (and its metrics) for as long as its bytes would.
        let bytes = match close {
            None => pending.iter().map(Bytes::len).sum(),
            Some(_) => 0,
        };
        let written = bounded(
            grace,
            bytes,
            write(ws, core.encoding(), &mut pending, carry, metrics),
        );
        // A close requested while the write is blocked (the queue overflowed behind it)
        // ends the session at once, unless this write is the session's last.
        let aborted = async {
            match close {
                None => outbox.closed().await,
                Some(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            result = written => match result {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Exit::Gone,
                Err(Stalled) => {
                    tracing::debug!("a write made no progress in time; closing as a slow consumer");
                    return Exit::Close(CloseCode::SlowConsumer);
                }
            },
            () = aborted => {
                return Exit::Close(outbox.closing().unwrap_or(CloseCode::SlowConsumer));
            }
        }
        core.written();
        if let Some(code) = close {
            return Exit::Close(code);
        }
    }
}

/// Hands one WebSocket message to the core; `Some` ends the session.
async fn on_message(core: &mut SessionCore, message: Message) -> Option<Exit> {
    let payload = match (message, core.encoding()) {
        (Message::Binary(b), Encoding::Proto) => b,
        (Message::Text(t), Encoding::Json) => Bytes::from(t),
        (Message::Binary(_) | Message::Text(_), _) => {
            return Some(Exit::Close(CloseCode::UnsupportedData));
        }
        // tungstenite answers pings itself; `serve` handles the peer's close.
        (Message::Close(_), _) => return Some(Exit::Gone),
        (Message::Ping(_) | Message::Pong(_) | Message::Frame(_), _) => return None,
    };
    // Boxed: a command's future is large and live only briefly, and the connection
    // task's size is paid by every idle connection.
    Box::pin(core.on_payload(payload)).await.map(Exit::Close)
}

struct Stalled;

/// Runs a write of `bytes` within the time a reading client needs for it.
async fn bounded<T>(
    grace: Duration,
    bytes: usize,
    write: impl Future<Output = T>,
) -> Result<T, Stalled> {
    let limit = grace + Duration::from_secs_f64(bytes as f64 / MIN_WRITE_RATE);
    tokio::time::timeout(limit, write)
        .await
        .map_err(|_| Stalled)
}

/// The fragments of the large message being written, handed to tungstenite one at a
/// time. What a dropped write (a timeout, a slow-consumer abort) did not hand over stays
/// here, so a message cut off between its fragments can be finished before the close
/// frame. Small messages go straight to tungstenite.
#[derive(Default)]
pub struct Carry(VecDeque<Message>);

/// Writes the packed payloads, then flushes once.
async fn write<S>(
    ws: &mut WebSocketStream<S>,
    encoding: Encoding,
    pending: &mut Vec<Bytes>,
    carry: &mut Carry,
    metrics: &Metrics,
) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut messages, mut bytes) = (0u64, 0u64);
    for payload in pending.drain(..) {
        bytes += payload.len() as u64;
        messages += 1;
        if payload.len() <= FRAGMENT_BYTES {
            ws.feed(message(encoding, payload)).await?;
            continue;
        }
        // tungstenite copies each frame into its write buffer and keeps that buffer's
        // capacity: one large message (a history page, a blob chunk) would pin its size
        // for the connection's lifetime. Fragments keep it at FRAGMENT_BYTES.
        let first = match encoding {
            Encoding::Proto => OpCode::Data(Data::Binary),
            Encoding::Json => OpCode::Data(Data::Text),
        };
        let mut offset = 0;
        while offset < payload.len() {
            let end = (offset + FRAGMENT_BYTES).min(payload.len());
            let opcode = if offset == 0 {
                first
            } else {
                OpCode::Data(Data::Continue)
            };
            let frame = Frame::message(payload.slice(offset..end), opcode, end == payload.len());
            carry.0.push_back(Message::Frame(frame));
            offset = end;
        }
        // Cloning a frame clones a `Bytes` handle; it leaves `carry` once handed over.
        while let Some(m) = carry.0.front().cloned() {
            ws.feed(m).await?;
            carry.0.pop_front();
        }
    }
    ws.flush().await?;
    if messages > 0 {
        metrics.ws_messages_sent.increment(messages);
        metrics.ws_bytes_sent.increment(bytes);
    }
    Ok(())
}

/// Sends the core's farewell (`Disconnect`) and the close frame, then waits briefly for
/// the client's close.
pub async fn close<S>(
    core: &mut SessionCore,
    ws: &mut WebSocketStream<S>,
    carry: &mut Carry,
    code: CloseCode,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let farewell = core.farewell(code);
    let encoding = core.encoding();
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        // A message cut off between fragments is finished first, or the client would
        // see the farewell inside it (a protocol error); whole messages not yet handed
        // over are dropped (the client recovers them).
        while let Some(Message::Frame(f)) = carry.0.front() {
            if f.header().opcode != OpCode::Data(Data::Continue) {
                break;
            }
            let m = Message::Frame(f.clone());
            if ws.feed(m).await.is_err() {
                return;
            }
            carry.0.pop_front();
        }
        if ws.feed(message(encoding, farewell)).await.is_err() {
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

//! The connection task: moves bytes and time between a WebSocket and its
//! [`SessionCore`]. It is the only part of a session that knows the socket.
//!
//! Fair by construction: each turn waits for the client's next message, the outbox, or
//! the next deadline. The outbox goes first (the client's socket is then not even polled,
//! which matters at a delivery per wake-up), but after [`OUTBOX_STREAK`] outbox turns in a
//! row the client goes first, so a stream of deliveries holds up a client's commands and
//! pings for a bounded number of turns at most.
//! Deadlines (ping, idle, token expiry) are checked on every turn whatever woke it; the
//! ping and idle deadlines wake the session through its outbox (the node-wide sweep,
//! `Context::start_sweep`), the others through a timer held only while they exist.
//! Every turn ends by writing everything pending in as few messages as possible and one
//! flush.

use super::core::{SessionCore, Tick};
use crate::hub::outbox::Outbox;
use crate::{
    metrics::Metrics,
    ws::{Error as WsError, FrameError, Incoming, WebSocket},
};
use broker_proto::{CloseCode, Encoding};
use bytes::Bytes;
use std::{pin::Pin, task::Poll, time::Duration};
use tokio::io::{AsyncRead, AsyncWrite};

/// Outbox turns in a row before the client is served first.
const OUTBOX_STREAK: u32 = 4;
/// How long a closing session tries to hand over its farewell (after the rest of a
/// frame already begun) and waits for the client's close frame: a client that catches
/// up on reading within it still learns why.
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
    Message(Option<Result<Incoming, WsError>>),
    Outbox,
    Deadline,
}

/// Serves the session until it ends; the caller then closes with the exit code.
///
/// Not an `async fn`, for the reason given at [`super::run`]: the arguments would be kept
/// twice in every parked connection's task.
#[allow(clippy::manual_async_fn)]
pub fn serve<'a, S>(
    core: &'a mut SessionCore,
    ws: &'a mut WebSocket<S>,
    metrics: &'a Metrics,
) -> impl Future<Output = Exit> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let mut outbox_streak = 0u32;
        // Pings and the idle check are the node-wide sweep's (`Outbox::set_due`); this
        // timer exists only while a deadline that needs precision does (read pause,
        // write hold, upload or token expiry): most parked connections hold none.
        let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        // Set while the client is over `bytes_per_second`: the socket is not read until then.
        let mut paused_until: Option<std::time::Instant> = None;
        // Set while publications wait for a namespace's `write_delay_ms`, to go out together.
        let mut hold_until: Option<std::time::Instant> = None;
        loop {
            // Commands left from the last message run first; the socket is not read until
            // they are done.
            if core.has_deferred() {
                if let Some(code) = Box::pin(core.resume()).await {
                    return Exit::Close(code);
                }
            } else {
                // Scoped in a block: a local still in scope at an await below would be kept
                // in the task, and every parked connection would pay for it.
                {
                    let now = tokio::time::Instant::now().into_std();
                    if paused_until.is_some_and(|t| t <= now) {
                        paused_until = None;
                    }
                    core.outbox().set_due(core.next_ping());
                    let exact = [core.next_exact_deadline(), paused_until, hold_until]
                        .into_iter()
                        .flatten()
                        .min();
                    match (exact, &mut timer) {
                        (None, _) => timer = None,
                        (Some(at), Some(t)) => {
                            if t.deadline() != at.into() {
                                t.as_mut().reset(at.into());
                            }
                        }
                        (Some(at), None) => {
                            timer = Some(Box::pin(tokio::time::sleep_until(at.into())));
                        }
                    }
                }
                let reading = paused_until.is_none();
                // Parked with nothing to write: the hub writes publications itself until
                // something wakes the session.
                let armed = ws.idle_for_writes() && core.arm();
                // Polled in place rather than through `select!`: no waiter or branch futures
                // are kept in the task while it is parked.
                let client_first = outbox_streak >= OUTBOX_STREAK;
                let outbox = core.outbox();
                let event = std::future::poll_fn(|cx| {
                    if client_first
                        && reading
                        && let Poll::Ready(m) = ws.poll_next(cx)
                    {
                        return Poll::Ready(Event::Message(m));
                    }
                    if outbox.poll_wait(cx).is_ready() {
                        return Poll::Ready(Event::Outbox);
                    }
                    if !client_first
                        && reading
                        && let Poll::Ready(m) = ws.poll_next(cx)
                    {
                        return Poll::Ready(Event::Message(m));
                    }
                    match timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                        Some(Poll::Ready(())) => Poll::Ready(Event::Deadline),
                        _ => Poll::Pending,
                    }
                })
                .await;
                if armed && let Some(rest) = core.disarm() {
                    ws.push_front_raw(rest);
                }
                if matches!(event, Event::Outbox) && hold_until.is_none() {
                    let delay = core.write_delay();
                    if !delay.is_zero() {
                        // Later pushes join the queue without waking the session.
                        hold_until = Some(std::time::Instant::now() + delay);
                        continue;
                    }
                }
                outbox_streak = match event {
                    Event::Outbox => outbox_streak + 1,
                    _ => 0,
                };
                // Only the payload is kept while the core handles it (see the block above).
                let payload = match event {
                    Event::Message(message) => {
                        let now = tokio::time::Instant::now().into_std();
                        core.heard(now);
                        if let Some(Ok(m)) = &message
                            && let Some(wait) = core.charge_read(m.len(), now)
                        {
                            crate::metrics::read_throttled(wait);
                            paused_until = Some(now + wait);
                        }
                        match message {
                            // The echo of the client's close is queued: sent after the loop.
                            Some(Ok(Incoming::Close(_))) => break,
                            Some(Ok(message)) => match payload(core.encoding(), message) {
                                Ok(payload) => payload,
                                Err(exit) => return exit,
                            },
                            Some(Err(e)) => return exit_for(e),
                            None => return Exit::Gone,
                        }
                    }
                    Event::Outbox | Event::Deadline => None,
                };
                // Boxed: a command's future is large and live only briefly, and the
                // connection task's size is paid by every idle connection.
                if let Some(payload) = payload
                    && let Some(code) = Box::pin(core.on_payload(payload)).await
                {
                    return Exit::Close(code);
                }
                match core.on_timer(tokio::time::Instant::now().into_std()) {
                    Tick::Nothing => {}
                    Tick::Close(code) => return Exit::Close(code),
                    // Written with this turn's output.
                    Tick::Ping => ws.send_ping(),
                }
            }
            // Made each turn: a parked connection keeps no output list.
            let mut pending = Vec::new();
            let close = core.take_output(&mut pending);
            if close == Some(CloseCode::SlowConsumer) {
                // Its queue overflowed: what is queued would only wait behind what the
                // client is not reading. It recovers it after reconnecting.
                pending.clear();
            }
            // Counted before the write (a failed write ends the session anyway), so the
            // counts are not kept across it.
            if !pending.is_empty() {
                let bytes: usize = pending.iter().map(Bytes::len).sum();
                metrics.ws_messages_sent.increment(pending.len() as u64);
                metrics.ws_bytes_sent.increment(bytes as u64);
            }
            // The common case: the socket takes everything at once, with no timer and no
            // allocation. Otherwise the rest is queued in `ws` and finished, bounded in time,
            // off the task's resting size.
            let json = core.encoding() == Encoding::Json;
            let first =
                std::future::poll_fn(|cx| Poll::Ready(ws.poll_send_all(cx, json, &mut pending)));
            match first.await {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Exit::Gone,
                Poll::Pending => {
                    let unsent = match close {
                        None => ws.unsent_bytes(),
                        Some(_) => 0,
                    };
                    let grace = core.ctx.config.write_timeout;
                    let outbox = core.outbox();
                    if let Some(exit) =
                        Box::pin(finish_write(ws, outbox, close, grace, unsent)).await
                    {
                        return exit;
                    }
                }
            }
            core.written();
            hold_until = None;
            if let Some(code) = close {
                return Exit::Close(code);
            }
        }
        // The client closed: its close's echo is queued.
        let _ = Box::pin(tokio::time::timeout(CLOSE_LINGER, ws.flush())).await;
        Exit::Gone
    }
}

/// The payload of a WebSocket message for the core, if it carries one; `Err` ends the
/// session.
fn payload(encoding: Encoding, message: Incoming) -> Result<Option<Bytes>, Exit> {
    match (message, encoding) {
        (Incoming::Binary(b), Encoding::Proto) | (Incoming::Text(b), Encoding::Json) => Ok(Some(b)),
        (Incoming::Binary(_) | Incoming::Text(_), _) => {
            Err(Exit::Close(CloseCode::UnsupportedData))
        }
        // `serve` handles the peer's close; pings are answered by the socket.
        (Incoming::Close(_), _) => Err(Exit::Gone),
        (Incoming::Ping(_) | Incoming::Pong(_), _) => Ok(None),
    }
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

/// Finishes a write the socket did not take at once; `Some` ends the session. A
/// session's last write gets the grace period only, not time per byte (`bytes` is 0):
/// it must not hold a closing session (and its metrics) for as long as its bytes would.
async fn finish_write<S>(
    ws: &mut WebSocket<S>,
    outbox: &Outbox,
    close: Option<CloseCode>,
    grace: Duration,
    bytes: usize,
) -> Option<Exit>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let written = bounded(grace, bytes, ws.flush());
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
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some(Exit::Gone),
            Err(Stalled) => {
                tracing::debug!("a write made no progress in time; closing as a slow consumer");
                Some(Exit::Close(CloseCode::SlowConsumer))
            }
        },
        () = aborted => Some(Exit::Close(outbox.closing().unwrap_or(CloseCode::SlowConsumer))),
    }
}

/// Sends the core's farewell (`Disconnect`) and the close frame, then waits briefly for
/// the client's close.
pub async fn close<S>(core: &mut SessionCore, ws: &mut WebSocket<S>, code: CloseCode)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let farewell = core.farewell(code);
    let json = core.encoding() == Encoding::Json;
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        // What is queued (the rest of a frame begun, whole frames after it) goes first,
        // so the farewell never lands inside another frame.
        if ws.send_all(json, &mut vec![farewell]).await.is_err() {
            return;
        }
        ws.send_close(code.code(), code.reason());
        if ws.flush().await.is_err() {
            return;
        }
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Incoming::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn exit_for(error: WsError) -> Exit {
    match error {
        WsError::Frame(FrameError::TooBig) => Exit::Close(CloseCode::MessageTooBig),
        WsError::Frame(FrameError::Utf8) => Exit::Close(CloseCode::InvalidPayload),
        WsError::Frame(FrameError::Protocol(_)) => Exit::Close(CloseCode::ProtocolError),
        WsError::Io(_) => Exit::Gone,
    }
}

//! `SessionCore`: one client connection's state and protocol, without the socket. The
//! connection task feeds it what the client sent and the passing of time, and writes what
//! it packs; tests drive it directly against the memory broker.
//!
//! It owns: who the client is, its subscriptions and their positions (the merge of
//! recovery replies with live publications), the replies waiting to be written, the
//! command rate limit, and the ping and idle deadlines.

use super::{
    context::Context,
    rate::{ByteBucket, TokenBucket},
    subscriptions::{Admit, Subscriptions},
};
use crate::{
    auth::Identity,
    blobs::upload::{Limits as UploadLimits, Uploads},
    error::CommandError,
    hub::{SessionId, outbox::Outbox},
    metrics,
};
use broker_proto::{
    Batch, CloseCode, DecodeError, Encoding, ErrorCode, Limits, decode_frames, encode_frame,
    v1::{
        ClientFrame, ClientInfo, Disconnect, Error as WireError, ServerFrame, server_frame::Body,
    },
};
use bytes::Bytes;
use std::{
    collections::VecDeque,
    sync::{Arc, atomic::AtomicUsize},
    time::Instant,
};

/// Pushes are packed into WebSocket messages of about this size: large enough that one
/// write carries many small publications, small enough to stay modest per connection.
pub const MAX_BATCH_BYTES: usize = 16 * 1024;
/// Blob chunk bytes written per turn at most, after everything else queued: small frames
/// never wait behind an image.
const BULK_PER_TURN: usize = 128 * 1024;

/// What the passing of time asks of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    Nothing,
    /// Send a WebSocket ping.
    Ping,
    Close(CloseCode),
}

/// A connection's uploads, and the downloads and RPC calls in flight (their tasks hold a
/// count).
pub(super) struct Media {
    pub uploads: Uploads,
    pub downloads: Arc<AtomicUsize>,
    pub rpcs: Arc<AtomicUsize>,
}

pub struct SessionCore {
    pub(super) ctx: Arc<Context>,
    pub(super) id: SessionId,
    /// The display name given in `Connect` (shown in presence, Join and Leave).
    pub(super) name: String,
    pub(super) encoding: Encoding,
    /// Boxed, as is the slot: most connections have neither, and every idle connection
    /// would pay for their room.
    pub(super) identity: Option<Box<Identity>>,
    /// Counts this connection against its user's limit while it lasts.
    pub(super) user_slot: Option<Box<crate::peers::UserSlot>>,
    pub(super) connected: bool,
    pub(super) outbox: Arc<Outbox>,
    pub(super) subscriptions: Subscriptions,
    /// Uploads, downloads and RPC calls: made at the first one (most connections never
    /// make any, and an idle connection should cost little).
    media: Option<Box<Media>>,
    /// Publishes answered off this task (made at the first one).
    pub(super) pipeline: Option<Arc<super::pipeline::Pipeline>>,
    /// History permits of pages replied to in this turn, then while they are written.
    /// One list for both: those of pages being written come first (`writing` of them).
    pub(super) permits: Vec<crate::channels::ReadPermit>,
    writing: u32,
    /// Commands of a message left for the next turn: a session holds at most one
    /// history page's permit at a time, so the rest wait until that page is written
    /// (never waiting for a permit while holding one: no deadlock between sessions).
    deferred: VecDeque<ClientFrame>,
    /// Replies and per-session pushes waiting for the next write, already packed.
    replies: Batch,
    bucket: TokenBucket,
    bytes_in: ByteBucket,
    strikes: u32,
    last_heard: Instant,
    next_ping: Instant,
}

impl SessionCore {
    /// A new session; [`Self::register`] makes it live.
    pub fn new(
        ctx: Arc<Context>,
        encoding: Encoding,
        identity: Option<Identity>,
        now: Instant,
    ) -> Self {
        let id = ctx.next_session();
        let config = &ctx.config;
        let outbox = Arc::new(Outbox::new(config.outbound_queue_bytes));
        Self {
            id,
            encoding,
            identity: identity.map(Box::new),
            user_slot: None,
            connected: false,
            name: String::new(),
            subscriptions: Subscriptions::default(),
            media: None,
            pipeline: None,
            permits: Vec::new(),
            writing: 0,
            deferred: VecDeque::new(),
            replies: Batch::new(encoding, 0),
            bucket: TokenBucket::new(config.command_burst, now),
            bytes_in: ByteBucket::new(config.bytes_per_second, config.bytes_burst, now),
            strikes: 0,
            last_heard: now,
            next_ping: now + config.ping_interval,
            outbox,
            ctx,
        }
    }

    /// The connection's uploads, downloads and RPC calls, made at the first use.
    pub(super) fn media(&mut self) -> &mut Media {
        let ctx = &self.ctx;
        self.media.get_or_insert_with(|| {
            let blobs = ctx.channels.blob_config();
            Box::new(Media {
                uploads: Uploads::new(
                    UploadLimits {
                        max_bytes: blobs.max_bytes,
                        max_uploads: blobs.max_uploads_per_connection,
                        idle: blobs.upload_idle,
                    },
                    ctx.upload_budget.clone(),
                ),
                downloads: Arc::default(),
                rpcs: Arc::default(),
            })
        })
    }

    /// Registers the session with the hub, so draining and disconnects reach it.
    pub fn register(&self) {
        self.ctx
            .hub
            .register(self.id, self.user().to_owned(), self.outbox.clone());
    }

    /// How long publications wait to be written together (the longest `write_delay_ms`
    /// of the subscribed namespaces).
    pub fn write_delay(&self) -> std::time::Duration {
        self.subscriptions.write_delay()
    }

    /// Parks the session: the hub may write publications on its live subscriptions
    /// straight to the socket until [`disarm`](Self::disarm) (the outbox's express lane).
    pub fn arm(&self) -> bool {
        self.outbox
            .arm(self.subscriptions.lanes(), self.subscriptions.len())
    }

    /// Takes the positions the express lane advanced back into the subscriptions; returns
    /// the rest of a frame the hub began, which must be written first.
    pub fn disarm(&mut self) -> Option<Bytes> {
        let subscriptions = &mut self.subscriptions;
        self.outbox.disarm(|lane| subscriptions.advance(lane))
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    pub fn client_id(&self) -> String {
        self.ctx.client_id(self.id)
    }

    pub(super) fn user(&self) -> &str {
        self.identity.as_ref().map_or("", |i| i.user.as_str())
    }

    pub(super) fn info(&self) -> ClientInfo {
        ClientInfo {
            user: self.user().to_owned(),
            client: self.client_id(),
            name: self.name.clone(),
        }
    }

    /// Something (a message, a pong) arrived from the client.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// Counts `bytes` read from the client against `bytes_per_second`; when over, how
    /// long the connection must not read (TCP then slows the sender).
    pub fn charge_read(&mut self, bytes: usize, now: Instant) -> Option<std::time::Duration> {
        let config = &self.ctx.config;
        self.bytes_in
            .charge(bytes, now, config.bytes_per_second, config.bytes_burst)
    }

    /// When the next ping or idle check is due: watched by the node-wide sweep
    /// (`Outbox::set_due`), with its coarser precision.
    pub fn next_ping(&self) -> Instant {
        self.next_ping
    }

    /// When [`Self::on_timer`] has something else to do (an abandoned upload, the token's
    /// expiry): these get a timer of their own, as precise as tokio's.
    pub fn next_exact_deadline(&self) -> Option<Instant> {
        let upload = self.media.as_ref().and_then(|m| m.uploads.next_expiry());
        let expiry = self
            .identity
            .as_ref()
            .and_then(|i| i.expires_at)
            .and_then(|exp| {
                let left = exp.saturating_sub(self.ctx.clock.unix_secs());
                self.ctx
                    .clock
                    .now()
                    .checked_add(std::time::Duration::from_secs(left))
            });
        match (upload, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Pings, the idle timeout, token expiry, abandoned uploads.
    pub fn on_timer(&mut self, now: Instant) -> Tick {
        if self.token_expired() {
            return Tick::Close(CloseCode::TokenExpired);
        }
        let abandoned = self.media.as_mut().map_or(0, |m| m.uploads.expire(now));
        for _ in 0..abandoned {
            metrics::blob_upload("aborted");
        }
        if now < self.next_ping {
            return Tick::Nothing;
        }
        let every = self.ctx.config.ping_interval;
        if now.saturating_duration_since(self.last_heard) > every * 2 {
            return Tick::Close(CloseCode::IdleTimeout);
        }
        self.next_ping = now + every;
        Tick::Ping
    }

    fn token_expired(&self) -> bool {
        self.identity
            .as_ref()
            .and_then(|i| i.expires_at)
            .is_some_and(|exp| exp <= self.ctx.clock.unix_secs())
    }

    /// One WebSocket message from the client in the negotiated encoding; `Some` closes.
    pub async fn on_payload(&mut self, payload: Bytes) -> Option<CloseCode> {
        let limits = Limits {
            max_frames_per_message: self.ctx.config.max_frames_per_message,
            max_frame_bytes: self.ctx.config.max_message_bytes,
        };
        let frames: Vec<ClientFrame> = match decode_frames(self.encoding, payload, &limits) {
            Ok(frames) => frames,
            Err(DecodeError::Empty) => return None,
            Err(e) if e.is_size() => return Some(CloseCode::MessageTooBig),
            Err(e) => {
                tracing::debug!(client = %self.client_id(), error = %e, "undecodable frame");
                return Some(CloseCode::InvalidPayload);
            }
        };
        self.deferred.extend(frames);
        self.resume().await
    }

    /// Whether commands wait for the next turn (the connection reads nothing meanwhile).
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Runs waiting commands until one needs a history permit while this turn holds
    /// one already; `Some` closes.
    pub async fn resume(&mut self) -> Option<CloseCode> {
        while let Some(frame) = self.deferred.pop_front() {
            if self.holds_read_permit() && reads_history(&frame) {
                self.deferred.push_front(frame);
                return None;
            }
            if let Some(code) = self.handle(frame).await {
                self.deferred.clear();
                return Some(code);
            }
        }
        // Given back: an idle connection keeps no command queue.
        self.deferred = VecDeque::new();
        None
    }

    /// The last write has finished: the history pages it carried are gone.
    pub fn written(&mut self) {
        if self.writing > 0 {
            self.permits.drain(..self.writing as usize);
            self.writing = 0;
            if self.permits.is_empty() {
                self.permits = Vec::new();
            }
        }
    }

    /// Whether a page replied to in this turn holds a history permit.
    fn holds_read_permit(&self) -> bool {
        self.permits.len() > self.writing as usize
    }

    /// Runs one command (rate-limited) and queues its reply; `Some` closes.
    async fn handle(&mut self, frame: ClientFrame) -> Option<CloseCode> {
        let id = frame.id;
        let config = &self.ctx.config;
        let (rate, burst) = (config.commands_per_second, config.command_burst);
        if !self.bucket.take(self.ctx.clock.now(), rate, burst) {
            self.strikes += 1;
            if self.strikes >= self.ctx.config.rate_limit_strikes {
                return Some(CloseCode::RateLimited);
            }
            let limited =
                CommandError::new(ErrorCode::TooManyRequests, "command rate limit exceeded");
            return self.reply(id, Err(limited));
        }
        self.strikes = 0;
        // An expired token ends the session at its next command, not at the next timer
        // tick: 109, then close 4003.
        if self.token_expired() {
            let expired = CommandError::closing(
                ErrorCode::TokenExpired,
                "token expired",
                CloseCode::TokenExpired,
            );
            return self.reply(id, Err(expired));
        }
        let publish = matches!(
            frame.command,
            Some(broker_proto::v1::client_frame::Command::Publish(_))
        );
        if let (false, Some(pipeline)) = (publish, &self.pipeline) {
            // Everything but the next publish sees the earlier ones done.
            pipeline.settled().await;
        }
        let result = self.dispatch(id, frame.command).await;
        self.reply(id, result)
    }

    /// Queues the reply (only for `id > 0`: a reply to 0 could not be matched to its
    /// command; `Ok(None)`: the answer comes later, off this task); returns the close an
    /// error asks for.
    fn reply(&mut self, id: u32, result: Result<Option<Body>, CommandError>) -> Option<CloseCode> {
        let (body, error, close) = match result {
            Ok(None) => return None,
            Ok(Some(body)) => (Some(body), None, None),
            Err(e) => {
                let (error, close) = wire_error(e);
                (None, Some(error), close)
            }
        };
        if id > 0 {
            self.push_frame(&ServerFrame { id, error, body });
        }
        close
    }

    pub(super) fn push_frame(&mut self, frame: &ServerFrame) {
        self.replies.push(&encode_frame(self.encoding, frame));
    }

    /// Packs what waits for the client into WebSocket message payloads of about
    /// [`MAX_BATCH_BYTES`]: replies first, then what the hub queued that the client
    /// should get. Returns a close the outbox asked for (slow consumer, drain, API).
    pub fn take_output(&mut self, out: &mut Vec<Bytes>) -> Option<CloseCode> {
        // This turn's history pages are held until their write has finished.
        self.writing = self.permits.len() as u32;
        // Locals, not fields: an idle connection keeps no lists.
        let mut drained = VecDeque::new();
        let mut bulk = Vec::new();
        let close = self.outbox.drain(&mut drained);
        self.outbox.drain_bulk(&mut bulk, BULK_PER_TURN);
        if self.replies.is_empty() && bulk.is_empty() && drained.len() == 1 {
            // One delivery, the common case at low rates: its frame goes out as it is,
            // shared with every other recipient, without a copy.
            let item = drained.pop_front().expect("one item");
            if self.subscriptions.admit(&item) == Admit::Deliver {
                out.push(item.frame);
            }
            return close;
        }
        for item in drained {
            if self.subscriptions.admit(&item) == Admit::Skip {
                continue;
            }
            if !self.replies.is_empty() && self.replies.len() + item.frame.len() > MAX_BATCH_BYTES {
                out.push(self.replies.take());
            }
            self.replies.push(&item.frame);
        }
        for frame in bulk {
            if !self.replies.is_empty() && self.replies.len() + frame.len() > MAX_BATCH_BYTES {
                out.push(self.replies.take());
            }
            self.replies.push(&frame);
        }
        if !self.replies.is_empty() {
            out.push(self.replies.take());
        }
        close
    }

    /// The last message before a server-initiated close: pending replies, then the
    /// `Disconnect` push with the same code.
    pub fn farewell(&mut self, code: CloseCode) -> Bytes {
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
        self.replies.take()
    }

    /// Leaves every channel and the hub; the session is over.
    pub async fn end(&mut self) {
        let subscriptions: Vec<_> = self.subscriptions.drain().collect();
        for sub in subscriptions {
            self.leave(sub).await;
        }
        self.ctx.hub.unregister(self.id);
    }
}

/// Whether a command reads a history page (and so takes a permit).
fn reads_history(frame: &ClientFrame) -> bool {
    use broker_proto::v1::client_frame::Command;
    match &frame.command {
        Some(Command::History(_)) => true,
        Some(Command::Subscribe(s)) => s.recover,
        _ => false,
    }
}

/// The wire form of a command error (and the close it asks for), counted in metrics.
pub(super) fn wire_error(e: CommandError) -> (WireError, Option<CloseCode>) {
    metrics::command_error(e.code.code());
    let error = WireError {
        code: e.code.code(),
        temporary: e.temporary(),
        message: e.message,
    };
    (error, e.close)
}

//! A connection's bounded outbound queue, fed by the hub from any thread and drained by the
//! connection's task, which writes everything queued in one go. When the queue would
//! exceed its byte budget the connection is marked a slow consumer (4008): dropping
//! silently would be a lost message, so the client is made to reconnect and recover.
//!
//! Two lanes: pushes and replies, drained whole every time; and a bulk lane for blob
//! chunks, of which each drain takes a bounded amount, so small frames always go first and
//! chunks interleave between them. The bulk lane counts against the same budget; a
//! download waits for room in it ([`Outbox::wait_bulk_room`]) instead of filling it.
//!
//! The express lane: while a session is parked with nothing to write, it *arms* its
//! outbox with its live subscriptions' positions ([`Lane`]), and the hub, instead of
//! queueing a publication and waking the session's task, applies the same delivery rule
//! (`Subscriptions::admit`, same-epoch case) and writes the frame to the socket itself:
//! one `sendmsg` from the publishing thread, no wake-up, no allocation. Anything else
//! (another kind of frame, an unknown stream, a full socket) takes the queue, which the
//! session drains after disarming; the positions the lane advanced go back to the
//! session when it disarms. Plain TCP only: TLS needs the session's state.

use super::Stream;
use broker_proto::CloseCode;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use std::{
    collections::VecDeque,
    os::fd::RawFd,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
};
use tokio::sync::Notify;

/// What a queued frame is, for the session's delivery rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// A publication; `OutItem::offset` is its offset (0 in channels without history).
    Publication,
    /// The channel's stream restarted under `OutItem::stream`'s epoch.
    Reset,
    /// A push without an offset (Join, Leave).
    Push,
    /// A reply made off the connection's task (an RPC answer, a download error).
    Reply,
}

/// One queued push: a frame already encoded for this connection's encoding, shared with
/// every other recipient.
#[derive(Debug, Clone)]
pub struct OutItem {
    /// The channel and the epoch this frame belongs to.
    pub stream: Arc<Stream>,
    /// The subscription it was queued for: a frame queued before an unsubscribe must not
    /// reach the next subscription to the same channel.
    pub generation: u32,
    pub kind: ItemKind,
    pub offset: u64,
    pub frame: Bytes,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Written to the socket by the caller's thread (the express lane): a message of
    /// this many payload bytes (0 when the delivery rule skipped it).
    Written(usize),
    /// The queue was full: the item is dropped and the connection is being closed.
    Overflow,
    /// The connection is already closing; the item is dropped.
    Closed,
}

/// A subscription the hub may deliver to directly while the session is parked.
#[derive(Debug, Clone)]
pub struct Lane {
    /// The stream of the last publication the session admitted (compared by pointer).
    pub stream: Arc<Stream>,
    pub generation: u32,
    pub last_offset: u64,
}

struct State {
    items: VecDeque<OutItem>,
    /// Made at the first blob chunk, gone when drained: most connections never download.
    bulk: Option<Box<Bulk>>,
    bytes: usize,
    close: Option<CloseCode>,
    /// The session is parked and its socket takes writes from the hub.
    armed: bool,
    /// The connection's socket (plain TCP), or -1.
    fd: RawFd,
    text: bool,
    lanes: Vec<Lane>,
    /// The rest of a frame the socket took only part of: the session writes it before
    /// anything else. Boxed: it is rare, and every outbox would pay for its room.
    rest: Option<Box<Bytes>>,
}

/// The bulk lane: blob chunks and their bytes (also counted in `State::bytes`).
#[derive(Default)]
struct Bulk {
    frames: VecDeque<Bytes>,
    bytes: usize,
}

impl Default for State {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            bulk: None,
            bytes: 0,
            close: None,
            armed: false,
            fd: -1,
            text: false,
            lanes: Vec::new(),
            rest: None,
        }
    }
}

/// The outcome of a direct write.
enum Express {
    /// Written whole (payload bytes), or skipped as the delivery rule would (0).
    Done(usize),
    /// Partly written (payload bytes); the rest waits in `rest` for the session.
    Partial(usize),
    /// Not for the express lane: queue it.
    Queue,
}

impl State {
    fn bulk_is_empty(&self) -> bool {
        self.bulk.is_none()
    }

    fn bulk_bytes(&self) -> usize {
        self.bulk.as_ref().map_or(0, |b| b.bytes)
    }

    fn express(&mut self, item: &OutItem) -> Express {
        let Some(lane) = self
            .lanes
            .iter_mut()
            .find(|l| Arc::ptr_eq(&l.stream, &item.stream) && l.generation == item.generation)
        else {
            return Express::Queue;
        };
        // `Subscriptions::admit`: offsets only grow within an epoch; 0 = no history.
        if item.offset != 0 && item.offset <= lane.last_offset {
            return Express::Done(0);
        }
        let frame = &item.frame;
        let mut head = [0u8; 10];
        let opcode = if self.text {
            crate::ws::decode::OP_TEXT
        } else {
            crate::ws::decode::OP_BINARY
        };
        let head_len = crate::ws::decode::header(opcode, true, frame.len(), &mut head);
        let iov = [
            libc::iovec {
                iov_base: head.as_mut_ptr().cast(),
                iov_len: head_len,
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: an all-zero msghdr is valid; the iovecs outlive the call and sendmsg
        // only reads them.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `fd` is the session's open socket: it is set only while the session
        // owns the socket and cleared (under this lock) before the socket is closed.
        let n = unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n <= 0 {
            // Full (or failed: the session's own write will see why).
            return Express::Queue;
        }
        let n = n as usize;
        if item.offset != 0 {
            lane.last_offset = item.offset;
        }
        let total = head_len + frame.len();
        if n == total {
            return Express::Done(frame.len());
        }
        let mut rest = Vec::with_capacity(total - n);
        if n < head_len {
            rest.extend_from_slice(&head[n..head_len]);
            rest.extend_from_slice(frame);
        } else {
            rest.extend_from_slice(&frame[n - head_len..]);
        }
        self.rest = Some(Box::new(rest.into()));
        self.armed = false;
        Express::Partial(frame.len())
    }
}

pub struct Outbox {
    state: Mutex<State>,
    /// Set by a push or a close request, taken by the session's [`poll_wait`]: a
    /// permit, as with `Notify::notify_one`, but polled in place, so a parked session
    /// holds no waiter future (every idle connection would pay for one).
    ///
    /// [`poll_wait`]: Self::poll_wait
    woken: AtomicBool,
    waker: AtomicWaker,
    /// When the session's next ping or idle check is due, in milliseconds after
    /// [`origin`] (`u64::MAX`: nothing due): the node-wide sweep wakes it then
    /// ([`wake_if_due`](Self::wake_if_due)), so a parked session holds no timer of its own.
    due_ms: AtomicU64,
    /// Woken when the bulk lane shrinks or a close is requested, for downloads waiting for
    /// room; made by the first of them (most connections never download).
    room: OnceLock<Box<Notify>>,
    limit_bytes: usize,
}

impl Outbox {
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            state: Mutex::default(),
            woken: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            due_ms: AtomicU64::new(u64::MAX),
            room: OnceLock::new(),
            limit_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, item: OutItem) -> Pushed {
        let mut s = self.lock();
        if s.close.is_some() {
            return Pushed::Closed;
        }
        if s.armed && item.kind == ItemKind::Publication && s.items.is_empty() && s.bulk_is_empty()
        {
            match s.express(&item) {
                Express::Done(bytes) => return Pushed::Written(bytes),
                Express::Partial(bytes) => {
                    drop(s);
                    self.wake();
                    return Pushed::Written(bytes);
                }
                Express::Queue => s.armed = false,
            }
        }
        let len = item.frame.len();
        if s.bytes + len > self.limit_bytes {
            drop(s);
            self.close(CloseCode::SlowConsumer);
            return Pushed::Overflow;
        }
        let wake = s.items.is_empty();
        s.bytes += len;
        s.items.push_back(item);
        drop(s);
        // Only the push that makes the queue non-empty wakes the session: the session
        // drains everything, so later pushes ride along with that one write.
        if wake {
            self.wake();
        }
        Pushed::Queued
    }

    /// Queues a reply made elsewhere (RPC, download errors). A reply may be larger than
    /// the whole budget (an RPC answer), so it is admitted while the queue is within the
    /// budget, whatever its own size: a client that stops reading holds at most the
    /// budget plus one reply before it is closed as a slow consumer.
    pub fn push_reply(&self, frame: Bytes) -> Pushed {
        let mut s = self.lock();
        if s.close.is_some() {
            return Pushed::Closed;
        }
        if s.bytes > self.limit_bytes {
            drop(s);
            self.close(CloseCode::SlowConsumer);
            return Pushed::Overflow;
        }
        s.bytes += frame.len();
        let wake = s.items.is_empty() && s.bulk_is_empty();
        s.items.push_back(OutItem {
            stream: Stream::none(),
            generation: 0,
            kind: ItemKind::Reply,
            offset: 0,
            frame,
        });
        drop(s);
        if wake {
            self.wake();
        }
        Pushed::Queued
    }

    /// Queues a blob chunk on the bulk lane.
    pub fn push_bulk(&self, frame: Bytes) -> Pushed {
        let mut s = self.lock();
        if s.close.is_some() {
            return Pushed::Closed;
        }
        let len = frame.len();
        if s.bytes + len > self.limit_bytes {
            drop(s);
            self.close(CloseCode::SlowConsumer);
            return Pushed::Overflow;
        }
        let wake = s.items.is_empty() && s.bulk_is_empty();
        s.bytes += len;
        let bulk = s.bulk.get_or_insert_with(Box::default);
        bulk.bytes += len;
        bulk.frames.push_back(frame);
        drop(s);
        if wake {
            self.wake();
        }
        Pushed::Queued
    }

    /// Resolves when the bulk lane holds fewer than `below` bytes, or the connection is
    /// closing (check [`Outbox::closing`]).
    pub async fn wait_bulk_room(&self, below: usize) {
        loop {
            let drained = self.room().notified();
            {
                let s = self.lock();
                if s.bulk_bytes() < below || s.close.is_some() {
                    return;
                }
            }
            drained.await;
        }
    }

    /// Asks the session to close with `code`; the first request wins.
    pub fn close(&self, code: CloseCode) {
        let mut s = self.lock();
        if s.close.is_none() {
            s.close = Some(code);
            drop(s);
            self.wake();
            self.room_changed();
        }
    }

    fn room(&self) -> &Notify {
        self.room.get_or_init(Box::default)
    }

    /// Wakes downloads waiting for room, if any ever waited: one that makes the `Notify`
    /// after this checks the state after making its `notified()`, so it misses nothing.
    fn room_changed(&self) {
        if let Some(room) = self.room.get() {
            room.notify_waiters();
        }
    }

    /// Resolves once a close is requested (at once if it was already). For the session's
    /// own task only: it shares the waker [`poll_wait`](Self::poll_wait) registers, and
    /// leaves that wait's permit in place.
    pub async fn closed(&self) {
        std::future::poll_fn(|cx| {
            if self.closing().is_some() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            match self.closing() {
                Some(_) => Poll::Ready(()),
                None => Poll::Pending,
            }
        })
        .await
    }

    pub fn closing(&self) -> Option<CloseCode> {
        self.lock().close
    }

    /// Moves every queued item into `into` (which should be empty) and reports a
    /// pending close. Swapping keeps the lock held for a moment only.
    pub fn drain(&self, into: &mut VecDeque<OutItem>) -> Option<CloseCode> {
        let mut s = self.lock();
        // Taken, not swapped: an idle connection's outbox keeps no allocation.
        *into = std::mem::take(&mut s.items);
        s.bytes = s.bulk_bytes();
        s.close
    }

    /// Moves up to about `max_bytes` of bulk frames into `into`; if some remain, the
    /// session is woken again so they follow on its next turn.
    pub fn drain_bulk(&self, into: &mut Vec<Bytes>, max_bytes: usize) {
        let mut s = self.lock();
        let Some(bulk) = s.bulk.as_mut() else {
            return;
        };
        let mut taken = 0;
        while taken < max_bytes {
            let Some(frame) = bulk.frames.pop_front() else {
                break;
            };
            taken += frame.len();
            into.push(frame);
        }
        bulk.bytes -= taken;
        let more = !bulk.frames.is_empty();
        if !more {
            s.bulk = None;
        }
        s.bytes -= taken;
        drop(s);
        if taken > 0 {
            self.room_changed();
        }
        if more {
            self.wake();
        }
    }

    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Asks the sweep to wake the session at `at` (at most one sweep period late).
    pub fn set_due(&self, at: std::time::Instant) {
        self.due_ms
            .store(millis_since_origin(at, true), Ordering::Relaxed);
    }

    /// Wakes the session if its deadline has passed by `now`; returns whether it did.
    /// Once woken it is not woken again until it sets a new deadline.
    pub fn wake_if_due(&self, now: std::time::Instant) -> bool {
        let now = millis_since_origin(now, false);
        if self.due_ms.load(Ordering::Relaxed) > now {
            return false;
        }
        self.due_ms.store(u64::MAX, Ordering::Relaxed);
        self.wake();
        true
    }

    /// Ready when something was pushed or a close was requested since the last time it
    /// was ready; otherwise the task is woken at the next push.
    pub fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A push between the check and the registration woke the old waker, if any.
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Resolves when something was pushed or a close was requested.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| self.poll_wait(cx)).await
    }

    /// Gives the hub the connection's socket for direct writes (plain TCP only). The
    /// caller must call [`forget_socket`](Self::forget_socket) before closing it.
    pub fn set_socket(&self, fd: RawFd, text: bool) {
        let mut s = self.lock();
        s.fd = fd;
        s.text = text;
    }

    /// No more direct writes: the socket is about to be closed.
    pub fn forget_socket(&self) {
        let mut s = self.lock();
        s.fd = -1;
        s.armed = false;
        s.lanes = Vec::new();
    }

    /// The session is parked with nothing queued in its socket: publications on `lanes`
    /// may be written directly until it disarms. Returns false (and arms nothing) when
    /// there is queued work, a close, or no socket.
    pub fn arm(&self, lanes: impl Iterator<Item = Lane>, most: usize) -> bool {
        let mut s = self.lock();
        if s.fd < 0 || s.close.is_some() || !s.items.is_empty() || !s.bulk_is_empty() {
            return false;
        }
        s.lanes.clear();
        // Sized to the subscriptions (`most` lanes at most), not to a growth step: most
        // idle connections hold one.
        s.lanes.reserve_exact(most);
        s.lanes.extend(lanes);
        s.armed = !s.lanes.is_empty();
        s.armed
    }

    /// The session woke: no more direct writes. `advanced` gets each lane (its last
    /// offset is now the subscription's); the rest of a partly written frame comes back.
    pub fn disarm(&self, mut advanced: impl FnMut(&Lane)) -> Option<Bytes> {
        let mut s = self.lock();
        s.armed = false;
        for lane in &s.lanes {
            advanced(lane);
        }
        s.rest.take().map(|rest| *rest)
    }
}

/// The time deadlines are counted from: the first use in this process.
fn origin() -> std::time::Instant {
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    *ORIGIN.get_or_init(|| tokio::time::Instant::now().into_std())
}

/// Milliseconds from [`origin`] to `at`, rounded up for a deadline (never reported
/// early) and down for the present.
fn millis_since_origin(at: std::time::Instant, round_up: bool) -> u64 {
    let nanos = at.saturating_duration_since(origin()).as_nanos();
    let ms = if round_up {
        nanos.div_ceil(1_000_000)
    } else {
        nanos / 1_000_000
    };
    u64::try_from(ms).unwrap_or(u64::MAX - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize) -> OutItem {
        OutItem {
            stream: Arc::new(Stream::new("c".into(), String::new())),
            generation: 1,
            kind: ItemKind::Publication,
            offset: 1,
            frame: Bytes::from(vec![0; n]),
        }
    }

    #[test]
    fn a_reply_larger_than_the_budget_goes_out_but_a_second_unread_one_closes() {
        let o = Outbox::new(100);
        assert_eq!(o.push_reply(Bytes::from(vec![0; 1000])), Pushed::Queued);
        assert_eq!(o.push_reply(Bytes::from(vec![0; 10])), Pushed::Overflow);
        assert_eq!(o.closing(), Some(CloseCode::SlowConsumer));
        let o = Outbox::new(100);
        assert_eq!(o.push_reply(Bytes::from(vec![0; 1000])), Pushed::Queued);
        let mut out = VecDeque::new();
        assert_eq!(o.drain(&mut out), None);
        assert_eq!(
            o.push_reply(Bytes::from(vec![0; 1000])),
            Pushed::Queued,
            "read meanwhile"
        );
    }

    #[test]
    fn overflow_marks_slow_consumer_and_drops_later_pushes() {
        let o = Outbox::new(100);
        assert_eq!(o.push(item(60)), Pushed::Queued);
        assert_eq!(o.push(item(60)), Pushed::Overflow);
        assert_eq!(o.push(item(1)), Pushed::Closed);
        let mut out = VecDeque::new();
        assert_eq!(o.drain(&mut out), Some(CloseCode::SlowConsumer));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn bulk_frames_go_out_a_little_at_a_time_after_everything_else() {
        let o = Outbox::new(1000);
        assert_eq!(o.push_bulk(Bytes::from(vec![1; 100])), Pushed::Queued);
        assert_eq!(o.push_bulk(Bytes::from(vec![2; 100])), Pushed::Queued);
        assert_eq!(o.push(item(10)), Pushed::Queued);
        let (mut items, mut bulk) = (VecDeque::new(), Vec::new());
        o.drain(&mut items);
        o.drain_bulk(&mut bulk, 100);
        assert_eq!((items.len(), bulk.len()), (1, 1), "one chunk per turn");
        assert_eq!(o.push(item(10)), Pushed::Queued);
        items.clear();
        bulk.clear();
        o.drain(&mut items);
        o.drain_bulk(&mut bulk, 100);
        assert_eq!(
            (items.len(), bulk[0][0]),
            (1, 2),
            "the small one still first"
        );
        assert_eq!(o.push_bulk(Bytes::from(vec![3; 1001])), Pushed::Overflow);
    }

    /// The sweep wakes a session once its deadline has passed, once, and not before.
    #[test]
    fn a_due_session_is_woken_once_until_it_sets_a_new_deadline() {
        let o = Outbox::new(100);
        let cx = &mut Context::from_waker(std::task::Waker::noop());
        let now = std::time::Instant::now();
        assert!(!o.wake_if_due(now), "nothing due before a deadline is set");
        o.set_due(now + std::time::Duration::from_millis(50));
        assert!(!o.wake_if_due(now + std::time::Duration::from_millis(49)));
        assert!(o.poll_wait(cx).is_pending());
        assert!(o.wake_if_due(now + std::time::Duration::from_millis(51)));
        assert!(o.poll_wait(cx).is_ready(), "the wake is a permit");
        assert!(
            !o.wake_if_due(now + std::time::Duration::from_secs(1)),
            "woken once per deadline"
        );
        o.set_due(now);
        assert!(o.wake_if_due(now + std::time::Duration::from_millis(1)));
    }

    #[tokio::test]
    async fn a_download_waits_for_room_in_the_bulk_lane() {
        let o = std::sync::Arc::new(Outbox::new(10_000));
        o.push_bulk(Bytes::from(vec![0; 300]));
        let waiting = tokio::spawn({
            let o = o.clone();
            async move { o.wait_bulk_room(200).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let mut bulk = Vec::new();
        o.drain_bulk(&mut bulk, 1000);
        waiting.await.unwrap();
    }

    #[test]
    fn a_reply_larger_than_the_budget_counts_against_it() {
        let o = Outbox::new(100);
        assert_eq!(o.push_reply(Bytes::from(vec![0; 1000])), Pushed::Queued);
        assert_eq!(
            o.push(item(60)),
            Pushed::Overflow,
            "the reply filled the queue"
        );
        let o = Outbox::new(100);
        assert_eq!(o.push_reply(Bytes::from(vec![0; 1000])), Pushed::Queued);
        let mut out = VecDeque::new();
        assert_eq!(o.drain(&mut out), None);
        assert_eq!(out[0].kind, ItemKind::Reply);
        assert_eq!(o.push(item(60)), Pushed::Queued, "written meanwhile");
    }

    #[test]
    fn draining_frees_the_budget() {
        let o = Outbox::new(100);
        let mut out = VecDeque::new();
        for _ in 0..10 {
            assert_eq!(o.push(item(90)), Pushed::Queued);
            assert_eq!(o.drain(&mut out), None);
            out.clear();
        }
        o.close(CloseCode::Draining);
        o.close(CloseCode::SlowConsumer);
        assert_eq!(o.closing(), Some(CloseCode::Draining));
    }

    /// The express lane: armed, a publication on a lane goes straight to the socket (and
    /// an old one is skipped as the delivery rule would); anything else, or a full
    /// socket, takes the queue; disarm hands the positions back.
    #[test]
    fn an_armed_outbox_writes_publications_on_its_lanes_and_queues_the_rest() {
        use std::{io::Read, os::fd::AsRawFd};
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let o = Outbox::new(1 << 20);
        o.set_socket(ours.as_raw_fd(), false);
        let stream = Arc::new(Stream::new("c".into(), "e".into()));
        let lane = Lane {
            stream: stream.clone(),
            generation: 1,
            last_offset: 4,
        };
        assert!(o.arm([lane].into_iter(), 1));
        let publication = |offset: u64, len: usize| OutItem {
            stream: stream.clone(),
            generation: 1,
            kind: ItemKind::Publication,
            offset,
            frame: Bytes::from(vec![offset as u8; len]),
        };
        assert_eq!(o.push(publication(5, 3)), Pushed::Written(3));
        assert_eq!(
            o.push(publication(5, 3)),
            Pushed::Written(0),
            "already delivered"
        );
        let mut got = [0u8; 5];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got, [0x82, 3, 5, 5, 5]);
        // Another generation (an old subscription) is for the session to judge.
        let mut other = publication(6, 3);
        other.generation = 2;
        assert_eq!(o.push(other), Pushed::Queued);
        let mut advanced = Vec::new();
        assert!(o.disarm(|l| advanced.push(l.last_offset)).is_none());
        assert_eq!(advanced, [5]);
        // A full socket: the rest of the frame begun comes back at disarm, later
        // publications queue.
        let mut items = VecDeque::new();
        o.drain(&mut items);
        let lane = Lane {
            stream: stream.clone(),
            generation: 1,
            last_offset: 5,
        };
        assert!(o.arm([lane].into_iter(), 1));
        let mut sent = 0;
        let rest = loop {
            match o.push(publication(6 + sent, 50_000)) {
                Pushed::Written(_) => sent += 1,
                Pushed::Queued => break o.disarm(|_| {}),
                p => panic!("{p:?}"),
            }
            assert!(sent < 10_000, "the socket never filled");
        };
        let written = sent as usize * 50_004;
        let mut all = vec![0u8; written - rest.as_ref().map_or(0, Bytes::len)];
        theirs.read_exact(&mut all).unwrap();
        o.forget_socket();
        assert!(!o.arm(std::iter::empty(), 0), "no socket, no lane");
    }
}

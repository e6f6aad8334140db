//! A server-side WebSocket after the handshake: frame I/O owned here rather than by
//! tungstenite's `WebSocketStream`, because that keeps a read buffer per connection
//! (allocated up front, zeroed before every read, grown to the largest message a client
//! ever sent) and copies every outgoing message into a write buffer that keeps the size
//! of the largest one. Here:
//!
//! - reads go into one buffer per thread; a connection keeps only the bytes of a frame
//!   still unfinished ([`decode::Decoder`]), so an idle connection holds no read buffer;
//! - writes go straight to the socket (a vectored write of header and payload, no copy)
//!   and only what the socket did not take is queued, as `Bytes` handles.
//!
//! tungstenite still does the handshake's key derivation and parses frame headers; the
//! conformance suite and a differential test against tungstenite's reader
//! (`gateway/tests/ws_conformance.rs`) hold this module to RFC 6455's rules.

pub mod decode;

pub use decode::{Error as FrameError, Incoming};

use bytes::{Buf, Bytes};
use decode::{Decoder, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use std::{
    cell::RefCell,
    collections::VecDeque,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Why a WebSocket ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client broke the protocol; the connection fails with the frame error's code.
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The client's close arrived; our reply is queued.
    ClosedByPeer,
    /// Our close is queued or sent; waiting for the client's.
    ClosedByUs,
    /// Both closes exchanged.
    Done,
}

/// One queued frame: its header inline and its payload as a shared handle.
struct Chunk {
    head: [u8; 10],
    head_len: u8,
    head_sent: u8,
    body: Bytes,
}

impl Chunk {
    fn new(opcode: u8, body: Bytes) -> Self {
        let mut head = [0; 10];
        let head_len = decode::header(opcode, true, body.len(), &mut head) as u8;
        Self {
            head,
            head_len,
            head_sent: 0,
            body,
        }
    }

    /// Bytes already framed elsewhere (the rest of a frame the hub began).
    fn raw(body: Bytes) -> Self {
        Self {
            head: [0; 10],
            head_len: 0,
            head_sent: 0,
            body,
        }
    }

    fn remaining(&self) -> usize {
        usize::from(self.head_len - self.head_sent) + self.body.len()
    }

    /// Marks `n` bytes written; returns what is left of `n` past this chunk.
    fn advance(&mut self, mut n: usize) -> usize {
        let head = usize::from(self.head_len - self.head_sent).min(n);
        self.head_sent += head as u8;
        n -= head;
        let body = self.body.len().min(n);
        self.body.advance(body);
        n - body
    }
}

/// Frames written per vectored write at most.
const MAX_SLICES: usize = 64;

thread_local! {
    /// Every connection served on this thread reads into this buffer.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub struct WebSocket<S> {
    io: S,
    decoder: Decoder,
    /// Decoded from the last read and not yet taken.
    ready: VecDeque<Incoming>,
    /// An error found after the messages in `ready`; reported after them.
    failed: Option<Box<FrameError>>,
    /// The socket is done for reading (end of stream, an error, or a close frame).
    eof: bool,
    /// Frames the socket has not taken yet, oldest first. Empty (unallocated) while the
    /// client keeps up.
    out: VecDeque<Chunk>,
    /// The answer to the latest ping, sent with the next write.
    pong: Option<Box<Bytes>>,
    state: State,
    /// Bytes read per read call at most.
    read_bytes: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// `already_read`: bytes that arrived after the handshake's request head, read by
    /// the HTTP server before it handed the socket over.
    pub fn new(io: S, already_read: &[u8], max_message: usize, read_bytes: usize) -> Self {
        let mut ws = Self {
            io,
            decoder: Decoder::new(max_message),
            ready: VecDeque::new(),
            failed: None,
            eof: false,
            out: VecDeque::new(),
            pong: None,
            state: State::Open,
            read_bytes: read_bytes.clamp(256, u32::MAX as usize) as u32,
        };
        if !already_read.is_empty() {
            ws.decode(&mut already_read.to_vec());
        }
        ws
    }

    /// Bytes queued for the socket and not yet written.
    pub fn unsent_bytes(&self) -> usize {
        self.out.iter().map(Chunk::remaining).sum()
    }

    /// Nothing waits to be written: someone else may write whole frames to the socket
    /// meanwhile (the outbox's express lane).
    pub fn idle_for_writes(&self) -> bool {
        self.out.is_empty() && self.pong.is_none()
    }

    /// Queues bytes that must go out before anything queued: the rest of a frame
    /// someone else began writing to the socket.
    pub fn push_front_raw(&mut self, rest: Bytes) {
        self.out.push_front(Chunk::raw(rest));
    }

    /// The next message or control frame from the client. Pings are answered with the
    /// next write; a close frame is answered at once (queued) and ends the stream.
    pub async fn next(&mut self) -> Option<Result<Incoming, Error>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Incoming, Error>>> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                if self.ready.is_empty() {
                    // An idle connection keeps no queue.
                    self.ready = VecDeque::new();
                }
                if let Incoming::Close(close) = &m {
                    self.closed_by_peer(close);
                }
                return Poll::Ready(Some(Ok(m)));
            }
            if let Some(e) = self.failed.take() {
                self.eof = true;
                return Poll::Ready(Some(Err((*e).into())));
            }
            if self.eof {
                return Poll::Ready(None);
            }
            let read = READ_BUF.with_borrow_mut(|buf| {
                let read_bytes = self.read_bytes as usize;
                if buf.len() < read_bytes {
                    buf.resize(read_bytes, 0);
                }
                let mut rb = ReadBuf::new(&mut buf[..read_bytes]);
                ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                if n > 0 {
                    self.decode(rb.filled_mut());
                }
                Poll::Ready(Ok::<_, io::Error>(n))
            });
            match ready!(read) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) => {
                    self.eof = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn decode(&mut self, bytes: &mut [u8]) {
        let (ready, pong, state) = (&mut self.ready, &mut self.pong, &self.state);
        let mut closed = false;
        let result = self.decoder.feed(bytes, &mut |m| {
            match &m {
                Incoming::Ping(p) if *state == State::Open => *pong = Some(Box::new(p.clone())),
                Incoming::Close(_) => closed = true,
                _ => {}
            }
            ready.push_back(m);
        });
        if closed {
            self.eof = true;
        }
        if let Err(e) = result {
            self.failed = Some(Box::new(e));
        }
    }

    /// The client's close is taken: answer it. Only now, so that replies to what came
    /// before it in the same read go out first, and nothing follows the answer.
    fn closed_by_peer(&mut self, close: &Option<(u16, Bytes)>) {
        match self.state {
            State::Open => {
                // Echo the client's code (RFC 6455 §5.5.1), or 1002 for a code no
                // endpoint may send.
                let reply = match close {
                    None => Bytes::new(),
                    Some((code, reason)) if close_code_allowed(*code) => {
                        close_payload(*code, reason)
                    }
                    Some(_) => close_payload(1002, b"Protocol violation"),
                };
                self.queue_pong();
                self.out.push_back(Chunk::new(OP_CLOSE, reply));
                self.state = State::ClosedByPeer;
            }
            State::ClosedByUs => self.state = State::Done,
            State::ClosedByPeer | State::Done => {}
        }
    }

    /// Writes `messages` (taking them) as one frame each, then everything queued before,
    /// and flushes. Cancel-safe: what the socket has not taken stays queued in order,
    /// whole frames and the rest of a frame begun, for the next write or the close.
    pub async fn send_all(&mut self, text: bool, messages: &mut Vec<Bytes>) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send_all(cx, text, messages)).await
    }

    /// [`send_all`](Self::send_all) as a poll: `messages` are taken at the first call;
    /// `Pending` means the socket is full and the rest is queued for [`flush`](Self::flush).
    pub fn poll_send_all(
        &mut self,
        cx: &mut Context<'_>,
        text: bool,
        messages: &mut Vec<Bytes>,
    ) -> Poll<io::Result<()>> {
        let opcode = if text { OP_TEXT } else { OP_BINARY };
        if self.state == State::Open {
            self.queue_pong();
            for m in messages.drain(..) {
                self.send_now_or_queue(cx, opcode, m)?;
            }
        } else {
            // Nothing after our close frame.
            messages.clear();
        }
        self.poll_flush(cx)
    }

    /// Queues a ping, written by the next flush.
    pub fn send_ping(&mut self) {
        if self.state == State::Open {
            self.out.push_back(Chunk::new(OP_PING, Bytes::new()));
        }
    }

    /// Queues our close frame; nothing is sent after it.
    pub fn send_close(&mut self, code: u16, reason: &str) {
        if self.state == State::Open {
            self.out
                .push_back(Chunk::new(OP_CLOSE, close_payload(code, reason.as_bytes())));
            self.state = State::ClosedByUs;
        }
    }

    /// Writes everything queued, then flushes the stream.
    pub async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            self.queue_pong();
            self.poll_flush(cx)
        })
        .await
    }

    fn queue_pong(&mut self) {
        if let Some(p) = self.pong.take()
            && self.state == State::Open
        {
            self.out.push_back(Chunk::new(OP_PONG, *p));
        }
    }

    /// With nothing queued, writes the frame straight to the socket: the common case
    /// costs one vectored write and no allocation. Whatever is not taken is queued.
    fn send_now_or_queue(
        &mut self,
        cx: &mut Context<'_>,
        opcode: u8,
        body: Bytes,
    ) -> io::Result<()> {
        let mut chunk = Chunk::new(opcode, body);
        if self.out.is_empty() {
            let slices = [
                IoSlice::new(&chunk.head[..usize::from(chunk.head_len)]),
                IoSlice::new(&chunk.body),
            ];
            match Pin::new(&mut self.io).poll_write_vectored(cx, &slices) {
                Poll::Ready(Ok(n)) => {
                    chunk.advance(n);
                    if chunk.remaining() == 0 {
                        return Ok(());
                    }
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        self.out.push_back(chunk);
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for c in self.out.iter() {
                if count + 2 > MAX_SLICES {
                    break;
                }
                let head = &c.head[usize::from(c.head_sent)..usize::from(c.head_len)];
                if !head.is_empty() {
                    slices[count] = IoSlice::new(head);
                    count += 1;
                }
                if !c.body.is_empty() {
                    slices[count] = IoSlice::new(&c.body);
                    count += 1;
                }
            }
            let mut n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while n > 0 || self.out.front().is_some_and(|c| c.remaining() == 0) {
                let Some(front) = self.out.front_mut() else {
                    break;
                };
                n = front.advance(n);
                if front.remaining() == 0 {
                    self.out.pop_front();
                }
            }
        }
        if self.out.capacity() > 0 {
            // Queued only while the client fell behind; an idle connection holds none.
            self.out = VecDeque::new();
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

/// RFC 6455 §7.4: codes an endpoint may send in a close frame (tungstenite's list).
fn close_code_allowed(code: u16) -> bool {
    tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::from(code).is_allowed()
}

fn close_payload(code: u16, reason: &[u8]) -> Bytes {
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(reason);
    p.into()
}

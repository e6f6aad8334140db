//! Uploads over the WebSocket, assembled chunk by chunk: a plain state machine per
//! connection (no I/O, time passed in), hashed incrementally, bounded three ways:
//! - per upload, by the declared size (and the largest blob allowed);
//! - per connection, by the number of uploads in flight;
//! - per node, by a byte [`Budget`] that the buffers of unfinished uploads draw from, by
//!   their capacity (what is really allocated, not only what arrived): a buffer grows to
//!   twice what it must hold, capped at the declared size, and takes each growth from the
//!   budget first.
//!   Memory is given back the moment an upload fails, goes idle too long, or its
//!   connection ends (dropping the table drops every upload and its reservation), and a
//!   completed one once its bytes are stored (the reservation travels with them).

use super::BlobId;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// Bytes of unfinished uploads this node may hold, shared by every connection.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + bytes <= self.limit).then_some(u + bytes)
            });
        if let Ok(before) = taken {
            crate::metrics::upload_bytes(before + bytes);
        }
        taken.is_ok()
    }

    /// Holds `bytes` until the reservation is dropped, if the budget has them.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        self.take(bytes).then(|| Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    fn give(&self, bytes: usize) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        crate::metrics::upload_bytes(before - bytes);
    }
}

/// The smallest buffer an upload allocates (then it doubles).
const FIRST_BUFFER: usize = 64 * 1024;

/// Bytes held from the budget, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest blob.
    pub max_bytes: u64,
    /// Uploads in flight per connection.
    pub max_uploads: usize,
    /// An upload that gets no chunk for this long is dropped.
    pub idle: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// 113
    #[error("bad upload: {0}")]
    Bad(&'static str),
    /// 110
    #[error("blob of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// 106
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
}

/// The first chunk of an upload.
#[derive(Debug, Clone)]
pub struct Start {
    pub channel: String,
    pub content_type: String,
    pub size: u64,
    /// What the client says the blob's id is (checked at the end, or used to skip).
    pub claimed: Option<BlobId>,
}

/// A complete upload: bytes whose hash is `id`, as declared. Its memory stays counted in
/// the budget until this is dropped.
#[derive(Debug)]
pub struct Assembled {
    pub id: BlobId,
    pub bytes: Bytes,
    pub channel: String,
    pub content_type: String,
    pub held: Reservation,
}

#[derive(Debug)]
pub enum Fed {
    /// Accepted; more chunks to come.
    More,
    Done(Assembled),
}

#[derive(Debug)]
struct Upload {
    start: Start,
    buf: Vec<u8>,
    hasher: Sha256,
    last_chunk: Instant,
    /// The budget drawn for `buf`'s capacity.
    held: Reservation,
}

#[derive(Debug)]
pub struct Uploads {
    limits: Limits,
    budget: Arc<Budget>,
    uploads: HashMap<u32, Upload>,
}

impl Uploads {
    pub fn new(limits: Limits, budget: Arc<Budget>) -> Self {
        Self {
            limits,
            budget,
            uploads: HashMap::new(),
        }
    }

    pub fn in_flight(&self, upload: u32) -> bool {
        self.uploads.contains_key(&upload)
    }

    pub fn len(&self) -> usize {
        self.uploads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.uploads.is_empty()
    }

    /// Starts upload `upload` (its first chunk is fed next).
    pub fn begin(&mut self, upload: u32, start: Start, now: Instant) -> Result<(), UploadError> {
        if start.size == 0 || start.content_type.is_empty() {
            return Err(UploadError::Bad(
                "the first chunk must carry size and content_type",
            ));
        }
        if start.size > self.limits.max_bytes {
            return Err(UploadError::TooLarge(start.size));
        }
        if self.uploads.len() >= self.limits.max_uploads {
            return Err(UploadError::Limit("uploads in flight on this connection"));
        }
        let held = Reservation {
            budget: self.budget.clone(),
            bytes: 0,
        };
        self.uploads.insert(
            upload,
            Upload {
                start,
                buf: Vec::new(),
                hasher: Sha256::new(),
                last_chunk: now,
                held,
            },
        );
        Ok(())
    }

    /// Drops an upload (the client's blob was already stored, or it failed elsewhere).
    pub fn abandon(&mut self, upload: u32) {
        self.uploads.remove(&upload);
    }

    /// The first bytes of an upload, for sniffing its type early.
    pub fn head(&self, upload: u32) -> Option<&[u8]> {
        self.uploads.get(&upload).map(|u| &u.buf[..])
    }

    /// Appends a chunk; an error ends the upload.
    pub fn feed(
        &mut self,
        upload: u32,
        data: &[u8],
        last: bool,
        now: Instant,
    ) -> Result<Fed, UploadError> {
        let result = self.feed_inner(upload, data, last, now);
        if !matches!(result, Ok(Fed::More)) {
            self.uploads.remove(&upload);
        }
        result
    }

    fn feed_inner(
        &mut self,
        upload: u32,
        data: &[u8],
        last: bool,
        now: Instant,
    ) -> Result<Fed, UploadError> {
        let u = self
            .uploads
            .get_mut(&upload)
            .ok_or(UploadError::Bad("unknown upload"))?;
        let received = u.buf.len() as u64 + data.len() as u64;
        if received > u.start.size {
            return Err(UploadError::Bad("more bytes than the declared size"));
        }
        let needed = u.buf.len() + data.len();
        if needed > u.buf.capacity() {
            // Declared sizes are at most `max_bytes`, which fits in memory by configuration.
            let size = usize::try_from(u.start.size).unwrap_or(usize::MAX);
            let target = (u.buf.capacity().max(needed) * 2)
                .max(FIRST_BUFFER)
                .min(size);
            let grow = target - u.buf.capacity();
            if !self.budget.take(grow) {
                return Err(UploadError::Limit("the node's upload memory is full"));
            }
            u.held.bytes += grow;
            u.buf.reserve_exact(target - u.buf.len());
        }
        u.buf.extend_from_slice(data);
        u.hasher.update(data);
        u.last_chunk = now;
        if !last {
            return Ok(Fed::More);
        }
        if received != u.start.size {
            return Err(UploadError::Bad("fewer bytes than the declared size"));
        }
        let digest = std::mem::take(&mut u.hasher).finalize();
        let id = BlobId::from_digest(&digest[..]);
        if u.start.claimed.as_ref().is_some_and(|c| *c != id) {
            return Err(UploadError::Bad("the bytes do not hash to the claimed id"));
        }
        let held = Reservation {
            budget: self.budget.clone(),
            bytes: std::mem::take(&mut u.held.bytes),
        };
        Ok(Fed::Done(Assembled {
            id,
            bytes: Bytes::from(std::mem::take(&mut u.buf)),
            channel: std::mem::take(&mut u.start.channel),
            content_type: std::mem::take(&mut u.start.content_type),
            held,
        }))
    }

    /// When the next upload goes idle for too long, if any is in flight.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.uploads
            .values()
            .map(|u| u.last_chunk + self.limits.idle)
            .min()
    }

    /// Drops uploads idle for longer than the limit; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let idle = self.limits.idle;
        let before = self.uploads.len();
        self.uploads
            .retain(|_, u| now.saturating_duration_since(u.last_chunk) < idle);
        before - self.uploads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 100,
        max_uploads: 2,
        idle: Duration::from_secs(30),
    };

    fn start(size: u64) -> Start {
        Start {
            channel: "c".into(),
            content_type: "image/png".into(),
            size,
            claimed: None,
        }
    }

    #[test]
    fn chunks_assemble_into_a_blob_named_by_its_hash() {
        let budget = Budget::new(1000);
        let mut u = Uploads::new(LIMITS, budget.clone());
        let now = Instant::now();
        u.begin(7, start(6), now).unwrap();
        assert!(matches!(u.feed(7, b"abc", false, now), Ok(Fed::More)));
        assert_eq!(budget.used(), 6, "the buffer, sized for the declared bytes");
        let Ok(Fed::Done(a)) = u.feed(7, b"def", true, now) else {
            panic!()
        };
        assert_eq!(a.id, BlobId::of(b"abcdef"));
        assert_eq!(&a.bytes[..], b"abcdef");
        assert!(!u.in_flight(7));
        assert_eq!(budget.used(), 6, "held until the bytes are stored");
        drop(a);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn bad_uploads_end_and_free_their_memory() {
        let budget = Budget::new(1000);
        let mut u = Uploads::new(LIMITS, budget.clone());
        let now = Instant::now();
        assert_eq!(
            u.begin(
                1,
                Start {
                    size: 0,
                    ..start(1)
                },
                now
            ),
            Err(UploadError::Bad(
                "the first chunk must carry size and content_type"
            ))
        );
        assert_eq!(u.begin(1, start(101), now), Err(UploadError::TooLarge(101)));
        u.begin(1, start(4), now).unwrap();
        assert!(matches!(
            u.feed(1, b"abcde", false, now),
            Err(UploadError::Bad(_))
        ));
        assert!(!u.in_flight(1));
        u.begin(1, start(4), now).unwrap();
        u.feed(1, b"ab", false, now).unwrap();
        assert!(matches!(
            u.feed(1, b"c", true, now),
            Err(UploadError::Bad(_))
        ));
        assert_eq!(budget.used(), 0);
        let claimed = Start {
            claimed: Some(BlobId::of(b"other")),
            ..start(2)
        };
        u.begin(2, claimed, now).unwrap();
        assert_eq!(
            u.feed(2, b"ab", true, now).unwrap_err(),
            UploadError::Bad("the bytes do not hash to the claimed id")
        );
        assert!(matches!(
            u.feed(9, b"x", true, now),
            Err(UploadError::Bad("unknown upload"))
        ));
    }

    #[test]
    fn uploads_are_bounded_per_connection_and_per_node() {
        let budget = Budget::new(10);
        let mut a = Uploads::new(LIMITS, budget.clone());
        let mut b = Uploads::new(LIMITS, budget.clone());
        let now = Instant::now();
        a.begin(1, start(8), now).unwrap();
        a.begin(2, start(8), now).unwrap();
        assert_eq!(
            a.begin(3, start(8), now),
            Err(UploadError::Limit("uploads in flight on this connection"))
        );
        a.feed(1, b"12345678", false, now).unwrap();
        b.begin(1, start(8), now).unwrap();
        assert_eq!(
            b.feed(1, b"123", false, now).unwrap_err(),
            UploadError::Limit("the node's upload memory is full")
        );
        drop(a);
        assert_eq!(budget.used(), 0, "a closed connection frees its uploads");
    }

    #[test]
    fn the_budget_counts_what_is_allocated_however_small_the_chunks() {
        let budget = Budget::new(1 << 30);
        let limits = Limits {
            max_bytes: 1 << 20,
            ..LIMITS
        };
        let mut u = Uploads::new(limits, budget.clone());
        let now = Instant::now();
        u.begin(1, start(1 << 20), now).unwrap();
        for _ in 0..1000 {
            u.feed(1, b"x", false, now).unwrap();
        }
        assert_eq!(
            budget.used(),
            FIRST_BUFFER,
            "one first buffer, not a reservation per chunk"
        );
        u.feed(1, &vec![0; FIRST_BUFFER], false, now).unwrap();
        assert_eq!(
            budget.used(),
            2 * (FIRST_BUFFER + 1000),
            "twice what arrived"
        );
        u.feed(1, &vec![0; (1 << 20) - FIRST_BUFFER - 1000 - 1], false, now)
            .unwrap();
        assert_eq!(budget.used(), 1 << 20, "capped at the declared size");
        let Ok(Fed::Done(a)) = u.feed(1, b"x", true, now) else {
            panic!()
        };
        assert_eq!(a.bytes.len(), 1 << 20);
        drop(a);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn an_idle_upload_expires() {
        let budget = Budget::new(100);
        let mut u = Uploads::new(LIMITS, budget.clone());
        let now = Instant::now();
        u.begin(1, start(8), now).unwrap();
        u.feed(1, b"1234", false, now).unwrap();
        assert_eq!(u.next_expiry(), Some(now + Duration::from_secs(30)));
        assert_eq!(u.expire(now + Duration::from_secs(29)), 0);
        assert_eq!(u.expire(now + Duration::from_secs(30)), 1);
        assert_eq!(budget.used(), 0);
    }
}

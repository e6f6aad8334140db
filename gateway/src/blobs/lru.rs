//! Whole blobs in memory, bounded by bytes: the least recently used goes first when a new
//! one does not fit, and an entry past its expiry is dropped when next looked at. Used by
//! the embedded broker's store and by the Redis store's per-node read cache. Every
//! operation is O(log n) (a tick-ordered index), so many small blobs cost no scans.

use super::{BlobId, BlobMeta};
use bytes::Bytes;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Instant,
};

pub struct Entry {
    pub meta: BlobMeta,
    pub bytes: Bytes,
    pub expires: Instant,
    /// Channels the blob is granted to (the embedded store's; the cache leaves it empty).
    pub grants: HashSet<Box<str>>,
    tick: u64,
}

impl Entry {
    /// Grants the blob to `channel`, letting an arbitrary other grant go beyond `max`.
    pub fn grant(&mut self, channel: &str, max: usize) {
        if self.grants.contains(channel) {
            return;
        }
        if self.grants.len() >= max
            && let Some(any) = self.grants.iter().next().cloned()
        {
            self.grants.remove(&any);
        }
        self.grants.insert(channel.into());
    }
}

/// Why an entry left: `lru` (room for another) or `ttl`.
pub type OnEvict = fn(&'static str);

pub struct Lru {
    map: HashMap<BlobId, Entry>,
    order: BTreeMap<u64, BlobId>,
    bytes: usize,
    limit: usize,
    tick: u64,
    on_evict: OnEvict,
}

impl Lru {
    pub fn new(limit: usize, on_evict: OnEvict) -> Self {
        Self {
            map: HashMap::new(),
            order: BTreeMap::new(),
            bytes: 0,
            limit,
            tick: 0,
            on_evict,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The live entry for `id`, now the most recently used.
    pub fn get(&mut self, id: &BlobId, now: Instant) -> Option<&mut Entry> {
        let expired = self.map.get(id)?.expires <= now;
        if expired {
            self.remove(id, "ttl");
            return None;
        }
        self.tick += 1;
        let tick = self.tick;
        let entry = self.map.get_mut(id)?;
        self.order.remove(&entry.tick);
        self.order.insert(tick, id.clone());
        entry.tick = tick;
        Some(entry)
    }

    /// Stores a blob (or refreshes the expiry of the one stored), evicting the least
    /// recently used until it fits. A blob larger than the whole limit is refused.
    pub fn insert(
        &mut self,
        id: &BlobId,
        meta: BlobMeta,
        bytes: Bytes,
        expires: Instant,
        now: Instant,
    ) -> Result<(), Bytes> {
        if let Some(e) = self.get(id, now) {
            e.expires = e.expires.max(expires);
            return Ok(());
        }
        if bytes.len() > self.limit {
            return Err(bytes);
        }
        while self.bytes + bytes.len() > self.limit {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&oldest) {
                self.bytes -= e.bytes.len();
                (self.on_evict)(if e.expires <= now { "ttl" } else { "lru" });
            }
        }
        self.tick += 1;
        self.bytes += bytes.len();
        self.order.insert(self.tick, id.clone());
        self.map.insert(
            id.clone(),
            Entry {
                meta,
                bytes,
                expires,
                grants: HashSet::new(),
                tick: self.tick,
            },
        );
        Ok(())
    }

    fn remove(&mut self, id: &BlobId, reason: &'static str) {
        if let Some(e) = self.map.remove(id) {
            self.order.remove(&e.tick);
            self.bytes -= e.bytes.len();
            (self.on_evict)(reason);
        }
    }
}

/// Up to `len` bytes of `bytes` from `start` (no copy).
pub fn slice(bytes: &Bytes, start: u64, len: u64) -> Bytes {
    let start = usize::try_from(start)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let end = start
        .saturating_add(usize::try_from(len).unwrap_or(usize::MAX))
        .min(bytes.len());
    bytes.slice(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    static EVICTED: AtomicUsize = AtomicUsize::new(0);

    fn counted(_: &'static str) {
        EVICTED.fetch_add(1, Ordering::Relaxed);
    }

    #[test]
    fn many_small_blobs_evict_in_order_without_scans() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut lru = Lru::new(100_000, counted);
        let ids: Vec<BlobId> = (0..200_000u32)
            .map(|i| BlobId::of(&i.to_le_bytes()))
            .collect();
        for id in &ids {
            lru.insert(
                id,
                BlobMeta::default(),
                Bytes::from_static(b"x"),
                later,
                now,
            )
            .unwrap();
        }
        assert_eq!(lru.bytes(), 100_000);
        assert!(
            lru.get(&ids[99_999], now).is_none(),
            "the oldest went first"
        );
        assert!(lru.get(&ids[100_000], now).is_some());
        assert!(EVICTED.load(Ordering::Relaxed) >= 100_000);
        assert!(lru.get(&ids[199_999], later).is_none(), "expired");
        assert_eq!(lru.bytes(), 99_999);
    }
}

//! The embedded blob store: blobs in this process's memory, bounded by bytes. The least
//! recently used blob is evicted when a new one does not fit, and a blob is dropped when
//! its TTL passes; both are counted in `gateway_blob_store_evictions_total`.

use crate::{
    blobs::{BlobId, BlobMeta},
    broker::{BrokerError, blobs::BlobStore},
    clock::Clock,
    metrics,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

struct Entry {
    meta: BlobMeta,
    bytes: Bytes,
    expires: Instant,
    used: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<BlobId, Entry>,
    bytes: usize,
    tick: u64,
}

impl Inner {
    fn remove(&mut self, id: &BlobId, reason: &'static str) {
        if let Some(e) = self.map.remove(id) {
            self.bytes -= e.bytes.len();
            metrics::blob_eviction(reason);
        }
    }

    fn expire(&mut self, now: Instant) {
        let gone: Vec<BlobId> = self
            .map
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.remove(&id, "ttl");
        }
    }
}

pub struct MemoryBlobs {
    inner: Mutex<Inner>,
    limit: usize,
    clock: Clock,
}

impl MemoryBlobs {
    pub fn new(limit_bytes: usize, clock: Clock) -> Self {
        Self {
            inner: Mutex::default(),
            limit: limit_bytes,
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[async_trait]
impl BlobStore for MemoryBlobs {
    async fn put(
        &self,
        id: &BlobId,
        meta: &BlobMeta,
        bytes: Bytes,
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        if let Some(e) = inner.map.get_mut(id) {
            e.expires = now + ttl;
            e.used = tick;
            return Ok(());
        }
        if bytes.len() > self.limit {
            return Err(BrokerError::Internal(format!(
                "blob of {} bytes is larger than the blob store ({} bytes)",
                bytes.len(),
                self.limit
            )));
        }
        inner.expire(now);
        while inner.bytes + bytes.len() > self.limit {
            let Some(oldest) = inner
                .map
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            inner.remove(&oldest, "lru");
        }
        inner.bytes += bytes.len();
        inner.map.insert(
            id.clone(),
            Entry {
                meta: meta.clone(),
                bytes,
                expires: now + ttl,
                used: tick,
            },
        );
        metrics::blob_store_bytes(inner.bytes);
        Ok(())
    }

    async fn meta(
        &self,
        id: &BlobId,
        refresh: Option<Duration>,
    ) -> Result<Option<BlobMeta>, BrokerError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        match inner.map.get_mut(id) {
            Some(e) if e.expires > now => {
                e.used = tick;
                if let Some(ttl) = refresh {
                    e.expires = now + ttl;
                }
                Ok(Some(e.meta.clone()))
            }
            Some(_) => {
                inner.remove(id, "ttl");
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn read(&self, id: &BlobId, start: u64, len: u64) -> Result<Option<Bytes>, BrokerError> {
        let now = self.clock.now();
        let inner = self.lock();
        Ok(inner.map.get(id).filter(|e| e.expires > now).map(|e| {
            let start = (start as usize).min(e.bytes.len());
            let end = start.saturating_add(len as usize).min(e.bytes.len());
            e.bytes.slice(start..end)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64) -> BlobMeta {
        BlobMeta {
            size,
            content_type: "image/png".into(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn evicts_the_least_recently_used_and_expires_by_ttl() {
        let store = MemoryBlobs::new(10, Clock::system());
        let ttl = Duration::from_secs(60);
        let (a, b, c) = (BlobId::of(b"a"), BlobId::of(b"b"), BlobId::of(b"c"));
        store
            .put(&a, &meta(4), Bytes::from_static(b"aaaa"), ttl)
            .await
            .unwrap();
        store
            .put(&b, &meta(4), Bytes::from_static(b"bbbb"), ttl)
            .await
            .unwrap();
        assert!(
            store.meta(&a, None).await.unwrap().is_some(),
            "a is now the more recent"
        );
        store
            .put(&c, &meta(4), Bytes::from_static(b"cccc"), ttl)
            .await
            .unwrap();
        assert!(
            store.meta(&b, None).await.unwrap().is_none(),
            "b was evicted"
        );
        assert_eq!(
            store.read(&a, 1, 2).await.unwrap().as_deref(),
            Some(&b"aa"[..])
        );
        assert_eq!(store.bytes(), 8);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(store.meta(&a, None).await.unwrap().is_none(), "expired");
        assert!(store.read(&c, 0, 4).await.unwrap().is_none());
        let big = store
            .put(&b, &meta(11), Bytes::from(vec![0; 11]), ttl)
            .await;
        assert!(big.is_err(), "larger than the whole store");
    }

    #[tokio::test(start_paused = true)]
    async fn storing_again_refreshes_the_ttl() {
        let store = MemoryBlobs::new(100, Clock::system());
        let a = BlobId::of(b"a");
        let ttl = Duration::from_secs(60);
        store
            .put(&a, &meta(1), Bytes::from_static(b"a"), ttl)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        store
            .put(&a, &meta(1), Bytes::from_static(b"a"), ttl)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(store.meta(&a, Some(ttl)).await.unwrap().is_some());
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(
            store.meta(&a, None).await.unwrap().is_some(),
            "refreshed by meta"
        );
    }
}

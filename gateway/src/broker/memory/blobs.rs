//! The embedded blob store: blobs in this process's memory, bounded by bytes. The least
//! recently used blob is evicted when a new one does not fit, and a blob is dropped when
//! its TTL passes; both are counted in `gateway_blob_store_evictions_total`.

use crate::{
    blobs::{
        BlobId, BlobMeta,
        lru::{Lru, slice},
    },
    broker::{
        BrokerError,
        blobs::{Access, BlobStore, MAX_GRANTS},
    },
    clock::Clock,
    metrics,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

pub struct MemoryBlobs {
    lru: Mutex<Lru>,
    clock: Clock,
}

impl MemoryBlobs {
    pub fn new(limit_bytes: usize, clock: Clock) -> Self {
        Self {
            lru: Mutex::new(Lru::new(limit_bytes, metrics::blob_eviction)),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes()
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
        channel: &str,
    ) -> Result<(), BrokerError> {
        let now = self.clock.now();
        let mut lru = self.lock();
        let stored = lru.insert(id, meta.clone(), bytes, now + ttl, now);
        if let Some(e) = lru.get(id, now) {
            e.expires = e.expires.max(now + ttl);
            e.grant(channel, MAX_GRANTS);
        }
        metrics::blob_store_bytes(lru.bytes());
        stored.map_err(|bytes| {
            BrokerError::Internal(format!(
                "blob of {} bytes is larger than the blob store ({} bytes)",
                bytes.len(),
                lru.limit()
            ))
        })
    }

    async fn meta(
        &self,
        id: &BlobId,
        access: Access<'_>,
        refresh: Option<Duration>,
    ) -> Result<Option<BlobMeta>, BrokerError> {
        let now = self.clock.now();
        let mut lru = self.lock();
        let meta = lru.get(id, now).and_then(|e| {
            match access {
                Access::Client(channel) if !e.grants.contains(channel) => return None,
                Access::Backend(channel) => e.grant(channel, MAX_GRANTS),
                Access::Client(_) | Access::Signed => {}
            }
            if let Some(ttl) = refresh {
                e.expires = now + ttl;
            }
            Some(e.meta.clone())
        });
        metrics::blob_store_bytes(lru.bytes());
        Ok(meta)
    }

    async fn read(&self, id: &BlobId, start: u64, len: u64) -> Result<Option<Bytes>, BrokerError> {
        let now = self.clock.now();
        Ok(self
            .lock()
            .get(id, now)
            .map(|e| slice(&e.bytes, start, len)))
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
            .put(&a, &meta(4), Bytes::from_static(b"aaaa"), ttl, "c")
            .await
            .unwrap();
        store
            .put(&b, &meta(4), Bytes::from_static(b"bbbb"), ttl, "c")
            .await
            .unwrap();
        assert!(
            store
                .meta(&a, Access::Client("c"), None)
                .await
                .unwrap()
                .is_some(),
            "a is now the more recent"
        );
        store
            .put(&c, &meta(4), Bytes::from_static(b"cccc"), ttl, "c")
            .await
            .unwrap();
        assert!(
            store
                .meta(&b, Access::Client("c"), None)
                .await
                .unwrap()
                .is_none(),
            "b was evicted"
        );
        assert_eq!(
            store.read(&a, 1, 2).await.unwrap().as_deref(),
            Some(&b"aa"[..])
        );
        assert_eq!(store.bytes(), 8);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(
            store
                .meta(&a, Access::Client("c"), None)
                .await
                .unwrap()
                .is_none(),
            "expired"
        );
        assert!(store.read(&c, 0, 4).await.unwrap().is_none());
        let big = store
            .put(&b, &meta(11), Bytes::from(vec![0; 11]), ttl, "c")
            .await;
        assert!(big.is_err(), "larger than the whole store");
    }

    #[tokio::test(start_paused = true)]
    async fn storing_again_refreshes_the_ttl() {
        let store = MemoryBlobs::new(100, Clock::system());
        let a = BlobId::of(b"a");
        let ttl = Duration::from_secs(60);
        store
            .put(&a, &meta(1), Bytes::from_static(b"a"), ttl, "c")
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        store
            .put(&a, &meta(1), Bytes::from_static(b"a"), ttl, "c")
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(
            store
                .meta(&a, Access::Client("c"), Some(ttl))
                .await
                .unwrap()
                .is_some()
        );
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(
            store
                .meta(&a, Access::Client("c"), None)
                .await
                .unwrap()
                .is_some(),
            "refreshed by meta"
        );
    }

    #[tokio::test]
    async fn a_blob_is_usable_only_in_the_channels_it_was_granted_to() {
        let store = MemoryBlobs::new(100, Clock::system());
        let a = BlobId::of(b"a");
        let ttl = Duration::from_secs(60);
        store
            .put(&a, &meta(1), Bytes::from_static(b"a"), ttl, "chat:#alice")
            .await
            .unwrap();
        let client = |c| Access::Client(c);
        assert!(
            store
                .meta(&a, client("chat:#alice"), None)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .meta(&a, client("chat:room"), None)
                .await
                .unwrap()
                .is_none(),
            "knowing the id is not enough"
        );
        assert!(
            store
                .meta(&a, Access::Signed, None)
                .await
                .unwrap()
                .is_some()
        );
        // The backend publishing it in a channel grants it there; so does an upload.
        store
            .meta(&a, Access::Backend("chat:room"), Some(ttl))
            .await
            .unwrap();
        assert!(
            store
                .meta(&a, client("chat:room"), None)
                .await
                .unwrap()
                .is_some()
        );
        store
            .put(&a, &meta(1), Bytes::from_static(b"a"), ttl, "chat:other")
            .await
            .unwrap();
        assert!(
            store
                .meta(&a, client("chat:other"), None)
                .await
                .unwrap()
                .is_some()
        );
    }
}

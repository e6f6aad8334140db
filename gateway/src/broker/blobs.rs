//! Where blobs live: one small trait, implemented in memory on one node
//! (`memory::blobs`, bounded by bytes with LRU and TTL eviction) and in Redis across nodes
//! (`redis::blobs`: the bytes and their meta under the blob's own hash tag, with a TTL
//! refreshed whenever the same blob is stored again), so a blob stored through one node
//! is readable through every other.

use super::BrokerError;
use crate::blobs::{BlobId, BlobMeta};
use async_trait::async_trait;
use bytes::Bytes;
use std::time::Duration;

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores a blob for `ttl`; if it is stored already, only its TTL is refreshed.
    async fn put(
        &self,
        id: &BlobId,
        meta: &BlobMeta,
        bytes: Bytes,
        ttl: Duration,
    ) -> Result<(), BrokerError>;

    /// What is known of a stored blob; `refresh` extends its TTL (an upload that found it
    /// already stored counts as storing it again).
    async fn meta(
        &self,
        id: &BlobId,
        refresh: Option<Duration>,
    ) -> Result<Option<BlobMeta>, BrokerError>;

    /// Up to `len` bytes from `start`; `None` if the blob is gone.
    async fn read(&self, id: &BlobId, start: u64, len: u64) -> Result<Option<Bytes>, BrokerError>;
}

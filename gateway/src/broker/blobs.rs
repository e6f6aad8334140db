//! Where blobs live: one small trait, implemented in memory on one node
//! (`memory::blobs`, bounded by bytes with LRU and TTL eviction) and in Redis across nodes
//! (`redis::blobs`: the bytes and their meta under the blob's own hash tag, with a TTL
//! refreshed whenever the same blob is stored again), so a blob stored through one node
//! is readable through every other.
//!
//! A blob is usable only in the channels it was **granted** to: the channel it was
//! uploaded for, and any channel the backend (HTTP API) publishes it in. Knowing an id is
//! not enough to read, publish or refresh a blob elsewhere, so ids (which appear in every
//! URL) are not passwords. A blob holds at most [`MAX_GRANTS`] channels; beyond that an
//! arbitrary older grant gives way (its publications' signed URLs keep working).

use super::BrokerError;
use crate::blobs::{BlobId, BlobMeta};
use async_trait::async_trait;
use bytes::Bytes;
use std::time::Duration;

/// Channels one blob may be granted to.
pub const MAX_GRANTS: usize = 4096;

/// Who wants a blob's meta.
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    /// A client in this channel: only if the blob was granted to it.
    Client(&'a str),
    /// The backend publishing in this channel: grants it (and refreshes the TTL).
    Backend(&'a str),
    /// A holder of a signed URL (the signature is the grant).
    Signed,
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores a blob for `ttl` and grants it to `channel`; if it is stored already, its
    /// TTL is refreshed and the grant added.
    async fn put(
        &self,
        id: &BlobId,
        meta: &BlobMeta,
        bytes: Bytes,
        ttl: Duration,
        channel: &str,
    ) -> Result<(), BrokerError>;

    /// What is known of a stored blob, if `access` allows; `refresh` extends its TTL (an
    /// upload that found it already stored counts as storing it again).
    async fn meta(
        &self,
        id: &BlobId,
        access: Access<'_>,
        refresh: Option<Duration>,
    ) -> Result<Option<BlobMeta>, BrokerError>;

    /// Up to `len` bytes from `start`; `None` if the blob is gone. Callers check access
    /// with [`BlobStore::meta`] first.
    async fn read(&self, id: &BlobId, start: u64, len: u64) -> Result<Option<Bytes>, BrokerError>;
}

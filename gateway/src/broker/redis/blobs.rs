//! Blobs in Redis: the bytes in `{prefix}blob:{<id>}`, their meta in `…:m` and the
//! channels they are granted to in `…:c` (a set), all under the blob's own hash tag (the
//! id), so Redis Cluster spreads blobs over slots and one script handles all three.
//! Stored with a TTL that storing the same blob again refreshes.
//! With several independent servers, a blob lives on the server rendezvous hashing picks
//! for its id, like a channel.
//!
//! Two bounds on what a node does with them:
//! - **Stores in flight** are limited to [`PUT_IN_FLIGHT`] bytes: the client library copies a
//!   blob into its command buffer (more than once), so 256 uploads finishing together would
//!   otherwise hold several times their size.
//! - **Reads** go through a per-node cache of whole blobs (`[blobs] cache_bytes`, LRU), and
//!   concurrent misses for one blob make one round trip: an image sent to a hundred
//!   subscribers on a node is read from Redis once, not a hundred times in 64 KiB ranges.
//!   Blobs larger than a quarter of the cache are read in ranges, uncached.

use super::{RedisBroker, Server, reply};
use crate::{
    blobs::lru::{Lru, slice},
    clock::Clock,
    metrics,
};
use crate::{
    blobs::{BlobId, BlobMeta},
    broker::{
        BrokerError,
        blobs::{Access, BlobStore, MAX_GRANTS},
    },
};
use async_trait::async_trait;
use bytes::Bytes;
use redis::Value;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};
use tokio::sync::{OnceCell, Semaphore};

/// Bytes of blobs being stored at once by one node; a larger blob takes all of it.
pub const PUT_IN_FLIGHT: usize = 32 << 20;
/// How long a cached blob is kept at most (blobs never change; this only returns memory).
const CACHE_TTL: Duration = Duration::from_secs(600);

/// Grants `ARGV[g]` in the set `KEYS[3]`, letting a random other grant go at the cap
/// `ARGV[g+1]`.
const GRANT: &str = r#"
local function grant(set, channel, cap)
  if redis.call('sismember', set, channel) == 0 then
    if redis.call('scard', set) >= tonumber(cap) then
      redis.call('spop', set)
    end
    redis.call('sadd', set, channel)
  end
end
"#;

/// KEYS: data, meta, grants. ARGV: bytes, ttl (s), size, content type, width, height,
/// channel, grant cap. Returns 1 when stored, 0 when it was there already (its TTL
/// refreshed, the channel granted).
pub fn put_script() -> String {
    format!(
        "{GRANT}{}",
        r#"
grant(KEYS[3], ARGV[7], ARGV[8])
redis.call('expire', KEYS[3], ARGV[2])
if redis.call('exists', KEYS[1]) == 1 then
  redis.call('expire', KEYS[1], ARGV[2])
  redis.call('expire', KEYS[2], ARGV[2])
  return 0
end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('hset', KEYS[2], 's', ARGV[3], 't', ARGV[4], 'w', ARGV[5], 'h', ARGV[6])
redis.call('expire', KEYS[2], ARGV[2])
return 1
"#
    )
}

/// KEYS: data, meta, grants. ARGV: mode (`client`: the channel must be granted; `backend`:
/// grant it; `signed`: no check), channel, TTL to refresh to (s, 0 = none), grant cap.
/// Returns {size, type, width, height}, or nil.
pub fn meta_script() -> String {
    format!(
        "{GRANT}{}",
        r#"
local m = redis.call('hmget', KEYS[2], 's', 't', 'w', 'h')
if not m[1] then return false end
if ARGV[1] == 'client' and redis.call('sismember', KEYS[3], ARGV[2]) == 0 then
  return false
end
if ARGV[1] == 'backend' then
  grant(KEYS[3], ARGV[2], ARGV[4])
  if ARGV[3] == '0' then
    local ttl = redis.call('ttl', KEYS[1])
    if ttl > 0 then redis.call('expire', KEYS[3], ttl) end
  end
end
if ARGV[3] ~= '0' then
  for i = 1, 3 do redis.call('expire', KEYS[i], ARGV[3]) end
end
return m
"#
    )
}

/// KEYS: data. ARGV: largest size to return whole. Returns nil (no blob), the blob, or its
/// size when larger.
pub const READ_WHOLE: &str = r#"
local n = redis.call('strlen', KEYS[1])
if n == 0 then return false end
if n > tonumber(ARGV[1]) then return n end
return redis.call('get', KEYS[1])
"#;

/// What one whole read found.
#[derive(Clone)]
enum Whole {
    Missing,
    Bytes(Bytes),
    TooLarge,
}

/// The broker's blob store, holding the broker weakly (it owns this).
pub struct RedisBlobs {
    broker: Weak<RedisBroker>,
    puts: Semaphore,
    /// `None` when `cache_bytes` is 0.
    cache: Option<Mutex<Lru>>,
    /// Whole reads under way, so concurrent misses share one.
    reading: Mutex<HashMap<BlobId, Arc<OnceCell<Whole>>>>,
    clock: Clock,
}

impl RedisBlobs {
    pub(super) fn new(broker: Weak<RedisBroker>, cache_bytes: usize, clock: Clock) -> Self {
        Self {
            broker,
            puts: Semaphore::new(PUT_IN_FLIGHT >> 10),
            cache: (cache_bytes > 0)
                .then(|| Mutex::new(Lru::new(cache_bytes, metrics::blob_cache_eviction))),
            reading: Mutex::default(),
            clock,
        }
    }

    fn broker(&self) -> Result<Arc<RedisBroker>, BrokerError> {
        self.broker
            .upgrade()
            .ok_or_else(|| BrokerError::Internal("broker gone".into()))
    }

    fn cache(&self) -> Option<MutexGuard<'_, Lru>> {
        self.cache
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn remember(&self, id: &BlobId, bytes: &Bytes) {
        let now = self.clock.now();
        if let Some(mut cache) = self.cache()
            && bytes.len() <= cache.limit() / 4
        {
            let _ = cache.insert(id, BlobMeta::default(), bytes.clone(), now + CACHE_TTL, now);
            metrics::blob_cache_bytes(cache.bytes());
        }
    }

    /// The whole blob if it is small enough to cache, read once for every concurrent
    /// caller.
    async fn read_whole(&self, id: &BlobId, limit: usize) -> Result<Whole, BrokerError> {
        let reading = || self.reading.lock().unwrap_or_else(|e| e.into_inner());
        let cell = reading()
            .entry(id.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let result = cell
            .get_or_try_init(|| async {
                metrics::blob_cache("miss");
                let broker = self.broker()?;
                let data = broker.keys.blob(id.as_str());
                let script = &broker.scripts.blob_read;
                let value: Value = broker
                    .blob_server(id)
                    .commands
                    .run(|mut conn| async move {
                        script.key(data).arg(limit).invoke_async(&mut conn).await
                    })
                    .await?;
                let whole = match value {
                    Value::Nil => Whole::Missing,
                    Value::Int(_) => Whole::TooLarge,
                    Value::BulkString(b) => Whole::Bytes(Bytes::from(b)),
                    _ => return Err(reply::bad_reply("blob read")),
                };
                if let Whole::Bytes(b) = &whole {
                    self.remember(id, b);
                }
                Ok(whole)
            })
            .await
            .cloned();
        let mut reading = reading();
        if reading.get(id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            reading.remove(id);
        }
        result
    }
}

impl RedisBroker {
    fn blob_server(&self, id: &BlobId) -> &Server {
        if self.cluster {
            return &self.servers[0];
        }
        &self.servers[super::sharding::pick_server(&self.names, id.as_str())]
    }
}

#[async_trait]
impl BlobStore for RedisBlobs {
    async fn put(
        &self,
        id: &BlobId,
        meta: &BlobMeta,
        bytes: Bytes,
        ttl: Duration,
        channel: &str,
    ) -> Result<(), BrokerError> {
        let broker = self.broker()?;
        let (data, meta_key, grants) = (
            broker.keys.blob(id.as_str()),
            broker.keys.blob_meta(id.as_str()),
            broker.keys.blob_grants(id.as_str()),
        );
        let kib =
            u32::try_from(bytes.len().div_ceil(1024).min(PUT_IN_FLIGHT >> 10)).unwrap_or(u32::MAX);
        let _in_flight = self
            .puts
            .acquire_many(kib)
            .await
            .map_err(|_| BrokerError::Internal("blob store closed".into()))?;
        let script = &broker.scripts.blob_put;
        let meta = meta.clone();
        let value = bytes.clone();
        broker
            .blob_server(id)
            .commands
            .run(|mut conn| async move {
                script
                    .key(data)
                    .key(meta_key)
                    .key(grants)
                    .arg(&value[..])
                    .arg(ttl.as_secs().max(1))
                    .arg(meta.size)
                    .arg(&meta.content_type)
                    .arg(meta.width)
                    .arg(meta.height)
                    .arg(channel)
                    .arg(MAX_GRANTS)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await?;
        // Subscribers on this node are about to read it.
        self.remember(id, &bytes);
        Ok(())
    }

    async fn meta(
        &self,
        id: &BlobId,
        access: Access<'_>,
        refresh: Option<Duration>,
    ) -> Result<Option<BlobMeta>, BrokerError> {
        let broker = self.broker()?;
        let keys = [
            broker.keys.blob(id.as_str()),
            broker.keys.blob_meta(id.as_str()),
            broker.keys.blob_grants(id.as_str()),
        ];
        let (mode, channel) = match access {
            Access::Client(c) => ("client", c),
            Access::Backend(c) => ("backend", c),
            Access::Signed => ("signed", ""),
        };
        let ttl = refresh.map_or(0, |t| t.as_secs().max(1));
        let script = &broker.scripts.blob_meta;
        let value: Value = broker
            .blob_server(id)
            .commands
            .run(|mut conn| async move {
                script
                    .key(&keys[..])
                    .arg(mode)
                    .arg(channel)
                    .arg(ttl)
                    .arg(MAX_GRANTS)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let fields = match value {
            Value::Nil => return Ok(None),
            Value::Array(fields) => fields,
            _ => return Err(reply::bad_reply("blob meta")),
        };
        let [size, content_type, width, height] = fields.as_slice() else {
            return Err(reply::bad_reply("blob meta"));
        };
        let number = |v: &Value| {
            reply::int(v)
                .and_then(|i| u64::try_from(i).ok())
                .unwrap_or(0)
        };
        Ok(Some(BlobMeta {
            size: number(size),
            content_type: reply::text(content_type),
            width: u32::try_from(number(width)).unwrap_or(0),
            height: u32::try_from(number(height)).unwrap_or(0),
        }))
    }

    async fn read(&self, id: &BlobId, start: u64, len: u64) -> Result<Option<Bytes>, BrokerError> {
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        let now = self.clock.now();
        let cached = self.cache().map(|mut c| {
            (
                c.get(id, now).map(|e| slice(&e.bytes, start, len)),
                c.limit(),
            )
        });
        match cached {
            Some((Some(bytes), _)) => {
                metrics::blob_cache("hit");
                return Ok(Some(bytes));
            }
            Some((None, limit)) => match self.read_whole(id, limit / 4).await? {
                Whole::Missing => return Ok(None),
                Whole::Bytes(b) => return Ok(Some(slice(&b, start, len))),
                Whole::TooLarge => {}
            },
            None => {}
        }
        let broker = self.broker()?;
        let data = broker.keys.blob(id.as_str());
        let end = start + len - 1;
        let (chunk, exists): (Vec<u8>, i64) = broker
            .blob_server(id)
            .commands
            .run(|mut conn| async move {
                redis::pipe()
                    .cmd("GETRANGE")
                    .arg(&data)
                    .arg(start)
                    .arg(end)
                    .cmd("EXISTS")
                    .arg(&data)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok((exists == 1).then(|| Bytes::from(chunk)))
    }
}

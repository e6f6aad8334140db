//! Blobs in Redis: the bytes in `{prefix}blob:{<id>}` and their meta in `…:m`, both under
//! the blob's own hash tag (the id), so Redis Cluster spreads blobs over slots and one
//! script stores both. Stored with a TTL that storing the same blob again refreshes.
//! With several independent servers, a blob lives on the server rendezvous hashing picks
//! for its id, like a channel.

use super::{RedisBroker, Server, reply};
use crate::{
    blobs::{BlobId, BlobMeta},
    broker::{BrokerError, blobs::BlobStore},
};
use async_trait::async_trait;
use bytes::Bytes;
use redis::Value;
use std::{sync::Weak, time::Duration};

/// KEYS: data, meta. ARGV: bytes, ttl (s), size, content type, width, height. Returns 1
/// when stored, 0 when it was there already (its TTL refreshed).
pub const PUT: &str = r#"
if redis.call('exists', KEYS[1]) == 1 then
  redis.call('expire', KEYS[1], ARGV[2])
  redis.call('expire', KEYS[2], ARGV[2])
  return 0
end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('hset', KEYS[2], 's', ARGV[3], 't', ARGV[4], 'w', ARGV[5], 'h', ARGV[6])
redis.call('expire', KEYS[2], ARGV[2])
return 1
"#;

/// The broker's blob store, holding the broker weakly (it owns this).
pub struct RedisBlobs(pub(super) Weak<RedisBroker>);

impl RedisBlobs {
    fn broker(&self) -> Result<std::sync::Arc<RedisBroker>, BrokerError> {
        self.0
            .upgrade()
            .ok_or_else(|| BrokerError::Internal("broker gone".into()))
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
    ) -> Result<(), BrokerError> {
        let broker = self.broker()?;
        let (data, meta_key) = (
            broker.keys.blob(id.as_str()),
            broker.keys.blob_meta(id.as_str()),
        );
        let script = &broker.scripts.blob_put;
        let meta = meta.clone();
        broker
            .blob_server(id)
            .commands
            .run(|mut conn| async move {
                script
                    .key(data)
                    .key(meta_key)
                    .arg(&bytes[..])
                    .arg(ttl.as_secs().max(1))
                    .arg(meta.size)
                    .arg(&meta.content_type)
                    .arg(meta.width)
                    .arg(meta.height)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await
            .map(|_| ())
    }

    async fn meta(
        &self,
        id: &BlobId,
        refresh: Option<Duration>,
    ) -> Result<Option<BlobMeta>, BrokerError> {
        let broker = self.broker()?;
        let (data, meta_key) = (
            broker.keys.blob(id.as_str()),
            broker.keys.blob_meta(id.as_str()),
        );
        let values: Vec<Value> = broker
            .blob_server(id)
            .commands
            .run(|mut conn| async move {
                let mut pipe = redis::pipe();
                pipe.cmd("HMGET")
                    .arg(&meta_key)
                    .arg("s")
                    .arg("t")
                    .arg("w")
                    .arg("h");
                if let Some(ttl) = refresh {
                    pipe.cmd("EXPIRE")
                        .arg(&data)
                        .arg(ttl.as_secs().max(1))
                        .ignore();
                    pipe.cmd("EXPIRE")
                        .arg(&meta_key)
                        .arg(ttl.as_secs().max(1))
                        .ignore();
                }
                pipe.query_async::<Vec<Value>>(&mut conn).await
            })
            .await?;
        let Some(Value::Array(fields)) = values.first() else {
            return Err(reply::bad_reply("blob meta"));
        };
        let [size, content_type, width, height] = fields.as_slice() else {
            return Err(reply::bad_reply("blob meta"));
        };
        if matches!(size, Value::Nil) {
            return Ok(None);
        }
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

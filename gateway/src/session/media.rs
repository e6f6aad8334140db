//! The image commands of a session: `BlobPut` (chunked uploads, assembled by
//! [`Uploads`](crate::blobs::upload::Uploads)), `BlobGet` (a download task pushing
//! `BlobChunk` frames on the outbox's bulk lane, so they never delay small frames) and
//! `Rpc` (a task asking the backend and queuing the answer as a reply). Downloads and RPC
//! calls run off the connection's task, bounded per connection; their answers carry the
//! command's id.

use super::core::{SessionCore, wire_error};
use crate::{
    blobs::{
        BlobId, BlobMeta, check_stored_type, check_type, dimensions,
        upload::{Fed, Start, UploadError},
    },
    broker::blobs::Access,
    error::{CommandError, bounds},
    metrics,
    rpc::Call,
};
use broker_proto::{
    Encoding, ErrorCode, encode_frame,
    v1::{
        BlobChunk, BlobGet, BlobPut, BlobPutResult, BlobRef, Rpc, ServerFrame, server_frame::Body,
    },
};
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// Largest blob chunk pushed to a client (DESIGN.md: at most 64 KiB).
pub const CHUNK_BYTES: u64 = 64 * 1024;
/// A download waits while this many bytes of its chunks are queued unsent.
const BULK_WINDOW: usize = 256 * 1024;
/// Bytes needed to sniff an image type from an upload's first chunk.
const SNIFF_BYTES: usize = 32;

/// A count of tasks in flight, held by each task and given back when it ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(super) fn frame(id: u32, body: Body) -> ServerFrame {
    ServerFrame {
        id,
        error: None,
        body: Some(body),
    }
}

pub(super) fn error_frame(id: u32, e: CommandError) -> ServerFrame {
    ServerFrame {
        id,
        error: Some(wire_error(e).0),
        body: None,
    }
}

impl SessionCore {
    /// The reference to a stored blob as clients get it: with a URL signed for `channel`.
    fn blob_ref(&self, id: &BlobId, meta: BlobMeta, channel: &str) -> BlobRef {
        let url = self
            .ctx
            .hub
            .blob_urls()
            .sign(id.as_str(), channel, self.ctx.clock.unix_secs())
            .unwrap_or_default();
        BlobRef {
            id: id.to_string(),
            size: meta.size,
            content_type: meta.content_type,
            url,
            name: String::new(),
            width: meta.width,
            height: meta.height,
        }
    }

    pub(super) async fn blob_put(&mut self, put: BlobPut) -> Result<Body, CommandError> {
        let now = self.ctx.clock.now();
        let config = self.ctx.channels.blob_config().clone();
        let first = !self.media().uploads.in_flight(put.upload);
        if first {
            if put.size == 0 || put.content_type.is_empty() {
                return Err(UploadError::Bad(
                    "no such upload in flight (never started, failed or idle too long); \
                     a first chunk carries size and content_type",
                )
                .into());
            }
            CommandError::check_len("contentType", &put.content_type, bounds::CONTENT_TYPE)?;
            let (channel, options) = self.authorize_publish(&put.channel)?;
            let claimed = match put.id.as_str() {
                "" => None,
                id => Some(BlobId::parse(id).map_err(|_| UploadError::Bad("bad blob id"))?),
            };
            let start = Start {
                channel: channel.as_str().to_owned(),
                content_type: put.content_type.clone(),
                size: put.size,
                claimed: claimed.clone(),
            };
            self.media().uploads.begin(put.upload, start, now)?;
            metrics::blob_upload("started");
            if let Some(id) = claimed {
                // The shortcut works only for a blob already granted to this channel
                // (which the client could read anyway): an id proves nothing else.
                let store = self.ctx.channels.broker().blobs();
                let known = store
                    .meta(&id, Access::Client(channel.as_str()), Some(config.ttl))
                    .await;
                match known {
                    Ok(Some(meta)) => {
                        self.media().uploads.abandon(put.upload);
                        let allowed = self.ctx.channels.blob_types(&options);
                        check_stored_type(&meta.content_type, &put.content_type, allowed)?;
                        if meta.size != put.size {
                            return Err(UploadError::Bad(
                                "the declared size is not the stored blob's",
                            )
                            .into());
                        }
                        metrics::blob_upload("known");
                        let blob = self.blob_ref(&id, meta, channel.as_str());
                        return Ok(Body::BlobPut(BlobPutResult { blob: Some(blob) }));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.media().uploads.abandon(put.upload);
                        metrics::blob_upload("aborted");
                        return Err(e.into());
                    }
                }
            }
        }
        let fed = self
            .media()
            .uploads
            .feed(put.upload, &put.data, put.last, now);
        if fed.is_err() {
            metrics::blob_upload("aborted");
        }
        let assembled = match fed? {
            Fed::More => {
                if first {
                    self.sniff_early(put.upload, &put.channel, &put.content_type)?;
                }
                return Ok(Body::BlobPut(BlobPutResult { blob: None }));
            }
            Fed::Done(assembled) => assembled,
        };
        let (_, options) = self.ctx.channels.resolve(&assembled.channel)?;
        let allowed = self.ctx.channels.blob_types(&options);
        let kind = check_type(&assembled.bytes, &assembled.content_type, allowed)
            .inspect_err(|_| metrics::blob_upload("aborted"))?;
        let (width, height) = dimensions(&assembled.bytes).unwrap_or((0, 0));
        let meta = BlobMeta {
            size: assembled.bytes.len() as u64,
            content_type: kind.mime().to_owned(),
            width,
            height,
        };
        let size = meta.size;
        self.ctx
            .channels
            .broker()
            .blobs()
            .put(
                &assembled.id,
                &meta,
                assembled.bytes,
                config.ttl,
                &assembled.channel,
            )
            .await
            .inspect_err(|_| {
                metrics::broker_error("blob");
                metrics::blob_upload("aborted");
            })?;
        metrics::blob_upload("completed");
        metrics::blob_bytes_stored(size);
        let blob = self.blob_ref(&assembled.id, meta, &assembled.channel);
        Ok(Body::BlobPut(BlobPutResult { blob: Some(blob) }))
    }

    /// Refuses a non-image as soon as its first bytes show it, not after megabytes.
    fn sniff_early(
        &mut self,
        upload: u32,
        channel: &str,
        claimed: &str,
    ) -> Result<(), CommandError> {
        let ctx = self.ctx.clone();
        let Some(head) = self
            .media()
            .uploads
            .head(upload)
            .filter(|h| h.len() >= SNIFF_BYTES)
        else {
            return Ok(());
        };
        let (_, options) = ctx.channels.resolve(channel)?;
        let allowed = ctx.channels.blob_types(&options);
        if let Err(e) = check_type(head, claimed, allowed) {
            self.media().uploads.abandon(upload);
            metrics::blob_upload("aborted");
            return Err(e.into());
        }
        Ok(())
    }

    pub(super) async fn blob_get(&mut self, id: u32, get: BlobGet) -> Result<(), CommandError> {
        self.authorize(&get.channel)?;
        let not_found =
            || CommandError::new(ErrorCode::BlobNotFound, "no such blob (unknown or expired)");
        let blob = BlobId::parse(&get.id).map_err(|_| not_found())?;
        let max = self.ctx.channels.blob_config().max_downloads_per_connection;
        let slot = Slot::take(&self.media().downloads, max).ok_or_else(|| {
            CommandError::new(
                ErrorCode::LimitExceeded,
                "downloads in flight on this connection",
            )
        })?;
        let broker = self.ctx.channels.broker().clone();
        let meta = broker
            .blobs()
            .meta(&blob, Access::Client(&get.channel), None)
            .await
            .inspect_err(|_| metrics::broker_error("blob"))?
            .ok_or_else(not_found)?;
        let (outbox, encoding) = (self.outbox.clone(), self.encoding);
        tokio::spawn(async move {
            let _slot = slot;
            let mut offset = 0u64;
            while offset < meta.size {
                outbox.wait_bulk_room(BULK_WINDOW).await;
                if outbox.closing().is_some() {
                    return;
                }
                let len = CHUNK_BYTES.min(meta.size - offset);
                let data = match broker.blobs().read(&blob, offset, len).await {
                    Ok(Some(data)) if data.len() as u64 == len => data,
                    Ok(_) => {
                        push_error(&outbox, encoding, id, not_found());
                        return;
                    }
                    Err(e) => {
                        metrics::broker_error("blob");
                        push_error(&outbox, encoding, id, e.into());
                        return;
                    }
                };
                let first = offset == 0;
                let chunk = BlobChunk {
                    id: blob.to_string(),
                    offset,
                    data,
                    last: offset + len == meta.size,
                    size: if first { meta.size } else { 0 },
                    content_type: if first {
                        meta.content_type.clone()
                    } else {
                        String::new()
                    },
                };
                let bytes = encode_frame(encoding, &frame(id, Body::BlobChunk(chunk)));
                if outbox.push_bulk(bytes) != crate::hub::outbox::Pushed::Queued {
                    return;
                }
                metrics::blob_bytes_served("ws", len);
                offset += len;
            }
        });
        Ok(())
    }

    pub(super) fn rpc(&mut self, id: u32, call: Rpc) -> Result<(), CommandError> {
        CommandError::check_len("contentType", &call.content_type, bounds::CONTENT_TYPE)?;
        let rpc = self.ctx.rpc.clone();
        let slot = Slot::take(&self.media().rpcs, rpc.max_in_flight()).ok_or_else(|| {
            CommandError::new(
                ErrorCode::LimitExceeded,
                "RPC calls in flight on this connection",
            )
        })?;
        let (outbox, encoding) = (self.outbox.clone(), self.encoding);
        let (user, client) = (self.user().to_owned(), self.client_id());
        tokio::spawn(async move {
            let _slot = slot;
            let result = rpc
                .call(Call {
                    method: &call.method,
                    data: call.data,
                    content_type: &call.content_type,
                    user: &user,
                    client: &client,
                })
                .await;
            let answer = match result {
                Ok(result) => frame(id, Body::Rpc(result)),
                Err(e) => error_frame(id, e),
            };
            if id > 0 {
                outbox.push_reply(encode_frame(encoding, &answer));
            }
        });
        Ok(())
    }
}

fn push_error(outbox: &crate::hub::outbox::Outbox, encoding: Encoding, id: u32, e: CommandError) {
    let f = error_frame(id, e);
    if id > 0 {
        outbox.push_reply(encode_frame(encoding, &f));
    }
}

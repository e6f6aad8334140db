//! `Channels`: the channel operations clients and the HTTP API share — resolving a name to
//! its namespace, and publish, history, presence and subscribe through the broker — with
//! the checks both must apply (namespace exists, history/presence enabled, size limit,
//! blobs that exist) and the broker metrics recorded in one place. Blob URLs in history
//! pages are signed here, freshly, as the hub signs them for live delivery.

use crate::{
    blobs::{BlobId, KindSet, check_stored_type},
    broker::{Broker, BrokerError, HistoryPage, Position, PublishRequest, blobs::Access},
    channel::ChannelName,
    config::{BlobsConfig, NamespaceOptions, Namespaces, ReadLimits},
    error::{CommandError, bounds},
    hub::Hub,
    metrics::{self, Metrics},
};
use broker_proto::{
    ErrorCode,
    v1::{BlobRef, ClientInfo, Publication},
};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

/// A blob's name (a file name, for display) is at most this long.
pub const MAX_BLOB_NAME: usize = 255;

/// Who publishes: a client (blobs must be granted to the channel) or the backend through
/// the HTTP API (trusted: publishing a blob grants it to the channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publisher {
    Client,
    Backend,
}

impl Publisher {
    /// The `source` label of `gateway_publications_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Backend => "api",
        }
    }
}

/// A publish as [`Channels::start_publish`] left it.
pub enum Started {
    /// Ordered and under way: await it for the answer.
    Pending(BoxFuture<'static, Result<Position, CommandError>>),
    /// Not started: publish it with [`Channels::publish`].
    InPlace(PublishRequest),
}

pub struct Channels {
    namespaces: Namespaces,
    broker: Arc<dyn Broker>,
    metrics: Metrics,
    hub: Arc<Hub>,
    blobs: BlobsConfig,
    reads: ReadLimits,
    /// Permits for history reads running at once (`history_reads_per_node`): a storm
    /// of recoveries or hostile history requests waits here instead of piling up
    /// broker replies in memory.
    history_permits: Arc<tokio::sync::Semaphore>,
    /// KiB of history pages held until written (`history_bytes_per_node`).
    history_bytes: Arc<tokio::sync::Semaphore>,
    history_kib: u32,
    /// History reads in flight, by (channel, since, limit): a storm of recoveries from the
    /// same position shares one broker read per node.
    reads_in_flight: Arc<Mutex<HashMap<ReadKey, InFlight>>>,
    next_read: AtomicU64,
}

type ReadKey = (String, u64, usize);
type SharedPage = Shared<BoxFuture<'static, Result<HistoryPage, CommandError>>>;

fn history_kib(reads: &ReadLimits) -> u32 {
    u32::try_from(reads.history_bytes_per_node / 1024)
        .unwrap_or(u32::MAX)
        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS as u32)
}

/// About what a page costs while held: decoded and encoded, each publication's payload
/// and strings plus fixed overhead, in KiB.
fn page_kib(page: &HistoryPage) -> u32 {
    let bytes: usize = page
        .publications
        .iter()
        .map(|p| {
            let info = p
                .info
                .as_ref()
                .map_or(0, |i| i.user.len() + i.client.len() + i.name.len());
            2 * (p.data.len() + p.content_type.len() + p.channel.len() + p.epoch.len() + info)
                + 96 * (1 + p.blobs.len())
        })
        .sum();
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// A broker history read others may join: only callers that arrived no later than it
/// started, so it cannot miss a publication their live delivery did not get.
struct InFlight {
    started: Instant,
    id: u64,
    page: SharedPage,
}

/// What a history page holds until it has been written to its client: one of the node's
/// `history_reads_per_node` permits and its size in the `history_bytes_per_node` budget,
/// so the pages the node holds at once are bounded in number and bytes.
pub struct ReadPermit {
    _count: tokio::sync::OwnedSemaphorePermit,
    _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// How long a history read waits for a permit, then for room in the byte budget, before
/// it is refused with 107 (temporary): a session never stalls for long behind clients that
/// do not read their pages (its pings and commands wait meanwhile).
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How many publications a history read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// At most this many (capped at `max_history_limit`; 0 means the cap).
    Page(u32),
    /// Everything retained, for recovery.
    All,
}

impl Channels {
    pub fn new(
        namespaces: Namespaces,
        broker: Arc<dyn Broker>,
        metrics: Metrics,
        hub: Arc<Hub>,
        blobs: BlobsConfig,
        reads: ReadLimits,
    ) -> Self {
        Self {
            namespaces,
            broker,
            metrics,
            hub,
            blobs,
            history_permits: Arc::new(tokio::sync::Semaphore::new(reads.history_reads_per_node)),
            history_bytes: Arc::new(tokio::sync::Semaphore::new(history_kib(&reads) as usize)),
            history_kib: history_kib(&reads),
            reads_in_flight: Arc::default(),
            next_read: AtomicU64::new(0),
            reads,
        }
    }

    pub fn blob_config(&self) -> &BlobsConfig {
        &self.blobs
    }

    /// The image types blobs for this namespace may have.
    pub fn blob_types(&self, options: &NamespaceOptions) -> KindSet {
        options.blob_types.unwrap_or(self.blobs.allowed_types)
    }

    pub fn sign(&self, publications: &mut [Publication]) {
        for p in publications {
            self.hub.sign_blobs(p);
        }
    }

    /// A publish's blobs must name stored blobs (111); what the store knows of them
    /// (size, type, dimensions) replaces what the client claimed.
    async fn check_blobs(
        &self,
        blobs: &mut [BlobRef],
        channel: &ChannelName,
        options: &NamespaceOptions,
        publisher: Publisher,
    ) -> Result<(), CommandError> {
        let access = match publisher {
            Publisher::Client => Access::Client(channel.as_str()),
            Publisher::Backend => Access::Backend(channel.as_str()),
        };
        let allowed = self.blob_types(options);
        if blobs.len() > self.blobs.max_blobs_per_publication {
            return Err(CommandError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "at most {} blobs per publication",
                    self.blobs.max_blobs_per_publication
                ),
            ));
        }
        for blob in blobs {
            let not_found =
                || CommandError::new(ErrorCode::BlobNotFound, "no such blob (unknown or expired)");
            let id = BlobId::parse(&blob.id).map_err(|_| not_found())?;
            if blob.name.len() > MAX_BLOB_NAME {
                return Err(CommandError::bad_request(format!(
                    "a blob name is at most {MAX_BLOB_NAME} bytes"
                )));
            }
            // Published blobs live at least `ttl_seconds` from their latest publication.
            // A client may publish only blobs granted to the channel (as if unknown
            // otherwise: an id is no proof of having the bytes); the backend grants.
            let meta = self
                .broker
                .blobs()
                .meta(&id, access, Some(self.blobs.ttl))
                .await
                .inspect_err(|_| metrics::broker_error("blob"))?
                .ok_or_else(not_found)?;
            check_stored_type(&meta.content_type, "", allowed)?;
            blob.size = meta.size;
            blob.content_type = meta.content_type;
            blob.width = meta.width;
            blob.height = meta.height;
            blob.url.clear();
        }
        Ok(())
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    /// Validates a channel name and finds its namespace's options (error 102 otherwise).
    pub fn resolve(&self, name: &str) -> Result<(ChannelName, NamespaceOptions), CommandError> {
        self.namespaces
            .resolve(name)
            .map_err(|e| CommandError::new(ErrorCode::UnknownChannel, e.to_string()))
    }

    /// Publishes for a client or the HTTP API, with the size limit checked and the
    /// broker's latency recorded.
    pub async fn publish(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        mut request: PublishRequest,
        publisher: Publisher,
    ) -> Result<Position, CommandError> {
        Self::check_publish(options, &request)?;
        self.check_blobs(&mut request.blobs, channel, options, publisher)
            .await?;
        let started = Instant::now();
        let result = self.broker.publish(channel, options, request).await;
        self.published(started, result, publisher)
    }

    /// Starts a publish that takes its place in the channel's order before this returns
    /// (see `Broker::start_publish`): a session may go on with its next publish before
    /// this one is answered. Publications with blobs, and brokers that cannot keep the
    /// order that way, come back as `InPlace`: `publish` them.
    pub fn start_publish(
        self: &Arc<Self>,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
        publisher: Publisher,
    ) -> Result<Started, CommandError> {
        Self::check_publish(options, &request)?;
        if !request.blobs.is_empty() {
            return Ok(Started::InPlace(request));
        }
        let started = Instant::now();
        match self.broker.start_publish(channel, options, request) {
            Err(request) => Ok(Started::InPlace(request)),
            Ok(pending) => {
                let me = self.clone();
                Ok(Started::Pending(Box::pin(async move {
                    me.published(started, pending.await, publisher)
                })))
            }
        }
    }

    /// The checks every publication passes before the broker sees it (blobs aside).
    fn check_publish(
        options: &NamespaceOptions,
        request: &PublishRequest,
    ) -> Result<(), CommandError> {
        CommandError::check_len("contentType", &request.content_type, bounds::CONTENT_TYPE)?;
        CommandError::check_len(
            "idempotencyKey",
            &request.idempotency_key,
            bounds::IDEMPOTENCY_KEY,
        )?;
        if request.data.len() > options.max_message_bytes {
            return Err(CommandError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "publication of {} bytes exceeds {}",
                    request.data.len(),
                    options.max_message_bytes
                ),
            ));
        }
        Ok(())
    }

    fn published(
        &self,
        started: Instant,
        result: Result<Position, BrokerError>,
        publisher: Publisher,
    ) -> Result<Position, CommandError> {
        self.metrics
            .broker_publish_seconds
            .record(started.elapsed().as_secs_f64());
        let position = result.inspect_err(|_| metrics::broker_error("publish"))?;
        metrics::publication(publisher.label());
        Ok(position)
    }

    /// Reads history after `since` (103 where the namespace keeps none). The permit
    /// goes with the page: drop it once the page is written.
    ///
    /// Callers must be subscribed (hub and broker) before calling, as recovery requires:
    /// the read they get started after this call began, so every publication their live
    /// delivery missed is in it. Identical reads that started since are shared.
    pub async fn history(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        since: u64,
        limit: Limit,
    ) -> Result<(HistoryPage, ReadPermit), CommandError> {
        if !options.has_history() {
            return Err(CommandError::permission_denied(
                "history is disabled in this namespace",
            ));
        }
        let called = Instant::now();
        let cap = self.reads.max_history_limit;
        let limit = match limit {
            Limit::All => 0,
            Limit::Page(0) => cap as usize,
            Limit::Page(n) => n.min(cap) as usize,
        };
        let busy =
            || CommandError::new(ErrorCode::TooManyRequests, "history reads are busy; retry");
        let count = match self.history_permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics::history_read_waited();
                tokio::time::timeout(READ_WAIT, self.history_permits.clone().acquire_owned())
                    .await
                    .map_err(|_| busy())?
                    .map_err(|_| CommandError::new(ErrorCode::Internal, "shutting down"))?
            }
        };
        metrics::history_reads_in_flight(
            self.reads.history_reads_per_node - self.history_permits.available_permits(),
        );
        let mut page = self
            .shared_read(channel, options, since, limit, called)
            .await?;
        self.sign(&mut page.publications);
        // A page larger than the whole budget takes all of it.
        let kib = page_kib(&page).min(self.history_kib);
        let bytes = if kib == 0 {
            None
        } else {
            let acquired = match self.history_bytes.clone().try_acquire_many_owned(kib) {
                Ok(p) => p,
                Err(_) => {
                    metrics::history_read_waited();
                    let wait = self.history_bytes.clone().acquire_many_owned(kib);
                    tokio::time::timeout(READ_WAIT, wait)
                        .await
                        .map_err(|_| busy())?
                        .map_err(|_| CommandError::new(ErrorCode::Internal, "shutting down"))?
                }
            };
            Some(acquired)
        };
        Ok((
            page,
            ReadPermit {
                _count: count,
                _bytes: bytes,
            },
        ))
    }

    /// Joins a read of the same page that started at or after `not_before`, or starts one.
    async fn shared_read(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        since: u64,
        limit: usize,
        not_before: Instant,
    ) -> Result<HistoryPage, CommandError> {
        let key: ReadKey = (channel.as_str().to_owned(), since, limit);
        let page = {
            let mut reads = self
                .reads_in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match reads.get(&key) {
                Some(read) if read.started >= not_before => {
                    metrics::history_read_merged();
                    read.page.clone()
                }
                _ => {
                    let id = self.next_read.fetch_add(1, Ordering::Relaxed);
                    let (broker, channel, options) =
                        (self.broker.clone(), channel.clone(), *options);
                    let reads_in_flight = self.reads_in_flight.clone();
                    let key2 = key.clone();
                    let page = async move {
                        let result = broker
                            .history(&channel, &options, since, limit)
                            .await
                            .inspect_err(|_| metrics::broker_error("history"))
                            .map_err(CommandError::from);
                        // Done: later callers start a fresh read. A newer read under the
                        // same key stays.
                        let mut reads = reads_in_flight.lock().unwrap_or_else(|e| e.into_inner());
                        if reads.get(&key2).is_some_and(|r| r.id == id) {
                            reads.remove(&key2);
                        }
                        result
                    }
                    .boxed()
                    .shared();
                    // A read whose callers all went away (an API timeout) is never
                    // finished or removed by itself: forget such entries in bulk.
                    if reads.len() >= 1024 {
                        reads.retain(|_, r| {
                            r.started.elapsed() < std::time::Duration::from_secs(60)
                        });
                    }
                    reads.insert(
                        key,
                        InFlight {
                            started: Instant::now(),
                            id,
                            page: page.clone(),
                        },
                    );
                    page
                }
            }
        };
        page.await
    }

    pub async fn position(&self, channel: &ChannelName) -> Result<Position, CommandError> {
        Ok(self
            .broker
            .position(channel)
            .await
            .inspect_err(|_| metrics::broker_error("history"))?)
    }

    /// The channel's presence (103 where the namespace keeps none), at most
    /// `max_presence_clients` of it; `true` when there was more.
    pub async fn presence(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
    ) -> Result<(Vec<ClientInfo>, bool), CommandError> {
        if !options.presence {
            return Err(CommandError::permission_denied(
                "presence is disabled in this namespace",
            ));
        }
        let mut clients = self
            .broker
            .presence(channel)
            .await
            .inspect_err(|_| metrics::broker_error("presence"))?;
        let max = self.reads.max_presence_clients;
        let truncated = clients.len() > max;
        if truncated {
            clients.truncate(max);
            metrics::presence_truncated();
        }
        Ok((clients, truncated))
    }

    /// The node subscribes to `channel` for one more local session.
    pub async fn subscribe(&self, channel: &ChannelName) -> Result<(), CommandError> {
        Ok(self
            .broker
            .subscribe(channel)
            .await
            .inspect_err(|_| metrics::broker_error("subscribe"))?)
    }
}

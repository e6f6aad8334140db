//! The HTTP API for backends: publish, broadcast, history and presence, JSON in and out
//! with the schema's field names (proto3 JSON mapping, so `data` is base64 and 64-bit
//! offsets are strings). A tower service: load shedding, a concurrency limit and a
//! timeout wrap the handler; bodies are size-limited while read.

use crate::{
    broker::PublishRequest,
    channel::ChannelName,
    channels::{Limit, Publisher, Started},
    config::NamespaceOptions,
    error::CommandError,
    http::{self as h, Body},
    metrics,
    node::Node,
};
use base64::Engine;
use broker_proto::{
    ErrorCode,
    v1::{HistoryResult, PresenceResult, Publish, PublishResult},
};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tower::{BoxError, ServiceBuilder, ServiceExt, util::BoxCloneSyncService};

pub type Service = BoxCloneSyncService<Request<Incoming>, Response<Body>, BoxError>;

pub fn service(node: Arc<Node>) -> Service {
    let timeout = node.config.api.timeout;
    let concurrency = node.config.api.concurrency;
    let svc = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(concurrency)
        .timeout(timeout)
        .service_fn(move |req| {
            let node = node.clone();
            async move { Ok::<_, BoxError>(handle(&node, req).await) }
        });
    BoxCloneSyncService::new(svc)
}

/// Calls the API service, turning shed load and timeouts into documented errors.
pub async fn call(service: &Service, req: Request<Incoming>) -> Response<Body> {
    match service.clone().oneshot(req).await {
        Ok(r) => r,
        Err(e) if e.is::<tower::load_shed::error::Overloaded>() => error_response(
            CommandError::new(ErrorCode::TooManyRequests, "API overloaded, retry later"),
        ),
        Err(e) if e.is::<tower::timeout::error::Elapsed>() => error_response(CommandError::new(
            ErrorCode::Internal,
            "API request timed out",
        )),
        Err(e) => error_response(CommandError::new(ErrorCode::Internal, e.to_string())),
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: WireError<'a>,
}

#[derive(Serialize)]
struct WireError<'a> {
    code: u32,
    message: &'a str,
    temporary: bool,
}

fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Unauthorized | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::UnknownChannel | ErrorCode::BadRequest | ErrorCode::AlreadySubscribed => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::BrokerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::BlobNotFound => StatusCode::NOT_FOUND,
        ErrorCode::BlobTypeNotAllowed => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::BadUpload => StatusCode::BAD_REQUEST,
        ErrorCode::BackendError => StatusCode::BAD_GATEWAY,
    }
}

fn error_response(e: CommandError) -> Response<Body> {
    let body = ErrorBody {
        error: WireError {
            code: e.code.code(),
            message: &e.message,
            temporary: e.code.temporary(),
        },
    };
    h::json(
        status_for(e.code),
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

fn ok<T: Serialize>(value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => h::json(StatusCode::OK, body),
        Err(e) => error_response(CommandError::new(ErrorCode::Internal, e.to_string())),
    }
}

fn bad_request(message: impl Into<String>) -> CommandError {
    CommandError::bad_request(message)
}

fn bad_param(e: h::ParamError) -> CommandError {
    bad_request(e.to_string())
}

async fn handle(node: &Node, req: Request<Incoming>) -> Response<Body> {
    use tracing::Instrument;
    let route = route_name(req.method(), req.uri().path());
    // A caller's `X-Request-Id` (bounded) is kept; otherwise one is made. It is in every
    // log line of the request and echoed in the response.
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_owned);
    let span = tracing::info_span!("api", request_id = %id, route);
    let mut response = match dispatch(node, req).instrument(span.clone()).await {
        Ok(r) => r,
        Err(e) => {
            span.in_scope(
                || tracing::debug!(code = e.code.code(), error = %e.message, "API error"),
            );
            error_response(e)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    metrics::api_request(route, response.status().as_u16());
    response
}

fn route_name(method: &Method, path: &str) -> &'static str {
    match (method, path) {
        (&Method::POST, "/api/v1/publish") => "publish",
        (&Method::POST, "/api/v1/broadcast") => "broadcast",
        (&Method::POST, "/api/v1/disconnect") => "disconnect",
        (&Method::POST, "/api/v1/blobs") => "blobs",
        (&Method::GET, "/api/v1/nodes") => "nodes",
        (&Method::GET, p) if p.ends_with("/history") => "history",
        (&Method::GET, p) if p.ends_with("/presence") => "presence",
        _ => "other",
    }
}

fn authorized(node: &Node, req: &Request<Incoming>) -> Result<(), CommandError> {
    let Some(expected) = node.config.api.key.as_deref() else {
        return Err(CommandError::new(
            ErrorCode::PermissionDenied,
            "HTTP API disabled: no API key configured",
        ));
    };
    let given = req
        .headers()
        .get("x-api-key")
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    // Several keys, comma-separated, are all accepted: add the new key, move callers to
    // it, then remove the old one (rotation without downtime). Each is compared in
    // constant time, and all are compared, so timing tells nothing about any of them.
    let same = expected
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .fold(false, |found, key| {
            let equal = given.len() == key.len()
                && given
                    .iter()
                    .zip(key.as_bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            found | equal
        });
    if same {
        Ok(())
    } else {
        Err(CommandError::new(
            ErrorCode::Unauthorized,
            "missing or wrong X-API-Key",
        ))
    }
}

/// An API request, parsed and checked for shape before anything acts on it. Channel names
/// are resolved against the namespaces when it runs.
#[derive(Debug)]
pub enum ApiRequest {
    Publish(Publish),
    Broadcast {
        channels: Vec<String>,
        publish: Publish,
    },
    Disconnect {
        user: String,
    },
    Nodes,
    History {
        channel: String,
        since_offset: u64,
        limit: u32,
    },
    Presence {
        channel: String,
    },
    /// `POST /api/v1/blobs?channel=C`: the body is the image, read by the handler.
    UploadBlob {
        channel: String,
    },
}

impl ApiRequest {
    /// Whether the route's body is JSON to read before [`parse`] (blob bodies are read
    /// as they come, inside the upload budget).
    fn has_json_body(method: &Method, path: &str) -> bool {
        *method == Method::POST && path != "/api/v1/blobs"
    }
}

/// Parses method, path, query and (JSON) body into a request, or the 102/104/110 error
/// the caller gets. Pure: the fuzz target `api_request` drives it with arbitrary input.
pub fn parse(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<ApiRequest, CommandError> {
    fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, CommandError> {
        serde_json::from_slice(body).map_err(|e| bad_request(format!("bad JSON: {e}")))
    }
    match (method, path) {
        (&Method::POST, "/api/v1/publish") => Ok(ApiRequest::Publish(json(body)?)),
        (&Method::POST, "/api/v1/broadcast") => {
            let req: BroadcastRequest = json(body)?;
            if req.channels.is_empty() || req.channels.len() > 1000 {
                return Err(bad_request("channels must list 1 to 1000 channels"));
            }
            let data = base64::engine::general_purpose::STANDARD
                .decode(&req.data)
                .map_err(|e| bad_request(format!("data is not base64: {e}")))?;
            Ok(ApiRequest::Broadcast {
                channels: req.channels,
                publish: Publish {
                    channel: String::new(),
                    data: Bytes::from(data),
                    content_type: req.content_type,
                    idempotency_key: req.idempotency_key,
                    blobs: req.blobs,
                },
            })
        }
        (&Method::POST, "/api/v1/disconnect") => {
            let req: DisconnectRequest = json(body)?;
            if req.user.is_empty() {
                return Err(bad_request("user must not be empty"));
            }
            Ok(ApiRequest::Disconnect { user: req.user })
        }
        (&Method::POST, "/api/v1/blobs") => {
            let name = h::query_param(query, "channel")
                .ok_or_else(|| bad_request("channel is required"))?;
            let channel = h::percent_decode(name).map_err(bad_param)?;
            Ok(ApiRequest::UploadBlob { channel })
        }
        (&Method::GET, "/api/v1/nodes") => Ok(ApiRequest::Nodes),
        (&Method::GET, p) => {
            const CHANNELS: &str = "/api/v1/channels/";
            if let Some(name) = h::path_segment(p, CHANNELS, "/history") {
                let channel = h::percent_decode(name).map_err(bad_param)?;
                let since_offset = h::query_u64(query, "since_offset")
                    .map_err(bad_param)?
                    .unwrap_or(0);
                let limit = h::query_u64(query, "limit")
                    .map_err(bad_param)?
                    .unwrap_or(0);
                let limit = u32::try_from(limit).map_err(|_| bad_request("limit too large"))?;
                Ok(ApiRequest::History {
                    channel,
                    since_offset,
                    limit,
                })
            } else if let Some(name) = h::path_segment(p, CHANNELS, "/presence") {
                let channel = h::percent_decode(name).map_err(bad_param)?;
                Ok(ApiRequest::Presence { channel })
            } else {
                Err(bad_request("no such API route"))
            }
        }
        _ => Err(bad_request("no such API route")),
    }
}

async fn dispatch(node: &Node, req: Request<Incoming>) -> Result<Response<Body>, CommandError> {
    authorized(node, &req)?;
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    let (request, req) = if ApiRequest::has_json_body(&method, &path) {
        let body = read_body(node, req).await?;
        (parse(&method, &path, query, &body)?, None)
    } else {
        (parse(&method, &path, query, &[])?, Some(req))
    };
    match request {
        ApiRequest::Publish(publish) => {
            let (channel, options) = node.channels.resolve(&publish.channel)?;
            let position = publish_one(node, &channel, &options, publish).await?;
            Ok(ok(&PublishResult {
                offset: position.offset,
                epoch: position.epoch,
            }))
        }
        ApiRequest::UploadBlob { channel } => match req {
            Some(req) => upload_blob(node, req, &channel).await,
            None => Err(bad_request("no such API route")),
        },
        ApiRequest::Broadcast { channels, publish } => broadcast(node, channels, publish).await,
        ApiRequest::Disconnect { user } => {
            node.broker().disconnect_user(&user).await?;
            Ok(ok(&serde_json::json!({})))
        }
        ApiRequest::Nodes => {
            let nodes = node.broker().nodes(&node.info()).await?;
            Ok(ok(&serde_json::json!({ "nodes": nodes })))
        }
        ApiRequest::History {
            channel,
            since_offset,
            limit,
        } => {
            let (channel, options) = node.channels.resolve(&channel)?;
            let (page, _permit) = node
                .channels
                .history(&channel, &options, since_offset, Limit::Page(limit))
                .await?;
            Ok(ok(&HistoryResult {
                epoch: page.position.epoch,
                offset: page.position.offset,
                publications: page.publications,
            }))
        }
        ApiRequest::Presence { channel } => {
            let (channel, options) = node.channels.resolve(&channel)?;
            let (clients, truncated) = node.channels.presence(&channel, &options).await?;
            Ok(ok(&PresenceResult { clients, truncated }))
        }
    }
}

async fn read_body(node: &Node, req: Request<Incoming>) -> Result<Bytes, CommandError> {
    read_body_up_to(req, node.config.api.body_bytes).await
}

async fn read_body_up_to(req: Request<Incoming>, limit: usize) -> Result<Bytes, CommandError> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(CommandError::new(
            ErrorCode::MessageTooLarge,
            format!("request body over {limit} bytes"),
        )),
        Err(e) => Err(bad_request(format!("reading body: {e}"))),
    }
}

async fn publish_one(
    node: &Node,
    channel: &ChannelName,
    options: &NamespaceOptions,
    publish: Publish,
) -> Result<crate::broker::Position, CommandError> {
    node.channels
        .publish(
            channel,
            options,
            publish_request(publish),
            Publisher::Backend,
        )
        .await
}

fn publish_request(publish: Publish) -> PublishRequest {
    PublishRequest {
        data: publish.data,
        content_type: publish.content_type,
        idempotency_key: publish.idempotency_key,
        info: None,
        blobs: publish.blobs,
    }
}

/// Publishes of one broadcast under way at once.
const BROADCAST_WINDOW: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectRequest {
    user: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BroadcastRequest {
    channels: Vec<String>,
    #[serde(default)]
    data: String,
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    idempotency_key: String,
    #[serde(default)]
    blobs: Vec<broker_proto::v1::BlobRef>,
}

#[derive(Serialize)]
struct BroadcastResponse<'a> {
    responses: Vec<BroadcastItem<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum BroadcastItem<'a> {
    Ok {
        channel: String,
        offset: String,
        epoch: String,
    },
    Err {
        channel: String,
        error: WireError<'a>,
    },
}

/// Publishes one payload to many channels; each channel succeeds or fails on its own.
async fn broadcast(
    node: &Node,
    channels: Vec<String>,
    template: Publish,
) -> Result<Response<Body>, CommandError> {
    let mut results = Vec::with_capacity(channels.len());
    // Up to BROADCAST_WINDOW publishes under way at once (one batched script call where
    // the broker batches), so a broadcast costs a few round trips, not one per channel,
    // and holds a bounded number of payload copies.
    for window in channels.chunks(BROADCAST_WINDOW) {
        let mut pending = Vec::with_capacity(window.len());
        for name in window {
            let publish = Publish {
                channel: name.clone(),
                ..template.clone()
            };
            let started = node.channels.resolve(name).and_then(|(channel, options)| {
                let request = publish_request(publish);
                let started =
                    node.channels
                        .start_publish(&channel, &options, request, Publisher::Backend)?;
                Ok((channel, options, started))
            });
            let result: futures_util::future::BoxFuture<'_, _> = match started {
                Err(e) => Box::pin(std::future::ready(Err(e))),
                Ok((_, _, Started::Pending(p))) => p,
                Ok((channel, options, Started::InPlace(request))) => {
                    // Blobs: checked and published in place, in channel order.
                    let r = node
                        .channels
                        .publish(&channel, &options, request, Publisher::Backend)
                        .await;
                    Box::pin(std::future::ready(r))
                }
            };
            pending.push(result);
        }
        for (name, result) in window
            .iter()
            .zip(futures_util::future::join_all(pending).await)
        {
            results.push((name.clone(), result));
        }
    }
    let responses = results
        .iter()
        .map(|(channel, r)| match r {
            Ok(p) => BroadcastItem::Ok {
                channel: channel.clone(),
                offset: p.offset.to_string(),
                epoch: p.epoch.clone(),
            },
            Err(e) => BroadcastItem::Err {
                channel: channel.clone(),
                error: WireError {
                    code: e.code.code(),
                    message: &e.message,
                    temporary: e.code.temporary(),
                },
            },
        })
        .collect();
    Ok(ok(&BroadcastResponse { responses }))
}

/// `POST /api/v1/blobs?channel=C` with the image as the raw body and its `Content-Type`:
/// checked like an upload over the WebSocket, stored, answered 201 `{"blob": BlobRef}`.
async fn upload_blob(
    node: &Node,
    req: Request<Incoming>,
    name: &str,
) -> Result<Response<Body>, CommandError> {
    use crate::blobs::{BlobId, BlobMeta, check_type, dimensions};
    let (channel, options) = node.channels.resolve(name)?;
    let claimed = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let config = node.channels.blob_config().clone();
    let limit = usize::try_from(config.max_bytes).unwrap_or(usize::MAX);
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > config.max_bytes) {
        return Err(CommandError::new(
            ErrorCode::MessageTooLarge,
            format!("blob of {len} bytes exceeds the limit"),
        ));
    }
    // The body is held in memory like a WebSocket upload: from the same node budget.
    let held = declared.map_or(limit, |len| len as usize);
    let _held = node.sessions.upload_budget.reserve(held).ok_or_else(|| {
        CommandError::new(ErrorCode::LimitExceeded, "the node's upload memory is full")
    })?;
    let bytes = read_body_up_to(req, limit).await?;
    if bytes.is_empty() {
        return Err(CommandError::new(ErrorCode::BadUpload, "empty body"));
    }
    let allowed = node.channels.blob_types(&options);
    let kind = check_type(&bytes, &claimed, allowed)
        .map_err(|e| CommandError::new(ErrorCode::BlobTypeNotAllowed, e.to_string()))?;
    let id = BlobId::of(&bytes);
    let (width, height) = dimensions(&bytes).unwrap_or((0, 0));
    let meta = BlobMeta {
        size: bytes.len() as u64,
        content_type: kind.mime().to_owned(),
        width,
        height,
    };
    node.broker()
        .blobs()
        .put(&id, &meta, bytes, config.ttl, channel.as_str())
        .await
        .inspect_err(|_| metrics::broker_error("blob"))?;
    metrics::blob_upload("completed");
    metrics::blob_bytes_stored(meta.size);
    let url = node
        .hub
        .blob_urls()
        .sign(id.as_str(), channel.as_str(), node.clock.unix_secs())
        .unwrap_or_default();
    let blob = broker_proto::v1::BlobRef {
        id: id.to_string(),
        size: meta.size,
        content_type: meta.content_type,
        url,
        name: String::new(),
        width,
        height,
    };
    let body = serde_json::to_vec(&serde_json::json!({ "blob": blob }))
        .map_err(|e| CommandError::new(ErrorCode::Internal, e.to_string()))?;
    Ok(h::json(StatusCode::CREATED, body))
}

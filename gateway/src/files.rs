//! `GET`/`HEAD /blobs/{id}?channel=C&expires=UNIX_S&sig=…` on any node: the bytes of a
//! stored image behind a signed, expiring URL, so `<img src>` works and caches (the bytes
//! behind an id never change). Conditional requests (`If-None-Match` → 304) and single
//! byte ranges (`Range` → 206, 416 when unsatisfiable) are served; a bad or expired
//! signature is 403, an unknown or expired blob 404.

use crate::{
    blobs::{BlobId, signing::SigError},
    broker::blobs::Access,
    error::CommandError,
    http::{self as h, Body},
    metrics,
    node::Node,
};
use broker_proto::ErrorCode;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

fn error(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": {"code": code.code(), "message": message, "temporary": code.temporary()}
    });
    h::json(status, body.to_string().into_bytes())
}

/// A `Range` that no byte of the body satisfies (416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A single byte range of a `size`-byte body: `bytes=a-b`, `bytes=a-`, `bytes=-n`.
/// `Ok(None)`: serve it whole (no or unusable header).
pub fn byte_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // several ranges: the whole body is a valid answer
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(start), Some(end)) if start <= end => (start, end.min(size.saturating_sub(1))),
        (Some(start), None) if b.is_empty() => (start, size.saturating_sub(1)),
        (None, Some(n)) if a.is_empty() && n > 0 => {
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        // An empty suffix selects nothing (RFC 9110 14.1.1).
        (None, Some(0)) if a.is_empty() => return Err(Unsatisfiable),
        _ => return Ok(None),
    };
    if size == 0 || start >= size {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

pub async fn serve(
    node: &Node,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        return h::text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n");
    }
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            ErrorCode::BlobNotFound,
            "no such blob",
        )
    };
    let Some(id) = path
        .strip_prefix("/blobs/")
        .and_then(|id| BlobId::parse(id).ok())
    else {
        return not_found();
    };
    let forbidden = |why: &str| error(StatusCode::FORBIDDEN, ErrorCode::PermissionDenied, why);
    let channel = h::query_param(query, "channel").and_then(|c| h::percent_decode(c).ok());
    let expires = h::query_u64(query, "expires").ok().flatten();
    let sig = h::query_param(query, "sig");
    let (Some(channel), Some(expires), Some(sig)) = (channel, expires, sig) else {
        return forbidden("a blob URL needs channel, expires and sig");
    };
    let now = node.clock.unix_secs();
    match node
        .hub
        .blob_urls()
        .verify(id.as_str(), &channel, expires, sig, now)
    {
        Ok(()) => {}
        Err(SigError::Expired) => return forbidden("the URL has expired"),
        Err(SigError::Invalid) => return forbidden("the signature is not valid"),
        Err(SigError::NoKey) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::BrokerUnavailable,
                "not ready",
            );
        }
    }
    let store = node.broker().blobs();
    let meta = match store.meta(&id, Access::Signed, None).await {
        Ok(Some(meta)) => meta,
        Ok(None) => return not_found(),
        Err(e) => return api_error(e.into()),
    };
    let etag = format!("\"{id}\"");
    let mut response = Response::new(h::full(Bytes::new()));
    let hs = response.headers_mut();
    let set = |hs: &mut HeaderMap, name: header::HeaderName, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            hs.insert(name, v);
        }
    };
    set(hs, header::ETAG, etag.clone());
    set(
        hs,
        header::CACHE_CONTROL,
        format!(
            "private, max-age={}, immutable",
            expires.saturating_sub(now)
        ),
    );
    hs.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    hs.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if etag_matches(headers, &etag) {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return response;
    }
    set(hs, header::CONTENT_TYPE, meta.content_type.clone());
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, len) = match byte_range(range, meta.size) {
        Ok(None) => (StatusCode::OK, 0, meta.size),
        Ok(Some((start, end))) => {
            set(
                hs,
                header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{}", meta.size),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Err(Unsatisfiable) => {
            set(hs, header::CONTENT_RANGE, format!("bytes */{}", meta.size));
            *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            return response;
        }
    };
    set(hs, header::CONTENT_LENGTH, len.to_string());
    *response.status_mut() = status;
    if method == Method::HEAD {
        return response;
    }
    match store.read(&id, start, len).await {
        Ok(Some(bytes)) if bytes.len() as u64 == len => {
            metrics::blob_bytes_served("http", len);
            *response.body_mut() = h::full(bytes);
            response
        }
        Ok(_) => not_found(),
        Err(e) => api_error(e.into()),
    }
}

fn api_error(e: CommandError) -> Response<Body> {
    let status = match e.code {
        ErrorCode::BrokerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.code, &e.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_single_byte_ranges() {
        assert_eq!(byte_range(None, 10), Ok(None));
        assert_eq!(byte_range(Some("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(byte_range(Some("bytes=4-"), 10), Ok(Some((4, 9))));
        assert_eq!(byte_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(byte_range(Some("bytes=5-100"), 10), Ok(Some((5, 9))));
        assert_eq!(byte_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(byte_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(byte_range(Some("bytes=5-2"), 10), Ok(None));
        assert_eq!(byte_range(Some("bytes=-0"), 10), Err(Unsatisfiable));
        assert_eq!(byte_range(Some("items=0-1"), 10), Ok(None));
    }
}

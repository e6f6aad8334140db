//! Small HTTP helpers shared by the transport (health, metrics, pages, upgrade) and the API:
//! the response body type, response builders, query parameters and path segments.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use std::convert::Infallible;

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

/// A response with `status`, `body` and a `Content-Type`.
pub fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    response(status, "text/plain; charset=utf-8", body)
}

pub fn json(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    response(status, "application/json", body)
}

/// The raw value of `name` in a query string (`a=1&b=2`), if present.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("{0} must be a non-negative integer")]
    NotANumber(String),
    #[error("bad percent-escape")]
    Escape,
    #[error("not UTF-8")]
    Utf8,
}

/// A non-negative integer query parameter; absent or empty is `None`.
pub fn query_u64(query: Option<&str>, name: &str) -> Result<Option<u64>, ParamError> {
    match query_param(query, name) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ParamError::NotANumber(name.to_owned())),
    }
}

/// Decodes `%XX` escapes in a path segment (`#` in a channel name arrives as `%23`).
pub fn percent_decode(s: &str) -> Result<String, ParamError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or(ParamError::Escape)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ParamError::Utf8)
}

/// The segment between `prefix` and `suffix` of `path`, e.g. the channel in
/// `/api/v1/channels/{channel}/history`.
pub fn path_segment<'a>(path: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix)?
        .strip_suffix(suffix)
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("chat:%23alice").unwrap(), "chat:#alice");
        assert_eq!(percent_decode("a/b").unwrap(), "a/b");
        assert_eq!(percent_decode("%2"), Err(ParamError::Escape));
        assert_eq!(percent_decode("%zz"), Err(ParamError::Escape));
        assert_eq!(percent_decode("%ff"), Err(ParamError::Utf8));
    }

    #[test]
    fn reads_query_parameters_and_path_segments() {
        let q = Some("since_offset=5&limit=&x=a");
        assert_eq!(query_u64(q, "since_offset"), Ok(Some(5)));
        assert_eq!(query_u64(q, "limit"), Ok(None));
        assert_eq!(query_u64(q, "missing"), Ok(None));
        assert!(query_u64(q, "x").is_err());
        assert_eq!(query_param(None, "x"), None);
        let p = "/api/v1/channels/chat:room/history";
        assert_eq!(
            path_segment(p, "/api/v1/channels/", "/history"),
            Some("chat:room")
        );
        assert_eq!(path_segment(p, "/api/v1/channels/", "/presence"), None);
        assert_eq!(
            path_segment("/api/v1/channels//history", "/api/v1/channels/", "/history"),
            None
        );
    }
}

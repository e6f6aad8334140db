//! Request/reply with a backend: a client's `Rpc` is POSTed by the node that holds the
//! client to `{rpc.url}/{method}` with the request's bytes, their content type and who
//! asks (`X-Gateway-User`, `X-Gateway-Client`), over a pooled HTTP/1.1 client
//! (hyper-util's), and a 2xx answer comes back as `RpcResult`, binary. Nothing crosses
//! nodes. Failures are error 114, temporary when the backend timed out, was unreachable
//! or answered 5xx, not for 4xx; no `rpc.url` is 104.

use crate::{config::RpcConfig, error::CommandError, metrics};
use broker_proto::v1::RpcResult;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use std::time::{Duration, Instant};

pub struct RpcClient {
    config: RpcConfig,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// One call: what the client asked and who it is.
pub struct Call<'a> {
    pub method: &'a str,
    pub data: Bytes,
    pub content_type: &'a str,
    pub user: &'a str,
    pub client: &'a str,
}

/// A method name: `[A-Za-z0-9_.-]`, 1–128 bytes, not only dots (it becomes a URL path
/// segment).
pub fn valid_method(method: &str) -> bool {
    (1..=128).contains(&method.len())
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        // `.` and `..` are path segments a proxy or framework would resolve.
        && method.bytes().any(|b| b != b'.')
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| {
        let encoded = crate::blobs::signing::encode_component(s);
        HeaderValue::from_str(&encoded).unwrap_or(HeaderValue::from_static(""))
    })
}

impl RpcClient {
    pub fn new(config: RpcConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { config, client }
    }

    pub fn max_in_flight(&self) -> usize {
        self.config.max_in_flight
    }

    pub async fn call(&self, call: Call<'_>) -> Result<RpcResult, CommandError> {
        let Some(base) = &self.config.url else {
            return Err(CommandError::bad_request("no rpc.url is configured"));
        };
        if !valid_method(call.method) {
            return Err(CommandError::bad_request(
                "rpc method must be 1-128 bytes of [A-Za-z0-9_.-]",
            ));
        }
        let content_type = if call.content_type.is_empty() {
            "application/octet-stream"
        } else {
            call.content_type
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{base}/{}", call.method))
            .header(header::CONTENT_TYPE, header_value(content_type))
            .header("x-gateway-user", header_value(call.user))
            .header("x-gateway-client", header_value(call.client))
            .body(Full::new(call.data))
            .map_err(|e| CommandError::bad_request(format!("rpc request: {e}")))?;
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.timeout, self.send(request)).await;
        let (outcome, result) = match result {
            Err(_) => (
                "timeout",
                Err(CommandError::backend("backend timed out", true)),
            ),
            Ok(r) => r,
        };
        metrics::rpc(started.elapsed(), outcome);
        result
    }

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> (&'static str, Result<RpcResult, CommandError>) {
        let response = match self.client.request(request).await {
            Ok(r) => r,
            Err(e) => {
                return (
                    "unreachable",
                    Err(CommandError::backend(
                        format!("backend unreachable: {e}"),
                        true,
                    )),
                );
            }
        };
        let status = response.status();
        if !status.is_success() {
            let (outcome, temporary) = if status.is_server_error() {
                ("server_error", true)
            } else {
                ("client_error", false)
            };
            return (
                outcome,
                Err(CommandError::backend(
                    format!("backend answered {status}"),
                    temporary,
                )),
            );
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        let body = Limited::new(response.into_body(), self.config.max_response_bytes);
        match body.collect().await {
            Ok(collected) => (
                "ok",
                Ok(RpcResult {
                    data: collected.to_bytes(),
                    content_type,
                }),
            ),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => (
                "too_large",
                Err(CommandError::backend(
                    format!(
                        "backend answer over {} bytes",
                        self.config.max_response_bytes
                    ),
                    false,
                )),
            ),
            Err(e) => (
                "unreachable",
                Err(CommandError::backend(
                    format!("reading the backend's answer: {e}"),
                    true,
                )),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_are_path_segments() {
        assert!(valid_method("volume.slice"));
        assert!(valid_method("a-b_c.1"));
        assert!(!valid_method(""));
        assert!(!valid_method("../admin"));
        assert!(!valid_method("a/b"));
        assert!(!valid_method(".."));
        assert!(!valid_method("."));
        assert!(valid_method("..a"));
        assert!(!valid_method(&"a".repeat(129)));
    }
}

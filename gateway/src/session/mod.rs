//! One session per WebSocket. The protocol lives in [`core::SessionCore`] (state, commands,
//! the delivery rule), which knows no socket; [`connection`] moves bytes and time between
//! it and the WebSocket ([`crate::ws`]). The hub reaches a session only through its outbox.
//!
//! Every server-initiated close sends a `Disconnect` frame first, then a close frame with
//! the same code (DESIGN.md, close codes).

mod commands;
pub mod connection;
pub mod context;
pub mod core;
mod media;
mod pipeline;
mod rate;
pub mod subscriptions;
#[cfg(test)]
mod tests;

pub use context::Context;

use crate::{auth::AuthError, metrics::Metrics, ws::WebSocket};
use broker_proto::{CloseCode, Encoding};
use connection::Exit;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// What the transport learned at upgrade time.
pub struct Params {
    pub encoding: Encoding,
    /// The token given at upgrade (query `token` or `Authorization: Bearer`), verified
    /// here (a JWKS fetch may be needed) before the session starts.
    pub token: Option<String>,
    /// Set when the upgrade is refused with a close code (origin, capacity): the session
    /// only says so and ends.
    pub reject: Option<CloseCode>,
    /// The client's address (after trusted proxies), for log lines.
    pub peer: std::net::IpAddr,
    /// The socket, when it is plain TCP: the hub may write publications to it directly
    /// while the session is parked (the outbox's express lane).
    pub fd: Option<std::os::fd::RawFd>,
}

/// Takes the socket back from the hub before it is closed, however the session ends.
struct ForgetSocket(Arc<crate::hub::outbox::Outbox>);

impl Drop for ForgetSocket {
    fn drop(&mut self) {
        self.0.forget_socket();
    }
}

/// Runs a session to its end. The caller has completed the WebSocket upgrade.
///
/// Not an `async fn`: its arguments would be kept twice in the future (as arguments and
/// as the body's locals, rust-lang/rust#62958), and every idle connection would pay for
/// the copy; the `async move` block uses them where they are.
#[allow(clippy::manual_async_fn)]
pub fn run<'a, S>(
    ctx: Arc<Context>,
    mut ws: WebSocket<S>,
    mut params: Params,
    metrics: &'a Metrics,
) -> impl std::future::Future<Output = ()> + Send + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'a,
{
    async move {
        // Boxed: the token check (a JWKS fetch, maybe) and the start are live only at the
        // beginning, and every idle connection would pay for their state otherwise. The
        // token goes with it, once verified.
        let (mut core, refused) = Box::pin(open(
            ctx,
            params.encoding,
            params.reject,
            params.token.take(),
        ))
        .await;
        // Declared after `ws` (a parameter), so dropped before it closes the socket.
        let _forget = params.fd.map(|fd| {
            core.outbox()
                .set_socket(fd, params.encoding == Encoding::Json);
            ForgetSocket(core.outbox().clone())
        });
        tracing::debug!(client = %core.client_id(), peer = %params.peer, "session started");
        let exit = match refused {
            Some(code) => Exit::Close(code),
            None => connection::serve(&mut core, &mut ws, metrics).await,
        };
        let code = match &exit {
            Exit::Close(code) => code.code(),
            Exit::Gone => 0,
        };
        core.outbox().forget_socket();
        tracing::debug!(client = %core.client_id(), peer = %params.peer, code, "session ended");
        Box::pin(core.end()).await;
        if let Exit::Close(code) = exit {
            Box::pin(connection::close(&mut core, &mut ws, code)).await;
        }
    }
}

/// Verifies the upgrade's token and starts the session; `Some` refuses it with that code.
async fn open(
    ctx: Arc<Context>,
    encoding: Encoding,
    reject: Option<CloseCode>,
    token: Option<String>,
) -> (core::SessionCore, Option<CloseCode>) {
    let verified = match (reject, token) {
        (None, Some(token)) if ctx.verifier.enabled() => Some(ctx.verifier.verify(&token).await),
        _ => None,
    };
    let refused = match (reject, &verified) {
        (Some(code), _) => Some(code),
        (None, Some(Err(AuthError::Invalid(_)))) => Some(CloseCode::TokenInvalid),
        (None, Some(Err(AuthError::Expired))) => Some(CloseCode::TokenExpired),
        _ => None,
    };
    let identity = verified.and_then(Result::ok);
    let now = ctx.clock.now();
    let mut core = core::SessionCore::new(ctx, encoding, identity, now);
    let refused = match refused {
        Some(code) => Some(code),
        None => core.start().await,
    };
    (core, refused)
}

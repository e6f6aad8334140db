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
use futures_util::FutureExt;
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
    /// The node's capacity slots this connection holds, released when the session ends.
    pub slots: Slots,
}

/// A socket slot (`max_connections`) and an address slot (`max_connections_per_ip`).
pub type Slots = (
    Option<crate::peers::SocketSlot>,
    Option<crate::peers::AddressSlot>,
);

/// Takes the socket back from the hub before it is closed, however the session ends.
struct ForgetSocket(Arc<crate::hub::outbox::Outbox>);

impl Drop for ForgetSocket {
    fn drop(&mut self) {
        self.0.forget_socket();
    }
}

/// Runs a session to its end. The caller has completed the WebSocket upgrade.
///
/// Built from two futures chained with `then` rather than one `async` body: the opening
/// (token check, a JWKS fetch maybe, and the start) is boxed and gone once done, and what
/// only it needs (the token, the context handle) is not kept beside the live session.
/// rustc keeps an `async` body's arguments for its whole life even once moved out
/// (rust-lang/rust#62958), and every idle connection would pay for them.
pub fn run<S, M>(
    ctx: Arc<Context>,
    ws: WebSocket<S>,
    params: Params,
    metrics: M,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    M: std::ops::Deref<Target = Metrics> + Send,
{
    let Params {
        encoding,
        token,
        reject,
        peer,
        fd,
        slots,
    } = params;
    Box::pin(open(ctx, encoding, reject, token, peer)).then(move |(core, refused)| {
        live(
            core,
            ws,
            Live {
                refused,
                fd,
                _slots: slots,
            },
            metrics,
        )
    })
}

/// What the live session keeps of its start besides the core and the socket.
struct Live {
    refused: Option<CloseCode>,
    fd: Option<std::os::fd::RawFd>,
    /// Held until the session ends.
    _slots: Slots,
}

/// The session once opened: serves it, leaves everything, closes. Uses its arguments in
/// place (never moved into locals, which would keep them twice).
#[allow(clippy::manual_async_fn)]
fn live<S, M>(
    mut core: core::SessionCore,
    mut ws: WebSocket<S>,
    start: Live,
    metrics: M,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    M: std::ops::Deref<Target = Metrics> + Send,
{
    async move {
        // The whole of `start` is moved in, slots included (a block that named only some
        // of its fields would capture only those, and the slots would be let go now).
        let start = &start;
        let encoding = core.encoding();
        // Declared after `ws`, so dropped before it closes the socket.
        let _forget = start.fd.map(|fd| {
            core.outbox().set_socket(fd, encoding == Encoding::Json);
            ForgetSocket(core.outbox().clone())
        });
        let exit = match start.refused {
            Some(code) => Exit::Close(code),
            None => connection::serve(&mut core, &mut ws, &metrics).await,
        };
        let code = match &exit {
            Exit::Close(code) => code.code(),
            Exit::Gone => 0,
        };
        core.outbox().forget_socket();
        tracing::debug!(client = %core.client_id(), code, "session ended");
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
    peer: std::net::IpAddr,
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
    ctx.start_sweep();
    let identity = verified.and_then(Result::ok);
    let now = ctx.clock.now();
    let mut core = core::SessionCore::new(ctx, encoding, identity, now);
    // The peer is logged here only, not kept for the session's end (its client id is).
    tracing::debug!(client = %core.client_id(), %peer, "session started");
    let refused = match refused {
        Some(code) => Some(code),
        None => core.start().await,
    };
    (core, refused)
}

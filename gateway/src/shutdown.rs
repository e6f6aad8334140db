//! SIGTERM handling. The first signal drains: readiness fails at once, new WebSockets are refused,
//! and connected clients get 1012 in batches spread over the drain period, so they do not
//! all reconnect to the remaining nodes in the same instant. A second signal exits now.

use crate::node::Node;
use broker_proto::CloseCode;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

/// How often a drain closes its next batch.
const DRAIN_STEP: Duration = Duration::from_millis(100);

pub async fn wait_for_signal() {
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // From now on a second signal ends the process at once.
    tokio::spawn(async {
        wait_again().await;
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(130);
    });
}

async fn wait_again() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Closes every session with 1012, spread over `period`, and waits for them to finish.
pub async fn drain(node: &Node, period: Duration) {
    let total = node.connection_count();
    let steps = (period.as_millis() / DRAIN_STEP.as_millis()).max(1) as usize;
    let per_step = total.div_ceil(steps).max(1);
    let deadline = tokio::time::Instant::now() + period + Duration::from_secs(2);
    while node.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        node.hub.close_sessions(CloseCode::Draining, per_step);
        tokio::time::sleep(DRAIN_STEP).await;
    }
}

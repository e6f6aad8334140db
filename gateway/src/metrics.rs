//! Prometheus metrics. Hot-path counters are registered once and kept as handles, so a
//! fan-out to ten thousand sessions costs one atomic add, not ten thousand registry
//! lookups. Process CPU and memory are read from the kernel at scrape time.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Publications per Redis script call (at most 256).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Latency buckets for every `_seconds` histogram: 50 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

#[derive(Clone)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_accepted: Counter,
    pub subscriptions: Gauge,
    pub channels: Gauge,
    pub deliveries: Counter,
    pub slow_consumer_drops: Counter,
    pub ws_messages_sent: Counter,
    pub ws_bytes_sent: Counter,
    pub broker_publish_seconds: Histogram,
}

impl Metrics {
    /// Installs the global recorder and registers every handle.
    pub fn install() -> (Self, PrometheusHandle) {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS)
            })
            .and_then(|b| b.install_recorder())
            .unwrap_or_else(|e| panic!("installing the metrics recorder: {e}"));
        (Self::registered(), handle)
    }

    fn registered() -> Self {
        Self {
            connections: gauge!("gateway_connections"),
            connections_accepted: counter!("gateway_connections_accepted_total"),
            subscriptions: gauge!("gateway_subscriptions"),
            channels: gauge!("gateway_channels"),
            deliveries: counter!("gateway_deliveries_total"),
            slow_consumer_drops: counter!("gateway_deliveries_dropped_total", "reason" => "slow_consumer"),
            ws_messages_sent: counter!("gateway_ws_messages_sent_total"),
            ws_bytes_sent: counter!("gateway_ws_bytes_sent_total"),
            broker_publish_seconds: histogram!("gateway_broker_publish_seconds"),
        }
    }

    /// Handles that record nothing, for tests of the hub and brokers.
    pub fn detached() -> Self {
        Self {
            connections: Gauge::noop(),
            connections_accepted: Counter::noop(),
            subscriptions: Gauge::noop(),
            channels: Gauge::noop(),
            deliveries: Counter::noop(),
            slow_consumer_drops: Counter::noop(),
            ws_messages_sent: Counter::noop(),
            ws_bytes_sent: Counter::noop(),
            broker_publish_seconds: Histogram::noop(),
        }
    }
}

pub fn command(name: &'static str) {
    counter!("gateway_commands_total", "command" => name).increment(1);
}

pub fn command_error(code: u32) {
    counter!("gateway_command_errors_total", "code" => code.to_string()).increment(1);
}

pub fn disconnect(code: u16) {
    counter!("gateway_disconnects_total", "code" => code.to_string()).increment(1);
}

pub fn rejected(reason: &'static str) {
    counter!("gateway_connections_rejected_total", "reason" => reason).increment(1);
}

pub fn recovery(recovered: bool) {
    let outcome = if recovered {
        "recovered"
    } else {
        "not_recovered"
    };
    counter!("gateway_recoveries_total", "outcome" => outcome).increment(1);
}

pub fn publication(source: &'static str) {
    counter!("gateway_publications_total", "source" => source).increment(1);
}

/// Publications in one Redis publish script call.
pub fn publish_batch(n: usize) {
    histogram!("gateway_broker_publish_batch_size").record(n as f64);
}

pub fn broker_error(op: &'static str) {
    counter!("gateway_broker_errors_total", "op" => op).increment(1);
}

pub fn api_request(route: &'static str, status: u16) {
    counter!("gateway_api_requests_total", "route" => route, "status" => status.to_string())
        .increment(1);
}

/// Renders the exposition text, with process metrics refreshed first.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    process_metrics(&mut text);
    text
}

/// User plus system CPU time of this process.
pub fn process_cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// Virtual and resident bytes of this process.
fn process_memory() -> Option<(u64, u64)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let mut fields = statm
        .split_whitespace()
        .map(|f| f.parse::<u64>().unwrap_or(0));
    Some((fields.next()? * page, fields.next()? * page))
}

pub fn process_resident_bytes() -> Option<u64> {
    process_memory().map(|(_, rss)| rss)
}

/// The standard `process_*` series, as the Prometheus client libraries name them.
fn process_metrics(out: &mut String) {
    use std::fmt::Write;
    if let Some(cpu) = process_cpu_seconds() {
        let _ = writeln!(
            out,
            "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}"
        );
    }
    if let Some((virt, rss)) = process_memory() {
        let _ = writeln!(
            out,
            "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
        );
        let _ = writeln!(
            out,
            "# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes {virt}"
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(
            out,
            "# TYPE process_open_fds gauge\nprocess_open_fds {}",
            dir.count()
        );
    }
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        let _ = writeln!(
            out,
            "# TYPE process_max_fds gauge\nprocess_max_fds {}",
            limit.rlim_cur
        );
    }
}

/// A stream read started to fill a gap (`gap`) or to catch up after a pub/sub reconnect.
pub fn repair(kind: &'static str) {
    counter!("gateway_redis_repairs_total", "kind" => kind).increment(1);
}

/// Publications a node could not deliver because the stream no longer had them.
pub fn history_gap(count: u64) {
    counter!("gateway_deliveries_dropped_total", "reason" => "history_gap").increment(count);
}

/// A channel's stream restarted under a new epoch; local subscribers were reset.
pub fn stream_reset() {
    counter!("gateway_stream_resets_total").increment(1);
}

/// A node saw a channel's stream go back under an unchanged epoch and rotated it.
pub fn stream_rollback() {
    counter!("gateway_stream_rollbacks_total").increment(1);
}

/// Publications the delivery tracker ignored: duplicates of delivered offsets, or
/// messages of an epoch the channel already left.
pub fn tracker_skip(reason: &'static str) {
    counter!("gateway_redis_skipped_total", "reason" => reason).increment(1);
}

/// Whether another live node shards over a different set of Redis servers.
pub fn layout_mismatch(mismatch: bool) {
    gauge!("gateway_redis_layout_mismatch").set(if mismatch { 1.0 } else { 0.0 });
}

/// A blob dropped from the embedded store: `lru` (room for a new one) or `ttl`.
pub fn blob_eviction(reason: &'static str) {
    counter!("gateway_blob_store_evictions_total", "reason" => reason).increment(1);
}

/// A blob left the per-node read cache: `lru` or `ttl`.
pub fn blob_cache_eviction(reason: &'static str) {
    counter!("gateway_blob_cache_evictions_total", "reason" => reason).increment(1);
}

/// A read of the per-node blob cache: `hit` or `miss` (one Redis read per concurrent miss).
pub fn blob_cache(result: &'static str) {
    counter!("gateway_blob_cache_total", "result" => result).increment(1);
}

/// Bytes the per-node blob read cache holds.
pub fn blob_cache_bytes(bytes: usize) {
    gauge!("gateway_blob_cache_bytes").set(bytes as f64);
}

/// Bytes the embedded blob store holds.
pub fn blob_store_bytes(bytes: usize) {
    gauge!("gateway_blob_store_bytes").set(bytes as f64);
}

/// An upload `started`, `completed`, found `known` (skipped), or `aborted`.
/// A TLS certificate reload: `ok` or `error` (the old certificate stays).
pub fn tls_reload(outcome: &'static str) {
    counter!("gateway_tls_reloads_total", "outcome" => outcome).increment(1);
}

/// An idempotency key forgotten before its time because its channel had too many.
pub fn idempotency_key_evicted() {
    counter!("gateway_idempotency_keys_evicted_total").increment(1);
}

pub fn blob_upload(outcome: &'static str) {
    counter!("gateway_blob_uploads_total", "outcome" => outcome).increment(1);
}

/// Bytes of unfinished uploads held in memory.
pub fn upload_bytes(bytes: usize) {
    gauge!("gateway_blob_upload_bytes").set(bytes as f64);
}

pub fn blob_bytes_stored(bytes: u64) {
    counter!("gateway_blob_bytes_stored_total").increment(bytes);
}

/// Blob bytes sent to clients, over the WebSocket (`ws`) or plain HTTP (`http`).
pub fn blob_bytes_served(via: &'static str, bytes: u64) {
    counter!("gateway_blob_bytes_served_total", "via" => via).increment(bytes);
}

/// One RPC call: its latency and outcome (`ok`, `client_error`, `server_error`,
/// `timeout`, `unreachable`, `too_large`).
pub fn rpc(took: std::time::Duration, outcome: &'static str) {
    histogram!("gateway_rpc_seconds").record(took.as_secs_f64());
    counter!("gateway_rpc_calls_total", "outcome" => outcome).increment(1);
}

/// One presence refresh and expiry pass over this node's entries.
pub fn presence_upkeep(took: std::time::Duration) {
    histogram!("gateway_presence_upkeep_seconds").record(took.as_secs_f64());
}

pub fn pubsub_reconnect() {
    counter!("gateway_redis_pubsub_reconnects_total").increment(1);
}

/// A JWKS fetch: `ok` or `error` (the keys held stay in use).
pub fn jwks_fetch(outcome: &'static str) {
    counter!("gateway_jwks_fetches_total", "outcome" => outcome).increment(1);
}

/// A history read (request or recovery) that waited for a permit
/// (`history_reads_per_node` were running).
pub fn history_read_waited() {
    counter!("gateway_history_reads_waited_total").increment(1);
}

/// History reads running now.
pub fn history_reads_in_flight(n: usize) {
    gauge!("gateway_history_reads_in_flight").set(n as f64);
}

/// A presence reply cut to `max_presence_clients`.
pub fn presence_truncated() {
    counter!("gateway_presence_truncated_total").increment(1);
}

/// Time a connection's reads were paused by its `bytes_per_second` limit.
pub fn read_throttled(took: std::time::Duration) {
    counter!("gateway_read_throttled_microseconds_total").increment(took.as_micros() as u64);
}

/// 1 while `/readyz` answers 200 (scraped with the rest).
pub fn ready(ready: bool) {
    gauge!("gateway_ready").set(if ready { 1.0 } else { 0.0 });
}

/// The configured limits alerts compare usage with: sockets per node, the upload budget
/// and the embedded blob store's size.
pub fn limits(max_connections: usize, upload_budget_bytes: usize, blob_store_bytes: usize) {
    gauge!("gateway_max_connections").set(max_connections as f64);
    gauge!("gateway_blob_upload_budget_bytes").set(upload_budget_bytes as f64);
    gauge!("gateway_blob_store_limit_bytes").set(blob_store_bytes as f64);
}

/// A history read that joined an identical one already in flight (a reconnect storm).
pub fn history_read_merged() {
    counter!("gateway_history_reads_merged_total").increment(1);
}

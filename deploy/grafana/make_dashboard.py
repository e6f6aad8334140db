#!/usr/bin/env python3
"""Writes deploy/grafana/dashboards/gateway.json from the panel list below.

Every expression uses only metrics the gateway exports; scripts/check-deploy.sh checks
that against the metric names in the source. Rerun after editing the list.
"""
import json, os

DS = {"type": "prometheus", "uid": "prometheus"}

PANELS = [
    # (title, unit, [(expr, legend)])
    ("Connections", "short", [("sum by (instance) (gateway_connections)", "{{instance}}"),
                              ("sum(gateway_max_connections)", "max (all nodes)")]),
    ("Connections accepted / rejected per second", "ops", [
        ("sum by (instance) (rate(gateway_connections_accepted_total[$__rate_interval]))", "accepted {{instance}}"),
        ("sum by (reason) (rate(gateway_connections_rejected_total[$__rate_interval]))", "rejected: {{reason}}")]),
    ("Subscriptions and channels", "short", [("sum by (instance) (gateway_subscriptions)", "subscriptions {{instance}}"),
                                             ("sum by (instance) (gateway_channels)", "channels {{instance}}")]),
    ("Deliveries per second", "ops", [("sum by (instance) (rate(gateway_deliveries_total[$__rate_interval]))", "{{instance}}")]),
    ("WebSocket bytes sent per second", "Bps", [("sum by (instance) (rate(gateway_ws_bytes_sent_total[$__rate_interval]))", "{{instance}}")]),
    ("Publications per second", "ops", [("sum by (source) (rate(gateway_publications_total[$__rate_interval]))", "{{source}}")]),
    ("Broker publish latency", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(gateway_broker_publish_seconds_bucket[$__rate_interval])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(gateway_broker_publish_seconds_bucket[$__rate_interval])))", "p99")]),
    ("Commands per second", "ops", [("sum by (command) (rate(gateway_commands_total[$__rate_interval]))", "{{command}}")]),
    ("Command errors per second", "ops", [("sum by (code) (rate(gateway_command_errors_total[$__rate_interval]))", "{{code}}")]),
    ("Disconnects per second by close code", "ops", [("sum by (code) (rate(gateway_disconnects_total[$__rate_interval]))", "{{code}}")]),
    ("Dropped deliveries per second", "ops", [("sum by (reason) (rate(gateway_deliveries_dropped_total[$__rate_interval]))", "{{reason}}")]),
    ("Recoveries per second", "ops", [("sum by (outcome) (rate(gateway_recoveries_total[$__rate_interval]))", "{{outcome}}")]),
    ("Redis: errors, reconnects, repairs", "ops", [
        ("sum by (op) (rate(gateway_broker_errors_total[$__rate_interval]))", "error: {{op}}"),
        ("sum(rate(gateway_redis_pubsub_reconnects_total[$__rate_interval]))", "pub/sub reconnects"),
        ("sum by (kind) (rate(gateway_redis_repairs_total[$__rate_interval]))", "repair: {{kind}}"),
        ("sum(rate(gateway_stream_resets_total[$__rate_interval]))", "stream resets")]),
    ("RPC calls per second and p99", "ops", [
        ("sum by (outcome) (rate(gateway_rpc_calls_total[$__rate_interval]))", "{{outcome}}"),
        ("histogram_quantile(0.99, sum by (le) (rate(gateway_rpc_seconds_bucket[$__rate_interval])))", "p99 (s)")]),
    ("Uploads held vs budget", "bytes", [("sum by (instance) (gateway_blob_upload_bytes)", "held {{instance}}"),
                                         ("max(gateway_blob_upload_budget_bytes)", "budget per node")]),
    ("Blob store and cache", "bytes", [("sum by (instance) (gateway_blob_store_bytes)", "store {{instance}}"),
                                       ("sum by (instance) (gateway_blob_cache_bytes)", "cache {{instance}}")]),
    ("Blob bytes served per second", "Bps", [("sum by (via) (rate(gateway_blob_bytes_served_total[$__rate_interval]))", "{{via}}")]),
    ("History reads in flight", "short", [("sum by (instance) (gateway_history_reads_in_flight)", "{{instance}}"),
                                          ("sum(rate(gateway_history_reads_waited_total[$__rate_interval]))", "waited/s")]),
    ("API requests per second", "ops", [("sum by (route, status) (rate(gateway_api_requests_total[$__rate_interval]))", "{{route}} {{status}}")]),
    ("CPU (cores)", "short", [("rate(process_cpu_seconds_total{job=\"gateway\"}[$__rate_interval])", "{{instance}}")]),
    ("Resident memory", "bytes", [("process_resident_memory_bytes{job=\"gateway\"}", "{{instance}}")]),
    ("Ready", "short", [("gateway_ready", "{{instance}}")]),
]


def panel(i, title, unit, targets):
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + j)}
            for j, (expr, legend) in enumerate(targets)
        ],
    }


dashboard = {
    "uid": "gateway",
    "title": "Gateway",
    "tags": ["gateway", "websocket"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboards", "gateway.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")

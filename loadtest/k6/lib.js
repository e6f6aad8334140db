// Shared by the k6 scripts: the gateway's JSON encoding over k6/websockets, and the
// checks every scenario makes (gaps and duplicates in offsets are lost messages).
import { WebSocket } from "k6/experimental/websockets";
import { Counter, Trend } from "k6/metrics";
import encoding from "k6/encoding";

export const BASE = __ENV.GATEWAY_URL || "http://127.0.0.1:8000";
export const WS = BASE.replace(/^http/, "ws") + "/ws?format=json";
export const API_KEY = __ENV.API_KEY || "test-key";

export const delivered = new Counter("gateway_delivered");
export const lost = new Counter("gateway_lost");
export const duplicated = new Counter("gateway_duplicated");
export const errors = new Counter("gateway_errors");
export const latency = new Trend("gateway_delivery_ms", true);

/** A connection speaking the JSON encoding: `send(command)` numbers the frames. */
export function connect(onOpen, onFrame) {
  const ws = new WebSocket(WS);
  let id = 0;
  const api = {
    ws,
    send(command) {
      id += 1;
      ws.send(JSON.stringify({ id, ...command }));
      return id;
    },
  };
  ws.onopen = () => onOpen(api);
  ws.onmessage = (e) => {
    for (const line of String(e.data).split("\n")) {
      if (!line) continue;
      const frame = JSON.parse(line);
      if (frame.error) errors.add(1, { code: String(frame.error.code) });
      onFrame(api, frame);
    }
  };
  ws.onerror = () => errors.add(1, { code: "socket" });
  return api;
}

/** Tracks one channel's offsets: counts deliveries, gaps (lost) and repeats. */
export function tracker() {
  let last = null;
  return {
    start(offset) {
      last = Number(offset || 0);
    },
    seen(p) {
      const offset = Number(p.offset);
      if (last !== null) {
        if (offset <= last) duplicated.add(1);
        else if (offset > last + 1) lost.add(offset - last - 1);
      }
      last = Math.max(last ?? 0, offset);
      delivered.add(1);
      const sent = Number(JSON.parse(b64decode(p.data || "")).t || 0);
      if (sent) latency.add(Date.now() - sent);
    },
  };
}

/** Publication data is base64 in the JSON encoding; ours is a small JSON object. */
function b64decode(s) {
  if (!s) return "{}";
  return encoding.b64decode(s, "std", "s");
}

export function payload(extra) {
  return JSON.stringify({ t: Date.now(), ...extra });
}

export function b64(text) {
  return encoding.b64encode(text);
}

// Fan-out: SUBSCRIBERS connections on one channel, PUBLISH_RATE publications per second
// through the HTTP API, for DURATION. Thresholds: nothing lost or duplicated, delivery
// latency p99 under P99_MS, no errors.
//
//   k6 run -e GATEWAY_URL=http://127.0.0.1:8000 -e SUBSCRIBERS=1000 -e PUBLISH_RATE=50 \
//          -e DURATION=60s loadtest/k6/fanout.js
import http from "k6/http";
import { setTimeout } from "k6/timers";
import { BASE, API_KEY, connect, tracker, payload, b64, errors } from "./lib.js";

const SUBSCRIBERS = Number(__ENV.SUBSCRIBERS || 100);
const RATE = Number(__ENV.PUBLISH_RATE || 20);
const DURATION = __ENV.DURATION || "30s";
const HOLD_S = Number(__ENV.HOLD_S || parseDuration(DURATION) + 10);
const CHANNEL = __ENV.CHANNEL || "fanout";

export const options = {
  scenarios: {
    subscribers: {
      executor: "per-vu-iterations",
      vus: SUBSCRIBERS,
      iterations: 1,
      exec: "subscriber",
      maxDuration: `${HOLD_S + 30}s`,
    },
    publisher: {
      executor: "constant-arrival-rate",
      rate: RATE,
      timeUnit: "1s",
      duration: DURATION,
      startTime: "5s",
      preAllocatedVUs: 4,
      exec: "publisher",
    },
  },
  thresholds: {
    gateway_lost: ["count==0"],
    gateway_duplicated: ["count==0"],
    gateway_errors: ["count==0"],
    gateway_delivered: [`count>=${Math.floor(SUBSCRIBERS * RATE * parseDuration(DURATION) * 0.95)}`],
    gateway_delivery_ms: [`p(99)<${Number(__ENV.P99_MS || 250)}`],
    http_req_failed: ["rate==0"],
  },
};

export function subscriber() {
  const t = tracker();
  const c = connect(
    (c) => c.send({ subscribe: { channel: CHANNEL } }),
    (c, f) => {
      if (f.subscribe) t.start(f.subscribe.offset);
      if (f.publication) t.seen(f.publication);
    },
  );
  // The iteration lasts until the socket closes; callbacks run meanwhile.
  setTimeout(() => c.ws.close(), HOLD_S * 1000);
}

export function publisher() {
  const r = http.post(
    `${BASE}/api/v1/publish`,
    JSON.stringify({ channel: CHANNEL, data: b64(payload({})) }),
    { headers: { "X-API-Key": API_KEY, "Content-Type": "application/json" } },
  );
  if (r.status !== 200) errors.add(1, { code: `http ${r.status}` });
}

function parseDuration(d) {
  const m = String(d).match(/^(\d+)(ms|s|m)$/);
  if (!m) return 30;
  const n = Number(m[1]);
  return m[2] === "m" ? n * 60 : m[2] === "ms" ? n / 1000 : n;
}

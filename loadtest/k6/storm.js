// Reconnect storm: CLIENTS connections subscribe to CHANNELS channels and note their
// position; at STORM_AT_S every client drops its socket at once and reconnects with
// recovery, while PUBLISH_RATE publications per second keep coming through the API.
// Checks: every recovery succeeds, nothing lost or duplicated; reports the time from the
// drop to being recovered.
//
//   k6 run -e GATEWAY_URL=http://127.0.0.1:8000 -e CLIENTS=5000 loadtest/k6/storm.js
import exec from "k6/execution";
import http from "k6/http";
import { Counter, Trend } from "k6/metrics";
import { setTimeout } from "k6/timers";
import { BASE, API_KEY, connect, tracker, payload, b64, errors } from "./lib.js";

const CLIENTS = Number(__ENV.CLIENTS || 200);
const CHANNELS = Number(__ENV.CHANNELS || 20);
const STORM_AT_S = Number(__ENV.STORM_AT_S || 10);
const HOLD_S = Number(__ENV.HOLD_S || STORM_AT_S + 10);
const rehomed = new Trend("gateway_recovered_ms", true);
const notRecovered = new Counter("gateway_not_recovered");

export const options = {
  scenarios: {
    clients: { executor: "per-vu-iterations", vus: CLIENTS, iterations: 1, maxDuration: `${HOLD_S + 60}s` },
    publisher: {
      executor: "constant-arrival-rate",
      rate: Number(__ENV.PUBLISH_RATE || 20),
      timeUnit: "1s",
      duration: `${HOLD_S}s`,
      preAllocatedVUs: 4,
      exec: "publisher",
    },
  },
  thresholds: {
    gateway_lost: ["count==0"],
    gateway_duplicated: ["count==0"],
    gateway_not_recovered: ["count==0"],
    gateway_errors: ["count==0"],
    gateway_recovered_ms: [`p(99)<${Number(__ENV.P99_MS || 3000)}`],
  },
};

export default function () {
  const channel = `storm-${exec.vu.idInTest % CHANNELS}`;
  const t = tracker();
  let epoch = "";
  let offset = 0;
  const first = connect(
    (c) => c.send({ subscribe: { channel } }),
    (c, f) => {
      if (f.subscribe) {
        epoch = f.subscribe.epoch;
        offset = Number(f.subscribe.offset || 0);
        t.start(offset);
      }
      if (f.publication) {
        t.seen(f.publication);
        offset = Number(f.publication.offset);
      }
    },
  );
  setTimeout(() => {
    first.ws.close();
    const dropped = Date.now();
    const again = connect(
      (c) => c.send({ subscribe: { channel, recover: true, epoch, offset: String(offset) } }),
      (c, f) => {
        if (f.subscribe) {
          if (!f.subscribe.recovered) notRecovered.add(1);
          for (const p of f.subscribe.publications || []) t.seen(p);
          rehomed.add(Date.now() - dropped);
        }
        if (f.publication) t.seen(f.publication);
      },
    );
    setTimeout(() => again.ws.close(), (HOLD_S - STORM_AT_S) * 1000);
  }, STORM_AT_S * 1000);
}

export function publisher() {
  const channel = `storm-${Math.floor(Math.random() * CHANNELS)}`;
  const r = http.post(`${BASE}/api/v1/publish`, JSON.stringify({ channel, data: b64(payload({})) }), {
    headers: { "X-API-Key": API_KEY, "Content-Type": "application/json" },
  });
  if (r.status !== 200) errors.add(1, { code: `http ${r.status}` });
}

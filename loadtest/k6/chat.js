// Chat: USERS connections in ROOMS small rooms; each user subscribes to its room and
// publishes every INTERVAL_MS for DURATION_S; everyone checks the room's offsets.
//
//   k6 run -e GATEWAY_URL=http://127.0.0.1:8000 -e USERS=500 -e ROOMS=100 loadtest/k6/chat.js
import exec from "k6/execution";
import { setInterval, setTimeout, clearInterval } from "k6/timers";
import { connect, tracker, payload, b64 } from "./lib.js";

const USERS = Number(__ENV.USERS || 100);
const ROOMS = Number(__ENV.ROOMS || 20);
const INTERVAL_MS = Number(__ENV.INTERVAL_MS || 1000);
const DURATION_S = Number(__ENV.DURATION_S || 20);

export const options = {
  scenarios: {
    chat: { executor: "per-vu-iterations", vus: USERS, iterations: 1, maxDuration: `${DURATION_S + 30}s` },
  },
  thresholds: {
    gateway_lost: ["count==0"],
    gateway_duplicated: ["count==0"],
    gateway_errors: ["count==0"],
    gateway_delivery_ms: [`p(99)<${Number(__ENV.P99_MS || 250)}`],
  },
};

export default function () {
  const room = `chat:room-${exec.vu.idInTest % ROOMS}`;
  const t = tracker();
  let timer;
  const c = connect(
    (c) => c.send({ subscribe: { channel: room } }),
    (c, f) => {
      if (f.subscribe) {
        t.start(f.subscribe.offset);
        timer = setInterval(() => c.send({ publish: { channel: room, data: b64(payload({})) } }), INTERVAL_MS);
      }
      if (f.publication) t.seen(f.publication);
    },
  );
  setTimeout(() => {
    clearInterval(timer);
    // Let the last publications arrive before leaving.
    setTimeout(() => c.ws.close(), 2000);
  }, DURATION_S * 1000);
}

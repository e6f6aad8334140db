// Connection churn: VUS clients connect, subscribe, wait for the reply and disconnect, as
// fast as they can for DURATION. Measures connect-to-subscribed time.
//
//   k6 run -e GATEWAY_URL=http://127.0.0.1:8000 -e VUS=50 -e DURATION=30s loadtest/k6/churn.js
import exec from "k6/execution";
import { Trend } from "k6/metrics";
import { connect } from "./lib.js";

const subscribed = new Trend("gateway_subscribed_ms", true);

export const options = {
  scenarios: {
    churn: { executor: "constant-vus", vus: Number(__ENV.VUS || 20), duration: __ENV.DURATION || "20s" },
  },
  thresholds: {
    gateway_errors: ["count==0"],
    gateway_subscribed_ms: [`p(99)<${Number(__ENV.P99_MS || 500)}`],
  },
};

export default function () {
  const started = Date.now();
  const c = connect(
    (c) => c.send({ subscribe: { channel: `churn-${exec.vu.idInTest % 50}` } }),
    (c, f) => {
      if (f.subscribe) {
        subscribed.add(Date.now() - started);
        c.ws.close();
      }
    },
  );
}

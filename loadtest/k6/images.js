// Images: each iteration uploads a PNG through POST /api/v1/blobs (content-addressed: the
// same bytes are stored once), then fetches its signed URL and checks the bytes' size.
//
//   k6 run -e GATEWAY_URL=http://127.0.0.1:8000 -e RATE=20 -e DURATION=30s loadtest/k6/images.js
import http from "k6/http";
import { check } from "k6";
import { BASE, API_KEY, errors } from "./lib.js";

const png = open("../../gateway/web/screenshots/volume.png", "b");

export const options = {
  scenarios: {
    images: {
      executor: "constant-arrival-rate",
      rate: Number(__ENV.RATE || 10),
      timeUnit: "1s",
      duration: __ENV.DURATION || "20s",
      preAllocatedVUs: 8,
    },
  },
  thresholds: {
    checks: ["rate==1"],
    gateway_errors: ["count==0"],
    "http_req_duration{step:fetch}": [`p(99)<${Number(__ENV.P99_MS || 500)}`],
  },
};

export default function () {
  const up = http.post(`${BASE}/api/v1/blobs?channel=pics`, png, {
    headers: { "X-API-Key": API_KEY, "Content-Type": "image/png" },
    tags: { step: "upload" },
  });
  if (!check(up, { "upload 201": (r) => r.status === 201 })) {
    errors.add(1, { code: `upload ${up.status}` });
    return;
  }
  const blob = up.json("blob");
  const got = http.get(`${BASE}${blob.url}`, { tags: { step: "fetch" }, responseType: "binary" });
  check(got, {
    "fetch 200": (r) => r.status === 200,
    "same size": (r) => r.body.byteLength === Number(blob.size),
  });
}

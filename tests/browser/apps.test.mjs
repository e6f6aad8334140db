// The browser client and both demo apps in headless Chromium (Debian's chromium, driven
// by playwright-core), against a real 3-node cluster on Redis behind HAProxy.
//
//   node apps.test.mjs path/to/gateway path/to/volume_backend
//   ONLY="slider|token" node apps.test.mjs …   run only the checks whose name matches
//   WEB_DIST=gateway/web/dist node apps.test.mjs …   pages load the scripts from that
//                                               directory, not the binary (no rebuild)
//
// Saves screenshots of both apps into gateway/web/screenshots/ (the README shows them)
// and prints benchmark numbers (not pass/fail thresholds): the chat page's load from a
// cold cache, and slider-to-pixels latency over 200 moves.
import { createHash } from "node:crypto";
import { once } from "node:events";
import { mkdirSync } from "node:fs";
import net from "node:net";
import { SignJWT } from "jose";
import { chromium } from "playwright-core";
import {
  runner,
  startGateway,
  startHaproxy,
  startRedis,
  startStallingProxy,
  startVolumeBackend,
  stopAll,
} from "./cluster.mjs";

const [gatewayBin, volumeBin] = process.argv.slice(2);
if (!gatewayBin || !volumeBin) throw new Error("usage: node apps.test.mjs path/to/gateway path/to/volume_backend");
const screenshots = new URL("../../gateway/web/screenshots/", import.meta.url).pathname;
mkdirSync(screenshots, { recursive: true });

const SECRET = "browser-test-secret";
const API_KEY = "browser-test-key";
const CONFIG = `
[auth]
hmac_secrets = ["${SECRET}"]
# Tokens then end exactly at exp (the 4003 check uses a 3 s token).
leeway_seconds = 0
[limits]
ping_interval_ms = 25000
[namespaces.default]
allow_anonymous = true
[namespaces.chat]
join_leave = true
allow_anonymous = true
history_size = 2000
[namespaces.secure]
history_size = 1000
`;

const sha256 = (bytes) => createHash("sha256").update(bytes).digest("hex");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const t = runner();

const redis = await startRedis();
const backend = await startVolumeBackend(volumeBin);
const nodes = [];
for (let i = 1; i <= 3; i++) {
  nodes.push(
    await startGateway(gatewayBin, {
      name: `node${i}`,
      config: CONFIG,
      args: ["--redis-url", redis.url, "--api-key", API_KEY, "--rpc-url", `http://${backend.addr}`, "--admin"],
    }),
  );
}
const lb = await startHaproxy(nodes);
const base = `http://${lb.addr}`;

async function api(path, body, addr = nodes[0].addr) {
  const r = await fetch(`http://${addr}${path}`, {
    method: "POST",
    headers: { "X-API-Key": API_KEY, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (r.status !== 200) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

const apiPublish = (channel, text, addr) =>
  api("/api/v1/publish", { channel, data: Buffer.from(JSON.stringify({ name: "api", text })).toString("base64") }, addr);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
         "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

async function newPage() {
  const page = await (await browser.newContext({ viewport: { width: 1100, height: 640 } })).newPage();
  page.on("pageerror", (e) => console.log(`  page error: ${e.message}`));
  if (process.env.WEB_DIST) {
    const { readFileSync } = await import("node:fs");
    await page.route(/\/(volume|chat|client)\.js$/, (r) =>
      r.fulfill({ contentType: "text/javascript", body: readFileSync(`${process.env.WEB_DIST}/${new URL(r.request().url()).pathname}`) }),
    );
  }
  return page;
}

/** Opens the chat in `room` as `name` through the load balancer. */
async function openChat(name, room) {
  const page = await newPage();
  await page.goto(`${base}/?name=${name}&room=${room}`);
  await page.waitForSelector("#status.on", { timeout: 15_000 });
  return page;
}

const nodeOf = (page) => page.evaluate(() => window.chat.client.session?.node);
const messages = (page) => page.$$eval("#log .msg", (els) => els.map((e) => e.textContent));

try {
  await t.check("the chat page loads from a cold cache and connects", async () => {
    // Benchmark: a fresh browser context each time (nothing cached), median of 5 loads.
    const runs = [];
    for (let i = 0; i < 5; i++) {
      const page = await newPage();
      await page.goto(`${base}/?name=cold&room=load`);
      await page.waitForSelector("#status.on", { timeout: 15_000 });
      runs.push(
        await page.evaluate(() => {
          const nav = performance.getEntriesByType("navigation")[0];
          return { response: nav.responseEnd, dom: nav.domContentLoadedEventEnd, load: nav.loadEventEnd, connected: window.chat.connectedAt, bytes: performance.getEntriesByType("resource").reduce((n, r) => n + r.transferSize, nav.transferSize) };
        }),
      );
      await page.context().close();
    }
    const median = (k) => runs.map((r) => r[k]).sort((a, b) => a - b)[2].toFixed(0);
    console.log(`  bench: chat page from a cold cache: response ${median("response")} ms, DOMContentLoaded ${median("dom")} ms, load event ${median("load")} ms, connected ${median("connected")} ms, ${median("bytes")} bytes transferred (median of 5)`);
  });

  let alice, bob;
  await t.check("two pages on two different nodes chat, with names in presence", async () => {
    alice = await openChat("alice", "main");
    for (let i = 0; i < 6; i++) {
      bob = await openChat("bob", "main");
      if ((await nodeOf(bob)) !== (await nodeOf(alice))) break;
      await bob.context().close();
    }
    const [a, b] = [await nodeOf(alice), await nodeOf(bob)];
    if (a === b) throw new Error(`both pages on ${a}`);
    await alice.fill("#text", "hello from alice");
    await alice.press("#text", "Enter");
    await bob.waitForSelector("text=hello from alice", { timeout: 10_000 });
    await bob.fill("#text", "hi alice, bob here");
    await bob.press("#text", "Enter");
    await alice.waitForSelector("text=hi alice, bob here", { timeout: 10_000 });
    for (const p of [alice, bob]) {
      await p.waitForFunction(
        () => [...document.querySelectorAll("#who li")].map((l) => l.textContent).sort().join(",") === "alice,bob",
        null,
        { timeout: 10_000 },
      );
    }
  });

  await t.check("the admin page lists the nodes, shows a channel, publishes and disconnects a user", async () => {
    // A chat page (anonymous "carol") and a client signed in as "erin", both in chat:adm.
    const chat = await openChat("carol", "adm");
    const erin = await newPage();
    const token = await new SignJWT({})
      .setProtectedHeader({ alg: "HS256" })
      .setSubject("erin")
      .sign(new TextEncoder().encode(SECRET));
    await erin.goto(`${base}/volume`);
    await erin.evaluate(async (token) => {
      const { Client } = await import("/client.js");
      const w = (window.erin = { got: [], codes: [] });
      const c = new Client(`ws://${location.host}/ws`, { token });
      c.on("disconnected", (d) => w.codes.push(d.code));
      const sub = c.subscribe("chat:adm");
      sub.on("publication", (p) => w.got.push(new TextDecoder().decode(p.data)));
      await new Promise((r) => sub.on("subscribed", r));
    }, token);
    const admin = await newPage();
    await admin.goto(`${base}/admin`);
    await admin.fill("#key", API_KEY);
    await admin.press("#key", "Enter");
    await admin.waitForFunction((n) => document.querySelectorAll("#nodes tbody tr").length === n, nodes.length, { timeout: 10_000 });
    const names = await admin.$$eval("#nodes tbody tr td:first-child", (tds) => tds.map((td) => td.textContent).sort());
    if (JSON.stringify(names) !== JSON.stringify(nodes.map((n) => n.name).sort())) throw new Error(`nodes listed: ${names}`);
    // CPU is a rate between two refreshes: a number once the second one arrived.
    await admin.waitForFunction(() => [...document.querySelectorAll("#nodes tbody tr td:nth-child(4)")].every((td) => /^\d+\.\d\d$/.test(td.textContent)), null, { timeout: 10_000 });
    await admin.fill("#pub-channel", "chat:adm");
    await admin.fill("#pub-text", "hello from the admin page");
    await admin.click("#publish button");
    await admin.waitForSelector("text=published to chat:adm at offset", { timeout: 10_000 });
    await erin.waitForFunction(() => window.erin.got.includes("hello from the admin page"), null, { timeout: 10_000 });
    await admin.fill("#channel", "chat:adm");
    await admin.click("#inspect button");
    await admin.waitForFunction(() => /carol/.test(document.querySelector("#presence").textContent), null, { timeout: 10_000 });
    await admin.waitForSelector("#history li >> text=hello from the admin page", { timeout: 10_000 });
    await admin.screenshot({ path: `${screenshots}admin.png` });
    await admin.fill("#user", "erin");
    await admin.click("#disconnect button");
    await admin.waitForSelector("text=disconnected erin on every node", { timeout: 10_000 });
    await erin.waitForFunction(() => window.erin.codes.includes(4000), null, { timeout: 10_000 });
    // A wrong key is refused, and says so.
    const wrong = await newPage();
    await wrong.goto(`${base}/admin`);
    await wrong.fill("#key", "not-the-key");
    await wrong.press("#key", "Enter");
    await wrong.waitForSelector("#error >> text=X-API-Key", { timeout: 10_000 });
    for (const p of [chat, erin, admin, wrong]) await p.context().close();
  });

  await t.check("an image sent from one page is shown by the other, byte for byte", async () => {
    // A 1000x700 PNG of noise (~2.8 MB: several upload chunks), made by the browser.
    const b64 = await alice.evaluate(async () => {
      const c = new OffscreenCanvas(1000, 700);
      const g = c.getContext("2d");
      const img = g.createImageData(1000, 700);
      crypto.getRandomValues(img.data.subarray(0, 65536));
      for (let i = 65536; i < img.data.length; i += 65536) img.data.copyWithin(i, 0, Math.min(65536, img.data.length - i));
      for (let i = 3; i < img.data.length; i += 4) img.data[i] = 255;
      g.putImageData(img, 0, 0);
      const bytes = new Uint8Array(await (await c.convertToBlob({ type: "image/png" })).arrayBuffer());
      let s = "";
      for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
      return btoa(s);
    });
    const png = Buffer.from(b64, "base64");
    await alice.setInputFiles("#file", { name: "noise.png", mimeType: "image/png", buffer: png });
    const img = await bob.waitForSelector(`img.photo[data-blob="${sha256(png)}"]`, { timeout: 20_000 });
    await bob.waitForFunction((el) => el.complete && el.naturalWidth === 1000, img, { timeout: 10_000 });
    const fetched = await bob.evaluate(async (el) => {
      const bytes = await (await fetch(el.src)).arrayBuffer();
      const digest = await crypto.subtle.digest("SHA-256", bytes);
      return [...new Uint8Array(digest)].map((x) => x.toString(16).padStart(2, "0")).join("");
    }, img);
    if (fetched !== sha256(png)) throw new Error(`the page fetched ${fetched}, sent ${sha256(png)}`);
    // Sent again: the client hashes first and the server already has it.
    const before = await alice.evaluate(() => performance.getEntriesByType("resource").length);
    await alice.setInputFiles("#file", { name: "again.png", mimeType: "image/png", buffer: png });
    await bob.waitForFunction((id) => document.querySelectorAll(`img.photo[data-blob="${id}"]`).length === 2, sha256(png));
    await alice.screenshot({ path: `${screenshots}chat.png` });
    void before;
  });

  await t.check("a page whose node is killed reconnects elsewhere and shows every message once", async () => {
    const page = await openChat("carol", "kill");
    const victimName = await nodeOf(page);
    const victim = nodes.find((n) => n.name === victimName);
    const other = nodes.find((n) => n !== victim);
    const total = 60;
    for (let i = 1; i <= total; i++) {
      if (i === 20) (victim.kill(), (victim.dead = true));
      await apiPublish("chat:kill", `k${i}`, other.addr);
      await sleep(40);
    }
    await page.waitForFunction((n) => document.querySelectorAll("#log .msg").length >= n, total, { timeout: 30_000 });
    await sleep(500);
    const got = (await messages(page)).map((m) => m.replace(/^api/, ""));
    const want = Array.from({ length: total }, (_, i) => `k${i + 1}`);
    if (JSON.stringify(got) !== JSON.stringify(want)) throw new Error(`got ${got.length}: ${got.join(" ")}`);
    const now = await nodeOf(page);
    if (now === victimName) throw new Error("still on the killed node");
    await page.context().close();
  });

  // The rest runs on the two surviving nodes.
  const alive = nodes.filter((n) => !n.dead);

  await t.check("the volume slider moved quickly through 20 positions ends on the last slice", async () => {
    const page = await newPage();
    await page.goto(`${base}/volume`);
    await page.waitForFunction(() => window.volume?.shown.index >= 0, null, { timeout: 20_000 });
    const positions = Array.from({ length: 20 }, (_, i) => (i * 37) % 128);
    const maxPending = await page.evaluate(async (positions) => {
      const slider = document.getElementById("slice");
      let max = 0;
      for (const v of positions) {
        slider.value = String(v);
        slider.dispatchEvent(new Event("input"));
        max = Math.max(max, window.volume.pending);
        await new Promise((r) => setTimeout(r, 3));
        max = Math.max(max, window.volume.pending);
      }
      return max;
    }, positions);
    if (maxPending > 2) throw new Error(`${maxPending} requests in flight`);
    const last = positions.at(-1);
    await page
      .waitForFunction((last) => window.volume.shown.index === last && window.volume.shown.sha256 !== "", last, {
        timeout: 10_000,
      })
      .catch(async (e) => {
        const state = await page.evaluate(() => ({
          shown: window.volume.shown,
          pending: window.volume.pending,
          status: document.getElementById("status").textContent,
        }));
        throw new Error(`slice ${last} not shown: ${JSON.stringify(state)}: ${e.message}`);
      });
    const served = Buffer.from(
      await (await fetch(`http://${backend.addr}/volume.slice`, { method: "POST", body: String(last) })).arrayBuffer(),
    );
    const shown = await page.evaluate(() => window.volume.shown.sha256);
    if (shown !== sha256(served)) throw new Error(`shown ${shown}, slice ${last} is ${sha256(served)}`);
    // And it is on screen: the canvas has the phantom's bright skull in it.
    const bright = await page.evaluate(() => {
      const c = window.volume.draw();
      const g = document.createElement("canvas");
      g.width = c.width;
      g.height = c.height;
      const ctx = g.getContext("2d");
      ctx.drawImage(c, 0, 0);
      const d = ctx.getImageData(0, 0, g.width, g.height).data;
      let n = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] > 200) n++;
      return n;
    });
    if (bright < 500) throw new Error(`only ${bright} bright pixels on the canvas`);
    await page.screenshot({ path: `${screenshots}volume.png` });

    // Benchmark: slider to pixels over 200 moves, one every 40 ms (a person dragging).
    const timings = await page.evaluate(async () => {
      const slider = document.getElementById("slice");
      window.volume.timings.length = 0;
      window.volume.phases.length = 0;
      for (let i = 0; i < 200; i++) {
        slider.value = String((i * 7) % 128);
        slider.dispatchEvent(new Event("input"));
        await new Promise((r) => setTimeout(r, 40));
      }
      await new Promise((r) => setTimeout(r, 500));
      return { total: window.volume.timings, phases: window.volume.phases };
    });
    const q = (xs, p) => {
      const s = [...xs].sort((a, b) => a - b);
      return s[Math.min(s.length - 1, Math.floor(p * s.length))].toFixed(1);
    };
    const phase = (k) => timings.phases.map((p) => p[k]);
    console.log(
      `  bench: slider to pixels over 200 moves: ${timings.total.length} frames shown, ` +
        `p50 ${q(timings.total, 0.5)} ms, p99 ${q(timings.total, 0.99)} ms, max ${q(timings.total, 1)} ms ` +
        `(p50 round trip ${q(phase("rtt"), 0.5)}, decode ${q(phase("decode"), 0.5)}, draw ${q(phase("frame"), 0.5)} ms)`,
    );
    await page.context().close();
  });

  await t.check("an expired token (4003) makes the client call getToken and resume", async () => {
    const page = await newPage();
    let minted = 0;
    await page.exposeFunction("mintToken", async () => {
      minted++;
      const ttl = minted === 1 ? 3 : 600;
      return await new SignJWT({})
        .setProtectedHeader({ alg: "HS256" })
        .setSubject("dave")
        .setExpirationTime(Math.floor(Date.now() / 1000) + ttl)
        .sign(new TextEncoder().encode(SECRET));
    });
    await page.goto(`${base}/volume`); // any page of ours: the test drives /client.js itself
    await page.evaluate(async () => {
      const { Client } = await import("/client.js");
      const w = (window.tok = { got: [], codes: [] });
      const c = new Client(`ws://${location.host}/ws`, { getToken: () => window.mintToken() });
      c.on("disconnected", (d) => w.codes.push(d.code));
      const sub = c.subscribe("secure:t");
      sub.on("publication", (p) => w.got.push(new TextDecoder().decode(p.data)));
      // Subscribed, not just connected: a plain subscribe delivers what comes after it.
      await new Promise((r) => sub.on("subscribed", r));
    });
    for (let i = 1; i <= 40; i++) {
      await api("/api/v1/publish", { channel: "secure:t", data: Buffer.from(`t${i}`).toString("base64") }, alive[i % alive.length].addr);
      await sleep(150);
    }
    await page.waitForFunction(() => window.tok.got.length >= 40, null, { timeout: 15_000 }).catch(async (e) => {
      const { got, codes } = await page.evaluate(() => window.tok);
      throw new Error(`${got.length} delivered (${got.join(" ")}), closes ${codes}, ${minted} tokens: ${e.message}`);
    });
    const { got, codes } = await page.evaluate(() => window.tok);
    if (!codes.includes(4003)) throw new Error(`no 4003 close: ${codes}`);
    if (minted < 2) throw new Error(`getToken called ${minted} times`);
    const want = Array.from({ length: 40 }, (_, i) => `t${i + 1}`);
    if (JSON.stringify(got) !== JSON.stringify(want)) throw new Error(`got ${got.join(" ")}`);
    await page.context().close();
  });

  await t.check("through a proxy that stalls 2 s every 10 s, 1,000 publications arrive exactly once", async () => {
    const proxy = await startStallingProxy(alive[0].addr);
    const page = await newPage();
    await page.goto(`${base}/volume`);
    await page.evaluate(async (ws) => {
      const { Client } = await import("/client.js");
      const w = (window.stall = { got: [], codes: [], log: [] });
      // The server pings every 25 s: the client's own ping (after 0.5 s of quiet, answered
      // within 1 s) finds a 2 s stall dead long before that.
      const c = new Client(ws, { pingIntervalMs: 500, pingTimeoutMs: 1000 });
      c.on("disconnected", (d) => w.codes.push(d.code));
      const sub = c.subscribe("chat:stall");
      sub.on("publication", (p) => {
        w.got.push(JSON.parse(new TextDecoder().decode(p.data)).text);
        w.log.push(`pub ${p.offset} ${JSON.parse(new TextDecoder().decode(p.data)).text}`);
      });
      sub.on("subscribed", (s) => w.log.push(`subscribed ${s.offset} ${s.epoch} recovered=${s.recovered} re=${s.resubscribed}`));
      sub.on("reset", (r) => w.log.push(`reset ${r.reason} ${r.epoch}`));
      c.on("disconnected", (d) => w.log.push(`disconnected ${d.code} ${d.reason}`));
      await new Promise((r) => sub.on("subscribed", r));
    }, `ws://${proxy.addr}/ws`);
    const started = Date.now();
    let stalled = false;
    const flipper = setInterval(() => {
      const phase = (Date.now() - started) % 10_000;
      if (phase >= 8_000 && !stalled) (stalled = true), proxy.stall();
      if (phase < 8_000 && stalled) (stalled = false), proxy.resume();
    }, 50);
    try {
      for (let i = 1; i <= 1000; i++) {
        await apiPublish("chat:stall", `s${i}`, alive[i % alive.length].addr);
        await sleep(22);
      }
    } finally {
      clearInterval(flipper);
      proxy.resume();
    }
    await page.waitForFunction(() => window.stall.got.length >= 1000, null, { timeout: 30_000 }).catch(async (e) => {
      const { got, codes, log } = await page.evaluate(() => window.stall);
      const lost = Array.from({ length: 1000 }, (_, i) => `s${i + 1}`).filter((s) => !got.includes(s));
      console.log(log.join("\n"));
      throw new Error(`${got.length} delivered, missing ${lost.join(" ")}, closes ${codes}: ${e.message}`);
    });
    await sleep(500);
    const { got, codes } = await page.evaluate(() => window.stall);
    const want = Array.from({ length: 1000 }, (_, i) => `s${i + 1}`);
    const missing = want.filter((s) => !got.includes(s)).length;
    const dupes = got.length - new Set(got).size;
    console.log(`  ${got.length} delivered, ${missing} missing, ${dupes} duplicated, ${codes.length} reconnects (${codes.join(",")}) in ${((Date.now() - started) / 1000).toFixed(0)} s`);
    if (JSON.stringify(got) !== JSON.stringify(want)) throw new Error("not every publication exactly once, in order");
    if (!codes.includes(4004)) throw new Error(`the client's ping never found the stalled link dead: ${codes}`);
    proxy.close();
    await page.context().close();
  });

  await t.check("a server that upgrades and then says nothing: the client gives up, retries, and bounds its commands", async () => {
    // Found by the adversarial review: the client waited forever for the Connect reply.
    const silent = net.createServer((s) => {
      let head = "";
      s.on("error", () => {});
      s.on("data", (d) => {
        head += d;
        if (s.upgraded || !head.includes("\r\n\r\n")) return;
        s.upgraded = true;
        const key = /sec-websocket-key: (\S+)/i.exec(head)[1];
        const proto = /sec-websocket-protocol: ([^,\r]+)/i.exec(head)?.[1];
        const accept = createHash("sha1").update(`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest("base64");
        s.write(
          `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
            `Sec-WebSocket-Accept: ${accept}\r\n${proto ? `Sec-WebSocket-Protocol: ${proto}\r\n` : ""}\r\n`,
        );
      });
    });
    silent.listen(0, "127.0.0.1");
    await once(silent, "listening");
    const page = await newPage();
    await page.goto(`${base}/volume`);
    const r = await page.evaluate(async (url) => {
      const { Client } = await import("/client.js");
      const c = new Client(url, { requestTimeoutMs: 3000 });
      const drops = [];
      c.on("disconnected", (d) => drops.push(d.code));
      const t0 = performance.now();
      const publish = c.publish("x", "hi", { timeoutMs: 2000 }).then(
        () => "resolved",
        (e) => `rejected after ${Math.round(performance.now() - t0)} ms: ${e.message}`,
      );
      await new Promise((res) => setTimeout(res, 6000));
      const state = c.state;
      c.close();
      return { drops, publish: await publish, state };
    }, `ws://127.0.0.1:${silent.address().port}/ws`);
    silent.close();
    await page.context().close();
    console.log(`  ${JSON.stringify(r)}`);
    if (r.drops.length < 2) throw new Error(`gave up ${r.drops.length} times in 6 s`);
    if (!/^rejected after (1|2)\d{3} ms/.test(r.publish)) throw new Error(`publish: ${r.publish}`);
  });
} finally {
  await browser.close();
  stopAll();
}
process.exit(t.summary() ? 1 : 0);

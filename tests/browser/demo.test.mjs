// Browser test of the demo page: starts the real gateway binary, opens the page in two
// headless Chromium tabs (Debian's chromium, driven by playwright-core) and checks that a
// message typed in one tab appears in the other, and that presence counts both tabs.
// Usage: node demo.test.mjs path/to/gateway
import { spawn } from "node:child_process";
import { once } from "node:events";
import { chromium } from "playwright-core";

const bin = process.argv[2];
if (!bin) throw new Error("usage: node demo.test.mjs path/to/gateway");

const gw = spawn(bin, ["--listen", "127.0.0.1:0"], { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, GATEWAY_LOG: "warn" } });
const [line] = await Promise.race([
  once(gw.stdout, "data"),
  new Promise((_, reject) => setTimeout(() => reject(new Error("gateway did not start")), 10000)),
]);
const addr = String(line).trim().replace("listening on ", "");
const url = `http://${addr}/`;

let passed = 0, failed = 0;
async function check(name, fn) {
  try { await fn(); passed++; console.log(`ok - ${name}`); }
  catch (e) { failed++; console.log(`not ok - ${name}: ${e.message}`); }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const ctx = await browser.newContext();
  const a = await ctx.newPage(), b = await ctx.newPage();
  await check("page loads and goes online", async () => {
    for (const p of [a, b]) {
      await p.goto(url);
      await p.waitForSelector("#status.on", { timeout: 10000 });
    }
  });
  await check("a message typed in one tab appears in the other", async () => {
    await a.fill("#name", "alice");
    await a.fill("#text", "hello from tab A");
    await a.press("#text", "Enter");
    await b.waitForSelector("text=hello from tab A", { timeout: 10000 });
    const who = await b.textContent("#log");
    if (!who.includes("alice")) throw new Error(`sender name missing: ${who}`);
  });
  await check("presence counts both tabs", async () => {
    await b.fill("#text", "reply from B");
    await b.press("#text", "Enter");
    await a.waitForSelector("text=reply from B", { timeout: 10000 });
    await a.waitForFunction(() => document.getElementById("who").textContent === "2 here", null, { timeout: 10000 });
  });
  await check("a newly opened tab shows recent history", async () => {
    const c = await ctx.newPage();
    await c.goto(url);
    await c.waitForSelector("text=hello from tab A", { timeout: 10000 });
    await c.screenshot({ path: new URL("demo.png", import.meta.url).pathname });
  });
} finally {
  await browser.close();
  gw.kill("SIGTERM");
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);

// Real processes for the browser tests: redis-server, gateway nodes, HAProxy, the volume
// backend, and a TCP proxy that can stop forwarding. Every process is killed by `stopAll`.
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

const children = new Set();
const dirs = [];

export function tempDir(name) {
  const d = mkdtempSync(join(tmpdir(), `gw-browser-${name}-`));
  dirs.push(d);
  return d;
}

export async function freePort() {
  const s = net.createServer();
  s.listen(0, "127.0.0.1");
  await once(s, "listening");
  const { port } = s.address();
  s.close();
  return port;
}

async function waitForPort(port, what, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const ok = await new Promise((resolve) => {
      const c = net.connect(port, "127.0.0.1");
      c.once("connect", () => (c.destroy(), resolve(true)));
      c.once("error", () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${what} did not listen on ${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function run(cmd, args, opts = {}) {
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "inherit"], ...opts });
  children.add(child);
  child.on("exit", () => children.delete(child));
  return child;
}

/** Resolves with the first stdout line matching `re`. */
async function line(child, re, what, ms = 30_000) {
  let buf = "";
  return await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} did not start`)), ms);
    child.stdout.on("data", (d) => {
      buf += d;
      const m = buf.match(re);
      if (m) {
        clearTimeout(timer);
        resolve(m);
      }
    });
    child.once("exit", (code) => reject(new Error(`${what} exited with ${code}`)));
  });
}

export async function startRedis() {
  const port = await freePort();
  const dir = tempDir("redis");
  run("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir]);
  await waitForPort(port, "redis-server");
  return { port, url: `redis://127.0.0.1:${port}` };
}

/** A gateway node; `config` is TOML written to a file (`null`: no file, built-in defaults). */
export async function startGateway(bin, { config = "", args = [], name = "node" } = {}) {
  const port = await freePort();
  const configArgs = [];
  if (config !== null) {
    const file = join(tempDir("config"), "gateway.toml");
    writeFileSync(file, config);
    configArgs.push("--config", file);
  }
  const child = run(bin, ["--listen", `127.0.0.1:${port}`, "--node-id", name, ...configArgs, ...args], {
    env: { ...process.env, GATEWAY_LOG: process.env.GATEWAY_LOG ?? "warn" },
  });
  await line(child, /listening on (\S+)/, `gateway ${name}`);
  const node = { name, port, addr: `127.0.0.1:${port}`, child, kill: (sig = "SIGKILL") => child.kill(sig) };
  await waitReady(node.addr);
  return node;
}

export async function waitReady(addr, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if ((await fetch(`http://${addr}/readyz`)).status === 200) return;
    } catch {
      /* not yet */
    }
    if (Date.now() > deadline) throw new Error(`${addr} not ready`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** HAProxy in front of `nodes`: round robin, health checks on /readyz every 300 ms. */
export async function startHaproxy(nodes) {
  const port = await freePort();
  const file = join(tempDir("haproxy"), "haproxy.cfg");
  const servers = nodes.map((n) => `  server ${n.name} ${n.addr} check inter 300 fall 2 rise 2`).join("\n");
  writeFileSync(
    file,
    `global\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  timeout tunnel 1h\n  option redispatch\n  retries 3\n` +
      `frontend fe\n  bind 127.0.0.1:${port}\n  default_backend gw\nbackend gw\n  balance roundrobin\n  option httpchk GET /readyz\n${servers}\n`,
  );
  run("haproxy", ["-f", file, "-db"]);
  await waitForPort(port, "haproxy");
  return { port, addr: `127.0.0.1:${port}` };
}

export async function startVolumeBackend(bin) {
  const port = await freePort();
  const child = run(bin, ["--listen", `127.0.0.1:${port}`]);
  await line(child, /listening on/, "volume backend", 60_000);
  return { port, addr: `127.0.0.1:${port}` };
}

/** A TCP proxy to `target` that can stop forwarding (both ways, new connections too). */
export async function startStallingProxy(target) {
  const [host, port] = target.split(":");
  const pairs = new Set();
  let stalled = false;
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), host);
    const pair = { client, upstream };
    pairs.add(pair);
    const close = () => {
      client.destroy();
      upstream.destroy();
      pairs.delete(pair);
    };
    client.on("error", close).on("close", close);
    upstream.on("error", close).on("close", close);
    client.pipe(upstream);
    upstream.pipe(client);
    if (stalled) pause(pair);
  });
  const pause = ({ client, upstream }) => {
    client.unpipe(upstream);
    upstream.unpipe(client);
    client.pause();
    upstream.pause();
  };
  const resume = ({ client, upstream }) => {
    client.pipe(upstream);
    upstream.pipe(client);
  };
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    addr: `127.0.0.1:${server.address().port}`,
    stall() {
      stalled = true;
      pairs.forEach(pause);
    },
    resume() {
      stalled = false;
      pairs.forEach(resume);
    },
    close() {
      server.close();
      pairs.forEach(({ client, upstream }) => (client.destroy(), upstream.destroy()));
    },
  };
}

export function stopAll() {
  for (const c of children) c.kill("SIGKILL");
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}

/** A tiny TAP-ish runner: runs checks in order, prints ok / not ok, counts failures. */
/** Runs named checks in order; `ONLY=regex` runs only those whose name matches it. */
export function runner() {
  let passed = 0;
  let failed = 0;
  const only = process.env.ONLY;
  return {
    async check(name, fn) {
      if (only && !new RegExp(only).test(name)) return;
      const t = Date.now();
      try {
        await fn();
        passed++;
        console.log(`ok - ${name} (${((Date.now() - t) / 1000).toFixed(1)}s)`);
      } catch (e) {
        failed++;
        console.log(`not ok - ${name}: ${e.stack ?? e}`);
      }
    },
    summary() {
      console.log(`${passed} passed, ${failed} failed`);
      return failed;
    },
  };
}

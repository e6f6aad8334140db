// The admin page: everything through the HTTP API with the key the operator types (kept
// in sessionStorage for this tab only). Nodes refresh every 2 s; CPU is the rate of each
// node's CPU seconds between two refreshes.

export {};

type NodeRow = {
  node: string;
  connections: number;
  channels: number;
  updatedUnixMs: number;
  cpuSeconds?: number;
  memoryBytes?: number;
};
type Publication = { offset: string; data?: string; contentType?: string; info?: { user?: string }; blobs?: unknown[] };

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const errorBox = $("error");
const statusBadge = $("status");
let key = sessionStorage.getItem("gateway-admin-key") ?? "";
const lastCpu = new Map<string, { cpu: number; at: number }>();

async function api(method: string, path: string, body?: unknown): Promise<any> {
  const r = await fetch(path, {
    method,
    headers: { "X-API-Key": key, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const answer = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(answer?.error?.message ?? `HTTP ${r.status}`);
  return answer;
}

function show(e: unknown) {
  errorBox.textContent = e instanceof Error ? e.message : String(e);
}

const text = (b64: string | undefined) => {
  if (!b64) return "";
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
};
const b64 = (s: string) => btoa(String.fromCharCode(...new TextEncoder().encode(s)));

async function refreshNodes() {
  if (!key) return;
  try {
    const { nodes } = (await api("GET", "/api/v1/nodes")) as { nodes: NodeRow[] };
    const rows = nodes
      .sort((a, b) => a.node.localeCompare(b.node))
      .map((n) => {
        const prev = lastCpu.get(n.node);
        const cpu = n.cpuSeconds ?? 0;
        let cores = "…";
        if (prev && n.updatedUnixMs > prev.at) cores = ((cpu - prev.cpu) / ((n.updatedUnixMs - prev.at) / 1000)).toFixed(2);
        if (!prev || n.updatedUnixMs > prev.at) lastCpu.set(n.node, { cpu, at: n.updatedUnixMs });
        const mem = n.memoryBytes ? `${(n.memoryBytes / 2 ** 20).toFixed(1)} MiB` : "";
        const age = Math.max(0, Math.round((Date.now() - n.updatedUnixMs) / 1000));
        const tr = document.createElement("tr");
        for (const v of [n.node, n.connections, n.channels, cores, mem, `${age} s ago`]) {
          const td = document.createElement("td");
          td.textContent = String(v);
          tr.append(td);
        }
        return tr;
      });
    $("nodes").querySelector("tbody")!.replaceChildren(...rows);
    statusBadge.textContent = `${nodes.length} node${nodes.length === 1 ? "" : "s"}`;
    statusBadge.classList.add("on");
    errorBox.textContent = "";
  } catch (e) {
    statusBadge.textContent = "error";
    statusBadge.classList.remove("on");
    show(e);
  }
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  key = $<HTMLInputElement>("key").value.trim();
  sessionStorage.setItem("gateway-admin-key", key);
  $<HTMLInputElement>("key").value = "";
  void refreshNodes();
});

$("inspect").addEventListener("submit", async (e) => {
  e.preventDefault();
  const channel = encodeURIComponent($<HTMLInputElement>("channel").value.trim());
  try {
    const [presence, history] = await Promise.all([
      api("GET", `/api/v1/channels/${channel}/presence`).catch((err) => ({ error: err })),
      api("GET", `/api/v1/channels/${channel}/history?limit=20&since_offset=0`).catch((err) => ({ error: err })),
    ]);
    $("presence").textContent = presence.error
      ? `presence: ${presence.error.message}`
      : `present: ${(presence.clients ?? []).map((c: any) => c.name || c.user || c.client).join(", ") || "nobody"}${presence.truncated ? " (truncated)" : ""}`;
    const items = history.error
      ? [Object.assign(document.createElement("li"), { textContent: `history: ${history.error.message}` })]
      : ((history.publications ?? []) as Publication[]).slice(-20).map((p) => {
          const li = document.createElement("li");
          const blobs = p.blobs?.length ? ` [${p.blobs.length} image${p.blobs.length > 1 ? "s" : ""}]` : "";
          li.textContent = `#${p.offset} ${p.info?.user ?? "api"}: ${text(p.data).slice(0, 200)}${blobs}`;
          return li;
        });
    $("history").replaceChildren(...items);
    errorBox.textContent = "";
  } catch (err) {
    show(err);
  }
});

$("publish").addEventListener("submit", async (e) => {
  e.preventDefault();
  const channel = $<HTMLInputElement>("pub-channel").value.trim();
  try {
    const r = await api("POST", "/api/v1/publish", { channel, data: b64($<HTMLInputElement>("pub-text").value) });
    $("published").textContent = `published to ${channel} at offset ${r.offset}`;
    errorBox.textContent = "";
  } catch (err) {
    show(err);
  }
});

$("disconnect").addEventListener("submit", async (e) => {
  e.preventDefault();
  const user = $<HTMLInputElement>("user").value.trim();
  try {
    await api("POST", "/api/v1/disconnect", { user });
    $("disconnected").textContent = `disconnected ${user} on every node`;
    errorBox.textContent = "";
  } catch (err) {
    show(err);
  }
});

if (key) void refreshNodes();
setInterval(() => void refreshNodes(), 2000);

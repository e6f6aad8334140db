// The demo chat at `/`: rooms, a display name, text and images (picker, paste, drop),
// history on join, presence, the connection state. Everything goes through the client
// library the gateway serves at /client.js.
import { Client, type ClientInfo, type Publication, type Subscription } from "/client.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const log = $<HTMLDivElement>("log");
const status = $<HTMLSpanElement>("status");
const text = $<HTMLInputElement>("text");
const nameInput = $<HTMLInputElement>("name");
const roomInput = $<HTMLInputElement>("room");
const progress = $<HTMLProgressElement>("progress");
const who = $<HTMLUListElement>("who");
const whoCount = $<HTMLHeadingElement>("who-count");

const params = new URLSearchParams(location.search);
nameInput.value = params.get("name") ?? localStorage.getItem("chat.name") ?? `guest-${Math.random().toString(36).slice(2, 6)}`;
roomInput.value = params.get("room") ?? localStorage.getItem("chat.room") ?? "lobby";

const wsUrl = params.get("ws") ?? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const decoder = new TextDecoder();

let client = connect();
let room: Subscription | undefined;
const members = new Map<string, string>(); // client id → display name
/** Publications shown (the tests count them: the client delivers each once). */
let received = 0;
/** When the page was first online (ms since navigation started). */
let connectedAt: number | undefined;

function connect(): Client {
  const c = new Client(wsUrl, { name: nameInput.value });
  c.on("state", (s) => {
    if (s === "connected") connectedAt ??= performance.now();
    status.className = s === "connected" ? "on" : "";
    status.textContent = s === "connected" ? `online · ${c.session?.node ?? ""}` : s === "connecting" ? "connecting…" : s;
  });
  c.on("disconnected", (d) => {
    if (d.reconnectInMs !== null) status.textContent = `offline · retrying in ${(d.reconnectInMs / 1000).toFixed(1)} s`;
  });
  return c;
}

function join(name: string): void {
  room?.unsubscribe();
  log.replaceChildren();
  members.clear();
  renderMembers();
  localStorage.setItem("chat.room", name);
  const channel = `chat:${name}`;
  const sub = client.subscribe(channel, { history: 50 });
  room = sub;
  sub.on("publication", (p) => show(p));
  sub.on("subscribed", () => void loadPresence(sub));
  sub.on("join", (info) => {
    members.set(info.client, label(info));
    renderMembers();
  });
  sub.on("leave", (info) => {
    members.delete(info.client);
    renderMembers();
  });
  sub.on("reset", () => note("Some messages could not be recovered; showing what is new."));
  sub.on("error", (e) => note(`error ${e.code}: ${e.message}`));
}

async function loadPresence(sub: Subscription): Promise<void> {
  try {
    const list = await client.presence(sub.channel);
    if (sub !== room) return;
    members.clear();
    for (const info of list) members.set(info.client, label(info));
    renderMembers();
  } catch {
    /* presence may be off for the namespace */
  }
}

function label(info: ClientInfo): string {
  return info.name || info.user || `guest ${info.client.slice(0, 4)}`;
}

function renderMembers(): void {
  who.replaceChildren(
    ...[...members.values()].sort().map((n) => {
      const li = document.createElement("li");
      li.textContent = n;
      return li;
    }),
  );
  whoCount.textContent = `${members.size} here`;
}

function show(p: Publication): void {
  received++;
  let body: { name?: string; text?: string } = {};
  try {
    body = JSON.parse(decoder.decode(p.data));
  } catch {
    body = { text: decoder.decode(p.data) };
  }
  const div = document.createElement("div");
  div.className = "msg";
  div.dataset.offset = String(p.offset);
  const b = document.createElement("b");
  b.textContent = body.name ?? "?";
  div.append(b, document.createTextNode(body.text ?? ""));
  for (const blob of p.blobs) {
    const img = document.createElement("img");
    img.className = "photo";
    img.alt = blob.name || "image";
    img.dataset.blob = blob.id;
    if (blob.width) img.width = blob.width;
    if (blob.height) img.height = blob.height;
    img.src = blob.url;
    div.append(img);
  }
  // In offset order: history and live messages may interleave on a reconnect.
  const after = [...log.children].find((el) => {
    const o = (el as HTMLElement).dataset.offset;
    return o !== undefined && BigInt(o) > p.offset && p.offset > 0n;
  });
  log.insertBefore(div, after ?? null);
  if (!after) log.scrollTop = log.scrollHeight;
}

function note(message: string): void {
  const div = document.createElement("div");
  div.className = "note";
  div.textContent = message;
  log.append(div);
}

function payload(message: string): string {
  return JSON.stringify({ name: nameInput.value, text: message });
}

async function send(): Promise<void> {
  const message = text.value.trim();
  if (!message || !room) return;
  text.value = "";
  try {
    await client.publish(room.channel, payload(message), { contentType: "application/json" });
  } catch (e) {
    note(`not sent: ${(e as Error).message}`);
    text.value = message;
  }
}

async function sendImages(files: Iterable<File>): Promise<void> {
  const channel = room?.channel;
  if (!channel) return;
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    progress.hidden = false;
    progress.value = 0;
    try {
      const blob = await client.uploadBlob(channel, file, {
        onProgress: (sent, total) => (progress.value = total ? sent / total : 1),
      });
      await client.publish(channel, payload(""), { contentType: "application/json", blobs: [{ ...blob, name: file.name }] });
    } catch (e) {
      note(`image not sent: ${(e as Error).message}`);
    } finally {
      progress.hidden = true;
    }
  }
}

text.addEventListener("keydown", (e) => {
  if (e.key === "Enter") void send();
});
$("send").addEventListener("click", () => void send());
$<HTMLInputElement>("file").addEventListener("change", (e) => {
  const input = e.target as HTMLInputElement;
  void sendImages(input.files ?? []).then(() => (input.value = ""));
});
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.files ?? [])];
  if (files.length) {
    e.preventDefault();
    void sendImages(files);
  }
});
log.addEventListener("dragover", (e) => {
  e.preventDefault();
  log.classList.add("drop");
});
log.addEventListener("dragleave", () => log.classList.remove("drop"));
log.addEventListener("drop", (e) => {
  e.preventDefault();
  log.classList.remove("drop");
  void sendImages(e.dataTransfer?.files ?? []);
});
roomInput.addEventListener("change", () => join(roomInput.value.trim() || "lobby"));
nameInput.addEventListener("change", () => {
  localStorage.setItem("chat.name", nameInput.value);
  // The name travels in `connect`: reconnect with it, keeping the room.
  client.close();
  client = connect();
  join(roomInput.value.trim() || "lobby");
});

join(roomInput.value.trim() || "lobby");
// For tests and the curious.
Object.assign(window, {
  chat: {
    get client() { return client; },
    get room() { return room; },
    get received() { return received; },
    get connectedAt() { return connectedAt; },
  },
});
